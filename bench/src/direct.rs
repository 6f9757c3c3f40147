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
//! `GetRequest::direct`). The client learns the members (ids, addresses,
//! virtual nodes, N) from one node's `status`, dials each member at the
//! address it advertises (so `--cluster` may name just one), and places
//! keys as the nodes do. It takes the read when the legs it sent to the
//! first R replicas of the key's preference list were each answered by the
//! replica it was sent to and all agree: the same values and the same
//! causal context, which names every write either copy has seen, so
//! merging them would change nothing. Anything else (replicas that
//! disagree, a refusal, an error, no answer within half the request's
//! time) sends the read, with the time left, to a coordinator: the node of
//! the client's own connection, which asks R replicas of its choosing
//! (itself first) and repairs those it finds stale, as every read does
//! without this. So every read is the merge of R of the key's replicas,
//! as a coordinated read is, and R + W > N still means it sees every
//! acknowledged write.
//!
//! Not covered: the ring is learnt once per setting, so a member that
//! joins during it is never asked directly (its keys' legs are refused
//! where the ring moved them, and fall back); a member that could not be
//! dialled has its keys' reads all fall back. The legs have no emulated
//! delay of their own, so the bench refuses this across regions; the
//! staleness probes still read through a coordinator.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ringkv_core::wire::{Request, Response};
use ringkv_core::NodeId;
use ringkv_node::{Client, ClusterKey};
use ringkv_ring::Ring;

use crate::ycsb::{Conn, Outcome};
use crate::BenchError;

/// How long a member is dialled before its keys' reads are left to fall
/// back.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The cluster as a client-driven read needs it: the ring, and for every
/// member the connections that go to it.
pub(crate) struct DirectReads {
    ring: Ring,
    /// Each member's connections, dialled at its address; none for a
    /// member that could not be dialled. Plain connections, which never
    /// move to another node: a leg goes to its replica or fails.
    conns: HashMap<NodeId, Vec<Client>>,
}

impl DirectReads {
    /// Asks the node of `asked` for the cluster's members, and dials each
    /// `per_member` times.
    pub(crate) async fn connect(
        asked: &Conn,
        per_member: usize,
        cluster_key: Option<&ClusterKey>,
    ) -> Result<Self, BenchError> {
        let refused = |reason: String| BenchError::ClientReads { reason };
        let Conn::Ringkv(asked) = asked else {
            return Err(refused("they need ringkv nodes".into()));
        };
        let status = match asked.call(&Request::Status).await {
            Ok(Response::Status(status)) => status,
            Ok(other) => {
                return Err(refused(format!(
                    "{} answered `status` with {other:?}",
                    asked.current_node()
                )))
            }
            Err(e) => {
                return Err(refused(format!(
                    "cannot ask {} for the cluster's members: {e}",
                    asked.current_node()
                )))
            }
        };
        let ring = Ring::new(
            status.nodes.iter().map(|n| (n.id.clone(), n.vnodes)),
            status.replicas as usize,
        )
        .map_err(|e| refused(format!("the members {} reported: {e}", status.node)))?;
        let dials = status.nodes.iter().flat_map(|member| {
            let addr = member.addr.parse::<SocketAddr>().ok();
            (0..per_member.max(1)).map(move |_| {
                let id = member.id.clone();
                async move {
                    let client = Client::connect_with_key(addr?, DIAL_TIMEOUT, cluster_key).await;
                    Some((id, client.ok()?))
                }
            })
        });
        let mut conns: HashMap<NodeId, Vec<Client>> = HashMap::new();
        for (id, client) in futures_util::future::join_all(dials)
            .await
            .into_iter()
            .flatten()
        {
            conns.entry(id).or_default().push(client);
        }
        Ok(DirectReads { ring, conns })
    }

    /// The replicas client `client` asks for a read of `key` at `r` (the
    /// first R of its preference list, in ring order, so that every
    /// client's reads of a key meet the same copies), each with the
    /// connection it goes through. `None`: R is 0 or more than the key has
    /// replicas, or one of those was not dialled.
    pub(crate) fn legs(
        &self,
        key: &[u8],
        r: usize,
        client: usize,
    ) -> Option<Vec<(NodeId, &Client)>> {
        // A key has min(N, members) replicas, the start of its walk.
        if r == 0 || r > self.ring.replicas().min(self.ring.len()) {
            return None;
        }
        self.ring
            .walk(key)
            .take(r)
            .map(|node| {
                let list = self.conns.get(node).filter(|l| !l.is_empty())?;
                Some((node.clone(), &list[client % list.len()]))
            })
            .collect()
    }

    /// N, as the ring has it.
    pub(crate) fn replicas(&self) -> usize {
        self.ring.replicas()
    }

    /// Closes every connection.
    pub(crate) async fn close(self) {
        Client::close_all(self.conns.into_values().flatten()).await;
    }
}

/// What the answers to a read's legs come to: the read itself when each
/// leg was answered by the replica it went to (`legs[i]` for
/// `answers[i]`) and all agree on the values (in any order) and the causal
/// context (the read's values come back sorted, not in a clock's order);
/// `None` otherwise, and the read is asked of a coordinator.
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
