//! Peer-to-peer exchange of rooms over libp2p: the wire protocol (gossip topics and the
//! `/hyphae/fed/1` request-response protocol) and, natively, the node that runs the swarm.
//!
//! The net layer never decides anything about events: every PDU that arrives, by any path, goes
//! through the engine's receipt checks. It only moves bytes, asks for what the engine reports
//! missing, and rate-limits peers.

pub mod node;
pub mod protocol;
pub mod rt;
