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

    /// Displayed as the command line writes it (`--rate 5000`, `--rate
    /// 50%`), for the JSON's config.
    #[test]
    fn displays_as_the_command_line_writes_it() {
        assert_eq!(Rate::PerSecond(5000).to_string(), "5000");
        assert_eq!(Rate::ShareOfPeak { percent: 50 }.to_string(), "50%");
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
