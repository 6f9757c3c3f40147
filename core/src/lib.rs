//! Shared vocabulary of ringkv: what every other crate needs to agree on.
//!
//! This is a leaf crate (no ringkv dependencies, no I/O) so that `ring`,
//! `coordinator`, `repair` and `node` can share types without depending on
//! each other:
//! - [`node_id`]: who a node is.
//! - [`dvv`]: dotted version vectors, the causality of one key's versions.
//! - [`context`]: the causal-context token clients carry.
//! - [`consistency`]: per-request R and W.
//! - [`wire`]: the messages, and their validated rkyv encoding.
//! - [`transport`]: the network trait protocol code is written against.
//! - [`hash`]: the stable hash placement and tokens rely on.
//! - [`handover_record`]: the ring hand-over's state in a data dir.
//! - [`long_wait`]: taking a lock whose holder may be stalled.

pub mod consistency;
pub mod context;
pub mod dvv;
pub mod error;
pub mod handover_record;
pub mod hash;
pub mod long_wait;
pub mod node_id;
pub mod regions;
pub mod transport;
pub mod wire;

pub use consistency::Consistency;
pub use context::CausalContext;
pub use dvv::{Clock, Dot, Payload, VersionVector};
pub use error::InvalidInput;
pub use node_id::NodeId;
pub use transport::{Transport, TransportError};
