//! A node removed while it was down learns of it from the first member it
//! announces itself to, and refuses to start.

use std::time::Duration;

use ringkv_core::wire::{Request, Response};
use ringkv_core::NodeId;
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
    let remove = Request::Remove {
        node: NodeId::new("n3").unwrap(),
        tell_others: true,
    };
    let answer = client.call(&remove).await.unwrap();
    let Response::Joined(reply) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(reply.members.len(), 2);

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
