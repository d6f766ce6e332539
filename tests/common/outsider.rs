//! An outsider: a bare libp2p peer with a fresh key, invited nowhere, that dials a node and tries
//! every way in — `/hyphae/fed/1` requests of every kind, and gossipsub subscriptions to the
//! topics a room could be announced on — and records everything that reaches it.

use std::time::Duration;

use futures::StreamExt;
use hyphae::net::protocol::{FedRequest, FedResponse, FED_PROTOCOL};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, noise, request_response, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

#[derive(NetworkBehaviour)]
struct Behaviour {
    fed: request_response::cbor::Behaviour<FedRequest, FedResponse>,
    gossipsub: gossipsub::Behaviour,
}

enum Command {
    Ask(FedRequest, oneshot::Sender<Result<FedResponse, String>>),
    Received(oneshot::Sender<Vec<String>>),
}

/// How an outsider answers the requests it receives (it records them either way).
pub type Answer = std::sync::Arc<dyn Fn(&FedRequest) -> FedResponse + Send + Sync>;

/// A handle on the outsider's swarm task.
pub struct Outsider {
    commands: mpsc::UnboundedSender<Command>,
    pub peer_id: PeerId,
}

impl Outsider {
    /// Dials `target` (at `addr`) and subscribes to every topic in `topics`.
    pub async fn dial(addr: Multiaddr, target: PeerId, topics: Vec<String>) -> Self {
        let key = libp2p::identity::Keypair::generate_ed25519();
        Self::dial_as(
            key,
            addr,
            target,
            topics,
            std::sync::Arc::new(|_| FedResponse::Ok),
        )
        .await
    }

    /// [`Outsider::dial`] with the key `key` (its server name) and answering with `answer`.
    pub async fn dial_as(
        key: libp2p::identity::Keypair,
        addr: Multiaddr,
        target: PeerId,
        topics: Vec<String>,
        answer: Answer,
    ) -> Self {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|key| Behaviour {
                fed: request_response::cbor::Behaviour::new(
                    [(
                        StreamProtocol::new(FED_PROTOCOL),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(20)),
                ),
                gossipsub: gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossipsub::Config::default(),
                )
                .unwrap(),
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
            .build();
        for t in topics {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&gossipsub::IdentTopic::new(t))
                .unwrap();
        }
        swarm.dial(addr).unwrap();
        let peer_id = *swarm.local_peer_id();
        let (commands, mut rx) = mpsc::unbounded_channel::<Command>();
        let (connected_tx, connected_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            let mut pending = std::collections::HashMap::new();
            let mut received: Vec<String> = Vec::new();
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::ConnectionEstablished { .. } => {
                            if let Some(tx) = connected.take() {
                                let _ = tx.send(());
                            }
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) => {
                            received.push(format!("gossip on {}: {}", message.topic, String::from_utf8_lossy(&message.data)));
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Fed(request_response::Event::Message { message, .. })) => match message {
                            request_response::Message::Request { request, channel, .. } => {
                                let response = answer(&request);
                                received.push(format!("request: {request:?}"));
                                let _ = swarm.behaviour_mut().fed.send_response(channel, response);
                            }
                            request_response::Message::Response { request_id, response } => {
                                if let Some(tx) = pending.remove(&request_id) {
                                    let _ = oneshot::Sender::send(tx, Ok(response));
                                }
                            }
                        },
                        SwarmEvent::Behaviour(BehaviourEvent::Fed(request_response::Event::OutboundFailure { request_id, error, .. })) => {
                            if let Some(tx) = pending.remove(&request_id) {
                                let _ = oneshot::Sender::send(tx, Err(error.to_string()));
                            }
                        }
                        _ => {}
                    },
                    command = rx.recv() => match command {
                        None => return,
                        Some(Command::Ask(request, tx)) => {
                            let id = swarm.behaviour_mut().fed.send_request(&target, request);
                            pending.insert(id, tx);
                        }
                        Some(Command::Received(tx)) => {
                            let _ = tx.send(received.clone());
                        }
                    },
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), connected_rx)
            .await
            .expect("outsider connects")
            .unwrap();
        Outsider { commands, peer_id }
    }

    pub async fn ask(&self, request: FedRequest) -> Result<FedResponse, String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Ask(request, tx)).unwrap();
        rx.await.unwrap()
    }

    /// Every gossip message and request that reached the outsider so far.
    pub async fn received(&self) -> Vec<String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Received(tx)).unwrap();
        rx.await.unwrap()
    }
}
