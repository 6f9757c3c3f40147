//! Failure detection with real processes: a killed peer is seen as down, and
//! a returning one as up, within 5 s, by every other node.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn state_seen_by(c: &Cluster, observer: usize, peer: &str) -> String {
    let s = json(&c.cli(observer, &["status", "--json"]));
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == peer)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap()
}

#[test]
fn a_killed_peer_is_down_and_a_returning_one_up_within_5_seconds() {
    let mut c = Cluster::start("a_killed_peer_is_down", 3, 3, &[]);
    c.kill(2);
    let killed = Instant::now();
    // One 5 s budget for both observers, measured from the kill.
    c.eventually(
        Duration::from_secs(5),
        "n3 seen as down by n1 and n2",
        || (0..2).all(|observer| state_seen_by(&c, observer, "n3") == "down"),
    );
    let down_after = killed.elapsed();
    assert!(down_after < Duration::from_secs(5), "{down_after:?}");
    assert_eq!(state_seen_by(&c, 0, "n1"), "up", "a node sees itself up");

    c.restart(2);
    let back = Instant::now();
    c.eventually(
        Duration::from_secs(5),
        "n3 seen as up again by n1 and n2",
        || (0..2).all(|observer| state_seen_by(&c, observer, "n3") == "up"),
    );
    let up_after = back.elapsed();
    assert!(up_after < Duration::from_secs(5), "{up_after:?}");
    eprintln!("down seen after {down_after:?}, up seen after {up_after:?}");
}
