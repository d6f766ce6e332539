//! The native peer: owns the libp2p swarm (TCP, QUIC, WebSocket) and connects it to the engine.
//!
//! One task runs the swarm and nothing slow: engine work happens in other tasks that talk back
//! through a command channel. PDUs from gossip go through a single ingest task, in arrival order,
//! batched into one durable commit per burst. Whatever the engine reports missing is pulled from
//! the peer that sent it (`GetMissingEvents`); on every new connection and periodically, peers
//! compare forward extremities (anti-entropy), so a peer that was away converges without anyone
//! re-sending.

// In the browser the store is single-threaded (`Rc`), so `Arc<Engine>` is not `Send` there; the
// `Arc`s keep one code path for both targets and cost nothing extra on one thread.
#![cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::rt::{self, Duration, Instant, Interval};

use futures::StreamExt;
#[cfg(not(target_arch = "wasm32"))]
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    gossipsub, identify, noise, ping, request_response, yamux, Multiaddr, PeerId, StreamProtocol,
    Swarm,
};
#[cfg(not(target_arch = "wasm32"))]
use libp2p::{kad, mdns, relay, rendezvous, tcp};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::protocol::{
    edu_topic, edu_topic_room, room_topic, topic_room, Edu, FedErrorCode, FedRequest, FedResponse,
    FED_PROTOCOL, MAX_MISSING_EVENTS,
};
use crate::engine::create_room::CreateRoom;
use crate::engine::pdu::{build_signed, rules_for, NewEvent};
use crate::engine::{verify_standalone, Engine, IngestError, LocalEvent, Outcome, Received};
use crate::identity::{Identity, ServerName};
use crate::store::{SharedStore, Table, WriteBatch};

/// The rendezvous namespace Hyphae peers register under.
pub const RENDEZVOUS_NAMESPACE: &str = "hyphae";

/// Requests a peer may make per second before it is throttled (burst: twice that).
const REQUESTS_PER_SECOND: f64 = 200.0;
/// Most rounds of `GetMissingEvents` one catch-up makes, and most events it accepts.
const MAX_CATCH_UP_ROUNDS: usize = 64;
const MAX_CATCH_UP_EVENTS: usize = 100_000;

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

#[cfg(not(target_arch = "wasm32"))]
/// Circuit relay limits that suit chat: libp2p's defaults end a relayed connection after two
/// minutes or 128 KiB, which would cut a browser-to-browser conversation mid-sentence.
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuit_duration: Duration::from_secs(24 * 3600),
        max_circuit_bytes: 1 << 30,
        reservation_duration: Duration::from_secs(3600),
        max_reservations: 1024,
        max_circuits: 1024,
        max_circuits_per_peer: 16,
        ..relay::Config::default()
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
}

/// A native node: the room protocols plus the services browsers rely on.
#[cfg(not(target_arch = "wasm32"))]
#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    fed: request_response::cbor::Behaviour<FedRequest, FedResponse>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// Browsers reach each other through circuits on native nodes.
    relay: relay::Behaviour,
    /// Browsers register and discover each other here.
    rendezvous: rendezvous::server::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    /// Finds the addresses of peers nobody introduced (a server name is a PeerId).
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// Hyphae's own DHT, apart from the IPFS one.
#[cfg(not(target_arch = "wasm32"))]
const KAD_PROTOCOL: &str = "/hyphae/kad/1";

/// A browser peer: the room protocols over connections it dials, and relay circuits through
/// native nodes to reach (and be reached by) other browsers.
#[cfg(target_arch = "wasm32")]
#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    fed: request_response::cbor::Behaviour<FedRequest, FedResponse>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay_client: libp2p::relay::client::Behaviour,
    /// Registers this tab at its bootstrap nodes' rendezvous points and discovers other tabs.
    rendezvous: libp2p::rendezvous::client::Behaviour,
}

enum Command {
    Publish {
        room_id: OwnedRoomId,
        pdu: Vec<u8>,
        /// Recorded as delivered once gossip hands it to a peer (`None` for raw bytes).
        event_id: Option<OwnedEventId>,
    },
    Subscribe(OwnedRoomId),
    PublishEdu {
        room_id: OwnedRoomId,
        edu: Vec<u8>,
    },
    Request {
        peer: PeerId,
        request: FedRequest,
        reply: oneshot::Sender<Result<FedResponse, String>>,
    },
    Respond {
        channel: request_response::ResponseChannel<FedResponse>,
        response: FedResponse,
    },
    Validate {
        id: gossipsub::MessageId,
        source: PeerId,
        acceptance: gossipsub::MessageAcceptance,
    },
    Dial(Multiaddr),
    SetOffline(bool),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Connections(oneshot::Sender<Vec<Connection>>),
    /// Ends the swarm: every connection closes and no command is taken after it.
    Shutdown,
}

/// One open connection: to whom, and through which address.
#[derive(Clone, Debug)]
pub struct Connection {
    pub peer: PeerId,
    pub address: Multiaddr,
}

impl Connection {
    /// Through a circuit on a relay rather than straight to the peer.
    pub fn relayed(&self) -> bool {
        self.address
            .iter()
            .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
    }
}

/// How far catching up rooms from peers has got: for a progress indicator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatchUpProgress {
    /// Catch-ups running now.
    pub active: usize,
    /// Events they have fetched so far.
    pub fetched: usize,
}

/// The last events gossip handed to at least one peer in their room (bounded: the answer is
/// for what a person just sent, not for history).
#[derive(Default)]
struct Delivered {
    order: std::collections::VecDeque<OwnedEventId>,
    set: HashSet<OwnedEventId>,
}

impl Delivered {
    const MAX: usize = 10_000;

    fn insert(&mut self, id: OwnedEventId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > Self::MAX {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// A PDU that arrived from a peer, waiting for the ingest task.
struct Inbound {
    pdu: Vec<u8>,
    from: PeerId,
    gossip_id: Option<gossipsub::MessageId>,
    /// Catch-ups already tried for this PDU (bounded so a bad peer cannot loop us).
    attempts: u8,
}

/// Counts a catch-up as running while it lives; the count of fetched events restarts when no
/// catch-up runs.
struct CatchUpGuard<'a>(&'a Shared);

impl<'a> CatchUpGuard<'a> {
    fn start(shared: &'a Shared) -> Self {
        let mut progress = shared.catch_up.lock().expect("not poisoned");
        if progress.active == 0 {
            progress.fetched = 0;
        }
        progress.active += 1;
        CatchUpGuard(shared)
    }
}

impl Drop for CatchUpGuard<'_> {
    fn drop(&mut self) {
        self.0.catch_up.lock().expect("not poisoned").active -= 1;
        self.0.changes.send_modify(|c| *c += 1);
    }
}

/// A PDU fetched during catch-up that waits for its dependencies.
struct Held {
    depth: u64,
    /// The id the sending peer gave (used only to decide what to ask for next).
    id: OwnedEventId,
    pdu: Vec<u8>,
}

/// The stored form of an [`Invite`] (table `invites`, keyed by event id).
#[derive(serde::Serialize, serde::Deserialize)]
struct InviteRecord {
    room_id: OwnedRoomId,
    room_version: RoomVersionId,
    event_id: OwnedEventId,
    sender: OwnedUserId,
    invitee: OwnedUserId,
    from: String,
    /// Absent in records stored before invites carried room state.
    #[serde(default)]
    room_state: Vec<serde_json::Value>,
}

impl From<&Invite> for InviteRecord {
    fn from(i: &Invite) -> Self {
        Self {
            room_id: i.room_id.clone(),
            room_version: i.room_version.clone(),
            event_id: i.event_id.clone(),
            sender: i.sender.clone(),
            invitee: i.invitee.clone(),
            from: i.from.to_string(),
            room_state: i.room_state.clone(),
        }
    }
}

async fn load_invites(store: &dyn crate::store::Store) -> Result<Vec<Invite>, NodeError> {
    let mut out = Vec::new();
    for (_, value) in crate::store::scan_all(store, Table::Invites).await? {
        let r: InviteRecord = serde_json::from_slice(&value)
            .map_err(|e| crate::store::StoreError::Corrupt(format!("invite: {e}")))?;
        let from = r
            .from
            .parse()
            .map_err(|_| crate::store::StoreError::Corrupt("invite peer id".into()))?;
        out.push(Invite {
            room_id: r.room_id,
            room_version: r.room_version,
            event_id: r.event_id,
            sender: r.sender,
            invitee: r.invitee,
            from,
            room_state: r.room_state,
        });
    }
    Ok(out)
}

/// An invite for one of this peer's users to a room elsewhere.
#[derive(Debug, Clone)]
pub struct Invite {
    pub room_id: OwnedRoomId,
    pub room_version: RoomVersionId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    pub invitee: OwnedUserId,
    pub from: PeerId,
    /// Stripped state the inviter sent: `{type, state_key, sender, content}` objects.
    pub room_state: Vec<serde_json::Value>,
}

/// The state an invite carries so the invitee can show the room before joining (the spec's
/// recommended stripped state).
pub const STRIPPED_STATE: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
];

/// One stripped state event from an inviter, if it is one: an object with a known state type,
/// an empty state key, a valid sender and object content. Anything else is dropped (and
/// logged): it is display information, never authority.
fn stripped_state_event(raw: &str, room_id: &RoomId) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let kind = v["type"].as_str()?;
    let ok = STRIPPED_STATE.contains(&kind)
        && v["state_key"] == ""
        && v["sender"]
            .as_str()
            .is_some_and(|s| ruma::UserId::parse(s).is_ok())
        && v["content"].is_object();
    if !ok {
        tracing::warn!(%room_id, "malformed stripped state in an invite dropped");
        return None;
    }
    Some(json!({"type": kind, "state_key": "", "sender": v["sender"], "content": v["content"]}))
}

/// Where the answer to one `/hyphae/fed/1` request goes.
type RequestReply = oneshot::Sender<Result<FedResponse, String>>;

/// How long a request waits for the DHT to find its peer.
#[cfg(not(target_arch = "wasm32"))]
const LOOKUP_PATIENCE: Duration = Duration::from_secs(15);

/// Requests waiting for a peer's address. A lookup that finds nothing is run again whenever
/// the routing table learns something new (a young node's table fills as peers identify),
/// until [`LOOKUP_PATIENCE`] runs out.
#[cfg(not(target_arch = "wasm32"))]
struct Lookup {
    waiting: Vec<(FedRequest, RequestReply)>,
    deadline: Instant,
    in_flight: bool,
}

/// A request in flight, kept whole so that it can be sent again once the peer is found.
struct PendingRequest {
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    peer: PeerId,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    request: Option<FedRequest>,
    reply: RequestReply,
}

/// Where the answer to one queued local send goes.
type SendReply = oneshot::Sender<Result<Received, NodeError>>;

struct Shared {
    engine: Arc<Engine>,
    identity: Arc<Identity>,
    commands: mpsc::UnboundedSender<Command>,
    inbound: mpsc::UnboundedSender<Inbound>,
    changes: watch::Sender<u64>,
    /// Verified typing notices and receipts from peers, for the client API.
    edus: tokio::sync::broadcast::Sender<Edu>,
    listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    /// How many peers are connected right now.
    peer_count: watch::Receiver<usize>,
    invites: Mutex<Vec<Invite>>,
    /// Local events waiting for the next group commit, with whom to tell.
    send_queue: Mutex<Vec<(LocalEvent, SendReply)>>,
    /// One group commit at a time.
    send_turn: futures::lock::Mutex<()>,
    delivered: Mutex<Delivered>,
    catch_up: Mutex<CatchUpProgress>,
}

/// A running peer. Cheap to clone; the swarm stops when the last clone and its tasks are gone
/// (or on [`P2pNode::shutdown`]).
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
        #[cfg(not(target_arch = "wasm32"))]
        let webrtc_cert = webrtc_certificate(store.as_ref()).await?;
        let swarm = build_swarm(
            &identity,
            config.mdns,
            #[cfg(not(target_arch = "wasm32"))]
            webrtc_cert,
        )
        .await
        .map_err(NodeError::Network)?;
        let invites = load_invites(engine.store().as_ref()).await?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        let (addrs_tx, listen_addrs) = watch::channel(Vec::new());
        let (peers_tx, peer_count) = watch::channel(0);
        let (changes, _) = watch::channel(0);
        let (edus, _) = tokio::sync::broadcast::channel(1024);
        let node = P2pNode {
            shared: Arc::new(Shared {
                engine,
                identity,
                commands,
                inbound,
                changes,
                edus,
                listen_addrs,
                peer_count,
                invites: Mutex::new(invites),
                send_queue: Mutex::new(Vec::new()),
                send_turn: futures::lock::Mutex::new(()),
                delivered: Mutex::new(Delivered::default()),
                catch_up: Mutex::new(CatchUpProgress::default()),
            }),
        };
        let rooms = node.shared.engine.rooms().await?;
        let driver = SwarmDriver {
            swarm,
            node: Arc::downgrade(&node.shared),
            commands: command_rx,
            pending: HashMap::new(),
            #[cfg(not(target_arch = "wasm32"))]
            lookups: HashMap::new(),
            addrs: addrs_tx,
            peers: peers_tx,
            bootstrap: config
                .bootstrap
                .iter()
                .cloned()
                .map(Bootstrap::new)
                .collect(),
            offline: config.start_offline,
            unpublished: Vec::new(),
            buckets: HashMap::new(),
            relay_listens: Vec::new(),
            relay_listeners: HashMap::new(),
            connections: HashMap::new(),
        };
        rt::spawn(driver.run(config, rooms));
        rt::spawn(ingest_loop(Arc::downgrade(&node.shared), inbound_rx));
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

    /// The addresses the swarm listens on, once it listens on at least one.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs_at_least(1).await
    }

    /// The addresses the swarm listens on, once there are at least `n` (with `/p2p/<id>`).
    pub async fn listen_addrs_at_least(&self, n: usize) -> Vec<Multiaddr> {
        let mut rx = self.shared.listen_addrs.clone();
        let addrs = rx
            .wait_for(|a| a.len() >= n)
            .await
            .map(|a| a.clone())
            .unwrap_or_default();
        self.dialable(addrs)
    }

    /// The addresses the swarm listens on right now (with `/p2p/<id>`).
    pub fn current_listen_addrs(&self) -> Vec<Multiaddr> {
        let addrs = self.shared.listen_addrs.borrow().clone();
        self.dialable(addrs)
    }

    fn dialable(&self, addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        let peer = self.peer_id();
        addrs
            .into_iter()
            .map(|a| a.with_p2p(peer).unwrap_or_else(|a| a))
            .collect()
    }

    fn command(&self, c: Command) -> Result<(), NodeError> {
        self.shared.commands.send(c).map_err(|_| NodeError::Stopped)
    }

    pub fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.command(Command::Dial(addr))
    }

    /// Cuts every connection and refuses new ones (`true`), or comes back (`false`): for
    /// partition tests and an app's offline switch.
    pub fn set_offline(&self, offline: bool) -> Result<(), NodeError> {
        self.command(Command::SetOffline(offline))
    }

    /// Waits until at least `n` peers are connected, for at most `timeout`.
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.peer_count.clone();
        rt::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_some_and(|r| r.is_ok())
    }

    /// Every open connection, with the address it goes through.
    pub async fn connections(&self) -> Result<Vec<Connection>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Connections(tx))?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Stops the swarm and waits for a group commit in flight, so that nothing is written
    /// after this returns (a tab hands its profile to another tab this way).
    pub async fn shutdown(&self) {
        let _ = self.command(Command::Shutdown);
        let _turn = self.shared.send_turn.lock().await;
    }

    /// Whether gossip has handed this (recent) event to at least one peer in its room.
    pub fn delivered(&self, event_id: &ruma::EventId) -> bool {
        let delivered = self.shared.delivered.lock().expect("not poisoned");
        delivered.set.contains(event_id)
    }

    pub fn catch_up_progress(&self) -> CatchUpProgress {
        *self.shared.catch_up.lock().expect("not poisoned")
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::ConnectedPeers(tx))?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// A counter that moves whenever this node stores something new; tests and clients wait on it.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Typing notices and read receipts peers send for their users (signatures checked;
    /// whether the user is in the room is for the receiver to check).
    pub fn edus(&self) -> tokio::sync::broadcast::Receiver<Edu> {
        self.shared.edus.subscribe()
    }

    /// Tells the room's peers that `user` (of this server) is typing or stopped.
    pub fn send_typing(&self, room_id: &RoomId, user: &ruma::UserId, typing: bool) {
        self.publish_edu(Edu::Typing {
            room_id: room_id.to_owned(),
            user_id: user.to_owned(),
            typing,
        });
    }

    /// Tells the room's peers that `user` (of this server) has read up to `event_id`.
    pub fn send_receipt(&self, room_id: &RoomId, user: &ruma::UserId, event_id: &ruma::EventId) {
        self.publish_edu(Edu::Receipt {
            room_id: room_id.to_owned(),
            user_id: user.to_owned(),
            event_id: event_id.to_owned(),
        });
    }

    fn publish_edu(&self, edu: Edu) {
        let room_id = edu.room_id().to_owned();
        // Ephemeral: if the node has stopped there is no one to tell.
        let _ = self.command(Command::PublishEdu {
            room_id,
            edu: edu.sign(&self.shared.identity),
        });
    }

    /// `@localpart:<this server>`, or why that is not a valid user id.
    pub fn user_checked(&self, localpart: &str) -> Result<OwnedUserId, String> {
        OwnedUserId::try_from(format!("@{localpart}:{}", self.server_name()))
            .map_err(|e| e.to_string())
    }

    /// Wakes everyone waiting on [`P2pNode::changes`] (also for changes made above the engine,
    /// such as a client's account data).
    pub fn changed(&self) {
        self.shared.changes.send_modify(|c| *c += 1);
    }

    pub fn invites(&self) -> Vec<Invite> {
        self.shared.invites.lock().expect("invites lock").clone()
    }

    /// Sends a `/hyphae/fed/1` request to `peer` and waits for the answer.
    pub async fn request(
        &self,
        peer: PeerId,
        request: FedRequest,
    ) -> Result<FedResponse, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Request {
            peer,
            request,
            reply,
        })?;
        match rx
            .await
            .map_err(|_| NodeError::Stopped)?
            .map_err(NodeError::Network)?
        {
            FedResponse::Error { code, message } => Err(NodeError::Refused(code, message)),
            ok => Ok(ok),
        }
    }

    /// Publishes arbitrary bytes on a room's gossip topic, unchecked: for tools and for testing
    /// how peers treat misbehaviour. Normal sends go through [`P2pNode::send`].
    pub fn publish_raw(&self, room_id: &RoomId, pdu: Vec<u8>) -> Result<(), NodeError> {
        self.command(Command::Publish {
            room_id: room_id.to_owned(),
            pdu,
            event_id: None,
        })
    }

    async fn publish_event(
        &self,
        room_id: &RoomId,
        event_id: &OwnedEventId,
    ) -> Result<(), NodeError> {
        let ev = self
            .shared
            .engine
            .event(event_id)
            .await?
            .ok_or(NodeError::Stopped)?;
        self.command(Command::Publish {
            room_id: room_id.to_owned(),
            pdu: ev.pdu.json.get().as_bytes().to_vec(),
            event_id: Some(event_id.clone()),
        })
    }

    /// Creates a room as `localpart` and announces it.
    pub async fn create_room(
        &self,
        localpart: &str,
        opts: &CreateRoom,
    ) -> Result<OwnedRoomId, NodeError> {
        let (room_id, ids) = self
            .shared
            .engine
            .create_room(&self.shared.identity, &self.user(localpart), opts, now())
            .await?;
        self.command(Command::Subscribe(room_id.clone()))?;
        for id in &ids {
            self.publish_event(&room_id, id).await?;
        }
        for invitee in &opts.invite {
            self.deliver_invite(&room_id, invitee).await?;
        }
        self.changed();
        Ok(room_id)
    }

    /// Sends an event as `localpart`; returns once it is durable here (delivery is in the background).
    pub async fn send(
        &self,
        room_id: &RoomId,
        localpart: &str,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
    ) -> Result<Received, NodeError> {
        self.send_with(room_id, localpart, kind, state_key, content, None)
            .await
    }

    /// [`P2pNode::send`], plus writes made durable in the same commit as the event.
    pub async fn send_with(
        &self,
        room_id: &RoomId,
        localpart: &str,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
        also_write: Option<crate::engine::AlsoWrite>,
    ) -> Result<Received, NodeError> {
        let (reply, rx) = oneshot::channel();
        let event = LocalEvent {
            room_id: room_id.to_owned(),
            sender: self.user(localpart),
            kind: kind.to_owned(),
            state_key: state_key.map(str::to_owned),
            content,
            also_write,
        };
        self.shared
            .send_queue
            .lock()
            .expect("send queue lock")
            .push((event, reply));
        // The commit runs in its own task so that a caller that gives up (a client that hangs
        // up) cannot strand the other senders whose events share the commit.
        let node = self.clone();
        rt::spawn(async move { node.commit_queued_sends().await });
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Group commit: whoever gets the turn signs and stores every queued send in one durable
    /// write, then answers each sender. Under load one commit carries many events; alone, a send
    /// commits at once.
    async fn commit_queued_sends(&self) {
        let _turn = self.shared.send_turn.lock().await;
        let jobs = std::mem::take(&mut *self.shared.send_queue.lock().expect("send queue lock"));
        if jobs.is_empty() {
            return;
        }
        let (events, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
        match self
            .shared
            .engine
            .send_many(&self.shared.identity, events, now())
            .await
        {
            Err(e) => {
                tracing::error!(error = %e, "storing local events failed");
                for reply in replies {
                    let e = crate::store::StoreError::Backend(e.to_string());
                    let _ = reply.send(Err(NodeError::Store(e)));
                }
            }
            Ok(results) => {
                for (result, reply) in results.into_iter().zip(replies) {
                    let answer = match result {
                        Ok(r) => self.publish_event(&r.room_id, &r.event_id).await.map(|_| r),
                        Err(e) => Err(e.into()),
                    };
                    let _ = reply.send(answer);
                }
                self.changed();
            }
        }
    }

    /// Invites `invitee` (on any server) and hands the invite to the invitee's peer directly.
    pub async fn invite(
        &self,
        room_id: &RoomId,
        localpart: &str,
        invitee: &OwnedUserId,
    ) -> Result<(), NodeError> {
        self.send(
            room_id,
            localpart,
            "m.room.member",
            Some(invitee.as_str()),
            json!({"membership": "invite"}),
        )
        .await?;
        self.deliver_invite(room_id, invitee).await
    }

    async fn deliver_invite(
        &self,
        room_id: &RoomId,
        invitee: &OwnedUserId,
    ) -> Result<(), NodeError> {
        let server = ServerName::try_from(invitee.server_name())
            .map_err(|e| NodeError::Refused(FedErrorCode::BadRequest, e.to_string()))?;
        if server == self.server_name() {
            return Ok(());
        }
        let state = self
            .shared
            .engine
            .current_state(room_id)
            .await?
            .unwrap_or_default();
        let Some(id) = state.get(&("m.room.member".to_owned(), invitee.to_string())) else {
            return Ok(());
        };
        let ev = self
            .shared
            .engine
            .event(id)
            .await?
            .ok_or(NodeError::Stopped)?;
        let room = self
            .shared
            .engine
            .room(room_id)
            .await?
            .ok_or(NodeError::Stopped)?;
        let mut room_state = Vec::new();
        for kind in STRIPPED_STATE {
            let Some(id) = state.get(&(kind.to_owned(), String::new())) else {
                continue;
            };
            if let Some(e) = self.shared.engine.event(id).await? {
                let stripped = json!({
                    "type": kind,
                    "state_key": "",
                    "sender": e.pdu.sender,
                    "content": serde_json::from_str::<serde_json::Value>(e.pdu.content.get())
                        .unwrap_or_default(),
                });
                room_state.push(stripped.to_string());
            }
        }
        let request = FedRequest::Invite {
            room_version: room.room_version,
            pdu: ev.pdu.json.get().to_owned(),
            room_state,
        };
        // The invitee may be offline: the invite is in the room DAG anyway, and reaches them
        // when they next meet a member.
        if let Err(e) = self.request(server.peer_id(), request).await {
            tracing::info!(%invitee, error = %e, "invite not delivered now");
        }
        Ok(())
    }

    /// Joins `room_id` as `localpart` through `via`, a peer already in the room: asks it for a
    /// join template, signs it, hands it back, then catches up on the room's history.
    pub async fn join(
        &self,
        room_id: &RoomId,
        localpart: &str,
        via: PeerId,
    ) -> Result<OwnedEventId, NodeError> {
        self.join_with_profile(room_id, localpart, via, Default::default())
            .await
    }

    /// [`P2pNode::join`] with the user's profile (`displayname`, `avatar_url`) in the join event.
    pub async fn join_with_profile(
        &self,
        room_id: &RoomId,
        localpart: &str,
        via: PeerId,
        profile: serde_json::Map<String, serde_json::Value>,
    ) -> Result<OwnedEventId, NodeError> {
        let user = self.user(localpart);
        let FedResponse::JoinTemplate {
            room_id: tpl_room,
            template,
        } = self
            .request(
                via,
                FedRequest::MakeJoin {
                    room_id: room_id.to_owned(),
                    user_id: user.clone(),
                },
            )
            .await?
        else {
            return Err(NodeError::Network("unexpected answer to make_join".into()));
        };
        if tpl_room != room_id {
            return Err(NodeError::Network(
                "make_join answered for another room".into(),
            ));
        }
        let mut content = serde_json::Value::Object(profile);
        content["membership"] = json!("join");
        let rules = rules_for(&template.room_version).ok_or_else(|| {
            IngestError::UnsupportedRoomVersion(template.room_version.to_string())
        })?;
        let (event_id, pdu) = build_signed(
            &self.shared.identity,
            &rules,
            NewEvent {
                room_id: Some(room_id),
                sender: &user,
                kind: "m.room.member",
                state_key: Some(user.as_str()),
                content,
                prev_events: template.prev_events,
                auth_events: template.auth_events,
                depth: template.depth,
                origin_server_ts: now(),
                redacts: None,
            },
        )
        .map_err(IngestError::BadFormat)?;
        let pdu = String::from_utf8(pdu).expect("canonical JSON is UTF-8");
        self.request(via, FedRequest::SendJoin { pdu }).await?;
        self.catch_up(via, room_id, vec![event_id.clone()]).await?;
        self.command(Command::Subscribe(room_id.to_owned()))?;
        let answered: Vec<OwnedEventId> = {
            let mut invites = self.shared.invites.lock().expect("invites lock");
            let ids = invites
                .iter()
                .filter(|i| i.room_id == room_id)
                .map(|i| i.event_id.clone())
                .collect();
            invites.retain(|i| i.room_id != room_id);
            ids
        };
        if !answered.is_empty() {
            let mut batch = WriteBatch::new();
            for id in answered {
                batch.delete(Table::Invites, id.as_bytes());
            }
            self.shared.engine.store().write(batch).await?;
        }
        Ok(event_id)
    }

    /// Pulls from `peer` everything needed to place `latest` in our DAG.
    async fn catch_up(
        &self,
        peer: PeerId,
        room_id: &RoomId,
        latest: Vec<OwnedEventId>,
    ) -> Result<usize, NodeError> {
        let engine = &self.shared.engine;
        let mut wanted = latest;
        let mut held: Vec<Held> = Vec::new();
        let mut total = 0;
        let _progress = CatchUpGuard::start(&self.shared);
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            if wanted.is_empty() || total >= MAX_CATCH_UP_EVENTS {
                break;
            }
            let earliest = engine
                .room(room_id)
                .await?
                .map(|r| r.forward_extremities)
                .unwrap_or_default();
            let latest: Vec<OwnedEventId> = wanted
                .iter()
                .take(super::protocol::MAX_IDS_PER_REQUEST)
                .cloned()
                .collect();
            let request = FedRequest::GetMissingEvents {
                room_id: room_id.to_owned(),
                earliest,
                latest,
                limit: MAX_MISSING_EVENTS,
            };
            let FedResponse::Events { pdus, event_ids } = self.request(peer, request).await? else {
                return Err(NodeError::Network(
                    "unexpected answer to get_missing_events".into(),
                ));
            };
            let known: HashSet<&OwnedEventId> = held.iter().map(|h| &h.id).collect();
            let fresh: Vec<(String, OwnedEventId)> = pdus
                .into_iter()
                .zip(event_ids)
                .filter(|(_, id)| !known.contains(id))
                .collect();
            if fresh.is_empty() {
                break;
            }
            total += fresh.len();
            self.shared.catch_up.lock().expect("not poisoned").fetched += fresh.len();
            self.changed();
            for (pdu, id) in fresh {
                let depth = serde_json::from_str::<serde_json::Value>(&pdu)
                    .ok()
                    .and_then(|v| v["depth"].as_u64())
                    .unwrap_or(u64::MAX);
                held.push(Held {
                    depth,
                    id,
                    pdu: pdu.into_bytes(),
                });
            }
            held.sort_by_key(|h| h.depth);
            let (still_held, missing) = self.ingest_held(held).await?;
            held = still_held;
            wanted = missing;
        }
        self.changed();
        Ok(total)
    }

    /// Ingests `held` (depth order) in one batch, in passes while that makes progress. Returns
    /// the PDUs that still lack something, and the ids to ask for next: what the engine reported
    /// missing, or — while the room itself is unknown here — the prev_events of the held PDUs;
    /// minus what is already held.
    async fn ingest_held(
        &self,
        mut held: Vec<Held>,
    ) -> Result<(Vec<Held>, Vec<OwnedEventId>), NodeError> {
        loop {
            let refs: Vec<&[u8]> = held.iter().map(|h| h.pdu.as_slice()).collect();
            let results = self.shared.engine.receive_batch(&refs).await?;
            let before = held.len();
            let mut still = Vec::new();
            let mut missing = Vec::new();
            for (h, result) in held.into_iter().zip(results) {
                match result {
                    Ok(Received {
                        outcome: Outcome::MissingEvents(ids),
                        ..
                    }) => {
                        missing.extend(ids);
                        still.push(h);
                    }
                    Err(IngestError::UnknownRoom(_)) => {
                        let v: serde_json::Value =
                            serde_json::from_slice(&h.pdu).unwrap_or_default();
                        let prevs = v["prev_events"].as_array().cloned().unwrap_or_default();
                        missing.extend(
                            prevs
                                .iter()
                                .filter_map(|p| p.as_str())
                                .filter_map(|p| OwnedEventId::try_from(p).ok()),
                        );
                        still.push(h);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "catch-up event refused"),
                }
            }
            held = still;
            // Another pass helps only if this one stored something the rest may depend on.
            if held.is_empty() || held.len() == before {
                let held_ids: HashSet<&OwnedEventId> = held.iter().map(|h| &h.id).collect();
                missing.retain(|id| !held_ids.contains(id));
                missing.sort();
                missing.dedup();
                return Ok((held, missing));
            }
        }
    }

    /// Compares forward extremities of every room with `peer` and pulls what we lack.
    async fn anti_entropy(&self, peer: PeerId) -> Result<(), NodeError> {
        for room_id in self.shared.engine.rooms().await? {
            let response = self
                .request(
                    peer,
                    FedRequest::Extremities {
                        room_id: room_id.clone(),
                    },
                )
                .await;
            let ids = match response {
                Ok(FedResponse::Extremities { event_ids }) => event_ids,
                Ok(_) | Err(NodeError::Refused(..)) => continue,
                Err(e) => return Err(e),
            };
            let mut unknown = Vec::new();
            for id in ids {
                if self.shared.engine.event(&id).await?.is_none() {
                    unknown.push(id);
                }
            }
            if !unknown.is_empty() {
                let n = self.catch_up(peer, &room_id, unknown).await?;
                tracing::info!(%peer, %room_id, events = n, "anti-entropy caught up");
            }
        }
        Ok(())
    }

    /// Answers a peer's request.
    async fn answer(&self, peer: PeerId, request: FedRequest) -> FedResponse {
        use FedErrorCode::*;
        if let Err(e) = request.check_bounds() {
            tracing::warn!(%peer, reason = %e, "oversized request refused");
            return FedResponse::error(BadRequest, e);
        }
        let engine = &self.shared.engine;
        let result: Result<FedResponse, NodeError> = async {
            Ok(match request {
                FedRequest::GetEvent { event_id } => match engine.event(&event_id).await? {
                    Some(ev) => FedResponse::Event {
                        pdu: ev.pdu.json.get().to_owned(),
                    },
                    None => FedResponse::error(NotFound, "no such event"),
                },
                FedRequest::GetMissingEvents {
                    room_id,
                    earliest,
                    latest,
                    limit,
                } => {
                    let limit = limit.min(MAX_MISSING_EVENTS) as usize;
                    let events = engine
                        .missing_events(&room_id, &earliest, &latest, limit)
                        .await?;
                    FedResponse::Events {
                        pdus: events.iter().map(|e| e.pdu.json.get().to_owned()).collect(),
                        event_ids: events.iter().map(|e| e.pdu.event_id.clone()).collect(),
                    }
                }
                FedRequest::Extremities { room_id } => match engine.room(&room_id).await? {
                    Some(room) => FedResponse::Extremities {
                        event_ids: room.forward_extremities,
                    },
                    None => FedResponse::error(NotFound, "room unknown here"),
                },
                FedRequest::MakeJoin { room_id, user_id } => {
                    let origin_ok = ServerName::try_from(user_id.server_name())
                        .ok()
                        .map(|s| s.peer_id())
                        == Some(peer);
                    if !origin_ok {
                        return Ok(FedResponse::error(
                            Forbidden,
                            "a peer asks to join only for its own users",
                        ));
                    }
                    let content = json!({"membership": "join"});
                    match engine
                        .template(
                            &room_id,
                            &user_id,
                            "m.room.member",
                            Some(user_id.as_str()),
                            &content,
                        )
                        .await
                    {
                        Ok(template) => FedResponse::JoinTemplate { room_id, template },
                        Err(IngestError::UnknownRoom(_)) => {
                            FedResponse::error(NotFound, "room unknown here")
                        }
                        Err(e) => FedResponse::error(BadRequest, e.to_string()),
                    }
                }
                FedRequest::SendJoin { pdu } => match engine.receive(pdu.as_bytes()).await {
                    Ok(Received {
                        outcome: Outcome::Accepted { .. } | Outcome::Duplicate,
                        room_id,
                        event_id,
                    }) => {
                        self.command(Command::Publish {
                            room_id,
                            pdu: pdu.into_bytes(),
                            event_id: Some(event_id.clone()),
                        })?;
                        tracing::info!(%peer, %event_id, "remote join accepted");
                        self.changed();
                        FedResponse::Ok
                    }
                    Ok(Received { outcome, .. }) => {
                        FedResponse::error(Forbidden, format!("{outcome:?}"))
                    }
                    Err(e) => FedResponse::error(BadRequest, e.to_string()),
                },
                FedRequest::Invite {
                    room_version,
                    pdu,
                    room_state,
                } => {
                    self.accept_invite(peer, &room_version, &pdu, &room_state)
                        .await?
                }
            })
        }
        .await;
        result.unwrap_or_else(|e| FedResponse::error(Internal, e.to_string()))
    }

    async fn accept_invite(
        &self,
        peer: PeerId,
        room_version: &RoomVersionId,
        pdu: &str,
        room_state: &[String],
    ) -> Result<FedResponse, NodeError> {
        use FedErrorCode::*;
        let ev = match verify_standalone(pdu.as_bytes(), room_version) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "invalid invite refused");
                return Ok(FedResponse::error(BadRequest, e.to_string()));
            }
        };
        let membership = serde_json::from_str::<serde_json::Value>(ev.content.get())
            .ok()
            .and_then(|c| c["membership"].as_str().map(str::to_owned));
        let invitee = ev
            .state_key
            .as_deref()
            .and_then(|k| OwnedUserId::try_from(k).ok());
        let Some(invitee) = invitee.filter(|_| {
            ev.kind.to_string() == "m.room.member" && membership.as_deref() == Some("invite")
        }) else {
            return Ok(FedResponse::error(BadRequest, "not an invite"));
        };
        if ServerName::try_from(invitee.server_name()).ok() != Some(self.server_name()) {
            return Ok(FedResponse::error(
                Forbidden,
                "the invitee is not on this server",
            ));
        }
        let invite = Invite {
            room_id: ev.room_id.clone(),
            room_version: room_version.clone(),
            event_id: ev.event_id.clone(),
            sender: ev.sender.clone(),
            invitee,
            from: peer,
            room_state: room_state
                .iter()
                .filter_map(|e| stripped_state_event(e, &ev.room_id))
                .collect(),
        };
        // Durable before we say Ok: the invite must survive a restart.
        let record = InviteRecord::from(&invite);
        let mut batch = WriteBatch::new();
        batch.put(
            Table::Invites,
            invite.event_id.as_bytes(),
            serde_json::to_vec(&record).expect("serialises"),
        );
        self.shared.engine.store().write(batch).await?;
        let mut invites = self.shared.invites.lock().expect("invites lock");
        if !invites.iter().any(|i| i.event_id == invite.event_id) {
            invites.push(invite);
        }
        drop(invites);
        self.changed();
        Ok(FedResponse::Ok)
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

/// The certificate of the WebRTC-direct listener, kept in the store: its hash is part of the
/// node's address (`/certhash/…`), which browsers are given once and keep.
#[cfg(not(target_arch = "wasm32"))]
async fn webrtc_certificate(
    store: &dyn crate::store::Store,
) -> Result<libp2p_webrtc::tokio::Certificate, NodeError> {
    use libp2p_webrtc::tokio::Certificate;
    const KEY: &[u8] = b"webrtc_certificate";
    let bad = |e: String| crate::store::StoreError::Corrupt(format!("WebRTC certificate: {e}"));
    if let Some(pem) = store.get(Table::Meta, KEY).await? {
        let pem = String::from_utf8(pem).map_err(|e| bad(e.to_string()))?;
        return Ok(Certificate::from_pem(&pem).map_err(|e| bad(e.to_string()))?);
    }
    let cert = Certificate::generate(&mut rand_webrtc::rng()).map_err(|e| bad(e.to_string()))?;
    let mut batch = WriteBatch::new();
    batch.put(Table::Meta, KEY, cert.serialize_pem());
    store.write(batch).await?;
    Ok(cert)
}

async fn build_swarm(
    identity: &Identity,
    with_mdns: bool,
    #[cfg(not(target_arch = "wasm32"))] webrtc_cert: libp2p_webrtc::tokio::Certificate,
) -> Result<Swarm<Behaviour>, String> {
    // QUIC brings rustls with aws-lc-rs and WebRTC brings ring: name the provider, or WebRTC
    // handshakes fail for want of one (installing twice is harmless).
    #[cfg(not(target_arch = "wasm32"))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let gossip_config = gossipsub::ConfigBuilder::default()
        // PDUs are signed by their origin already; gossipsub's own signing would halve
        // throughput. The message id is the hash of the content, so duplicates are dropped.
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(|m: &gossipsub::Message| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            m.data.hash(&mut h);
            m.topic.hash(&mut h);
            gossipsub::MessageId::from(h.finish().to_be_bytes().to_vec())
        })
        .validate_messages()
        .max_transmit_size(crate::engine::pdu::MAX_PDU_BYTES + 1024)
        .heartbeat_interval(Duration::from_millis(500))
        .build()
        .map_err(|e| e.to_string())?;
    let fed = || {
        request_response::cbor::Behaviour::new(
            [(
                StreamProtocol::new(FED_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
        )
    };
    let identify = |key: &libp2p::identity::Keypair| {
        identify::Behaviour::new(identify::Config::new("/hyphae/1".into(), key.public()))
    };
    let gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)?;

    #[cfg(not(target_arch = "wasm32"))]
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity.libp2p_keypair().clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_quic()
        .with_other_transport(|key| libp2p_webrtc::tokio::Transport::new(key.clone(), webrtc_cert))
        .map_err(|e| e.to_string())?
        .with_dns()
        .map_err(|e| e.to_string())?
        .with_websocket(noise::Config::new, yamux::Config::default)
        .await
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let mdns = if with_mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                gossipsub,
                fed: fed(),
                identify: identify(key),
                ping: ping::Behaviour::default(),
                relay: relay::Behaviour::new(peer_id, relay_config()),
                rendezvous: rendezvous::server::Behaviour::new(
                    rendezvous::server::Config::default(),
                ),
                mdns: mdns.into(),
                kad: {
                    let config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                    let mut kad = kad::Behaviour::with_config(
                        peer_id,
                        kad::store::MemoryStore::new(peer_id),
                        config,
                    );
                    // Nodes are reachable: answer DHT queries from the start.
                    kad.set_mode(Some(kad::Mode::Server));
                    kad
                },
            })
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();

    #[cfg(target_arch = "wasm32")]
    let swarm = {
        let _ = with_mdns;
        libp2p::SwarmBuilder::with_existing_identity(identity.libp2p_keypair().clone())
            .with_wasm_bindgen()
            .with_other_transport(|key| {
                use libp2p::core::{upgrade::Version, Transport};
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    libp2p::websocket_websys::Transport::default()
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .boxed(),
                )
            })
            .map_err(|e| e.to_string())?
            // WebRTC-direct: what a page served over https can dial without a TLS certificate
            // on the node (its own certificate hash is in the address).
            .with_other_transport(|key| {
                libp2p::webrtc_websys::Transport::new(libp2p::webrtc_websys::Config::new(key))
            })
            .map_err(|e| e.to_string())?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| e.to_string())?
            .with_behaviour(|key, relay_client| Behaviour {
                gossipsub,
                fed: fed(),
                identify: identify(key),
                ping: ping::Behaviour::default(),
                relay_client,
                rendezvous: libp2p::rendezvous::client::Behaviour::new(key.clone()),
            })
            .map_err(|e| e.to_string())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build()
    };
    Ok(swarm)
}

/// A peer to keep connected to.
struct Bootstrap {
    addr: Multiaddr,
    peer: Option<PeerId>,
    backoff: Backoff,
}

impl Bootstrap {
    fn new(addr: Multiaddr) -> Self {
        let peer = addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        });
        Self {
            addr,
            peer,
            backoff: Backoff::default(),
        }
    }
}

/// Redial pacing: 1 s after a failure, doubling to at most 15 s, back to 1 s once connected.
/// (Long exponential backoffs left earlier homeservers unreachable for minutes after an outage.)
#[derive(Debug)]
pub struct Backoff {
    next: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(15);

    /// Whether an attempt may be made at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    /// Records an attempt at `now`; the next is allowed after the current delay, which doubles.
    pub fn attempted(&mut self, now: Instant) {
        self.next = Some(now + self.delay);
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    /// A connection succeeded: the next failure starts again from the shortest delay.
    pub fn reset(&mut self) {
        self.next = None;
        self.delay = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: None,
            delay: Self::FIRST,
        }
    }
}

/// A token bucket per peer for inbound requests.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens
            + now.duration_since(self.at).as_secs_f64() * REQUESTS_PER_SECOND)
            .min(2.0 * REQUESTS_PER_SECOND);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct SwarmDriver {
    swarm: Swarm<Behaviour>,
    node: std::sync::Weak<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    pending: HashMap<request_response::OutboundRequestId, PendingRequest>,
    /// Requests for peers we had no address for, waiting on a Kademlia lookup of that peer.
    #[cfg(not(target_arch = "wasm32"))]
    lookups: HashMap<PeerId, Lookup>,
    addrs: watch::Sender<Vec<Multiaddr>>,
    peers: watch::Sender<usize>,
    bootstrap: Vec<Bootstrap>,
    offline: bool,
    /// Gossip that could not go out yet (no subscribed peer, queues full), retried on heartbeat.
    unpublished: Vec<(OwnedRoomId, Vec<u8>, Option<OwnedEventId>)>,
    buckets: HashMap<PeerId, Bucket>,
    /// Relay circuit addresses to listen on, and the listeners currently holding reservations.
    relay_listens: Vec<Multiaddr>,
    relay_listeners: HashMap<libp2p::core::transport::ListenerId, Multiaddr>,
    connections: HashMap<libp2p::swarm::ConnectionId, Connection>,
}

impl SwarmDriver {
    fn node(&self) -> Option<P2pNode> {
        self.node.upgrade().map(|shared| P2pNode { shared })
    }

    async fn run(mut self, config: NodeConfig, rooms: Vec<OwnedRoomId>) {
        for addr in &config.listen {
            if addr
                .iter()
                .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
            {
                // A reservation on a relay: asked for once we are connected to the relay (and
                // again after every reconnection), not raced against the bootstrap dial.
                self.relay_listens.push(addr.clone());
            } else if let Err(e) = self.swarm.listen_on(addr.clone()) {
                tracing::error!(%addr, error = %e, "cannot listen");
            }
        }
        for room in rooms {
            self.subscribe(&room);
        }
        self.redial_bootstrap();
        let mut anti_entropy = Interval::new(config.anti_entropy_every);
        let mut retry = Interval::new(Duration::from_millis(250));
        let mut redial = Interval::new(Duration::from_millis(250));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.on_command(c),
                },
                _ = anti_entropy.tick() => {
                    self.discover_peers();
                    if let Some(node) = self.node() {
                        for peer in self.swarm.connected_peers().copied().collect::<Vec<_>>() {
                            let node = node.clone();
                            rt::spawn(async move {
                                if let Err(e) = node.anti_entropy(peer).await {
                                    tracing::debug!(%peer, error = %e, "anti-entropy round failed");
                                }
                            });
                        }
                    }
                }
                _ = retry.tick() => self.retry_unpublished(),
                _ = redial.tick() => {
                    self.redial_bootstrap();
                    #[cfg(not(target_arch = "wasm32"))]
                    self.expire_lookups();
                }
            }
        }
        tracing::info!("swarm stopped");
    }

    /// Registers this peer's external addresses at every connected bootstrap node (browser only:
    /// native nodes are reached through their listen addresses).
    fn register_at_rendezvous(&mut self) {
        #[cfg(target_arch = "wasm32")]
        for peer in self.connected_bootstrap_peers() {
            if self.swarm.external_addresses().next().is_none() {
                return;
            }
            let namespace = libp2p::rendezvous::Namespace::from_static(RENDEZVOUS_NAMESPACE);
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .rendezvous
                .register(namespace, peer, None)
            {
                tracing::debug!(%peer, error = ?e, "rendezvous registration not sent");
            }
        }
    }

    /// Asks every connected bootstrap node which other peers registered there (browser only).
    fn discover_peers(&mut self) {
        #[cfg(target_arch = "wasm32")]
        for peer in self.connected_bootstrap_peers() {
            let namespace = libp2p::rendezvous::Namespace::from_static(RENDEZVOUS_NAMESPACE);
            self.swarm
                .behaviour_mut()
                .rendezvous
                .discover(Some(namespace), None, None, peer);
        }
    }

    #[cfg(target_arch = "wasm32")]
    fn connected_bootstrap_peers(&self) -> Vec<PeerId> {
        self.bootstrap
            .iter()
            .filter_map(|b| b.peer)
            .filter(|p| self.swarm.is_connected(p))
            .collect()
    }

    /// Listens through `relay` on every configured circuit address it serves, unless already.
    fn reserve_on(&mut self, relay: PeerId) {
        for addr in self.relay_listens.clone() {
            let serves = addr
                .iter()
                .any(|p| p == libp2p::multiaddr::Protocol::P2p(relay));
            if serves && !self.relay_listeners.values().any(|a| *a == addr) {
                match self.swarm.listen_on(addr.clone()) {
                    Ok(id) => {
                        self.relay_listeners.insert(id, addr);
                    }
                    Err(e) => tracing::warn!(%addr, error = %e, "cannot listen through the relay"),
                }
            }
        }
    }

    fn subscribe(&mut self, room: &RoomId) {
        for topic in [room_topic(room), edu_topic(room)] {
            let topic = gossipsub::IdentTopic::new(topic);
            if let Err(e) = self.swarm.behaviour_mut().gossipsub.subscribe(&topic) {
                tracing::error!(%room, error = ?e, "cannot subscribe");
            }
        }
    }

    fn dial(&mut self, addr: Multiaddr) {
        if self.offline {
            return;
        }
        if let Err(e) = self.swarm.dial(addr.clone()) {
            tracing::debug!(%addr, error = %e, "dial failed");
        }
    }

    /// Keeps bootstrap peers connected; dials every few seconds while a connection is missing.
    fn redial_bootstrap(&mut self) {
        let now = Instant::now();
        for i in 0..self.bootstrap.len() {
            let b = &self.bootstrap[i];
            let connected = b.peer.is_some_and(|p| self.swarm.is_connected(&p));
            if !connected && b.backoff.due(now) {
                let addr = b.addr.clone();
                self.bootstrap[i].backoff.attempted(now);
                self.dial(addr);
            }
        }
    }

    fn publish(&mut self, room_id: OwnedRoomId, pdu: Vec<u8>, event_id: Option<OwnedEventId>) {
        let topic = gossipsub::IdentTopic::new(room_topic(&room_id));
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, pdu.clone())
        {
            Ok(_) => {
                if let (Some(id), Some(node)) = (event_id, self.node()) {
                    node.shared
                        .delivered
                        .lock()
                        .expect("not poisoned")
                        .insert(id);
                    node.changed();
                }
            }
            Err(gossipsub::PublishError::Duplicate) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::AllQueuesFull(_)) => {
                self.unpublished.push((room_id, pdu, event_id));
            }
            Err(e) => tracing::warn!(%room_id, error = ?e, "publish failed"),
        }
    }

    fn retry_unpublished(&mut self) {
        if self.unpublished.is_empty() || self.swarm.connected_peers().next().is_none() {
            return;
        }
        // Anti-entropy delivers these anyway; gossip is the fast path, so a bounded retry suffices.
        let queued = std::mem::take(&mut self.unpublished);
        let keep_from = queued.len().saturating_sub(10_000);
        for (room, pdu, event_id) in queued.into_iter().skip(keep_from) {
            self.publish(room, pdu, event_id);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish {
                room_id,
                pdu,
                event_id,
            } => self.publish(room_id, pdu, event_id),
            Command::PublishEdu { room_id, edu } => {
                let topic = gossipsub::IdentTopic::new(edu_topic(&room_id));
                // Typing and receipts are worth nothing late: no queue, no retry.
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(topic, edu) {
                    tracing::debug!(%room_id, error = ?e, "EDU not published");
                }
            }
            Command::Subscribe(room) => self.subscribe(&room),
            Command::Request {
                peer,
                request,
                reply,
            } => {
                if self.offline {
                    let _ = reply.send(Err("offline".into()));
                    return;
                }
                self.send_request(peer, request, reply, true);
            }
            Command::Respond { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .fed
                    .send_response(channel, response);
            }
            Command::Validate {
                id,
                source,
                acceptance,
            } => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
            }
            Command::Dial(addr) => self.dial(addr),
            Command::SetOffline(offline) => {
                self.offline = offline;
                if offline {
                    for peer in self.swarm.connected_peers().copied().collect::<Vec<_>>() {
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                } else {
                    for b in &mut self.bootstrap {
                        b.backoff.reset();
                    }
                    self.redial_bootstrap();
                }
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Connections(reply) => {
                let _ = reply.send(self.connections.values().cloned().collect());
            }
            // Handled by the run loop.
            Command::Shutdown => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(addr) = self.relay_listeners.remove(&listener_id) {
                    tracing::info!(%addr, ?reason, "relay reservation ended");
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                // A native node's listen addresses are where browsers reach it; the relay server
                // only serves reservations once it has an external address.
                #[cfg(not(target_arch = "wasm32"))]
                self.swarm.add_external_address(address.clone());
                // A tab's relayed address is how other tabs reach it: announce it at the
                // rendezvous points.
                #[cfg(target_arch = "wasm32")]
                if address
                    .iter()
                    .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
                {
                    self.swarm.add_external_address(address.clone());
                    self.register_at_rendezvous();
                }
                self.addrs.send_modify(|a| a.push(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                if self.offline {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                self.connections.insert(
                    connection_id,
                    Connection {
                        peer: peer_id,
                        address: endpoint.get_remote_address().clone(),
                    },
                );
                tracing::info!(peer = %peer_id, address = %endpoint.get_remote_address(), "connected");
                self.reserve_on(peer_id);
                if self.bootstrap.iter().any(|b| b.peer == Some(peer_id)) {
                    self.register_at_rendezvous();
                    self.discover_peers();
                }
                for b in self
                    .bootstrap
                    .iter_mut()
                    .filter(|b| b.peer == Some(peer_id))
                {
                    b.backoff.reset();
                }
                self.peers
                    .send_replace(self.swarm.connected_peers().count());
                if let Some(node) = self.node() {
                    rt::spawn(async move {
                        if let Err(e) = node.anti_entropy(peer_id).await {
                            tracing::debug!(peer = %peer_id, error = %e, "anti-entropy on connect failed");
                        }
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                connection_id,
                ..
            } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    tracing::info!(peer = %peer_id, "disconnected");
                    self.peers
                        .send_replace(self.swarm.connected_peers().count());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let Some(node) = self.node() else { return };
                if let Some(room) = edu_topic_room(message.topic.as_str()) {
                    let verdict = match Edu::verify(&message.data) {
                        Ok(edu) if edu.room_id() == room => {
                            let _ = node.shared.edus.send(edu);
                            gossipsub::MessageAcceptance::Accept
                        }
                        Ok(_) => {
                            tracing::warn!(peer = %propagation_source, "EDU for another room");
                            gossipsub::MessageAcceptance::Reject
                        }
                        Err(e) => {
                            tracing::warn!(peer = %propagation_source, error = %e, "invalid EDU");
                            gossipsub::MessageAcceptance::Reject
                        }
                    };
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            verdict,
                        );
                    return;
                }
                if topic_room(message.topic.as_str()).is_none() {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Reject,
                        );
                    return;
                }
                let _ = node.shared.inbound.send(Inbound {
                    pdu: message.data,
                    from: propagation_source,
                    gossip_id: Some(message_id),
                    attempts: 0,
                });
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
                ..
            })) => {
                self.retry_unpublished();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Fed(event)) => self.on_fed_event(event),
            #[cfg(target_arch = "wasm32")]
            SwarmEvent::Behaviour(BehaviourEvent::Rendezvous(
                libp2p::rendezvous::client::Event::Discovered { registrations, .. },
            )) => {
                let me = *self.swarm.local_peer_id();
                for registration in registrations {
                    let peer = registration.record.peer_id();
                    if peer == me || self.swarm.is_connected(&peer) {
                        continue;
                    }
                    for addr in registration.record.addresses() {
                        tracing::info!(%peer, %addr, "found through rendezvous");
                        self.dial(addr.clone().with_p2p(peer).unwrap_or_else(|a| a));
                    }
                }
            }
            #[cfg(not(target_arch = "wasm32"))]
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.swarm.is_connected(&peer) {
                        tracing::info!(%peer, %addr, "found on the local network");
                        self.dial(addr.with_p2p(peer).unwrap_or_else(|a| a));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                #[cfg(not(target_arch = "wasm32"))]
                let dht_peer = info.protocols.contains(&StreamProtocol::new(KAD_PROTOCOL));
                for addr in info.listen_addrs {
                    #[cfg(not(target_arch = "wasm32"))]
                    if dht_peer {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            #[cfg(not(target_arch = "wasm32"))]
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            _ => {}
        }
    }

    /// Sends a request (dialling the peer if needed). `may_look_up`: if the dial fails for
    /// want of an address, find the peer through Kademlia and try once more.
    fn send_request(
        &mut self,
        peer: PeerId,
        request: FedRequest,
        reply: RequestReply,
        may_look_up: bool,
    ) {
        let keep = (may_look_up && cfg!(not(target_arch = "wasm32"))).then(|| request.clone());
        let id = self.swarm.behaviour_mut().fed.send_request(&peer, request);
        self.pending.insert(
            id,
            PendingRequest {
                peer,
                request: keep,
                reply,
            },
        );
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn on_kad_event(&mut self, event: kad::Event) {
        let result = match event {
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            } => result,
            kad::Event::RoutingUpdated { .. } => return self.retry_lookups(),
            _ => return,
        };
        let (key, peers) = match result {
            Ok(ok) => (ok.key, ok.peers),
            Err(kad::GetClosestPeersError::Timeout { key, peers }) => (key, peers),
        };
        for info in &peers {
            for addr in &info.addrs {
                self.swarm.add_peer_address(info.peer_id, addr.clone());
            }
        }
        let Ok(target) = PeerId::from_bytes(&key) else {
            return;
        };
        let found = peers
            .iter()
            .any(|p| p.peer_id == target && !p.addrs.is_empty());
        tracing::debug!(peer = %target, found, "Kademlia lookup finished");
        if !found {
            if let Some(lookup) = self.lookups.get_mut(&target) {
                lookup.in_flight = false;
            }
            self.expire_lookups();
            return;
        }
        let Some(lookup) = self.lookups.remove(&target) else {
            return;
        };
        for (request, reply) in lookup.waiting {
            self.send_request(target, request, reply, false);
        }
    }

    /// Runs the unfinished lookups again (the routing table changed).
    #[cfg(not(target_arch = "wasm32"))]
    fn retry_lookups(&mut self) {
        let idle: Vec<PeerId> = self
            .lookups
            .iter()
            .filter(|(_, l)| !l.in_flight)
            .map(|(p, _)| *p)
            .collect();
        for peer in idle {
            self.swarm.behaviour_mut().kad.get_closest_peers(peer);
            if let Some(l) = self.lookups.get_mut(&peer) {
                l.in_flight = true;
            }
        }
    }

    /// Fails the requests whose peer could not be found in time.
    #[cfg(not(target_arch = "wasm32"))]
    fn expire_lookups(&mut self) {
        let now = Instant::now();
        let expired: Vec<PeerId> = self
            .lookups
            .iter()
            .filter(|(_, l)| !l.in_flight && l.deadline <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            if let Some(lookup) = self.lookups.remove(&peer) {
                tracing::info!(%peer, "no address found for peer");
                for (_, reply) in lookup.waiting {
                    let _ = reply.send(Err(format!("no address known for {peer}")));
                }
            }
        }
    }

    fn on_fed_event(&mut self, event: request_response::Event<FedRequest, FedResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let allowed = self
                    .buckets
                    .entry(peer)
                    .or_insert(Bucket {
                        tokens: 2.0 * REQUESTS_PER_SECOND,
                        at: Instant::now(),
                    })
                    .take();
                if !allowed {
                    tracing::warn!(%peer, "request rate exceeded; throttling");
                    let response =
                        FedResponse::error(FedErrorCode::LimitExceeded, "too many requests");
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .fed
                        .send_response(channel, response);
                    return;
                }
                let Some(node) = self.node() else { return };
                rt::spawn(async move {
                    let response = node.answer(peer, request).await;
                    let _ = node.command(Command::Respond { channel, response });
                });
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(p) = self.pending.remove(&request_id) {
                    let _ = p.reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                tracing::debug!(%peer, error = %error, "request failed");
                let Some(p) = self.pending.remove(&request_id) else {
                    return;
                };
                #[cfg(not(target_arch = "wasm32"))]
                if let (request_response::OutboundFailure::DialFailure, Some(request)) =
                    (&error, p.request)
                {
                    // Nobody told us where this peer is: ask the DHT.
                    let lookup = self.lookups.entry(p.peer).or_insert_with(|| Lookup {
                        waiting: Vec::new(),
                        deadline: Instant::now() + LOOKUP_PATIENCE,
                        in_flight: false,
                    });
                    lookup.waiting.push((request, p.reply));
                    self.retry_lookups();
                    return;
                }
                let _ = p.reply.send(Err(error.to_string()));
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// Ingests gossip in arrival order, a burst at a time in one commit, and reports each
/// message's verdict to gossipsub (so invalid senders are scored down).
async fn ingest_loop(node: std::sync::Weak<Shared>, mut inbound: mpsc::UnboundedReceiver<Inbound>) {
    while let Some(first) = inbound.recv().await {
        let mut burst = vec![first];
        while burst.len() < 200 {
            match inbound.try_recv() {
                Ok(next) => burst.push(next),
                Err(_) => break,
            }
        }
        let Some(shared) = node.upgrade() else { return };
        let node = P2pNode { shared };
        let refs: Vec<&[u8]> = burst.iter().map(|i| i.pdu.as_slice()).collect();
        let results = match node.shared.engine.receive_batch(&refs).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store write failed; gossip dropped (anti-entropy will refetch)");
                continue;
            }
        };
        let mut stored = false;
        for (item, result) in burst.into_iter().zip(results) {
            use gossipsub::MessageAcceptance::*;
            let acceptance = match result {
                Ok(Received {
                    outcome: Outcome::Accepted { .. } | Outcome::SoftFailed { .. },
                    ..
                }) => {
                    stored = true;
                    Accept
                }
                Ok(Received {
                    outcome: Outcome::Duplicate,
                    ..
                }) => Ignore,
                Ok(Received {
                    outcome: Outcome::Rejected { reason },
                    event_id,
                    ..
                }) => {
                    stored = true;
                    tracing::warn!(peer = %item.from, %event_id, %reason, "peer sent an unauthorised event");
                    Reject
                }
                Ok(Received {
                    outcome: Outcome::MissingEvents(ids),
                    room_id,
                    ..
                }) => {
                    if item.attempts < 3 {
                        let node = node.clone();
                        let again = Inbound {
                            pdu: item.pdu.clone(),
                            from: item.from,
                            gossip_id: None,
                            attempts: item.attempts + 1,
                        };
                        rt::spawn(async move {
                            match node.catch_up(again.from, &room_id, ids).await {
                                Ok(_) => {
                                    let _ = node.shared.inbound.send(again);
                                }
                                Err(e) => tracing::debug!(error = %e, "catch-up failed"),
                            }
                        });
                    }
                    Ignore
                }
                Err(IngestError::UnknownRoom(_)) => Ignore,
                Err(e) => {
                    tracing::warn!(peer = %item.from, error = %e, "peer sent an invalid event");
                    Reject
                }
            };
            if let Some(id) = item.gossip_id {
                let _ = node.command(Command::Validate {
                    id,
                    source: item.from,
                    acceptance,
                });
            }
        }
        if stored {
            node.changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_bound_and_resets_on_success() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.due(t0));
        let mut at = t0;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            b.attempted(at);
            let next = b.next.unwrap();
            assert!(!b.due(next - Duration::from_millis(1)));
            assert!(b.due(next));
            gaps.push((next - at).as_secs());
            at = next;
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 15, 15, 15, 15]);
        b.reset();
        assert!(b.due(at));
        b.attempted(at);
        assert_eq!((b.next.unwrap() - at).as_secs(), 1);
    }
}
