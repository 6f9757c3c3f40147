//! `put`, `get`, `delete` and `status`: one request to one node.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ringkv_core::dvv::Payload;
use ringkv_core::wire::{
    validate_key, ErrorKind, GetRequest, PutRequest, Request, Response, VALUE_MAX_BYTES,
};
use ringkv_core::{Consistency, NodeId};
use ringkv_node::{CallError, Client};

use crate::args::{
    DeleteArgs, GetArgs, LeaveArgs, PutArgs, RemoveArgs, RepairArgs, StatusArgs, Target,
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
    });
    let response = send(&args.request.target, &request).await?;
    match response {
        Response::Put(reply) => {
            output::written(&reply, args.request.target.json, "stored");
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
    }
}

pub async fn get(args: GetArgs) -> Result<Exit, Failure> {
    validate_key(args.key.as_bytes()).map_err(|e| Failure::new(Exit::Usage, e.message))?;
    let client = connect(&args.request.target).await?;
    let reply = read(
        &client,
        args.key.as_bytes(),
        ReadOpts {
            r: args.r,
            strict: args.strict,
            local: args.local,
            wait_repair: args.wait_repair,
            timeout_ms: args.request.timeout_ms,
        },
    )
    .await;
    client.close().await;
    let reply = reply?;
    let found = !reply.values.is_empty();
    if args.request.target.json {
        output::print_json(&output::get_json(&reply));
    } else if found {
        let mut stdout = std::io::stdout().lock();
        if reply.values.len() > 1 {
            eprintln!(
                "{} concurrent values (siblings); write with --context to resolve them",
                reply.values.len()
            );
        }
        for value in &reply.values {
            let _ = stdout.write_all(value);
            if std::io::stdout().is_terminal() || reply.values.len() > 1 {
                let _ = stdout.write_all(b"\n");
            }
        }
        eprintln!("context: {}", reply.context);
    } else {
        eprintln!("not found");
    }
    Ok(if found { Exit::Ok } else { Exit::NotFound })
}

pub async fn delete(args: DeleteArgs) -> Result<Exit, Failure> {
    validate_key(args.key.as_bytes()).map_err(|e| Failure::new(Exit::Usage, e.message))?;
    let client = connect(&args.request.target).await?;
    let result = async {
        let context = match args.context {
            Some(token) => token,
            None => {
                read(
                    &client,
                    args.key.as_bytes(),
                    ReadOpts {
                        r: Consistency::Quorum,
                        strict: args.strict,
                        local: false,
                        wait_repair: false,
                        timeout_ms: args.request.timeout_ms,
                    },
                )
                .await?
                .context
            }
        };
        let request = Request::Put(PutRequest {
            key: args.key.into_bytes(),
            payload: Payload::Tombstone,
            context: Some(context),
            overwrite: false,
            w: args.w,
            strict: args.strict,
            timeout_ms: args.request.timeout_ms,
            forwarded: false,
        });
        call(&client, &request).await
    }
    .await;
    client.close().await;
    match result? {
        Response::Put(reply) => {
            output::written(&reply, args.request.target.json, "deleted");
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
    }
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
    match send(&args.target, &Request::Repair).await? {
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
    match send(&args.target, &request).await? {
        Response::Removed(reply) => {
            output::removed(&node, &reply, args.target.json);
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
    }
}

pub async fn leave(args: LeaveArgs) -> Result<Exit, Failure> {
    match send(&args.target, &Request::Leave).await? {
        Response::Left(reply) => {
            output::left(&reply, args.target.json);
            Ok(Exit::Ok)
        }
        other => Err(unexpected(other)),
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
    opts: ReadOpts,
) -> Result<ringkv_core::wire::GetReply, Failure> {
    let request = Request::Get(GetRequest {
        key: key.to_vec(),
        r: opts.r,
        strict: opts.strict,
        local: opts.local,
        wait_repair: opts.wait_repair,
        timeout_ms: opts.timeout_ms,
        forwarded: false,
    });
    match call(client, &request).await? {
        Response::Get(reply) => Ok(reply),
        other => Err(unexpected(other)),
    }
}

/// Connects, sends one request and closes.
async fn send(target: &Target, request: &Request) -> Result<Response, Failure> {
    let client = connect(target).await?;
    let result = call(&client, request).await;
    client.close().await;
    result
}

pub async fn connect(target: &Target) -> Result<Client, Failure> {
    let addr = resolve(&target.node)?;
    let key = crate::key_cmd::load(&target.key)?;
    Client::connect_with_key(
        addr,
        Duration::from_millis(target.connect_timeout_ms),
        key.as_ref(),
    )
    .await
    .map_err(|e| {
        Failure::new(
            Exit::Unreachable,
            format!("cannot reach node {}: {e}", target.node),
        )
    })
}

/// Sends a request and turns error replies into failures.
async fn call(client: &Client, request: &Request) -> Result<Response, Failure> {
    let response = client.call(request).await.map_err(|e| match e {
        // Refused at the handshake (the cluster key): nothing was sent.
        CallError::Refused(_) => Failure::new(Exit::Unreachable, e.to_string()),
        e => Failure::new(
            Exit::Unreachable,
            format!("the node dropped the request: {e}"),
        ),
    })?;
    match response {
        Response::Error(e) => {
            let exit = match e.kind {
                ErrorKind::InvalidRequest | ErrorKind::Refused => Exit::Usage,
                ErrorKind::QuorumNotReached | ErrorKind::Unavailable => Exit::Quorum,
                ErrorKind::Internal => Exit::Internal,
            };
            Err(Failure::new(exit, e.message))
        }
        ok => Ok(ok),
    }
}

/// Parses `HOST:PORT`, resolving a host name.
pub fn resolve(node: &str) -> Result<SocketAddr, Failure> {
    node.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            Failure::new(
                Exit::Usage,
                format!("--node {node:?} is not an address; use HOST:PORT, e.g. 127.0.0.1:7000"),
            )
        })
}

fn unexpected(response: Response) -> Failure {
    Failure::new(
        Exit::Internal,
        format!("the node gave an unexpected answer: {response:?}"),
    )
}
