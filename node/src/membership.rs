//! Who is in the cluster, remembered across restarts.
//!
//! A new node joins by sending
//! [`Request::Join`](ringkv_core::wire::Request::Join) to a seed; the seed
//! checks that the node's id is not taken by another address and that it
//! agrees on N, adds it, and answers with the whole member list and the cluster id. The
//! new node then announces itself to every member it learned of, so all of
//! them add it (a seed serialises joins, so of two nodes joining at once the
//! second learns of the first and announces to it). Every node stores the
//! cluster record (id, N, members) in its `meta` column family, so a restart,
//! even of every node at once, needs no seeds: the node announces itself to
//! the members it remembers.
//!
//! Every 5 s each node also announces itself to one random live member and
//! merges that member's list into its own (see `server::exchange_membership`),
//! so a member that was unreachable while another node joined still learns of
//! it. Data movement on membership change, and leaving, come with later work;
//! for now the member list only grows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use ringkv_core::wire::{
    decode_cluster_record, encode_cluster_record, ErrorKind, JoinReply, JoinRequest, Member,
    Response,
};
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::error::NodeError;
use crate::storage::Storage;

const META_NODE_ID: &str = "node_id";
/// Where the cluster record lives. Bump the version with any change to
/// `JoinReply` or `Member`: an archive of another layout cannot be read.
const META_CLUSTER: &str = "cluster_record_v2";
/// Where ringkv versions before 0.1's regions kept it (as a `Response`).
const META_CLUSTER_V1: &str = "cluster";

/// The cluster as this node knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRecord {
    pub cluster_id: u64,
    pub replicas: usize,
    pub members: BTreeMap<NodeId, Member>,
}

impl ClusterRecord {
    pub fn ring(&self) -> Result<Ring, NodeError> {
        Ring::new(
            self.members.values().map(|m| (m.id.clone(), m.vnodes)),
            self.replicas,
        )
        .map_err(|e| NodeError::Config {
            reason: e.to_string(),
        })
    }

    fn reply(&self) -> JoinReply {
        JoinReply {
            cluster_id: self.cluster_id,
            replicas: self.replicas as u32,
            members: self.members.values().cloned().collect(),
        }
    }
}

/// Membership state, shared by the server and the transport.
pub struct Membership {
    me: Member,
    storage: Arc<Storage>,
    /// `None` until this node has formed or joined a cluster.
    record: RwLock<Option<ClusterRecord>>,
}

impl Membership {
    /// Loads what `storage` remembers and checks it against this start's
    /// flags: the data dir of a cluster member must belong to this node id,
    /// and an explicit `--replicas` must match the cluster's N.
    ///
    /// The id is bound to the data dir with the first cluster record (see
    /// [`persist`](Self::persist)), not before: a start that never joined
    /// stored no data, so it must not keep the next start, perhaps with the
    /// other `--id` a seed asked for, from using the dir.
    pub fn load(
        storage: Arc<Storage>,
        me: Member,
        replicas_flag: Option<usize>,
    ) -> Result<Self, NodeError> {
        let mut record = match storage.meta_get(META_CLUSTER)? {
            None if storage.meta_get(META_CLUSTER_V1)?.is_some() => {
                return Err(NodeError::Storage {
                    path: storage.path().to_path_buf(),
                    reason: "this data dir was written by an older ringkv whose cluster record this version cannot read; start the node on a new --data-dir and let anti-entropy refill it".into(),
                })
            }
            None => None,
            Some(bytes) => match decode_cluster_record(&bytes) {
                Ok(reply) => Some(record_from(reply)),
                Err(e) => {
                    return Err(NodeError::Storage {
                        path: storage.path().to_path_buf(),
                        reason: format!("the stored cluster record is corrupt or past this version's limits: {e}"),
                    })
                }
            },
        };
        if let (Some(stored), Some(_)) = (storage.meta_get(META_NODE_ID)?, &record) {
            let stored = String::from_utf8_lossy(&stored).into_owned();
            if stored != me.id.as_str() {
                return Err(NodeError::IdMismatch {
                    path: storage.path().to_path_buf(),
                    stored,
                    given: me.id.to_string(),
                });
            }
        }
        if let (Some(r), Some(given)) = (&record, replicas_flag) {
            if r.replicas != given {
                return Err(NodeError::ReplicasMismatch {
                    cluster: r.replicas,
                    given,
                });
            }
        }
        // A restart may come with a new address (e.g. port 0 in tests).
        if let Some(r) = &mut record {
            r.members.insert(me.id.clone(), me.clone());
        }
        let membership = Membership {
            me,
            storage,
            record: RwLock::new(record),
        };
        if let Some(r) = membership.record() {
            membership.persist(&r)?;
        }
        Ok(membership)
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    /// The cluster record, once this node is in a cluster.
    pub fn record(&self) -> Option<ClusterRecord> {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forms a new one-node cluster.
    pub fn form(&self, cluster_id: u64, replicas: usize) -> Result<(), NodeError> {
        let record = ClusterRecord {
            cluster_id,
            replicas,
            members: BTreeMap::from([(self.me.id.clone(), self.me.clone())]),
        };
        self.persist(&record)?;
        *self.record.write().unwrap_or_else(|p| p.into_inner()) = Some(record);
        Ok(())
    }

    /// Adopts what a seed (or an announced-to member) answered. Returns
    /// whether the member list changed.
    pub fn adopt(&self, reply: JoinReply) -> Result<bool, NodeError> {
        let mut guard = self.record.write().unwrap_or_else(|p| p.into_inner());
        let mut record = match guard.clone() {
            Some(mine) if mine.cluster_id != reply.cluster_id => {
                return Err(NodeError::JoinRefused {
                    reason: format!(
                        "the seed belongs to cluster {:016x}, but this node's data dir belongs to cluster {:016x}",
                        reply.cluster_id, mine.cluster_id
                    ),
                })
            }
            Some(mine) => mine,
            None => ClusterRecord {
                cluster_id: reply.cluster_id,
                replicas: reply.replicas as usize,
                members: BTreeMap::new(),
            },
        };
        let before = record.clone();
        for m in reply.members {
            // Our own entry is authoritative about ourselves.
            if m.id != self.me.id {
                record.members.insert(m.id.clone(), m);
            }
        }
        record.members.insert(self.me.id.clone(), self.me.clone());
        let changed = before != record;
        if changed {
            self.persist(&record)?;
            *guard = Some(record);
        }
        Ok(changed)
    }

    /// Serves another node's join or announcement. Returns the answer and
    /// whether the member list changed.
    pub fn handle_join(&self, join: JoinRequest) -> (Response, bool) {
        let mut guard = self.record.write().unwrap_or_else(|p| p.into_inner());
        let Some(record) = guard.as_mut() else {
            return (
                Response::error(
                    ErrorKind::Unavailable,
                    format!("{} is not in a cluster yet", self.me.id),
                ),
                false,
            );
        };
        if let Some(cluster_id) = join.cluster_id {
            if cluster_id != record.cluster_id {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "{} belongs to another cluster ({:016x}) than {} ({:016x})",
                            join.member.id, cluster_id, self.me.id, record.cluster_id
                        ),
                    ),
                    false,
                );
            }
        }
        if let Some(replicas) = join.replicas {
            if replicas as usize != record.replicas {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "the cluster replicates every key {} times, but {} was started with --replicas {replicas}",
                            record.replicas, join.member.id
                        ),
                    ),
                    false,
                );
            }
        }
        if let Some(existing) = record.members.get(&join.member.id) {
            if existing.addr != join.member.addr && join.cluster_id.is_none() {
                return (
                    Response::error(
                        ErrorKind::Refused,
                        format!(
                            "node id {} is already a member at {}; give the new node another --id",
                            join.member.id, existing.addr
                        ),
                    ),
                    false,
                );
            }
        }
        let changed = record.members.get(&join.member.id) != Some(&join.member);
        if changed {
            let mut next = record.clone();
            next.members.insert(join.member.id.clone(), join.member);
            if let Err(e) = self.persist(&next) {
                return (Response::error(ErrorKind::Internal, e.to_string()), false);
            }
            *record = next;
        }
        let reply = Response::Joined(record.reply());
        (reply, changed)
    }

    /// The region `id` was started with, if any.
    pub fn region_of(&self, id: &NodeId) -> Option<String> {
        let guard = self.record.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref()?.members.get(id)?.region.clone()
    }

    /// The address of member `id`.
    pub fn addr_of(&self, id: &NodeId) -> Option<SocketAddr> {
        let guard = self.record.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()?
            .members
            .get(id)
            .and_then(|m| m.addr.parse().ok())
    }

    /// A join request describing this node.
    pub fn join_request(&self, replicas_flag: Option<usize>) -> JoinRequest {
        let record = self.record();
        JoinRequest {
            member: self.me.clone(),
            replicas: record
                .as_ref()
                .map(|r| r.replicas as u32)
                .or(replicas_flag.map(|r| r as u32)),
            cluster_id: record.map(|r| r.cluster_id),
        }
    }

    /// Stores the record, and this node's id first: a record on disk always
    /// names whose data dir it is.
    fn persist(&self, record: &ClusterRecord) -> Result<(), NodeError> {
        self.storage
            .meta_put(META_NODE_ID, self.me.id.as_str().as_bytes())?;
        self.storage
            .meta_put(META_CLUSTER, &encode_cluster_record(&record.reply()))
    }
}

fn record_from(reply: JoinReply) -> ClusterRecord {
    ClusterRecord {
        cluster_id: reply.cluster_id,
        replicas: reply.replicas as usize,
        members: reply
            .members
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(region: Option<&str>) -> Member {
        Member {
            id: NodeId::new("n1").unwrap(),
            addr: "127.0.0.1:7000".into(),
            vnodes: 8,
            region: region.map(String::from),
        }
    }

    #[test]
    fn the_cluster_record_survives_a_restart_with_regions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
            let m = Membership::load(storage, me(Some("eu-west")), Some(3)).unwrap();
            m.form(77, 3).unwrap();
        }
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let m = Membership::load(storage, me(Some("eu-west")), None).unwrap();
        let record = m.record().unwrap();
        assert_eq!((record.cluster_id, record.replicas), (77, 3));
        assert_eq!(
            record.members[&NodeId::new("n1").unwrap()]
                .region
                .as_deref(),
            Some("eu-west")
        );
    }

    /// A start that never got into a cluster does not claim the data dir;
    /// one that did, does.
    #[test]
    fn the_data_dir_is_bound_to_an_id_by_its_first_cluster_record() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        let named = |id: &str| Member {
            id: NodeId::new(id).unwrap(),
            ..me(None)
        };
        // n1's start failed to join: nothing formed, nothing persisted.
        drop(Membership::load(storage.clone(), named("n1"), None).unwrap());
        // So the dir may be used as n2, which forms a cluster...
        let m = Membership::load(storage.clone(), named("n2"), None).unwrap();
        m.form(5, 3).unwrap();
        drop(m);
        // ...after which it is n2's.
        let err = Membership::load(storage.clone(), named("n1"), None)
            .err()
            .expect("refused");
        assert!(matches!(err, NodeError::IdMismatch { .. }), "{err}");
        assert!(Membership::load(storage, named("n2"), None).is_ok());
    }

    #[test]
    fn a_record_in_the_old_format_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), false).unwrap());
        storage.meta_put(META_CLUSTER_V1, b"old bytes").unwrap();
        let err = Membership::load(storage.clone(), me(None), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("older ringkv"), "{err}");
        storage.meta_put(META_CLUSTER, b"garbage").unwrap();
        let err = Membership::load(storage, me(None), None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
