//! Failure detection: which peers this node currently believes are up.
//!
//! Dynamo (§4.8) keeps failure detection local: a node considers a peer
//! failed when the peer stops answering, and checks now and then whether it
//! came back. ringkv does the same with timeouts and back-off, fed from two
//! sources: every replica request's outcome, and a light periodic probe (a
//! `Ping` over the existing QUIC connection) for peers no request happened to
//! touch.
//!
//! - A peer is **down** after [`DetectorConfig::failures_to_down`] consecutive
//!   failures (probe or request), and **up** again after any success (a
//!   request answered `NotServing` is neither: a draining node answers so,
//!   and only the probes judge it). A peer
//!   that failed once but is not down yet is a suspect and is re-probed after
//!   a quarter interval, so one lost probe costs little time to confirm.
//! - An up peer is probed every `probe_interval`; a down one with back-off,
//!   doubling up to `probe_interval_max`, so dead peers cost little but a
//!   returning one is seen within one maximum interval.
//!
//! With the defaults (probe every 1 s, 500 ms timeout, 2 failures, back-off
//! up to 2 s) a killed peer is seen as down within about 2.3 s and a returning
//! one as up within about 2 s. The detector is a plain value: time is passed in,
//! so tests drive it with any clock; [`probe_round`] is the only part that
//! talks to the network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringkv_core::wire::{Request, Response};
use ringkv_core::{NodeId, Transport};
use tokio::time::Instant;

/// Tuning of the detector.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    pub probe_interval: Duration,
    pub probe_interval_max: Duration,
    pub probe_timeout: Duration,
    pub failures_to_down: u32,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            probe_interval: Duration::from_secs(1),
            probe_interval_max: Duration::from_secs(2),
            probe_timeout: Duration::from_millis(500),
            failures_to_down: 2,
        }
    }
}

#[derive(Debug, Clone)]
struct PeerState {
    up: bool,
    consecutive_failures: u32,
    next_probe: Instant,
    backoff: Duration,
}

/// Per-peer up/down state. Peers never heard of are presumed up.
#[derive(Debug)]
pub struct FailureDetector {
    config: DetectorConfig,
    peers: Mutex<HashMap<NodeId, PeerState>>,
}

impl FailureDetector {
    pub fn new(config: DetectorConfig) -> Self {
        FailureDetector {
            config,
            peers: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<NodeId, PeerState>) -> R) -> R {
        f(&mut self.peers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn fresh(&self, now: Instant) -> PeerState {
        PeerState {
            up: true,
            consecutive_failures: 0,
            next_probe: now,
            backoff: self.config.probe_interval,
        }
    }

    /// Records that `node` answered (`ok`) or failed to, at `now`. Returns
    /// the state change, if any: `Some(true)` came up, `Some(false)` went down.
    pub fn record(&self, node: &NodeId, ok: bool, now: Instant) -> Option<bool> {
        let fresh = self.fresh(now);
        let config = &self.config;
        self.with(|peers| {
            let p = peers.entry(node.clone()).or_insert(fresh);
            let was_up = p.up;
            if ok {
                p.up = true;
                p.consecutive_failures = 0;
                p.backoff = config.probe_interval;
                p.next_probe = now + config.probe_interval;
            } else {
                p.consecutive_failures = p.consecutive_failures.saturating_add(1);
                if p.consecutive_failures >= config.failures_to_down {
                    if p.up {
                        p.backoff = config.probe_interval;
                    } else {
                        p.backoff = (p.backoff * 2).min(config.probe_interval_max);
                    }
                    p.up = false;
                    p.next_probe = now + p.backoff;
                } else {
                    // A suspect: confirm or clear it soon.
                    p.next_probe = now + config.probe_interval / 4;
                }
            }
            (was_up != p.up).then_some(p.up)
        })
    }

    /// Whether `node` is believed up.
    pub fn is_up(&self, node: &NodeId) -> bool {
        self.with(|peers| peers.get(node).is_none_or(|p| p.up))
    }

    /// Which of `members` should be probed at `now`.
    pub fn due(&self, members: &[NodeId], now: Instant) -> Vec<NodeId> {
        self.with(|peers| {
            members
                .iter()
                .filter(|m| peers.get(*m).is_none_or(|p| p.next_probe <= now))
                .cloned()
                .collect()
        })
    }

    /// Pushes the next probe of `node` out by one interval, so a probe in
    /// flight is not started twice.
    pub fn probing(&self, node: &NodeId, now: Instant) {
        let fresh = self.fresh(now);
        let step = self.config.probe_timeout + self.config.probe_interval;
        self.with(|peers| {
            let p = peers.entry(node.clone()).or_insert(fresh);
            p.next_probe = now + step;
        });
    }
}

/// Probes every peer in `members` that is due: one `Ping` each, all at once,
/// each bounded by the probe timeout. Returns the state changes.
pub async fn probe_round<T: Transport>(
    detector: &FailureDetector,
    transport: &Arc<T>,
    members: &[NodeId],
) -> Vec<(NodeId, bool)> {
    let now = Instant::now();
    let timeout = detector.config().probe_timeout;
    let mut probes = tokio::task::JoinSet::new();
    for node in detector.due(members, now) {
        detector.probing(&node, now);
        let transport = transport.clone();
        probes.spawn(async move {
            let ok = matches!(
                tokio::time::timeout(timeout, transport.call(&node, Request::Ping)).await,
                Ok(Ok(Response::Pong))
            );
            (node, ok)
        });
    }
    let mut changes = Vec::new();
    while let Some(probed) = probes.join_next().await {
        // A probe that panicked says nothing of its peer, and must not end
        // the round (dropping the set would abort the others' probes).
        let Ok((node, ok)) = probed else { continue };
        if let Some(up) = detector.record(&node, ok, Instant::now()) {
            changes.push((node, up));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn two_failures_mark_down_one_success_marks_up() {
        let d = FailureDetector::new(DetectorConfig::default());
        let t0 = Instant::now();
        assert!(d.is_up(&n("a")), "unknown peers are presumed up");
        assert_eq!(d.record(&n("a"), false, t0), None);
        assert!(d.is_up(&n("a")));
        assert_eq!(d.record(&n("a"), false, t0), Some(false));
        assert!(!d.is_up(&n("a")));
        assert_eq!(d.record(&n("a"), true, t0), Some(true));
        assert!(d.is_up(&n("a")));
    }

    #[tokio::test(start_paused = true)]
    async fn down_peers_are_probed_with_backoff_up_to_the_maximum() {
        let config = DetectorConfig::default();
        let d = FailureDetector::new(config.clone());
        let a = n("a");
        let mut now = Instant::now();
        d.record(&a, false, now);
        d.record(&a, false, now);
        let mut gaps = Vec::new();
        for _ in 0..4 {
            let next = (1..100)
                .map(|ms| now + Duration::from_millis(ms * 100))
                .find(|t| !d.due(std::slice::from_ref(&a), *t).is_empty())
                .unwrap();
            gaps.push(next - now);
            now = next;
            d.record(&a, false, now);
        }
        assert_eq!(gaps[0], config.probe_interval);
        assert!(
            gaps.iter().all(|g| *g <= config.probe_interval_max),
            "{gaps:?}"
        );
        assert_eq!(*gaps.last().unwrap(), config.probe_interval_max);
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspect_is_rechecked_sooner_than_a_healthy_peer() {
        let config = DetectorConfig::default();
        let d = FailureDetector::new(config.clone());
        let (a, b) = (n("a"), n("b"));
        let now = Instant::now();
        d.record(&a, false, now);
        d.record(&b, true, now);
        let soon = now + config.probe_interval / 4;
        assert_eq!(d.due(&[a.clone(), b.clone()], soon), vec![a]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_in_flight_is_not_started_twice() {
        let d = FailureDetector::new(DetectorConfig::default());
        let now = Instant::now();
        let members = [n("a"), n("b")];
        assert_eq!(d.due(&members, now).len(), 2);
        d.probing(&n("a"), now);
        assert_eq!(d.due(&members, now), vec![n("b")]);
    }
}
