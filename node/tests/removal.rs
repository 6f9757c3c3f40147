//! A node removed while it was down: the hints held for it go to the
//! replicas that take over its keys, and it learns of its removal from the
//! first member it announces itself to, and refuses to start.

use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{GetRequest, PutRequest, RemoveReply, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeError, NodeHandle};

mod support;

fn config(id: &str, dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into());
    c.replicas = Some(2);
    // Nothing in the background that could copy a key but the handoff.
    c.anti_entropy_interval = None;
    c.read_repair_chance = 0.0;
    c
}

/// Whether the node `client` is connected to stores `key` (value: the key) itself.
async fn held_locally(client: &Client, key: &str) -> bool {
    let get = Request::Get(GetRequest {
        local: true,
        ..GetRequest::new(key, Consistency::One)
    });
    matches!(client.call(&get).await, Ok(Response::Get(g)) if g.values == [key.as_bytes().to_vec()])
}

fn data_dirs() -> Vec<tempfile::TempDir> {
    (0..3).map(|_| tempfile::tempdir().unwrap()).collect()
}

/// n1, n2 and n3 in `dirs`, replicating each key `replicas` times.
async fn start_three(dirs: &[tempfile::TempDir], replicas: usize) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut c = config(&format!("n{}", i + 1), dir.path());
        c.replicas = Some(replicas);
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.addr()];
        }
        nodes.push(Node::start(c).await.unwrap());
    }
    nodes
}

/// Asks `node` to remove n3, as `ringkv remove` does; the members it could
/// not tell.
async fn remove_n3_through(node: &NodeHandle) -> Vec<String> {
    let client = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let reply = remove_n3(&client).await;
    client.close().await;
    reply
        .not_told
        .into_iter()
        .map(|f| f.peer.to_string())
        .collect()
}

/// Asks the node `client` is connected to to remove n3, as `ringkv remove` does.
async fn remove_n3(client: &Client) -> RemoveReply {
    let remove = Request::Remove {
        node: NodeId::new("n3").unwrap(),
        tell_others: true,
    };
    match client.call(&remove).await.unwrap() {
        Response::Removed(reply) => reply,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_node_removed_while_down_refuses_to_start() {
    let dirs = data_dirs();
    let mut nodes = start_three(&dirs, 2).await;
    let n3 = nodes.pop().unwrap();
    n3.shutdown().await;

    let client = Client::connect(nodes[0].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    // With n3 down, writes to its keys leave hints for it on n1 or n2: the
    // sloppy quorum counts a hint towards W=all.
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    for key in &keys {
        let put = PutRequest::new(
            key.clone().into_bytes(),
            Payload::Value(key.clone().into_bytes()),
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
            match c.call(&Request::Stats).await.unwrap() {
                Response::Stats(s) => held += s.hints_pending,
                other => panic!("no stats from {addr}: {other:?}"),
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

    let reply = remove_n3(&client).await;
    assert_eq!(reply.record.members.len(), 2);
    // n2 is told at once (or, should that take over a second on a busy
    // machine, learns at the next membership exchange).
    let to_n2 = Client::connect(nodes[1].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match to_n2.call(&Request::Status).await.unwrap() {
            Response::Status(s) if s.nodes.len() == 2 => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "n2 never learned of the removal: {other:?} (not told: {:?})",
                reply.not_told
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both members hand on the hints they held for n3 (n2 was told by n1)
    // to the keys' replicas under the ring without n3: with N=2, both of
    // them. So every write is on the two copies W=all promised, although
    // one of those was a hint for a node that will never come back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hints_held(addrs.clone()).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "hints for n3 kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for key in &keys {
        assert!(held_locally(&client, key).await, "{key} on n1");
        assert!(held_locally(&to_n2, key).await, "{key} on n2");
    }
    to_n2.close().await;

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
    let dirs = data_dirs();
    let nodes = start_three(&dirs, 2).await;
    let client = Client::connect(nodes[0].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    remove_n3(&client).await;
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
        Response::Error(e) => {
            assert!(
                e.message
                    .contains("n3 was removed from the cluster; ask another node"),
                "{e:?}"
            );
            assert_eq!(e.kind, ringkv_core::wire::ErrorKind::NotServing);
        }
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
    let dirs = data_dirs();
    let mut nodes = start_three(&dirs, 1).await;
    let n2 = nodes.remove(1);
    n2.shutdown().await;

    assert_eq!(remove_n3_through(&nodes[0]).await, ["n2"]);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A removal is passed on only to the members themselves: a node of
/// another cluster that now serves at a member's old address, with members
/// of the same names (two clusters set up alike), is not told, and its own
/// namesake of the removed node stays a member there.
#[tokio::test]
async fn a_removal_is_not_passed_to_another_cluster_at_a_members_old_address() {
    let dirs = data_dirs();
    let mut nodes = start_three(&dirs, 1).await;
    let n2 = nodes.remove(1);
    let old_addr = n2.addr();
    n2.shutdown().await;

    // Cluster B: its own n2 at cluster A's n2's old address, and an n3.
    let other_dirs = data_dirs();
    let mut c = config("n2", other_dirs[0].path());
    c.replicas = Some(1);
    c.listen = old_addr;
    let other_n2 = support::start_again(c).await;
    let mut c = config("n3", other_dirs[1].path());
    c.replicas = Some(1);
    c.seeds = vec![other_n2.addr()];
    let other_n3 = Node::start(c).await.unwrap();

    assert_eq!(remove_n3_through(&nodes[0]).await, ["n2"]);

    let other = Client::connect(other_n2.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let Ok(Response::Status(status)) = other.call(&Request::Status).await else {
        panic!("no status from the other cluster");
    };
    let members: Vec<&str> = status.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(members, ["n2", "n3"], "the other cluster's n3 stays");
    other.close().await;
    for node in nodes.into_iter().chain([other_n2, other_n3]) {
        node.shutdown().await;
    }
}

/// A member that is running and holds hints is not removed: removed, it
/// would stop delivering them, and they may be the only copies of writes
/// that counted toward W. (Removal is for members that are down.)
#[tokio::test]
async fn a_running_member_that_holds_hints_is_not_removed() {
    let dirs = data_dirs();
    let mut nodes = start_three(&dirs, 2).await;
    nodes.remove(1).shutdown().await;
    // With n2 down, W=all writes of its keys leave hints for it on n1 or n3.
    let client = Client::connect(nodes[1].addr(), Duration::from_secs(5))
        .await
        .unwrap();
    for i in 0..20 {
        let key = format!("k{i}").into_bytes();
        let put = PutRequest::new(key.clone(), Payload::Value(key), Consistency::All, None);
        let answer = client.call(&Request::Put(put)).await.unwrap();
        assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    }
    client.close().await;
    let mut holder = None;
    for (i, node) in nodes.iter().enumerate() {
        let c = Client::connect(node.addr(), Duration::from_secs(5))
            .await
            .unwrap();
        match c.call(&Request::Stats).await.unwrap() {
            Response::Stats(s) if s.hints_pending > 0 => holder = Some(i),
            Response::Stats(_) => {}
            other => panic!("{other:?}"),
        }
        c.close().await;
    }
    let holder = holder.expect("a node holds hints for n2");
    let (held_by, asked) = (nodes[holder].id().clone(), &nodes[1 - holder]);
    let client = Client::connect(asked.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let remove = Request::Remove {
        node: held_by.clone(),
        tell_others: true,
    };
    match client.call(&remove).await.unwrap() {
        Response::Error(e) => {
            assert_eq!(e.kind, ringkv_core::wire::ErrorKind::Refused);
            assert!(
                e.message
                    .contains(&format!("{held_by} is running and holds")),
                "{e:?}"
            );
        }
        other => panic!("removed a member holding hints: {other:?}"),
    }
    client.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}
