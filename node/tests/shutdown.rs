//! A node that has shut down has closed its database: the data dir can be
//! opened again at once, by a new node in the same process. Before that it
//! drains: requests under way may finish, and new ones are refused.

use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{Client, Node, NodeConfig, NodeHandle};

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig::on_loopback(NodeId::new("n1").unwrap(), dir.into())
}

/// Node `id` of a two-node cluster (N=2) that does nothing in the
/// background: no hints, no periodic anti-entropy, no read repair.
fn quiet(id: &str, dir: &std::path::Path) -> NodeConfig {
    let mut c = config(dir);
    c.id = NodeId::new(id).unwrap();
    c.replicas = Some(2);
    c.hints = false;
    c.anti_entropy_interval = None;
    c.read_repair_chance = 0.0;
    c
}

/// Starts a node in `dir` and writes one key through a client, which
/// leaves a connection handler behind that holds the node.
async fn start_and_put(dir: &std::path::Path) -> (NodeHandle, Client) {
    let node = Node::start(config(dir)).await.unwrap();
    let client = Client::connect(node.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let put = PutRequest::new(
        b"k".to_vec(),
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    assert!(matches!(
        client.call(&Request::Put(put)).await.unwrap(),
        Response::Put(_)
    ));
    (node, client)
}

#[tokio::test]
async fn shutdown_closes_the_database_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start_and_put(dir.path()).await;
    node.shutdown().await;

    let again = Node::start(config(dir.path()))
        .await
        .expect("the data dir is free once shutdown returns");
    again.shutdown().await;
    client.close().await;
}

/// A shutdown that finds no request handler left records itself as clean,
/// so the next start keeps the epoch (and its actor id). A holder of the
/// node that outlived shutdown would make every restart a new actor.
#[tokio::test]
async fn a_clean_shutdown_lets_the_next_start_keep_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (node, client) = start_and_put(dir.path()).await;
    node.shutdown().await;
    client.close().await;

    assert_next_start_keeps_the_epoch(dir.path());
}

/// The run in `dir` shut down cleanly: the next start keeps its epoch.
fn assert_next_start_keeps_the_epoch(dir: &std::path::Path) {
    let storage = ringkv_node::storage::Storage::open(dir, false).unwrap();
    let used = storage
        .meta_get("epoch")
        .unwrap()
        .expect("the run had an epoch");
    // As after a reboot: the same boot would keep the epoch whether or not
    // the shutdown was clean.
    let next = storage.begin_epoch(Some(b"a later boot")).unwrap();
    assert_eq!(next.to_le_bytes().as_slice(), used.as_slice());
}

/// A repair round a client asked for stops at shutdown, so it does not keep
/// the node held (and the next start in a new epoch) while it is paced.
#[tokio::test]
async fn a_repair_round_under_way_stops_at_shutdown() {
    use ringkv_core::wire::ReplicaRequest;
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let paced = |id: &str, dir: &std::path::Path| {
        let mut c = quiet(id, dir);
        // One key a second: after its first batch of 64 keys the round
        // waits a minute for the next.
        c.repair_keys_per_s = 1;
        c
    };
    let n1 = Node::start(paced("n1", dir1.path())).await.unwrap();
    let mut second = paced("n2", dir2.path());
    second.seeds = vec![n1.addr()];
    let n2 = Node::start(second).await.unwrap();
    n2.shutdown().await;

    // 65 keys that only n1 holds.
    let keys: Vec<Vec<u8>> = (0..65).map(|i| format!("k{i}").into_bytes()).collect();
    let to_n1 = Client::connect(n1.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    for key in &keys {
        let put = PutRequest::new(
            key.clone(),
            Payload::Value(b"v".to_vec()),
            Consistency::One,
            None,
        );
        let answer = to_n1.call(&Request::Put(put)).await.unwrap();
        assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    }

    let n2 = Node::start(paced("n2", dir2.path())).await.unwrap();
    let to_n2 = Client::connect(n2.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let addr = n2.addr();
    let start_repair = move || {
        tokio::spawn(async move {
            let client = Client::connect(addr, Duration::from_secs(5)).await.unwrap();
            client.call(&Request::Repair).await
        })
    };
    let mut repair = start_repair();
    let mut asked = 1;
    // Under way once n2 holds some of the keys (the first batch).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    'wait: loop {
        for key in &keys {
            let read = Request::replica_from(
                ringkv_core::NodeId::new("tester").unwrap(),
                ReplicaRequest::Read {
                    key: key.clone(),
                    hint_for: None,
                },
            );
            if let Response::Clock(Some(_)) = to_n2.call(&read).await.unwrap() {
                break 'wait;
            }
        }
        if repair.is_finished() {
            // A round can end at once while a peer is still setting up (its
            // trees being rebuilt, say); ask again.
            eprintln!("the round ended early: {:?}", repair.await.unwrap());
            assert!(asked < 5, "every round ends at once");
            repair = start_repair();
            asked += 1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the repair never began"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!repair.is_finished(), "the second batch is a minute away");

    n2.shutdown().await;
    to_n2.close().await;
    let _ = repair.await;
    // Clean: no handler was left holding the node.
    assert_next_start_keeps_the_epoch(dir2.path());
    n1.shutdown().await;
    to_n1.close().await;
}

/// n1 ("near") and n2 ("far", `delay_ms` away from n1 each way) in one
/// cluster with N=2, n1 with the given drain timeout, and a client of n1
/// once n1 places keys on both. Returns the nodes' dirs too, to restart n1.
async fn near_and_far(
    delay_ms: u64,
    drain_timeout: Duration,
) -> (
    [NodeHandle; 2],
    std::sync::Arc<Client>,
    [tempfile::TempDir; 2],
    impl Fn(&str, &std::path::Path, &str) -> NodeConfig,
) {
    use ringkv_core::regions::LatencyMatrix;
    use std::sync::Arc;
    let matrix = Arc::new(
        LatencyMatrix::parse_toml(&format!(
            "regions = [\"near\", \"far\"]\n[[link]]\nbetween = [\"near\", \"far\"]\ndelay_ms = {delay_ms}\n"
        ))
        .unwrap(),
    );
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let in_region = move |id: &str, dir: &std::path::Path, region: &str| {
        let mut c = quiet(id, dir);
        c.region = Some(region.to_string());
        c.latency_matrix = Some(matrix.clone());
        c.drain_timeout = drain_timeout;
        c
    };
    let n1 = Node::start(in_region("n1", dirs[0].path(), "near"))
        .await
        .unwrap();
    let mut second = in_region("n2", dirs[1].path(), "far");
    second.seeds = vec![n1.addr()];
    let n2 = Node::start(second).await.unwrap();

    let client = Arc::new(
        Client::connect(n1.addr(), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    // n1 places keys on n2 too once it knows of it (joins skip the emulation).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Response::Status(s) = client.call(&Request::Status).await.unwrap() {
            if s.nodes.len() == 2 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "n2 never joined n1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ([n1, n2], client, dirs, in_region)
}

/// A put of `key` at `w`, with a deadline of 30 s.
fn put(key: &str, w: Consistency) -> Request {
    let mut put = PutRequest::new(
        key.as_bytes().to_vec(),
        Payload::Value(b"v".to_vec()),
        w,
        None,
    );
    put.timeout_ms = 30_000;
    Request::Put(put)
}

/// Starts a W=all put of "all" through `client`, which waits for n2, and
/// checks that it is still waiting once a W=1 put ("one"), which n1
/// answers alone, is done: only a ring of both nodes keeps a W=all put
/// waiting, so n1 did send to n2.
async fn put_waiting_for_n2(
    client: &std::sync::Arc<Client>,
) -> tokio::task::JoinHandle<Result<Response, ringkv_node::CallError>> {
    let waiting = tokio::spawn({
        let (client, put) = (client.clone(), put("all", Consistency::All));
        async move { client.call(&put).await }
    });
    let answer = client.call(&put("one", Consistency::One)).await.unwrap();
    assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    assert!(!waiting.is_finished(), "{:?}", waiting.await);
    waiting
}

/// A write's send to a slow replica outlives the write's answer, until the
/// write's deadline; a write waiting for that replica holds its request
/// until then. Shutdown stops both once its drain timeout has passed: the
/// waiting client is told why at once, and the data dir is free when
/// shutdown returns, not when a 30 s deadline has passed.
#[tokio::test]
async fn shutdown_stops_the_requests_under_way_and_the_sends_they_left() {
    let ([n1, n2], client, dirs, in_region) =
        near_and_far(20_000, Duration::from_millis(200)).await;
    // Waits for n2, 20 s away; the W=1 put's send to n2 goes on too.
    let waiting = put_waiting_for_n2(&client).await;

    n1.shutdown().await;
    let again = Node::start(in_region("n1", dirs[0].path(), "near"))
        .await
        .expect("the data dir is free once shutdown returns");
    // The waiting client was told, long before its 30 s deadline, and the
    // answer got out before the connection closed.
    let told = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered at shutdown")
        .unwrap();
    match told {
        Ok(Response::Error(e)) => assert!(
            e.message.contains("shut down while serving the request"),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    again.shutdown().await;
    n2.shutdown().await;
}

/// A rolling restart costs no request already under way: shutdown refuses
/// new requests ("shutting down; ask another node": nothing ran) while one
/// that was waiting for a replica 1 s away finishes, and its answer
/// reaches the client before the connection closes.
#[tokio::test]
async fn shutdown_drains_the_requests_under_way_and_refuses_new_ones() {
    let ([n1, n2], client, _dirs, _) = near_and_far(1_000, Duration::from_secs(10)).await;
    let waiting = put_waiting_for_n2(&client).await;

    let shutdown = tokio::spawn(n1.shutdown());
    // Until the drain begins n1 answers; then it refuses.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match client.call(&put("new", Consistency::One)).await.unwrap() {
            Response::Put(_) => {}
            Response::Error(e) => break e,
            other => panic!("{other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        refusal
            .message
            .contains("n1 is shutting down; ask another node"),
        "{refusal:?}"
    );
    // Nothing ran: a client may send it elsewhere as it is.
    assert_eq!(refusal.kind, ringkv_core::wire::ErrorKind::NotServing);
    // Pings are refused too, so peers count n1 down and use stand-ins.
    match client.call(&Request::Ping).await.unwrap() {
        Response::Error(e) => assert_eq!(e.kind, ringkv_core::wire::ErrorKind::NotServing),
        other => panic!("{other:?}"),
    }
    assert!(
        !waiting.is_finished(),
        "the W=all put was still waiting for n2 when the drain began: {:?}",
        waiting.await
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered within the drain")
        .unwrap();
    assert!(matches!(answer, Ok(Response::Put(_))), "{answer:?}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown ends once the drain is done")
        .unwrap();
    n2.shutdown().await;
}

/// The drain waits for what requests left running too: a W=1 put is
/// answered at once, but its send to n2, 1 s away, is still under way when
/// shutdown begins; it reaches n2 before n1 stops.
#[tokio::test]
async fn shutdown_drains_the_sends_a_write_left_running() {
    let ([n1, n2], client, _dirs, _) = near_and_far(1_000, Duration::from_secs(10)).await;
    let answer = client.call(&put("one", Consistency::One)).await.unwrap();
    assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    n1.shutdown().await;
    let to_n2 = Client::connect(n2.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let get = Request::Get(ringkv_core::wire::GetRequest {
        local: true,
        ..ringkv_core::wire::GetRequest::new("one", Consistency::One)
    });
    match to_n2.call(&get).await.unwrap() {
        Response::Get(g) => assert_eq!(g.values, [b"v".to_vec()], "the send reached n2"),
        other => panic!("{other:?}"),
    }
    to_n2.close().await;
    n2.shutdown().await;
}

/// Log lines, for a test that asserts a warning was not given.
#[derive(Clone, Default)]
struct Logged(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A start whose join fails shuts the half-started node down. Before, the
/// start's own locals still held the database while shutdown waited for it
/// to close, so every failed start took 5 s longer and warned that the
/// database was in use. The runtime is single-threaded so that the
/// subscriber set here sees every task's events.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_join_closes_the_database_before_it_returns() {
    let logged = Logged::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logged = logged.clone();
            move || logged.clone()
        })
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    // A seed nobody answers on: a port just bound and released.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = quiet("n2", dir.path());
    c.seeds = vec![nobody];
    c.join_timeout = Duration::from_millis(200);
    let e = Node::start(c).await.err().expect("nobody answers the join");
    assert!(e.to_string().contains("could not join"), "{e}");
    let log = String::from_utf8(logged.0.lock().unwrap().clone()).unwrap();
    assert!(!log.contains("still in use"), "{log}");
    // And the data dir opens again at once.
    let node = Node::start(quiet("n2", dir.path())).await.unwrap();
    node.shutdown().await;
}

/// A node whose region the seed's latency matrix lacks is refused, and
/// says why, rather than joined with links that silently take no delay.
#[tokio::test]
async fn a_join_from_a_region_the_seed_s_matrix_lacks_is_refused() {
    use ringkv_core::regions::LatencyMatrix;
    use std::sync::Arc;
    let matrix = |other: &str| {
        Arc::new(
            LatencyMatrix::parse_toml(&format!(
                "regions = [\"near\", \"{other}\"]\n[[link]]\nbetween = [\"near\", \"{other}\"]\ndelay_ms = 1\n"
            ))
            .unwrap(),
        )
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut first = quiet("n1", dirs[0].path());
    first.region = Some("near".into());
    first.latency_matrix = Some(matrix("far"));
    let n1 = Node::start(first).await.unwrap();
    let mut second = quiet("n2", dirs[1].path());
    second.region = Some("elsewhere".into());
    second.latency_matrix = Some(matrix("elsewhere"));
    second.seeds = vec![n1.addr()];
    second.join_timeout = Duration::from_secs(5);
    // Refused at once, not tried again until the join timeout.
    let refused = match Node::start(second).await {
        Ok(_) => panic!("joined from a region n1's matrix lacks"),
        Err(e @ ringkv_node::NodeError::JoinRefused { .. }) => e.to_string(),
        Err(e) => panic!("not refused: {e}"),
    };
    assert!(
        refused.contains("latency matrix lacks the joining node's --region"),
        "{refused}"
    );
    n1.shutdown().await;
}

/// A request on its way over an emulated link arrives even if its sender
/// gives up meanwhile, as on a real network: a W=1 put with a deadline
/// shorter than the link's one-way delay still reaches the far replica.
#[tokio::test]
async fn a_request_on_its_way_arrives_after_its_sender_gives_up() {
    let ([n1, n2], client, _dirs, _) = near_and_far(300, Duration::from_secs(5)).await;
    let mut quick = PutRequest::new(
        b"k".to_vec(),
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    quick.timeout_ms = 50;
    let answer = client.call(&Request::Put(quick)).await.unwrap();
    assert!(matches!(answer, Response::Put(_)), "{answer:?}");
    let to_n2 = Client::connect(n2.addr(), Duration::from_secs(5))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut local = ringkv_core::wire::GetRequest::new(b"k".to_vec(), Consistency::One);
        local.local = true;
        match to_n2.call(&Request::Get(local)).await.unwrap() {
            Response::Get(g) if !g.values.is_empty() => break,
            Response::Get(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the far replica never got the put its coordinator gave up on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    to_n2.close().await;
    n2.shutdown().await;
    n1.shutdown().await;
}
