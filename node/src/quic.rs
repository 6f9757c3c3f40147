//! Requests over QUIC: one bidirectional stream per request on a long-lived
//! connection.
//!
//! The caller opens a stream, writes one encoded [`Request`] and finishes its
//! side; the server reads the whole frame (bounded by [`FRAME_MAX_BYTES`]),
//! validates it, answers with one encoded [`Response`] and finishes. Streams
//! are cheap in QUIC, so requests on one connection never wait behind each
//! other (no head-of-line blocking), and there is no per-request handshake.
//!
//! [`PeerPool`] keeps one connection per peer address and reconnects when a
//! connection dies; [`Client`] is the single connection a command-line client
//! or benchmark uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ringkv_core::wire::{
    decode_request, decode_response, encode_request, encode_response, ErrorKind, Request, Response,
    FRAME_MAX_BYTES,
};

use crate::tls;

/// Sends one request on `conn` and reads its response.
pub async fn round_trip(
    conn: &quinn::Connection,
    request: &Request,
) -> Result<Response, CallError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(CallError::connection)?;
    send.write_all(&encode_request(request))
        .await
        .map_err(|e| CallError::Stream(e.to_string()))?;
    send.finish()
        .map_err(|e| CallError::Stream(e.to_string()))?;
    let bytes = recv
        .read_to_end(FRAME_MAX_BYTES)
        .await
        .map_err(|e| CallError::Stream(e.to_string()))?;
    decode_response(&bytes).map_err(|e| CallError::Protocol(e.to_string()))
}

/// Why a request over QUIC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The connection is gone; the next call should reconnect.
    #[error("connection lost: {0}")]
    Connection(String),
    #[error("stream failed: {0}")]
    Stream(String),
    #[error("invalid response: {0}")]
    Protocol(String),
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl CallError {
    fn connection(e: quinn::ConnectionError) -> Self {
        CallError::Connection(e.to_string())
    }
}

/// Serves every stream of one accepted connection with `handle`.
pub async fn serve_connection<H, F>(conn: quinn::Connection, handle: H)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response> + Send + 'static,
{
    // Stream concurrency per connection is capped by the transport config
    // (MAX_CONCURRENT_STREAMS), which bounds the tasks spawned here.
    while let Ok((send, recv)) = conn.accept_bi().await {
        let handle = handle.clone();
        tokio::spawn(serve_stream(send, recv, handle));
    }
}

async fn serve_stream<H, F>(mut send: quinn::SendStream, mut recv: quinn::RecvStream, handle: H)
where
    H: Fn(Request) -> F,
    F: std::future::Future<Output = Response>,
{
    let response = match recv.read_to_end(FRAME_MAX_BYTES).await {
        Ok(bytes) => match decode_request(&bytes) {
            Ok(request) => handle(request).await,
            Err(e) => {
                metrics::counter!("ringkv_malformed_frames_total").increment(1);
                Response::error(ErrorKind::InvalidRequest, format!("malformed request: {e}"))
            }
        },
        Err(quinn::ReadToEndError::TooLong) => Response::error(
            ErrorKind::InvalidRequest,
            format!("request larger than {FRAME_MAX_BYTES} bytes"),
        ),
        // The sender reset the stream or the connection died: nobody to answer.
        Err(_) => return,
    };
    if send.write_all(&encode_response(&response)).await.is_ok() {
        let _ = send.finish();
    }
}

/// One connection per peer, opened on first use and replaced when it dies.
pub struct PeerPool {
    endpoint: quinn::Endpoint,
    connections: DashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>,
    connect_timeout: Duration,
}

impl PeerPool {
    pub fn new(endpoint: quinn::Endpoint, connect_timeout: Duration) -> Self {
        PeerPool {
            endpoint,
            connections: DashMap::new(),
            connect_timeout,
        }
    }

    /// Sends `request` to the node at `addr`.
    pub async fn call(&self, addr: SocketAddr, request: &Request) -> Result<Response, CallError> {
        let conn = self.connection(addr).await?;
        let result = round_trip(&conn, request).await;
        if conn.close_reason().is_some() {
            self.forget(addr, &conn).await;
        }
        result
    }

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, CallError> {
        let slot = self
            .connections
            .entry(addr)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
            .clone();
        // Holding the slot's lock while connecting makes concurrent callers
        // share one connection attempt instead of racing several.
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let conn = connect(&self.endpoint, addr, self.connect_timeout).await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Closes and drops the connection to `addr`, so the next call dials
    /// afresh. Used when a peer is judged down: a restarted peer cannot be
    /// reached over its predecessor's connection.
    pub async fn disconnect(&self, addr: SocketAddr) {
        if let Some(slot) = self.connections.get(&addr).map(|s| s.clone()) {
            if let Some(conn) = slot.lock().await.take() {
                conn.close(0u32.into(), b"peer judged down");
            }
        }
    }

    async fn forget(&self, addr: SocketAddr, dead: &quinn::Connection) {
        if let Some(slot) = self.connections.get(&addr).map(|s| s.clone()) {
            let mut slot = slot.lock().await;
            if slot
                .as_ref()
                .is_some_and(|c| c.stable_id() == dead.stable_id())
            {
                *slot = None;
            }
        }
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, CallError> {
    let connecting = endpoint
        .connect(addr, tls::SERVER_NAME)
        .map_err(|e| CallError::Connect(e.to_string()))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(CallError::Connect(e.to_string())),
        Err(_) => Err(CallError::Connect(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// A client's connection to one node.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Client {
    /// Connects to the node at `addr`, giving up after `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Client, CallError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| CallError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(tls::client_config());
        let conn = connect(&endpoint, addr, timeout).await?;
        Ok(Client { endpoint, conn })
    }

    pub async fn call(&self, request: &Request) -> Result<Response, CallError> {
        round_trip(&self.conn, request).await
    }

    /// The raw connection, for tests that send malformed frames.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection politely so the node frees it at once.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(200), self.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Node, NodeConfig};
    use ringkv_core::NodeId;

    /// Many requests to one peer share one connection (a stream each); the
    /// pool never opens a connection per request.
    #[tokio::test]
    async fn the_peer_pool_reuses_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        let node = Node::start(NodeConfig::new(
            NodeId::new("n1").unwrap(),
            listen,
            dir.path().into(),
        ))
        .await
        .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config());
        let pool = std::sync::Arc::new(PeerPool::new(endpoint, Duration::from_secs(5)));
        let first = pool.connection(node.addr()).await.unwrap().stable_id();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (pool, addr) = (pool.clone(), node.addr());
            calls.spawn(async move { pool.call(addr, &Request::Ping).await });
        }
        while let Some(result) = calls.join_next().await {
            assert!(matches!(result.unwrap(), Ok(Response::Pong)));
        }
        assert_eq!(pool.connections.len(), 1);
        assert_eq!(
            pool.connection(node.addr()).await.unwrap().stable_id(),
            first
        );
        node.shutdown().await;
    }
}
