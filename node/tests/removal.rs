//! A node removed while it was down: the hints held for it are dropped, and
//! it learns of its removal from the first member it announces itself to,
//! and refuses to start.

use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeError};

fn config(id: &str, dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into());
    c.replicas = Some(2);
    c.anti_entropy_interval = None;
    c
}

#[tokio::test]
async fn a_node_removed_while_down_refuses_to_start() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let n1 = Node::start(config("n1", dirs[0].path())).await.unwrap();
    let mut nodes = vec![n1];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let mut c = config(&format!("n{}", i + 1), dir.path());
        c.seeds = vec![nodes[0].addr()];
        nodes.push(Node::start(c).await.unwrap());
    }
    let n3 = nodes.pop().unwrap();
    n3.shutdown().await;

    let client = Client::connect(nodes[0].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    // With n3 down, writes to its keys leave hints for it on n1 or n2.
    for i in 0..20 {
        let put = PutRequest::new(
            format!("k{i}").into_bytes(),
            Payload::Value(b"v".to_vec()),
            Consistency::All,
            None,
        );
        let answer = client.call(&Request::Put(put)).await.unwrap();
        assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    }
    let hints_held = |addrs: Vec<std::net::SocketAddr>| async move {
        let mut held = 0;
        for addr in addrs {
            let c = Client::connect(addr, Duration::from_secs(5)).await.unwrap();
            if let Response::Stats(s) = c.call(&Request::Stats).await.unwrap() {
                held += s.hints_pending;
            }
            c.close().await;
        }
        held
    };
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr()).collect();
    assert!(
        hints_held(addrs.clone()).await > 0,
        "the writes left hints for n3"
    );

    let remove = Request::Remove {
        node: NodeId::new("n3").unwrap(),
        tell_others: true,
    };
    let answer = client.call(&remove).await.unwrap();
    let Response::Removed(reply) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(reply.record.members.len(), 2);
    assert_eq!(reply.not_told, [], "n2 was told");
    // Both members drop the hints they held for n3 (n2 was told by n1).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hints_held(addrs.clone()).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "hints for n3 kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let err = Node::start(config("n3", dirs[2].path()))
        .await
        .err()
        .expect("a removed node does not start");
    assert!(matches!(err, NodeError::Removed { .. }), "{err}");
    // It kept the news: the next start refuses before asking anyone.
    for node in nodes {
        node.shutdown().await;
    }
    let err = Node::start(config("n3", dirs[2].path()))
        .await
        .err()
        .expect("still refused");
    assert!(matches!(err, NodeError::Removed { .. }), "{err}");
    client.close().await;
}

/// A node removed while running learns it at its next membership exchange:
/// it then answers status but refuses everything else, even on new
/// connections, with advice.
#[tokio::test]
async fn a_running_node_learns_of_its_removal_and_refuses_requests() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let n1 = Node::start(config("n1", dirs[0].path())).await.unwrap();
    let mut nodes = vec![n1];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let mut c = config(&format!("n{}", i + 1), dir.path());
        c.seeds = vec![nodes[0].addr()];
        nodes.push(Node::start(c).await.unwrap());
    }
    let client = Client::connect(nodes[0].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let remove = Request::Remove {
        node: NodeId::new("n3").unwrap(),
        tell_others: true,
    };
    assert!(matches!(
        client.call(&remove).await.unwrap(),
        Response::Removed(_)
    ));
    // The exchange runs every 5 s with a random member; both know.
    tokio::time::timeout(Duration::from_secs(30), nodes[2].removed())
        .await
        .expect("n3 learns of its removal");

    let to_n3 = Client::connect(nodes[2].addr(), Duration::from_secs(5))
        .await
        .expect("a removed node still accepts connections, to say so");
    assert!(matches!(
        to_n3.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    let put = PutRequest::new(
        b"k".to_vec(),
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    match to_n3.call(&Request::Put(put)).await.unwrap() {
        Response::Error(e) => assert!(
            e.message
                .contains("n3 was removed from the cluster; ask another node"),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    to_n3.close().await;
    client.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// A member that cannot be told of a removal is named in the answer.
#[tokio::test]
async fn the_answer_names_members_that_could_not_be_told() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let one_copy = |id: &str, dir: &std::path::Path| {
        let mut c = config(id, dir);
        c.replicas = Some(1);
        c
    };
    let n1 = Node::start(one_copy("n1", dirs[0].path())).await.unwrap();
    let mut nodes = vec![n1];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let mut c = one_copy(&format!("n{}", i + 1), dir.path());
        c.seeds = vec![nodes[0].addr()];
        nodes.push(Node::start(c).await.unwrap());
    }
    let n2 = nodes.remove(1);
    n2.shutdown().await;

    let client = Client::connect(nodes[0].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let remove = Request::Remove {
        node: NodeId::new("n3").unwrap(),
        tell_others: true,
    };
    let answer = client.call(&remove).await.unwrap();
    let Response::Removed(reply) = answer else {
        panic!("{answer:?}")
    };
    let not_told: Vec<&str> = reply.not_told.iter().map(|f| f.peer.as_str()).collect();
    assert_eq!(not_told, ["n2"], "{:?}", reply.not_told);
    client.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}
