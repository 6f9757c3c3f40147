//! A write is acknowledged only once its WAL record is in the kernel: without
//! `--sync` RocksDB buffers the record, and the node flushes it (for every
//! write runnable at the time) before it answers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig};

/// Bytes in the WAL files of a data dir, as the kernel has them.
fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[tokio::test]
async fn an_acknowledged_put_is_in_the_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = NodeConfig::new(NodeId::new("n1").unwrap(), listen, dir.path().into());
    assert!(!config.sync, "the test is about the default, buffered WAL");
    let node = Node::start(config).await.unwrap();
    let client = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let before = wal_bytes(dir.path());
    let value = vec![b'v'; 8192];
    let put = PutRequest::new(b"k".to_vec(), Payload::Value(value), Consistency::One, None);
    assert!(matches!(
        client.call(&Request::Put(put)).await.unwrap(),
        Response::Put(_)
    ));
    // Read before shutdown, which flushes anyway.
    let after = wal_bytes(dir.path());
    assert!(
        after >= before + 8192,
        "acknowledged, yet the log file grew by only {} bytes",
        after - before
    );
    node.shutdown().await;
    client.close().await;
}
