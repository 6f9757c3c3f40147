//! A node that crashed and started again at its address resets at once the
//! connections others still hold to its previous run (a QUIC stateless
//! reset, from a key kept in its data dir). Without it, a request on such
//! a connection goes unanswered until the connection's idle timeout: the
//! new run cannot read its packets, and its resets would not be believed.

use std::time::{Duration, Instant};

use ringkv_core::wire::{Request, Response};
use ringkv_core::NodeId;
use ringkv_node::{CallError, Client, Node, NodeConfig};

mod support;

#[test]
fn a_restarted_node_resets_connections_to_its_previous_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    // The first run, on a runtime of its own that the test can stop dead.
    let crashed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let first = crashed.block_on(Node::start(config.clone())).unwrap();
    config.listen = first.addr();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(async {
        let client = Client::connect(config.listen, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(
            client.call(&Request::Ping).await.unwrap(),
            Response::Pong
        ));
        client
    });

    // A crash: its tasks are dropped unpolled, so it sends nothing (no
    // close) and its socket and database are let go.
    crashed.shutdown_timeout(Duration::from_secs(5));
    drop(first);

    runtime.block_on(async {
        // Started again at the same address, in the same data dir.
        let second = support::start_again(config.clone()).await;
        let asked = Instant::now();
        let outcome = client.call(&Request::Ping).await;
        let waited = asked.elapsed();
        assert!(
            matches!(
                outcome,
                Err(CallError::Connection(_) | CallError::Unread(_))
            ),
            "{outcome:?}"
        );
        // A reset comes back in one round trip; without one the call would
        // wait out the 10 s idle timeout. Half of that leaves room for a
        // busy machine.
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
        second.shutdown().await;
    });
}
