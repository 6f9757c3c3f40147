//! Request coordination (Dynamo §4.5): quorum counting, version merging and
//! the replica-side state changes, written against the
//! [`ringkv_core::Transport`] trait so that it runs unchanged over QUIC and
//! over the simulated network.
//!
//! - [`quorum`]: the sans-I/O tracker that counts replica answers against R/W.
//! - [`replica`]: applying writes and merges to a [`replica::Store`] under a
//!   per-key lock.
//! - [`coordinator`]: fan-out, deadlines, forwarding, merging reads.
//! - [`failure`]: the failure detector (timeouts with back-off, time passed in).
//! - [`latency`]: recent latency per peer, which picks the replicas a read
//!   asks first and when it asks a spare.
//! - [`sim`]: the simulated network and cluster for scenario tests.
//!
//! ## Architecture invariant
//! No sockets and no storage engine here: the network is the `Transport`
//! trait and storage the `Store` trait. Time is tokio's clock, which tests
//! pause.

pub mod coordinator;
pub mod failure;
pub mod latency;
pub mod quorum;
pub mod replica;
pub mod sim;

pub use coordinator::{Coordinator, CoordinatorConfig};
pub use quorum::{QuorumState, QuorumTracker};
pub use replica::{ReplicaService, Store, StoreError};
