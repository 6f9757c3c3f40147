//! Connections per source address: one host that is not a member may hold
//! at most a share of the node's connection slots, so that it cannot take
//! them all (idle connections kept alive, or handshakes left to stall) and
//! shut out other clients and the peers that redial after a restart.
//! Members' addresses are not capped: on one machine, every node and
//! client shares the loopback address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The share of `--max-connections` one source address that no member has
/// may hold: a sixteenth, and at least 64.
pub(super) fn per_source_max(max_connections: usize) -> usize {
    (max_connections / 16).max(64)
}

/// Counts connections by source address (see the module docs).
pub(super) struct ConnectionSources {
    counts: Mutex<HashMap<IpAddr, usize>>,
    per_source_max: usize,
}

/// A connection counted against its source; uncounted when dropped.
pub(super) struct SourceSlot {
    sources: Arc<ConnectionSources>,
    ip: IpAddr,
}

impl ConnectionSources {
    pub(super) fn new(per_source_max: usize) -> Arc<Self> {
        Arc::new(ConnectionSources {
            counts: Mutex::new(HashMap::new()),
            per_source_max,
        })
    }

    /// A slot for a connection from `ip`, unless that address holds its
    /// most already and is not a member's (`member`).
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr, member: bool) -> Option<SourceSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = counts.entry(ip).or_default();
        if !member && *held >= self.per_source_max {
            return None;
        }
        *held += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self
            .sources
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(held) = counts.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_is_no_member_holds_at_most_its_share() {
        let sources = ConnectionSources::new(2);
        let (host, member): (IpAddr, IpAddr) =
            ("10.0.0.9".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let first = sources.admit(host, false).unwrap();
        let _second = sources.admit(host, false).unwrap();
        assert!(sources.admit(host, false).is_none(), "past its share");
        let members: Vec<_> = (0..5).map(|_| sources.admit(member, true)).collect();
        assert!(
            members.iter().all(Option::is_some),
            "members are not capped"
        );
        drop(first);
        assert!(
            sources.admit(host, false).is_some(),
            "a closed one frees its slot"
        );
        assert_eq!(per_source_max(4096), 256);
        assert_eq!(per_source_max(100), 64);
    }
}
