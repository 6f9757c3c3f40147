//! Garbage on a QUIC stream gets an error reply, never a panic, and the node
//! keeps serving.

use std::net::SocketAddr;
use std::time::Duration;

use ringkv_core::wire::{decode_response, encode_request, ErrorKind, Request, Response};
use ringkv_core::NodeId;
use ringkv_node::{Client, Node, NodeConfig};

async fn raw_exchange(client: &Client, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 20).await.unwrap();
    decode_response(&reply).unwrap()
}

#[tokio::test]
async fn truncated_and_garbage_frames_are_answered_with_errors() {
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let node = Node::start(NodeConfig::new(
        NodeId::new("n1").unwrap(),
        listen,
        dir.path().into(),
    ))
    .await
    .unwrap();
    let client = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();

    let valid = encode_request(&Request::Status);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", vec![0xde; 97]),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("one byte short", valid[..valid.len() - 1].to_vec()),
    ];
    for (name, bytes) in cases {
        match raw_exchange(&client, &bytes).await {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::InvalidRequest, "{name}");
                assert!(
                    e.message.starts_with("malformed request"),
                    "{name}: {}",
                    e.message
                );
            }
            other => panic!("{name}: expected an error, got {other:?}"),
        }
    }

    // A stream reset half-way through: nothing to answer, nothing breaks.
    let (mut send, _recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&valid[..4]).await.unwrap();
    send.reset(0u32.into()).unwrap();

    // The same connection still works.
    assert!(matches!(
        client.call(&Request::Ping).await.unwrap(),
        Response::Pong
    ));
    assert!(matches!(
        client.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    client.close().await;
    node.shutdown().await;
}
