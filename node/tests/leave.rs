//! `ringkv leave`: a live node hands every key it holds to the replicas
//! that take over its ranges before a member removes it, so even a write
//! that it alone held survives; and it refuses to leave when that cannot be
//! done safely.

use std::time::Duration;

use ringkv_core::dvv::{Clock, Payload, VersionVector};
use ringkv_core::wire::{GetRequest, PutRequest, ReplicaRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeError, NodeHandle};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Node `id` that does nothing in the background that could copy keys for
/// it: no anti-entropy, no read repair.
fn config(id: &str, dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into());
    c.replicas = Some(3);
    c.anti_entropy_interval = None;
    c.read_repair_chance = 0.0;
    c
}

async fn start(count: usize, dirs: &[tempfile::TempDir]) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (i, dir) in dirs.iter().enumerate().take(count) {
        let mut c = config(&format!("n{}", i + 1), dir.path());
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.addr()];
        }
        nodes.push(Node::start(c).await.unwrap());
    }
    nodes
}

async fn client(node: &NodeHandle) -> Client {
    Client::connect(node.addr(), TIMEOUT).await.unwrap()
}

async fn put_all(client: &Client, keys: impl Iterator<Item = String>) {
    for key in keys {
        let put = PutRequest::new(
            key.clone(),
            Payload::Value(key.into_bytes()),
            Consistency::All,
            None,
        );
        let answer = client.call(&Request::Put(put)).await.unwrap();
        assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    }
}

/// Whether `node` itself stores `key` with the value `key`.
async fn held_locally(client: &Client, key: &str) -> bool {
    let get = Request::Get(GetRequest {
        local: true,
        ..GetRequest::new(key, Consistency::One)
    });
    matches!(client.call(&get).await, Ok(Response::Get(g)) if g.values == [key.as_bytes().to_vec()])
}

#[tokio::test]
async fn a_leaving_node_hands_every_key_to_the_replicas_that_take_its_ranges() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = start(4, &dirs).await;
    let c1 = client(&nodes[0]).await;
    put_all(&c1, (0..100).map(|i| format!("shared{i}"))).await;
    // Writes that only n4 holds (as after a W=1 write while its peers were
    // unreachable): merged into n4 alone.
    let c4 = client(&nodes[3]).await;
    let solo: Vec<String> = (0..40).map(|i| format!("solo{i}")).collect();
    for key in &solo {
        let mut clock = Clock::new();
        clock.update(
            &VersionVector::new(),
            Payload::Value(key.clone().into_bytes()),
            &NodeId::new("n4").unwrap(),
        );
        let sync = Request::Replica(ReplicaRequest::Sync {
            key: key.clone().into_bytes(),
            clock,
        });
        assert!(matches!(
            c4.call(&sync).await.unwrap(),
            Response::Clock(None)
        ));
    }
    for node in &nodes[..3] {
        let c = client(node).await;
        assert!(
            !held_locally(&c, "solo0").await,
            "only n4 holds the solo keys"
        );
        c.close().await;
    }

    let reply = match c4.call(&Request::Leave).await.unwrap() {
        Response::Left(reply) => reply,
        other => panic!("{other:?}"),
    };
    assert!(reply.keys >= solo.len() as u64, "{reply:?}");
    assert!(reply.late_failures.is_empty(), "{reply:?}");
    let members: Vec<&str> = reply.record.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(members, ["n1", "n2", "n3"]);

    // Three members and N=3: each now stores every key, n4's solo ones too.
    for node in &nodes[..3] {
        let c = client(node).await;
        for key in solo
            .iter()
            .cloned()
            .chain((0..100).map(|i| format!("shared{i}")))
        {
            assert!(held_locally(&c, &key).await, "{} lacks {key}", node.id());
        }
        c.close().await;
    }
    // n4 serves no more, but answers status; n1 knows it left.
    let put = PutRequest::new(
        "late",
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    match c4.call(&Request::Put(put)).await.unwrap() {
        Response::Error(e) => assert!(e.message.contains("removed"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c4.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    match c1.call(&Request::Status).await.unwrap() {
        Response::Status(s) => assert_eq!(s.nodes.len(), 3, "{s:?}"),
        other => panic!("{other:?}"),
    }
    c1.close().await;
    c4.close().await;
    // Started again, it refuses.
    nodes.pop().unwrap().shutdown().await;
    let e = Node::start(config("n4", dirs[3].path()))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, NodeError::Removed { .. }), "{e:?}");
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn leaving_is_refused_below_n_and_stops_at_a_replica_that_is_down() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = start(3, &dirs).await;
    let c3 = client(&nodes[2]).await;
    match c3.call(&Request::Leave).await.unwrap() {
        Response::Error(e) => assert!(e.message.contains("fewer than N=3"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    c3.close().await;

    let mut c = config("n4", dirs[3].path());
    c.seeds = vec![nodes[0].addr()];
    nodes.push(Node::start(c).await.unwrap());
    let c1 = client(&nodes[0]).await;
    put_all(&c1, (0..20).map(|i| format!("k{i}"))).await;
    c1.close().await;
    // With n2 down, the keys n4 must hand to n2 have nowhere to go: the
    // leave stops, and n4 stays a member.
    nodes.remove(1).shutdown().await;
    let c4 = client(&nodes[2]).await;
    match c4.call(&Request::Leave).await.unwrap() {
        Response::Error(e) => {
            assert!(e.message.contains("could not hand keys to n2"), "{e:?}");
            assert!(e.message.contains("nothing was removed"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    let put = PutRequest::new(
        "after",
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    assert!(matches!(
        c4.call(&Request::Put(put)).await.unwrap(),
        Response::Put(_)
    ));
    match c4.call(&Request::Status).await.unwrap() {
        Response::Status(s) => assert_eq!(s.nodes.len(), 4, "{s:?}"),
        other => panic!("{other:?}"),
    }
    c4.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}
