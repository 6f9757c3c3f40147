//! Helpers the node tests that start in-process nodes share (`leave`,
//! `cleanup`, `cluster_client`, and restarts in one process).

// Each test crate that includes this module uses only some helpers.
#![allow(dead_code)]

use std::time::Duration;

use ringkv_core::dvv::{Clock, Payload, VersionVector};
use ringkv_core::wire::{GetRequest, PutRequest, ReplicaRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeHandle};
use ringkv_ring::Ring;

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Node `id`, N=`replicas`, with nothing in the background that could copy
/// keys for it: no anti-entropy, no read repair.
pub fn config(id: &str, dir: &std::path::Path, replicas: usize) -> NodeConfig {
    let mut c = NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into());
    c.replicas = Some(replicas);
    c.anti_entropy_interval = None;
    c.read_repair_chance = 0.0;
    c
}

pub async fn start(dirs: &[tempfile::TempDir], replicas: usize) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut c = config(&format!("n{}", i + 1), dir.path(), replicas);
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.addr()];
        }
        nodes.push(Node::start(c).await.unwrap());
    }
    nodes
}

pub fn data_dirs(count: usize) -> Vec<tempfile::TempDir> {
    (0..count).map(|_| tempfile::tempdir().unwrap()).collect()
}

pub async fn client(node: &NodeHandle) -> Client {
    Client::connect(node.addr(), TIMEOUT).await.unwrap()
}

pub fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// The ring of nodes `ids` (default virtual nodes), N=`replicas`.
pub fn ring(ids: &[&str], replicas: usize) -> Ring {
    Ring::new(
        ids.iter().map(|i| (id(i), ringkv_ring::DEFAULT_VNODES)),
        replicas,
    )
    .unwrap()
}

pub async fn put_all(client: &Client, keys: &[String]) {
    for key in keys {
        let put = PutRequest::new(
            key.clone(),
            Payload::Value(key.clone().into_bytes()),
            Consistency::All,
            None,
        );
        let answer = client.call(&Request::Put(put)).await.unwrap();
        assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    }
}

/// A merge of a new version of `key` (value: the key) into the one node
/// it is sent to, and nowhere else: as a W=1 write does while the key's
/// other replicas are unreachable, or as a copy left from an older ring.
pub fn merge_here(key: &str) -> Request {
    let mut clock = Clock::new();
    clock.update(
        &VersionVector::new(),
        Payload::Value(key.as_bytes().to_vec()),
        &id("direct"),
    );
    Request::replica_from(
        id("direct"),
        ReplicaRequest::Sync {
            key: key.as_bytes().to_vec(),
            clock,
        },
    )
}

/// Stores `key` on the node `client` is connected to only (see [`merge_here`]).
pub async fn store_only_here(client: &Client, key: &str) {
    assert!(matches!(
        client.call(&merge_here(key)).await.unwrap(),
        Response::Clock(None)
    ));
}

/// Whether the node `client` is connected to stores `key` itself.
pub async fn held_locally(client: &Client, key: &str) -> bool {
    let get = Request::Get(GetRequest {
        local: true,
        ..GetRequest::new(key, Consistency::One)
    });
    matches!(client.call(&get).await, Ok(Response::Get(g)) if g.values == [key.as_bytes().to_vec()])
}

/// Starts `config`'s node again, at the address and in the data dir a run
/// in this process just gave up: its socket and store may be held a moment
/// longer (by a task still ending), so the start is tried again until it
/// gets them, for up to 10 s.
pub async fn start_again(config: NodeConfig) -> NodeHandle {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Node::start(config.clone()).await {
            Ok(node) => return node,
            Err(
                e @ (ringkv_node::NodeError::Listen { .. }
                | ringkv_node::NodeError::DataDirInUse { .. }),
            ) => {
                assert!(std::time::Instant::now() < deadline, "no restart: {e}")
            }
            Err(e) => panic!("no restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
