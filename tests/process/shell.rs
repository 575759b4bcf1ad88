//! #12: the shell splits its input as a shell does (quotes keep spaces, an empty quoted value is
//! a value, an unclosed quote runs nothing) and takes commands in any case.

use crate::ELECTION;
use crate::harness::{TestCluster, run_cli};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_quoted_keys_and_values_round_trip_exactly() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let cfg = c.config.to_str().expect("utf-8 path");
    let (code, out, err) = run_cli(
        &["shell", "--config", cfg],
        concat!(
            "set 'my key' \"  a value \"\n",
            "get 'my key'\n",
            "get --stale \"my key\"\n",
            "SET Upper 'Mixed  Case'\n",
            "GET Upper\n",
            "set empty \"\"\n",
            "Get empty\n",
            "set color #fff\n",
            "get color\n",
            "EXIT\n",
            "set after exit\n",
        ),
        c.dir.path(),
    );
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "OK",
            "  a value ",
            "  a value ",
            "OK",
            "Mixed  Case",
            "OK",
            "",
            "OK",
            "#fff"
        ],
        "stderr: {err}"
    );
    // What the cluster holds, read past the shell.
    let mut client = c.client();
    for (key, want) in [
        ("my key", Some(&b"  a value "[..])),
        ("Upper", Some(b"Mixed  Case")),
        ("empty", Some(b"")),
        ("color", Some(b"#fff")),
        ("'my", None),
        ("upper", None),
        ("after", None),
    ] {
        let got = client.get(key, false).await.expect("read");
        assert_eq!(got.as_deref(), want, "key {key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_unclosed_quote_is_an_error_and_writes_nothing() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let cfg = c.config.to_str().expect("utf-8 path");
    let (code, out, err) = run_cli(
        &["shell", "--config", cfg],
        "set 'k v\nset ok \"yes\"\nget ok\n",
        c.dir.path(),
    );
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("unclosed quote: the ' at column 5 has no closing '"),
        "{err}"
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["OK", "yes"],
        "the lines after it ran"
    );
    let mut client = c.client();
    for key in ["'k", "k", "k v"] {
        let got = client.get(key, false).await.expect("read");
        assert_eq!(got, None, "key {key:?} was written");
    }
}
