//! A `ClusterClient` survives a rolling restart: while its node shuts down
//! it moves to the next, losing at most the requests under way when the
//! connection closed, and it goes back once the node is up again.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{GetRequest, PutRequest, Request, Response};
use ringkv_core::Consistency;
use ringkv_node::{ClusterClient, Node};
use support::{config, data_dirs, start, TIMEOUT};

const WRITERS: u64 = 8;

fn put(key: String) -> Request {
    Request::Put(PutRequest::new(
        key.into_bytes(),
        Payload::Value(b"v".to_vec()),
        Consistency::Quorum,
        None,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_on_while_its_node_restarts_and_then_goes_back() {
    let dirs = data_dirs(3);
    let mut nodes = start(&dirs, 3).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr()).collect();
    let client = Arc::new(
        ClusterClient::connect(addrs.clone(), 0, TIMEOUT, None)
            .await
            .unwrap(),
    );

    // Writers keep writing through the client while its node shuts down.
    let (written, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (client, written, failed, stop) = (
            client.clone(),
            written.clone(),
            failed.clone(),
            stop.clone(),
        );
        writers.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match client.call(&put(format!("w{w}-{i}"))).await {
                    Ok(Response::Put(_)) => written.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
            }
            (w, i)
        });
    }
    wait_until("writes flow", || written.load(Ordering::Relaxed) >= 50).await;
    nodes.remove(0).shutdown().await;
    let after_shutdown = written.load(Ordering::Relaxed);
    wait_until("writes flow through another node", || {
        written.load(Ordering::Relaxed) >= after_shutdown + 200
    })
    .await;
    assert_ne!(client.current_node(), addrs[0]);
    assert!(client.failovers() >= 1);
    // Only requests already on the closing connection may fail: a refusal
    // ("shutting down") is resent by the client, unseen by its caller.
    assert!(
        failed.load(Ordering::Relaxed) <= WRITERS,
        "{} writes failed",
        failed.load(Ordering::Relaxed)
    );

    // The node comes back at its address: the client returns to it.
    let mut again = config("n1", dirs[0].path(), 3);
    again.listen = addrs[0];
    let restarted = Node::start(again).await.unwrap();
    // The return probe backs off (1, 2, 4, 8 s… after the move), so give
    // it room for a few misses while the node restarts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.current_node() != addrs[0] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client did not go back to its node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (back, moves) = (written.load(Ordering::Relaxed), client.failovers());
    wait_until("writes flow through the node again", || {
        written.load(Ordering::Relaxed) >= back + 50
    })
    .await;
    // Back for good: no move away and back again.
    assert_eq!(client.current_node(), addrs[0]);
    assert_eq!(client.failovers(), moves);
    stop.store(true, Ordering::Relaxed);
    let mut keys = Vec::new();
    while let Some(done) = writers.join_next().await {
        let (w, count) = done.unwrap();
        keys.extend((0..count).map(|i| format!("w{w}-{i}")));
    }
    assert!(failed.load(Ordering::Relaxed) <= WRITERS);

    // Each key was written once, without a context: a request sent to a
    // second node after the first may have run it would show as two
    // siblings.
    for key in &keys {
        let get = Request::Get(GetRequest::new(key.as_bytes().to_vec(), Consistency::All));
        match client.call(&get).await.unwrap() {
            Response::Get(g) => assert!(g.values.len() <= 1, "{key} was written twice"),
            other => panic!("{key}: {other:?}"),
        }
    }

    Arc::into_inner(client).unwrap().close().await;
    restarted.shutdown().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// Polls `done` until it holds, failing the test after 15 s.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
