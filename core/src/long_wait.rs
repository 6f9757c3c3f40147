//! Taking a lock whose holder may be blocked for long.
//!
//! A replica's stores run on an async runtime's worker threads, and a
//! RocksDB write stall can hold a write (and the locks around it) for
//! seconds. Another request that then blocks on one of those locks would
//! hold its worker, and every task queued on it, pings included. So a lock
//! that may be held across a store write is tried first, and only when it
//! is taken does the caller wait, through a [`LongWait`] that the store
//! provides (the node hands the worker's other tasks to another thread
//! meanwhile; tests and the simulator just wait).

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, TryLockError};

/// Runs a wait that may block for long (the closure it is given).
pub type LongWait<'a> = &'a dyn Fn(&mut dyn FnMut());

/// Locks `mutex`, through `wait` if it is taken. Poison is ignored: a
/// holder that panicked leaves nothing half done that these locks guard.
pub fn lock<'a, T>(mutex: &'a Mutex<T>, wait: LongWait<'_>) -> MutexGuard<'a, T> {
    take(mutex.try_lock(), || mutex.lock(), wait)
}

/// Takes `lock` shared, through `wait` if that cannot be done at once.
pub fn read<'a, T>(lock: &'a RwLock<T>, wait: LongWait<'_>) -> RwLockReadGuard<'a, T> {
    take(lock.try_read(), || lock.read(), wait)
}

/// The guard `tried` holds, or else the one `blocking` takes inside `wait`.
fn take<G>(
    tried: Result<G, TryLockError<G>>,
    blocking: impl Fn() -> Result<G, PoisonError<G>>,
    wait: LongWait<'_>,
) -> G {
    match tried {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            let mut guard = None;
            wait(&mut || guard = Some(blocking().unwrap_or_else(PoisonError::into_inner)));
            // A wait that did not run the closure leaves the plain one.
            guard.unwrap_or_else(|| blocking().unwrap_or_else(PoisonError::into_inner))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A free lock is taken without the wait; a taken one through it.
    #[test]
    fn only_a_taken_lock_goes_through_the_wait() {
        let waits = Cell::new(0);
        let wait = |f: &mut dyn FnMut()| {
            waits.set(waits.get() + 1);
            f()
        };
        let mutex = Mutex::new(1);
        assert_eq!(*lock(&mutex, &wait), 1);
        let rw = RwLock::new(2);
        assert_eq!(*read(&rw, &wait), 2);
        assert_eq!(waits.get(), 0);

        std::thread::scope(|scope| {
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let (tx, rx) = std::sync::mpsc::channel();
            let (m, r) = (&mutex, &rw);
            scope.spawn(move || {
                let held = m.lock().unwrap();
                let written = r.write().unwrap();
                held_tx.send(()).unwrap();
                // Each released once the main thread is inside its wait.
                rx.recv().unwrap();
                drop(held);
                rx.recv().unwrap();
                drop(written);
            });
            held_rx.recv().unwrap();
            let wait = |f: &mut dyn FnMut()| {
                waits.set(waits.get() + 1);
                tx.send(()).unwrap();
                f()
            };
            assert_eq!(*lock(&mutex, &wait), 1);
            assert_eq!(*read(&rw, &wait), 2);
        });
        assert_eq!(waits.get(), 2);
    }
}
