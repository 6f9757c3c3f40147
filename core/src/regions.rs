//! Emulated regions: the one-way delay, jitter and loss between every pair
//! of regions, which a transport applies to each message so that a cluster
//! on one machine behaves like one spread over data centres.
//!
//! Kernel `tc netem` needs root and shapes whole interfaces; this lives in
//! the transport instead, so it works without privileges, per node, for
//! in-process and real nodes alike. A matrix is read from TOML:
//!
//! ```toml
//! regions = ["us-east", "eu-west"]
//!
//! [local]            # between two nodes of one region (default: no delay)
//! delay_ms = 0.2
//!
//! [[link]]           # both directions
//! between = ["us-east", "eu-west"]
//! delay_ms = 38      # one-way
//! jitter_ms = 2      # uniform in ±jitter_ms
//! loss = 0.001       # probability a message is lost
//! # cut = true       # a partition: nothing passes either way
//! ```
//!
//! A cut link emulates a network partition between two regions (or, in
//! `[local]`, between the nodes of each region): every message is lost,
//! so calls across it end at their callers' deadlines, as they would with
//! a real partition. A node re-reads its matrix file on SIGHUP, which is
//! how a partition is made and healed while the nodes run.
//!
//! Every pair of distinct regions must have a link: a missing pair is an
//! error rather than a silent zero delay. This module only describes and
//! samples delays (uniform numbers are passed in, so sampling is
//! deterministic under a seed); sleeping is the transport's business.

use std::collections::BTreeMap;
use std::time::Duration;

/// One direction between two regions.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// One-way delay, in milliseconds.
    #[serde(default)]
    pub delay_ms: f64,
    /// The delay varies uniformly within ± this, in milliseconds (never below 0).
    #[serde(default)]
    pub jitter_ms: f64,
    /// Probability in `[0, 1)` that a message is lost.
    #[serde(default)]
    pub loss: f64,
    /// Every message is lost: a network partition (see the module docs).
    #[serde(default)]
    pub cut: bool,
}

impl Link {
    pub const NONE: Link = Link {
        delay_ms: 0.0,
        jitter_ms: 0.0,
        loss: 0.0,
        cut: false,
    };
}

/// Why a latency matrix was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegionError {
    #[error("latency matrix is not valid TOML: {reason}")]
    Syntax { reason: String },
    #[error("latency matrix names no regions")]
    NoRegions,
    #[error("region {region:?} is listed twice")]
    DuplicateRegion { region: String },
    #[error("region name {region:?} must be 1-64 characters of letters, digits, '-', '_' or '.'")]
    BadName { region: String },
    #[error("a link's `between` lists {} regions ({between:?}); it takes exactly 2", .between.len())]
    LinkNotAPair { between: Vec<String> },
    #[error("link between {region:?} and itself: set the delay between nodes of one region in the `[local]` table")]
    SelfLink { region: String },
    #[error("link between {a:?} and {b:?} names a region not in `regions`")]
    UnknownRegionInLink { a: String, b: String },
    #[error("the link between {a:?} and {b:?} is given twice")]
    DuplicateLink { a: String, b: String },
    #[error("no link between {a:?} and {b:?}: every pair of regions needs one")]
    MissingLink { a: String, b: String },
    #[error("link {a:?}–{b:?}: {reason}")]
    BadLink {
        a: String,
        b: String,
        reason: String,
    },
    #[error("unknown region {region:?}; the matrix has {known}")]
    UnknownRegion { region: String, known: String },
    #[error("unknown preset {name:?}; presets: {presets}")]
    UnknownPreset { name: String, presets: String },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixFile {
    regions: Vec<String>,
    #[serde(default)]
    local: Option<Link>,
    #[serde(default)]
    link: Vec<LinkEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkEntry {
    // A `Vec` rather than `[String; 2]`: serde reads the first two of a
    // longer array and ignores the rest, so the length is checked here.
    between: Vec<String>,
    #[serde(flatten)]
    link: Link,
}

/// One-way links between every pair of regions. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyMatrix {
    regions: Vec<String>,
    local: Link,
    /// Keyed by the pair in sorted order: links are symmetric.
    links: BTreeMap<(String, String), Link>,
}

/// A TOML error on one line: where it is, then what (the parser's own
/// text draws the line with a caret over several lines).
fn syntax_reason(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

fn check_link(a: &str, b: &str, link: &Link) -> Result<(), RegionError> {
    let bad = |reason: String| {
        Err(RegionError::BadLink {
            a: a.to_string(),
            b: b.to_string(),
            reason,
        })
    };
    if !link.delay_ms.is_finite() || link.delay_ms < 0.0 || link.delay_ms > 60_000.0 {
        return bad(format!(
            "delay_ms {} must be between 0 and 60000",
            link.delay_ms
        ));
    }
    if !link.jitter_ms.is_finite() || link.jitter_ms < 0.0 || link.jitter_ms > 60_000.0 {
        return bad(format!(
            "jitter_ms {} must be between 0 and 60000",
            link.jitter_ms
        ));
    }
    if !(0.0..1.0).contains(&link.loss) {
        return bad(format!("loss {} must be at least 0 and below 1", link.loss));
    }
    Ok(())
}

impl LatencyMatrix {
    /// Parses and checks a matrix (see the module docs for the format).
    pub fn parse_toml(text: &str) -> Result<Self, RegionError> {
        let file: MatrixFile = toml::from_str(text).map_err(|e| RegionError::Syntax {
            reason: syntax_reason(text, &e),
        })?;
        if file.regions.is_empty() {
            return Err(RegionError::NoRegions);
        }
        for (i, r) in file.regions.iter().enumerate() {
            let valid = !r.is_empty()
                && r.len() <= 64
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid {
                return Err(RegionError::BadName { region: r.clone() });
            }
            if file.regions[..i].contains(r) {
                return Err(RegionError::DuplicateRegion { region: r.clone() });
            }
        }
        let local = file.local.unwrap_or(Link::NONE);
        check_link("local", "local", &local)?;
        let mut links = BTreeMap::new();
        for entry in file.link {
            let [a, b] = match <[String; 2]>::try_from(entry.between) {
                Ok(ends) => ends,
                Err(between) => return Err(RegionError::LinkNotAPair { between }),
            };
            // `link` answers a region's own pairs from `[local]`, so such a
            // link would be ignored without a word.
            if a == b {
                return Err(RegionError::SelfLink { region: a });
            }
            if !file.regions.contains(&a) || !file.regions.contains(&b) {
                return Err(RegionError::UnknownRegionInLink { a, b });
            }
            check_link(&a, &b, &entry.link)?;
            if links.insert(pair(&a, &b), entry.link).is_some() {
                return Err(RegionError::DuplicateLink { a, b });
            }
        }
        for (i, a) in file.regions.iter().enumerate() {
            for b in &file.regions[i + 1..] {
                if !links.contains_key(&pair(a, b)) {
                    return Err(RegionError::MissingLink {
                        a: a.clone(),
                        b: b.clone(),
                    });
                }
            }
        }
        Ok(LatencyMatrix {
            regions: file.regions,
            local,
            links,
        })
    }

    /// A built-in matrix by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self, RegionError> {
        let keep = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, regions)| *regions)
            .ok_or_else(|| RegionError::UnknownPreset {
                name: name.to_string(),
                presets: PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let mut matrix = Self::parse_toml(CLOUD4)?;
        matrix.regions.retain(|r| keep.contains(&r.as_str()));
        matrix
            .links
            .retain(|(a, b), _| keep.contains(&a.as_str()) && keep.contains(&b.as_str()));
        Ok(matrix)
    }

    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// The link between two nodes of one region (`[local]`).
    pub fn local(&self) -> Link {
        self.local
    }

    /// Every link between two distinct regions, once per pair (links are
    /// symmetric), the pair's names in sorted order.
    pub fn links(&self) -> impl Iterator<Item = (&str, &str, Link)> {
        self.links
            .iter()
            .map(|((a, b), link)| (a.as_str(), b.as_str(), *link))
    }

    /// The longest round trip an emulated link can take, at the top of
    /// its jitter, in milliseconds: what a timeout meant for any peer
    /// (the failure detector's probe) must allow.
    pub fn longest_round_trip_ms(&self) -> f64 {
        std::iter::once(self.local)
            .chain(self.links.values().copied())
            .map(|link| 2.0 * (link.delay_ms + link.jitter_ms))
            .fold(0.0, f64::max)
    }

    /// Fails with the list of known regions if `region` is not one.
    pub fn check_region(&self, region: &str) -> Result<(), RegionError> {
        if self.regions.iter().any(|r| r == region) {
            Ok(())
        } else {
            Err(RegionError::UnknownRegion {
                region: region.to_string(),
                known: self.regions.join(", "),
            })
        }
    }

    /// The link from `from` to `to`.
    pub fn link(&self, from: &str, to: &str) -> Result<Link, RegionError> {
        self.check_region(from)?;
        self.check_region(to)?;
        if from == to {
            return Ok(self.local);
        }
        Ok(self.links[&pair(from, to)])
    }

    /// One message's fate from `from` to `to`, given two uniform numbers in
    /// `[0, 1)`: `None` if it is lost (always, on a cut link), else its
    /// delay.
    pub fn sample(
        &self,
        from: &str,
        to: &str,
        jitter_u: f64,
        loss_u: f64,
    ) -> Result<Option<Duration>, RegionError> {
        let link = self.link(from, to)?;
        if link.cut || loss_u < link.loss {
            return Ok(None);
        }
        let ms = (link.delay_ms + link.jitter_ms * (2.0 * jitter_u - 1.0)).max(0.0);
        Ok(Some(Duration::from_secs_f64(ms / 1000.0)))
    }
}

/// Built-in matrices, by name, and the regions of `cloud4` each keeps.
///
/// `cloud4` (`core/presets/cloud4.toml`, which cites its sources): one-way
/// delays between four cloud regions, half the median round-trip times
/// between AWS us-east-1, us-west-2, eu-west-1 and ap-south-1 as published
/// by cloudping.co. `cloud3` is the same without ap-south.
pub const PRESETS: &[(&str, &[&str])] = &[
    ("cloud4", &["us-east", "us-west", "eu-west", "ap-south"]),
    ("cloud3", &["us-east", "us-west", "eu-west"]),
];

/// `cloud4`, kept as a file users can copy to write their own matrix.
const CLOUD4: &str = include_str!("../presets/cloud4.toml");

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest round trip: twice the slowest link's delay and jitter.
    #[test]
    fn the_longest_round_trip_is_the_slowest_links_at_the_top_of_its_jitter() {
        let matrix = LatencyMatrix::parse_toml(
            "regions = [\"a\", \"b\", \"c\"]\n\
             local = { delay_ms = 1 }\n\
             [[link]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 40\njitter_ms = 5\n\
             [[link]]\nbetween = [\"a\", \"c\"]\ndelay_ms = 30\n\
             [[link]]\nbetween = [\"b\", \"c\"]\ndelay_ms = 20\njitter_ms = 20\n",
        )
        .unwrap();
        assert_eq!(matrix.longest_round_trip_ms(), 90.0);
    }

    const TWO: &str = r#"
regions = ["a", "b"]
[[link]]
between = ["b", "a"]
delay_ms = 10
jitter_ms = 2
loss = 0.25
"#;

    #[test]
    fn links_are_symmetric_and_samples_stay_within_the_jitter() {
        let m = LatencyMatrix::parse_toml(TWO).unwrap();
        assert_eq!(m.link("a", "b").unwrap(), m.link("b", "a").unwrap());
        assert_eq!(m.link("a", "a").unwrap(), Link::NONE);
        let ms = |u| m.sample("a", "b", u, 0.9).unwrap().unwrap().as_secs_f64() * 1000.0;
        assert!((ms(0.0) - 8.0).abs() < 1e-9);
        assert!((ms(0.5) - 10.0).abs() < 1e-9);
        assert!((ms(0.999_999) - 12.0).abs() < 1e-3);
        assert_eq!(m.sample("a", "b", 0.5, 0.1).unwrap(), None, "lost");
    }

    #[test]
    fn bad_matrices_name_what_is_wrong() {
        let err = |text: &str| LatencyMatrix::parse_toml(text).unwrap_err().to_string();
        assert!(err(
            "regions = [\"a\", \"b\", \"c\"]\n[[link]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 1"
        )
        .contains("no link between \"a\" and \"c\""));
        assert!(err("regions = [\"a\"]\n[[link]]\nbetween = [\"a\", \"x\"]")
            .contains("not in `regions`"));
        assert!(err("regions = []").contains("no regions"));
        assert!(err("regions = [\"a\", \"a\"]").contains("listed twice"));
        assert!(err("regions = [\"a b\"]").contains("must be 1-64 characters"));
        assert!(
            err("regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\ndelay_ms = -1")
                .contains("delay_ms -1")
        );
        assert!(
            err("regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\nloss = 1.0")
                .contains("loss 1")
        );
        assert!(err("regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\n[[link]]\nbetween = [\"b\", \"a\"]")
            .contains("given twice"));
        assert!(err("regions = [\"a\"]\ndelay = 3").contains("not valid TOML"));
        assert!(err("regions = ").contains("not valid TOML"));
        let syntax = err("regions = [\"a\"]\nthis is [not toml");
        assert!(
            syntax.starts_with("latency matrix is not valid TOML: line 2, column ")
                && !syntax.contains('|'),
            "{syntax}"
        );
        let m = LatencyMatrix::parse_toml(TWO).unwrap();
        assert!(m
            .link("a", "z")
            .unwrap_err()
            .to_string()
            .contains("unknown region \"z\"; the matrix has a, b"));
    }

    #[test]
    fn a_cut_link_loses_every_message_both_ways_and_only_its_own() {
        let m = LatencyMatrix::parse_toml(
            r#"
regions = ["a", "b", "c"]
[[link]]
between = ["a", "b"]
delay_ms = 5
cut = true
[[link]]
between = ["a", "c"]
delay_ms = 5
[[link]]
between = ["b", "c"]
cut = false
"#,
        )
        .unwrap();
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(m.sample("a", "b", 0.5, u).unwrap(), None);
            assert_eq!(m.sample("b", "a", 0.5, u).unwrap(), None);
            assert_eq!(
                m.sample("a", "c", 0.5, u).unwrap(),
                Some(Duration::from_millis(5))
            );
            assert_eq!(m.sample("b", "c", 0.5, u).unwrap(), Some(Duration::ZERO));
            assert_eq!(m.sample("a", "a", 0.5, u).unwrap(), Some(Duration::ZERO));
        }
        assert!(m.link("a", "b").unwrap().cut && !m.link("b", "c").unwrap().cut);
        let err = LatencyMatrix::parse_toml("regions = [\"a\"]\n[local]\ncut = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn a_link_joins_exactly_two_distinct_regions() {
        let parse = |between: &str| {
            LatencyMatrix::parse_toml(&format!(
                "regions = [\"a\", \"b\", \"c\"]\n[[link]]\nbetween = {between}\ndelay_ms = 1"
            ))
        };
        assert_eq!(
            parse("[\"a\", \"b\", \"c\"]").unwrap_err(),
            RegionError::LinkNotAPair {
                between: vec!["a".into(), "b".into(), "c".into()]
            }
        );
        assert_eq!(
            parse("[\"a\"]").unwrap_err(),
            RegionError::LinkNotAPair {
                between: vec!["a".into()]
            }
        );
        let err = parse("[\"a\", \"b\", \"c\"]").unwrap_err().to_string();
        assert!(
            err.contains("lists 3 regions") && err.contains("exactly 2"),
            "{err}"
        );
        assert_eq!(
            parse("[\"a\", \"a\"]").unwrap_err(),
            RegionError::SelfLink { region: "a".into() }
        );
        let err = parse("[\"a\", \"a\"]").unwrap_err().to_string();
        assert!(err.contains("`[local]`"), "{err}");
    }

    #[test]
    fn presets_parse_and_unknown_ones_are_listed() {
        for (name, _) in PRESETS {
            let m = LatencyMatrix::preset(name).unwrap();
            assert!(m.regions().len() >= 3, "{name}");
        }
        let m = LatencyMatrix::preset("cloud4").unwrap();
        assert_eq!(m.link("ap-south", "us-east").unwrap().delay_ms, 94.0);
        let err = LatencyMatrix::preset("mars").unwrap_err().to_string();
        assert!(err.contains("presets: cloud4, cloud3"), "{err}");
    }

    #[test]
    fn links_lists_each_pair_once_as_link_answers_it() {
        let m = LatencyMatrix::preset("cloud3").unwrap();
        let links: Vec<_> = m.links().collect();
        assert_eq!(links.len(), 3, "three regions, three pairs");
        for (a, b, link) in &links {
            assert!(a < b, "{a} {b}");
            assert_eq!(m.link(b, a).unwrap(), *link);
        }
        let m = LatencyMatrix::parse_toml(&format!("{TWO}\n[local]\ndelay_ms = 0.5")).unwrap();
        assert_eq!(m.local().delay_ms, 0.5);
        assert_eq!(
            m.links().map(|(a, b, _)| (a, b)).collect::<Vec<_>>(),
            [("a", "b")]
        );
    }
}
