//! Convergence (Dynamo §4.6–§4.7): read repair, hinted handoff, and
//! Merkle-tree anti-entropy.
//!
//! - [`read_repair`]: who is stale after a read, and the bounded queue that
//!   repairs them.
//! - [`hints`]: the hints a fallback holds for owners that were down.
//! - [`handoff`]: the worker that hands hints back to their owners.
//! - [`merkle`]: the hash tree and its diff.
//! - [`trees`]: a replica's per-peer trees, kept current by every stored
//!   change and rebuilt from a snapshot without stopping writes.
//! - [`anti_entropy`]: the exchange of trees between replicas and the
//!   repair of the keys they disagree on.
//! - [`tombstones`]: when a delete's tombstone may be collected.
//! - [`cleanup`]: which stray copies, left from an older ring, may go.
//!
//! Like `coordinator`, this crate decides in plain code and acts only through
//! the `Transport` trait; the node wires it to QUIC and RocksDB. Every
//! background loop here is bounded (a fixed-capacity queue, one batch in
//! flight, a per-send timeout), observable (metrics) and stops when told to.

pub mod anti_entropy;
pub mod cleanup;
pub mod handoff;
pub mod hints;
pub mod merkle;
pub mod read_repair;
pub mod tombstones;
pub mod trees;

pub use hints::{HintBook, HintError, HintStore};
pub use read_repair::{stale_replicas, ReadRepairQueue, RepairJob};

/// Helpers the crate's unit tests share.
#[cfg(test)]
mod test_support {
    use ringkv_core::dvv::{Clock, Payload, VersionVector};
    use ringkv_core::NodeId;

    pub fn n(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// A clock holding one write of `value` by `actor`.
    pub fn write(actor: &str, value: &str) -> Clock {
        let mut c = Clock::new();
        c.update(
            &VersionVector::new(),
            Payload::Value(value.as_bytes().to_vec()),
            &n(actor),
        );
        c
    }
}
