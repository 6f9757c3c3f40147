//! Client-driven reads: the bench's clients coordinate their own reads
//! (Dynamo §6.4, "client-driven coordination").
//!
//! A read normally goes to one node, which asks R of the key's replicas and
//! answers: two round trips in sequence when the client's node is one of
//! them (client to coordinator, coordinator to the other replicas). Dynamo
//! moved the read's state machine into the client: it learns the ring from
//! a node, and asks the key's replicas itself, all at once, saving a hop
//! (the paper reports a shorter 99.9th percentile as well as a lower mean).
//!
//! Here each leg is a `Get` with `direct` set: the node answers with its own
//! copy only if it is one of the key's replicas under its ring (see
//! `GetRequest::direct`). The client takes the read when the legs it sent
//! to the first R replicas of the key's preference list were each answered
//! by the replica it was sent to (a connection that failed over answers
//! from another node, which must not count twice) and all agree: the same
//! values and the same causal context, so merging them would change
//! nothing. Anything else (replicas that disagree, a refusal, an error, a
//! timeout) falls back to a read coordinated by the client's own node,
//! which merges the replicas' versions and repairs the stale ones, as every
//! read does without this. So a client-driven read answers what a
//! coordinated one would, and leaves no more divergence behind it.
//!
//! Not covered: the ring is learnt once per setting (a ring change during
//! it shows as refusals, hence fallbacks); the legs have no emulated
//! delay of their own, so the bench refuses this with emulated regions;
//! staleness probes still read through a coordinator.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ringkv_core::wire::{Request, Response};
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::ycsb::{Conn, Outcome};
use crate::BenchError;

/// The cluster as a client-driven read needs it: the ring, and for every
/// member the connections that go to it.
pub(crate) struct DirectReads {
    ring: Ring,
    /// Invariant: every member of `ring` has at least one connection, and
    /// each connection was at that member when this was built.
    conns: HashMap<NodeId, Vec<Arc<Conn>>>,
}

impl DirectReads {
    /// Asks the node of `conns[0]` for the cluster's members, and groups
    /// `conns` by the member each is at. An error names a member that none
    /// of them reaches (a member missing from `--cluster`).
    pub(crate) async fn connect(conns: &[Arc<Conn>]) -> Result<Self, BenchError> {
        let refused = |reason: String| BenchError::ClientReads { reason };
        let mut at: HashMap<SocketAddr, Vec<Arc<Conn>>> = HashMap::new();
        for conn in conns {
            let Conn::Ringkv(client) = conn.as_ref() else {
                return Err(refused("they need ringkv nodes".into()));
            };
            let list = at.entry(client.current_node()).or_default();
            if !list.iter().any(|c| Arc::ptr_eq(c, conn)) {
                list.push(conn.clone());
            }
        }
        let Some(Conn::Ringkv(first)) = conns.first().map(|c| c.as_ref()) else {
            return Err(BenchError::NoTargets);
        };
        let status = match first.call(&Request::Status).await {
            Ok(Response::Status(status)) => status,
            Ok(other) => {
                return Err(refused(format!(
                    "{} answered `status` with {other:?}",
                    first.current_node()
                )))
            }
            Err(e) => {
                return Err(refused(format!(
                    "cannot ask {} for the cluster's members: {e}",
                    first.current_node()
                )))
            }
        };
        let ring = Ring::new(
            status.nodes.iter().map(|n| (n.id.clone(), n.vnodes)),
            status.replicas as usize,
        )
        .map_err(|e| refused(format!("the members {} reported: {e}", status.node)))?;
        let mut by_member = HashMap::new();
        for member in &status.nodes {
            let list = member
                .addr
                .parse::<SocketAddr>()
                .ok()
                .and_then(|addr| at.get(&addr))
                .ok_or_else(|| {
                    refused(format!(
                        "member {} at {} is not among the nodes the bench connected to; \
                         give every member to --cluster",
                        member.id, member.addr
                    ))
                })?;
            by_member.insert(member.id.clone(), list.clone());
        }
        Ok(DirectReads {
            ring,
            conns: by_member,
        })
    }

    /// The replicas client `client` asks for a read of `key` at `r` (the
    /// first R of its preference list, in ring order, so that every
    /// coordinator's copy is read alike), each with the connection it
    /// goes through. `None`: R is more than the key has replicas.
    pub(crate) fn legs(
        &self,
        key: &[u8],
        r: usize,
        client: usize,
    ) -> Option<Vec<(NodeId, Arc<Conn>)>> {
        let replicas = self.ring.replicas_of(key);
        if r == 0 || r > replicas.len() {
            return None;
        }
        replicas
            .into_iter()
            .take(r)
            .map(|node| {
                let list = self.conns.get(&node)?;
                let conn = list[client % list.len()].clone();
                Some((node, conn))
            })
            .collect()
    }

    /// N, as the ring has it.
    pub(crate) fn replicas(&self) -> usize {
        self.ring.replicas()
    }
}

/// What the answers to a read's legs come to: the read itself when each
/// leg was answered by the replica it went to (`legs[i]` for
/// `answers[i]`) and all agree on the values (in any order) and the causal
/// context; `None` otherwise, and the read is asked of a coordinator.
pub(crate) fn agreed(legs: &[NodeId], answers: Vec<Outcome>) -> Option<Outcome> {
    if legs.is_empty() || legs.len() != answers.len() {
        return None;
    }
    let mut first: Option<(Vec<Vec<u8>>, Option<String>)> = None;
    for (leg, answer) in legs.iter().zip(answers) {
        let Outcome::Read {
            mut values,
            context,
            coordinator,
        } = answer
        else {
            return None;
        };
        if coordinator.as_ref() != Some(leg) {
            return None;
        }
        values.sort_unstable();
        match &first {
            None => first = Some((values, context)),
            Some(seen) if *seen == (values, context) => {}
            Some(_) => return None,
        }
    }
    let (values, context) = first?;
    Some(Outcome::Read {
        values,
        context,
        coordinator: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn read(values: &[&str], context: &str, from: &str) -> Outcome {
        Outcome::Read {
            values: values.iter().map(|v| v.as_bytes().to_vec()).collect(),
            context: Some(context.into()),
            coordinator: Some(id(from)),
        }
    }

    fn values_of(outcome: Option<Outcome>) -> Option<Vec<String>> {
        match outcome? {
            Outcome::Read { values, .. } => Some(
                values
                    .into_iter()
                    .map(|v| String::from_utf8(v).unwrap())
                    .collect(),
            ),
            _ => None,
        }
    }

    #[test]
    fn replicas_that_agree_make_the_read() {
        let legs = [id("n1"), id("n2")];
        let answers = vec![read(&["b", "a"], "c1", "n1"), read(&["a", "b"], "c1", "n2")];
        assert_eq!(
            values_of(agreed(&legs, answers)),
            Some(vec!["a".into(), "b".into()])
        );
        let not_found = vec![read(&[], "c0", "n1"), read(&[], "c0", "n2")];
        assert_eq!(values_of(agreed(&legs, not_found)), Some(vec![]));
    }

    #[test]
    fn anything_but_agreement_from_the_replicas_asked_goes_to_a_coordinator() {
        let legs = [id("n1"), id("n2")];
        let cases: Vec<(&str, Vec<Outcome>)> = vec![
            (
                "other values",
                vec![read(&["a"], "c1", "n1"), read(&["b"], "c1", "n2")],
            ),
            (
                "a stale context",
                vec![read(&["a"], "c2", "n1"), read(&["a"], "c1", "n2")],
            ),
            (
                "one missing it",
                vec![read(&["a"], "c1", "n1"), read(&[], "c0", "n2")],
            ),
            // A connection that failed over to n1: one replica read twice.
            (
                "the same replica twice",
                vec![read(&["a"], "c1", "n1"), read(&["a"], "c1", "n1")],
            ),
            (
                "a timeout",
                vec![read(&["a"], "c1", "n1"), Outcome::Timeout],
            ),
            (
                "a refusal",
                vec![
                    read(&["a"], "c1", "n1"),
                    Outcome::Error {
                        reason: "not one of the key's replicas".into(),
                    },
                ],
            ),
            ("an answer short", vec![read(&["a"], "c1", "n1")]),
        ];
        for (what, answers) in cases {
            assert!(agreed(&legs, answers).is_none(), "{what}");
        }
        assert!(agreed(&[], vec![]).is_none(), "no legs");
    }
}
