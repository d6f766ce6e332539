//! The room service: everything the node decides about rooms on behalf of its peers and its
//! clients — who may see what, what peers are answered, where new events and EDUs are pushed,
//! catch-up, anti-entropy, invites, joins, group commit. It drives the swarm in [`crate::net`]
//! through a typed handle and never touches libp2p types beyond peer ids.

pub mod visibility;
