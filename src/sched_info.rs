//! The scheduler settings a bench ran with, for its JSON report.
//!
//! Linux threads inherit their creator's scheduling policy, nice value,
//! EEVDF slice (kernel 6.12+) and CPU affinity, so a setting left on the
//! shell by an earlier experiment changes every process started from it,
//! nodes and client alike, without a trace in their output. Session 40 of
//! `bench/RESULTS.md` compared two builds for hours with both arms on
//! 100 µs slices that way. The report therefore says what the calling
//! thread runs with (the bench's main thread or a runtime worker: both
//! got theirs from the shell, as every other thread of the process did).
//! Read from `/proc/thread-self`; every field is `None` where the kernel
//! does not show it.

use serde_json::{json, Value};

/// One thread's scheduler settings, as `/proc` shows them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SchedInfo {
    /// `SCHED_OTHER` is 0, `SCHED_BATCH` 3, `SCHED_IDLE` 5, …
    pub policy: Option<u32>,
    /// The kernel's priority: 120 + nice for the fair classes.
    pub prio: Option<u32>,
    /// The thread's EEVDF slice, in nanoseconds (6.12+ kernels).
    pub slice_ns: Option<u64>,
    /// The CPUs it may run on, as the kernel lists them ("0-1").
    pub cpus_allowed: Option<String>,
}

impl SchedInfo {
    /// The calling thread's settings.
    pub fn current_thread() -> Self {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        Self::parse(&sched, &status)
    }

    /// Reads the fields out of the text of `/proc/…/sched` and
    /// `/proc/…/status`; what is missing or malformed stays `None`.
    pub fn parse(sched: &str, status: &str) -> Self {
        let sched_field = |name: &str| {
            sched.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().parse::<u64>().ok())?
            })
        };
        let cpus_allowed = status.lines().find_map(|line| {
            let value = line.strip_prefix("Cpus_allowed_list:")?.trim();
            (!value.is_empty()).then(|| value.to_string())
        });
        Self {
            policy: sched_field("policy").and_then(|v| u32::try_from(v).ok()),
            prio: sched_field("prio").and_then(|v| u32::try_from(v).ok()),
            slice_ns: sched_field("se.slice"),
            cpus_allowed,
        }
    }

    /// For the report's `config.scheduler`.
    pub fn to_json(&self) -> Value {
        json!({
            "policy": self.policy,
            // Only the fair classes (policies 0, 3, 5) have a nice value.
            "nice": self
                .prio
                .filter(|_| matches!(self.policy, Some(0 | 3 | 5)))
                .map(|prio| i64::from(prio) - 120),
            "slice_us": self.slice_ns.map(|ns| ns as f64 / 1000.0),
            "cpus_allowed": self.cpus_allowed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED: &str = "ringkv (1143, #threads: 3)\n\
        -------------------------------------------------------------------\n\
        se.exec_start                                :      12345678.901234\n\
        se.slice                                     :              1400000\n\
        policy                                       :                    0\n\
        prio                                         :                  125\n";
    const STATUS: &str = "Name:\tringkv\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\n";

    #[test]
    fn reads_the_fields_it_reports() {
        let info = SchedInfo::parse(SCHED, STATUS);
        assert_eq!(
            info,
            SchedInfo {
                policy: Some(0),
                prio: Some(125),
                slice_ns: Some(1_400_000),
                cpus_allowed: Some("0-1".into()),
            }
        );
        let json = info.to_json();
        assert_eq!(json["nice"], 5);
        assert_eq!(json["slice_us"], 1400.0);
        assert_eq!(json["cpus_allowed"], "0-1");
    }

    #[test]
    fn what_the_kernel_does_not_show_stays_null() {
        // A kernel before 6.12 has no se.slice; a non-Linux system no /proc.
        let old = SchedInfo::parse(&SCHED.replace("se.slice", "se.nr_migrations"), STATUS);
        assert_eq!(old.slice_ns, None);
        assert_eq!(old.policy, Some(0));
        assert_eq!(SchedInfo::parse("", ""), SchedInfo::default());
        let json = SchedInfo::default().to_json();
        assert!(json["slice_us"].is_null() && json["nice"].is_null());
        // A garbled value is not taken for a number.
        assert_eq!(SchedInfo::parse("prio : high\n", "").prio, None);
    }

    #[test]
    fn a_realtime_thread_has_no_nice_value() {
        let info = SchedInfo {
            policy: Some(1),
            prio: Some(89),
            ..SchedInfo::default()
        };
        assert!(info.to_json()["nice"].is_null());
    }
}
