//! A data dir holding someone else's files is refused before anything is
//! written; a store, or one whose creation was cut short, is not. And a
//! seed list may name the node itself.

use std::path::Path;

use ringkv_core::NodeId;
use ringkv_node::{Node, NodeConfig, NodeError};
use support::start_again;

mod support;

/// The error of a start that must fail.
async fn start_fails(config: NodeConfig) -> NodeError {
    match Node::start(config).await {
        Ok(node) => {
            node.shutdown().await;
            panic!("the start succeeded")
        }
        Err(e) => e,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn on_loopback(id: &str, dir: &Path) -> NodeConfig {
    NodeConfig::on_loopback(NodeId::new(id).unwrap(), dir.into())
}

#[tokio::test]
async fn a_directory_of_other_files_is_refused_untouched() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.toml"), "mine").unwrap();
    let err = start_fails(on_loopback("n1", root.path())).await;
    assert!(
        matches!(&err, NodeError::ForeignDataDir { entry, .. } if entry == "notes.toml"),
        "{err}"
    );
    assert_eq!(names(root.path()), ["notes.toml"]);
}

/// A mount point's lost+found, a store, and a store whose creation was cut
/// short (RocksDB's files but no CURRENT yet) are no one else's files.
#[tokio::test]
async fn stores_and_mount_points_are_not_foreign() {
    let root = tempfile::tempdir().unwrap();
    let mounted = root.path().join("mounted");
    std::fs::create_dir_all(mounted.join("lost+found")).unwrap();
    let node = Node::start(on_loopback("n1", &mounted)).await.unwrap();
    node.shutdown().await;
    assert!(names(&mounted).contains(&"CURRENT".to_string()));
    // Restarted, it is the same store, whatever was put beside it.
    std::fs::write(mounted.join("NOTES.txt"), "an operator's").unwrap();
    let node = Node::start(on_loopback("n1", &mounted)).await.unwrap();
    node.shutdown().await;

    let cut_short = root.path().join("cut-short");
    std::fs::create_dir(&cut_short).unwrap();
    for name in ["LOCK", "LOG", "IDENTITY"] {
        std::fs::write(cut_short.join(name), "").unwrap();
    }
    let node = Node::start(on_loopback("n1", &cut_short)).await.unwrap();
    node.shutdown().await;
}

/// A data dir that is a link to a disk not mounted (a dangling link) gets
/// no store anywhere, and the link stays.
#[cfg(unix)]
#[tokio::test]
async fn a_dangling_link_is_refused_and_kept() {
    let root = tempfile::tempdir().unwrap();
    let link = root.path().join("data");
    std::os::unix::fs::symlink(root.path().join("unmounted/ringkv"), &link).unwrap();
    let err = start_fails(on_loopback("n1", &link)).await;
    assert!(matches!(err, NodeError::Storage { .. }), "{err}");
    assert!(err.to_string().contains("which does not exist"), "{err}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!root.path().join("unmounted").exists());
}

/// A data dir that is a file is refused as such, and the file kept.
#[tokio::test]
async fn a_file_is_no_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("data");
    std::fs::write(&file, "mine").unwrap();
    let err = start_fails(on_loopback("n1", &file)).await;
    assert!(
        err.to_string().contains("it is a file, not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

/// A loopback address whose UDP port was free a moment ago.
fn free_addr() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A seed list shared by every node names each of them: a node skips its
/// own address, and one whose only seed is itself is refused at once
/// (rather than after the join timeout).
#[tokio::test]
async fn a_node_does_not_seed_itself() {
    let root = tempfile::tempdir().unwrap();
    let me = free_addr();
    let mut alone = NodeConfig::new(NodeId::new("n2").unwrap(), me, root.path().join("alone"));
    alone.seeds = vec![me];
    let started = std::time::Instant::now();
    let err = start_fails(alone).await;
    assert!(
        matches!(&err, NodeError::Config { reason } if reason.contains("own address")),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    let first = Node::start(on_loopback("n1", &root.path().join("n1")))
        .await
        .unwrap();
    // Another port: the failed start's socket closes only once its
    // endpoint's driver task has run.
    let me = free_addr();
    let mut second = NodeConfig::new(NodeId::new("n2").unwrap(), me, root.path().join("n2"));
    second.seeds = vec![me, first.addr()];
    let second = Node::start(second).await.unwrap();
    second.shutdown().await;
    first.shutdown().await;
}

/// Copies the store in `from` (files and directories) to `to`.
fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_store(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of a node's data dir started beside the node it was copied from
/// refuses to start, naming the address where its twin answers; once that
/// node is gone, the copy starts (a node that moved to another address).
#[tokio::test]
async fn a_copied_data_dir_does_not_start_while_its_original_runs() {
    let (original, copy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = on_loopback("n1", original.path());
    let first = Node::start(config.clone()).await.unwrap();
    config.listen = first.addr();
    first.shutdown().await;
    copy_store(original.path(), copy.path());

    let node = start_again(config.clone()).await;
    // Refused again at the next try: a refused start stores nothing.
    for _ in 0..2 {
        let twin = start_fails(on_loopback("n1", copy.path())).await;
        assert!(matches!(twin, NodeError::Twin { .. }), "{twin}");
        assert!(
            twin.to_string().contains(&config.listen.to_string()),
            "{twin}"
        );
    }
    // The original, restarted at its address, is not taken for a twin.
    node.shutdown().await;
    let again = start_again(config).await;
    again.shutdown().await;

    let moved = Node::start(on_loopback("n1", copy.path())).await.unwrap();
    moved.shutdown().await;
}
