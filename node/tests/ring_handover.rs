//! A ring change hands over the ranges it took: three members with N=3,
//! then three nodes join one after another, before anti-entropy could fill
//! them (it is off here, as is read repair). Some keys then have only new
//! nodes as replicas; without the hand-over no replica would hold them and
//! a read would find nothing. The hand-over also survives restarts: of a
//! node down while the ring changed, and of one in the middle of a pass.

use std::time::{Duration, Instant};

use ringkv_core::wire::{GetRequest, Request, Response};
use ringkv_core::Consistency;
use ringkv_node::{Client, Node, NodeHandle};
use ringkv_ring::Ring;

mod support;
use support::*;

#[tokio::test]
async fn keys_whose_every_slot_went_to_new_nodes_are_handed_over() {
    let dirs = data_dirs(6);
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let mut nodes = start(&dirs[..3], 3).await;
    let c1 = client(&nodes[0]).await;
    put_all(&c1, &keys).await;
    for (i, dir) in dirs.iter().enumerate().skip(3) {
        let mut c = config(&format!("n{}", i + 1), dir.path(), 3);
        c.seeds = vec![nodes[0].addr()];
        nodes.push(Node::start(c).await.unwrap());
    }
    let after = ring(&["n1", "n2", "n3", "n4", "n5", "n6"], 3);
    let is_new = |n: &ringkv_core::NodeId| ["n4", "n5", "n6"].contains(&n.as_str());
    let all_new: Vec<&String> = keys
        .iter()
        .filter(|k| after.replicas_of(k.as_bytes()).iter().all(is_new))
        .collect();
    assert!(!all_new.is_empty(), "no key went wholly to the new nodes");

    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(client(node).await);
    }
    // Every replica under the new ring comes to hold every key it replicates.
    let copies: Vec<(String, usize)> = keys
        .iter()
        .flat_map(|k| {
            after
                .replicas_of(k.as_bytes())
                .into_iter()
                .map(|r| (k.clone(), index_of(&r)))
                .collect::<Vec<_>>()
        })
        .collect();
    copies_arrive(&clients, &copies).await;
    // And a read through a new node finds a key only new nodes replicate.
    let get = Request::Get(GetRequest::new(all_new[0].clone(), Consistency::All));
    match clients[3].call(&get).await.unwrap() {
        Response::Get(g) => assert_eq!(g.values, [all_new[0].as_bytes().to_vec()]),
        other => panic!("{other:?}"),
    }
    for c in clients {
        c.close().await;
    }
    c1.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// The copies a hand-over from `giver` alone sends: for each key of
/// `keys` that `giver` replicated under `before` and does not under
/// `after`, its replicas under `after` that were not under `before` (as
/// indexes: node `n{i+1}`).
fn given_up_copies(
    keys: &[String],
    (before, after): (&Ring, &Ring),
    giver: &str,
) -> Vec<(String, usize)> {
    let giver = id(giver);
    keys.iter()
        .filter(|k| {
            before.is_replica(k.as_bytes(), &giver) && !after.is_replica(k.as_bytes(), &giver)
        })
        .flat_map(|k| {
            after
                .replicas_of(k.as_bytes())
                .into_iter()
                .filter(|r| !before.is_replica(k.as_bytes(), r))
                .map(|r| (k.clone(), index_of(&r)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The index of node `n{i+1}`: `i`.
fn index_of(node: &ringkv_core::NodeId) -> usize {
    node.as_str()[1..].parse::<usize>().unwrap() - 1
}

/// Those of `copies` not yet held where they go; `clients[i]` is connected
/// to node `n{i+1}`.
async fn missing(clients: &[Client], copies: &[(String, usize)]) -> Vec<(String, String)> {
    let mut missing = Vec::new();
    for (key, i) in copies {
        if !held_locally(&clients[*i], key).await {
            missing.push((format!("n{}", i + 1), key.clone()));
        }
    }
    missing
}

/// Polls, for up to 60 s, until every one of `copies` has arrived.
async fn copies_arrive(clients: &[Client], copies: &[(String, usize)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = missing(clients, copies).await;
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} copies never arrived, e.g. {:?}",
            missing.len(),
            copies.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rings before and after [`join_three`].
fn three_then_six() -> (Ring, Ring) {
    (
        ring(&["n1", "n2", "n3"], 3),
        ring(&["n1", "n2", "n3", "n4", "n5", "n6"], 3),
    )
}

/// Starts `n4`..`n6` one after another, through `seed`.
async fn join_three(dirs: &[tempfile::TempDir], seed: &NodeHandle) -> Vec<NodeHandle> {
    let mut joined = Vec::new();
    for (i, dir) in dirs.iter().enumerate().skip(3) {
        let mut c = config(&format!("n{}", i + 1), dir.path(), 3);
        c.seeds = vec![seed.addr()];
        joined.push(Node::start(c).await.unwrap());
    }
    joined
}

async fn clients_of(nodes: &[NodeHandle]) -> Vec<Client> {
    let mut clients = Vec::new();
    for node in nodes {
        clients.push(client(node).await);
    }
    clients
}

/// n1 alone holds some keys (W=1 writes, say) and is down while three
/// nodes join. Back, it learns the new ring from the others, and hands
/// over what the joins took from it: it kept the ring it last replicated
/// under.
#[tokio::test]
async fn a_node_down_while_the_ring_changed_hands_over_once_back() {
    let dirs = data_dirs(6);
    let keys: Vec<String> = (0..200).map(|i| format!("only-n1-{i}")).collect();
    let mut nodes = start(&dirs[..3], 3).await;
    let c1 = client(&nodes[0]).await;
    for key in &keys {
        store_only_here(&c1, key).await;
    }
    c1.close().await;
    let n1 = nodes.remove(0);
    let mut again = config("n1", dirs[0].path(), 3);
    again.listen = n1.addr();
    n1.shutdown().await;
    let joined = join_three(&dirs, &nodes[0]).await;
    let n1 = start_again(again).await;
    let mut all = vec![n1];
    all.extend(nodes);
    all.extend(joined);
    let clients = clients_of(&all).await;
    let (before, after) = three_then_six();
    let copies = given_up_copies(&keys, (&before, &after), "n1");
    assert!(!copies.is_empty(), "the joins took nothing from n1");
    copies_arrive(&clients, &copies).await;
    for c in clients {
        c.close().await;
    }
    for node in all {
        node.shutdown().await;
    }
}

/// n1 hands over at one key a second, so its pass is still going (its
/// first page sent, the next waiting on the pace) when it is restarted.
/// Restarted at full pace, it resumes the pass it owed. While the pass is
/// owed, n1 may not leave: a leave hands over only the keys it replicates
/// now, and would leave the pass's keys behind. Once it is done, it may.
#[tokio::test]
async fn a_pass_cut_short_by_a_restart_is_resumed() {
    let dirs = data_dirs(6);
    // Several pages (256 keys each) in n1's store: the pace holds the
    // given-up keys of the later pages back.
    let keys: Vec<String> = (0..900).map(|i| format!("only-n1-{i}")).collect();
    let mut slow = config("n1", dirs[0].path(), 3);
    slow.repair_keys_per_s = 1;
    let n1 = Node::start(slow.clone()).await.unwrap();
    let mut nodes = vec![n1];
    for (i, dir) in dirs.iter().enumerate().take(3).skip(1) {
        let mut c = config(&format!("n{}", i + 1), dir.path(), 3);
        c.seeds = vec![nodes[0].addr()];
        nodes.push(Node::start(c).await.unwrap());
    }
    let c1 = client(&nodes[0]).await;
    for key in &keys {
        store_only_here(&c1, key).await;
    }
    c1.close().await;
    let joined = join_three(&dirs, &nodes[1]).await;
    nodes.extend(joined);
    // The pass has begun once a new node holds a key n1 alone stored.
    let clients = clients_of(&nodes).await;
    let (before, after) = three_then_six();
    let copies = given_up_copies(&keys, (&before, &after), "n1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while missing(&clients, &copies).await.len() == copies.len() {
        assert!(Instant::now() < deadline, "n1's pass never began");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match clients[0].call(&Request::Leave).await.unwrap() {
        Response::Error(e) => assert!(e.message.contains("still handing over"), "{e:?}"),
        other => panic!("a leave during the pass: {other:?}"),
    }
    let n1 = nodes.remove(0);
    let mut again = slow;
    again.listen = n1.addr();
    again.repair_keys_per_s = ringkv_repair::anti_entropy::DEFAULT_REPAIR_KEYS_PER_S;
    n1.shutdown().await;
    assert!(
        !missing(&clients, &copies).await.is_empty(),
        "the pace let the whole pass through before the restart"
    );
    for c in clients {
        c.close().await;
    }
    nodes.insert(0, start_again(again).await);
    let clients = clients_of(&nodes).await;
    copies_arrive(&clients, &copies).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match clients[0].call(&Request::Leave).await.unwrap() {
            Response::Left(_) => break,
            Response::Error(e)
                if e.message.contains("still handing over") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("a leave once the pass is done: {other:?}"),
        }
    }
    for c in clients {
        c.close().await;
    }
    for node in nodes {
        node.shutdown().await;
    }
}
