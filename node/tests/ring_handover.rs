//! A ring change hands over the ranges it took: three members with N=3,
//! then three nodes join one after another, before anti-entropy could fill
//! them (it is off here, as is read repair). Some keys then have only new
//! nodes as replicas; without the hand-over no replica would hold them and
//! a read would find nothing.

use std::time::{Duration, Instant};

use ringkv_core::wire::{GetRequest, Request, Response};
use ringkv_core::Consistency;
use ringkv_node::Node;

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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<(String, String)> = Vec::new();
    loop {
        missing.clear();
        for key in &keys {
            for replica in after.replicas_of(key.as_bytes()) {
                let i = replica.as_str()[1..].parse::<usize>().unwrap() - 1;
                if !held_locally(&clients[i], key).await {
                    missing.push((replica.to_string(), key.clone()));
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} copies never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
