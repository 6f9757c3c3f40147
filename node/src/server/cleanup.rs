//! `ringkv cleanup`: a node drops the stray copies it keeps of keys it no
//! longer replicates (Cassandra's `nodetool cleanup`, run after adding
//! nodes).
//!
//! Which copies may go is decided in `ringkv_repair::cleanup`: those that
//! a current replica covers. This module reads the store a page at a time,
//! picks the keys the node's current ring does not place on it, asks their
//! replicas, and removes the covered ones under each key's lock if they are
//! unchanged. One cleanup runs at a time per node; it stops at shutdown,
//! and what it removed by then stays removed, so running it again picks up
//! where it stopped (the copies removed are simply no longer there).
//!
//! A replica that cannot be asked (down, or failing once in the cleanup)
//! is not asked again in the same cleanup: every key it would have had to
//! cover stays, and the answer names it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_coordinator::coordinator::Coordinator;
use ringkv_core::dvv::Clock;
use ringkv_core::wire::{CleanupReport, ErrorKind, PeerFailure, Response};
use ringkv_core::NodeId;
use ringkv_repair::cleanup;

use super::{NodeInner, QuicTransport};

/// How long a replica may take to answer one page's `ReadBatch`.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
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
        let refuse = |message: String| Response::error(ErrorKind::Refused, message);
        if self.leaving.load(Ordering::SeqCst) {
            return refuse(format!(
                "{} is leaving the cluster; its keys go with the leave",
                self.id
            ));
        }
        if self.cleaning.swap(true, Ordering::SeqCst) {
            return refuse(format!("a cleanup of {} is already running", self.id));
        }
        let _guard = CleaningGuard(&self.cleaning);
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
                    "{} is shutting down; the cleanup stopped (what it removed stays removed)",
                    self.id
                ),
            ),
        }
    }

    /// Reads every stored key and removes the stray copies a current
    /// replica covers.
    async fn clean(
        &self,
        coordinator: &Coordinator<QuicTransport>,
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
        let (mut pages, reader) = self.stored_pages();
        while let Some(page) = pages.recv().await {
            report.keys_scanned += page.len() as u64;
            self.cleanup_keys_scanned
                .fetch_add(page.len() as u64, Ordering::Relaxed);
            // The ring may change during a long cleanup: read it per page.
            let ring = coordinator.ring();
            let strays: Vec<(Vec<u8>, Clock)> = page
                .into_iter()
                .filter(|(key, _)| !ring.preference_list(key).contains(&self.id))
                .collect();
            if strays.is_empty() {
                continue;
            }
            report.stray_keys += strays.len() as u64;
            let verdict =
                cleanup::check_page(&*self.transport, &ring, &strays, &skip, ASK_TIMEOUT).await;
            for failure in verdict.failures {
                skip.entry(failure.peer.clone())
                    .or_insert_with(|| failure.reason.clone());
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
            let strays_here = report.stray_keys - report.removed - report.kept;
            let replica = self.local.replica.clone();
            let (storage, id) = (self.storage.clone(), self.id.clone());
            let removed = tokio::task::spawn_blocking(move || {
                // This node must keep every dot of its current actor (see
                // `ReplicaService`): before it forgets one, it changes actor.
                let actor = replica.id();
                if covered.iter().any(|(_, ours)| ours.counter(&actor) > 0) {
                    let epoch = storage
                        .new_epoch()
                        .map_err(|e| format!("could not begin a new epoch: {e}"))?;
                    replica.replace_actor(id.actor(epoch));
                    metrics::counter!("ringkv_actor_changes_total").increment(1);
                    tracing::info!(old = %actor, new = %replica.id(), "cleanup: new dots go under a new actor, as copies holding the old one's are removed");
                }
                let mut removed = 0u64;
                for (key, ours) in &covered {
                    if replica
                        .remove_if_unchanged(key, ours)
                        .map_err(|e| e.to_string())?
                    {
                        removed += 1;
                    }
                }
                Ok::<_, String>(removed)
            })
            .await
            .map_err(|e| format!("a removal task failed: {e}"))??;
            report.removed += removed;
            report.kept += strays_here - removed;
            // Nobody waits on these removals, but they should not sit in the
            // WAL buffer until the next client write.
            self.storage.commit().await.map_err(|e| e.to_string())?;
        }
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("reading its own store: {e}")),
            Err(e) => return Err(format!("reading its own store: {e}")),
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
}
