//! A hint delivery that fails is counted in
//! `ringkv_hint_delivery_failures_total`, backs its owner off (1 s, then
//! 2 s, then 4 s…) and keeps the hint, which is delivered once the owner
//! answers again.
//!
//! Its own test binary: it installs a process-wide metrics recorder.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use ringkv_core::wire::{ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport, TransportError};
use ringkv_repair::handoff::{self, HandoffConfig, HintRouting};
use ringkv_repair::HintStore;

mod support;
use support::{book, write};

/// Counter totals by name and `target` label.
static COUNTS: Mutex<BTreeMap<(String, String), u64>> = Mutex::new(BTreeMap::new());

struct Counting;

struct Named(String, String);

impl CounterFn for Named {
    fn increment(&self, value: u64) {
        *COUNTS
            .lock()
            .unwrap()
            .entry((self.0.clone(), self.1.clone()))
            .or_default() += value;
    }

    fn absolute(&self, value: u64) {
        COUNTS
            .lock()
            .unwrap()
            .insert((self.0.clone(), self.1.clone()), value);
    }
}

impl Recorder for Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let target = key
            .labels()
            .find(|l| l.key() == "target")
            .map(|l| l.value().to_string())
            .unwrap_or_default();
        Counter::from_arc(Arc::new(Named(key.name().to_string(), target)))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn count(name: &str, target: &str) -> u64 {
    COUNTS
        .lock()
        .unwrap()
        .get(&(name.to_string(), target.to_string()))
        .copied()
        .unwrap_or(0)
}

/// An owner that is unreachable until `healthy` is set, then takes every hint.
#[derive(Default)]
struct Owner {
    healthy: AtomicBool,
    calls: AtomicU64,
}

impl Transport for Owner {
    async fn call(&self, to: &NodeId, request: Request) -> Result<Response, TransportError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.healthy.load(Ordering::SeqCst) {
            return Err(TransportError::Unreachable {
                node: to.clone(),
                reason: "connection refused".to_string(),
            });
        }
        match request {
            Request::Replica(ReplicaRequest::Handoff { clock, .. }) => {
                Ok(Response::Clock(Some(clock)))
            }
            other => panic!("a handoff sends only Sync, not {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_delivery_is_counted_backs_off_and_keeps_the_hint() {
    metrics::set_global_recorder(Counting).expect("the only recorder in this binary");
    let owner = NodeId::new("owner").unwrap();
    let book = book();
    book.store(&owner, b"k", &write("v")).unwrap();

    let transport = Arc::new(Owner::default());
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(
        book.clone(),
        transport.clone(),
        HintRouting::to_owners(Arc::new(|_: &NodeId| true)),
        config,
        shutdown,
    );
    let failures = || count("ringkv_hint_delivery_failures_total", "owner");

    // Tries at 0 s, 1 s and 3 s (tokio's paused clock): three failures.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(failures(), 3);
    assert_eq!(
        transport.calls.load(Ordering::SeqCst),
        3,
        "backed off between tries"
    );
    assert_eq!(book.pending(&owner), 1, "a failed delivery keeps the hint");

    // The next try, at 7 s, goes through.
    transport.healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(book.pending(&owner), 0, "delivered once the owner answers");
    assert_eq!(transport.calls.load(Ordering::SeqCst), 4);
    assert_eq!(
        failures(),
        3,
        "a delivery that went through is not a failure"
    );
    assert_eq!(count("ringkv_hints_delivered_total", "owner"), 1);

    stop.send(true).unwrap();
    worker.await.unwrap();
}
