//! The causal context a client carries between a read and its next write.
//!
//! Dynamo hands the client an opaque "context" with every read and expects it
//! back on the write that follows, so the store can tell which versions the
//! write supersedes. ringkv's context is a [`VersionVector`] wrapped in a
//! versioned, base64url token. The token also names the cluster and the key it
//! was read from: a context replayed against another cluster, or against
//! another key, would silently supersede versions the client never saw, so
//! such tokens are rejected.
//!
//! Format v2 (all integers little-endian):
//! `0x02 | cluster_id u64 | key_fingerprint u64 | count u16 | count × (id_len u8 | id | counter u64) | checksum u64`,
//! the checksum being [`stable_hash64`] of the bytes before it. A token
//! damaged on its way (a character changed in a copy, a truncation that
//! still parses) is refused rather than acted on: a counter raised by
//! damage would make the write supersede versions of other replicas that
//! the client never saw, a lost update. v1, issued by earlier versions, is
//! the same without the checksum, and is still read.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::dvv::VersionVector;
use crate::error::InvalidInput;
use crate::hash::stable_hash64;
use crate::node_id::NodeId;

const TOKEN_VERSION: u8 = 2;
/// The version before the checksum, still read.
const TOKEN_VERSION_UNCHECKED: u8 = 1;
const CHECKSUM_BYTES: usize = 8;
/// Bounds what a token can make us allocate; a clock never has more entries.
const TOKEN_ENTRIES_MAX: usize = crate::dvv::CLOCK_ENTRIES_MAX;
/// The longest token a node issues: a header of 19 bytes, the most entries
/// of the longest ids and the checksum, in base64 (4 characters per 3
/// bytes). A longer one is refused before it is decoded, which would
/// allocate in proportion to it.
pub const TOKEN_CHARS_MAX: usize =
    (19 + TOKEN_ENTRIES_MAX * (1 + crate::node_id::NODE_ID_MAX_BYTES + 8) + CHECKSUM_BYTES)
        .div_ceil(3)
        * 4;

/// A decoded context token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CausalContext {
    pub cluster_id: u64,
    pub key_fingerprint: u64,
    pub version_vector: VersionVector,
}

impl CausalContext {
    pub fn new(cluster_id: u64, key: &[u8], version_vector: VersionVector) -> Self {
        CausalContext {
            cluster_id,
            key_fingerprint: stable_hash64(key),
            version_vector,
        }
    }

    /// The opaque token handed to clients.
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(19 + self.version_vector.len() * 16 + CHECKSUM_BYTES);
        out.push(TOKEN_VERSION);
        out.extend_from_slice(&self.cluster_id.to_le_bytes());
        out.extend_from_slice(&self.key_fingerprint.to_le_bytes());
        out.extend_from_slice(&(self.version_vector.len() as u16).to_le_bytes());
        for (node, counter) in self.version_vector.iter() {
            out.push(node.as_str().len() as u8);
            out.extend_from_slice(node.as_str().as_bytes());
            out.extend_from_slice(&counter.to_le_bytes());
        }
        let checksum = stable_hash64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Parses a token without checking whom it belongs to.
    pub fn decode(token: &str) -> Result<Self, InvalidInput> {
        if token.trim().is_empty() {
            return Err(InvalidInput::new(
                "context token is empty; pass the `context:` a get printed",
            ));
        }
        if token.trim().len() > TOKEN_CHARS_MAX {
            return Err(InvalidInput::new(format!(
                "context token is {} characters long, longer than any ringkv issues ({TOKEN_CHARS_MAX}); pass the `context:` a get printed",
                token.trim().len()
            )));
        }
        let bytes = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| {
            InvalidInput::new(
                "context token is not one ringkv issued (not base64url); pass the `context:` a get printed, whole",
            )
        })?;
        let version = *bytes
            .first()
            .ok_or_else(|| InvalidInput::new("context token is truncated"))?;
        let body = match version {
            TOKEN_VERSION => {
                let Some(at) = bytes.len().checked_sub(CHECKSUM_BYTES).filter(|at| *at > 0) else {
                    return Err(InvalidInput::new("context token is truncated"));
                };
                let (body, checksum) = bytes.split_at(at);
                let checksum = u64::from_le_bytes(checksum.try_into().expect("8 bytes"));
                if checksum != stable_hash64(body) {
                    return Err(InvalidInput::new(
                        "context token is damaged (its checksum does not match); pass the `context:` a get printed, whole and unchanged",
                    ));
                }
                body
            }
            TOKEN_VERSION_UNCHECKED => &bytes[..],
            _ => {
                return Err(InvalidInput::new(format!(
                    "context token has version {version}; this node understands versions {TOKEN_VERSION_UNCHECKED} and {TOKEN_VERSION}"
                )))
            }
        };
        let mut r = Reader { bytes: &body[1..] };
        let cluster_id = r.u64()?;
        let key_fingerprint = r.u64()?;
        let count = r.u16()? as usize;
        if count > TOKEN_ENTRIES_MAX {
            return Err(InvalidInput::new("context token has too many entries"));
        }
        let mut pairs = Vec::with_capacity(count);
        let mut previous: Option<NodeId> = None;
        for _ in 0..count {
            let len = r.u8()? as usize;
            let id = std::str::from_utf8(r.take(len)?)
                .map_err(|_| InvalidInput::new("context token has a node id that is not UTF-8"))?;
            let node =
                NodeId::new(id).map_err(|e| InvalidInput::new(format!("context token: {e}")))?;
            let counter = r.u64()?;
            if counter == 0
                || counter > crate::dvv::COUNTER_MAX
                || previous.as_ref().is_some_and(|p| *p >= node)
            {
                return Err(InvalidInput::new("context token is corrupt"));
            }
            previous = Some(node.clone());
            pairs.push((node, counter));
        }
        if !r.bytes.is_empty() {
            return Err(InvalidInput::new(
                "context token has trailing bytes; was it copied whole?",
            ));
        }
        Ok(CausalContext {
            cluster_id,
            key_fingerprint,
            version_vector: VersionVector::from_pairs(pairs),
        })
    }

    /// Parses a token and checks it was issued by `cluster_id` for `key`.
    pub fn decode_for(
        token: &str,
        cluster_id: u64,
        key: &[u8],
    ) -> Result<VersionVector, InvalidInput> {
        let ctx = Self::decode(token)?;
        if ctx.cluster_id != cluster_id {
            return Err(InvalidInput::new(
                "context token was issued by another cluster; read the key from this cluster first",
            ));
        }
        if ctx.key_fingerprint != stable_hash64(key) {
            return Err(InvalidInput::new(
                "context token was issued for a different key; use the context from a read of this key",
            ));
        }
        Ok(ctx.version_vector)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InvalidInput> {
        if self.bytes.len() < n {
            return Err(InvalidInput::new("context token is truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, InvalidInput> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, InvalidInput> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, InvalidInput> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        VersionVector::from_pairs(pairs.iter().map(|(n, c)| (NodeId::new(*n).unwrap(), *c)))
    }

    #[test]
    fn round_trips_and_checks_owner() {
        let ctx = CausalContext::new(7, b"k", vv(&[("n1", 3), ("n2", 1)]));
        let token = ctx.encode();
        assert_eq!(CausalContext::decode(&token).unwrap(), ctx);
        assert_eq!(
            CausalContext::decode_for(&token, 7, b"k").unwrap(),
            ctx.version_vector
        );
        let foreign = CausalContext::decode_for(&token, 8, b"k").unwrap_err();
        assert!(foreign.message.contains("another cluster"), "{foreign}");
        let other_key = CausalContext::decode_for(&token, 7, b"j").unwrap_err();
        assert!(other_key.message.contains("different key"), "{other_key}");
    }

    #[test]
    fn malformed_tokens_are_named() {
        assert!(CausalContext::decode("!!!")
            .unwrap_err()
            .message
            .contains("base64url"));
        assert!(CausalContext::decode("AQ")
            .unwrap_err()
            .message
            .contains("truncated"));
        for empty in ["", "  "] {
            assert!(CausalContext::decode(empty)
                .unwrap_err()
                .message
                .contains("context token is empty"));
        }
        let v9 = URL_SAFE_NO_PAD.encode([9u8; 19]);
        assert!(CausalContext::decode(&v9)
            .unwrap_err()
            .message
            .contains("version 9"));
        let mut long = v1_bytes(&CausalContext::new(1, b"k", vv(&[("n1", 1)])));
        long.push(0);
        let err = CausalContext::decode(&URL_SAFE_NO_PAD.encode(long)).unwrap_err();
        assert!(err.message.contains("trailing"), "{err}");
    }

    /// What an earlier version issued for `ctx`: v1, without the checksum.
    fn v1_bytes(ctx: &CausalContext) -> Vec<u8> {
        let mut bytes = URL_SAFE_NO_PAD.decode(ctx.encode()).unwrap();
        bytes.truncate(bytes.len() - CHECKSUM_BYTES);
        bytes[0] = TOKEN_VERSION_UNCHECKED;
        bytes
    }

    #[test]
    fn tokens_of_the_version_before_the_checksum_are_still_read() {
        let ctx = CausalContext::new(7, b"k", vv(&[("n1", 3), ("n2", 1)]));
        let v1 = URL_SAFE_NO_PAD.encode(v1_bytes(&ctx));
        assert_eq!(CausalContext::decode(&v1).unwrap(), ctx);
    }

    /// A token changed in any one bit, or cut short, is refused: none is
    /// read as another context (say, one with a counter raised).
    #[test]
    fn a_damaged_token_is_refused() {
        let ctx = CausalContext::new(7, b"k", vv(&[("n1", 3), ("n2", 1)]));
        let bytes = URL_SAFE_NO_PAD.decode(ctx.encode()).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let token = URL_SAFE_NO_PAD.encode(&damaged);
            assert!(
                CausalContext::decode(&token).is_err(),
                "bit {bit} flipped was read"
            );
        }
        let err =
            CausalContext::decode(&URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() - 3])).unwrap_err();
        assert!(err.message.contains("damaged"), "{err}");
        let mut counter_raised = bytes.clone();
        let at = bytes.len() - CHECKSUM_BYTES - 8;
        counter_raised[at] = 9;
        let err = CausalContext::decode(&URL_SAFE_NO_PAD.encode(&counter_raised)).unwrap_err();
        assert!(err.message.contains("checksum does not match"), "{err}");
    }

    /// The largest token a node can issue decodes; one character more is
    /// refused for its length before anything is decoded.
    #[test]
    fn tokens_longer_than_any_issued_are_refused_before_decoding() {
        let id = |i: usize| format!("{i:0>width$}", width = crate::node_id::NODE_ID_MAX_BYTES);
        let largest = CausalContext::new(
            1,
            b"k",
            VersionVector::from_pairs(
                (0..TOKEN_ENTRIES_MAX).map(|i| (NodeId::new(id(i)).unwrap(), u64::MAX >> 1)),
            ),
        );
        let token = largest.encode();
        assert!(token.len() <= TOKEN_CHARS_MAX);
        assert_eq!(CausalContext::decode(&token).unwrap(), largest);
        let over = "A".repeat(TOKEN_CHARS_MAX + 1);
        let err = CausalContext::decode(&over).unwrap_err();
        assert!(err.message.contains("longer than any"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = CausalContext::decode(&URL_SAFE_NO_PAD.encode(bytes));
        }
    }
}
