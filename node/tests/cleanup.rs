//! `ringkv cleanup`: after a node joins, the members whose ranges it took
//! drop their stray copies of those keys once a current replica holds
//! them, keep the ones no replica holds, never touch keys they still
//! replicate, refuse while a member cannot be asked whether it is leaving,
//! and take the key's actor with the copy so later writes are not lost.

use std::time::{Duration, Instant};

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{CleanupReport, GetRequest, PutRequest, Request, Response};
use ringkv_core::Consistency;
use ringkv_node::{Client, Node, NodeHandle};

mod support;
use support::*;

async fn cleanup(client: &Client) -> CleanupReport {
    match client.call(&Request::Cleanup).await.unwrap() {
        Response::Cleaned(report) => report,
        other => panic!("{other:?}"),
    }
}

/// Waits until every node in `nodes` lists `members` members.
async fn wait_for_members(nodes: &[NodeHandle], members: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in nodes {
        let c = client(node).await;
        loop {
            if let Ok(Response::Status(s)) = c.call(&Request::Status).await {
                if s.nodes.len() == members {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} never saw {members} members",
                node.id()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.close().await;
    }
}

/// Starts n1..n3 with N=2, writes `keys` through n1 at W=all (n1 mints the
/// dots of those it replicates), then starts n4 and waits until every node
/// knows it. Returns the nodes, a client of n1, and the rings before and
/// after n4.
async fn three_then_n4(
    dirs: &[tempfile::TempDir],
    keys: &[String],
) -> (
    Vec<NodeHandle>,
    Client,
    ringkv_ring::Ring,
    ringkv_ring::Ring,
) {
    let mut nodes = start(&dirs[..3], 2).await;
    let c1 = client(&nodes[0]).await;
    put_all(&c1, keys).await;
    let mut c4 = config("n4", dirs[3].path(), 2);
    c4.seeds = vec![nodes[0].addr()];
    nodes.push(Node::start(c4).await.unwrap());
    wait_for_members(&nodes, 4).await;
    (
        nodes,
        c1,
        ring(&["n1", "n2", "n3"], 2),
        ring(&["n1", "n2", "n3", "n4"], 2),
    )
}

/// Three nodes with N=2, then n4 joins: each key whose preference list
/// gained n4 lost one of its old replicas, which keeps a stray copy.
#[tokio::test]
async fn a_member_drops_the_stray_copies_a_replica_holds_and_keeps_the_rest() {
    let dirs = data_dirs(4);
    let keys: Vec<String> = (0..120).map(|i| format!("k{i}")).collect();
    let (mut nodes, c1, before, after) = three_then_n4(&dirs, &keys).await;
    let on = |r: &ringkv_ring::Ring, key: &str, node: &str| {
        r.preference_list(key.as_bytes()).contains(&id(node))
    };
    let strays_of = |node: &str| -> Vec<&String> {
        keys.iter()
            .filter(|k| on(&before, k, node) && !on(&after, k, node))
            .collect()
    };
    let n1_strays = strays_of("n1");
    assert!(!n1_strays.is_empty(), "n4 took none of n1's keys");
    // A copy on n1 of a key it does not replicate that no replica holds (a
    // write only it received, or a value deleted since): it must stay. Not
    // n1's under the ring before n4 either, or n1 would hand it to n4 with
    // the range n4 took.
    let orphan = (0..)
        .map(|i| format!("orphan{i}"))
        .find(|k| !on(&before, k, "n1") && !on(&after, k, "n1"))
        .unwrap();
    store_only_here(&c1, &orphan).await;

    let held = keys.iter().filter(|k| on(&before, k, "n1")).count() as u64 + 1;
    let report = cleanup(&c1).await;
    assert_eq!(report.keys_scanned, held, "{report:?}");
    assert_eq!(report.stray_keys, n1_strays.len() as u64 + 1, "{report:?}");
    assert_eq!(report.removed, n1_strays.len() as u64, "{report:?}");
    assert_eq!(report.kept, 1, "{report:?}");
    assert!(report.failures.is_empty(), "{report:?}");
    for key in &keys {
        let expected = on(&after, key, "n1");
        assert_eq!(held_locally(&c1, key).await, expected, "{key} on n1");
    }
    // Each removed copy is still on its old replica that stays one.
    let old_clients = [c1, client(&nodes[1]).await, client(&nodes[2]).await];
    for key in &n1_strays {
        let stays = after.preference_list(key.as_bytes()).replicas;
        let stays = stays.iter().find(|r| r.as_str() != "n4").unwrap();
        let i = stays.as_str()[1..].parse::<usize>().unwrap() - 1;
        assert!(held_locally(&old_clients[i], key).await, "{key} lost");
    }
    let [c1, c2, c3] = old_clients;
    c3.close().await;
    assert!(
        held_locally(&c1, &orphan).await,
        "the orphan copy was dropped"
    );
    // Its progress counter (for the CLI's spinner).
    match c1.call(&Request::Stats).await.unwrap() {
        Response::Stats(s) => assert_eq!(s.cleanup_keys_scanned, held),
        other => panic!("{other:?}"),
    }
    // Run again, it finds only the orphan.
    let again = cleanup(&c1).await;
    assert_eq!(
        (again.stray_keys, again.removed, again.kept),
        (1, 0, 1),
        "{again:?}"
    );

    // With n3 down, n2 cannot tell whether n3 is leaving (the ring could
    // change under it): it refuses before removing anything.
    let n2_strays = strays_of("n2");
    assert!(!n2_strays.is_empty(), "n4 took none of n2's keys");
    nodes.remove(2).shutdown().await;
    match c2.call(&Request::Cleanup).await.unwrap() {
        Response::Error(e) => {
            assert!(
                e.message
                    .contains("could not check that no member is leaving (n3:"),
                "{e:?}"
            );
            assert!(e.message.contains("nothing was removed"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    for key in &n2_strays {
        assert!(held_locally(&c2, key).await, "{key} removed from n2");
    }
    match c2.call(&Request::Stats).await.unwrap() {
        Response::Stats(s) => assert!(!s.cleaning, "the refused cleanup left its mark"),
        other => panic!("{other:?}"),
    }
    for c in [c1, c2] {
        c.close().await;
    }
    for node in nodes {
        node.shutdown().await;
    }
}

/// A member that dropped its copies may replicate those keys again (the
/// node that took them is removed) and coordinate a write to one before
/// anti-entropy refills it. Its dots for the key are gone from its store,
/// so under the key's old actor it would mint one of them again, and the
/// other replica, which knows that dot, would drop a value. The removed
/// copy took its recorded actor with it, so the write goes under a new one
/// (fails if the removal keeps the record, checked).
#[tokio::test]
async fn writes_after_a_cleanup_and_a_ring_change_back_are_not_lost() {
    let dirs = data_dirs(4);
    let keys: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
    let (mut nodes, c1, before, after) = three_then_n4(&dirs, &keys).await;
    let key = keys
        .iter()
        .find(|k| {
            let (was, is) = (
                before.preference_list(k.as_bytes()),
                after.preference_list(k.as_bytes()),
            );
            was.contains(&id("n1")) && !is.contains(&id("n1"))
        })
        .expect("n4 took one of n1's keys");
    let report = cleanup(&c1).await;
    assert!(report.removed > 0, "{report:?}");
    assert!(!held_locally(&c1, key).await);

    // n4 goes; n1 replicates the key again, holding nothing of it.
    nodes.pop().unwrap().shutdown().await;
    let remove = Request::Remove {
        node: id("n4"),
        tell_others: true,
    };
    assert!(matches!(
        c1.call(&remove).await.unwrap(),
        Response::Removed(_)
    ));
    wait_for_members(&nodes, 3).await;
    let put = PutRequest::new(
        key.clone(),
        Payload::Value(b"again".to_vec()),
        Consistency::All,
        None,
    );
    assert!(matches!(
        c1.call(&Request::Put(put)).await.unwrap(),
        Response::Put(_)
    ));
    let get = Request::Get(GetRequest::new(key.as_str(), Consistency::All));
    match c1.call(&get).await.unwrap() {
        Response::Get(g) => {
            // A blind write beside the value the other replica kept.
            assert!(
                g.values.contains(&b"again".to_vec()),
                "the write was lost: {g:?}"
            );
            assert!(g.values.contains(&key.clone().into_bytes()), "{g:?}");
        }
        other => panic!("{other:?}"),
    }
    c1.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}
