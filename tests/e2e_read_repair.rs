//! Read repair with real processes: a replica that missed a write while it
//! was down gets it from a quorum read after it returns. Hints are off
//! (`--no-hints`) and anti-entropy runs only on demand, so nothing but a
//! read can bring it the value, and every quorum read asks all N
//! (`--read-repair-chance 1`): by default a read asks only R replicas, which
//! need not include the stale one.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_quorum_read_repairs_a_restarted_replica() {
    let mut c = Cluster::start(
        "a_quorum_read_repairs",
        3,
        3,
        &[
            "--no-hints",
            "--read-repair-chance",
            "1",
            "--anti-entropy-interval-s",
            "0",
        ],
    );
    c.kill(2);
    assert_exit(
        &c.cli(0, &["put", "k", "v", "-w", "2", "--timeout-ms", "1000"]),
        0,
    );
    c.restart(2);
    let local = c.cli(2, &["get", "k", "--local"]);
    assert_exit(&local, 1);

    // n2 may still hold its connection to the killed n3, or believe n3
    // down, for a couple of seconds: until it reaches the new process, its
    // reads cannot judge n3. So read until one has repaired it.
    c.eventually(Duration::from_secs(10), "n3 repaired by a read", || {
        assert_exit(&c.cli(1, &["get", "k", "-r", "quorum"]), 0);
        c.cli(2, &["get", "k", "--local"]).status.code() == Some(0)
    });
    assert_eq!(values(&c.cli(2, &["get", "k", "--local", "--json"])), ["v"]);
}
