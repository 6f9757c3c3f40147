//! Group commit: the WAL records of many writes reach the kernel in one
//! `write(2)`.
//!
//! Without `--sync`, a write survives a crash of the process (`kill -9`) once
//! its write-ahead-log record has been handed to the kernel. RocksDB does
//! that inside every `DB::write`, one system call per write; under YCSB-A
//! that call was about 5% of all CPU. RocksDB's own group commit merges
//! writers blocked on each other in different threads, but a node's writes
//! come from async tasks on a few worker threads (one in the bench), which
//! never block on each other, so it has almost nothing to merge.
//!
//! So storage opens RocksDB with `manual_wal_flush`: `DB::write` only
//! appends to RocksDB's in-process WAL buffer, and a replica calls
//! [`GroupCommit::commit`] before it answers. The first request to
//! arrive becomes the leader. It yields once, so that every request already
//! runnable on the node appends its record too, then flushes the buffer once
//! for all of them. The others wait for a flush that covers their records.
//! This is the classic group commit of databases (DeWitt et al., 1984),
//! driven by the async scheduler instead of a timer, so an unloaded node
//! pays one yield and no delay.
//!
//! Each write is counted twice: `started` before it, `finished` after it
//! (failed or not). A commit waits until `flushed` reaches `started` as it
//! was when the commit began, so it covers every write that could have
//! been visible to the request, its own and, with several worker threads,
//! one still under way on another thread.
//!
//! Invariant: `flushed` only grows, and only to a value of `finished` read
//! before a successful flush began, so `flushed >= n` means the records of
//! the first `n` writes to finish are in the kernel; and `flushed >=
//! started` (as read at some moment) means every write started by then is.
//! A failed flush advances nothing: every waiter it covered tries again
//! (and, the WAL being broken, fails).
//!
//! The node commits after reads too (see `LocalReplica::handle`), so a
//! replica never answers with a version whose record is still buffered.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// The bookkeeping of one WAL's group commit. The flush itself is passed in,
/// so the protocol is tested without RocksDB.
#[derive(Debug, Default)]
pub struct GroupCommit {
    /// Writes begun (bumped before each write).
    started: AtomicU64,
    /// Writes over, their records in the buffer or failed (bumped after).
    finished: AtomicU64,
    /// Writes whose records a successful flush has handed to the kernel.
    flushed: AtomicU64,
    /// Whether a leader is flushing (or about to).
    leading: AtomicBool,
    /// Woken when a leader is done, successful or not.
    done: Notify,
    /// Commits waiting for a write under way on another thread to finish.
    awaiting_writes: AtomicU64,
    /// Woken when a write finishes while a commit is waiting for one.
    write_finished: Notify,
}

/// Clears `leading` and wakes the waiters however the leader's turn ends,
/// including when its future is dropped mid-yield.
/// Counts a write as finished when dropped, and wakes commits waiting
/// for it.
struct WriteFinished<'a>(&'a GroupCommit);

impl Drop for WriteFinished<'_> {
    fn drop(&mut self) {
        let group = self.0;
        // SeqCst here and in `wait_for_writes`: either the waiter sees this
        // write finished, or this sees the waiter and wakes it.
        group.finished.fetch_add(1, Ordering::SeqCst);
        if group.awaiting_writes.load(Ordering::SeqCst) > 0 {
            group.write_finished.notify_waiters();
        }
    }
}

struct Leadership<'a>(&'a GroupCommit);

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        self.0.leading.store(false, Ordering::Release);
        self.0.done.notify_waiters();
    }
}

/// Counts a commit in `awaiting_writes` while it sleeps on a write under
/// way, and uncounts it however the sleep ends, including when the commit's
/// future is dropped (a request timed out): a count left behind would make
/// every later write pay a spare `notify_waiters` call.
struct AwaitingWrite<'a>(&'a GroupCommit);

impl<'a> AwaitingWrite<'a> {
    fn register(group: &'a GroupCommit) -> Self {
        group.awaiting_writes.fetch_add(1, Ordering::SeqCst);
        AwaitingWrite(group)
    }
}

impl Drop for AwaitingWrite<'_> {
    fn drop(&mut self) {
        self.0.awaiting_writes.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GroupCommit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs one write, counted before and after (whatever its outcome,
    /// even a panic: a write counted as started but never as finished
    /// would hold every later commit for good).
    pub fn write<T>(&self, write: impl FnOnce() -> T) -> T {
        self.started.fetch_add(1, Ordering::AcqRel);
        let _finished = WriteFinished(self);
        write()
    }

    /// Waits until `target` writes have finished (a write under way on
    /// another thread, which this cannot speed up).
    async fn wait_for_writes(&self, target: u64) {
        while self.finished.load(Ordering::SeqCst) < target {
            let finished = self.write_finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let _awaiting = AwaitingWrite::register(self);
            if self.finished.load(Ordering::SeqCst) < target {
                finished.await;
            }
        }
    }

    /// Writes begun but not yet flushed.
    pub fn pending(&self) -> u64 {
        let started = self.started.load(Ordering::Acquire);
        started.saturating_sub(self.flushed.load(Ordering::Acquire))
    }

    /// Returns once every write begun (with [`write`](Self::write)) before
    /// this call is flushed, running `flush` itself if no flush that covers
    /// them is under way. An error is the flush's.
    pub async fn commit<E>(&self, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let target = self.started.load(Ordering::Acquire);
        loop {
            if self.flushed.load(Ordering::Acquire) >= target {
                return Ok(());
            }
            // Registered before the leadership check, so a leader finishing
            // in between still wakes this waiter.
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .leading
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let leadership = Leadership(self);
                // Requests that are already runnable write first and join
                // this flush.
                tokio::task::yield_now().await;
                let upto = self.finished.load(Ordering::Acquire);
                let before = self.flushed.load(Ordering::Acquire);
                if upto > before {
                    metrics::counter!("ringkv_wal_flushes_total").increment(1);
                    flush()?;
                    self.flushed.fetch_max(upto, Ordering::AcqRel);
                    metrics::histogram!("ringkv_wal_flush_writes").record((upto - before) as f64);
                }
                if upto < target {
                    // A write begun before this commit is still under way
                    // on another thread: let others lead meanwhile, sleep
                    // until it finishes, then flush again.
                    drop(leadership);
                    self.wait_for_writes(target).await;
                }
                continue;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A stand-in WAL: records appended to `buffer`, moved to `kernel` by a
    /// flush.
    #[derive(Default)]
    struct Wal {
        buffer: Mutex<Vec<u64>>,
        kernel: Mutex<Vec<u64>>,
        fail: AtomicBool,
        calls: AtomicU64,
    }

    impl Wal {
        fn append(&self, group: &GroupCommit, record: u64) {
            group.write(|| self.buffer.lock().unwrap().push(record));
        }
        fn flush(&self) -> Result<(), &'static str> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err("disk gone");
            }
            let mut buffer = self.buffer.lock().unwrap();
            self.kernel.lock().unwrap().append(&mut buffer);
            Ok(())
        }
    }

    /// Waits for a spawned commit, failing with `why` if it takes 10 s.
    async fn finishes(commit: tokio::task::JoinHandle<Result<(), &'static str>>, why: &str) {
        tokio::time::timeout(std::time::Duration::from_secs(10), commit)
            .await
            .expect(why)
            .unwrap()
            .unwrap();
    }

    /// A commit on its own task, flushing into `wal`.
    fn spawn_commit(
        group: &Arc<GroupCommit>,
        wal: &Arc<Wal>,
    ) -> tokio::task::JoinHandle<Result<(), &'static str>> {
        let (group, wal) = (group.clone(), wal.clone());
        tokio::spawn(async move { group.commit(|| wal.flush()).await })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_writers_share_flushes_and_each_is_flushed_when_acknowledged() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        let mut writers = tokio::task::JoinSet::new();
        for record in 0..50u64 {
            let (group, wal) = (group.clone(), wal.clone());
            writers.spawn(async move {
                wal.append(&group, record);
                group.commit(|| wal.flush()).await.unwrap();
                // Acknowledged: the record must be in the kernel now.
                assert!(wal.kernel.lock().unwrap().contains(&record));
            });
        }
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
        assert_eq!(wal.kernel.lock().unwrap().len(), 50);
        assert_eq!(group.pending(), 0);
        // All 50 writers were runnable together: the first one's yield let
        // the other 49 append before its flush.
        let flushes = wal.calls.load(Ordering::SeqCst);
        assert!(flushes <= 2, "{flushes} flushes for 50 concurrent writes");
    }

    /// With several worker threads, a read can see a write that another
    /// thread has made but not yet counted as finished; the read's commit
    /// must wait for that write's record too.
    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_waits_for_a_write_still_under_way() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let (group, wal) = (group.clone(), wal.clone());
            std::thread::spawn(move || {
                group.write(|| {
                    wal.buffer.lock().unwrap().push(1);
                    started_tx.send(()).unwrap();
                    finish_rx.recv().unwrap();
                })
            })
        };
        started_rx.recv().unwrap();
        // The record is in the buffer (a read could see it); the write has
        // not returned yet.
        let reader = spawn_commit(&group, &wal);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(
            !reader.is_finished(),
            "answered before the write it may have seen was flushed"
        );
        assert_eq!(
            group.awaiting_writes.load(Ordering::SeqCst),
            1,
            "the commit sleeps until the write finishes (no spinning)"
        );
        // A second commit that gives up while it waits (its request timed
        // out) stops counting as a waiter.
        let quitter = spawn_commit(&group, &wal);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(group.awaiting_writes.load(Ordering::SeqCst), 2);
        quitter.abort();
        assert!(quitter.await.unwrap_err().is_cancelled());
        assert_eq!(
            group.awaiting_writes.load(Ordering::SeqCst),
            1,
            "a cancelled commit still counted as waiting"
        );
        finish_tx.send(()).unwrap();
        writer.join().unwrap();
        finishes(reader, "the commit ends once the write does").await;
        assert_eq!(wal.kernel.lock().unwrap().as_slice(), &[1]);
        assert_eq!(group.awaiting_writes.load(Ordering::SeqCst), 0);
    }

    /// A write that panics still counts as finished: later commits are
    /// not held for it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_that_panics_does_not_hold_later_commits() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group.write(|| panic!("a write's bug"))
        }));
        assert!(panicked.is_err());
        wal.append(&group, 1);
        finishes(spawn_commit(&group, &wal), "a commit after the panic").await;
        assert_eq!(*wal.kernel.lock().unwrap(), [1]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_with_nothing_written_does_not_flush() {
        let group = GroupCommit::new();
        let wal = Wal::default();
        group.commit(|| wal.flush()).await.unwrap();
        assert_eq!(wal.calls.load(Ordering::SeqCst), 0);
        wal.append(&group, 1);
        group.commit(|| wal.flush()).await.unwrap();
        group.commit(|| wal.flush()).await.unwrap();
        assert_eq!(
            wal.calls.load(Ordering::SeqCst),
            1,
            "the second commit had nothing left"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_flush_acknowledges_nobody_and_the_next_commit_retries() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        wal.fail.store(true, Ordering::SeqCst);
        let mut writers = tokio::task::JoinSet::new();
        for record in 0..5u64 {
            let (group, wal) = (group.clone(), wal.clone());
            writers.spawn(async move {
                wal.append(&group, record);
                group.commit(|| wal.flush()).await
            });
        }
        while let Some(done) = writers.join_next().await {
            assert_eq!(done.unwrap(), Err("disk gone"));
        }
        assert_eq!(group.pending(), 5);
        wal.fail.store(false, Ordering::SeqCst);
        group.commit(|| wal.flush()).await.unwrap();
        assert_eq!(group.pending(), 0);
        assert_eq!(wal.kernel.lock().unwrap().len(), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_leader_dropped_mid_turn_does_not_strand_the_others() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        wal.append(&group, 1);
        // The leader yields before flushing; dropping it there must hand
        // leadership on.
        let leader = spawn_commit(&group, &wal);
        tokio::task::yield_now().await;
        assert!(
            group.leading.load(Ordering::SeqCst),
            "the leader is mid-turn"
        );
        leader.abort();
        let follower = spawn_commit(&group, &wal);
        finishes(follower, "the follower must not wait forever").await;
        assert_eq!(wal.kernel.lock().unwrap().as_slice(), &[1]);
    }
}
