//! Sloppy quorum and hinted handoff over the simulated network (Dynamo §4.6).
//!
//! Five nodes, N=3: every key has three preference-list nodes and two
//! fallbacks. Each story takes a key, names its nodes `owners[0..3]` and
//! `fallbacks[0..2]`, breaks one of them and checks who stood in, what they
//! hold, and what happens when the owner returns. Time is paused, so the
//! failure detector's probes and the handoff worker run in a fixed order.

use std::time::Duration;

use ringkv_coordinator::sim::{get_values as values, SimCluster, SimOptions};
use ringkv_core::wire::{ErrorKind, ErrorReply, Outcome, Receipt, Response};
use ringkv_core::Consistency::{All, One, Quorum};
use ringkv_core::NodeId;
use ringkv_repair::{HintError, HintStore};

const KEY: &str = "user:42";

struct Story {
    c: SimCluster,
    owners: Vec<String>,
    fallbacks: Vec<String>,
}

fn story(options: SimOptions) -> Story {
    story_of(5, options)
}

/// A story on `nodes` nodes (N=3): `nodes - 3` fallbacks.
fn story_of(nodes: usize, options: SimOptions) -> Story {
    let c = SimCluster::with_options(nodes, 3, 7, options);
    let pref = c.ring.preference_list(KEY.as_bytes());
    let names = |v: &[NodeId]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    Story {
        owners: names(&pref.replicas),
        fallbacks: names(&pref.fallbacks),
        c,
    }
}

fn with_probes() -> SimOptions {
    SimOptions {
        probes: true,
        ..SimOptions::default()
    }
}

fn receipt(r: &Response) -> &Receipt {
    match r {
        Response::Put(p) => &p.receipt,
        Response::Get(g) => &g.receipt,
        Response::Error(e) => e.receipt.as_ref().expect("quorum errors carry a receipt"),
        other => panic!("unexpected {other:?}"),
    }
}

/// Who stood in for whom, as the receipt tells it (successful stand-ins only).
fn stand_ins(r: &Response) -> Vec<(String, String)> {
    receipt(r)
        .replicas
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| Some((o.node.to_string(), o.hint_for.as_ref()?.to_string())))
        .collect()
}

impl Story {
    fn id(&self, name: &str) -> NodeId {
        self.c.id(name)
    }

    /// Waits (in simulated time) until `observer` believes `node` is in
    /// state `up`, failing after 10 s.
    async fn until_seen(&self, observer: &str, node: &str, up: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.c.node(observer).detector.is_up(&self.id(node)) != up {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{observer} never saw {node} as {}",
                if up { "up" } else { "down" }
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no node holds a hint, failing after `limit`.
    async fn until_no_hints(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.c.hints_pending() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} hints still pending",
                self.c.hints_pending()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn hint(&self, holder: &str, owner: &str) -> Option<Vec<String>> {
        let clock = self
            .c
            .node(holder)
            .hints
            .read(&self.id(owner), KEY.as_bytes())
            .unwrap()?;
        Some(
            clock
                .values()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect(),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_write_goes_to_the_first_healthy_fallback_with_a_hint() {
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    s.c.net.take_log();

    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(stand_ins(&put), [(s.fallbacks[0].clone(), dead.clone())]);
    let log = s.c.net.take_log();
    assert!(
        log.contains(&format!(
            "{coordinator} -> {} Hint for {dead}",
            s.fallbacks[0]
        )),
        "{log:?}"
    );
    assert!(
        !log.contains(&format!(
            "{coordinator} -> {dead} Sync (dropped: {dead} is down)"
        )),
        "a node believed down is not contacted: {log:?}"
    );
    // The fallback holds it as a hint, not as its own data.
    assert_eq!(s.hint(&s.fallbacks[0], dead), Some(vec!["v".to_string()]));
    assert!(s.c.local_values(&s.fallbacks[0], KEY).is_empty());
    // Reads use the first N healthy nodes too, hinted copy included.
    let get = s.c.get(coordinator, KEY, All).await;
    assert_eq!(values(&get), ["v"]);
    assert_eq!(stand_ins(&get), [(s.fallbacks[0].clone(), dead.clone())]);
}

/// A stand-in answers a read with its hint only. A copy of the key in its
/// own store is a stray from an older ring, which may have outlived the
/// key's tombstone on the replicas: handed on, read repair would bring a
/// deleted value back (ARCHITECTURE: a stray copy is never handed on).
#[tokio::test(start_paused = true)]
async fn a_stand_in_reads_its_hint_never_its_own_stray_copy() {
    use ringkv_core::dvv::{Payload, VersionVector};
    use ringkv_core::wire::ReplicaRequest;
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    // The key was deleted (nothing left on its replicas), but the first
    // fallback still holds an old copy of its own.
    let stray =
        s.c.node(&s.fallbacks[0])
            .replica
            .handle(ReplicaRequest::Update {
                key: KEY.as_bytes().to_vec(),
                context: VersionVector::new(),
                payload: Payload::Value(b"deleted long ago".to_vec()),
                overwrite: false,
                hint_for: None,
            });
    assert!(matches!(stray, Response::Clock(Some(_))), "{stray:?}");
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;

    let get = s.c.get_with(coordinator, KEY, All, true).await;
    assert_eq!(stand_ins(&get), [(s.fallbacks[0].clone(), dead.clone())]);
    assert!(values(&get).is_empty(), "{get:?}");
    for owner in &s.owners[..2] {
        assert!(
            s.c.local_values(owner, KEY).is_empty(),
            "repaired onto {owner}"
        );
    }

    // A write held for the owner is what the stand-in reads.
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(values(&s.c.get(coordinator, KEY, All).await), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn a_replica_not_yet_known_to_be_down_is_covered_once_it_stays_silent() {
    // No probes: nothing is judged down, so the coordinator first tries the
    // dead owner and asks a fallback only when the owner stays silent.
    let s = story(SimOptions::default());
    s.c.net.down(&s.id(&s.owners[1]));
    let started = tokio::time::Instant::now();
    let put = s.c.put(&s.owners[0], KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "stand-ins are asked after a quarter of the 2 s deadline"
    );
    assert_eq!(
        stand_ins(&put),
        [(s.fallbacks[0].clone(), s.owners[1].clone())]
    );
}

/// The wait for silent owners starts when the write goes out to them, not
/// when the request came in: a coordinator whose own write took longer
/// than that wait (a disk stall) still gives the owners their time, and
/// asks no fallback for owners that answer at once.
#[tokio::test(start_paused = true)]
async fn a_slow_local_write_does_not_make_the_owners_look_silent() {
    let s = story(SimOptions::default());
    let coordinator = s.id(&s.owners[0]);
    // The coordinator's write to itself takes 600 ms, past the 500 ms wait.
    s.c.net
        .delay(&coordinator, &coordinator, Duration::from_millis(300));
    s.c.net.take_log();
    let put = s.c.put(&s.owners[0], KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert!(stand_ins(&put).is_empty(), "{put:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = s.c.net.take_log();
    assert!(
        !log.iter().any(|l| l.contains("Hint for")),
        "no fallback was asked: {log:?}"
    );
}

/// The hints a write places after its quorum end soon after its deadline:
/// with a replica and every fallback silent (a partition not yet
/// detected), trying each fallback for its full hint timeout, one after
/// another, would keep the write's task running long after.
#[tokio::test(start_paused = true)]
async fn the_late_hints_of_a_write_end_soon_after_its_deadline() {
    let s = story(SimOptions::default());
    s.c.net.down(&s.id(&s.owners[2]));
    for fallback in &s.fallbacks {
        s.c.net.down(&s.id(fallback));
    }
    let started = tokio::time::Instant::now();
    let put = s.c.put(&s.owners[0], KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    let coordinator = &s.c.node(&s.owners[0]).coordinator;
    assert!(
        coordinator.tasks_running() >= 1,
        "the send to the silent owner"
    );
    // The deadline is 2 s; its late hints may take 2 s more, no longer
    // (each of the two fallbacks would take 2 s on its own).
    tokio::time::sleep_until(started + Duration::from_millis(4_001)).await;
    assert_eq!(coordinator.tasks_running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_fails_after_the_quorum_still_gets_a_hint() {
    // No probes: nobody knows the owner is dead. W=quorum is met without
    // it, and the client has its answer at once...
    let s = story(SimOptions::default());
    let dead = &s.owners[2];
    s.c.net.down(&s.id(dead));
    let started = tokio::time::Instant::now();
    let put = s.c.put(&s.owners[0], KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert!(started.elapsed() < Duration::from_millis(10));
    assert_eq!(s.c.hints_pending(), 0);
    // ...and when the owner's send times out at the deadline, a fallback
    // is given the write as a hint.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(s.hint(&s.fallbacks[0], dead), Some(vec!["v".to_string()]));
    s.c.net.up(&s.id(dead));
    s.until_no_hints(Duration::from_secs(10)).await;
    assert_eq!(s.c.local_values(dead, KEY), ["v"]);
}

#[tokio::test(start_paused = true)]
async fn a_late_hint_refused_by_one_fallback_goes_to_the_next() {
    let s = story(SimOptions::default());
    let dead = &s.owners[2];
    s.c.net.down(&s.id(dead));
    s.c.node(&s.fallbacks[0]).refuse_hints();
    let put = s.c.put(&s.owners[0], KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(s.hint(&s.fallbacks[0], dead), None);
    assert_eq!(s.hint(&s.fallbacks[1], dead), Some(vec!["v".to_string()]));
}

#[tokio::test(start_paused = true)]
async fn reads_wait_for_a_slow_replica_rather_than_ask_a_fallback() {
    let s = story(SimOptions::default());
    let coordinator = &s.owners[0];
    assert!(matches!(
        s.c.put(coordinator, KEY, "v", All, None).await,
        Response::Put(_)
    ));
    for slow in [&s.owners[1], &s.owners[2]] {
        s.c.net
            .delay(&s.id(coordinator), &s.id(slow), Duration::from_millis(800));
    }
    s.c.net.take_log();
    let get = s.c.get(coordinator, KEY, All).await;
    assert_eq!(values(&get), ["v"]);
    assert!(stand_ins(&get).is_empty());
    let log = s.c.net.take_log();
    assert!(!log.iter().any(|l| l.contains("Read for")), "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stand_in_that_refuses_is_replaced_by_the_next_fallback() {
    // The first fallback stores no hints; the owner is silent, not known down.
    let s = story(SimOptions::default());
    let dead = &s.owners[2];
    s.c.net.down(&s.id(dead));
    s.c.node(&s.fallbacks[0]).refuse_hints();
    let put = s.c.put(&s.owners[0], KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(stand_ins(&put), [(s.fallbacks[1].clone(), dead.clone())]);
}

#[tokio::test(start_paused = true)]
async fn a_dead_fallback_is_skipped_for_the_next() {
    let s = story(with_probes());
    let coordinator = &s.owners[0];
    s.c.net.down(&s.id(&s.owners[2]));
    s.c.net.down(&s.id(&s.fallbacks[0]));
    s.until_seen(coordinator, &s.fallbacks[0], false).await;
    s.until_seen(coordinator, &s.owners[2], false).await;
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert_eq!(
        stand_ins(&put),
        [(s.fallbacks[1].clone(), s.owners[2].clone())]
    );
}

#[tokio::test(start_paused = true)]
async fn strict_requests_count_only_the_preference_list() {
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    let put = s.c.put_strict(coordinator, KEY, "v", All, None).await;
    let Response::Error(e) = &put else {
        panic!("{put:?}")
    };
    assert_eq!(e.kind, ErrorKind::QuorumNotReached);
    assert!(e.message.contains("2 of 3 required"), "{}", e.message);
    assert!(
        e.message
            .contains("no stand-in took a failed replica's place: --strict"),
        "{}",
        e.message
    );
    assert!(stand_ins(&put).is_empty());
    assert_eq!(s.c.hints_pending(), 0, "no hint was stored");
    // A strict quorum write still succeeds with two of three.
    assert!(matches!(
        s.c.put_strict(coordinator, KEY, "w", Quorum, None).await,
        Response::Put(_)
    ));
}

/// An owner whose ring no longer places the key on it (a join the hint's
/// holder has not heard of yet) refuses the hint: taken, it would be a stray
/// copy that no read or repair looks at. The holder keeps it, and hands it
/// over once the rings agree again.
#[tokio::test(start_paused = true)]
async fn an_owner_whose_ring_moved_the_key_away_refuses_its_hint() {
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert_eq!(stand_ins(&put), [(s.fallbacks[0].clone(), dead.clone())]);
    // The owner comes back with a ring that places the key elsewhere: here
    // one without it, which places nothing on it.
    let ring = s.c.ring.clone();
    let without = ringkv_ring::Ring::new(
        ring.nodes()
            .into_iter()
            .filter(|n| *n != s.id(dead))
            .map(|n| (n, 16)),
        3,
    )
    .unwrap();
    s.c.node(dead)
        .coordinator
        .set_ring(std::sync::Arc::new(without));
    s.c.net.take_log();
    s.c.net.up(&s.id(dead));
    s.until_seen(&s.fallbacks[0], dead, true).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = s.c.net.take_log();
    assert!(
        log.iter()
            .any(|l| *l == format!("{} -> {dead} Handoff", s.fallbacks[0])),
        "the hint was offered: {log:?}"
    );
    assert!(s.c.local_values(dead, KEY).is_empty(), "refused");
    assert_eq!(s.hint(&s.fallbacks[0], dead), Some(vec!["v".to_string()]));
    // The rings agree again: it is handed over.
    s.c.node(dead).coordinator.set_ring(ring);
    s.until_no_hints(Duration::from_secs(10)).await;
    assert_eq!(s.c.local_values(dead, KEY), ["v"]);
}

/// An owner that refuses hints for its ring's placement still takes the
/// others it is sent: the refusal says those hints alone wait, the owner
/// serves. (Taken as a failure of the owner, each batch it refused whole
/// ended the round and backed the owner off, doubling each time: here the
/// hints listed after them waited 3.75 s, and longer behind more.)
#[tokio::test(start_paused = true)]
async fn hints_refused_for_placement_do_not_hold_back_the_owner_s_others() {
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    let dead_id = s.id(dead);
    // The owner comes back with fewer virtual nodes: under its ring, some
    // of its keys moved to others.
    let ring = s.c.ring.clone();
    let fewer = ringkv_ring::Ring::new(
        ring.nodes().into_iter().map(|n| {
            let vnodes = if n == dead_id { 4 } else { 16 };
            (n, vnodes)
        }),
        3,
    )
    .unwrap();
    let its = |family: &str, moved: bool, count: usize| -> Vec<String> {
        (0..)
            .map(|i| format!("{KEY}-{family}{i}"))
            .filter(|k| {
                ring.is_replica(k.as_bytes(), &dead_id)
                    && fewer.is_replica(k.as_bytes(), &dead_id) != moved
            })
            .take(count)
            .collect()
    };
    // Hints are listed in key order: the moved keys ("a…") first, several
    // batches of them (64 hints a batch) for each stand-in.
    let (moved, stay) = (its("a", true, 800), its("b", false, 100));
    s.c.net.down(&dead_id);
    s.until_seen(coordinator, dead, false).await;
    for key in moved.iter().chain(&stay) {
        let put = s.c.put(coordinator, key, "v", Quorum, None).await;
        assert!(matches!(put, Response::Put(_)), "{put:?}");
    }
    s.c.node(dead)
        .coordinator
        .set_ring(std::sync::Arc::new(fewer));
    s.c.net.up(&dead_id);
    s.until_seen(&s.fallbacks[0], dead, true).await;
    // 0.3 s with the refusals declined; 3.75 s when each ended the round.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let waiting = || {
        stay.iter()
            .filter(|k| s.c.local_values(dead, k).is_empty())
            .count()
    };
    while waiting() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} hints the owner's ring places on it were held back",
            waiting()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for key in &moved {
        assert!(s.c.local_values(dead, key).is_empty(), "{key} refused");
    }
}

#[tokio::test(start_paused = true)]
async fn hints_are_handed_to_the_owner_when_it_returns_and_then_deleted() {
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    for i in 0..20 {
        let key = format!("{KEY}-{i}");
        let put = s.c.put(coordinator, &key, "v", Quorum, None).await;
        assert!(matches!(put, Response::Put(_)), "{put:?}");
    }
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    let held = s.c.hints_pending();
    assert!(held >= 1, "some writes were hinted");
    assert!(s.c.local_values(dead, KEY).is_empty());

    s.c.net.up(&s.id(dead));
    // Detection (about 1 s) plus one delivery round.
    s.until_no_hints(Duration::from_secs(5)).await;
    assert_eq!(s.c.local_values(dead, KEY), ["v"]);
    assert_eq!(
        s.hint(&s.fallbacks[0], dead),
        None,
        "deleted after delivery"
    );
    let log = s.c.net.take_log();
    assert!(
        log.iter()
            .any(|l| *l == format!("{} -> {dead} Handoff", s.fallbacks[0])),
        "{log:?}"
    );
}

/// A 10 s hint window (sweeps every `sweep`, or the default), and one write
/// at W=all hinted for the third owner (`owners[2]`), which is down.
async fn one_hinted_write(sweep: Option<Duration>) -> Story {
    let s = story(SimOptions {
        hint_ttl: Duration::from_secs(10),
        hint_sweep_interval: sweep,
        ..with_probes()
    });
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(s.c.hints_pending(), 1);
    s
}

#[tokio::test(start_paused = true)]
async fn hints_past_the_window_are_dropped_and_never_delivered() {
    let s = one_hinted_write(None).await;
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    // Still held inside the window...
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(s.c.hints_pending(), 1);
    // ...and swept out after it (the sweep runs every few seconds).
    s.until_no_hints(Duration::from_secs(10)).await;
    s.c.net.up(&s.id(dead));
    s.until_seen(coordinator, dead, true).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        s.c.local_values(dead, KEY).is_empty(),
        "the expired hint was not delivered (anti-entropy's job now)"
    );
}

/// An expired hint that no sweep has removed yet is not delivered either:
/// delivery checks the window itself.
#[tokio::test(start_paused = true)]
async fn an_expired_hint_not_yet_swept_is_dropped_at_delivery() {
    let s = one_hinted_write(Some(Duration::from_secs(3600))).await;
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(s.c.hints_pending(), 1, "expired, but no sweep has run");
    s.c.net.up(&s.id(dead));
    s.until_seen(coordinator, dead, true).await;
    s.until_no_hints(Duration::from_secs(10)).await;
    assert!(
        s.c.local_values(dead, KEY).is_empty(),
        "the expired hint was dropped, not delivered"
    );
}

/// A hint refused for want of room brings the next sweep forward (here an
/// hour away): hints past the window may hold that room, and until the
/// sweep every new hint for the owner would be refused.
#[tokio::test(start_paused = true)]
async fn a_hint_refused_for_room_brings_the_sweep_forward() {
    let s = story(SimOptions {
        hint_ttl: Duration::from_secs(10),
        hint_sweep_interval: Some(Duration::from_secs(3600)),
        hint_max_per_target: 1,
        ..with_probes()
    });
    let (coordinator, dead) = (&s.owners[0], s.id(&s.owners[2]));
    s.c.net.down(&dead);
    s.until_seen(coordinator, dead.as_str(), false).await;
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    let holder = &s.c.node(&s.fallbacks[0]).hints;
    assert_eq!(
        holder.pending(&dead),
        1,
        "the first fallback holds the hint"
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(holder.pending(&dead), 1, "past the window, not swept yet");
    let held = holder.batch(&dead, None, 1).unwrap().remove(0);
    assert!(
        matches!(
            holder.store(&dead, b"another key", &held.clock),
            Err(HintError::TargetFull { .. })
        ),
        "the per-owner cap of 1 is reached"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while holder.pending(&dead) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.store(&dead, b"another key", &held.clock).unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_hints_writes_need_the_preference_list() {
    let s = story(SimOptions {
        hinted_handoff: false,
        ..with_probes()
    });
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    let Response::Error(e) = &put else {
        panic!("{put:?}")
    };
    assert!(e.message.contains("--no-hints"), "{}", e.message);
    assert!(matches!(
        s.c.put(coordinator, KEY, "v", Quorum, None).await,
        Response::Put(_)
    ));
    assert_eq!(s.c.hints_pending(), 0);
}

/// With N members every member is a replica: a write at W=all with one
/// down fails, and says that no node was left to stand in.
#[tokio::test(start_paused = true)]
async fn with_n_members_no_node_can_stand_in() {
    let c = SimCluster::with_options(3, 3, 7, with_probes());
    let pref = c.ring.preference_list(KEY.as_bytes());
    assert!(pref.fallbacks.is_empty());
    let (coordinator, dead) = (pref.replicas[0].to_string(), pref.replicas[2].clone());
    c.net.down(&dead);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.node(&coordinator).detector.is_up(&dead) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dead} never seen down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let put = c.put(&coordinator, KEY, "v", All, None).await;
    let Response::Error(e) = &put else {
        panic!("{put:?}")
    };
    assert_eq!(e.kind, ErrorKind::QuorumNotReached);
    assert!(
        e.message
            .contains("every member holds a replica of this key"),
        "{}",
        e.message
    );
    // With a stand-in available the note is not given (see
    // a_write_goes_to_the_first_healthy_fallback_with_a_hint).
}

#[tokio::test(start_paused = true)]
async fn concurrent_writes_hinted_for_one_owner_all_reach_it() {
    let s = story(with_probes());
    let dead = &s.owners[2];
    s.c.net.down(&s.id(dead));
    s.until_seen(&s.owners[0], dead, false).await;
    s.until_seen(&s.owners[1], dead, false).await;
    // Two blind writes through different coordinators: siblings.
    assert!(matches!(
        s.c.put(&s.owners[0], KEY, "a", All, None).await,
        Response::Put(_)
    ));
    assert!(matches!(
        s.c.put(&s.owners[1], KEY, "b", All, None).await,
        Response::Put(_)
    ));
    assert_eq!(s.hint(&s.fallbacks[0], dead).map(|v| v.len()), Some(2));
    s.c.net.up(&s.id(dead));
    s.until_no_hints(Duration::from_secs(5)).await;
    assert_eq!(s.c.local_values(dead, KEY), ["a", "b"]);
}

#[tokio::test(start_paused = true)]
async fn a_delete_hinted_for_a_dead_owner_is_handed_off_and_stays_deleted_after_collection() {
    use ringkv_core::wire::PutRequest;
    use ringkv_core::Payload;
    use ringkv_repair::tombstones::confirm_collectable;
    let s = story(with_probes());
    let (coordinator, dead) = (&s.owners[0], &s.owners[2]);
    let put = s.c.put(coordinator, KEY, "v", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    let Response::Get(read) = s.c.get(coordinator, KEY, All).await else {
        panic!("read failed");
    };
    s.c.net.down(&s.id(dead));
    s.until_seen(coordinator, dead, false).await;
    let delete = PutRequest::new(KEY, Payload::Tombstone, Quorum, Some(read.context));
    let deleted = s.c.node(coordinator).coordinator.put(delete).await;
    assert!(matches!(deleted, Response::Put(_)), "{deleted:?}");
    assert!(
        s.c.hints_pending() >= 1,
        "the tombstone was hinted for {dead}"
    );
    assert_eq!(
        s.c.local_values(dead, KEY),
        ["v"],
        "{dead} missed the delete"
    );

    s.c.net.up(&s.id(dead));
    s.until_no_hints(Duration::from_secs(5)).await;
    assert!(
        s.c.local_values(dead, KEY).is_empty(),
        "handoff brought the tombstone"
    );

    for owner in &s.owners {
        let ours =
            s.c.node(owner)
                .replica
                .read(KEY.as_bytes())
                .unwrap()
                .unwrap();
        let transport = s.c.net.transport(s.id(owner));
        let may = confirm_collectable(
            &transport,
            &s.c.ring,
            &s.id(owner),
            KEY.as_bytes(),
            &ours,
            Duration::from_secs(1),
        )
        .await;
        assert!(may.is_collectable(), "{owner} may collect: {may:?}");
        assert!(s
            .c
            .node(owner)
            .replica
            .remove_if_unchanged(KEY.as_bytes(), &ours)
            .unwrap());
    }
    for owner in &s.owners {
        assert_eq!(s.c.repair(owner).await.keys_repaired, 0, "{owner}");
    }
    let Response::Get(after) = s.c.get(coordinator, KEY, All).await else {
        panic!("read failed");
    };
    assert!(after.values.is_empty(), "never comes back");
}

/// A read asks R owners; when one of them goes silent, the spare it turns
/// to is believed down, so the spare's slot goes to a fallback rather than
/// to a node known not to answer: once the silent owner has been silent
/// for the stand-in delay (the speculative retry asks only spares believed
/// up: the silent owner may merely be slow, and hold the latest write).
#[tokio::test(start_paused = true)]
async fn a_spare_believed_down_is_read_through_a_stand_in() {
    let s = story(SimOptions::default());
    let (coord, b, c3) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    assert_eq!(
        stand_ins(&s.c.put(coord, KEY, "v", All, None).await),
        Vec::<(String, String)>::new()
    );
    // The coordinator believes `b` down; `c3`, asked first, then dies
    // unnoticed: the spare `b` is routed to a fallback.
    let node = s.c.node(coord);
    let now = tokio::time::Instant::now();
    node.detector.record(&s.c.id(b), false, now);
    node.detector.record(&s.c.id(b), false, now);
    s.c.net.down(&s.c.id(b));
    s.c.net.down(&s.c.id(c3));
    s.c.net.take_log();
    let started = tokio::time::Instant::now();
    let r = s.c.get(coord, KEY, Quorum).await;
    assert_eq!(values(&r), ["v"], "{r:?}");
    // At the stand-in delay: a quarter of the 2 s deadline, at most 500 ms.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(600),
        "{took:?}"
    );
    assert_eq!(stand_ins(&r), [(s.fallbacks[0].clone(), b.clone())]);
    let log = s.c.net.take_log();
    assert!(
        !log.iter()
            .any(|l| l.starts_with(&format!("{coord} -> {b} Read"))),
        "the owner believed down was not asked: {log:?}"
    );
}

/// v2 is on owners `b` and `c` but not on the coordinator `a`, which
/// believes `b` down; `c` is slow. `a` must wait for `c`, not let a
/// fallback's empty answer for `b` fill R beside its own stale v1: neither
/// by a speculative retry nor, on a full-read turn, by asking the fallback
/// up front.
async fn a_slow_owner_is_waited_for_rather_than_replaced(read_repair_chance: f64) {
    let s = story(SimOptions {
        read_repair_chance,
        ..SimOptions::default()
    });
    let (a, b, c) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    let put = s.c.put(a, KEY, "v1", All, None).await;
    let Response::Put(put) = put else {
        panic!("{put:?}")
    };
    // v2 through c, which cannot reach a; strict, so no hint for a exists.
    s.c.net.partition(&s.id(a), &s.id(c));
    let put =
        s.c.put_strict(c, KEY, "v2", Quorum, Some(put.context))
            .await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    s.c.net.heal();
    assert_eq!(s.c.local_values(a, KEY), ["v1"]);
    let now = tokio::time::Instant::now();
    let node = s.c.node(a);
    node.detector.record(&s.id(b), false, now);
    node.detector.record(&s.id(b), false, now);
    s.c.net.down(&s.id(b));
    // Slow, but well within the stand-in delay (500 ms).
    s.c.net.delay(&s.id(a), &s.id(c), Duration::from_millis(40));
    s.c.net.delay(&s.id(c), &s.id(a), Duration::from_millis(40));
    let r = s.c.get(a, KEY, Quorum).await;
    assert_eq!(values(&r), ["v2"], "{r:?}");
    assert!(stand_ins(&r).is_empty(), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_speculative_retry_does_not_replace_a_slow_owner_by_a_stand_in() {
    a_slow_owner_is_waited_for_rather_than_replaced(0.0).await;
}

#[tokio::test(start_paused = true)]
async fn a_full_read_turn_asks_no_stand_in_for_an_owner_believed_down() {
    a_slow_owner_is_waited_for_rather_than_replaced(1.0).await;
}

/// A strict read uses no stand-ins, so its speculative retry asks a spare
/// believed down itself (the detector may be wrong) rather than wait for
/// the silent owner until the deadline.
#[tokio::test(start_paused = true)]
async fn a_strict_read_asks_a_spare_believed_down_itself() {
    let s = story(SimOptions::default());
    let (a, b, c) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    assert!(matches!(
        s.c.put(a, KEY, "v", All, None).await,
        Response::Put(_)
    ));
    // a wrongly believes b down; c goes silent.
    let now = tokio::time::Instant::now();
    let node = s.c.node(a);
    node.detector.record(&s.id(b), false, now);
    node.detector.record(&s.id(b), false, now);
    s.c.net.down(&s.id(c));
    let mut request = ringkv_core::wire::GetRequest::new(KEY, Quorum);
    request.strict = true;
    let started = tokio::time::Instant::now();
    let r = node.coordinator.get(request).await;
    assert_eq!(values(&r), ["v"], "{r:?}");
    assert!(stand_ins(&r).is_empty(), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
}

/// A node that is draining answers every request `NotServing` and every
/// probe too. The probes count it down even while writes keep going to
/// it: its refusals prove the process runs, not that it serves, so they
/// must not count it up again (before, each one reset the probes' misses
/// and it was never seen down under traffic).
#[tokio::test(start_paused = true)]
async fn a_draining_owner_is_seen_down_under_traffic() {
    let s = story(with_probes());
    let (coordinator, draining) = (s.owners[0].clone(), s.id(&s.owners[1]));
    s.c.net.fail_with(&draining, ErrorKind::NotServing);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut i, mut context) = (0, None);
    while s.c.node(&coordinator).detector.is_up(&draining) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{draining} never seen down"
        );
        // Writes keep coming: a put every 20 ms, each to the draining owner
        // (each superseding the last, so no siblings pile up).
        let put =
            s.c.put(&coordinator, KEY, &format!("v{i}"), Quorum, context)
                .await;
        let Response::Put(reply) = put else {
            panic!("{put:?}")
        };
        context = Some(reply.context);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down, the next write goes to a stand-in instead.
    let put = s.c.put(&coordinator, KEY, "after", Quorum, None).await;
    assert!(
        stand_ins(&put).contains(&(s.fallbacks[0].clone(), s.owners[1].clone())),
        "{put:?}"
    );
}

/// Puts at `All` through `owners[0]` in a story where `owners[2]` is really
/// down: the put fails after exactly `after`, naming `owners[2]` as timed
/// out. Returns its error.
async fn a_put_at_all_that_fails_after(s: &Story, after: Duration) -> ErrorReply {
    let owner = &s.owners[2];
    let started = tokio::time::Instant::now();
    let put = s.c.put(&s.owners[0], KEY, "v2", All, None).await;
    assert_eq!(started.elapsed(), after, "{put:?}");
    let Response::Error(e) = put else {
        panic!("{put:?}")
    };
    assert_eq!(e.kind, ErrorKind::QuorumNotReached);
    assert!(
        e.message.contains(&format!("{owner} (timed out)")),
        "{}",
        e.message
    );
    e
}

/// How the fallbacks of the stories below fail.
#[derive(Clone, Copy)]
enum FallbacksFail {
    /// At once, answering `Overloaded`.
    Overloaded,
    /// By never answering (crashed, though believed up).
    Silent,
}

/// The coordinator believes `owners[2]` down, but it is up; both fallbacks
/// answer `Overloaded`. A story for the tests below, which read or write
/// at `All` through `owners[0]`.
async fn an_owner_wrongly_believed_down_and_failing_fallbacks(owner_really_down: bool) -> Story {
    an_owner_wrongly_believed_down_and_fallbacks_that(FallbacksFail::Overloaded, owner_really_down)
        .await
}

async fn an_owner_wrongly_believed_down_and_fallbacks_that(
    fail: FallbacksFail,
    owner_really_down: bool,
) -> Story {
    let s = story(SimOptions::default());
    let (coordinator, owner) = (&s.owners[0], &s.owners[2]);
    let put = s.c.put(coordinator, KEY, "v1", All, None).await;
    assert!(stand_ins(&put).is_empty(), "{put:?}");
    let node = s.c.node(coordinator);
    let now = tokio::time::Instant::now();
    node.detector.record(&s.id(owner), false, now);
    node.detector.record(&s.id(owner), false, now);
    assert!(!node.detector.is_up(&s.id(owner)));
    if owner_really_down {
        s.c.net.down(&s.id(owner));
    }
    for fallback in &s.fallbacks {
        match fail {
            FallbacksFail::Overloaded => s.c.net.overload(&s.id(fallback)),
            FallbacksFail::Silent => s.c.net.down(&s.id(fallback)),
        }
    }
    s.c.net.take_log();
    s
}

/// A stand-in that hangs fails its slot as surely as one that refuses:
/// once it has been silent as long as a silent owner gets (a quarter of
/// the 2 s deadline), the owner believed down is asked after all, and the
/// write succeeds then instead of failing at the deadline.
#[tokio::test(start_paused = true)]
async fn a_write_whose_stand_in_is_silent_asks_the_owner_believed_down() {
    let s = an_owner_wrongly_believed_down_and_fallbacks_that(FallbacksFail::Silent, false).await;
    let (coordinator, owner) = (&s.owners[0], &s.owners[2]);
    let started = tokio::time::Instant::now();
    let put = s.c.put(coordinator, KEY, "v2", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(500), "{put:?}");
    assert_eq!(s.c.local_values(owner, KEY), ["v1", "v2"]);
    let log = s.c.net.take_log();
    let hint = log
        .iter()
        .position(|l| {
            l.starts_with(&format!(
                "{coordinator} -> {} Hint for {owner}",
                s.fallbacks[0]
            ))
        })
        .unwrap_or_else(|| panic!("the stand-in was not tried first: {log:?}"));
    let sync = log
        .iter()
        .position(|l| l.starts_with(&format!("{coordinator} -> {owner} Sync")))
        .unwrap_or_else(|| panic!("the owner was never asked: {log:?}"));
    assert!(hint < sync, "{log:?}");
}

/// The same for a read at `All`, which has no spare to ask and so no
/// other reason to look at the clock before its deadline.
#[tokio::test(start_paused = true)]
async fn a_read_whose_stand_in_is_silent_asks_the_owner_believed_down() {
    let s = an_owner_wrongly_believed_down_and_fallbacks_that(FallbacksFail::Silent, false).await;
    let started = tokio::time::Instant::now();
    let get = s.c.get(&s.owners[0], KEY, All).await;
    assert_eq!(values(&get), ["v1"], "{get:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(500), "{get:?}");
}

/// When the owner is really down too, asking it costs what a silent owner
/// costs: the write still fails, at its deadline as before, naming both.
#[tokio::test(start_paused = true)]
async fn a_silent_stand_in_and_an_owner_really_down_fail_at_the_deadline() {
    let s = an_owner_wrongly_believed_down_and_fallbacks_that(FallbacksFail::Silent, true).await;
    let owner = &s.owners[2];
    let e = a_put_at_all_that_fails_after(&s, Duration::from_secs(2)).await;
    assert!(
        e.message
            .contains(&format!("{} for {owner} (timed out)", s.fallbacks[0])),
        "{}",
        e.message
    );
}

/// Stand-ins first, as the owner is believed down; when they all fail, the
/// owner itself, since the failure detector may be wrong.
#[tokio::test(start_paused = true)]
async fn a_write_whose_stand_ins_fail_asks_the_owner_believed_down() {
    let s = an_owner_wrongly_believed_down_and_failing_fallbacks(false).await;
    let (coordinator, owner) = (&s.owners[0], &s.owners[2]);
    let put = s.c.put(coordinator, KEY, "v2", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert!(stand_ins(&put).is_empty(), "{put:?}");
    let owner_outcome = receipt(&put)
        .replicas
        .iter()
        .find(|o| o.node.as_str() == owner.as_str())
        .map(|o| o.outcome);
    assert_eq!(owner_outcome, Some(Outcome::Ok), "{put:?}");
    assert_eq!(
        s.c.local_values(owner, KEY),
        ["v1", "v2"],
        "v2 has no context"
    );
    let log = s.c.net.take_log();
    let first_owner_send = log
        .iter()
        .position(|l| l.starts_with(&format!("{coordinator} -> {owner} Sync")))
        .unwrap_or_else(|| panic!("the owner was never asked: {log:?}"));
    for fallback in &s.fallbacks {
        let hint = log
            .iter()
            .position(|l| l.starts_with(&format!("{coordinator} -> {fallback} Hint for {owner}")));
        assert!(
            hint.is_some_and(|h| h < first_owner_send),
            "{fallback} was tried first: {log:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_read_whose_stand_ins_fail_asks_the_owner_believed_down() {
    let s = an_owner_wrongly_believed_down_and_failing_fallbacks(false).await;
    let get = s.c.get(&s.owners[0], KEY, All).await;
    assert_eq!(values(&get), ["v1"], "{get:?}");
    assert!(stand_ins(&get).is_empty(), "{get:?}");
}

/// An owner that is really down gets what a silent owner gets before a
/// stand-in, a quarter of the 2 s deadline, so the write fails then rather
/// than at the deadline; the error names each failure.
#[tokio::test(start_paused = true)]
async fn an_owner_asked_after_its_stand_ins_failed_is_waited_for_briefly() {
    let s = an_owner_wrongly_believed_down_and_failing_fallbacks(true).await;
    let owner = &s.owners[2];
    let e = a_put_at_all_that_fails_after(&s, Duration::from_millis(500)).await;
    for fallback in &s.fallbacks {
        assert!(
            e.message.contains(&format!("{fallback} for {owner} (")),
            "{}",
            e.message
        );
    }
}

/// R=2 with both peers believed down: `owners[1]` wrongly, `owners[2]`
/// rightly. The read asks `owners[1]` through the first fallback and keeps
/// `owners[2]` as a spare; when the fallback fails, the spare goes to the
/// second fallback, the last, so `owners[1]` is asked after all as well,
/// and answers.
#[tokio::test(start_paused = true)]
async fn a_read_asks_an_owner_held_back_even_when_a_spare_took_its_stand_ins_place() {
    let s = an_owner_wrongly_believed_down_and_failing_fallbacks(false).await;
    let (coordinator, wrongly, rightly) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    let node = s.c.node(coordinator);
    let now = tokio::time::Instant::now();
    node.detector.record(&s.id(wrongly), false, now);
    node.detector.record(&s.id(wrongly), false, now);
    s.c.net.down(&s.id(rightly));
    let started = tokio::time::Instant::now();
    let get = s.c.get(coordinator, KEY, Quorum).await;
    assert_eq!(values(&get), ["v1"], "{get:?}");
    assert_eq!(started.elapsed(), Duration::ZERO, "{get:?}");
    let log = s.c.net.take_log();
    let first_read_for = |owner: &str| {
        log.iter()
            .position(|l| l.contains(&format!("Read for {owner}")))
            .unwrap_or_else(|| panic!("no stand-in read for {owner}: {log:?}"))
    };
    assert!(
        first_read_for(wrongly) < first_read_for(rightly),
        "the spare took the first stand-in's place: {log:?}"
    );
}

/// W=2 is met by the coordinator and `owners[1]` before the stand-ins for
/// `owners[2]` (wrongly believed down) fail; after the answer, the late
/// task tries the fallback left, then the owner itself, which takes it,
/// and whose answer shows the failure detector that it is up.
#[tokio::test(start_paused = true)]
async fn after_the_quorum_an_owner_held_back_is_asked_when_its_stand_ins_fail() {
    let s = an_owner_wrongly_believed_down_and_failing_fallbacks(false).await;
    let (coordinator, owner) = (&s.owners[0], &s.owners[2]);
    for fallback in &s.fallbacks {
        s.c.net.delay(
            &s.id(coordinator),
            &s.id(fallback),
            Duration::from_millis(10),
        );
    }
    let put = s.c.put(coordinator, KEY, "v2", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert!(
        !s.c.local_values(owner, KEY).contains(&"v2".to_string()),
        "not asked before the answer"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !s.c.local_values(owner, KEY).contains(&"v2".to_string()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the owner never got the write: {:?}",
            s.c.net.take_log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        s.c.node(coordinator).detector.is_up(&s.id(owner)),
        "its answer told the detector it is up"
    );
}

/// A read's spare, wrongly believed down, gets its stand-in only at
/// `after`, once an asked owner has been silent that long (it crashed
/// unnoticed); the stand-in hangs too. The spare is asked after all once
/// its stand-in has been silent as long as a first one gets, and answers:
/// the read succeeds at twice `after`, not failing at the deadline.
#[tokio::test(start_paused = true)]
async fn a_read_asks_an_owner_held_back_behind_a_stand_in_sent_late() {
    let s = story(SimOptions::default());
    let (coordinator, crashed, wrongly) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    let put = s.c.put(coordinator, KEY, "v1", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    let node = s.c.node(coordinator);
    let now = tokio::time::Instant::now();
    node.detector.record(&s.id(wrongly), false, now);
    node.detector.record(&s.id(wrongly), false, now);
    s.c.net.down(&s.id(crashed));
    s.c.net.down(&s.id(&s.fallbacks[0]));
    s.c.net.take_log();
    let started = tokio::time::Instant::now();
    let get = s.c.get(coordinator, KEY, Quorum).await;
    assert_eq!(values(&get), ["v1"], "{get:?} {:?}", s.c.net.take_log());
    assert_eq!(started.elapsed(), Duration::from_millis(1000), "{get:?}");
}

/// Six nodes (three fallbacks), "v1" written everywhere; then
/// `owners[0]`, the coordinator, believes `owners[1]` and `owners[2]`
/// down; the first is up, the second is down.
async fn six_nodes_two_owners_believed_down() -> Story {
    let s = story_of(6, SimOptions::default());
    assert_eq!(s.fallbacks.len(), 3);
    let (coordinator, up, down) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    let put = s.c.put(coordinator, KEY, "v1", All, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    let node = s.c.node(coordinator);
    let now = tokio::time::Instant::now();
    for owner in [up, down] {
        node.detector.record(&s.id(owner), false, now);
        node.detector.record(&s.id(owner), false, now);
    }
    s.c.net.down(&s.id(down));
    s
}

/// Six nodes: the coordinator believes `owners[1]` and `owners[2]` down;
/// the first is up, the second down, and every fallback refuses
/// (`Overloaded`). `owners[1]`'s stand-in fails first, while fallbacks
/// are left, and the spare `owners[2]` takes them all; once none is left,
/// `owners[1]` is asked after all too, and the read succeeds.
#[tokio::test(start_paused = true)]
async fn a_read_asks_every_owner_held_back_once_no_stand_in_is_left() {
    let s = six_nodes_two_owners_believed_down().await;
    let (coordinator, up, down) = (&s.owners[0], &s.owners[1], &s.owners[2]);
    for fallback in &s.fallbacks {
        s.c.net.overload(&s.id(fallback));
    }
    s.c.net.take_log();
    let get = s.c.get(coordinator, KEY, Quorum).await;
    let log = s.c.net.take_log();
    assert_eq!(values(&get), ["v1"], "{get:?} {log:?}");
    // The story needs `up` read first, through a stand-in, and `down` as
    // the spare that takes the fallbacks left.
    let first_read_for = |owner: &str| {
        log.iter()
            .position(|l| l.contains(&format!("Read for {owner}")))
            .unwrap_or_else(|| panic!("no stand-in read for {owner}: {log:?}"))
    };
    assert!(first_read_for(up) < first_read_for(down), "{log:?}");
}

/// Six nodes, as above, but only the first fallback refuses; the second
/// hangs and the third is healthy. `owners[1]`'s stand-in fails while the
/// spare `owners[2]` takes the second fallback: `owners[1]`'s slot, left
/// uncovered, gets the third at once, and the read succeeds without
/// waiting out the hanging one.
#[tokio::test(start_paused = true)]
async fn an_owner_held_back_whose_stand_in_failed_gets_a_fallback_left() {
    let s = six_nodes_two_owners_believed_down().await;
    let coordinator = &s.owners[0];
    s.c.net.overload(&s.id(&s.fallbacks[0]));
    s.c.net.down(&s.id(&s.fallbacks[1]));
    s.c.net.take_log();
    let started = tokio::time::Instant::now();
    let get = s.c.get(coordinator, KEY, Quorum).await;
    let log = s.c.net.take_log();
    assert_eq!(values(&get), ["v1"], "{get:?} {log:?}");
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("{} Read for", s.fallbacks[2]))),
        "the third fallback stood in: {log:?}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO, "{get:?} {log:?}");
}

/// Cuts `coordinator` off from every owner and waits until it knows.
async fn cut_off_from_every_owner(s: &Story, coordinator: &str) {
    for owner in &s.owners {
        s.c.net.partition(&s.id(coordinator), &s.id(owner));
    }
    for owner in &s.owners {
        s.until_seen(coordinator, owner, false).await;
    }
}

/// The actors of `holder`'s clock in its hint for `owner`, with counters.
fn hint_actors(s: &Story, holder: &str, owner: &str) -> Vec<(String, u64)> {
    let clock =
        s.c.node(holder)
            .hints
            .read(&s.id(owner), KEY.as_bytes())
            .unwrap()
            .expect("a hint is held");
    clock
        .context()
        .iter()
        .map(|(actor, counter)| (actor.to_string(), counter))
        .collect()
}

/// Checks that `from` forwarded a put to `to` since the log was last taken.
fn forwarded(s: &Story, from: &str, to: &str) {
    assert!(
        s.c.net.take_log().contains(&format!("{from} -> {to} Put")),
        "{from} did not forward the put to {to}"
    );
}

fn context_of(r: &Response) -> String {
    match r {
        Response::Put(p) => p.context.clone(),
        other => panic!("not a put's answer: {other:?}"),
    }
}

/// Dynamo's sloppy quorum takes a write on the first healthy nodes of the
/// preference list even when every owner is unreachable: the coordinator
/// (not a replica) mints it on its hint for the first owner, and the next
/// healthy fallback holds it for the second. Writes through it continue
/// one actor while it holds the hint, and the owners get them after the
/// heal beside what they held, which the client never saw.
#[tokio::test(start_paused = true)]
async fn a_coordinator_cut_off_from_every_owner_takes_the_write_as_their_stand_in() {
    let s = story(with_probes());
    let written = s.c.put(&s.owners[0], KEY, "before", All, None).await;
    assert!(matches!(written, Response::Put(_)), "{written:?}");
    let coordinator = &s.fallbacks[0];
    cut_off_from_every_owner(&s, coordinator).await;
    // A stray copy of the coordinator's own is never built on.
    s.c.node(coordinator)
        .replica
        .sync(KEY.as_bytes(), &{
            let mut stray = ringkv_core::dvv::Clock::default();
            stray.update(
                &Default::default(),
                ringkv_core::dvv::Payload::Value(b"stray".to_vec()),
                &s.id("old-actor"),
            );
            stray
        })
        .unwrap();

    let first = s.c.put(coordinator, KEY, "v1", Quorum, None).await;
    assert!(matches!(first, Response::Put(_)), "{first:?}");
    assert_eq!(
        stand_ins(&first),
        [
            (coordinator.clone(), s.owners[0].clone()),
            (s.fallbacks[1].clone(), s.owners[1].clone()),
        ]
    );
    assert_eq!(s.hint(coordinator, &s.owners[0]), Some(vec!["v1".into()]));
    assert_eq!(
        s.hint(&s.fallbacks[1], &s.owners[1]),
        Some(vec!["v1".into()])
    );
    assert_eq!(
        s.c.local_values(coordinator, KEY),
        ["stray"],
        "its own copy is untouched"
    );
    // Reads go to the first healthy nodes too: the coordinator's own hint
    // for the first owner among them.
    let get = s.c.get(coordinator, KEY, Quorum).await;
    assert_eq!(values(&get), ["v1"], "{get:?}");
    assert!(
        stand_ins(&get).contains(&(coordinator.clone(), s.owners[0].clone())),
        "{get:?}"
    );

    // The next write, with the first's context, supersedes it under the
    // same actor: one actor of the coordinator's per hint, not per write.
    let second =
        s.c.put(coordinator, KEY, "v2", Quorum, Some(context_of(&first)))
            .await;
    assert!(matches!(second, Response::Put(_)), "{second:?}");
    assert_eq!(s.hint(coordinator, &s.owners[0]), Some(vec!["v2".into()]));
    let actors = hint_actors(&s, coordinator, &s.owners[0]);
    assert_eq!(actors.len(), 1, "{actors:?}");
    assert!(
        actors[0].0.starts_with(&format!("{coordinator}.")) && actors[0].1 == 2,
        "{actors:?}"
    );
    // --strict counts only the owners, so it still fails.
    let strict = s.c.put_strict(coordinator, KEY, "v3", Quorum, None).await;
    assert!(
        matches!(&strict, Response::Error(e) if e.kind == ErrorKind::Unavailable),
        "{strict:?}"
    );

    s.c.net.heal();
    s.until_no_hints(Duration::from_secs(30)).await;
    // "before" was not in the context the stand-in was given, so it stays
    // beside the new value; "v1" is superseded, "stray" never left.
    for owner in &s.owners[..2] {
        assert_eq!(s.c.local_values(owner, KEY), ["before", "v2"], "on {owner}");
    }
    let get = s.c.get_with(&s.owners[0], KEY, All, true).await;
    assert_eq!(values(&get), ["before", "v2"]);
    assert_eq!(s.c.local_values(&s.owners[2], KEY), ["before", "v2"]);

    // The hint was delivered and removed with its actor: the next time,
    // a new one.
    cut_off_from_every_owner(&s, coordinator).await;
    let third = s.c.put(coordinator, KEY, "v3", Quorum, None).await;
    assert!(matches!(third, Response::Put(_)), "{third:?}");
    let again = hint_actors(&s, coordinator, &s.owners[0]);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0].0, actors[0].0, "a new hint, a new actor");
    assert_eq!(again[0].1, 1);
}

/// An overwrite through a stand-in supersedes only what the stand-in
/// holds: the owners' value it never saw comes back beside it.
#[tokio::test(start_paused = true)]
async fn an_overwrite_through_a_stand_in_leaves_the_owners_values_as_siblings() {
    use ringkv_core::dvv::Payload;
    use ringkv_core::wire::PutRequest;
    let s = story(with_probes());
    let written = s.c.put(&s.owners[0], KEY, "before", All, None).await;
    assert!(matches!(written, Response::Put(_)), "{written:?}");
    let coordinator = &s.fallbacks[0];
    cut_off_from_every_owner(&s, coordinator).await;
    let overwrite = |value: &str| PutRequest {
        overwrite: true,
        ..PutRequest::new(KEY, Payload::Value(value.as_bytes().to_vec()), Quorum, None)
    };
    for value in ["o1", "o2"] {
        let put =
            s.c.node(coordinator)
                .coordinator
                .put(overwrite(value))
                .await;
        assert!(matches!(put, Response::Put(_)), "{put:?}");
    }
    assert_eq!(s.hint(coordinator, &s.owners[0]), Some(vec!["o2".into()]));
    s.c.net.heal();
    s.until_no_hints(Duration::from_secs(30)).await;
    assert_eq!(s.c.local_values(&s.owners[0], KEY), ["before", "o2"]);
}

/// With no failure detector's word that every owner is down, the
/// coordinator forwards as before: one it cannot reach may still be up.
#[tokio::test(start_paused = true)]
async fn a_coordinator_that_has_not_seen_the_owners_down_forwards() {
    let s = story(SimOptions::default());
    let coordinator = &s.fallbacks[0];
    for owner in &s.owners {
        s.c.net.partition(&s.id(coordinator), &s.id(owner));
    }
    let put = s.c.put(coordinator, KEY, "v", Quorum, None).await;
    assert!(
        matches!(&put, Response::Error(e) if e.kind == ErrorKind::Unavailable
            && e.message.contains("no replica of this key could be reached")),
        "{put:?}"
    );
    assert_eq!(s.c.hints_pending(), 0);
    let get = s.c.get(coordinator, KEY, Quorum).await;
    assert!(
        matches!(&get, Response::Error(e) if e.kind == ErrorKind::Unavailable),
        "{get:?}"
    );
}

/// Every coordinator on one side of a partition places a key's writes
/// alike, and reads them where it placed them: one that is not the first
/// healthy fallback forwards to that one, which stands in for the first
/// owner, and the next holds the hint for the second.
#[tokio::test(start_paused = true)]
async fn a_coordinator_behind_another_fallback_forwards_to_the_first() {
    let s = story(with_probes());
    let (first, second) = (&s.fallbacks[0], &s.fallbacks[1]);
    cut_off_from_every_owner(&s, first).await;
    cut_off_from_every_owner(&s, second).await;
    let put = s.c.put(second, KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(receipt(&put).coordinator.as_ref(), Some(&s.id(first)));
    let placed = vec![
        (first.clone(), s.owners[0].clone()),
        (second.clone(), s.owners[1].clone()),
    ];
    assert_eq!(stand_ins(&put), placed);
    for via in [first, second] {
        let get = s.c.get(via, KEY, Quorum).await;
        assert_eq!(values(&get), ["v"], "via {via}");
        assert_eq!(stand_ins(&get), placed, "via {via}");
    }
}

/// A detector that is wrong about every owner (they are up, the
/// coordinator's view is what failed) makes the write a hint all the same:
/// it is acknowledged, and reaches the owners once the coordinator sees
/// them up again (its probes do at once here).
#[tokio::test(start_paused = true)]
async fn owners_wrongly_believed_down_get_the_write_through_the_hint() {
    let s = story(with_probes());
    let written = s.c.put(&s.owners[0], KEY, "before", All, None).await;
    let coordinator = &s.fallbacks[0];
    for owner in &s.owners {
        let detector = &s.c.node(coordinator).detector;
        let now = tokio::time::Instant::now();
        detector.record(&s.id(owner), false, now);
        detector.record(&s.id(owner), false, now);
        assert!(!detector.is_up(&s.id(owner)));
    }
    let read = s.c.get(&s.owners[0], KEY, All).await;
    let context = match &read {
        Response::Get(g) => g.context.clone(),
        other => panic!("{other:?} after {written:?}"),
    };
    let put =
        s.c.put(coordinator, KEY, "after", Quorum, Some(context))
            .await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(
        stand_ins(&put)[0],
        (coordinator.clone(), s.owners[0].clone())
    );
    s.until_no_hints(Duration::from_secs(30)).await;
    // With the read's context, "after" replaced "before" on the owners.
    assert_eq!(s.c.local_values(&s.owners[0], KEY), ["after"]);
}

/// A fallback before the coordinator that does not take the request (it
/// sees an owner up, so it refuses a forwarded one) leaves it to the
/// coordinator, which stands in itself.
#[tokio::test(start_paused = true)]
async fn a_first_fallback_that_sees_an_owner_up_leaves_the_stand_in_to_the_next() {
    let s = story(with_probes());
    let (first, second) = (&s.fallbacks[0], &s.fallbacks[1]);
    cut_off_from_every_owner(&s, second).await;
    s.c.net.take_log();
    let put = s.c.put(second, KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    forwarded(&s, second, first);
    assert_eq!(s.hint(first, &s.owners[0]), None, "and refused");
    assert_eq!(receipt(&put).coordinator.as_ref(), Some(&s.id(second)));
    assert_eq!(
        stand_ins(&put),
        [
            (second.clone(), s.owners[0].clone()),
            (first.clone(), s.owners[1].clone()),
        ]
    );
    assert_eq!(s.hint(second, &s.owners[0]), Some(vec!["v".into()]));
}

/// A first fallback that died unnoticed may have taken the write before
/// it fell silent, and a read through the coordinator would not see that
/// copy: the request fails (where a forward to replicas would move on)
/// and stores nothing on the coordinator, until the coordinator sees the
/// fallback down and stands in.
#[tokio::test(start_paused = true)]
async fn a_first_fallback_gone_unnoticed_fails_the_request_until_seen_down() {
    let s = story(with_probes());
    let (first, second) = (&s.fallbacks[0], &s.fallbacks[1]);
    cut_off_from_every_owner(&s, second).await;
    // Dead, and the probes have not told the coordinator yet.
    s.c.net.down(&s.id(first));
    let started = tokio::time::Instant::now();
    let put = s.c.put(second, KEY, "v", One, None).await;
    // It had all the time, not a share of it.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(
        matches!(&put, Response::Error(e) if e.kind == ErrorKind::Unavailable
            && e.message.contains("no stand-in for this key's replicas")
            && e.message.contains(first.as_str())),
        "{put:?}"
    );
    assert_eq!(s.c.hints_pending(), 0, "nothing stored");
    s.until_seen(second, first, false).await;
    let put = s.c.put(second, KEY, "v", One, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(stand_ins(&put), [(second.clone(), s.owners[0].clone())]);
}

/// A first fallback whose hints for the first owner are full stores
/// nothing and says so, and the coordinator stands in itself.
#[tokio::test(start_paused = true)]
async fn a_first_fallback_whose_hints_are_full_leaves_the_stand_in_to_the_next() {
    let s = story(SimOptions {
        hint_max_per_target: 1,
        ..with_probes()
    });
    let (first, second) = (&s.fallbacks[0], &s.fallbacks[1]);
    cut_off_from_every_owner(&s, first).await;
    cut_off_from_every_owner(&s, second).await;
    let mut other = ringkv_core::dvv::Clock::default();
    other.update(
        &Default::default(),
        ringkv_core::dvv::Payload::Value(b"x".to_vec()),
        &s.id("w"),
    );
    s.c.node(first)
        .hints
        .store(&s.id(&s.owners[0]), b"another key", &other)
        .unwrap();
    s.c.net.take_log();
    let put = s.c.put(second, KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    forwarded(&s, second, first);
    assert_eq!(s.hint(first, &s.owners[0]), None, "and stored nothing");
    assert_eq!(
        stand_ins(&put),
        [
            (second.clone(), s.owners[0].clone()),
            (first.clone(), s.owners[1].clone()),
        ]
    );
    // A read through the coordinator goes to the first fallback, which
    // takes reads: it finds the write among its hints for the second owner.
    let get = s.c.get(second, KEY, Quorum).await;
    assert_eq!(values(&get), ["v"], "{get:?}");
}

/// A first fallback that sheds load is still up, and reads through any
/// node go to it: a stand-in after it would put the write where those
/// reads do not look. So it is not passed over: the request fails as
/// overloaded (the client retries later), stores nothing, and goes through
/// once the first fallback takes requests again.
#[tokio::test(start_paused = true)]
async fn a_first_fallback_that_sheds_load_is_not_passed_over() {
    let s = story(with_probes());
    let (first, second) = (&s.fallbacks[0], &s.fallbacks[1]);
    cut_off_from_every_owner(&s, first).await;
    cut_off_from_every_owner(&s, second).await;
    s.c.net.overload(&s.id(first));
    let put = s.c.put(second, KEY, "v", Quorum, None).await;
    assert!(
        matches!(&put, Response::Error(e) if e.kind == ErrorKind::Overloaded),
        "{put:?}"
    );
    assert_eq!(s.c.hints_pending(), 0, "nothing stored");
    s.c.net.up(&s.id(first));
    let put = s.c.put(second, KEY, "v", Quorum, None).await;
    assert!(matches!(put, Response::Put(_)), "{put:?}");
    assert_eq!(receipt(&put).coordinator.as_ref(), Some(&s.id(first)));
    for via in [first, second] {
        let get = s.c.get(via, KEY, Quorum).await;
        assert_eq!(values(&get), ["v"], "via {via}");
    }
}

/// A delete through a stand-in removes what the client's context names,
/// here a value written before the partition that the client had read:
/// after the heal the owners hold the tombstone, and the key reads as
/// deleted.
#[tokio::test(start_paused = true)]
async fn a_delete_through_a_stand_in_removes_what_its_context_names() {
    use ringkv_core::wire::PutRequest;
    use ringkv_core::Payload;
    let s = story(with_probes());
    let written = s.c.put(&s.owners[0], KEY, "before", All, None).await;
    assert!(matches!(written, Response::Put(_)), "{written:?}");
    let Response::Get(read) = s.c.get(&s.owners[0], KEY, All).await else {
        panic!("read failed");
    };
    let coordinator = &s.fallbacks[0];
    cut_off_from_every_owner(&s, coordinator).await;
    let delete = PutRequest::new(KEY, Payload::Tombstone, Quorum, Some(read.context));
    let deleted = s.c.node(coordinator).coordinator.put(delete).await;
    assert!(matches!(deleted, Response::Put(_)), "{deleted:?}");
    // Through the stand-in, nothing is left to read.
    assert!(values(&s.c.get(coordinator, KEY, Quorum).await).is_empty());

    s.c.net.heal();
    s.until_no_hints(Duration::from_secs(30)).await;
    let get = s.c.get_with(&s.owners[0], KEY, All, true).await;
    assert!(values(&get).is_empty(), "{get:?}");
    for owner in &s.owners {
        assert!(s.c.local_values(owner, KEY).is_empty(), "on {owner}");
    }
}

/// A first fallback that failed the request may have stored the write
/// before it failed: the request fails at once, and the next fallback (up,
/// and before the coordinator) is not asked to store it again.
#[tokio::test(start_paused = true)]
async fn a_failing_first_fallback_ends_the_request_before_the_next_is_asked() {
    let s = story_of(6, with_probes());
    let (first, next, coordinator) = (&s.fallbacks[0], &s.fallbacks[1], &s.fallbacks[2]);
    for node in [first, next, coordinator] {
        cut_off_from_every_owner(&s, node).await;
    }
    s.c.net.refuse(&s.id(first));
    s.c.net.take_log();
    let put = s.c.put(coordinator, KEY, "v", One, None).await;
    assert!(
        matches!(&put, Response::Error(e) if e.kind == ErrorKind::Unavailable
            && e.message.contains(first.as_str())),
        "{put:?}"
    );
    let not_asked = |what: &str| {
        let log = s.c.net.take_log();
        assert!(
            !log.iter()
                .any(|l| l.starts_with(&format!("{coordinator} -> {next} Put"))),
            "{what}: {log:?}"
        );
        assert_eq!(s.c.hints_pending(), 0, "{what}: nothing stored");
    };
    not_asked("failing");
    // Silent instead: it gets all the time, not a share with some left for
    // the next, who is not asked either.
    s.c.net.up(&s.id(first));
    s.c.net.down(&s.id(first));
    let started = tokio::time::Instant::now();
    let put = s.c.put(coordinator, KEY, "v", One, None).await;
    assert!(matches!(&put, Response::Error(_)), "{put:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    not_asked("silent");
}
