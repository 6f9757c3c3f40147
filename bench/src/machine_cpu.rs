//! How busy the whole machine was during a measurement, and how much of
//! its CPU time the host took (steal).
//!
//! On a virtual machine the hypervisor may stop the guest's vCPUs to run
//! other guests. The guest's kernel counts that time as *steal* (the
//! eighth column of `/proc/stat`'s `cpu` line). A stopped vCPU pauses
//! whatever it was running, store and load generator alike, so requests in
//! flight take the pause on top of their latency, and no change to the
//! store shortens it. On the VMs of `bench/RESULTS.md` (session 41) the
//! host took 1.8% of the CPU time during a light open loop, in pauses of
//! both vCPUs of 1.5 ms and more (up to 6.4) several times a second:
//! enough on its own to put a 1,000/s loop's p99 above 2 ms, and up to a
//! third of the time on a busier day. So each setting reports the steal
//! of its run beside its latencies.
//!
//! The figures are the machine's, not the bench's: they cover every
//! process, which is what is wanted when the cluster under test runs on
//! the same machine (the embedded cluster, or `--cluster` on loopback),
//! and only the client's machine otherwise. Linux only; `None` elsewhere.
//!
//! The busy time itself, divided by the operations, is the issue's "total
//! CPU time per operation across all processes": nodes, clients, the
//! kernel's network stack and RocksDB's background threads, in one figure
//! that needs no process ids, so it also gives a Redis on the same
//! machine (`--target resp://`) a cost per operation to set beside ours.
//!
//! Busy time is what the CPUs had, less what they spent idle, waiting for
//! I/O or stolen: not `/proc/stat`'s busy columns. Those are sampled at
//! each clock tick, and a tickless kernel stops the tick on an idle CPU,
//! so work that wakes a CPU and is done before its next tick is counted
//! as idle (bursts of a request's work are just that). Idle time is
//! measured exactly (from the moments a CPU entered and left idle), and
//! so is steal. Over a light embedded bench, the busy columns summed to
//! 2.03 s while the bench process alone used 2.42 s (getrusage); the time
//! not idle came to 2.61 s.
//!
//! Idle time can hide work of another kind: a guest kernel that *polls*
//! in its idle loop before halting (cpuidle's `POLL` state, which the
//! haltpoll governor of KVM guests uses for up to `guest_halt_poll_ns`
//! after each wake-up; bare-metal idle drivers have the state too) spins
//! on the CPU, so a thread woken on it runs within microseconds instead
//! of after the halted vCPU's exit to the host and back. `/proc/stat`
//! counts that spinning as idle, yet the host gives the vCPU that time.
//! So each window also reports the share spent polling, from cpuidle's
//! own per-state counters in sysfs: a busy figure measured with polling on
//! is the work alone, not all the vCPU time the machine took. On the VMs of `bench/RESULTS.md` polling
//! halved an unloaded put's latency (session 49).

use std::path::Path;
use std::time::{Duration, Instant};

/// The `cpu` line of `/proc/stat`: time of all CPUs since boot, in clock
/// ticks (USER_HZ), and how many CPUs it sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// Idle or waiting for I/O (measured exactly on a tickless kernel).
    /// The two are summed because the kernel assigns a CPU's idle period
    /// still running to one or the other at the moment it is read, so
    /// either column alone can go back between readings; their sum never
    /// does.
    pub idle_ticks: u64,
    /// Taken by the hypervisor while the guest wanted to run.
    pub steal_ticks: u64,
    /// How many `cpuN` lines follow: the CPUs online when it was read.
    pub cpus: u32,
    /// Microseconds the CPUs spent polling in the idle loop (counted as
    /// idle above), summed over every CPU sysfs lists, offline ones too;
    /// `None` where the kernel has no cpuidle polling state (see
    /// [`idle_poll_us`]).
    pub poll_us: Option<u64>,
}

/// A reading of [`MachineCpu`] and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineReading {
    /// The counters.
    pub cpu: MachineCpu,
    /// When they were read, for the wall time between two readings.
    pub at: Instant,
}

/// What one measured window used of the machine: shares of all its CPUs'
/// time, and the busy time itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineShare {
    /// Running anything, any process, in percent.
    pub busy_pct: f64,
    /// Taken by the host, in percent.
    pub steal_pct: f64,
    /// CPU time spent running anything, summed over the CPUs (two CPUs
    /// busy for a second: two seconds).
    pub busy: Duration,
    /// Spent polling in the idle loop, in percent of all the CPUs' time
    /// (wall time × CPUs), at most the idle share: idle to `busy_pct`,
    /// spinning to the host. `None` where there is no polling state.
    pub idle_poll_pct: Option<f64>,
}

/// The sysfs directory of the CPUs, each with its cpuidle states.
const CPU_SYSFS: &str = "/sys/devices/system/cpu";

/// The name cpuidle gives the state in which an idle CPU polls.
const POLL_STATE: &str = "POLL";

/// Whether `name` is a CPU's (`cpu0`, `cpu17`), not `cpu` alone or
/// another entry beside them (`cpufreq`, `cpuidle`).
fn is_cpu_name(name: &str) -> bool {
    name.strip_prefix("cpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Microseconds every CPU under `cpu_root` (`/sys/devices/system/cpu`)
/// has spent in cpuidle's polling state since boot, summed: each
/// `cpuN/cpuidle/stateM` whose `name` is `POLL` counts its `time`. `None`
/// when no CPU has such a state (no cpuidle, or a driver without one), or
/// a state's name or a polling state's time cannot be read: a sum missing
/// a CPU would make a window's share wrong. A CPU taken offline and back
/// may restart its counters; a window over which the sum went back has no
/// figure ([`MachineCpu::share_over`]).
pub fn idle_poll_us(cpu_root: &Path) -> Option<u64> {
    let mut total: Option<u64> = None;
    for cpu in std::fs::read_dir(cpu_root).ok()?.flatten() {
        if !cpu.file_name().to_str().is_some_and(is_cpu_name) {
            continue;
        }
        let Ok(states) = std::fs::read_dir(cpu.path().join("cpuidle")) else {
            continue;
        };
        for state in states.flatten() {
            // Beside the states there may be a `driver` directory.
            if !state
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("state"))
            {
                continue;
            }
            let name = std::fs::read_to_string(state.path().join("name")).ok()?;
            if name.trim() != POLL_STATE {
                continue;
            }
            let time = std::fs::read_to_string(state.path().join("time")).ok()?;
            let us: u64 = time.trim().parse().ok()?;
            total = Some(total.unwrap_or(0).checked_add(us)?);
        }
    }
    total
}

/// Clock ticks a second in `/proc/stat` (USER_HZ): 100 on every Linux
/// port but a few, asked of the system all the same.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|hz| *hz > 0).unwrap_or(100)
}

impl MachineCpu {
    /// Reads the `cpu` line out of `/proc/stat`'s text, and counts the
    /// `cpuN` lines. `None` when the line is missing or has fewer than the
    /// eight columns a kernel since 2.6.11 writes (user nice system idle
    /// iowait irq softirq steal), or no CPU is listed.
    pub fn parse(stat: &str) -> Option<Self> {
        let words = stat.lines().map(|l| l.split_whitespace());
        let line = words
            .clone()
            .find_map(|mut w| (w.next() == Some("cpu")).then_some(w))?;
        let fields: Vec<u64> = line
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let [_user, _nice, _system, idle, iowait, _irq, _softirq, steal] = fields[..] else {
            return None;
        };
        let cpus = words
            .filter(|w| w.clone().next().is_some_and(is_cpu_name))
            .count();
        let cpus = u32::try_from(cpus).ok().filter(|n| *n > 0)?;
        Some(Self {
            idle_ticks: idle + iowait,
            steal_ticks: steal,
            cpus,
            poll_us: None,
        })
    }

    /// The machine's time between `self` and a `later` reading `wall`
    /// apart, at `ticks_per_s`: all of it on every CPU, less what was idle
    /// or stolen, is busy. `None` if no time passed or the counters went
    /// back, or a CPU went offline or online in between (the capacity of
    /// the window is then unknown).
    fn share_over(
        &self,
        later: &MachineCpu,
        wall: Duration,
        ticks_per_s: u64,
    ) -> Option<MachineShare> {
        if self.cpus != later.cpus {
            return None;
        }
        let capacity_s = wall.as_secs_f64() * f64::from(self.cpus);
        if capacity_s <= 0.0 {
            return None;
        }
        let seconds = |before: u64, after: u64| {
            after
                .checked_sub(before)
                .map(|t| t as f64 / ticks_per_s.max(1) as f64)
        };
        let idle_s = seconds(self.idle_ticks, later.idle_ticks)?;
        let steal_s = seconds(self.steal_ticks, later.steal_ticks)?;
        // The two clocks are read a moment apart: keep within the capacity.
        let busy_s = (capacity_s - idle_s - steal_s).clamp(0.0, capacity_s);
        // Polling is part of the idle time; the two counters are read a
        // moment apart, and /proc/stat's in whole ticks: keep within it.
        let poll_s = match (self.poll_us, later.poll_us) {
            (Some(before), Some(after)) => after
                .checked_sub(before)
                .map(|us| (us as f64 / 1e6).min(idle_s)),
            _ => None,
        };
        Some(MachineShare {
            busy_pct: busy_s * 100.0 / capacity_s,
            steal_pct: (steal_s * 100.0 / capacity_s).min(100.0),
            busy: Duration::from_secs_f64(busy_s),
            idle_poll_pct: poll_s.map(|s| s * 100.0 / capacity_s),
        })
    }
}

impl MachineReading {
    /// The machine's counters now, and the moment they were read; `None`
    /// where there is no `/proc/stat` to read.
    pub fn now() -> Option<Self> {
        let mut cpu = MachineCpu::parse(&std::fs::read_to_string("/proc/stat").ok()?)?;
        cpu.poll_us = idle_poll_us(Path::new(CPU_SYSFS));
        Some(Self {
            cpu,
            at: Instant::now(),
        })
    }

    /// What the machine did between this reading and a `later` one;
    /// `None` if no time passed (or the counters went back).
    pub fn share_until(&self, later: &MachineReading) -> Option<MachineShare> {
        let wall = later.at.checked_duration_since(self.at)?;
        self.cpu.share_over(&later.cpu, wall, ticks_per_second())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  262917 55 34979 481901 1524 0 2215 6184 0 0\n\
        cpu0 128898 1 15834 245471 441 0 1025 3157 0 0\n\
        cpu1 134019 54 19145 236430 1083 0 1190 3027 0 0\n\
        intr 1234\n\
        cpufreq 1\n";

    #[test]
    fn reads_the_machine_line_and_counts_the_cpus() {
        let cpu = MachineCpu::parse(STAT).unwrap();
        assert_eq!(cpu.idle_ticks, 481_901 + 1_524);
        assert_eq!(cpu.steal_ticks, 6_184);
        assert_eq!(cpu.cpus, 2, "cpu0 and cpu1, not cpu or cpufreq");
    }

    #[test]
    fn busy_is_all_the_time_not_idle_or_stolen() {
        let before = MachineCpu::parse(STAT).unwrap();
        // 5 s on 2 CPUs at 100 ticks a second: 836 idle, 18 stolen, so 146
        // busy, whatever the busy columns sampled.
        let after = MachineCpu {
            idle_ticks: before.idle_ticks + 836,
            steal_ticks: before.steal_ticks + 18,
            cpus: 2,
            poll_us: None,
        };
        let share = before
            .share_over(&after, Duration::from_secs(5), 100)
            .unwrap();
        assert!((share.busy_pct - 14.6).abs() < 1e-9, "{share:?}");
        assert!((share.steal_pct - 1.8).abs() < 1e-9, "{share:?}");
        let seconds = |share: MachineShare| share.busy.as_secs_f64();
        assert!((seconds(share) - 1.46).abs() < 1e-9, "{share:?}");
        // At 250 ticks a second the same counts are less time.
        let share = before
            .share_over(&after, Duration::from_secs(5), 250)
            .unwrap();
        assert!(
            (seconds(share) - (10.0 - 3.344 - 0.072)).abs() < 1e-9,
            "{share:?}"
        );
        // No time passed, or counters that went back: no figure.
        assert_eq!(before.share_over(&after, Duration::ZERO, 100), None);
        assert_eq!(after.share_over(&before, Duration::from_secs(5), 100), None);
        // A CPU hot-plugged in between: the window's capacity is unknown.
        let plugged = MachineCpu { cpus: 3, ..after };
        assert_eq!(
            before.share_over(&plugged, Duration::from_secs(5), 100),
            None
        );
    }

    /// A sysfs tree of `cpus`, each a list of (state name, time) pairs.
    fn cpu_tree(cpus: &[(&str, &[(&str, &str)])]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (cpu, states) in cpus {
            for (i, (name, time)) in states.iter().enumerate() {
                let dir = root
                    .path()
                    .join(cpu)
                    .join("cpuidle")
                    .join(format!("state{i}"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
                std::fs::write(dir.join("time"), format!("{time}\n")).unwrap();
            }
        }
        root
    }

    #[test]
    fn polling_states_are_summed_over_the_cpus() {
        let root = cpu_tree(&[
            ("cpu0", &[("POLL", "100"), ("haltpoll idle", "999")]),
            ("cpu1", &[("POLL", "50"), ("haltpoll idle", "7")]),
            // Not CPUs, though they sit beside them: entries of any shape
            // there are skipped.
            ("cpufreq", &[("POLL", "1000")]),
            ("cpuidle", &[("POLL", "1000")]),
        ]);
        // A CPU without cpuidle adds nothing, nor a directory beside the
        // states that is not one.
        std::fs::create_dir(root.path().join("cpu2")).unwrap();
        let driver = root.path().join("cpu0/cpuidle/driver");
        std::fs::create_dir(&driver).unwrap();
        std::fs::write(driver.join("name"), "POLL\n").unwrap();
        std::fs::write(driver.join("time"), "1000\n").unwrap();
        assert_eq!(idle_poll_us(root.path()), Some(150));
    }

    #[test]
    fn no_polling_state_or_an_unreadable_one_is_no_figure() {
        let halts_only = cpu_tree(&[("cpu0", &[("C1", "5"), ("C2", "9")])]);
        assert_eq!(idle_poll_us(halts_only.path()), None);
        let garbled = cpu_tree(&[("cpu0", &[("POLL", "5")]), ("cpu1", &[("POLL", "x")])]);
        assert_eq!(idle_poll_us(garbled.path()), None, "a sum missing cpu1");
        // A state whose name cannot be read might be cpu1's polling state.
        let nameless = cpu_tree(&[("cpu0", &[("POLL", "5")]), ("cpu1", &[("C1", "5")])]);
        std::fs::remove_file(nameless.path().join("cpu1/cpuidle/state0/name")).unwrap();
        assert_eq!(idle_poll_us(nameless.path()), None, "cpu1's state unnamed");
        let missing = tempfile::tempdir().unwrap();
        assert_eq!(idle_poll_us(&missing.path().join("nothing")), None);
    }

    #[test]
    fn polling_is_a_share_of_the_window_apart_from_busy() {
        let before = MachineCpu {
            poll_us: Some(1_000_000),
            ..MachineCpu::parse(STAT).unwrap()
        };
        // 5 s on 2 CPUs: 1 s of polling is 10%, and it is idle to busy.
        let after = MachineCpu {
            idle_ticks: before.idle_ticks + 500,
            poll_us: Some(2_000_000),
            ..before
        };
        let share = before
            .share_over(&after, Duration::from_secs(5), 100)
            .unwrap();
        assert!(
            (share.idle_poll_pct.unwrap() - 10.0).abs() < 1e-9,
            "{share:?}"
        );
        assert!((share.busy_pct - 50.0).abs() < 1e-9, "{share:?}");
        // Unknown at either end, or gone back: no figure, the rest stands.
        let unknown = MachineCpu {
            poll_us: None,
            ..after
        };
        let share = before
            .share_over(&unknown, Duration::from_secs(5), 100)
            .unwrap();
        assert_eq!(share.idle_poll_pct, None);
        assert!((share.busy_pct - 50.0).abs() < 1e-9, "{share:?}");
        let back = MachineCpu {
            poll_us: Some(10),
            ..after
        };
        let share = before
            .share_over(&back, Duration::from_secs(5), 100)
            .unwrap();
        assert_eq!(share.idle_poll_pct, None);
        // More polling than idle time (the counters read a moment apart):
        // no more than the idle share, 50% here.
        let over = MachineCpu {
            poll_us: Some(1_000_000 + 6_000_000),
            ..after
        };
        let share = before
            .share_over(&over, Duration::from_secs(5), 100)
            .unwrap();
        assert!(
            (share.idle_poll_pct.unwrap() - 50.0).abs() < 1e-9,
            "{share:?}"
        );
    }

    #[test]
    fn idle_counted_a_moment_past_the_window_makes_no_negative_busy() {
        let before = MachineCpu::parse(STAT).unwrap();
        let after = MachineCpu {
            idle_ticks: before.idle_ticks + 1_010,
            ..before
        };
        let share = before
            .share_over(&after, Duration::from_secs(5), 100)
            .unwrap();
        assert_eq!(share.busy, Duration::ZERO);
        assert_eq!(share.busy_pct, 0.0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn readings_a_while_apart_give_a_share() {
        let before = MachineReading::now().expect("Linux has /proc/stat");
        std::thread::sleep(Duration::from_millis(30));
        let share = before.share_until(&MachineReading::now().unwrap()).unwrap();
        assert!((0.0..=100.0).contains(&share.busy_pct), "{share:?}");
        // Polling is reported exactly where this kernel has a polling state.
        assert_eq!(
            share.idle_poll_pct.is_some(),
            idle_poll_us(Path::new(CPU_SYSFS)).is_some(),
            "{share:?}"
        );
        assert_eq!(before.share_until(&before), None, "no time passed");
    }

    #[test]
    fn an_old_or_garbled_line_is_no_reading() {
        // Before 2.6.11 there was no steal column.
        assert_eq!(
            MachineCpu::parse("cpu  1 2 3 4 5 6 7\ncpu0 1 2 3 4 5 6 7\n"),
            None
        );
        assert_eq!(
            MachineCpu::parse("cpu  1 2 x 4 5 6 7 8\ncpu0 1 2 3 4 5 6 7 8\n"),
            None
        );
        assert_eq!(MachineCpu::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(
            MachineCpu::parse("cpu  1 2 3 4 5 6 7 8\n"),
            None,
            "no CPU listed"
        );
        assert_eq!(MachineCpu::parse(""), None);
    }
}
