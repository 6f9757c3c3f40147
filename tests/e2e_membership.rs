//! Membership: a node that was unreachable while another joined still learns
//! of it, without a restart.

mod common;

use std::time::Duration;

use common::*;

/// Four nodes with N=3 and `extra` flags, and 200 keys `key(i)` written at
/// W=all through n1.
fn four_nodes_with_keys(
    test: &str,
    extra: &[&str],
    key: fn(usize) -> String,
) -> (Cluster, tokio::runtime::Runtime) {
    let c = Cluster::start(test, 4, 3, extra);
    let rt = runtime();
    rt.block_on(write_keys(
        c.nodes[0].addr,
        200,
        key,
        ringkv_core::Consistency::All,
        4,
    ));
    (c, rt)
}

fn members_seen_by(c: &Cluster, i: usize) -> usize {
    json(&c.cli(i, &["status", "--json"]))["nodes"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn a_member_frozen_during_a_join_learns_of_the_new_node() {
    let mut c = Cluster::start("a_member_frozen_during_a_join", 2, 2, &[]);
    c.signal(1, "STOP");
    let seed = c.addr(0);
    c.add_node(&[seed]);
    c.signal(1, "CONT");
    assert_eq!(members_seen_by(&c, 0), 3);
    assert_eq!(members_seen_by(&c, 2), 3);
    // The exchange runs every 5 s with one random member.
    c.eventually(Duration::from_secs(20), "n2 learns of n3", || {
        members_seen_by(&c, 1) == 3
    });
}

/// `ringkv remove` takes a node out for good. Every member drops it at once;
/// the node, still running, learns of it at its next membership exchange
/// and stops; a strict W=all write no longer needs it; a repair round
/// copies its keys to their new replicas; and it refuses to start again.
#[test]
fn a_removed_node_stops_is_replaced_on_the_ring_and_cannot_come_back() {
    // No periodic anti-entropy: only the repair below copies n4's keys.
    let key = |i: usize| format!("rm{i}");
    let (mut c, rt) = four_nodes_with_keys(
        "a_removed_node_stops",
        &["--anti-entropy-interval-s", "0"],
        key,
    );

    // Refused: an unknown id, and a node asked to remove itself.
    let unknown = c.cli(0, &["remove", "n9"]);
    assert_exit(&unknown, 2);
    assert!(
        stderr(&unknown).contains("n9 is not a member"),
        "{}",
        stderr(&unknown)
    );
    let itself = c.cli(3, &["remove", "n4"]);
    assert_exit(&itself, 2);
    assert!(
        stderr(&itself).contains("ask another member"),
        "{}",
        stderr(&itself)
    );

    let out = c.cli(0, &["remove", "n4", "--json"]);
    assert_exit(&out, 0);
    assert_eq!(json(&out)["members"], serde_json::json!(["n1", "n2", "n3"]));
    for i in 0..3 {
        c.eventually(Duration::from_secs(10), "every member was told", || {
            members_seen_by(&c, i) == 3
        });
    }
    // The exchange runs every 5 s with one random member; all know by now.
    let (status, err) = c.wait_exit(3, Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("n4 was removed from the cluster"), "{err}");

    // With n4 gone, every key's preference list is n1..n3.
    assert_exit(
        &c.cli(1, &["put", "after", "v", "-w", "all", "--strict"]),
        0,
    );
    // Each of n1..n3 holds every key once repair has copied n4's share.
    let missing = |c: &Cluster| -> usize {
        (0..3)
            .map(|i| {
                rt.block_on(missing_locally(c.nodes[i].addr, 0..200, key))
                    .len()
            })
            .sum()
    };
    let before = missing(&c);
    assert!(before > 0, "n4 held keys that one of n1..n3 lacked");
    c.eventually(Duration::from_secs(60), "repair copies n4's keys", || {
        for i in 0..3 {
            c.cli(i, &["repair"]);
        }
        missing(&c) == 0
    });

    let refused = c.launch(3, &[]).expect_err("a removed node does not start");
    assert!(refused.contains("was removed"), "{refused}");
    assert!(refused.contains("new --id"), "{refused}");
}

/// `ringkv leave` takes a live node out gracefully: it hands its keys to
/// their new replicas first, so each remaining member holds every key
/// without any repair round; the node then stops serving but keeps
/// running until it is stopped, and it refuses to start again.
#[test]
fn a_node_that_leaves_hands_over_its_keys_and_cannot_come_back() {
    // No periodic anti-entropy and no read repair: only the leave copies keys.
    let key = |i: usize| format!("lv{i}");
    let (mut c, rt) = four_nodes_with_keys(
        "a_node_that_leaves",
        &[
            "--anti-entropy-interval-s",
            "0",
            "--read-repair-chance",
            "0",
        ],
        key,
    );

    let out = c.cli(3, &["leave", "--json"]);
    assert_exit(&out, 0);
    let reply = json(&out);
    assert_eq!(reply["members"], serde_json::json!(["n1", "n2", "n3"]));
    assert!(reply["keys_handed_over"].as_u64().unwrap() > 0, "{reply}");
    assert_eq!(reply["late_failures"], serde_json::json!([]));
    // Three members and N=3: each holds every key, with no repair run.
    for i in 0..3 {
        let missing = rt.block_on(missing_locally(c.nodes[i].addr, 0..200, key));
        assert!(missing.is_empty(), "n{} lacks {missing:?}", i + 1);
    }
    // n4 refuses requests (exit 3: ask another node) but still answers status.
    let refused = c.cli(3, &["get", "lv1"]);
    assert_exit(&refused, 3);
    assert!(stderr(&refused).contains("removed"), "{}", stderr(&refused));
    let status = c.cli(3, &["status"]);
    assert_exit(&status, 0);
    assert!(
        stdout(&status).contains("n4 is no longer a member"),
        "{}",
        stdout(&status)
    );
    assert_eq!(json(&c.cli(3, &["status", "--json"]))["member"], false);
    assert_eq!(json(&c.cli(0, &["status", "--json"]))["member"], true);
    // Listed first with a member after it, n4 is passed over: it ran nothing.
    let both = format!("{},{}", c.addr(3), c.addr(0));
    let got = run(ringkv().args(["get", "lv1", "--json", "--log", "info", "--node", &both]));
    assert_eq!(values(&got), ["v1"]);
    assert!(
        stderr(&got).contains("n4 was removed from the cluster; ask another node"),
        "{}",
        stderr(&got)
    );
    // Operations on the node named take one address.
    let two = run(ringkv().args(["repair", "--node", &both]));
    assert_exit(&two, 2);
    assert!(
        stderr(&two).contains("give one address"),
        "{}",
        stderr(&two)
    );
    // Now at N members: the next leave is refused.
    let below = c.cli(0, &["leave"]);
    assert_exit(&below, 2);
    assert!(
        stderr(&below).contains("add a node first"),
        "{}",
        stderr(&below)
    );
    // Stopped and started again, n4 refuses.
    c.kill(3);
    assert!(c.launch(3, &[]).is_err(), "a node that left must not start");
}

/// `ringkv cleanup` after a join: the old members drop the copies of the
/// keys the new node took over (their other replica still holds them), and
/// every key stays readable.
#[test]
fn cleanup_after_a_join_drops_the_copies_the_old_members_no_longer_need() {
    // No anti-entropy and no read repair: n4 holds only what the members
    // that gave up ranges hand over, and the old replicas that stay one
    // vouch for each stray copy.
    let mut c = Cluster::start(
        "cleanup_after_a_join",
        3,
        2,
        &[
            "--anti-entropy-interval-s",
            "0",
            "--read-repair-chance",
            "0",
        ],
    );
    let key = |i: usize| format!("cl{i}");
    let rt = runtime();
    rt.block_on(write_keys(
        c.nodes[0].addr,
        150,
        key,
        ringkv_core::Consistency::All,
        4,
    ));
    let seed = c.addr(0);
    c.add_node(&[seed]);
    c.eventually(Duration::from_secs(20), "n1 learns of n4", || {
        members_seen_by(&c, 0) == 4
    });
    let missing_before = rt.block_on(missing_locally(c.nodes[0].addr, 0..150, key));

    let out = c.cli(0, &["cleanup", "--json"]);
    assert_exit(&out, 0);
    let report = json(&out);
    let stray = report["stray_keys"].as_u64().unwrap();
    assert!(stray > 0, "n4 took none of n1's keys: {report}");
    assert_eq!(report["removed"].as_u64(), Some(stray), "{report}");
    assert_eq!(report["kept"].as_u64(), Some(0), "{report}");
    assert_eq!(
        report["keys_scanned"].as_u64(),
        Some(150 - missing_before.len() as u64),
        "{report}"
    );
    assert_eq!(report["failures"], serde_json::json!([]));
    let missing_after = rt.block_on(missing_locally(c.nodes[0].addr, 0..150, key));
    assert_eq!(
        missing_after.len() - missing_before.len(),
        stray as usize,
        "n1 dropped exactly its stray copies"
    );
    // Every old member that is still a replica of a key holds it.
    let after = ringkv_ring::Ring::new(
        (1..=4).map(|i| {
            (
                ringkv_core::NodeId::new(format!("n{i}")).unwrap(),
                ringkv_ring::DEFAULT_VNODES,
            )
        }),
        2,
    )
    .unwrap();
    for i in 0..150 {
        for replica in after.preference_list(key(i).as_bytes()).replicas {
            let n = replica.as_str()[1..].parse::<usize>().unwrap() - 1;
            if n < 3 {
                let missing = rt.block_on(missing_locally(c.nodes[n].addr, [i], key));
                assert!(missing.is_empty(), "{replica} lacks {}", key(i));
            }
        }
    }
    // And n4 comes to hold every key it replicates: the members that gave
    // up those ranges hand them over.
    let n4 = ringkv_core::NodeId::new("n4").unwrap();
    let n4_keys: Vec<usize> = (0..150)
        .filter(|i| after.is_replica(key(*i).as_bytes(), &n4))
        .collect();
    assert!(!n4_keys.is_empty());
    c.eventually(Duration::from_secs(30), "n4 is handed its keys", || {
        rt.block_on(missing_locally(
            c.nodes[3].addr,
            n4_keys.iter().copied(),
            key,
        ))
        .is_empty()
    });
    // Done, no member shows as cleaning.
    let status = json(&c.cli(0, &["status", "--json"]));
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["cleaning"], serde_json::json!(false), "{status}");
    }
    // Run again, nothing is left to drop; the human output says so.
    let again = c.cli(0, &["cleanup"]);
    assert_exit(&again, 0);
    assert!(
        stdout(&again).contains("0 are not this node's to replicate; 0 removed, 0 kept"),
        "{}",
        stdout(&again)
    );
    // It acts on the node named, one address.
    let both = format!("{},{}", c.addr(0), c.addr(1));
    let two = run(ringkv().args(["cleanup", "--node", &both]));
    assert_exit(&two, 2);
    assert!(
        stderr(&two).contains("give one address"),
        "{}",
        stderr(&two)
    );
}

/// Whether node `i`'s status shows `peer` up at `addr`.
fn sees_up_at(c: &Cluster, i: usize, peer: &str, addr: &str) -> bool {
    let status = json(&c.cli(i, &["status", "--json"]));
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["id"] == peer && n["addr"] == addr && n["state"] == "up")
}

/// Every member restarted at a new address at once (machines replaced,
/// pods rescheduled): each remembers only the old addresses, so it finds
/// the cluster again through its `--seed`, and the cluster serves its data
/// as before.
#[test]
fn a_cluster_whose_every_address_changed_finds_itself_through_its_seeds() {
    let mut c = Cluster::start("every_address_changed", 2, 2, &[]);
    assert_exit(&c.cli(0, &["put", "k", "v", "-w", "all"]), 0);
    c.kill(0);
    c.kill(1);
    let ip = match c.nodes[0].addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("{other}"),
    };
    for node in &mut c.nodes {
        node.addr = std::net::SocketAddr::from((ip, free_port(ip)));
    }
    let (a0, a1) = (c.addr(0), c.addr(1));
    c.launch(0, std::slice::from_ref(&a1)).expect("n1 restarts");
    c.launch(1, std::slice::from_ref(&a0)).expect("n2 restarts");
    c.eventually(
        Duration::from_secs(30),
        "each sees the other up at its new address",
        || sees_up_at(&c, 0, "n2", &a1) && sees_up_at(&c, 1, "n1", &a0),
    );
    let get = c.cli(1, &["get", "k", "-r", "all", "--json"]);
    assert_exit(&get, 0);
    assert_eq!(values(&get), ["v"]);
}

/// A member whose data dir was wiped and that was started again without a
/// seed forms a cluster of its own at the member's address. The others ask
/// who answers over each new connection, so they never take its answers
/// for the member's: a write at W=all, which needs all three, is not
/// acknowledged, and the member counts as down.
#[test]
fn a_member_wiped_and_started_without_a_seed_does_not_answer_for_itself() {
    let mut c = Cluster::start("wiped_member", 3, 3, &[]);
    assert_exit(&c.cli(0, &["put", "before", "v", "-w", "all"]), 0);
    c.kill(2);
    std::fs::remove_dir_all(&c.nodes[2].data_dir).unwrap();
    c.restart(2);
    // n1's first tries may still go out over its connection to the killed
    // process and time out; once it dials the new one, the write must
    // still fail, now because n3 is not counted.
    c.eventually(
        Duration::from_secs(30),
        "n1 dials n3's address again",
        || {
            let put = c.cli(0, &["put", "k", "v", "-w", "all"]);
            assert_exit(&put, 3);
            !stderr(&put).contains("n3 (timed out)")
        },
    );
    c.eventually(Duration::from_secs(20), "n1 counts n3 down", || {
        c.state_seen_by(0, "n3") == "down"
    });
    // Nothing meant for n3 reached the node at its address.
    assert_exit(&c.cli(2, &["get", "k", "--local"]), 1);
}
