//! What a latency matrix predicts a consistency setting's median latency
//! to be, from placement alone: the check of issue 5 ("W=2 with one local
//! and two remote replicas ≈ one round trip to the nearer remote region"),
//! computed for whatever topology the bench runs on, so that every run
//! shows how far the measured p50 is from the emulated network's.
//!
//! The model follows the coordinator (Dynamo §4.5) with every node up:
//!
//! - A client sits in its coordinator's region and pays the client leg
//!   each way.
//! - A coordinator that is one of the key's N replicas answers once the
//!   R (reads) or W (writes) nearest of them have: itself at no cost, each
//!   other one a round trip away. Reads ask the fastest peers, writes ask
//!   all N, and either way the answer comes with the k-th shortest round
//!   trip.
//! - A coordinator that is not a replica forwards the request to the first
//!   replica in ring order, which coordinates it as above.
//! - A read-modify-write is a read, then a write, through one coordinator.
//!
//! Delays are the links' `delay_ms`, without jitter or loss, and requests
//! cost no time to process: the prediction is the network's share, which
//! across regions is nearly all of it.
//!
//! **Weights.** The median is over requests, and in a closed loop a client
//! whose requests are slow sends fewer of them: each client's requests
//! count in inverse proportion to its predicted mean latency (Little's
//! law), so clients of a coordinator far from most replicas weigh less, as
//! they do in the measured histogram. Keys are drawn as the run drew
//! them: the workload's distribution over the records as the run's
//! inserts added to them (for `latest`, whose hottest keys are the
//! newest, that spreads the draws over the run's inserts), and inserts on
//! the run's new records. The prediction is made after the run, which
//! says how many records it inserted; every operation type of the mix is
//! predicted from the same draws.
//!
//! Plain computation over a ring and a matrix: no I/O, no clock.

use std::collections::HashMap;

use rand::SeedableRng;
use ringkv_core::regions::LatencyMatrix;
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::workload::{record_key, KeyChooser, KeyDistribution, Op, Workload};

/// Requests drawn per prediction: enough that the median of a mix of
/// round trips lands on the right one; each costs a preference list.
pub const SAMPLES: usize = 4_000;

/// Why no prediction could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictError {
    #[error("node {node} has no region: every node of an emulated cluster needs one")]
    NoRegion { node: NodeId },
    #[error("node {node}'s region {region:?} is not in the latency matrix")]
    UnknownRegion { node: NodeId, region: String },
    #[error("the ring has no members")]
    EmptyRing,
}

/// A cluster as the matrix sees it: where each node is, and its ring.
#[derive(Debug)]
pub struct Topology {
    ring: Ring,
    /// Round trips between members, in milliseconds (0 to itself), by
    /// one member and then the other.
    round_trip_ms: HashMap<NodeId, HashMap<NodeId, f64>>,
    /// One way between a client and its coordinator, in milliseconds.
    client_leg_ms: f64,
}

impl Topology {
    /// `regions` must give every member of `ring` a region of `matrix`.
    pub fn new(
        ring: Ring,
        regions: &HashMap<NodeId, String>,
        matrix: &LatencyMatrix,
        client_leg_ms: f64,
    ) -> Result<Self, PredictError> {
        let nodes = ring.nodes();
        if nodes.is_empty() {
            return Err(PredictError::EmptyRing);
        }
        let region_of = |node: &NodeId| {
            let region = regions
                .get(node)
                .ok_or_else(|| PredictError::NoRegion { node: node.clone() })?;
            matrix
                .check_region(region)
                .map_err(|_| PredictError::UnknownRegion {
                    node: node.clone(),
                    region: region.clone(),
                })?;
            Ok(region.as_str())
        };
        let mut round_trip_ms: HashMap<NodeId, HashMap<NodeId, f64>> = HashMap::new();
        for a in &nodes {
            for b in &nodes {
                let ms = if a == b {
                    0.0
                } else {
                    let link = matrix
                        .link(region_of(a)?, region_of(b)?)
                        .expect("both regions checked");
                    2.0 * link.delay_ms
                };
                round_trip_ms
                    .entry(a.clone())
                    .or_default()
                    .insert(b.clone(), ms);
            }
        }
        Ok(Topology {
            ring,
            round_trip_ms,
            client_leg_ms,
        })
    }

    /// Between two members; `None` if either is not one.
    fn round_trip(&self, a: &NodeId, b: &NodeId) -> Option<f64> {
        self.round_trip_ms.get(a)?.get(b).copied()
    }

    /// The network time of one request for `key` through `coordinator`
    /// that needs `acks` replicas (clamped to 1..=N), client legs included;
    /// `None` if `coordinator` is not a member of the ring.
    pub fn request_ms(&self, coordinator: &NodeId, key: &[u8], acks: usize) -> Option<f64> {
        self.placed_request_ms(coordinator, &self.ring.replicas_of(key), acks)
    }

    /// [`Self::request_ms`] for a key whose `replicas` are known.
    fn placed_request_ms(
        &self,
        coordinator: &NodeId,
        replicas: &[NodeId],
        acks: usize,
    ) -> Option<f64> {
        let (at, forward_ms) = if replicas.contains(coordinator) {
            (coordinator, 0.0)
        } else {
            let first = replicas.first()?;
            (first, self.round_trip(coordinator, first)?)
        };
        let mut trips = replicas
            .iter()
            .map(|r| self.round_trip(at, r))
            .collect::<Option<Vec<f64>>>()?;
        trips.sort_by(f64::total_cmp);
        let k = acks.clamp(1, trips.len());
        Some(2.0 * self.client_leg_ms + forward_ms + trips[k - 1])
    }
}

/// One operation's predicted p50, in milliseconds, with the 45th and
/// 55th percentiles around it.
///
/// Latencies across regions come in modes, one per round trip, and a
/// median can fall where one mode ends and the next begins: then a few
/// requests more or less in the faster mode (a run's keys, its clients'
/// pace) move the p50 from one mode to the next. The band says how
/// fragile the p50 is: where `p45_ms` and `p55_ms` differ, a measured p50
/// anywhere between them agrees with the prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpPrediction {
    pub op: Op,
    pub p50_ms: f64,
    pub p45_ms: f64,
    pub p55_ms: f64,
}

/// Percentiles less than this far apart (as a ratio) are one mode: the
/// same round trip, give or take a hop within a region.
const BAND_MIN_RATIO: f64 = 1.05;

impl OpPrediction {
    /// The 45th to 55th percentiles, where they are different modes.
    pub fn band(&self) -> Option<(f64, f64)> {
        (self.p55_ms > self.p45_ms * BAND_MIN_RATIO).then_some((self.p45_ms, self.p55_ms))
    }

    /// How far `measured_ms` is from the prediction, relative to it: from
    /// the band's nearer end (0 within it), or from the p50 without one.
    pub fn off_by(&self, measured_ms: f64) -> f64 {
        let nearest = match self.band() {
            Some((low, high)) => measured_ms.clamp(low, high),
            None => self.p50_ms,
        };
        measured_ms / nearest - 1.0
    }
}

/// What to predict for: the run's clients and requests.
pub struct Requests<'a> {
    /// Each coordinator, with the number of clients that send to it.
    pub coordinators: &'a [(NodeId, usize)],
    pub workload: Workload,
    pub distribution: KeyDistribution,
    /// Records when the run began...
    pub records: u64,
    /// ...and when it ended: its inserts are the records between.
    pub records_after: u64,
    pub key_prefix: &'a str,
    pub seed: u64,
}

/// The predicted p50 of each operation type of the workload, at read and
/// write quorums `r` and `w` (see the module docs for the model).
pub fn predict_p50(
    topology: &Topology,
    requests: &Requests<'_>,
    r: usize,
    w: usize,
) -> Vec<OpPrediction> {
    let mix = requests.workload.mix();
    // Each draw's replicas, placed once for every coordinator and op.
    let placed = |records: Vec<u64>| -> Vec<Vec<NodeId>> {
        records
            .iter()
            .map(|r| {
                topology
                    .ring
                    .replicas_of(record_key(requests.key_prefix, *r).as_bytes())
            })
            .collect()
    };
    let (existing, fresh) = draw_records(requests);
    let (existing, fresh) = (placed(existing), placed(fresh));
    // Per operation type of the mix: (latency, weight) of each draw
    // through each coordinator.
    let mut weighted: Vec<Vec<(f64, f64)>> = vec![Vec::new(); mix.len()];
    for (coordinator, clients) in requests.coordinators {
        // A coordinator off the ring has no requests to predict.
        if *clients == 0 || !topology.ring.has_node(coordinator) {
            continue;
        }
        let per_op: Vec<Vec<f64>> = mix
            .iter()
            .map(|(op, _)| {
                let keys = if *op == Op::Insert { &fresh } else { &existing };
                let ms = |replicas: &[NodeId], acks| {
                    topology
                        .placed_request_ms(coordinator, replicas, acks)
                        .expect("the coordinator is a member")
                };
                keys.iter()
                    .map(|replicas| match op {
                        Op::Read => ms(replicas, r),
                        Op::Update | Op::Insert => ms(replicas, w),
                        Op::ReadModifyWrite => ms(replicas, r) + ms(replicas, w),
                    })
                    .collect()
            })
            .collect();
        // The client's mean request, over the mix.
        let mean: f64 = mix
            .iter()
            .zip(&per_op)
            .map(|((_, share), ms)| share * ms.iter().sum::<f64>() / ms.len() as f64)
            .sum();
        // A microsecond floor: a cluster with no delays at all weighs its
        // clients alike rather than dividing by zero.
        let weight = *clients as f64 / mean.max(0.001);
        for (out, ms) in weighted.iter_mut().zip(per_op) {
            out.extend(ms.into_iter().map(|ms| (ms, weight)));
        }
    }
    mix.iter()
        .zip(weighted)
        .filter_map(|((op, _), mut of_op)| {
            of_op.sort_by(|a, b| a.0.total_cmp(&b.0));
            Some(OpPrediction {
                op: *op,
                p50_ms: weighted_quantile(&of_op, 0.50)?,
                p45_ms: weighted_quantile(&of_op, 0.45)?,
                p55_ms: weighted_quantile(&of_op, 0.55)?,
            })
        })
        .collect()
}

/// The records the prediction draws: [`SAMPLES`] existing ones, as the
/// run's reads and updates choose them, and as many new ones, as its
/// inserts write them. Every operation type is evaluated on the same
/// draws, so that a rare one (5% of workload B) is predicted from as many
/// as a common one.
fn draw_records(requests: &Requests<'_>) -> (Vec<u64>, Vec<u64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(requests.seed);
    // As the run builds its chooser: a workload that inserts spreads its
    // zipfian over room for them.
    let inserts = requests
        .workload
        .mix()
        .iter()
        .any(|(op, _)| *op == Op::Insert);
    let mut chooser = KeyChooser::new(requests.distribution, requests.records, inserts);
    // The run's inserts, spread over its course: draw i sees the records
    // that existed i/SAMPLES of the way through. That matters for
    // `latest`, whose hot records are the newest: a run's reads follow its
    // inserts over many keys, not the load's last few.
    let inserted = requests.records_after.saturating_sub(requests.records);
    let records_at = |i: u64| requests.records + inserted * i / SAMPLES as u64;
    let existing = (0..SAMPLES as u64)
        .map(|i| {
            chooser.grow_to(records_at(i));
            chooser.next_existing(&mut rng)
        })
        .collect();
    // The run's own inserts; a run that made none (they all failed)
    // would have written the next records.
    let fresh = (0..SAMPLES as u64)
        .map(|i| match inserted {
            0 => requests.records + i,
            _ => records_at(i),
        })
        .collect();
    (existing, fresh)
}

/// The first of `sorted` (value, weight) pairs, in value order, at which
/// the weight so far reaches `q` of the whole; `None` for no values.
fn weighted_quantile(sorted: &[(f64, f64)], q: f64) -> Option<f64> {
    let total: f64 = sorted.iter().map(|(_, w)| w).sum();
    let mut seen = 0.0;
    for (value, weight) in sorted {
        seen += weight;
        if seen >= total * q {
            return Some(*value);
        }
    }
    sorted.last().map(|(v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// One-way delays: a–b 40 ms, a–c 60 ms, b–c 50 ms, 0.5 ms within a
    /// region.
    fn matrix() -> LatencyMatrix {
        LatencyMatrix::parse_toml(
            r#"
regions = ["a", "b", "c"]
[local]
delay_ms = 0.5
[[link]]
between = ["a", "b"]
delay_ms = 40
[[link]]
between = ["a", "c"]
delay_ms = 60
jitter_ms = 5
[[link]]
between = ["b", "c"]
delay_ms = 50
"#,
        )
        .unwrap()
    }

    fn topology(members: &[(&str, &str)], n: usize, client_leg_ms: f64) -> Topology {
        let ring = Ring::new(members.iter().map(|(m, _)| (id(m), 64)), n).unwrap();
        let regions = members
            .iter()
            .map(|(m, r)| (id(m), r.to_string()))
            .collect();
        Topology::new(ring, &regions, &matrix(), client_leg_ms).unwrap()
    }

    impl Topology {
        fn request_ms_some(&self, coordinator: &NodeId, key: &[u8], acks: usize) -> f64 {
            self.request_ms(coordinator, key, acks).unwrap()
        }
    }

    /// A prediction with no band: every percentile alike.
    fn single(op: Op, ms: f64) -> OpPrediction {
        OpPrediction {
            op,
            p50_ms: ms,
            p45_ms: ms,
            p55_ms: ms,
        }
    }

    fn requests<'a>(coordinators: &'a [(NodeId, usize)], workload: Workload) -> Requests<'a> {
        Requests {
            coordinators,
            workload,
            distribution: KeyDistribution::Uniform,
            records: 1000,
            records_after: 1000,
            key_prefix: "p:",
            seed: 7,
        }
    }

    /// Every node a replica (N = 3 on three nodes): the k-th nearest
    /// replica's round trip, itself first, plus the client legs.
    #[test]
    fn a_replica_coordinator_waits_for_its_kth_nearest_replica() {
        let t = topology(&[("n1", "a"), ("n2", "b"), ("n3", "c")], 3, 1.0);
        let key = b"any key";
        assert_eq!(t.request_ms_some(&id("n1"), key, 1), 2.0);
        assert_eq!(t.request_ms_some(&id("n1"), key, 2), 2.0 + 80.0);
        assert_eq!(t.request_ms_some(&id("n1"), key, 3), 2.0 + 120.0);
        assert_eq!(t.request_ms_some(&id("n3"), key, 2), 2.0 + 100.0);
        // Above N counts as N; 0 as 1.
        assert_eq!(t.request_ms_some(&id("n2"), key, 9), 2.0 + 100.0);
        assert_eq!(t.request_ms_some(&id("n2"), key, 0), 2.0);
    }

    /// A coordinator outside the preference list forwards to the first
    /// replica in ring order, which coordinates: not to the nearest one,
    /// which the key chosen here has too (n1, in n4's region).
    #[test]
    fn an_outsider_forwards_to_the_first_replica() {
        let members = [("n1", "a"), ("n2", "b"), ("n3", "c"), ("n4", "a")];
        let t = topology(&members, 2, 0.0);
        let ring = Ring::new(members.iter().map(|(m, _)| (id(m), 64)), 2).unwrap();
        // A key of which n4 is no replica and n1 the second.
        let key = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| {
                let replicas = ring.replicas_of(k);
                !replicas.contains(&id("n4")) && replicas[1] == id("n1")
            })
            .unwrap();
        let replicas = ring.replicas_of(&key);
        let region = |n: &NodeId| members.iter().find(|(m, _)| id(m) == *n).unwrap().1;
        let one_way = |a: &str, b: &str| matrix().link(a, b).unwrap().delay_ms;
        let (first, second) = (&replicas[0], &replicas[1]);
        let forward = 2.0 * one_way("a", region(first));
        assert!(forward >= 80.0, "the first replica is in another region");
        assert_eq!(t.request_ms_some(&id("n4"), &key, 1), forward);
        assert_eq!(
            t.request_ms_some(&id("n4"), &key, 2),
            forward + 2.0 * one_way(region(first), region(second))
        );
    }

    /// One node per region, N = 3: every read through n1 waits for b's
    /// round trip at R=2, so that is the median; a read-modify-write adds
    /// the write's W=3 to it.
    #[test]
    fn the_median_of_a_uniform_topology_is_its_one_round_trip() {
        let t = topology(&[("n1", "a"), ("n2", "b"), ("n3", "c")], 3, 0.5);
        let through_n1 = [(id("n1"), 4)];
        let c = predict_p50(&t, &requests(&through_n1, Workload::C), 2, 2);
        assert_eq!(c, vec![single(Op::Read, 81.0)]);
        let f = predict_p50(&t, &requests(&through_n1, Workload::F), 2, 3);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0], single(Op::Read, 81.0));
        assert_eq!(f[1], single(Op::ReadModifyWrite, 81.0 + 121.0));
    }

    /// Workload D's inserts write new records, at W; its reads, at R=1,
    /// stay local.
    #[test]
    fn inserts_are_predicted_at_w() {
        let t = topology(&[("n1", "a"), ("n2", "b"), ("n3", "c")], 3, 0.5);
        let through_n2 = [(id("n2"), 2)];
        let d = predict_p50(&t, &requests(&through_n2, Workload::D), 1, 3);
        assert_eq!(d, vec![single(Op::Read, 1.0), single(Op::Insert, 101.0),]);
    }

    /// `latest` reads follow the run's inserts: with none, the draws are
    /// the load's newest records; with a run of inserts, they spread over
    /// what it inserted. Inserts are the run's own records.
    #[test]
    fn latest_reads_follow_the_runs_inserts() {
        let none = [];
        let run = |records_after| Requests {
            distribution: KeyDistribution::Latest,
            records_after,
            ..requests(&none, Workload::D)
        };
        let (existing, fresh) = draw_records(&run(1000));
        let share_newest = |drawn: &[u64], from: u64| {
            drawn.iter().filter(|r| **r >= from).count() as f64 / drawn.len() as f64
        };
        assert!(existing.iter().all(|r| *r < 1000));
        // Zipfian back from the newest: 40% of draws in the last 10
        // records, 70% in the last 100.
        assert!(
            share_newest(&existing, 990) > 0.3,
            "latest: the newest most"
        );
        assert!(share_newest(&existing, 900) > 0.6);
        assert_eq!(fresh[..3], [1000, 1001, 1002]);
        let (existing, fresh) = draw_records(&run(3000));
        assert!(existing.iter().all(|r| *r < 3000));
        // Most draws are of records the run inserted, and from all along
        // it (a quarter of the run inserted from 2500 on): no last few
        // records draw most of them.
        assert!(share_newest(&existing, 1000) > 0.8);
        let late = share_newest(&existing, 2500);
        assert!((0.1..0.3).contains(&late), "{late}");
        assert!(share_newest(&existing, 2990) < 0.05);
        assert!(fresh.iter().all(|r| (1000..3000).contains(r)));
        assert_eq!(fresh[SAMPLES / 2], 2000);
    }

    /// Clients spread over the three nodes at R=2: n1's reads take 80 ms,
    /// n2's 80 and n3's 100. Closed-loop weights: n3's clients send 80/100
    /// as many, which keeps the median at 80; with n3 holding most of the
    /// clients it moves to 100.
    #[test]
    fn slower_clients_weigh_less_in_the_median() {
        let t = topology(&[("n1", "a"), ("n2", "b"), ("n3", "c")], 3, 0.0);
        // (clients on n1, n2 and n3; the median)
        let cases = [
            ([1, 1, 1], 80.0),
            ([1, 1, 4], 100.0),
            // The line between: 3 clients on n3 weigh 3/100 against the
            // others' 2/80, past half, so 100; 2 weigh 2/100, short of it.
            ([1, 1, 3], 100.0),
            ([1, 1, 2], 80.0),
            // Only the weights tell this one: by count alone n3's 6
            // clients would outnumber n1's 5, but they send 6/100
            // against 5/80.
            ([5, 0, 6], 80.0),
        ];
        for (clients, median) in cases {
            let coordinators: Vec<(NodeId, usize)> = ["n1", "n2", "n3"]
                .iter()
                .map(|n| id(n))
                .zip(clients)
                .collect();
            let p = predict_p50(&t, &requests(&coordinators, Workload::C), 2, 2);
            assert_eq!(p[0].p50_ms, median, "{clients:?}");
        }
    }

    #[test]
    fn nodes_off_the_matrix_or_the_ring_get_no_prediction() {
        let ring = Ring::new([(id("n1"), 8), (id("n2"), 8)], 2).unwrap();
        let both: HashMap<NodeId, String> =
            [(id("n1"), "a".to_string()), (id("n2"), "b".to_string())].into();
        // A coordinator off the ring: no figure, and no requests counted.
        let t = Topology::new(ring.clone(), &both, &matrix(), 0.0).unwrap();
        assert_eq!(t.request_ms(&id("n9"), b"k", 1), None);
        let off_ring = [(id("n9"), 3)];
        assert!(predict_p50(&t, &requests(&off_ring, Workload::C), 1, 1).is_empty());
        let regions: HashMap<NodeId, String> = [(id("n1"), "a".to_string())].into();
        assert_eq!(
            Topology::new(ring.clone(), &regions, &matrix(), 0.0).unwrap_err(),
            PredictError::NoRegion { node: id("n2") }
        );
        let regions: HashMap<NodeId, String> =
            [(id("n1"), "a".to_string()), (id("n2"), "mars".to_string())].into();
        assert_eq!(
            Topology::new(ring, &regions, &matrix(), 0.0).unwrap_err(),
            PredictError::UnknownRegion {
                node: id("n2"),
                region: "mars".to_string()
            }
        );
    }

    #[test]
    fn a_weighted_quantile_takes_the_value_whose_weight_crosses_it() {
        assert_eq!(weighted_quantile(&[], 0.5), None);
        assert_eq!(weighted_quantile(&[(5.0, 1.0)], 0.5), Some(5.0));
        let three = [(1.0, 1.0), (4.0, 1.0), (9.0, 1.0)];
        assert_eq!(weighted_quantile(&three, 0.5), Some(4.0));
        assert_eq!(weighted_quantile(&three, 0.2), Some(1.0));
        assert_eq!(weighted_quantile(&three, 0.9), Some(9.0));
        // Weight, not count: one heavy value wins.
        let heavy = [(1.0, 1.0), (2.0, 1.0), (30.0, 5.0)];
        assert_eq!(weighted_quantile(&heavy, 0.5), Some(30.0));
    }

    /// Half the requests at 80 ms and half at 100: the median is on the
    /// line between the modes, and the band spans both; a measured p50 in
    /// either agrees with it, one outside is off by its distance to the
    /// nearer end.
    #[test]
    fn a_median_between_two_modes_has_a_band_across_both() {
        let t = topology(&[("n1", "a"), ("n2", "b"), ("n3", "c")], 3, 0.0);
        // n1's reads take 80 ms (R=2), n3's 100: 4 clients on n1 and 5 on
        // n3 send equally many (4/80 = 5/100), so the median is on the line.
        let p = predict_p50(
            &t,
            &requests(&[(id("n1"), 4), (id("n3"), 5)], Workload::C),
            2,
            2,
        );
        let read = p[0];
        assert_eq!((read.p45_ms, read.p55_ms), (80.0, 100.0), "{read:?}");
        assert_eq!(read.band(), Some((80.0, 100.0)));
        assert_eq!(read.off_by(80.0), 0.0);
        assert_eq!(read.off_by(100.0), 0.0);
        assert_eq!(read.off_by(90.0), 0.0);
        assert!((read.off_by(110.0) - 0.1).abs() < 1e-9);
        assert!((read.off_by(72.0) + 0.1).abs() < 1e-9);
        // One mode alone: no band.
        let one = predict_p50(&t, &requests(&[(id("n1"), 1)], Workload::C), 2, 2)[0];
        assert_eq!((one.p45_ms, one.p50_ms, one.p55_ms), (80.0, 80.0, 80.0));
        assert_eq!(one.band(), None);
        assert!((one.off_by(84.0) - 0.05).abs() < 1e-9);
        // Percentiles a hop within a region apart are one mode too: the
        // measured p50 is compared with the p50.
        let near = OpPrediction {
            p45_ms: 80.0,
            p55_ms: 81.0,
            ..one
        };
        assert_eq!(near.band(), None);
        assert!((near.off_by(80.0) - 0.0).abs() < 1e-9);
        assert!((near.off_by(81.0) - 1.0 / 80.0).abs() < 1e-9);
    }
}
