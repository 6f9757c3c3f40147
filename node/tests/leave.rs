//! `ringkv leave`: a live node hands every key it replicates to the
//! replicas that take over its ranges before a member removes it, so even a
//! write that it alone held survives; it leaves behind the stray copies it
//! does not replicate; and it refuses to leave when that cannot be done
//! safely.

use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::Consistency;
use ringkv_node::{Client, Node, NodeError};

mod support;
use support::*;

/// The keys the node `client` is connected to has sent on a leave so far.
async fn leave_keys_sent(client: &Client) -> u64 {
    match client.call(&Request::Stats).await.unwrap() {
        Response::Stats(s) => s.leave_keys_sent,
        other => panic!("{other:?}"),
    }
}

async fn leave(client: &Client) -> Response {
    client.call(&Request::Leave).await.unwrap()
}

/// Five nodes and N=2, so that placement matters: n5 leaves, and each of
/// its keys must end up on exactly the replicas the ring without n5 gives.
#[tokio::test]
async fn a_leaving_node_hands_its_keys_to_the_replicas_that_take_its_ranges() {
    let dirs = data_dirs(5);
    let mut nodes = start(&dirs, 2).await;
    let (before, after) = (
        ring(&["n1", "n2", "n3", "n4", "n5"], 2),
        ring(&["n1", "n2", "n3", "n4"], 2),
    );
    let replicates = |key: &str| before.preference_list(key.as_bytes()).contains(&id("n5"));
    let shared: Vec<String> = (0..60).map(|i| format!("shared{i}")).collect();
    let c1 = client(&nodes[0]).await;
    put_all(&c1, &shared).await;
    // Keys that only n5 holds though it replicates them (a W=1 write), and
    // one it holds though it does not (a stray copy from an older ring).
    let solo: Vec<String> = (0..200)
        .map(|i| format!("solo{i}"))
        .filter(|k| replicates(k))
        .take(20)
        .collect();
    let stray = (0..)
        .map(|i| format!("stray{i}"))
        .find(|k| !replicates(k))
        .unwrap();
    let c5 = client(&nodes[4]).await;
    for key in solo.iter().chain([&stray]) {
        store_only_here(&c5, key).await;
    }

    assert_eq!(leave_keys_sent(&c5).await, 0, "not asked to leave yet");
    let reply = match leave(&c5).await {
        Response::Left(reply) => reply,
        other => panic!("{other:?}"),
    };
    let expected = shared.iter().filter(|k| replicates(k)).count() + solo.len();
    assert_eq!(reply.keys, expected as u64, "{reply:?}");
    // Its progress (for the CLI): the first pass, and the last one again.
    assert_eq!(leave_keys_sent(&c5).await, 2 * reply.keys);
    assert!(reply.late_failures.is_empty(), "{reply:?}");
    let members: Vec<&str> = reply.record.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(members, ["n1", "n2", "n3", "n4"]);

    // Every key n5 replicated is on each of its replicas under the new ring.
    let clients = [
        client(&nodes[0]).await,
        client(&nodes[1]).await,
        client(&nodes[2]).await,
        client(&nodes[3]).await,
    ];
    for key in solo.iter().chain(shared.iter().filter(|k| replicates(k))) {
        for replica in after.preference_list(key.as_bytes()).replicas {
            let i = replica.as_str()[1..].parse::<usize>().unwrap() - 1;
            assert!(
                held_locally(&clients[i], key).await,
                "{replica} lacks {key}"
            );
        }
    }
    // The stray copy stayed behind.
    for c in &clients {
        assert!(!held_locally(c, &stray).await, "{stray} was handed over");
    }
    // n5 serves no more but answers status; the others know it left.
    let put = PutRequest::new(
        "late",
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    match c5.call(&Request::Put(put)).await.unwrap() {
        Response::Error(e) => assert!(e.message.contains("removed"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c5.call(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    match c1.call(&Request::Status).await.unwrap() {
        Response::Status(s) => assert_eq!(s.nodes.len(), 4, "{s:?}"),
        other => panic!("{other:?}"),
    }
    for c in clients.into_iter().chain([c1, c5]) {
        c.close().await;
    }
    // Started again, it refuses.
    nodes.pop().unwrap().shutdown().await;
    let e = Node::start(config("n5", dirs[4].path(), 2))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, NodeError::Removed { .. }), "{e:?}");
    for node in nodes {
        node.shutdown().await;
    }
}

/// A leave whose removal no member confirms in time (here the node waits
/// for no answer at all, as if every one were lost) looks for the removal
/// itself: the members did remove it, so it goes on to its last pass and
/// answers as a leave that was confirmed. Before, it gave up and stopped at
/// the next membership exchange, leaving the writes that came in after its
/// first pass behind. (A zero wait ends at tokio's next timer tick, about
/// 1 ms; a member's answer takes its two fsyncs and those of the members
/// it tells first, so it comes later.)
#[tokio::test]
async fn a_leave_whose_removal_is_not_confirmed_finishes_once_it_finds_it() {
    let dirs = data_dirs(4);
    let mut nodes = start(&dirs[..3], 2).await;
    let mut leaver = config("n4", dirs[3].path(), 2);
    leaver.seeds = vec![nodes[0].addr()];
    leaver.removal_timeout = Duration::ZERO;
    nodes.push(Node::start(leaver).await.unwrap());
    let (before, after) = (
        ring(&["n1", "n2", "n3", "n4"], 2),
        ring(&["n1", "n2", "n3"], 2),
    );
    let solo: Vec<String> = (0..200)
        .map(|i| format!("solo{i}"))
        .filter(|k| before.preference_list(k.as_bytes()).contains(&id("n4")))
        .take(10)
        .collect();
    let c4 = client(&nodes[3]).await;
    for key in &solo {
        store_only_here(&c4, key).await;
    }

    let reply = match leave(&c4).await {
        Response::Left(reply) => reply,
        other => panic!("{other:?}"),
    };
    assert_eq!(reply.keys, solo.len() as u64, "{reply:?}");
    // The last pass ran: every key went twice.
    assert_eq!(leave_keys_sent(&c4).await, 2 * reply.keys);
    assert!(reply.late_failures.is_empty(), "{reply:?}");
    let members: Vec<&str> = reply.record.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(members, ["n1", "n2", "n3"]);
    assert!(reply.record.removed.contains(&id("n4")), "{reply:?}");
    assert!(stats(&c4).await.removed);
    let clients = [
        client(&nodes[0]).await,
        client(&nodes[1]).await,
        client(&nodes[2]).await,
    ];
    for key in &solo {
        for replica in after.preference_list(key.as_bytes()).replicas {
            let i = replica.as_str()[1..].parse::<usize>().unwrap() - 1;
            assert!(
                held_locally(&clients[i], key).await,
                "{replica} lacks {key}"
            );
        }
    }
    for c in clients.into_iter().chain([c4]) {
        c.close().await;
    }
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn leaving_is_refused_below_n_and_while_a_member_is_down() {
    let dirs = data_dirs(4);
    let mut nodes = start(&dirs[..3], 3).await;
    let c3 = client(&nodes[2]).await;
    match leave(&c3).await {
        Response::Error(e) => assert!(e.message.contains("fewer than N=3"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    c3.close().await;

    let mut c = config("n4", dirs[3].path(), 3);
    c.seeds = vec![nodes[0].addr()];
    nodes.push(Node::start(c).await.unwrap());
    let c1 = client(&nodes[0]).await;
    put_all(&c1, &(0..20).map(|i| format!("k{i}")).collect::<Vec<_>>()).await;
    c1.close().await;
    // With n2 down, n4 cannot learn whether n2 is leaving too (and the
    // keys it must hand to n2 would have nowhere to go): the leave is
    // refused before anything is handed over, and n4 stays a member.
    nodes.remove(1).shutdown().await;
    let c4 = client(&nodes[2]).await;
    match leave(&c4).await {
        Response::Error(e) => {
            assert!(
                e.message
                    .contains("could not check that no other member is leaving (n2:"),
                "{e:?}"
            );
            assert!(e.message.contains("nothing was handed over"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(leave_keys_sent(&c4).await, 0);
    let put = PutRequest::new(
        "after",
        Payload::Value(b"v".to_vec()),
        Consistency::One,
        None,
    );
    assert!(matches!(
        c4.call(&Request::Put(put)).await.unwrap(),
        Response::Put(_)
    ));
    match c4.call(&Request::Status).await.unwrap() {
        Response::Status(s) => assert_eq!(s.nodes.len(), 4, "{s:?}"),
        other => panic!("{other:?}"),
    }
    c4.close().await;
    for node in nodes {
        node.shutdown().await;
    }
}

/// Hints a node holds for a member that is down would leave with it.
#[tokio::test]
async fn a_node_holding_hints_is_refused() {
    let dirs = data_dirs(4);
    let mut nodes = start(&dirs, 2).await;
    nodes.pop().unwrap().shutdown().await;
    let c1 = client(&nodes[0]).await;
    // W=all with n4 down: each of n4's writes goes to a fallback as a hint.
    put_all(&c1, &(0..40).map(|i| format!("h{i}")).collect::<Vec<_>>()).await;
    c1.close().await;
    let mut refused = 0;
    for node in &nodes {
        let c = client(node).await;
        let held = match c.call(&Request::Stats).await.unwrap() {
            Response::Stats(s) => s.hints_pending,
            other => panic!("{other:?}"),
        };
        if held > 0 {
            match leave(&c).await {
                Response::Error(e) => {
                    assert!(
                        e.message.contains("hints for members that are down"),
                        "{e:?}"
                    );
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        c.close().await;
    }
    assert!(refused > 0, "no node held a hint");
    for node in nodes {
        node.shutdown().await;
    }
}

/// Writes that reach the leaving node while it hands over its keys (here:
/// merges sent to it alone, as a W=1 write it coordinates would be) are
/// either refused, once it has stopped serving, or handed over too: the
/// first pass reads the store as it was when it began, so the last pass
/// must carry the rest. Every write it accepted ends up on its new replicas.
#[tokio::test]
async fn writes_that_arrive_during_a_leave_are_handed_over_too() {
    let dirs = data_dirs(4);
    let nodes = start(&dirs, 2).await;
    let before = ring(&["n1", "n2", "n3", "n4"], 2);
    let after = ring(&["n1", "n2", "n3"], 2);
    // Enough keys that the first pass takes a while.
    let c1 = client(&nodes[0]).await;
    put_all(
        &c1,
        &(0..1500).map(|i| format!("pre{i}")).collect::<Vec<_>>(),
    )
    .await;
    c1.close().await;

    let (done_tx, done) = tokio::sync::watch::channel(false);
    let writer = {
        let addr = nodes[3].addr();
        let replicates = move |k: &str| before.preference_list(k.as_bytes()).contains(&id("n4"));
        tokio::spawn(async move {
            let c = Client::connect(addr, TIMEOUT).await.unwrap();
            // Keys accepted, and how many of them after the first pass
            // had begun sending (the others the first pass may carry).
            let (mut accepted, mut after_pass_began) = (Vec::new(), 0);
            let mut began = false;
            for i in 0.. {
                if *done.borrow() {
                    break;
                }
                let key = format!("during{i}");
                if !replicates(&key) {
                    continue;
                }
                began = began
                    || matches!(c.call(&Request::Stats).await, Ok(Response::Stats(s)) if s.leave_keys_sent > 0);
                if let Ok(Response::Clock(None)) = c.call(&merge_here(&key)).await {
                    accepted.push(key);
                    after_pass_began += usize::from(began);
                }
            }
            c.close().await;
            (accepted, after_pass_began)
        })
    };
    let c4 = client(&nodes[3]).await;
    let reply = leave(&c4).await;
    done_tx.send_replace(true);
    let (accepted, after_pass_began) = writer.await.unwrap();
    assert!(
        matches!(reply, Response::Left(ref r) if r.late_failures.is_empty()),
        "{reply:?}"
    );
    assert!(
        after_pass_began > 0,
        "no write reached n4 once its first pass was under way ({} before)",
        accepted.len()
    );
    let clients = [
        client(&nodes[0]).await,
        client(&nodes[1]).await,
        client(&nodes[2]).await,
    ];
    for key in &accepted {
        for replica in after.preference_list(key.as_bytes()).replicas {
            let i = replica.as_str()[1..].parse::<usize>().unwrap() - 1;
            assert!(
                held_locally(&clients[i], key).await,
                "{replica} lacks {key}, which n4 accepted during its leave ({} accepted)",
                accepted.len()
            );
        }
    }
    for c in clients.into_iter().chain([c4]) {
        c.close().await;
    }
    for node in nodes {
        node.shutdown().await;
    }
}

async fn stats(client: &Client) -> ringkv_core::wire::NodeStats {
    match client.call(&Request::Stats).await.unwrap() {
        Response::Stats(s) => s,
        other => panic!("{other:?}"),
    }
}

/// Two leaves at once could together leave keys on fewer than N replicas,
/// and each pass the "at least N members" check: five nodes and N=3, so
/// that without the check both would succeed. Started together, at least
/// one is refused, naming the other; one after the other, both succeed.
#[tokio::test]
async fn members_leave_one_at_a_time() {
    let dirs = data_dirs(5);
    let nodes = start(&dirs, 3).await;
    // Enough keys that a hand-over outlasts the other leave's check.
    let c1 = client(&nodes[0]).await;
    put_all(&c1, &(0..1500).map(|i| format!("k{i}")).collect::<Vec<_>>()).await;
    let (c4, c5) = (client(&nodes[3]).await, client(&nodes[4]).await);
    assert!(!stats(&c4).await.leaving);
    let (r4, r5) = tokio::join!(leave(&c4), leave(&c5));
    let mut refused = Vec::new();
    for (me, other, reply, c) in [("n4", "n5", &r4, &c4), ("n5", "n4", &r5, &c5)] {
        match reply {
            Response::Left(_) => {
                let after = stats(c).await;
                assert!(after.removed && !after.leaving, "{me} left: {after:?}");
            }
            Response::Error(e) => {
                // Refused before it handed anything over: the other was
                // leaving, or (had this request come late) had just left.
                assert!(
                    e.message
                        .contains(&format!("{me} cannot leave while {other} is leaving too"))
                        || e.message.contains(&format!("{other} left the cluster")),
                    "{e:?}"
                );
                let after = stats(c).await;
                assert!(!after.leaving, "{me}'s refused leave is over");
                assert_eq!(after.leave_keys_sent, 0, "{me} handed keys over");
                refused.push((me, c));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "both leaves went ahead together: {r4:?} {r5:?}"
    );
    // Once the other has left (or was refused too), each leaves in turn:
    // at once, or as soon as it has learned of the other's removal.
    for (me, c) in refused {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match leave(c).await {
                Response::Left(_) => break,
                Response::Error(e)
                    if e.message.contains("left the cluster")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => panic!("{me}'s second leave: {other:?}"),
            }
        }
    }
    // The members that stay, none of them leaving (once each answers).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = match c1.call(&Request::Status).await.unwrap() {
            Response::Status(s) => s,
            other => panic!("{other:?}"),
        };
        let ids: Vec<&str> = status.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["n1", "n2", "n3"], "{status:?}");
        if status.nodes.iter().all(|n| n.leaving == Some(false)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in [c1, c4, c5] {
        c.close().await;
    }
    for node in nodes {
        node.shutdown().await;
    }
}
