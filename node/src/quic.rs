//! Requests over QUIC: framed requests on long-lived streams, answered out
//! of order by request id (see [`crate::frame`]).
//!
//! A connection carries shared streams, each a [`Channel`], for the small
//! requests of the data path (client gets and puts, replica reads, writes
//! and hints, pings): between nodes one per `Lane`, from a client one.
//! Frames from concurrent callers leave together, so under load a packet
//! carries many requests. A request that would hold a shared stream up
//! (anti-entropy exchanges, batches, membership and admin calls, or any
//! request over [`SHARED_REQUEST_MAX_BYTES`]) gets a stream of its own:
//! one frame each way. The server treats both kinds alike: it
//! reads frames until the stream ends, answers each as soon as its handler
//! is done, and finishes once every answer is written.
//!
//! [`PeerPool`] keeps one connection (and its channels) per peer address and
//! reconnects when a connection dies, dialling a peer that is down at most
//! once per connect timeout and [`DIAL_RETRY_AFTER`]. [`Client`] is the
//! single connection a command-line client or benchmark uses, shared by any
//! number of concurrent callers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use ringkv_core::wire::{
    decode_request, decode_response, encode_request, encode_response, DecodeError, ErrorKind,
    Identity, ReplicaRequest, Request, Response, FRAME_MAX_BYTES, MALFORMED_REQUEST,
};
use ringkv_core::NodeId;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::cluster_key::ClusterKey;
use crate::frame::{
    put_frame, read_body_admitted, read_frame, read_header, skip_rest, FrameError, FrameQueue,
    Pushed,
};
use crate::request_memory::{BodyCharge, Refused, RequestMemory};
use crate::tls;

/// The largest request that rides the shared stream; a larger one (a big
/// value) would delay every request queued behind it.
pub const SHARED_REQUEST_MAX_BYTES: usize = 64 * 1024;
/// Requests one stream may have in flight at a node. Beyond it the node stops
/// reading the stream, and QUIC flow control pushes back on the sender.
const STREAM_IN_FLIGHT_MAX: u32 = 1024;
/// Requests one connection may have in flight across all its streams. A
/// peer that pipelines on many streams would otherwise run 256 × 1,024
/// requests at once. A well-behaved peer never reaches it (two shared
/// streams, and one request on each other stream, checked below), so it
/// cannot bring back the cycle that [`Lane`] keeps shared streams out of.
pub const CONNECTION_IN_FLIGHT_MAX: usize = 4096;
const _: () = assert!(
    CONNECTION_IN_FLIGHT_MAX
        >= 3 * STREAM_IN_FLIGHT_MAX as usize + tls::MAX_CONCURRENT_STREAMS as usize
);
/// Bytes of answers one connection may have waiting to be handed to QUIC
/// before its streams stop reading requests, each answer counting up to
/// half of it (see [`ConnectionBudget`]). Answers wait when the peer does
/// not read them (its flow-control window is full), so without this a
/// client that sends gets and never reads would have every request it is
/// allowed in flight answered and kept, again and again. It bounds what
/// waits, not a burst: answers count once their request has run, so the
/// requests read before the pause (up to the in-flight limits) are still
/// answered. Answers also wait when QUIC's send window is full on a slow
/// link; then the connection's leaf requests wait behind its coordinated
/// answers too (no cycle: draining needs only the peer to read).
pub const CONNECTION_UNWRITTEN_MAX_BYTES: usize = 16 << 20;

/// Bytes of request bodies one connection may have in memory at once (see
/// [`crate::request_memory`]): two of the largest frames, so one client's
/// largest puts are not shed while it has one other in flight.
pub const CONNECTION_REQUEST_MAX_BYTES: usize = 2 * FRAME_MAX_BYTES;

/// Bytes of requests a shared stream may have waiting to be written (its
/// peer's flow control holds them back when the peer stops reading, as in
/// a long write stall). Past it a call is answered `Overloaded` at once,
/// unsent, rather than queued: nothing removes a frame whose caller gave
/// up, so the queue would otherwise grow for as long as the peer stalls.
/// About 256 of the largest shared requests, thousands of typical ones.
const CHANNEL_QUEUED_MAX_BYTES: usize = 16 << 20;

/// How long opening a shared stream may wait for the peer's stream credit.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request's body may take to arrive once its header has: this
/// plus its bytes at [`BODY_BYTES_PER_S_MIN`] (75 s for the largest frame).
/// A sender that announces a body and then stalls holds the request memory
/// charged for what it sent; past this, the stream is given up.
const BODY_TIMEOUT_BASE: Duration = Duration::from_secs(10);
/// The slowest rate a request body is expected to arrive at: 1 MiB/s.
const BODY_BYTES_PER_S_MIN: f64 = 1024.0 * 1024.0;

/// Which stream a request travels on.
///
/// A node's shared streams carry two kinds of request, and they must not
/// share a stream's in-flight budget. A *leaf* request (a replica read or
/// write, a hint, a ping) is answered by the receiving node alone. A
/// *coordinated* one (a client's put or get, also when a node forwards it to
/// a replica) makes the receiving node call other nodes in turn. On one
/// stream, forwarded requests filling node B's budget for A's stream while
/// they wait for B's calls to C, whose budget for B's stream is full of
/// forwarded requests waiting on calls to A, and so on round a cycle, would
/// stall every one of them until its deadline. With leaf requests on a
/// stream of their own, a coordinated request only ever waits for leaf
/// ones, which wait for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The shared stream of requests answered without calling anyone.
    Leaf,
    /// The shared stream of requests the receiving node coordinates.
    Coordinated,
    /// A shared stream for pings alone, opened with the connection and
    /// kept: a ping then needs no stream credit, which a peer's large
    /// requests (each on a stream of its own, up to the connection's
    /// stream limit) may all hold during a write stall, nor waits behind
    /// the other lanes' requests. Either would have the peer counted down
    /// and its connection closed, failing what was under way.
    Control,
    /// A stream of its own: rare or large requests.
    Own,
}

/// The lane of `request` (encoded in `encoded_bytes`).
fn lane(request: &Request, encoded_bytes: usize) -> Lane {
    let lane = match request {
        Request::Put(_) | Request::Get(_) | Request::Status => Lane::Coordinated,
        Request::Ping => Lane::Control,
        // Asked once per connection, on the leaf stream (`identify`).
        Request::Identify => Lane::Own,
        Request::Replica(replica)
        | Request::ReplicaFrom {
            request: replica, ..
        } => match replica {
            ReplicaRequest::Update { .. }
            | ReplicaRequest::Sync { .. }
            | ReplicaRequest::Handoff { .. }
            | ReplicaRequest::Read { .. }
            | ReplicaRequest::Hint { .. } => Lane::Leaf,
            ReplicaRequest::TreeHashes { .. }
            | ReplicaRequest::LeafItems { .. }
            | ReplicaRequest::ReadBatch { .. }
            | ReplicaRequest::SyncBatch { .. } => Lane::Own,
        },
        Request::Join(_)
        | Request::Stats
        | Request::Repair
        | Request::Remove { .. }
        | Request::Leave
        | Request::Cleanup => Lane::Own,
    };
    if encoded_bytes > SHARED_REQUEST_MAX_BYTES {
        Lane::Own
    } else {
        lane
    }
}

/// What one connection's requests may take of the node at once: places
/// in flight, and bytes of answers not yet handed to QUIC. Kept per
/// connection, so a slow or hostile peer stalls only itself.
///
/// Invariant: `unwritten_bytes` is the sum, over the answers queued on the
/// connection's streams and not yet written, of each answer's bytes capped
/// at half of `unwritten_max_bytes` (the [`Share`]s' counts), and a stream
/// reads a request only while that sum is below `unwritten_max_bytes`. So
/// the node reads a connection's next request only while fewer than
/// `unwritten_max_bytes` of answers wait for its peer, or fewer than half
/// of that plus one answer (of up to `FRAME_MAX_BYTES`). On top of what
/// waits come the answers of requests already read (at most `in_flight`'s
/// permits) and what QUIC buffers unacknowledged (its send window, 10 MB by
/// default).
pub struct ConnectionBudget {
    /// Places for requests read and not yet answered in writing; a
    /// [`Share`] holds one (taken with `forget`, given back on drop).
    in_flight: Semaphore,
    unwritten_bytes: AtomicUsize,
    unwritten_max_bytes: usize,
    /// Woken when `unwritten_bytes` falls below the maximum.
    drained: Notify,
    /// Times a stream stopped reading for want of room, for the tests (the
    /// metric counts them too).
    paused_reads: AtomicU64,
    /// How long a request body of no bytes may take to arrive, once its
    /// header has; each byte adds its time at [`BODY_BYTES_PER_S_MIN`].
    body_timeout_base: Duration,
    /// Bytes of this connection's request bodies in memory...
    request_memory: Arc<RequestMemory>,
    /// ...and of all the node's.
    node_memory: Arc<RequestMemory>,
}

impl ConnectionBudget {
    pub fn new(
        in_flight_max: usize,
        unwritten_max_bytes: usize,
        request_max_bytes: usize,
        node_memory: Arc<RequestMemory>,
    ) -> Arc<ConnectionBudget> {
        // Nothing falls below 0, so a paused stream would never resume; and
        // with 1, one answer (counted up to half, rounded up) would pause it.
        assert!(unwritten_max_bytes >= 2, "an answer budget under 2 bytes");
        Arc::new(ConnectionBudget {
            in_flight: Semaphore::new(in_flight_max),
            unwritten_bytes: AtomicUsize::new(0),
            unwritten_max_bytes,
            drained: Notify::new(),
            paused_reads: AtomicU64::new(0),
            body_timeout_base: BODY_TIMEOUT_BASE,
            request_memory: RequestMemory::new(request_max_bytes),
            node_memory,
        })
    }

    /// How long a body of `len` bytes may take to arrive.
    fn body_timeout(&self, len: usize) -> Duration {
        self.body_timeout_base + Duration::from_secs_f64(len as f64 / BODY_BYTES_PER_S_MIN)
    }

    /// Takes a place in flight for one request, waiting for one if need be.
    async fn share(self: &Arc<Self>) -> Share {
        self.in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed")
            .forget();
        Share {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Returns once the connection's unwritten answers are below the
    /// maximum: at once, unless its peer has stopped reading them.
    async fn room_to_read(&self) {
        if self.unwritten_bytes.load(Ordering::SeqCst) < self.unwritten_max_bytes {
            return;
        }
        self.paused_reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ringkv_paused_reads_total").increment(1);
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the check: SeqCst on both sides means either
            // the check sees a release, or that release wakes this.
            drained.as_mut().enable();
            if self.unwritten_bytes.load(Ordering::SeqCst) < self.unwritten_max_bytes {
                return;
            }
            drained.await;
        }
    }
}

/// One request's share of its connection's [`ConnectionBudget`], from when
/// it is read until its answer is written (or dropped unwritten): a place
/// in flight, and the answer's bytes once it is queued.
struct Share {
    budget: Arc<ConnectionBudget>,
    bytes: usize,
}

impl Share {
    /// Counts the `bytes` of the queued answer, up to half the budget: an
    /// answer larger than the whole budget (a get of a 20 MiB value) would
    /// otherwise stop the connection's reading by itself, however fast its
    /// peer reads, until its batch had been handed to QUIC.
    fn charge(&mut self, bytes: usize) {
        let bytes = bytes.min(self.budget.unwritten_max_bytes.div_ceil(2));
        self.budget
            .unwritten_bytes
            .fetch_add(bytes, Ordering::SeqCst);
        self.bytes += bytes;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let budget = &self.budget;
        if self.bytes > 0 {
            let before = budget
                .unwritten_bytes
                .fetch_sub(self.bytes, Ordering::SeqCst);
            if before >= budget.unwritten_max_bytes
                && before - self.bytes < budget.unwritten_max_bytes
            {
                budget.drained.notify_waiters();
            }
        }
        budget.in_flight.add_permits(1);
    }
}

/// What a queued answer keeps until it is written: its request's place in
/// the stream's in-flight budget, and its share of the connection's.
struct AnswerHold {
    _stream: OwnedSemaphorePermit,
    _share: Share,
}

/// The one answer a server owes a request frame. Its places in flight are
/// held until the answer is written, and a handler that panics still
/// answers, with an internal error: on a shared stream nothing else would
/// ever tell the caller.
struct OwedAnswer {
    queue: Arc<FrameQueue<AnswerHold>>,
    id: u64,
    /// The stream's permit and the connection's share, until answered.
    places: Option<(OwnedSemaphorePermit, Share)>,
}

impl OwedAnswer {
    fn send(mut self, response: &Response) {
        self.push(&answer_frame(response, FRAME_MAX_BYTES));
    }

    fn push(&mut self, frame: &[u8]) {
        if let Some((stream, mut share)) = self.places.take() {
            share.charge(frame.len() + crate::frame::FRAME_HEADER_BYTES);
            let hold = AnswerHold {
                _stream: stream,
                _share: share,
            };
            self.queue.push_holding(self.id, frame, hold);
        }
    }
}

/// `response` encoded or, if it would not fit a frame of `max_bytes`, an
/// error saying so. A reader refuses a longer frame and cannot find the
/// next one, so it ends the stream, failing every other request on it. (A
/// quorum read can merge replicas' siblings past what one replica stores.)
fn answer_frame(response: &Response, max_bytes: usize) -> rkyv::util::AlignedVec {
    let encoded = encode_response(response);
    if encoded.len() <= max_bytes {
        return encoded;
    }
    metrics::counter!("ringkv_oversized_answers_total").increment(1);
    // Only a client's read can be helped; a peer's answers are sized by
    // the node that asks.
    let advice = if matches!(response, Response::Get(_)) {
        "; a read of one replica (-r 1) or an overwrite gets past siblings this large"
    } else {
        ""
    };
    encode_response(&Response::error(
        ErrorKind::Unavailable,
        format!(
            "the answer would take {} bytes, over the {max_bytes}-byte {}{advice}",
            encoded.len(),
            ringkv_core::wire::OVER_FRAME_LIMIT
        ),
    ))
}

impl Drop for OwedAnswer {
    fn drop(&mut self) {
        if self.places.is_some() {
            metrics::counter!("ringkv_failed_handlers_total").increment(1);
            let error = Response::error(ErrorKind::Internal, "the request's handler failed");
            self.push(&encode_response(&error));
        }
    }
}

/// One long-lived stream shared by concurrent requests. A writer task sends
/// the queued frames in batches; a reader task hands each response to the
/// caller waiting for its id.
///
/// Invariant: every registered caller gets exactly one answer: its response,
/// or the error that ended the stream. Dropping the channel finishes the
/// stream once queued frames are written.
pub struct Channel {
    queue: Arc<FrameQueue>,
    waiting: Arc<Waiting>,
    next_id: AtomicU64,
}

type Answer = Result<Response, CallError>;

/// Callers waiting for their response, by request id.
#[derive(Default)]
struct Waiting {
    state: Mutex<WaitingState>,
}

#[derive(Default)]
struct WaitingState {
    callers: HashMap<u64, oneshot::Sender<Answer>>,
    /// Why the stream ended, once it has: later callers fail at once.
    ended: Option<CallError>,
}

impl Waiting {
    fn register(&self, id: u64) -> Result<oneshot::Receiver<Answer>, CallError> {
        let mut state = self.state.lock().expect("waiting lock poisoned");
        if let Some(e) = &state.ended {
            return Err(e.clone());
        }
        let (tx, rx) = oneshot::channel();
        state.callers.insert(id, tx);
        Ok(rx)
    }

    /// Hands `answer` to the caller of `id`, if it is still waiting (one that
    /// timed out has gone).
    fn answer(&self, id: u64, answer: Answer) {
        let caller = self
            .state
            .lock()
            .expect("waiting lock poisoned")
            .callers
            .remove(&id);
        if let Some(caller) = caller {
            let _ = caller.send(answer);
        }
    }

    fn forget(&self, id: u64) {
        self.state
            .lock()
            .expect("waiting lock poisoned")
            .callers
            .remove(&id);
    }

    fn end(&self, error: CallError) {
        let callers = {
            let mut state = self.state.lock().expect("waiting lock poisoned");
            state.ended = Some(error.clone());
            std::mem::take(&mut state.callers)
        };
        for (_, caller) in callers {
            let _ = caller.send(Err(error.clone()));
        }
    }
}

/// Removes a caller that stops waiting (its future was dropped, say by a
/// timeout), so the map does not keep it.
struct WaitGuard<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.waiting.forget(self.id);
    }
}

impl Channel {
    /// Opens the shared stream on `conn` and starts its writer and reader.
    /// Gives up after `OPEN_STREAM_TIMEOUT`: opening waits for the peer's
    /// stream credit, and callers wait behind it.
    pub async fn open(conn: &quinn::Connection) -> Result<Channel, CallError> {
        let (send, recv) = tokio::time::timeout(OPEN_STREAM_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| {
                not_sent(CallError::Stream(format!(
                    "no stream credit from the node within {} ms",
                    OPEN_STREAM_TIMEOUT.as_millis()
                )))
            })?
            .map_err(|e| not_sent(CallError::connection(e)))?;
        let queue = Arc::new(FrameQueue::new());
        let waiting = Arc::new(Waiting::default());
        tokio::spawn({
            let queue = queue.clone();
            async move {
                queue.write_to(send).await;
            }
        });
        tokio::spawn(read_answers(recv, waiting.clone(), queue.clone()));
        Ok(Channel {
            queue,
            waiting,
            next_id: AtomicU64::new(0),
        })
    }

    /// False once the stream has ended; the owner opens a new one.
    pub fn is_open(&self) -> bool {
        !self.queue.is_closed()
    }

    /// Sends one encoded request and waits for its response.
    pub async fn call(&self, body: &[u8]) -> Result<Response, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The stream had ended: this request never went out.
        let answer = self.waiting.register(id).map_err(not_sent)?;
        let _guard = WaitGuard {
            waiting: &self.waiting,
            id,
        };
        match self.queue.push_within(id, body, CHANNEL_QUEUED_MAX_BYTES) {
            Pushed::Queued => {}
            Pushed::Closed => {
                return Err(CallError::Unread(
                    "the stream ended before the request was sent; it did not run".into(),
                ))
            }
            // Back-pressure, answered as the node itself sheds load: nothing
            // ran, and callers treat it so (a forward tries the next
            // replica, a client retries later rather than move elsewhere,
            // and the peer is not taken for down).
            Pushed::Full { queued_bytes } => {
                metrics::counter!("ringkv_requests_unsent_total", "reason" => "queue_full")
                    .increment(1);
                return Ok(Response::error(
                    ErrorKind::Overloaded,
                    format!(
                        "the node is not reading its requests ({} MiB wait to be sent to it); \
                         this one was not sent, so it did not run: retry later",
                        queued_bytes >> 20
                    ),
                ));
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(CallError::Stream("the stream has ended".into())))
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// Reads responses off a channel's stream until it ends, then fails whoever
/// is still waiting.
async fn read_answers(mut recv: quinn::RecvStream, waiting: Arc<Waiting>, queue: Arc<FrameQueue>) {
    let error = loop {
        match read_frame(&mut recv, FRAME_MAX_BYTES).await {
            Ok(Some((id, body))) => waiting.answer(
                id,
                decode_response(&body).map_err(|e| CallError::Protocol(e.to_string())),
            ),
            Ok(None) => {
                break CallError::Unread(
                    "the node ended the stream before it read the request (shutting down?); the request did not run".into(),
                )
            }
            Err(e) => break e.into(),
        }
    };
    queue.close();
    waiting.end(error);
}

/// Sends one encoded request on a stream of its own and reads its response.
async fn call_on_own_stream(conn: &quinn::Connection, body: &[u8]) -> Result<Response, CallError> {
    exchange_on_own_stream(conn, body)
        .await
        .map_err(|e| explained(e, conn))
}

/// The error of a request that failed before any of it was sent (no
/// stream could be opened, or the shared one had ended): it did not run,
/// so it may go to another node ([`CallError::Unread`]). A refused
/// handshake stays one.
fn not_sent(e: CallError) -> CallError {
    match e {
        CallError::Refused(_) | CallError::Unread(_) => e,
        e => CallError::Unread(format!("{e}; the request was not sent, so it did not run")),
    }
}

/// A stream's error, with the reason the connection gives if it has closed.
/// A stream error says only "connection lost", and a request that never got
/// onto its stream only that it did not run; the connection knows why, and
/// a refused handshake must show as one (see `CallError::Refused`).
fn explained(e: CallError, conn: &quinn::Connection) -> CallError {
    let Some(reason) = conn.close_reason() else {
        return e;
    };
    match e {
        CallError::Stream(_) => CallError::connection(reason),
        CallError::Unread(_) => match tls::handshake_failure(&reason) {
            Some(refused) => CallError::Refused(refused),
            None => e,
        },
        e => e,
    }
}

async fn exchange_on_own_stream(
    conn: &quinn::Connection,
    body: &[u8],
) -> Result<Response, CallError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| not_sent(CallError::connection(e)))?;
    let mut frame = Vec::new();
    put_frame(&mut frame, 0, body);
    // A draining node stops the stream unread: the write then fails, and
    // the stream's clean end says why.
    let written = match send.write_all(&frame).await {
        Ok(()) => send.finish().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match read_frame(&mut recv, FRAME_MAX_BYTES).await {
        Ok(Some((_, body))) => {
            decode_response(&body).map_err(|e| CallError::Protocol(e.to_string()))
        }
        Ok(None) => Err(CallError::Unread(
            "the node ended the stream before it read the request (shutting down?); the request did not run".into(),
        )),
        Err(e) => Err(match written {
            Err(write_error) => CallError::Stream(write_error),
            Ok(()) => e.into(),
        }),
    }
}

/// Why a request over QUIC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The connection is gone; the next call should reconnect.
    #[error("connection lost: {0}")]
    Connection(String),
    #[error("stream failed: {0}")]
    Stream(String),
    #[error("invalid response: {0}")]
    Protocol(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed: one end lacks the cluster key or holds
    /// another, or they run different releases. Trying again will not help.
    #[error("cannot connect: {0}")]
    Refused(String),
    /// The node ended the stream without reading the request: a node
    /// answers every request it reads before it ends a stream, so nothing
    /// of it ran, and it may be sent to another node as it is. (A draining
    /// node ends its streams this way.)
    #[error("{0}")]
    Unread(String),
    /// No answer within the caller's limit ([`crate::ClusterClient::call_within`]):
    /// the request may still run.
    #[error("no answer within {} ms", limit.as_millis())]
    TimedOut { limit: Duration },
}

impl From<FrameError> for CallError {
    /// A failed stream is the transport's trouble; a badly framed answer is
    /// the node breaking the protocol.
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Stream { reason } => CallError::Stream(reason),
            FrameError::ConnectionLost { error } => CallError::connection(error),
            e => CallError::Protocol(e.to_string()),
        }
    }
}

impl CallError {
    fn connection(e: quinn::ConnectionError) -> Self {
        match tls::handshake_failure(&e) {
            Some(reason) => CallError::Refused(reason),
            None => CallError::Connection(e.to_string()),
        }
    }
}

/// Serves every stream of one accepted connection with `handle`, until
/// `finish` turns true (see [`serve_stream`]), its request bodies charged to
/// `node_memory` (see [`crate::request_memory`]). Every task serving the
/// connection holds a clone of `finish`, so its sender's
/// [`closed`](watch::Sender::closed) tells when all have ended. Streams the
/// client opens after that are ended at once, unread, until the connection
/// closes: the client learns that its request did not run
/// ([`CallError::Unread`]) rather than that the connection was lost.
pub async fn serve_connection<H, F>(
    conn: quinn::Connection,
    handle: H,
    finish: watch::Receiver<bool>,
    node_memory: Arc<RequestMemory>,
) where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response> + Send + 'static,
{
    let budget = ConnectionBudget::new(
        CONNECTION_IN_FLIGHT_MAX,
        CONNECTION_UNWRITTEN_MAX_BYTES,
        CONNECTION_REQUEST_MAX_BYTES,
        node_memory,
    );
    serve_connection_within(conn, handle, finish, budget).await;
}

/// [`serve_connection`] within `budget`.
async fn serve_connection_within<H, F>(
    conn: quinn::Connection,
    handle: H,
    mut finish: watch::Receiver<bool>,
    budget: Arc<ConnectionBudget>,
) where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response> + Send + 'static,
{
    // Streams per connection are capped by the transport config
    // (MAX_CONCURRENT_STREAMS), and the requests in flight on them by
    // `budget`, which bounds the tasks spawned here.
    loop {
        let accepted = tokio::select! {
            biased;
            // A dropped sender never asks to finish.
            true = async { finish.wait_for(|finish| *finish).await.is_ok() } => break,
            accepted = conn.accept_bi() => accepted,
        };
        let Ok((send, recv)) = accepted else { return };
        tokio::spawn(serve_stream(
            send,
            recv,
            handle.clone(),
            finish.clone(),
            budget.clone(),
        ));
    }
    drop(finish);
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let _ = recv.stop(0u32.into());
        let _ = send.finish();
    }
}

/// The longest a finished stream waits for its peer to acknowledge the
/// answers on it.
const FINISH_ACK_WAIT: Duration = Duration::from_secs(1);

/// Reads request frames until the stream ends, runs each in a task of its
/// own, and writes each answer as it is ready. It reads the next request
/// only while its connection's unwritten answers are under their budget,
/// and once the stream and the connection have a place in flight for it.
/// A request whose body does not fit in the connection's or the node's
/// request memory is shed: its body is read past, and it is answered
/// `Overloaded` (see [`crate::request_memory`]). It stops reading once its
/// answers cannot be written (the peer stopped the stream). Once `finish`
/// turns true (a node shutting down, once its requests under way have
/// answered), it reads no more, answers what it has read, finishes the
/// stream and waits (up to [`FINISH_ACK_WAIT`]) until the peer has
/// acknowledged every byte: closing the connection earlier could discard
/// answers not yet sent.
async fn serve_stream<H, F>(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handle: H,
    mut finish: watch::Receiver<bool>,
    budget: Arc<ConnectionBudget>,
) where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response> + Send + 'static,
{
    let queue = Arc::new(FrameQueue::<AnswerHold>::new());
    let writer = tokio::spawn({
        let queue = queue.clone();
        async move {
            if let Some(send) = queue.write_to(send).await {
                let _ = tokio::time::timeout(FINISH_ACK_WAIT, send.stopped()).await;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT_MAX as usize));
    loop {
        // The writer gave up (the peer stopped the stream): no answer can
        // reach the peer, so run nothing more of what it sends.
        if queue.is_abandoned() {
            let _ = recv.stop(0u32.into());
            break;
        }
        // A frame cut off here is never answered; it was never run either.
        let (read, on_stream, share) = tokio::select! {
            biased;
            true = async { finish.wait_for(|finish| *finish).await.is_ok() } => break,
            read = async {
                budget.room_to_read().await;
                // The places first, then the body: a body read and charged
                // before there was a place to run it would keep its charge
                // for as long as the places stay taken (by requests whose
                // answers the peer never reads), and a few such streams
                // would hold the node's request memory and shed every
                // other request. Waiting here, the node reads nothing, and
                // QUIC's flow control holds the sender back.
                let on_stream = in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let share = budget.share().await;
                (read_request(&mut recv, &budget).await, on_stream, share)
            } => read,
        };
        let (id, admitted) = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            // The rest of the stream cannot be framed: answer this request
            // if it has an id, and read no further.
            Err(
                e @ (FrameError::TooLong { .. }
                | FrameError::Truncated { .. }
                | FrameError::Stalled { .. }),
            ) => {
                metrics::counter!("ringkv_malformed_frames_total").increment(1);
                let id = match e {
                    FrameError::TooLong { id, .. }
                    | FrameError::Truncated { id, .. }
                    | FrameError::Stalled { id, .. } => id,
                    _ => unreachable!("matched above"),
                };
                let error = Response::error(
                    ErrorKind::InvalidRequest,
                    format!("{MALFORMED_REQUEST}: {e}"),
                );
                queue.push(id, &encode_response(&error));
                break;
            }
            Err(FrameError::TruncatedHeader { .. }) => {
                metrics::counter!("ringkv_malformed_frames_total").increment(1);
                break;
            }
            // Reset by the sender, or the connection died: nothing to read.
            Err(FrameError::Stream { .. } | FrameError::ConnectionLost { .. }) => break,
        };
        // Also after a read: the writer may have given up while this waited.
        if queue.is_abandoned() {
            let _ = recv.stop(0u32.into());
            break;
        }
        let answer = OwedAnswer {
            queue: queue.clone(),
            id,
            places: Some((on_stream, share)),
        };
        let (body, charge) = match admitted {
            Admitted::Body { body, charge } => (body, charge),
            Admitted::Shed { len, refused } => {
                metrics::counter!("ringkv_requests_shed_total").increment(1);
                answer.send(&Response::error(
                    ErrorKind::Overloaded,
                    format!(
                        "overloaded: a request of {len} bytes was not run because {refused}; \
                         retry later or ask another node"
                    ),
                ));
                continue;
            }
        };
        let handle = handle.clone();
        // Boxed: the request's future (the whole coordination state
        // machine, about 6 KiB) is then copied once, into the box, instead
        // of on each move into the task and at each of its stage changes;
        // these copies were most of the node's `memmove` time.
        tokio::spawn(Box::pin(async move {
            let response = match decode_request(&body) {
                Ok(request) => {
                    // The decoded request owns copies of what it needs.
                    drop(body);
                    handle(request).await
                }
                // Bytes that do not decode are malformed; a request that
                // decodes but breaks a limit is refused as invalid, for
                // good (see MALFORMED_REQUEST).
                Err(e @ DecodeError::Malformed { .. }) => {
                    metrics::counter!("ringkv_malformed_frames_total").increment(1);
                    Response::error(
                        ErrorKind::InvalidRequest,
                        format!("{MALFORMED_REQUEST}: {e}"),
                    )
                }
                Err(e) => {
                    Response::error(ErrorKind::InvalidRequest, format!("invalid request: {e}"))
                }
            };
            drop(charge);
            answer.send(&response);
        }));
    }
    // Answer everything in flight, then finish the stream.
    let _ = in_flight.acquire_many(STREAM_IN_FLIGHT_MAX).await;
    queue.close();
    let _ = writer.await;
}

/// A request frame's body, as [`read_request`] took it.
enum Admitted {
    /// Read, and charged to the request memory until its request has run.
    Body {
        body: rkyv::util::AlignedVec,
        charge: BodyCharge,
    },
    /// Dropped as it was read: `refused` had no room for its `len` bytes.
    Shed { len: usize, refused: Refused },
}

/// Reads the next request frame off a server's stream, keeping its body
/// only while the connection's and the node's request memory have room for
/// it: `Ok(None)` when the stream ended cleanly between frames.
async fn read_request(
    recv: &mut quinn::RecvStream,
    budget: &ConnectionBudget,
) -> Result<Option<(u64, Admitted)>, FrameError> {
    let Some(header) = read_header(recv, FRAME_MAX_BYTES).await? else {
        return Ok(None);
    };
    // Charged as the body's buffer grows, not at the length announced: a
    // header costs its sender nothing, and a few stalled 65 MiB frames
    // would otherwise hold the node's whole budget.
    let mut charge = BodyCharge::new(
        &budget.request_memory,
        &budget.node_memory,
        header.len,
        SHARED_REQUEST_MAX_BYTES,
    );
    // Within a deadline: a body that stops arriving would otherwise hold
    // its charge for good (keep-alives keep the connection open), and a
    // few such streams the node's whole request memory.
    let timeout = budget.body_timeout(header.len);
    let read = async {
        let admitted = read_body_admitted(recv, header, |bytes| charge.try_grow(bytes)).await?;
        Ok::<_, FrameError>(match admitted {
            Ok(body) => Admitted::Body { body, charge },
            Err((refused, read)) => {
                // The part read is freed: give its bytes back before the
                // rest of the body trickles past.
                drop(charge);
                skip_rest(recv, header, read).await?;
                Admitted::Shed {
                    len: header.len,
                    refused,
                }
            }
        })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(admitted) => Ok(Some((header.id, admitted?))),
        Err(_) => {
            metrics::counter!("ringkv_stalled_frames_total").increment(1);
            let _ = recv.stop(0u32.into());
            Err(FrameError::Stalled {
                id: header.id,
                len: header.len,
                secs: timeout.as_secs(),
            })
        }
    }
}

/// One connection per peer, opened on first use and replaced when it dies,
/// with the shared [`Channel`] on it.
pub struct PeerPool {
    endpoint: quinn::Endpoint,
    peers: DashMap<SocketAddr, Arc<tokio::sync::Mutex<Slot>>>,
    connect_timeout: Duration,
    /// Dials started, for the tests (the metric counts them by outcome).
    dials: AtomicU64,
}

/// A peer's place in the pool: its connection, if any, and the last dial
/// that failed since.
#[derive(Default)]
struct Slot {
    peer: Option<Peer>,
    /// When a dial last failed, and its error. For [`DIAL_RETRY_AFTER`]
    /// after it, calls fail at once with that error (a refused handshake
    /// stays `Refused`) instead of dialling again: a peer that is down
    /// would otherwise cost a handshake attempt (and a connect timeout of
    /// waiting) for every request that names it.
    dial_failed: Option<(std::time::Instant, CallError)>,
}

/// How long a node may take to say who it is on a new connection.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after a failed dial a peer's calls fail without dialling. The
/// failure detector, hints and stand-ins deal with a peer that is down. A
/// dial to a peer that is down lasts the connect timeout, so such a peer
/// costs one dial per connect timeout plus this; a peer back up is reached
/// at most that much later.
pub const DIAL_RETRY_AFTER: Duration = Duration::from_millis(500);

struct Peer {
    conn: quinn::Connection,
    /// Who answered [`Request::Identify`] on this connection, once asked:
    /// a connection reaches one process, so once is enough.
    identity: Option<Identity>,
    /// The shared streams of the lanes, each opened on its first request
    /// (the control lane's with the connection) and reopened if it ends
    /// while the connection lives on.
    leaf: Option<Arc<Channel>>,
    coordinated: Option<Arc<Channel>>,
    control: Option<Arc<Channel>>,
}

/// The open channel in `slot`, or a new one on `conn` in its place.
async fn open_channel(
    slot: &mut Option<Arc<Channel>>,
    conn: &quinn::Connection,
) -> Result<Arc<Channel>, CallError> {
    match slot {
        Some(channel) if channel.is_open() => Ok(channel.clone()),
        _ => {
            let channel = Arc::new(Channel::open(conn).await?);
            *slot = Some(channel.clone());
            Ok(channel)
        }
    }
}

impl PeerPool {
    pub fn new(endpoint: quinn::Endpoint, connect_timeout: Duration) -> Self {
        PeerPool {
            endpoint,
            peers: DashMap::new(),
            connect_timeout,
            dials: AtomicU64::new(0),
        }
    }

    /// Sends `request` to the node at `addr`.
    pub async fn call(&self, addr: SocketAddr, request: &Request) -> Result<Response, CallError> {
        self.call_checked(addr, None, request).await
    }

    /// Sends `request` to the member `node` of cluster `cluster_id`, at
    /// `addr`, once the node there has said it is that member (asked once
    /// per connection). Another node at the address is refused
    /// ([`CallError::Refused`]), so that a node started afresh there, or a
    /// new node given that address, is never taken for the member: its
    /// answers would count toward the member's quorums, and hints for the
    /// member would be handed to it.
    pub async fn call_member(
        &self,
        addr: SocketAddr,
        node: &NodeId,
        cluster_id: Option<u64>,
        request: &Request,
    ) -> Result<Response, CallError> {
        self.call_checked(addr, Some((node, cluster_id)), request)
            .await
    }

    async fn call_checked(
        &self,
        addr: SocketAddr,
        member: Option<(&NodeId, Option<u64>)>,
        request: &Request,
    ) -> Result<Response, CallError> {
        let body = encode_request(request);
        let (conn, channel) = match self.peer(addr, lane(request, body.len()), member).await? {
            Ok(ready) => ready,
            // The node answered the identity question with what it would
            // answer the request (draining, out of memory): that answer
            // stands, and the request is not sent unchecked.
            Err(answer) => return Ok(answer),
        };
        let result = match channel {
            Some(channel) => channel.call(&body).await.map_err(|e| explained(e, &conn)),
            None => call_on_own_stream(&conn, &body).await,
        };
        if conn.close_reason().is_some() {
            self.forget(addr, &conn).await;
        }
        result
    }

    /// The live connection to `addr` (dialled if need be) and the channel
    /// of `lane` on it (none for [`Lane::Own`]), once the node there has
    /// said it is `member` (if given); or the node's answer to that
    /// question if it was no identity (a refusal).
    async fn peer(
        &self,
        addr: SocketAddr,
        lane: Lane,
        member: Option<(&NodeId, Option<u64>)>,
    ) -> Result<Result<(quinn::Connection, Option<Arc<Channel>>), Response>, CallError> {
        let slot = self
            .peers
            .entry(addr)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Slot::default())))
            .clone();
        // Holding the slot's lock while connecting makes concurrent callers
        // share one connection attempt instead of racing several.
        let mut slot = slot.lock_owned().await;
        let live = slot
            .peer
            .as_ref()
            .is_some_and(|peer| peer.conn.close_reason().is_none());
        if !live {
            if let Some((failed_at, error)) = &slot.dial_failed {
                if failed_at.elapsed() < DIAL_RETRY_AFTER {
                    metrics::counter!("ringkv_peer_dials_total", "outcome" => "skipped")
                        .increment(1);
                    return Err(match error {
                        CallError::Connect(reason) => CallError::Connect(format!(
                            "{reason} (the last dial, {} ms ago)",
                            failed_at.elapsed().as_millis()
                        )),
                        other => other.clone(),
                    });
                }
            }
            self.dials.fetch_add(1, Ordering::Relaxed);
            // In a task of its own, holding the lock: a caller that gives up
            // (its deadline is often near the connect timeout) must not
            // cancel the dial, or the next caller would start another, and
            // a peer that is down would be dialled over and over.
            let (endpoint, timeout) = (self.endpoint.clone(), self.connect_timeout);
            let dial = tokio::spawn(async move {
                let dialled = connect(&endpoint, addr, timeout).await;
                let outcome = match &dialled {
                    Ok(conn) => {
                        // Now, while the connection's streams are free (see
                        // `Lane::Control`); a failure here leaves it to the
                        // first ping.
                        let control = Channel::open(conn).await.ok().map(Arc::new);
                        slot.peer = Some(Peer {
                            conn: conn.clone(),
                            identity: None,
                            leaf: None,
                            coordinated: None,
                            control,
                        });
                        slot.dial_failed = None;
                        "ok"
                    }
                    Err(e) => {
                        slot.dial_failed = Some((std::time::Instant::now(), e.clone()));
                        "failed"
                    }
                };
                metrics::counter!("ringkv_peer_dials_total", "outcome" => outcome).increment(1);
                (slot, dialled.map(|_| ()))
            });
            let (dialled_slot, dialled) = dial
                .await
                .map_err(|e| CallError::Connect(format!("the dial failed: {e}")))?;
            slot = dialled_slot;
            dialled?;
        }
        let peer = slot.peer.as_mut().expect("set above");
        if let Some((node, cluster_id)) = member {
            if let Err(answer) = identify(peer, addr, node, cluster_id).await? {
                return Ok(Err(answer));
            }
        }
        let channel = match lane {
            Lane::Leaf => Some(open_channel(&mut peer.leaf, &peer.conn).await?),
            Lane::Coordinated => Some(open_channel(&mut peer.coordinated, &peer.conn).await?),
            Lane::Control => Some(open_channel(&mut peer.control, &peer.conn).await?),
            Lane::Own => None,
        };
        Ok(Ok((peer.conn.clone(), channel)))
    }

    /// Closes and drops the connection to `addr`, so the next call dials
    /// afresh. Used when a peer is judged down: a restarted peer cannot be
    /// reached over its predecessor's connection.
    pub async fn disconnect(&self, addr: SocketAddr) {
        if let Some(slot) = self.peers.get(&addr).map(|s| s.clone()) {
            if let Some(peer) = slot.lock().await.peer.take() {
                peer.conn.close(0u32.into(), b"peer judged down");
            }
        }
    }

    async fn forget(&self, addr: SocketAddr, dead: &quinn::Connection) {
        if let Some(slot) = self.peers.get(&addr).map(|s| s.clone()) {
            let mut slot = slot.lock().await;
            if slot
                .peer
                .as_ref()
                .is_some_and(|peer| peer.conn.stable_id() == dead.stable_id())
            {
                slot.peer = None;
            }
        }
    }
}

/// Whether the node on `peer`'s connection is member `node` of cluster
/// `cluster_id` (see [`PeerPool::call_member`]): it is asked once per
/// connection, and again on every call while it names no cluster (it may
/// join one, another one even). `Err(answer)` if it answered the question
/// with a refusal, which then stands for the call's answer.
async fn identify(
    peer: &mut Peer,
    addr: SocketAddr,
    node: &NodeId,
    cluster_id: Option<u64>,
) -> Result<Result<(), Response>, CallError> {
    let known = peer
        .identity
        .as_ref()
        .map(|identity| identity.mismatch(node, cluster_id));
    let mismatch = match known {
        Some(mismatch) => mismatch,
        None => {
            let leaf = open_channel(&mut peer.leaf, &peer.conn).await?;
            // Bounded: other callers wait on this peer's slot meanwhile.
            let asked = tokio::time::timeout(
                IDENTIFY_TIMEOUT,
                leaf.call(&encode_request(&Request::Identify)),
            )
            .await;
            let identity = match asked {
                Ok(Ok(Response::Identity(identity))) => identity,
                Ok(Ok(refusal @ Response::Error(_))) => return Ok(Err(refusal)),
                // Not an answer to the question: never let it stand for the
                // call's (it could pass for a put's or a get's).
                Ok(Ok(other)) => {
                    let shown: String = format!("{other:?}").chars().take(60).collect();
                    return Err(CallError::Protocol(format!(
                        "{addr} answered who it is with {shown}"
                    )));
                }
                Ok(Err(e)) => return Err(explained(e, &peer.conn)),
                Err(_) => {
                    return Err(CallError::Connection(format!(
                        "no answer to who it is within {} ms",
                        IDENTIFY_TIMEOUT.as_millis()
                    )))
                }
            };
            let mismatch = identity.mismatch(node, cluster_id);
            if let Some(reason) = &mismatch {
                tracing::error!(%addr, %reason, "a member's address is answered by another node; it counts as down until the member is back there");
                metrics::counter!("ringkv_peer_identity_mismatches_total").increment(1);
            }
            if identity.cluster_id.is_some() {
                peer.identity = Some(identity);
            }
            mismatch
        }
    };
    match mismatch {
        Some(reason) => Err(CallError::Refused(format!("{addr}: {reason}"))),
        None => Ok(Ok(())),
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, CallError> {
    let connecting = endpoint
        .connect(addr, tls::SERVER_NAME)
        .map_err(|e| CallError::Connect(e.to_string()))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(match tls::handshake_failure(&e) {
            Some(reason) => CallError::Refused(reason),
            None => CallError::Connect(e.to_string()),
        }),
        Err(_) => Err(CallError::Connect(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// A client's connection to one node, shared by any number of concurrent
/// callers.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    channel: tokio::sync::Mutex<Option<Arc<Channel>>>,
}

impl Client {
    /// Connects to the node at `addr` of a cluster without a key, giving up
    /// after `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, CallError> {
        Client::connect_with_key(addr, timeout, None).await
    }

    /// Connects to the node at `addr`, presenting a certificate signed by the
    /// authority of `cluster_key` and accepting only a node whose certificate
    /// is (see `cluster_key`).
    pub async fn connect_with_key(
        addr: SocketAddr,
        timeout: Duration,
        cluster_key: Option<&ClusterKey>,
    ) -> Result<Client, CallError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| CallError::Connect(e.to_string()))?;
        let config =
            tls::client_config(cluster_key).map_err(|e| CallError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let conn = connect(&endpoint, addr, timeout).await?;
        Ok(Client {
            endpoint,
            conn,
            channel: tokio::sync::Mutex::new(None),
        })
    }

    /// Sends `request`. A client is never called back, so it sends both
    /// shared lanes on one stream.
    pub async fn call(&self, request: &Request) -> Result<Response, CallError> {
        let body = encode_request(request);
        // A client's pings (a few, to see a node serve again) take a
        // stream each, as its other rare requests do.
        if matches!(lane(request, body.len()), Lane::Own | Lane::Control) {
            return call_on_own_stream(&self.conn, &body).await;
        }
        let channel = open_channel(&mut *self.channel.lock().await, &self.conn).await?;
        channel
            .call(&body)
            .await
            .map_err(|e| explained(e, &self.conn))
    }

    /// The raw connection, for tests that send malformed frames.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection politely so the node frees it at once.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(200), self.endpoint.wait_idle()).await;
    }

    /// Closes many clients at once. Each close waits for its connection to
    /// drain (a few round trips), so closing 50 one after another took
    /// seconds of a benchmark's wall time.
    pub async fn close_all(clients: impl IntoIterator<Item = Client>) {
        let mut closing = tokio::task::JoinSet::new();
        for client in clients {
            closing.spawn(client.close());
        }
        while closing.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Node, NodeConfig};
    use crate::test_support::wait_until;
    use ringkv_core::wire::GetReply;
    use ringkv_core::NodeId;

    #[test]
    fn an_answer_too_large_for_a_frame_becomes_an_error_that_fits() {
        let reply = Response::Get(GetReply {
            values: vec![vec![7u8; 4096]],
            context: String::new(),
            receipt: Default::default(),
        });
        let fits = answer_frame(&reply, 8192);
        assert_eq!(decode_response(&fits).unwrap(), reply);
        let refused = answer_frame(&reply, 1024);
        assert!(refused.len() <= 1024);
        match decode_response(&refused).unwrap() {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable);
                assert!(e.message.contains("1024-byte frame limit"), "{}", e.message);
                assert!(e.message.contains("-r 1"), "a client's read is told how");
            }
            other => panic!("{other:?}"),
        }
        // A peer's answer gets no advice meant for clients.
        let clocks = Response::Clocks(vec![None; 4096]);
        match decode_response(&answer_frame(&clocks, 1024)).unwrap() {
            Response::Error(e) => assert!(e.message.ends_with("frame limit"), "{}", e.message),
            other => panic!("{other:?}"),
        }
    }

    /// Many requests to one peer share one connection and one stream: 50
    /// concurrent pings leave in far fewer than 50 packets.
    #[tokio::test]
    async fn the_peer_pool_shares_one_connection_and_batches_frames() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
        let node = Node::start(config).await.unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        let pool = Arc::new(PeerPool::new(endpoint, Duration::from_secs(5)));
        let (conn, channel) = pool
            .peer(node.addr(), Lane::Leaf, None)
            .await
            .unwrap()
            .unwrap();
        let (first, datagrams_before) = (conn.stable_id(), conn.stats().udp_tx.datagrams);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (pool, addr) = (pool.clone(), node.addr());
            calls.spawn(async move { pool.call(addr, &Request::Ping).await });
        }
        while let Some(result) = calls.join_next().await {
            assert!(matches!(result.unwrap(), Ok(Response::Pong)));
        }
        let sent = conn.stats().udp_tx.datagrams - datagrams_before;
        assert!(sent < 25, "50 pings took {sent} datagrams");
        assert_eq!(pool.peers.len(), 1);
        let (again, same_channel) = pool
            .peer(node.addr(), Lane::Leaf, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.stable_id(), first);
        let channel = channel.unwrap();
        assert!(Arc::ptr_eq(&channel, &same_channel.unwrap()));
        // Coordinated requests share the connection but not the stream.
        let (conn, coordinated) = pool
            .peer(node.addr(), Lane::Coordinated, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conn.stable_id(), first);
        assert!(!Arc::ptr_eq(&channel, &coordinated.unwrap()));
        assert!(matches!(
            pool.call(node.addr(), &get("k")).await,
            Ok(Response::Get(_)) | Ok(Response::Error(_))
        ));
        // A request that takes a stream of its own works on the same
        // connection.
        assert!(matches!(
            pool.call(node.addr(), &Request::Stats).await,
            Ok(Response::Stats(_))
        ));
        node.shutdown().await;
    }

    /// A peer that is down is dialled once per [`DIAL_RETRY_AFTER`],
    /// however many requests name it, and a dial goes on when the callers
    /// waiting for it give up.
    #[tokio::test]
    async fn a_down_peer_is_dialled_once_per_retry_window() {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        // A connect timeout far above the callers' 5 × 40 ms, even when a
        // busy machine runs their timers late.
        let pool = Arc::new(PeerPool::new(endpoint, Duration::from_millis(1000)));
        // Held for the whole test, so no one else takes the port; it reads
        // nothing, so a dial to it times out.
        let dead_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead = dead_socket.local_addr().unwrap();
        // Callers that give up well before the connect timeout.
        for _ in 0..5 {
            let call = pool.call(dead, &Request::Ping);
            assert!(tokio::time::timeout(Duration::from_millis(40), call)
                .await
                .is_err());
        }
        // Many at once, while that dial is still under way or just failed.
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let pool = pool.clone();
            calls.spawn(async move { pool.call(dead, &Request::Ping).await });
        }
        while let Some(outcome) = calls.join_next().await {
            assert!(matches!(outcome.unwrap(), Err(CallError::Connect(_))));
        }
        assert_eq!(pool.dials.load(Ordering::Relaxed), 1);
        // Once the window is over, the next call dials again.
        tokio::time::sleep(DIAL_RETRY_AFTER).await;
        assert!(pool.call(dead, &Request::Ping).await.is_err());
        assert_eq!(pool.dials.load(Ordering::Relaxed), 2);
    }

    /// A handshake refused (a cluster key here, none there) stays a
    /// refusal while calls fail without dialling: callers that tell the two
    /// apart (a restart refused by its cluster) still can.
    #[tokio::test]
    async fn a_refused_dial_fails_fast_as_a_refusal() {
        let key = ClusterKey::parse(&ClusterKey::generate().unwrap()).unwrap();
        let server = quinn::Endpoint::server(
            tls::server_config(None).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(Some(&key)).unwrap());
        let pool = PeerPool::new(endpoint, Duration::from_secs(5));
        for _ in 0..2 {
            let outcome = pool.call(addr, &Request::Ping).await;
            assert!(matches!(outcome, Err(CallError::Refused(_))), "{outcome:?}");
        }
        assert_eq!(pool.dials.load(Ordering::Relaxed), 1);
    }

    /// A server that says it is node `n9` of cluster 7, counting the
    /// requests it answers by kind (identify, other).
    async fn identified_server(asked: Arc<[AtomicUsize; 2]>) -> (quinn::Endpoint, SocketAddr) {
        identified_server_answering(asked, |_| {
            Response::Identity(Identity {
                node: NodeId::new("n9").unwrap(),
                cluster_id: Some(7),
            })
        })
        .await
    }

    /// A server that answers its `i`th `Identify` with `identify(i)`,
    /// counting the requests it answers by kind (identify, other).
    async fn identified_server_answering(
        asked: Arc<[AtomicUsize; 2]>,
        identify: fn(usize) -> Response,
    ) -> (quinn::Endpoint, SocketAddr) {
        let handle = move |request| {
            let asked = asked.clone();
            async move {
                match request {
                    Request::Identify => identify(asked[0].fetch_add(1, Ordering::SeqCst)),
                    _ => {
                        asked[1].fetch_add(1, Ordering::SeqCst);
                        Response::Pong
                    }
                }
            }
        };
        server_answering(handle, watch::channel(false).1)
    }

    /// A call meant for a member reaches the node at its address only if
    /// that node says it is the member, of the same cluster (a node in no
    /// cluster yet may be one still joining); it is asked once per
    /// connection, and a call not meant for a member is not checked.
    #[tokio::test]
    async fn a_member_call_goes_only_to_the_member_itself() {
        let asked: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (_server, addr) = identified_server(asked.clone()).await;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        let pool = PeerPool::new(endpoint, Duration::from_secs(5));
        let (n9, n2) = (NodeId::new("n9").unwrap(), NodeId::new("n2").unwrap());
        for cluster_id in [Some(7), None, Some(7)] {
            let outcome = pool
                .call_member(addr, &n9, cluster_id, &Request::Ping)
                .await;
            assert!(matches!(outcome, Ok(Response::Pong)), "{outcome:?}");
        }
        let other_node = pool.call_member(addr, &n2, Some(7), &Request::Ping).await;
        match other_node {
            Err(CallError::Refused(reason)) => {
                assert!(
                    reason.contains("n9 of cluster") && reason.contains("not n2"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let other_cluster = pool.call_member(addr, &n9, Some(8), &Request::Ping).await;
        assert!(
            matches!(other_cluster, Err(CallError::Refused(_))),
            "{other_cluster:?}"
        );
        assert!(matches!(
            pool.call(addr, &Request::Ping).await,
            Ok(Response::Pong)
        ));
        assert_eq!(
            asked[0].load(Ordering::SeqCst),
            1,
            "asked once on the connection"
        );
        assert_eq!(
            asked[1].load(Ordering::SeqCst),
            4,
            "only the member's calls and the unchecked one ran"
        );
    }

    /// A node in no cluster yet is asked again on every call until it
    /// names one (it may join another cluster); a node that answers the
    /// question with a refusal (draining) gets that refusal back as the
    /// call's answer, and the request is not sent; any other answer to the
    /// question fails the call.
    #[tokio::test]
    async fn a_node_in_no_cluster_is_asked_again_and_a_refusal_stands() {
        let asked: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (_server, addr) = identified_server_answering(asked.clone(), |i| match i {
            0 | 1 => Response::Identity(Identity {
                node: NodeId::new("n9").unwrap(),
                cluster_id: None,
            }),
            2 => Response::error(ErrorKind::NotServing, "draining"),
            3 => Response::Pong,
            _ => Response::Identity(Identity {
                node: NodeId::new("n9").unwrap(),
                cluster_id: Some(8),
            }),
        })
        .await;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        let pool = PeerPool::new(endpoint, Duration::from_secs(5));
        let n9 = NodeId::new("n9").unwrap();
        let call = || pool.call_member(addr, &n9, Some(7), &Request::Ping);
        assert!(matches!(call().await, Ok(Response::Pong)), "joining");
        assert!(matches!(call().await, Ok(Response::Pong)), "asked again");
        let refused = call().await;
        assert!(
            matches!(&refused, Ok(Response::Error(e)) if e.kind == ErrorKind::NotServing),
            "{refused:?}"
        );
        let not_an_identity = call().await;
        assert!(
            matches!(&not_an_identity, Err(CallError::Protocol(reason)) if reason.contains("Pong")),
            "an answer that is neither an identity nor a refusal is not the call's: {not_an_identity:?}"
        );
        let joined_another = call().await;
        assert!(
            matches!(joined_another, Err(CallError::Refused(_))),
            "{joined_another:?}"
        );
        assert_eq!(asked[0].load(Ordering::SeqCst), 5);
        assert_eq!(
            asked[1].load(Ordering::SeqCst),
            2,
            "the refused and the refusing call did not run"
        );
    }

    #[test]
    fn an_identity_matches_its_member_of_its_cluster_or_of_none_yet() {
        let me = |cluster_id| Identity {
            node: NodeId::new("a").unwrap(),
            cluster_id,
        };
        let a = NodeId::new("a").unwrap();
        assert_eq!(me(Some(1)).mismatch(&a, Some(1)), None);
        assert_eq!(me(None).mismatch(&a, Some(1)), None, "still joining");
        assert_eq!(me(Some(1)).mismatch(&a, None), None, "the asker is joining");
        assert!(me(Some(2)).mismatch(&a, Some(1)).is_some());
        assert!(me(Some(1))
            .mismatch(&NodeId::new("b").unwrap(), Some(1))
            .is_some());
    }

    /// A server whose handler answers gets slowly and pings at once.
    /// How long [`slow_get_server`] takes over a get: long enough that a
    /// busy machine answers a ping sent after it first.
    const SLOW_GET: Duration = Duration::from_millis(1000);

    async fn slow_get_server() -> (quinn::Endpoint, SocketAddr) {
        slow_get_server_finishing_on(watch::channel(false).1).await
    }

    /// [`slow_get_server`], whose streams finish when `finish` says so, as
    /// a draining node's do.
    async fn slow_get_server_finishing_on(
        finish: watch::Receiver<bool>,
    ) -> (quinn::Endpoint, SocketAddr) {
        let handle = |request| async move {
            match request {
                Request::Get(_) => {
                    tokio::time::sleep(SLOW_GET).await;
                    Response::error(ErrorKind::Internal, "slow")
                }
                Request::Put(_) => panic!("a handler bug"),
                _ => Response::Pong,
            }
        };
        server_answering(handle, finish)
    }

    /// A server on a loopback port that serves every connection with
    /// `handle`, its streams finishing when `finish` says so.
    fn server_answering<H, F>(
        handle: H,
        finish: watch::Receiver<bool>,
    ) -> (quinn::Endpoint, SocketAddr)
    where
        H: Fn(Request) -> F + Clone + Send + Sync + 'static,
        F: std::future::Future<Output = Response> + Send + 'static,
    {
        server_serving(move |conn| {
            tokio::spawn(serve_connection(
                conn,
                handle.clone(),
                finish.clone(),
                RequestMemory::new(1 << 30),
            ));
        })
    }

    /// A server on a loopback port that hands every connection to `serve`.
    fn server_serving(
        serve: impl Fn(quinn::Connection) + Send + 'static,
    ) -> (quinn::Endpoint, SocketAddr) {
        let endpoint = quinn::Endpoint::server(
            tls::server_config(None).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                if let Ok(conn) = incoming.await {
                    serve(conn);
                }
            }
        });
        (endpoint, addr)
    }

    fn get(key: &str) -> Request {
        Request::Get(ringkv_core::wire::GetRequest {
            key: key.as_bytes().to_vec(),
            r: ringkv_core::Consistency::One,
            strict: false,
            local: false,
            direct: false,
            wait_repair: false,
            timeout_ms: 1000,
            forwarded: false,
        })
    }

    /// Requests that make the receiving node call others never share a
    /// stream (and its in-flight budget) with those answered alone, whether
    /// a client sent them or a node forwarded them.
    #[test]
    fn coordinated_requests_and_leaf_requests_take_different_lanes() {
        let mut forwarded = get("k");
        if let Request::Get(g) = &mut forwarded {
            g.forwarded = true;
        }
        assert_eq!(lane(&get("k"), 100), Lane::Coordinated);
        assert_eq!(lane(&forwarded, 100), Lane::Coordinated);
        assert_eq!(lane(&Request::Status, 10), Lane::Coordinated);
        let read = Request::Replica(ReplicaRequest::Read {
            key: b"k".to_vec(),
            hint_for: None,
        });
        assert_eq!(lane(&read, 100), Lane::Leaf);
        assert_eq!(lane(&Request::Ping, 10), Lane::Control);
        assert_eq!(lane(&read, SHARED_REQUEST_MAX_BYTES + 1), Lane::Own);
        assert_eq!(lane(&Request::Stats, 10), Lane::Own);
    }

    /// Answers on the shared stream come back as they are ready: a status
    /// request sent after a slow get is answered first.
    #[tokio::test]
    async fn a_fast_request_is_not_held_up_behind_a_slow_one() {
        let (_server, addr) = slow_get_server().await;
        let client = Arc::new(Client::connect(addr, Duration::from_secs(5)).await.unwrap());
        let slow = tokio::spawn({
            let client = client.clone();
            async move { client.call(&get("k")).await }
        });
        tokio::task::yield_now().await;
        let started = std::time::Instant::now();
        assert_eq!(lane(&Request::Status, 10), lane(&get("k"), 10));
        assert!(matches!(
            client.call(&Request::Status).await,
            Ok(Response::Pong)
        ));
        let ping_took = started.elapsed();
        assert!(!slow.is_finished(), "the ping was answered after the get");
        assert!(matches!(slow.await.unwrap(), Ok(Response::Error(_))));
        assert!(ping_took < SLOW_GET);
    }

    /// A ping is answered while every place of the shared stream is taken
    /// by replica requests that do not end (a peer in a long write stall):
    /// it has a stream of its own.
    #[tokio::test]
    async fn a_ping_is_answered_while_the_shared_stream_is_full() {
        let (_server, addr, held) = server_stalling_replica_requests();
        let client = Arc::new(Client::connect(addr, Duration::from_secs(5)).await.unwrap());
        let read = Request::Replica(ReplicaRequest::Read {
            key: b"k".to_vec(),
            hint_for: None,
        });
        let mut stuck = Vec::new();
        for _ in 0..STREAM_IN_FLIGHT_MAX {
            let (client, read) = (client.clone(), read.clone());
            stuck.push(tokio::spawn(async move { client.call(&read).await }));
        }
        crate::test_support::wait_until("every place of the stream taken", || {
            held.load(Ordering::SeqCst) == STREAM_IN_FLIGHT_MAX as usize
        })
        .await;
        let ping = tokio::time::timeout(Duration::from_secs(5), client.call(&Request::Ping)).await;
        assert!(matches!(ping, Ok(Ok(Response::Pong))), "{ping:?}");
        for task in stuck {
            task.abort();
        }
    }

    /// A peer's ping is answered while every stream the connection may
    /// open is taken by large replica requests that do not end (a peer in
    /// a long write stall): pings ride a stream opened with the connection.
    #[tokio::test]
    async fn a_ping_is_answered_while_large_requests_hold_every_stream() {
        let (_server, addr, held) = server_stalling_replica_requests();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        let pool = Arc::new(PeerPool::new(endpoint, Duration::from_secs(5)));
        let mut clock = ringkv_core::dvv::Clock::new();
        let actor = NodeId::new("n1").unwrap();
        let value = ringkv_core::dvv::Payload::Value(vec![7; SHARED_REQUEST_MAX_BYTES]);
        clock.update(&clock.context(), value, &actor);
        let large = Request::Replica(ReplicaRequest::Sync {
            key: b"k".to_vec(),
            clock,
        });
        assert_eq!(lane(&large, encode_request(&large).len()), Lane::Own);
        // The first call dials; then more large requests than streams.
        let streams = tls::MAX_CONCURRENT_STREAMS as usize;
        let mut stuck = Vec::new();
        for _ in 0..streams + 8 {
            let (pool, large) = (pool.clone(), large.clone());
            stuck.push(tokio::spawn(async move { pool.call(addr, &large).await }));
        }
        crate::test_support::wait_until("every stream taken", || {
            held.load(Ordering::SeqCst) >= streams - 1
        })
        .await;
        let ping =
            tokio::time::timeout(Duration::from_secs(5), pool.call(addr, &Request::Ping)).await;
        assert!(matches!(ping, Ok(Ok(Response::Pong))), "{ping:?}");
        for task in stuck {
            task.abort();
        }
    }

    /// A server that answers every request with a pong but replica requests,
    /// which it holds for ever (a node in a long write stall), counting them.
    fn server_stalling_replica_requests() -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        let held = Arc::new(AtomicUsize::new(0));
        let handle = {
            let held = held.clone();
            move |request| {
                let held = held.clone();
                async move {
                    if let Request::Replica(_) = request {
                        held.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                    }
                    Response::Pong
                }
            }
        };
        let (server, addr) = server_answering(handle, watch::channel(false).1);
        (server, addr, held)
    }

    /// A server that finishes its streams (a draining node) answers what it
    /// has read, and the requests it has not read fail as `Unread` (they did
    /// not run, so they may go elsewhere), on the old stream and on a new one.
    #[tokio::test]
    async fn requests_a_finishing_server_did_not_read_fail_as_unread() {
        let (finish_tx, finish) = watch::channel(false);
        let (_server, addr) = slow_get_server_finishing_on(finish).await;
        let client = Arc::new(Client::connect(addr, Duration::from_secs(5)).await.unwrap());
        let slow = tokio::spawn({
            let client = client.clone();
            async move { client.call(&get("k")).await }
        });
        tokio::task::yield_now().await;
        // Answered after the get was read: the two share a stream, in order.
        assert!(matches!(
            client.call(&Request::Ping).await,
            Ok(Response::Pong)
        ));
        finish_tx.send_replace(true);
        let unread = client.call(&Request::Ping).await;
        assert!(matches!(unread, Err(CallError::Unread(_))), "{unread:?}");
        let answered = slow.await.unwrap();
        assert!(matches!(answered, Ok(Response::Error(_))), "{answered:?}");
        let on_a_new_stream =
            tokio::time::timeout(Duration::from_secs(5), client.call(&Request::Ping))
                .await
                .expect("a stream opened after the finish is ended at once");
        assert!(
            matches!(on_a_new_stream, Err(CallError::Unread(_))),
            "{on_a_new_stream:?}"
        );
        // And requests on a stream of their own: stats, and a put too large
        // to share one, whose write the node stops before it is all sent.
        let big_put = Request::Put(ringkv_core::wire::PutRequest::new(
            b"k".to_vec(),
            ringkv_core::dvv::Payload::Value(vec![0; 4 << 20]),
            ringkv_core::Consistency::One,
            None,
        ));
        for request in [Request::Stats, big_put] {
            let on_its_own = tokio::time::timeout(Duration::from_secs(5), client.call(&request))
                .await
                .expect("ended at once");
            assert!(
                matches!(on_its_own, Err(CallError::Unread(_))),
                "{on_its_own:?}"
            );
        }
    }

    /// A request on a connection the node has already closed never goes
    /// out: it fails as not run (`Unread`), so a client may send it to
    /// another node, where one lost after it was sent may have run.
    #[tokio::test]
    async fn a_request_on_a_closed_connection_fails_as_not_sent() {
        let (_endpoint, addr) = server_serving(|conn| conn.close(0u32.into(), b"going away"));
        let client = Client::connect(addr, Duration::from_secs(5)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.connection().close_reason().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "never closed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let outcome = client.call(&Request::Ping).await;
        match &outcome {
            Err(CallError::Unread(why)) => assert!(why.contains("not sent"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(crate::cluster_client::ran_nothing(&outcome));
    }

    /// A handler that panics still answers its caller (with an internal
    /// error), and the shared stream goes on serving.
    #[tokio::test]
    async fn a_panicking_handler_still_answers() {
        let (_server, addr) = slow_get_server().await;
        let client = Client::connect(addr, Duration::from_secs(5)).await.unwrap();
        let put = Request::Put(ringkv_core::wire::PutRequest::new(
            b"k".to_vec(),
            ringkv_core::dvv::Payload::Value(b"v".to_vec()),
            ringkv_core::Consistency::One,
            None,
        ));
        let answer = tokio::time::timeout(Duration::from_secs(5), client.call(&put))
            .await
            .expect("the caller is answered");
        match answer {
            Ok(Response::Error(e)) => assert_eq!(e.kind, ErrorKind::Internal),
            other => panic!("expected an internal error, got {other:?}"),
        }
        assert!(matches!(
            client.call(&Request::Ping).await,
            Ok(Response::Pong)
        ));
    }

    /// A connection's budget with `in_flight_max` places and
    /// `unwritten_max_bytes` of answers, the default request memory, and a
    /// node of its own.
    fn test_budget(in_flight_max: usize, unwritten_max_bytes: usize) -> Arc<ConnectionBudget> {
        ConnectionBudget::new(
            in_flight_max,
            unwritten_max_bytes,
            CONNECTION_REQUEST_MAX_BYTES,
            RequestMemory::new(1 << 30),
        )
    }

    /// A connection's budget with the default places and answer bytes, a
    /// share of `request_max_bytes` and the node's `node_memory`.
    fn memory_budget(
        request_max_bytes: usize,
        node_memory: &Arc<RequestMemory>,
    ) -> Arc<ConnectionBudget> {
        ConnectionBudget::new(
            CONNECTION_IN_FLIGHT_MAX,
            CONNECTION_UNWRITTEN_MAX_BYTES,
            request_max_bytes,
            node_memory.clone(),
        )
    }

    /// A server serving one connection within `budget`, whose handler
    /// counts the requests it runs and answers each with `answer_bytes`
    /// bytes once `go` has a permit for it; and a raw connection to it.
    async fn budgeted_server(
        budget: Arc<ConnectionBudget>,
        answer_bytes: usize,
        go: Arc<Semaphore>,
    ) -> (quinn::Endpoint, quinn::Connection, Arc<AtomicU64>) {
        let server = quinn::Endpoint::server(
            tls::server_config(None).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        tokio::spawn({
            let (server, handled) = (server.clone(), handled.clone());
            async move {
                let conn = server.accept().await.unwrap().await.unwrap();
                let handle = move |_request| {
                    let (handled, go) = (handled.clone(), go.clone());
                    async move {
                        handled.fetch_add(1, Ordering::SeqCst);
                        go.acquire().await.unwrap().forget();
                        Response::Get(GetReply {
                            values: vec![vec![7u8; answer_bytes]],
                            context: String::new(),
                            receipt: Default::default(),
                        })
                    }
                };
                serve_connection_within(conn, handle, watch::channel(false).1, budget).await;
            }
        });
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(None).unwrap());
        let conn = connect(&endpoint, addr, Duration::from_secs(5))
            .await
            .unwrap();
        (endpoint, conn, handled)
    }

    /// Sends `count` gets on a new stream of `conn`, without reading.
    async fn send_gets(conn: &quinn::Connection, count: u64) -> quinn::RecvStream {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut frames = Vec::new();
        for id in 0..count {
            put_frame(&mut frames, id, &encode_request(&get("k")));
        }
        send.write_all(&frames).await.unwrap();
        recv
    }

    /// `future`'s output, failing the test if it takes over 10 s (a lost
    /// wake-up fails rather than hangs).
    async fn within_10_s<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("done within 10 s")
    }

    /// A client that sends gets and does not read their answers makes the
    /// node stop reading its requests once the connection's unwritten
    /// answers pass their budget, instead of keeping the answers of every
    /// request a stream may have in flight (1,024 of 32 KiB here). Once
    /// the client reads, every request is answered and the budget empties.
    #[tokio::test]
    async fn a_client_that_does_not_read_its_answers_stops_the_node_reading() {
        const REQUESTS: u64 = 1000;
        let budget = test_budget(CONNECTION_IN_FLIGHT_MAX, 256 * 1024);
        let go = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
        let (_endpoint, conn, handled) = budgeted_server(budget.clone(), 32 * 1024, go).await;
        assert!(REQUESTS < u64::from(STREAM_IN_FLIGHT_MAX));
        let mut recv = send_gets(&conn, REQUESTS).await;
        wait_until("the node stops reading", || {
            budget.paused_reads.load(Ordering::Relaxed) > 0
        })
        .await;
        let run = handled.load(Ordering::SeqCst);
        assert!(run < REQUESTS, "all {run} requests ran");
        assert!(budget.unwritten_bytes.load(Ordering::SeqCst) >= 256 * 1024);
        let mut answered = 0;
        while answered < REQUESTS {
            let (_, body) = within_10_s(read_frame(&mut recv, FRAME_MAX_BYTES))
                .await
                .unwrap()
                .expect("an answer per request");
            assert!(matches!(decode_response(&body), Ok(Response::Get(_))));
            answered += 1;
        }
        assert_eq!(handled.load(Ordering::SeqCst), REQUESTS);
        wait_until("the budget empties", || {
            budget.unwritten_bytes.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    /// Answers queued on a stream whose client stops reading it
    /// (STOP_SENDING) will never be written: they give their room back,
    /// those queued behind the blocked write included, so the connection's
    /// other streams are not kept from reading.
    #[tokio::test]
    async fn a_stopped_streams_answers_give_their_room_back() {
        const ANSWER_BYTES: usize = 32 * 1024;
        let budget = test_budget(CONNECTION_IN_FLIGHT_MAX, 2 << 20);
        let go = Arc::new(Semaphore::new(40));
        let (_endpoint, conn, handled) =
            budgeted_server(budget.clone(), ANSWER_BYTES, go.clone()).await;
        let mut unread = send_gets(&conn, 200).await;
        wait_until("every request runs", || {
            handled.load(Ordering::SeqCst) == 200
        })
        .await;
        // 40 answers (1.3 MB) overfill the client's stream window (1.25 MB),
        // so the writer is stuck; the other 160 queue behind it.
        go.add_permits(160);
        let unwritten = || budget.unwritten_bytes.load(Ordering::SeqCst);
        wait_until("160 answers queue", || unwritten() >= 160 * ANSWER_BYTES).await;
        // Past the budget: a request on another stream is not read...
        go.add_permits(1);
        let mut other = send_gets(&conn, 1).await;
        wait_until("the node stops reading", || {
            budget.paused_reads.load(Ordering::Relaxed) > 0
        })
        .await;
        // ...until the stuck stream is stopped and its answers dropped.
        unread.stop(0u32.into()).unwrap();
        let (_, body) = within_10_s(read_frame(&mut other, FRAME_MAX_BYTES))
            .await
            .unwrap()
            .expect("the other stream is answered");
        assert!(matches!(decode_response(&body), Ok(Response::Get(_))));
        wait_until("the room comes back", || unwritten() == 0).await;
        wait_until("the places in flight come back", || {
            budget.in_flight.available_permits() == CONNECTION_IN_FLIGHT_MAX
        })
        .await;
    }

    /// One answer larger than the whole budget does not stop the node
    /// reading by itself (its peer may be reading it as fast as it can); a
    /// second one, waiting behind it, does.
    #[tokio::test]
    async fn one_answer_larger_than_the_budget_does_not_pause_reading() {
        // Over the client's stream window (1.25 MB), so the first answer
        // waits, unwritten, while the client does not read.
        const ANSWER_BYTES: usize = 1536 * 1024;
        let budget = test_budget(CONNECTION_IN_FLIGHT_MAX, 1 << 20);
        let go = Arc::new(Semaphore::new(1));
        let (_endpoint, conn, handled) =
            budgeted_server(budget.clone(), ANSWER_BYTES, go.clone()).await;
        let unwritten = || budget.unwritten_bytes.load(Ordering::SeqCst);
        let mut first = send_gets(&conn, 1).await;
        wait_until("the first answer waits", || unwritten() > 0).await;
        let _second = send_gets(&conn, 1).await;
        wait_until("the second request runs", || {
            handled.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(budget.paused_reads.load(Ordering::Relaxed), 0);
        go.add_permits(1);
        wait_until("the second answer waits", || unwritten() >= 1 << 20).await;
        let _third = send_gets(&conn, 1).await;
        wait_until("the node stops reading", || {
            budget.paused_reads.load(Ordering::Relaxed) > 0
        })
        .await;
        assert_eq!(handled.load(Ordering::SeqCst), 2);
        // Once the client takes the first answer, the third request is read.
        go.add_permits(1);
        let (_, body) = within_10_s(read_frame(&mut first, FRAME_MAX_BYTES))
            .await
            .unwrap()
            .expect("the first answer");
        assert!(matches!(decode_response(&body), Ok(Response::Get(_))));
        wait_until("the third request runs", || {
            handled.load(Ordering::SeqCst) == 3
        })
        .await;
    }

    /// Requests on many streams of one connection share its in-flight
    /// budget: with room for 8, the ninth waits until one is answered.
    #[tokio::test]
    async fn a_connections_streams_share_its_in_flight_budget() {
        let budget = test_budget(8, CONNECTION_UNWRITTEN_MAX_BYTES);
        let go = Arc::new(Semaphore::new(0));
        let (_endpoint, conn, handled) = budgeted_server(budget.clone(), 16, go.clone()).await;
        let mut streams = Vec::new();
        for _ in 0..4 {
            streams.push(send_gets(&conn, 4).await);
        }
        wait_until("8 requests run", || handled.load(Ordering::SeqCst) >= 8).await;
        assert_eq!(handled.load(Ordering::SeqCst), 8);
        assert_eq!(budget.in_flight.available_permits(), 0);
        go.add_permits(16);
        for recv in &mut streams {
            for _ in 0..4 {
                let (_, body) = within_10_s(read_frame(recv, FRAME_MAX_BYTES))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(matches!(decode_response(&body), Ok(Response::Get(_))));
            }
        }
        assert_eq!(handled.load(Ordering::SeqCst), 16);
    }

    /// A body is read, and charged, only once a place is free to run it:
    /// read first, it would hold its charge for as long as the places stay
    /// taken (by requests whose answers the peer never reads), and a few
    /// such streams would take the node's request memory and shed every
    /// other request.
    #[tokio::test]
    async fn a_body_is_read_only_once_a_place_is_free_to_run_it() {
        let node_memory = RequestMemory::new(64 << 20);
        let budget = ConnectionBudget::new(
            1,
            CONNECTION_UNWRITTEN_MAX_BYTES,
            CONNECTION_REQUEST_MAX_BYTES,
            node_memory.clone(),
        );
        let go = Arc::new(Semaphore::new(0));
        let (_endpoint, conn, handled) = budgeted_server(budget, 16, go.clone()).await;
        // The connection's one place, taken by a get that waits for `go`.
        let mut recv_get = send_gets(&conn, 1).await;
        wait_until("the get runs", || handled.load(Ordering::SeqCst) == 1).await;
        // The get's own body, held until it has run.
        let get_bytes = node_memory.in_use();
        assert!(get_bytes < 1024, "{get_bytes}");
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut frame = Vec::new();
        put_frame(&mut frame, 1, &encode_request(&put_of(500 * 1024)));
        send.write_all(&frame).await.unwrap();
        // All of it is within the stream's window, so nothing but the
        // missing place keeps the node from reading it (it did, at once).
        for _ in 0..50 {
            assert_eq!(
                node_memory.in_use(),
                get_bytes,
                "read and charged without a place"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        go.add_permits(2);
        for recv in [&mut recv_get, &mut recv] {
            within_10_s(read_frame(recv, FRAME_MAX_BYTES))
                .await
                .unwrap()
                .expect("an answer");
        }
        assert_eq!(handled.load(Ordering::SeqCst), 2);
        wait_until("the put's charge is given back", || {
            node_memory.in_use() == 0
        })
        .await;
    }

    /// A put of `value_bytes` bytes.
    fn put_of(value_bytes: usize) -> Request {
        Request::Put(ringkv_core::wire::PutRequest::new(
            b"k".to_vec(),
            ringkv_core::dvv::Payload::Value(vec![1; value_bytes]),
            ringkv_core::Consistency::One,
            None,
        ))
    }

    /// A request whose body does not fit in the node's request memory is
    /// shed: answered `Overloaded` without running, its body read past so
    /// the stream goes on. A body is charged for what has arrived of it,
    /// not for what its header announces, and large bodies leave the last
    /// quarter of the budget to small requests.
    #[tokio::test]
    async fn a_request_past_the_nodes_request_memory_is_shed_and_the_stream_goes_on() {
        // Large bodies may take 768 KiB of it.
        let node_memory = RequestMemory::new(1 << 20);
        let budget = memory_budget(CONNECTION_REQUEST_MAX_BYTES, &node_memory);
        let go = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
        let (_endpoint, conn, handled) = budgeted_server(budget, 16, go).await;

        // Stream A announces a put of 700 KiB and sends 100 KiB of it: its
        // buffer holds at most twice what arrived, far below what it
        // announced, whatever the packet sizes.
        let stalled = encode_request(&put_of(700 * 1024));
        let (mut send_a, mut recv_a) = conn.open_bi().await.unwrap();
        let mut frame_a = Vec::new();
        put_frame(&mut frame_a, 1, &stalled);
        let sent = 100 * 1024;
        let cut = crate::frame::FRAME_HEADER_BYTES + sent;
        send_a.write_all(&frame_a[..cut]).await.unwrap();
        wait_until("what arrived is charged", || node_memory.in_use() >= sent).await;
        assert!(
            node_memory.in_use() < 2 * sent,
            "charged {} bytes, not what arrived",
            node_memory.in_use()
        );

        // Stream B: a large put that does not fit in the three quarters
        // large bodies may take beside A's 100-200 KiB, a get, and a small
        // put that fits in the last quarter.
        let (mut send_b, mut recv_b) = conn.open_bi().await.unwrap();
        let mut frames_b = Vec::new();
        put_frame(&mut frames_b, 10, &encode_request(&put_of(700 * 1024)));
        put_frame(&mut frames_b, 11, &encode_request(&get("k")));
        put_frame(&mut frames_b, 12, &encode_request(&put_of(50 * 1024)));
        send_b.write_all(&frames_b).await.unwrap();
        let mut answers = HashMap::new();
        for _ in 0..3 {
            let (id, body) = within_10_s(read_frame(&mut recv_b, FRAME_MAX_BYTES))
                .await
                .unwrap()
                .expect("an answer");
            answers.insert(id, decode_response(&body).unwrap());
        }
        match &answers[&10] {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Overloaded);
                assert!(
                    e.message.contains("--max-request-memory-mb"),
                    "{}",
                    e.message
                );
            }
            other => panic!("the put past the budget ran: {other:?}"),
        }
        for id in [11, 12] {
            assert!(
                matches!(answers[&id], Response::Get(_)),
                "request {id} after the shed one was read in step and ran: {:?}",
                answers[&id]
            );
        }
        assert_eq!(
            handled.load(Ordering::SeqCst),
            2,
            "the shed put did not run"
        );

        // The rest of A's put arrives: it runs, and its bytes come back.
        send_a.write_all(&frame_a[cut..]).await.unwrap();
        let (id, body) = within_10_s(read_frame(&mut recv_a, FRAME_MAX_BYTES))
            .await
            .unwrap()
            .expect("an answer");
        assert_eq!(id, 1);
        assert!(matches!(decode_response(&body), Ok(Response::Get(_))));
        wait_until("the put's bytes come back", || node_memory.in_use() == 0).await;
        assert_eq!(handled.load(Ordering::SeqCst), 3);
    }

    /// A body that stops arriving holds its charge only until its deadline:
    /// the frame is then answered as stalled under its id, the stream given
    /// up, and the bytes charged come back.
    #[tokio::test]
    async fn a_body_that_stops_arriving_is_given_up_and_its_memory_comes_back() {
        let node_memory = RequestMemory::new(1 << 20);
        let mut budget = memory_budget(CONNECTION_REQUEST_MAX_BYTES, &node_memory);
        Arc::get_mut(&mut budget)
            .expect("not shared yet")
            .body_timeout_base = Duration::from_millis(300);
        let go = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
        let (_endpoint, conn, handled) = budgeted_server(budget, 16, go).await;
        let put = encode_request(&put_of(200 * 1024));
        let mut frame = Vec::new();
        put_frame(&mut frame, 7, &put);
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let sent = 50 * 1024;
        send.write_all(&frame[..crate::frame::FRAME_HEADER_BYTES + sent])
            .await
            .unwrap();
        wait_until("what arrived is charged", || node_memory.in_use() >= sent).await;
        let (id, body) = within_10_s(read_frame(&mut recv, FRAME_MAX_BYTES))
            .await
            .unwrap()
            .expect("an answer");
        assert_eq!(id, 7);
        match decode_response(&body).unwrap() {
            Response::Error(e) => {
                assert!(e.message.contains("stalled"), "{}", e.message);
                assert!(e.message.starts_with(MALFORMED_REQUEST), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        wait_until("the charge comes back", || node_memory.in_use() == 0).await;
        assert_eq!(handled.load(Ordering::SeqCst), 0, "nothing ran");
        // A whole put on a new stream still runs.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        let (id, body) = within_10_s(read_frame(&mut recv, FRAME_MAX_BYTES))
            .await
            .unwrap()
            .expect("an answer");
        assert_eq!(id, 7);
        assert!(matches!(decode_response(&body), Ok(Response::Get(_))));
    }

    /// One connection cannot take all of a node's request memory: past its
    /// own share, its requests are shed though the node has room.
    #[tokio::test]
    async fn a_connection_past_its_share_is_shed() {
        let share = 100 * 1024;
        let node_memory = RequestMemory::new(1 << 30);
        let budget = memory_budget(share, &node_memory);
        // The handler holds every request until `go` lets it answer.
        let go = Arc::new(Semaphore::new(0));
        let (_endpoint, conn, handled) = budgeted_server(budget, 16, go.clone()).await;
        let body = encode_request(&put_of(30 * 1024));
        let fit = share / body.len();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut frames = Vec::new();
        for id in 0..=fit as u64 {
            put_frame(&mut frames, id, &body);
        }
        send.write_all(&frames).await.unwrap();
        let (id, answer) = within_10_s(read_frame(&mut recv, FRAME_MAX_BYTES))
            .await
            .unwrap()
            .expect("the shed request's answer");
        assert_eq!(id, fit as u64, "the first past the share");
        match decode_response(&answer).unwrap() {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Overloaded);
                assert!(e.message.contains("this connection's"), "{}", e.message);
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
        wait_until("the others run", || {
            handled.load(Ordering::SeqCst) == fit as u64
        })
        .await;
        assert_eq!(node_memory.in_use(), fit * body.len());
        go.add_permits(Semaphore::MAX_PERMITS);
        for _ in 0..fit {
            let (_, answer) = within_10_s(read_frame(&mut recv, FRAME_MAX_BYTES))
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(decode_response(&answer), Ok(Response::Get(_))));
        }
        wait_until("every byte comes back", || node_memory.in_use() == 0).await;
    }

    /// A caller that gives up (a timeout) is forgotten; its late answer is
    /// dropped and the stream goes on serving others.
    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_stream_usable() {
        let (_server, addr) = slow_get_server().await;
        let client = Client::connect(addr, Duration::from_secs(5)).await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(20), client.call(&get("k"))).await;
        assert!(gave_up.is_err());
        // Forgotten at once, by the abandoned call's guard: the answer (due
        // after SLOW_GET) has not come yet.
        let channel = client.channel.lock().await.clone().unwrap();
        assert!(channel.waiting.state.lock().unwrap().callers.is_empty());
        // Once the late answer has arrived (and been dropped), the stream
        // still serves.
        tokio::time::sleep(SLOW_GET + Duration::from_millis(100)).await;
        assert!(matches!(
            client.call(&Request::Ping).await,
            Ok(Response::Pong)
        ));
        assert!(channel.waiting.state.lock().unwrap().callers.is_empty());
    }
}
