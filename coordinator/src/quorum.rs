//! Counting replica answers against R or W (Dynamo §4.5).
//!
//! A [`QuorumTracker`] is a plain value: the coordinator tells it each
//! replica's outcome as it arrives and asks whether the request has succeeded,
//! can no longer succeed, or must keep waiting. It knows nothing of sockets or
//! time; the coordinator decides when the deadline has passed and calls
//! [`QuorumTracker::expire`], after which late answers change nothing.

use ringkv_core::wire::{Outcome, Receipt, ReplicaOutcome};
use ringkv_core::NodeId;

/// How receipts and failures describe an owner held back.
const HELD_BACK: &str = "believed down; not contacted";

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumState {
    /// Fewer than `required` successes so far, but enough replicas are pending.
    Waiting,
    /// `required` replicas succeeded.
    Reached,
    /// Too many replicas failed (or the deadline passed) for `required` to be met.
    Failed,
}

/// One replica's answer as the tracker records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAnswer {
    Pending,
    Ok { latency_us: u64 },
    Error { latency_us: u64, reason: String },
    Timeout { latency_us: u64 },
}

/// One node asked, and for which preference-list slot.
#[derive(Debug, Clone)]
struct Entry {
    node: NodeId,
    /// Index of the preference-list node this answer counts for.
    slot: usize,
    /// Set for a fallback standing in for that slot's owner.
    hint_for: Option<NodeId>,
    answer: ReplicaAnswer,
    /// Whether the node was sent the request (or answered). A read asks
    /// only R owners at first; the others are spares, which a failed read
    /// must not report as timed out.
    asked: bool,
    /// An owner believed down whose slot went to a stand-in: not asked, and
    /// not counted as pending, unless [`QuorumTracker::ask_held_back`] asks
    /// it after all (its stand-ins failed, and the failure detector may be
    /// wrong). Reported as "believed down; not contacted".
    held_back: bool,
}

/// Tracks the answers for the preference list's nodes until `required` of
/// them are satisfied.
///
/// Each preference-list node is a *slot*. A slot is satisfied when its owner
/// answers, or when a fallback standing in for it does (Dynamo's sloppy
/// quorum); it counts once however many of them answer. The tracker itself
/// never chooses stand-ins: the coordinator adds them with
/// [`add_stand_in`](Self::add_stand_in).
///
/// Invariants: each node's answer is recorded at most once (the first wins);
/// once expired, nothing changes; a node is in at most one slot; a node held
/// back is pending, never asked, and covers nothing until asked.
#[derive(Debug, Clone)]
pub struct QuorumTracker {
    required: usize,
    slots: usize,
    entries: Vec<Entry>,
    expired: bool,
}

impl QuorumTracker {
    /// `replicas` are the preference-list nodes; `required` slots must succeed.
    pub fn new(replicas: impl IntoIterator<Item = NodeId>, required: usize) -> Self {
        let entries: Vec<Entry> = replicas
            .into_iter()
            .enumerate()
            .map(|(slot, node)| Entry {
                node,
                slot,
                hint_for: None,
                answer: ReplicaAnswer::Pending,
                asked: false,
                held_back: false,
            })
            .collect();
        QuorumTracker {
            required,
            slots: entries.len(),
            entries,
            expired: false,
        }
    }

    /// Adds `stand_in` as a fallback for `owner`'s slot, pending. Returns
    /// false (and changes nothing) if `owner` has no slot, the tracker has
    /// expired, or `stand_in` is already asked.
    pub fn add_stand_in(&mut self, owner: &NodeId, stand_in: NodeId) -> bool {
        if self.expired || self.entries.iter().any(|e| e.node == stand_in) {
            return false;
        }
        let Some(slot) = self.slot_of_owner(owner) else {
            return false;
        };
        self.entries.push(Entry {
            node: stand_in,
            slot,
            hint_for: Some(owner.clone()),
            answer: ReplicaAnswer::Pending,
            asked: true,
            held_back: false,
        });
        true
    }

    /// Notes that `owner`, believed down, is not asked: its slot went to a
    /// stand-in. Until [`Self::ask_held_back`], the owner neither keeps its
    /// slot pending nor covers it, so the slot fails with its stand-ins.
    /// Does nothing for a node that is not an owner not yet asked.
    pub fn hold_back(&mut self, owner: &NodeId) {
        if self.expired {
            return;
        }
        if let Some(at) = self.owner_index(owner) {
            let e = &mut self.entries[at];
            if e.answer == ReplicaAnswer::Pending && !e.asked {
                e.held_back = true;
            }
        }
    }

    /// Asks `owner` after all, if it was held back and its slot is not yet
    /// satisfied; returns whether it was. From then on it is an owner asked
    /// like any other.
    pub fn ask_held_back(&mut self, owner: &NodeId) -> bool {
        if self.expired {
            return false;
        }
        let Some(at) = self.owner_index(owner) else {
            return false;
        };
        if !self.entries[at].held_back || self.slot_satisfied(self.entries[at].slot) {
            return false;
        }
        let e = &mut self.entries[at];
        e.held_back = false;
        e.asked = true;
        true
    }

    /// Where `owner`'s own entry (not a stand-in's) is.
    fn owner_index(&self, owner: &NodeId) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.node == *owner && e.hint_for.is_none())
    }

    fn slot_satisfied(&self, slot: usize) -> bool {
        self.entries
            .iter()
            .any(|e| e.slot == slot && matches!(e.answer, ReplicaAnswer::Ok { .. }))
    }

    /// Notes that `node` was sent the request.
    pub fn mark_asked(&mut self, node: &NodeId) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.node == *node) {
            e.asked = true;
        }
    }

    /// The owner `node` answers for: itself, or the node it stands in for.
    pub fn owner_of(&self, node: &NodeId) -> Option<&NodeId> {
        let entry = self.entries.iter().find(|e| e.node == *node)?;
        Some(entry.hint_for.as_ref().unwrap_or(&entry.node))
    }

    /// Whether `owner`'s slot has neither a success nor anyone else still
    /// pending besides `except`: a failure of `except` leaves it uncovered.
    /// With `owner_gave_up`, a still-pending owner does not cover its slot
    /// either (it has already been judged silent).
    pub fn slot_uncovered_without(
        &self,
        owner: &NodeId,
        except: &NodeId,
        owner_gave_up: bool,
    ) -> bool {
        let Some(slot) = self.slot_of_owner(owner) else {
            return false;
        };
        !self.entries.iter().any(|e| {
            e.slot == slot
                && (matches!(e.answer, ReplicaAnswer::Ok { .. })
                    || (e.answer == ReplicaAnswer::Pending
                        && !e.held_back
                        && e.node != *except
                        && !(owner_gave_up && e.node == *owner)))
        })
    }

    /// Owners whose slot has had no answer at all yet and no stand-in.
    pub fn silent_owners(&self) -> Vec<NodeId> {
        (0..self.slots)
            .filter(|slot| {
                let mut in_slot = self.entries.iter().filter(|e| e.slot == *slot);
                in_slot.clone().count() == 1 && in_slot.all(|e| e.answer == ReplicaAnswer::Pending)
            })
            .map(|slot| self.entries[slot].node.clone())
            .collect()
    }

    /// Owners held back whose slot is not satisfied and waits on a stand-in
    /// still silent. The coordinator asks them after all once silence has
    /// lasted as long as it gives a silent owner: a stand-in that hangs is
    /// failing as surely as one that answers with an error.
    pub fn held_back_behind_silence(&self) -> Vec<NodeId> {
        self.entries
            .iter()
            .filter(|owner| owner.held_back && !self.slot_satisfied(owner.slot))
            .filter(|owner| {
                self.entries.iter().any(|e| {
                    e.slot == owner.slot
                        && e.hint_for.is_some()
                        && e.answer == ReplicaAnswer::Pending
                })
            })
            .map(|owner| owner.node.clone())
            .collect()
    }

    fn slot_of_owner(&self, owner: &NodeId) -> Option<usize> {
        self.owner_index(owner).map(|at| self.entries[at].slot)
    }

    /// Records `node`'s answer. Answers from unknown nodes, second answers
    /// and answers after [`expire`](Self::expire) are ignored.
    pub fn record(&mut self, node: &NodeId, answer: ReplicaAnswer) -> QuorumState {
        if !self.expired {
            if let Some(e) = self.entries.iter_mut().find(|e| e.node == *node) {
                if e.answer == ReplicaAnswer::Pending {
                    e.answer = answer;
                    e.asked = true;
                    e.held_back = false;
                }
            }
        }
        self.state()
    }

    /// The deadline passed: every node asked and still pending timed out
    /// (one never asked stays out of the receipt).
    pub fn expire(&mut self, latency_us: u64) -> QuorumState {
        if !self.expired {
            for e in &mut self.entries {
                if e.answer == ReplicaAnswer::Pending && e.asked {
                    e.answer = ReplicaAnswer::Timeout { latency_us };
                }
            }
            self.expired = true;
        }
        self.state()
    }

    /// Satisfied slots, and slots still pending (not satisfied, and someone
    /// in them pending: asked, or an owner still to be asked before the
    /// deadline).
    fn slot_counts(&self) -> (usize, usize) {
        let mut ok = 0;
        let mut pending = 0;
        for slot in 0..self.slots {
            let answers = || self.entries.iter().filter(|e| e.slot == slot);
            if self.slot_satisfied(slot) {
                ok += 1;
            } else if !self.expired
                && answers().any(|e| e.answer == ReplicaAnswer::Pending && !e.held_back)
            {
                // (After the deadline an owner never asked is still
                // pending, but can no longer be asked.)
                pending += 1;
            }
        }
        (ok, pending)
    }

    /// How many slots must succeed.
    pub fn required(&self) -> usize {
        self.required
    }

    /// How many slots have succeeded so far.
    pub fn satisfied(&self) -> usize {
        self.slot_counts().0
    }

    pub fn state(&self) -> QuorumState {
        let (ok, pending) = self.slot_counts();
        if ok >= self.required {
            QuorumState::Reached
        } else if ok + pending < self.required {
            QuorumState::Failed
        } else {
            QuorumState::Waiting
        }
    }

    /// The nodes that succeeded, stand-ins included.
    pub fn succeeded(&self) -> impl Iterator<Item = &NodeId> {
        self.entries
            .iter()
            .filter(|e| matches!(e.answer, ReplicaAnswer::Ok { .. }))
            .map(|e| &e.node)
    }

    /// The nodes asked that did not answer (timed out, or still pending):
    /// each may have taken the request all the same.
    pub fn unanswered(&self) -> impl Iterator<Item = &NodeId> {
        self.entries
            .iter()
            .filter(|e| match e.answer {
                ReplicaAnswer::Timeout { .. } => true,
                ReplicaAnswer::Pending => e.asked && !e.held_back,
                _ => false,
            })
            .map(|e| &e.node)
    }

    /// The receipt clients see. Replicas still in flight when the request
    /// completed are left out: they have no outcome yet.
    pub fn receipt(&self, coordinator: &NodeId) -> Receipt {
        Receipt {
            coordinator: Some(coordinator.clone()),
            replicas: self
                .entries
                .iter()
                .filter_map(|e| {
                    let (outcome, latency_us, detail) = match &e.answer {
                        ReplicaAnswer::Pending if e.held_back => {
                            (Outcome::Error, 0, Some(HELD_BACK.to_string()))
                        }
                        ReplicaAnswer::Pending => return None,
                        ReplicaAnswer::Ok { latency_us } => (Outcome::Ok, *latency_us, None),
                        ReplicaAnswer::Error { latency_us, reason } => {
                            (Outcome::Error, *latency_us, Some(reason.clone()))
                        }
                        ReplicaAnswer::Timeout { latency_us } => {
                            (Outcome::Timeout, *latency_us, None)
                        }
                    };
                    Some(ReplicaOutcome {
                        node: e.node.clone(),
                        outcome,
                        latency_us,
                        detail,
                        hint_for: e.hint_for.clone(),
                    })
                })
                .collect(),
        }
    }

    /// A sentence for a failed request: how many answered of how many were
    /// required, and what happened to the others.
    pub fn failure_summary(&self) -> String {
        let (ok, _) = self.slot_counts();
        let failed: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| {
                let n = match &e.hint_for {
                    Some(owner) => format!("{} for {owner}", e.node),
                    None => e.node.to_string(),
                };
                match &e.answer {
                    ReplicaAnswer::Ok { .. } => None,
                    ReplicaAnswer::Pending if e.held_back => Some(format!("{n} ({HELD_BACK})")),
                    ReplicaAnswer::Pending if !e.asked => Some(format!("{n} (not asked)")),
                    ReplicaAnswer::Pending => Some(format!("{n} (no answer)")),
                    ReplicaAnswer::Timeout { .. } => Some(format!("{n} (timed out)")),
                    ReplicaAnswer::Error { reason, .. } => Some(format!("{n} ({reason})")),
                }
            })
            .collect();
        let mut s = format!("{ok} of {} required replicas answered", self.required);
        if self.slots < self.required {
            s.push_str(&format!(
                " (only {} nodes hold this key's replicas)",
                self.slots
            ));
        }
        if !failed.is_empty() {
            s.push_str(&format!("; failed: {}", failed.join(", ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn tracker(required: usize) -> QuorumTracker {
        QuorumTracker::new([n("a"), n("b"), n("c")], required)
    }

    const OK: ReplicaAnswer = ReplicaAnswer::Ok { latency_us: 10 };

    fn err() -> ReplicaAnswer {
        ReplicaAnswer::Error {
            latency_us: 5,
            reason: "disk full".into(),
        }
    }

    #[test]
    fn reaches_quorum_after_w_oks() {
        let mut t = tracker(2);
        assert_eq!(t.record(&n("a"), OK), QuorumState::Waiting);
        assert_eq!(t.record(&n("c"), OK), QuorumState::Reached);
        assert_eq!(
            t.receipt(&n("a")).replicas.len(),
            2,
            "pending b is not in the receipt"
        );
    }

    #[test]
    fn fails_as_soon_as_quorum_is_impossible() {
        let mut t = tracker(2);
        t.mark_asked(&n("c"));
        assert_eq!(t.record(&n("a"), err()), QuorumState::Waiting);
        assert_eq!(t.record(&n("b"), err()), QuorumState::Failed);
        let summary = t.failure_summary();
        assert!(
            summary.starts_with("0 of 2 required replicas answered"),
            "{summary}"
        );
        assert!(summary.contains("a (disk full)"), "{summary}");
        assert!(summary.contains("c (no answer)"), "{summary}");
    }

    /// A spare owner a read never asked is neither "no answer" in a failed
    /// read's summary nor "timed out" in its receipt.
    #[test]
    fn an_owner_never_asked_is_not_reported_as_silent() {
        let mut t = tracker(2);
        t.mark_asked(&n("a"));
        t.mark_asked(&n("b"));
        t.record(&n("a"), err());
        assert_eq!(t.expire(2_000_000), QuorumState::Failed);
        let summary = t.failure_summary();
        assert!(summary.contains("b (timed out)"), "{summary}");
        assert!(summary.contains("c (not asked)"), "{summary}");
        let receipt = t.receipt(&n("a"));
        let in_receipt: Vec<&str> = receipt.replicas.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(in_receipt, ["a", "b"], "c was never asked");
    }

    #[test]
    fn late_and_duplicate_answers_change_nothing() {
        let mut t = tracker(3);
        t.mark_asked(&n("b"));
        t.record(&n("a"), OK);
        t.record(&n("a"), err());
        assert_eq!(t.expire(2_000_000), QuorumState::Failed);
        assert_eq!(t.record(&n("b"), OK), QuorumState::Failed);
        assert_eq!(t.record(&n("c"), OK), QuorumState::Failed);
        assert_eq!(t.succeeded().count(), 1);
        assert!(t.failure_summary().contains("b (timed out)"));
    }

    #[test]
    fn a_stand_in_satisfies_its_owners_slot_once() {
        let mut t = tracker(3);
        assert!(t.add_stand_in(&n("c"), n("d")));
        assert!(!t.add_stand_in(&n("c"), n("d")), "already asked");
        assert!(!t.add_stand_in(&n("x"), n("e")), "x has no slot");
        assert_eq!(t.owner_of(&n("d")), Some(&n("c")));
        t.record(&n("a"), OK);
        t.record(&n("b"), OK);
        assert_eq!(t.state(), QuorumState::Waiting);
        assert_eq!(t.record(&n("c"), err()), QuorumState::Waiting, "d pending");
        assert_eq!(t.record(&n("d"), OK), QuorumState::Reached);
        let receipt = t.receipt(&n("a"));
        let d = receipt.replicas.iter().find(|r| r.node == n("d")).unwrap();
        assert_eq!(d.hint_for, Some(n("c")));
    }

    #[test]
    fn an_owner_and_its_stand_in_count_as_one() {
        let mut t = tracker(3);
        t.add_stand_in(&n("c"), n("d"));
        t.record(&n("a"), OK);
        t.record(&n("c"), OK);
        t.record(&n("d"), OK);
        assert_eq!(t.state(), QuorumState::Waiting, "b's slot is still open");
        assert!(t.failure_summary().starts_with("2 of 3"));
        assert_eq!(t.record(&n("b"), err()), QuorumState::Failed);
    }

    #[test]
    fn uncovered_and_silent_slots() {
        let mut t = tracker(2);
        assert_eq!(t.silent_owners(), [n("a"), n("b"), n("c")]);
        t.record(&n("a"), OK);
        t.add_stand_in(&n("b"), n("d"));
        assert_eq!(t.silent_owners(), [n("c")]);
        assert!(
            !t.slot_uncovered_without(&n("b"), &n("b"), false),
            "d covers b"
        );
        assert!(
            !t.slot_uncovered_without(&n("b"), &n("d"), false),
            "b itself is pending"
        );
        assert!(
            t.slot_uncovered_without(&n("b"), &n("d"), true),
            "unless b was given up on as silent"
        );
        t.record(&n("b"), err());
        assert!(t.slot_uncovered_without(&n("b"), &n("d"), false));
        assert!(
            !t.slot_uncovered_without(&n("a"), &n("a"), true),
            "a succeeded"
        );
    }

    /// An owner held back neither keeps its slot open nor covers it: the
    /// slot fails with its stand-ins, unless the owner is asked after all.
    #[test]
    fn an_owner_held_back_counts_only_once_asked() {
        let mut t = tracker(3);
        t.record(&n("a"), OK);
        t.record(&n("b"), OK);
        assert!(t.add_stand_in(&n("c"), n("d")));
        t.hold_back(&n("c"));
        assert!(t.slot_uncovered_without(&n("c"), &n("d"), false));
        let mut failed = t.clone();
        assert_eq!(failed.record(&n("d"), err()), QuorumState::Failed);
        assert!(
            failed
                .failure_summary()
                .contains("c (believed down; not contacted)"),
            "{}",
            failed.failure_summary()
        );
        let receipt = failed.receipt(&n("a"));
        let c = receipt.replicas.iter().find(|r| r.node == n("c")).unwrap();
        assert_eq!(c.outcome, Outcome::Error);

        assert!(t.ask_held_back(&n("c")));
        assert!(!t.ask_held_back(&n("c")), "asked once");
        assert!(!t.ask_held_back(&n("d")), "d is no owner");
        assert_eq!(t.record(&n("d"), err()), QuorumState::Waiting, "c asked");
        assert_eq!(t.record(&n("c"), OK), QuorumState::Reached);
    }

    #[test]
    fn an_owner_is_not_asked_after_all_once_its_slot_is_satisfied() {
        let mut t = tracker(2);
        t.add_stand_in(&n("c"), n("d"));
        t.hold_back(&n("c"));
        assert!(!t.ask_held_back(&n("a")), "a was never held back");
        t.record(&n("d"), OK);
        assert!(!t.ask_held_back(&n("c")));

        let mut late = tracker(2);
        late.add_stand_in(&n("c"), n("d"));
        late.hold_back(&n("c"));
        late.expire(1);
        assert!(!late.ask_held_back(&n("c")), "past the deadline");
    }

    #[test]
    fn an_owner_held_back_behind_a_silent_stand_in_is_named() {
        let mut t = tracker(3);
        assert!(t.held_back_behind_silence().is_empty());
        t.add_stand_in(&n("c"), n("d"));
        t.hold_back(&n("c"));
        t.add_stand_in(&n("b"), n("e"));
        t.hold_back(&n("b"));
        assert_eq!(t.held_back_behind_silence(), [n("b"), n("c")]);
        t.record(&n("e"), OK);
        assert_eq!(
            t.held_back_behind_silence(),
            [n("c")],
            "b's slot is satisfied"
        );
        let mut failed = t.clone();
        failed.record(&n("d"), err());
        assert!(
            failed.held_back_behind_silence().is_empty(),
            "no stand-in left waiting: the failure path asks c"
        );
        assert!(t.ask_held_back(&n("c")));
        assert!(t.held_back_behind_silence().is_empty(), "c is asked");
    }

    #[test]
    fn too_few_replicas_is_named() {
        let mut t = QuorumTracker::new([n("a")], 2);
        assert_eq!(t.record(&n("a"), OK), QuorumState::Failed);
        assert!(t.failure_summary().contains("only 1 nodes hold"));
    }
}
