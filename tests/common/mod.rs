//! A harness for end-to-end tests: real `ringkv node` processes on loopback.
//!
//! Each test gets its own loopback address (127.0.x.y, derived from the test
//! name), so tests never fight over ports, and a lock so only one cluster
//! runs at a time on a small machine. Readiness is the node's own "serving"
//! line on stdout, waited for with a deadline; nothing sleeps for luck.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Held by every test that runs nodes, so clusters never share the 2 cores.
pub fn serial() -> MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// How long a node may take to start and join.
const START_DEADLINE: Duration = Duration::from_secs(60);

pub fn ringkv() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringkv"));
    cmd.env_remove("RINGKV_NODE")
        .env_remove("RINGKV_CLUSTER_KEY_FILE")
        .env("RINGKV_LOG", "warn");
    cmd
}

/// A loopback address unique to `test`.
pub fn loopback_for(test: &str) -> Ipv4Addr {
    let h = ringkv_core::hash::stable_hash64(test.as_bytes());
    Ipv4Addr::new(
        127,
        1 + (h % 250) as u8,
        ((h >> 8) % 250) as u8 + 1,
        ((h >> 16) % 250) as u8 + 1,
    )
}

/// A UDP port free on `ip` right now.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct NodeProc {
    pub id: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl NodeProc {
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub dir: tempfile::TempDir,
    _lock: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts `count` nodes `n1..`, N=`replicas`, each given `extra` flags.
    pub fn start(test: &str, count: usize, replicas: usize, extra: &[&str]) -> Cluster {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Cluster::start_each(test, count, replicas, |_, _| extra.clone())
    }

    /// Like [`start`](Self::start), with flags per node: `extra(i, ip)` for
    /// node `i` (0-based) on loopback address `ip`.
    pub fn start_each(
        test: &str,
        count: usize,
        replicas: usize,
        extra: impl Fn(usize, Ipv4Addr) -> Vec<String>,
    ) -> Cluster {
        let lock = ONE_CLUSTER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ip = loopback_for(test);
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dir,
            _lock: lock,
        };
        for i in 1..=count {
            let id = format!("n{i}");
            let mut node_extra = extra(i - 1, ip);
            node_extra.extend(["--replicas".to_string(), replicas.to_string()]);
            let node = NodeProc {
                addr: SocketAddr::from((ip, free_port(ip))),
                data_dir: cluster.dir.path().join(&id),
                id,
                extra: node_extra,
                child: None,
            };
            cluster.nodes.push(node);
            let seeds = if i == 1 {
                vec![]
            } else {
                vec![cluster.nodes[0].addr()]
            };
            cluster.launch(i - 1, &seeds).expect("node starts");
        }
        cluster.wait_until_every_node_lists_all();
        cluster
    }

    /// Waits until every node's `status` lists every node as a member. A
    /// node serves once it has joined and told the others, but telling is
    /// best effort (1 s each): on a busy machine a member may learn of a
    /// new one only at the next membership exchange, seconds later.
    fn wait_until_every_node_lists_all(&self) {
        for i in 0..self.nodes.len() {
            let key = self.key_args(i);
            let mut args = vec!["status", "--json"];
            args.extend(key.iter().map(String::as_str));
            self.eventually(START_DEADLINE, "every node lists every member", || {
                let out = self.cli(i, &args);
                out.status.success()
                    && json(&out)["nodes"]
                        .as_array()
                        .is_some_and(|nodes| nodes.len() == self.nodes.len())
            });
        }
    }

    /// The `--cluster-key-file` flag node `i` was started with, if any,
    /// for the CLI to present the same key.
    fn key_args(&self, i: usize) -> Vec<String> {
        let extra = &self.nodes[i].extra;
        extra
            .iter()
            .position(|a| a == "--cluster-key-file")
            .and_then(|at| extra.get(at..at + 2))
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    }

    /// Starts node `i` (0-based) with `seeds`; waits until it serves.
    pub fn launch(&mut self, i: usize, seeds: &[String]) -> Result<(), String> {
        let node = &self.nodes[i];
        let mut cmd = ringkv();
        cmd.args([
            "node",
            "--id",
            &node.id,
            "--listen",
            &node.addr(),
            "--data-dir",
        ])
        .arg(&node.data_dir)
        .args(&node.extra);
        for s in seeds {
            cmd.args(["--seed", s]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("serving on") {
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(START_DEADLINE) {
            Ok(()) => {
                self.nodes[i].child = Some(child);
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                Err(format!(
                    "node {} did not start: {}",
                    self.nodes[i].id,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        }
    }

    /// Adds node `n{len+1}` (same flags as the others) and starts it with `seeds`.
    pub fn add_node(&mut self, seeds: &[String]) {
        let i = self.nodes.len();
        let first = &self.nodes[0];
        let ip = match first.addr.ip() {
            std::net::IpAddr::V4(ip) => ip,
            other => panic!("{other}"),
        };
        let id = format!("n{}", i + 1);
        let node = NodeProc {
            addr: SocketAddr::from((ip, free_port(ip))),
            data_dir: self.dir.path().join(&id),
            id,
            extra: first.extra.clone(),
            child: None,
        };
        self.nodes.push(node);
        self.launch(i, seeds).expect("node starts");
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to node `i`'s process.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i]
            .child
            .as_ref()
            .expect("running")
            .id()
            .to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} {pid}");
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Waits (until `deadline`) for node `i` to exit by itself; its exit
    /// status and what it wrote to stderr.
    pub fn wait_exit(
        &mut self,
        i: usize,
        deadline: Duration,
    ) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let mut child = self.nodes[i].child.take().expect("running");
        let until = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {} did not exit within {deadline:?}", self.nodes[i].id);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        (status, err)
    }

    /// Restarts node `i` with no seeds: it must remember its cluster.
    pub fn restart(&mut self, i: usize) {
        self.launch(i, &[]).expect("node restarts");
    }

    pub fn addr(&self, i: usize) -> String {
        self.nodes[i].addr()
    }

    /// Runs the CLI against node `i`.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        run(ringkv().args(args).args(["--node", &self.addr(i)]))
    }

    /// Runs the CLI against node `i` with `stdin` as input.
    pub fn cli_stdin(&self, i: usize, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = ringkv()
            .args(args)
            .args(["--node", &self.addr(i)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Polls `check` until it holds or `deadline` passes.
    pub fn eventually(&self, deadline: Duration, what: &str, check: impl FnMut() -> bool) {
        eventually(deadline, what, check)
    }

    /// How node `observer` sees member `peer` ("up" or "down"), from its
    /// `status --json`.
    pub fn state_seen_by(&self, observer: usize, peer: &str) -> String {
        let s = json(&self.cli(observer, &["status", "--json"]));
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == peer)
            .map(|n| n["state"].as_str().unwrap().to_string())
            .unwrap()
    }
}

/// Each node's `hints_pending` by id, as `status --json` through node
/// `via` shows it (`None`: that node did not answer).
pub fn hints_pending(c: &Cluster, via: usize) -> Vec<(String, Option<u64>)> {
    let status = json(&c.cli(via, &["status", "--json"]));
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let id = n["id"].as_str().unwrap().to_string();
            (id, n["hints_pending"].as_u64())
        })
        .collect()
}

/// The Prometheus text a `--metrics` endpoint serves, or "" if it cannot
/// be reached.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut body = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(addr) {
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let _ = s.read_to_string(&mut body);
    }
    body
}

/// The value of the sample `name{labels}` in Prometheus text, if present.
pub fn sample(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// A free TCP port on `ip`.
pub fn free_tcp_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it holds; fails the test after `deadline`.
pub fn eventually(deadline: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("not within {deadline:?}: {what}");
}

/// Waits for `child` to exit; kills it and fails the test after `deadline`
/// (a shutdown that hangs must fail the test, not hang the suite).
pub fn wait_within(
    child: &mut std::process::Child,
    deadline: Duration,
) -> std::process::ExitStatus {
    let mut status = None;
    eventually(deadline, "the process exits", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_some() {
                // A stopped process must be resumed to die cleanly.
                let _ = Command::new("kill")
                    .args([
                        "-CONT",
                        &self.nodes[i].child.as_ref().unwrap().id().to_string(),
                    ])
                    .status();
            }
            self.kill(i);
        }
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Parses `--json` output.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {:?} stderr {:?}",
            stdout(o),
            stderr(o)
        )
    })
}

/// Asserts the exit status, showing the output if it differs.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// The sorted values of a `get --json`.
pub fn values(o: &Output) -> Vec<String> {
    let mut v: Vec<String> = json(o)["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

pub fn context(o: &Output) -> String {
    json(o)["context"].as_str().unwrap().to_string()
}

/// Writes `key(i) = "v{i}"` for i in `0..keys` through `addr` at `w`,
/// `writers` clients at a time; panics on any failed write.
pub async fn write_keys(
    addr: SocketAddr,
    keys: usize,
    key: fn(usize) -> String,
    w: ringkv_core::Consistency,
    writers: usize,
) {
    use ringkv_core::wire::{PutRequest, Request, Response};
    let mut tasks = tokio::task::JoinSet::new();
    for first in 0..writers {
        tasks.spawn(async move {
            let client = ringkv_node::Client::connect(addr, Duration::from_secs(5))
                .await
                .unwrap();
            for i in (first..keys).step_by(writers) {
                let put = Request::Put(PutRequest::new(
                    key(i),
                    ringkv_core::Payload::Value(format!("v{i}").into_bytes()),
                    w,
                    None,
                ));
                match client.call(&put).await {
                    Ok(Response::Put(_)) => {}
                    other => panic!("put {} at W={w} failed: {other:?}", key(i)),
                }
            }
            client.close().await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// The keys among `keys` that `addr` does not hold locally with the value
/// `write_keys` gave them (`v{i}`).
pub async fn missing_locally(
    addr: SocketAddr,
    keys: impl IntoIterator<Item = usize>,
    key: fn(usize) -> String,
) -> Vec<usize> {
    use ringkv_core::wire::{GetRequest, Request, Response};
    let client = ringkv_node::Client::connect(addr, Duration::from_secs(5))
        .await
        .unwrap();
    let mut missing = Vec::new();
    for i in keys {
        let get = Request::Get(GetRequest {
            local: true,
            ..GetRequest::new(key(i), ringkv_core::Consistency::One)
        });
        match client.call(&get).await {
            Ok(Response::Get(g)) if g.values == [format!("v{i}").into_bytes()] => {}
            _ => missing.push(i),
        }
    }
    client.close().await;
    missing
}

/// A small runtime for tests that drive a node's client API directly.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
