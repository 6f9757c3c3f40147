//! Hints their owner keeps declining (it answers, but does not take them:
//! say clocks it cannot read) must not hold back the owner's other hints,
//! however many: a round goes on while the owner answers and takes some,
//! stops after 4 batches in a row it took nothing of (and the next round
//! resumes after them), and stops at once at a batch it answered none of,
//! as a node that is down answers none. And a hint is never stuck the
//! other way, removed with a newer write than the owner took.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::{ErrorKind, ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport, TransportError};
use ringkv_repair::handoff::{self, HandoffConfig, HintRouting};
use ringkv_repair::hints::{HintBackend, HintConfig, MemHintBackend};
use ringkv_repair::{HintBook, HintError, HintStore};

mod support;
use support::{book, write};

/// An owner that declines every hint of a key starting `a-bad` and takes
/// the rest.
#[derive(Default)]
struct Owner {
    bad_sends: AtomicU64,
    /// Declines every hint (a failing disk, say).
    declines_all: bool,
    /// Takes the `a-bad` hints too (its trouble is over).
    recovered: AtomicBool,
}

impl Transport for Owner {
    async fn call(&self, _to: &NodeId, request: Request) -> Result<Response, TransportError> {
        match request {
            Request::Replica(ReplicaRequest::Handoff { key, .. })
                if self.declines_all
                    || (key.starts_with(b"a-bad") && !self.recovered.load(Ordering::SeqCst)) =>
            {
                self.bad_sends.fetch_add(1, Ordering::SeqCst);
                Ok(Response::error(
                    ErrorKind::Internal,
                    "stored clock is corrupt",
                ))
            }
            Request::Replica(ReplicaRequest::Handoff { clock, .. }) => {
                Ok(Response::Clock(Some(clock)))
            }
            other => panic!("a handoff sends only Sync, not {other:?}"),
        }
    }
}

/// A book of `bad` hints the owner declines (`a-badNNN`, first in key
/// order) and 300 it takes, delivered in batches of 16 with a 1 s back-off.
fn book_and_worker(
    transport: Arc<Owner>,
    bad: usize,
) -> (
    Arc<HintBook<MemHintBackend>>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let owner = NodeId::new("owner").unwrap();
    let book = book();
    let clock = write("v");
    // The bad keys sort first, so they lead every round.
    for i in 0..bad {
        book.store(&owner, format!("a-bad{i:03}").as_bytes(), &clock)
            .unwrap();
    }
    for i in 0..300 {
        book.store(&owner, format!("k{i:03}").as_bytes(), &clock)
            .unwrap();
    }
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        batch_size: 16,
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(30),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(
        book.clone(),
        transport,
        HintRouting::to_owners(Arc::new(|_: &NodeId| true)),
        config,
        shutdown,
    );
    (book, stop, worker)
}

#[tokio::test(start_paused = true)]
async fn hints_the_owner_keeps_declining_do_not_hold_back_the_others() {
    let owner = NodeId::new("owner").unwrap();
    let transport = Arc::new(Owner::default());
    // More than a batch of them (16).
    let (book, stop, worker) = book_and_worker(transport.clone(), 20);
    // One round (300 hints at 5,000/s take 60 ms), well before a retry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(book.pending(&owner), 20, "only the bad hints are left");
    assert_eq!(
        transport.bad_sends.load(Ordering::SeqCst),
        20,
        "each sent once"
    );
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// An owner that answers but declines everything is not sent every hint
/// it holds, round after round: a round stops after 4 batches in a row of
/// which it took nothing, then backs off.
#[tokio::test(start_paused = true)]
async fn an_owner_that_declines_everything_stops_the_round() {
    let owner = NodeId::new("owner").unwrap();
    let transport = Arc::new(Owner {
        declines_all: true,
        ..Owner::default()
    });
    let (book, stop, worker) = book_and_worker(transport.clone(), 20);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(transport.bad_sends.load(Ordering::SeqCst), 4 * 16);
    assert_eq!(book.pending(&owner), 320);
    // Each round takes up where the last stopped, and the back-off grows:
    // rounds at 0, 1, 3 and 7 s (1 s doubling), not one every tick.
    tokio::time::sleep(Duration::from_millis(9_500)).await;
    assert_eq!(transport.bad_sends.load(Ordering::SeqCst), 4 * 4 * 16);
    // The fifth round (at 15 s) ends on the last hint; the sixth (at 31 s)
    // finds nothing after it, wraps round and stops again: still a failure,
    // so the back-off goes on growing (30 s), with no round in between.
    tokio::time::sleep(Duration::from_secs(23)).await;
    assert_eq!(transport.bad_sends.load(Ordering::SeqCst), 6 * 4 * 16);
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// More declined hints than 4 batches hold: the first round stops after 4
/// batches, and the next resumes after them and delivers the rest.
#[tokio::test(start_paused = true)]
async fn a_long_run_of_declined_hints_delays_the_rest_by_a_round() {
    let owner = NodeId::new("owner").unwrap();
    let transport = Arc::new(Owner::default());
    let (book, stop, worker) = book_and_worker(transport.clone(), 70);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(book.pending(&owner), 370, "the first round took nothing");
    // The back-off is 1 s; the second round reaches the good hints.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(book.pending(&owner), 70, "only the declined hints are left");
    // Once the owner takes them, later rounds reach every one of them,
    // those the stopped rounds passed over included.
    transport.recovered.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(book.pending(&owner), 0);
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// An owner that, while the first hint it is sent is on its way, has a new
/// write of the same key hinted for it (a coordinator stores it beside the
/// delivery), as happens when a client writes a key whose hint is being
/// delivered.
struct RacedOwner {
    book: std::sync::OnceLock<Arc<HintBook<MemHintBackend>>>,
    delivered: std::sync::Mutex<Vec<ringkv_core::dvv::Clock>>,
}

impl Transport for RacedOwner {
    async fn call(&self, to: &NodeId, request: Request) -> Result<Response, TransportError> {
        let Request::Replica(ReplicaRequest::Handoff { key, clock }) = request else {
            panic!("a handoff sends only Sync");
        };
        let mut delivered = self.delivered.lock().unwrap();
        if delivered.is_empty() {
            let mut newer = ringkv_core::dvv::Clock::new();
            newer.update(
                &ringkv_core::dvv::VersionVector::new(),
                ringkv_core::dvv::Payload::Value(b"v2".to_vec()),
                &NodeId::new("another-writer").unwrap(),
            );
            self.book.get().unwrap().store(to, &key, &newer).unwrap();
        }
        delivered.push(clock.clone());
        Ok(Response::Clock(Some(clock)))
    }
}

/// A hint rewritten while it is delivered is not removed with the version
/// the owner took: the delivery removes a hint only if it is unchanged, so
/// the newer write stays and goes to the owner in a later round.
#[tokio::test(start_paused = true)]
async fn a_hint_rewritten_during_its_delivery_is_kept_and_delivered_later() {
    let owner = NodeId::new("owner").unwrap();
    let book = book();
    book.store(&owner, b"k", &write("v1")).unwrap();
    let transport = Arc::new(RacedOwner {
        book: std::sync::OnceLock::new(),
        delivered: Default::default(),
    });
    let _ = transport.book.set(book.clone());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = handoff::start(
        book.clone(),
        transport.clone(),
        HintRouting::to_owners(Arc::new(|_: &NodeId| true)),
        HandoffConfig {
            tick: Duration::from_millis(100),
            ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
        },
        shutdown,
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let delivered = transport.delivered.lock().unwrap().clone();
    let values = |c: &ringkv_core::dvv::Clock| {
        let mut v: Vec<String> = c
            .values()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    assert_eq!(values(&delivered[0]), ["v1"]);
    assert_eq!(values(&delivered[1]), ["v1", "v2"]);
    assert_eq!(book.pending(&owner), 0);
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// A node back from an outage longer than the hint window sweeps the hints
/// past it at its first tick, not a sweep interval (here an hour) later:
/// until swept they hold room, and a full book refuses new hints.
#[tokio::test(start_paused = true)]
async fn hints_past_the_window_at_start_are_swept_at_the_first_tick() {
    use ringkv_repair::hints::HintConfig;
    let owner = NodeId::new("owner").unwrap();
    let now_ms = Arc::new(AtomicU64::new(1_000_000));
    let wall = now_ms.clone();
    let book = Arc::new(
        HintBook::open(
            MemHintBackend::default(),
            HintConfig {
                ttl_ms: 10_000,
                ..HintConfig::default()
            },
            Arc::new(move || wall.load(Ordering::SeqCst)),
        )
        .unwrap(),
    );
    book.store(&owner, b"k", &write("v")).unwrap();
    // Down for a minute: past the 10 s window.
    now_ms.fetch_add(60_000, Ordering::SeqCst);
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        sweep_interval: Duration::from_secs(3600),
        sweep_when_full_interval: Duration::from_secs(900),
        ..HandoffConfig::for_ttl(Duration::from_secs(10))
    };
    // The owner is down: nothing is delivered, only swept.
    let (stop, worker) = start_worker(&book, Arc::new(Owner::default()), false, config);
    let why = "not swept within a second of starting";
    until_none_pending(&book, &owner, Duration::from_secs(1), why).await;
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// An owner across a 4 MiB/s link that its sends share: each is answered
/// once its bytes, after those sent before it, have crossed.
struct SlowLink {
    free_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Sends begun, answered or not.
    sends: AtomicU64,
}

impl Transport for SlowLink {
    async fn call(&self, _to: &NodeId, request: Request) -> Result<Response, TransportError> {
        let Request::Replica(ReplicaRequest::Handoff { clock, .. }) = request else {
            panic!("a handoff sends only Sync");
        };
        self.sends.fetch_add(1, Ordering::SeqCst);
        let crossing =
            Duration::from_secs_f64(clock.approx_size() as f64 / (4.0 * 1024.0 * 1024.0));
        let done = {
            let mut free_at = self.free_at.lock().unwrap();
            let now = tokio::time::Instant::now();
            let done = free_at.map_or(now, |at| at.max(now)) + crossing;
            *free_at = Some(done);
            done
        };
        tokio::time::sleep_until(done).await;
        Ok(Response::Clock(Some(clock)))
    }
}

/// Eight hints of 1.5 MiB take 3 s to cross a 4 MiB/s link one after
/// another. A batch holds six of them (it ends at the hint that brings it
/// to 8 MiB), whose last one crosses after 2.25 s: past the 2 s send
/// timeout, which a fixed timeout (or one for each hint's own bytes) made
/// it fail on every retry. The batch's 9 MiB earn each of its sends 1.1 s
/// more, and every hint is delivered on the first try.
#[tokio::test(start_paused = true)]
async fn a_batch_of_large_hints_gets_time_for_its_bytes() {
    let owner = NodeId::new("owner").unwrap();
    let book = book();
    let value = "x".repeat(3 * 512 * 1024);
    for i in 0..8 {
        book.store(&owner, format!("big{i}").as_bytes(), &write(&value))
            .unwrap();
    }
    let transport = Arc::new(SlowLink {
        free_at: std::sync::Mutex::new(None),
        sends: AtomicU64::new(0),
    });
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    assert_eq!(config.send_timeout, Duration::from_secs(2));
    let (stop, worker) = start_worker(&book, transport.clone(), true, config);
    until_none_pending(&book, &owner, Duration::from_secs(10), "never delivered").await;
    assert_eq!(
        transport.sends.load(Ordering::SeqCst),
        8,
        "each on the first try"
    );
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// Owners are served one at a time: owner `a`'s 300 hints at 10 hints/s
/// would take 30 s, but its round gives way after 10 s, so `b`'s one hint
/// goes before `a`'s round is done, and `a`'s later rounds deliver the
/// rest.
#[tokio::test(start_paused = true)]
async fn a_long_round_gives_way_to_the_other_owners() {
    let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
    let book = book();
    let clock = write("v");
    for i in 0..300 {
        book.store(&a, format!("k{i:03}").as_bytes(), &clock)
            .unwrap();
    }
    book.store(&b, b"k", &clock).unwrap();
    let transport = Arc::new(Owner::default());
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        batch_size: 10,
        max_rate_per_s: 10,
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, worker) = start_worker(&book, transport, true, config);
    let why = "b waited for a's whole round";
    until_none_pending(&book, &b, Duration::from_secs(12), why).await;
    let left = book.pending(&a);
    assert!(left > 100 && left < 250, "{left} of a's hints left");
    until_none_pending(&book, &a, Duration::from_secs(30), "a's rest never went").await;
    stop.send(true).unwrap();
    worker.await.unwrap();
}

/// Starts the delivery worker over `book`, every owner believed `up` or
/// not; returns its stop switch and its task.
fn start_worker<T: Transport, B: HintBackend>(
    book: &Arc<HintBook<B>>,
    transport: Arc<T>,
    up: bool,
    config: HandoffConfig,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let routing = HintRouting::to_owners(Arc::new(move |_: &NodeId| up));
    let worker = handoff::start(book.clone(), transport, routing, config, shutdown);
    (stop, worker)
}

/// Waits (on the paused clock) until `book` holds no hint for `owner`,
/// failing with `why` after `within`.
async fn until_none_pending<B: HintBackend>(
    book: &HintBook<B>,
    owner: &NodeId,
    within: Duration,
    why: &str,
) {
    let deadline = tokio::time::Instant::now() + within;
    while book.pending(owner) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An owner that refuses what it is sent as invalid (`refusal`) until it
/// can take it (`resolved`).
struct RefusesAsInvalid {
    refusal: String,
    resolved: AtomicBool,
    sends: AtomicU64,
}

impl Transport for RefusesAsInvalid {
    async fn call(&self, _to: &NodeId, request: Request) -> Result<Response, TransportError> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        match request {
            Request::Replica(ReplicaRequest::Handoff { clock, .. })
                if self.resolved.load(Ordering::SeqCst) =>
            {
                Ok(Response::Clock(Some(clock)))
            }
            _ => Ok(Response::error(
                ErrorKind::InvalidRequest,
                self.refusal.clone(),
            )),
        }
    }
}

/// A hint its owner refuses as invalid is kept, not dropped, and
/// delivered once the owner takes it: when it could not decode it (a
/// version it cannot read, mid-upgrade), and when the merge would pass a
/// per-key limit (until a client resolves the key's siblings). Dropped, a
/// stand-in's write, which only the hints hold, would be lost.
#[tokio::test(start_paused = true)]
async fn a_hint_refused_as_invalid_is_kept_for_later() {
    let owner = NodeId::new("owner").unwrap();
    for refusal in [
        format!("{}: unknown variant", ringkv_core::wire::MALFORMED_REQUEST),
        "the key's versions would take about 70000 bytes, over the 65536-byte limit; \
         read it and write with the returned --context to resolve its siblings"
            .to_string(),
    ] {
        let book = book();
        book.store(&owner, b"k", &write("v")).unwrap();
        let transport = Arc::new(RefusesAsInvalid {
            refusal,
            resolved: AtomicBool::new(false),
            sends: AtomicU64::new(0),
        });
        let config = HandoffConfig {
            tick: Duration::from_millis(100),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(2),
            ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
        };
        let (stop, worker) = start_worker(&book, transport.clone(), true, config);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(book.pending(&owner), 1, "kept: {}", transport.refusal);
        assert!(
            transport.sends.load(Ordering::SeqCst) >= 2,
            "tried in several rounds"
        );
        transport.resolved.store(true, Ordering::SeqCst);
        until_none_pending(&book, &owner, Duration::from_secs(5), "never delivered").await;
        stop.send(true).unwrap();
        worker.await.unwrap();
    }
}

/// Hint storage that buffers its writes until `make_durable`, as a node
/// without `--sync` buffers its write-ahead log.
#[derive(Default)]
struct Buffered {
    inner: MemHintBackend,
    unflushed: AtomicBool,
}

impl HintBackend for Buffered {
    fn get(&self, id: &[u8]) -> Result<Option<Vec<u8>>, HintError> {
        self.inner.get(id)
    }
    fn put(&self, id: &[u8], value: &[u8]) -> Result<(), HintError> {
        self.unflushed.store(true, Ordering::SeqCst);
        self.inner.put(id, value)
    }
    fn delete(&self, id: &[u8]) -> Result<(), HintError> {
        self.unflushed.store(true, Ordering::SeqCst);
        self.inner.delete(id)
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, HintError> {
        self.inner.scan(prefix, after, limit, max_bytes)
    }
    fn make_durable(&self) -> Result<(), HintError> {
        self.unflushed.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// An owner that notes each hint it is sent while its holder's writes
/// are still buffered.
struct NotesUnflushedSends {
    holder: Arc<Buffered>,
    sends: AtomicU64,
    unflushed_sends: AtomicU64,
}

impl Transport for NotesUnflushedSends {
    async fn call(&self, _to: &NodeId, request: Request) -> Result<Response, TransportError> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        if self.holder.unflushed.load(Ordering::SeqCst) {
            self.unflushed_sends.fetch_add(1, Ordering::SeqCst);
        }
        match request {
            Request::Replica(ReplicaRequest::Handoff { clock, .. }) => {
                Ok(Response::Clock(Some(clock)))
            }
            other => panic!("a handoff sends only Sync, not {other:?}"),
        }
    }
}

/// A hint goes out only once it is durable: a stand-in's mint still in
/// the holder's log buffer, delivered and then lost in a crash, would be
/// minted again for another value, which the owner would drop as known.
#[tokio::test(start_paused = true)]
async fn a_hint_goes_out_only_once_it_is_durable() {
    let owner = NodeId::new("owner").unwrap();
    let holder = Arc::new(Buffered::default());
    let book = Arc::new(
        HintBook::open(
            holder.clone(),
            HintConfig::default(),
            Arc::new(|| 1_000_000),
        )
        .unwrap(),
    );
    for key in ["k1", "k2"] {
        book.store(&owner, key.as_bytes(), &write("v")).unwrap();
    }
    assert!(holder.unflushed.load(Ordering::SeqCst));
    let transport = Arc::new(NotesUnflushedSends {
        holder,
        sends: AtomicU64::new(0),
        unflushed_sends: AtomicU64::new(0),
    });
    let config = HandoffConfig {
        tick: Duration::from_millis(100),
        ..HandoffConfig::for_ttl(Duration::from_secs(3 * 3600))
    };
    let (stop, worker) = start_worker(&book, transport.clone(), true, config);
    until_none_pending(&book, &owner, Duration::from_secs(5), "never delivered").await;
    assert_eq!(transport.sends.load(Ordering::SeqCst), 2);
    assert_eq!(transport.unflushed_sends.load(Ordering::SeqCst), 0);
    stop.send(true).unwrap();
    worker.await.unwrap();
}
