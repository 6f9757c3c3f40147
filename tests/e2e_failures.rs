//! Crashes: kill -9 of one node, then of every node.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn one_node_killed_quorum_succeeds_and_all_fails_with_exit_3() {
    let mut c = Cluster::start("one_node_killed", 3, 3, &[]);
    assert_exit(&c.cli(0, &["put", "before", "v"]), 0);
    c.kill(2);

    let put = c.cli(0, &["put", "k", "v", "-w", "quorum", "--json"]);
    assert_exit(&put, 0);
    let get = c.cli(1, &["get", "k", "-r", "quorum", "--json"]);
    assert_exit(&get, 0);
    assert_eq!(values(&get), ["v"]);

    let all = c.cli(0, &["put", "k2", "v", "-w", "all", "--timeout-ms", "1000"]);
    assert_exit(&all, 3);
    let msg = stderr(&all);
    assert!(
        msg.starts_with("error: write quorum not reached: 2 of 3 required replicas answered"),
        "{msg}"
    );
    assert!(msg.contains("n3"), "names the failed replica: {msg}");
    assert!(msg.contains("not rolled back"), "{msg}");

    let all = c.cli(1, &["get", "before", "-r", "all", "--timeout-ms", "1000"]);
    assert_exit(&all, 3);
    let msg = stderr(&all);
    assert!(
        msg.starts_with("error: read quorum not reached: 2 of 3"),
        "{msg}"
    );

    // The failure detector needs a moment; the issue allows 5 s.
    c.eventually(Duration::from_secs(5), "n3 seen as down", || {
        c.state_seen_by(0, "n3") == "down"
    });
}

#[test]
fn every_node_killed_after_write_all_restarts_with_every_value() {
    let mut c = Cluster::start("every_node_killed", 3, 3, &[]);
    let keys: Vec<String> = (0..40).map(|i| format!("durable-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        assert_exit(
            &c.cli(i % 3, &["put", key, &format!("value-{i}"), "-w", "all"]),
            0,
        );
    }
    for i in 0..3 {
        c.kill(i);
    }
    // No seeds on restart: each node remembers the cluster. Start them all
    // before reading, in reverse order for good measure.
    for i in (0..3).rev() {
        c.restart(i);
    }
    for (i, key) in keys.iter().enumerate() {
        let expected = format!("value-{i}");
        for node in 0..3 {
            let local = c.cli(node, &["get", key, "--local", "--json"]);
            assert_exit(&local, 0);
            assert_eq!(
                values(&local),
                vec![expected.as_str()],
                "{key} on n{}",
                node + 1
            );
        }
    }
    // And the restarted cluster serves quorum requests again.
    c.eventually(Duration::from_secs(20), "quorum read after restart", || {
        c.cli(1, &["get", "durable-0", "-r", "all"]).status.code() == Some(0)
    });
    assert_exit(&c.cli(2, &["put", "after-restart", "v", "-w", "all"]), 0);

    // The machine did not restart, so every run kept its epoch: a key
    // written again through the node that wrote it before continues that
    // node's actor instead of adding one (which a new epoch per crash did,
    // until a hot key's clock was full).
    let rewrite = |c: &Cluster, value: &str| {
        assert_exit(
            &c.cli(0, &["put", &keys[0], value, "--overwrite", "-w", "all"]),
            0,
        );
        let read = c.cli(0, &["get", &keys[0], "-r", "all", "--json"]);
        assert_exit(&read, 0);
        assert_eq!(values(&read), vec![value]);
        ringkv_core::context::CausalContext::decode(&context(&read))
            .unwrap()
            .version_vector
    };
    let actors = rewrite(&c, "again");
    assert_eq!(actors.len(), 1, "one actor, n1's: {actors:?}");

    // A data dir restored from a copy is started with --new-epoch: n1's
    // next write of the key is under a new actor.
    c.kill(0);
    c.nodes[0].extra.push("--new-epoch".into());
    c.restart(0);
    let actors = rewrite(&c, "restored");
    assert_eq!(actors.len(), 2, "a new actor of n1: {actors:?}");
}
