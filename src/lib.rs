//! Hyphae: a Matrix homeserver that runs in a browser tab (wasm32, IndexedDB) and natively
//! (`hyphae-node`, redb), exchanging signed room events with peers over libp2p.
//!
//! Layers, bottom up: [`store`] (ordered key-value storage, three backends), [`identity`] (one
//! ed25519 key per peer), [`engine`] (the room engine: checks, DAG, state, timeline), [`net`] (peers over libp2p),
//! [`api`] (the Matrix Client-Server API over both).

pub mod api;
pub mod engine;
pub mod identity;
pub mod media;
pub mod net;
pub mod rooms;
pub mod store;

#[cfg(target_arch = "wasm32")]
pub mod web;
