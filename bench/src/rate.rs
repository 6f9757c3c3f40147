//! How fast an open loop sends: a fixed number of requests a second, or a
//! share of the peak that the same setting reaches just before, measured.
//!
//! A store's tail is usually quoted at a share of its capacity ("p99 at half
//! the peak"): that is the load a cluster is planned to run at, with room
//! for a node to fail. The peak moves with the machine and the day (the
//! VMs in `bench/RESULTS.md` differ by 2× with the same code), so a fixed
//! `--rate` copied from one run is half the peak on one host and all of it
//! on the next. `--rate 50%` measures instead: a closed loop of the same
//! setting, clients and duration finds the peak, and the open loop then
//! runs at that share of it. Above 100% it is an overload test: how the
//! store fails when asked for more than it did.

use std::fmt;

/// A `--rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Requests a second, over all clients.
    PerSecond(u64),
    /// A share of the closed-loop peak, in percent
    /// (1..=[`Rate::PERCENT_MAX`]).
    ShareOfPeak { percent: u32 },
}

impl Rate {
    /// The largest share of the peak that may be asked: 10× is well past
    /// any overload worth measuring, and keeps a typo (`500%` for `50%`
    /// is allowed, `5000%` is not) from queueing minutes of requests.
    pub const PERCENT_MAX: u32 = 1000;

    /// Parses `OPS` (1 to `max_per_s`) or `PERCENT%` (1 to
    /// [`Rate::PERCENT_MAX`]), saying what is wrong otherwise.
    pub fn parse(s: &str, max_per_s: u64) -> Result<Rate, String> {
        let given = s.trim();
        let (digits, share) = match given.strip_suffix('%') {
            Some(digits) => (digits.trim_end(), true),
            None => (given, false),
        };
        let (what, hi) = if share {
            ("a share of the peak", u64::from(Rate::PERCENT_MAX))
        } else {
            ("a rate", max_per_s)
        };
        let range = || {
            if share {
                format!("{what} must be 1% to {hi}%")
            } else {
                format!("{what} must be 1 to {hi} requests a second")
            }
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{s:?} is neither a whole number of requests a second (5000) nor a whole share of the peak (50%)"
            ));
        }
        // All digits: a number too large for u64 is out of range too.
        let value = digits.parse::<u64>().map_err(|_| range())?;
        if !(1..=hi).contains(&value) {
            return Err(range());
        }
        Ok(if share {
            Rate::ShareOfPeak {
                percent: value as u32,
            }
        } else {
            Rate::PerSecond(value)
        })
    }

    /// The fixed rate, if this is one.
    pub fn per_second(self) -> Option<u64> {
        match self {
            Rate::PerSecond(rate) => Some(rate),
            Rate::ShareOfPeak { .. } => None,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::PerSecond(rate) => write!(f, "{rate}"),
            Rate::ShareOfPeak { percent } => write!(f, "{percent}%"),
        }
    }
}

/// The open loop's rate at `percent` of a measured `peak_ops_per_s`,
/// rounded, at most `max_per_s`; `None` when the peak run got nothing
/// through (no rate is a share of that).
pub fn share_of_peak(percent: u32, peak_ops_per_s: f64, max_per_s: u64) -> Option<u64> {
    if !peak_ops_per_s.is_finite() || peak_ops_per_s <= 0.0 {
        return None;
    }
    let rate = (peak_ops_per_s * f64::from(percent) / 100.0).round();
    // A peak of a few ops/s at 1% rounds to 0: one a second is the least
    // an open loop can send.
    Some((rate as u64).clamp(1, max_per_s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_rate_or_a_share_of_the_peak() {
        assert_eq!(Rate::parse("5000", 10_000), Ok(Rate::PerSecond(5000)));
        assert_eq!(Rate::parse(" 1 ", 10_000), Ok(Rate::PerSecond(1)));
        assert_eq!(
            Rate::parse("50%", 10_000),
            Ok(Rate::ShareOfPeak { percent: 50 })
        );
        assert_eq!(
            Rate::parse("1000%", 10),
            Ok(Rate::ShareOfPeak { percent: 1000 }),
            "a share is bounded by PERCENT_MAX, not by the rate's bound"
        );
        for (given, why) in [
            ("0", "a rate must be 1 to 10000 requests a second"),
            ("10001", "a rate must be 1 to 10000 requests a second"),
            (
                "99999999999999999999999",
                "a rate must be 1 to 10000 requests a second",
            ),
            ("0%", "a share of the peak must be 1% to 1000%"),
            ("1001%", "a share of the peak must be 1% to 1000%"),
            (
                "99999999999999999999999%",
                "a share of the peak must be 1% to 1000%",
            ),
        ] {
            assert_eq!(Rate::parse(given, 10_000), Err(why.to_string()), "{given}");
        }
        for given in ["", "%", "-5", "12.5%", "half", "50 %x", "5e3"] {
            let err = Rate::parse(given, 10_000).unwrap_err();
            assert!(err.contains("neither a whole number"), "{given}: {err}");
        }
    }

    /// What parses prints back the same, so the JSON's config reads as
    /// the command line gave it.
    #[test]
    fn displays_as_given() {
        for given in ["5000", "50%", "1%", "1000%"] {
            assert_eq!(Rate::parse(given, 10_000).unwrap().to_string(), given);
        }
        assert_eq!(Rate::PerSecond(7).per_second(), Some(7));
        assert_eq!(Rate::ShareOfPeak { percent: 50 }.per_second(), None);
    }

    #[test]
    fn a_share_of_the_peak_rounds_and_stays_in_bounds() {
        assert_eq!(share_of_peak(50, 20_001.0, 1_000_000), Some(10_001));
        assert_eq!(share_of_peak(50, 19_999.0, 1_000_000), Some(10_000));
        assert_eq!(share_of_peak(150, 1_000.0, 1_000_000), Some(1_500));
        assert_eq!(share_of_peak(1, 20.0, 1_000_000), Some(1), "at least 1/s");
        assert_eq!(share_of_peak(1000, 50_000.0, 100_000), Some(100_000));
        assert_eq!(share_of_peak(50, 0.0, 1_000_000), None);
        assert_eq!(share_of_peak(50, f64::NAN, 1_000_000), None);
        assert_eq!(share_of_peak(50, f64::INFINITY, 1_000_000), None);
    }
}
