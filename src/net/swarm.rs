//! The swarm: behaviours and transports, the only place that knows the target's network stack.
//! Native nodes listen on TCP, QUIC, WebSocket and WebRTC-direct and serve relay, rendezvous,
//! mDNS and Kademlia; tabs dial WebSocket / WebRTC-direct and reach each other through relays.

#[cfg(not(target_arch = "wasm32"))]
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, noise, ping, request_response, yamux, StreamProtocol, Swarm};
#[cfg(not(target_arch = "wasm32"))]
use libp2p::{kad, mdns, relay, rendezvous, tcp};

use super::protocol::{FedRequest, FedResponse, FED_PROTOCOL};
use super::rt::Duration;
use crate::identity::Identity;
#[cfg(not(target_arch = "wasm32"))]
use crate::store::{Table, WriteBatch};

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

/// Connections a node keeps: in total, per peer, and being set up (handshakes cost us CPU).
#[cfg(not(target_arch = "wasm32"))]
pub const MAX_CONNECTIONS: u32 = 1024;
#[cfg(target_arch = "wasm32")]
pub const MAX_CONNECTIONS: u32 = 128;
pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;
pub const MAX_PENDING_INCOMING: u32 = 64;
/// Requests in flight on one connection, both ways (libp2p's default; past it new streams fail
/// and the peer's connection may be closed, so it stays above what our own bursts reach).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

fn connection_limits() -> libp2p::connection_limits::Behaviour {
    use libp2p::connection_limits::{Behaviour, ConnectionLimits};
    Behaviour::new(
        ConnectionLimits::default()
            .with_max_established(Some(MAX_CONNECTIONS))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING)),
    )
}

/// A native node: the room protocols plus the services browsers rely on.
#[cfg(not(target_arch = "wasm32"))]
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: libp2p::connection_limits::Behaviour,
    pub(super) fed: request_response::cbor::Behaviour<FedRequest, FedResponse>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    /// Browsers reach each other through circuits on native nodes.
    pub(super) relay: relay::Behaviour,
    /// Browsers register and discover each other here.
    pub(super) rendezvous: rendezvous::server::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    /// Finds the addresses of peers nobody introduced (a server name is a PeerId).
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// Hyphae's own DHT, apart from the IPFS one.
#[cfg(not(target_arch = "wasm32"))]
pub(super) const KAD_PROTOCOL: &str = "/hyphae/kad/1";

/// A browser peer: the room protocols over connections it dials, and relay circuits through
/// native nodes to reach (and be reached by) other browsers.
#[cfg(target_arch = "wasm32")]
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: libp2p::connection_limits::Behaviour,
    pub(super) fed: request_response::cbor::Behaviour<FedRequest, FedResponse>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) relay_client: libp2p::relay::client::Behaviour,
    /// Registers this tab at its bootstrap nodes' rendezvous points and discovers other tabs.
    pub(super) rendezvous: libp2p::rendezvous::client::Behaviour,
}

/// The certificate of the WebRTC-direct listener, kept in the store: its hash is part of the
/// node's address (`/certhash/…`), which browsers are given once and keep.
#[cfg(not(target_arch = "wasm32"))]
pub(super) async fn webrtc_certificate(
    store: &dyn crate::store::Store,
) -> Result<libp2p_webrtc::tokio::Certificate, crate::store::StoreError> {
    use libp2p_webrtc::tokio::Certificate;
    const KEY: &[u8] = b"webrtc_certificate";
    let bad = |e: String| crate::store::StoreError::Corrupt(format!("WebRTC certificate: {e}"));
    if let Some(pem) = store.get(Table::Meta, KEY).await? {
        let pem = String::from_utf8(pem).map_err(|e| bad(e.to_string()))?;
        return Certificate::from_pem(&pem).map_err(|e| bad(e.to_string()));
    }
    let cert = Certificate::generate(&mut rand_webrtc::rng()).map_err(|e| bad(e.to_string()))?;
    let mut batch = WriteBatch::new();
    batch.put(Table::Meta, KEY, cert.serialize_pem());
    store.write(batch).await?;
    Ok(cert)
}

pub(super) async fn build_swarm(
    identity: &Identity,
    with_mdns: bool,
    #[cfg(not(target_arch = "wasm32"))] webrtc_cert: libp2p_webrtc::tokio::Certificate,
) -> Result<Swarm<Behaviour>, String> {
    // QUIC brings rustls with aws-lc-rs and WebRTC brings ring: name the provider, or WebRTC
    // handshakes fail for want of one (installing twice is harmless).
    #[cfg(not(target_arch = "wasm32"))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fed = || {
        request_response::cbor::Behaviour::with_codec(
            super::protocol::fed_codec(),
            [(
                StreamProtocol::new(FED_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(30))
                .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
        )
    };
    let identify = |key: &libp2p::identity::Keypair| {
        identify::Behaviour::new(identify::Config::new("/hyphae/1".into(), key.public()))
    };

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
                limits: connection_limits(),
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
                limits: connection_limits(),
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
