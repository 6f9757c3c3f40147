//! `ringkv cleanup`: a node drops the stray copies it keeps of keys it no
//! longer replicates (Cassandra's `nodetool cleanup`, run after adding
//! nodes).
//!
//! Which copies may go is decided in `ringkv_repair::cleanup`: those that
//! a current replica covers. This module reads the store a page at a time,
//! picks the keys the node's current ring does not place on it, asks their
//! replicas, and removes the covered ones under each key's lock if they are
//! unchanged. Around that:
//!
//! - **No leave at the same time.** A leave hands keys to the replicas of
//!   the ring without the leaver, counting on the copies there; a removal
//!   changes which node replicates what. So, like a leave, the node marks
//!   itself (`Stats.cleaning`) and only then asks every other member, and
//!   refuses if one is leaving, has left unknown to it, or cannot be
//!   asked; a leave refuses while a member is cleaning. Of a leave and a
//!   cleanup begun together at least one sees the other, provided each
//!   knows the other as a member (the argument and its condition are in
//!   `server/leave.rs`).
//! - **The ring unchanged.** A page whose ring changed while its replicas
//!   were asked is judged again under the new ring; removals stop at a
//!   ring installed after the verdict.
//! - **No dot minted twice.** A removed copy takes the key's recorded
//!   actor with it (see `ReplicaService`), so a later write to that key
//!   here, once the node replicates it again, goes under a new actor and
//!   cannot repeat a dot the other replicas know.
//!
//! One cleanup runs at a time per node; it stops at shutdown, and what it
//! removed by then stays removed. A replica that cannot be asked (down,
//! or failing once in the cleanup) is not asked again in the same
//! cleanup: the copies only it could vouch for stay, and the answer names
//! it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_coordinator::coordinator::Coordinator;
use ringkv_core::dvv::Clock;
use ringkv_core::wire::{CleanupReport, ErrorKind, PeerFailure, Response};
use ringkv_core::NodeId;
use ringkv_repair::cleanup;
use ringkv_ring::Ring;

use super::leave::named;
use super::{NodeInner, QuicTransport};

/// How long a replica may take to answer one page's `ReadBatch`.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Times a page is judged while the ring keeps changing under it.
const JUDGE_ATTEMPTS: usize = 3;
/// Kept copies named in the log per cleanup, at most (the answer counts
/// them all).
const KEPT_LOGGED_MAX: usize = 10;

/// Clears `NodeInner::cleaning` when a cleanup ends, however it ends.
struct CleaningGuard<'a>(&'a AtomicBool);

impl Drop for CleaningGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl NodeInner {
    /// Serves `ringkv cleanup` (see the module docs).
    pub(super) async fn cleanup(self: &Arc<Self>) -> Response {
        let Some(coordinator) = self.coordinator.get().cloned() else {
            return super::joining(&self.id);
        };
        let Some(record) = self.membership.record() else {
            return super::joining(&self.id);
        };
        let refuse = |message: String| Response::error(ErrorKind::Refused, message);
        // The mark first, then the checks (as a leave does; see
        // `server/leave.rs`): of a leave and a cleanup begun together, at
        // least one sees the other.
        if self.cleaning.swap(true, Ordering::SeqCst) {
            return refuse(format!("a cleanup of {} is already running", self.id));
        }
        let _guard = CleaningGuard(&self.cleaning);
        if self.leaving.load(Ordering::SeqCst) {
            return refuse(format!(
                "{} is leaving the cluster; its keys go with the leave",
                self.id
            ));
        }
        if let Some(refusal) = self.member_moving(&record).await {
            return refusal;
        }
        self.cleanup_keys_scanned.store(0, Ordering::Relaxed);
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            report = self.clean(&coordinator) => match report {
                Ok(report) => Response::Cleaned(report),
                Err(reason) => Response::error(
                    ErrorKind::Internal,
                    format!("{}: the cleanup stopped: {reason}", self.id),
                ),
            },
            _ = shutdown.wait_for(|stop| *stop) => Response::error(
                ErrorKind::Unavailable,
                format!(
                    "{} {}; the cleanup stopped (what it removed stays removed)",
                    self.id,
                    if self.is_removed.load(Ordering::SeqCst) {
                        "was removed from the cluster"
                    } else {
                        "is shutting down"
                    }
                ),
            ),
        }
    }

    /// The refusal of a cleanup while another member is leaving or has left
    /// unknown to this node (the ring is about to change, and a replica
    /// that covers a copy now may be gone), or cannot be asked which.
    async fn member_moving(&self, record: &crate::membership::ClusterRecord) -> Option<Response> {
        let (answered, unasked) = self.members_stats(record).await;
        let (leaving, gone) = (
            named(&answered, |s| s.leaving),
            named(&answered, |s| s.removed),
        );
        let refuse = |why: String| {
            Some(Response::error(
                ErrorKind::Refused,
                format!(
                    "{} cannot clean up now: {why}; nothing was removed",
                    self.id
                ),
            ))
        };
        if !leaving.is_empty() {
            return refuse(format!(
                "{} is leaving; run it again once that `ringkv leave` has returned",
                leaving.join(", ")
            ));
        }
        if !gone.is_empty() {
            return refuse(format!(
                "{} left the cluster and this node has not learned it yet; run it again in a few seconds",
                gone.join(", ")
            ));
        }
        if !unasked.is_empty() {
            return Some(Response::error(
                ErrorKind::Unavailable,
                format!(
                    "{} cannot clean up: it could not check that no member is leaving ({}); \
                     nothing was removed: bring those members up, or remove them, and run it again",
                    self.id,
                    unasked.join("; ")
                ),
            ));
        }
        None
    }

    /// Reads every stored key and removes the stray copies a current
    /// replica covers.
    async fn clean(
        &self,
        coordinator: &Arc<Coordinator<QuicTransport>>,
    ) -> Result<CleanupReport, String> {
        let began = Instant::now();
        let mut report = CleanupReport::default();
        // Replicas not to ask: those the failure detector holds down
        // (asking each would cost a timeout), then any that fail. Reported
        // are only those some copy needed.
        let mut skip: BTreeMap<NodeId, String> = BTreeMap::new();
        if let Some(record) = self.membership.record() {
            for member in record.members.values() {
                if member.id != self.id && !self.detector.is_up(&member.id) {
                    skip.insert(member.id.clone(), format!("down, as {} sees it", self.id));
                }
            }
        }
        let mut failed: BTreeMap<NodeId, String> = BTreeMap::new();
        let mut kept_logged = 0;
        let mut pages = self.stored_pages();
        while let Some(page) = pages.next().await {
            report.keys_scanned += page.len() as u64;
            self.cleanup_keys_scanned
                .fetch_add(page.len() as u64, Ordering::Relaxed);
            let Some((ring, strays, verdict)) = self.judge(coordinator, &page, &skip).await else {
                // The ring kept changing: the page's copies stay this time.
                let ring = coordinator.ring();
                let strays = page
                    .iter()
                    .filter(|(key, _)| !ring.is_replica(key, &self.id))
                    .count() as u64;
                report.stray_keys += strays;
                report.kept += strays;
                continue;
            };
            report.stray_keys += strays.len() as u64;
            for failure in verdict.unreachable {
                skip.entry(failure.peer).or_insert(failure.reason);
            }
            for failure in verdict.failures {
                failed.entry(failure.peer).or_insert(failure.reason);
            }
            let (covered, uncovered): (Vec<_>, Vec<_>) = strays
                .into_iter()
                .zip(verdict.covered)
                .partition(|(_, covered)| *covered);
            for ((key, _), _) in uncovered
                .iter()
                .take(KEPT_LOGGED_MAX.saturating_sub(kept_logged))
            {
                tracing::info!(
                    key = %String::from_utf8_lossy(key),
                    "cleanup keeps a stray copy that no replica asked holds"
                );
                kept_logged += 1;
            }
            let covered: Vec<(Vec<u8>, Clock)> =
                covered.into_iter().map(|(stray, _)| stray).collect();
            let candidates = covered.len() as u64;
            let removed = self.remove(coordinator, ring, covered).await?;
            report.removed += removed;
            report.kept += uncovered.len() as u64 + (candidates - removed);
            // Nobody waits on these removals, but they should not sit in the
            // WAL buffer until the next client write.
            self.storage.commit().await.map_err(|e| e.to_string())?;
        }
        if let Err(e) = pages.finish().await {
            return Err(format!("reading its own store: {e}"));
        }
        report.failures = failed
            .into_iter()
            .map(|(peer, reason)| PeerFailure { peer, reason })
            .collect();
        report.duration_ms = began.elapsed().as_millis() as u64;
        metrics::counter!("ringkv_cleanup_keys_removed_total").increment(report.removed);
        metrics::counter!("ringkv_cleanup_keys_kept_total").increment(report.kept);
        tracing::info!(
            keys = report.keys_scanned,
            stray = report.stray_keys,
            removed = report.removed,
            kept = report.kept,
            replicas_not_asked = report.failures.len(),
            "cleanup done"
        );
        Ok(report)
    }

    /// The stray copies of `page` under the current ring, and what their
    /// replicas said of them. A ring change while they were asked makes the
    /// answers moot (a replica may no longer be one), so the page is judged
    /// again under the new ring; `None` if the ring changed every time.
    async fn judge(
        &self,
        coordinator: &Arc<Coordinator<QuicTransport>>,
        page: &[(Vec<u8>, Clock)],
        skip: &BTreeMap<NodeId, String>,
    ) -> Option<(Arc<Ring>, Vec<(Vec<u8>, Clock)>, cleanup::Verdict)> {
        for _ in 0..JUDGE_ATTEMPTS {
            let ring = coordinator.ring();
            let strays: Vec<(Vec<u8>, Clock)> = page
                .iter()
                .filter(|(key, _)| !ring.is_replica(key, &self.id))
                .cloned()
                .collect();
            let verdict = if strays.is_empty() {
                cleanup::Verdict::default()
            } else {
                cleanup::check_page(&*self.transport, &ring, &strays, skip, ASK_TIMEOUT).await
            };
            // The same placement, not the same install: an address change
            // installs a new ring that places every key as before.
            if ring.fingerprint() == coordinator.ring().fingerprint() {
                return Some((ring, strays, verdict));
            }
        }
        None
    }

    /// Removes the `covered` copies that are unchanged, while the ring is
    /// still `ring`; returns how many it removed.
    async fn remove(
        &self,
        coordinator: &Arc<Coordinator<QuicTransport>>,
        ring: Arc<Ring>,
        covered: Vec<(Vec<u8>, Clock)>,
    ) -> Result<u64, String> {
        if covered.is_empty() {
            return Ok(0);
        }
        let (replica, coordinator) = (self.local.replica.clone(), coordinator.clone());
        let placement = ring.fingerprint();
        tokio::task::spawn_blocking(move || {
            let mut removed = 0u64;
            for (key, ours) in &covered {
                // A placement changed since the verdict stops the page here.
                if coordinator.ring().fingerprint() != placement {
                    break;
                }
                if replica
                    .remove_if_unchanged(key, ours)
                    .map_err(|e| e.to_string())?
                {
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
        .map_err(|e| format!("a removal task failed: {e}"))?
    }
}
