//! Browser peers (headless Chromium, WebSocket and WebRTC-direct): one joins a room created on a
//! native node and exchanges messages both ways; two others, connected to each other only through the node's
//! relay, share a room of their own. scripts/test.sh starts the native side
//! (examples/echo_peer.rs) and passes its address and room at build time.
#![cfg(target_arch = "wasm32")]

use std::rc::Rc;

use hyphae::net::rt::Duration;
use hyphae::rooms::{NodeConfig, P2pNode};
use hyphae::store::indexeddb::IndexedDbStore;
use hyphae::store::Direction;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use ruma::OwnedRoomId;
use serde_json::json;
use wasm_bindgen_test::*;

mod common;
use common::tabs::browser_node;

wasm_bindgen_test_configure!(run_in_browser);

async fn bodies(node: &P2pNode, room: &OwnedRoomId) -> Vec<String> {
    let events = node
        .engine()
        .timeline(room, None, Direction::Forward, usize::MAX)
        .await
        .unwrap();
    events
        .iter()
        .filter(|e| e.pdu.kind.to_string() == "m.room.message")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e.pdu.content.get()).ok())
        .filter_map(|c| c["body"].as_str().map(str::to_owned))
        .collect()
}

fn echo_env() -> (&'static str, &'static str) {
    let (Some(addr), Some(room)) = (
        option_env!("HYPHAE_ECHO_ADDR"),
        option_env!("HYPHAE_ECHO_ROOM"),
    ) else {
        panic!("scripts/test.sh sets HYPHAE_ECHO_ADDR and HYPHAE_ECHO_ROOM to a running echo peer");
    };
    (addr, room)
}

async fn wait_for_body(node: &P2pNode, room: &OwnedRoomId, body: &str) -> bool {
    let n = node.clone();
    let r = room.clone();
    let body = body.to_owned();
    node.wait_until(Duration::from_secs(30), || {
        let n = n.clone();
        let r = r.clone();
        let body = body.clone();
        async move { bodies(&n, &r).await.contains(&body) }
    })
    .await
}

#[wasm_bindgen_test]
async fn two_browser_peers_chat_through_the_relay() {
    let (addr, _) = echo_env();
    let (x, y, room) = common::tabs::two_tabs_in_a_room(&addr.parse().unwrap(), "relay").await;
    x.send(
        &room,
        "xavier",
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "hi Y"}),
    )
    .await
    .unwrap();
    y.send(
        &room,
        "yara",
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "hi X"}),
    )
    .await
    .unwrap();
    assert!(
        wait_for_body(&y, &room, "hi Y").await,
        "X's message reached Y"
    );
    assert!(
        wait_for_body(&x, &room, "hi X").await,
        "Y's message reached X"
    );
}

#[wasm_bindgen_test]
async fn two_browser_peers_find_each_other_through_rendezvous() {
    let (addr, _) = echo_env();
    let relay: Multiaddr = addr.parse().unwrap();
    let circuit = relay.clone().with(Protocol::P2pCircuit);
    // Both register their relayed address at the node and discover each other there: nobody
    // tells either the other's address.
    let p = browser_node("rdv-p", relay.clone(), vec![circuit.clone()]).await;
    let q = browser_node("rdv-q", relay.clone(), vec![circuit]).await;
    assert!(
        p.wait_for_peers(2, Duration::from_secs(30)).await,
        "P found Q"
    );
    assert!(
        q.wait_for_peers(2, Duration::from_secs(30)).await,
        "Q found P"
    );
    let peers = p.connected_peers().await.unwrap();
    assert!(peers.contains(&q.peer_id()), "{peers:?}");
}

#[wasm_bindgen_test]
async fn a_browser_peer_chats_with_a_native_node() {
    let (addr, room) = echo_env();
    chat_with_the_echo_node(addr.parse().unwrap(), room, "browser-peer").await;
}

#[wasm_bindgen_test]
async fn a_browser_peer_chats_with_a_native_node_over_webrtc_direct() {
    let (_, room) = echo_env();
    let Some(addr) = option_env!("HYPHAE_ECHO_WEBRTC") else {
        panic!("scripts/test.sh sets HYPHAE_ECHO_WEBRTC to the echo peer's WebRTC-direct address");
    };
    chat_with_the_echo_node(addr.parse().unwrap(), room, "browser-peer-webrtc").await;
}

/// Joins the echo node's room through `addr` (the only address the tab knows) and waits for the
/// node to answer a message.
async fn chat_with_the_echo_node(addr: Multiaddr, room: &str, profile: &str) {
    let room: OwnedRoomId = room.try_into().unwrap();
    let echo = addr
        .iter()
        .find_map(|p| {
            if let Protocol::P2p(id) = p {
                Some(id)
            } else {
                None
            }
        })
        .unwrap();

    IndexedDbStore::delete(profile).await.unwrap();
    let store = Rc::new(IndexedDbStore::open(profile).await.unwrap());
    let config = NodeConfig {
        bootstrap: vec![addr],
        anti_entropy_every: Duration::from_secs(2),
        ..NodeConfig::default()
    };
    let node = P2pNode::start(store, config).await.unwrap();
    assert!(
        node.wait_for_peers(1, Duration::from_secs(30)).await,
        "the tab reached the node"
    );
    node.join(&room, "tab", echo).await.unwrap();
    node.send(
        &room,
        "tab",
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "hello from the tab"}),
    )
    .await
    .unwrap();
    let n = node.clone();
    let r = room.clone();
    let answered = node
        .wait_until(Duration::from_secs(30), || {
            let n = n.clone();
            let r = r.clone();
            async move {
                bodies(&n, &r)
                    .await
                    .iter()
                    .any(|b| b == "echo: hello from the tab")
            }
        })
        .await;
    assert!(
        answered,
        "the native node's answer reached the tab: {:?}",
        bodies(&node, &room).await
    );
}
