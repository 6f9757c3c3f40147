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
//! A commit returns once a flush that *began after it was called* has
//! succeeded. That covers every record the request could have seen: its own
//! writes returned before it commits, and RocksDB appends a write's record
//! to the WAL buffer before the write becomes visible (before its memtable
//! insert and the publication of its sequence number), so any version a
//! read saw, from this thread or another, had its record in the buffer by
//! then. A write still under way is not waited for: one that a read could
//! see is already in the buffer, and one held back by a RocksDB write stall
//! (in `PreprocessWrite`, before its record is written) cannot have been
//! seen. (An earlier version waited for every write begun before the
//! commit to finish, so a stalled write held every read's answer on the
//! node for as long as the stall lasted.)
//!
//! Invariants: `flushes_done` only grows, and only to the number of a flush
//! that succeeded (flushes are numbered as they begin, one leader at a
//! time), so `flushes_done >= n` means flush `n` succeeded and so did every
//! flush begun before it. A failed flush advances nothing: every waiter it
//! would have covered tries again (and, the WAL being broken, fails).
//! Separately, each write is counted before (`started`) and after
//! (`finished`), and `flushed` is a value of `finished` read before a
//! successful flush began: so `flushed >= started` (read later) means every
//! write begun by then is in the kernel, which lets a commit with nothing
//! new to flush return at once, and gives [`GroupCommit::pending`].
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
    /// Flushes begun (or skipped as having nothing to flush), numbered
    /// from 1.
    flushes_begun: AtomicU64,
    /// The number of the last flush that succeeded.
    flushes_done: AtomicU64,
    /// Whether a leader is flushing (or about to).
    leading: AtomicBool,
    /// Woken when a leader is done, successful or not.
    done: Notify,
}

/// Counts a write as finished when dropped.
struct WriteFinished<'a>(&'a GroupCommit);

impl Drop for WriteFinished<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Clears `leading` and wakes the waiters however the leader's turn ends,
/// including when its future is dropped mid-yield.
struct Leadership<'a>(&'a GroupCommit);

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        self.0.leading.store(false, Ordering::Release);
        self.0.done.notify_waiters();
    }
}

impl GroupCommit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs one write, counted before and after (whatever its outcome,
    /// even a panic: a write counted as started but never as finished
    /// would keep every later commit from returning without a flush).
    pub fn write<T>(&self, write: impl FnOnce() -> T) -> T {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _finished = WriteFinished(self);
        write()
    }

    /// Writes begun but not yet flushed.
    pub fn pending(&self) -> u64 {
        let started = self.started.load(Ordering::Acquire);
        started.saturating_sub(self.flushed.load(Ordering::Acquire))
    }

    /// Whether every write begun so far is in the kernel.
    fn all_flushed(&self) -> bool {
        self.flushed.load(Ordering::SeqCst) >= self.started.load(Ordering::SeqCst)
    }

    /// Returns once every record in the WAL buffer when this was called is
    /// in the kernel (see the module docs), running `flush` itself if no
    /// flush begun since is under way. An error is the flush's.
    pub async fn commit<E>(&self, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let need = self.flushes_begun.load(Ordering::SeqCst) + 1;
        loop {
            if self.flushes_done.load(Ordering::SeqCst) >= need || self.all_flushed() {
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
                let _leadership = Leadership(self);
                // Requests that are already runnable write first and join
                // this flush.
                tokio::task::yield_now().await;
                // The number first: a commit that this flush is to cover
                // read `flushes_begun` before it, so its own writes (which
                // returned before it) are in `finished` as read below, and
                // a skip cannot leave them out. Then `finished` before
                // `started`: a write that starts and ends between the two
                // reads makes this flush, not skip it.
                let number = self.flushes_begun.fetch_add(1, Ordering::SeqCst) + 1;
                let upto = self.finished.load(Ordering::SeqCst);
                let started = self.started.load(Ordering::SeqCst);
                let before = self.flushed.load(Ordering::SeqCst);
                // Nothing can be buffered when every write begun has
                // finished and was flushed; a write under way may have
                // appended its record already.
                if upto > before || started > upto {
                    metrics::counter!("ringkv_wal_flushes_total").increment(1);
                    flush()?;
                    self.flushed.fetch_max(upto, Ordering::SeqCst);
                    metrics::histogram!("ringkv_wal_flush_writes")
                        .record(upto.saturating_sub(before) as f64);
                }
                self.flushes_done.fetch_max(number, Ordering::SeqCst);
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
    /// thread has made but not yet counted as finished: its record is in
    /// the buffer, and the read's commit flushes it. It does not wait for
    /// that write to return: a write stalled by RocksDB (before its record
    /// is written, so nobody can have seen it) would otherwise hold every
    /// answer on the node until the stall ended.
    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_flushes_a_write_still_under_way_without_waiting_for_it() {
        for appended in [true, false] {
            let group = Arc::new(GroupCommit::new());
            let wal = Arc::new(Wal::default());
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
            let writer = {
                let (group, wal) = (group.clone(), wal.clone());
                std::thread::spawn(move || {
                    group.write(|| {
                        // A write that got its record in, or one stalled
                        // before it.
                        if appended {
                            wal.buffer.lock().unwrap().push(1);
                        }
                        started_tx.send(()).unwrap();
                        finish_rx.recv().unwrap();
                    })
                })
            };
            started_rx.recv().unwrap();
            let reader = spawn_commit(&group, &wal);
            finishes(reader, "the commit waited for a write under way").await;
            let kernel = wal.kernel.lock().unwrap().clone();
            assert_eq!(kernel, if appended { vec![1] } else { vec![] });
            assert_eq!(group.pending(), 1, "the write is not counted as flushed");
            // Once it returns, the next commit flushes (and counts) it.
            finish_tx.send(()).unwrap();
            writer.join().unwrap();
            wal.buffer.lock().unwrap().push(2);
            finishes(spawn_commit(&group, &wal), "a later commit").await;
            assert_eq!(group.pending(), 0);
            assert!(wal.kernel.lock().unwrap().contains(&2));
        }
    }

    /// A commit called while a flush is under way waits for the next one:
    /// the one under way may have begun before the commit's record was in
    /// the buffer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_waits_for_a_flush_begun_after_it() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        wal.append(&group, 1);
        // Flush 1 is begun and done, as far as the counters go, but this
        // commit came after it began.
        group.flushes_begun.store(1, Ordering::SeqCst);
        let need_next = spawn_commit(&group, &wal);
        group.flushes_done.store(1, Ordering::SeqCst);
        finishes(need_next, "the commit leads the next flush").await;
        assert_eq!(wal.calls.load(Ordering::SeqCst), 1, "it flushed itself");
        assert_eq!(*wal.kernel.lock().unwrap(), [1]);
    }

    /// Writers on several threads, each committing after its write: every
    /// commit returns with its own record in the kernel. (A stress test of
    /// the protocol across threads. It does not pin the leader's order, flush
    /// number before counters: the interleaving that order guards against
    /// needs a leader with nothing left to flush, preempted at one exact
    /// instruction, and tried here it did not show; the argument is in
    /// `commit`.)
    #[test]
    fn commits_on_many_threads_each_cover_their_own_record() {
        let group = Arc::new(GroupCommit::new());
        let wal = Arc::new(Wal::default());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (group, wal) = (group.clone(), wal.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    for i in 0..2_000u64 {
                        let record = t * 1_000_000 + i;
                        wal.append(&group, record);
                        rt.block_on(group.commit(|| wal.flush())).unwrap();
                        assert!(
                            wal.kernel.lock().unwrap().contains(&record),
                            "record {record} acknowledged while still buffered"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(group.pending(), 0);
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
