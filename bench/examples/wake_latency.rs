//! How long this machine takes to wake a sleeping thread on another CPU.
//!
//! Every hop of a request on one machine is such a wake-up: the pacer
//! wakes a client, a packet wakes a node's worker, an answer wakes the
//! client again. On a virtual machine a CPU with nothing to run halts,
//! and waking a thread there goes through the host, which runs the vCPU
//! again when it gets to it. This probe measures that cost alone, with
//! nothing else running: one thread on CPU 0 wakes one parked on another
//! CPU (`std::thread::unpark`, a futex), after a random 0.2–2 ms pause so
//! that the other CPU has gone idle, and the woken thread notes how long
//! it took to run. Its tail is a floor under the tail of any request that
//! needs a few such wake-ups in a row (`bench/RESULTS.md`, session 48).
//!
//! ```sh
//! cargo run --release -p ringkv-bench --example wake_latency -- [WAKES] [CPU]
//! ```
//!
//! WAKES defaults to 5,000 and CPU, where the woken thread runs, to 1 (0
//! measures a wake-up on the waker's own CPU, for comparison).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;

fn main() {
    if let Err(message) = run() {
        eprintln!("wake_latency: {message}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let wakes: u32 = parse_arg(args.next(), "WAKES", 5_000)?;
    let cpu: usize = parse_arg(args.next(), "CPU", 1)?;
    if wakes == 0 {
        return Err("WAKES must be at least 1".into());
    }
    // Both CPUs exist and may be used (checked here, where a refusal can
    // still stop the run), and the waker stays on CPU 0.
    pin_to(cpu)?;
    pin_to(0)?;
    // The time of the latest wake-up, set before the waiter may see it.
    let woken_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let pending = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (woken_at, pending) = (woken_at.clone(), pending.clone());
        std::thread::spawn(move || -> Result<Histogram<u64>, String> {
            pin_to(cpu)?;
            let mut latencies_us =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
            for _ in 0..wakes {
                // `park` may return without an `unpark`: only the flag says
                // a wake-up came.
                while !pending.load(Ordering::Acquire) {
                    std::thread::park();
                }
                let ran = Instant::now();
                let sent = woken_at.lock().map_err(|e| e.to_string())?.take();
                if let Some(sent) = sent {
                    let us = ran.saturating_duration_since(sent).as_micros() as u64;
                    latencies_us.saturating_record(us.max(1));
                }
                pending.store(false, Ordering::Release);
            }
            Ok(latencies_us)
        })
    };
    let mut rng = rand::thread_rng();
    for _ in 0..wakes {
        std::thread::sleep(Duration::from_micros(rng.gen_range(200..2_000)));
        // The waiter has taken the last one (it is quick: the pause is
        // long), unless it stopped.
        while pending.load(Ordering::Acquire) {
            if waiter.is_finished() {
                break;
            }
            std::hint::spin_loop();
        }
        if waiter.is_finished() {
            break;
        }
        *woken_at.lock().map_err(|e| e.to_string())? = Some(Instant::now());
        pending.store(true, Ordering::Release);
        waiter.thread().unpark();
    }
    let h = waiter
        .join()
        .map_err(|_| "the woken thread panicked".to_string())??;
    let q = |q: f64| h.value_at_quantile(q);
    println!(
        "{wakes} wake-ups of a thread on CPU {cpu} from CPU 0, µs: p50 {}, p90 {}, p99 {}, p99.9 {}, max {}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        h.max()
    );
    Ok(())
}

fn parse_arg<T: std::str::FromStr>(
    arg: Option<String>,
    name: &str,
    default: T,
) -> Result<T, String> {
    match arg {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| format!("{name} must be a whole number, not {text:?}")),
    }
}

/// Keeps the calling thread on `cpu` alone.
fn pin_to(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("there is no CPU {cpu}"));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // inside it for any cpu below CPU_SETSIZE, checked above.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        return Err(format!(
            "cannot run on CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
