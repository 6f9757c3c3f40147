//! A minimal RESP2 client (the Redis protocol), so `ringkv bench --target
//! resp://HOST:PORT` runs the same workload against Redis or Dynomite for a
//! side-by-side figure. Only what the workloads need: `GET` and `SET` on
//! one connection, one request at a time.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Why a RESP call failed.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server answered with an error: {0}")]
    Server(String),
    #[error("malformed reply: {0}")]
    Protocol(String),
}

/// The longest reply header line accepted.
const LINE_MAX_BYTES: u64 = 4096;

/// The largest bulk string accepted in a reply.
const BULK_MAX_BYTES: usize = 64 * 1024 * 1024;

/// A reply, as far as `GET` and `SET` need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply.
pub async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Reply, RespError> {
    let mut line = Vec::new();
    // A header line is short; a server that never ends one gets no more
    // than this much memory.
    (&mut *r)
        .take(LINE_MAX_BYTES)
        .read_until(b'\n', &mut line)
        .await?;
    if line.is_empty() {
        return Err(RespError::Protocol("connection closed".into()));
    }
    let text = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| RespError::Protocol("a line without CRLF".into()))?;
    let (kind, rest) = text
        .split_first()
        .ok_or_else(|| RespError::Protocol("an empty line".into()))?;
    let rest = String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(Reply::Simple(rest)),
        b'-' => Err(RespError::Server(rest)),
        b':' => rest
            .parse()
            .map(Reply::Integer)
            .map_err(|_| RespError::Protocol(format!("integer {rest:?}"))),
        b'$' => {
            let len: i64 = rest
                .parse()
                .map_err(|_| RespError::Protocol(format!("bulk length {rest:?}")))?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let len = len as usize;
            if len > BULK_MAX_BYTES {
                return Err(RespError::Protocol(format!("bulk of {len} bytes")));
            }
            let mut data = vec![0; len + 2];
            r.read_exact(&mut data).await?;
            if !data.ends_with(b"\r\n") {
                return Err(RespError::Protocol("bulk without CRLF".into()));
            }
            data.truncate(len);
            Ok(Reply::Bulk(Some(data)))
        }
        other => Err(RespError::Protocol(format!(
            "reply type {:?}",
            *other as char
        ))),
    }
}

/// One connection to a RESP server.
///
/// RESP matches replies to requests by order alone, so a call that did not
/// read its whole reply (it failed, or its caller gave up on it and dropped
/// it) leaves the connection out of step: the next call would read the old
/// reply as its own. Such a connection is dropped, and the next call opens
/// a new one.
pub struct RespConn {
    addr: std::net::SocketAddr,
    /// `None` after a call that did not finish cleanly.
    stream: Option<BufReader<TcpStream>>,
}

async fn open(addr: std::net::SocketAddr) -> Result<BufReader<TcpStream>, RespError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

impl RespConn {
    pub async fn connect(addr: std::net::SocketAddr) -> Result<Self, RespError> {
        Ok(RespConn {
            addr,
            stream: Some(open(addr).await?),
        })
    }

    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, RespError> {
        // Taken out for the call and put back only once the reply is read
        // whole (a server's error reply is whole too): cancelled or failed
        // midway, the connection is gone.
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => open(self.addr).await?,
        };
        stream.get_mut().write_all(&encode(args)).await?;
        let reply = read_reply(&mut stream).await;
        if matches!(reply, Ok(_) | Err(RespError::Server(_))) {
            self.stream = Some(stream);
        }
        reply
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, RespError> {
        match self.call(&[b"GET", key]).await? {
            Reply::Bulk(value) => Ok(value),
            other => Err(RespError::Protocol(format!("GET answered {other:?}"))),
        }
    }

    pub async fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), RespError> {
        match self.call(&[b"SET", key, value]).await? {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => Err(RespError::Protocol(format!("SET answered {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply, RespError> {
        read_reply(&mut BufReader::new(bytes)).await
    }

    #[tokio::test]
    async fn replies_parse_and_bad_ones_are_errors() {
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        assert_eq!(parse(b"+OK\r\n").await.unwrap(), Reply::Simple("OK".into()));
        assert_eq!(parse(b":42\r\n").await.unwrap(), Reply::Integer(42));
        assert_eq!(parse(b"$-1\r\n").await.unwrap(), Reply::Bulk(None));
        assert_eq!(
            parse(b"$5\r\nhe\r\no\r\n").await.unwrap(),
            Reply::Bulk(Some(b"he\r\no".to_vec())),
            "bulk strings are binary-safe"
        );
        assert!(
            matches!(parse(b"-ERR nope\r\n").await, Err(RespError::Server(m)) if m == "ERR nope")
        );
        assert!(parse(b"$5\r\nhi\r\n").await.is_err(), "short bulk");
        assert!(parse(b"$99999999999\r\n").await.is_err(), "oversized bulk");
        assert!(parse(b"*1\r\n").await.is_err(), "arrays are not expected");
        assert!(parse(b"+OK").await.is_err(), "no CRLF");
        assert!(parse(b"").await.is_err(), "closed");
        let endless = vec![b'+'; 10_000];
        assert!(parse(&endless).await.is_err(), "an endless line is cut off");
    }

    /// A server whose first connection answers its first GET late: the
    /// caller gives up on it, and the next call must get its own reply,
    /// not the late one.
    #[tokio::test]
    async fn a_call_given_up_on_does_not_hand_its_late_reply_to_the_next() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for connection in 0.. {
                let (socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let mut command = 0;
                    // Each command is 5 lines for GET (*2, $3, GET, $n, key).
                    let mut seen = Vec::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        seen.push(line);
                        if seen.len() < 5 {
                            continue;
                        }
                        let key = seen[4].clone();
                        seen.clear();
                        if connection == 0 && command == 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        }
                        command += 1;
                        let reply = format!("${}\r\n{key}\r\n", key.len());
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let mut conn = RespConn::connect(addr).await.unwrap();
        let late = tokio::time::timeout(std::time::Duration::from_millis(50), conn.get(b"first"));
        assert!(late.await.is_err(), "the first GET should time out");
        // Without dropping the connection this read "first"'s reply.
        assert_eq!(conn.get(b"second").await.unwrap(), Some(b"second".to_vec()));
        assert_eq!(conn.get(b"third").await.unwrap(), Some(b"third".to_vec()));
    }
}
