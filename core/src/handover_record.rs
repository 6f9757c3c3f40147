//! What a node's ring hand-over (node's `server/ring_handover.rs`, Dynamo
//! §4.2's transfer of given-up ranges) keeps in its data dir, so that a
//! restart neither forgets a pass it owed nor misses a ring change made
//! while it was down.
//!
//! A ring is kept as what it is built from: its members with their virtual
//! node counts, and N ([`RingLayout`]); addresses and regions do not place
//! keys. The record is an rkyv archive, checked like a network frame
//! before it is read: a data dir is input too.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::error::InvalidInput;
use crate::node_id::NodeId;
use crate::wire::{
    decode, validate_node_id, validate_replicas, DecodeError, RING_VNODES_HARD_MAX, VNODES_MAX,
};

/// The most owed rings a record may hold. A node keeps far fewer (eight);
/// this bounds what a damaged record can make it build.
pub const OWED_RINGS_STORED_MAX: usize = 64;

/// A member of a ring and its virtual node count.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RingSlot {
    pub id: NodeId,
    pub vnodes: u32,
}

/// What a ring is built from: its members and N.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RingLayout {
    pub replicas: u32,
    pub members: Vec<RingSlot>,
}

/// A node's hand-over state.
///
/// Invariant: `owed` is empty exactly when no pass is owed; then
/// `owed_since_unix_ms` means nothing (0).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HandoverRecord {
    /// The newest ring the hand-over has taken into account: a start whose
    /// first ring differs from it learned of a change made while the node
    /// was down.
    pub seen: Option<RingLayout>,
    /// The rings since the last pass that completed (the pass owed).
    pub owed: Vec<RingLayout>,
    /// Since when, on the node's wall clock: the pass must end within half
    /// the tombstone grace of it.
    pub owed_since_unix_ms: u64,
}

/// Encodes a hand-over record for the data dir.
pub fn encode_handover_record(record: &HandoverRecord) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(record).expect("serialising to memory cannot fail")
}

/// Checks and decodes a stored hand-over record: each ring as a ring
/// record is checked (N, ids, virtual nodes, no member twice), and at most
/// [`OWED_RINGS_STORED_MAX`] owed.
pub fn decode_handover_record(bytes: &[u8]) -> Result<HandoverRecord, DecodeError> {
    let record: HandoverRecord = decode(bytes)?;
    if record.owed.len() > OWED_RINGS_STORED_MAX {
        return Err(InvalidInput::new(format!(
            "the hand-over record owes {} rings; at most {OWED_RINGS_STORED_MAX} are kept",
            record.owed.len()
        ))
        .into());
    }
    if record.seen.is_none() && !record.owed.is_empty() {
        // A pass runs under the newest ring taken in.
        return Err(InvalidInput::new(
            "the hand-over record owes a pass but names no ring taken in",
        )
        .into());
    }
    record
        .seen
        .iter()
        .chain(&record.owed)
        .try_for_each(|l| validate_layout(l, "a ring in the hand-over record"))?;
    Ok(record)
}

/// The most replaced rings a [`RecentRingsRecord`] may hold. A node keeps
/// fewer; this bounds what a damaged record can make it build.
pub const RECENT_RINGS_STORED_MAX: usize = 64;

/// A ring that stopped being a node's, and when (the node's wall clock).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ReplacedRing {
    pub layout: RingLayout,
    pub replaced_at_unix_ms: u64,
}

/// The rings a node replaced lately, for its tombstone collection: a key
/// one of them placed on a node that no longer replicates it may still be
/// handed over from there (see node's `server/recent_rings.rs`).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RecentRingsRecord {
    pub rings: Vec<ReplacedRing>,
    /// The fingerprint of the ring that replaced the newest of them (the
    /// node's ring as far as this record knows; 0: none noted yet).
    pub current_fingerprint: u64,
    /// Until when no tombstone is collected at all (unix ms; 0: no such
    /// time): set when rings still in their window had to be let go.
    pub defer_all_until_unix_ms: u64,
}

/// Encodes a recent-rings record for the data dir.
pub fn encode_recent_rings(record: &RecentRingsRecord) -> AlignedVec {
    rkyv::to_bytes::<rancor::Error>(record).expect("serialising to memory cannot fail")
}

/// Checks and decodes a stored recent-rings record: at most
/// [`RECENT_RINGS_STORED_MAX`] rings, each checked as in a hand-over record.
pub fn decode_recent_rings(bytes: &[u8]) -> Result<RecentRingsRecord, DecodeError> {
    let record: RecentRingsRecord = decode(bytes)?;
    if record.rings.len() > RECENT_RINGS_STORED_MAX {
        return Err(InvalidInput::new(format!(
            "the recent-rings record holds {} rings; at most {RECENT_RINGS_STORED_MAX} are kept",
            record.rings.len()
        ))
        .into());
    }
    record
        .rings
        .iter()
        .try_for_each(|r| validate_layout(&r.layout, "a ring in the recent-rings record"))?;
    Ok(record)
}

fn validate_layout(layout: &RingLayout, what: &str) -> Result<(), InvalidInput> {
    validate_replicas(layout.replicas, what)?;
    let mut ids = std::collections::HashSet::with_capacity(layout.members.len());
    let mut vnodes = 0u64;
    for slot in &layout.members {
        validate_node_id(&slot.id)?;
        if slot.vnodes == 0 || slot.vnodes > VNODES_MAX {
            return Err(InvalidInput::new(format!(
                "{what} gives {} {} virtual nodes; 1 to {VNODES_MAX} are allowed",
                slot.id, slot.vnodes
            )));
        }
        if !ids.insert(&slot.id) {
            return Err(InvalidInput::new(format!("{what} lists {} twice", slot.id)));
        }
        vnodes += u64::from(slot.vnodes);
    }
    if vnodes > RING_VNODES_HARD_MAX {
        return Err(InvalidInput::new(format!(
            "{what} has {vnodes} virtual nodes, more than any cluster may ({RING_VNODES_HARD_MAX})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(members: &[(&str, u32)], replicas: u32) -> RingLayout {
        RingLayout {
            replicas,
            members: members
                .iter()
                .map(|(id, vnodes)| RingSlot {
                    id: NodeId::new(*id).unwrap(),
                    vnodes: *vnodes,
                })
                .collect(),
        }
    }

    fn record() -> HandoverRecord {
        HandoverRecord {
            seen: Some(layout(&[("a", 8), ("b", 8), ("c", 8), ("x", 8)], 3)),
            owed: vec![layout(&[("a", 8), ("b", 8), ("c", 8)], 3)],
            owed_since_unix_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let bytes = encode_handover_record(&record());
        assert_eq!(decode_handover_record(&bytes).unwrap(), record());
        let empty = HandoverRecord {
            seen: None,
            owed: Vec::new(),
            owed_since_unix_ms: 0,
        };
        let bytes = encode_handover_record(&empty);
        assert_eq!(decode_handover_record(&bytes).unwrap(), empty);
    }

    #[test]
    fn a_recent_rings_record_reads_back_or_is_refused_with_the_reason() {
        let record = RecentRingsRecord {
            rings: vec![ReplacedRing {
                layout: layout(&[("a", 8), ("b", 8)], 2),
                replaced_at_unix_ms: 1_800_000_000_000,
            }],
            current_fingerprint: 42,
            defer_all_until_unix_ms: 7,
        };
        let bytes = encode_recent_rings(&record);
        assert_eq!(decode_recent_rings(&bytes).unwrap(), record);
        assert!(decode_recent_rings(&bytes[..bytes.len() / 2]).is_err());
        let refused = |record: RecentRingsRecord| {
            decode_recent_rings(&encode_recent_rings(&record))
                .unwrap_err()
                .to_string()
        };
        let mut r = record.clone();
        r.rings[0].layout.members[1].id = NodeId::new("a").unwrap();
        assert!(refused(r).contains("a ring in the recent-rings record lists a twice"));
        let mut r = record.clone();
        r.rings = vec![r.rings[0].clone(); RECENT_RINGS_STORED_MAX + 1];
        assert!(refused(r).contains("holds 65 rings"));
    }

    /// Damaged bytes, and records no node writes, are refused with what is
    /// wrong, never read.
    #[test]
    fn a_bad_record_is_refused_with_the_reason() {
        let bytes = encode_handover_record(&record());
        assert!(decode_handover_record(&bytes[..bytes.len() / 2]).is_err());
        assert!(decode_handover_record(b"not a record").is_err());
        let refused = |record: HandoverRecord| {
            decode_handover_record(&encode_handover_record(&record))
                .unwrap_err()
                .to_string()
        };
        let mut r = record();
        r.owed.push(layout(&[("a", 8), ("a", 4)], 3));
        assert!(refused(r).contains("lists a twice"));
        let mut r = record();
        r.seen = Some(layout(&[("a", 0)], 1));
        assert!(refused(r).contains("virtual nodes"));
        let mut r = record();
        r.owed[0].replicas = 0;
        assert!(refused(r).contains("replicas = 0"));
        let mut r = record();
        r.owed = vec![r.owed[0].clone(); OWED_RINGS_STORED_MAX + 1];
        assert!(refused(r).contains("owes 65 rings"));
        let mut r = record();
        r.seen = None;
        assert!(refused(r).contains("names no ring"));
    }
}
