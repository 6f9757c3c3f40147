//! Short scheduler slices for the threads that carry requests.
//!
//! Linux's EEVDF scheduler gives every runnable thread a virtual deadline
//! one *slice* after it becomes eligible and runs the earliest deadline.
//! The default slice is about 0.7 ms × (1 + log2 CPUs), so a thread that
//! wakes while others run its CPU waits until one of them has used up its
//! slice. Since Linux 6.12 a thread may ask for its own slice
//! (`sched_attr.sched_runtime` under `SCHED_OTHER` or `SCHED_BATCH`,
//! which the kernel clamps to 0.1–100 ms), and a woken thread with a
//! shorter slice has the earlier deadline, so it preempts the running one
//! instead of queueing behind it.
//!
//! A quorum request crosses several threads in several processes (client,
//! coordinator, replicas), each woken by the one before. Where they share
//! cores, as a test cluster does or a node sharing its machine, every
//! wait behind another thread's slice is in the request's latency, and the
//! longest of those waits make the tail (bench/RESULTS.md, session 40).
//! A slice changes only how soon a woken thread runs and how long it may
//! keep the CPU before the next deadline wins: the share of CPU it gets
//! is its nice weight, as before.
//!
//! A new thread starts with the slice of the thread that created it, so
//! `ringkv` asks once, on its main thread before any other thread starts,
//! and every thread of the process has the slice: the runtime's, the
//! emulated links' timer, the bench's pacer, and RocksDB's background
//! threads, which still yield to requests because they run at nice 19
//! (a slice changes when a thread runs, its nice weight how much). A
//! process started with reset-on-fork set (`chrt --reset-on-fork`) gives
//! its other threads the default instead.
//!
//! Not a Dynamo-paper idea; the paper's latency section (6.1) is about
//! the same thing, though: the 99.9th percentile, not the mean.

use std::time::Duration;

/// The slice `ringkv` asks for unless told otherwise (`--sched-slice-us`):
/// the shortest the kernel allows.
pub const DEFAULT_SLICE_US: u64 = 100;

/// The range the kernel clamps a requested slice to, in microseconds;
/// `--sched-slice-us` takes this or 0 (the kernel's default).
pub const SLICE_RANGE_US: std::ops::RangeInclusive<u64> = 100..=100_000;

/// Why a thread did not get the slice it asked for.
#[derive(Debug, thiserror::Error)]
pub enum SchedSliceError {
    /// The kernel refused the call (a seccomp filter, a thread gone).
    #[error("{call} failed: {source}")]
    Syscall {
        call: &'static str,
        source: std::io::Error,
    },
    /// The call succeeded but the kernel reports no slice: before 6.12
    /// it ignores the field.
    #[error("the kernel reports no slice for the thread after {requested_us} µs was asked for (custom slices need Linux 6.12 or later)")]
    NotKept { requested_us: u64 },
    /// Real-time, deadline and idle threads are not scheduled by slices.
    #[error("the thread runs under scheduling policy {policy} (real-time, deadline or idle), which has no slice to shorten")]
    NotFair { policy: u32 },
    /// A thread id beyond what the kernel's pid type holds.
    #[error("{tid} is not a thread id")]
    BadTid { tid: u32 },
    /// Slices are Linux's.
    #[error("custom scheduler slices need Linux")]
    NotLinux,
}

/// Asks the kernel for `slice` for the calling thread, keeping its policy,
/// nice value and reset-on-fork flag, and returns the slice the kernel
/// then reports (the request clamped to 0.1–100 ms; zero gives the
/// kernel's default back). A thread with reset-on-fork set passes the
/// default, not its slice, to the threads it starts. Only `SCHED_OTHER` and `SCHED_BATCH`
/// threads have slices; a thread under another policy is left alone and
/// reported as [`SchedSliceError::NotFair`].
pub fn request_for_current_thread(slice: Duration) -> Result<Duration, SchedSliceError> {
    imp::request(slice)
}

/// The calling thread's slice as the kernel reports it (on kernels
/// before 6.12, which have no per-thread slice, zero).
pub fn current_thread_slice() -> Result<Duration, SchedSliceError> {
    imp::slice_of(0)
}

/// The slice of thread `tid` (any process's, as `/proc/PID/task` lists
/// them), as [`current_thread_slice`] reports it.
pub fn slice_of_thread(tid: u32) -> Result<Duration, SchedSliceError> {
    let tid = i32::try_from(tid).map_err(|_| SchedSliceError::BadTid { tid })?;
    imp::slice_of(tid)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::SchedSliceError;
    use std::time::Duration;

    /// `struct sched_attr` as of its first version (48 bytes,
    /// `SCHED_ATTR_SIZE_VER0`), which every kernel since 3.14 accepts;
    /// libc does not declare it. Its `size` field tells the kernel how
    /// much to read and write, so the later fields (utilisation clamps)
    /// are neither read nor written.
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
    }

    const _: () = assert!(std::mem::size_of::<SchedAttr>() == 48);

    const SCHED_OTHER: u32 = libc::SCHED_OTHER as u32;
    const SCHED_BATCH: u32 = libc::SCHED_BATCH as u32;
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

    /// The scheduling attributes of thread `tid`; 0 is the calling one.
    fn get(tid: i32) -> Result<SchedAttr, SchedSliceError> {
        let mut attr = SchedAttr::default();
        let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
        // SAFETY: `attr` is a live, writable `sched_attr` of `size` bytes;
        // the kernel checks `tid`; flags must be 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                tid,
                &mut attr as *mut SchedAttr,
                size,
                0,
            )
        };
        if r != 0 {
            return Err(SchedSliceError::Syscall {
                call: "sched_getattr",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(attr)
    }

    pub(super) fn slice_of(tid: i32) -> Result<Duration, SchedSliceError> {
        Ok(Duration::from_nanos(get(tid)?.sched_runtime))
    }

    pub(super) fn request(slice: Duration) -> Result<Duration, SchedSliceError> {
        let mut attr = get(0)?;
        let requested_us = u64::try_from(slice.as_micros()).unwrap_or(u64::MAX);
        if attr.sched_policy != SCHED_OTHER && attr.sched_policy != SCHED_BATCH {
            return Err(SchedSliceError::NotFair {
                policy: attr.sched_policy,
            });
        }
        // Only the slice changes: the policy and nice value read above go
        // back as they were (sched_setattr sets them all), and so does
        // reset-on-fork, which an unprivileged thread may not clear (the
        // other flags read back describe the request, not the thread).
        attr.size = std::mem::size_of::<SchedAttr>() as u32;
        attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
        // 0 asks for the kernel's default slice back.
        attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: `attr` is a valid, initialised `sched_attr` of the size
        // it names; pid 0 is the calling thread; flags must be 0.
        let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
        if r != 0 {
            return Err(SchedSliceError::Syscall {
                call: "sched_setattr",
                source: std::io::Error::last_os_error(),
            });
        }
        // Kernels before 6.12 accept the field and ignore it.
        let kept = slice_of(0)?;
        if kept.is_zero() && !slice.is_zero() {
            return Err(SchedSliceError::NotKept { requested_us });
        }
        Ok(kept)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::SchedSliceError;
    use std::time::Duration;

    pub(super) fn slice_of(_tid: i32) -> Result<Duration, SchedSliceError> {
        Err(SchedSliceError::NotLinux)
    }

    pub(super) fn request(_slice: Duration) -> Result<Duration, SchedSliceError> {
        Err(SchedSliceError::NotLinux)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Whether this kernel keeps per-thread slices (6.12+): it reports a
    /// fair thread's slice, never zero, where older ones report zero.
    fn kernel_has_slices() -> bool {
        std::thread::spawn(|| current_thread_slice().unwrap() > Duration::ZERO)
            .join()
            .unwrap()
    }

    /// A thread gets the slice it asks for (clamped as the kernel
    /// documents), and its nice value stays; other threads keep theirs.
    /// Each case runs on its own thread: slices are per thread.
    #[test]
    fn a_thread_gets_its_slice_clamped_and_keeps_its_nice_value() {
        if !kernel_has_slices() {
            eprintln!("this kernel keeps no per-thread slices (Linux < 6.12): only the refusal is checked");
            // Nothing to check on a kernel without per-thread slices but
            // that asking fails cleanly.
            let asked =
                std::thread::spawn(|| request_for_current_thread(Duration::from_micros(100)))
                    .join()
                    .unwrap();
            assert!(
                matches!(asked, Err(SchedSliceError::NotKept { .. })),
                "{asked:?}"
            );
            return;
        }
        let cases = [
            (Duration::from_micros(100), Duration::from_micros(100)),
            (Duration::from_micros(250), Duration::from_micros(250)),
            // Below the kernel's floor and above its ceiling: clamped.
            (Duration::from_micros(20), Duration::from_micros(100)),
            (Duration::from_secs(1), Duration::from_millis(100)),
        ];
        let default = std::thread::spawn(|| current_thread_slice().unwrap())
            .join()
            .unwrap();
        for (asked, expected) in cases {
            let (kept, after, nice_before, nice_after) = std::thread::spawn(move || {
                // SAFETY: nice(2) and getpriority(2) with PRIO_PROCESS and
                // 0 act on the calling thread only, on Linux.
                let nice_before = unsafe {
                    libc::nice(3);
                    libc::getpriority(libc::PRIO_PROCESS, 0)
                };
                let kept = request_for_current_thread(asked).unwrap();
                // SAFETY: as above.
                let nice_after = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                (
                    kept,
                    current_thread_slice().unwrap(),
                    nice_before,
                    nice_after,
                )
            })
            .join()
            .unwrap();
            assert_eq!(kept, expected, "asked {asked:?}");
            assert_eq!(after, expected);
            assert_eq!(
                nice_after, nice_before,
                "the nice value must survive the slice"
            );
        }
        // Zero gives the default back.
        let restored = std::thread::spawn(|| {
            request_for_current_thread(Duration::from_micros(200)).unwrap();
            request_for_current_thread(Duration::ZERO).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(restored, default);
        // A new thread starts with the default: nothing leaked.
        let fresh = std::thread::spawn(|| current_thread_slice().unwrap())
            .join()
            .unwrap();
        assert_eq!(fresh, default);
    }

    /// Threads inherit their creator's slice, which is what lets
    /// `ringkv` set it once for the whole process.
    #[test]
    fn a_new_thread_inherits_its_creators_slice() {
        if !kernel_has_slices() {
            return;
        }
        let inherited = std::thread::spawn(|| {
            request_for_current_thread(Duration::from_micros(300)).unwrap();
            std::thread::spawn(|| current_thread_slice().unwrap())
                .join()
                .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inherited, Duration::from_micros(300));
    }
}
