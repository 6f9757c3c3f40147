//! Durable storage on RocksDB.
//!
//! Two column families: `data` maps a key to its [`Clock`] (every sibling and
//! the causal history, rkyv-encoded), `meta` holds the node's identity and
//! its record of the cluster. Hints and Merkle state get families of their own
//! when they arrive.
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
use rocksdb::{ColumnFamilyDescriptor, Options, WriteOptions, DB};

use crate::error::NodeError;

const CF_DATA: &str = "data";
const CF_META: &str = "meta";

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
        let cfs =
            [CF_DATA, CF_META].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether data writes fsync before returning.
    pub fn is_sync(&self) -> bool {
        self.sync
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, NodeError> {
        let cf = self
            .db
            .cf_handle(CF_META)
            .expect("meta column family exists");
        self.db
            .get_cf(cf, key.as_bytes())
            .map_err(|e| NodeError::StorageIo {
                reason: e.to_string(),
            })
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), NodeError> {
        let cf = self
            .db
            .cf_handle(CF_META)
            .expect("meta column family exists");
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .put_cf_opt(cf, key.as_bytes(), value, &opts)
            .map_err(|e| NodeError::StorageIo {
                reason: e.to_string(),
            })
    }
}

impl Store for Storage {
    fn get(&self, key: &[u8]) -> Result<Option<Clock>, StoreError> {
        let cf = self
            .db
            .cf_handle(CF_DATA)
            .expect("data column family exists");
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
        let cf = self
            .db
            .cf_handle(CF_DATA)
            .expect("data column family exists");
        let mut opts = WriteOptions::default();
        opts.set_sync(self.sync);
        self.db
            .put_cf_opt(cf, key, encode_clock(clock), &opts)
            .map_err(|e| StoreError::Io {
                reason: e.to_string(),
            })
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
            s.put(b"k", &clock).unwrap();
        }
        let s = Storage::open(dir.path(), true).unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(clock));
        assert_eq!(s.get(b"missing").unwrap(), None);
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
