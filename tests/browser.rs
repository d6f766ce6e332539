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
async fn the_page_api_creates_sends_exports_and_imports() {
    use hyphae::web::{import_profile, Hyphae};
    use wasm_bindgen_futures::JsFuture;
    IndexedDbStore::delete("page-a").await.unwrap();
    IndexedDbStore::delete("page-b").await.unwrap();
    let hs = Hyphae::open("page-a".into(), "alice".into(), Vec::new())
        .await
        .unwrap();
    assert!(hs.user_id().ends_with(&hs.server_name()));
    let room = JsFuture::from(hs.create_room(Some("Tab room".into()), None, false))
        .await
        .unwrap();
    let room = room.as_string().unwrap();
    JsFuture::from(hs.send_text(room.clone(), "hello from the tab".into()))
        .await
        .unwrap();
    let timeline = JsFuture::from(hs.timeline(room.clone(), 3)).await.unwrap();
    let timeline: serde_json::Value =
        serde_json::from_str(&String::from(js_sys::JSON::stringify(&timeline).unwrap())).unwrap();
    assert_eq!(timeline.as_array().unwrap().len(), 3);
    assert_eq!(timeline[2]["content"]["body"], "hello from the tab");
    // With no bootstrap node the tab is alone, and says so.
    let peers = JsFuture::from(hs.peers()).await.unwrap();
    assert_eq!(String::from(js_sys::JSON::stringify(&peers).unwrap()), "[]");
    assert!(Hyphae::open(
        "page-c".into(),
        "alice".into(),
        vec!["not a multiaddr".into()]
    )
    .await
    .is_err());
    // A bad room id is a rejected promise, not a panic.
    assert!(
        JsFuture::from(hs.send_text("not a room".into(), "x".into()))
            .await
            .is_err()
    );

    let data = JsFuture::from(hs.export_profile())
        .await
        .unwrap()
        .as_string()
        .unwrap();
    assert!(import_profile("page-b".into(), data).await.unwrap() > 0);
    let copy = Hyphae::open("page-b".into(), "alice".into(), Vec::new())
        .await
        .unwrap();
    assert_eq!(copy.server_name(), hs.server_name());
    let rooms = JsFuture::from(copy.rooms()).await.unwrap();
    assert_eq!(
        String::from(js_sys::JSON::stringify(&rooms).unwrap()),
        format!("[\"{room}\"]")
    );
}
