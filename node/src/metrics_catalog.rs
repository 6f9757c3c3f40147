//! Every metric a node exports, named and explained in one place.
//!
//! The counters are spread over `node`, `coordinator` and `repair`, each
//! bumped where its event happens. Prometheus sees a series only once it
//! is first written, so a counter whose event has not happened yet (a shed
//! request, a refused late forward) would be missing from `/metrics`
//! rather than 0: `rate()` over it is empty instead of zero, and an alert
//! on `increase(ringkv_requests_shed_total[5m]) > 0` cannot tell "never"
//! from "not exported". [`describe_all`] therefore gives every metric its
//! `# HELP` text and registers every series whose labels are known ahead
//! (a fixed set of outcomes, say; not the per-peer `target` of hints):
//! counters at 0, histograms with no observations (a count of 0), and
//! the gauges whose value at start is 0 (no connection open, no repair
//! queued). A gauge whose first value is computed (hint bytes read from
//! disk, say) is not started at 0: until it is set it would say 0 where
//! the truth is unknown.
//!
//! Invariant: [`METRICS`] names exactly the metrics the code writes; a test
//! reads the workspace's sources and fails on one missing or stale here.

use metrics::Unit;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric, as `/metrics` explains it.
#[derive(Debug)]
pub struct MetricDoc {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    /// The label sets registered at start (one empty set for an
    /// unlabelled metric; none where the labels are only known at run
    /// time, or, for a gauge, where 0 is not its value at start): a
    /// counter or gauge at 0, a histogram empty.
    pub zeroed: &'static [&'static [(&'static str, &'static str)]],
}

use MetricKind::{Counter, Gauge, Histogram};

const UNLABELLED: &[&[(&str, &str)]] = &[&[]];
const RUNTIME_LABELS: &[&[(&str, &str)]] = &[];

const fn counter(name: &'static str, help: &'static str) -> MetricDoc {
    labelled(name, help, UNLABELLED)
}

const fn labelled(
    name: &'static str,
    help: &'static str,
    zeroed: &'static [&'static [(&'static str, &'static str)]],
) -> MetricDoc {
    MetricDoc {
        name,
        kind: Counter,
        unit: None,
        help,
        zeroed,
    }
}

const fn gauge(name: &'static str, unit: Option<Unit>, help: &'static str) -> MetricDoc {
    unzeroed(Gauge, name, unit, help)
}

/// A gauge that is 0 when the node starts (nothing open, nothing queued),
/// exported as 0 until it is first set.
const fn gauge_from_zero(name: &'static str, unit: Option<Unit>, help: &'static str) -> MetricDoc {
    MetricDoc {
        zeroed: UNLABELLED,
        ..unzeroed(Gauge, name, unit, help)
    }
}

/// A histogram exported (empty) from the start, with each of `labels`.
const fn histogram_from_start(
    name: &'static str,
    unit: Option<Unit>,
    help: &'static str,
    labels: &'static [&'static [(&'static str, &'static str)]],
) -> MetricDoc {
    MetricDoc {
        zeroed: labels,
        ..unzeroed(Histogram, name, unit, help)
    }
}

/// A gauge or histogram registered when first written.
const fn unzeroed(
    kind: MetricKind,
    name: &'static str,
    unit: Option<Unit>,
    help: &'static str,
) -> MetricDoc {
    MetricDoc {
        name,
        kind,
        unit,
        help,
        zeroed: RUNTIME_LABELS,
    }
}

macro_rules! ops_by_result {
    ($($op:literal),*) => {
        &[$(
            &[("op", $op), ("result", "ok")],
            &[("op", $op), ("result", "quorum_failed")],
            &[("op", $op), ("result", "invalid")],
            &[("op", $op), ("result", "error")],
        )*]
    };
}

/// Every metric, by subsystem.
pub const METRICS: &[MetricDoc] = &[
    // Requests this node coordinated.
    labelled(
        "ringkv_requests_total",
        "Client requests this node answered, by op (put, get, delete) and result (ok, quorum_failed, invalid, error); one it forwarded to a replica counts here and again where it was taken.",
        ops_by_result!("put", "get", "delete"),
    ),
    histogram_from_start(
        "ringkv_request_seconds",
        Some(Unit::Seconds),
        "Time to answer a client request, by op (forwarded ones included, as in ringkv_requests_total).",
        &[&[("op", "put")], &[("op", "get")], &[("op", "delete")]],
    ),
    counter(
        "ringkv_requests_shed_total",
        "Requests answered \"overloaded\" unrun: the node's request memory (--max-request-memory-mb) was full, or the connection's share of it, or the share large requests may take.",
    ),
    labelled(
        "ringkv_requests_unsent_total",
        "Requests to a peer not sent, so not run, by reason (queue_full: its send queue was full).",
        &[&[("reason", "queue_full")]],
    ),
    counter(
        "ringkv_requests_from_removed_total",
        "Replica requests refused because their sender was removed from the cluster.",
    ),
    labelled(
        "ringkv_stand_in_coordinations_total",
        "Requests this node coordinated as the stand-in of an owner it believed down, by op.",
        &[&[("op", "put")], &[("op", "delete")], &[("op", "get")]],
    ),
    labelled(
        "ringkv_spare_reads_total",
        "Reads sent to a spare replica beyond the first R, by reason (failure, silent, late).",
        &[
            &[("reason", "failure")],
            &[("reason", "silent")],
            &[("reason", "late")],
        ],
    ),
    counter(
        "ringkv_reads_retried_here_total",
        "Reads forwarded to a replica that could not reach R, asked again from this node.",
    ),
    counter(
        "ringkv_direct_reads_total",
        "Legs of client-driven reads this node answered with its own copy, as one of the key's replicas.",
    ),
    counter(
        "ringkv_direct_reads_refused_total",
        "Legs of client-driven reads refused: this node is not one of the key's replicas under its ring.",
    ),
    counter(
        "ringkv_held_back_owners_asked_total",
        "Owners held back from a request (believed down) asked after all, their stand-in having failed.",
    ),
    counter(
        "ringkv_late_stand_ins_total",
        "Stand-ins asked after a write's quorum to hold a hint for an owner that failed.",
    ),
    counter(
        "ringkv_late_hint_tasks_skipped_total",
        "Writes that left owners failing after the quorum unhinted (too many such tasks running): read repair covers them.",
    ),
    counter(
        "ringkv_forward_failures_total",
        "Requests passed on (to a replica of the key, or as a stand-in) that no node took.",
    ),
    counter(
        "ringkv_forwards_refused_late_total",
        "Forwarded puts refused unrun because they arrived after their forwarder had moved on.",
    ),
    // What this node stores.
    counter(
        "ringkv_handoffs_refused_total",
        "Hints handed to this node for keys its ring does not place on it, refused.",
    ),
    counter(
        "ringkv_merges_refused_total",
        "Keys of a sync batch (anti-entropy, leave, ring hand-over) refused because their merge would break a limit (size, actors, siblings).",
    ),
    counter(
        "ringkv_corrupt_versions_refused_total",
        "Corrupt stored versions refused, not set aside: this run set aside as many as it may.",
    ),
    counter(
        "ringkv_corrupt_versions_set_aside_total",
        "Corrupt stored versions set aside, for a replica's copy to replace.",
    ),
    counter(
        "ringkv_corrupt_keys_skipped_total",
        "Keys a scan (leave, cleanup, hand-over) skipped because their stored versions are corrupt.",
    ),
    counter(
        "ringkv_write_stalls_total",
        "Writes held back by a RocksDB write stall.",
    ),
    counter(
        "ringkv_wal_flushes_total",
        "Group-commit flushes of the write-ahead log.",
    ),
    histogram_from_start(
        "ringkv_wal_flush_writes",
        None,
        "Writes whose log records one group-commit flush handed to the kernel.",
        UNLABELLED,
    ),
    gauge(
        "ringkv_background_priority_low",
        None,
        "1 when RocksDB's flushes and compactions run at the lowest CPU priority.",
    ),
    // Connections and frames.
    gauge_from_zero(
        "ringkv_connections",
        None,
        "Open QUIC connections from clients and peers.",
    ),
    counter(
        "ringkv_connections_refused_total",
        "Incoming connections refused at once: at --max-connections, or their address holding its share of it.",
    ),
    counter(
        "ringkv_connections_retried_total",
        "Incoming connections asked to prove their address first (QUIC retry).",
    ),
    counter(
        "ringkv_handshakes_timed_out_total",
        "Incoming connections dropped because their handshake did not finish in time.",
    ),
    counter(
        "ringkv_malformed_frames_total",
        "Frames from the network refused: undecodable, over a limit, or stalled (those also in ringkv_stalled_frames_total).",
    ),
    counter(
        "ringkv_stalled_frames_total",
        "Frames whose body did not arrive in time; their stream was stopped.",
    ),
    counter(
        "ringkv_paused_reads_total",
        "Times a connection's requests stopped being read because its peer was not reading the answers.",
    ),
    counter(
        "ringkv_oversized_answers_total",
        "Answers over the frame limit, replaced by an error saying so.",
    ),
    counter(
        "ringkv_failed_handlers_total",
        "Requests whose handler ended without an answer (it failed), answered with an internal error.",
    ),
    gauge(
        "ringkv_request_memory_bytes",
        Some(Unit::Bytes),
        "Bytes of incoming request bodies held.",
    ),
    gauge(
        "ringkv_request_memory_max_bytes",
        Some(Unit::Bytes),
        "The limit on bytes of incoming request bodies held (--max-request-memory-mb).",
    ),
    // Peers and membership.
    labelled(
        "ringkv_peer_dials_total",
        "Connections dialled to peers, by outcome (ok, failed, skipped: a recent dial failed).",
        &[
            &[("outcome", "ok")],
            &[("outcome", "failed")],
            &[("outcome", "skipped")],
        ],
    ),
    counter(
        "ringkv_peer_identity_mismatches_total",
        "Peers that answered at a member's address as another node, or as a node of another cluster.",
    ),
    labelled(
        "ringkv_peer_state_changes_total",
        "Peers the failure detector saw change state, by the state entered (up, down).",
        &[&[("to", "up")], &[("to", "down")]],
    ),
    gauge(
        "ringkv_peers_down",
        None,
        "Members the failure detector believes down.",
    ),
    gauge(
        "ringkv_members",
        None,
        "Members of the cluster, as this node knows it.",
    ),
    labelled(
        "ringkv_membership_announces_total",
        "Membership exchanges with peers, by outcome (learned, same, removed, refused, handshake_refused, failed).",
        &[
            &[("outcome", "learned")],
            &[("outcome", "same")],
            &[("outcome", "removed")],
            &[("outcome", "refused")],
            &[("outcome", "handshake_refused")],
            &[("outcome", "failed")],
        ],
    ),
    counter(
        "ringkv_region_links_unknown_total",
        "Calls to a peer whose region the latency matrix lacks (no emulated delay applied).",
    ),
    labelled(
        "ringkv_latency_matrix_reads_total",
        "Latency matrices read again on SIGHUP, by result (in_effect, refused).",
        &[&[("result", "in_effect")], &[("result", "refused")]],
    ),
    // Hinted handoff.
    labelled(
        "ringkv_hints_stored_total",
        "Hints stored for an owner believed down, by target owner.",
        RUNTIME_LABELS,
    ),
    labelled(
        "ringkv_hints_delivered_total",
        "Hints delivered, by target owner: to the owner, or to the key's replicas when the owner was removed or no longer replicates the key.",
        RUNTIME_LABELS,
    ),
    labelled(
        "ringkv_hints_dropped_total",
        "Hints dropped undelivered, by target owner (\"unknown\" when unreadable) and reason (expired; full: a new hint refused, the store being full; corrupt).",
        RUNTIME_LABELS,
    ),
    labelled(
        "ringkv_hint_delivery_failures_total",
        "Failed attempts to deliver hints, by target owner.",
        RUNTIME_LABELS,
    ),
    counter(
        "ringkv_hints_rerouted_total",
        "Hints delivered to the key's current replicas instead of their owner, which was removed or no longer replicates the key.",
    ),
    counter(
        "ringkv_hint_sweeps_total",
        "Expiry sweeps of the stored hints (dropping those past the hint window).",
    ),
    counter(
        "ringkv_hint_sweep_read_total",
        "Hints read by expiry sweeps.",
    ),
    gauge(
        "ringkv_hints_pending",
        None,
        "Hints held for an owner, by target owner.",
    ),
    gauge(
        "ringkv_hints_bytes",
        Some(Unit::Bytes),
        "Bytes of hints held.",
    ),
    // Read repair.
    counter(
        "ringkv_read_repairs_queued_total",
        "Keys queued for read repair (a read found some replicas stale).",
    ),
    counter(
        "ringkv_read_repairs_sent_total",
        "Read repairs a replica took (one per stale replica).",
    ),
    counter(
        "ringkv_read_repairs_failed_total",
        "Read repairs a replica did not take (an error, or no answer in time).",
    ),
    counter(
        "ringkv_read_repairs_dropped_total",
        "Read repairs skipped: too many reads already waiting for late answers, or the queue full.",
    ),
    gauge_from_zero(
        "ringkv_read_repair_queue_depth",
        None,
        "Read repairs waiting to be sent, as of the last one taken from the queue.",
    ),
    // Anti-entropy.
    counter(
        "ringkv_anti_entropy_rounds_total",
        "Anti-entropy rounds run (Merkle trees compared with every peer).",
    ),
    counter(
        "ringkv_anti_entropy_keys_repaired_total",
        "Keys anti-entropy found different and repaired.",
    ),
    labelled(
        "ringkv_anti_entropy_bytes_total",
        "Bytes of anti-entropy exchanges, by direction (sent, received).",
        &[&[("direction", "sent")], &[("direction", "received")]],
    ),
    counter(
        "ringkv_anti_entropy_exchange_failures_total",
        "Anti-entropy exchanges with a peer that failed.",
    ),
    counter(
        "ringkv_anti_entropy_unreadable_keys_total",
        "Keys anti-entropy skipped because they could not be read.",
    ),
    histogram_from_start(
        "ringkv_anti_entropy_round_seconds",
        Some(Unit::Seconds),
        "Time an anti-entropy round took.",
        UNLABELLED,
    ),
    histogram_from_start(
        "ringkv_merkle_rebuild_seconds",
        Some(Unit::Seconds),
        "Time a rebuild of the Merkle trees from the store took (at start and after a ring change).",
        UNLABELLED,
    ),
    counter(
        "ringkv_merkle_rebuild_failures_total",
        "Rebuilds of the Merkle trees that failed.",
    ),
    // Tombstone collection.
    counter(
        "ringkv_tombstone_passes_total",
        "Passes of tombstone collection over this node's keys.",
    ),
    counter(
        "ringkv_tombstones_checked_total",
        "Tombstones past the grace checked with the key's other replicas.",
    ),
    counter(
        "ringkv_tombstones_collected_total",
        "Tombstones removed, every replica having confirmed it.",
    ),
    counter(
        "ringkv_tombstones_deferred_total",
        "Tombstones past the grace kept for a later pass (a replica down, the key moved by a recent ring change, or the ring changed during the check).",
    ),
    counter(
        "ringkv_tombstones_unconfirmed_total",
        "Tombstones kept because a replica could not say whether they may go.",
    ),
    labelled(
        "ringkv_tombstone_errors_total",
        "Tombstone collection errors, by step (read, stored_at, remove).",
        &[
            &[("step", "read")],
            &[("step", "stored_at")],
            &[("step", "remove")],
        ],
    ),
    // Membership changes: joins, leaves, cleanup.
    labelled(
        "ringkv_ring_handover_passes_total",
        "Hand-over passes of keys to their new owners after a ring change, by outcome (done, abandoned, failed).",
        &[
            &[("outcome", "done")],
            &[("outcome", "abandoned")],
            &[("outcome", "failed")],
        ],
    ),
    counter(
        "ringkv_ring_handover_keys_total",
        "Keys handed to new owners after a ring change, once per key and owner on every pass.",
    ),
    counter(
        "ringkv_ring_handover_merges_refused_total",
        "Ring hand-over batches in which a new owner refused keys over the per-key limits.",
    ),
    gauge(
        "ringkv_ring_handover_owed",
        None,
        "1 while this node owes a hand-over pass to new owners.",
    ),
    counter(
        "ringkv_leave_keys_handed_over_total",
        "Keys this node handed over while leaving the cluster.",
    ),
    counter(
        "ringkv_cleanup_keys_removed_total",
        "Stray copies removed by cleanup, a current replica holding them.",
    ),
    counter(
        "ringkv_cleanup_keys_kept_total",
        "Stray copies cleanup kept, no current replica having confirmed it holds them.",
    ),
];

/// Gives every metric its help text and starts the counters whose labels
/// are known ahead at 0. Call once, after the recorder is installed.
pub fn describe_all() {
    for m in METRICS {
        // The recorder takes the optional unit as is; the `describe_*!`
        // macros would need an arm per kind and unit.
        metrics::with_recorder(|recorder| {
            let (name, help) = (m.name.into(), m.help.into());
            match m.kind {
                Counter => recorder.describe_counter(name, m.unit, help),
                Gauge => recorder.describe_gauge(name, m.unit, help),
                Histogram => recorder.describe_histogram(name, m.unit, help),
            }
        });
        for labels in m.zeroed {
            match m.kind {
                Counter => metrics::counter!(m.name, *labels).increment(0),
                // Added to, not set: a gauge written before this keeps
                // its value.
                Gauge => metrics::gauge!(m.name, *labels).increment(0.0),
                // Registering the series is enough: it renders with a
                // count of 0.
                Histogram => drop(metrics::histogram!(m.name, *labels)),
            }
        }
    }
}

#[cfg(test)]
mod tests;
