use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use ringkv_core::dvv::{Clock, Payload};
use ringkv_core::wire::{ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport, TransportError};
use ringkv_ring::Ring;

use super::*;
use crate::test_support::{n, write};

/// Replicas in memory that answer `ReadBatch` with at most `per_answer`
/// clocks (as a large answer is cut short), and record who was asked.
struct Replicas {
    stores: HashMap<NodeId, HashMap<Vec<u8>, Clock>>,
    down: HashSet<NodeId>,
    per_answer: usize,
    asked: Mutex<Vec<NodeId>>,
    /// Asks answered before every replica goes down (`None`: no limit).
    answers_left: Mutex<Option<usize>>,
}

impl Replicas {
    fn new(per_answer: usize) -> Self {
        Replicas {
            stores: HashMap::new(),
            down: HashSet::new(),
            per_answer,
            asked: Mutex::new(Vec::new()),
            answers_left: Mutex::new(None),
        }
    }

    fn hold(&mut self, node: &str, key: &str, clock: &Clock) {
        self.stores
            .entry(n(node))
            .or_default()
            .insert(key.as_bytes().to_vec(), clock.clone());
    }
}

impl Transport for Replicas {
    async fn call(&self, to: &NodeId, request: Request) -> Result<Response, TransportError> {
        self.asked.lock().unwrap().push(to.clone());
        let exhausted = match self.answers_left.lock().unwrap().as_mut() {
            Some(0) => true,
            Some(left) => {
                *left -= 1;
                false
            }
            None => false,
        };
        if exhausted || self.down.contains(to) {
            return Err(TransportError::Unreachable {
                node: to.clone(),
                reason: "down".into(),
            });
        }
        let Request::Replica(ReplicaRequest::ReadBatch { keys }) = request else {
            panic!("cleanup sent {request:?}");
        };
        let store = self.stores.get(to);
        Ok(Response::Clocks(
            keys.iter()
                .take(self.per_answer)
                .map(|k| store.and_then(|s| s.get(k)).cloned())
                .collect(),
        ))
    }
}

/// `of` superseded by a write of `value` through `actor`.
fn newer(of: &Clock, actor: &str, value: &str) -> Clock {
    let mut c = of.clone();
    c.update(
        &of.context(),
        Payload::Value(value.as_bytes().to_vec()),
        &n(actor),
    );
    c
}

fn deleted(of: &Clock) -> Clock {
    let mut c = of.clone();
    c.update(&of.context(), Payload::Tombstone, &n("n1"));
    c
}

#[test]
fn a_copy_is_covered_only_by_a_replica_that_has_seen_all_of_it() {
    let ours = write("n3", "v");
    assert!(covered(&ours, &[Some(ours.clone())]), "the same version");
    assert!(
        covered(&ours, &[None, Some(newer(&ours, "n1", "w"))]),
        "a newer one"
    );
    assert!(covered(&ours, &[Some(deleted(&ours))]), "deleted since");
    assert!(!covered(&ours, &[None, None]), "held nowhere");
    assert!(!covered(&ours, &[]), "nobody answered");
    let older = write("n1", "old");
    let ours_newer = newer(&older, "n3", "v");
    assert!(
        !covered(&ours_newer, &[Some(older.clone())]),
        "replica older"
    );
    let concurrent = newer(&older, "n2", "x");
    assert!(
        !covered(&ours_newer, &[Some(concurrent)]),
        "a concurrent version keeps ours (a sibling only we have)"
    );
}

/// [`check_page`] of `page` with no replica skipped, 1 s per answer.
async fn check(replicas: &Replicas, ring: &Ring, page: &[(Vec<u8>, Clock)]) -> Verdict {
    check_page(
        replicas,
        ring,
        page,
        &BTreeMap::new(),
        Duration::from_secs(1),
    )
    .await
}

fn two_node_ring() -> Ring {
    // Every key's replicas are n1 and n2; the stray copies are n3's.
    Ring::new([(n("n1"), 16), (n("n2"), 16)], 2).unwrap()
}

fn strays(keys: &[(&str, &Clock)]) -> Vec<(Vec<u8>, Clock)> {
    keys.iter()
        .map(|(k, c)| (k.as_bytes().to_vec(), (*c).clone()))
        .collect()
}

#[tokio::test]
async fn a_page_is_checked_against_every_replica_and_answers_cut_short_are_asked_again() {
    let v = write("n3", "v");
    let mut replicas = Replicas::new(1);
    replicas.hold("n1", "same", &v);
    replicas.hold("n2", "newer", &newer(&v, "n2", "w"));
    replicas.hold("n1", "older", &write("n1", "old"));
    let page = strays(&[("same", &v), ("newer", &v), ("older", &v), ("nowhere", &v)]);
    let verdict = check(&replicas, &two_node_ring(), &page).await;
    assert_eq!(verdict.covered, [true, true, false, false]);
    assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
    let asked = replicas.asked.lock().unwrap().clone();
    // n1 first, one clock per answer: four asks; then n2 only for the
    // three copies n1 did not cover.
    assert_eq!(asked.iter().filter(|a| **a == n("n1")).count(), 4);
    assert_eq!(asked.iter().filter(|a| **a == n("n2")).count(), 3);
}

#[tokio::test]
async fn a_replica_that_cannot_be_asked_covers_nothing_and_is_reported() {
    let v = write("n3", "v");
    let mut replicas = Replicas::new(usize::MAX);
    replicas.hold("n2", "on-n2", &v);
    replicas.hold("n1", "on-n1", &v);
    replicas.down.insert(n("n1"));
    let page = strays(&[("on-n2", &v), ("on-n1", &v)]);
    let ring = two_node_ring();
    let verdict = check(&replicas, &ring, &page).await;
    assert_eq!(verdict.covered, [true, false], "only n2 answered");
    assert_eq!(verdict.failures.len(), 1);
    assert_eq!(verdict.failures[0].peer, n("n1"));
    assert!(
        verdict.failures[0].reason.contains("down"),
        "{:?}",
        verdict.failures
    );

    // A replica that failed earlier in the cleanup is not asked again, and
    // is reported only while a copy needs it.
    replicas.asked.lock().unwrap().clear();
    let skip = BTreeMap::from([(n("n1"), "failed before".to_string())]);
    let verdict = check_page(&replicas, &ring, &page, &skip, Duration::from_secs(1)).await;
    assert_eq!(verdict.covered, [true, false]);
    assert_eq!(verdict.failures.len(), 1);
    assert_eq!(verdict.failures[0].reason, "failed before");
    assert_eq!(*replicas.asked.lock().unwrap(), [n("n2")]);
    let only_on_n2 = strays(&[("on-n2", &v)]);
    let verdict = check_page(&replicas, &ring, &only_on_n2, &skip, Duration::from_secs(1)).await;
    assert_eq!(verdict.covered, [true]);
    assert!(
        verdict.failures.is_empty(),
        "n2 covered it: n1 was not needed"
    );
    // The same when n1 is asked first and fails.
    let verdict = check(&replicas, &ring, &only_on_n2).await;
    assert_eq!(verdict.covered, [true]);
    assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
    // Not reported, but not to be asked again either.
    let unreachable: Vec<&NodeId> = verdict.unreachable.iter().map(|f| &f.peer).collect();
    assert_eq!(unreachable, [&n("n1")]);
}

/// Each answer is judged as it arrives (and its versions dropped, not held
/// for the whole page): a replica that fails part way has still covered
/// the copies its earlier answers covered.
#[tokio::test]
async fn a_replica_that_fails_part_way_covers_what_it_answered() {
    let v = write("n3", "v");
    let mut replicas = Replicas::new(1);
    replicas.hold("n1", "a", &v);
    replicas.hold("n1", "b", &v);
    *replicas.answers_left.lock().unwrap() = Some(1);
    let page = strays(&[("a", &v), ("b", &v)]);
    let verdict = check(&replicas, &two_node_ring(), &page).await;
    assert_eq!(verdict.covered, [true, false]);
    let failed: Vec<&NodeId> = verdict.failures.iter().map(|f| &f.peer).collect();
    assert_eq!(failed, [&n("n1"), &n("n2")], "both were needed for b");
}
