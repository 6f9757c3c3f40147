//! A ringkv node: everything that touches the outside world.
//!
//! - [`storage`]: RocksDB, the durable store of clocks and metadata.
//! - [`group_commit`]: one WAL flush for the writes of many requests.
//! - [`cluster_key`]: the shared secret that admits nodes and clients.
//! - [`tls`]: certificates and QUIC/TLS configuration, in one place.
//! - [`endpoint_keys`]: the stateless-reset and connection-id keys, kept
//!   across restarts.
//! - [`frame`]: request/response frames on a QUIC stream and the batching
//!   writer.
//! - [`quic`]: requests multiplexed on QUIC connections, the peer connection
//!   pool and the client connection.
//! - [`link_delay`]: waiting out an emulated region link's delay to the
//!   microsecond.
//! - [`region_links`]: a node's emulated links to the other regions, which
//!   a new matrix (SIGHUP) changes while it runs: emulated partitions.
//! - [`request_memory`]: the bytes of requests a node holds, and shedding
//!   the requests beyond them.
//! - [`cluster_client`]: a client that moves to another node when its node
//!   cannot take a request.
//! - [`membership`]: joining, announcing and remembering the cluster.
//! - [`metrics_catalog`]: every metric a node exports, with its help
//!   text; counters start at 0.
//! - [`server`]: starting a node and routing requests to the coordinator,
//!   the local replica and membership.
//!
//! ## Architecture invariant
//! Only this crate knows QUIC and RocksDB. Protocol decisions (quorums,
//! merging, placement) are made in `coordinator`, `core` and `ring`; the code
//! here moves bytes and stores them.

pub mod cluster_client;
pub mod cluster_key;
pub mod endpoint_keys;
pub mod error;
pub mod frame;
pub mod group_commit;
pub mod link_delay;
pub mod membership;
pub mod metrics_catalog;
pub mod quic;
pub mod region_links;
pub mod request_memory;
pub mod server;
#[cfg(test)]
mod source_checks;
pub mod storage;
#[cfg(test)]
mod test_support;
pub mod tls;

pub use cluster_client::ClusterClient;
pub use cluster_key::ClusterKey;
pub use error::NodeError;
pub use quic::{CallError, Client};
pub use server::{Node, NodeConfig, NodeHandle};
