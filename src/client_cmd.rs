//! `put`, `get`, `delete`, `status`, `repair`, `remove`, `leave` and `cleanup`: one
//! request to one node. For the requests any node can serve, `--node` may
//! list several: they are tried in turn while one cannot be reached or
//! serves nothing now, since nothing of the request ran there.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{
    validate_key, ErrorKind, GetRequest, NodeStats, PutRequest, Request, Response, VALUE_MAX_BYTES,
};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{CallError, Client};

use crate::args::{
    CleanupArgs, DeleteArgs, GetArgs, LeaveArgs, PutArgs, RemoveArgs, RepairArgs, StatusArgs,
    Target,
};
use crate::output;
use crate::{Exit, Failure};

pub async fn put(args: PutArgs) -> Result<Exit, Failure> {
    validate_key(args.key.as_bytes()).map_err(|e| Failure::new(Exit::Usage, e.message))?;
    let value = match args.value.as_deref() {
        None | Some("-") => {
            // One byte past the most any node accepts is enough to refuse
            // it, without reading (or sending) an endless stdin.
            let mut buf = Vec::new();
            let limit = VALUE_MAX_BYTES as u64 + 1;
            // A forgotten value would otherwise look like a hang.
            if std::io::stdin().is_terminal() {
                errln!("reading the value from stdin; end with Ctrl-D");
            }
            std::io::stdin()
                .take(limit)
                .read_to_end(&mut buf)
                .map_err(|e| {
                    Failure::new(
                        Exit::Usage,
                        format!("cannot read the value from stdin: {e}"),
                    )
                })?;
            if buf.len() > VALUE_MAX_BYTES {
                return Err(Failure::new(
                    Exit::Usage,
                    format!("the value on stdin is larger than {VALUE_MAX_BYTES} bytes, the most any node accepts"),
                ));
            }
            buf
        }
        Some(v) => v.as_bytes().to_vec(),
    };
    let request = Request::Put(PutRequest {
        key: args.key.into_bytes(),
        payload: Payload::Value(value),
        context: args.context,
        overwrite: args.overwrite,
        w: args.w,
        strict: args.strict,
        timeout_ms: args.request.timeout_ms,
        forwarded: false,
        not_after_unix_ms: None,
    });
    match send(&args.request.target, &request).await? {
        Response::Put(reply) => {
            output::written(&reply, args.request.target.json, output::Written::Value);
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
    }
}

pub async fn get(args: GetArgs) -> Result<Exit, Failure> {
    validate_key(args.key.as_bytes()).map_err(|e| Failure::new(Exit::Usage, e.message))?;
    let opts = ReadOpts {
        r: args.r,
        strict: args.strict,
        local: args.local,
        wait_repair: args.wait_repair,
        timeout_ms: args.request.timeout_ms,
    };
    let reply = on_first_serving(&args.request.target, async |client| {
        read(client, args.key.as_bytes(), &opts).await
    })
    .await?;
    let found = !reply.values.is_empty();
    if args.request.target.json {
        output::print_json(&output::get_json(&reply));
    } else if found {
        let mut stdout = std::io::stdout().lock();
        if reply.values.len() > 1 {
            errln!(
                "{} concurrent values (siblings), one per line below (--json keeps values with newlines apart); write with --context to resolve them",
                reply.values.len()
            );
        }
        // A value cut short (a full disk) must not pass for the value.
        let newline = std::io::stdout().is_terminal() || reply.values.len() > 1;
        for value in &reply.values {
            let written = stdout
                .write_all(value)
                .and_then(|()| {
                    if newline {
                        stdout.write_all(b"\n")
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| stdout.flush());
            if let Err(e) = written {
                crate::output_failed(&e);
            }
        }
        errln!("context: {}", reply.context);
    } else {
        errln!("not found");
    }
    Ok(if found { Exit::Ok } else { Exit::NotFound })
}

pub async fn delete(args: DeleteArgs) -> Result<Exit, Failure> {
    validate_key(args.key.as_bytes()).map_err(|e| Failure::new(Exit::Usage, e.message))?;
    let result = on_first_serving(&args.request.target, async |client| {
        let context = match &args.context {
            Some(token) => token.clone(),
            None => {
                let opts = ReadOpts {
                    r: Consistency::Quorum,
                    strict: args.strict,
                    local: false,
                    wait_repair: false,
                    timeout_ms: args.request.timeout_ms,
                };
                let seen = read(client, args.key.as_bytes(), &opts).await?;
                if saw_nothing(&seen) {
                    // A tombstone with what that read saw would delete
                    // nothing: no write, as Riak answers 404.
                    return Ok(Response::Get(seen));
                }
                seen.context
            }
        };
        let request = Request::Put(PutRequest {
            key: args.key.as_bytes().to_vec(),
            payload: Payload::Tombstone,
            context: Some(context),
            overwrite: false,
            w: args.w,
            strict: args.strict,
            timeout_ms: args.request.timeout_ms,
            forwarded: false,
            not_after_unix_ms: None,
        });
        call(client, &request).await
    })
    .await;
    match result? {
        Response::Put(reply) => {
            output::written(&reply, args.request.target.json, output::Written::Tombstone);
            Ok(Exit::Ok)
        }
        Response::Get(seen) => {
            if args.request.target.json {
                output::print_json(&output::get_json(&seen));
            } else {
                errln!(
                    "not found: a quorum read saw no version of the key, so nothing was written"
                );
            }
            Ok(Exit::NotFound)
        }
        other => Err(unexpected(other)),
    }
}

/// Whether a read saw no version at all, not even a tombstone. One that
/// saw only tombstones still gets a delete: a retry of a delete that was
/// stored on too few replicas must spread its tombstone, or a replica it
/// missed would keep serving the value.
fn saw_nothing(seen: &ringkv_core::wire::GetReply) -> bool {
    seen.values.is_empty()
        && ringkv_core::context::CausalContext::decode(&seen.context)
            .is_ok_and(|c| c.version_vector.is_empty())
}

pub async fn status(args: StatusArgs) -> Result<Exit, Failure> {
    match send(&args.target, &Request::Status).await? {
        Response::Status(reply) => {
            output::status(&reply, args.target.json);
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
    }
}

pub async fn repair(args: RepairArgs) -> Result<Exit, Failure> {
    match send_to_the_node(&args.target, "repair", &Request::Repair).await? {
        Response::Repair(report) => {
            output::repair(&report, args.target.json);
            Ok(if report.failures.is_empty() {
                Exit::Ok
            } else {
                Exit::Unreachable
            })
        }
        other => Err(unexpected(other)),
    }
}

pub async fn remove(args: RemoveArgs) -> Result<Exit, Failure> {
    let node = NodeId::new(args.id.as_str())
        .map_err(|e| Failure::new(Exit::Usage, format!("ID {:?}: {e}", args.id)))?;
    let request = Request::Remove {
        node: node.clone(),
        tell_others: true,
    };
    // Any member can remove a node.
    match send(&args.target, &request).await? {
        Response::Removed(reply) => {
            output::removed(&node, &reply, args.target.json);
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
    }
}

pub async fn leave(args: LeaveArgs) -> Result<Exit, Failure> {
    let leaving = send_to_the_node(&args.target, "leave", &Request::Leave);
    let answer = with_progress(&args.target, leaving, "handing over keys", |stats| {
        format!(
            "handing over keys: {} sent so far (each pass sends them all)",
            stats.leave_keys_sent
        )
    })
    .await;
    match answer? {
        Response::Left(reply) => {
            output::left(&reply, args.target.json);
            Ok(left_exit(&reply))
        }
        other => Err(unexpected(other)),
    }
}

/// A leave whose last pass missed a replica (or that left hints behind)
/// exits non-zero, as a cleanup or repair that missed one does: a script
/// must not take it for a clean leave and delete the data dir.
fn left_exit(reply: &ringkv_core::wire::LeaveReply) -> Exit {
    if reply.late_failures.is_empty() {
        Exit::Ok
    } else {
        Exit::Unreachable
    }
}

pub async fn cleanup(args: CleanupArgs) -> Result<Exit, Failure> {
    let cleaning = send_to_the_node(&args.target, "cleanup", &Request::Cleanup);
    let answer = with_progress(&args.target, cleaning, "reading keys", |stats| {
        format!("reading keys: {} so far", stats.cleanup_keys_scanned)
    })
    .await;
    match answer? {
        Response::Cleaned(report) => {
            output::cleaned(&report, args.target.json);
            Ok(if report.failures.is_empty() {
                Exit::Ok
            } else {
                Exit::Unreachable
            })
        }
        other => Err(unexpected(other)),
    }
}

/// Runs `work` (a leave or a cleanup, which may take minutes on a large
/// store) with a spinner on stderr showing `progress` of the node's
/// `Stats`, asked every half second on a connection of its own. Without
/// that connection, with `--json`, or when stderr is not a terminal, it
/// just waits.
async fn with_progress<T>(
    target: &Target,
    work: impl std::future::Future<Output = T>,
    first: &str,
    progress: impl Fn(&NodeStats) -> String,
) -> T {
    if target.json || !std::io::stderr().is_terminal() {
        return work.await;
    }
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("a valid template"),
    );
    spinner.set_message(first.to_string());
    spinner.enable_steady_tick(Duration::from_millis(100));
    tokio::pin!(work);
    let result = tokio::select! {
        result = &mut work => result,
        _ = show_progress(target, &spinner, &progress) => work.await,
    };
    spinner.finish_and_clear();
    result
}

/// Keeps `spinner`'s message up to date with the node's `Stats`; returns
/// only if it cannot reach the node.
async fn show_progress(
    target: &Target,
    spinner: &indicatif::ProgressBar,
    progress: &impl Fn(&NodeStats) -> String,
) -> Option<()> {
    let node = target.nodes().ok()?.into_iter().next()?;
    let key = crate::key_cmd::load(&target.key).ok()?;
    let client = connect(&node, target, key.as_ref()).await.ok()?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(Response::Stats(stats)) = client.call(&Request::Stats).await {
            spinner.set_message(progress(&stats));
        }
    }
}

/// How a read is asked for.
struct ReadOpts {
    r: Consistency,
    strict: bool,
    local: bool,
    wait_repair: bool,
    timeout_ms: u32,
}

async fn read(
    client: &Client,
    key: &[u8],
    opts: &ReadOpts,
) -> Result<ringkv_core::wire::GetReply, Failure> {
    let request = Request::Get(GetRequest {
        key: key.to_vec(),
        r: opts.r,
        strict: opts.strict,
        local: opts.local,
        direct: false,
        wait_repair: opts.wait_repair,
        timeout_ms: opts.timeout_ms,
        forwarded: false,
    });
    match call(client, &request).await? {
        Response::Get(reply) => Ok(reply),
        other => Err(unexpected(other)),
    }
}

/// Runs `op` on the first node `--node` lists that can be reached and
/// serves requests, and closes the connection after. A node that cannot be
/// reached, or that answers it serves nothing now (shutting down, removed,
/// still joining), ran nothing of the request, so the next one is tried.
/// Any other failure is final: part of the request may have run, and sending
/// a write again elsewhere could store it twice.
async fn on_first_serving<T>(
    target: &Target,
    op: impl AsyncFn(&Client) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let nodes = target.nodes().map_err(|e| Failure::new(Exit::Usage, e))?;
    let key = crate::key_cmd::load(&target.key)?;
    let mut skipped: Vec<(String, Failure)> = Vec::new();
    for node in &nodes {
        let result = match connect(node, target, key.as_ref()).await {
            Ok(client) => {
                let result = op(&client).await;
                client.close().await;
                result
            }
            Err(failure) => Err(failure),
        };
        match result {
            Err(failure) if failure.ran_nothing && nodes.len() > 1 => {
                tracing::info!(%node, reason = %failure.message, "trying the next node");
                skipped.push((node.clone(), failure));
            }
            other => return other,
        }
    }
    // Every node was tried: the last one's exit status, every node's reason.
    let exit = skipped.last().map_or(Exit::Unreachable, |(_, f)| f.exit);
    let reasons: Vec<String> = skipped
        .iter()
        .map(|(node, f)| format!("{node}: {}", f.message))
        .collect();
    Err(Failure::new(
        exit,
        format!("no node could serve the request; {}", reasons.join("; ")),
    ))
}

/// Sends `request` to the first node `--node` lists that serves it (see
/// [`on_first_serving`]).
async fn send(target: &Target, request: &Request) -> Result<Response, Failure> {
    on_first_serving(target, async |client| call(client, request).await).await
}

/// Sends `request` to the one node `--node` names, for an operation on that
/// node itself (`what`).
async fn send_to_the_node(
    target: &Target,
    what: &str,
    request: &Request,
) -> Result<Response, Failure> {
    let nodes = target.nodes().map_err(|e| Failure::new(Exit::Usage, e))?;
    if nodes.len() != 1 {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "`{what}` acts on the one node --node (or RINGKV_NODE) names: give one address, not {}",
                nodes.len()
            ),
        ));
    }
    send(target, request).await
}

/// Looks `node` up and connects to it. Either failure ran nothing.
async fn connect(
    node: &str,
    target: &Target,
    key: Option<&ringkv_node::ClusterKey>,
) -> Result<Client, Failure> {
    let addr = resolve_node(target.node_source(), node)
        .map_err(|e| Failure::ran_nothing(Exit::Usage, e))?;
    Client::connect_with_key(addr, Duration::from_millis(target.connect_timeout_ms), key)
        .await
        .map_err(|e| {
            Failure::ran_nothing(Exit::Unreachable, format!("cannot reach node {node}: {e}"))
        })
}

/// Sends a request and turns error replies into failures. Whether another
/// node may be asked follows the rule `ClusterClient` follows
/// (`ran_nothing`): only when nothing of the request ran.
async fn call(client: &Client, request: &Request) -> Result<Response, Failure> {
    let outcome = match request.answer_limit() {
        // A node that froze after the handshake would otherwise hold the
        // command until QUIC's idle timeout, whatever --timeout-ms says.
        Some(limit) => match tokio::time::timeout(limit, client.call(request)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CallError::TimedOut { limit }),
        },
        // Status, repair, leave, cleanup: as long as their work takes.
        None => client.call(request).await,
    };
    answer_or_failure(outcome)
}

/// A call's answer, or the failure it comes to (see [`call`]).
pub(crate) fn answer_or_failure(outcome: Result<Response, CallError>) -> Result<Response, Failure> {
    let ran_nothing = ringkv_node::cluster_client::ran_nothing(&outcome);
    let mut failure = match outcome {
        Ok(Response::Error(e)) => match e.kind {
            ErrorKind::InvalidRequest | ErrorKind::Refused => Failure::new(Exit::Usage, e.message),
            ErrorKind::QuorumNotReached
            | ErrorKind::Unavailable
            | ErrorKind::NotServing
            | ErrorKind::Overloaded
            // Only nodes send replica requests; a client never sees it.
            | ErrorKind::SenderRemoved => Failure::new(Exit::Quorum, e.message),
            ErrorKind::Internal => Failure::new(Exit::Internal, e.message),
        },
        Ok(ok) => return Ok(ok),
        // Refused at the handshake (the cluster key): nothing was sent.
        Err(e @ CallError::Refused(_)) => Failure::new(Exit::Unreachable, e.to_string()),
        // The node stopped before it read the request: nothing ran.
        Err(e @ CallError::Unread(_)) => Failure::new(Exit::Quorum, e.to_string()),
        Err(e @ CallError::Protocol(_)) => Failure::new(
            Exit::Internal,
            format!("the node's answer could not be read: {e}"),
        ),
        Err(e) if ran_nothing => {
            Failure::new(Exit::Unreachable, format!("cannot reach the node: {e}"))
        }
        // Exit 4 tells a script that retrying is safe; this is not.
        Err(e) => Failure::new(
            Exit::Quorum,
            format!("the node dropped the request, which may have run: {e}"),
        ),
    };
    failure.ran_nothing = ran_nothing;
    Err(failure)
}

/// Parses a node's `HOST:PORT` (not port 0), resolving a host name; the
/// error names the problem, and `flag` (`--node` or `RINGKV_NODE`), which
/// gave it.
fn resolve_node(flag: &str, node: &str) -> Result<SocketAddr, String> {
    crate::args::check_node_addr(flag, node)?;
    resolve_addr(flag, node)
}

/// Parses `flag`'s value `addr`, `HOST:PORT`, resolving a host name. The
/// error tells a malformed address from a name that does not resolve.
pub fn resolve_addr(flag: &str, addr: &str) -> Result<SocketAddr, String> {
    crate::args::check_host_port(flag, addr)?;
    match addr.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{flag} {addr:?}: the host name has no address")),
        Err(e) => Err(format!(
            "{flag} {addr:?}: cannot resolve the host name ({e})"
        )),
    }
}

fn unexpected(response: Response) -> Failure {
    // Its start says what it was; the rest may be a whole value's bytes.
    let text = crate::output::debug_capped(&response, crate::output::ANSWER_SHOWN_CHARS);
    Failure::new(
        Exit::Internal,
        format!("the node gave an unexpected answer: {text}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leave_that_missed_a_replica_in_its_last_pass_exits_non_zero() {
        let mut reply = ringkv_core::wire::LeaveReply {
            record: ringkv_core::wire::JoinReply {
                cluster_id: 1,
                replicas: 3,
                members: Vec::new(),
                removed: Vec::new(),
            },
            keys: 10,
            not_told: Vec::new(),
            late_failures: Vec::new(),
        };
        assert_eq!(left_exit(&reply), Exit::Ok);
        reply.late_failures.push(ringkv_core::wire::PeerFailure {
            peer: ringkv_core::NodeId::new("n2").unwrap(),
            reason: "no answer within 10 s".into(),
        });
        assert_eq!(left_exit(&reply), Exit::Unreachable);
    }

    /// Key requests wait for their deadline and a second, the rest (a
    /// leave, a repair) for as long as their work takes.
    #[test]
    fn key_requests_wait_for_their_deadline_and_a_second() {
        let mut get = GetRequest::new(b"k".to_vec(), Consistency::One);
        get.timeout_ms = 200;
        assert_eq!(
            Request::Get(get).answer_limit(),
            Some(Duration::from_millis(1200))
        );
        let put = PutRequest::new(
            b"k".to_vec(),
            Payload::Value(vec![]),
            Consistency::One,
            None,
        );
        assert_eq!(
            Request::Put(put.clone()).answer_limit(),
            Some(Duration::from_millis(u64::from(put.timeout_ms) + 1000))
        );
        assert_eq!(Request::Status.answer_limit(), None);
        assert_eq!(Request::Repair.answer_limit(), None);
    }

    /// A connection lost under a request may have run it: not exit 4,
    /// which tells a script that a retry is safe. One never made is 4; an
    /// answer that cannot be read is the node's failure.
    #[test]
    fn lost_requests_are_told_apart_from_unreached_nodes() {
        let exit = |e| answer_or_failure(Err(e)).unwrap_err();
        let lost = exit(CallError::Connection("reset".into()));
        assert_eq!((lost.exit, lost.ran_nothing), (Exit::Quorum, false));
        assert!(lost.message.contains("may have run"), "{}", lost.message);
        let late = exit(CallError::TimedOut {
            limit: Duration::from_secs(1),
        });
        assert_eq!(late.exit, Exit::Quorum);
        let never = exit(CallError::Connect("refused".into()));
        assert_eq!((never.exit, never.ran_nothing), (Exit::Unreachable, true));
        assert_eq!(
            exit(CallError::Protocol("garbage".into())).exit,
            Exit::Internal
        );
        assert_eq!(
            exit(CallError::Refused("no key".into())).exit,
            Exit::Unreachable
        );
    }

    // Only IP literals: looking them up needs no resolver or network.
    #[test]
    fn addresses_are_refused_for_what_is_wrong_with_them() {
        let err = resolve_node("--node", "127.0.0.5:0").unwrap_err();
        assert!(err.contains("--node") && err.contains("port 0"), "{err}");
        let err = resolve_addr("--metrics", "http://127.0.0.1:9100").unwrap_err();
        assert!(err.contains("scheme") && !err.contains("resolve"), "{err}");
        assert_eq!(
            resolve_addr("--listen", "127.0.0.1:0"),
            Ok("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            resolve_node("--node", "127.0.0.1:7000"),
            Ok("127.0.0.1:7000".parse().unwrap())
        );
    }
}
