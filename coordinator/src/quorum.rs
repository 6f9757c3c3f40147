//! Counting replica answers against R or W (Dynamo §4.5).
//!
//! A [`QuorumTracker`] is a plain value: the coordinator tells it each
//! replica's outcome as it arrives and asks whether the request has succeeded,
//! can no longer succeed, or must keep waiting. It knows nothing of sockets or
//! time; the coordinator decides when the deadline has passed and calls
//! [`QuorumTracker::expire`], after which late answers change nothing.

use ringkv_core::wire::{Outcome, Receipt, ReplicaOutcome};
use ringkv_core::NodeId;

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

/// Tracks the answers of a fixed set of replicas until `required` succeed.
///
/// Invariants: each replica's answer is recorded at most once (the first
/// wins); once expired, nothing changes.
#[derive(Debug, Clone)]
pub struct QuorumTracker {
    required: usize,
    answers: Vec<(NodeId, ReplicaAnswer)>,
    expired: bool,
}

impl QuorumTracker {
    /// `replicas` are the nodes asked; `required` of them must succeed.
    pub fn new(replicas: impl IntoIterator<Item = NodeId>, required: usize) -> Self {
        QuorumTracker {
            required,
            answers: replicas
                .into_iter()
                .map(|n| (n, ReplicaAnswer::Pending))
                .collect(),
            expired: false,
        }
    }

    /// Records `node`'s answer. Answers from unknown nodes, second answers
    /// and answers after [`expire`](Self::expire) are ignored.
    pub fn record(&mut self, node: &NodeId, answer: ReplicaAnswer) -> QuorumState {
        if !self.expired {
            if let Some((_, slot)) = self.answers.iter_mut().find(|(n, _)| n == node) {
                if *slot == ReplicaAnswer::Pending {
                    *slot = answer;
                }
            }
        }
        self.state()
    }

    /// The deadline passed: every pending replica timed out.
    pub fn expire(&mut self, latency_us: u64) -> QuorumState {
        if !self.expired {
            for (_, slot) in &mut self.answers {
                if *slot == ReplicaAnswer::Pending {
                    *slot = ReplicaAnswer::Timeout { latency_us };
                }
            }
            self.expired = true;
        }
        self.state()
    }

    pub fn state(&self) -> QuorumState {
        let ok = self.succeeded().count();
        let pending = self
            .answers
            .iter()
            .filter(|(_, a)| *a == ReplicaAnswer::Pending)
            .count();
        if ok >= self.required {
            QuorumState::Reached
        } else if ok + pending < self.required {
            QuorumState::Failed
        } else {
            QuorumState::Waiting
        }
    }

    /// The replicas that succeeded.
    pub fn succeeded(&self) -> impl Iterator<Item = &NodeId> {
        self.answers
            .iter()
            .filter(|(_, a)| matches!(a, ReplicaAnswer::Ok { .. }))
            .map(|(n, _)| n)
    }

    /// The receipt clients see. Replicas still in flight when the request
    /// completed are left out: they have no outcome yet.
    pub fn receipt(&self, coordinator: &NodeId) -> Receipt {
        Receipt {
            coordinator: Some(coordinator.clone()),
            replicas: self
                .answers
                .iter()
                .filter_map(|(node, answer)| {
                    let (outcome, latency_us, detail) = match answer {
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
                        node: node.clone(),
                        outcome,
                        latency_us,
                        detail,
                    })
                })
                .collect(),
        }
    }

    /// A sentence for a failed request: how many answered of how many were
    /// required, and what happened to the others.
    pub fn failure_summary(&self) -> String {
        let ok: Vec<&str> = self.succeeded().map(|n| n.as_str()).collect();
        let failed: Vec<String> = self
            .answers
            .iter()
            .filter_map(|(n, a)| match a {
                ReplicaAnswer::Ok { .. } => None,
                ReplicaAnswer::Pending => Some(format!("{n} (no answer)")),
                ReplicaAnswer::Timeout { .. } => Some(format!("{n} (timed out)")),
                ReplicaAnswer::Error { reason, .. } => Some(format!("{n} ({reason})")),
            })
            .collect();
        let mut s = format!(
            "{} of {} required replicas answered",
            ok.len(),
            self.required
        );
        if self.answers.len() < self.required {
            s.push_str(&format!(
                " (only {} nodes hold this key's replicas)",
                self.answers.len()
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

    #[test]
    fn late_and_duplicate_answers_change_nothing() {
        let mut t = tracker(3);
        t.record(&n("a"), OK);
        t.record(&n("a"), err());
        assert_eq!(t.expire(2_000_000), QuorumState::Failed);
        assert_eq!(t.record(&n("b"), OK), QuorumState::Failed);
        assert_eq!(t.record(&n("c"), OK), QuorumState::Failed);
        assert_eq!(t.succeeded().count(), 1);
        assert!(t.failure_summary().contains("b (timed out)"));
    }

    #[test]
    fn too_few_replicas_is_named() {
        let mut t = QuorumTracker::new([n("a")], 2);
        assert_eq!(t.record(&n("a"), OK), QuorumState::Failed);
        assert!(t.failure_summary().contains("only 1 nodes hold"));
    }
}
