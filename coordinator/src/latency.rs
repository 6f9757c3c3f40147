//! Which replicas a read asks first: the nearest by recent latency.
//!
//! Dynamo's coordinator sends a read to all N replicas and keeps the first R
//! answers; Cassandra asks only as many as the consistency level needs,
//! chosen by a "dynamic snitch" that ranks replicas by recent latency, and
//! asks one more (a *speculative retry*) when an answer is late. ringkv does
//! the latter by default: a read at R asks the coordinator itself (no network
//! hop) and the R-1 peers that have answered fastest lately, so a quorum read
//! costs R replica reads instead of N, and in a cluster spread over regions
//! the local quorum is the near one. The other replicas are *spares*, asked
//! when a chosen one fails or is later than [`ReplicaLatency::speculate_after`].
//!
//! Every answer (to reads and writes, which still go to all N) updates an
//! exponentially weighted moving average per peer, so the ranking follows
//! load and a recovered peer wins its place back. A share of reads still
//! asks everyone (`read_repair_chance`), so read repair keeps judging every
//! replica. Sans-I/O: latencies are passed in, nothing here reads a clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ringkv_core::NodeId;

/// Weight of the newest sample in the moving average (1/8, as TCP's SRTT).
const EWMA_WEIGHT: f64 = 0.125;

/// A spare is never asked sooner than this after the request began: below
/// it, scheduling noise alone would trigger retries.
pub const SPECULATE_MIN: Duration = Duration::from_millis(5);

/// A chosen replica is "late" once it has taken this many times its
/// average; about the 99th percentile of a latency with an exponential tail.
const SPECULATE_FACTOR: f64 = 4.0;

/// Recent latency per peer.
///
/// Invariant: every stored average is the EWMA of the samples recorded for
/// that peer, and a peer never recorded ranks before every recorded one (it
/// is tried so that it gets measured).
#[derive(Debug, Default)]
pub struct ReplicaLatency {
    ewma_us: Mutex<HashMap<NodeId, f64>>,
}

impl ReplicaLatency {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one answer of `node` after `latency_us`.
    pub fn record(&self, node: &NodeId, latency_us: u64) {
        let sample = latency_us as f64;
        let mut map = self.ewma_us.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(node) {
            Some(avg) => *avg += EWMA_WEIGHT * (sample - *avg),
            None => {
                map.insert(node.clone(), sample);
            }
        }
    }

    /// Forgets every node `keep` rejects (nodes that left the cluster), so
    /// the map stays as large as the membership.
    pub fn retain(&self, keep: impl Fn(&NodeId) -> bool) {
        let mut map = self.ewma_us.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|node, _| keep(node));
    }

    /// The moving average of `node`, if it ever answered.
    pub fn average_us(&self, node: &NodeId) -> Option<f64> {
        self.ewma_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }

    /// `nodes` from fastest to slowest; never-measured ones first, ties in
    /// the given order (the ring's).
    pub fn rank(&self, nodes: &mut [NodeId]) {
        let map = self.ewma_us.lock().unwrap_or_else(|p| p.into_inner());
        nodes.sort_by(|a, b| {
            let key = |n: &NodeId| map.get(n).copied().unwrap_or(f64::NEG_INFINITY);
            key(a).total_cmp(&key(b))
        });
    }

    /// How long after a read began its spares are asked, given the peers it
    /// asked first: `SPECULATE_FACTOR` times the slowest one's average, at
    /// least [`SPECULATE_MIN`], at most `cap`.
    pub fn speculate_after(&self, asked: &[NodeId], cap: Duration) -> Duration {
        let map = self.ewma_us.lock().unwrap_or_else(|p| p.into_inner());
        let slowest_us = asked
            .iter()
            .filter_map(|n| map.get(n).copied())
            .fold(0.0, f64::max);
        Duration::from_micros((slowest_us * SPECULATE_FACTOR) as u64)
            .max(SPECULATE_MIN)
            .min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn the_average_moves_an_eighth_of_the_way_to_each_sample() {
        let l = ReplicaLatency::new();
        l.record(&id("a"), 1000);
        assert_eq!(l.average_us(&id("a")), Some(1000.0));
        l.record(&id("a"), 9000);
        assert_eq!(l.average_us(&id("a")), Some(2000.0));
        assert_eq!(l.average_us(&id("b")), None);
    }

    #[test]
    fn ranking_puts_unmeasured_then_fastest_first_and_keeps_ring_order_on_ties() {
        let l = ReplicaLatency::new();
        l.record(&id("slow"), 5000);
        l.record(&id("fast"), 100);
        l.record(&id("fast2"), 100);
        let mut nodes = vec![id("slow"), id("fast"), id("new"), id("fast2")];
        l.rank(&mut nodes);
        assert_eq!(nodes, [id("new"), id("fast"), id("fast2"), id("slow")]);
    }

    #[test]
    fn a_peer_that_slows_down_loses_its_place() {
        let l = ReplicaLatency::new();
        l.record(&id("a"), 100);
        l.record(&id("b"), 300);
        for _ in 0..20 {
            l.record(&id("a"), 2000);
        }
        let mut nodes = vec![id("a"), id("b")];
        l.rank(&mut nodes);
        assert_eq!(nodes, [id("b"), id("a")]);
    }

    #[test]
    fn speculation_waits_a_multiple_of_the_slowest_asked_within_bounds() {
        let l = ReplicaLatency::new();
        let cap = Duration::from_millis(500);
        assert_eq!(l.speculate_after(&[id("x")], cap), SPECULATE_MIN);
        l.record(&id("a"), 10_000);
        l.record(&id("b"), 20_000);
        assert_eq!(
            l.speculate_after(&[id("a"), id("b")], cap),
            Duration::from_millis(80)
        );
        l.record(&id("c"), 1_000_000);
        assert_eq!(l.speculate_after(&[id("c")], cap), cap);
    }
}
