//! How far a share measured over few trials can be trusted: the Wilson
//! score interval.
//!
//! The staleness curve (PBS t-visibility, Bailis et al. 2012) is a share of
//! fresh reads per wait t, and a short run makes only tens to hundreds of
//! probes per t. Bailis et al. estimate t-visibility by Monte Carlo over many trials;
//! a bench that probes a live cluster gets what its run allows, so each
//! share comes with its 95% confidence interval. That keeps a reader from
//! taking a dip between two columns (37% at 1 ms, 17% at 5 ms over 30
//! probes each) for a property of the store.
//!
//! Wilson's interval (1927), not the textbook p ± z·sqrt(p(1-p)/n): that
//! one collapses to a width of zero at 0% and 100% (a run whose 20 probes
//! were all fresh is not proof that every read is) and can leave [0, 1] for
//! small n. Wilson's stays inside [0, 1], always contains the measured
//! share, and is not empty at the ends.
//!
//! Invariants (property-tested): `0 <= low <= share <= high <= 1`; the
//! interval narrows as trials grow at the same share; `low < 1` and
//! `high > 0` for any finite number of trials.

/// The normal quantile for a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval at 95% for `successes` out of `trials`, as
/// shares in [0, 1]: `None` without trials (nothing was measured).
pub fn wilson_95(successes: u64, trials: u64) -> Option<(f64, f64)> {
    if trials == 0 {
        return None;
    }
    // More successes than trials is a counting bug upstream; clamping
    // keeps the interval meaningful rather than NaN.
    let n = trials as f64;
    let p = successes.min(trials) as f64 / n;
    let z2 = Z_95 * Z_95;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = Z_95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    // Rounding can put a bound a hair past the share it must contain.
    Some(((centre - half).clamp(0.0, p), (centre + half).clamp(p, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-4
    }

    /// Values from Newcombe (1998), table I, method 3 (Wilson, no
    /// continuity correction).
    #[test]
    fn matches_published_values() {
        let (low, high) = wilson_95(81, 263).unwrap();
        assert!(close(low, 0.2553) && close(high, 0.3662), "{low} {high}");
        let (low, high) = wilson_95(15, 148).unwrap();
        assert!(close(low, 0.0624) && close(high, 0.1605), "{low} {high}");
        let (low, high) = wilson_95(0, 20).unwrap();
        assert!(close(low, 0.0) && close(high, 0.1611), "{low} {high}");
        let (low, high) = wilson_95(1, 29).unwrap();
        assert!(close(low, 0.0061) && close(high, 0.1718), "{low} {high}");
    }

    #[test]
    fn no_trials_no_interval() {
        assert_eq!(wilson_95(0, 0), None);
    }

    #[test]
    fn all_fresh_is_not_proof_of_always_fresh() {
        let (low, high) = wilson_95(20, 20).unwrap();
        assert_eq!(high, 1.0);
        assert!(low < 0.85, "{low}");
    }

    proptest! {
        #[test]
        fn contains_the_share_and_stays_in_bounds(trials in 1u64..100_000, seed in 0u64..=u64::MAX) {
            let successes = seed % (trials + 1);
            let (low, high) = wilson_95(successes, trials).unwrap();
            let share = successes as f64 / trials as f64;
            prop_assert!((0.0..=share).contains(&low), "{low} {share}");
            prop_assert!((share..=1.0).contains(&high), "{high} {share}");
            prop_assert!(low < 1.0 && high > 0.0);
        }

        #[test]
        fn narrows_with_more_trials_at_the_same_share(
            trials in 1u64..10_000,
            successes_seed in 0u64..=u64::MAX,
            factor in 2u64..50,
        ) {
            let successes = successes_seed % (trials + 1);
            let (low, high) = wilson_95(successes, trials).unwrap();
            let (more_low, more_high) = wilson_95(successes * factor, trials * factor).unwrap();
            prop_assert!(more_high - more_low < high - low, "{more_low}–{more_high} vs {low}–{high}");
        }
    }
}
