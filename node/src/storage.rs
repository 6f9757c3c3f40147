//! Durable storage on RocksDB.
//!
//! Three column families: `data` maps a key to its [`Clock`] (every sibling
//! and the causal history, rkyv-encoded), `hints` holds writes kept for other
//! nodes that were down (see `ringkv_repair::hints`; apart from `data`, so a
//! fallback never serves or repairs them as its own), and `meta` holds the
//! node's identity and its record of the cluster.
//!
//! ## Durability
//! Every `put` goes through RocksDB's write-ahead log before it returns, and
//! a replica acknowledges a write only after `put` returns, so a process
//! killed with `kill -9` loses no acknowledged write. With `--sync` each write
//! also waits for `fsync` of the WAL (RocksDB batches concurrent syncing
//! writers into one fsync: group commit), which additionally survives power
//! loss. Metadata is always written with fsync: it is small and rare, and a
//! node that forgot its cluster could not restart without seeds.

use std::path::{Path, PathBuf};

use ringkv_coordinator::replica::{Store, StoreError};
use ringkv_core::dvv::Clock;
use ringkv_core::wire::{decode_clock, encode_clock};
use ringkv_repair::hints::{HintBackend, HintError};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteOptions, DB};

use crate::error::NodeError;

const CF_DATA: &str = "data";
const CF_META: &str = "meta";
const CF_HINTS: &str = "hints";

/// A node's RocksDB database.
pub struct Storage {
    db: DB,
    path: PathBuf,
    sync: bool,
}

impl Storage {
    /// Opens (creating if needed) the database in `path`. `sync` makes every
    /// data write fsync the WAL before returning.
    pub fn open(path: &Path, sync: bool) -> Result<Self, NodeError> {
        std::fs::create_dir_all(path).map_err(|e| NodeError::Storage {
            path: path.to_path_buf(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        let cfs = [CF_DATA, CF_META, CF_HINTS]
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            let reason = e.to_string();
            if reason.contains("LOCK") || reason.contains("lock") {
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
        Ok(Storage {
            db,
            path: path.to_path_buf(),
            sync,
        })
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
        opts.set_sync(self.sync);
        opts
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether data writes fsync before returning.
    pub fn is_sync(&self) -> bool {
        self.sync
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
        self.db
            .put_cf_opt(cf, key.as_bytes(), value, &opts)
            .map_err(|e| NodeError::StorageIo {
                reason: e.to_string(),
            })
    }
}

const META_EPOCH: &str = "epoch";
const META_CLEAN_SHUTDOWN: &str = "clean_shutdown";
const META_LAST_RUN_SYNCED: &str = "last_run_synced";

impl Storage {
    /// Chooses the epoch this run mints dots under (see `NodeId::actor`) and
    /// marks the run as started.
    ///
    /// The previous epoch is kept only if every dot minted under it is
    /// certainly on disk: the last run shut down cleanly (and flushed its
    /// WAL), or it fsynced every write. A fresh data dir, or a crash of a run
    /// without `--sync` (whose WAL tail a power loss could have taken), starts
    /// a new epoch.
    pub fn begin_epoch(&self) -> Result<u32, NodeError> {
        let previous = self
            .meta_get(META_EPOCH)?
            .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
            .map(u32::from_le_bytes);
        let clean = self.meta_get(META_CLEAN_SHUTDOWN)?.as_deref() == Some(&[1]);
        let synced = self.meta_get(META_LAST_RUN_SYNCED)?.as_deref() == Some(&[1]);
        let epoch = match previous {
            Some(e) if clean || synced => e,
            _ => rand::random(),
        };
        self.meta_put(META_EPOCH, &epoch.to_le_bytes())?;
        self.meta_put(META_LAST_RUN_SYNCED, &[u8::from(self.sync)])?;
        self.meta_put(META_CLEAN_SHUTDOWN, &[0])?;
        Ok(epoch)
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

    fn put(&self, key: &[u8], clock: &Clock) -> Result<(), StoreError> {
        let cf = self.cf(CF_DATA);
        let opts = self.data_write_options();
        self.db
            .put_cf_opt(cf, key, encode_clock(clock), &opts)
            .map_err(|e| StoreError::Io {
                reason: e.to_string(),
            })
    }
}

fn hint_io(e: rocksdb::Error) -> HintError {
    HintError::Backend {
        reason: e.to_string(),
    }
}

/// Hints are written like data: through the WAL, fsynced with `--sync`.
impl HintBackend for Storage {
    fn get(&self, id: &[u8]) -> Result<Option<Vec<u8>>, HintError> {
        let cf = self.cf(CF_HINTS);
        self.db.get_cf(cf, id).map_err(hint_io)
    }

    fn put(&self, id: &[u8], value: &[u8]) -> Result<(), HintError> {
        let cf = self.cf(CF_HINTS);
        let opts = self.data_write_options();
        self.db.put_cf_opt(cf, id, value, &opts).map_err(hint_io)
    }

    fn delete(&self, id: &[u8]) -> Result<(), HintError> {
        let cf = self.cf(CF_HINTS);
        let opts = self.data_write_options();
        self.db.delete_cf_opt(cf, id, &opts).map_err(hint_io)
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, HintError> {
        let cf = self.cf(CF_HINTS);
        let from = after.unwrap_or(prefix);
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(from, Direction::Forward));
        for item in iter {
            let (id, value) = item.map_err(hint_io)?;
            if !id.starts_with(prefix) || out.len() == limit {
                break;
            }
            if Some(&id[..]) == after {
                continue;
            }
            out.push((id.into_vec(), value.into_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_core::dvv::{Payload, VersionVector};
    use ringkv_core::NodeId;

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
            Store::put(&s, b"k", &clock).unwrap();
        }
        let s = Storage::open(dir.path(), true).unwrap();
        assert_eq!(Store::get(&s, b"k").unwrap(), Some(clock));
        assert_eq!(Store::get(&s, b"missing").unwrap(), None);
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
            ids(s.scan(b"\x01a", None, 10).unwrap()),
            [b"\x01a1".to_vec(), b"\x01a2".to_vec(), b"\x01a3".to_vec()]
        );
        assert_eq!(
            ids(s.scan(b"\x01a", Some(b"\x01a1"), 1).unwrap()),
            [b"\x01a2".to_vec()]
        );
        HintBackend::delete(&s, b"\x01a2").unwrap();
        assert_eq!(ids(s.scan(b"", None, 100).unwrap()).len(), 4);
        assert_eq!(HintBackend::get(&s, b"\x01a2").unwrap(), None);
    }

    #[test]
    fn the_epoch_survives_only_clean_or_synced_runs() {
        let dir = tempfile::tempdir().unwrap();
        let first = Storage::open(dir.path(), false)
            .unwrap()
            .begin_epoch()
            .unwrap();
        // That run crashed (no clean shutdown) without --sync: new epoch.
        let s = Storage::open(dir.path(), false).unwrap();
        let second = s.begin_epoch().unwrap();
        assert_ne!(first, second);
        s.mark_clean_shutdown().unwrap();
        drop(s);
        let s = Storage::open(dir.path(), true).unwrap();
        assert_eq!(s.begin_epoch().unwrap(), second, "clean shutdown keeps it");
        drop(s);
        // A crashed --sync run lost nothing: same epoch.
        let s = Storage::open(dir.path(), false).unwrap();
        assert_eq!(s.begin_epoch().unwrap(), second);
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
