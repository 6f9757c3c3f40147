//! A node that has shut down has closed its database: the data dir can be
//! opened again at once, by a new node in the same process.

use std::net::SocketAddr;
use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeHandle};

fn config(dir: &std::path::Path) -> NodeConfig {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    NodeConfig::new(NodeId::new("n1").unwrap(), listen, dir.into())
}

/// Starts a node in `dir` and writes one key through a client, which
/// leaves a connection handler behind that holds the node.
async fn start_and_put(dir: &std::path::Path) -> (NodeHandle, Client) {
    let node = Node::start(config(dir)).await.unwrap();
    let client = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let put = PutRequest::new(
        b"k".to_vec(),
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    assert!(matches!(
        client.call(&Request::Put(put)).await.unwrap(),
        Response::Put(_)
    ));
    (node, client)
}

#[tokio::test]
async fn shutdown_closes_the_database_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start_and_put(dir.path()).await;
    node.shutdown().await;

    let again = Node::start(config(dir.path()))
        .await
        .expect("the data dir is free once shutdown returns");
    again.shutdown().await;
    client.close().await;
}

/// A shutdown that finds no request handler left records itself as clean,
/// so the next start keeps the epoch (and its actor id). A holder of the
/// node that outlived shutdown would make every restart a new actor.
#[tokio::test]
async fn a_clean_shutdown_lets_the_next_start_keep_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start_and_put(dir.path()).await;
    node.shutdown().await;
    client.close().await;

    let storage = ringkv_node::storage::Storage::open(dir.path(), false).unwrap();
    let used = storage
        .meta_get("epoch")
        .unwrap()
        .expect("the run had an epoch");
    let next = storage.begin_epoch().unwrap();
    assert_eq!(next.to_le_bytes().as_slice(), used.as_slice());
}
