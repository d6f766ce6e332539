//! The swarm driver: one task owns the swarm and does nothing slow. The room service talks to it
//! through a [`NetHandle`] (commands with replies) and hears from it through a bounded stream of
//! [`NetEvent`]s (requests to answer, connections). It decides nothing about rooms: it dials,
//! keeps bootstrap peers connected, finds peers (rendezvous, mDNS, Kademlia), relays, and
//! rate-limits inbound requests per peer.

use std::collections::HashMap;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, request_response, Multiaddr, PeerId, Swarm};
#[cfg(not(target_arch = "wasm32"))]
use libp2p::{kad, mdns, StreamProtocol};
use tokio::sync::{mpsc, oneshot, watch};

use super::protocol::{FedErrorCode, FedRequest, FedResponse};
use super::rt::{self, Duration, Instant, Interval};
#[cfg(not(target_arch = "wasm32"))]
use super::swarm::KAD_PROTOCOL;
use super::swarm::{build_swarm, Behaviour, BehaviourEvent};
use crate::identity::Identity;

/// The rendezvous namespace Hyphae peers register under.
pub const RENDEZVOUS_NAMESPACE: &str = "hyphae";

/// Requests a peer may make per second before it is throttled (burst: twice that).
const REQUESTS_PER_SECOND: f64 = 200.0;
/// Inbound requests waiting for the room service; past this a peer is told `LimitExceeded`.
const INBOUND_QUEUE: usize = 1024;

/// What the swarm needs to start.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub start_offline: bool,
    /// How often a tab asks its rendezvous points for other tabs.
    pub discover_every: Duration,
}

/// What the swarm hands up to the room service.
pub enum NetEvent {
    /// A peer asks something; answer through [`NetHandle::respond`] with `reply`.
    Request {
        peer: PeerId,
        request: FedRequest,
        reply: ReplyTo,
    },
    /// A first connection to a peer opened.
    Connected(PeerId),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
}

/// Where the answer to one inbound request goes (opaque above the net layer).
pub struct ReplyTo(request_response::ResponseChannel<FedResponse>);

enum Command {
    Request {
        peer: PeerId,
        request: FedRequest,
        look_up: bool,
        reply: RequestReply,
    },
    Respond {
        reply: ReplyTo,
        response: FedResponse,
    },
    Dial(Multiaddr),
    SetOffline(bool),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Connections(oneshot::Sender<Vec<Connection>>),
    /// Ends the swarm: every connection closes and no command is taken after it.
    Shutdown,
}

/// The room service's handle on the swarm. Cheap to clone.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::UnboundedSender<Command>,
    listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    peer_count: watch::Receiver<usize>,
    local_peer: PeerId,
}

/// The swarm has stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the swarm has stopped")]
pub struct Stopped;

impl NetHandle {
    /// Builds the swarm for `identity` and starts driving it. `webrtc_store` keeps the native
    /// WebRTC-direct certificate (its hash is part of the node's address).
    pub async fn start(
        identity: &Identity,
        #[cfg(not(target_arch = "wasm32"))] store: &dyn crate::store::Store,
        config: NetConfig,
    ) -> Result<(Self, mpsc::Receiver<NetEvent>), String> {
        #[cfg(not(target_arch = "wasm32"))]
        let webrtc_cert = super::swarm::webrtc_certificate(store)
            .await
            .map_err(|e| e.to_string())?;
        let swarm = build_swarm(
            identity,
            config.mdns,
            #[cfg(not(target_arch = "wasm32"))]
            webrtc_cert,
        )
        .await?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(INBOUND_QUEUE);
        let (addrs_tx, listen_addrs) = watch::channel(Vec::new());
        let (peers_tx, peer_count) = watch::channel(0);
        let driver = SwarmDriver {
            swarm,
            commands: command_rx,
            events: events_tx,
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
            buckets: HashMap::new(),
            relay_listens: Vec::new(),
            relay_listeners: HashMap::new(),
            connections: HashMap::new(),
        };
        rt::spawn_supervised("swarm", driver.run(config));
        let handle = NetHandle {
            commands,
            listen_addrs,
            peer_count,
            local_peer: identity.peer_id(),
        };
        Ok((handle, events))
    }

    fn command(&self, c: Command) -> Result<(), Stopped> {
        self.commands.send(c).map_err(|_| Stopped)
    }

    /// Sends a request to `peer` and waits for the answer. `look_up`: if no address is known,
    /// ask the DHT (natively) before giving up.
    pub async fn request(
        &self,
        peer: PeerId,
        request: FedRequest,
        look_up: bool,
    ) -> Result<FedResponse, String> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Request {
            peer,
            request,
            look_up,
            reply,
        })
        .map_err(|e| e.to_string())?;
        rx.await.map_err(|_| Stopped.to_string())?
    }

    pub fn respond(&self, reply: ReplyTo, response: FedResponse) {
        // A stopped swarm has no one to answer.
        let _ = self.command(Command::Respond { reply, response });
    }

    pub fn dial(&self, addr: Multiaddr) -> Result<(), Stopped> {
        self.command(Command::Dial(addr))
    }

    pub fn set_offline(&self, offline: bool) -> Result<(), Stopped> {
        self.command(Command::SetOffline(offline))
    }

    pub fn shutdown(&self) {
        let _ = self.command(Command::Shutdown);
    }

    /// Whether the swarm task has ended (shut down, or stopped by a panic).
    pub fn is_stopped(&self) -> bool {
        self.commands.is_closed()
    }

    /// Resolves once the swarm task has ended.
    pub async fn stopped(&self) {
        self.commands.closed().await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::ConnectedPeers(tx))?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn connections(&self) -> Result<Vec<Connection>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Connections(tx))?;
        rx.await.map_err(|_| Stopped)
    }

    /// Waits until at least `n` peers are connected, for at most `timeout`.
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.peer_count.clone();
        rt::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_some_and(|r| r.is_ok())
    }

    /// The addresses the swarm listens on, once there are at least `n` (with `/p2p/<id>`).
    pub async fn listen_addrs_at_least(&self, n: usize) -> Vec<Multiaddr> {
        let mut rx = self.listen_addrs.clone();
        let addrs = rx
            .wait_for(|a| a.len() >= n)
            .await
            .map(|a| a.clone())
            .unwrap_or_default();
        self.dialable(addrs)
    }

    /// The addresses the swarm listens on right now (with `/p2p/<id>`).
    pub fn current_listen_addrs(&self) -> Vec<Multiaddr> {
        let addrs = self.listen_addrs.borrow().clone();
        self.dialable(addrs)
    }

    fn dialable(&self, addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        addrs
            .into_iter()
            .map(|a| a.with_p2p(self.local_peer).unwrap_or_else(|a| a))
            .collect()
    }
}

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
    /// Whether the bucket has refilled: forgetting it then loses nothing (a fresh one is full).
    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.duration_since(self.at).as_secs_f64() * REQUESTS_PER_SECOND
            >= 2.0 * REQUESTS_PER_SECOND
    }

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
    commands: mpsc::UnboundedReceiver<Command>,
    /// Up to the room service; bounded, so a flood of requests is refused here, not queued.
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<request_response::OutboundRequestId, PendingRequest>,
    /// Requests for peers we had no address for, waiting on a Kademlia lookup of that peer.
    #[cfg(not(target_arch = "wasm32"))]
    lookups: HashMap<PeerId, Lookup>,
    addrs: watch::Sender<Vec<Multiaddr>>,
    peers: watch::Sender<usize>,
    bootstrap: Vec<Bootstrap>,
    offline: bool,
    buckets: HashMap<PeerId, Bucket>,
    /// Relay circuit addresses to listen on, and the listeners currently holding reservations.
    relay_listens: Vec<Multiaddr>,
    relay_listeners: HashMap<libp2p::core::transport::ListenerId, Multiaddr>,
    connections: HashMap<libp2p::swarm::ConnectionId, Connection>,
}

impl SwarmDriver {
    async fn run(mut self, config: NetConfig) {
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
        self.redial_bootstrap();
        let mut discover = Interval::new(config.discover_every);
        let mut redial = Interval::new(Duration::from_millis(250));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.on_command(c),
                },
                _ = discover.tick() => self.discover_peers(),
                _ = redial.tick() => {
                    self.redial_bootstrap();
                    let now = Instant::now();
                    self.buckets.retain(|_, b| !b.is_full(now));
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

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request {
                peer,
                request,
                look_up,
                reply,
            } => {
                if self.offline {
                    let _ = reply.send(Err("offline".into()));
                    return;
                }
                self.send_request(peer, request, reply, look_up);
            }
            Command::Respond { reply, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .fed
                    .send_response(reply.0, response);
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
                // Best effort: a full queue means the service is busy, and the periodic
                // anti-entropy round reaches this peer anyway.
                let _ = self.events.try_send(NetEvent::Connected(peer_id));
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
                    let _ = self.events.try_send(NetEvent::Disconnected(peer_id));
                    self.peers
                        .send_replace(self.swarm.connected_peers().count());
                }
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
                let inbound = NetEvent::Request {
                    peer,
                    request,
                    reply: ReplyTo(channel),
                };
                if let Err(mpsc::error::TrySendError::Full(NetEvent::Request { reply, .. })) =
                    self.events.try_send(inbound)
                {
                    tracing::warn!(%peer, "request queue full; refused");
                    let response = FedResponse::error(FedErrorCode::LimitExceeded, "busy");
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .fed
                        .send_response(reply.0, response);
                }
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
