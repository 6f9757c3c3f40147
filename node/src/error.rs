//! Errors a node reports when it cannot start or serve.

use std::path::PathBuf;

/// Why a node could not start or keep running. Each variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "data dir {path} is in use by another running ringkv node \
         (RocksDB holds its LOCK file); stop that node or choose another --data-dir"
    )]
    DataDirInUse { path: PathBuf },
    #[error("cannot open the store in {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error("data dir {path} holds files but no ringkv store (such as {entry:?}); give an empty or new directory, so that nothing of yours is mixed with the store")]
    ForeignDataDir { path: PathBuf, entry: String },
    #[error("storage failed: {reason}")]
    StorageIo { reason: String },
    #[error("data dir {path} belongs to node {stored:?}, not {given:?}; start it with --id {stored} or use another --data-dir")]
    IdMismatch {
        path: PathBuf,
        stored: String,
        given: String,
    },
    #[error("this node's cluster replicates every key {cluster} times, but --replicas {given} was given; restart without --replicas or with --replicas {cluster}")]
    ReplicasMismatch { cluster: usize, given: usize },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("could not join the cluster: {reason}")]
    Join { reason: String },
    #[error("the cluster refused this node: {reason}")]
    JoinRefused { reason: String },
    #[error("node {id} was removed from the cluster (`ringkv remove`, or it left with `ringkv leave`) and cannot serve in it again; to bring this machine back, start it with a new --id and an empty --data-dir")]
    Removed { id: String },
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
    #[error("another process answers as node {id} at {addr}, this node's address in its cluster record: was this data dir copied? Stop that process, or start this one with a new --id and an empty --data-dir")]
    Twin { id: String, addr: String },
    #[error("TLS setup failed: {reason}")]
    Tls { reason: String },
    #[error("cluster key file {path}: {reason}")]
    ClusterKey { path: PathBuf, reason: String },
    #[error("this data dir's node last ran {before}, and is now started {now}: its peers and clients would refuse it, or, with no peers to ask, it would take requests its cluster's key never allowed; start it with its cluster's key (--cluster-key-file), or change keys as README.md says (both keys at once, then the new one); if that key was lost, start every node once with the new key and --cluster-key-replaced")]
    ClusterKeyChanged { before: String, now: String },
    #[error(transparent)]
    NoTreeRebuild(#[from] ringkv_repair::trees::NoRebuildUnderWay),
    #[error("the Merkle tree rebuild was stopped: the node is shutting down")]
    TreeRebuildStopped,
}
