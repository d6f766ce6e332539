//! An export made from IndexedDB in headless Chromium (by `tests/browser.rs`) imports into redb
//! and yields identical rooms, state and timelines. Run by scripts/test.sh after the browser
//! tests, which it reads from the log named by `HYPHAE_BROWSER_LOG`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;

use base64::Engine as _;
use hyphae::engine::Engine;
use hyphae::store::redb::RedbStore;
use hyphae::store::SharedStore;

fn line_after<'a>(log: &'a str, marker: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.find(marker).map(|i| l[i + marker.len()..].trim()))
        .unwrap_or_else(|| panic!("browser log has no {marker} line"))
}

#[tokio::test]
async fn indexeddb_export_imports_into_redb() {
    let path = std::env::var("HYPHAE_BROWSER_LOG")
        .expect("set HYPHAE_BROWSER_LOG to the browser test output (scripts/test.sh does)");
    let log = std::fs::read_to_string(&path).unwrap();
    let export = base64::engine::general_purpose::STANDARD
        .decode(line_after(&log, "HYPHAE-EXPORT "))
        .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(line_after(&log, "HYPHAE-SUMMARY ")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore =
        Arc::new(RedbStore::open(&dir.path().join("from-browser.redb")).unwrap());
    let n = hyphae::store::export::import(store.as_ref(), std::str::from_utf8(&export).unwrap())
        .await
        .unwrap();
    assert!(n > 40);
    let engine = Engine::open(store).await.unwrap();
    assert_eq!(common::summary(&engine).await, expected);
    assert!(!expected["rooms"].as_array().unwrap().is_empty());
}
