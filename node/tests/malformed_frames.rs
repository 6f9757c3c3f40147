//! Garbage on a QUIC stream gets an error reply, never a panic, and the node
//! keeps serving. Frames are `[u32 length][u64 id][body]` (see
//! `ringkv_node::frame`).

use std::time::Duration;

use ringkv_core::dvv::{Payload, VersionVector};
use ringkv_core::wire::{
    decode_response, encode_request, ErrorKind, ReplicaRequest, Request, Response,
};
use ringkv_core::NodeId;
use ringkv_node::frame::{put_frame, FRAME_HEADER_BYTES};
use ringkv_node::{Client, Node, NodeConfig, NodeHandle};

/// Sends `bytes` on a stream of their own and returns every answer frame
/// (id and response) the node writes before finishing the stream.
async fn raw_exchange(client: &Client, bytes: &[u8]) -> Vec<(u64, Response)> {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 20).await.unwrap();
    let mut answers = Vec::new();
    let mut rest = &reply[..];
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let id = u64::from_le_bytes(rest[4..12].try_into().unwrap());
        let body = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
        answers.push((id, decode_response(body).unwrap()));
        rest = &rest[FRAME_HEADER_BYTES + len..];
    }
    answers
}

fn frame(id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(&mut out, id, body);
    out
}

fn assert_malformed(answer: &(u64, Response), id: u64, case: &str) {
    assert_eq!(answer.0, id, "{case}: answered under the request's id");
    match &answer.1 {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{case}");
            assert!(
                e.message.starts_with("malformed request"),
                "{case}: {}",
                e.message
            );
        }
        other => panic!("{case}: expected an error, got {other:?}"),
    }
}

/// A one-node cluster in a temporary dir, and a client connected to it.
async fn node_and_client() -> (tempfile::TempDir, NodeHandle, Client) {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    let node = Node::start(config).await.unwrap();
    let client = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    (dir, node, client)
}

#[tokio::test]
async fn truncated_and_garbage_frames_are_answered_with_errors() {
    let (_dir, node, client) = node_and_client().await;

    let valid = encode_request(&Request::Ping);
    // Bodies that do not decode: each gets its own error, and the frames
    // around them are still served.
    for (case, body) in [
        ("empty body", vec![]),
        ("garbage", vec![0xde; 97]),
        ("truncated body", valid[..valid.len() / 2].to_vec()),
        ("one byte short", valid[..valid.len() - 1].to_vec()),
    ] {
        let mut stream = frame(1, &valid);
        stream.extend(frame(2, &body));
        stream.extend(frame(3, &valid));
        let mut answers = raw_exchange(&client, &stream).await;
        answers.sort_by_key(|(id, _)| *id);
        assert_eq!(answers.len(), 3, "{case}");
        assert!(matches!(answers[0], (1, Response::Pong)), "{case}");
        assert_malformed(&answers[1], 2, case);
        assert!(matches!(answers[2], (3, Response::Pong)), "{case}");
    }

    // The stream ends inside a frame's body: that frame is answered with an
    // error, the one before it normally.
    let mut stream = frame(1, &valid);
    stream.extend(&frame(9, &valid)[..FRAME_HEADER_BYTES + 2]);
    let mut answers = raw_exchange(&client, &stream).await;
    answers.sort_by_key(|(id, _)| *id);
    assert_eq!(answers.len(), 2);
    assert!(matches!(answers[0], (1, Response::Pong)));
    assert_malformed(&answers[1], 9, "stream ends inside a body");

    // A request that decodes but breaks a limit (an empty key) is refused
    // as invalid, not as malformed: a sender may retry a request the node
    // could not read (see MALFORMED_REQUEST), never this one.
    let empty_key = encode_request(&Request::replica_from(
        ringkv_core::NodeId::new("tester").unwrap(),
        ReplicaRequest::Read {
            key: Vec::new(),
            hint_for: None,
        },
    ));
    let answers = raw_exchange(&client, &frame(4, &empty_key)).await;
    assert_eq!(answers.len(), 1);
    match &answers[0] {
        (4, Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(e.message.starts_with("invalid request"), "{}", e.message);
            assert!(e.message.contains("key is empty"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A large frame cut short: the body is read in steps, and the error
    // says how much of it came.
    let mut big = Vec::new();
    big.extend_from_slice(&(200u32 * 1024).to_le_bytes());
    big.extend_from_slice(&6u64.to_le_bytes());
    big.extend(vec![0u8; 100 * 1024]);
    let answers = raw_exchange(&client, &big).await;
    assert_eq!(answers.len(), 1);
    assert_malformed(&answers[0], 6, "large frame cut short");
    match &answers[0].1 {
        Response::Error(e) => assert!(
            e.message.contains("102400 of 204800 bytes"),
            "{}",
            e.message
        ),
        other => panic!("expected an error, got {other:?}"),
    }

    // A header announcing more than a frame may hold: refused without
    // reading (or allocating) the body.
    let mut huge = Vec::new();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&5u64.to_le_bytes());
    let answers = raw_exchange(&client, &huge).await;
    assert_eq!(answers.len(), 1);
    assert_malformed(&answers[0], 5, "oversized frame");

    // A stream that ends inside a header, or carries nothing: no request,
    // no answer, and no harm.
    assert!(raw_exchange(&client, &valid[..5]).await.is_empty());
    assert!(raw_exchange(&client, &[]).await.is_empty());

    // A stream reset half-way through: nothing to answer, nothing breaks.
    let (mut send, _recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&frame(1, &valid)[..6]).await.unwrap();
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

/// Well-formed, but not for the network: a coordinator's request to itself
/// sent over a connection is refused, and nothing is written; so is a
/// replica request that does not name its sender.
#[tokio::test]
async fn a_coordinators_update_from_a_connection_is_refused() {
    let (_dir, node, client) = node_and_client().await;
    let update = Request::replica_from(
        ringkv_core::NodeId::new("tester").unwrap(),
        ReplicaRequest::Update {
            key: b"k".to_vec(),
            context: VersionVector::new(),
            payload: Payload::Value(vec![b'v'; 16]),
            overwrite: false,
            hint_for: None,
        },
    );
    match client.call(&update).await.unwrap() {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(e.message.contains("send a Put"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A replica request that does not name its sender, which is how a
    // coordinator addresses its own replica in-process, is refused too.
    let unnamed = Request::Replica(ReplicaRequest::Read {
        key: b"k".to_vec(),
        hint_for: None,
    });
    match client.call(&unnamed).await.unwrap() {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert!(e.message.contains("names its sender"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let read = Request::replica_from(
        ringkv_core::NodeId::new("tester").unwrap(),
        ReplicaRequest::Read {
            key: b"k".to_vec(),
            hint_for: None,
        },
    );
    assert!(matches!(
        client.call(&read).await.unwrap(),
        Response::Clock(None)
    ));
    client.close().await;
    node.shutdown().await;
}

/// A fallback answers a read for an owner only where it would keep a hint
/// for it: for a node that is no member it refuses both, so its "nothing"
/// cannot count toward a read's R.
#[tokio::test]
async fn a_read_for_an_owner_it_keeps_no_hints_for_is_refused_like_the_hint() {
    let (_dir, node, client) = node_and_client().await;
    let ghost = ringkv_core::NodeId::new("ghost").unwrap();
    let read = Request::replica_from(
        ringkv_core::NodeId::new("tester").unwrap(),
        ReplicaRequest::Read {
            key: b"k".to_vec(),
            hint_for: Some(ghost.clone()),
        },
    );
    let hint = Request::replica_from(
        ringkv_core::NodeId::new("tester").unwrap(),
        ReplicaRequest::Hint {
            owner: ghost,
            key: b"k".to_vec(),
            clock: ringkv_core::dvv::Clock::default(),
        },
    );
    for request in [read, hint] {
        match client.call(&request).await.unwrap() {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable);
                assert!(e.message.contains("ghost is not a member"), "{}", e.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    client.close().await;
    node.shutdown().await;
}
