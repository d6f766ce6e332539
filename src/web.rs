//! Browser bindings: the homeserver as a JS class over an IndexedDB profile, networked through
//! libp2p to the bootstrap nodes it is given.
//!
//! ```js
//! const hs = await Hyphae.open("profile", "alice", ["/ip4/127.0.0.1/tcp/4002/ws/p2p/12D3…"]);
//! hs.onPeersChanged(count => console.log("peers:", count));
//! const room = await hs.createRoom("Room", null, false);
//! await hs.sendText(room, "hello");
//! ```
//! Every async method returns a Promise; results are plain JSON values. Errors reject with an
//! `Error` whose message says what went wrong.

use std::rc::Rc;

use js_sys::Promise;
use ruma::{OwnedRoomId, OwnedUserId};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::future_to_promise;

use crate::api::{ApiRequest, Caller, ClientApi, Registration};
use crate::engine::create_room::{CreateRoom, Preset};
use crate::net::node::{NodeConfig, P2pNode};
use crate::store::indexeddb::IndexedDbStore;
use crate::store::{Direction, SharedStore};

fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn to_js(value: &serde_json::Value) -> Result<JsValue, JsValue> {
    js_sys::JSON::parse(&value.to_string())
}

struct Node {
    p2p: P2pNode,
    /// The Client-Server API of this tab's homeserver, reached through [`Hyphae::fetch`].
    api: std::sync::Arc<ClientApi>,
    localpart: String,
    user: OwnedUserId,
}

/// A Hyphae homeserver running in this tab.
#[wasm_bindgen]
pub struct Hyphae {
    node: Rc<Node>,
}

#[wasm_bindgen]
impl Hyphae {
    /// Opens (or creates) the profile `profile` in IndexedDB and starts its peer; `localpart`
    /// names the local user; `bootstrap` lists multiaddrs of nodes to dial and keep dialling.
    pub async fn open(
        profile: String,
        localpart: String,
        bootstrap: Vec<String>,
    ) -> Result<Hyphae, JsValue> {
        let bootstrap = bootstrap
            .iter()
            .map(|a| a.parse())
            .collect::<Result<Vec<_>, _>>()
            .map_err(js_err)?;
        let store: SharedStore = Rc::new(IndexedDbStore::open(&profile).await.map_err(js_err)?);
        let config = NodeConfig {
            bootstrap,
            ..NodeConfig::default()
        };
        let p2p = P2pNode::start(store, config).await.map_err(js_err)?;
        let user =
            OwnedUserId::try_from(format!("@{localpart}:{}", p2p.server_name())).map_err(js_err)?;
        let api = ClientApi::start(p2p.clone(), Registration::Open)
            .await
            .map_err(|e| js_err(e.message))?;
        Ok(Hyphae {
            node: Rc::new(Node {
                api,
                p2p,
                localpart,
                user,
            }),
        })
    }

    #[wasm_bindgen(getter, js_name = peerId)]
    pub fn peer_id(&self) -> String {
        self.node.p2p.peer_id().to_string()
    }

    /// The Client-Server API of this tab's homeserver as a `fetch(input, init)` function: hand
    /// `hs.fetch.bind(hs)` to a Matrix client (matrix-js-sdk's `fetchFn`) with any base URL,
    /// e.g. `https://hyphae.invalid`. No request leaves the tab.
    pub fn fetch(&self, input: JsValue, init: JsValue) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let req = to_api_request(&input, &init).await?;
            let resp = node.api.handle(req, Caller { local: true }).await;
            from_api_response(resp).map(JsValue::from)
        })
    }

    /// The PeerIds this tab is connected to right now.
    pub fn peers(&self) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let peers = node.p2p.connected_peers().await.map_err(js_err)?;
            to_js(&serde_json::json!(peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()))
        })
    }

    /// Calls `callback(count)` now and whenever the number of connected peers changes.
    #[wasm_bindgen(js_name = onPeersChanged)]
    pub fn on_peers_changed(&self, callback: js_sys::Function) {
        let node = self.node.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let mut last = None;
            loop {
                let count = node
                    .p2p
                    .connected_peers()
                    .await
                    .map(|p| p.len())
                    .unwrap_or(0);
                if last != Some(count) {
                    last = Some(count);
                    if callback
                        .call1(&JsValue::NULL, &JsValue::from(count as u32))
                        .is_err()
                    {
                        return;
                    }
                }
                let want = if count == 0 { 1 } else { count + 1 };
                // Wake on the next connection or after a while (to notice disconnections).
                node.p2p
                    .wait_for_peers(want, crate::net::rt::Duration::from_secs(2))
                    .await;
            }
        });
    }

    /// Joins a room on another peer through `via` (a PeerId that is in the room).
    pub fn join(&self, room_id: String, via: String) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let room = OwnedRoomId::try_from(room_id).map_err(js_err)?;
            let via = via.parse().map_err(js_err)?;
            let id = node
                .p2p
                .join(&room, &node.localpart, via)
                .await
                .map_err(js_err)?;
            Ok(id.to_string().into())
        })
    }

    /// Pending invites: `[{room_id, sender, from}]` (`from` is the PeerId to join through).
    pub fn invites(&self) -> Result<JsValue, JsValue> {
        let list: Vec<serde_json::Value> = self
            .node
            .p2p
            .invites()
            .iter()
            .map(|i| serde_json::json!({"room_id": i.room_id, "sender": i.sender, "from": i.from.to_string()}))
            .collect();
        to_js(&serde_json::Value::Array(list))
    }

    #[wasm_bindgen(getter, js_name = serverName)]
    pub fn server_name(&self) -> String {
        self.node.p2p.server_name().to_string()
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
            let room = node
                .p2p
                .create_room(&node.localpart, &opts)
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
                .p2p
                .send(&room, &node.localpart, "m.room.message", None, content)
                .await
                .map_err(js_err)?;
            Ok(r.event_id.to_string().into())
        })
    }

    /// Runs the receipt checks on a PDU from a peer; resolves to `{event_id, outcome}`.
    pub fn receive(&self, pdu: Vec<u8>) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let r = node.p2p.engine().receive(&pdu).await.map_err(js_err)?;
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
                .p2p
                .engine()
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
            let rooms = node.p2p.engine().rooms().await.map_err(js_err)?;
            to_js(&serde_json::json!(rooms))
        })
    }

    /// The whole profile (identity, rooms, history) as an export file's text.
    #[wasm_bindgen(js_name = exportProfile)]
    pub fn export_profile(&self) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let data = crate::store::export::export(node.p2p.engine().store().as_ref())
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

fn get(obj: &JsValue, key: &str) -> JsValue {
    js_sys::Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

/// Builds a router request from `fetch`'s arguments: a URL string, `URL` or `Request`, and an
/// optional init object (method, headers as `Headers` or a plain object, body as string or bytes).
async fn to_api_request(input: &JsValue, init: &JsValue) -> Result<ApiRequest, JsValue> {
    let request = input.dyn_ref::<web_sys::Request>();
    let url = match (input.as_string(), request) {
        (Some(s), _) => s,
        (None, Some(r)) => r.url(),
        (None, None) => get(input, "href")
            .as_string()
            .ok_or_else(|| js_err("fetch: the input is not a URL"))?,
    };
    let parsed = web_sys::Url::new_with_base(&url, "https://hyphae.invalid")
        .map_err(|_| js_err("fetch: bad URL"))?;
    let path_and_query = format!("{}{}", parsed.pathname(), parsed.search());
    let init_method = if init.is_object() {
        get(init, "method").as_string()
    } else {
        None
    };
    let method = init_method
        .or_else(|| request.map(|r| r.method()))
        .unwrap_or_else(|| "GET".into())
        .to_uppercase();
    let mut builder = http::Request::builder()
        .method(method.as_str())
        .uri(path_and_query);
    let mut add_headers = |headers: &JsValue| -> Result<(), JsValue> {
        let entries = if let Some(h) = headers.dyn_ref::<web_sys::Headers>() {
            js_sys::Array::from(&h.entries().into())
        } else if headers.is_object() {
            js_sys::Object::entries(headers.unchecked_ref())
        } else {
            return Ok(());
        };
        for pair in entries.iter() {
            let pair = js_sys::Array::from(&pair);
            if let (Some(k), Some(v)) = (pair.get(0).as_string(), pair.get(1).as_string()) {
                builder = std::mem::take(&mut builder).header(k, v);
            }
        }
        Ok(())
    };
    if let Some(r) = request {
        add_headers(&r.headers().into())?;
    }
    if init.is_object() {
        add_headers(&get(init, "headers"))?;
    }
    let body_value = if init.is_object() {
        get(init, "body")
    } else {
        JsValue::UNDEFINED
    };
    let body: Vec<u8> = if let Some(text) = body_value.as_string() {
        text.into_bytes()
    } else if body_value.is_instance_of::<js_sys::Uint8Array>() {
        js_sys::Uint8Array::from(body_value).to_vec()
    } else if body_value.is_instance_of::<js_sys::ArrayBuffer>() {
        js_sys::Uint8Array::new(&body_value).to_vec()
    } else if let (Some(r), true) = (request, body_value.is_undefined()) {
        let text = wasm_bindgen_futures::JsFuture::from(r.text()?).await?;
        text.as_string().unwrap_or_default().into_bytes()
    } else {
        Vec::new()
    };
    builder.body(body).map_err(js_err)
}

fn from_api_response(resp: crate::api::ApiResponse) -> Result<web_sys::Response, JsValue> {
    let (parts, mut body) = resp.into_parts();
    let headers = web_sys::Headers::new()?;
    for (k, v) in &parts.headers {
        if let Ok(v) = v.to_str() {
            headers.append(k.as_str(), v)?;
        }
    }
    let init = web_sys::ResponseInit::new();
    init.set_status(parts.status.as_u16());
    init.set_headers(&headers);
    web_sys::Response::new_with_opt_u8_array_and_init(Some(&mut body), &init)
}
