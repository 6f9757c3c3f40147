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
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Write consistency: 1..=N, one, quorum or all.
    #[arg(short = 'w', long = "w", default_value = "all")]
    w: String,
    #[arg(long, default_value_t = 32)]
    concurrency: u64,
    /// The cluster's key file, if it has one (see `ringkv node --help`);
    /// without the flag, RINGKV_CLUSTER_KEY_FILE's files, comma-separated.
    #[arg(long, value_name = "FILE")]
    cluster_key_file: Vec<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
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
    for worker in 0..args.concurrency.max(1) {
        let addr = args.cluster[worker as usize % args.cluster.len()];
        let (prefix, failed, key) = (args.prefix.clone(), failed.clone(), cluster_key.clone());
        let (start, count, step, bytes) = (
            args.start,
            args.count,
            args.concurrency.max(1),
            args.value_bytes,
        );
        tasks.spawn(async move {
            let client =
                match Client::connect_with_key(addr, Duration::from_secs(5), key.as_ref()).await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: cannot reach {addr}: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
            let value = vec![b'v'; bytes];
            for i in (start + worker..start + count).step_by(step as usize) {
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
    println!(
        "wrote {} keys in {secs:.1} s ({:.0}/s), {failed} failed",
        args.count,
        args.count as f64 / secs
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
