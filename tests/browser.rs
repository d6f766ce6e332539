//! Browser tests (headless Chromium): the store conformance suite on IndexedDB, the engine on
//! IndexedDB surviving a reopen, and an export for the cross-backend test to import into redb.
#![cfg(target_arch = "wasm32")]

mod common;

use std::rc::Rc;

use base64::Engine as _;
use common::conformance;
use hyphae::engine::Engine;
use hyphae::store::indexeddb::IndexedDbStore;
use hyphae::store::memory::MemoryStore;
use hyphae::store::SharedStore;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn fresh(name: &str) -> IndexedDbStore {
    IndexedDbStore::delete(name).await.unwrap();
    IndexedDbStore::open(name).await.unwrap()
}

#[wasm_bindgen_test]
async fn indexeddb_conformance() {
    conformance::basics(&fresh("conf-basics").await).await;
    conformance::large_table(&fresh("conf-large").await).await;
    conformance::get_many(&fresh("conf-get-many").await).await;
    conformance::schema_and_migrations(&fresh("conf-schema").await).await;
}

/// Records the mode and durability of every IndexedDB transaction the page opens from now on,
/// until [`stop_recording_transactions`].
fn record_transactions() {
    js_sys::Function::new_no_args(
        "const proto = IDBDatabase.prototype;
         const original = proto.transaction;
         globalThis.__hyphaeTransactions = [];
         globalThis.__hyphaeOriginalTransaction = original;
         proto.transaction = function (...args) {
             const tx = original.apply(this, args);
             globalThis.__hyphaeTransactions.push([tx.mode, tx.durability]);
             return tx;
         };",
    )
    .call0(&wasm_bindgen::JsValue::NULL)
    .unwrap();
}

/// Restores `IDBDatabase.prototype.transaction`; returns `(mode, durability)` per transaction.
fn stop_recording_transactions() -> Vec<(String, String)> {
    let seen = js_sys::Function::new_no_args(
        "IDBDatabase.prototype.transaction = globalThis.__hyphaeOriginalTransaction;
         return JSON.stringify(globalThis.__hyphaeTransactions);",
    )
    .call0(&wasm_bindgen::JsValue::NULL)
    .unwrap();
    serde_json::from_str(&seen.as_string().unwrap()).unwrap()
}

#[wasm_bindgen_test]
async fn every_write_transaction_is_strictly_durable() {
    use hyphae::store::{Store, Table, WriteBatch};
    let source = fresh("durability-source").await;
    let target = fresh("durability-target").await;
    record_transactions();
    hyphae::store::schema::prepare(&source).await.unwrap();
    let mut batch = WriteBatch::new();
    batch.put(Table::Events, b"k".to_vec(), b"v".to_vec());
    batch.put(Table::Rooms, b"r".to_vec(), b"room".to_vec());
    source.write(batch).await.unwrap();
    let data = hyphae::store::export::export(&source).await.unwrap();
    hyphae::store::export::import(&target, &data).await.unwrap();
    let seen = stop_recording_transactions();
    let writes: Vec<_> = seen
        .iter()
        .filter(|(mode, _)| mode == "readwrite")
        .collect();
    assert!(writes.len() >= 3, "{seen:?}");
    // A write the page was told is saved must survive a power cut, not only a tab crash.
    assert!(writes.iter().all(|(_, d)| d == "strict"), "{seen:?}");
}

#[wasm_bindgen_test]
async fn indexeddb_export_under_writes() {
    let partial = conformance::export_under_writes(&fresh("export-under-writes").await).await;
    console_log!("exports that overlapped a write: {partial}");
    conformance::export_while_engine_writes(
        Rc::new(fresh("export-while-sending").await),
        Rc::new(fresh("export-while-sending-copy").await),
    )
    .await;
}

/// A homeserver failure reaches the page as a `hyphae-failed` event with the reason (the panic
/// hook calls this; in the tab a panic cannot be caught, so telling the page is all there is).
#[wasm_bindgen_test]
fn a_failure_is_announced_to_the_page() {
    js_sys::Function::new_no_args(
        "globalThis.__hyphaeFailures = [];
         globalThis.addEventListener(
             'hyphae-failed',
             (e) => globalThis.__hyphaeFailures.push(e.detail.message),
         );",
    )
    .call0(&wasm_bindgen::JsValue::NULL)
    .unwrap();
    hyphae::web::announce_failure("panicked at src/rooms/ingest.rs:1:1: a bug");
    let heard =
        js_sys::Function::new_no_args("return JSON.stringify(globalThis.__hyphaeFailures);")
            .call0(&wasm_bindgen::JsValue::NULL)
            .unwrap();
    let heard: Vec<String> = serde_json::from_str(&heard.as_string().unwrap()).unwrap();
    assert_eq!(heard, ["panicked at src/rooms/ingest.rs:1:1: a bug"]);
}

#[wasm_bindgen_test]
async fn memory_conformance_in_the_browser() {
    conformance::basics(&MemoryStore::new()).await;
    conformance::schema_and_migrations(&MemoryStore::new()).await;
}

#[wasm_bindgen_test]
async fn engine_on_indexeddb_survives_reopen_and_exports() {
    let name = "engine-history";
    let store: SharedStore = Rc::new(fresh(name).await);
    let engine = Engine::open(store.clone()).await.unwrap();
    common::sample_history(&engine).await;
    let before = common::summary(&engine).await;
    drop(engine);
    drop(store);

    // Reopen: everything comes back from IndexedDB.
    let store: SharedStore = Rc::new(IndexedDbStore::open(name).await.unwrap());
    let engine = Engine::open(store.clone()).await.unwrap();
    assert_eq!(before, common::summary(&engine).await);

    // Export, and import into a second IndexedDB profile: identical.
    let target = fresh("engine-history-import").await;
    conformance::export_import(store.as_ref(), &target).await;
    let imported = Engine::open(Rc::new(target)).await.unwrap();
    assert_eq!(before, common::summary(&imported).await);

    // Hand the export to the native cross-backend test (scripts/test.sh captures this output).
    let data = hyphae::store::export::export(store.as_ref()).await.unwrap();
    console_log!(
        "HYPHAE-EXPORT {}",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    console_log!("HYPHAE-SUMMARY {}", before);
}

#[wasm_bindgen_test]
async fn the_page_api_serves_a_client_reports_status_shuts_down_exports_and_imports() {
    use common::client::{enc, register, Transport};
    use common::tab_fetch::TabFetch;
    use hyphae::web::{import_profile, Hyphae};
    use serde_json::{json, Value};
    use wasm_bindgen_futures::JsFuture;
    let js_json = |v: wasm_bindgen::JsValue| -> Value {
        serde_json::from_str(&String::from(js_sys::JSON::stringify(&v).unwrap())).unwrap()
    };
    IndexedDbStore::delete("page-a").await.unwrap();
    IndexedDbStore::delete("page-b").await.unwrap();
    let tab = TabFetch(
        Hyphae::open("page-a".into(), Vec::new(), None)
            .await
            .unwrap(),
    );
    let server_name = tab.0.server_name();
    let alice = register(&tab, "alice", "pw").await;
    assert!(alice.user_id.ends_with(&server_name));
    let room = alice.create_room(json!({"name": "Tab room"})).await;
    let event = alice.send_text(&room, "t1", "hello from the tab").await;

    // With no bootstrap node the tab is alone, and says so; nothing reached a peer.
    let status = js_json(JsFuture::from(tab.0.status()).await.unwrap());
    assert_eq!(status["connections"], json!([]));
    assert_eq!(status["bootstrap"], json!([]));
    assert_eq!(status["catch_up"]["active"], 0);
    assert_eq!(tab.0.delivered(vec![event, "not an id".into()]), vec![0, 0]);
    assert!(
        Hyphae::open("page-c".into(), vec!["not a multiaddr".into()], None)
            .await
            .is_err()
    );

    let data = JsFuture::from(tab.0.export_profile())
        .await
        .unwrap()
        .as_string()
        .unwrap();
    // After a shutdown the tab answers no more requests (another tab owns the profile now).
    JsFuture::from(tab.0.shutdown()).await.unwrap();
    let (status, body) = alice
        .call("GET", "/_matrix/client/v3/account/whoami", None)
        .await;
    assert_eq!(status, 503, "{body}");

    assert!(import_profile("page-b".into(), data).await.unwrap() > 0);
    let copy = TabFetch(
        Hyphae::open("page-b".into(), Vec::new(), None)
            .await
            .unwrap(),
    );
    assert_eq!(copy.0.server_name(), server_name);
    let (status, login) = copy
        .call(
            "POST",
            "/_matrix/client/v3/login",
            None,
            Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw"})),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let token = login["access_token"].as_str().unwrap();
    let (status, page) = copy
        .call(
            "GET",
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
                enc(&room)
            ),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["content"]["body"] == "hello from the tab"));
}
