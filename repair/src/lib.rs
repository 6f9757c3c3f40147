//! Convergence (Dynamo §4.6–§4.7): read repair now; hinted handoff and
//! Merkle-tree anti-entropy to come.
//!
//! Like `coordinator`, this crate decides in plain code and acts only through
//! the `Transport` trait; the node wires it to QUIC. Every background loop
//! here is bounded (a fixed-capacity queue, a per-send timeout), observable
//! (metrics) and stops when told to.

pub mod read_repair;

pub use read_repair::{stale_replicas, ReadRepairQueue, RepairJob};
