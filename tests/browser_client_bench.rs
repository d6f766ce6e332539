//! The client benchmark load through the tab's `fetch` on IndexedDB, in headless Chromium. Not
//! part of the test run: `scripts/bench.sh` runs it in release.
#![cfg(target_arch = "wasm32")]

mod common;

use common::client::{enc, register, Client};
use common::tab_fetch::TabFetch;
use hyphae::store::indexeddb::IndexedDbStore;
use hyphae::web::Hyphae;
use serde_json::json;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn now() -> f64 {
    js_sys::Date::now()
}

async fn send(c: &Client<'_, TabFetch>, room: &str, txn: &str) -> String {
    c.send_text(room, txn, &format!("message {txn}")).await
}

#[wasm_bindgen_test]
async fn client_api_in_the_tab() {
    IndexedDbStore::delete("client-bench").await.unwrap();
    let hs = Hyphae::open("client-bench".into(), Vec::new(), None)
        .await
        .unwrap();
    let tab = TabFetch(hs);
    let alice = register(&tab, "alice", "pw").await;
    let mut bob = register(&tab, "bob", "pw").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let r = enc(&room);
    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{r}"),
        Some(json!({})),
    )
    .await;

    let n = 300;
    let t0 = now();
    for i in 0..n {
        send(&alice, &room, &format!("s{i}")).await;
    }
    let seq = n as f64 * 1000.0 / (now() - t0);

    let mut senders = Vec::new();
    for i in 0..10 {
        let u = register(&tab, &format!("sender{i}"), "pw").await;
        u.ok(
            "POST",
            &format!("/_matrix/client/v3/join/{r}"),
            Some(json!({})),
        )
        .await;
        senders.push(u);
    }
    let per = 60;
    let t0 = now();
    futures::future::join_all(senders.iter().enumerate().map(|(i, u)| {
        let room = room.clone();
        async move {
            for j in 0..per {
                send(u, &room, &format!("c{i}-{j}")).await;
            }
        }
    }))
    .await;
    let conc = (10 * per) as f64 * 1000.0 / (now() - t0);

    // Delivery: bob's /sync is long-polling when alice sends.
    bob.sync_until("the room", |s| s["rooms"]["join"].get(&room).map(|_| ()))
        .await;
    let mut samples = Vec::new();
    for i in 0..60 {
        let start = now();
        let (txn, body) = (format!("l{i}"), format!("message l{i}"));
        futures::join!(send(&alice, &room, &txn), async {
            bob.sync_until("the message", |s| {
                s["rooms"]["join"][&room]["timeline"]["events"]
                    .as_array()?
                    .iter()
                    .any(|e| e["content"]["body"] == body.as_str())
                    .then_some(())
            })
            .await
        });
        samples.push(now() - start);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];

    let t0 = now();
    let mut from: Option<String> = None;
    let mut pages = 0;
    while pages < 10 {
        let mut path = format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=100");
        if let Some(f) = &from {
            path.push_str(&format!("&from={f}"));
        }
        let page = bob.ok("GET", &path, None).await;
        pages += 1;
        match page["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => break,
        }
    }
    let paging = (now() - t0) / pages as f64;

    let t0 = now();
    for _ in 0..50 {
        alice
            .ok("POST", "/_matrix/client/v3/createRoom", Some(json!({})))
            .await;
    }
    let rooms = 50.0 * 1000.0 / (now() - t0);

    console_log!("BENCH in-tab fetch on IndexedDB: sequential send {seq:.0} events/s");
    console_log!("BENCH in-tab fetch on IndexedDB: concurrent send, 10 users {conc:.0} events/s");
    console_log!(
        "BENCH in-tab fetch on IndexedDB: send -> other user's /sync p50 {:.1} ms, p99 {:.1} ms",
        pick(0.5),
        pick(0.99)
    );
    console_log!("BENCH in-tab fetch on IndexedDB: /messages {paging:.1} ms per page of 100");
    console_log!("BENCH in-tab fetch on IndexedDB: createRoom {rooms:.0} rooms/s");
}
