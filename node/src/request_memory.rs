//! How many bytes of requests a node holds at once, and load shedding when
//! it would hold more.
//!
//! A request frame's body is read into memory and kept until its handler is
//! done with it. Without a bound, a client pipelining large puts faster than
//! the node stores them (a bulk loader, or a hostile peer) would grow the
//! node's memory until the kernel kills it. So every body is charged, as
//! its bytes arrive and until its request has run, against two budgets: its
//! connection's, so that one connection cannot take everything, and the
//! node's (`--max-request-memory-mb`). A body is charged for what has
//! arrived, not for the length its header announces: a header costs a
//! sender nothing to write, so charging it would let a few stalled frames
//! hold the whole budget.
//!
//! A large body (over `quic::SHARED_REQUEST_MAX_BYTES`) may take the node's
//! budget only up to [`LARGE_SHARE`] of it. The rest is kept for the small
//! requests of the data path (most replica writes, hints, reads), so a bulk
//! load of large values does not shed the replica traffic of small ones.
//!
//! A frame that does not fit is *shed*, not waited for: the node drops what
//! it read of the body, reads the rest past, and answers `Overloaded`
//! (nothing of the request ran; the client may retry it after a pause).
//! Waiting for room instead would be a cycle hazard: a coordinated request
//! holding memory while it waits for a peer whose memory is held by
//! requests that wait for this node. (Cassandra's native protocol can do
//! either; its `OverloadedException` is this choice.)
//!
//! What the charge does not cover: a request's decoded copy and what its
//! handler allocates (about as much again for a value; more for a frame of
//! many tiny items), copies a coordinator still sends to slow replicas after
//! it has answered (each until the request's deadline), answers (bounded
//! by `quic::ConnectionBudget`), and what QUIC buffers for streams the node
//! is not reading (bounded per connection by its flow-control windows).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A budget of request bytes in memory.
///
/// Invariant: `in_use` is the sum of the bytes of the live
/// [`MemoryCharge`]s taken from it, and never exceeds `max_bytes` (a charge
/// that would take it past is refused whole).
#[derive(Debug)]
pub struct RequestMemory {
    in_use: AtomicUsize,
    max_bytes: usize,
    /// Mirrors `in_use` for the node-wide budget (`None` per connection:
    /// thousands of gauges would say nothing a node's one does not).
    gauge: Option<metrics::Gauge>,
}

/// Bytes taken from a [`RequestMemory`], given back on drop.
#[derive(Debug)]
pub struct MemoryCharge {
    memory: Arc<RequestMemory>,
    bytes: usize,
}

impl RequestMemory {
    /// A budget of `max_bytes`, reported by no metric.
    pub fn new(max_bytes: usize) -> Arc<RequestMemory> {
        Arc::new(RequestMemory {
            in_use: AtomicUsize::new(0),
            max_bytes,
            gauge: None,
        })
    }

    /// A node's budget, whose use the `ringkv_request_memory_bytes` gauge
    /// follows. Made after the metrics recorder is installed, since the
    /// gauge's handle is taken here once rather than looked up per request.
    pub fn for_node(max_bytes: usize) -> Arc<RequestMemory> {
        metrics::gauge!("ringkv_request_memory_max_bytes").set(max_bytes as f64);
        Arc::new(RequestMemory {
            in_use: AtomicUsize::new(0),
            max_bytes,
            gauge: Some(metrics::gauge!("ringkv_request_memory_bytes")),
        })
    }

    /// Bytes charged now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// Takes `bytes` if they fit under the maximum, all or nothing.
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<MemoryCharge> {
        let mut charge = MemoryCharge::nothing(self);
        charge.try_grow(bytes, self.max_bytes).then_some(charge)
    }

    /// Adds `bytes` if the total stays within `limit` (at most the maximum).
    fn try_take(&self, bytes: usize, limit: usize) -> bool {
        let limit = limit.min(self.max_bytes);
        let mut now = self.in_use.load(Ordering::Relaxed);
        loop {
            let Some(after) = now.checked_add(bytes).filter(|&a| a <= limit) else {
                return false;
            };
            match self
                .in_use
                .compare_exchange_weak(now, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    if let Some(gauge) = &self.gauge {
                        gauge.increment(bytes as f64);
                    }
                    return true;
                }
                Err(seen) => now = seen,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(gauge) = &self.gauge {
            gauge.decrement(bytes as f64);
        }
    }
}

impl MemoryCharge {
    /// A charge of no bytes yet against `memory`.
    fn nothing(memory: &Arc<RequestMemory>) -> MemoryCharge {
        MemoryCharge {
            memory: memory.clone(),
            bytes: 0,
        }
    }

    /// Adds `bytes` to the charge if its budget stays within `limit` (at
    /// most its maximum); false, changing nothing, if not.
    pub fn try_grow(&mut self, bytes: usize, limit: usize) -> bool {
        let taken = self.memory.try_take(bytes, limit);
        if taken {
            self.bytes += bytes;
        }
        taken
    }

    /// Gives `bytes` of the charge back (at most all of it).
    fn shrink(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.memory.give_back(bytes);
        self.bytes -= bytes;
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.memory.give_back(self.bytes);
        }
    }
}

/// The share of a node's request memory that large bodies may take
/// together, in quarters: the last quarter is for small requests.
pub const LARGE_SHARE: (usize, usize) = (3, 4);

/// The most of `max_bytes` a body of `len` bytes may take it to: all of it
/// for a small body, [`LARGE_SHARE`] for a large one.
fn node_limit(max_bytes: usize, len: usize, small_max_bytes: usize) -> usize {
    if len <= small_max_bytes {
        max_bytes
    } else {
        max_bytes / LARGE_SHARE.1 * LARGE_SHARE.0
    }
}

/// Which budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its connection's share.
    Connection { max_bytes: usize },
    /// The node's (`--max-request-memory-mb`).
    Node { max_bytes: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Connection { max_bytes } => write!(
                f,
                "this connection's requests in memory are at its limit of {} MiB",
                max_bytes >> 20
            ),
            Refused::Node { max_bytes } => write!(
                f,
                "the node's requests in memory are at its limit of {} MiB (--max-request-memory-mb)",
                max_bytes >> 20
            ),
        }
    }
}

/// A request body's charge against its connection's budget and its
/// node's, grown as the body arrives.
///
/// Invariant: both charges hold the same bytes: what has arrived of the body.
#[derive(Debug)]
pub struct BodyCharge {
    connection: MemoryCharge,
    node: MemoryCharge,
    /// How far the node's budget may go for this body (see [`node_limit`]).
    node_limit: usize,
}

impl BodyCharge {
    /// A charge of nothing yet for a body of `len` bytes; a body of at
    /// most `small_max_bytes` counts as small.
    pub fn new(
        connection: &Arc<RequestMemory>,
        node: &Arc<RequestMemory>,
        len: usize,
        small_max_bytes: usize,
    ) -> BodyCharge {
        BodyCharge {
            connection: MemoryCharge::nothing(connection),
            node: MemoryCharge::nothing(node),
            node_limit: node_limit(node.max_bytes, len, small_max_bytes),
        }
    }

    /// Charges `bytes` more to both budgets, or to neither.
    pub fn try_grow(&mut self, bytes: usize) -> Result<(), Refused> {
        let connection_max = self.connection.memory.max_bytes;
        if !self.connection.try_grow(bytes, connection_max) {
            return Err(Refused::Connection {
                max_bytes: connection_max,
            });
        }
        if !self.node.try_grow(bytes, self.node_limit) {
            self.connection.shrink(bytes);
            return Err(Refused::Node {
                max_bytes: self.node.memory.max_bytes,
            });
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.node.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_maximum_and_gives_back_on_drop() {
        let memory = RequestMemory::new(100);
        let a = memory.try_charge(60).expect("fits");
        assert!(memory.try_charge(41).is_none(), "60 + 41 is over 100");
        let b = memory.try_charge(40).expect("exactly full fits");
        assert_eq!(memory.in_use(), 100);
        assert!(memory.try_charge(1).is_none());
        drop(a);
        assert_eq!(memory.in_use(), 40);
        drop(b);
        assert_eq!(memory.in_use(), 0);
        assert!(
            memory.try_charge(101).is_none(),
            "larger than the whole budget"
        );
        assert!(memory.try_charge(usize::MAX).is_none(), "no overflow");
        assert_eq!(memory.in_use(), 0, "a refusal takes nothing");
    }

    #[test]
    fn a_body_is_charged_to_both_budgets_or_neither() {
        let connection = RequestMemory::new(100);
        let node = RequestMemory::new(150);
        let mut first = BodyCharge::new(&connection, &node, 80, 1000);
        first.try_grow(50).expect("fits both");
        first.try_grow(30).expect("fits both");
        assert_eq!(first.bytes(), 80);
        let mut second = BodyCharge::new(&connection, &node, 30, 1000);
        assert_eq!(
            second.try_grow(30).unwrap_err(),
            Refused::Connection { max_bytes: 100 }
        );
        let other_connection = RequestMemory::new(100);
        let mut third = BodyCharge::new(&other_connection, &node, 80, 1000);
        third.try_grow(70).expect("fits both");
        assert_eq!(
            third.try_grow(1).unwrap_err(),
            Refused::Node { max_bytes: 150 }
        );
        assert_eq!(
            other_connection.in_use(),
            70,
            "the node's refusal gave the connection's byte back"
        );
        assert_eq!(node.in_use(), 150);
        drop((first, second, third));
        assert_eq!(
            (
                connection.in_use(),
                other_connection.in_use(),
                node.in_use()
            ),
            (0, 0, 0)
        );
    }

    /// Large bodies together take at most three quarters of the node's
    /// budget; small ones may use the rest.
    #[test]
    fn the_last_quarter_of_the_nodes_budget_is_for_small_requests() {
        let node = RequestMemory::new(400);
        let connection = RequestMemory::new(1000);
        let mut large = BodyCharge::new(&connection, &node, 500, 10);
        large.try_grow(300).expect("up to three quarters");
        assert_eq!(
            large.try_grow(1).unwrap_err(),
            Refused::Node { max_bytes: 400 }
        );
        let mut small = BodyCharge::new(&connection, &node, 10, 10);
        small
            .try_grow(10)
            .expect("a small body may use the last quarter");
        let mut other_large = BodyCharge::new(&connection, &node, 11, 10);
        assert!(other_large.try_grow(1).is_err(), "over three quarters");
        assert_eq!(node.in_use(), 310);
    }

    /// Concurrent charges never take the budget past its maximum, and all
    /// of it comes back.
    #[test]
    fn concurrent_charges_stay_within_the_maximum() {
        let memory = RequestMemory::new(1000);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let memory = memory.clone();
                scope.spawn(move || {
                    for i in 0..10_000usize {
                        if let Some(charge) = memory.try_charge(1 + i % 300) {
                            assert!(memory.in_use() <= 1000);
                            drop(charge);
                        }
                    }
                });
            }
        });
        assert_eq!(memory.in_use(), 0);
    }
}
