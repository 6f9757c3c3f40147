//! What the client commands print: JSON for scripts, short lines for people.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ringkv_core::wire::{
    CleanupReport, GetReply, LeaveReply, NodeStatus, PeerFailure, PutReply, Receipt, RemoveReply,
    RepairReport, StatusReply,
};
use ringkv_core::NodeId;
use serde_json::{json, Value};

pub fn print_json(value: &Value) {
    outln!("{value}");
}

/// The quorum receipt: the coordinator and each replica's outcome and latency.
pub fn receipt_json(receipt: &Receipt) -> Value {
    json!({
        "coordinator": receipt.coordinator.as_ref().map(|c| c.to_string()),
        "replicas": receipt.replicas.iter().map(|r| {
            let mut o = json!({
                "id": r.node.to_string(),
                "outcome": r.outcome.as_str(),
                "latency_ms": r.latency_us as f64 / 1000.0,
            });
            if let Some(detail) = &r.detail {
                o["detail"] = json!(detail);
            }
            if let Some(owner) = &r.hint_for {
                o["hint_for"] = json!(owner.to_string());
            }
            o
        }).collect::<Vec<_>>(),
    })
}

fn receipt_line(receipt: &Receipt) -> String {
    let replicas: Vec<String> = receipt
        .replicas
        .iter()
        .map(|r| {
            let stand_in = match &r.hint_for {
                Some(owner) => format!(" (for {owner})"),
                None => String::new(),
            };
            format!(
                "{}{stand_in} {} {:.2} ms",
                r.node,
                r.outcome.as_str(),
                r.latency_us as f64 / 1000.0
            )
        })
        .collect();
    format!(
        "coordinator {}: {}",
        receipt
            .coordinator
            .as_ref()
            .map(|c| c.as_str())
            .unwrap_or("?"),
        replicas.join(", ")
    )
}

/// What a write stored: a value (`put`) or a tombstone (`delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Value,
    Tombstone,
}

/// Output of a successful put or delete.
pub fn written(reply: &PutReply, json: bool, what: Written) {
    // With siblings, the reply's context is the one the write was sent with
    // (it cannot cover values nobody read): given out, it would pass for one
    // that resolves them, and a script's next write would add a sibling.
    let context = (reply.siblings <= 1).then_some(&reply.context);
    // A delete's own tombstone is one of the key's versions; what a user
    // wants to know is how many it left besides (0: the key is gone). The
    // reply counts versions, not values: one left may be another delete's
    // tombstone, so the line says "versions".
    let (siblings, verb) = match what {
        Written::Value => (reply.siblings, "stored"),
        Written::Tombstone => (reply.siblings.saturating_sub(1), "deleted"),
    };
    if json {
        print_json(&json!({
            "context": context,
            "siblings": siblings,
            "receipt": receipt_json(&reply.receipt),
        }));
    } else {
        outln!("{verb} ({})", receipt_line(&reply.receipt));
        match (context, what) {
            (Some(context), _) => outln!("context: {context}"),
            (None, Written::Value) => outln!(
                "the key now has {siblings} concurrent values; get it to see them and for a context that resolves them"
            ),
            (None, Written::Tombstone) => outln!(
                "{siblings} concurrent version{} the delete did not see remain{} (values, or other deletes); get the key to see them and for a context that covers them",
                if siblings == 1 { "" } else { "s" },
                if siblings == 1 { "s" } else { "" },
            ),
        }
    }
}

/// `get --json`: values as UTF-8 strings, or all as base64 if any is not UTF-8.
pub fn get_json(reply: &GetReply) -> Value {
    let all_utf8 = reply.values.iter().all(|v| std::str::from_utf8(v).is_ok());
    let values: Vec<String> = reply
        .values
        .iter()
        .map(|v| {
            if all_utf8 {
                String::from_utf8_lossy(v).into_owned()
            } else {
                STANDARD.encode(v)
            }
        })
        .collect();
    let mut out = json!({
        "values": values,
        "context": reply.context,
        "receipt": receipt_json(&reply.receipt),
    });
    if !all_utf8 {
        out["encoding"] = json!("base64");
    }
    out
}

pub fn status(reply: &StatusReply, json: bool) {
    // A node that left, or was removed, still answers status, from the
    // record it was removed by: a list without itself.
    let member = reply.nodes.iter().any(|n| n.id == reply.node);
    if json {
        print_json(&json!({
            "node": reply.node.to_string(),
            "member": member,
            "replicas": reply.replicas,
            "nodes": reply.nodes.iter().map(|n| json!({
                "id": n.id.to_string(),
                "addr": n.addr,
                "state": if n.up { "up" } else { "down" },
                "region": n.region,
                "hints_pending": n.hints_pending,
                "last_exchange_unix_ms": n.last_exchange_unix_ms,
                "keys_repaired": n.keys_repaired,
                "leaving": n.leaving,
                "cleaning": n.cleaning,
            })).collect::<Vec<_>>(),
        }));
    } else {
        outln!("cluster seen from {} (N={})", reply.node, reply.replicas);
        if !member {
            outln!(
                "  {} is no longer a member (it left, or was removed): it serves no requests; stop its process",
                reply.node
            );
        }
        outln!(
            "  {:<12} {:<22} {:<7} {:<13} {:<19} keys repaired",
            "node",
            "address",
            "state",
            "hints pending",
            "last anti-entropy"
        );
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let known = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |h| h.to_string());
        for n in &reply.nodes {
            let last = match (n.last_exchange_unix_ms, n.keys_repaired) {
                (Some(t), _) => format!("{} s ago", now_ms.saturating_sub(t) / 1000),
                (None, Some(_)) => "never".to_string(),
                (None, None) => "?".to_string(),
            };
            outln!(
                "  {:<12} {:<22} {:<7} {:<13} {:<19} {}",
                n.id.as_str(),
                n.addr,
                state(n),
                known(n.hints_pending),
                last,
                known(n.keys_repaired),
            );
        }
    }
}

/// A member's state column: what the failure detector believes, and
/// whether the member said it is leaving.
fn state(n: &NodeStatus) -> &'static str {
    match (n.up, n.leaving, n.cleaning) {
        (false, _, _) => "down",
        (true, Some(true), _) => "leaving",
        (true, _, Some(true)) => "cleaning",
        (true, _, _) => "up",
    }
}

/// The answer to `ringkv remove`: the members left.
pub fn removed(node: &NodeId, reply: &RemoveReply, json: bool) {
    let record = &reply.record;
    let members: Vec<String> = record.members.iter().map(|m| m.id.to_string()).collect();
    if json {
        print_json(&json!({
            "removed": node.to_string(),
            "members": members,
            "replicas": record.replicas,
            "all_removed": record.removed.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "not_told": failures_json(&reply.not_told),
        }));
    } else {
        outln!(
            "{node} is removed; {} members remain: {}",
            members.len(),
            members.join(", ")
        );
        print_not_told(&reply.not_told);
        outln!("run `ringkv repair` on each of them to copy {node}'s keys to their new replicas");
    }
}

fn failures_json(failures: &[PeerFailure]) -> Vec<Value> {
    failures
        .iter()
        .map(|f| json!({"peer": f.peer.to_string(), "reason": f.reason}))
        .collect()
}

/// Members a removal could not be passed to.
fn print_not_told(not_told: &[PeerFailure]) {
    for f in not_told {
        outln!(
            "  {} not told ({}); it learns at its next membership exchange",
            f.peer,
            f.reason
        );
    }
}

/// `leave`: the keys handed over and the members left.
pub fn left(reply: &LeaveReply, json: bool) {
    let record = &reply.record;
    let members: Vec<String> = record.members.iter().map(|m| m.id.to_string()).collect();
    if json {
        print_json(&json!({
            "keys_handed_over": reply.keys,
            "members": members,
            "replicas": record.replicas,
            "not_told": failures_json(&reply.not_told),
            "late_failures": failures_json(&reply.late_failures),
        }));
        return;
    }
    outln!(
        "left the cluster: {} keys handed to their new replicas; {} members remain: {}",
        reply.keys,
        members.len(),
        members.join(", ")
    );
    print_not_told(&reply.not_told);
    let members_left: Vec<&NodeId> = reply.record.members.iter().map(|m| &m.id).collect();
    for f in &reply.late_failures {
        if members_left.contains(&&f.peer) {
            outln!(
                "  {} missed the writes that arrived during the hand-over ({}); anti-entropy copies them from the key's other replicas, \
                 but a write that only this node held was not handed over",
                f.peer, f.reason
            );
        } else {
            // The leaving node's own note.
            outln!("  {}: {}", f.peer, f.reason);
        }
    }
    if reply.late_failures.is_empty() {
        outln!("stop the node's process; its data dir can then be deleted");
    } else {
        outln!("stop the node's process");
    }
}

/// `repair`: what one anti-entropy round did.
pub fn repair(report: &RepairReport, json: bool) {
    let finished = report.peers_finished;
    if json {
        print_json(&json!({
            "peers": report.peers,
            "peers_finished": finished,
            "keys_compared": report.keys_compared,
            "keys_repaired": report.keys_repaired,
            "bytes_sent": report.bytes_sent,
            "bytes_received": report.bytes_received,
            "duration_ms": report.duration_ms,
            "failures": failures_json(&report.failures),
        }));
    } else {
        outln!(
            "compared {} keys with {finished} of {} peers in {} ms: {} repaired, {} bytes sent, {} received",
            report.keys_compared,
            report.peers,
            report.duration_ms,
            report.keys_repaired,
            report.bytes_sent,
            report.bytes_received
        );
        for f in &report.failures {
            outln!("  {} not compared: {}", f.peer, f.reason);
        }
    }
}

/// `cleanup`: the stray copies a node removed and kept.
pub fn cleaned(report: &CleanupReport, json: bool) {
    if json {
        print_json(&json!({
            "keys_scanned": report.keys_scanned,
            "stray_keys": report.stray_keys,
            "removed": report.removed,
            "kept": report.kept,
            "duration_ms": report.duration_ms,
            "failures": failures_json(&report.failures),
        }));
        return;
    }
    outln!(
        "read {} keys in {} ms: {} are not this node's to replicate; {} removed, {} kept",
        report.keys_scanned,
        report.duration_ms,
        report.stray_keys,
        report.removed,
        report.kept
    );
    for f in &report.failures {
        outln!("  {} could not be asked: {}", f.peer, f.reason);
    }
    if report.kept > 0 {
        outln!(
            "kept copies are held by no replica that answered (or changed while checked){}",
            if report.failures.is_empty() {
                ": each is a write only this node received, or a value deleted since; the node's log names the first few"
            } else {
                "; run it again once every replica is up"
            }
        );
    }
}

/// How much of an unexpected answer an error shows.
pub const ANSWER_SHOWN_CHARS: usize = 120;

/// `value`'s `Debug` text, at most `max_chars` of it (then `…`), formatted
/// no further than that: an unexpected answer may hold a whole value.
pub fn debug_capped(value: &impl std::fmt::Debug, max_chars: usize) -> String {
    struct Capped {
        text: String,
        room: usize,
        cut: bool,
    }
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for c in s.chars() {
                if self.room == 0 {
                    self.cut = true;
                    // Stops the formatting: the rest is not wanted.
                    return Err(std::fmt::Error);
                }
                self.text.push(c);
                self.room -= 1;
            }
            Ok(())
        }
    }
    let mut capped = Capped {
        text: String::new(),
        room: max_chars,
        cut: false,
    };
    let _ = std::fmt::Write::write_fmt(&mut capped, format_args!("{value:?}"));
    if capped.cut {
        capped.text.push('…');
    }
    capped.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_shows_as_leaving_or_cleaning_only_while_up_and_saying_so() {
        let node = |up, leaving, cleaning| NodeStatus {
            id: NodeId::new("n1").unwrap(),
            addr: "127.0.0.1:7000".into(),
            up,
            region: None,
            vnodes: 64,
            hints_pending: None,
            last_exchange_unix_ms: None,
            keys_repaired: None,
            leaving,
            cleaning,
        };
        assert_eq!(state(&node(true, Some(true), Some(false))), "leaving");
        assert_eq!(state(&node(true, Some(false), Some(false))), "up");
        assert_eq!(state(&node(true, None, None)), "up");
        assert_eq!(state(&node(false, Some(true), None)), "down");
        assert_eq!(state(&node(true, Some(false), Some(true))), "cleaning");
        assert_eq!(state(&node(false, None, Some(true))), "down");
    }

    /// A long answer is cut (and says so); a short one is whole.
    #[test]
    fn debug_text_is_capped() {
        let long = vec![7u8; 100_000];
        let text = debug_capped(&long, 10);
        assert_eq!(text, "[7, 7, 7, …");
        assert_eq!(debug_capped(&"ok", 10), "\"ok\"");
    }
}
