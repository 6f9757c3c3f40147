//! Tombstone collection: removing a delete's tombstone once it is past the
//! grace period and every other replica of the key holds it or nothing, as
//! Cassandra purges tombstones past `gc_grace_seconds`. The rule is
//! `ringkv_repair::tombstones`; this file walks the store and asks.
//!
//! Every tick (half the grace, between 0.5 s and 60 s) a pass walks the
//! whole `tombstones` column family, a page at a time, and checks its due
//! tombstones a few at once. A pass runs to the end: a pass that stopped
//! after a fixed number of pages would cap collection at that many
//! tombstones a tick (it was 4,096 a minute with the default grace, about
//! 68 a second), and a node taking more deletes than that would never catch
//! up. A pass costs a scan of the tombstones plus one round of questions
//! to the replicas per due key, which their answers pace; one that outlasts
//! the tick delays the next. Shutdown stops a pass between two pages or two
//! checks.
//!
//! The column family is keyed by key, not by time, so a pass reads every
//! tombstone still in its grace too: one page read per 256 of them a tick.
//! An index by time would let a pass read only the due ones.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ringkv_repair::tombstones;
use ringkv_ring::Ring;
use tokio::sync::watch;

use super::NodeInner;
use crate::storage::{millis, unix_ms, TombstonePage};

/// Tombstones listed per page (due or not).
const TOMBSTONE_PAGE: usize = 256;
/// Due tombstones checked at once: each check asks the key's other
/// replicas, so one at a time would leave a pass waiting on round trips.
const CHECKS_IN_FLIGHT: usize = 8;
/// How long a tombstone check waits for each replica.
const TOMBSTONE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Collects tombstones past `grace` that every replica holds (see
/// `ringkv_repair::tombstones`): a whole pass every tick, until shutdown.
pub(super) async fn tombstone_loop(
    inner: Arc<NodeInner>,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick_every = (grace / 2).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // A pass that outlasted the tick finds it due at once: shutdown
            // must win over starting another.
            biased;
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        let Some(coordinator) = inner.coordinator.get().cloned() else {
            continue;
        };
        let cutoff = unix_ms().saturating_sub(millis(grace));
        let list = |after: Option<Vec<u8>>| {
            let storage = inner.storage.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    storage.tombstones_due(cutoff, after.as_deref(), TOMBSTONE_PAGE)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
        };
        let check = |key: Vec<u8>| {
            let inner = inner.clone();
            // The ring may change during a long pass: read it per key.
            let ring = coordinator.ring();
            async move { collect_if_held_everywhere(&inner, &ring, key, cutoff).await }
        };
        match walk(list, check, &shutdown).await {
            Ok(pass) => {
                metrics::counter!("ringkv_tombstone_passes_total").increment(1);
                tracing::debug!(
                    pages = pass.pages,
                    due = pass.due,
                    finished = pass.finished,
                    "tombstone pass"
                );
            }
            Err(e) => tracing::warn!(error = %e, "listing tombstones failed"),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pass {
    pages: usize,
    /// Due tombstones checked.
    due: usize,
    /// Whether it reached the end (not stopped by shutdown).
    finished: bool,
}

/// One pass: lists pages of due tombstones from the start (`list(after)`
/// answers the due keys after `after`, and where to go on from, `None` at
/// the end) until the end, and checks every due key, up to
/// [`CHECKS_IN_FLIGHT`] at once. Stops early only at shutdown, or with the
/// error of a page it could not list.
async fn walk<L, LF, C, CF>(
    mut list: L,
    check: C,
    shutdown: &watch::Receiver<bool>,
) -> Result<Pass, String>
where
    L: FnMut(Option<Vec<u8>>) -> LF,
    LF: Future<Output = Result<TombstonePage, String>>,
    C: Fn(Vec<u8>) -> CF,
    CF: Future<Output = ()> + Send + 'static,
{
    let mut pass = Pass {
        pages: 0,
        due: 0,
        finished: false,
    };
    let mut after = None;
    let mut checks = tokio::task::JoinSet::new();
    loop {
        // Most pages hold no due tombstone (the grace is long): look before
        // each page, not only before each check.
        if *shutdown.borrow() {
            checks.shutdown().await;
            return Ok(pass);
        }
        let (due, next) = list(after.take()).await?;
        pass.pages += 1;
        for key in due {
            if *shutdown.borrow() {
                checks.shutdown().await;
                return Ok(pass);
            }
            while checks.len() >= CHECKS_IN_FLIGHT {
                checks.join_next().await;
            }
            checks.spawn(check(key));
            pass.due += 1;
        }
        match next {
            Some(key) => after = Some(key),
            None => break,
        }
    }
    while checks.join_next().await.is_some() {}
    pass.finished = true;
    Ok(pass)
}

/// Removes `key`'s tombstone if it was stored at or before `cutoff` and
/// every other replica holds it or nothing.
pub(super) async fn collect_if_held_everywhere(
    inner: &Arc<NodeInner>,
    ring: &Arc<Ring>,
    key: Vec<u8>,
    cutoff: u64,
) {
    let replica = inner.local.replica.clone();
    // Off the async worker: a read that meets a corrupt version sets it
    // aside with a write (an fsync under `--sync`).
    let read = {
        let (replica, key) = (replica.clone(), key.clone());
        tokio::task::spawn_blocking(move || replica.read(&key)).await
    };
    let ours = match read {
        Ok(Ok(Some(ours))) => ours,
        // Gone since the page was listed (written and collected, say).
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tombstone_error("read", &key, e.to_string()),
        Err(e) => return tombstone_error("read", &key, e.to_string()),
    };
    // Read after `ours`: a newer tombstone written since the page was
    // listed has a newer time and waits for its own grace, and one written
    // after this read fails remove_if_unchanged's "unchanged" check.
    match inner.storage.tombstone_stored_at(&key) {
        Ok(Some(stored)) if stored <= cutoff => {}
        Ok(_) => return,
        Err(e) => return tombstone_error("stored_at", &key, e.to_string()),
    }
    // A replica believed down cannot confirm, and asking it would cost a
    // connect timeout per due key: try again once it is back.
    let someone_down = ring
        .replicas_of(&key)
        .iter()
        .any(|r| *r != inner.id && !inner.detector.is_up(r));
    if someone_down {
        metrics::counter!("ringkv_tombstones_deferred_total").increment(1);
        return;
    }
    // A node that replicated the key under a ring replaced lately may still
    // hand over a copy that missed the delete: the tombstone must be here
    // to cover it (`server/recent_rings.rs`).
    let moved_lately = inner
        .recent_rings()
        .as_ref()
        .is_none_or(|recent| recent.moved_lately(&key, ring, unix_ms()));
    if moved_lately {
        metrics::counter!("ringkv_tombstones_deferred_total").increment(1);
        return;
    }
    let confirmation = tombstones::confirm_collectable(
        &*inner.transport,
        ring,
        &inner.id,
        &key,
        &ours,
        TOMBSTONE_CHECK_TIMEOUT,
    )
    .await;
    metrics::counter!("ringkv_tombstones_checked_total").increment(1);
    match confirmation {
        tombstones::Confirmation::Collectable => {}
        tombstones::Confirmation::Kept => return,
        // Not a verdict: a peer whose data path is stuck while it answers
        // pings would otherwise stop collection with no sign but a flat
        // `collected` count.
        tombstones::Confirmation::Unconfirmed { replica, reason } => {
            metrics::counter!("ringkv_tombstones_unconfirmed_total").increment(1);
            tracing::debug!(%replica, %reason, key = %String::from_utf8_lossy(&key), "a replica could not say whether a tombstone may go");
            return;
        }
    }
    // The replicas asked are those of the ring the check began with; one
    // installed since (a join) may place the key on a node that was not
    // asked and still holds the value. The next pass asks under it.
    // (By fingerprint: an install that changes no placement, a repeated
    // record, builds a new ring equal to this one.)
    let ring_now = inner.coordinator.get().map(|c| c.ring());
    if ring_now.is_none_or(|now| now.fingerprint() != ring.fingerprint()) {
        metrics::counter!("ringkv_tombstones_deferred_total").increment(1);
        return;
    }
    let key_for_log = key.clone();
    let collected =
        tokio::task::spawn_blocking(move || replica.remove_if_unchanged(&key, &ours)).await;
    match collected {
        Ok(Ok(true)) => {
            // Nobody waits on this deletion, but it should not sit in the
            // WAL buffer until the next client write.
            if let Err(e) = inner.storage.commit().await {
                tracing::warn!(error = %e, "could not flush a collected tombstone");
            }
            metrics::counter!("ringkv_tombstones_collected_total").increment(1);
        }
        // Written since it was read: it waits for its own grace.
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tombstone_error("remove", &key_for_log, e.to_string()),
        Err(e) => tombstone_error("remove", &key_for_log, e.to_string()),
    }
}

/// A storage failure while collecting `key`'s tombstone: logged and counted
/// (`ringkv_tombstone_errors_total{step}`), since a failing disk would
/// otherwise stop collection silently. The tombstone stays.
fn tombstone_error(step: &'static str, key: &[u8], error: String) {
    metrics::counter!("ringkv_tombstone_errors_total", "step" => step).increment(1);
    tracing::warn!(step, key = %String::from_utf8_lossy(key), %error, "tombstone collection failed on this node's store");
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// `pages` pages of `per_page` due keys each, named by number.
    fn pages(pages: usize, per_page: usize) -> Vec<Vec<Vec<u8>>> {
        (0..pages)
            .map(|p| {
                (0..per_page)
                    .map(|i| format!("{:06}", p * per_page + i).into_bytes())
                    .collect()
            })
            .collect()
    }

    /// A lister over `pages`: each resumes after the last key of the one
    /// before, as the store's listing does.
    fn lister(
        pages: Vec<Vec<Vec<u8>>>,
    ) -> impl FnMut(Option<Vec<u8>>) -> std::future::Ready<Result<TombstonePage, String>> {
        move |after| {
            let i = match after {
                None => 0,
                Some(last) => pages.iter().position(|p| p.last() == Some(&last)).unwrap() + 1,
            };
            let next = (i + 1 < pages.len()).then(|| pages[i].last().unwrap().clone());
            std::future::ready(Ok((pages[i].clone(), next)))
        }
    }

    #[tokio::test]
    async fn a_pass_checks_every_due_tombstone_to_the_end() {
        let checked = Arc::new(Mutex::new(Vec::new()));
        let (_tx, shutdown) = watch::channel(false);
        let seen = checked.clone();
        let pass = walk(
            lister(pages(40, 256)),
            move |key| {
                let seen = seen.clone();
                async move { seen.lock().unwrap().push(key) }
            },
            &shutdown,
        )
        .await
        .unwrap();
        assert_eq!(
            pass,
            Pass {
                pages: 40,
                due: 40 * 256,
                finished: true
            }
        );
        let mut checked = checked.lock().unwrap().clone();
        checked.sort();
        assert_eq!(checked, pages(40, 256).concat(), "each once");
    }

    #[tokio::test]
    async fn a_pass_stops_at_shutdown_and_on_a_failed_listing() {
        let (tx, shutdown) = watch::channel(false);
        let tx = Arc::new(tx);
        let stopper = tx.clone();
        let pass = walk(
            lister(pages(4, 10)),
            move |key| {
                // Shutdown comes while the 15th key is checked.
                if key == b"000014" {
                    stopper.send_replace(true);
                }
                async {}
            },
            &shutdown,
        )
        .await
        .unwrap();
        assert!(!pass.finished && pass.due == 15, "{pass:?}");

        // Pages with nothing due: shutdown still stops the pass between them.
        let (tx, shutdown) = watch::channel(false);
        let mut listed = 0;
        let nothing_due = |after: Option<Vec<u8>>| {
            listed += 1;
            if listed == 3 {
                tx.send_replace(true);
            }
            let next = format!("{:06}", after.map_or(0, |a| a.len()) + listed);
            std::future::ready(Ok((Vec::new(), Some(next.into_bytes()))))
        };
        let pass = walk(nothing_due, |_key| async {}, &shutdown).await.unwrap();
        assert_eq!(
            pass,
            Pass {
                pages: 3,
                due: 0,
                finished: false
            }
        );

        let (_tx, shutdown) = watch::channel(false);
        let failing = |_after: Option<Vec<u8>>| async { Err("disk gone".to_string()) };
        let error = walk(failing, |_key| async {}, &shutdown).await.unwrap_err();
        assert_eq!(error, "disk gone");
    }

    /// Waits until the hand-over loop has noted `ring` as the node's (until
    /// then no tombstone is collected).
    pub(crate) async fn wait_for_recent_rings(inner: &NodeInner, ring: &Ring) {
        crate::test_support::wait_until("the hand-over loop noted the ring", || {
            inner
                .recent_rings()
                .as_ref()
                .is_some_and(|recent| recent.notes_as_current(ring))
        })
        .await;
    }

    /// A tombstone is removed only under the ring its check asked: if
    /// another was installed meanwhile (a join), a node it did not ask may
    /// hold the value, and the next pass asks again.
    #[tokio::test]
    async fn a_tombstone_stays_if_the_ring_changed_since_its_check() {
        use ringkv_core::dvv::{Payload, VersionVector};
        use ringkv_core::NodeId;

        use crate::server::{Node, NodeConfig};

        let dir = tempfile::tempdir().unwrap();
        let id = NodeId::new("n1").unwrap();
        let mut config = NodeConfig::on_loopback(id.clone(), dir.path().into());
        config.replicas = Some(1);
        let node = Node::start(config).await.unwrap();
        let inner = node.inner.clone();
        let replica = inner.local.replica.clone();
        let key = b"gone".to_vec();
        replica
            .update(&key, &VersionVector::new(), Payload::Tombstone)
            .unwrap();
        let current = inner.coordinator.get().expect("in a cluster").ring();
        wait_for_recent_rings(&inner, &current).await;
        // The same member with other virtual nodes: another placement.
        let other = Arc::new(Ring::new([(id, 7)], 1).unwrap());
        assert_ne!(other.fingerprint(), current.fingerprint());
        collect_if_held_everywhere(&inner, &other, key.clone(), u64::MAX).await;
        assert!(
            replica.read(&key).unwrap().is_some(),
            "kept: checked under a ring no longer installed"
        );
        collect_if_held_everywhere(&inner, &current, key.clone(), u64::MAX).await;
        assert!(
            replica.read(&key).unwrap().is_none(),
            "collected under the ring it was checked by"
        );
        drop(inner);
        drop(replica);
        node.shutdown().await;
    }
}
