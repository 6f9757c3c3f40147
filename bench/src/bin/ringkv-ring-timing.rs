//! How long placement takes on large rings: building a ring, a key's
//! preference list (what every request computes), and a key's whole walk
//! (what the preference list computed before its fallbacks were bounded).
//!
//! ```sh
//! cargo run --release --bin ringkv-ring-timing
//! ```
//! Figures are in `bench/RESULTS.md` ("Session 21").

use std::time::Instant;

use ringkv_core::NodeId;
use ringkv_ring::Ring;

/// Keys placed per measurement.
const KEYS: u32 = 10_000;

fn main() {
    println!(
        "{:>7} {:>7} {:>10} {:>12} {:>18} {:>16}",
        "members", "vnodes", "total", "build ms", "preference µs/key", "whole walk µs/key"
    );
    for (members, vnodes) in [(3u32, 64u32), (64, 64), (100, 1024), (1000, 64), (256, 256)] {
        let ids =
            (0..members).map(|i| (NodeId::new(format!("node-{i}")).expect("valid id"), vnodes));
        let started = Instant::now();
        let ring = Ring::new(ids, 3).expect("valid ring");
        let build = started.elapsed();
        let per_key = |f: &dyn Fn(&[u8]) -> usize| {
            let started = Instant::now();
            let mut placed = 0;
            for i in 0..KEYS {
                placed += f(&i.to_le_bytes());
            }
            assert!(placed > 0);
            started.elapsed().as_secs_f64() * 1e6 / f64::from(KEYS)
        };
        let preference = per_key(&|key| ring.preference_list(key).fallbacks.len() + 1);
        let walk = per_key(&|key| ring.walk(key).count());
        println!(
            "{members:>7} {vnodes:>7} {:>10} {:>12.1} {preference:>18.2} {walk:>16.2}",
            members * vnodes,
            build.as_secs_f64() * 1e3,
        );
    }
}
