//! Concurrent writers through different coordinators while a replica is
//! killed and restarted: no acknowledged write is lost.
//!
//! Blind writers add values; read-modify-write writers read a key and write
//! with the read's context, superseding what they read. At the end every
//! acknowledged value must be either still there, or superseded by a write
//! that read it and was stored: one that is still there, or itself
//! superseded so. Dynamo never rolls a write back, so a read-modify-write
//! that failed its quorum may still have been stored and superseded what it
//! read; such attempts count as superseding too, if their value shows.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ringkv_core::wire::{GetRequest, PutRequest, Request, Response};
use ringkv_core::{Consistency, Payload};
use ringkv_node::Client;

const KEYS: usize = 12;

#[derive(Default)]
struct Ledger {
    acknowledged: Vec<(String, String)>,
    /// Every read-modify-write tried, acknowledged or not: its key, the
    /// values it read (and so may supersede) and the value it wrote.
    attempts: Vec<(String, HashSet<String>, String)>,
}

/// The values of each key that a stored write superseded: those an
/// attempt read whose own value is in `finals`, or was superseded so in
/// turn (a chain of read-modify-writes).
fn superseded(
    attempts: &[(String, HashSet<String>, String)],
    finals: &HashMap<String, HashSet<String>>,
) -> HashSet<(String, String)> {
    let mut gone: HashSet<(String, String)> = HashSet::new();
    loop {
        let before = gone.len();
        for (key, read, written) in attempts {
            let stored =
                finals[key].contains(written) || gone.contains(&(key.clone(), written.clone()));
            if stored {
                gone.extend(read.iter().map(|v| (key.clone(), v.clone())));
            }
        }
        if gone.len() == before {
            return gone;
        }
    }
}

fn put(key: &str, value: String, w: Consistency, context: Option<String>) -> Request {
    Request::Put(PutRequest {
        timeout_ms: 1000,
        ..PutRequest::new(key, Payload::Value(value.into_bytes()), w, context)
    })
}

fn get(key: &str, r: Consistency) -> Request {
    Request::Get(GetRequest::new(key, r))
}

fn strings(values: &[Vec<u8>]) -> HashSet<String> {
    values
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

async fn writer(
    id: usize,
    addr: SocketAddr,
    read_modify_write: bool,
    w: Consistency,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let client = Client::connect(addr, Duration::from_secs(5)).await.unwrap();
    let mut seq = 0usize;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let key = format!("k{}", (seq * 7 + id) % KEYS);
        let value = format!("w{id}-{seq}");
        let context = if read_modify_write {
            let Ok(Response::Get(read)) = client.call(&get(&key, Consistency::Count(2))).await
            else {
                continue;
            };
            // Whatever happens to the write, it may supersede what it read.
            ledger.lock().unwrap().attempts.push((
                key.clone(),
                strings(&read.values),
                value.clone(),
            ));
            Some(read.context)
        } else {
            None
        };
        if let Ok(Response::Put(_)) = client.call(&put(&key, value.clone(), w, context)).await {
            ledger.lock().unwrap().acknowledged.push((key, value));
        }
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_across_a_kill_and_restart() {
    // Three nodes: the dead replica has no stand-in, W=2 is met by the others.
    scenario("no_acknowledged_write_is_lost", 3, Consistency::Count(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_when_fallbacks_stand_in() {
    // Five nodes, W=all: every write for the dead node goes to a fallback
    // as a hint and reaches the node through handoff after its restart.
    scenario("no_write_lost_with_fallbacks", 5, Consistency::All).await;
}

/// Four writers (two blind, two read-modify-write) through n1 and n2 while
/// the last node is killed and restarted; then checks the ledger.
async fn scenario(test: &str, nodes: usize, w: Consistency) {
    let mut c = Cluster::start(test, nodes, 3, &[]);
    let victim = nodes - 1;
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // Writers coordinate through n1 and n2; the last node is the one that dies.
    let mut writers = Vec::new();
    for id in 0..4 {
        let addr = c.nodes[id % 2].addr;
        writers.push(tokio::spawn(writer(
            id,
            addr,
            id >= 2,
            w,
            stop.clone(),
            ledger.clone(),
        )));
    }
    // The workload's schedule, not an assertion: write, kill, write, restart, write.
    tokio::time::sleep(Duration::from_millis(800)).await;
    tokio::task::block_in_place(|| c.kill(victim));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| c.restart(victim));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Every writer has finished: take the ledger out of its lock.
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.acknowledged.len() > 50,
        "too little work to mean anything: {}",
        ledger.acknowledged.len()
    );
    let victim_owns: Vec<String> = {
        let ring = ringkv_ring::Ring::new(
            (1..=nodes).map(|i| {
                (
                    ringkv_core::NodeId::new(format!("n{i}")).unwrap(),
                    ringkv_ring::DEFAULT_VNODES,
                )
            }),
            3,
        )
        .unwrap();
        let victim_id = ringkv_core::NodeId::new(format!("n{nodes}")).unwrap();
        (0..KEYS)
            .map(|k| format!("k{k}"))
            .filter(|k| ring.preference_list(k.as_bytes()).contains(&victim_id))
            .collect()
    };
    if nodes > 3 {
        // Whatever was hinted reaches the restarted node.
        tokio::task::block_in_place(|| {
            c.eventually(Duration::from_secs(60), "every hint delivered", || {
                let status = json(&c.cli(0, &["status", "--json"]));
                status["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["hints_pending"] == 0)
            })
        });
    }
    let reader = Client::connect(c.nodes[victim].addr, Duration::from_secs(5))
        .await
        .unwrap();
    let mut finals: HashMap<String, HashSet<String>> = HashMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let Response::Get(read) = reader.call(&get(&key, Consistency::All)).await.unwrap() else {
            panic!("read of {key} at r=all failed");
        };
        finals.insert(key, strings(&read.values));
    }
    let superseded = superseded(&ledger.attempts, &finals);
    let lost: Vec<&(String, String)> = ledger
        .acknowledged
        .iter()
        .filter(|(k, v)| !finals[k].contains(v) && !superseded.contains(&(k.clone(), v.clone())))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    if nodes > 3 {
        // At W=all every acknowledged write was on the victim or in a hint
        // for it, so after handoff its own copy lacks nothing.
        let mut local: HashMap<String, HashSet<String>> = HashMap::new();
        for key in &victim_owns {
            let read = Request::Get(GetRequest {
                local: true,
                ..GetRequest::new(key.as_str(), Consistency::One)
            });
            let Response::Get(read) = reader.call(&read).await.unwrap() else {
                panic!("local read of {key} failed");
            };
            local.insert(key.clone(), strings(&read.values));
        }
        let missing: Vec<&(String, String)> = ledger
            .acknowledged
            .iter()
            .filter(|(k, v)| {
                local.get(k).is_some_and(|values| !values.contains(v))
                    && !superseded.contains(&(k.clone(), v.clone()))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "the restarted node lacks acknowledged writes: {missing:?}"
        );
    }
    eprintln!(
        "{} acknowledged writes, none lost",
        ledger.acknowledged.len()
    );
    reader.close().await;
}
