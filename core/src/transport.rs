//! The network as the coordinator sees it: send a request to a node, get a
//! response or a failure.
//!
//! Protocol code is written against this trait and never against sockets, so
//! that the same coordinator runs over QUIC in a node and over the simulated
//! network (partitions, delays, drops, crashes) in scenario tests. Time-outs
//! are the caller's business: an implementation may take as long as the
//! network does.

use std::future::Future;

use crate::node_id::NodeId;
use crate::wire::{Request, Response};

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("{node} is unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    #[error("{node} is not a known member")]
    UnknownNode { node: NodeId },
    #[error("{node} broke the protocol: {reason}")]
    Protocol { node: NodeId, reason: String },
}

/// Sends one request and waits for its response.
pub trait Transport: Send + Sync + 'static {
    fn call(
        &self,
        to: &NodeId,
        request: Request,
    ) -> impl Future<Output = Result<Response, TransportError>> + Send;
}
