//! The commands a new user meets first: `demo`, `cluster`, `--help`, and the
//! metrics endpoint.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

#[test]
fn demo_shows_levels_siblings_resolution_and_delete() {
    let _serial = serial();
    // The dir of an earlier demo cut short (its process, with a pid above
    // any Linux pid_max, is gone): removed by the next demo.
    let stale = std::env::temp_dir().join("ringkv-demo-4294967295");
    std::fs::create_dir_all(stale.join("n1")).unwrap();
    std::fs::write(stale.join("n1/LOG"), "left behind").unwrap();
    let o = run(ringkv().args(["demo", "--json"]));
    assert_exit(&o, 0);
    assert!(!stale.exists(), "the stale demo dir was not removed");
    let j = json(&o);
    let levels: Vec<&str> = j["levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["level"].as_str().unwrap())
        .collect();
    assert_eq!(levels, ["one", "quorum", "all"]);
    for l in j["levels"].as_array().unwrap() {
        for op in ["put", "get"] {
            let p50 = l[format!("{op}_p50_ms")].as_f64().unwrap();
            let p99 = l[format!("{op}_p99_ms")].as_f64().unwrap();
            assert!(p50 <= p99, "{l}");
        }
    }
    assert_eq!(j["siblings"], serde_json::json!(["eggs", "milk"]));
    assert_eq!(j["resolved"], serde_json::json!(["milk,eggs"]));
    assert_eq!(j["after_delete"], serde_json::json!([]));
}

/// `--log-format json`: every log line is one JSON object a collector can
/// index (level, message, target, and the event's fields at the top).
#[test]
fn logs_come_as_json_lines_when_asked() {
    let _serial = serial();
    let ip = std::net::Ipv4Addr::LOCALHOST;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip).to_string();
    // Killed however the test ends, so no cluster outlives it on the port.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        ringkv()
            .args([
                "cluster",
                "--nodes",
                "1",
                "--replicas",
                "1",
                "--base-port",
                &port,
            ])
            .args(["--log", "info", "--log-format", "json", "--data-dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stderr_pipe = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let serving = loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a log line saying the node serves");
        let event: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if event["message"] == "serving" {
            break event;
        }
    };
    assert_eq!(serving["level"], "INFO", "{serving}");
    assert_eq!(serving["node"], "n1", "{serving}");
    assert_eq!(serving["addr"], format!("127.0.0.1:{port}"), "{serving}");
    assert!(
        serving["target"].as_str().unwrap().starts_with("ringkv"),
        "{serving}"
    );
    assert!(serving["timestamp"].is_string(), "{serving}");
    drop(child);
    // An unknown format is refused, naming the ones there are.
    let o = run(ringkv().args(["--log-format", "xml", "get", "k"]));
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("possible values: text, json"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn cluster_command_serves_until_terminated() {
    let _serial = serial();
    let ip = std::net::Ipv4Addr::LOCALHOST;
    // Four consecutive free ports; retry a few bases if one is taken.
    let base = (0..20)
        .map(|_| free_port(ip))
        .find(|&p| p < 65000 && (1..4).all(|i| std::net::UdpSocket::bind((ip, p + i)).is_ok()))
        .expect("four free ports");
    let dir = tempfile::tempdir().unwrap();
    let base_port = base.to_string();
    let four_nodes = [
        "cluster",
        "--nodes",
        "4",
        "--base-port",
        &base_port,
        "--data-dir",
    ];
    let mut child = ringkv()
        .args(four_nodes)
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        let done = line.starts_with("try:");
        banner.push(line);
        if done {
            break;
        }
    }
    assert!(
        banner
            .iter()
            .any(|l| l.contains(&format!("127.0.0.1:{}", base + 3))),
        "{banner:?}"
    );
    let node = format!("127.0.0.1:{}", base + 1);
    assert_exit(
        &run(ringkv().args(["put", "k", "v", "-w", "all", "--node", &node])),
        0,
    );
    let got = run(ringkv()
        .args(["get", "k", "--json"])
        .env("RINGKV_NODE", format!("127.0.0.1:{base}")));
    assert_eq!(values(&got), ["v"]);
    // Four nodes and N=3: one can go, a second cannot.
    let (err_tx, err_rx) = mpsc::channel();
    let stderr_pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let remove = |id: &str| run(ringkv().args(["remove", id, "--node", &node]));
    assert_exit(&remove("n4"), 0);
    // n4 learns at its next membership exchange (every 5 s), and stops.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match err_rx.recv_timeout(left) {
            Ok(line) if line.contains("n4 was removed from the cluster and has stopped") => break,
            Ok(_) => {}
            Err(_) => panic!("the cluster never stopped n4"),
        }
    }
    let refused = remove("n3");
    assert_exit(&refused, 2);
    assert!(
        stderr(&refused).contains("would leave too few (add its replacement first"),
        "{}",
        stderr(&refused)
    );

    // SIGTERM: a clean shutdown with exit 0.
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_within(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));

    // The same dir with another N: the advice names the N that works.
    let o = run(ringkv()
        .args([
            "cluster",
            "--base-port",
            &base.to_string(),
            "--replicas",
            "2",
            "--data-dir",
        ])
        .arg(dir.path()));
    assert_exit(&o, 2);
    assert!(
        stderr(&o)
            .contains("replicates every key 3 times, but --replicas 2 was given; use --replicas 3"),
        "{}",
        stderr(&o)
    );
    // n4 was removed: this dir's cluster cannot start it again.
    let o = run(ringkv().args(four_nodes).arg(dir.path()));
    assert_exit(&o, 2);
    assert!(
        stderr(&o).contains("n4 of the cluster kept in")
            && stderr(&o).contains("was removed from it (`ringkv remove`); use another --data-dir"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_teaches_and_unknown_flags_exit_2() {
    let o = run(ringkv().args(["put", "--help"]));
    assert_exit(&o, 0);
    let help = stdout(&o);
    assert!(help.contains("one, quorum or all"), "{help}");
    assert!(help.contains("--context"), "{help}");
    let o = run(ringkv().args(["get", "k", "--no-such-flag"]));
    assert_exit(&o, 2);
}

#[test]
fn metrics_endpoint_counts_requests() {
    let ip = loopback_for("metrics_endpoint_counts_requests");
    let metrics = format!("{ip}:{}", free_tcp_port(ip));
    let c = Cluster::start(
        "metrics_endpoint_counts_requests",
        1,
        1,
        &["--metrics", &metrics],
    );
    assert_exit(&c.cli(0, &["put", "k", "v", "-w", "1"]), 0);
    let mut body = String::new();
    c.eventually(Duration::from_secs(10), "metrics show the put", || {
        body = scrape(&metrics);
        body.contains("ringkv_requests_total")
    });
    assert!(body.contains("op=\"put\""), "{body}");
    // A counter whose event never happened is exported at 0, with its help
    // (an alert on it works from the start), as is a quorum failure count.
    assert!(
        body.contains("# HELP ringkv_requests_shed_total ")
            && body.contains("\nringkv_requests_shed_total 0\n")
            && body.contains("ringkv_requests_total{op=\"get\",result=\"quorum_failed\"} 0"),
        "{body}"
    );
    // The default: RocksDB's flushes and compactions at the lowest priority.
    assert_eq!(
        sample(&body, "ringkv_background_priority_low"),
        Some(1.0),
        "{body}"
    );
    // Latencies are Prometheus histograms (they add up across nodes), not
    // summaries.
    c.eventually(
        Duration::from_secs(10),
        "the put's latency is in a bucket",
        || {
            body = scrape(&metrics);
            sample(&body, "ringkv_request_seconds_bucket{op=\"put\",le=\"60\"}") == Some(1.0)
        },
    );
    assert!(!body.contains("quantile="), "{body}");
}

/// Output that cannot be written, and arguments that are not text, end
/// with an error and a status of their own, never a panic; refusals asked
/// for as JSON say what they refuse.
#[test]
fn unwritable_output_and_odd_arguments_are_errors_not_panics() {
    use std::os::unix::ffi::OsStrExt;
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    // A full disk: keygen's key, and (no node needed to refuse) JSON.
    let o = ringkv().arg("keygen").stdout(full()).output().unwrap();
    assert_exit(&o, 6);
    assert!(
        stderr(&o).contains("cannot write the output to stdout"),
        "{}",
        stderr(&o)
    );
    let o = ringkv()
        .args(["get", "--json"])
        .stdout(full())
        .output()
        .unwrap();
    assert_exit(&o, 6);
    // Stderr on the full disk too (`>out 2>&1`): no message can be
    // written, but the status still says what happened, with no panic.
    let o = ringkv()
        .arg("keygen")
        .stdout(full())
        .stderr(full())
        .output()
        .unwrap();
    assert_exit(&o, 6);
    // Not UTF-8: a usage error.
    let o = run(ringkv()
        .arg("get")
        .arg(std::ffi::OsStr::from_bytes(b"\xff"))
        .arg("--json"));
    assert_exit(&o, 2);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid UTF-8"), "{}", stderr(&o));
    // A missing argument is named in the JSON too.
    let o = run(ringkv().args(["get", "--json"]));
    assert_exit(&o, 2);
    assert!(
        json(&o)["error"].as_str().unwrap().contains("<KEY>"),
        "{}",
        stdout(&o)
    );
    // So is a log filter that is not one.
    let o = run(ringkv().args(["get", "k", "--json", "--log", "x["]));
    assert_exit(&o, 2);
    assert!(
        json(&o)["error"]
            .as_str()
            .unwrap()
            .contains("not a log filter"),
        "{}",
        stdout(&o)
    );
    // An empty or directory-like output path is refused before the run.
    for (path, says) in [("", "the path is empty"), ("no-such-dir/", "ends in '/'")] {
        let o = run(ringkv().args(["bench", "--json", path]));
        assert_exit(&o, 2);
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
    }
}

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    // `demo` starts embedded nodes on loopback ports: not beside another
    // test's cluster, whose ports it could take.
    let _serial = serial();
    // The reader (`true`) has exited long before ringkv writes, so the
    // write meets a closed pipe, as in `ringkv bench --json | head`.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(sleep 0.3; {} demo; echo \"exit=$?\" >&2) | true",
            env!("CARGO_BIN_EXE_ringkv")
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Ended by the closed pipe (SIGPIPE: 128 + 13) or done; not a failure.
    assert!(
        stderr.contains("exit=141") || stderr.contains("exit=0"),
        "{stderr}"
    );
}

#[test]
fn put_overwrite_replaces_the_siblings_its_node_holds() {
    let c = Cluster::start("put_overwrite", 3, 3, &[]);
    let first = c.cli(0, &["put", "k", "a", "-w", "all"]);
    assert_exit(&first, 0);
    assert!(stdout(&first).contains("context: "), "{}", stdout(&first));
    // The second leaves siblings: its reply's context covers only what it
    // was sent with, so none is printed as if it resolved them.
    let second = c.cli(0, &["put", "k", "b", "-w", "all"]);
    assert_exit(&second, 0);
    let out = stdout(&second);
    assert!(
        out.contains("2 concurrent values") && !out.contains("context: "),
        "{out}"
    );
    // Nor given to scripts, as JSON.
    let first = json(&c.cli(0, &["put", "j", "a", "-w", "all", "--json"]));
    assert!(first["context"].is_string(), "{first}");
    let second = json(&c.cli(0, &["put", "j", "b", "-w", "all", "--json"]));
    assert_eq!(second["siblings"], 2, "{second}");
    assert!(second["context"].is_null(), "{second}");
    let mut seen = values(&c.cli(1, &["get", "k", "-r", "all", "--json"]));
    seen.sort();
    assert_eq!(seen, ["a", "b"], "two blind writes are siblings");
    assert_exit(&c.cli(1, &["put", "k", "c", "--overwrite", "-w", "all"]), 0);
    assert_eq!(
        values(&c.cli(2, &["get", "k", "-r", "all", "--json"])),
        ["c"]
    );
    // A delete with the context of a read that saw one of two siblings
    // leaves the other, and says so: its own tombstone is not counted.
    let ctx_a = context(&c.cli(0, &["put", "d", "a", "-w", "all", "--json"]));
    assert_exit(&c.cli(1, &["put", "d", "b", "-w", "all"]), 0);
    let left = json(&c.cli(
        0,
        &["delete", "d", "--context", &ctx_a, "-w", "all", "--json"],
    ));
    assert_eq!(left["siblings"], 1, "{left}");
    assert!(left["context"].is_null(), "{left}");
    assert_eq!(
        values(&c.cli(2, &["get", "d", "-r", "all", "--json"])),
        ["b"]
    );
    let gone = json(&c.cli(0, &["delete", "d", "-w", "all", "--json"]));
    assert_eq!(gone["siblings"], 0, "{gone}");
    assert!(gone["context"].is_string(), "{gone}");
    let said = c.cli(0, &["delete", "k", "-w", "all"]);
    assert!(stdout(&said).starts_with("deleted ("), "{}", stdout(&said));
    // An overwrite takes no context: clap refuses the pair.
    let ctx = context(&c.cli(0, &["get", "k", "--json"]));
    let o = c.cli(0, &["put", "k", "d", "--overwrite", "--context", &ctx]);
    assert_exit(&o, 2);
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
}
