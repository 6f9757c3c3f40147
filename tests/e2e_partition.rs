//! A network partition between real `ringkv node` processes, made and
//! healed while they run: each node emulates its region's links
//! (`--latency-matrix`), reads the file again on SIGHUP, and a `cut = true`
//! link lets nothing through, either way.
//!
//! The Dynamo story end to end: during the partition the side with a
//! quorum still takes W=2 writes, the lone node takes W=1 writes and
//! refuses W=2, both sides write the same key, and after the heal neither
//! write is lost: a read returns both as siblings, and a write with that
//! read's context replaces them.

mod common;

use std::time::Duration;

use common::*;

const REGIONS: &str = "regions = [\"r1\", \"r2\", \"r3\"]\n";

/// n1 (r1) cut off from n2 (r2) and n3 (r3), or not.
fn matrix(r1_cut_off: bool) -> String {
    let mut text = REGIONS.to_string();
    for (a, b, cut) in [
        ("r1", "r2", r1_cut_off),
        ("r1", "r3", r1_cut_off),
        ("r2", "r3", false),
    ] {
        text += &format!("[[link]]\nbetween = [\"{a}\", \"{b}\"]\ncut = {cut}\n");
    }
    text
}

/// Long enough for any request here on a busy machine; a cut one fails
/// at its deadline.
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_partition_takes_writes_on_both_sides_and_heals_to_siblings() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("matrix.toml");
    std::fs::write(&path, matrix(false)).unwrap();
    let path_arg = path.to_str().unwrap().to_string();
    let ip = loopback_for("e2e_partition");
    let metrics = format!("{ip}:{}", free_tcp_port(ip));
    let cluster = Cluster::start_each("e2e_partition", 3, 3, |i, _| {
        let mut flags = vec![
            "--region".to_string(),
            format!("r{}", i + 1),
            "--latency-matrix".to_string(),
            path_arg.clone(),
        ];
        if i == 0 {
            flags.extend(["--metrics".to_string(), metrics.clone()]);
        }
        flags
    });
    // n1's count of matrix reads with `result`, once it serves metrics.
    let reads = |result: &str| {
        let name = format!("ringkv_latency_matrix_reads_total{{result=\"{result}\"}}");
        sample(&scrape(&metrics), &name).unwrap_or(0.0)
    };
    let put = |node: usize, key: &str, value: &str, w: &str, context: Option<&str>| {
        let mut args = vec!["put", key, value, "-w", w, "--timeout-ms", "1000", "--json"];
        if let Some(c) = context {
            args.extend(["--context", c]);
        }
        cluster.cli(node, &args)
    };
    let get = |node: usize, key: &str, r: &str| {
        cluster.cli(
            node,
            &["get", key, "-r", r, "--timeout-ms", "1000", "--json"],
        )
    };

    let before = put(0, "k", "before", "all", None);
    assert_exit(&before, 0);
    let seen = get(1, "k", "all");
    assert_eq!(values(&seen), ["before"]);
    let before_context = context(&seen);

    // Cut n1 off. Each node applies the cut to its own calls, so each is
    // probed until a write that needs the far side fails there.
    std::fs::write(&path, matrix(true)).unwrap();
    for i in 0..3 {
        cluster.signal(i, "HUP");
    }
    let probes = [(0, "2"), (1, "all"), (2, "all")];
    for (node, w) in probes {
        cluster.eventually(DEADLINE, "the cut is in effect", || {
            put(node, "probe", "x", w, None).status.code() == Some(3)
        });
    }

    // A matrix that does not load, or lacks a member's region, is refused;
    // the node runs on with the cut still in effect.
    assert_eq!(reads("in_effect"), 1.0);
    for bad in ["regions = [", "regions = [\"r1\"]"] {
        let refused = reads("refused");
        std::fs::write(&path, bad).unwrap();
        cluster.signal(0, "HUP");
        cluster.eventually(DEADLINE, "the bad matrix is read", || {
            reads("refused") == refused + 1.0
        });
    }
    assert_eq!(reads("in_effect"), 1.0);
    assert_exit(&cluster.cli(0, &["status"]), 0);
    assert_exit(&put(0, "probe", "x", "2", None), 3);

    // Both sides write the same key, each from what it read before.
    assert_exit(&put(0, "k", "lone side", "1", Some(&before_context)), 0);
    assert_exit(&put(1, "k", "quorum side", "2", Some(&before_context)), 0);
    assert_eq!(values(&get(2, "k", "2")), ["quorum side"]);
    assert_eq!(values(&get(0, "k", "1")), ["lone side"]);
    assert_exit(&get(0, "k", "2"), 3);

    // Heal. Neither acknowledged write is lost: they come back together.
    std::fs::write(&path, matrix(false)).unwrap();
    for i in 0..3 {
        cluster.signal(i, "HUP");
    }
    // Each node reads through its own links: each is asked until it sees
    // both, which also shows it has taken the heal in.
    let mut merged = String::new();
    for node in [1, 2, 0] {
        cluster.eventually(DEADLINE, "both sides' writes as siblings", || {
            let out = get(node, "k", "all");
            let both = out.status.success() && values(&out) == ["lone side", "quorum side"];
            if both {
                merged = context(&out);
            }
            both
        });
    }

    // A write with the merged context replaces both, everywhere.
    assert_exit(&put(0, "k", "resolved", "all", Some(&merged)), 0);
    for node in 0..3 {
        assert_eq!(
            values(&get(node, "k", "all")),
            ["resolved"],
            "n{}",
            node + 1
        );
    }
}
