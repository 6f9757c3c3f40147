//! Framing of requests and responses on a QUIC stream, and the batching
//! writer that puts many frames in one packet.
//!
//! A stream carries a sequence of frames, each `[u32 body length][u64 request
//! id][body]` (little-endian), where the body is one rkyv-encoded
//! [`Request`](ringkv_core::wire::Request) or
//! [`Response`](ringkv_core::wire::Response). A response carries the id of
//! its request, so answers on one stream may come back in any order and a
//! slow request never holds up a fast one behind it.
//!
//! Why frames and not a stream per request: a stream costs quinn an open,
//! an accept, a FIN each way and per-stream state, and every small write on
//! its own stream went out as its own packet. Frames from many concurrent
//! requests queued on one [`FrameQueue`] leave in one write, so under load
//! one packet (and one system call, one encryption) carries many requests.
//! This is the multiplexing Cassandra's native protocol does with stream ids
//! on one connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rkyv::util::AlignedVec;
use tokio::sync::Notify;

/// Bytes before a frame's body: its length and its request id.
pub const FRAME_HEADER_BYTES: usize = 12;

/// Why a frame could not be read off a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces a body longer than the reader accepts. The
    /// stream cannot be resynchronised: nothing after this frame is read.
    #[error("frame {id} of {len} bytes is larger than {max} bytes")]
    TooLong { id: u64, len: usize, max: usize },
    /// The stream ended inside a frame's body.
    #[error("frame {id} truncated: {read} of {len} bytes before the stream ended")]
    Truncated { id: u64, read: usize, len: usize },
    /// The frame's body did not all arrive within the time a body of `len`
    /// bytes is given. The stream is not read further (its sender may be
    /// holding request memory on purpose).
    #[error("frame {id} stalled: its {len} bytes did not all arrive within {secs} s")]
    Stalled { id: u64, len: usize, secs: u64 },
    /// The stream ended inside a frame's header: there is no id to answer.
    #[error("stream ended inside a frame header ({read} of {FRAME_HEADER_BYTES} bytes)")]
    TruncatedHeader { read: usize },
    /// The stream failed (reset by the peer, or the connection died).
    #[error("stream failed: {reason}")]
    Stream { reason: String },
    /// The connection under the stream ended (closed, timed out, or refused
    /// at the handshake).
    #[error("connection lost: {error}")]
    ConnectionLost { error: quinn::ConnectionError },
}

/// Appends one frame to `buf`.
pub fn put_frame(buf: &mut Vec<u8>, id: u64, body: &[u8]) {
    // Bodies are bounded by FRAME_MAX_BYTES (65 MiB) well below u32::MAX;
    // the reader enforces the bound on the other side.
    let len = u32::try_from(body.len()).expect("frame bodies are far below 4 GiB");
    buf.reserve(FRAME_HEADER_BYTES + body.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(body);
}

/// Reads the next frame: `Ok(None)` when the stream ended cleanly between
/// frames. The body lands in an aligned buffer, ready for rkyv to check and
/// read in place.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_body_bytes: usize,
) -> Result<Option<(u64, AlignedVec)>, FrameError> {
    let Some(header) = read_header(recv, max_body_bytes).await? else {
        return Ok(None);
    };
    let admit_all = |_| Ok::<(), std::convert::Infallible>(());
    match read_body_admitted(recv, header, admit_all).await? {
        Ok(body) => Ok(Some((header.id, body))),
        Err((never, _)) => match never {},
    }
}

/// What a frame's header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub id: u64,
    /// The body's length, at most the reader's maximum.
    pub len: usize,
}

/// Reads the next frame's header: `Ok(None)` when the stream ended cleanly
/// between frames. Its body must be read ([`read_body`]) or skipped
/// ([`skip_body`]) before the next header.
pub async fn read_header(
    recv: &mut quinn::RecvStream,
    max_body_bytes: usize,
) -> Result<Option<FrameHeader>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let read = read_full(recv, &mut header).await?;
    if read == 0 {
        return Ok(None);
    }
    if read < FRAME_HEADER_BYTES {
        return Err(FrameError::TruncatedHeader { read });
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let id = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
    if len > max_body_bytes {
        return Err(FrameError::TooLong {
            id,
            len,
            max: max_body_bytes,
        });
    }
    Ok(Some(FrameHeader { id, len }))
}

/// Reads the body `header` announced, asking `admit` for each allocation
/// of the buffer before it is made. Once `admit` refuses, it drops what it
/// read and returns the refusal with how many bytes of the body it has
/// taken off the stream: the caller reads the rest past ([`skip_rest`])
/// before the stream's next frame.
pub async fn read_body_admitted<E>(
    recv: &mut quinn::RecvStream,
    header: FrameHeader,
    mut admit: impl FnMut(usize) -> Result<(), E>,
) -> Result<Result<AlignedVec, (E, usize)>, FrameError> {
    // The body grows with the bytes that arrive, never ahead of them: a
    // peer announcing 65 MiB frames on many streams and sending nothing must
    // cost nothing a stream, whatever the headers say.
    let mut body = AlignedVec::new();
    while body.len() < header.len {
        let chunk = next_chunk(recv, header, body.len()).await?;
        let needed = body.len() + chunk.len();
        if needed > body.capacity() {
            // Doubling, as a Vec grows, but never past the announced length.
            let capacity = needed.max(body.capacity() * 2).min(header.len);
            if let Err(refused) = admit(capacity - body.capacity()) {
                return Ok(Err((refused, needed)));
            }
            body.reserve_exact(capacity - body.len());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

/// Reads the rest of the body `header` announced, of which `read` bytes
/// are already off the stream, and drops it as it arrives.
pub async fn skip_rest(
    recv: &mut quinn::RecvStream,
    header: FrameHeader,
    mut read: usize,
) -> Result<(), FrameError> {
    while read < header.len {
        read += next_chunk(recv, header, read).await?.len();
    }
    Ok(())
}

/// The next chunk of `header`'s body, of which `read` bytes are in.
async fn next_chunk(
    recv: &mut quinn::RecvStream,
    header: FrameHeader,
    read: usize,
) -> Result<bytes::Bytes, FrameError> {
    match recv.read_chunk(header.len - read, true).await {
        Ok(Some(chunk)) => Ok(chunk.bytes),
        Ok(None) => Err(FrameError::Truncated {
            id: header.id,
            read,
            len: header.len,
        }),
        Err(e) => Err(read_error(e)),
    }
}

/// Fills `buf` unless the stream ends first; returns how much was read.
async fn read_full(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await {
            Ok(Some(n)) => filled += n,
            Ok(None) => break,
            Err(e) => return Err(read_error(e)),
        }
    }
    Ok(filled)
}

fn read_error(e: quinn::ReadError) -> FrameError {
    match e {
        quinn::ReadError::ConnectionLost(error) => FrameError::ConnectionLost { error },
        e => FrameError::Stream {
            reason: e.to_string(),
        },
    }
}

/// Frames waiting to be written to one stream, by one writer task.
///
/// Any number of tasks [`push`](FrameQueue::push) frames; the writer takes
/// everything queued in one [`next_batch`](FrameQueue::next_batch) and writes
/// it at once. The writer yields to the scheduler once before taking a
/// batch, so tasks that are ready to run get to add their frames first:
/// an idle node sends at once, a busy one sends fewer, fuller packets.
///
/// A frame may hold something of type `H` until it is written (a server's
/// answer holds its request's place in the in-flight budgets, see
/// `quic::AnswerHold`): a reader that does not read holds up the server's
/// budgets, not just its memory.
///
/// Invariant: once closed, `push` refuses and `next_batch` hands out what
/// was queued before the close (nothing, if the writer abandoned the queue
/// on a failed write), then `None`.
pub struct FrameQueue<H = ()> {
    state: Mutex<QueueState<H>>,
    ready: Notify,
    /// Set by `abandon`; read without the lock, once per request read.
    abandoned: AtomicBool,
}

/// What [`FrameQueue::push_within`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue is closed: the stream is gone.
    Closed,
    /// Not queued: this many bytes already wait.
    Full {
        queued_bytes: usize,
    },
}

struct QueueState<H> {
    buf: Vec<u8>,
    /// What the frames in `buf` hold, dropped once they are written.
    held: Vec<H>,
    closed: bool,
}

impl<H> Default for FrameQueue<H> {
    fn default() -> Self {
        FrameQueue {
            state: Mutex::new(QueueState {
                buf: Vec::new(),
                held: Vec::new(),
                closed: false,
            }),
            ready: Notify::new(),
            abandoned: AtomicBool::new(false),
        }
    }
}

impl<H> FrameQueue<H> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues one frame; false if the queue is closed (the stream is gone).
    pub fn push(&self, id: u64, body: &[u8]) -> bool {
        self.push_frame(id, body, None)
    }

    /// Queues one frame unless `max_queued` bytes already wait to be
    /// written (a frame into an empty queue is always taken): a peer that
    /// stops reading, while still answering pings, would otherwise have
    /// every request sent to it pile up here, those whose callers gave up
    /// included.
    pub fn push_within(&self, id: u64, body: &[u8], max_queued: usize) -> Pushed {
        {
            let mut state = self.state.lock().expect("frame queue lock poisoned");
            if state.closed {
                return Pushed::Closed;
            }
            if !state.buf.is_empty() && state.buf.len() + body.len() > max_queued {
                return Pushed::Full {
                    queued_bytes: state.buf.len(),
                };
            }
            put_frame(&mut state.buf, id, body);
        }
        self.ready.notify_one();
        Pushed::Queued
    }

    /// Queues one frame that keeps `hold` until it has been written.
    pub fn push_holding(&self, id: u64, body: &[u8], hold: H) -> bool {
        self.push_frame(id, body, Some(hold))
    }

    fn push_frame(&self, id: u64, body: &[u8], hold: Option<H>) -> bool {
        {
            let mut state = self.state.lock().expect("frame queue lock poisoned");
            if state.closed {
                return false;
            }
            put_frame(&mut state.buf, id, body);
            state.held.extend(hold);
        }
        self.ready.notify_one();
        true
    }

    /// Refuses further frames; the writer drains what is queued and stops.
    pub fn close(&self) {
        self.state.lock().expect("frame queue lock poisoned").closed = true;
        self.ready.notify_one();
    }

    /// Closes the queue and drops what it holds: the stream has failed, so
    /// nothing queued will be written, and what the frames hold (a server's
    /// in-flight places and answer bytes) must not wait for it.
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
        let dropped = {
            let mut state = self.state.lock().expect("frame queue lock poisoned");
            state.closed = true;
            state.buf = Vec::new();
            std::mem::take(&mut state.held)
        };
        drop(dropped);
        self.ready.notify_one();
    }

    /// Whether the writer gave up on a failed write: nothing queued from
    /// now on reaches the peer.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("frame queue lock poisoned").closed
    }

    /// Waits for queued frames and swaps them into `batch` (which must be
    /// empty; its capacity is reused), and what they hold into `held`.
    /// `false` once closed and drained.
    pub async fn next_batch(&self, batch: &mut Vec<u8>, held: &mut Vec<H>) -> bool {
        debug_assert!(batch.is_empty());
        let mut yielded = false;
        loop {
            let queued = {
                let mut state = self.state.lock().expect("frame queue lock poisoned");
                if !state.buf.is_empty() && (yielded || state.closed) {
                    std::mem::swap(&mut state.buf, batch);
                    std::mem::swap(&mut state.held, held);
                    return true;
                }
                if state.buf.is_empty() && state.closed {
                    return false;
                }
                !state.buf.is_empty()
            };
            if queued {
                // Let tasks that are ready add their frames to this batch.
                tokio::task::yield_now().await;
                yielded = true;
            } else {
                // A push between the check above and this wait leaves a
                // permit, so no wake-up is lost.
                self.ready.notified().await;
            }
        }
    }

    /// Writes batches to `send` until the queue is closed and drained, then
    /// finishes the stream and returns it (to wait for the peer's
    /// acknowledgement, if the caller cares). Stops early (abandoning the
    /// queue, returning `None`) if the stream fails.
    pub async fn write_to(&self, mut send: quinn::SendStream) -> Option<quinn::SendStream> {
        let (mut batch, mut held) = (Vec::new(), Vec::new());
        while self.next_batch(&mut batch, &mut held).await {
            if send.write_all(&batch).await.is_err() {
                self.abandon();
                return None;
            }
            batch.clear();
            held.clear();
        }
        send.finish().ok()?;
        Some(send)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(mut bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
            let id = u64::from_le_bytes(bytes[4..12].try_into().unwrap());
            out.push((id, bytes[12..12 + len].to_vec()));
            bytes = &bytes[12 + len..];
        }
        out
    }

    /// Frames pushed while the writer is busy leave together, in order.
    #[tokio::test]
    async fn frames_queued_together_leave_in_one_batch_in_order() {
        let queue = FrameQueue::<()>::new();
        assert!(queue.push(1, b"one"));
        assert!(queue.push(2, b""));
        assert!(queue.push(3, b"three"));
        let mut batch = Vec::new();
        assert!(queue.next_batch(&mut batch, &mut Vec::new()).await);
        assert_eq!(
            frames(&batch),
            vec![(1, b"one".to_vec()), (2, vec![]), (3, b"three".to_vec())]
        );
    }

    /// A queue holds at most its bound of unwritten bytes, but always takes
    /// one frame when empty (a frame larger than the bound still goes), and
    /// takes frames again once the writer has the queued ones.
    #[tokio::test]
    async fn a_bounded_push_refuses_past_the_queued_bytes() {
        let queue = FrameQueue::<()>::new();
        let frame = |n: usize| vec![b'x'; n];
        assert_eq!(queue.push_within(1, &frame(100), 50), Pushed::Queued);
        assert_eq!(
            queue.push_within(2, &frame(1), 50),
            Pushed::Full { queued_bytes: 112 }
        );
        let mut batch = Vec::new();
        assert!(queue.next_batch(&mut batch, &mut Vec::new()).await);
        assert_eq!(frames(&batch), vec![(1, frame(100))]);
        assert_eq!(queue.push_within(2, &frame(10), 50), Pushed::Queued);
        assert_eq!(queue.push_within(3, &frame(10), 50), Pushed::Queued);
        assert!(matches!(
            queue.push_within(4, &frame(30), 50),
            Pushed::Full { .. }
        ));
        queue.close();
        assert_eq!(queue.push_within(5, &frame(1), 50), Pushed::Closed);
    }

    /// A frame's permit stays taken until the writer has the frame's batch
    /// (and is released when the writer drops it after writing).
    #[tokio::test]
    async fn a_frames_permit_is_held_until_its_batch_is_written() {
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let queue = FrameQueue::<tokio::sync::OwnedSemaphorePermit>::new();
        let permit = budget.clone().try_acquire_owned().unwrap();
        assert!(queue.push_holding(4, b"answer", permit));
        assert_eq!(budget.available_permits(), 0);
        let (mut batch, mut held) = (Vec::new(), Vec::new());
        assert!(queue.next_batch(&mut batch, &mut held).await);
        assert_eq!(budget.available_permits(), 0, "taken, not yet written");
        held.clear();
        assert_eq!(budget.available_permits(), 1);
    }

    /// A frame pushed by another task wakes a waiting writer.
    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_push() {
        let queue = std::sync::Arc::new(FrameQueue::<()>::new());
        let writer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut batch = Vec::new();
                queue
                    .next_batch(&mut batch, &mut Vec::new())
                    .await
                    .then_some(batch)
            })
        };
        tokio::task::yield_now().await;
        queue.push(7, b"x");
        let batch = writer.await.unwrap().expect("a batch");
        assert_eq!(frames(&batch), vec![(7, b"x".to_vec())]);
    }

    /// After close: pushes are refused, queued frames still drain, then the
    /// writer is told to stop.
    #[tokio::test]
    async fn close_drains_what_was_queued_then_stops() {
        let queue = FrameQueue::<()>::new();
        queue.push(1, b"a");
        queue.close();
        assert!(!queue.push(2, b"b"));
        assert!(queue.is_closed());
        let mut batch = Vec::new();
        assert!(queue.next_batch(&mut batch, &mut Vec::new()).await);
        assert_eq!(frames(&batch), vec![(1, b"a".to_vec())]);
        batch.clear();
        assert!(!queue.next_batch(&mut batch, &mut Vec::new()).await);
    }
}
