//! Read repair over the simulated network: a read brings the replicas it
//! found stale up to date, after answering (or before, when asked).

use std::time::Duration;

use ringkv_coordinator::sim::{SimCluster, SimOptions};
use ringkv_core::wire::Response;
use ringkv_core::Consistency::{Count, Quorum};

const KEY: &str = "user:42";

fn assert_ok(r: &Response) {
    assert!(matches!(r, Response::Put(_) | Response::Get(_)), "{r:?}");
}

/// Every quorum read asks every replica, as in Dynamo: these tests are
/// about repairing replicas a read did not need for its answer.
fn full_reads() -> SimCluster {
    SimCluster::with_options(
        3,
        3,
        1,
        SimOptions {
            read_repair_chance: 1.0,
            ..SimOptions::default()
        },
    )
}

/// n3 misses a write while down, then comes back.
async fn cluster_with_stale_n3() -> SimCluster {
    let c = full_reads();
    c.net.down(&c.id("n3"));
    assert_ok(&c.put("n1", KEY, "v", Quorum, None).await);
    c.net.up(&c.id("n3"));
    assert!(c.local_values("n3", KEY).is_empty());
    c.net.take_log();
    c
}

#[tokio::test(start_paused = true)]
async fn a_quorum_read_repairs_the_replica_that_missed_the_write() {
    let c = cluster_with_stale_n3().await;
    assert_ok(&c.get("n2", KEY, Quorum).await);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(c.local_values("n3", KEY), ["v"]);
    let log = c.net.take_log();
    assert!(log.contains(&"n2 -> n3 Sync".to_string()), "{log:?}");
    assert!(
        !log.contains(&"n2 -> n1 Sync".to_string()),
        "n1 was current: {log:?}"
    );
}

/// A replica whose stored version of a key does not decode sets it aside
/// and answers as one that never had the key: the read still gets the
/// value, and its repair restores the copy. Before, the key failed on that
/// replica for good: every read, write and repair of it there.
#[tokio::test(start_paused = true)]
async fn a_corrupt_copy_is_set_aside_and_restored_by_the_read() {
    let c = full_reads();
    assert_ok(&c.put("n1", KEY, "v", Count(3), None).await);
    let n3 = c.node("n3").replica.store();
    n3.make_unreadable(KEY.as_bytes());
    let read = c.get_with("n3", KEY, Count(3), true).await;
    match &read {
        Response::Get(g) => assert_eq!(g.values, [b"v".to_vec()], "{read:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(n3.quarantined(), [KEY.as_bytes().to_vec()]);
    assert_eq!(c.local_values("n3", KEY), ["v"], "restored");
    // And writes through it go on, under a new per-key actor.
    assert_ok(&c.put("n3", KEY, "w", Count(3), None).await);
    assert_eq!(n3.quarantined().len(), 1, "set aside once");
}

#[tokio::test(start_paused = true)]
async fn a_replica_answering_after_the_quorum_is_repaired_too() {
    let c = cluster_with_stale_n3().await;
    // n3's answer arrives 400 ms late, long after R=2 was met but within
    // the coordinator's grace for late answers.
    c.net
        .delay(&c.id("n1"), &c.id("n3"), Duration::from_millis(200));
    c.net
        .delay(&c.id("n3"), &c.id("n1"), Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    assert_ok(&c.get("n1", KEY, Count(2)).await);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "the client did not wait"
    );
    assert!(c.local_values("n3", KEY).is_empty(), "not repaired yet");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(c.local_values("n3", KEY), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn wait_repair_answers_only_after_repairing() {
    let c = cluster_with_stale_n3().await;
    assert_ok(&c.get_with("n1", KEY, Quorum, true).await);
    assert_eq!(c.local_values("n3", KEY), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn reads_of_current_replicas_send_no_repairs() {
    let c = full_reads();
    assert_ok(&c.put("n1", KEY, "v", Count(3), None).await);
    c.net.take_log();
    assert_ok(&c.get_with("n2", KEY, Quorum, true).await);
    let log = c.net.take_log();
    assert!(log.iter().all(|l| !l.contains("Sync")), "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn a_missed_delete_is_repaired_as_a_tombstone() {
    let c = full_reads();
    assert_ok(&c.put("n1", KEY, "v", Count(3), None).await);
    let context = match c.get("n1", KEY, Quorum).await {
        Response::Get(g) => g.context,
        other => panic!("{other:?}"),
    };
    c.net.down(&c.id("n3"));
    let delete = c
        .node("n1")
        .coordinator
        .put(ringkv_core::wire::PutRequest::new(
            KEY,
            ringkv_core::Payload::Tombstone,
            Quorum,
            Some(context),
        ))
        .await;
    assert_ok(&delete);
    c.net.up(&c.id("n3"));
    assert_eq!(
        c.local_values("n3", KEY),
        ["v"],
        "n3 still has the deleted value"
    );
    assert_ok(&c.get_with("n2", KEY, Quorum, true).await);
    assert!(
        c.local_values("n3", KEY).is_empty(),
        "the tombstone reached n3"
    );
    let clock = c.node("n3").replica.read(KEY.as_bytes()).unwrap().unwrap();
    assert_eq!(clock.sibling_count(), 1, "one tombstone, no value");
}

#[tokio::test(start_paused = true)]
async fn answers_later_than_the_grace_are_not_waited_for() {
    let c = cluster_with_stale_n3().await;
    c.net
        .delay(&c.id("n1"), &c.id("n3"), Duration::from_millis(400));
    c.net
        .delay(&c.id("n3"), &c.id("n1"), Duration::from_millis(400));
    let started = tokio::time::Instant::now();
    assert_ok(&c.get_with("n1", KEY, Count(2), true).await);
    assert!(
        started.elapsed() <= Duration::from_millis(500),
        "wait_repair stops listening after the grace: {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(c.local_values("n3", KEY).is_empty(), "n3 was not judged");
}

#[tokio::test(start_paused = true)]
async fn repair_keeps_siblings_written_on_both_sides_of_a_partition() {
    let c = full_reads();
    c.net.partition(&c.id("n1"), &c.id("n3"));
    c.net.partition(&c.id("n2"), &c.id("n3"));
    assert_ok(&c.put("n1", KEY, "left", Count(2), None).await);
    assert_ok(&c.put("n3", KEY, "right", Count(1), None).await);
    c.net.heal();
    assert_ok(&c.get_with("n1", KEY, Count(3), true).await);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(c.local_values(node, KEY), ["left", "right"], "{node}");
    }
}
