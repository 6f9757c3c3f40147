//! YCSB core workloads (Cooper et al., "Benchmarking Cloud Serving Systems
//! with YCSB", SoCC 2010): what each operation is and which key it touches.
//!
//! A workload is an operation mix and a request distribution:
//!
//! | workload | mix | keys |
//! |---|---|---|
//! | A (update heavy) | 50% read, 50% update | zipfian |
//! | B (read mostly) | 95% read, 5% update | zipfian |
//! | C (read only) | 100% read | zipfian |
//! | D (read latest) | 95% read, 5% insert | latest |
//! | F (read-modify-write) | 50% read, 50% read-modify-write | zipfian |
//!
//! Workload E (short range scans) is not offered: keys are placed by hash,
//! so ringkv has no range scans to measure.
//!
//! The zipfian distribution is YCSB's `ScrambledZipfianGenerator`: ranks
//! drawn with constant 0.99 by Gray et al.'s method ("Quickly generating
//! billion-record synthetic databases", SIGMOD 1994) over a fixed 10^10
//! items, each rank hashed (FNV-1a) onto the records. The hot keys are so
//! spread over the key space and the ring instead of being keys 0, 1, 2…,
//! and, as in YCSB, the skew hardly depends on the record count: from a few
//! thousand records on, the hottest key gets about 4% of requests
//! (1/ζ(10^10); with fewer records, ranks share keys and it gets more). A
//! zipfian over just the records would give it 13% at 1,000 records and
//! overstate hot-key contention. "Latest" picks recently inserted keys
//! most often: the newest key is rank 0 of a zipfian over the current
//! record count.
//!
//! Everything here is plain code over a caller's RNG, so a seed gives the
//! same sequence of operations every time.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// YCSB's zipfian constant.
pub const ZIPFIAN_CONSTANT: f64 = 0.99;

/// The items a scrambled zipfian draws its ranks over, whatever the record
/// count (YCSB's `ScrambledZipfianGenerator.ITEM_COUNT`).
pub const SCRAMBLED_ITEM_COUNT: u64 = 10_000_000_000;

/// ζ(10^10) for constant 0.99, precomputed as YCSB does
/// (`ScrambledZipfianGenerator.ZETAN`): summing 10^10 terms would take
/// minutes.
const SCRAMBLED_ZETAN: f64 = 26.469_028_201_783_02;

/// What one request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    /// A blind overwrite of an existing key.
    Update,
    /// A new key, past the current record count.
    Insert,
    /// A read, then a write carrying the read's context.
    ReadModifyWrite,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Insert => "insert",
            Op::ReadModifyWrite => "rmw",
        }
    }
}

/// How keys are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDistribution {
    /// Scrambled zipfian with constant 0.99.
    Zipfian,
    /// Zipfian over recency: the newest keys are the hottest.
    Latest,
    Uniform,
}

/// A request distribution name that is not zipfian, latest or uniform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown request distribution {name:?}; use zipfian, latest or uniform")]
pub struct UnknownDistribution {
    pub name: String,
}

impl FromStr for KeyDistribution {
    type Err = UnknownDistribution;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "zipfian" => Ok(KeyDistribution::Zipfian),
            "latest" => Ok(KeyDistribution::Latest),
            "uniform" => Ok(KeyDistribution::Uniform),
            _ => Err(UnknownDistribution {
                name: s.to_string(),
            }),
        }
    }
}

impl KeyDistribution {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyDistribution::Zipfian => "zipfian",
            KeyDistribution::Latest => "latest",
            KeyDistribution::Uniform => "uniform",
        }
    }
}

/// One of YCSB's core workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    A,
    B,
    C,
    D,
    F,
}

/// A workload name that is not one of A, B, C, D, F.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload E (range scans) is not supported: ringkv places keys by hash and has no scans; use a, b, c, d or f")]
    Scans,
    #[error("unknown workload {name:?}; use a, b, c, d or f (YCSB core workloads)")]
    Unknown { name: String },
}

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        let name = name
            .strip_prefix("workload")
            .unwrap_or(&name)
            .trim_start_matches(['-', '_']);
        match name {
            "a" => Ok(Workload::A),
            "b" => Ok(Workload::B),
            "c" => Ok(Workload::C),
            "d" => Ok(Workload::D),
            "e" => Err(WorkloadError::Scans),
            "f" => Ok(Workload::F),
            _ => Err(WorkloadError::Unknown {
                name: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Workload::A => "A",
            Workload::B => "B",
            Workload::C => "C",
            Workload::D => "D",
            Workload::F => "F",
        };
        write!(f, "{name}")
    }
}

impl Workload {
    /// The operation mix: (operation, proportion), proportions summing to 1.
    pub fn mix(self) -> &'static [(Op, f64)] {
        match self {
            Workload::A => &[(Op::Read, 0.5), (Op::Update, 0.5)],
            Workload::B => &[(Op::Read, 0.95), (Op::Update, 0.05)],
            Workload::C => &[(Op::Read, 1.0)],
            Workload::D => &[(Op::Read, 0.95), (Op::Insert, 0.05)],
            Workload::F => &[(Op::Read, 0.5), (Op::ReadModifyWrite, 0.5)],
        }
    }

    pub fn distribution(self) -> KeyDistribution {
        match self {
            Workload::D => KeyDistribution::Latest,
            _ => KeyDistribution::Zipfian,
        }
    }

    /// The next operation.
    pub fn next_op(self, rng: &mut impl Rng) -> Op {
        let mut u: f64 = rng.gen();
        for (op, p) in self.mix() {
            if u < *p {
                return *op;
            }
            u -= p;
        }
        self.mix().last().expect("a mix is never empty").0
    }
}

/// Zipfian ranks over `0..n` (0 the most popular), by Gray et al.'s method.
/// `grow_to` extends `n` incrementally, as inserts add records.
#[derive(Debug, Clone)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    zeta2: f64,
    eta: f64,
}

impl Zipfian {
    /// Ranks over `0..n` (n ≥ 1) with constant `theta` (0 < theta < 1).
    pub fn new(n: u64, theta: f64) -> Self {
        let n = n.max(1);
        let mut z = Self::empty(theta);
        z.grow_to(n);
        z
    }

    /// Ranks over `0..n` whose ζ(n) is known (`zetan`): `n` may then be far
    /// too large to sum.
    pub fn with_zetan(n: u64, theta: f64, zetan: f64) -> Self {
        let mut z = Self::empty(theta);
        z.n = n.max(1);
        z.zetan = zetan;
        z.eta = z.eta_for(z.n);
        z
    }

    fn empty(theta: f64) -> Self {
        Zipfian {
            n: 0,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan: 0.0,
            zeta2: zeta(0, 2, theta, 0.0),
            eta: 0.0,
        }
    }

    fn eta_for(&self, n: u64) -> f64 {
        (1.0 - (2.0 / n as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan)
    }

    pub fn n(&self) -> u64 {
        self.n
    }

    /// Extends the ranks to `0..n` (a no-op if `n` is not larger).
    pub fn grow_to(&mut self, n: u64) {
        if n <= self.n {
            return;
        }
        self.zetan = zeta(self.n, n, self.theta, self.zetan);
        self.n = n;
        self.eta = self.eta_for(n);
    }

    /// The next rank, in `0..n`.
    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let rank = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n - 1)
    }
}

/// `sum_{i=from+1}^{to} 1/i^theta`, added to `partial` (the sum up to `from`).
fn zeta(from: u64, to: u64, theta: f64, partial: f64) -> f64 {
    (from + 1..=to).fold(partial, |sum, i| sum + 1.0 / (i as f64).powf(theta))
}

/// FNV-1a of a rank: YCSB's scramble, so hot ranks land on scattered keys.
fn fnv64(v: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in v.to_le_bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Chooses record numbers in `0..records` for reads and updates, and hands
/// out new record numbers for inserts.
#[derive(Debug, Clone)]
pub struct KeyChooser {
    distribution: KeyDistribution,
    records: u64,
    /// What the scrambled zipfian's ranks are spread over: fixed for the
    /// run, as in YCSB, so that inserts do not move the hot keys (clients
    /// learn of inserts at different moments; with a changing modulus
    /// they would disagree on which keys are hot). A draw at or past
    /// `records` is drawn again.
    scramble_space: u64,
    zipf: Zipfian,
}

/// Draws past the existing records before a scrambled choice gives up
/// drawing again and folds its draw onto them.
const SCRAMBLE_REDRAWS_MAX: u32 = 64;

impl KeyChooser {
    /// Over `records` existing records (at least 1), and as many again for
    /// inserts if the workload makes any (`inserts`: YCSB sizes this by
    /// the expected inserts; a timed run does not know them).
    pub fn new(distribution: KeyDistribution, records: u64, inserts: bool) -> Self {
        let records = records.max(1);
        let scramble_space = if inserts {
            records.saturating_mul(2)
        } else {
            records
        };
        let zipf = match distribution {
            KeyDistribution::Latest => Zipfian::new(records, ZIPFIAN_CONSTANT),
            // Uniform draws no ranks; the zipfian's are over a fixed
            // count, so inserts do not change them.
            KeyDistribution::Zipfian | KeyDistribution::Uniform => {
                Zipfian::with_zetan(SCRAMBLED_ITEM_COUNT, ZIPFIAN_CONSTANT, SCRAMBLED_ZETAN)
            }
        };
        KeyChooser {
            distribution,
            records,
            scramble_space,
            zipf,
        }
    }

    /// Records that exist now (the load's, plus inserts).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// An existing record to read or update.
    pub fn next_existing(&self, rng: &mut impl Rng) -> u64 {
        match self.distribution {
            KeyDistribution::Uniform => rng.gen_range(0..self.records),
            // Inserts past the space (more than doubled the records): the
            // existing records' count is the space from then on.
            KeyDistribution::Zipfian if self.records >= self.scramble_space => {
                fnv64(self.zipf.next(rng)) % self.records
            }
            KeyDistribution::Zipfian => {
                for _ in 0..SCRAMBLE_REDRAWS_MAX {
                    let record = fnv64(self.zipf.next(rng)) % self.scramble_space;
                    if record < self.records {
                        return record;
                    }
                }
                // Half the space exists at least, so this is next to never.
                fnv64(self.zipf.next(rng)) % self.records
            }
            KeyDistribution::Latest => {
                let back = self.zipf.next(rng).min(self.records - 1);
                self.records - 1 - back
            }
        }
    }

    /// A new record number for an insert; later choices may pick it.
    pub fn next_insert(&mut self) -> u64 {
        let record = self.records;
        self.grow_to(record + 1);
        record
    }

    /// Records `0..records` exist now (inserts by other clients); a no-op
    /// if that is not more than known.
    pub fn grow_to(&mut self, records: u64) {
        if records <= self.records {
            return;
        }
        self.records = records;
        if self.distribution == KeyDistribution::Latest {
            self.zipf.grow_to(records);
        }
    }
}

/// The key of record `i` in a run's key space `prefix`: YCSB's `user{i}`
/// naming after the prefix. Each run gets its own prefix, so loading a
/// second run into the same cluster does not add siblings to the first's keys.
pub fn record_key(prefix: &str, i: u64) -> String {
    format!("{prefix}user{i}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(42)
    }

    #[test]
    fn names_parse_and_e_is_refused_with_a_reason() {
        assert_eq!("a".parse::<Workload>(), Ok(Workload::A));
        assert_eq!("workloadf".parse::<Workload>(), Ok(Workload::F));
        assert_eq!("D".parse::<Workload>(), Ok(Workload::D));
        assert_eq!("e".parse::<Workload>(), Err(WorkloadError::Scans));
        let err = "z".parse::<Workload>().unwrap_err();
        assert!(err.to_string().contains("unknown workload \"z\""), "{err}");
        for d in [
            KeyDistribution::Zipfian,
            KeyDistribution::Latest,
            KeyDistribution::Uniform,
        ] {
            assert_eq!(d.as_str().parse::<KeyDistribution>(), Ok(d));
        }
        let err = "hotspot".parse::<KeyDistribution>().unwrap_err();
        assert!(err.to_string().contains("\"hotspot\""), "{err}");
    }

    #[test]
    fn operation_mixes_follow_the_ycsb_proportions() {
        let mut rng = rng();
        for workload in [
            Workload::A,
            Workload::B,
            Workload::C,
            Workload::D,
            Workload::F,
        ] {
            let mut counts: HashMap<Op, u32> = HashMap::new();
            let draws = 100_000;
            for _ in 0..draws {
                *counts.entry(workload.next_op(&mut rng)).or_default() += 1;
            }
            let total: f64 = workload.mix().iter().map(|(_, p)| p).sum();
            assert!((total - 1.0).abs() < 1e-9, "{workload} sums to 1");
            for (op, p) in workload.mix() {
                let seen = counts.get(op).copied().unwrap_or(0) as f64 / draws as f64;
                assert!((seen - p).abs() < 0.01, "{workload} {op:?}: {seen} vs {p}");
            }
            assert_eq!(
                counts.len(),
                workload.mix().len(),
                "{workload}: no other ops"
            );
        }
    }

    #[test]
    fn zipfian_ranks_are_skewed_like_ycsbs() {
        let mut rng = rng();
        let n = 1000;
        let z = Zipfian::new(n, ZIPFIAN_CONSTANT);
        let draws = 200_000;
        let mut counts = vec![0u32; n as usize];
        for _ in 0..draws {
            counts[z.next(&mut rng) as usize] += 1;
        }
        // P(rank 0) = 1 / zeta(n): about 12.9% for n = 1000, theta 0.99.
        let p0 = counts[0] as f64 / draws as f64;
        let expected = 1.0 / zeta(0, n, ZIPFIAN_CONSTANT, 0.0);
        assert!((p0 - expected).abs() < 0.01, "rank 0: {p0} vs {expected}");
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[500]);
    }

    /// The precomputed ζ(10^10) is YCSB's and right: an exact sum to 10^6
    /// plus the tail's integral with the trapezoid correction
    /// (Euler–Maclaurin) agrees to better than 1e-6.
    #[test]
    fn the_scrambled_zipfians_zeta_is_that_of_ten_billion_items() {
        let (m, n, theta) = (1_000_000u64, SCRAMBLED_ITEM_COUNT as f64, ZIPFIAN_CONSTANT);
        let head = zeta(0, m, theta, 0.0);
        let m = m as f64;
        let tail = (n.powf(1.0 - theta) - m.powf(1.0 - theta)) / (1.0 - theta)
            + (n.powf(-theta) - m.powf(-theta)) / 2.0;
        assert!(
            (head + tail - SCRAMBLED_ZETAN).abs() < 1e-6,
            "{}",
            head + tail
        );
    }

    /// Scrambled, every record is read now and then: most of the zipfian's
    /// mass lies past its first thousand ranks and hashes evenly over the
    /// records. Ranks over the records alone left a third of them unread.
    #[test]
    fn a_scrambled_zipfian_reaches_every_record() {
        let mut rng = rng();
        let chooser = KeyChooser::new(KeyDistribution::Zipfian, 1000, false);
        let mut seen = vec![false; 1000];
        for _ in 0..50_000 {
            seen[chooser.next_existing(&mut rng) as usize] = true;
        }
        let unread = seen.iter().filter(|s| !**s).count();
        assert_eq!(unread, 0, "records never chosen");
    }

    #[test]
    fn growing_a_zipfian_equals_building_it_at_the_larger_size() {
        let mut grown = Zipfian::new(100, ZIPFIAN_CONSTANT);
        grown.grow_to(5000);
        let built = Zipfian::new(5000, ZIPFIAN_CONSTANT);
        assert!((grown.zetan - built.zetan).abs() < 1e-9);
        assert!((grown.eta - built.eta).abs() < 1e-9);
    }

    /// The `count` records drawn most often from `chooser`.
    fn hottest(chooser: &KeyChooser, count: usize) -> Vec<u64> {
        let mut rng = rng();
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for _ in 0..50_000 {
            *counts.entry(chooser.next_existing(&mut rng)).or_default() += 1;
        }
        let mut hot: Vec<(u64, u32)> = counts.into_iter().collect();
        hot.sort_by_key(|(k, c)| (std::cmp::Reverse(*c), *k));
        hot.into_iter().take(count).map(|(k, _)| k).collect()
    }

    /// With inserts, the scrambled zipfian's hot keys stay where they were
    /// as records are added (every client agrees on them whenever it
    /// learns of the inserts), and only existing records are drawn.
    #[test]
    fn inserts_do_not_move_the_hot_keys() {
        let before = KeyChooser::new(KeyDistribution::Zipfian, 1000, true);
        let mut after = before.clone();
        after.grow_to(1500);
        let (hot_before, hot_after) = (hottest(&before, 5), hottest(&after, 10));
        assert!(hot_before.iter().all(|k| *k < 1000));
        assert!(
            hot_before.iter().all(|k| hot_after.contains(k)),
            "{hot_before:?} moved: {hot_after:?}"
        );
        let mut rng = rng();
        assert!((0..10_000).all(|_| after.next_existing(&mut rng) < 1500));
    }

    #[test]
    fn scrambling_spreads_the_hot_keys_and_latest_favours_new_inserts() {
        let mut rng = rng();
        let chooser = KeyChooser::new(KeyDistribution::Zipfian, 10_000, false);
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for _ in 0..50_000 {
            let k = chooser.next_existing(&mut rng);
            assert!(k < 10_000);
            *counts.entry(k).or_default() += 1;
        }
        let mut hot: Vec<(u64, u32)> = counts.into_iter().collect();
        hot.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
        // YCSB's skew: the hottest key is rank 0's, 1/ζ(10^10) = 3.8% of
        // draws, whatever the record count (a zipfian over the 10,000
        // records alone would give it 9.8%).
        assert!(
            (1_500..2_500).contains(&hot[0].1),
            "skewed: {:?}",
            &hot[..3]
        );
        assert!(
            hot[..5].iter().any(|(k, _)| *k > 100),
            "hot keys are not just the first records: {:?}",
            &hot[..5]
        );

        let mut latest = KeyChooser::new(KeyDistribution::Latest, 1000, true);
        let newest = (0..100).map(|_| latest.next_insert()).last().unwrap();
        assert_eq!(newest, 1099);
        let recent = (0..10_000)
            .filter(|_| latest.next_existing(&mut rng) >= 1000)
            .count();
        assert!(
            recent > 5_000,
            "the 100 newest of 1,100 records get most reads: {recent}"
        );

        let uniform = KeyChooser::new(KeyDistribution::Uniform, 10, false);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[uniform.next_existing(&mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|c| (800..1200).contains(c)), "{seen:?}");
    }
}
