//! Failure detection with real processes: a killed peer is seen as down, and
//! a returning one as up, within 5 s, by every other node.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_killed_peer_is_down_and_a_returning_one_up_within_5_seconds() {
    let mut c = Cluster::start("a_killed_peer_is_down", 3, 3, &[]);
    c.kill(2);
    let killed = Instant::now();
    // One 5 s budget for both observers, measured from the kill.
    c.eventually(
        Duration::from_secs(5),
        "n3 seen as down by n1 and n2",
        || (0..2).all(|observer| c.state_seen_by(observer, "n3") == "down"),
    );
    let down_after = killed.elapsed();
    assert!(down_after < Duration::from_secs(5), "{down_after:?}");
    assert_eq!(c.state_seen_by(0, "n1"), "up", "a node sees itself up");

    c.restart(2);
    let back = Instant::now();
    c.eventually(
        Duration::from_secs(5),
        "n3 seen as up again by n1 and n2",
        || (0..2).all(|observer| c.state_seen_by(observer, "n3") == "up"),
    );
    let up_after = back.elapsed();
    assert!(up_after < Duration::from_secs(5), "{up_after:?}");
    eprintln!("down seen after {down_after:?}, up seen after {up_after:?}");
}
