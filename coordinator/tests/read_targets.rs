//! Which replicas a quorum read asks (see `ringkv_coordinator::latency`):
//! R of them at first — the coordinator and its fastest peers — and a spare
//! when one fails or is late; every replica on a `read_repair_chance` turn.

use std::time::Duration;

use ringkv_coordinator::sim::{get_values, SimCluster, SimOptions};
use ringkv_core::wire::{ErrorKind, Response};
use ringkv_core::Consistency::{All, Count, Quorum};

const KEY: &str = "user:42";

fn cluster(read_repair_chance: f64) -> SimCluster {
    SimCluster::with_options(
        3,
        3,
        1,
        SimOptions {
            read_repair_chance,
            ..SimOptions::default()
        },
    )
}

/// The remote `Read`s in a log (not their replies).
fn reads_sent(log: &[String]) -> Vec<String> {
    log.iter()
        .filter(|l| l.ends_with(" Read"))
        .cloned()
        .collect()
}

fn assert_ok(r: &Response) {
    assert!(matches!(r, Response::Put(_) | Response::Get(_)), "{r:?}");
}

/// `nodes` nodes, N=3, that never read every replica for read repair.
fn without_read_repair(nodes: usize) -> SimCluster {
    SimCluster::with_options(
        nodes,
        3,
        1,
        SimOptions {
            read_repair_chance: 0.0,
            ..SimOptions::default()
        },
    )
}

/// Five nodes (two fallbacks for each key), and a key that n1, n2 and n3
/// replicate.
fn five_nodes() -> (SimCluster, String) {
    let c = without_read_repair(5);
    let key = (0..)
        .map(|i| format!("user:{i}"))
        .find(|k| {
            let replicas = c.ring.replicas_of(k.as_bytes());
            ["n1", "n2", "n3"]
                .iter()
                .all(|n| replicas.contains(&c.id(n)))
        })
        .expect("some key is on n1, n2 and n3");
    (c, key)
}

/// n1 has measured n2 as slow (`slow_ms` each way) and n3 as fast, from
/// the writes it coordinated, which go to every replica.
async fn n2_slow_for_n1(c: &SimCluster, slow_ms: u64) {
    n2_slow_for_n1_with(c, KEY, slow_ms).await
}

/// [`n2_slow_for_n1`], with `key` written last.
async fn n2_slow_for_n1_with(c: &SimCluster, key: &str, slow_ms: u64) {
    let slow = Duration::from_millis(slow_ms);
    c.net.delay(&c.id("n1"), &c.id("n2"), slow);
    c.net.delay(&c.id("n2"), &c.id("n1"), slow);
    for i in 0..3 {
        assert_ok(&c.put("n1", &format!("warm:{i}"), "w", All, None).await);
    }
    assert_ok(&c.put("n1", key, "v3", All, None).await);
    c.net.take_log();
}

#[tokio::test(start_paused = true)]
async fn a_quorum_read_asks_itself_and_the_fastest_peer_only() {
    let c = cluster(0.0);
    n2_slow_for_n1(&c, 3).await;
    let started = tokio::time::Instant::now();
    let r = c.get("n1", KEY, Quorum).await;
    assert_eq!(get_values(&r), ["v3"]);
    assert!(
        started.elapsed() < Duration::from_millis(1),
        "n2 not waited for"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reads_sent(&c.net.take_log()), ["n1 -> n3 Read"]);
}

#[tokio::test(start_paused = true)]
async fn a_silent_replica_is_replaced_by_the_spare_replica_not_a_fallback() {
    // Fallbacks exist (five nodes), so not asking one is a choice.
    let (c, key) = five_nodes();
    n2_slow_for_n1_with(&c, &key, 3).await;
    // n3, the fastest, crashes without anyone noticing: it never answers.
    c.net.down(&c.id("n3"));
    let started = tokio::time::Instant::now();
    let r = c.get("n1", &key, Quorum).await;
    assert_eq!(get_values(&r), ["v3"]);
    let log = c.net.take_log();
    assert!(
        log.contains(&"n1 -> n2 Read".to_string()),
        "the spare was asked: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("Read for")),
        "no fallback needed: {log:?}"
    );
    // A silent n3 costs the speculation delay (a small multiple of its
    // recent latency) plus n2's round trip, never the request timeout.
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
}

/// A replica that answers at once with an error (shedding load, draining,
/// or a failing disk) is not ranked fastest for it: its error counts as a
/// timeout would, so the next read asks the other peer first.
#[tokio::test(start_paused = true)]
async fn a_replica_answering_errors_is_not_ranked_fastest() {
    for kind in [
        ErrorKind::Overloaded,
        ErrorKind::NotServing,
        ErrorKind::Internal,
    ] {
        replica_answering(kind).await;
    }
}

async fn replica_answering(kind: ErrorKind) {
    let c = cluster(0.0);
    n2_slow_for_n1(&c, 3).await;
    c.net.fail_with(&c.id("n3"), kind);
    assert_eq!(get_values(&c.get("n1", KEY, Quorum).await), ["v3"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        reads_sent(&c.net.take_log()),
        ["n1 -> n3 Read", "n1 -> n2 Read"],
        "n3, measured fastest, is asked; its error brings in the spare"
    );
    assert_eq!(get_values(&c.get("n1", KEY, Quorum).await), ["v3"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reads_sent(&c.net.take_log()), ["n1 -> n2 Read"]);
}

#[tokio::test(start_paused = true)]
async fn a_late_replica_gets_a_speculative_spare() {
    let c = cluster(0.0);
    n2_slow_for_n1(&c, 3).await;
    // n3 turns slow after being measured fast: 300 ms each way.
    let slow = Duration::from_millis(300);
    c.net.delay(&c.id("n1"), &c.id("n3"), slow);
    c.net.delay(&c.id("n3"), &c.id("n1"), slow);
    let started = tokio::time::Instant::now();
    let r = c.get("n1", KEY, Count(2)).await;
    assert_eq!(get_values(&r), ["v3"]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(100),
        "answered by the spare n2, not n3's 600 ms: {took:?}"
    );
    assert_eq!(
        reads_sent(&c.net.take_log()),
        ["n1 -> n3 Read", "n1 -> n2 Read"]
    );
}

#[tokio::test(start_paused = true)]
async fn read_repair_chance_is_the_exact_share_of_reads_that_ask_everyone() {
    let c = cluster(0.25);
    n2_slow_for_n1(&c, 0).await;
    let mut remote_reads = 0;
    for _ in 0..8 {
        assert_ok(&c.get("n1", KEY, Quorum).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        remote_reads += reads_sent(&c.net.take_log()).len();
    }
    // 6 reads ask one peer, 2 ask both.
    assert_eq!(remote_reads, 6 + 2 * 2);
}

#[tokio::test(start_paused = true)]
async fn reads_at_r_equal_n_ask_every_replica() {
    let c = cluster(0.0);
    n2_slow_for_n1(&c, 0).await;
    assert_ok(&c.get("n1", KEY, All).await);
    assert_eq!(reads_sent(&c.net.take_log()).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stale_replica_among_those_asked_is_repaired() {
    let c = cluster(0.0);
    n2_slow_for_n1(&c, 3).await;
    // n3 (the one n1 reads from) misses a write coordinated by n2; n1's
    // view of n3's speed is untouched.
    let Response::Get(seen) = c.get("n2", KEY, All).await else {
        panic!("read failed")
    };
    c.net.partition(&c.id("n2"), &c.id("n3"));
    assert_ok(&c.put("n2", KEY, "new", Quorum, Some(seen.context)).await);
    c.net.heal();
    assert_eq!(c.local_values("n3", KEY), ["v3"]);
    assert_eq!(get_values(&c.get("n1", KEY, Quorum).await), ["new"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.local_values("n3", KEY), ["new"]);
}

/// A read through a node that replicates none of the key goes to a
/// replica; when that replica is cut off from the others but this node is
/// not (a partition that is not transitive), the replica's quorum fails,
/// and this node, with time left, asks the owners itself. (A write is not
/// tried again: it may have run.)
#[tokio::test(start_paused = true)]
async fn a_read_whose_replica_is_cut_off_from_its_peers_is_asked_again_from_here() {
    let c = without_read_repair(4);
    let key = (0..)
        .map(|i| format!("user:{i}"))
        .find(|k| !c.ring.replicas_of(k.as_bytes()).contains(&c.id("n1")))
        .expect("some key is not on n1");
    assert_ok(&c.put("n1", &key, "v", All, None).await);
    let replicas = c.ring.replicas_of(key.as_bytes());
    // The replica the read goes to first, cut off from the other two.
    for other in &replicas[1..] {
        c.net.partition(&replicas[0], other);
    }
    let read = c.get("n1", &key, All).await;
    assert_eq!(get_values(&read), ["v"], "{read:?}");
}
