//! `ringkv bench` end to end: the embedded cluster across emulated regions,
//! the JSON report's structure, staleness that follows R+W>N, and bad
//! input refused before anything is loaded.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn the_bench_reports_each_setting_and_staleness_follows_quorum_overlap() {
    // Its embedded nodes must not share the 2 cores with another cluster.
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("bench.json");
    let plot = dir.path().join("bench.svg");
    let out = run(ringkv().args([
        "--log",
        "error",
        "bench",
        "--workload",
        "c",
        "--records",
        "50",
        "--duration-s",
        "8",
        "--concurrency",
        "4",
        "--consistency",
        "one,quorum",
        "--json",
        &report.to_string_lossy(),
        "--plot",
        &plot.to_string_lossy(),
    ]));
    assert_exit(&out, 0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    for text in [
        "latency CDF",
        "staleness",
        "one read",
        "quorum read",
        "<polyline",
    ] {
        assert!(svg.contains(text), "{text} in the plot");
    }
    let table = stdout(&out);
    assert!(
        table.contains("fresh@0ms") && table.contains("quorum"),
        "{table}"
    );
    assert!(
        table.contains("Probes behind each fresh@ share (16 probers): one "),
        "{table}"
    );
    // Each setting's shares get a row of their 95% intervals (Wilson's:
    // quorum reads, all fresh, still show an interval below 100%).
    assert_eq!(
        table.matches("  95% confidence interval").count(),
        2,
        "{table}"
    );
    assert!(
        table.contains("CPU per operation (this process: the embedded nodes"),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["config"]["workload"], "C");
    assert_eq!(json["config"]["warmup_s"], 1, "the default warm-up");
    assert_eq!(json["config"]["replicas"], 3);
    assert_eq!(json["config"]["embedded_nodes"], 5);
    assert_eq!(json["config"]["regions"], "preset:cloud3");
    // The matrix itself and where each node sat, so a report stands alone.
    let matrix = &json["config"]["latency_matrix"];
    assert_eq!(
        matrix["regions"],
        serde_json::json!(["us-east", "us-west", "eu-west"])
    );
    let links = matrix["links"].as_array().unwrap();
    assert_eq!(links.len(), 3, "{matrix}");
    let us = links
        .iter()
        .find(|l| l["between"] == serde_json::json!(["us-east", "us-west"]))
        .unwrap_or_else(|| panic!("{matrix}"));
    assert!(us["delay_ms"].as_f64().unwrap() > 10.0, "{us}");
    assert_eq!(
        json["config"]["node_regions"],
        serde_json::json!(["us-east", "us-west", "eu-west", "us-east", "us-west"])
    );
    assert_eq!(
        json["config"]["client_delay_ms"], matrix["local"]["delay_ms"],
        "a client sits in its coordinator's region"
    );
    assert_eq!(json["config"]["updates"], "overwrite");
    assert_eq!(json["config"]["connections_per_node"], 1);
    assert_eq!(json["config"]["member_regions"], 3);
    assert_eq!(
        json["config"]["probers"], 16,
        "across emulated regions a probe is slow: more probers"
    );
    for s in json["settings"].as_array().unwrap() {
        assert_eq!(s["probers"], 16, "each setting ran them all: {s}");
    }
    assert_eq!(
        json["config"]["cpu_scope"],
        "this process: the embedded nodes, the bench's clients and its staleness probes"
    );
    let settings = json["settings"].as_array().unwrap();
    let names: Vec<&str> = settings
        .iter()
        .map(|s| s["setting"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["one", "quorum"]);
    for s in settings {
        let read = &s["ops"]["read"];
        assert!(read["ops"].as_u64().unwrap() > 0, "{s}");
        for field in [
            "p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms", "errors", "timeouts", "shed",
        ] {
            assert!(!read[field].is_null(), "{field} in {s}");
        }
        // Per operation, as the table gives it; together, the setting's.
        let per_op: f64 = over_ops(s, |o| o["ops_per_sec"].as_f64().unwrap());
        let total = s["ops_per_sec"].as_f64().unwrap();
        assert!((per_op - total).abs() <= total * 1e-6 + 1e-6, "{s}");
        // A reason exactly when something failed.
        assert_eq!(
            read["first_error"].is_string(),
            read["errors"].as_u64() != Some(0),
            "{s}"
        );
        assert_eq!(s["staleness"].as_array().unwrap().len(), 6, "{s}");
        // Every read of a loaded record returns at least its one value.
        let (reads, values) = (
            s["reads"].as_u64().unwrap(),
            s["values_read"].as_u64().unwrap(),
        );
        assert!(reads > 0 && values >= reads, "{s}");
        assert!(s["max_siblings"].as_u64().unwrap() >= 1, "{s}");
        // Five nodes and their clients cannot serve a read in no CPU time,
        // nor take a whole second of it per read.
        let cpu_us = s["cpu_us_per_op"].as_f64().unwrap();
        assert!(cpu_us > 1.0 && cpu_us < 1e6, "{s}");
        assert!(s["cpu_s"].as_f64().unwrap() > 0.0, "{s}");
        // A closed loop has no schedule to fall behind.
        assert!(s["pickup_ms"].is_null(), "{s}");
        // The machine ran the embedded cluster: busy, and the host's share
        // (steal, 0 on bare metal) a share like any other.
        let busy = s["machine_busy_pct"].as_f64().unwrap();
        let steal = s["host_steal_pct"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= 100.0, "{s}");
        assert!((0.0..=100.0 - busy).contains(&steal), "{s}");
        // Polling while idle is part of the idle time, and reported
        // exactly where this kernel has a polling state.
        let cpus = std::path::Path::new("/sys/devices/system/cpu");
        match s["machine_idle_poll_pct"].as_f64() {
            Some(poll) => assert!((0.0..=100.0 - busy - steal + 1e-6).contains(&poll), "{s}"),
            None => assert_eq!(ringkv_bench::machine_cpu::idle_poll_us(cpus), None, "{s}"),
        }
        // Every process's CPU per operation includes this one's. This
        // process's is exact (getrusage); the machine's is wall time less
        // idle and steal, counted in clock ticks, so it may come out a
        // little under when the bench was nearly all the machine did.
        let machine_us = s["machine_cpu_us_per_op"].as_f64().unwrap();
        assert!(machine_us >= 0.9 * cpu_us && machine_us < 1e6, "{s}");
    }
    // R=1, W=1 across regions: a read right after the write, through
    // another node, often misses it. R+W>N never does.
    let at0 = |s: &serde_json::Value| s["staleness"][0].clone();
    let one = at0(&settings[0]);
    assert_eq!(one["t_ms"], 0);
    assert!(one["probes"].as_u64().unwrap() > 0, "{one}");
    assert!(
        one["fresh_share"].as_f64().unwrap() < 1.0,
        "R=W=1 shows staleness at t=0: {one}"
    );
    for v in settings[1]["staleness"].as_array().unwrap() {
        assert_eq!(v["fresh"], v["probes"], "quorum reads are never stale: {v}");
        assert_eq!(v["failed"], 0, "every node is up: {v}");
    }
    // Every share probed comes with its 95% interval around it; all fresh
    // is not proof of always fresh, so the interval reaches below 100%.
    for s in settings {
        for v in s["staleness"].as_array().unwrap() {
            if v["probes"] == 0 {
                assert!(v["fresh_ci95"].is_null(), "{v}");
                continue;
            }
            let share = v["fresh_share"].as_f64().unwrap();
            let (low, high) = (
                v["fresh_ci95"]["low"].as_f64().unwrap(),
                v["fresh_ci95"]["high"].as_f64().unwrap(),
            );
            assert!(
                0.0 <= low && low <= share && share <= high && high <= 1.0,
                "{v}"
            );
        }
    }
    // Quorum reads at t=0 were all fresh (above); the interval still
    // reaches below 100%, which the column's interval row shows.
    let quorum_at0 = &settings[1]["staleness"][0];
    assert!(quorum_at0["probes"].as_u64().unwrap() > 0, "{quorum_at0}");
    assert!(
        quorum_at0["fresh_ci95"]["low"].as_f64().unwrap() < 1.0,
        "{quorum_at0}"
    );
    // Probes that one node coordinated (both requests forwarded to the same
    // replica) are counted apart, never as fresh.
    assert!(one["same_coordinator"].as_u64().is_some(), "{one}");
    // Beside each measured p50, the one the latency matrix predicts from
    // placement and the regions' delays: a quorum read waits for a round
    // trip between regions (tens of ms), and measures within CI's generous
    // bounds of it (bench/RESULTS.md has the tight figures).
    assert!(
        table.contains("p50 in ms that the latency matrix predicts (its delays alone, every node up) by setting — one: read "),
        "{table}"
    );
    for s in settings {
        assert!(s["ops"]["read"]["predicted_p50_ms"].is_f64(), "{s}");
    }
    let quorum = &settings[1]["ops"]["read"];
    let predicted = |p: &str| quorum[format!("predicted_{p}_ms")].as_f64().unwrap();
    let measured = quorum["p50_ms"].as_f64().unwrap();
    assert!(predicted("p45") > 20.0, "{quorum}");
    assert!(
        (0.9 * predicted("p45")..1.5 * predicted("p55")).contains(&measured),
        "{quorum}"
    );
}

#[test]
fn bad_bench_input_is_refused_before_loading() {
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--workload", "e"], 2, "range scans"),
        (&["--workload", "zz"], 2, "unknown workload"),
        (&["--consistency", "4"], 2, "above N=3"),
        (&["--consistency", "r=1"], 2, "a pair needs both halves"),
        (&["--consistency", "r=1,w=4"], 2, "W=4 is above N=3"),
        (&["--consistency", "one,,all"], 2, "empty setting"),
        (&["--regions", "preset:mars"], 2, "unknown preset"),
        (
            &["--regions", "preset:cloud4", "--cluster", "127.0.0.1:1"],
            2,
            "--regions preset:cloud4 shapes the embedded cluster only, not with --cluster",
        ),
        (
            &["--workload", "putget", "--regions", "preset:cloud3"],
            2,
            "not with --workload putget",
        ),
        // None is what those runs have: accepted (and the address then
        // refused as unreachable).
        (
            &["--regions", "none", "--cluster", "127.0.0.1:1"],
            4,
            "cannot reach",
        ),
        (
            &["--records", "0"],
            2,
            "--records <N>': must be 1 to 1000000000",
        ),
        (
            &["--records", "1000000001"],
            2,
            "--records <N>': must be 1 to 1000000000",
        ),
        (&["--records", "ten"], 2, "\"ten\" is not a whole number"),
        (&["--rate", "0"], 2, "--rate"),
        (
            &["--rate", "10000001"],
            2,
            "--rate <OPS|PERCENT%>': must be 1 to 10000000",
        ),
        (
            &["--rate", "0%"],
            2,
            "a share of the peak (PERCENT%): must be 1 to 1000",
        ),
        (
            &["--rate", "12.5%"],
            2,
            "a share of the peak (PERCENT%): \"12.5\" is not a whole number",
        ),
        (
            &["--workload", "putget", "--rate", "50%"],
            2,
            "--rate works with YCSB workloads, not putget",
        ),
        (&["--updates", "blind"], 2, "unknown update mode"),
        (&["--connections", "0"], 2, "--connections"),
        (&["--worker-threads", "0"], 2, "--worker-threads"),
        (
            &["--concurrency", "0"],
            2,
            "--concurrency must be at least 1",
        ),
        (
            &["--concurrency", "10001"],
            2,
            "--concurrency must be at most 10000",
        ),
        (
            &["--concurrency", "1000", "--value-bytes", "67000000"],
            2,
            "would hold 127792 MiB of values in the clients",
        ),
        (&["--nodes", "2"], 2, "--nodes"),
        (
            &["--nodes", "3", "--cluster", "127.0.0.1:1"],
            2,
            "'--nodes <N>' cannot be used with '--cluster",
        ),
        (
            &["--value-bytes", "67043329"],
            2,
            "--value-bytes must be at most 67043328",
        ),
        (
            &["--plot", "/nonexistent-dir/x.svg"],
            2,
            "directory /nonexistent-dir does not exist",
        ),
        (&["--json", "/"], 2, "is a directory"),
        (
            &[
                "--json",
                "/tmp/ringkv-same.out",
                "--plot",
                "/tmp/ringkv-same.out",
            ],
            2,
            "--json and --plot name the same file",
        ),
        (
            &["--workload", "putget", "--target", "resp://127.0.0.1:1"],
            2,
            "--target works with YCSB workloads, not putget",
        ),
        (
            &["--workload", "putget", "--warmup-s", "1"],
            2,
            "--warmup-s works with YCSB workloads, not putget",
        ),
        (
            &["--warmup-s", "86401"],
            2,
            "--warmup-s must be at most 86400 (a day)",
        ),
        (&["--warmup-s", "ten"], 2, "--warmup-s"),
        (&["--probers", "65"], 2, "--probers <N>': must be 0 to 64"),
        (
            &["--workload", "putget", "--probers", "1"],
            2,
            "--probers works with YCSB workloads, not putget",
        ),
        (
            &["--target", "resp://127.0.0.1:1", "--probers", "1"],
            2,
            "'--target <resp://HOST:PORT>' cannot be used with '--probers <N>'",
        ),
        (&["--cluster", "127.0.0.1:1"], 4, "cannot reach"),
        (
            &["--client-reads"],
            2,
            "--client-reads is measured without emulated regions: add --regions none",
        ),
        (
            &["--workload", "putget", "--client-reads"],
            2,
            "--client-reads works with YCSB workloads, not putget",
        ),
        (
            &["--target", "resp://127.0.0.1:1", "--client-reads"],
            2,
            "'--target <resp://HOST:PORT>' cannot be used with '--client-reads'",
        ),
        (&["-r", "2"], 2, "-r sets --workload putget's consistency"),
        // A RESP store takes no cluster key: a stale one is not read.
        (
            &[
                "--target",
                "resp://127.0.0.1:1",
                "--cluster-key-file",
                "/nonexistent",
            ],
            4,
            "cannot reach 127.0.0.1:1",
        ),
    ];
    for (args, code, message) in cases {
        let mut cmd = ringkv();
        cmd.arg("bench").args(*args);
        let out = run(&mut cmd);
        assert_exit(&out, *code);
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
}

/// `--rate 10%`: the setting runs first as a closed loop, and its open loop
/// then sends exactly a tenth of that peak a second.
#[test]
fn a_share_of_the_peak_runs_the_open_loop_at_that_share_of_a_measured_peak() {
    // Its embedded nodes must not share the 2 cores with another cluster.
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("bench.json");
    let out = run(ringkv()
        .args(open_loop_of_three("c", "10%"))
        .args(["--json", &report.to_string_lossy()]));
    assert_exit(&out, 0);
    let table = stdout(&out);
    assert!(
        table.contains("Peak (a closed loop of the same setting and clients, just before) and the open loop's rate by setting — quorum: "),
        "{table}"
    );
    assert!(table.contains(" ops/s (p99 read "), "{table}");
    assert!(
        stderr(&out).contains("open loop at 10% of each setting's peak"),
        "{}",
        stderr(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["config"]["loop"], "open");
    assert_eq!(report["config"]["rate"], "10%");
    assert_eq!(
        report["config"]["probers"], 4,
        "no emulated regions: the fewer probers"
    );
    assert!(report["config"]["rate_per_s"].is_null(), "{report}");
    let s = &report["settings"][0];
    let peak = s["peak"]["ops_per_sec"].as_f64().unwrap();
    assert!(peak > 0.0, "{s}");
    // The peak run, whole: a closed loop, with its own latencies.
    let peak_run = &s["peak"];
    assert!(peak_run["peak"].is_null() && peak_run["rate_per_s"].is_null());
    assert!(peak_run["ops"]["read"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(
        peak_run["pickup_ms"].is_null() && peak_run["client_queue_ms"].is_null(),
        "a closed loop's: {peak_run}"
    );
    let rate = s["rate_per_s"].as_u64().unwrap();
    assert_eq!(rate, ((peak / 10.0).round() as u64).max(1), "{s}");
    // The open loop ran at that rate: exactly rate × 2 s requests came due
    // in its measured window, each counted once.
    let due = requests_counted(s);
    assert_eq!(due, 2 * rate, "{s}");
    assert!(s["pickup_ms"]["p50"].is_f64(), "an open loop's: {s}");
}

/// Workload D inserts records as it runs: with `--rate PERCENT%` the open
/// loop must go on from the records the peak run left, or its inserts
/// would write keys that exist already and its reads of the latest
/// records would miss the newest.
#[test]
fn a_share_of_the_peak_hands_the_peak_runs_inserts_on_to_the_open_loop() {
    // Its embedded nodes must not share the 2 cores with another cluster.
    let _serial = serial();
    let out = run(ringkv()
        .args(open_loop_of_three("d", "50%"))
        .args(["--json"]));
    assert_exit(&out, 0);
    let report = json(&out);
    let s = &report["settings"][0];
    let peak = &s["peak"];
    let inserted = |run: &serde_json::Value| run["ops"]["insert"]["ops"].as_u64().unwrap();
    let after = |run: &serde_json::Value| run["records_after"].as_u64().unwrap();
    // 20 records loaded; the peak run's inserts (warm-up ones too) follow.
    assert!(inserted(peak) > 0, "{peak}");
    assert!(after(peak) >= 20 + inserted(peak), "{peak}");
    // The open loop's new records come after the peak run's, not over them.
    assert!(inserted(s) > 0, "{s}");
    assert!(after(s) >= after(peak) + inserted(s), "{s}");
    // Every read found its record: none asked for one not yet inserted.
    for run in [peak, s] {
        assert_eq!(run["reads_not_found"], 0, "{run}");
    }
}

#[test]
fn an_open_loop_never_sends_faster_than_its_rate() {
    // Its embedded nodes must not share the 2 cores with another cluster.
    let _serial = serial();
    let out = run(ringkv().args(open_loop_of_three("b", "100")).args([
        "--worker-threads",
        "1",
        "--probers",
        "0",
        "--json",
    ]));
    assert_exit(&out, 0);
    let report = json(&out);
    assert_eq!(report["config"]["probers"], 0);
    assert_eq!(report["settings"][0]["probers"], 0);
    let skipped = &report["settings"][0]["staleness_skipped"];
    assert!(
        skipped
            .as_str()
            .is_some_and(|why| why.contains("--probers 0")),
        "{skipped}"
    );
    assert_eq!(report["config"]["loop"], "open");
    assert_eq!(report["config"]["embedded_nodes"], 3);
    assert_eq!(report["config"]["rate_per_s"], 100);
    assert_eq!(report["config"]["rate"], "100");
    assert!(report["settings"][0]["peak"].is_null());
    assert_eq!(report["settings"][0]["rate_per_s"], 100);
    assert_eq!(report["config"]["worker_threads"], 1);
    // What the bench's threads were scheduled with: the settings of this
    // test's thread, which started it and which they inherited (null both
    // sides where the kernel has no /proc/PID/sched).
    let scheduler = &report["config"]["scheduler"];
    let field = |text: &str, name: &str| {
        text.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let own_cpus = field(&status, "Cpus_allowed_list").unwrap();
    assert_eq!(scheduler["cpus_allowed"], own_cpus.as_str(), "{scheduler}");
    let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
    let own_policy = field(&sched, "policy").map(|p| p.parse::<u64>().unwrap());
    assert_eq!(scheduler["policy"].as_u64(), own_policy, "{scheduler}");
    if own_policy == Some(0) {
        let own_nice = field(&sched, "prio").map(|p| p.parse::<i64>().unwrap() - 120);
        assert_eq!(scheduler["nice"].as_i64(), own_nice, "{scheduler}");
    }
    let s = &report["settings"][0];
    let ops = requests_counted(s);
    // 100/s for 2 s: exactly 200 requests came due, however fast the
    // cluster answers, and each is counted once: answered, failed, timed
    // out (those never sent among them) or shed.
    assert_eq!(
        ops, 200,
        "{ops} requests in an open loop of 100/s for 2 s: {s}"
    );
    let answered: u64 = over_ops(s, |o| o["ops"].as_u64().unwrap());
    assert!(answered > 0, "{s}");
    assert!(s["unsent"].is_u64(), "{s}");
    // The load generator's part of the latencies: every request waited
    // some time between due and sent, no longer than the slowest latency.
    let pickup = &s["pickup_ms"];
    let (p50, max) = (pickup["p50"].as_f64(), pickup["max"].as_f64());
    assert!(p50.is_some_and(|p50| p50 <= max.unwrap()), "{s}");
    // Of it, the queue for a free client: never longer than the wait.
    let queued_max = s["client_queue_ms"]["max"].as_f64().unwrap();
    assert!(queued_max <= max.unwrap(), "{s}");
    // Four clients for 100 requests a second, each answered within a few
    // milliseconds: a client is nearly always free when one comes due.
    let share = s["client_queue_share"].as_f64().unwrap();
    assert!((0.0..0.5).contains(&share), "{s}");
    let slowest = s["ops"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|o| o["max_ms"].as_f64())
        .fold(0.0, f64::max);
    // (A failed request's wait is counted, its latency is not.)
    let failed = over_ops(s, |o| {
        o["errors"].as_u64().unwrap() + o["shed"].as_u64().unwrap()
    });
    if failed == 0 {
        assert!(max.unwrap() <= slowest * 1.002 + 0.01, "{s}");
        for (op, o) in s["ops"].as_object().unwrap() {
            assert!(o["failed_ms"].is_null(), "{op} had no failures: {o}");
        }
    }
}

#[test]
fn putget_runs_on_an_embedded_cluster_of_the_size_asked() {
    // Its embedded nodes must not share the 2 cores with another cluster.
    let _serial = serial();
    let out = run(ringkv().args([
        "bench",
        "--workload",
        "putget",
        "--nodes",
        "4",
        "--duration-s",
        "1",
        "--concurrency",
        "2",
        "-w",
        "all",
        "--json",
    ]));
    assert_exit(&out, 0);
    let report = json(&out);
    assert_eq!(report["embedded_nodes"], 4);
    assert_eq!(report["w"], "all");
    // The configuration is in the report, as for the YCSB workloads.
    assert_eq!(report["cluster"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(report["phase_duration_s"], 1.0);
    assert_eq!(report["request_timeout_ms"], 2000);
    for phase in ["put", "get"] {
        let p = &report[phase];
        assert!(p["ops"].as_u64().unwrap() > 0, "{phase}: {p}");
        assert_eq!(p["errors"], 0, "{phase}: {p}");
        assert_eq!(p["timeouts"], 0, "{phase}: {p}");
        assert!(p["first_error"].is_null(), "{phase}: {p}");
    }
    assert_eq!(report["failovers"], 0);
}

/// With `--client-reads`, a 5-node embedded cluster's clients read from
/// the replicas themselves; the text footer and the JSON count the reads
/// each way, and the one coordinator-free path is the one taken.
#[test]
fn client_driven_reads_run_and_are_counted() {
    let _serial = serial();
    let json_path = std::env::temp_dir().join(format!("ringkv-cr-{}.json", std::process::id()));
    let out = run(ringkv().args([
        "bench",
        "--regions",
        "none",
        "--workload",
        "b",
        "--records",
        "200",
        "--consistency",
        "2",
        "--duration-s",
        "1",
        "--warmup-s",
        "0",
        "--concurrency",
        "4",
        "--client-reads",
        "--json",
        json_path.to_str().unwrap(),
    ]));
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("2: client-driven reads: "),
        "{}",
        stdout(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json_path);
    assert_eq!(report["config"]["client_reads"], true, "{report}");
    let setting = &report["settings"][0];
    let reads = &setting["client_reads"];
    assert!(reads["direct"].as_u64().unwrap() > 0, "{reads}");
    // Every write was acknowledged by W=2 of 3 before the next read of it,
    // yet the third replica may still be behind: a read that asked it and
    // another falls back, so fallbacks are not always 0.
    assert!(reads["fallbacks"].is_u64(), "{reads}");
    let ops = setting["ops"].as_object().unwrap();
    assert!(ops["read"]["ops"].as_u64().unwrap() > 0, "{setting}");
    for op in ops.values() {
        assert_eq!(op["errors"], 0, "{op}");
    }
}

/// A bench stopped by SIGTERM (or Ctrl-C) removes its embedded cluster's
/// data and ends with 128 + the signal, as the signal's default would.
#[test]
fn a_bench_stopped_by_a_signal_removes_its_scratch_dir() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut child = ringkv()
        .env("TMPDIR", tmp.path())
        .args(["bench", "--workload", "putget", "--duration-s", "60"])
        .args(["--concurrency", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let scratch = tmp.path().join(format!("ringkv-bench-{}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Its nodes' stores are there once they serve.
    while !scratch.join("n1").join("CURRENT").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no embedded cluster in {scratch:?}"
        );
        assert!(child.try_wait().unwrap().is_none(), "the bench ended early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: a plain kill(2) of the child we spawned.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(!scratch.exists(), "{scratch:?} was left behind");
}

/// A toy Redis: GET and SET over RESP on a background thread, enough for
/// `ringkv bench --target resp://` without a redis-server on the machine.
fn toy_redis() -> std::net::SocketAddr {
    toy_redis_with(false, std::time::Duration::ZERO)
}

/// [`toy_redis`], whose GETs all fail (`get_fails`), or each take
/// `get_delay`.
fn toy_redis_with(get_fails: bool, get_delay: std::time::Duration) -> std::net::SocketAddr {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>> = Arc::default();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let store = store.clone();
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let n: usize = line.trim()[1..].parse().unwrap();
                    let mut args = Vec::new();
                    for _ in 0..n {
                        let mut len = String::new();
                        r.read_line(&mut len).unwrap();
                        let len: usize = len.trim()[1..].parse().unwrap();
                        let mut arg = vec![0; len + 2];
                        r.read_exact(&mut arg).unwrap();
                        arg.truncate(len);
                        args.push(arg);
                    }
                    let reply = match args[0].as_slice() {
                        b"SET" => {
                            store
                                .lock()
                                .unwrap()
                                .insert(args[1].clone(), args[2].clone());
                            b"+OK\r\n".to_vec()
                        }
                        b"GET" if get_fails => b"-ERR broken on purpose\r\n".to_vec(),
                        b"GET" => {
                            std::thread::sleep(get_delay);
                            let held = store.lock().unwrap().get(&args[1]).cloned();
                            match held {
                                Some(v) => {
                                    [format!("${}\r\n", v.len()).as_bytes(), &v, b"\r\n"].concat()
                                }
                                None => b"$-1\r\n".to_vec(),
                            }
                        }
                        _ => b"-ERR unknown command\r\n".to_vec(),
                    };
                    out.write_all(&reply).unwrap();
                }
            });
        }
    });
    addr
}

#[test]
fn the_same_workload_runs_against_a_resp_store() {
    // Its embedded nodes must not share the 2 cores with another cluster.
    let _serial = serial();
    let addr = toy_redis();
    let target = format!("resp://{addr}");
    let workload = [
        "bench",
        "--target",
        &target,
        "--workload",
        "f",
        "--records",
        "50",
        "--duration-s",
        "1",
        "--concurrency",
        "2",
    ];
    let out = run(ringkv().args(workload).arg("--json"));
    assert_exit(&out, 0);
    let report = json(&out);
    assert_eq!(report["config"]["target"], format!("resp://{addr}"));
    assert_eq!(report["config"]["embedded_nodes"], 0);
    // Each RESP client has its own TCP connection: no shared pool.
    assert!(report["config"]["connections_per_node"].is_null());
    assert_eq!(
        report["config"]["cpu_scope"],
        "this process: the bench's clients"
    );
    let s = &report["settings"][0];
    assert_eq!(s["setting"], "resp");
    for op in ["read", "rmw"] {
        assert!(s["ops"][op]["ops"].as_u64().unwrap() > 0, "{op}: {s}");
        assert_eq!(s["ops"][op]["errors"], 0, "{op}: {s}");
    }
    // Its files are written before the table: a stdout closed early (`|
    // head -0`) ends the process at the table, with both files there.
    let dir = tempfile::tempdir().unwrap();
    let (json_path, plot_path) = (dir.path().join("r.json"), dir.path().join("r.svg"));
    let mut child = ringkv()
        .args(workload)
        .arg("--json")
        .arg(&json_path)
        .arg("--plot")
        .arg(&plot_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait().unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(written["settings"][0]["setting"], "resp");
    assert!(std::fs::read_to_string(&plot_path)
        .unwrap()
        .contains("<svg"));
    let refused = run(ringkv().args(["bench", "--target", "redis://x:1"]));
    assert_exit(&refused, 2);
    assert!(
        stderr(&refused).contains("resp://HOST:PORT"),
        "{}",
        stderr(&refused)
    );
}

/// A run that measured nothing (every request of a setting failed) exits
/// 3 after its report, so a script does not take it for a result; an open
/// loop held back by too few clients says so, and how many to use.
#[test]
fn a_run_with_no_success_fails_and_too_few_clients_are_named() {
    let broken = format!("resp://{}", toy_redis_with(true, std::time::Duration::ZERO));
    let args = ["--workload", "c", "--records", "20", "--duration-s", "1"];
    let out = run(ringkv()
        .args(["bench", "--target", &broken])
        .args(args)
        .args(["--concurrency", "2", "--json"]));
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("none of its") && stderr(&out).contains("requests succeeded"),
        "{}",
        stderr(&out)
    );
    // The report still came out whole.
    let report = json(&out);
    let read = &report["settings"][0]["ops"]["read"];
    assert_eq!(read["ops"], 0);
    assert!(read["errors"].as_u64().unwrap() > 0, "{read}");
    // The failures' latencies, apart from the percentiles (empty here).
    assert!(read["p50_ms"].is_null(), "{read}");
    let failed = &read["failed_ms"];
    let (p50, max) = (failed["p50"].as_f64(), failed["max"].as_f64());
    assert!(
        p50.is_some_and(|p50| p50 > 0.0 && p50 <= max.unwrap()),
        "{read}"
    );
    // Asked for a share of the peak, a peak run that got nothing through
    // leaves no rate: its report still comes out whole, and the command
    // fails after it, saying why.
    let out = run(ringkv()
        .args(["bench", "--target", &broken])
        .args(args)
        .args(["--concurrency", "2", "--rate", "50%", "--json"]));
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("so there was no rate to run at 50% of it"),
        "{}",
        stderr(&out)
    );
    let report = json(&out);
    assert_eq!(report["config"]["rate"], "50%");
    let s = &report["settings"][0];
    assert_eq!(s["ops"]["read"]["ops"], 0, "{s}");
    assert!(s["rate_per_s"].is_null() && s["peak"].is_null(), "{s}");

    // GETs of 20 ms at 60/s keep about 1.2 clients busy: one is too few.
    let slow = format!(
        "resp://{}",
        toy_redis_with(false, std::time::Duration::from_millis(20))
    );
    let out = run(ringkv()
        .args(["bench", "--target", &slow])
        .args(args)
        .args(["--concurrency", "1", "--rate", "60", "--warmup-s", "0"]));
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("requests waited for a free client")
            && stdout(&out).contains("raise --concurrency to at least"),
        "{}",
        stdout(&out)
    );
    // Nearly every request came due while the one client was busy, and
    // the wait line says that it queued.
    let queued_pct = stdout(&out)
        .lines()
        .find(|l| l.starts_with("Of that wait, queued with every client busy"))
        .and_then(|l| l.split("— ").nth(1))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split('%').next())
        .and_then(|pct| pct.parse::<f64>().ok());
    assert!(
        queued_pct.is_some_and(|pct| pct > 50.0),
        "{queued_pct:?}: {}",
        stdout(&out)
    );
}

/// `ringkv bench --cluster` goes on when one of its nodes stops mid-run (as
/// in a rolling restart): the clients that used it move to the others, so
/// at most the requests under way on it fail, where without failover every
/// request of those clients would.
#[test]
fn the_bench_moves_its_clients_off_a_node_that_stops_mid_run() {
    let metrics = std::sync::OnceLock::new();
    let mut cluster = Cluster::start_each("bench_failover", 3, 3, |i, ip| {
        if i < 2 {
            return vec![];
        }
        let addr = format!("{ip}:{}", free_tcp_port(ip));
        metrics.set(addr.clone()).unwrap();
        vec!["--metrics".to_string(), addr]
    });
    let metrics = metrics.get().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("bench.json");
    let targets = format!(
        "{},{},{}",
        cluster.addr(0),
        cluster.addr(1),
        cluster.addr(2)
    );
    let concurrency = 6;
    let bench = ringkv()
        .args([
            "--log",
            "error",
            "bench",
            "--cluster",
            &targets,
            "--workload",
            "a",
        ])
        .args([
            "--records",
            "200",
            "--consistency",
            "quorum",
            "--duration-s",
            "8",
            // Measured from the first request: n3 stops early in the run.
            "--warmup-s",
            "0",
        ])
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--connections",
            "1",
            "--json",
        ])
        .arg(&report)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The load phase only writes: a read coordinated by n3 means the run
    // phase has begun.
    eventually(Duration::from_secs(60), "the run phase reaches n3", || {
        sample(
            &scrape(&metrics),
            r#"ringkv_requests_total{op="get",result="ok"}"#,
        )
        .is_some_and(|n| n > 0.0)
    });
    cluster.signal(2, "TERM");
    let (status, stderr) = cluster.wait_exit(2, Duration::from_secs(30));
    assert!(status.success(), "n3 did not stop cleanly: {stderr}");
    let out = bench.wait_with_output().unwrap();
    assert_exit(&out, 0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let s = &report["settings"][0];
    assert!(s["failovers"].as_u64().unwrap() >= 1, "{s}");
    let (mut ok, mut failed) = (0, 0);
    for o in s["ops"].as_object().unwrap().values() {
        ok += o["ops"].as_u64().unwrap();
        failed += o["errors"].as_u64().unwrap()
            + o["timeouts"].as_u64().unwrap()
            + o["shed"].as_u64().unwrap();
    }
    assert!(ok > 100, "{s}");
    // The 6 clients share 3 connections, one per node: only the 2 on n3's
    // can have had a request under way when it closed. (With each client
    // kept to its own node, those 2 failed 18 requests in a trial run,
    // slowly: each waits out a connect timeout; the older bench client
    // failed millions, at once and to the end.)
    assert!(failed <= concurrency / 3, "{failed} requests failed: {s}");
}

/// The sum of `field` over a JSON setting's operation types.
/// `ringkv bench` on an embedded 3-node cluster with no emulated delay:
/// `workload` in an open loop at `rate`, quorum, 4 clients, 20 records,
/// measured for 2 s.
fn open_loop_of_three<'a>(workload: &'a str, rate: &'a str) -> [&'a str; 17] {
    [
        "bench",
        "--regions",
        "none",
        "--workload",
        workload,
        "--records",
        "20",
        "--duration-s",
        "2",
        "--concurrency",
        "4",
        "--consistency",
        "quorum",
        "--rate",
        rate,
        "--nodes",
        "3",
    ]
}

/// A setting's requests, each counted once: answered, failed, timed out
/// (those never sent among them) or shed.
fn requests_counted(setting: &serde_json::Value) -> u64 {
    over_ops(setting, |o| {
        o["ops"].as_u64().unwrap()
            + o["errors"].as_u64().unwrap()
            + o["timeouts"].as_u64().unwrap()
            + o["shed"].as_u64().unwrap()
    })
}

fn over_ops<T: std::iter::Sum>(
    setting: &serde_json::Value,
    field: impl Fn(&serde_json::Value) -> T,
) -> T {
    setting["ops"]
        .as_object()
        .unwrap()
        .values()
        .map(field)
        .sum()
}
