//! `--max-connections`: past the limit a new connection is refused at once
//! (the client hears it, rather than waiting out a handshake timeout), and
//! a slot frees up when a connection ends.

use std::time::{Duration, Instant};

use ringkv_core::wire::{Request, Response};
use ringkv_core::NodeId;
use ringkv_node::{Client, Node, NodeConfig};

#[tokio::test]
async fn connections_past_the_limit_are_refused_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    config.max_connections = 1;
    let node = Node::start(config).await.unwrap();

    let first = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(
        first.call(&Request::Ping).await.unwrap(),
        Response::Pong
    ));
    let started = Instant::now();
    let second = Client::connect(node.addr(), Duration::from_secs(5)).await;
    assert!(second.is_err(), "a second connection was served");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused, not timed out: {:?}",
        started.elapsed()
    );

    first.close().await;
    // The server notices the close and frees the slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let third = loop {
        match Client::connect(node.addr(), Duration::from_secs(5)).await {
            Ok(client) => break client,
            Err(e) => assert!(Instant::now() < deadline, "no slot freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(
        third.call(&Request::Ping).await.unwrap(),
        Response::Pong
    ));
    third.close().await;
    node.shutdown().await;
}
