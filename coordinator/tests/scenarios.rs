//! Quorum scenarios over the simulated network.
//!
//! Every test runs on tokio's paused clock: delays and deadlines elapse
//! instantly and in a fixed order, so the outcome and the message log are the
//! same on every run. Each test reads as a story: set up the cluster, break
//! something, send a request, check the answer and what crossed the network.

use std::time::Duration;

use ringkv_coordinator::sim::{get_values as values, SimCluster};
use ringkv_core::dvv::{Payload, VersionVector};
use ringkv_core::wire::{ErrorKind, Outcome, PutRequest, Response};
use ringkv_core::Consistency::{self, All, Count, One, Quorum};

/// A key whose preference list in a 3-node cluster is every node; which node
/// comes first does not matter for these scenarios.
const KEY: &str = "user:42";

fn ok_context(r: &Response) -> String {
    match r {
        Response::Put(p) => p.context.clone(),
        Response::Get(g) => g.context.clone(),
        other => panic!("expected success, got {other:?}"),
    }
}

fn error(r: &Response) -> (ErrorKind, String) {
    match r {
        Response::Error(e) => (e.kind, e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Who coordinated a successful put.
fn coordinator_of(r: Response) -> Option<ringkv_core::NodeId> {
    match r {
        Response::Put(p) => p.receipt.coordinator,
        other => panic!("{other:?}"),
    }
}

/// Makes `observer`'s failure detector believe `nodes` down (they are not
/// told, and may be up).
fn believe_down<'a>(
    c: &SimCluster,
    observer: &str,
    nodes: impl IntoIterator<Item = &'a ringkv_core::NodeId>,
) {
    let detector = &c.node(observer).detector;
    for node in nodes {
        let now = tokio::time::Instant::now();
        detector.record(node, false, now);
        detector.record(node, false, now);
        assert!(!detector.is_up(node));
    }
}

#[tokio::test(start_paused = true)]
async fn every_r_and_w_succeeds_when_all_replicas_are_up() {
    let c = SimCluster::new(3, 3, 1);
    for w in 1..=3 {
        for r in 1..=3 {
            let key = format!("k-{w}-{r}");
            let put = c.put("n1", &key, "v", Count(w), None).await;
            ok_context(&put);
            assert_eq!(
                values(&c.get("n2", &key, Count(r)).await),
                ["v"],
                "w={w} r={r}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn one_replica_down_quorum_writes_and_reads_succeed() {
    let c = SimCluster::new(3, 3, 1);
    c.net.down(&c.id("n3"));
    let put = c.put("n1", KEY, "v", Quorum, None).await;
    ok_context(&put);
    let log = c.net.take_log();
    assert!(log.contains(&"n1 -> n2 Sync".to_string()), "{log:?}");
    assert!(
        log.contains(&"n1 -> n3 Sync (dropped: n3 is down)".to_string()),
        "{log:?}"
    );
    assert_eq!(values(&c.get("n2", KEY, Quorum).await), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn two_replicas_down_quorum_write_fails_after_the_deadline() {
    let c = SimCluster::new(3, 3, 1);
    c.net.down(&c.id("n2"));
    c.net.down(&c.id("n3"));
    let started = tokio::time::Instant::now();
    let put = c.put("n1", KEY, "v", Quorum, None).await;
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(2000),
        "waits for the whole deadline"
    );
    let (kind, message) = error(&put);
    assert_eq!(kind, ErrorKind::QuorumNotReached);
    assert!(
        message.starts_with("write quorum not reached: 1 of 2 required replicas answered"),
        "{message}"
    );
    assert!(
        message.contains("n2 (timed out)") && message.contains("n3 (timed out)"),
        "{message}"
    );
    // Those that did not answer may have stored it as well.
    let (_, may_be) = message
        .split_once("the value is stored on n1, and may be on ")
        .unwrap_or_else(|| panic!("{message}"));
    assert!(
        may_be.starts_with("n2, n3 (no answer in time)")
            || may_be.starts_with("n3, n2 (no answer in time)"),
        "{message}"
    );
    // Dynamo does not roll back: the coordinator keeps its copy.
    assert_eq!(c.local_values("n1", KEY), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn write_all_fails_and_read_all_fails_with_one_replica_down() {
    let c = SimCluster::new(3, 3, 1);
    ok_context(&c.put("n1", KEY, "v", Quorum, None).await);
    c.net.down(&c.id("n2"));
    let (kind, message) = error(&c.put("n1", KEY, "w", All, None).await);
    assert_eq!(kind, ErrorKind::QuorumNotReached);
    assert!(
        message.contains("2 of 3 required replicas answered"),
        "{message}"
    );
    let (kind, message) = error(&c.get("n1", KEY, All).await);
    assert_eq!(kind, ErrorKind::QuorumNotReached);
    assert!(
        message.starts_with("read quorum not reached: 2 of 3"),
        "{message}"
    );
}

/// With a replica that fails at once, R=all and W=all are out of reach
/// before the others answer; the error still counts the answers already on
/// their way, and names only the replica that failed.
#[tokio::test(start_paused = true)]
async fn an_early_failure_still_counts_the_answers_on_their_way() {
    let c = SimCluster::new(3, 3, 1);
    ok_context(&c.put("n1", KEY, "v", Quorum, None).await);
    c.net.refuse(&c.id("n3"));
    // The others answer after 5 ms, long after n3's failure.
    for peer in ["n1", "n2"] {
        c.net
            .delay(&c.id("n1"), &c.id(peer), Duration::from_millis(5));
    }
    let started = tokio::time::Instant::now();
    let (kind, message) = error(&c.get("n1", KEY, All).await);
    assert_eq!(kind, ErrorKind::QuorumNotReached);
    assert!(
        message.starts_with("read quorum not reached: 2 of 3 required replicas answered; failed: n3 (unreachable: refused)"),
        "{message}"
    );
    let (kind, message) = error(&c.put("n1", KEY, "w", All, None).await);
    assert_eq!(kind, ErrorKind::QuorumNotReached);
    assert!(
        message.starts_with("write quorum not reached: 2 of 3 required replicas answered; failed: n3 (unreachable: refused)"),
        "{message}"
    );
    assert!(!message.contains("no answer"), "{message}");
    // Failed as soon as the answers were in, not at the deadline.
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_reply_after_the_deadline_changes_nothing() {
    let c = SimCluster::new(3, 3, 1);
    // n3 answers, but only after 2.5 s: past the 2 s deadline.
    c.net
        .delay(&c.id("n1"), &c.id("n3"), Duration::from_millis(1250));
    c.net
        .delay(&c.id("n3"), &c.id("n1"), Duration::from_millis(1250));
    let put = c.put("n1", KEY, "v", All, None).await;
    let receipt = match &put {
        Response::Error(e) => e.receipt.clone().expect("quorum errors carry a receipt"),
        other => panic!("expected a quorum error, got {other:?}"),
    };
    let n3 = receipt
        .replicas
        .iter()
        .find(|r| r.node.as_str() == "n3")
        .unwrap();
    assert_eq!(n3.outcome, Outcome::Timeout);
    // The late send still lands on n3 (nothing is rolled back), but the
    // client's answer was decided at the deadline (the error above). The
    // tracker ignoring an answer past the deadline is `quorum`'s unit
    // test `late_and_duplicate_answers_change_nothing`.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.local_values("n3", KEY), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn w1_answers_without_waiting_for_slow_replicas_but_they_still_get_the_write() {
    let c = SimCluster::new(3, 3, 1);
    c.net
        .delay(&c.id("n1"), &c.id("n2"), Duration::from_millis(300));
    c.net
        .delay(&c.id("n1"), &c.id("n3"), Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let put = c.put("n1", KEY, "v", One, None).await;
    ok_context(&put);
    assert!(started.elapsed() < Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.local_values("n2", KEY), ["v"]);
    assert_eq!(c.local_values("n3", KEY), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn blind_writes_through_two_coordinators_become_siblings_and_a_context_resolves_them() {
    let c = SimCluster::new(3, 3, 1);
    ok_context(&c.put("n1", KEY, "left", All, None).await);
    ok_context(&c.put("n2", KEY, "right", All, None).await);
    let read = c.get("n3", KEY, Quorum).await;
    assert_eq!(values(&read), ["left", "right"]);
    ok_context(
        &c.put("n3", KEY, "merged", Quorum, Some(ok_context(&read)))
            .await,
    );
    assert_eq!(values(&c.get("n1", KEY, All).await), ["merged"]);
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_coordinator_keeps_both_sides_of_a_conflict() {
    let c = SimCluster::new(3, 3, 1);
    let first = c.put("n1", KEY, "v0", All, None).await;
    let ctx = ok_context(&first);
    // n1 is cut off from n2 and n3; both sides update from the same context.
    c.net.partition(&c.id("n1"), &c.id("n2"));
    c.net.partition(&c.id("n1"), &c.id("n3"));
    ok_context(&c.put("n1", KEY, "from-n1", One, Some(ctx.clone())).await);
    ok_context(&c.put("n2", KEY, "from-n2", Quorum, Some(ctx)).await);
    c.net.heal();
    assert_eq!(values(&c.get("n1", KEY, All).await), ["from-n1", "from-n2"]);
}

#[tokio::test(start_paused = true)]
async fn a_non_replica_forwards_to_the_preference_list() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = c.ring.preference_list(KEY.as_bytes()).fallbacks[0].clone();
    let put = c.put(outsider.as_str(), KEY, "v", All, None).await;
    let receipt = match put {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(&pref.replicas[0]));
    assert_eq!(receipt.replicas.len(), 3);
    assert!(
        c.local_values(outsider.as_str(), KEY).is_empty(),
        "the outsider stores nothing"
    );
}

/// A leg of a client-driven read (Dynamo §6.4) is answered by one of the
/// key's replicas with its own copy, stale or not, and nothing else crosses
/// the network; a node that is not one of them refuses it as `NotServing`
/// (the client then asks a coordinator), and does not forward it.
#[tokio::test(start_paused = true)]
async fn a_direct_read_is_answered_by_a_replica_alone_and_refused_elsewhere() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let (owner, stale_owner) = (pref.replicas[0].clone(), pref.replicas[2].clone());
    c.net.down(&stale_owner);
    ok_context(&c.put(owner.as_str(), KEY, "v", Quorum, None).await);
    c.net.up(&stale_owner);
    c.net.take_log();
    let direct = |via: &ringkv_core::NodeId| {
        let request = ringkv_core::wire::GetRequest {
            direct: true,
            ..ringkv_core::wire::GetRequest::new(KEY, Quorum)
        };
        let coordinator = c.node(via.as_str()).coordinator.clone();
        async move { coordinator.get(request).await }
    };
    let fresh = direct(&owner).await;
    assert_eq!(values(&fresh), ["v"]);
    match &fresh {
        Response::Get(g) => assert_eq!(g.receipt.coordinator.as_ref(), Some(&owner)),
        other => panic!("{other:?}"),
    }
    // Its own copy as it is: no quorum, no read repair.
    assert!(values(&direct(&stale_owner).await).is_empty());
    assert!(c.local_values(stale_owner.as_str(), KEY).is_empty());
    let outsider = pref.fallbacks[0].clone();
    let (kind, message) = error(&direct(&outsider).await);
    assert_eq!(kind, ErrorKind::NotServing);
    assert!(
        message.contains("not one of the key's replicas"),
        "{message}"
    );
    assert_eq!(
        c.net.take_log(),
        Vec::<String>::new(),
        "a direct read asks no one"
    );
}

/// A replica that serves nothing (shutting down) ran nothing of a forwarded
/// request, so the forwarding node hands it to the next replica instead of
/// passing the refusal on.
#[tokio::test(start_paused = true)]
async fn a_forward_passes_over_a_replica_that_serves_nothing() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    c.node(pref.replicas[0].as_str()).coordinator.close().await;
    let receipt = match c.put(outsider.as_str(), KEY, "v", Quorum, None).await {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(&pref.replicas[1]));
}

/// A node that a forwarder believes replicates a key, but whose own ring
/// says it does not (the rings disagree during a membership change), runs
/// nothing of a forwarded put: minting there would build on its stray copy
/// from an older ring (here "old", which may be a value whose tombstone the
/// replicas have collected) and hand it on to the replicas.
#[tokio::test(start_paused = true)]
async fn a_forwarded_put_to_a_node_that_does_not_replicate_the_key_runs_nothing() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    c.node(outsider.as_str())
        .replica
        .update(
            KEY.as_bytes(),
            &VersionVector::new(),
            Payload::Value(b"old".to_vec()),
        )
        .unwrap();
    let forwarded = PutRequest {
        forwarded: true,
        ..PutRequest::new(KEY, Payload::Value(b"new".to_vec()), Quorum, None)
    };
    let (kind, message) = error(&c.node(outsider.as_str()).coordinator.put(forwarded).await);
    assert_eq!(kind, ErrorKind::NotServing, "{message}");
    assert!(message.contains("does not replicate this key"), "{message}");
    assert_eq!(c.local_values(outsider.as_str(), KEY), ["old"]);
    for replica in &pref.replicas {
        assert!(
            c.local_values(replica.as_str(), KEY).is_empty(),
            "{replica}"
        );
    }
    // A client's put through it is forwarded to a replica, which
    // coordinates it without the stray copy.
    ok_context(&c.put(outsider.as_str(), KEY, "new", Quorum, None).await);
    assert_eq!(
        values(&c.get(pref.replicas[0].as_str(), KEY, All).await),
        ["new"]
    );
}

/// A replica that sheds the request (its request memory is full) ran
/// nothing of it either: the next replica takes it. When every replica
/// sheds it, the client hears `Overloaded`, so it knows that nothing ran
/// and may retry later.
#[tokio::test(start_paused = true)]
async fn a_forward_passes_over_an_overloaded_replica_and_says_when_all_are() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    c.net.overload(&pref.replicas[0]);
    let receipt = match c.put(outsider.as_str(), KEY, "v", Quorum, None).await {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(&pref.replicas[1]));

    for replica in &pref.replicas {
        c.net.overload(replica);
    }
    let (kind, message) = error(&c.put(outsider.as_str(), KEY, "w", Quorum, None).await);
    assert_eq!(kind, ErrorKind::Overloaded, "{message}");
    assert!(message.contains("is overloaded"), "{message}");
    // One replica that may have run it (it crashed) makes it "unavailable".
    c.net.up(&pref.replicas[2]);
    c.net.down(&pref.replicas[2]);
    let (kind, message) = error(&c.put(outsider.as_str(), KEY, "w", Quorum, None).await);
    assert_eq!(kind, ErrorKind::Unavailable, "{message}");
}

/// A forwarded write whose replica does not answer in time goes on to the
/// next replica, so a crashed replica costs no writes while the failure
/// detector has not yet seen it down (ARCHITECTURE, request flow, step 3).
#[tokio::test(start_paused = true)]
async fn a_forward_moves_on_past_a_replica_that_crashed() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    c.net.down(&pref.replicas[0]);
    let receipt = match c.put(outsider.as_str(), KEY, "v", Quorum, None).await {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(&pref.replicas[1]));
    assert_eq!(c.local_values(pref.replicas[1].as_str(), KEY), ["v"]);
}

/// The price of moving on: a replica that ran the write but whose answer
/// came too late leaves the one write stored twice, as two siblings with
/// the same value under two coordinators' dots. Nothing is lost, and the
/// next write with a read's context supersedes both.
#[tokio::test(start_paused = true)]
async fn a_forwarded_write_answered_too_late_is_stored_twice_until_the_next_write() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    let first = pref.replicas[0].clone();
    c.net.delay(&first, &outsider, Duration::from_secs(60));
    let receipt = match c.put(outsider.as_str(), KEY, "v", All, None).await {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(&pref.replicas[1]));
    c.net.delay(&first, &outsider, Duration::ZERO);
    let read = c.get("n1", KEY, All).await;
    assert_eq!(values(&read), ["v", "v"]);
    ok_context(&c.put("n1", KEY, "w", All, Some(ok_context(&read))).await);
    assert_eq!(values(&c.get("n2", KEY, All).await), ["w"]);
}

/// A forward delayed in the network until after the forwarder moved on, and
/// after the write it carried was acknowledged through the next replica and
/// deleted with a read's context at W=all, is refused where it arrives:
/// minted there, it brought the deleted value back.
#[tokio::test(start_paused = true)]
async fn a_forward_that_arrives_after_its_forwarder_moved_on_is_not_run() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    let first = pref.replicas[0].clone();
    c.net.delay(&outsider, &first, Duration::from_secs(60));
    let receipt = match c.put(outsider.as_str(), KEY, "v", All, None).await {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(&pref.replicas[1]));
    let read = c.get("n1", KEY, All).await;
    assert_eq!(values(&read), ["v"]);
    let delete = PutRequest::new(KEY, Payload::Tombstone, All, Some(ok_context(&read)));
    ok_context(&c.node("n1").coordinator.put(delete).await);
    // The forward arrives, 60 s after it was sent.
    tokio::time::sleep(Duration::from_secs(61)).await;
    for replica in &pref.replicas {
        assert!(
            c.local_values(replica.as_str(), KEY).is_empty(),
            "{replica}: {:?}",
            c.local_values(replica.as_str(), KEY)
        );
    }
    assert!(values(&c.get("n1", KEY, All).await).is_empty());
}

/// A replica that uses its whole deadline (a quorum it cannot reach) still
/// answers the forwarding node in time across a link of 50 ms each way: the
/// forward leaves room for the round trip, so the write is not handed to
/// the next replica and stored twice, and the client gets the quorum error.
#[tokio::test(start_paused = true)]
async fn a_forward_leaves_room_for_the_answer_of_a_replica_that_used_its_deadline() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    let (first, silent) = (&pref.replicas[0], &pref.replicas[2]);
    let link = Duration::from_millis(50);
    c.net.delay(&outsider, first, link);
    c.net.delay(first, &outsider, link);
    // Silent, and not known down: the first replica waits for it until its
    // deadline. Strict, so no stand-in covers it.
    c.net.down(silent);
    c.net.take_log();
    let answer = c.put_strict(outsider.as_str(), KEY, "v", All, None).await;
    let (kind, message) = error(&answer);
    assert_eq!(kind, ErrorKind::QuorumNotReached, "{message}");
    let log = c.net.take_log();
    assert!(
        !log.iter()
            .any(|l| l.starts_with(&format!("{outsider} -> {}", pref.replicas[1]))),
        "not forwarded again: {log:?}"
    );
    assert_eq!(
        c.local_values(pref.replicas[1].as_str(), KEY),
        ["v"],
        "once"
    );
}

/// A forwarded request gives its first replica most of the client's time,
/// not an equal share with replicas asked only if it stays silent: here
/// the first needs 800 ms of the 2 s for a strict W=all (its third replica
/// is 400 ms away each way), which a third of the time (and less the
/// forward's margin) would not cover.
#[tokio::test(start_paused = true)]
async fn a_forward_gives_its_first_replica_most_of_the_time() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    let (first, far) = (&pref.replicas[0], &pref.replicas[2]);
    let link = Duration::from_millis(400);
    c.net.delay(first, far, link);
    c.net.delay(far, first, link);
    let receipt = match c.put_strict(outsider.as_str(), KEY, "v", All, None).await {
        Response::Put(p) => p.receipt,
        other => panic!("{other:?}"),
    };
    assert_eq!(receipt.coordinator.as_ref(), Some(first));
    assert_eq!(receipt.replicas.len(), 3);
}

/// When the replicas after the one asked are all believed down, it gets
/// all the time left: they are unlikely to take over. Here the forwarder
/// believes two replicas down (they are up), and the third needs 1.4 s of
/// the 2 s for a strict W=all.
#[tokio::test(start_paused = true)]
async fn a_forward_whose_other_replicas_are_down_gives_the_one_left_all_the_time() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    let (first, second, third) = (&pref.replicas[0], &pref.replicas[1], &pref.replicas[2]);
    believe_down(&c, outsider.as_str(), [first, third]);
    let link = Duration::from_millis(700);
    c.net.delay(second, third, link);
    c.net.delay(third, second, link);
    let coordinator = coordinator_of(c.put_strict(outsider.as_str(), KEY, "v", All, None).await);
    assert_eq!(coordinator.as_ref(), Some(second));
}

/// A forwarder that believes every replica down (its own view may be
/// what failed) keeps the split: the first, dead in fact, does not take
/// all the time, and the second coordinates. (Strict: a sloppy write would
/// not forward at all, but take the write as the owners' stand-in; see
/// `sloppy_quorum.rs`.)
#[tokio::test(start_paused = true)]
async fn a_forward_that_believes_every_replica_down_still_moves_on() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    believe_down(&c, outsider.as_str(), &pref.replicas);
    c.net.down(&pref.replicas[0]);
    let coordinator = coordinator_of(
        c.put_strict(outsider.as_str(), KEY, "v", Quorum, None)
            .await,
    );
    assert_eq!(coordinator.as_ref(), Some(&pref.replicas[1]));
}

/// Believed down or not, the last replica tried gets all the time left:
/// here the first two are silent, and the last needs 180 ms of the 218
/// left of the 2 s (its answer comes from 90 ms away each way). Strict, as
/// above.
#[tokio::test(start_paused = true)]
async fn a_forward_gives_the_last_replica_all_that_is_left() {
    let c = SimCluster::new(5, 3, 1);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let outsider = pref.fallbacks[0].clone();
    believe_down(&c, outsider.as_str(), &pref.replicas);
    for silent in &pref.replicas[..2] {
        c.net.down(silent);
    }
    let link = Duration::from_millis(90);
    c.net.delay(&outsider, &pref.replicas[2], link);
    c.net.delay(&pref.replicas[2], &outsider, link);
    let coordinator = coordinator_of(c.put_strict(outsider.as_str(), KEY, "w", One, None).await);
    assert_eq!(coordinator.as_ref(), Some(&pref.replicas[2]));
}

/// With fewer members than N, a quorum larger than the members can never
/// form: it is refused before the write is stored anywhere.
#[tokio::test(start_paused = true)]
async fn a_quorum_larger_than_the_cluster_is_refused_before_anything_is_written() {
    let c = SimCluster::new(2, 3, 1);
    let (kind, message) = error(&c.put("n1", KEY, "v", All, None).await);
    assert_eq!(kind, ErrorKind::Unavailable);
    assert!(message.contains("w=3 needs 3 replicas"), "{message}");
    assert!(
        message.contains("only 2 members; nothing was written"),
        "{message}"
    );
    assert!(c.net.take_log().is_empty(), "nothing sent");
    for node in ["n1", "n2"] {
        assert!(c.local_values(node, KEY).is_empty(), "{node} stored it");
    }
    ok_context(&c.put("n1", KEY, "v", Count(2), None).await);
    let (_, message) = error(&c.get("n2", KEY, All).await);
    assert!(message.contains("r=3 needs 3 replicas"), "{message}");
    assert_eq!(values(&c.get("n2", KEY, Count(2)).await), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn invalid_requests_are_refused_before_anything_is_written() {
    let c = SimCluster::with_limits(3, 3, 1, 2);
    let (kind, message) = error(&c.put("n1", KEY, "v", Count(4), None).await);
    assert_eq!(kind, ErrorKind::InvalidRequest);
    assert!(message.contains("N=3"), "{message}");
    let (kind, message) = error(
        &c.put("n1", KEY, "v", Quorum, Some("not-a-token!".into()))
            .await,
    );
    assert_eq!(kind, ErrorKind::InvalidRequest);
    assert!(message.contains("base64url"), "{message}");
    assert!(c.local_values("n1", KEY).is_empty());

    // The sibling limit refuses a third blind write.
    ok_context(&c.put("n1", KEY, "a", All, None).await);
    ok_context(&c.put("n1", KEY, "b", All, None).await);
    let (kind, message) = error(&c.put("n1", KEY, "c", All, None).await);
    assert_eq!(kind, ErrorKind::InvalidRequest);
    assert!(message.contains("limit is 2"), "{message}");
    assert_eq!(c.local_values("n2", KEY), ["a", "b"]);
}

#[tokio::test(start_paused = true)]
async fn random_drops_replay_exactly_from_the_seed() {
    async fn run(seed: u64) -> (Vec<String>, Vec<bool>) {
        let c = SimCluster::new(3, 3, seed);
        c.net.drop_rate(0.3);
        let mut outcomes = Vec::new();
        for i in 0..20 {
            let r = c
                .put("n1", &format!("k{i}"), "v", Consistency::All, None)
                .await;
            outcomes.push(matches!(r, Response::Put(_)));
        }
        (c.net.take_log(), outcomes)
    }
    let (log_a, out_a) = run(7).await;
    let (log_b, out_b) = run(7).await;
    assert_eq!(log_a, log_b);
    assert_eq!(out_a, out_b);
    assert!(out_a.contains(&true) && out_a.contains(&false), "{out_a:?}");
}

async fn overwrite(c: &SimCluster, via: &str, value: &str, context: Option<String>) -> Response {
    use ringkv_core::dvv::Payload;
    use ringkv_core::wire::PutRequest;
    c.node(via)
        .coordinator
        .put(PutRequest {
            overwrite: true,
            ..PutRequest::new(KEY, Payload::Value(value.into()), Quorum, context)
        })
        .await
}

#[tokio::test(start_paused = true)]
async fn an_overwrite_supersedes_every_sibling_its_coordinator_holds() {
    let c = SimCluster::new(3, 3, 1);
    ok_context(&c.put("n1", KEY, "a", All, None).await);
    ok_context(&c.put("n1", KEY, "b", All, None).await);
    assert_eq!(values(&c.get("n2", KEY, All).await), ["a", "b"]);
    ok_context(&overwrite(&c, "n2", "c", None).await);
    assert_eq!(values(&c.get("n3", KEY, All).await), ["c"]);
    // It refuses a context: an overwrite has no use for one.
    let (kind, message) = error(&overwrite(&c, "n1", "d", Some("x".into())).await);
    assert_eq!(kind, ErrorKind::InvalidRequest, "{message}");
    assert!(message.contains("no context"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn overwrites_on_both_sides_of_a_partition_survive_as_siblings() {
    let c = SimCluster::new(3, 3, 1);
    ok_context(&c.put("n1", KEY, "old", All, None).await);
    // n1 and n2 cannot talk; each reaches n3, which stores both writes.
    c.net.partition(&c.id("n1"), &c.id("n2"));
    ok_context(&overwrite(&c, "n1", "left", None).await);
    ok_context(&overwrite(&c, "n2", "right", None).await);
    c.net.heal();
    // Neither coordinator had seen the other's write: both survive.
    assert_eq!(values(&c.get("n3", KEY, All).await), ["left", "right"]);
}

/// `close` (a node's shutdown) stops what a write left running after its
/// answer: the send to a slow replica and the late-hint task waiting for it.
/// It returns without waiting for that replica, and the coordinator then
/// holds no task, so the transport (a node's database) is free. A write
/// after `close` is refused before it is stored anywhere.
#[tokio::test(start_paused = true)]
async fn close_stops_the_sends_a_write_left_running() {
    let c = SimCluster::new(3, 3, 1);
    c.net
        .delay(&c.id("n1"), &c.id("n3"), Duration::from_secs(3));
    ok_context(&c.put("n1", KEY, "v", Count(2), None).await);
    let coordinator = &c.node("n1").coordinator;
    assert!(
        coordinator.tasks_running() >= 1,
        "the send to n3 is still under way"
    );

    let before = tokio::time::Instant::now();
    coordinator.close().await;
    assert_eq!(coordinator.tasks_running(), 0);
    // On the paused clock, waiting for n3 would have moved time by 3 s.
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert!(c.local_values("n3", KEY).is_empty(), "the send was stopped");

    let after = c.put("n1", "other", "v", Count(2), None).await;
    let (kind, message) = error(&after);
    assert_eq!(kind, ErrorKind::NotServing, "{message}");
    assert!(message.contains("n1 is shutting down"), "{message}");
    assert!(c.local_values("n1", "other").is_empty());
}

/// A request still waiting for its quorum when `close` is called answers
/// "unavailable" at once; the replica it was waiting for is not blamed
/// (the failure detector still has it up) and no stand-in is tried.
#[tokio::test(start_paused = true)]
async fn close_ends_a_request_under_way_without_blaming_its_replicas() {
    use ringkv_core::dvv::Payload;
    use ringkv_core::wire::PutRequest;
    let c = SimCluster::new(3, 3, 1);
    c.net
        .delay(&c.id("n1"), &c.id("n3"), Duration::from_secs(3));
    let coordinator = c.node("n1").coordinator.clone();
    let put = tokio::spawn({
        let coordinator = coordinator.clone();
        async move {
            let value = Payload::Value(b"v".to_vec());
            coordinator
                .put(PutRequest::new(KEY, value, All, None))
                .await
        }
    });
    // Under way: the request and at least its send to n3.
    for _ in 0..10_000 {
        if coordinator.tasks_running() >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        coordinator.tasks_running() >= 2,
        "the put never got under way"
    );
    c.net.take_log();

    let before = tokio::time::Instant::now();
    coordinator.close().await;
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(coordinator.tasks_running(), 0);
    let (kind, message) = error(&put.await.unwrap());
    assert_eq!(kind, ErrorKind::Unavailable, "{message}");
    assert!(message.contains("n1 shut down while serving"), "{message}");
    assert!(c.node("n1").detector.is_up(&c.id("n3")));
    assert_eq!(
        c.net.take_log(),
        Vec::<String>::new(),
        "no stand-in was tried"
    );
}
