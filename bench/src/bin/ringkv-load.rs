//! `ringkv-load`: writes a fixed set of keys into a running cluster, for
//! benchmarks that need a data set of a known size (anti-entropy's 1 M keys)
//! rather than a timed load.
//!
//! Keys are `{prefix}{i}` for i in `--start..--start+--count`, values
//! `--value-bytes` bytes; clients round-robin over `--cluster`. Exits
//! non-zero if any write fails.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ringkv_core::wire::{PutRequest, Request, Response};
use ringkv_core::{Consistency, Payload};
use ringkv_node::{Client, ClusterKey};

#[derive(Parser, Debug)]
#[command(about = "Write keys {prefix}{start}..{start+count} into a running ringkv cluster")]
struct Args {
    /// Nodes to send writes to, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    cluster: Vec<SocketAddr>,
    #[arg(long, default_value = "load:")]
    prefix: String,
    #[arg(long, default_value_t = 0)]
    start: u64,
    #[arg(long)]
    count: u64,
    /// Bytes per value, at most 16 MiB.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=16 << 20))]
    value_bytes: u32,
    /// Write consistency: 1..=N, one, quorum or all.
    #[arg(short = 'w', long = "w", default_value = "all")]
    w: String,
    /// Writers at once, each with its own connection: 1 to 10,000.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// The cluster's key file, if it has one (see `ringkv node --help`);
    /// without the flag, RINGKV_CLUSTER_KEY_FILE's files, comma-separated.
    #[arg(long, value_name = "FILE")]
    cluster_key_file: Vec<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(end) = args.start.checked_add(args.count) else {
        eprintln!(
            "error: --start {} plus --count {} is past the largest key number",
            args.start, args.count
        );
        return ExitCode::from(2);
    };
    let w: Consistency = match args.w.parse() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: -w: {e:?}");
            return ExitCode::from(2);
        }
    };
    let files = ringkv_node::cluster_key::key_files(
        &args.cluster_key_file,
        std::env::var_os(ringkv_node::cluster_key::CLUSTER_KEY_FILE_ENV),
    );
    let files = match files {
        Ok((files, _)) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cluster_key = match ClusterKey::from_files(&files) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("error: --cluster-key-file: {e}");
            return ExitCode::from(2);
        }
    };
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency {
        let addr = args.cluster[worker as usize % args.cluster.len()];
        let (prefix, failed, key) = (args.prefix.clone(), failed.clone(), cluster_key.clone());
        let (start, step, bytes) = (args.start, args.concurrency, args.value_bytes as usize);
        // This worker's keys: every `step`th from `start + worker`.
        let mine = (start.saturating_add(worker)..end).step_by(step as usize);
        tasks.spawn(async move {
            let client =
                match Client::connect_with_key(addr, Duration::from_secs(5), key.as_ref()).await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: cannot reach {addr}: {e}");
                        // Every key of its share is unwritten.
                        failed.fetch_add(mine.count() as u64, Ordering::Relaxed);
                        return;
                    }
                };
            let value = vec![b'v'; bytes];
            for i in mine {
                let put = Request::Put(PutRequest::new(
                    format!("{prefix}{i}"),
                    Payload::Value(value.clone()),
                    w,
                    None,
                ));
                if !matches!(client.call(&put).await, Ok(Response::Put(_))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            client.close().await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let failed = failed.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let written = args.count.saturating_sub(failed);
    println!(
        "wrote {written} of {} keys in {secs:.1} s ({:.0}/s), {failed} failed",
        args.count,
        written as f64 / secs
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
