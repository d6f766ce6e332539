//! Browser → relay node → browser delivery latency, in headless Chromium. Not part of the test
//! run: `scripts/bench.sh` starts the native side (examples/echo_peer.rs) and runs this in release.
#![cfg(target_arch = "wasm32")]

use std::rc::Rc;

use hyphae::engine::create_room::CreateRoom;
use hyphae::net::node::{NodeConfig, P2pNode};
use hyphae::net::rt::Duration;
use hyphae::store::indexeddb::IndexedDbStore;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use serde_json::json;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn browser_node(profile: &str, bootstrap: Multiaddr, listen: Vec<Multiaddr>) -> P2pNode {
    IndexedDbStore::delete(profile).await.unwrap();
    let store = Rc::new(IndexedDbStore::open(profile).await.unwrap());
    let config = NodeConfig {
        bootstrap: vec![bootstrap],
        listen,
        ..NodeConfig::default()
    };
    P2pNode::start(store, config).await.unwrap()
}

#[wasm_bindgen_test]
async fn relay_delivery_latency() {
    let Some(addr) = option_env!("HYPHAE_ECHO_ADDR") else {
        panic!("scripts/bench.sh sets HYPHAE_ECHO_ADDR to a running echo peer");
    };
    let relay: Multiaddr = addr.parse().unwrap();
    let x = browser_node(
        "bench-x",
        relay.clone(),
        vec![relay.clone().with(Protocol::P2pCircuit)],
    )
    .await;
    let y = browser_node("bench-y", relay.clone(), Vec::new()).await;
    hyphae::net::rt::timeout(Duration::from_secs(20), x.listen_addrs())
        .await
        .expect("reservation");
    y.dial(
        relay
            .clone()
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(x.peer_id())),
    )
    .unwrap();
    assert!(y.wait_for_peers(2, Duration::from_secs(30)).await);
    let opts = CreateRoom {
        invite: vec![y.user("yara")],
        ..CreateRoom::default()
    };
    let room = x.create_room("xavier", &opts).await.unwrap();
    let y2 = y.clone();
    assert!(
        y.wait_until(Duration::from_secs(30), || {
            let y2 = y2.clone();
            async move { !y2.invites().is_empty() }
        })
        .await
    );
    y.join(&room, "yara", x.peer_id()).await.unwrap();

    let mut samples = Vec::new();
    for i in 0..120 {
        let start = js_sys::Date::now();
        let r = x
            .send(
                &room,
                "xavier",
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": format!("{i}")}),
            )
            .await
            .unwrap();
        let (y2, id) = (y.clone(), r.event_id);
        let arrived = y
            .wait_until(Duration::from_secs(10), || {
                let (y2, id) = (y2.clone(), id.clone());
                async move { y2.engine().event(&id).await.unwrap().is_some() }
            })
            .await;
        assert!(arrived, "message {i} arrived");
        samples.push(js_sys::Date::now() - start);
    }
    let mut warm: Vec<f64> = samples[20..].to_vec();
    warm.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |p: f64| warm[((warm.len() - 1) as f64 * p).round() as usize];
    console_log!(
        "BENCH browser -> relay -> browser, send to durable in the other tab's IndexedDB ({} messages): p50 {:.1} ms, p99 {:.1} ms",
        warm.len(),
        pick(0.5),
        pick(0.99)
    );
}
