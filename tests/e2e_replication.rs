//! Three real nodes: every consistency level, siblings, contexts, deletes.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn put_get_delete_at_every_r_and_w() {
    let c = Cluster::start("put_get_delete_at_every_r_and_w", 3, 3, &[]);
    for w in 1..=3 {
        for r in 1..=3 {
            let key = format!("k-w{w}-r{r}");
            let (w, r) = (w.to_string(), r.to_string());
            let put = c.cli(0, &["put", &key, "hello", "-w", &w, "--json"]);
            assert_exit(&put, 0);
            let receipt = &json(&put)["receipt"];
            assert!(receipt["coordinator"].is_string());
            assert!(receipt["replicas"].as_array().unwrap().len() >= w.parse::<usize>().unwrap());
            // R + W > N must see the write at once; otherwise the read may
            // race the replication, so poll: it must converge.
            let read = || c.cli(1, &["get", &key, "-r", &r, "--json"]);
            let get = if w.parse::<usize>().unwrap() + r.parse::<usize>().unwrap() > 3 {
                read()
            } else {
                let mut last = read();
                eventually(Duration::from_secs(10), "a weak read converges", || {
                    last = read();
                    last.status.code() == Some(0)
                });
                last
            };
            assert_exit(&get, 0);
            assert_eq!(values(&get), ["hello"], "w={w} r={r}");
            let del = c.cli(
                2,
                &[
                    "delete",
                    &key,
                    "-w",
                    &w,
                    "--context",
                    &context(&get),
                    "--json",
                ],
            );
            assert_exit(&del, 0);
            // Read at R=3 so the check does not depend on which replicas W reached.
            let gone = c.cli(0, &["get", &key, "-r", "3", "--json"]);
            assert_exit(&gone, 1);
            assert_eq!(json(&gone)["values"].as_array().unwrap().len(), 0);
        }
    }
}

#[test]
fn blind_writes_become_siblings_and_a_context_resolves_them() {
    let c = Cluster::start("blind_writes_become_siblings", 3, 3, &[]);
    assert_exit(&c.cli(0, &["put", "cart", "milk", "-w", "all"]), 0);
    assert_exit(&c.cli(1, &["put", "cart", "eggs", "-w", "all"]), 0);
    let get = c.cli(2, &["get", "cart", "--json"]);
    assert_exit(&get, 0);
    assert_eq!(values(&get), ["eggs", "milk"]);

    let put = c.cli(
        2,
        &["put", "cart", "milk,eggs", "--context", &context(&get)],
    );
    assert_exit(&put, 0);
    let get = c.cli(0, &["get", "cart", "-r", "all", "--json"]);
    assert_eq!(values(&get), ["milk,eggs"]);

    let del = c.cli(1, &["delete", "cart", "--context", &context(&get)]);
    assert_exit(&del, 0);
    let gone = c.cli(2, &["get", "cart", "-r", "all"]);
    assert_exit(&gone, 1);
    assert!(stderr(&gone).contains("not found"));
}

#[test]
fn delete_without_context_removes_what_a_quorum_read_sees() {
    let c = Cluster::start("delete_without_context", 3, 3, &[]);
    assert_exit(&c.cli(0, &["put", "k", "a", "-w", "all"]), 0);
    assert_exit(&c.cli(1, &["put", "k", "b", "-w", "all"]), 0);
    assert_exit(&c.cli(2, &["delete", "k", "-w", "all"]), 0);
    assert_exit(&c.cli(0, &["get", "k", "-r", "all"]), 1);
    // Again: the read sees the tombstone, and the delete spreads it (a
    // retry after a delete stored on too few replicas must).
    assert_exit(&c.cli(1, &["delete", "k", "-w", "all"]), 0);
    // A key never written: nothing seen, nothing written (a tombstone
    // would change the key's context).
    let before = context(&c.cli(0, &["get", "never-written", "-r", "all", "--json"]));
    let again = c.cli(1, &["delete", "never-written", "-w", "all", "--json"]);
    assert_exit(&again, 1);
    assert_eq!(json(&again)["values"], serde_json::json!([]));
    let human = c.cli(1, &["delete", "never-written"]);
    assert_exit(&human, 1);
    assert!(
        stderr(&human).contains("nothing was written"),
        "{}",
        stderr(&human)
    );
    let after = c.cli(0, &["get", "never-written", "-r", "all", "--json"]);
    assert_exit(&after, 1);
    assert_eq!(context(&after), before);
}

#[test]
fn values_are_binary_safe_through_stdin() {
    let c = Cluster::start("values_are_binary_safe", 3, 3, &[]);
    let value: Vec<u8> = (0..=255u8).chain([0, 0xff, 0xfe]).collect();
    assert_exit(&c.cli_stdin(0, &["put", "bin", "-"], &value), 0);
    // Raw output of a single value is exactly the bytes written.
    let raw = c.cli(1, &["get", "bin"]);
    assert_exit(&raw, 0);
    assert_eq!(raw.stdout, value);
    let j = json(&c.cli(2, &["get", "bin", "--json"]));
    assert_eq!(j["encoding"], "base64");
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(j["values"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, value);
}

#[test]
fn status_lists_every_member_as_up() {
    let c = Cluster::start("status_lists_every_member", 3, 3, &[]);
    let s = json(&c.cli(1, &["status", "--json"]));
    assert_eq!(s["replicas"], 3);
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3);
    // A first probe may include a QUIC handshake; poll rather than race it.
    c.eventually(Duration::from_secs(10), "every member up", || {
        let s = json(&c.cli(1, &["status", "--json"]));
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "up")
    });
}
