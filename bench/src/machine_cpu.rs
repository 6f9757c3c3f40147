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

/// The `cpu` line of `/proc/stat`: time of all CPUs since boot, in clock
/// ticks (USER_HZ).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// Running anything: user, nice, system, irq and softirq.
    pub busy_ticks: u64,
    /// Taken by the hypervisor while the guest wanted to run.
    pub steal_ticks: u64,
    /// Everything: busy, idle, iowait and steal.
    pub total_ticks: u64,
}

/// What one measured window used of the machine, in percent of all its
/// CPUs' time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineShare {
    /// Running anything, any process.
    pub busy_pct: f64,
    /// Taken by the host.
    pub steal_pct: f64,
}

impl MachineCpu {
    /// The machine's counters now.
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Reads the `cpu` line out of `/proc/stat`'s text. `None` when it is
    /// missing or has fewer than the eight columns a kernel since 2.6.11
    /// writes (user nice system idle iowait irq softirq steal).
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
            return None;
        };
        // guest and guest_nice (columns 9 and 10) are already in user and
        // nice.
        let busy_ticks = user + nice + system + irq + softirq;
        Some(Self {
            busy_ticks,
            steal_ticks: steal,
            total_ticks: busy_ticks + idle + iowait + steal,
        })
    }

    /// The share of the machine's CPU time between `self` and a later
    /// reading; `None` if no time passed (or the counters went back).
    pub fn share_until(&self, later: &MachineCpu) -> Option<MachineShare> {
        let total = later.total_ticks.checked_sub(self.total_ticks)?;
        if total == 0 {
            return None;
        }
        let pct =
            |before: u64, after: u64| after.saturating_sub(before) as f64 * 100.0 / total as f64;
        Some(MachineShare {
            busy_pct: pct(self.busy_ticks, later.busy_ticks),
            steal_pct: pct(self.steal_ticks, later.steal_ticks),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  262917 55 34979 481901 1524 0 2215 6184 0 0\n\
        cpu0 128898 1 15834 245471 441 0 1025 3157 0 0\n\
        intr 1234\n";

    #[test]
    fn reads_the_machine_line_not_a_cpu_s() {
        let cpu = MachineCpu::parse(STAT).unwrap();
        assert_eq!(cpu.busy_ticks, 262_917 + 55 + 34_979 + 2_215);
        assert_eq!(cpu.steal_ticks, 6_184);
        assert_eq!(cpu.total_ticks, cpu.busy_ticks + 481_901 + 1_524 + 6_184);
    }

    #[test]
    fn shares_are_of_all_the_time_that_passed() {
        let before = MachineCpu::parse(STAT).unwrap();
        // 5 s on 2 CPUs at 100 ticks a second: 146 busy, 18 stolen.
        let after = MachineCpu {
            busy_ticks: before.busy_ticks + 146,
            steal_ticks: before.steal_ticks + 18,
            total_ticks: before.total_ticks + 1000,
        };
        let share = before.share_until(&after).unwrap();
        assert!((share.busy_pct - 14.6).abs() < 1e-9, "{share:?}");
        assert!((share.steal_pct - 1.8).abs() < 1e-9, "{share:?}");
        // No time passed, or counters that went back: no figure.
        assert_eq!(before.share_until(&before), None);
        assert_eq!(after.share_until(&before), None);
    }

    #[test]
    fn an_old_or_garbled_line_is_no_reading() {
        // Before 2.6.11 there was no steal column.
        assert_eq!(MachineCpu::parse("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(MachineCpu::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(MachineCpu::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(MachineCpu::parse(""), None);
    }
}
