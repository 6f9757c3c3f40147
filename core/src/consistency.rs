//! Per-request consistency: how many replicas must answer.
//!
//! Dynamo lets each request pick R and W against the key's N replicas; `R + W
//! > N` makes a read overlap the last successful write. A level is sent on the
//! wire as given and resolved against the cluster's N by the coordinator, so a
//! client never needs to know N to ask for `quorum`.

use std::fmt;
use std::str::FromStr;

use crate::error::InvalidInput;

/// How many of the N replicas a read (R) or write (W) waits for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Consistency {
    One,
    /// A majority: `N / 2 + 1`.
    Quorum,
    All,
    /// An exact count in `1..=N`.
    Count(u32),
}

impl Consistency {
    /// The number of replicas required for a key replicated `n` times.
    pub fn required(self, n: usize) -> Result<usize, InvalidInput> {
        let k = match self {
            Consistency::One => 1,
            Consistency::Quorum => n / 2 + 1,
            Consistency::All => n,
            Consistency::Count(k) => k as usize,
        };
        if k == 0 || k > n {
            return Err(InvalidInput::new(format!(
                "consistency {self} needs {k} replicas but keys have N={n}; use 1..={n}, one, quorum or all"
            )));
        }
        Ok(k)
    }
}

impl FromStr for Consistency {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            other => match other.parse::<u32>() {
                Ok(0) => Err(InvalidInput::new(
                    "consistency 0 would wait for no replica; use a count from 1 to N, one, quorum or all",
                )),
                Ok(k) => Ok(Consistency::Count(k)),
                // All digits, too many of them: a count, just far past any N.
                Err(_) if !other.is_empty() && other.bytes().all(|b| b.is_ascii_digit()) => {
                    Err(InvalidInput::new(format!(
                        "consistency {s} is above any N (at most {})",
                        crate::wire::REPLICAS_MAX
                    )))
                }
                Err(_) => Err(InvalidInput::new(format!(
                    "consistency {s:?} is not a number or one of one, quorum, all"
                ))),
            },
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::One => f.write_str("one"),
            Consistency::Quorum => f.write_str("quorum"),
            Consistency::All => f.write_str("all"),
            Consistency::Count(k) => write!(f, "{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_resolve_against_n() {
        assert_eq!("one".parse::<Consistency>().unwrap().required(3), Ok(1));
        assert_eq!("quorum".parse::<Consistency>().unwrap().required(3), Ok(2));
        assert_eq!("QUORUM".parse::<Consistency>().unwrap().required(5), Ok(3));
        assert_eq!("all".parse::<Consistency>().unwrap().required(3), Ok(3));
        assert_eq!("2".parse::<Consistency>().unwrap().required(3), Ok(2));
    }

    #[test]
    fn bad_levels_are_named() {
        assert!("0"
            .parse::<Consistency>()
            .unwrap_err()
            .message
            .contains("0"));
        assert!("most"
            .parse::<Consistency>()
            .unwrap_err()
            .message
            .contains("\"most\""));
        let err = Consistency::Count(4).required(3).unwrap_err();
        assert!(err.message.contains("N=3"), "{err}");
        // Too many digits for a count is still a count, just too high.
        let err = "99999999999".parse::<Consistency>().unwrap_err();
        assert!(err.message.contains("above any N"), "{err}");
    }
}
