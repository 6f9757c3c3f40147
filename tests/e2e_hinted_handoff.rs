//! Sloppy quorum and hinted handoff with real processes: five nodes, N=3.
//!
//! A killed node's writes go to fallbacks as hints, survive a crash of the
//! fallback, and reach the node when it returns; `--strict` refuses to count
//! fallbacks.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ringkv_core::{Consistency, NodeId};
use ringkv_ring::Ring;

const KEYS: usize = 1000;
const WRITERS: usize = 8;

/// The ring the test cluster builds (5 nodes, default vnodes, N=3), so the
/// test knows which keys each node owns.
fn ring() -> Ring {
    Ring::new(
        (1..=5).map(|i| {
            (
                NodeId::new(format!("n{i}")).unwrap(),
                ringkv_ring::DEFAULT_VNODES,
            )
        }),
        3,
    )
    .unwrap()
}

fn key(i: usize) -> String {
    format!("handoff:{i}")
}

fn owned_by(ring: &Ring, node: &str) -> Vec<usize> {
    let node = NodeId::new(node).unwrap();
    (0..KEYS)
        .filter(|i| ring.preference_list(key(*i).as_bytes()).contains(&node))
        .collect()
}

/// Writes every key at W=all through `addr`, `WRITERS` at a time.
async fn write_all(addr: SocketAddr) {
    write_keys(addr, KEYS, key, Consistency::All, WRITERS).await
}

/// The keys among `keys` that `addr` lacks locally.
async fn missing_keys(addr: SocketAddr, keys: &[usize]) -> Vec<usize> {
    missing_locally(addr, keys.iter().copied(), key).await
}

fn total_hints(c: &Cluster, via: usize) -> u64 {
    hints_pending(c, via).iter().filter_map(|(_, h)| *h).sum()
}

/// Kills n5, writes every key at W=all through n1, and checks that the
/// live nodes hold exactly one hint per key n5 owns. Returns those keys.
fn kill_n5_and_write(c: &mut Cluster, rt: &tokio::runtime::Runtime) -> Vec<usize> {
    let owned = owned_by(&ring(), "n5");
    assert!(owned.len() > KEYS / 3, "n5 owns {} keys", owned.len());
    c.kill(4);
    rt.block_on(write_all(c.nodes[0].addr));
    let pending = hints_pending(c, 0);
    let n5 = pending.iter().find(|(id, _)| id == "n5").unwrap();
    assert_eq!(n5.1, None, "n5 is down and cannot be asked: {pending:?}");
    // Polled: on a busy machine a peer may answer `status` too late once.
    c.eventually(Duration::from_secs(30), "one hint per key n5 owns", || {
        let pending = hints_pending(c, 0);
        let live_all_answered = pending.iter().all(|(id, h)| id == "n5" || h.is_some());
        live_all_answered && total_hints(c, 0) == owned.len() as u64
    });
    owned
}

/// Restarts n5 and waits for every hint to be delivered; checks n5 then
/// holds every key it owns.
fn restart_n5_and_check(c: &mut Cluster, rt: &tokio::runtime::Runtime, owned: &[usize]) {
    c.restart(4);
    // n5 is seen up within a few seconds, then its hints go; the deadline
    // is for a busy machine, not a claim on speed.
    c.eventually(
        Duration::from_secs(60),
        "hints_pending 0 on every node",
        || {
            let pending = hints_pending(c, 0);
            pending.iter().all(|(_, h)| *h == Some(0))
        },
    );
    let missing = rt.block_on(missing_keys(c.nodes[4].addr, owned));
    assert!(
        missing.is_empty(),
        "n5 lacks {} of its {} keys, e.g. {:?}",
        missing.len(),
        owned.len(),
        &missing[..missing.len().min(5)]
    );
}

/// The sum over `endpoints` of the sample `name{target="n5"}`.
fn n5_metric(endpoints: &[String], name: &str) -> f64 {
    endpoints
        .iter()
        .map(|e| sample(&scrape(e), &format!("{name}{{target=\"n5\"}}")).unwrap_or(0.0))
        .sum()
}

#[test]
fn writes_for_a_dead_node_are_hinted_and_handed_off_when_it_returns() {
    let ports: std::sync::Mutex<Vec<String>> = Default::default();
    let mut c = Cluster::start_each("hinted_handoff_basic", 5, 3, |_, ip| {
        let metrics = format!("{ip}:{}", free_tcp_port(ip));
        ports.lock().unwrap().push(metrics.clone());
        vec!["--metrics".to_string(), metrics]
    });
    // n1..n4: the nodes that will hold hints for n5.
    let endpoints: Vec<String> = ports.lock().unwrap()[..4].to_vec();
    let rt = runtime();
    let owned = kill_n5_and_write(&mut c, &rt);
    let n5_owns = owned.len() as f64;
    assert_eq!(n5_metric(&endpoints, "ringkv_hints_pending"), n5_owns);
    assert_eq!(n5_metric(&endpoints, "ringkv_hints_stored_total"), n5_owns);

    // The fallbacks hold the writes as hints, not as their own data.
    let fallback_of_first =
        ring().preference_list(key(owned[0]).as_bytes()).fallbacks[0].to_string();
    let i = fallback_of_first[1..].parse::<usize>().unwrap() - 1;
    assert_exit(&c.cli(i, &["get", &key(owned[0]), "--local"]), 1);

    restart_n5_and_check(&mut c, &rt, &owned);
    assert_eq!(n5_metric(&endpoints, "ringkv_hints_pending"), 0.0);
    assert_eq!(
        n5_metric(&endpoints, "ringkv_hints_delivered_total"),
        n5_owns
    );
}

#[test]
fn hints_survive_a_crash_of_the_fallback_holding_them() {
    let mut c = Cluster::start("hinted_handoff_fallback_crash", 5, 3, &[]);
    let rt = runtime();
    let owned = kill_n5_and_write(&mut c, &rt);

    // kill -9 the node holding the most hints, and bring it back.
    let (holder, held) = hints_pending(&c, 0)
        .into_iter()
        .filter_map(|(id, h)| Some((id, h?)))
        .max_by_key(|(_, h)| *h)
        .unwrap();
    assert!(held > 0);
    let i = holder[1..].parse::<usize>().unwrap() - 1;
    c.kill(i);
    c.restart(i);
    let via = if i == 0 { 1 } else { 0 };
    c.eventually(
        Duration::from_secs(10),
        "the restarted fallback reports its hints",
        || {
            hints_pending(&c, via)
                .iter()
                .any(|(id, h)| *id == holder && *h == Some(held))
        },
    );

    restart_n5_and_check(&mut c, &rt, &owned);
}

#[test]
fn strict_writes_do_not_count_fallbacks() {
    let mut c = Cluster::start("hinted_handoff_strict", 5, 3, &[]);
    let owned = owned_by(&ring(), "n5");
    let k = key(owned[0]);
    c.kill(4);
    let strict = c.cli(0, &["put", &k, "v", "-w", "all", "--strict"]);
    assert_exit(&strict, 3);
    assert!(
        stderr(&strict).contains("write quorum not reached: 2 of 3 required replicas answered"),
        "{}",
        stderr(&strict)
    );
    // The same write without --strict uses a fallback.
    let sloppy = c.cli(0, &["put", &k, "v", "-w", "all", "--json"]);
    assert_exit(&sloppy, 0);
    let replicas = json(&sloppy)["receipt"]["replicas"].clone();
    assert!(
        replicas
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["hint_for"] == "n5" && r["outcome"] == "ok"),
        "{replicas}"
    );
    // Strict reads refuse fallbacks too. A read asks a stand-in only for
    // an owner believed down, not for one that is merely silent (it may
    // hold a newer version than any stand-in): wait until n1's probes
    // have seen n5 down (from a connection made before the kill, only they
    // tell, within about 2.3 s).
    c.eventually(Duration::from_secs(30), "n5 seen down by n1", || {
        c.state_seen_by(0, "n5") == "down"
    });
    assert_exit(&c.cli(0, &["get", &k, "-r", "all", "--strict"]), 3);
    assert_exit(&c.cli(0, &["get", &k, "-r", "all"]), 0);
}
