//! The client scenario inside headless Chromium, through the tab's `fetch` export on an
//! IndexedDB profile: the same requests a page's Matrix client makes, with no network.
#![cfg(target_arch = "wasm32")]

mod common;

use common::client::scenario;
use common::tab_fetch::TabFetch;
use hyphae::store::indexeddb::IndexedDbStore;
use hyphae::web::Hyphae;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
async fn two_users_in_the_tab_through_fetch() {
    IndexedDbStore::delete("client-scenario").await.unwrap();
    let hs = Hyphae::open("client-scenario".into(), Vec::new(), None)
        .await
        .unwrap();
    let tab = TabFetch(hs);
    scenario(&tab, &tab, "", None).await;
}
