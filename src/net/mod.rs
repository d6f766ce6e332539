//! The network: the libp2p swarm and nothing else — transports, discovery, relay, the wire
//! protocol — behind a typed handle ([`driver::NetHandle`]) and a stream of inbound events
//! ([`driver::NetEvent`]). It decides nothing about rooms: what to answer, push or fetch is the
//! room service's ([`crate::rooms`]).

pub mod driver;
pub mod protocol;
pub mod rt;
mod swarm;

pub use driver::{
    Backoff, Connection, NetConfig, NetEvent, NetHandle, ReplyTo, Stopped, RENDEZVOUS_NAMESPACE,
};
