//! Browser bindings: the homeserver as a JS class over an IndexedDB profile.
//!
//! Every method returns a Promise; results are plain JSON values. Errors reject with an `Error`
//! whose message says what went wrong.

use std::rc::Rc;

use js_sys::Promise;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::engine::create_room::{CreateRoom, Preset};
use crate::engine::Engine;
use crate::identity::Identity;
use crate::store::indexeddb::IndexedDbStore;
use crate::store::{Direction, SharedStore};

fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn to_js(value: &serde_json::Value) -> Result<JsValue, JsValue> {
    js_sys::JSON::parse(&value.to_string())
}

fn now() -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch(ruma::UInt::new(js_sys::Date::now() as u64).unwrap_or_default())
}

struct Node {
    engine: Engine,
    identity: Identity,
    user: OwnedUserId,
}

/// A Hyphae homeserver running in this tab.
#[wasm_bindgen]
pub struct Hyphae {
    node: Rc<Node>,
}

#[wasm_bindgen]
impl Hyphae {
    /// Opens (or creates) the profile `profile` in IndexedDB; `localpart` names the local user.
    pub async fn open(profile: String, localpart: String) -> Result<Hyphae, JsValue> {
        let store: SharedStore = Rc::new(IndexedDbStore::open(&profile).await.map_err(js_err)?);
        let engine = Engine::open(store.clone()).await.map_err(js_err)?;
        let identity = Identity::load_or_create(store.as_ref())
            .await
            .map_err(js_err)?;
        let user = OwnedUserId::try_from(format!("@{localpart}:{}", identity.server_name()))
            .map_err(js_err)?;
        Ok(Hyphae {
            node: Rc::new(Node {
                engine,
                identity,
                user,
            }),
        })
    }

    #[wasm_bindgen(getter, js_name = serverName)]
    pub fn server_name(&self) -> String {
        self.node.identity.server_name().to_string()
    }

    #[wasm_bindgen(getter, js_name = userId)]
    pub fn user_id(&self) -> String {
        self.node.user.to_string()
    }

    /// Creates a room; resolves to its id.
    #[wasm_bindgen(js_name = createRoom)]
    pub fn create_room(
        &self,
        name: Option<String>,
        topic: Option<String>,
        public: bool,
    ) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let preset = if public {
                Preset::PublicChat
            } else {
                Preset::PrivateChat
            };
            let opts = CreateRoom {
                preset,
                name,
                topic,
                ..Default::default()
            };
            let (room, _) = node
                .engine
                .create_room(&node.identity, &node.user, &opts, now())
                .await
                .map_err(js_err)?;
            Ok(room.to_string().into())
        })
    }

    /// Sends an `m.text` message; resolves to the event id once it is durable.
    #[wasm_bindgen(js_name = sendText)]
    pub fn send_text(&self, room_id: String, body: String) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let room = OwnedRoomId::try_from(room_id).map_err(js_err)?;
            let content = serde_json::json!({ "msgtype": "m.text", "body": body });
            let r = node
                .engine
                .send(
                    &node.identity,
                    &room,
                    &node.user,
                    "m.room.message",
                    None,
                    content,
                    now(),
                )
                .await
                .map_err(js_err)?;
            Ok(r.event_id.to_string().into())
        })
    }

    /// Runs the receipt checks on a PDU from a peer; resolves to `{event_id, outcome}`.
    pub fn receive(&self, pdu: Vec<u8>) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let r = node.engine.receive(&pdu).await.map_err(js_err)?;
            to_js(
                &serde_json::json!({ "event_id": r.event_id, "outcome": format!("{:?}", r.outcome) }),
            )
        })
    }

    /// The last `limit` timeline events of a room, oldest first, as PDUs.
    pub fn timeline(&self, room_id: String, limit: usize) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let room = OwnedRoomId::try_from(room_id).map_err(js_err)?;
            let mut events = node
                .engine
                .timeline(&room, None, Direction::Backward, limit)
                .await
                .map_err(js_err)?;
            events.reverse();
            let list: Vec<serde_json::Value> = events
                .iter()
                .map(|e| {
                    let mut v: serde_json::Value =
                        serde_json::from_str(e.pdu.json.get()).unwrap_or_default();
                    v["event_id"] = e.pdu.event_id.as_str().into();
                    v
                })
                .collect();
            to_js(&serde_json::Value::Array(list))
        })
    }

    /// The ids of every room in this profile.
    pub fn rooms(&self) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let rooms = node.engine.rooms().await.map_err(js_err)?;
            to_js(&serde_json::json!(rooms))
        })
    }

    /// The whole profile (identity, rooms, history) as an export file's text.
    #[wasm_bindgen(js_name = exportProfile)]
    pub fn export_profile(&self) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let data = crate::store::export::export(node.engine.store().as_ref())
                .await
                .map_err(js_err)?;
            Ok(data.into())
        })
    }
}

/// Imports an export file into the new, empty profile `profile`.
#[wasm_bindgen(js_name = importProfile)]
pub async fn import_profile(profile: String, data: String) -> Result<u32, JsValue> {
    let store = IndexedDbStore::open(&profile).await.map_err(js_err)?;
    let n = crate::store::export::import(&store, &data)
        .await
        .map_err(js_err)?;
    Ok(n as u32)
}
