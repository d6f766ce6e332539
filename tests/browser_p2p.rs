//! A browser peer (headless Chromium, WebSocket) joins a room created on a native node and
//! exchanges messages both ways. scripts/test.sh starts the native side (examples/echo_peer.rs)
//! and passes its address and room at build time.
#![cfg(target_arch = "wasm32")]

use std::rc::Rc;

use hyphae::net::node::{NodeConfig, P2pNode};
use hyphae::net::rt::Duration;
use hyphae::store::indexeddb::IndexedDbStore;
use hyphae::store::Direction;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use ruma::OwnedRoomId;
use serde_json::json;
use wasm_bindgen_test::*;

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

#[wasm_bindgen_test]
async fn a_browser_peer_chats_with_a_native_node() {
    let (Some(addr), Some(room)) = (
        option_env!("HYPHAE_ECHO_ADDR"),
        option_env!("HYPHAE_ECHO_ROOM"),
    ) else {
        panic!("scripts/test.sh sets HYPHAE_ECHO_ADDR and HYPHAE_ECHO_ROOM to a running echo peer");
    };
    let addr: Multiaddr = addr.parse().unwrap();
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

    IndexedDbStore::delete("browser-peer").await.unwrap();
    let store = Rc::new(IndexedDbStore::open("browser-peer").await.unwrap());
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
