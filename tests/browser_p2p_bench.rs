//! Browser → relay node → browser delivery latency, in headless Chromium. Not part of the test
//! run: `scripts/bench.sh` starts the native side (examples/echo_peer.rs) and runs this in release.
#![cfg(target_arch = "wasm32")]

use hyphae::net::rt::Duration;
use serde_json::json;
use wasm_bindgen_test::*;

mod common;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
async fn relay_delivery_latency() {
    let Some(addr) = option_env!("HYPHAE_ECHO_ADDR") else {
        panic!("scripts/bench.sh sets HYPHAE_ECHO_ADDR to a running echo peer");
    };
    let (x, y, room) = common::tabs::two_tabs_in_a_room(&addr.parse().unwrap(), "bench").await;

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
