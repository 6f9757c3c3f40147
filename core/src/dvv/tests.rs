//! Property tests for [`Clock`]: the merge laws and a ground-truth oracle.
//!
//! Histories are generated as random writes (blind, with a replica's current
//! context, or with a stale context remembered from earlier) and random
//! one-way syncs between three replicas. After every step each replica's live
//! siblings must be exactly the writes it knows of that no write it knows
//! supersedes, each with the value written under its dot. That is the
//! statement "a value is dropped only if causally dominated", and its
//! converse "nothing dominated lingers"; the values catch a clock that keeps
//! the right number of siblings but the wrong ones (its dots are derived
//! from positions, so the dots alone cannot tell).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

fn node(i: usize) -> NodeId {
    NodeId::new(["a", "b", "c"][i]).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Write at replica `at` with the context of replica `ctx_of`'s clock,
    /// of a remembered past context, or none (a blind write).
    Write {
        at: usize,
        ctx: CtxSource,
    },
    Sync {
        from: usize,
        to: usize,
    },
}

#[derive(Debug, Clone)]
enum CtxSource {
    Blind,
    Current(usize),
    Past(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, ctx_source()).prop_map(|(at, ctx)| Op::Write { at, ctx }),
        (0..3usize, 0..3usize).prop_map(|(from, to)| Op::Sync { from, to }),
    ]
}

fn ctx_source() -> impl Strategy<Value = CtxSource> {
    prop_oneof![
        Just(CtxSource::Blind),
        (0..3usize).prop_map(CtxSource::Current),
        (0..64usize).prop_map(CtxSource::Past),
    ]
}

/// Three replicas plus what really happened.
struct Model {
    replicas: [Clock; 3],
    /// Every write ever made: its dot, the context it superseded and the
    /// value it wrote.
    writes: HashMap<Dot, (VersionVector, Payload)>,
    past_contexts: Vec<VersionVector>,
}

impl Model {
    fn new() -> Self {
        Model {
            replicas: Default::default(),
            writes: HashMap::new(),
            past_contexts: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { at, ctx } => {
                let ctx = match ctx {
                    CtxSource::Blind => VersionVector::new(),
                    CtxSource::Current(i) => self.replicas[*i].context(),
                    CtxSource::Past(k) if self.past_contexts.is_empty() => {
                        let _ = k;
                        VersionVector::new()
                    }
                    CtxSource::Past(k) => self.past_contexts[k % self.past_contexts.len()].clone(),
                };
                // A client only holds contexts it read from some replica, and
                // a coordinator only coordinates after reading its own state,
                // which is what `update` does.
                let value = Payload::Value(format!("w{}", self.writes.len()).into_bytes());
                let dot = self.replicas[*at].update(&ctx, value.clone(), &node(*at));
                assert!(
                    self.writes.insert(dot.clone(), (ctx, value)).is_none(),
                    "dot {dot:?} minted twice"
                );
                self.past_contexts.push(self.replicas[*at].context());
            }
            Op::Sync { from, to } => {
                let src = self.replicas[*from].clone();
                self.replicas[*to].sync(&src);
            }
        }
    }

    /// The siblings replica `i` must hold according to the oracle, each
    /// with the value written under its dot.
    fn expected_live(&self, i: usize) -> BTreeMap<Dot, Payload> {
        let known = self.replicas[i].context();
        let known_writes: Vec<(&Dot, &(VersionVector, Payload))> = self
            .writes
            .iter()
            .filter(|(d, _)| known.covers(d))
            .collect();
        known_writes
            .iter()
            .filter(|(d, _)| !known_writes.iter().any(|(_, (ctx, _))| ctx.covers(d)))
            .map(|(d, (_, value))| ((*d).clone(), value.clone()))
            .collect()
    }

    fn live(&self, i: usize) -> BTreeMap<Dot, Payload> {
        self.replicas[i]
            .siblings()
            .map(|s| (s.dot, s.payload.clone()))
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn siblings_are_exactly_the_undominated_known_writes(ops in prop::collection::vec(op(), 1..40)) {
        let mut model = Model::new();
        for op in &ops {
            model.apply(op);
            for i in 0..3 {
                prop_assert!(model.replicas[i].validate().is_ok());
                prop_assert_eq!(model.live(i), model.expected_live(i), "replica {} after {:?}", i, op);
            }
        }
    }

    #[test]
    fn sync_is_commutative_associative_and_idempotent(ops in prop::collection::vec(op(), 0..40)) {
        let mut model = Model::new();
        for op in &ops {
            model.apply(op);
        }
        let [a, b, c] = model.replicas.clone();

        let mut ab = a.clone();
        ab.sync(&b);
        let mut ba = b.clone();
        ba.sync(&a);
        prop_assert_eq!(&ab, &ba, "commutative");

        let mut ab_c = ab.clone();
        ab_c.sync(&c);
        let mut bc = b.clone();
        bc.sync(&c);
        let mut a_bc = a.clone();
        a_bc.sync(&bc);
        prop_assert_eq!(&ab_c, &a_bc, "associative");

        let mut aa = a.clone();
        aa.sync(&a);
        prop_assert_eq!(&aa, &a, "idempotent");
        let mut ab_b = ab.clone();
        ab_b.sync(&b);
        prop_assert_eq!(&ab_b, &ab, "absorbs what it already merged");
    }

    /// Even should a dot be minted twice with different payloads (a bug or
    /// a lost actor record; never by design), replicas that sync converge:
    /// the laws hold for clocks whose one entry has the same counter and
    /// any payloads.
    #[test]
    fn sync_converges_even_when_a_dot_carries_two_payloads(
        counter in 1u64..6,
        windows in prop::collection::vec(prop::collection::vec(0u8..3, 0..6), 3),
    ) {
        let [a, b, c]: [Clock; 3] = std::array::from_fn(|i| {
            let mut payloads: Vec<Payload> = windows[i]
                .iter()
                .map(|v| if *v == 0 { Payload::Tombstone } else { Payload::Value(vec![*v]) })
                .collect();
            payloads.truncate(counter as usize);
            Clock { entries: vec![Entry { node: node(0), counter, payloads }] }
        });
        let synced = |x: &Clock, y: &Clock| {
            let mut x = x.clone();
            x.sync(y);
            x
        };
        prop_assert_eq!(synced(&a, &b), synced(&b, &a), "commutative");
        prop_assert_eq!(synced(&synced(&a, &b), &c), synced(&a, &synced(&b, &c)), "associative");
        prop_assert_eq!(synced(&a, &a), a.clone(), "idempotent");
    }

    #[test]
    fn writing_with_a_full_context_leaves_one_value(ops in prop::collection::vec(op(), 0..40), at in 0..3usize) {
        let mut model = Model::new();
        for op in &ops {
            model.apply(op);
        }
        let mut all = model.replicas[0].clone();
        all.sync(&model.replicas[1]);
        all.sync(&model.replicas[2]);
        let ctx = all.context();
        prop_assert_eq!(all.sibling_count_after_update(&ctx), 1);
        all.update(&ctx, Payload::Value(b"final".to_vec()), &node(at));
        prop_assert_eq!(all.sibling_count(), 1);
        prop_assert_eq!(all.values().collect::<Vec<_>>(), vec![&b"final"[..]]);
    }

    #[test]
    fn sibling_count_after_update_predicts_update(ops in prop::collection::vec(op(), 0..30), ctx_of in 0..3usize, at in 0..3usize) {
        let mut model = Model::new();
        for op in &ops {
            model.apply(op);
        }
        let ctx = model.replicas[ctx_of].context();
        let mut clock = model.replicas[at].clone();
        let predicted = clock.sibling_count_after_update(&ctx);
        clock.update(&ctx, Payload::Tombstone, &node(at));
        prop_assert_eq!(predicted, clock.sibling_count());
    }
}

#[test]
fn blind_writes_through_one_coordinator_are_siblings() {
    let a = node(0);
    let mut clock = Clock::new();
    clock.update(&VersionVector::new(), Payload::Value(b"x".to_vec()), &a);
    clock.update(&VersionVector::new(), Payload::Value(b"y".to_vec()), &a);
    let mut values: Vec<_> = clock.values().collect();
    values.sort();
    assert_eq!(values, vec![&b"x"[..], &b"y"[..]]);
}

#[test]
fn read_modify_write_through_rotating_coordinators_never_grows_siblings() {
    // Every replica applies the write, as the coordinator would replicate it.
    let mut replicas = [Clock::new(), Clock::new(), Clock::new()];
    for round in 0..30 {
        let at = round % 3;
        let ctx = replicas[(round + 1) % 3].context();
        replicas[at].update(&ctx, Payload::Value(vec![round as u8]), &node(at));
        let written = replicas[at].clone();
        for r in &mut replicas {
            r.sync(&written);
        }
        for r in &replicas {
            assert_eq!(r.sibling_count(), 1, "round {round}");
        }
    }
}

#[test]
fn a_tombstone_with_context_hides_every_value() {
    let a = node(0);
    let b = node(1);
    let mut clock = Clock::new();
    clock.update(&VersionVector::new(), Payload::Value(b"x".to_vec()), &a);
    let mut other = Clock::new();
    other.update(&VersionVector::new(), Payload::Value(b"y".to_vec()), &b);
    clock.sync(&other);
    assert_eq!(clock.values().count(), 2);
    let ctx = clock.context();
    clock.update(&ctx, Payload::Tombstone, &a);
    assert_eq!(clock.values().count(), 0);
    assert_eq!(clock.sibling_count(), 1);
}

#[test]
fn validate_rejects_more_siblings_than_events() {
    let clock = Clock {
        entries: vec![Entry {
            node: node(0),
            counter: 1,
            payloads: vec![Payload::Tombstone, Payload::Tombstone],
        }],
    };
    assert!(clock.validate().unwrap_err().message.contains("2 siblings"));
}

/// An entry that saw no event of its node is never stored (the same as no
/// entry); from outside it would only take room under the actor limit.
#[test]
fn validate_rejects_an_entry_without_events() {
    let clock = Clock {
        entries: vec![Entry {
            node: node(0),
            counter: 0,
            payloads: vec![],
        }],
    };
    assert!(clock.validate().unwrap_err().message.contains("counter 0"));
}
