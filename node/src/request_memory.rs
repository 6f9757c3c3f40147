//! How many bytes of requests a node holds at once, and load shedding when
//! it would hold more.
//!
//! A request frame's body is read into memory and kept until its handler is
//! done with it. Without a bound, a client pipelining large puts faster than
//! the node stores them (a bulk loader, or a hostile peer announcing 65 MiB
//! frames on every stream) would grow the node's memory until the kernel
//! kills it. So every body is charged, from the moment its header announces
//! its length until its request has run, against two budgets: its
//! connection's (so one client cannot take everything) and the node's
//! (`--max-request-memory-mb`).
//!
//! A frame that does not fit is *shed*, not waited for: the node reads its
//! body off the stream and drops it, and answers `Overloaded` (nothing of
//! the request ran, so the client may retry, or ask another node). Waiting
//! for room instead would be a cycle hazard: a coordinated request holding
//! memory while it waits for a peer whose memory is held by requests that
//! wait for this node. Shedding keeps every request moving and is what
//! Cassandra's native protocol does when its in-flight request bytes are
//! used up (`OverloadedException`).
//!
//! What the charge does not cover: a request's decoded copy and what its
//! handler allocates (so the peak is about twice the charge), answers
//! (bounded by `quic::ConnectionBudget`), and what QUIC buffers for streams
//! the node is not reading (bounded per connection by its flow-control
//! windows).

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

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Bytes charged now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// Takes `bytes` if they fit under the maximum, all or nothing.
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<MemoryCharge> {
        let mut now = self.in_use.load(Ordering::Relaxed);
        loop {
            let after = now.checked_add(bytes).filter(|&a| a <= self.max_bytes)?;
            match self
                .in_use
                .compare_exchange_weak(now, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    if let Some(gauge) = &self.gauge {
                        gauge.set(after as f64);
                    }
                    return Some(MemoryCharge {
                        memory: self.clone(),
                        bytes,
                    });
                }
                Err(seen) => now = seen,
            }
        }
    }
}

impl MemoryCharge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        let before = self.memory.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
        if let Some(gauge) = &self.memory.gauge {
            gauge.set((before - self.bytes) as f64);
        }
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

/// A request body's charge against its connection's budget and its node's.
#[derive(Debug)]
pub struct BodyCharge {
    _connection: MemoryCharge,
    _node: MemoryCharge,
}

/// Charges `bytes` to `connection` and `node`, or to neither.
pub fn charge_body(
    connection: &Arc<RequestMemory>,
    node: &Arc<RequestMemory>,
    bytes: usize,
) -> Result<BodyCharge, Refused> {
    let on_connection = connection.try_charge(bytes).ok_or(Refused::Connection {
        max_bytes: connection.max_bytes,
    })?;
    // Dropping `on_connection` on the way out gives its bytes back.
    let on_node = node.try_charge(bytes).ok_or(Refused::Node {
        max_bytes: node.max_bytes,
    })?;
    Ok(BodyCharge {
        _connection: on_connection,
        _node: on_node,
    })
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
        let first = charge_body(&connection, &node, 80).expect("fits both");
        assert_eq!(
            charge_body(&connection, &node, 30).unwrap_err(),
            Refused::Connection { max_bytes: 100 }
        );
        let other_connection = RequestMemory::new(100);
        assert_eq!(
            charge_body(&other_connection, &node, 80).unwrap_err(),
            Refused::Node { max_bytes: 150 }
        );
        assert_eq!(
            other_connection.in_use(),
            0,
            "the node's refusal gave the connection's bytes back"
        );
        assert_eq!(node.in_use(), 80);
        drop(first);
        assert_eq!((connection.in_use(), node.in_use()), (0, 0));
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
