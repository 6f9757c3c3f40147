//! Convergence (Dynamo §4.6–§4.7): read repair, hinted handoff and Merkle-tree
//! anti-entropy.
//!
//! Not built yet. Replicas that miss a write today converge only when a later
//! write supersedes it; read repair (a bounded queue, never a detached task),
//! durable hints for the sloppy quorum, and Merkle-tree exchange arrive with
//! their issues. Like `coordinator`, this crate will be sans-I/O protocol
//! logic over the `Transport` and `Store` traits; the node wires it to QUIC
//! and RocksDB.
