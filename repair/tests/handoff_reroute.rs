//! The hints held for an owner removed from the cluster are not dropped:
//! the handoff worker sends each to every replica of its key under the
//! current ring; a replica that cannot take it gets a hint of its own, as
//! old as the first, and only then is the removed owner's hint removed.
//! While the owner is merely down, its hints wait for it as before, except
//! those whose key moved away from it, which go to the key's replicas.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringkv_core::wire::{ErrorKind, ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport, TransportError};
use ringkv_repair::handoff::{self, HandoffConfig, HintRouting};
use ringkv_repair::hints::{HintConfig, MemHintBackend};
use ringkv_repair::{HintBook, HintStore};

mod support;
use support::write;

fn n(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

/// Replicas that take every `Sync` except those sent to a node in `down`
/// (unreachable) or `declining` (refused as invalid: the merge would pass a
/// per-key limit), and remember which node took which key.
#[derive(Default)]
struct Replicas {
    down: Mutex<HashSet<NodeId>>,
    /// Never answer (a hung process, a partition that drops silently).
    hung: HashSet<NodeId>,
    declining: HashSet<NodeId>,
    taken: Mutex<BTreeSet<(String, String)>>,
}

impl Transport for Replicas {
    async fn call(&self, to: &NodeId, request: Request) -> Result<Response, TransportError> {
        if self.hung.contains(to) {
            std::future::pending::<()>().await;
        }
        if self.down.lock().unwrap().contains(to) {
            return Err(TransportError::Unreachable {
                node: to.clone(),
                reason: "connection refused".to_string(),
            });
        }
        if self.declining.contains(to) {
            return Ok(Response::error(
                ErrorKind::InvalidRequest,
                "the key's history would name 120 actors, over the limit of 100",
            ));
        }
        match request {
            Request::Replica(ReplicaRequest::Handoff { key, clock }) => {
                let key = String::from_utf8(key).unwrap();
                self.taken.lock().unwrap().insert((to.to_string(), key));
                Ok(Response::Clock(Some(clock)))
            }
            other => panic!("a handoff sends only Sync, not {other:?}"),
        }
    }
}

impl Replicas {
    fn taken(&self) -> Vec<(String, String)> {
        self.taken.lock().unwrap().iter().cloned().collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_removed_owners_hints_go_to_every_replica_of_their_keys() {
    let now_ms = Arc::new(AtomicU64::new(1_000_000));
    let book = Arc::new(
        HintBook::open(MemHintBackend::default(), HintConfig::default(), {
            let now_ms = now_ms.clone();
            Arc::new(move || now_ms.load(Ordering::SeqCst))
        })
        .unwrap(),
    );
    for key in ["k1", "k2", "k3"] {
        book.store(&n("gone"), key.as_bytes(), &write(key)).unwrap();
    }
    book.store(&n("member"), b"m", &write("m")).unwrap();

    let transport = Arc::new(Replicas::default());
    transport.down.lock().unwrap().insert(n("b"));
    let removed = Arc::new(AtomicBool::new(false));
    let is_removed = removed.clone();
    let routing = HintRouting::to_owners(Arc::new(|node: &NodeId| node.as_str() != "gone"))
        .rerouting_removed(
            n("me"),
            Arc::new(move |node: &NodeId| {
                node.as_str() == "gone" && is_removed.load(Ordering::SeqCst)
            }),
            // k1's replicas are a and b, m's member and a, the others' a and c.
            Arc::new(|key: &[u8]| match key {
                b"k1" => vec![n("a"), n("b")],
                b"m" => vec![n("member"), n("a")],
                _ => vec![n("a"), n("c")],
            }),
        );
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(1),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);

    // Down but a member: its hints wait for it; a member that is up gets its own.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(book.pending(&n("gone")), 3);
    assert_eq!(book.pending(&n("member")), 0);
    assert_eq!(transport.taken(), [("member".into(), "m".into())]);

    // Removed: each hint goes to its key's replicas. b, one of k1's, cannot
    // take it: it gets a hint of its own, as old as the first (written an
    // hour before now), and the removed owner's are all gone.
    now_ms.store(1_000_000 + 3_600_000, Ordering::SeqCst);
    removed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(book.pending(&n("gone")), 0);
    let for_b = book.batch(&n("b"), None, 10).unwrap();
    assert_eq!(for_b.len(), 1);
    assert_eq!(for_b[0].key, b"k1");
    assert_eq!(for_b[0].stored_at_ms, 1_000_000, "the hint keeps its age");

    // b is a member: once it answers, its hint is handed off as any other.
    transport.down.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(book.pending(&n("b")), 0);
    let expected: Vec<(String, String)> = [
        ("a", "k1"),
        ("a", "k2"),
        ("a", "k3"),
        ("b", "k1"),
        ("c", "k2"),
        ("c", "k3"),
        ("member", "m"),
    ]
    .iter()
    .map(|(to, key)| (to.to_string(), key.to_string()))
    .collect();
    assert_eq!(transport.taken(), expected, "each on exactly its replicas");

    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// A book holding hints for `owner` of keys `moved` and `kept`, and
/// replicas of which `b` is down.
fn moved_and_kept() -> (Arc<HintBook<MemHintBackend>>, Arc<Replicas>) {
    let book = support::book();
    for key in ["moved", "kept"] {
        book.store(&n("owner"), key.as_bytes(), &write(key))
            .unwrap();
    }
    let transport = Arc::new(Replicas::default());
    transport.down.lock().unwrap().insert(n("b"));
    (book, transport)
}

/// A member's hint for a key the ring no longer places on it (a node joined
/// and took its place) goes to the key's replicas, not to the member, which
/// would store a copy nothing looks at; a replica that cannot take it gets
/// a hint of its own. The member's hints for keys it still holds go to it,
/// and so do the hints of an owner this node's ring does not have yet (it
/// just joined): this node's ring is the older one.
#[tokio::test(start_paused = true)]
async fn a_hint_whose_key_moved_away_goes_to_the_keys_replicas() {
    let (book, transport) = moved_and_kept();
    let routing = HintRouting::to_owners(Arc::new(|_: &NodeId| true))
        .rerouting_removed(
            n("me"),
            Arc::new(|_: &NodeId| false),
            Arc::new(|key: &[u8]| match key {
                b"moved" => vec![n("a"), n("joiner"), n("b")],
                b"new" => vec![n("a"), n("b")],
                _ => vec![n("owner"), n("a")],
            }),
        )
        // "newcomer" joined, but this node's ring does not have it yet.
        .with_ring_members(Arc::new(|node: &NodeId| node.as_str() != "newcomer"));
    book.store(&n("newcomer"), b"new", &write("new")).unwrap();
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(book.pending(&n("owner")), 0);
    assert_eq!(
        book.pending(&n("newcomer")),
        0,
        "delivered to the newcomer itself, not rerouted"
    );
    let expected: Vec<(String, String)> = [
        ("a", "moved"),
        ("joiner", "moved"),
        ("newcomer", "new"),
        ("owner", "kept"),
    ]
    .iter()
    .map(|(to, key)| (to.to_string(), key.to_string()))
    .collect();
    assert_eq!(transport.taken(), expected);
    assert!(
        book.read(&n("b"), b"moved").unwrap().is_some(),
        "b, down, has its own hint"
    );

    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// A removed owner's round goes on past the hints it cannot hand on yet,
/// batch after batch: one that a replica declines (its merge would pass a
/// limit, until a client resolves the key) and another cannot take (down)
/// becomes a hint of each of theirs, not dropped; one that this node itself
/// failed to take is kept; one whose down replica is at its hint cap is
/// kept; and the next is handed on in the same round.
#[tokio::test(start_paused = true)]
async fn a_reroute_goes_on_past_the_hints_it_cannot_hand_on_yet() {
    let book = Arc::new(
        HintBook::open(
            MemHintBackend::default(),
            HintConfig {
                max_per_target: 4,
                ..HintConfig::default()
            },
            Arc::new(|| 1_000_000),
        )
        .unwrap(),
    );
    for key in ["z1", "z2", "z3", "z4"] {
        book.store(&n("full"), key.as_bytes(), &write(key)).unwrap();
    }
    for key in ["k1", "k2", "k3", "k4"] {
        book.store(&n("gone"), key.as_bytes(), &write(key)).unwrap();
    }
    let transport = Arc::new(Replicas {
        declining: HashSet::from([n("r")]),
        ..Replicas::default()
    });
    transport
        .down
        .lock()
        .unwrap()
        .extend([n("b"), n("me"), n("full")]);
    let routing = HintRouting::to_owners(Arc::new(|node: &NodeId| node.as_str() != "gone"))
        .rerouting_removed(
            n("me"),
            Arc::new(|node: &NodeId| node.as_str() == "gone"),
            Arc::new(|key: &[u8]| match key {
                b"k1" => vec![n("a"), n("r"), n("b")],
                b"k2" => vec![n("me"), n("a")],
                b"k3" => vec![n("a"), n("full")],
                z if z.starts_with(b"z") => vec![n("full"), n("a")],
                _ => vec![n("a"), n("c")],
            }),
        );
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        batch_size: 1,
        backoff_initial: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);
    // One round (the next is a minute away).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let left: Vec<Vec<u8>> = book
        .batch(&n("gone"), None, 10)
        .unwrap()
        .into_iter()
        .map(|h| h.key)
        .collect();
    assert_eq!(
        left,
        [b"k2".to_vec(), b"k3".to_vec()],
        "kept: this node failed, and full is at its cap"
    );
    assert!(
        book.read(&n("b"), b"k1").unwrap().is_some(),
        "b, down, has its own hint"
    );
    assert!(
        book.read(&n("r"), b"k1").unwrap().is_some(),
        "r, which declined it, has its own hint too"
    );
    assert_eq!(book.pending(&n("full")), 4, "nothing past the cap");
    assert!(
        transport
            .taken()
            .contains(&("c".to_string(), "k4".to_string())),
        "k4 was handed on in the same round: {:?}",
        transport.taken()
    );

    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// Between a removal being recorded and the ring without the removed owner
/// being installed, the ring still places its keys on it. Its hints are
/// then kept, not "handed on" to itself and dropped, and go to the keys'
/// replicas once the new ring is in.
#[tokio::test(start_paused = true)]
async fn a_removed_owners_hints_wait_for_the_ring_without_it() {
    let book = support::book();
    book.store(&n("gone"), b"k1", &write("k1")).unwrap();
    let transport = Arc::new(Replicas::default());
    transport.down.lock().unwrap().insert(n("gone"));
    let installed = Arc::new(AtomicBool::new(false));
    let ring_is_new = installed.clone();
    let routing = HintRouting::to_owners(Arc::new(|node: &NodeId| node.as_str() != "gone"))
        .rerouting_removed(
            n("me"),
            Arc::new(|node: &NodeId| node.as_str() == "gone"),
            Arc::new(move |_key: &[u8]| {
                if ring_is_new.load(Ordering::SeqCst) {
                    vec![n("a"), n("c")]
                } else {
                    vec![n("a"), n("gone")]
                }
            }),
        );
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_millis(500),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(book.pending(&n("gone")), 1, "kept while the ring names it");
    assert_eq!(book.pending(&n("a")) + book.pending(&n("gone")), 1);
    assert!(transport.taken().is_empty(), "{:?}", transport.taken());

    installed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(book.pending(&n("gone")), 0);
    let expected: Vec<(String, String)> = [("a", "k1"), ("c", "k1")]
        .iter()
        .map(|(to, key)| (to.to_string(), key.to_string()))
        .collect();
    assert_eq!(transport.taken(), expected);

    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// A removed owner's hint whose replica the failure detector believes down
/// gives that replica a hint of its own without trying it: a hung replica
/// would otherwise hold every batch for the send timeout (2 s), and the
/// other owners' rounds with it.
#[tokio::test(start_paused = true)]
async fn a_replica_believed_down_gets_its_hint_without_being_tried() {
    let book = support::book();
    for i in 0..40 {
        book.store(&n("gone"), format!("k{i:02}").as_bytes(), &write("v"))
            .unwrap();
    }
    let transport = Arc::new(Replicas {
        hung: [n("hung")].into_iter().collect(),
        ..Replicas::default()
    });
    let routing = HintRouting::to_owners(Arc::new(|node: &NodeId| node.as_str() != "hung"))
        .rerouting_removed(
            n("me"),
            Arc::new(|node: &NodeId| node.as_str() == "gone"),
            Arc::new(|_: &[u8]| vec![n("a"), n("hung")]),
        );
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        batch_size: 16,
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);
    // Three batches; with each held for a 2 s timeout this would take 6 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(book.pending(&n("gone")), 0);
    assert_eq!(book.pending(&n("hung")), 40, "each a hint of its own");
    assert_eq!(transport.taken().len(), 40, "a took every one");
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// Routing for node "me", whose ring's fingerprint is `ring` (0: none yet),
/// with every node on it and none removed.
fn routing_on(
    ring: &Arc<AtomicU64>,
    is_up: handoff::IsUp,
    replicas_of: handoff::ReplicasOf,
) -> HintRouting {
    let ring = ring.clone();
    HintRouting::to_owners(is_up)
        .rerouting_removed(n("me"), Arc::new(|_: &NodeId| false), replicas_of)
        .with_ring_members(Arc::new(|_: &NodeId| true))
        .with_ring_fingerprint(Arc::new(move || ring.load(Ordering::SeqCst)))
}

/// An owner believed down keeps its hints, except one whose key a joiner
/// took over: that goes to the key's replicas at the worker's first tick
/// (its first sweep), since the owner may never come back for it (the
/// joiner replaces it); a replica that is down gets a hint of its own. One
/// pass per ring, begun a minute after the ring came at the earliest: a
/// later sweep under the same ring leaves the owner's hints alone, and one
/// under a new ring looks again.
#[tokio::test(start_paused = true)]
async fn a_hint_whose_key_moved_away_from_an_owner_believed_down_goes_to_the_keys_replicas() {
    let (book, transport) = moved_and_kept();
    let ring = Arc::new(AtomicU64::new(7));
    let routing = routing_on(
        &ring,
        Arc::new(|node: &NodeId| !["owner", "b"].contains(&node.as_str())),
        Arc::new(|key: &[u8]| match key {
            b"moved" | b"moved2" | b"moved3" => vec![n("a"), n("joiner"), n("b")],
            _ => vec![n("owner"), n("a")],
        }),
    );
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        sweep_interval: Duration::from_secs(60),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let taken = |keys: &[(&str, &str)]| -> Vec<(String, String)> {
        keys.iter()
            .map(|(to, key)| (to.to_string(), key.to_string()))
            .collect()
    };
    assert_eq!(
        transport.taken(),
        taken(&[("a", "moved"), ("joiner", "moved")])
    );
    assert_eq!(book.read(&n("owner"), b"moved").unwrap(), None);
    assert!(
        book.read(&n("owner"), b"kept").unwrap().is_some(),
        "waits for its owner"
    );
    assert!(
        book.read(&n("b"), b"moved").unwrap().is_some(),
        "b, down, has its own hint"
    );

    // Held by a coordinator still on the old ring, within a minute of the
    // new one: the first pass began too soon to count, so the next sweep
    // looks again.
    book.store(&n("owner"), b"moved2", &write("moved2"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(book.read(&n("owner"), b"moved2").unwrap(), None);
    let handed_on = |key: &str| {
        transport
            .taken()
            .contains(&("joiner".to_string(), key.to_string()))
    };
    assert!(handed_on("moved2"));
    // That pass counted: a hint held later under the same ring stays.
    book.store(&n("owner"), b"moved3", &write("moved3"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(book.read(&n("owner"), b"moved3").unwrap().is_some());
    // A new ring: looked at again at the next sweep.
    ring.store(8, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(book.read(&n("owner"), b"moved3").unwrap(), None);
    assert!(handed_on("moved3"));
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// A pass over the moved keys of an owner believed down that takes more
/// than one turn (150 hints at 10 a second, turns of 10 s) resumes where
/// its turn ended, and still counts for its ring once it has gone all the
/// way: a hint held later under the same ring stays with its owner at the
/// next sweep instead of starting another pass over all its hints.
#[tokio::test(start_paused = true)]
async fn a_pass_over_moved_keys_that_takes_several_turns_counts_for_its_ring() {
    let book = support::book();
    let transport = Arc::new(Replicas::default());
    let routing = HintRouting::to_owners(Arc::new(|node: &NodeId| node.as_str() != "owner"))
        .rerouting_removed(
            n("me"),
            Arc::new(|_: &NodeId| false),
            Arc::new(|key: &[u8]| match key.first() {
                Some(b'm') => vec![n("a"), n("joiner")],
                _ => vec![n("owner"), n("a")],
            }),
        )
        .with_ring_members(Arc::new(|_: &NodeId| true))
        .with_ring_fingerprint(Arc::new(|| 7));
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        batch_size: 10,
        max_rate_per_s: 10,
        sweep_interval: Duration::from_secs(60),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);
    // The first sweep's pass comes too soon after the ring to count; the
    // next, at 60 s, has 150 moved hints (and a kept one) to walk.
    tokio::time::sleep(Duration::from_secs(1)).await;
    book.store(&n("owner"), b"kept", &write("kept")).unwrap();
    for i in 0..150 {
        let key = format!("m{i:03}");
        book.store(&n("owner"), key.as_bytes(), &write(&key))
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(65)).await;
    let left = book.pending(&n("owner")) - 1;
    assert!(
        (20..=120).contains(&left),
        "{left} moved hints left after one turn"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while book.pending(&n("owner")) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pass did not resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        transport.taken().len(),
        300,
        "each moved hint to both replicas"
    );
    // The pass went all the way under ring 7: the sweep at 120 s leaves
    // the owner's hints alone.
    book.store(&n("owner"), b"m-late", &write("m-late"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        book.read(&n("owner"), b"m-late").unwrap().is_some(),
        "another pass under the same ring"
    );
    assert!(book.read(&n("owner"), b"kept").unwrap().is_some());
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// Nothing is delivered before the node has a ring this run (a node still
/// starting may have an older member list than the owners): the owner's
/// hint waits, and goes once a ring is installed.
#[tokio::test(start_paused = true)]
async fn no_hint_is_delivered_before_the_node_has_a_ring() {
    let book = support::book();
    let transport = Arc::new(Replicas::default());
    book.store(&n("owner"), b"k", &write("k")).unwrap();
    let ring = Arc::new(AtomicU64::new(0));
    let routing = routing_on(
        &ring,
        Arc::new(|_: &NodeId| true),
        Arc::new(|_: &[u8]| vec![n("owner"), n("a")]),
    );
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(book.clone(), transport.clone(), routing, config, shutdown);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(transport.taken().is_empty(), "delivered with no ring");
    assert_eq!(book.pending(&n("owner")), 1);
    ring.store(7, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(transport.taken(), [("owner".to_string(), "k".to_string())]);
    assert_eq!(book.pending(&n("owner")), 0);
    stop.send(true).unwrap();
    worker.await.unwrap();
}
