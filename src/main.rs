//! `ringkv`: run a node or a local cluster, and talk to one.
//!
//! This is the binary's edge: arguments are parsed and validated here, errors
//! become one `error:` line on stderr and an exit status that scripts can
//! rely on (see [`Exit`]).

/// `println!`, except that a failed write (a full disk, a closed
/// terminal) ends the process with an error and exit status 6 rather than
/// a panic. (A closed pipe ends it quietly: see `restore_sigpipe`.)
macro_rules! outln {
    () => {
        $crate::write_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

/// `eprintln!`, except that a stderr that cannot be written (a full disk
/// behind `2>&1`) is ignored rather than a panic: there is nowhere left to
/// say anything, and the exit status still tells.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod bench_cmd;
mod client_cmd;
mod key_cmd;
mod output;
mod sched_info;
mod server_cmd;

use clap::Parser;

/// mimalloc rather than glibc malloc: allocation was ~15% of a node's CPU
/// under YCSB-A, and mimalloc measured ~10% more throughput (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use args::{Cli, Command};

/// Exit statuses, part of the CLI contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// `get`: the key has no value.
    NotFound = 1,
    /// Bad usage or invalid input; nothing was written.
    Usage = 2,
    /// R or W replicas did not answer in time.
    Quorum = 3,
    /// The node could not be reached.
    Unreachable = 4,
    /// The node failed internally.
    Internal = 5,
    /// The output could not be written (stdout, or a `--json`/`--plot`
    /// file): a full disk, a closed terminal.
    Output = 6,
}

impl Exit {
    /// The status's name in JSON errors.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::NotFound => "not_found",
            Exit::Usage => "usage",
            Exit::Quorum => "quorum",
            Exit::Unreachable => "unreachable",
            Exit::Internal => "internal",
            Exit::Output => "output",
        }
    }
}

/// A failure as the JSON object `--json` prints on stdout.
fn failure_json(f: &Failure) -> serde_json::Value {
    serde_json::json!({
        "error": f.message,
        "exit": f.exit as i32,
        "status": f.exit.name(),
    })
}

/// A failure with the exit status it maps to.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    /// Nothing of the request ran (the node could not be reached, or serves
    /// nothing now): another node may be asked.
    pub ran_nothing: bool,
    /// The command's JSON result is on stdout already: a JSON error object
    /// after it would make two documents.
    pub after_json: bool,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
            ran_nothing: false,
            after_json: false,
        }
    }

    /// A failure once the JSON result has been printed (see `after_json`).
    pub fn after_json(self) -> Self {
        Failure {
            after_json: true,
            ..self
        }
    }

    /// A failure after which the request may go to another node as it is.
    pub fn ran_nothing(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            ran_nothing: true,
            ..Failure::new(exit, message)
        }
    }
}

fn main() {
    restore_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Refused arguments are a failure too: a script that asked for
            // JSON gets its object (help and --version are not errors).
            let args = std::env::args_os()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned());
            if e.use_stderr() && asks_json_on_stdout(args) {
                let failure = Failure::new(Exit::Usage, clap_error_text(&e.render().to_string()));
                outln!("{}", failure_json(&failure));
            }
            e.exit()
        }
    };
    if let Err(message) = init_logging(&cli.log, cli.log_format) {
        if cli.command.json_on_stdout() {
            outln!(
                "{}",
                failure_json(&Failure::new(Exit::Usage, message.clone()))
            );
        }
        errln!("error: {message}");
        std::process::exit(Exit::Usage as i32);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let worker_threads = match &cli.command {
        Command::Node(a) => a.worker_threads,
        Command::Bench(a) => a.worker_threads,
        _ => None,
    };
    if let Some(n) = worker_threads {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let message = format!("cannot start the async runtime: {e}");
            if cli.command.json_on_stdout() {
                outln!(
                    "{}",
                    failure_json(&Failure::new(Exit::Internal, message.clone()))
                );
            }
            errln!("error: {message}");
            std::process::exit(Exit::Internal as i32);
        }
    };
    let json_on_stdout = cli.command.json_on_stdout();
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(a) => server_cmd::node(a).await,
            Command::Cluster(a) => server_cmd::cluster(a).await,
            Command::Demo(a) => removing_scratch_on_signal(server_cmd::demo(a)).await,
            Command::Put(a) => client_cmd::put(a).await,
            Command::Get(a) => client_cmd::get(a).await,
            Command::Delete(a) => client_cmd::delete(a).await,
            Command::Status(a) => client_cmd::status(a).await,
            Command::Repair(a) => client_cmd::repair(a).await,
            Command::Remove(a) => client_cmd::remove(a).await,
            Command::Leave(a) => client_cmd::leave(a).await,
            Command::Cleanup(a) => client_cmd::cleanup(a).await,
            Command::Bench(a) => removing_scratch_on_signal(bench_cmd::bench(a)).await,
            Command::Keygen(a) => key_cmd::keygen(a),
        }
    });
    // Background tasks (connections being closed) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(Exit::Ok) => {}
        Ok(exit) => std::process::exit(exit as i32),
        Err(f) => {
            if json_on_stdout && !f.after_json {
                outln!("{}", failure_json(&f));
            }
            errln!("error: {}", f.message.replace('\n', " "));
            std::process::exit(f.exit as i32);
        }
    }
}

/// Runs a command that keeps an embedded cluster in a scratch dir (`bench`,
/// `demo`) until it ends, or until Ctrl-C or SIGTERM: then removes this
/// process's scratch dirs and ends with 128 + the signal, as the signal's
/// default action would. A later run sweeps the dirs of runs that died,
/// but until then they can hold gigabytes (`--records` large).
async fn removing_scratch_on_signal(
    work: impl std::future::Future<Output = Result<Exit, Failure>>,
) -> Result<Exit, Failure> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return work.await;
        };
        let code = tokio::select! {
            result = work => return result,
            _ = interrupt.recv() => 128 + libc::SIGINT,
            _ = terminate.recv() => 128 + libc::SIGTERM,
        };
        // The embedded nodes are still open: a flush may add a file while
        // the dir is being removed, so try again a few times.
        for prefix in ["ringkv-bench", "ringkv-demo"] {
            let dir = server_cmd::scratch_dir(prefix);
            for _ in 0..5 {
                if std::fs::remove_dir_all(&dir).is_ok() || !dir.exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        std::process::exit(code);
    }
    #[cfg(not(unix))]
    work.await
}

/// Whether arguments clap refused asked for JSON on stdout: `--json`, save
/// that `bench --json FILE` writes its JSON to a file. Read from the raw
/// arguments, since they did not parse.
fn asks_json_on_stdout(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    // The subcommand is the first argument that is not an option (nor the
    // value of `--log`, the one global option that takes one): a key or a
    // value named "bench" is not it.
    let mut subcommand = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--log" => i += 1,
            a if a.starts_with('-') => {}
            a => {
                subcommand = Some(a);
                break;
            }
        }
        i += 1;
    }
    let bench = subcommand == Some("bench");
    args.iter().enumerate().any(|(i, a)| match a.as_str() {
        "--json=-" => true,
        "--json" if bench => args.get(i + 1).is_none_or(|next| next.starts_with('-')),
        "--json" => true,
        _ => false,
    })
}

/// Lets a closed stdout end the process quietly, as for any Unix tool
/// (`ringkv bench --json | head`): Rust ignores SIGPIPE, and `println!`
/// then panics on the broken pipe instead.
fn restore_sigpipe() {
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn init_logging(filter: &str, format: args::LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("--log (or RINGKV_LOG) {filter:?} is not a log filter: {e}"))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only help a terminal; in a log file they are noise.
        args::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Fields at the top level, where collectors index them.
        args::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Writes one line to stdout (see `outln!`).
pub fn write_stdout(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        output_failed(&e);
    }
}

/// Ends the process on output that could not be written.
pub fn output_failed(error: &std::io::Error) -> ! {
    errln!("error: cannot write the output to stdout: {error}");
    std::process::exit(Exit::Output as i32)
}

/// A clap error as one line: its message and the arguments it names,
/// without the usage and help hints that follow them.
fn clap_error_text(rendered: &str) -> String {
    rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.trim().trim_start_matches("error: "))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(args: &str) -> bool {
        asks_json_on_stdout(args.split_whitespace().map(String::from))
    }

    /// A refusal keeps the arguments it names (a missing one is listed on
    /// the lines after the first), not the usage hint.
    #[test]
    fn a_clap_error_becomes_one_line_naming_the_arguments() {
        let rendered = "error: the following required arguments were not provided:\n  <KEY>\n\nUsage: ringkv get <KEY>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_error_text(rendered),
            "the following required arguments were not provided: <KEY>"
        );
    }

    #[test]
    fn refused_arguments_that_asked_for_json_on_stdout_are_told_apart() {
        assert!(asks("get --json"));
        assert!(asks("get --json k --connect-timeout-ms 0"));
        assert!(asks("bench --json"));
        assert!(asks("bench --json - --rate 0"));
        assert!(asks("bench --json --rate 0"));
        assert!(asks("bench --json=-"));
        assert!(!asks("bench --json out.json --rate 0"));
        assert!(!asks("get k --node x"));
        // The subcommand decides, not a key that happens to be "bench".
        assert!(asks("get --json bench --bogus"));
        assert!(!asks("--log info bench --json out.json --bogus"));
    }
}
