//! The keys behind QUIC's stateless resets, kept across restarts.
//!
//! A QUIC endpoint that receives a packet for a connection it does not know
//! (its process restarted) may answer with a *stateless reset* (RFC 9000
//! §10.3): a token derived from the connection id with a key only it holds,
//! which the peer received when the connection was made. With the key drawn
//! afresh at each start (quinn's default) a restarted node cannot make a
//! token its peers believe, and their connections to its previous run
//! linger until their idle timeout. So the key is derived from a secret the
//! data dir keeps ([`Storage::reset_secret`](crate::storage::Storage::reset_secret)).
//!
//! The connection ids must then be recognisable across restarts too (quinn
//! answers only packets whose id passes its generator's check), and unique
//! for good: a token is a function of the id alone, so an id issued twice
//! would reuse a token that a client of the first connection learned.
//! [`KeyedConnectionIds`] draws 12 random bytes per id and appends a 4-byte
//! tag keyed by the same secret.

use std::sync::Arc;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use ring::hmac;

/// Random bytes per connection id: ids are never expected to repeat.
const NONCE_BYTES: usize = 12;
/// Bytes of the keyed tag that tells this node's ids from others.
const TAG_BYTES: usize = 4;

/// The endpoint configuration `quinn::Endpoint::server` would use, but with
/// the reset key and the connection ids keyed by `secret`.
pub fn endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let reset_key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    // A key of its own for the ids, derived from the secret.
    let id_key = hmac::sign(&reset_key, b"ringkv connection ids");
    let id_key = hmac::Key::new(hmac::HMAC_SHA256, id_key.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(KeyedConnectionIds {
            key: id_key.clone(),
        })
    });
    config
}

/// Connection ids of random bytes and a tag keyed by this node's secret
/// (see the module docs).
pub struct KeyedConnectionIds {
    key: hmac::Key,
}

impl KeyedConnectionIds {
    fn tag(&self, nonce: &[u8]) -> [u8; TAG_BYTES] {
        let tag = hmac::sign(&self.key, nonce);
        tag.as_ref()[..TAG_BYTES].try_into().expect("a 32-byte tag")
    }
}

impl ConnectionIdGenerator for KeyedConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let mut id = [0u8; NONCE_BYTES + TAG_BYTES];
        id[..NONCE_BYTES].copy_from_slice(&nonce);
        id[NONCE_BYTES..].copy_from_slice(&self.tag(&nonce));
        ConnectionId::new(&id)
    }

    fn validate(&self, id: &ConnectionId) -> Result<(), InvalidCid> {
        if id.len() != NONCE_BYTES + TAG_BYTES {
            return Err(InvalidCid);
        }
        let (nonce, tag) = id.split_at(NONCE_BYTES);
        if self.tag(nonce) == tag {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        NONCE_BYTES + TAG_BYTES
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(secret: &[u8]) -> KeyedConnectionIds {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        KeyedConnectionIds { key }
    }

    /// An id is recognised by a generator of the same secret (the next run)
    /// and by no other; ids do not repeat.
    #[test]
    fn ids_are_recognised_across_runs_of_one_secret_only() {
        let (mut first, next, other) = (ids(b"secret"), ids(b"secret"), ids(b"another"));
        let a = first.generate_cid();
        let b = first.generate_cid();
        assert_ne!(a, b);
        assert_eq!(a.len(), first.cid_len());
        assert!(next.validate(&a).is_ok());
        assert!(other.validate(&a).is_err());
        let mut forged = a;
        forged[0] ^= 1;
        assert!(next.validate(&forged).is_err());
        assert!(next.validate(&ConnectionId::new(&a[..8])).is_err());
    }
}
