//! A client of a whole cluster: requests go to one node at a time, and move
//! to the next when that node cannot take them.
//!
//! In a Dynamo-style store any node coordinates any request, so a client
//! given several nodes can survive losing one. [`ClusterClient`] sends every
//! request to its current node over one shared connection ([`Client`]) and
//! moves on to the next node, in the order given, when the current one
//! cannot be reached or answers that it serves nothing now (draining,
//! removed, still joining). A request whose node may have run it is never
//! sent again: a write sent twice could be stored twice, as siblings. So:
//!
//! - **Resent elsewhere** ([`ran_nothing`]): the node could not be dialled,
//!   or its connection had closed before the request was sent; the node
//!   ended the stream unread (`CallError::Unread`); it answered
//!   `NotServing`.
//! - **Returned to the caller**, who alone knows whether the request is safe
//!   to repeat: a connection lost or a stream broken mid-request, a
//!   timeout, any other answer. A lost connection still moves the client on,
//!   so the *next* request goes to a node that answers.
//!
//! A node killed outright (or frozen, or cut off) answers nothing and
//! refuses nothing. QUIC notices after its idle timeout (10 s without a
//! packet); [`ClusterClient::call_within`] notices sooner: a request that
//! times out while the node sent nothing at all since it went out, not even
//! the acknowledgement a live node's QUIC stack sends within 25 ms, moves
//! the client on. That request is returned as timed out: it may have run.
//! A request already under way when the node died may have got its
//! acknowledgement first, so the client leaves within about two limits.
//!
//! A node cut off from its peers (a network partition around it) still
//! answers, but every request that needs another replica fails, with a
//! quorum error or as unavailable, and a client that stayed would fail
//! until the partition heals. So an answer of that kind in which no peer
//! took the request ([`reached_no_peer`]) has the client ask, in the
//! background, whether its node sees most of the cluster's members up
//! (`Status`); if not, it looks for a node that does, and moves there. The
//! request itself is returned as it is: it may have run. A node that sees
//! a majority keeps the client (the failure had another cause: a key's
//! replicas down, say), and so does one with no better node to go to (most
//! of the cluster is down); the client then asks again no sooner than
//! [`LOOK_PAUSE`] later.
//!
//! A client that has moved away from its preferred node (`preferred` in
//! [`ClusterClient::connect`]) dials that node again in the background,
//! after [`RETURN_PROBE`] and then backing off to every
//! [`RETURN_PROBE_MAX`], and goes back once it serves: a read of its own
//! copy of a key succeeds, and it sees most members up. (A ping would not
//! do: a node still joining, or removed, answers pings. Nor would the read
//! alone: a node still cut off answers that.) So after a rolling restart
//! or a partition every client is back where it started, and the load
//! stays spread.
//!
//! Every node dialled is asked who it is (`Identify`), and one of another
//! cluster than the client's is passed over like a node that cannot be
//! dialled: a member that lost its data dir and, started with no seed,
//! formed a cluster of its own at its old address would otherwise take
//! writes nobody else ever reads (its peers already refuse it, by the same
//! question). The client's cluster is the one most of the nodes given name
//! when it connects (all asked at once); with fewer than two answers, the
//! first node to name one.
//!
//! Requests that find no connection wait for one dial at a time: while
//! the next node is dialled (up to the connect timeout when it is down too)
//! they queue, and the caller's own timeout may end them first.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use ringkv_core::wire::{ErrorKind, Identity, Outcome, Request, Response};

use crate::cluster_key::ClusterKey;
use crate::quic::{CallError, Client};

/// How soon a client away from its preferred node first tries to go back;
/// each failed try doubles the wait, up to [`RETURN_PROBE_MAX`].
pub const RETURN_PROBE: Duration = Duration::from_secs(1);
/// The longest wait between two tries to go back: a preferred node that
/// stays down (or was removed but still runs) costs each client a dial
/// this often.
pub const RETURN_PROBE_MAX: Duration = Duration::from_secs(30);
/// After a look for a better node than a seemingly cut-off one, how long
/// before the next may start.
pub const LOOK_PAUSE: Duration = Duration::from_secs(5);

/// A connection to a cluster that fails over between its nodes (see the
/// module docs). Cheap to share: concurrent callers use one connection.
pub struct ClusterClient {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<SocketAddr>,
    /// Index in `nodes` of the node this client prefers.
    preferred: usize,
    connect_timeout: Duration,
    cluster_key: Option<ClusterKey>,
    /// The cluster of the first node that named one (see the module docs);
    /// `None`: nodes are not asked (tests of fakes that answer nothing else).
    cluster_id: Option<Arc<OnceLock<u64>>>,
    /// Invariant: `current.at < nodes.len()`; `client`, when set, is
    /// connected to `nodes[at]`. Never held across an await: every request
    /// takes it, and it must not wait for a dial.
    current: std::sync::Mutex<Current>,
    /// Held while dialling, so that callers who find no connection make one
    /// between them, not one each. Owned by the dial's task, which
    /// finishes even when the caller that started it gives up.
    dialling: Arc<tokio::sync::Mutex<()>>,
    /// Times the client moved to another node.
    failovers: AtomicU64,
    /// Whether a task is probing the preferred node (at most one).
    probing: std::sync::atomic::AtomicBool,
    /// Whether a task is looking for a node to leave a cut-off one for
    /// (at most one).
    looking: std::sync::atomic::AtomicBool,
    /// No look starts before this (see [`LOOK_PAUSE`]).
    next_look_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

struct Current {
    at: usize,
    client: Option<Arc<Client>>,
    /// Set by `close`: the probe installs nothing after it.
    closed: bool,
}

/// Whether a call's outcome shows that its node ran nothing of the request,
/// so it may be sent to another node as it is.
pub fn ran_nothing(outcome: &Result<Response, CallError>) -> bool {
    match outcome {
        Err(CallError::Unread(_) | CallError::Connect(_)) => true,
        // Not `Overloaded`: nothing ran either, but moving every request
        // to the next node would carry the load there (and dodge a
        // connection's share by opening another); the caller retries later.
        Ok(Response::Error(e)) => e.kind == ErrorKind::NotServing,
        _ => false,
    }
}

/// Whether an outcome is a quorum error, or unavailability, in which no
/// peer of the coordinator took the request: what a node cut off from its
/// peers gives (they time out, or are believed down and not asked; a
/// forward that reached no replica carries no receipt). Other failures give
/// it too (a key's replicas down, peers refusing): so it only has the
/// client ask its node whether it sees most of its cluster (see the module
/// docs), at most once per [`LOOK_PAUSE`]. Such a request may have run, so
/// it is not sent again.
pub fn reached_no_peer(outcome: &Result<Response, CallError>) -> bool {
    let Ok(Response::Error(e)) = outcome else {
        return false;
    };
    if !matches!(e.kind, ErrorKind::QuorumNotReached | ErrorKind::Unavailable) {
        return false;
    }
    e.receipt.as_ref().is_none_or(|receipt| {
        !receipt
            .replicas
            .iter()
            .any(|r| r.outcome == Outcome::Ok && receipt.coordinator.as_ref() != Some(&r.node))
    })
}

impl ClusterClient {
    /// Connects to `nodes[preferred]` or, if it does not answer within
    /// `connect_timeout`, to the first after it that does; the error of the
    /// preferred node if none answers. (So a client made while a node is
    /// down works; one that must reach a given node checks it first.)
    pub async fn connect(
        nodes: Vec<SocketAddr>,
        preferred: usize,
        connect_timeout: Duration,
        cluster_key: Option<&ClusterKey>,
    ) -> Result<ClusterClient, CallError> {
        Self::connect_asking(nodes, preferred, connect_timeout, cluster_key, true).await
    }

    /// [`connect`](Self::connect); `identify`: whether each node dialled is
    /// asked who it is.
    async fn connect_asking(
        nodes: Vec<SocketAddr>,
        preferred: usize,
        connect_timeout: Duration,
        cluster_key: Option<&ClusterKey>,
        identify: bool,
    ) -> Result<ClusterClient, CallError> {
        if nodes.is_empty() {
            return Err(CallError::Connect("no node address given".to_string()));
        }
        let preferred = preferred % nodes.len();
        let mut first_error = None;
        let cluster_id = identify.then(|| Arc::new(OnceLock::new()));
        // Connections the cluster question opened, kept for the node chosen.
        let mut asked = Vec::new();
        if let Some(cluster_id) = &cluster_id {
            let (agreed, answered) =
                agreed_cluster(&nodes, preferred, connect_timeout, cluster_key).await;
            if let Some(agreed) = agreed {
                let _ = cluster_id.set(agreed);
            }
            asked = answered;
        }
        for step in 0..nodes.len() {
            let at = (preferred + step) % nodes.len();
            let ours = cluster_id.as_deref().and_then(OnceLock::get);
            let dialled = match asked
                .iter()
                .position(|(s, theirs, _)| *s == step && Some(theirs) == ours)
            {
                Some(i) => Ok(asked.swap_remove(i).2),
                None => {
                    dial_member(
                        nodes[at],
                        connect_timeout,
                        cluster_key,
                        cluster_id.as_deref(),
                    )
                    .await
                }
            };
            match dialled {
                Ok(client) => {
                    Client::close_all(asked.into_iter().map(|(_, _, c)| c)).await;
                    return Ok(ClusterClient {
                        inner: Arc::new(Inner {
                            nodes,
                            preferred,
                            connect_timeout,
                            cluster_key: cluster_key.cloned(),
                            cluster_id,
                            current: std::sync::Mutex::new(Current {
                                at,
                                client: Some(Arc::new(client)),
                                closed: false,
                            }),
                            dialling: Arc::new(tokio::sync::Mutex::new(())),
                            failovers: AtomicU64::new(u64::from(at != preferred)),
                            probing: std::sync::atomic::AtomicBool::new(false),
                            looking: std::sync::atomic::AtomicBool::new(false),
                            next_look_at: std::sync::Mutex::new(None),
                        }),
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Client::close_all(asked.into_iter().map(|(_, _, c)| c)).await;
        Err(first_error.expect("at least one node was tried"))
    }

    /// Sends `request` to the current node, moving on to the next while a
    /// node ran nothing of it (see the module docs); at most one try per
    /// node. The last node's outcome if none could take it.
    pub async fn call(&self, request: &Request) -> Result<Response, CallError> {
        self.call_noting(request, &std::sync::Mutex::new(None))
            .await
    }

    /// [`call`](Self::call), giving up after `limit` with
    /// `CallError::TimedOut` (the request may still run).
    ///
    /// A node that sent nothing at all on the connection since the request
    /// went out is taken for dead (killed, frozen, cut off), and the client
    /// moves on at once rather than after QUIC's 10 s idle timeout: a live
    /// node's QUIC stack acknowledges every request within its
    /// `max_ack_delay` (25 ms). So does a node that is merely slow to
    /// answer, and it keeps the client. A node so stalled that its QUIC
    /// stack cannot run for all of `limit` looks dead too; the client then
    /// moves on but leaves the connection open, so the requests under way
    /// on it still get their answers. Limits under a second or so would
    /// take ordinary stalls (a busy machine, a long flush) for deaths.
    pub async fn call_within(
        &self,
        request: &Request,
        limit: Duration,
    ) -> Result<Response, CallError> {
        let sent_on = std::sync::Mutex::new(None);
        match tokio::time::timeout(limit, self.call_noting(request, &sent_on)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let last = sent_on.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some((client, received)) = last {
                    let conn = client.connection();
                    if conn.stats().udp_rx.datagrams == received {
                        tracing::info!(node = %conn.remote_address(), "node silent: moving on");
                        self.inner.move_on(&client);
                    }
                }
                self.probe_preferred_if_away();
                Err(CallError::TimedOut { limit })
            }
        }
    }

    /// [`call`](Self::call), noting in `sent_on` the connection each try goes
    /// out on and the datagrams it had received by then.
    async fn call_noting(
        &self,
        request: &Request,
        sent_on: &std::sync::Mutex<Option<(Arc<Client>, u64)>>,
    ) -> Result<Response, CallError> {
        let mut outcome = Err(CallError::Connect("no node tried".to_string()));
        let mut last = None;
        for _ in 0..self.inner.nodes.len() {
            let client = match self.inner.client().await {
                Ok(client) => client,
                Err(e) => {
                    outcome = Err(e);
                    continue;
                }
            };
            let received = client.connection().stats().udp_rx.datagrams;
            *sent_on.lock().unwrap_or_else(|p| p.into_inner()) = Some((client.clone(), received));
            outcome = client.call(request).await;
            last = Some(client.clone());
            if ran_nothing(&outcome) {
                self.inner.move_on(&client);
                continue;
            }
            if matches!(outcome, Err(CallError::Connection(_))) {
                // It may have run: the caller decides; the next request
                // goes to a node that answers.
                self.inner.move_on(&client);
            }
            break;
        }
        if let Some(client) = last.filter(|_| reached_no_peer(&outcome)) {
            self.look_elsewhere(client);
        }
        self.probe_preferred_if_away();
        outcome
    }

    /// Starts a look for a node to leave `from`'s for (see the module docs),
    /// unless one is under way, the last was too recent, there is no other
    /// node, or the client has left it already.
    fn look_elsewhere(&self, from: Arc<Client>) {
        if self.inner.nodes.len() < 2 {
            return;
        }
        let current = self.inner.lock();
        let on_it = current
            .client
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &from));
        if !on_it || current.closed {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut next = self
            .inner
            .next_look_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if next.is_some_and(|at| now < at) || self.inner.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        *next = Some(now + LOOK_PAUSE);
        tokio::spawn(look_elsewhere(
            Arc::downgrade(&self.inner),
            Arc::downgrade(&from),
            current.at,
        ));
    }

    /// The address of the node requests go to now.
    pub fn current_node(&self) -> SocketAddr {
        self.inner.nodes[self.inner.lock().at]
    }

    /// How many times this client has moved to another node because its
    /// node could not take requests or was cut off from most of its cluster
    /// (including, when it was made, past a preferred node that did not
    /// answer). Going back is not counted.
    pub fn failovers(&self) -> u64 {
        self.inner.failovers.load(Ordering::Relaxed)
    }

    /// Closes the connection politely so the node frees it at once.
    pub async fn close(self) {
        let client = {
            let mut current = self.inner.lock();
            current.closed = true;
            current.client.take()
        };
        if let Some(client) = client.and_then(Arc::into_inner) {
            client.close().await;
        }
    }

    /// Closes many clients at once (see [`Client::close_all`]).
    pub async fn close_all(clients: impl IntoIterator<Item = ClusterClient>) {
        let mut closing = tokio::task::JoinSet::new();
        for client in clients {
            closing.spawn(client.close());
        }
        while closing.join_next().await.is_some() {}
    }

    fn probe_preferred_if_away(&self) {
        // Under the lock, as the probe's own ending is: a move away after
        // the probe found the client back starts a new one.
        let current = self.inner.lock();
        if current.at != self.inner.preferred
            && !current.closed
            && !self.inner.probing.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(probe_preferred(Arc::downgrade(&self.inner)));
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Every critical section leaves `Current` whole: a panic elsewhere
        // cannot have left it half-changed.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current node's connection, dialling it if there is none: a node
    /// that cannot be dialled moves the client on, and the error is returned.
    async fn client(self: &Arc<Self>) -> Result<Arc<Client>, CallError> {
        if let Some(found) = self.open_client() {
            return found;
        }
        let dialling = self.dialling.clone().lock_owned().await;
        // Another caller may have dialled (or moved on) meanwhile.
        if let Some(found) = self.open_client() {
            return found;
        }
        // In a task of its own: a caller's time limit (often no longer than
        // the connect timeout) must not cancel the dial before it either
        // connects or moves the client on, or a client whose next node is
        // down would dial it, and give up, forever.
        let inner = self.clone();
        let dial = tokio::spawn(async move {
            let _dialling = dialling;
            inner.dial().await
        });
        dial.await
            .unwrap_or_else(|e| Err(CallError::Connect(format!("the dial failed: {e}"))))
    }

    /// Dials the current node and makes the connection current, or moves
    /// on if it cannot be dialled. Called holding `dialling`.
    async fn dial(&self) -> Result<Arc<Client>, CallError> {
        let at = self.lock().at;
        let dialled = dial_member(
            self.nodes[at],
            self.connect_timeout,
            self.cluster_key.as_ref(),
            self.cluster_id.as_deref(),
        )
        .await;
        let mut current = self.lock();
        if current.at != at || current.client.is_some() || current.closed {
            // The probe went back to the preferred node meanwhile, or the
            // client was closed: this dial is not wanted.
            return current.client.clone().ok_or_else(|| {
                CallError::Connect("the client changed node while dialling".to_string())
            });
        }
        match dialled {
            Ok(client) => {
                let client = Arc::new(client);
                current.client = Some(client.clone());
                Ok(client)
            }
            Err(e) => {
                self.advance(&mut current);
                Err(e)
            }
        }
    }

    /// The current connection if there is one: itself if open; if closed
    /// (before this request was sent: nothing ran), the client moves on and
    /// says so. `None` when there is none, to be dialled.
    fn open_client(&self) -> Option<Result<Arc<Client>, CallError>> {
        let mut current = self.lock();
        let client = current.client.clone()?;
        if client.connection().close_reason().is_none() {
            return Some(Ok(client));
        }
        current.client = None;
        let closed = self.nodes[current.at];
        self.advance(&mut current);
        Some(Err(CallError::Connect(format!(
            "the connection to {closed} had closed"
        ))))
    }

    /// Moves on from the node `failed` is connected to, unless another
    /// caller already has.
    fn move_on(&self, failed: &Arc<Client>) {
        let mut current = self.lock();
        if current
            .client
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, failed))
        {
            current.client = None;
            self.advance(&mut current);
        }
    }

    fn advance(&self, current: &mut Current) {
        let next = (current.at + 1) % self.nodes.len();
        if next != current.at {
            current.at = next;
            self.failovers.fetch_add(1, Ordering::Relaxed);
            tracing::info!(node = %self.nodes[next], "client moved to the next node");
        }
    }
}

/// Dials the preferred node, after [`RETURN_PROBE`] and then less and less
/// often, until it serves, then
/// makes it current again. Ends once the client is dropped or closed, or
/// is back on its preferred node by other means.
async fn probe_preferred(inner: Weak<Inner>) {
    let mut wait = RETURN_PROBE;
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETURN_PROBE_MAX);
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.stop_probing_if_back() {
            return;
        }
        let (addr, timeout, key, cluster_id) = (
            strong.nodes[strong.preferred],
            strong.connect_timeout,
            strong.cluster_key.clone(),
            strong.cluster_id.clone(),
        );
        // Not holding the client alive meanwhile: a dropped client's probe
        // should not outlive it by a connect timeout.
        drop(strong);
        let Some(client) = serving(addr, timeout, key.as_ref(), cluster_id.as_deref()).await else {
            continue;
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut current = strong.lock();
        if current.closed || current.at == strong.preferred {
            strong.probing.store(false, Ordering::Release);
            return;
        }
        current.at = strong.preferred;
        current.client = Some(Arc::new(client));
        strong.probing.store(false, Ordering::Release);
        tracing::info!(node = %addr, "client back on its preferred node");
        return;
    }
}

/// Asks `from`'s node (`nodes[at]`, which answered as if cut off) whether
/// it sees most members up; if not, asks the nodes after it in turn whether
/// they serve and do, and moves the client to the first that does if it is
/// still on `from`. Ends with `looking` cleared.
async fn look_elsewhere(inner: Weak<Inner>, from: Weak<Client>, at: usize) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let (nodes, preferred, timeout, key, cluster_id) = (
        strong.nodes.clone(),
        strong.preferred,
        strong.connect_timeout,
        strong.cluster_key.clone(),
        strong.cluster_id.clone(),
    );
    // Holding neither the client nor, past the one question, its connection
    // alive while dialling others (see `probe_preferred`): `close` must
    // still close it.
    drop(strong);
    let asked = from.upgrade();
    let fine = match &asked {
        Some(client) => sees_a_majority(client, timeout).await,
        None => true,
    };
    drop(asked);
    let mut found = None;
    if !fine {
        for step in 1..nodes.len() {
            let next = (at + step) % nodes.len();
            if let Some(client) =
                serving(nodes[next], timeout, key.as_ref(), cluster_id.as_deref()).await
            {
                found = Some((next, client));
                break;
            }
        }
        if found.is_none() {
            tracing::debug!(node = %nodes[at], "no node that sees most of the cluster: the client stays");
        }
    }
    let Some(strong) = inner.upgrade() else {
        if let Some((_, client)) = found {
            client.close().await;
        }
        return;
    };
    let unwanted = found.and_then(|(next, client)| {
        let mut current = strong.lock();
        let still_on_it = current
            .client
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), from.as_ptr()));
        if !still_on_it || current.closed {
            return Some(client);
        }
        current.at = next;
        current.client = Some(Arc::new(client));
        if next != preferred {
            strong.failovers.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            from = %nodes[at],
            to = %nodes[next],
            "client left a node cut off from most of its cluster"
        );
        None
    });
    strong.looking.store(false, Ordering::Release);
    drop(strong);
    if let Some(client) = unwanted {
        client.close().await;
    }
}

/// Whether the node `client` is connected to is a member and sees most of
/// its cluster's members up (itself included), by its failure detector.
async fn sees_a_majority(client: &Client, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, client.call(&Request::Status)).await {
        Ok(Ok(Response::Status(status))) => {
            let member = status.nodes.iter().any(|n| n.id == status.node);
            let up = status.nodes.iter().filter(|n| n.up).count();
            member && up * 2 > status.nodes.len()
        }
        _ => false,
    }
}

impl Inner {
    /// Clears `probing` and says so if the client is closed or back on its
    /// preferred node (under the lock: see `probe_preferred_if_away`).
    fn stop_probing_if_back(&self) -> bool {
        let current = self.lock();
        let back = current.closed || current.at == self.preferred;
        if back {
            self.probing.store(false, Ordering::Release);
        }
        back
    }
}

/// A connection to the node at `addr` if it serves requests now and sees
/// most of its cluster up. A ping would not show it: a node still joining,
/// or removed, answers pings and refuses the rest. A read of its own copy
/// of a key (`local`, no quorum, one store lookup) goes through the same
/// checks as any request; a node cut off from its peers answers that too,
/// but not that it sees most members up.
async fn serving(
    addr: SocketAddr,
    timeout: Duration,
    key: Option<&ClusterKey>,
    cluster_id: Option<&OnceLock<u64>>,
) -> Option<Client> {
    let client = dial_member(addr, timeout, key, cluster_id).await.ok()?;
    let probe = Request::Get(ringkv_core::wire::GetRequest {
        local: true,
        timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        ..ringkv_core::wire::GetRequest::new(PROBE_KEY.to_vec(), ringkv_core::Consistency::One)
    });
    let read = tokio::time::timeout(timeout, client.call(&probe)).await;
    if matches!(read, Ok(Ok(Response::Get(_)))) && sees_a_majority(&client, timeout).await {
        return Some(client);
    }
    client.close().await;
    None
}

/// Dials the node at `addr` and, given `cluster_id`, asks who it is: a
/// node of another cluster than `cluster_id` is refused (see the module
/// docs); the first that names its cluster sets `cluster_id`. A node that
/// does not say (draining, or in no cluster yet) is taken on trust: it
/// refuses what it cannot serve.
async fn dial_member(
    addr: SocketAddr,
    timeout: Duration,
    key: Option<&ClusterKey>,
    cluster_id: Option<&OnceLock<u64>>,
) -> Result<Client, CallError> {
    let client = Client::connect_with_key(addr, timeout, key).await?;
    let Some(cluster_id) = cluster_id else {
        return Ok(client);
    };
    let asked = tokio::time::timeout(timeout, client.call(&Request::Identify)).await;
    let Ok(Ok(Response::Identity(Identity {
        cluster_id: Some(theirs),
        ..
    }))) = asked
    else {
        return Ok(client);
    };
    let ours = *cluster_id.get_or_init(|| theirs);
    if theirs == ours {
        return Ok(client);
    }
    client.close().await;
    tracing::error!(node = %addr, "a node given to the client is of another cluster: passed over");
    Err(CallError::Refused(format!(
        "the node at {addr} is of cluster {theirs:016x}, not {ours:016x} as the client's first node (did it lose its data and start a cluster of its own?)"
    )))
}

/// The cluster most of `nodes` say they are of (ties go to the node
/// earliest from `preferred` on), asking them all at once; `None` with
/// fewer than two nodes or answers. Also the connections to the nodes that
/// named a cluster, with their step from `preferred` and that cluster, so
/// that the node chosen is not dialled again. Otherwise the client's preferred node
/// alone would decide: one that lost its data and formed a cluster of its
/// own at a member's address would then have the client pass over every
/// real member and write where nobody reads.
async fn agreed_cluster(
    nodes: &[SocketAddr],
    preferred: usize,
    timeout: Duration,
    key: Option<&ClusterKey>,
) -> (Option<u64>, Vec<(usize, u64, Client)>) {
    if nodes.len() < 2 {
        return (None, Vec::new());
    }
    let mut asks = tokio::task::JoinSet::new();
    for step in 0..nodes.len() {
        let (addr, key) = (nodes[(preferred + step) % nodes.len()], key.cloned());
        asks.spawn(async move {
            let client = Client::connect_with_key(addr, timeout, key.as_ref())
                .await
                .ok()?;
            let asked = tokio::time::timeout(timeout, client.call(&Request::Identify)).await;
            match asked {
                Ok(Ok(Response::Identity(Identity {
                    cluster_id: Some(theirs),
                    ..
                }))) => Some((step, theirs, client)),
                _ => {
                    client.close().await;
                    None
                }
            }
        });
    }
    let mut answers: Vec<(usize, u64, Client)> =
        asks.join_all().await.into_iter().flatten().collect();
    if answers.len() < 2 {
        return (None, answers);
    }
    // In order from `preferred`, so that a tie keeps the earliest.
    answers.sort_unstable_by_key(|(step, ..)| *step);
    let mut best: Option<(u64, usize)> = None;
    for (_, id, _) in &answers {
        let count = answers.iter().filter(|(_, a, _)| a == id).count();
        if best.is_none_or(|(_, most)| count > most) {
            best = Some((*id, count));
        }
    }
    (best.map(|(id, _)| id), answers)
}

/// The key the return probe reads (it need not exist).
const PROBE_KEY: &[u8] = b"ringkv:client-probe";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::read_frame;
    use crate::test_support::wait_until;
    use crate::tls;
    use ringkv_core::wire::FRAME_MAX_BYTES;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::watch;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// [`ClusterClient::connect`] for fake nodes that answer only the
    /// requests a test sends (not who they are).
    async fn unidentified(
        nodes: Vec<SocketAddr>,
        preferred: usize,
        connect_timeout: Duration,
        cluster_key: Option<&ClusterKey>,
    ) -> Result<ClusterClient, CallError> {
        ClusterClient::connect_asking(nodes, preferred, connect_timeout, cluster_key, false).await
    }

    /// A stand-in node on loopback: `serve` gets each connection and the
    /// count of requests read, which it keeps.
    fn fake_node<F, Fut>(serve: F) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(quinn::Connection, Arc<AtomicUsize>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        fake_node_at("127.0.0.1:0".parse().unwrap(), serve)
    }

    /// [`fake_node`] at `addr`.
    fn fake_node_at<F, Fut>(
        addr: SocketAddr,
        serve: F,
    ) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(quinn::Connection, Arc<AtomicUsize>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let endpoint = quinn::Endpoint::server(tls::server_config(None).unwrap(), addr).unwrap();
        let (addr, seen) = (
            endpoint.local_addr().unwrap(),
            Arc::new(AtomicUsize::new(0)),
        );
        let (accepting, counted) = (endpoint.clone(), seen.clone());
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let Ok(conn) = incoming.await else { continue };
                tokio::spawn(serve(conn, counted.clone()));
            }
        });
        (endpoint, addr, seen)
    }

    /// A node that answers every request it reads with `answer(request)`.
    fn answering_with(
        answer: impl Fn(&Request) -> Response + Clone + Send + Sync + 'static,
    ) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        answering_with_at("127.0.0.1:0".parse().unwrap(), answer)
    }

    /// [`answering_with`] at `addr`.
    fn answering_with_at(
        addr: SocketAddr,
        answer: impl Fn(&Request) -> Response + Clone + Send + Sync + 'static,
    ) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        fake_node_at(addr, move |conn, counted| {
            let answer = answer.clone();
            crate::quic::serve_connection(
                conn,
                move |request| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answer = answer(&request);
                    async move { answer }
                },
                watch::channel(false).1,
                crate::request_memory::RequestMemory::new(1 << 30),
            )
        })
    }

    /// A node that answers every request with `answer`.
    fn answering(answer: Response) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        answering_with(move |_| answer.clone())
    }

    /// A node that reads one request, counts it, and closes the connection
    /// without answering: the request may have run.
    fn closing_after_read() -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        fake_node(|conn, counted| async move {
            let Ok((_send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            if let Ok(Some(_)) = read_frame(&mut recv, FRAME_MAX_BYTES).await {
                counted.fetch_add(1, Ordering::SeqCst);
                conn.close(0u32.into(), b"gone mid-request");
            }
        })
    }

    /// A node that freezes once it has read a request, as a process stopped
    /// with SIGSTOP or cut off does: it runs on a thread of its own, which
    /// then blocks until the returned sender is dropped, so its QUIC stack
    /// sends nothing more, acknowledgements included.
    fn freezing_node() -> (SocketAddr, std::sync::mpsc::Sender<()>) {
        let (thaw, frozen) = std::sync::mpsc::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let endpoint = quinn::Endpoint::server(
                    tls::server_config(None).unwrap(),
                    "127.0.0.1:0".parse().unwrap(),
                )
                .unwrap();
                addr_tx.send(endpoint.local_addr().unwrap()).unwrap();
                let conn = endpoint.accept().await.unwrap().await.unwrap();
                let (_send, mut recv) = conn.accept_bi().await.unwrap();
                let _ = read_frame(&mut recv, FRAME_MAX_BYTES).await;
                let _ = frozen.recv();
            });
        });
        (addr_rx.recv().unwrap(), thaw)
    }

    fn not_serving() -> Response {
        Response::error(ErrorKind::NotServing, "shutting down; ask another node")
    }

    #[test]
    fn only_outcomes_that_ran_nothing_may_be_sent_elsewhere() {
        assert!(ran_nothing(&Err(CallError::Unread("ended".into()))));
        assert!(ran_nothing(&Err(CallError::Connect("refused".into()))));
        assert!(ran_nothing(&Ok(not_serving())));
        assert!(!ran_nothing(&Err(CallError::Connection("lost".into()))));
        assert!(!ran_nothing(&Err(CallError::Stream("reset".into()))));
        assert!(!ran_nothing(&Err(CallError::Protocol("garbled".into()))));
        assert!(!ran_nothing(&Ok(Response::Pong)));
        for kind in [
            ErrorKind::QuorumNotReached,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
            ErrorKind::InvalidRequest,
            ErrorKind::Refused,
        ] {
            assert!(!ran_nothing(&Ok(Response::error(kind, "x"))), "{kind:?}");
        }
    }

    /// A `Status` answer from `n1` of a cluster of three that sees `up` of
    /// them up (itself first).
    fn status_seeing(up: usize) -> Response {
        use ringkv_core::wire::{NodeStatus, StatusReply};
        let node = |i: usize| NodeStatus {
            id: ringkv_core::NodeId::new(format!("n{i}")).unwrap(),
            addr: String::new(),
            up: i <= up,
            region: None,
            vnodes: 64,
            hints_pending: None,
            last_exchange_unix_ms: None,
            keys_repaired: None,
            leaving: None,
            cleaning: None,
        };
        Response::Status(StatusReply {
            node: ringkv_core::NodeId::new("n1").unwrap(),
            replicas: 3,
            nodes: (1..=3).map(node).collect(),
        })
    }

    /// A node that answers `NotServing` while `refusing` is set, and
    /// otherwise serves: a found-nothing read for gets, a status that sees
    /// every member up, a pong for the rest.
    fn switchable(
        refusing: Arc<std::sync::atomic::AtomicBool>,
    ) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        answering_with(move |request| {
            if refusing.load(Ordering::SeqCst) {
                not_serving()
            } else {
                serving_answer(request, 3)
            }
        })
    }

    /// What a serving node that sees `up` of three members up answers: a
    /// found-nothing read for gets, that status, a pong for the rest.
    fn serving_answer(request: &Request, up: usize) -> Response {
        match request {
            Request::Status => status_seeing(up),
            Request::Get(_) => Response::Get(ringkv_core::wire::GetReply {
                values: vec![],
                context: String::new(),
                receipt: Default::default(),
            }),
            _ => Response::Pong,
        }
    }

    async fn assert_pong(client: &ClusterClient) {
        let outcome = client.call(&Request::Ping).await;
        assert!(matches!(outcome, Ok(Response::Pong)), "{outcome:?}");
    }

    /// Whether the client's current connection has closed.
    fn current_closed(client: &ClusterClient) -> bool {
        let current = client.inner.lock();
        let conn = current.client.as_ref().unwrap().connection();
        conn.close_reason().is_some()
    }

    /// A quorum error with a receipt in which `answered` (besides the
    /// coordinator `n1`) stored the value, and `n3` timed out.
    fn quorum_error(answered: &[&str]) -> Response {
        quorum_error_with(answered, Outcome::Ok)
    }

    /// [`quorum_error`], `answered` with `outcome`.
    fn quorum_error_with(answered: &[&str], outcome: Outcome) -> Response {
        use ringkv_core::wire::{ErrorReply, Receipt, ReplicaOutcome};
        let replica = |id: &str, outcome| ReplicaOutcome {
            node: ringkv_core::NodeId::new(id).unwrap(),
            outcome,
            latency_us: 1,
            detail: None,
            hint_for: None,
        };
        let mut replicas = vec![replica("n1", Outcome::Ok), replica("n3", Outcome::Timeout)];
        replicas.extend(answered.iter().map(|id| replica(id, outcome)));
        Response::Error(ErrorReply {
            kind: ErrorKind::QuorumNotReached,
            message: "write quorum not reached".to_string(),
            receipt: Some(Receipt {
                coordinator: Some(ringkv_core::NodeId::new("n1").unwrap()),
                replicas,
            }),
        })
    }

    #[test]
    fn only_failures_no_peer_took_part_in_show_a_cut_off_node() {
        assert!(reached_no_peer(&Ok(quorum_error(&[]))));
        assert!(!reached_no_peer(&Ok(quorum_error(&["n2"]))));
        // Believed down and not asked, or refusing: not taken either.
        assert!(reached_no_peer(&Ok(quorum_error_with(
            &["n2"],
            Outcome::Error
        ))));
        // A forward that reached no replica: no receipt.
        let unreached = Response::error(ErrorKind::Unavailable, "no replica of this key");
        assert!(reached_no_peer(&Ok(unreached)));
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::Refused,
            ErrorKind::Internal,
            ErrorKind::NotServing,
            ErrorKind::Overloaded,
        ] {
            assert!(
                !reached_no_peer(&Ok(Response::error(kind, "x"))),
                "{kind:?}"
            );
        }
        assert!(!reached_no_peer(&Ok(Response::Pong)));
        assert!(!reached_no_peer(&Err(CallError::Connection("lost".into()))));
    }

    /// A node that, while `cut_off` is set, answers as one cut off from its
    /// peers does: a read of its own copy, a status that sees only itself
    /// up, and a quorum error no peer took part in for everything else; and
    /// otherwise serves like [`switchable`].
    fn cut_off_while(
        cut_off: Arc<std::sync::atomic::AtomicBool>,
    ) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
        answering_with(move |request| {
            let cut = cut_off.load(Ordering::SeqCst);
            let local_read = matches!(request, Request::Get(get) if get.local);
            let status = matches!(request, Request::Status);
            if cut && !local_read && !status {
                quorum_error(&[])
            } else {
                serving_answer(request, if cut { 1 } else { 3 })
            }
        })
    }

    /// A node that fails as if cut off keeps the failed request's answer
    /// (it may have run, so it is not resent), but the client moves to a
    /// node that serves a quorum read, and back once the first one does.
    #[tokio::test]
    async fn a_client_leaves_a_node_cut_off_from_its_peers_and_comes_back() {
        let cut_off = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (_e1, first, seen_first) = cut_off_while(cut_off.clone());
        let (_e2, second, seen_second) = switchable(Arc::default());
        let client = unidentified(vec![first, second], 0, TIMEOUT, None)
            .await
            .unwrap();
        let outcome = client.call(&Request::Ping).await;
        assert_eq!(
            outcome.ok(),
            Some(quorum_error(&[])),
            "returned, not resent"
        );
        wait_until("moved to the second node", || {
            client.current_node() == second
        })
        .await;
        assert_eq!(client.failovers(), 1);
        assert_pong(&client).await;

        // Probes find the first node still cut off: the client stays.
        let before = seen_first.load(Ordering::SeqCst);
        wait_until("two probes", || {
            seen_first.load(Ordering::SeqCst) >= before + 2
        })
        .await;
        assert_eq!(client.current_node(), second);
        let served = seen_second.load(Ordering::SeqCst);
        assert_pong(&client).await;
        assert_eq!(seen_second.load(Ordering::SeqCst), served + 1);

        cut_off.store(false, Ordering::SeqCst);
        wait_until("back on the first node", || client.current_node() == first).await;
        assert_eq!(client.failovers(), 1, "going back is not a failover");
        client.close().await;
    }

    /// A quorum error no peer answered, from a node that sees most of its
    /// cluster up (a key's replicas down, say): the client stays.
    #[tokio::test]
    async fn a_node_that_sees_most_of_its_cluster_keeps_the_client() {
        let (_e1, first, seen_first) = answering_with(|request| match request {
            Request::Status => status_seeing(2),
            _ => quorum_error(&[]),
        });
        let (_e2, second, seen_second) = switchable(Arc::default());
        stays_after_a_look(vec![first, second], &seen_first, 2).await;
        assert_eq!(seen_second.load(Ordering::SeqCst), 0, "no other node asked");
    }

    /// Sends `nodes[0]` a request that fails as if it were cut off, waits
    /// until `asked` has read `asks` requests and the look has ended, and
    /// checks that the client stayed.
    async fn stays_after_a_look(nodes: Vec<SocketAddr>, asked: &AtomicUsize, asks: usize) {
        let first = nodes[0];
        let client = unidentified(nodes, 0, TIMEOUT, None).await.unwrap();
        let outcome = client.call(&Request::Ping).await;
        assert!(reached_no_peer(&outcome), "{outcome:?}");
        wait_until("the look asked and ended", || {
            asked.load(Ordering::SeqCst) >= asks && !client.inner.looking.load(Ordering::SeqCst)
        })
        .await;
        assert_eq!(client.current_node(), first);
        assert_eq!(client.failovers(), 0);
        client.close().await;
    }

    /// When no other node sees most of the cluster either (most of it is
    /// down or cut off), the client stays where it is.
    #[tokio::test]
    async fn a_client_stays_when_no_other_node_serves() {
        let (_e1, first, _) = cut_off_while(Arc::new(true.into()));
        let (_e2, second, seen_second) = cut_off_while(Arc::new(true.into()));
        stays_after_a_look(vec![first, second], &seen_second, 1).await;
    }

    /// A node that refuses a request unrun passes it to the next node; the
    /// caller sees only the answer. The client does not go back while its
    /// node refuses, and goes back once it serves.
    #[tokio::test]
    async fn a_request_refused_unrun_goes_to_the_next_node_and_back_later() {
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (_e1, first, seen_first) = switchable(refusing.clone());
        let (_e2, serving, served) = answering(Response::Pong);
        let client = unidentified(vec![first, serving], 0, TIMEOUT, None)
            .await
            .unwrap();
        assert_pong(&client).await;
        assert_eq!(seen_first.load(Ordering::SeqCst), 1);
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(client.current_node(), serving);
        assert_eq!(client.failovers(), 1);

        // Probes reach the first node, which refuses them: the client stays,
        // and requests keep going to the second node, with no move back
        // and forth.
        wait_until("two probes", || seen_first.load(Ordering::SeqCst) >= 3).await;
        assert_pong(&client).await;
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert_eq!(client.current_node(), serving);
        assert_eq!(client.failovers(), 1);

        // Once it serves, the next probe takes the client back.
        refusing.store(false, Ordering::SeqCst);
        wait_until("back on the first node", || client.current_node() == first).await;
        assert_pong(&client).await;
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert_eq!(client.failovers(), 1, "going back is not a failover");
        client.close().await;
    }

    /// A node that ends the stream without reading the request (as a
    /// draining one does) ran nothing: the request goes to the next node.
    #[tokio::test]
    async fn a_request_left_unread_goes_to_the_next_node() {
        let (_e1, unread, _) = fake_node(|conn, _| async move {
            while let Ok((mut send, _recv)) = conn.accept_bi().await {
                let _ = send.finish();
            }
        });
        let (_e2, serving, served) = answering(Response::Pong);
        let client = unidentified(vec![unread, serving], 0, TIMEOUT, None)
            .await
            .unwrap();
        let outcome = client.call(&Request::Ping).await;
        assert!(matches!(outcome, Ok(Response::Pong)), "{outcome:?}");
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(client.current_node(), serving);
        client.close().await;
    }

    /// When every node refuses, the caller gets the last refusal, after one
    /// try per node.
    #[tokio::test]
    async fn a_request_every_node_refuses_comes_back_refused() {
        let (_e1, a, seen_a) = answering(not_serving());
        let (_e2, b, seen_b) = answering(not_serving());
        let client = unidentified(vec![a, b], 0, TIMEOUT, None).await.unwrap();
        let outcome = client.call(&Request::Ping).await;
        assert!(
            matches!(&outcome, Ok(Response::Error(e)) if e.kind == ErrorKind::NotServing),
            "{outcome:?}"
        );
        assert_eq!(seen_a.load(Ordering::SeqCst), 1);
        assert_eq!(seen_b.load(Ordering::SeqCst), 1);
        client.close().await;
    }

    /// A request whose node may have run it is not sent again (a write
    /// could be stored twice); the next request goes to the next node.
    #[tokio::test]
    async fn a_request_that_may_have_run_is_not_sent_again() {
        let (_e1, vanishing, read_by_first) = closing_after_read();
        let (_e2, serving, served) = answering(Response::Pong);
        let client = unidentified(vec![vanishing, serving], 0, TIMEOUT, None)
            .await
            .unwrap();
        let outcome = client.call(&Request::Ping).await;
        assert!(
            matches!(outcome, Err(CallError::Connection(_))),
            "{outcome:?}"
        );
        assert_eq!(read_by_first.load(Ordering::SeqCst), 1);
        assert_eq!(
            served.load(Ordering::SeqCst),
            0,
            "the request was sent twice"
        );
        assert_eq!(client.current_node(), serving);
        assert_pong(&client).await;
        assert_eq!(served.load(Ordering::SeqCst), 1);
        client.close().await;
    }

    /// A client of three nodes whose first node has just closed its
    /// connection (and serves no more), whose second is down (nothing
    /// listens; a dial takes the 1 s connect timeout) and whose third
    /// serves: the client, the third's address and its request count, and
    /// the endpoints to keep alive.
    async fn first_gone_second_dead() -> (
        ClusterClient,
        SocketAddr,
        Arc<AtomicUsize>,
        Vec<quinn::Endpoint>,
    ) {
        let (first_endpoint, first, _) = answering(Response::Pong);
        let dead = {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap()
        };
        let (third_endpoint, third, served) = answering(Response::Pong);
        let client = unidentified(vec![first, dead, third], 0, Duration::from_secs(1), None)
            .await
            .unwrap();
        first_endpoint.close(0u32.into(), b"gone");
        wait_until("the first connection closes", || current_closed(&client)).await;
        (client, third, served, vec![first_endpoint, third_endpoint])
    }

    /// A connection found closed moves the client on before the request is
    /// sent, and a node that cannot be dialled is skipped: the request
    /// reaches the third node, within one try per node.
    #[tokio::test]
    async fn closed_connections_and_dead_nodes_are_skipped_before_sending() {
        let (client, third, served, _endpoints) = first_gone_second_dead().await;
        assert_pong(&client).await;
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(client.current_node(), third);
        assert_eq!(client.failovers(), 2);
        client.close().await;
    }

    /// A node that sends nothing while a request waits, not even QUIC's
    /// acknowledgement, is left after that request's limit instead of after
    /// QUIC's 10 s idle timeout. (The first request may have been
    /// acknowledged just before the node froze; the second cannot be.)
    #[tokio::test]
    async fn a_silent_node_is_left_after_a_timed_out_request() {
        let (frozen, _thaw) = freezing_node();
        let (_e2, serving, served) = answering(Response::Pong);
        let client = unidentified(vec![frozen, serving], 0, TIMEOUT, None)
            .await
            .unwrap();
        let limit = Duration::from_millis(500);
        let mut timed_out = 0;
        while client.current_node() == frozen {
            assert!(timed_out < 2, "still on the silent node");
            let outcome = client.call_within(&Request::Ping, limit).await;
            assert!(
                matches!(outcome, Err(CallError::TimedOut { .. })),
                "{outcome:?}"
            );
            timed_out += 1;
        }
        assert_pong(&client).await;
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(client.failovers(), 1);
        client.close().await;
    }

    /// A node that is only slow acknowledges the request at once: the
    /// request times out, and the client stays.
    #[tokio::test]
    async fn a_slow_node_keeps_the_client() {
        // Answers the first request at once, the others after 5 s.
        let (_e1, slow, _) = fake_node(|conn, counted| {
            crate::quic::serve_connection(
                conn,
                move |_request| {
                    let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        if !first {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        Response::Pong
                    }
                },
                watch::channel(false).1,
                crate::request_memory::RequestMemory::new(1 << 30),
            )
        });
        let (_e2, other, served) = answering(Response::Pong);
        let client = unidentified(vec![slow, other], 0, TIMEOUT, None)
            .await
            .unwrap();
        // Done with the handshake's last packets: only the request's own
        // acknowledgement can arrive during the next call.
        assert_pong(&client).await;
        let outcome = client
            .call_within(&Request::Ping, Duration::from_secs(2))
            .await;
        assert!(
            matches!(outcome, Err(CallError::TimedOut { .. })),
            "{outcome:?}"
        );
        assert_eq!(client.current_node(), slow);
        assert_eq!(client.failovers(), 0);
        assert_eq!(served.load(Ordering::SeqCst), 0);
        client.close().await;
    }

    /// Callers whose limit is shorter than the connect timeout give up
    /// while the next node, which is down, is dialled; the dial still ends
    /// and moves the client on, so a later caller reaches the third node.
    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_cancel_the_dial() {
        let (client, third, served, _endpoints) = first_gone_second_dead().await;
        let limit = Duration::from_millis(200);
        for _ in 0..25 {
            match client.call_within(&Request::Ping, limit).await {
                Ok(Response::Pong) => break,
                Err(CallError::TimedOut { .. } | CallError::Connect(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            client.current_node(),
            third,
            "the dial was given up with its callers"
        );
        // At least the last call was answered there. (On a loaded machine
        // an earlier one may reach it too and still time out: the dial and
        // the handshake can take longer than the 200 ms limit.)
        assert!(served.load(Ordering::SeqCst) >= 1);
        client.close().await;
    }

    /// A node of cluster `cluster_id` (named `id`) at `addr` that pongs
    /// everything else, counting what it answers besides who it is (and,
    /// in the third count, all it answers).
    fn member_of(
        id: &str,
        cluster_id: u64,
        addr: SocketAddr,
    ) -> (
        quinn::Endpoint,
        SocketAddr,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let (served, id) = (Arc::new(AtomicUsize::new(0)), id.to_string());
        let counted = served.clone();
        let (endpoint, addr, answered) = answering_with_at(addr, move |request| match request {
            Request::Identify => Response::Identity(Identity {
                node: ringkv_core::NodeId::new(&id).unwrap(),
                cluster_id: Some(cluster_id),
            }),
            _ => {
                counted.fetch_add(1, Ordering::SeqCst);
                Response::Pong
            }
        });
        (endpoint, addr, served, answered)
    }

    /// A preferred node of another cluster than most of the nodes given
    /// (it lost its data and formed a cluster of its own at a member's
    /// address) does not capture the client: the client takes the cluster
    /// most nodes name, and passes that node over.
    #[tokio::test]
    async fn a_preferred_node_of_another_cluster_than_most_is_passed_over() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (_e1, stranger, stranger_served, _) = member_of("n1", 8, any);
        let (_e2, second, served, _) = member_of("n2", 7, any);
        let (_e3, third, _, _) = member_of("n3", 7, any);
        let client = ClusterClient::connect(vec![stranger, second, third], 0, TIMEOUT, None)
            .await
            .unwrap();
        assert_pong(&client).await;
        assert_eq!(client.current_node(), second);
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(stranger_served.load(Ordering::SeqCst), 0);
        client.close().await;
    }

    /// A node of another cluster than the client's first node (one that
    /// lost its data and formed a cluster of its own at a member's address)
    /// is passed over like a node that cannot be dialled, when the client
    /// fails over and when it probes its way back to its preferred node.
    #[tokio::test]
    async fn a_node_of_another_cluster_is_passed_over() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (first_endpoint, first, _, _) = member_of("n1", 7, any);
        let (_e2, stranger, stranger_served, _) = member_of("n2", 8, any);
        let (_e3, third, served, _) = member_of("n3", 7, any);
        let client = ClusterClient::connect(vec![first, stranger, third], 0, TIMEOUT, None)
            .await
            .unwrap();
        assert_pong(&client).await;
        first_endpoint.close(0u32.into(), b"gone");
        wait_until("the first connection closes", || current_closed(&client)).await;
        assert_pong(&client).await;
        assert_eq!(client.current_node(), third);
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(stranger_served.load(Ordering::SeqCst), 0);

        // The preferred node's address now answers as a node of cluster 8:
        // probes find it, and the client stays where it is.
        drop(first_endpoint);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let (_e1, _, again_served, asked_again) = loop {
            match std::panic::catch_unwind(|| member_of("n1", 8, first)) {
                Ok(node) => break node,
                // The old endpoint's socket may take a moment to go.
                Err(_) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{first} stays taken"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
            }
        };
        wait_until("a probe reaches the preferred address", || {
            asked_again.load(Ordering::SeqCst) >= 1
        })
        .await;
        assert_eq!(
            again_served.load(Ordering::SeqCst),
            0,
            "not even the probe's read"
        );
        assert_pong(&client).await;
        assert_eq!(client.current_node(), third);
        assert_eq!(served.load(Ordering::SeqCst), 2);
        client.close().await;
    }
}
