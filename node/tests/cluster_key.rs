//! A cluster with a key admits only the processes that hold it: nodes with
//! the key form a cluster and replicate; a client or a node without it, or
//! with another key, is refused at the handshake with an error that says so.

use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{GetRequest, PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, ClusterKey, Node, NodeConfig, NodeError, NodeHandle};

const KEY: &str = "5ad1c0ffee5ad1c0ffee5ad1c0ffee5ad1c0ffee5ad1c0ffee5ad1c0ffee1234";
const OTHER_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const TIMEOUT: Duration = Duration::from_secs(5);

fn key(hex: &str) -> ClusterKey {
    ClusterKey::parse(hex).unwrap()
}

fn config(id: &str, dir: &std::path::Path, cluster_key: Option<ClusterKey>) -> NodeConfig {
    let mut c = NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into());
    c.replicas = Some(2);
    c.anti_entropy_interval = None;
    c.join_timeout = Duration::from_secs(3);
    c.cluster_key = cluster_key;
    c
}

/// Two nodes holding `KEY`.
async fn start_two(dirs: &[tempfile::TempDir]) -> Vec<NodeHandle> {
    let n1 = Node::start(config("n1", dirs[0].path(), Some(key(KEY))))
        .await
        .unwrap();
    let mut c = config("n2", dirs[1].path(), Some(key(KEY)));
    c.seeds = vec![n1.addr()];
    let n2 = Node::start(c).await.unwrap();
    vec![n1, n2]
}

fn put(k: &str, v: &str) -> Request {
    Request::Put(PutRequest::new(
        k.as_bytes().to_vec(),
        Payload::Value(v.as_bytes().to_vec()),
        Consistency::All,
        None,
    ))
}

/// The first call on a connection the node refused fails, as refused:
/// with TLS 1.3 the client may finish its half of the handshake before the
/// node checks its certificate, so the refusal can arrive with the first
/// request, before or after it is on its stream.
async fn refused(addr: std::net::SocketAddr, cluster_key: Option<&ClusterKey>) -> String {
    let e = match Client::connect_with_key(addr, TIMEOUT, cluster_key).await {
        Err(e) => e,
        Ok(client) => match client.call(&Request::Ping).await {
            Err(e) => e,
            Ok(answer) => panic!("the node answered {answer:?}"),
        },
    };
    assert!(matches!(e, ringkv_node::CallError::Refused(_)), "{e:?}");
    let e = e.to_string();
    eprintln!("refused: {e}");
    e
}

#[tokio::test]
async fn nodes_with_one_key_form_a_cluster_and_admit_clients_with_it() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = start_two(&dirs).await;
    let client = Client::connect_with_key(nodes[0].addr(), TIMEOUT, Some(&key(KEY)))
        .await
        .unwrap();
    // W=all: n2 must have taken the write over the authenticated peer link.
    let answer = client.call(&put("k", "v")).await.unwrap();
    assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    client.close().await;
    let other = Client::connect_with_key(nodes[1].addr(), TIMEOUT, Some(&key(KEY)))
        .await
        .unwrap();
    let get = GetRequest::new(b"k".to_vec(), Consistency::One);
    match other.call(&Request::Get(get)).await.unwrap() {
        Response::Get(reply) => assert_eq!(reply.values, vec![b"v".to_vec()]),
        answer => panic!("{answer:?}"),
    }
    other.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn clients_without_the_key_or_with_another_are_refused() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = start_two(&dirs).await;
    let addr = nodes[0].addr();

    let e = refused(addr, None).await;
    assert!(e.contains("--cluster-key-file"), "{e}");
    let e = refused(addr, Some(&key(OTHER_KEY))).await;
    assert!(e.contains("cluster key"), "{e}");
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_with_a_key_refuses_a_node_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let open = Node::start(config("n1", dir.path(), None)).await.unwrap();
    let e = refused(open.addr(), Some(&key(KEY))).await;
    assert!(e.contains("not signed by this cluster key"), "{e}");
    open.shutdown().await;
}

#[tokio::test]
async fn a_node_with_another_key_cannot_join() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = start_two(&dirs).await;
    let mut c = config("n3", dirs[2].path(), Some(key(OTHER_KEY)));
    c.seeds = vec![nodes[0].addr()];
    c.join_timeout = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let e = Node::start(c).await.err().expect("the join must fail");
    eprintln!("join: {e}");
    assert!(matches!(e, NodeError::Join { .. }), "{e:?}");
    assert!(e.to_string().contains("cluster key"), "{e}");
    // A refused handshake is not retried until the join timeout: waiting
    // does not change a key.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the join gave up only after {:?}",
        started.elapsed()
    );
    // Nor did it get into the members' list.
    let client = Client::connect_with_key(nodes[0].addr(), TIMEOUT, Some(&key(KEY)))
        .await
        .unwrap();
    match client.call(&Request::Status).await.unwrap() {
        Response::Status(s) => assert_eq!(s.nodes.len(), 2, "{s:?}"),
        answer => panic!("{answer:?}"),
    }
    client.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// A member restarted with another key, or none, would serve cut off from
/// every peer; its start fails instead, and says why.
#[tokio::test]
async fn a_member_restarted_without_its_clusters_key_refuses_to_start() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = start_two(&dirs).await;
    let n2 = nodes.pop().unwrap();
    n2.shutdown().await;
    for wrong in [Some(key(OTHER_KEY)), None] {
        let e = Node::start(config("n2", dirs[1].path(), wrong.clone()))
            .await
            .err()
            .expect("the restart must fail");
        assert!(matches!(e, NodeError::ClusterKeyChanged { .. }), "{e:?}");
        assert!(e.to_string().contains("cluster key"), "{e}");
    }
    // With its key it comes back.
    let n2 = Node::start(config("n2", dirs[1].path(), Some(key(KEY))))
        .await
        .unwrap();
    n2.shutdown().await;
    nodes.pop().unwrap().shutdown().await;
}

/// A node with no peers to refuse it (a cluster of one) remembers its keys
/// in its data dir: restarted without one of them it refuses to start, and
/// a key change by the README's steps goes through. A data dir that had no
/// key may be given one.
#[tokio::test]
async fn a_cluster_of_one_remembers_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let solo = |keys: &[&str]| {
        let mut c = config("solo", dir.path(), None);
        c.replicas = Some(1);
        c.cluster_key = keys
            .iter()
            .map(|k| key(k))
            .reduce(|presented, accepted| presented.also_accepting(&accepted));
        c
    };
    Node::start(solo(&[])).await.unwrap().shutdown().await;
    Node::start(solo(&[KEY])).await.unwrap().shutdown().await;
    for wrong in [&[][..], &[OTHER_KEY]] {
        let e = Node::start(solo(wrong)).await.err().expect("refused");
        assert!(matches!(e, NodeError::ClusterKeyChanged { .. }), "{e:?}");
    }
    // The change: both keys (either order), then the new one alone.
    Node::start(solo(&[KEY, OTHER_KEY]))
        .await
        .unwrap()
        .shutdown()
        .await;
    Node::start(solo(&[OTHER_KEY, KEY]))
        .await
        .unwrap()
        .shutdown()
        .await;
    Node::start(solo(&[OTHER_KEY]))
        .await
        .unwrap()
        .shutdown()
        .await;
    let e = Node::start(solo(&[KEY]))
        .await
        .err()
        .expect("the old key is gone");
    assert!(matches!(e, NodeError::ClusterKeyChanged { .. }), "{e:?}");
    // The key was lost: replaced on purpose, and remembered from then on.
    let mut replaced = solo(&[KEY]);
    replaced.cluster_key_replaced = true;
    Node::start(replaced).await.unwrap().shutdown().await;
    Node::start(solo(&[KEY])).await.unwrap().shutdown().await;
    let e = Node::start(solo(&[OTHER_KEY]))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, NodeError::ClusterKeyChanged { .. }), "{e:?}");
}

/// The key changes without stopping the cluster: every process is restarted
/// accepting the new key after the old, then presenting the new before the
/// old, then holding the new alone. At every restart the restarted node
/// must be accepted by its peer (a restart that every member refuses fails)
/// and a W=all write through it must reach both nodes.
#[tokio::test]
async fn the_key_changes_without_stopping_the_cluster() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = start_two(&dirs).await;
    let (old, new) = (key(KEY), key(OTHER_KEY));
    let steps = [
        old.also_accepting(&new),
        new.also_accepting(&old),
        new.clone(),
    ];
    for (step, held) in steps.iter().enumerate() {
        for i in [1, 0] {
            nodes.remove(i).shutdown().await;
            let c = config(&format!("n{}", i + 1), dirs[i].path(), Some(held.clone()));
            let node = Node::start(c)
                .await
                .unwrap_or_else(|e| panic!("step {step}, n{}: {e}", i + 1));
            nodes.insert(i, node);
            let client = Client::connect_with_key(nodes[i].addr(), TIMEOUT, Some(held))
                .await
                .unwrap();
            let answer = client
                .call(&put(&format!("k{step}{i}"), "v"))
                .await
                .unwrap();
            assert!(
                matches!(answer, Response::Put(_)),
                "step {step}: {answer:?}"
            );
            client.close().await;
        }
    }
    // The old key is no longer accepted.
    let e = refused(nodes[0].addr(), Some(&old)).await;
    assert!(e.contains("cluster key"), "{e}");
    for node in nodes {
        node.shutdown().await;
    }
}
