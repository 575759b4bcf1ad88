//! The node's HTTP endpoint (config `http_port`): `/metrics` for Prometheus, `/livez` and
//! `/readyz` as etcd has them (200 with `ok`, or 503 with a line per failed check; `?verbose`
//! lists every check).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::health::{self, Health};
use crate::metrics::{self, Metrics};

#[derive(Clone)]
struct State {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves until `shutdown` completes.
pub async fn serve<L>(
    listener: L,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(State { metrics, health });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("the HTTP endpoint stopped: {e}");
    }
}

async fn scrape(axum::extract::State(s): axum::extract::State<State>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
}

fn verbose(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "verbose" || p.starts_with("verbose="))
    })
}

fn answer(what: &str, checks: &[health::Check], uri: &Uri) -> (StatusCode, String) {
    let code = if health::passed(checks) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, health::report(what, checks, verbose(uri)))
}

async fn livez(
    axum::extract::State(s): axum::extract::State<State>,
    uri: Uri,
) -> impl IntoResponse {
    answer("livez", &s.health.live(), &uri)
}

async fn readyz(
    axum::extract::State(s): axum::extract::State<State>,
    uri: Uri,
) -> impl IntoResponse {
    answer("readyz", &s.health.ready(), &uri)
}
