//! A start that fails leaves the data dir as it found it, and a directory
//! holding someone else's files is refused before anything is written.

use std::path::Path;

use ringkv_core::NodeId;
use ringkv_node::{Node, NodeConfig, NodeError};

/// A node whose start fails after its store is open: its UDP port is taken.
fn config_on_taken_port(dir: &Path, taken: &std::net::UdpSocket) -> NodeConfig {
    let listen = taken.local_addr().unwrap();
    NodeConfig::new(NodeId::new("n1").unwrap(), listen, dir.into())
}

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

#[tokio::test]
async fn a_failed_start_removes_the_store_and_directories_it_created() {
    let root = tempfile::tempdir().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();

    // Absent, two levels deep: both levels go.
    let deep = root.path().join("a/b");
    let err = start_fails(config_on_taken_port(&deep, &taken)).await;
    assert!(matches!(err, NodeError::Listen { .. }), "{err}");
    assert!(!root.path().join("a").exists(), "{:?}", names(root.path()));

    // Empty but for lost+found (a mount point): emptied again, and
    // lost+found kept.
    let mounted = root.path().join("mounted");
    std::fs::create_dir_all(mounted.join("lost+found")).unwrap();
    start_fails(config_on_taken_port(&mounted, &taken)).await;
    assert_eq!(names(&mounted), ["lost+found"]);
}

/// Nodes whose dirs share a parent the first of them created: one that
/// fails removes its own dir only, never the parent the others serve from.
#[tokio::test]
async fn a_failed_start_leaves_the_dirs_of_other_nodes_alone() {
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("data");
    let first = Node::start(NodeConfig::on_loopback(
        NodeId::new("n1").unwrap(),
        shared.join("n1"),
    ))
    .await
    .unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    start_fails(config_on_taken_port(&shared.join("n3"), &taken)).await;
    assert_eq!(names(&shared), ["n1"]);
    assert!(names(&shared.join("n1")).contains(&"CURRENT".to_string()));
    first.shutdown().await;
}

/// A data dir that is a link to a disk not mounted (a dangling link) is
/// neither replaced by a store elsewhere nor removed.
#[cfg(unix)]
#[tokio::test]
async fn a_dangling_link_is_refused_and_kept() {
    let root = tempfile::tempdir().unwrap();
    let link = root.path().join("data");
    std::os::unix::fs::symlink(root.path().join("unmounted/ringkv"), &link).unwrap();
    let err = start_fails(NodeConfig::on_loopback(
        NodeId::new("n1").unwrap(),
        link.clone(),
    ))
    .await;
    assert!(matches!(err, NodeError::Storage { .. }), "{err}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!root.path().join("unmounted").exists());
}

#[tokio::test]
async fn a_failed_start_keeps_a_store_that_was_there() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let node = Node::start(NodeConfig::on_loopback(
        NodeId::new("n1").unwrap(),
        dir.clone(),
    ))
    .await
    .unwrap();
    node.shutdown().await;
    let before = names(&dir);
    assert!(before.contains(&"CURRENT".to_string()), "{before:?}");

    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    start_fails(config_on_taken_port(&dir, &taken)).await;
    assert!(names(&dir).contains(&"CURRENT".to_string()));
    // And it still opens, as the node it was.
    let node = Node::start(NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir))
        .await
        .unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn a_directory_of_other_files_is_refused_untouched() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.toml"), "mine").unwrap();
    let err = start_fails(NodeConfig::on_loopback(
        NodeId::new("n1").unwrap(),
        root.path().into(),
    ))
    .await;
    assert!(
        matches!(&err, NodeError::ForeignDataDir { entry, .. } if entry == "notes.toml"),
        "{err}"
    );
    assert_eq!(names(root.path()), ["notes.toml"]);
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
/// (rather than after the join timeout), leaving no store behind.
#[tokio::test]
async fn a_node_does_not_seed_itself() {
    let root = tempfile::tempdir().unwrap();
    let me = free_addr();
    let mut alone = NodeConfig::new(NodeId::new("n2").unwrap(), me, root.path().join("n2"));
    alone.seeds = vec![me];
    let started = std::time::Instant::now();
    let err = start_fails(alone).await;
    assert!(
        matches!(&err, NodeError::Config { reason } if reason.contains("own address")),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!root.path().join("n2").exists());

    let first = Node::start(NodeConfig::on_loopback(
        NodeId::new("n1").unwrap(),
        root.path().join("n1"),
    ))
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
