//! Reads a node's key metrics from its `/metrics` endpoint (config `http_port`), for the
//! monitor: the Raft log's fsync latency and the round trip to its peers, as p99 over the
//! last poll interval (or since the node started, on the first poll).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// A histogram's cumulative buckets: upper bound (seconds) → observations at or below it.
pub type Buckets = BTreeMap<u64, f64>;

/// What the monitor shows of a node's metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyMetrics {
    pub fsync: Buckets,
    /// Every peer's round trips, added up.
    pub peer_rtt: Buckets,
}

/// Bucket bounds as integer nanoseconds, so that they can be map keys (`+Inf` is u64::MAX).
fn bound_key(le: &str) -> Option<u64> {
    if le == "+Inf" {
        return Some(u64::MAX);
    }
    let s: f64 = le.parse().ok()?;
    Some((s * 1e9).round() as u64)
}

/// The key metrics in a scrape (Prometheus text); the rest is ignored.
pub fn parse(text: &str) -> KeyMetrics {
    let mut m = KeyMetrics::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let target = if series.starts_with("raftkv_disk_wal_fsync_duration_seconds_bucket{") {
            &mut m.fsync
        } else if series.starts_with("raftkv_network_peer_round_trip_time_seconds_bucket{") {
            &mut m.peer_rtt
        } else {
            continue;
        };
        let Some(le) = series
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(bound_key)
        else {
            continue;
        };
        *target.entry(le).or_default() += value;
    }
    m
}

/// The buckets of observations made since `before`.
pub fn since(now: &Buckets, before: Option<&Buckets>) -> Buckets {
    now.iter()
        .map(|(le, n)| {
            let b = before.and_then(|b| b.get(le)).copied().unwrap_or(0.0);
            (*le, (n - b).max(0.0))
        })
        .collect()
}

/// The `q` quantile in seconds, as Prometheus' `histogram_quantile` computes it (linear within
/// the bucket it falls in); `None` without observations. In the `+Inf` bucket: the highest
/// finite bound.
pub fn quantile(b: &Buckets, q: f64) -> Option<f64> {
    let total = b
        .get(&u64::MAX)
        .copied()
        .or_else(|| b.values().last().copied())?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0u64, 0.0);
    for (&le, &count) in b {
        if count >= rank {
            if le == u64::MAX {
                return Some(lower.0 as f64 / 1e9);
            }
            let (lo, lo_count) = lower;
            let in_bucket = count - lo_count;
            let frac = if in_bucket > 0.0 {
                (rank - lo_count) / in_bucket
            } else {
                1.0
            };
            return Some((lo as f64 + (le - lo) as f64 * frac) / 1e9);
        }
        lower = (le, count);
    }
    None
}

/// An HTTP client: plain HTTP keeps its connections between polls; over TLS (a cluster with a
/// tls section) each scrape is one connection, verified against the cluster CA.
#[derive(Clone)]
pub struct HttpClient {
    plain: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Empty<Bytes>,
    >,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

pub fn http_client(dialer: &crate::security::Dialer) -> HttpClient {
    HttpClient {
        plain: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
        tls: dialer.https_config(),
    }
}

/// One GET over TLS.
async fn get_tls(
    config: std::sync::Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad host {host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| crate::security::describe_tls_failure(&e).unwrap_or_else(|| e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// GETs `http(s)://host:port/metrics` and reads its key metrics; `Err` says why not.
pub async fn fetch(
    client: &HttpClient,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<KeyMetrics, String> {
    let uri: hyper::Uri = format!("http://{host}:{port}/metrics")
        .parse()
        .map_err(|e| format!("bad address {host}:{port}: {e}"))?;
    let get = async {
        let resp = match &client.tls {
            None => client.plain.get(uri).await.map_err(|e| e.to_string())?,
            Some(c) => get_tls(c.clone(), host, port, "/metrics").await?,
        };
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(parse(&String::from_utf8_lossy(&body)))
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| "no answer in time".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# HELP raftkv_disk_wal_fsync_duration_seconds The latency.
# TYPE raftkv_disk_wal_fsync_duration_seconds histogram
raftkv_disk_wal_fsync_duration_seconds_sum 1.5
raftkv_disk_wal_fsync_duration_seconds_count 100
raftkv_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 50
raftkv_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 90
raftkv_disk_wal_fsync_duration_seconds_bucket{le=\"0.004\"} 100
raftkv_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 100
raftkv_network_peer_round_trip_time_seconds_bucket{le=\"0.0001\",to=\"2\"} 0
raftkv_network_peer_round_trip_time_seconds_bucket{to=\"2\",le=\"0.0002\"} 10
raftkv_network_peer_round_trip_time_seconds_bucket{le=\"+Inf\",to=\"2\"} 10
raftkv_network_peer_round_trip_time_seconds_bucket{le=\"0.0001\",to=\"3\"} 0
raftkv_network_peer_round_trip_time_seconds_bucket{le=\"0.0002\",to=\"3\"} 0
raftkv_network_peer_round_trip_time_seconds_bucket{le=\"+Inf\",to=\"3\"} 10
raftkv_server_has_leader 1
# EOF
";

    #[test]
    fn p99_is_interpolated_within_its_bucket_like_histogram_quantile() {
        let m = parse(SCRAPE);
        // Rank 99 of 100 lies in (0.002, 0.004]: 9 of its 10 observations up.
        let p99 = quantile(&m.fsync, 0.99).expect("observations");
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        let p50 = quantile(&m.fsync, 0.5).expect("observations");
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        // Two peers added up; the slow one's round trips are all past the last bound.
        assert_eq!(m.peer_rtt.get(&u64::MAX), Some(&20.0));
        assert_eq!(quantile(&m.peer_rtt, 0.99), Some(0.0002));
        assert_eq!(quantile(&Buckets::new(), 0.99), None);
    }

    #[test]
    fn the_last_interval_counts_only_new_observations() {
        let before = parse(SCRAPE).fsync;
        let mut now = before.clone();
        // 10 new fsyncs, all slow (over 2 ms).
        for (le, n) in now.iter_mut() {
            if *le >= 4_000_000 {
                *n += 10.0;
            }
        }
        let recent = since(&now, Some(&before));
        let p99 = quantile(&recent, 0.99).expect("new observations");
        assert!(p99 > 0.002, "{p99}");
        assert_eq!(quantile(&since(&before, Some(&before)), 0.99), None);
    }
}
