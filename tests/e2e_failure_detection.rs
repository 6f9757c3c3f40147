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
    for observer in [0, 1] {
        c.eventually(Duration::from_secs(5), "n3 seen as down", || {
            state_seen_by(&c, observer, "n3") == "down"
        });
    }
    let down_after = killed.elapsed();
    assert_eq!(state_seen_by(&c, 0, "n1"), "up", "a node sees itself up");

    c.restart(2);
    let back = Instant::now();
    for observer in [0, 1] {
        c.eventually(Duration::from_secs(5), "n3 seen as up again", || {
            state_seen_by(&c, observer, "n3") == "up"
        });
    }
    eprintln!(
        "down seen after {down_after:?}, up seen after {:?}",
        back.elapsed()
    );
}
