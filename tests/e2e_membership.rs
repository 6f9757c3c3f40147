//! Membership: a node that was unreachable while another joined still learns
//! of it, without a restart.

mod common;

use std::time::Duration;

use common::*;

fn members_seen_by(c: &Cluster, i: usize) -> usize {
    json(&c.cli(i, &["status", "--json"]))["nodes"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn a_member_frozen_during_a_join_learns_of_the_new_node() {
    let mut c = Cluster::start("a_member_frozen_during_a_join", 2, 2, &[]);
    c.signal(1, "STOP");
    let seed = c.addr(0);
    c.add_node(&[seed]);
    c.signal(1, "CONT");
    assert_eq!(members_seen_by(&c, 0), 3);
    assert_eq!(members_seen_by(&c, 2), 3);
    // The exchange runs every 5 s with one random member.
    c.eventually(Duration::from_secs(20), "n2 learns of n3", || {
        members_seen_by(&c, 1) == 3
    });
}
