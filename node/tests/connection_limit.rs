//! `--max-connections`: past the limit a new connection is refused at once
//! (the client hears it, rather than waiting out a handshake timeout), and
//! a slot frees up when a connection ends.

use std::time::{Duration, Instant};

use ringkv_core::wire::{Request, Response};
use ringkv_core::NodeId;
use ringkv_node::{Client, Node, NodeConfig, NodeHandle};

/// A node on loopback that serves at most `slots` connections.
async fn node_with_slots(dir: &std::path::Path, slots: usize) -> NodeHandle {
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.into());
    config.max_connections = slots;
    Node::start(config).await.unwrap()
}

/// A connection to `addr` once the node has noticed a closed one and freed
/// its slot (within 10 s).
async fn connect_once_a_slot_frees(addr: std::net::SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(addr, Duration::from_secs(5)).await {
            Ok(client) => return client,
            Err(e) => assert!(Instant::now() < deadline, "no slot freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that `client` is served.
async fn assert_served(client: &Client) {
    assert!(matches!(
        client.call(&Request::Ping).await.unwrap(),
        Response::Pong
    ));
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_slots(dir.path(), 1).await;

    let first = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_served(&first).await;
    let started = Instant::now();
    let second = Client::connect(node.addr(), Duration::from_secs(5)).await;
    assert!(second.is_err(), "a second connection was served");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused, not timed out: {:?}",
        started.elapsed()
    );

    first.close().await;
    // The server notices the close and frees the slot.
    let third = connect_once_a_slot_frees(node.addr()).await;
    assert_served(&third).await;
    third.close().await;
    node.shutdown().await;
}

/// A client's certificate check that never returns: its handshake stalls
/// after its first flight, holding the server's slot, as a client that sent
/// one packet and went away would. It says when it got there: the server
/// has then taken the handshake, and its slot.
#[derive(Debug)]
struct Stalls(std::sync::Mutex<std::sync::mpsc::Sender<()>>);

impl rustls::client::danger::ServerCertVerifier for Stalls {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let _ = self.0.lock().unwrap().send(());
        // Holds this client's only thread, and with it every packet it
        // would send, well past the test.
        std::thread::sleep(Duration::from_secs(60));
        Err(rustls::Error::General("stalled".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("stalled".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("stalled".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Starts a handshake with `addr` that stalls once the server has answered
/// its first packet, on a thread of its own (left behind, asleep); returns
/// once it has.
async fn stall_a_handshake(addr: std::net::SocketAddr) {
    let (stalled, told) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(Stalls(
                    std::sync::Mutex::new(stalled),
                )))
                .with_no_client_auth();
            tls.alpn_protocols = vec![ringkv_core::wire::ALPN.to_vec()];
            let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let config = quinn::ClientConfig::new(std::sync::Arc::new(quic));
            let connecting = endpoint
                .connect_with(config, addr, ringkv_node::tls::SERVER_NAME)
                .unwrap();
            let _ = connecting.await;
        });
    });
    tokio::task::spawn_blocking(move || told.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the handshake reached the certificate check");
}

/// A handshake that stalls gives its slot back after the handshake timeout,
/// well before the connection's idle timeout would end it: otherwise a few
/// hundred stalled handshakes a second hold every slot.
#[tokio::test]
async fn a_stalled_handshake_gives_its_slot_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_slots(dir.path(), 1).await;
    let started = Instant::now();
    stall_a_handshake(node.addr()).await;
    // The stalled handshake holds the one slot: a connection is refused.
    assert!(
        Client::connect(node.addr(), Duration::from_secs(1))
            .await
            .is_err(),
        "the stalled handshake took no slot"
    );
    // Given back after the handshake timeout, before the idle timeout.
    // Up to a second to free the slot and one to connect, with room for a
    // busy machine; the idle timeout would free it only later.
    let limit = ringkv_node::server::HANDSHAKE_TIMEOUT + Duration::from_millis(4500);
    assert!(limit < Duration::from_millis(ringkv_node::tls::IDLE_TIMEOUT_MS));
    let client = loop {
        match Client::connect(node.addr(), Duration::from_secs(1)).await {
            Ok(client) => break client,
            Err(e) => assert!(
                started.elapsed() < limit,
                "the slot was not given back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_served(&client).await;
    client.close().await;
    node.shutdown().await;
}

/// Once half the slots are in use, a new client is first sent a Retry
/// (it proves its address with the token) and still connects.
#[tokio::test]
async fn a_client_sent_a_retry_still_connects() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_slots(dir.path(), 2).await;
    let first = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    // One of two slots in use: the next client is retried.
    let second = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    for client in [&first, &second] {
        assert_served(client).await;
    }
    first.close().await;
    second.close().await;
    node.shutdown().await;
}

/// One source address that is no member's holds at most its share of the
/// slots (a sixteenth): past it, its new connections are refused while
/// the node still has slots for others. (The node listens on 127.0.0.2;
/// its clients connect from 127.0.0.1, which no member has.)
#[tokio::test]
async fn one_address_that_is_no_members_holds_at_most_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.path().into());
    config.listen = "127.0.0.2:0".parse().unwrap();
    config.max_connections = 1600;
    let node = Node::start(config).await.unwrap();
    let share = 1600 / 16;
    let mut held = Vec::new();
    for _ in 0..share {
        let client = Client::connect(node.addr(), Duration::from_secs(5))
            .await
            .unwrap();
        held.push(client);
    }
    assert_served(held.last().unwrap()).await;
    let refused = Client::connect(node.addr(), Duration::from_secs(5)).await;
    assert!(
        refused.is_err(),
        "a connection past the address's share was served"
    );
    held.pop().unwrap().close().await;
    let again = connect_once_a_slot_frees(node.addr()).await;
    assert_served(&again).await;
    again.close().await;
    Client::close_all(held).await;
    node.shutdown().await;
}
