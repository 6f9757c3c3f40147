//! Durable storage on RocksDB.
//!
//! Five column families:
//! - `data` maps a key to its [`Clock`] (every sibling and the causal
//!   history, rkyv-encoded);
//! - `merkle` indexes the keys of `data` for anti-entropy:
//!   `stable_hash64(key)` (8 bytes, big-endian) then the key. A Merkle leaf
//!   is a range of hash prefixes, so listing a leaf is one range read of the
//!   index, then a read of each key's stored clock, whose bytes hash to its
//!   [`version_digest`](ringkv_repair::trees::version_digest). The entry
//!   only says that the key exists: it is written when the key is first
//!   stored and removed with it, so an overwrite, the common write, leaves
//!   it alone. (Data dirs from before kept the digest as the entry's value;
//!   it is ignored.) Rebuilding the trees reads all of `data`;
//! - `tombstones` maps each key whose clock holds only tombstones to when it
//!   was stored (ms since the Unix epoch), so tombstone collection finds
//!   them without a scan of `data`;
//! - `hints` holds writes kept for other nodes that were down (see
//!   `ringkv_repair::hints`; apart from `data`, so a fallback never serves
//!   or repairs them as its own);
//! - `meta` holds the node's identity, its record of the cluster, and the
//!   ring hand-over's state (`server/handover_store.rs`);
//! - `actors` maps a key to the per-key actor this replica mints its dots
//!   under (see `ReplicaService` in the coordinator): written with the
//!   key's first mint here, removed with the key.
//!
//! Invariant: `merkle`, `tombstones` and `actors` always match `data`: every
//! change to a key writes what it changes of them in one atomic
//! `WriteBatch`. (A reboot after a crash without `--sync` may lose a tail of
//! such batches from some column families and not others; the run after it
//! then begins a new epoch, whose actors no surviving `actors` entry names.
//! A crash of the process alone loses only batches still in RocksDB's WAL
//! buffer, all of a batch together, and nothing read from them has left
//! the process: see [`Storage::begin_epoch`].)
//!
//! ## Durability
//! Every `put` appends to RocksDB's write-ahead log, and a replica
//! acknowledges a write only after [`Storage::commit`] has handed that
//! record to the kernel, so a process killed with `kill -9` loses no
//! acknowledged write. Without `--sync` the WAL is flushed by hand
//! (`manual_wal_flush`), once for all the writes of requests runnable
//! together ([`crate::group_commit`]). With `--sync` each write flushes and
//! waits for `fsync` of the WAL itself (RocksDB batches concurrent syncing
//! writers into one fsync), which additionally survives power loss.
//! Metadata is always written with fsync: it is small and rare, and a node
//! that forgot its cluster could not restart without seeds.

use std::path::{Path, PathBuf};

use ringkv_coordinator::replica::{Store, StoreError};
use ringkv_core::dvv::Clock;
use ringkv_core::hash::stable_hash64;
use ringkv_core::wire::{decode_clock, encode_clock};
use ringkv_core::NodeId;
use ringkv_repair::anti_entropy::{is_deleted, LeafSource};
use ringkv_repair::hints::{HintBackend, HintError};
use ringkv_repair::trees::ReplicaTrees;
use ringkv_ring::Ring;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, MemtableFactory, Options, ReadOptions,
    SliceTransform, WriteBatch, WriteOptions, DB,
};

use crate::error::NodeError;
use crate::group_commit::GroupCommit;

const CF_DATA: &str = "data";
const CF_META: &str = "meta";
const CF_HINTS: &str = "hints";
const CF_MERKLE: &str = "merkle";
const CF_TOMBSTONES: &str = "tombstones";
/// Past this much WAL, RocksDB flushes the column families that hold the
/// oldest log file.
const MAX_TOTAL_WAL_BYTES: u64 = 512 * 1024 * 1024;
/// Key → the per-key actor this replica mints the key's dots under (see
/// `ReplicaService`); written with the key's first mint here, removed with
/// the key.
const CF_ACTORS: &str = "actors";

/// A node's RocksDB database.
pub struct Storage {
    db: DB,
    path: PathBuf,
    /// The WAL's group commit; `None` exactly with `--sync`, where every
    /// write flushes (and syncs) its own record.
    group: Option<GroupCommit>,
    /// Tests: this many tree rebuilds fail, as a read error would.
    #[cfg(test)]
    pub(crate) failing_rebuilds: std::sync::atomic::AtomicU32,
    /// Tests: tree rebuilds begun.
    #[cfg(test)]
    pub(crate) rebuilds_started: std::sync::atomic::AtomicU32,
    /// Tests: the keys the last rebuild's scan read before it ended.
    #[cfg(test)]
    keys_scanned: std::sync::atomic::AtomicU64,
    /// When the database was opened: the origin of `stalled_until_ns`.
    opened: std::time::Instant,
    /// Until when (ns after `opened`) writes go straight off the worker,
    /// after one met a write stall (see `write_through_stalls`); 0 when no
    /// such window is open.
    stalled_until_ns: std::sync::atomic::AtomicU64,
    /// Tests: writes run off the worker because of a write stall.
    #[cfg(test)]
    write_stalls: std::sync::atomic::AtomicU64,
    /// Tests: a key whose stored version a leaf listing cannot read.
    #[cfg(test)]
    unreadable: std::sync::Mutex<Option<Vec<u8>>>,
}

/// How long after a write met a write stall the next writes skip trying
/// without waiting (see `Storage::write_through_stalls`).
const STALL_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Buckets of the `data` memtable's hash table (RocksDB's default): 8 MiB
/// of each new memtable's arena, zeroed when the memtable is created.
const DATA_MEMTABLE_BUCKETS: usize = 1 << 20;

/// The `data` column family's prefix extractor: the whole key, so that
/// each bucket of the hash memtable holds the versions of one key.
fn whole_key(key: &[u8]) -> &[u8] {
    key
}

/// Per column family options.
///
/// `data` is only ever read by key (the read before every write, every
/// replica read), and listed in full only by tree rebuilds, the
/// re-indexing at startup and each memtable flush (which sorts a copy). So
/// its memtable is a hash of per-key skip lists instead of one skip list of
/// every version:
/// with one skip list, finding a key (to read it, or where to insert its
/// new version) took a cache miss per level, and under YCSB-A those two
/// searches were 13% of all CPU. Full listings must then ask for total
/// order ([`total_order`]). It also gets bloom filters: a key that is not
/// in the memtable would otherwise be looked up in every level-0 file in
/// turn.
fn cf_options(name: &str) -> Options {
    let mut opts = Options::default();
    if name == CF_ACTORS {
        // Most lookups of a key's actor come with a write; keep the misses
        // (keys this replica never wrote) off the disk.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
    }
    if name == CF_DATA {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        opts.set_prefix_extractor(SliceTransform::create("ringkv.whole_key", whole_key, None));
        opts.set_memtable_factory(MemtableFactory::HashSkipList {
            bucket_count: DATA_MEMTABLE_BUCKETS,
            height: 4,
            branching_factor: 4,
        });
    }
    opts
}

/// Read options for listing a column family in full, in key order. `data`
/// has a prefix extractor, and without total order an iterator over it
/// would only be defined within one key. A full listing reads each block
/// once, so it leaves the block cache to the hot keys.
/// How long one iterator of [`Storage::data_pages`] is read before a new
/// one takes over.
const ITERATOR_RENEW_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

fn total_order() -> ReadOptions {
    let mut opts = ReadOptions::default();
    opts.set_total_order_seek(true);
    opts.fill_cache(false);
    opts
}

/// What a whole RocksDB store always holds: the name of its current
/// manifest.
const STORE_MARKER: &str = "CURRENT";

/// Whether `name` is a file RocksDB keeps in a store's directory (or the
/// file system's own `lost+found`, at a mount point). A directory of only
/// these is a store, or one whose creation was cut short, never a user's.
fn is_store_entry(name: &str) -> bool {
    const NAMES: [&str; 4] = [STORE_MARKER, "IDENTITY", "LOCK", "lost+found"];
    const PREFIXES: [&str; 3] = ["LOG", "MANIFEST-", "OPTIONS-"];
    const SUFFIXES: [&str; 4] = [".log", ".sst", ".blob", ".dbtmp"];
    NAMES.contains(&name)
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Refuses a data dir that holds files no store has, before anything is
/// written there: a mistyped `--data-dir` pointing at someone's folder
/// must not get a store mixed into it. An absent or empty dir passes, as
/// do a whole store (whatever else lies beside it) and one whose creation
/// was cut short (only RocksDB's files); one that cannot be listed is left
/// to opening the store to report.
///
/// A start that fails later leaves the store it created. Removing it is
/// not safe: peers may have had replica writes acknowledged by it while it
/// joined, and another process may open the directory the moment this one
/// closes it. Such a store holds no cluster record, so the next start uses
/// it under any id.
pub(crate) fn check_data_dir(path: &Path) -> Result<(), NodeError> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Ok(());
    };
    let mut foreign = None;
    for entry in entries {
        let entry = entry.map_err(|e| NodeError::Storage {
            path: path.to_path_buf(),
            reason: format!("cannot list the directory: {e}"),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A whole store starts whatever else was put beside it: a restart
        // must not be refused for an operator's note in its directory.
        if name == STORE_MARKER {
            return Ok(());
        }
        if !is_store_entry(&name) {
            foreign.get_or_insert(name);
        }
    }
    match foreign {
        None => Ok(()),
        Some(entry) => Err(NodeError::ForeignDataDir {
            path: path.to_path_buf(),
            entry,
        }),
    }
}

/// Whether RocksDB's open error `reason` says another process holds the
/// store's LOCK file ("While lock file: …/LOCK: Resource temporarily
/// unavailable") or this one does ("lock hold by current process").
fn is_lock_held(reason: &str) -> bool {
    reason.contains("While lock file") || reason.contains("lock hold by")
}

impl Storage {
    /// Opens (creating if needed) the database in `path`. `sync` makes every
    /// data write fsync the WAL before returning.
    pub fn open(path: &Path, sync: bool) -> Result<Self, NodeError> {
        Self::open_tuned(path, sync, |_, _| {})
    }

    /// [`open`](Self::open), with each column family's options passed
    /// through `tune` (tests: a database that stalls its writes).
    fn open_tuned(
        path: &Path,
        sync: bool,
        tune: fn(&str, &mut Options),
    ) -> Result<Self, NodeError> {
        let refuse = |reason: String| NodeError::Storage {
            path: path.to_path_buf(),
            reason,
        };
        match (std::fs::symlink_metadata(path), std::fs::metadata(path)) {
            (_, Ok(meta)) if !meta.is_dir() => {
                return Err(refuse("it is a file, not a directory".into()))
            }
            (Ok(link), Err(_)) if link.file_type().is_symlink() => {
                let target = std::fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Err(refuse(format!(
                    "it is a link to {target}, which does not exist (a disk not mounted?)"
                )));
            }
            _ => {}
        }
        std::fs::create_dir_all(path)
            .map_err(|e| refuse(format!("cannot create the directory: {e}")))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        // Required by the hash memtable of `data`: one writer inserts at a
        // time (RocksDB still batches concurrent writers into one group).
        opts.set_allow_concurrent_memtable_write(false);
        // Without fsync, writes only buffer their WAL records and
        // `commit` flushes them for many writes at once.
        opts.set_manual_wal_flush(!sync);
        // Column families written rarely (`actors`, `merkle`, `meta`) would
        // otherwise keep old WAL files, and the replay at the next start,
        // until 4x all write buffers (several GB) had piled up.
        opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
        let cfs = [
            CF_DATA,
            CF_META,
            CF_HINTS,
            CF_MERKLE,
            CF_TOMBSTONES,
            CF_ACTORS,
        ]
        .map(|name| {
            let mut opts = cf_options(name);
            tune(name, &mut opts);
            ColumnFamilyDescriptor::new(name, opts)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            let reason = e.to_string();
            if is_lock_held(&reason) {
                NodeError::DataDirInUse {
                    path: path.to_path_buf(),
                }
            } else {
                NodeError::Storage {
                    path: path.to_path_buf(),
                    reason,
                }
            }
        })?;
        let storage = Storage {
            db,
            path: path.to_path_buf(),
            group: (!sync).then(GroupCommit::new),
            opened: std::time::Instant::now(),
            stalled_until_ns: Default::default(),
            #[cfg(test)]
            failing_rebuilds: Default::default(),
            #[cfg(test)]
            rebuilds_started: Default::default(),
            #[cfg(test)]
            keys_scanned: Default::default(),
            #[cfg(test)]
            write_stalls: Default::default(),
            #[cfg(test)]
            unreadable: Default::default(),
        };
        storage.index_existing_data()?;
        Ok(storage)
    }

    /// One of the column families opened in [`open`](Self::open).
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} is opened with the database"))
    }

    /// Data and hint writes: through the WAL, fsynced with `--sync`.
    fn data_write_options(&self) -> WriteOptions {
        let mut opts = WriteOptions::default();
        opts.set_sync(self.is_sync());
        opts
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a data or hint write, counted for the group commit.
    fn counted<T>(&self, write: impl FnOnce() -> T) -> T {
        match &self.group {
            Some(group) => group.write(write),
            None => write(),
        }
    }

    /// Writes a batch of data changes through the WAL (see
    /// [`commit`](Self::commit)). `batch` is called again if the first
    /// try meets a write stall (see [`write_through_stalls`](Self::write_through_stalls)).
    fn write_data(&self, batch: impl Fn() -> WriteBatch) -> Result<(), StoreError> {
        self.write_through_stalls(|opts| self.db.write_opt(batch(), opts))
            .map_err(|e| StoreError::Io {
                reason: e.to_string(),
            })
    }

    /// Runs a data or hint write (`write`, with the options to use). These
    /// run on the async workers (without `--sync`), and a RocksDB write
    /// stall (its flushes or compactions far behind) must not hold a
    /// worker: every task on it would wait, pings included, until peers
    /// count the node down. So the write is first tried with
    /// `no_slowdown`, which fails at once where RocksDB would delay or stop
    /// it; it is then run again, allowed to wait, with the worker's other
    /// tasks handed to another thread ([`off_the_worker`]), and so are the
    /// writes of the next [`STALL_WINDOW`] without a try: RocksDB charges
    /// a delayed write's share of its reduced rate even when `no_slowdown`
    /// refuses it, so trying every write would slow a slowdown further.
    /// Every write run off the worker counts in `ringkv_write_stalls_total`.
    /// A request whose write waits still takes as long: the stall is what
    /// slows writes down.
    fn write_through_stalls(
        &self,
        write: impl Fn(&WriteOptions) -> Result<(), rocksdb::Error>,
    ) -> Result<(), rocksdb::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut opts = self.data_write_options();
        let elapsed_ns = || self.opened.elapsed().as_nanos() as u64;
        // 0: no window open, and no clock read on the usual path.
        let until_ns = self.stalled_until_ns.load(Relaxed);
        if until_ns == 0 || elapsed_ns() >= until_ns {
            opts.set_no_slowdown(true);
            match self.counted(|| write(&opts)) {
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {}
                done => {
                    if until_ns != 0 {
                        // The window is over (unless a later one opened).
                        let _ = self
                            .stalled_until_ns
                            .compare_exchange(until_ns, 0, Relaxed, Relaxed);
                    }
                    return done;
                }
            }
            opts.set_no_slowdown(false);
            let window_ns = STALL_WINDOW.as_nanos() as u64;
            self.stalled_until_ns
                .fetch_max(elapsed_ns() + window_ns, Relaxed);
        }
        metrics::counter!("ringkv_write_stalls_total").increment(1);
        #[cfg(test)]
        self.write_stalls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        off_the_worker(|| self.counted(|| write(&opts)))
    }

    /// Returns once every WAL record buffered when this was called is in
    /// the kernel: the records of every write this request made or could
    /// have seen (see `group_commit`; with `--sync`, each write already
    /// waited for its fsync). Every replica answer waits for it (see
    /// `LocalReplica::handle`).
    pub async fn commit(&self) -> Result<(), StoreError> {
        match &self.group {
            Some(group) => group
                .commit(|| self.db.flush_wal(false))
                .await
                .map_err(|e| StoreError::Io {
                    reason: format!("flushing the write-ahead log: {e}"),
                }),
            None => Ok(()),
        }
    }

    /// Writes buffered but not yet flushed (0 with `--sync`).
    pub fn pending_writes(&self) -> u64 {
        self.group.as_ref().map_or(0, GroupCommit::pending)
    }

    /// Whether data writes fsync before returning.
    pub fn is_sync(&self) -> bool {
        self.group.is_none()
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, NodeError> {
        let cf = self.cf(CF_META);
        self.db
            .get_cf(cf, key.as_bytes())
            .map_err(|e| NodeError::StorageIo {
                reason: e.to_string(),
            })
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), NodeError> {
        let cf = self.cf(CF_META);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        // An fsync, and rare: off the worker, which a write stall could
        // otherwise hold too.
        off_the_worker(|| self.db.put_cf_opt(cf, key.as_bytes(), value, &opts)).map_err(|e| {
            NodeError::StorageIo {
                reason: e.to_string(),
            }
        })
    }
}

const META_EPOCH: &str = "epoch";
/// The fingerprints of the cluster keys the node last started with
/// (`ClusterKey::fingerprints`), comma-separated; absent or empty: none.
const META_CLUSTER_KEYS: &str = "cluster_keys";

impl Storage {
    /// The fingerprints of the cluster keys the node last started with.
    pub fn cluster_keys(&self) -> Result<Vec<String>, NodeError> {
        let stored = self.meta_get(META_CLUSTER_KEYS)?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&stored)
            .split(',')
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Records the fingerprints of the keys the node started with.
    pub fn set_cluster_keys(&self, fingerprints: &[String]) -> Result<(), NodeError> {
        self.meta_put(META_CLUSTER_KEYS, fingerprints.join(",").as_bytes())
    }
}
/// A stored version set aside as corrupt ([`Storage::quarantined`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub key: Vec<u8>,
    /// When it was set aside.
    pub set_aside_unix_ms: u64,
    /// The stored bytes, as found.
    pub bytes: Vec<u8>,
}

/// Where `meta` keeps the stored versions set aside as corrupt, by key.
const META_QUARANTINE_PREFIX: &[u8] = b"quarantine/";

/// The `meta` key of `key`'s version set aside as corrupt at `unix_ms`:
/// the time last, big-endian, so that every one is kept, in time order.
fn quarantine_key(key: &[u8], unix_ms: u64) -> Vec<u8> {
    [META_QUARANTINE_PREFIX, key, &unix_ms.to_be_bytes()].concat()
}
/// The secret behind this node's QUIC stateless resets (see
/// [`Storage::reset_secret`]).
const META_RESET_SECRET: &str = "reset_secret";
/// Its length, in bytes: an HMAC-SHA256 key of the hash's block size.
const RESET_SECRET_BYTES: usize = 64;
const META_CLEAN_SHUTDOWN: &str = "clean_shutdown";
const META_INCARNATION: &str = "incarnation";
const META_LAST_RUN_SYNCED: &str = "last_run_synced";
/// The kernel boot the last run started in (see [`current_boot_id`]).
const META_BOOT_ID: &str = "boot_id";

/// Where Linux gives the id of the running boot: a random UUID drawn at each
/// boot, the same for every process (and container) on that kernel.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The id of the kernel boot this process runs in; `None` where the kernel
/// does not say (not Linux), which [`Storage::begin_epoch`] treats as a
/// new boot.
pub fn current_boot_id() -> Option<Vec<u8>> {
    let id = std::fs::read(BOOT_ID_PATH).ok()?;
    let id = id.trim_ascii();
    (!id.is_empty()).then(|| id.to_vec())
}

impl Storage {
    /// The secret this node derives its QUIC stateless-reset tokens from,
    /// drawn at the first start and kept: a node restarted at its address
    /// then resets at once the connections its peers and clients still hold
    /// to its previous run, which would otherwise wait out their idle
    /// timeout, as packets the new run cannot answer.
    pub fn reset_secret(&self) -> Result<Vec<u8>, NodeError> {
        if let Some(secret) = self.meta_get(META_RESET_SECRET)? {
            if secret.len() == RESET_SECRET_BYTES {
                return Ok(secret);
            }
            tracing::warn!(
                bytes = secret.len(),
                "the stored stateless-reset secret has the wrong length; drawing a new one"
            );
        }
        use ring::rand::SecureRandom;
        let mut secret = vec![0u8; RESET_SECRET_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| NodeError::StorageIo {
                reason: "the system's random source failed".into(),
            })?;
        self.meta_put(META_RESET_SECRET, &secret)?;
        Ok(secret)
    }

    /// Chooses the epoch this run mints dots under (see `NodeId::actor`) and
    /// marks the run as started, in the kernel boot `boot_id`
    /// ([`current_boot_id`]).
    ///
    /// The previous epoch is kept only if every dot minted under it is
    /// certainly still here:
    /// - the last run shut down cleanly (and fsynced its WAL);
    /// - it fsynced every write (`--sync`);
    /// - or it crashed in this same boot of the kernel. No version leaves
    ///   the process before its WAL record has been handed to the kernel
    ///   (replicas answer after [`Storage::commit`], and hand-overs commit
    ///   each page they read), and the kernel's page cache outlives a
    ///   process (`kill -9`, a panic, the OOM killer): every dot another
    ///   node or a client may know is in the WAL this run recovers. Only a
    ///   reboot (a power loss, a kernel crash) may take an unsynced tail.
    ///
    /// A fresh data dir, or a run after a reboot that followed a crash of a
    /// run without `--sync`, starts a new epoch. Keeping the epoch matters:
    /// each new one gives every key this node writes afterwards one more
    /// actor, and a key's clock holds at most `CLOCK_ENTRIES_MAX`.
    ///
    /// What this cannot see is a store rolled back under it: a data dir
    /// restored from a copy or snapshot holds the meta of the run it was
    /// taken from, which may be clean, synced or of this boot, and the
    /// next run would mint again dots that run minted after the copy. Such
    /// a start must call [`Storage::begin_new_epoch`] (`--new-epoch`).
    pub fn begin_epoch(&self, boot_id: Option<&[u8]>) -> Result<u32, NodeError> {
        self.begin_epoch_with(boot_id, false)
    }

    /// Begins a new epoch whatever the last run was, in the kernel boot
    /// `boot_id` (see [`Storage::begin_epoch`]).
    pub fn begin_new_epoch(&self, boot_id: Option<&[u8]>) -> Result<u32, NodeError> {
        self.begin_epoch_with(boot_id, true)
    }

    fn begin_epoch_with(&self, boot_id: Option<&[u8]>, fresh: bool) -> Result<u32, NodeError> {
        let previous = self
            .meta_get(META_EPOCH)?
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map(u32::from_le_bytes);
        let clean = self.meta_get(META_CLEAN_SHUTDOWN)?.as_deref() == Some(&[1]);
        let synced = self.meta_get(META_LAST_RUN_SYNCED)?.as_deref() == Some(&[1]);
        let same_boot = boot_id.is_some() && self.meta_get(META_BOOT_ID)?.as_deref() == boot_id;
        let epoch = match previous {
            Some(_) if fresh => {
                tracing::info!("beginning a new epoch, as asked (--new-epoch)");
                rand::random()
            }
            Some(e) if clean || synced || same_boot => {
                if !(clean || synced) {
                    tracing::info!(
                        "the last run did not shut down cleanly, but the machine has not restarted since: keeping its epoch"
                    );
                }
                e
            }
            Some(_) => {
                tracing::info!(
                    "the last run did not shut down cleanly, and the machine may have restarted since: beginning a new epoch"
                );
                rand::random()
            }
            None => rand::random(),
        };
        self.meta_put(META_EPOCH, &epoch.to_le_bytes())?;
        self.meta_put(META_LAST_RUN_SYNCED, &[u8::from(self.is_sync())])?;
        // A boot that cannot be told must not match one stored before it.
        self.meta_put(META_BOOT_ID, boot_id.unwrap_or_default())?;
        self.meta_put(META_CLEAN_SHUTDOWN, &[0])?;
        Ok(epoch)
    }

    /// This start's incarnation: one more than the last start's (1 for a
    /// new data dir), stored before it is used, so a restart never reuses
    /// one (see `Member::incarnation`).
    pub fn next_incarnation(&self) -> Result<u64, NodeError> {
        let next = self.stored_incarnation()?.saturating_add(1);
        self.meta_put(META_INCARNATION, &next.to_le_bytes())?;
        Ok(next)
    }

    /// Raises the stored incarnation to `at_least` (if lower), so that the
    /// next start continues above it.
    pub fn raise_incarnation(&self, at_least: u64) -> Result<(), NodeError> {
        if self.stored_incarnation()? < at_least {
            self.meta_put(META_INCARNATION, &at_least.to_le_bytes())?;
        }
        Ok(())
    }

    /// The last incarnation stored (0 for a new data dir).
    fn stored_incarnation(&self) -> Result<u64, NodeError> {
        Ok(self
            .meta_get(META_INCARNATION)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes))
    }

    /// Makes every acknowledged write durable and records a clean shutdown,
    /// so the next run may keep this epoch.
    pub fn mark_clean_shutdown(&self) -> Result<(), NodeError> {
        self.db.flush_wal(true).map_err(|e| NodeError::StorageIo {
            reason: e.to_string(),
        })?;
        self.meta_put(META_CLEAN_SHUTDOWN, &[1])
    }
}

/// Set once every key of `data` has its `merkle` entry, values unused.
const META_INDEXED: &str = "merkle_index_v2";
/// Set by versions whose `merkle` entries held digests. Its keys all have
/// entries, so it counts as indexed; it is removed so that such a version,
/// started on this dir again, re-indexes rather than read empty values.
const META_INDEXED_V1: &str = "merkle_index_v1";

/// Keys whose tombstones are due, and the key to resume after (`None` at the end).
pub type TombstonePage = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// The `merkle` index key of a data key: its hash, then itself.
fn index_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&stable_hash64(key).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The [`version_digest`](ringkv_repair::trees::version_digest) of a
/// stored clock, from its stored bytes: they are the clock's one encoding,
/// which is what the digest hashes.
fn stored_digest(stored: &[u8]) -> u64 {
    stable_hash64(stored)
}

/// The digest a leaf listing gives a key whose stored version cannot be
/// read (see [`Storage::leaf_items`]). A stored version's digest equals it
/// with odds of 2^-64.
const UNREADABLE_DIGEST: u64 = u64::MAX;

/// A stored little-endian u64 (a time); `None` if malformed.
fn le_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}

/// Runs RocksDB's flush and compaction threads at the lowest CPU priority
/// (nice 19), for every database of the process (they share RocksDB's
/// default thread pools; each thread lowers itself at its next job).
///
/// A memtable flush takes tens of milliseconds of CPU, and the replicas of
/// a key flush at nearly the same moment since they take the same writes:
/// at normal priority three flushes took the cores from the request
/// workers and multiplied the open-loop p99 (`bench/RESULTS.md`, step 6).
/// At nice 19 they run on the cores' idle time instead. A node whose cores
/// never idle would fall behind on flushes until RocksDB stalls writes;
/// `--background-priority normal` keeps the default.
pub fn lower_background_priority() -> Result<(), NodeError> {
    let mut env = rocksdb::Env::new().map_err(io)?;
    env.lower_high_priority_thread_pool_cpu_priority();
    env.lower_thread_pool_cpu_priority();
    // What is in effect, for operators (absent: normal priority).
    metrics::gauge!("ringkv_background_priority_low").set(1.0);
    Ok(())
}

/// The earliest wall time a node accepts: 2026-01-01T00:00:00Z. A clock
/// before it is wrong (a machine without a real-time clock, before its
/// time sync), and tombstone stamps and hint ages taken from it would make
/// everything written meanwhile look decades old once the clock is set:
/// tombstones collected without their grace, hints dropped at once.
pub const CLOCK_FLOOR_UNIX_MS: u64 = 1_767_225_600_000;

/// An error if the wall clock, reading `now_ms`, is before
/// [`CLOCK_FLOOR_UNIX_MS`].
pub fn check_wall_clock(now_ms: u64) -> Result<(), NodeError> {
    if now_ms < CLOCK_FLOOR_UNIX_MS {
        return Err(NodeError::Config {
            reason: format!(
                "the wall clock reads {} s after 1970, before 2026-01-01: tombstone and hint times \
                 taken from it would be wrong once it is set; fix the clock (NTP) and start again",
                now_ms / 1000
            ),
        });
    }
    Ok(())
}

/// Wall-clock milliseconds since the Unix epoch (0 before 1970).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

/// A duration in whole milliseconds, saturating (rather than wrapping) past
/// `u64::MAX`.
pub(crate) fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn io(e: rocksdb::Error) -> NodeError {
    NodeError::StorageIo {
        reason: e.to_string(),
    }
}

impl Storage {
    /// Adds `key`'s new clock (already encoded) to `batch`, with its index
    /// entries. `previous` is the clock it replaces, if any. The `merkle`
    /// entry exists exactly while the key does, so only a new key writes
    /// one; the `tombstones` entry exists exactly while the stored clock is
    /// deleted, so it is removed only when the previous clock was.
    fn batch_put(
        &self,
        batch: &mut WriteBatch,
        key: &[u8],
        clock: &Clock,
        encoded: &[u8],
        previous: Option<&Clock>,
    ) {
        batch.put_cf(self.cf(CF_DATA), key, encoded);
        if previous.is_none() {
            batch.put_cf(self.cf(CF_MERKLE), index_key(key), []);
        }
        if is_deleted(clock) {
            batch.put_cf(self.cf(CF_TOMBSTONES), key, unix_ms().to_le_bytes());
        } else if previous.is_some_and(is_deleted) {
            batch.delete_cf(self.cf(CF_TOMBSTONES), key);
        }
    }

    /// Adds the removal of `key` to `batch`: its version and every entry
    /// that exists only while it does.
    fn batch_delete(&self, batch: &mut WriteBatch, key: &[u8]) {
        batch.delete_cf(self.cf(CF_DATA), key);
        batch.delete_cf(self.cf(CF_MERKLE), index_key(key));
        batch.delete_cf(self.cf(CF_TOMBSTONES), key);
        batch.delete_cf(self.cf(CF_ACTORS), key);
    }

    /// The versions set aside as corrupt ([`Store::quarantine`]), every
    /// one kept, by key and then time.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        let io = |e: rocksdb::Error| StoreError::Io {
            reason: e.to_string(),
        };
        let mut out = Vec::new();
        let listing = self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(META_QUARANTINE_PREFIX, rocksdb::Direction::Forward),
        );
        for item in listing {
            let (id, bytes) = item.map_err(io)?;
            let Some(rest) = id.strip_prefix(META_QUARANTINE_PREFIX) else {
                break;
            };
            let Some((key, at)) = rest.split_at_checked(rest.len().saturating_sub(8)) else {
                continue;
            };
            out.push(Quarantined {
                key: key.to_vec(),
                set_aside_unix_ms: at.try_into().map_or(0, u64::from_be_bytes),
                bytes: bytes.to_vec(),
            });
        }
        Ok(out)
    }

    /// Builds the `merkle` and `tombstones` entries of a data dir written
    /// before they existed. Runs once; a no-op on a new dir.
    fn index_existing_data(&self) -> Result<(), NodeError> {
        if self.meta_get(META_INDEXED)?.as_deref() == Some(&[1]) {
            return Ok(());
        }
        if self.meta_get(META_INDEXED_V1)?.as_deref() == Some(&[1]) {
            let mut batch = WriteBatch::default();
            batch.put_cf(self.cf(CF_META), META_INDEXED, [1]);
            batch.delete_cf(self.cf(CF_META), META_INDEXED_V1);
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            return self.db.write_opt(batch, &opts).map_err(io);
        }
        let mut batch = WriteBatch::default();
        let mut indexed = 0u64;
        let listing = self
            .db
            .iterator_cf_opt(self.cf(CF_DATA), total_order(), IteratorMode::Start);
        for item in listing {
            let (key, value) = item.map_err(io)?;
            let Ok(clock) = decode_clock(&value) else {
                tracing::warn!(key = %String::from_utf8_lossy(&key), "corrupt stored clock left out of the Merkle index");
                continue;
            };
            // A fresh index: as if every key were new.
            self.batch_put(&mut batch, &key, &clock, &value, None);
            indexed += 1;
            if batch.len() >= 30_000 {
                self.db.write(std::mem::take(&mut batch)).map_err(io)?;
            }
        }
        self.db.write(batch).map_err(io)?;
        if indexed > 0 {
            tracing::info!(keys = indexed, "indexed existing data for anti-entropy");
        }
        self.meta_put(META_INDEXED, &[1])
    }

    /// Rebuilds `trees` for `ring` from a snapshot of `data` while writes go
    /// on (see `ReplicaTrees::begin_rebuild`). Returns the number of keys
    /// scanned.
    ///
    /// It reads every stored clock, values included: the digests are not
    /// kept apart, which would cost every overwrite a second write.
    ///
    /// Setting `stop` (at shutdown) ends the scan at its next check, every
    /// [`STOP_CHECK_EVERY`] keys, with [`NodeError::TreeRebuildStopped`]
    /// and nothing installed: a scan of a large store takes minutes, and
    /// shutdown waits for it.
    pub fn rebuild_trees(
        &self,
        trees: &ReplicaTrees,
        ring: std::sync::Arc<Ring>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<u64, NodeError> {
        let mut guard = AbandonUnlessFinished {
            trees,
            finished: false,
        };
        let snapshot = trees.begin_rebuild(ring.clone(), || self.db.snapshot());
        #[cfg(test)]
        self.test_rebuild_begins()?;
        let cf = self.cf(CF_DATA);
        let mut failed = None;
        let mut scanned = 0u64;
        let items = snapshot
            .iterator_cf_opt(cf, total_order(), IteratorMode::Start)
            .map_while(|item| match item {
                Ok(entry) => Some(entry),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            })
            .map(|(key, stored)| (key.into_vec(), stored_digest(&stored)))
            .take_while(|_| {
                scanned += 1;
                !scanned.is_multiple_of(STOP_CHECK_EVERY)
                    || !stop.load(std::sync::atomic::Ordering::Relaxed)
            });
        let fresh = trees.build(ring, items);
        #[cfg(test)]
        self.keys_scanned
            .store(scanned, std::sync::atomic::Ordering::SeqCst);
        if let Some(e) = failed {
            return Err(io(e));
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            // The guard abandons the rebuild.
            return Err(NodeError::TreeRebuildStopped);
        }
        trees.finish_rebuild(fresh)?;
        guard.finished = true;
        Ok(scanned)
    }

    /// Tests: counts a rebuild, and fails it if `failing_rebuilds` says so.
    #[cfg(test)]
    fn test_rebuild_begins(&self) -> Result<(), NodeError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.rebuilds_started.fetch_add(1, SeqCst);
        let take = |n: u32| n.checked_sub(1);
        match self.failing_rebuilds.fetch_update(SeqCst, SeqCst, take) {
            Ok(_) => Err(NodeError::StorageIo {
                reason: "injected read error".to_string(),
            }),
            Err(_) => Ok(()),
        }
    }

    /// Reads every stored key and its clock (tombstones included) in key
    /// order, in pages of at most `limit` keys and `max_bytes` of stored
    /// clocks (a larger clock comes alone), handing each page to `page`
    /// until it returns false (`ringkv leave`, `ringkv cleanup`, the ring
    /// hand-over). A key whose stored versions are corrupt is skipped,
    /// logged and counted (`ringkv_corrupt_keys_skipped_total`).
    pub fn data_pages(
        &self,
        limit: usize,
        max_bytes: usize,
        page: impl FnMut(Vec<(Vec<u8>, Clock)>) -> bool,
    ) -> Result<(), NodeError> {
        self.data_pages_renewing(limit, max_bytes, ITERATOR_RENEW_AFTER, page)
            .map(|_| ())
    }

    /// [`Self::data_pages`], reading through a new iterator (from the key
    /// after the last one read) once the current one is `renew_after` old;
    /// returns how many iterators it used. Not one per page: a
    /// total-order iterator over the hash memtable copies the memtable
    /// first, and an iterator per page made a scan quadratic (35 s of CPU
    /// for 100,000 keys). Not one for the whole scan either: a paced one
    /// (the ring hand-over's) takes hours, and an iterator pins the SST
    /// files it began on, which compaction then cannot delete, so the
    /// disk would hold up to a second copy of the store meanwhile.
    fn data_pages_renewing(
        &self,
        limit: usize,
        max_bytes: usize,
        renew_after: std::time::Duration,
        mut page: impl FnMut(Vec<(Vec<u8>, Clock)>) -> bool,
    ) -> Result<usize, NodeError> {
        let mut current = Vec::new();
        let mut bytes = 0;
        // The last key read: a new iterator starts after it.
        let mut last: Option<Box<[u8]>> = None;
        let mut iterators = 0;
        'scan: loop {
            let mode = match &last {
                None => IteratorMode::Start,
                Some(key) => IteratorMode::From(key, Direction::Forward),
            };
            let opened = std::time::Instant::now();
            iterators += 1;
            let iter = self
                .db
                .iterator_cf_opt(self.cf(CF_DATA), total_order(), mode);
            for item in iter {
                let (key, stored) = item.map_err(io)?;
                if last.as_deref() == Some(&*key) {
                    continue;
                }
                // Hand the page over before a key that would pass the cap
                // (one large clock still goes alone), so that its batches
                // fit a frame.
                if current.len() == limit
                    || (bytes + stored.len() > max_bytes && !current.is_empty())
                {
                    if !page(std::mem::take(&mut current)) {
                        return Ok(iterators);
                    }
                    bytes = 0;
                }
                // Nothing can be handed on from a key whose versions cannot
                // be read, and it must not stop a leave or a cleanup for
                // good: its other replicas hold their own copies.
                match decode_clock(&stored) {
                    Ok(clock) => {
                        bytes += stored.len();
                        current.push((key.to_vec(), clock));
                    }
                    Err(e) => {
                        tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e, "skipping a key whose stored versions are corrupt");
                        metrics::counter!("ringkv_corrupt_keys_skipped_total").increment(1);
                    }
                }
                last = Some(key);
                if opened.elapsed() >= renew_after {
                    continue 'scan;
                }
            }
            break;
        }
        if !current.is_empty() {
            page(current);
        }
        Ok(iterators)
    }

    /// When `key`'s current tombstone was stored (ms since the Unix epoch);
    /// `None` if the key holds no tombstone-only clock.
    pub fn tombstone_stored_at(&self, key: &[u8]) -> Result<Option<u64>, NodeError> {
        let stored = self.db.get_cf(self.cf(CF_TOMBSTONES), key).map_err(io)?;
        Ok(stored.as_deref().and_then(le_u64))
    }

    /// Up to `limit` keys, after `after`, whose tombstone was stored at or
    /// before `cutoff_unix_ms`; and the last key looked at (to resume from),
    /// `None` once the end is reached.
    pub fn tombstones_due(
        &self,
        cutoff_unix_ms: u64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<TombstonePage, NodeError> {
        let cf = self.cf(CF_TOMBSTONES);
        let mode = match after {
            Some(a) => IteratorMode::From(a, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut due = Vec::new();
        let mut looked = 0;
        for item in self.db.iterator_cf(cf, mode) {
            let (key, value) = item.map_err(io)?;
            if Some(&key[..]) == after {
                continue;
            }
            looked += 1;
            let stored = le_u64(&value).unwrap_or(0);
            if stored <= cutoff_unix_ms {
                due.push(key.to_vec());
            }
            if looked == limit {
                return Ok((due, Some(key.to_vec())));
            }
        }
        Ok((due, None))
    }
}

/// How many scanned keys a tree rebuild reads between two checks of
/// whether shutdown asked it to stop.
const STOP_CHECK_EVERY: u64 = 4096;

/// Abandons the rebuild it guards unless it reached its finish, so that a
/// rebuild that fails or panics part way leaves the trees not ready and
/// records no more changes for it.
struct AbandonUnlessFinished<'a> {
    trees: &'a ReplicaTrees,
    finished: bool,
}

impl Drop for AbandonUnlessFinished<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.trees.abandon_rebuild();
        }
    }
}

/// Lists a leaf with one range read of the `merkle` index, and a read of
/// each key's stored clock for its digest.
impl LeafSource for Storage {
    fn leaf_items(
        &self,
        leaf: usize,
        leaf_bits: u32,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(Vec<u8>, u64)>, String> {
        let leaf_of_hash = |hash: u64| {
            if leaf_bits == 0 {
                0
            } else {
                (hash >> (64 - leaf_bits)) as usize
            }
        };
        let start = if leaf_bits == 0 {
            0u64
        } else {
            (leaf as u64) << (64 - leaf_bits)
        };
        let from = start.to_be_bytes();
        // Repair reads these clocks once; they should not evict hot ones.
        let mut no_fill = ReadOptions::default();
        no_fill.fill_cache(false);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_MERKLE),
            IteratorMode::From(&from, Direction::Forward),
        );
        for item in iter {
            let (index, _) = item.map_err(|e| e.to_string())?;
            let (Some(hash), Some(key)) = (index.get(..8), index.get(8..)) else {
                continue;
            };
            if leaf_of_hash(u64::from_be_bytes(hash.try_into().expect("8 bytes"))) != leaf {
                break;
            }
            if !wanted(key) {
                continue;
            }
            let read = self
                .db
                .get_pinned_cf_opt(self.cf(CF_DATA), key, &no_fill)
                .map_err(|e| e.to_string());
            #[cfg(test)]
            let read = match self.unreadable.lock().unwrap().as_deref() == Some(key) {
                true => Err("injected read error".to_string()),
                false => read,
            };
            let stored = match read {
                Ok(Some(stored)) => stored,
                // Removed since the index was read: nothing to list.
                Ok(None) => continue,
                Err(reason) => {
                    // Listed all the same, as differing from every readable
                    // copy: failing the listing would stop every exchange
                    // at this leaf for good, and the keys after it would
                    // never be compared. Repair then skips the key alone.
                    tracing::warn!(key = %String::from_utf8_lossy(key), %reason, "a key could not be read for an anti-entropy listing");
                    metrics::counter!("ringkv_anti_entropy_unreadable_keys_total").increment(1);
                    out.push((key.to_vec(), UNREADABLE_DIGEST));
                    continue;
                }
            };
            out.push((key.to_vec(), stored_digest(&stored)));
        }
        Ok(out)
    }
}

impl Store for Storage {
    fn get(&self, key: &[u8]) -> Result<Option<Clock>, StoreError> {
        let cf = self.cf(CF_DATA);
        let Some(bytes) = self.db.get_pinned_cf(cf, key).map_err(|e| StoreError::Io {
            reason: e.to_string(),
        })?
        else {
            return Ok(None);
        };
        decode_clock(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                reason: e.to_string(),
            })
    }

    fn put(&self, key: &[u8], previous: Option<&Clock>, clock: &Clock) -> Result<(), StoreError> {
        let encoded = encode_clock(clock);
        self.write_data(|| {
            let mut batch = WriteBatch::default();
            self.batch_put(&mut batch, key, clock, &encoded, previous);
            batch
        })
    }

    fn put_with_actor(
        &self,
        key: &[u8],
        previous: Option<&Clock>,
        clock: &Clock,
        actor: &NodeId,
    ) -> Result<(), StoreError> {
        let encoded = encode_clock(clock);
        self.write_data(|| {
            let mut batch = WriteBatch::default();
            self.batch_put(&mut batch, key, clock, &encoded, previous);
            batch.put_cf(self.cf(CF_ACTORS), key, actor.as_str());
            batch
        })
    }

    fn key_actor(&self, key: &[u8]) -> Result<Option<NodeId>, StoreError> {
        let stored = self
            .db
            .get_pinned_cf(self.cf(CF_ACTORS), key)
            .map_err(|e| StoreError::Io {
                reason: e.to_string(),
            })?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let actor = std::str::from_utf8(&stored)
            .ok()
            .and_then(|s| NodeId::new(s).ok());
        if actor.is_none() {
            // Taken as no record: the next write here takes a new actor and
            // records it, which is always safe; refusing would block the key.
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                "the recorded actor of a key is unreadable; its next write takes a new one"
            );
        }
        Ok(actor)
    }

    fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.write_data(|| {
            let mut batch = WriteBatch::default();
            self.batch_delete(&mut batch, key);
            batch
        })
    }

    /// Moves the stored bytes to `meta`, under [`quarantine_key`], in the
    /// batch that removes the key: a crash keeps either the key or its
    /// quarantined copy.
    fn quarantine(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let io = |e: rocksdb::Error| StoreError::Io {
            reason: e.to_string(),
        };
        let Some(stored) = self.db.get_cf(self.cf(CF_DATA), key).map_err(io)? else {
            return Ok(None);
        };
        // Every one is kept: a second within the same millisecond (the
        // caller holds the key's lock) takes the next free one.
        let mut at_ms = unix_ms();
        while self
            .db
            .get_pinned_cf(self.cf(CF_META), quarantine_key(key, at_ms))
            .map_err(io)?
            .is_some()
        {
            at_ms += 1;
        }
        let id = quarantine_key(key, at_ms);
        self.write_data(|| {
            let mut batch = WriteBatch::default();
            self.batch_delete(&mut batch, key);
            batch.put_cf(self.cf(CF_META), &id, &stored);
            batch
        })?;
        Ok(Some(stored_digest(&stored)))
    }

    fn wait(&self, wait: &mut dyn FnMut()) {
        off_the_worker(wait)
    }
}

/// Runs `f`, which may block for long, without holding an async worker:
/// on a multi-threaded runtime's worker its other tasks move to another
/// thread meanwhile (`block_in_place`). Elsewhere (a blocking thread, a
/// current-thread runtime, no runtime) `f` just runs.
pub(crate) fn off_the_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Drop for Storage {
    /// A clean close leaves nothing in the WAL buffer, acknowledged or not.
    fn drop(&mut self) {
        if self.group.is_some() {
            if let Err(e) = self.db.flush_wal(false) {
                tracing::warn!(error = %e, "flushing the write-ahead log at close failed");
            }
        }
    }
}

fn hint_io(e: rocksdb::Error) -> HintError {
    HintError::Backend {
        reason: e.to_string(),
    }
}

/// Hints are written like data: through the WAL, flushed by
/// [`Storage::commit`] (fsynced with `--sync`).
impl HintBackend for Storage {
    fn get(&self, id: &[u8]) -> Result<Option<Vec<u8>>, HintError> {
        let cf = self.cf(CF_HINTS);
        self.db.get_cf(cf, id).map_err(hint_io)
    }

    fn put(&self, id: &[u8], value: &[u8]) -> Result<(), HintError> {
        let cf = self.cf(CF_HINTS);
        self.write_through_stalls(|opts| self.db.put_cf_opt(cf, id, value, opts))
            .map_err(hint_io)
    }

    fn delete(&self, id: &[u8]) -> Result<(), HintError> {
        let cf = self.cf(CF_HINTS);
        self.write_through_stalls(|opts| self.db.delete_cf_opt(cf, id, opts))
            .map_err(hint_io)
    }

    fn wait(&self, wait: &mut dyn FnMut()) {
        off_the_worker(wait)
    }

    /// A WAL flush past the group commit's books: they then only count
    /// the writes as pending until the next commit flushes (nothing) again.
    fn make_durable(&self) -> Result<(), HintError> {
        match self.group {
            Some(_) => self.db.flush_wal(false).map_err(hint_io),
            None => Ok(()),
        }
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, HintError> {
        let cf = self.cf(CF_HINTS);
        let from = after.unwrap_or(prefix);
        let mut out = Vec::new();
        let mut bytes = 0;
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(from, Direction::Forward));
        for item in iter {
            let (id, value) = item.map_err(hint_io)?;
            if !id.starts_with(prefix) || out.len() == limit || bytes >= max_bytes {
                break;
            }
            if Some(&id[..]) == after {
                continue;
            }
            bytes += value.len();
            out.push((id.into_vec(), value.into_vec()));
        }
        Ok(out)
    }
}

/// Bytes in the WAL files of a data dir, as the kernel has them (tests).
#[cfg(test)]
pub(crate) fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::dvv::{Payload, VersionVector};
    use ringkv_core::NodeId;

    /// A node refuses to start on a wall clock before 2026 (one not yet
    /// set), naming the clock; today's clock passes.
    #[test]
    fn a_wall_clock_before_the_floor_is_refused() {
        let e = check_wall_clock(86_400_000).unwrap_err().to_string();
        assert!(e.contains("wall clock reads 86400 s after 1970"), "{e}");
        assert!(e.contains("fix the clock"), "{e}");
        assert!(check_wall_clock(CLOCK_FLOOR_UNIX_MS - 1).is_err());
        check_wall_clock(CLOCK_FLOOR_UNIX_MS).unwrap();
        check_wall_clock(unix_ms()).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_reaches_the_log_file_when_committed_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        s.commit().await.unwrap();
        let before = wal_bytes(dir.path());
        let clock = value(&"x".repeat(4096), &Clock::new(), "a");
        Store::put(&s, b"k", None, &clock).unwrap();
        assert_eq!(s.pending_writes(), 1);
        assert!(
            wal_bytes(dir.path()) < before + 4096,
            "without --sync a put only buffers its WAL record"
        );
        s.commit().await.unwrap();
        assert_eq!(s.pending_writes(), 0);
        assert!(
            wal_bytes(dir.path()) >= before + 4096,
            "a committed put is in the log file"
        );
    }

    /// Hints read for delivery are made durable first: the flush puts a
    /// buffered hint write in the log file.
    #[tokio::test(flavor = "current_thread")]
    async fn make_durable_puts_buffered_hint_writes_in_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        s.commit().await.unwrap();
        let before = wal_bytes(dir.path());
        HintBackend::put(&s, b"hint", &[7u8; 4096]).unwrap();
        assert!(wal_bytes(dir.path()) < before + 4096, "buffered");
        HintBackend::make_durable(&s).unwrap();
        assert!(wal_bytes(dir.path()) >= before + 4096, "in the log file");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn with_sync_every_put_is_in_the_log_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), true).unwrap();
        let before = wal_bytes(dir.path());
        let clock = value(&"x".repeat(4096), &Clock::new(), "a");
        Store::put(&s, b"k", None, &clock).unwrap();
        assert_eq!(s.pending_writes(), 0);
        assert!(wal_bytes(dir.path()) >= before + 4096);
    }

    #[test]
    fn a_dir_written_before_the_index_is_indexed_in_full() {
        use ringkv_repair::trees::version_digest;
        let dir = tempfile::tempdir().unwrap();
        let mut expected = std::collections::BTreeMap::new();
        let s = Storage::open(dir.path(), false).unwrap();
        for k in 0..200 {
            let key = format!("k{k}").into_bytes();
            let clock = value("v", &Clock::new(), "a");
            Store::put(&s, &key, None, &clock).unwrap();
            expected.insert(key, version_digest(&clock));
        }
        // As an older ringkv left it: data, but no index.
        let (from, to) = (vec![0u8; 8], vec![0xffu8; 9]);
        s.db.delete_range_cf(s.cf(CF_MERKLE), from, to).unwrap();
        s.db.delete_cf(s.cf(CF_META), META_INDEXED).unwrap();
        s.db.delete_cf(s.cf(CF_META), META_INDEXED_V1).unwrap();
        assert!(s.leaf_items(0, 0, &|_| true).unwrap().is_empty());
        // What `open` does for such a dir, here while every key is still in
        // the (hash) memtable, whose listing needs total order.
        s.index_existing_data().unwrap();
        let listed: std::collections::BTreeMap<_, _> =
            s.leaf_items(0, 0, &|_| true).unwrap().into_iter().collect();
        assert_eq!(listed, expected);
    }

    /// A key whose stored version cannot be read is listed all the same,
    /// with a digest no readable copy has, so that one bad key does not
    /// fail its leaf's listing (and every exchange at that leaf).
    #[test]
    fn a_key_that_cannot_be_read_is_listed_as_differing() {
        use ringkv_repair::trees::version_digest;
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for k in 0..20 {
            let key = format!("k{k}").into_bytes();
            let clock = value("v", &Clock::new(), "a");
            Store::put(&s, &key, None, &clock).unwrap();
            expected.insert(key, version_digest(&clock));
        }
        *s.unreadable.lock().unwrap() = Some(b"k7".to_vec());
        expected.insert(b"k7".to_vec(), UNREADABLE_DIGEST);
        let listed: std::collections::BTreeMap<_, _> =
            s.leaf_items(0, 0, &|_| true).unwrap().into_iter().collect();
        assert_eq!(listed, expected);
    }

    /// A dir indexed by a version that kept digests in the index: its keys
    /// all have entries, so it is not indexed again; the digests are
    /// ignored; and the old marker goes, so that version would re-index.
    #[test]
    fn a_dir_whose_index_held_digests_counts_as_indexed_and_loses_the_old_marker() {
        use ringkv_repair::trees::version_digest;
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for k in 0..50 {
            let key = format!("k{k}").into_bytes();
            let clock = value("v", &Clock::new(), "a");
            Store::put(&s, &key, None, &clock).unwrap();
            // What that version stored: an 8-byte digest (here a stale one).
            s.db.put_cf(s.cf(CF_MERKLE), index_key(&key), 7u64.to_le_bytes())
                .unwrap();
            expected.insert(key, version_digest(&clock));
        }
        s.db.delete_cf(s.cf(CF_META), META_INDEXED).unwrap();
        s.meta_put(META_INDEXED_V1, &[1]).unwrap();
        s.index_existing_data().unwrap();
        assert_eq!(s.meta_get(META_INDEXED).unwrap(), Some(vec![1]));
        assert_eq!(s.meta_get(META_INDEXED_V1).unwrap(), None);
        let listed: std::collections::BTreeMap<_, _> =
            s.leaf_items(0, 0, &|_| true).unwrap().into_iter().collect();
        assert_eq!(listed, expected, "digests come from the stored clocks");
    }

    #[test]
    fn clocks_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut clock = Clock::new();
        clock.update(
            &VersionVector::new(),
            Payload::Value(b"v".to_vec()),
            &NodeId::new("a").unwrap(),
        );
        {
            let s = Storage::open(dir.path(), false).unwrap();
            Store::put(&s, b"k", None, &clock).unwrap();
        }
        let s = Storage::open(dir.path(), true).unwrap();
        assert_eq!(Store::get(&s, b"k").unwrap(), Some(clock));
        assert_eq!(Store::get(&s, b"missing").unwrap(), None);
    }

    /// A key's recorded actor stays through merges and restarts and goes
    /// with the key (see `ReplicaService`).
    #[test]
    fn a_keys_actor_lives_and_dies_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let actor = NodeId::new("a.00000001.0000000f").unwrap();
        let mut clock = Clock::new();
        clock.update(&VersionVector::new(), Payload::Value(b"v".to_vec()), &actor);
        {
            let s = Storage::open(dir.path(), false).unwrap();
            assert_eq!(s.key_actor(b"k").unwrap(), None);
            s.put_with_actor(b"k", None, &clock, &actor).unwrap();
            let mut merged = clock.clone();
            merged.update(
                &VersionVector::new(),
                Payload::Tombstone,
                &NodeId::new("b").unwrap(),
            );
            Store::put(&s, b"k", Some(&clock), &merged).unwrap();
            assert_eq!(
                s.key_actor(b"k").unwrap(),
                Some(actor.clone()),
                "a merge keeps it"
            );
        }
        let s = Storage::open(dir.path(), false).unwrap();
        assert_eq!(s.key_actor(b"k").unwrap(), Some(actor), "reopened");
        Store::delete(&s, b"k").unwrap();
        assert_eq!(s.key_actor(b"k").unwrap(), None, "removed with the key");
        // An unreadable record counts as none: the next write takes a new
        // actor rather than being refused for good.
        s.db.put_cf(s.cf(CF_ACTORS), b"k2", [0xff, 0xfe]).unwrap();
        assert_eq!(s.key_actor(b"k2").unwrap(), None);
    }

    #[test]
    fn hint_scans_stay_in_their_prefix_and_resume_after_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        for id in [&b"\x01a1"[..], b"\x01a2", b"\x01a3", b"\x01b1", b"\x02aa1"] {
            HintBackend::put(&s, id, b"v").unwrap();
        }
        let ids =
            |page: Vec<(Vec<u8>, Vec<u8>)>| page.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            ids(s.scan(b"\x01a", None, 10, usize::MAX).unwrap()),
            [b"\x01a1".to_vec(), b"\x01a2".to_vec(), b"\x01a3".to_vec()]
        );
        assert_eq!(
            ids(s.scan(b"\x01a", Some(b"\x01a1"), 1, usize::MAX).unwrap()),
            [b"\x01a2".to_vec()]
        );
        // One-byte values: a page ends with the entry that reaches 2 bytes.
        assert_eq!(
            ids(s.scan(b"\x01a", None, 10, 2).unwrap()),
            [b"\x01a1".to_vec(), b"\x01a2".to_vec()]
        );
        HintBackend::delete(&s, b"\x01a2").unwrap();
        assert_eq!(ids(s.scan(b"", None, 100, usize::MAX).unwrap()).len(), 4);
        assert_eq!(HintBackend::get(&s, b"\x01a2").unwrap(), None);
    }

    #[test]
    fn the_epoch_survives_clean_synced_or_same_boot_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (boot_a, boot_b) = (Some(&b"boot-a"[..]), Some(&b"boot-b"[..]));
        let first = Storage::open(dir.path(), false)
            .unwrap()
            .begin_epoch(boot_a)
            .unwrap();
        // That run crashed (no clean shutdown) without --sync, and the
        // machine rebooted since: new epoch.
        let s = Storage::open(dir.path(), false).unwrap();
        let second = s.begin_epoch(boot_b).unwrap();
        assert_ne!(first, second);
        drop(s);
        // It crashed too, but the kernel (and its page cache) is the same.
        let s = Storage::open(dir.path(), false).unwrap();
        assert_eq!(s.begin_epoch(boot_b).unwrap(), second, "same boot keeps it");
        drop(s);
        // A kernel that does not say which boot it is counts as a new one,
        // and so does the next known boot after it.
        let s = Storage::open(dir.path(), false).unwrap();
        let third = s.begin_epoch(None).unwrap();
        assert_ne!(third, second);
        drop(s);
        let s = Storage::open(dir.path(), false).unwrap();
        let fourth = s.begin_epoch(boot_b).unwrap();
        assert_ne!(fourth, third, "an unknown boot matches nothing");
        s.mark_clean_shutdown().unwrap();
        drop(s);
        let s = Storage::open(dir.path(), true).unwrap();
        assert_eq!(
            s.begin_epoch(boot_a).unwrap(),
            fourth,
            "clean shutdown keeps it"
        );
        drop(s);
        // A crashed --sync run lost nothing: same epoch after a reboot.
        let s = Storage::open(dir.path(), false).unwrap();
        assert_eq!(s.begin_epoch(boot_b).unwrap(), fourth);
        drop(s);
        // A restored copy may be older than its meta says: asked, a new one.
        let s = Storage::open(dir.path(), false).unwrap();
        let fifth = s.begin_new_epoch(boot_b).unwrap();
        assert_ne!(fifth, fourth);
        drop(s);
        let s = Storage::open(dir.path(), false).unwrap();
        assert_eq!(s.begin_epoch(boot_b).unwrap(), fifth, "and it is kept");
    }

    #[test]
    fn this_machine_names_its_boot() {
        // The e2e tests' kill -9 restarts rely on it (Linux only).
        if cfg!(target_os = "linux") {
            let id = current_boot_id().expect("Linux gives a boot id");
            assert_eq!(current_boot_id(), Some(id), "stable within a boot");
        }
    }

    fn ring() -> std::sync::Arc<Ring> {
        let ids = ["n1", "n2", "n3", "n4"].map(|n| (NodeId::new(n).unwrap(), 16));
        std::sync::Arc::new(Ring::new(ids, 3).unwrap())
    }

    /// One scan in pages: by count, by bytes (a clock above the cap alone),
    /// in key order, and stopping when told to.
    #[test]
    fn data_pages_cover_every_key_once_in_bounded_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        for i in 0..10 {
            let size = if i == 5 { 5000 } else { 10 };
            Store::put(
                &s,
                format!("k{i}").as_bytes(),
                None,
                &value(&"x".repeat(size), &Clock::new(), "a"),
            )
            .unwrap();
        }
        let pages = |limit: usize, max_bytes: usize| {
            let mut pages: Vec<Vec<String>> = Vec::new();
            s.data_pages(limit, max_bytes, |page| {
                pages.push(
                    page.into_iter()
                        .map(|(k, _)| String::from_utf8(k).unwrap())
                        .collect(),
                );
                true
            })
            .unwrap();
            pages
        };
        let by_count = pages(4, usize::MAX);
        assert_eq!(by_count.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(
            by_count.concat(),
            (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>()
        );
        // With a 1 KiB cap the 5,000-byte clock of k5 comes alone.
        let by_bytes = pages(100, 1024);
        assert!(by_bytes.contains(&vec!["k5".to_string()]), "{by_bytes:?}");
        assert_eq!(by_bytes.concat().len(), 10);
        let mut calls = 0;
        s.data_pages(3, usize::MAX, |_| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1);
    }

    /// A scan renews its iterator as it goes (here after every key), each
    /// starting after the last key read: every key still comes once, in
    /// order, and a key written after the scan began, ahead of where it is,
    /// is seen (one iterator for the whole scan would not see it).
    #[test]
    fn a_scan_through_renewed_iterators_reads_every_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        let put = |key: &str| {
            Store::put(&s, key.as_bytes(), None, &value("v", &Clock::new(), "a")).unwrap();
        };
        for i in 0..6 {
            put(&format!("k{i}"));
        }
        let mut seen = Vec::new();
        let iterators = s
            .data_pages_renewing(2, usize::MAX, std::time::Duration::ZERO, |page| {
                if seen.is_empty() {
                    put("k9");
                }
                seen.extend(page.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()));
                true
            })
            .unwrap();
        assert_eq!(seen, ["k0", "k1", "k2", "k3", "k4", "k5", "k9"]);
        assert!(iterators >= 7, "{iterators} iterators");
    }

    /// A stored version that does not decode is moved to `meta`, bytes and
    /// all, in one batch with the key's removal (its index entry and actor
    /// go too), and the replica takes writes for the key again.
    #[test]
    fn a_corrupt_version_is_quarantined_and_the_key_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Storage::open(dir.path(), false).unwrap());
        let replica = ringkv_coordinator::replica::ReplicaService::new(
            NodeId::new("n1").unwrap(),
            s.clone(),
            10,
        );
        let blind = VersionVector::new();
        replica
            .update(b"k", &blind, Payload::Value(b"old".to_vec()))
            .unwrap();
        assert!(s.key_actor(b"k").unwrap().is_some());
        let garbage = [0xde, 0xad, 0xbe, 0xef];
        s.db.put_cf(s.cf(CF_DATA), b"k", garbage).unwrap();
        assert!(matches!(
            Store::get(&*s, b"k"),
            Err(StoreError::Corrupt { .. })
        ));

        let written = replica
            .update(b"k", &blind, Payload::Value(b"new".to_vec()))
            .unwrap();
        assert_eq!(written.sibling_count(), 1, "the lost version is not in it");
        assert_eq!(Store::get(&*s, b"k").unwrap(), Some(written));
        let quarantined = s.quarantined().unwrap();
        assert_eq!(quarantined.len(), 1);
        let set_aside = &quarantined[0];
        assert_eq!(
            (set_aside.key.as_slice(), set_aside.bytes.as_slice()),
            (&b"k"[..], &garbage[..])
        );
        assert!(set_aside.set_aside_unix_ms.abs_diff(unix_ms()) < 60_000);
        // The key is indexed once, as the new version's.
        let indexed =
            s.db.iterator_cf(s.cf(CF_MERKLE), IteratorMode::Start)
                .count();
        assert_eq!(indexed, 1);

        // Nothing stored: nothing to set aside.
        assert_eq!(Store::quarantine(&*s, b"absent").unwrap(), None);
        assert_eq!(s.quarantined().unwrap().len(), 1);
        // A second corruption keeps the first one's bytes too.
        s.db.put_cf(s.cf(CF_DATA), b"k", [0xba, 0xad]).unwrap();
        assert!(replica.read(b"k").unwrap().is_none());
        let kept: Vec<Vec<u8>> = s
            .quarantined()
            .unwrap()
            .into_iter()
            .map(|q| q.bytes)
            .collect();
        assert_eq!(kept, [garbage.to_vec(), vec![0xba, 0xad]]);
    }

    /// A key whose stored versions cannot be read is skipped, so one bad
    /// key does not stop a leave or a cleanup for good.
    #[test]
    fn data_pages_skip_a_corrupt_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        for key in ["a", "c"] {
            Store::put(&s, key.as_bytes(), None, &value("v", &Clock::new(), "n1")).unwrap();
        }
        s.db.put_cf(s.cf(CF_DATA), b"b", [0xde, 0xad]).unwrap();
        let mut keys = Vec::new();
        s.data_pages(10, usize::MAX, |page| {
            keys.extend(page.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()));
            true
        })
        .unwrap();
        assert_eq!(keys, ["a", "c"]);
    }

    fn value(v: &str, context: &Clock, actor: &str) -> Clock {
        let mut c = context.clone();
        c.update(
            &context.context(),
            Payload::Value(v.as_bytes().to_vec()),
            &NodeId::new(actor).unwrap(),
        );
        c
    }

    /// The `tombstones` entry goes when a live write replaces a tombstone,
    /// also through a replica with no change observer.
    #[test]
    fn a_live_write_over_a_tombstone_clears_its_entry_without_an_observer() {
        use ringkv_coordinator::replica::ReplicaService;
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Storage::open(dir.path(), false).unwrap());
        let replica = ReplicaService::new(NodeId::new("a").unwrap(), s.clone(), 10);
        replica
            .overwrite(b"k", Payload::Value(b"v".to_vec()))
            .unwrap();
        replica.overwrite(b"k", Payload::Tombstone).unwrap();
        assert_eq!(
            s.tombstones_due(u64::MAX, None, 10).unwrap().0,
            vec![b"k".to_vec()]
        );
        replica
            .overwrite(b"k", Payload::Value(b"w".to_vec()))
            .unwrap();
        assert!(s.tombstones_due(u64::MAX, None, 10).unwrap().0.is_empty());
    }

    #[test]
    fn the_merkle_and_tombstone_indexes_follow_every_change() {
        use ringkv_repair::trees::version_digest;
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for k in 0..300 {
            let key = format!("k{k}").into_bytes();
            let clock = value("v", &Clock::new(), "a");
            Store::put(&s, &key, None, &clock).unwrap();
            expected.insert(key, version_digest(&clock));
        }
        // Overwrite one, delete (tombstone) another, remove a third. The
        // overwrite leaves k1's index entry as it was (a planted value).
        let planted = 0xdead_u64.to_le_bytes();
        s.db.put_cf(s.cf(CF_MERKLE), index_key(b"k1"), planted)
            .unwrap();
        let older = Store::get(&s, b"k1").unwrap().unwrap();
        let newer = value("w", &older, "b");
        Store::put(&s, b"k1", Some(&older), &newer).unwrap();
        expected.insert(b"k1".to_vec(), version_digest(&newer));
        let entry = s.db.get_cf(s.cf(CF_MERKLE), index_key(b"k1")).unwrap();
        assert_eq!(entry.as_deref(), Some(planted.as_slice()), "not rewritten");
        let live = Store::get(&s, b"k2").unwrap().unwrap();
        let mut tomb = live.clone();
        tomb.update(
            &tomb.context(),
            Payload::Tombstone,
            &NodeId::new("a").unwrap(),
        );
        Store::put(&s, b"k2", Some(&live), &tomb).unwrap();
        expected.insert(b"k2".to_vec(), version_digest(&tomb));
        Store::delete(&s, b"k3").unwrap();
        expected.remove(b"k3".as_slice());

        for bits in [0, 4, 8] {
            let mut listed = std::collections::BTreeMap::new();
            for leaf in 0..(1usize << bits) {
                for (key, digest) in s.leaf_items(leaf, bits, &|_| true).unwrap() {
                    assert_eq!(ringkv_repair::merkle::leaf_of(&key, bits), leaf);
                    listed.insert(key, digest);
                }
            }
            assert_eq!(listed, expected, "leaf listings with {bits} bits");
        }
        // An entry exactly for each stored key, none left over.
        let count = |cf| {
            s.db.iterator_cf_opt(s.cf(cf), total_order(), IteratorMode::Start)
                .count()
        };
        assert_eq!(count(CF_MERKLE), 299);
        assert_eq!(count(CF_DATA), 299);
        let not_k1 = |key: &[u8]| key != b"k1";
        let listed = s.leaf_items(0, 0, &not_k1).unwrap();
        assert_eq!(listed.len(), 298, "what is not wanted is left out");
        let (due, next) = s.tombstones_due(u64::MAX, None, 100).unwrap();
        assert_eq!((due, next), (vec![b"k2".to_vec()], None));
        let (due, _) = s.tombstones_due(0, None, 100).unwrap();
        assert!(due.is_empty(), "not yet past the cutoff");
        Store::put(&s, b"k2", Some(&tomb), &value("again", &tomb, "a")).unwrap();
        assert!(
            s.tombstones_due(u64::MAX, None, 100).unwrap().0.is_empty(),
            "written again"
        );
    }

    /// After `lower_background_priority`, the thread that ran a flush runs
    /// at nice 19.
    #[test]
    fn a_flush_runs_at_the_lowest_cpu_priority_once_lowered() {
        lower_background_priority().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        Store::put(&s, b"k", None, &value("v", &Clock::new(), "n1")).unwrap();
        s.db.flush_cf(s.cf(CF_DATA)).unwrap();
        let nice_of_flushers: Vec<i64> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?.path();
                let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                if comm.trim() != "rocksdb:high" {
                    return None;
                }
                // Field 19 of stat is the nice value; the command name
                // (field 2, in parentheses) comes before it.
                let stat = std::fs::read_to_string(t.join("stat")).ok()?;
                let after_name = &stat[stat.rfind(')')? + 2..];
                after_name.split(' ').nth(16)?.parse().ok()
            })
            .collect();
        assert!(nice_of_flushers.contains(&19), "{nice_of_flushers:?}");
    }

    /// Polls `done` until it holds, failing the test at a 30 s deadline.
    fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A write that meets a RocksDB write stall does not hold its async
    /// worker: on a runtime of one worker, a second write to the same key
    /// (waiting for the key's lock) and then an unrelated task still run
    /// while the first waits; once raised triggers end the stall, both
    /// writes finish and both values are kept, and writes soon run on
    /// their worker again.
    #[test]
    fn a_stalled_write_does_not_hold_its_worker() {
        use ringkv_coordinator::replica::{ReplicaError, ReplicaService};
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        // Writes stop at two level-0 files of `data`, and no count of
        // files starts a compaction (RocksDB: a trigger below 0). Memtables
        // are small, so that writes soon fill and flush them.
        let s = std::sync::Arc::new(
            Storage::open_tuned(dir.path(), false, |name, opts| {
                if name == CF_DATA {
                    opts.set_level_zero_file_num_compaction_trigger(-1);
                    opts.set_level_zero_slowdown_writes_trigger(2);
                    opts.set_level_zero_stop_writes_trigger(2);
                    opts.set_write_buffer_size(1 << 20);
                }
            })
            .unwrap(),
        );
        // (A manual flush would wait for good rather than cause the stall.)
        let mut no_slowdown = WriteOptions::default();
        no_slowdown.set_no_slowdown(true);
        let level0_files = || {
            s.db.property_int_value_cf(s.cf(CF_DATA), "rocksdb.num-files-at-level0")
                .unwrap()
                .unwrap_or(0)
        };
        let mut filler = 0u32;
        poll_until("writes stop at two level-0 files", || {
            filler += 1;
            let key = format!("filler{filler}");
            match s
                .db
                .put_cf_opt(s.cf(CF_DATA), key, [0u8; 64 << 10], &no_slowdown)
            {
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => level0_files() >= 2,
                written => {
                    written.unwrap();
                    false
                }
            }
        });
        let replica = std::sync::Arc::new(ReplicaService::new(
            NodeId::new("n1").unwrap(),
            s.clone(),
            10,
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        /// Ends the stall however the test ends (before the runtime is
        /// dropped, which waits for its workers): a manual compaction
        /// would wait for good too, as it flushes first.
        struct EndStall<'a>(&'a Storage);
        impl Drop for EndStall<'_> {
            fn drop(&mut self) {
                let triggers = [
                    ("level0_slowdown_writes_trigger", "100"),
                    ("level0_stop_writes_trigger", "100"),
                ];
                let ended = self.0.db.set_options_cf(self.0.cf(CF_DATA), &triggers);
                ended.expect("the stall ends");
            }
        }
        let end_stall = EndStall(&s);
        let write = |v: &'static str| {
            let replica = replica.clone();
            runtime.spawn(async move {
                replica.update(b"k", &Default::default(), Payload::Value(v.into()))
            })
        };
        let first = write("1");
        poll_until("the first write meets the stall", || {
            s.write_stalls.load(SeqCst) >= 1
        });
        let second = write("2");
        let other = runtime.spawn(async {});
        poll_until("a task behind the stalled writes runs", || {
            other.is_finished()
        });
        assert!(!first.is_finished() && !second.is_finished(), "both wait");
        drop(end_stall);
        let finish = |write: tokio::task::JoinHandle<Result<Clock, ReplicaError>>| {
            let deadline = std::time::Duration::from_secs(30);
            let written = runtime.block_on(async { tokio::time::timeout(deadline, write).await });
            written.expect("the write finishes").unwrap().unwrap();
        };
        finish(first);
        finish(second);
        let stored = Store::get(&*s, b"k").unwrap().unwrap();
        assert_eq!(
            stored.values().count(),
            2,
            "concurrent writes, two siblings"
        );
        // Writes soon go back to trying without waiting.
        poll_until("a write runs on its worker again", || {
            let stalls = s.write_stalls.load(SeqCst);
            Store::put(&*s, b"later", None, &value("v", &Clock::new(), "n1")).unwrap();
            s.write_stalls.load(SeqCst) == stalls
        });
    }

    /// The `stop` flag of rebuilds that run to the end.
    static GO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// A rebuild told to stop (shutdown) ends at its next check, fails and
    /// installs nothing; the next one, not told, succeeds.
    #[test]
    fn a_stopped_rebuild_ends_early_and_installs_nothing() {
        use ringkv_repair::merkle::DEFAULT_LEAF_BITS;
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        const KEYS: u64 = 3 * STOP_CHECK_EVERY;
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), false).unwrap();
        for k in 0..KEYS {
            let clock = value("v", &Clock::new(), "n1");
            Store::put(&s, format!("k{k}").as_bytes(), None, &clock).unwrap();
        }
        let trees =
            ReplicaTrees::new(NodeId::new("n1").unwrap(), ring(), DEFAULT_LEAF_BITS).unwrap();
        let stop = AtomicBool::new(true);
        assert!(matches!(
            s.rebuild_trees(&trees, ring(), &stop),
            Err(NodeError::TreeRebuildStopped)
        ));
        assert_eq!(s.keys_scanned.load(SeqCst), STOP_CHECK_EVERY);
        assert!(!trees.is_ready());
        stop.store(false, SeqCst);
        assert_eq!(s.rebuild_trees(&trees, ring(), &stop).unwrap(), KEYS);
        assert!(trees.is_ready());
    }

    #[test]
    fn trees_rebuilt_while_writes_go_on_match_a_quiet_rebuild() {
        use ringkv_coordinator::replica::ReplicaService;
        use ringkv_repair::merkle::DEFAULT_LEAF_BITS;
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Storage::open(dir.path(), false).unwrap());
        let me = NodeId::new("n1").unwrap();
        let trees =
            std::sync::Arc::new(ReplicaTrees::new(me.clone(), ring(), DEFAULT_LEAF_BITS).unwrap());
        let replica = std::sync::Arc::new(
            ReplicaService::new(me.clone(), s.clone(), 10).with_observer(trees.clone()),
        );
        for k in 0..500 {
            replica
                .update(
                    format!("k{k}").as_bytes(),
                    &Default::default(),
                    Payload::Value(b"0".to_vec()),
                )
                .unwrap();
        }
        // Rebuilds then scan table files as well as the memtable.
        s.db.flush_cf(s.cf(CF_DATA)).unwrap();
        let writer = {
            let replica = replica.clone();
            std::thread::spawn(move || {
                for i in 0..3000 {
                    let key = format!("k{}", (i * 7) % 600);
                    let current = replica.read(key.as_bytes()).unwrap();
                    // Some keys go away (as a collected tombstone does).
                    if let Some(current) = current.as_ref().filter(|_| i % 5 == 0) {
                        assert!(replica
                            .remove_if_unchanged(key.as_bytes(), current)
                            .unwrap());
                        continue;
                    }
                    let current = current.unwrap_or_default();
                    replica
                        .update(
                            key.as_bytes(),
                            &current.context(),
                            Payload::Value(i.to_string().into_bytes()),
                        )
                        .unwrap();
                }
            })
        };
        let mut rebuilds = 0;
        while !writer.is_finished() || rebuilds == 0 {
            s.rebuild_trees(&trees, ring(), &GO).unwrap();
            rebuilds += 1;
        }
        writer.join().unwrap();
        assert!(trees.is_ready());
        let quiet = ReplicaTrees::new(me.clone(), ring(), DEFAULT_LEAF_BITS).unwrap();
        s.rebuild_trees(&quiet, ring(), &GO).unwrap();
        // And by hand, from each key's clock: the digests a rebuild reads
        // from the stored bytes are the ones replicas compute from clocks.
        let by_hand = ReplicaTrees::new(me, ring(), DEFAULT_LEAF_BITS).unwrap();
        by_hand.begin_rebuild(ring(), || ());
        let items = (0..600).filter_map(|k| {
            let key = format!("k{k}").into_bytes();
            let clock = Store::get(&*s, &key).unwrap()?;
            Some((key, ringkv_repair::trees::version_digest(&clock)))
        });
        let fresh = by_hand.build(ring(), items);
        by_hand.finish_rebuild(fresh).unwrap();
        for peer in ["n2", "n3", "n4"] {
            let peer = NodeId::new(peer).unwrap();
            assert_eq!(
                trees.tree_for(&peer),
                quiet.tree_for(&peer),
                "{peer} after {rebuilds} rebuilds"
            );
            assert_eq!(quiet.tree_for(&peer), by_hand.tree_for(&peer), "{peer}");
        }
    }

    /// Only RocksDB's words for a held LOCK file mean another node: a
    /// corrupt block's message has "lock" in it too, and must be shown.
    #[test]
    fn only_a_held_lock_file_reads_as_a_dir_in_use() {
        assert!(is_lock_held(
            "IO error: While lock file: /d/LOCK: Resource temporarily unavailable"
        ));
        assert!(is_lock_held(
            "IO error: lock hold by current process, acquire time 1 acquiring thread 2: /d/LOCK: No locks available"
        ));
        assert!(!is_lock_held(
            "Corruption: block checksum mismatch: stored = 1, computed = 2 in /d/000012.sst"
        ));
    }

    #[test]
    fn a_second_open_of_the_same_dir_names_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Storage::open(dir.path(), false).unwrap();
        let err = Storage::open(dir.path(), false)
            .err()
            .expect("second open must fail");
        assert!(matches!(err, NodeError::DataDirInUse { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("in use by another running ringkv node"));
    }
}
