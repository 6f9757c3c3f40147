//! Stopping a real `ringkv node`: SIGTERM drains it (a request already under
//! way finishes and its answer reaches the client, while new requests are
//! refused with advice), and a second signal stops it at once, exit 130.
//! The CLI, given several nodes, goes on to the next while one is
//! unreachable or draining.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringkv_core::wire::{ErrorReply, GetRequest, PutRequest, Request, Response};
use ringkv_core::{Consistency, Payload};
use ringkv_node::Client;

/// n1 is "near", n2 "far": every call between them takes 4 s each way,
/// so a W=all put through n1 is under way for 8 s: time enough, on a busy
/// machine, for a signal to arrive and a CLI process to start meanwhile.
const MATRIX: &str = r#"
regions = ["near", "far"]
[[link]]
between = ["near", "far"]
delay_ms = 4000
"#;

fn put(key: &str, w: Consistency) -> Request {
    let mut put = PutRequest::new(
        key.as_bytes().to_vec(),
        Payload::Value(b"v".to_vec()),
        w,
        None,
    );
    put.timeout_ms = 20_000;
    Request::Put(put)
}

/// Starts a W=all put of `key` (one not written before: its arrival at n1
/// is the sign the put is under way) through `client`, which waits for n2
/// (8 s away);
/// sends node 0 `signal`; and returns the first refusal n1 gives a new
/// request, once the drain has begun, and the put still waiting then.
async fn put_under_way_then_signal(
    c: &Cluster,
    client: &Arc<Client>,
    key: &'static str,
) -> (
    ErrorReply,
    tokio::task::JoinHandle<Result<Response, ringkv_node::CallError>>,
) {
    let waiting = tokio::spawn({
        let (client, put) = (client.clone(), put(key, Consistency::All));
        async move { client.call(&put).await }
    });
    // The W=all put is under way once n1 holds it: n1 writes it first,
    // then waits 8 s for n2. (A request sent after it is no sign: the
    // spawned task may not have sent it yet.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut local = GetRequest::new(key.as_bytes().to_vec(), Consistency::One);
        local.local = true;
        match client.call(&Request::Get(local)).await.unwrap() {
            Response::Get(g) if !g.values.is_empty() => break,
            Response::Get(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the W=all put never reached n1");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // n1 answers a W=1 put at once; the W=all one is still waiting after.
    let answer = client.call(&put("one", Consistency::One)).await.unwrap();
    assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    assert!(!waiting.is_finished(), "{:?}", waiting.await);

    c.signal(0, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match client.call(&put("new", Consistency::One)).await.unwrap() {
            Response::Put(_) => {}
            Response::Error(e) => break e,
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "n1 never began to drain");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        !waiting.is_finished(),
        "the W=all put was still under way when the drain began: {:?}",
        waiting.await
    );
    (refusal, waiting)
}

#[test]
fn sigterm_drains_the_node_and_a_second_signal_stops_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let matrix = dir.path().join("matrix.toml");
    std::fs::write(&matrix, MATRIX).unwrap();
    let matrix = matrix.to_string_lossy().into_owned();
    let mut c = Cluster::start_each("sigterm_drains", 2, 2, |i, _| {
        let region = ["near", "far"][i];
        [
            "--region",
            region,
            "--latency-matrix",
            &matrix,
            "--no-hints",
            "--drain-timeout-s",
            "30",
        ]
        .map(String::from)
        .to_vec()
    });
    let addr: std::net::SocketAddr = c.addr(0).parse().unwrap();
    let rt = runtime();
    let connect =
        || async move { Arc::new(Client::connect(addr, Duration::from_secs(5)).await.unwrap()) };

    // One signal: the put under way is answered, new requests are refused.
    rt.block_on(async {
        let client = connect().await;
        let (refusal, waiting) = put_under_way_then_signal(&c, &client, "all-1").await;
        assert!(
            refusal
                .message
                .contains("n1 is shutting down; ask another node"),
            "{refusal:?}"
        );
        assert_eq!(refusal.kind, ringkv_core::wire::ErrorKind::NotServing);
        let answer = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("answered within the drain")
            .unwrap();
        assert!(matches!(answer, Ok(Response::Put(_))), "{answer:?}");
    });
    let (status, stderr) = c.wait_exit(0, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{stderr}");

    // n1 is down: the CLI goes on to n2.
    let both = format!("{},{}", c.addr(0), c.addr(1));
    let out = run(ringkv().args([
        "put",
        "after",
        "v",
        "-w",
        "1",
        "--node",
        &both,
        "--connect-timeout-ms",
        "500",
        "--log",
        "info",
    ]));
    assert_exit(&out, 0);
    assert!(
        common::stderr(&out).contains("cannot reach node"),
        "{}",
        common::stderr(&out)
    );

    // Two signals: the second cuts the drain short, without waiting for
    // the put under way (which will hear of it at its connection's idle
    // timeout: the process is gone).
    c.restart(0);
    let client = rt.block_on(connect());
    let (_, waiting) = rt.block_on(put_under_way_then_signal(&c, &client, "all-2"));
    // n1 drains (for up to 8 s more): it refuses new connections at
    // once, so the CLI sends the write to n2 instead without waiting out
    // its connect timeout (3 s).
    let out = run(ringkv().args([
        "put", "during", "v", "-w", "1", "--node", &both, "--log", "info",
    ]));
    assert_exit(&out, 0);
    assert!(
        common::stderr(&out).contains("the server refused to accept a new connection"),
        "{}",
        common::stderr(&out)
    );
    c.signal(0, "TERM");
    let (status, stderr) = c.wait_exit(0, Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped at once on a second signal"),
        "{stderr}"
    );
    waiting.abort();

    // Both writes are on n2, which coordinated them.
    for key in ["after", "during"] {
        let out = c.cli(1, &["get", key, "--local", "--json"]);
        assert_eq!(values(&out), ["v"], "{key}");
    }
}
