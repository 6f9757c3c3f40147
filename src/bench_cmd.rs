//! `ringkv bench`: closed-loop put and get load against an embedded or a
//! running cluster.

use std::time::Duration;

use ringkv_bench::{LoadConfig, PhaseReport};
use serde_json::json;

use crate::args::BenchArgs;
use crate::client_cmd::resolve;
use crate::server_cmd::start_local_cluster;
use crate::{Exit, Failure};

pub async fn bench(args: BenchArgs) -> Result<Exit, Failure> {
    if args.concurrency == 0 {
        return Err(Failure::new(
            Exit::Usage,
            "--concurrency must be at least 1",
        ));
    }
    if args.duration_s == 0 {
        return Err(Failure::new(Exit::Usage, "--duration-s must be at least 1"));
    }
    let embedded_dir = std::env::temp_dir().join(format!("ringkv-bench-{}", std::process::id()));
    let (targets, embedded) = if args.cluster.is_empty() {
        let _ = std::fs::remove_dir_all(&embedded_dir);
        let nodes = start_local_cluster(3, 3, 0, &embedded_dir, false).await?;
        (nodes.iter().map(|n| n.addr()).collect(), nodes)
    } else {
        let targets = args
            .cluster
            .iter()
            .map(|a| resolve(a))
            .collect::<Result<Vec<_>, _>>()?;
        (targets, Vec::new())
    };
    let config = LoadConfig {
        targets,
        concurrency: args.concurrency,
        phase_duration: Duration::from_secs(args.duration_s),
        value_bytes: args.value_bytes,
        r: args.r,
        w: args.w,
        request_timeout_ms: 2000,
    };
    if !args.json {
        eprintln!(
            "bench: {} clients, r={} w={}, {} B values, {} s per phase against {}",
            config.concurrency,
            config.r,
            config.w,
            config.value_bytes,
            args.duration_s,
            if embedded.is_empty() {
                "the given cluster"
            } else {
                "an embedded 3-node cluster"
            }
        );
    }
    let result = ringkv_bench::run(&config).await;
    for n in embedded {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&embedded_dir);
    let report = result.map_err(|e| Failure::new(Exit::Unreachable, e.to_string()))?;
    if args.json {
        println!(
            "{}",
            json!({"put": phase_json(&report.put), "get": phase_json(&report.get), "concurrency": config.concurrency, "r": config.r.to_string(), "w": config.w.to_string(), "value_bytes": config.value_bytes})
        );
    } else {
        println!(
            "{:<4} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "op", "ops/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
        );
        for (name, p) in [("put", &report.put), ("get", &report.get)] {
            println!(
                "{:<4} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7}",
                name,
                p.ops_per_sec(),
                p.latency_ms(0.5),
                p.latency_ms(0.95),
                p.latency_ms(0.99),
                p.latency_ms(0.999),
                p.latency_us.max() as f64 / 1000.0,
                p.errors
            );
        }
    }
    Ok(Exit::Ok)
}

fn phase_json(p: &PhaseReport) -> serde_json::Value {
    json!({
        "ops": p.ops,
        "errors": p.errors,
        "ops_per_sec": p.ops_per_sec(),
        "p50_ms": p.latency_ms(0.5),
        "p95_ms": p.latency_ms(0.95),
        "p99_ms": p.latency_ms(0.99),
        "p999_ms": p.latency_ms(0.999),
        "max_ms": p.latency_us.max() as f64 / 1000.0,
    })
}
