//! IndexedDB ingest benchmark in headless Chromium. Not part of the test run; run with
//! `scripts/bench.sh` (release build): prints events/s for a linear room and a forked room.
#![cfg(target_arch = "wasm32")]

mod common;

use std::rc::Rc;

use common::workload;
use hyphae::engine::Engine;
use hyphae::store::indexeddb::IndexedDbStore;
use hyphae::store::memory::MemoryStore;
use hyphae::store::SharedStore;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn run(label: &str, store: SharedStore, events: &[Vec<u8>], batch: usize) {
    let engine = Engine::open(store).await.unwrap();
    let start = js_sys::Date::now();
    let accepted = workload::ingest(&engine, events, batch).await;
    let secs = (js_sys::Date::now() - start) / 1000.0;
    assert_eq!(accepted, events.len(), "{label}: every event accepted");
    console_log!(
        "BENCH {label:<44} {:>6} events {:>7.0} ev/s  ({:.2} s)",
        events.len(),
        events.len() as f64 / secs,
        secs
    );
}

async fn fresh(name: &str) -> SharedStore {
    IndexedDbStore::delete(name).await.unwrap();
    Rc::new(IndexedDbStore::open(name).await.unwrap())
}

#[wasm_bindgen_test]
async fn indexeddb_ingest() {
    let linear = workload::linear(10_000).await;
    let forks = workload::forks(100, 100).await;
    for (name, w) in [("linear", &linear), ("100-way forks", &forks)] {
        run(
            &format!("{name}, wasm memory, 100 per commit"),
            Rc::new(MemoryStore::new()),
            &w.events,
            100,
        )
        .await;
        run(
            &format!("{name}, IndexedDB, 100 per commit"),
            fresh("bench-100").await,
            &w.events,
            100,
        )
        .await;
        run(
            &format!("{name}, IndexedDB, 1 per commit"),
            fresh("bench-1").await,
            &w.events[..2000],
            1,
        )
        .await;
    }
}
