//! A scan of this node's whole store, a page at a time, for the hand-overs
//! that send what it holds to other nodes (`ringkv leave`, cleanup).

use std::sync::Arc;

use ringkv_core::dvv::Clock;
use tokio::task::JoinHandle;

use crate::error::NodeError;
use crate::storage::Storage;

/// A page of stored keys with their versions.
pub(super) type StoredPage = Vec<(Vec<u8>, Clock)>;

/// The pages of a scan of the store: at most `REPAIR_BATCH_MAX` keys and
/// about `READ_BATCH_REPLY_BYTES` each, read on the blocking pool a few
/// pages ahead.
///
/// A page is handed out only once every write it may reflect is in the
/// kernel ([`Storage::commit`]), as replicas answer only then: a version
/// read from the WAL buffer and sent on, then lost with it in a `kill -9`,
/// would let the next run, which keeps the epoch (see
/// [`Storage::begin_epoch`]), mint one of its dots again.
pub(super) struct StoredPages {
    pages: tokio::sync::mpsc::Receiver<StoredPage>,
    /// Ends with the read's outcome once the pages are taken, or once
    /// `pages` is dropped.
    reader: JoinHandle<Result<(), NodeError>>,
    storage: Arc<Storage>,
    /// Why the scan stopped early, if a commit failed.
    failed: Option<String>,
}

impl StoredPages {
    /// Starts reading `storage`'s keys.
    pub(super) fn scan(storage: Arc<Storage>) -> Self {
        let (pages_tx, pages) = tokio::sync::mpsc::channel(2);
        let reader = {
            let storage = storage.clone();
            tokio::task::spawn_blocking(move || {
                storage.data_pages(
                    ringkv_core::wire::REPAIR_BATCH_MAX,
                    ringkv_core::wire::READ_BATCH_REPLY_BYTES,
                    |page| pages_tx.blocking_send(page).is_ok(),
                )
            })
        };
        StoredPages {
            pages,
            reader,
            storage,
            failed: None,
        }
    }

    /// The next page; `None` at the end of the store, or once a commit
    /// failed ([`StoredPages::finish`] says which).
    pub(super) async fn next(&mut self) -> Option<StoredPage> {
        if self.failed.is_some() {
            return None;
        }
        let page = self.pages.recv().await?;
        match self.storage.commit().await {
            Ok(()) => Some(page),
            Err(e) => {
                self.failed = Some(e.to_string());
                None
            }
        }
    }

    /// How the scan ended: `Err` with the reason if the store could not be
    /// read or its WAL flushed.
    pub(super) async fn finish(self) -> Result<(), String> {
        if let Some(reason) = self.failed {
            // Dropping the receiver ends the reader at its next page.
            return Err(reason);
        }
        match self.reader.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use ringkv_coordinator::replica::Store;
    use ringkv_core::dvv::Payload;
    use ringkv_core::NodeId;

    use super::*;

    /// A page is handed out only once the writes it shows are in the
    /// kernel: a write still in the WAL buffer when the page was read is
    /// flushed by then.
    #[tokio::test]
    async fn a_page_comes_out_only_once_its_writes_are_in_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let mut clock = Clock::new();
        let actor = NodeId::new("n1.00000001.00000001").unwrap();
        clock.update(&clock.context(), Payload::Value(b"v".to_vec()), &actor);
        Store::put(&*storage, b"k", None, &clock).unwrap();
        assert_eq!(storage.pending_writes(), 1, "buffered, not flushed");
        let mut pages = StoredPages::scan(storage.clone());
        let page = pages.next().await.expect("one page");
        assert_eq!(page, vec![(b"k".to_vec(), clock)]);
        assert_eq!(storage.pending_writes(), 0, "flushed before it came out");
        assert!(pages.next().await.is_none());
        pages.finish().await.unwrap();
    }
}
