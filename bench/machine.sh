# Sourced by the bench scripts: `machine_header` prints what the figures
# depend on besides the code: cores, CPU model, kernel, and the scheduler
# settings of this shell, which every process it starts inherits (policy,
# priority, EEVDF slice, CPUs allowed). A slice or an affinity left on the
# shell by an earlier experiment silently changes every later run (session
# 40 of bench/RESULTS.md lost two-thirds of a session that way), so each
# run's log says what it ran with. It also names the idle driver and
# governor and, on a KVM guest, how long the haltpoll governor lets an idle
# vCPU poll before it halts (guest_halt_poll_ns): polling halved an
# unloaded put's latency on these VMs (session 49), so figures with and
# without it do not compare.
machine_header() {
  local policy prio slice cpus
  # `|| true`: the callers run under `set -e`, and a kernel without
  # /proc/PID/sched (before 6.15 without CONFIG_SCHED_DEBUG) must not end
  # them here; the fields then print as "?".
  sched_field() {
    awk -F: -v name="$1" '{gsub(/ /, "")} $1 == name {print $2}' "/proc/$$/sched" 2>/dev/null || true
  }
  policy=$(sched_field policy)
  prio=$(sched_field prio)
  slice=$(sched_field se.slice)
  local slice_us="?"
  [ -n "$slice" ] && slice_us="$((slice / 1000)) µs"
  cpus=$(awk '/^Cpus_allowed_list/ {print $2}' "/proc/$$/status" 2>/dev/null || true)
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
  echo "scheduler (this shell, inherited by every process): policy ${policy:-?}, prio ${prio:-?}, slice $slice_us, cpus ${cpus:-?}"
  local driver governor poll
  driver=$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || true)
  governor=$(cat /sys/devices/system/cpu/cpuidle/current_governor 2>/dev/null || true)
  poll=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || true)
  echo "idle: driver ${driver:-none}, governor ${governor:-none}, guest_halt_poll_ns ${poll:-n/a}"
}
