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
