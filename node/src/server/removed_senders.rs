//! What a member says in its log when it refuses a replica request from a
//! node it removed (see `Request::ReplicaFrom`): once a minute per sender at
//! most. Such a node was removed while cut off and has not heard of it; the
//! refusal makes it ask for the cluster's record and stop, so one line is
//! usual. A sender that goes on for minutes has not learned (its announces
//! fail, say), and its operator should stop it by hand.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ringkv_core::NodeId;

/// How often one sender's refusals are logged at most.
pub(super) const LOG_EVERY: Duration = Duration::from_secs(60);

/// Senders refused lately, with when each was last logged.
///
/// Invariant: holds at most [`RemovedSenders::SENDERS_MAX`] entries (only
/// removed ids that sent come in; older entries are dropped first).
#[derive(Debug, Default)]
pub(super) struct RemovedSenders {
    logged: HashMap<NodeId, Instant>,
}

impl RemovedSenders {
    const SENDERS_MAX: usize = 64;

    /// Whether a refusal of `from` at `now` should be logged; notes it if
    /// so.
    pub(super) fn should_log(&mut self, from: &NodeId, now: Instant) -> bool {
        if let Some(last) = self.logged.get(from) {
            if now.saturating_duration_since(*last) < LOG_EVERY {
                return false;
            }
        }
        if self.logged.len() >= Self::SENDERS_MAX && !self.logged.contains_key(from) {
            self.logged
                .retain(|_, last| now.saturating_duration_since(*last) < LOG_EVERY);
            if self.logged.len() >= Self::SENDERS_MAX {
                // Every one logged within the minute: drop the oldest.
                if let Some(oldest) = self
                    .logged
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(id, _)| id.clone())
                {
                    self.logged.remove(&oldest);
                }
            }
        }
        self.logged.insert(from.clone(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender's first refusal is logged, the next within the minute is
    /// not, and one a minute later is; each sender on its own; the map
    /// stays bounded.
    #[test]
    fn a_removed_sender_is_logged_once_a_minute() {
        let (n3, n4) = (NodeId::new("n3").unwrap(), NodeId::new("n4").unwrap());
        let mut senders = RemovedSenders::default();
        let t0 = Instant::now();
        assert!(senders.should_log(&n3, t0));
        assert!(!senders.should_log(&n3, t0 + Duration::from_secs(59)));
        assert!(senders.should_log(&n4, t0 + Duration::from_secs(1)));
        assert!(senders.should_log(&n3, t0 + LOG_EVERY));
        for i in 0..200 {
            let id = NodeId::new(format!("z{i}")).unwrap();
            assert!(senders.should_log(&id, t0 + Duration::from_secs(61)));
        }
        assert!(senders.logged.len() <= RemovedSenders::SENDERS_MAX);
    }
}
