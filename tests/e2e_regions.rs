//! Emulated regions with real processes: `--latency-matrix` delays every
//! call between nodes by the matrix, so a write's per-replica latencies in
//! its receipt are the round trips the matrix predicts.

mod common;

use common::*;

/// One-way delays: a–b 40 ms, a–c 60 ms, b–c 50 ms; no jitter, no loss.
const MATRIX: &str = r#"
regions = ["a", "b", "c"]
[[link]]
between = ["a", "b"]
delay_ms = 40
[[link]]
between = ["a", "c"]
delay_ms = 60
[[link]]
between = ["b", "c"]
delay_ms = 50
"#;

/// The latency (ms) the receipt of `out` reports for `node`.
fn latency_of(out: &serde_json::Value, node: &str) -> f64 {
    out["receipt"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == node)
        .unwrap_or_else(|| panic!("{node} in {out}"))["latency_ms"]
        .as_f64()
        .unwrap()
}

#[test]
fn replica_latencies_follow_the_latency_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let matrix = dir.path().join("matrix.toml");
    std::fs::write(&matrix, MATRIX).unwrap();
    let matrix = matrix.to_string_lossy().into_owned();
    let c = Cluster::start_each("replica_latencies_follow", 3, 3, |i, _| {
        let region = ["a", "b", "c"][i];
        ["--region", region, "--latency-matrix", &matrix]
            .map(String::from)
            .to_vec()
    });
    let status = json(&c.cli(0, &["status", "--json"]));
    let regions: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["a", "b", "c"], "{status}");

    // Warm the connections first: handshakes are not part of the emulation.
    assert_exit(&c.cli(0, &["put", "warm", "x", "-w", "all"]), 0);
    let mut to_b = Vec::new();
    let mut to_c = Vec::new();
    for i in 0..5 {
        let out = json(&c.cli(0, &["put", &format!("k{i}"), "v", "-w", "all", "--json"]));
        to_b.push(latency_of(&out, "n2"));
        to_c.push(latency_of(&out, "n3"));
    }
    to_b.sort_by(f64::total_cmp);
    to_c.sort_by(f64::total_cmp);
    let (b, c3) = (to_b[2], to_c[2]);
    // Round trips a→b 80 ms and a→c 120 ms. Generous bounds for CI: the
    // emulated delay is a floor, and two busy cores (compiling, other
    // tests) add to it; the upper bounds still catch a lost delay or a
    // doubled one.
    assert!(
        (80.0..80.0 * 1.5 + 10.0).contains(&b),
        "n2 median {b} ms: {to_b:?}"
    );
    assert!(
        (120.0..120.0 * 1.5 + 10.0).contains(&c3),
        "n3 median {c3} ms: {to_c:?}"
    );
    // A local read takes no emulated delay: the quickest of three (one may
    // meet a busy core) is far below the 40 ms of the nearest link.
    let local = (0..3)
        .map(|_| latency_of(&json(&c.cli(0, &["get", "k0", "-r", "1", "--json"])), "n1"))
        .fold(f64::INFINITY, f64::min);
    assert!(local < 40.0, "local read {local} ms");

    // A bad matrix, or a region it lacks, is refused before the node starts.
    std::fs::write(dir.path().join("bad.toml"), "regions = [\"a\", \"b\"]\n").unwrap();
    let bad = dir.path().join("bad.toml").to_string_lossy().into_owned();
    let data_dir = dir.path().join("x").to_string_lossy().into_owned();
    let start_with = |region: &str, matrix: &str| {
        run(ringkv().args([
            "node",
            "--id",
            "x",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            &data_dir,
            "--region",
            region,
            "--latency-matrix",
            matrix,
        ]))
    };
    for (region, matrix, message) in [
        ("a", bad.as_str(), "no link between \"a\" and \"b\""),
        ("mars", "preset:cloud4", "unknown region \"mars\""),
    ] {
        let out = start_with(region, matrix);
        assert_exit(&out, 2);
        assert!(stderr(&out).contains(message), "{}", stderr(&out));
    }
}

/// The p50 read latency `report` shows for setting number `i`.
fn read_p50(report: &serde_json::Value, i: usize) -> f64 {
    report["settings"][i]["ops"]["read"]["p50_ms"]
        .as_f64()
        .unwrap()
}

#[test]
fn each_consistency_settings_median_is_the_round_trip_the_matrix_predicts() {
    // cloud3: us-east–us-west 34 ms, us-east–eu-west 37 ms one way. With
    // N=3 on three nodes a client of n1 (us-east) waits for n1 alone at
    // R=1, the nearer remote region at R=2 (68 ms round trip) and the
    // farther at R=3 (74 ms).
    let c = Cluster::start_each("each_settings_median", 3, 3, |i, _| {
        let region = ["us-east", "us-west", "eu-west"][i];
        ["--region", region, "--latency-matrix", "preset:cloud3"]
            .map(String::from)
            .to_vec()
    });
    let out = run(ringkv().args([
        "bench",
        "--cluster",
        &c.addr(0),
        "--workload",
        "c",
        "--records",
        "20",
        "--concurrency",
        "4",
        "--duration-s",
        "3",
        "--consistency",
        "1,2,3",
        "--json",
    ]));
    assert_exit(&out, 0);
    let report = json(&out);
    // The members' status names three regions: probes cross them, so the
    // bench runs more probers (staleness itself needs a second address).
    assert_eq!(report["config"]["member_regions"], 3, "{report}");
    assert_eq!(report["config"]["probers"], 16, "{report}");
    let (one, two, three) = (
        read_p50(&report, 0),
        read_p50(&report, 1),
        read_p50(&report, 2),
    );
    // Generous bounds for a shared CI machine; bench/RESULTS.md records
    // the tight figures.
    assert!(one < 10.0, "R=1 is local: {one} ms");
    assert!(
        (68.0..68.0 * 1.5).contains(&two),
        "R=2: {two} ms, predicted 68"
    );
    assert!(
        (74.0..74.0 * 1.5).contains(&three),
        "R=3: {three} ms, predicted 74"
    );
}
