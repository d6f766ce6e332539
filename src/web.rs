//! Browser bindings: what the page can call.

use wasm_bindgen::prelude::*;

use crate::identity::Identity;
use crate::store::indexeddb::IndexedDbStore;

/// Opens (or creates) the profile `name` in IndexedDB and returns this peer's server name.
#[wasm_bindgen(js_name = openProfile)]
pub async fn open_profile(name: String) -> Result<String, JsError> {
    let store = IndexedDbStore::open(&name)
        .await
        .map_err(|e| JsError::new(&e.to_string()))?;
    crate::store::schema::prepare(&store)
        .await
        .map_err(|e| JsError::new(&e.to_string()))?;
    let identity = Identity::load_or_create(&store)
        .await
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(identity.server_name().to_string())
}
