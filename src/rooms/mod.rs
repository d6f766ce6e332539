//! The room service: everything the node decides about rooms on behalf of its peers and its
//! clients — who may see what ([`visibility`]), what peers are answered ([`answer`]), where new
//! events and EDUs go ([`push`]), catch-up ([`catch_up`]), anti-entropy ([`anti_entropy`]),
//! invites, joins, group commit ([`send`]) and EDUs ([`edu`]). It drives the swarm in
//! [`crate::net`] through its handle and never decides anything there by connection alone: a
//! peer's PeerId is its server name, and every answer and push is for a server entitled to it.

// In the browser the store is single-threaded (`Rc`), so `Arc<Engine>` is not `Send` there; the
// `Arc`s keep one code path for both targets and cost nothing extra on one thread.
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

pub mod answer;
pub mod anti_entropy;
pub mod catch_up;
pub mod devices;
pub mod edu;
pub mod ingest;
pub mod invites;
pub mod join;
pub mod knock;
pub mod media;
pub mod push;
pub mod send;
pub mod visibility;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use libp2p::{Multiaddr, PeerId};
use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedUserId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{Engine, IngestError, LocalEvent, Received};
use crate::identity::{Identity, ServerName};
use crate::net::protocol::{Edu, FedErrorCode, FedRequest, FedResponse};
use crate::net::rt::{self, Duration, Instant, Interval};
use crate::net::{Connection, NetConfig, NetEvent, NetHandle};
use crate::store::SharedStore;

pub use catch_up::CatchUpProgress;
pub use invites::{Invite, STRIPPED_STATE};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Addresses to listen on (`/ip4/127.0.0.1/tcp/0` picks a free port).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and whenever the connection to them drops.
    pub bootstrap: Vec<Multiaddr>,
    /// How often peers compare forward extremities even without reconnecting.
    pub anti_entropy_every: Duration,
    /// Find peers on the local network with mDNS (multicast: off in tests).
    pub mdns: bool,
    /// Start with the network off until [`P2pNode::set_offline`]`(false)`: a page opens its
    /// store and answers its client first, and only then spends the CPU on handshakes.
    pub start_offline: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            anti_entropy_every: Duration::from_secs(30),
            mdns: false,
            start_offline: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("peer refused: {0:?} {1}")]
    Refused(FedErrorCode, String),
    #[error("network: {0}")]
    Network(String),
    #[error("the node has stopped")]
    Stopped,
    /// A join made at a peer whose room this node could not fetch yet.
    #[error("{0}")]
    JoinIncomplete(String),
}

impl From<crate::net::Stopped> for NodeError {
    fn from(_: crate::net::Stopped) -> Self {
        NodeError::Stopped
    }
}

/// The last events a push handed to at least one member server in their room (bounded: the answer is
/// for what a person just sent, not for history).
#[derive(Default)]
pub(crate) struct Delivered {
    order: std::collections::VecDeque<OwnedEventId>,
    set: HashSet<OwnedEventId>,
}

impl Delivered {
    const MAX: usize = 10_000;

    /// Records `id` as delivered; whether it was not already.
    pub(crate) fn insert(&mut self, id: OwnedEventId) -> bool {
        if !self.set.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > Self::MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Where the answer to one queued local send goes.
type SendReply = oneshot::Sender<Result<Received, NodeError>>;

/// What a send for a client transaction brings along: writes for the same commit (its
/// transaction record), and a hold (the transaction's lock) that is let go only once the event
/// is durable and its sender answered, even if the client has hung up meanwhile.
pub struct TxnSend {
    pub record: crate::engine::AlsoWrite,
    pub hold: Hold,
}

/// Something kept alive until a queued send is durable and answered.
pub type Hold = Box<dyn std::any::Any + Send>;

pub(crate) struct Shared {
    engine: Arc<Engine>,
    identity: Arc<Identity>,
    net: NetHandle,
    inbound: mpsc::Sender<ingest::Inbound>,
    changes: watch::Sender<u64>,
    /// Verified typing notices and receipts from peers, for the client API.
    edus: tokio::sync::broadcast::Sender<Edu>,
    invites: Mutex<Vec<Invite>>,
    /// Local events waiting for the next group commit, with whom to tell.
    send_queue: Mutex<Vec<(LocalEvent, SendReply, Option<Hold>)>>,
    /// One group commit sealed at a time.
    send_turn: futures::lock::Mutex<()>,
    /// Held from sealing a group commit until its senders are answered: commits are answered
    /// and pushed in the order they were sealed.
    answer_turn: futures::lock::Mutex<()>,
    delivered: Mutex<Delivered>,
    catch_up: Mutex<CatchUpProgress>,
    catch_ups: Mutex<catch_up::Running>,
    edu_guard: Mutex<edu::EduGuard>,
    /// Peers' device requests, for the client API.
    devices: devices::DeviceQueue,
    /// Each peer as it connects.
    connected: tokio::sync::broadcast::Sender<PeerId>,
}

/// A running peer: the room service over its swarm. Cheap to clone; the swarm stops on
/// [`P2pNode::shutdown`].
#[derive(Clone)]
pub struct P2pNode {
    shared: Arc<Shared>,
}

fn now() -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch::now()
}

impl P2pNode {
    /// Opens the engine on `store`, loads (or creates) the identity, and starts the swarm.
    pub async fn start(store: SharedStore, config: NodeConfig) -> Result<Self, NodeError> {
        let engine = Arc::new(Engine::open(store.clone()).await?);
        let identity = Arc::new(Identity::load_or_create(store.as_ref()).await?);
        let net_config = NetConfig {
            listen: config.listen.clone(),
            bootstrap: config.bootstrap.clone(),
            mdns: config.mdns,
            start_offline: config.start_offline,
            discover_every: config.anti_entropy_every,
        };
        let (net, events) = NetHandle::start(
            &identity,
            #[cfg(not(target_arch = "wasm32"))]
            store.as_ref(),
            net_config,
        )
        .await
        .map_err(NodeError::Network)?;
        let invites = invites::load_invites(engine.store().as_ref()).await?;
        let (inbound, inbound_rx) = mpsc::channel(ingest::INBOUND_PUSHES);
        let (changes, _) = watch::channel(0);
        let (edus, _) = tokio::sync::broadcast::channel(1024);
        let node = P2pNode {
            shared: Arc::new(Shared {
                engine,
                identity,
                net,
                inbound,
                changes,
                edus,
                invites: Mutex::new(invites),
                send_queue: Mutex::new(Vec::new()),
                send_turn: futures::lock::Mutex::new(()),
                answer_turn: futures::lock::Mutex::new(()),
                delivered: Mutex::new(Delivered::default()),
                catch_up: Mutex::new(CatchUpProgress::default()),
                catch_ups: Mutex::new(catch_up::Running::default()),
                edu_guard: Mutex::new(edu::EduGuard::default()),
                devices: devices::DeviceQueue::new(),
                connected: tokio::sync::broadcast::channel(256).0,
            }),
        };
        let (weak, every) = (Arc::downgrade(&node.shared), config.anti_entropy_every);
        rt::spawn_restarting("room service", events, move |events| {
            Box::pin(serve(weak.clone(), events, every))
        });
        let weak = Arc::downgrade(&node.shared);
        rt::spawn_restarting("ingest", inbound_rx, move |inbound| {
            Box::pin(ingest::ingest_loop(weak.clone(), inbound))
        });
        Ok(node)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    pub fn server_name(&self) -> ServerName {
        self.shared.identity.server_name()
    }

    pub fn peer_id(&self) -> PeerId {
        self.shared.identity.peer_id()
    }

    /// `@localpart:<this server>`.
    pub fn user(&self, localpart: &str) -> OwnedUserId {
        OwnedUserId::try_from(format!("@{localpart}:{}", self.server_name()))
            .expect("valid user id")
    }

    /// `@localpart:<this server>`, or why that is not a valid user id.
    pub fn user_checked(&self, localpart: &str) -> Result<OwnedUserId, String> {
        OwnedUserId::try_from(format!("@{localpart}:{}", self.server_name()))
            .map_err(|e| e.to_string())
    }

    /// The addresses the swarm listens on, once it listens on at least one.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs_at_least(1).await
    }

    /// The addresses the swarm listens on, once there are at least `n` (with `/p2p/<id>`).
    pub async fn listen_addrs_at_least(&self, n: usize) -> Vec<Multiaddr> {
        self.shared.net.listen_addrs_at_least(n).await
    }

    /// The addresses the swarm listens on right now (with `/p2p/<id>`).
    pub fn current_listen_addrs(&self) -> Vec<Multiaddr> {
        self.shared.net.current_listen_addrs()
    }

    pub fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        Ok(self.shared.net.dial(addr)?)
    }

    /// Cuts every connection and refuses new ones (`true`), or comes back (`false`): for
    /// partition tests and an app's offline switch.
    pub fn set_offline(&self, offline: bool) -> Result<(), NodeError> {
        Ok(self.shared.net.set_offline(offline)?)
    }

    /// Waits until at least `n` peers are connected, for at most `timeout`.
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> bool {
        self.shared.net.wait_for_peers(n, timeout).await
    }

    /// Every open connection, with the address it goes through.
    pub async fn connections(&self) -> Result<Vec<Connection>, NodeError> {
        Ok(self.shared.net.connections().await?)
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NodeError> {
        Ok(self.shared.net.connected_peers().await?)
    }

    /// Stops the swarm and waits for a group commit in flight and for every write the engine
    /// has under way, so that nothing is written after this returns (a tab hands its profile to
    /// another tab this way).
    pub async fn shutdown(&self) {
        self.shared.net.shutdown();
        let _turn = self.shared.send_turn.lock().await;
        let _answers = self.shared.answer_turn.lock().await;
        self.shared.engine.writes_done().await;
    }

    /// Whether the node has stopped (shut down, or its swarm ended by a panic): its clients are
    /// answered with errors from then on.
    pub fn is_stopped(&self) -> bool {
        self.shared.net.is_stopped()
    }

    /// Resolves once the node has stopped.
    pub async fn stopped(&self) {
        self.shared.net.stopped().await
    }

    /// Whether a push has handed this (recent) event to at least one member server.
    pub fn delivered(&self, event_id: &ruma::EventId) -> bool {
        let delivered = self.shared.delivered.lock().expect("not poisoned");
        delivered.set.contains(event_id)
    }

    pub fn catch_up_progress(&self) -> CatchUpProgress {
        *self.shared.catch_up.lock().expect("not poisoned")
    }

    /// A counter that moves whenever this node stores something new; tests and clients wait on it.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Typing notices and read receipts peers send for their users (signatures checked, and
    /// the user joined to the room here).
    pub fn edus(&self) -> tokio::sync::broadcast::Receiver<Edu> {
        self.shared.edus.subscribe()
    }

    /// Wakes everyone waiting on [`P2pNode::changes`] (also for changes made above the engine,
    /// such as a client's account data).
    pub fn changed(&self) {
        self.shared.changes.send_modify(|c| *c += 1);
    }

    /// Invites for this server's users to rooms not held here, not expired.
    pub fn invites(&self) -> Vec<Invite> {
        let now: u64 = now().get().into();
        let invites = self.shared.invites.lock().expect("invites lock");
        invites
            .iter()
            .filter(|i| now.saturating_sub(i.received_ms) <= invites::INVITE_TTL_MS)
            .cloned()
            .collect()
    }

    /// Sends a `/hyphae/fed/1` request to `peer` and waits for the answer (finding the peer
    /// through the DHT if no address is known).
    pub async fn request(
        &self,
        peer: PeerId,
        request: FedRequest,
    ) -> Result<FedResponse, NodeError> {
        self.request_with(peer, request, true).await
    }

    async fn request_with(
        &self,
        peer: PeerId,
        request: FedRequest,
        look_up: bool,
    ) -> Result<FedResponse, NodeError> {
        match self
            .shared
            .net
            .request(peer, request, look_up)
            .await
            .map_err(NodeError::Network)?
        {
            FedResponse::Error { code, message } => Err(NodeError::Refused(code, message)),
            ok => Ok(ok),
        }
    }

    /// Waits until `done` holds, re-checking whenever this node stores something, for at most
    /// `timeout`. Returns whether it held.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, mut done: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut changes = self.changes();
        let deadline = Instant::now() + timeout;
        loop {
            changes.mark_unchanged();
            if done().await {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if rt::timeout(left, changes.changed()).await.is_none() {
                return done().await;
            }
        }
    }
}

/// Requests the room service answers at once; past this the swarm's bounded queue fills and
/// peers are told `LimitExceeded` there.
const CONCURRENT_ANSWERS: usize = 64;

/// Hands what the swarm hears to the room service: pushes queued for ingest, other requests
/// answered each in its own task (at most [`CONCURRENT_ANSWERS`] at a time), anti-entropy with
/// a peer on connection and with every connected peer periodically.
async fn serve(
    node: std::sync::Weak<Shared>,
    events: &mut mpsc::Receiver<NetEvent>,
    anti_entropy_every: Duration,
) {
    let mut anti_entropy = Interval::new(anti_entropy_every);
    let answers = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_ANSWERS));
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                let Some(shared) = node.upgrade() else { return };
                let node = P2pNode { shared };
                match event {
                    NetEvent::Request { peer, request, reply } => {
                        // Pushes go straight to the ingest queue; the rest is answered in
                        // tasks, a bounded number at a time.
                        let Some((request, reply)) = node.take_request(peer, request, reply) else {
                            continue;
                        };
                        let Ok(permit) = answers.clone().acquire_owned().await else { return };
                        rt::spawn(async move {
                            let response = node.answer(peer, request).await;
                            node.shared.net.respond(reply, response);
                            drop(permit);
                        });
                    }
                    NetEvent::Connected(peer) => {
                        let _ = node.shared.connected.send(peer);
                        rt::spawn(async move { node.anti_entropy_logged(peer).await });
                    }
                    NetEvent::Disconnected(_) => {}
                }
            }
            _ = anti_entropy.tick() => {
                let Some(shared) = node.upgrade() else { return };
                let node = P2pNode { shared };
                rt::spawn(async move {
                    for peer in node.connected_peers().await.unwrap_or_default() {
                        node.anti_entropy_logged(peer).await;
                    }
                });
            }
        }
    }
}
