//! Browser bindings: the homeserver as a JS class over an IndexedDB profile, networked through
//! libp2p to the bootstrap nodes it is given. A Matrix client talks to it through `fetch`:
//!
//! ```js
//! const hs = await Hyphae.open("profile", ["/ip4/127.0.0.1/tcp/4002/ws/p2p/12D3…"]);
//! const client = sdk.createClient({ baseUrl: "https://hyphae.invalid", fetchFn: hs.fetch.bind(hs) });
//! hs.onPeersChanged(count => console.log("peers:", count));
//! ```
//! Every async method returns a Promise; results are plain JSON values. Errors reject with an
//! `Error` whose message says what went wrong. If the homeserver itself fails (a panic: in the
//! browser it aborts the module), the page hears a `hyphae-failed` event on `globalThis`
//! (`event.detail.message` says why) and should offer a reload.

use std::cell::Cell;
use std::rc::Rc;

use js_sys::Promise;
use libp2p::Multiaddr;
use ruma::OwnedEventId;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::future_to_promise;

use crate::api::error::ApiError;
use crate::api::{ApiRequest, Caller, ClientApi, Registration};
use crate::identity::ServerName;
use crate::rooms::{NodeConfig, P2pNode};
use crate::store::indexeddb::IndexedDbStore;
use crate::store::SharedStore;

/// The event the page hears on `globalThis` when the homeserver in this tab has failed, with
/// `detail: {message}`. Listeners must not call into the module: it is dead by then.
pub const FAILED_EVENT: &str = "hyphae-failed";

/// Makes every panic tell the page. In the browser a panic aborts (nothing unwinds, so no task
/// can be restarted): the module is unusable afterwards, and the page must offer a reload.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            announce_failure(&info.to_string());
            previous(info);
        }));
    });
}

/// Logs `message` to the console and dispatches [`FAILED_EVENT`] with it.
#[doc(hidden)]
pub fn announce_failure(message: &str) {
    web_sys::console::error_1(&format!("The homeserver in this tab stopped: {message}").into());
    let detail = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&detail, &"message".into(), &message.into());
    let init = web_sys::CustomEventInit::new();
    init.set_detail(&detail);
    if let Ok(event) = web_sys::CustomEvent::new_with_event_init_dict(FAILED_EVENT, &init) {
        let target: web_sys::EventTarget = js_sys::global().unchecked_into();
        let _ = target.dispatch_event(&event);
    }
}

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
    store: Rc<IndexedDbStore>,
    bootstrap: Vec<Multiaddr>,
    /// Set by [`Hyphae::shutdown`]: the profile belongs to another tab now.
    stopped: Cell<bool>,
}

/// A Hyphae homeserver running in this tab.
#[wasm_bindgen]
pub struct Hyphae {
    node: Rc<Node>,
}

#[wasm_bindgen]
impl Hyphae {
    /// Opens (or creates) the profile `profile` in IndexedDB and starts its peer; `bootstrap`
    /// lists multiaddrs of nodes to dial and keep dialling, which also relay for this tab so
    /// that other tabs can reach it. With `offline` the peer waits for `setOffline(false)`
    /// before it dials anyone (a page shows its rooms first, then connects).
    pub async fn open(
        profile: String,
        bootstrap: Vec<String>,
        offline: Option<bool>,
    ) -> Result<Hyphae, JsValue> {
        install_panic_hook();
        let bootstrap = bootstrap
            .iter()
            .map(|a| a.parse::<Multiaddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| js_err(format!("bad bootstrap address: {e}")))?;
        let relayed = bootstrap
            .iter()
            .filter(|a| {
                a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            })
            .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2pCircuit))
            .collect();
        let store = Rc::new(IndexedDbStore::open(&profile).await.map_err(js_err)?);
        let shared: SharedStore = store.clone();
        let config = NodeConfig {
            listen: relayed,
            bootstrap: bootstrap.clone(),
            start_offline: offline.unwrap_or(false),
            ..NodeConfig::default()
        };
        let p2p = P2pNode::start(shared, config).await.map_err(js_err)?;
        let api = ClientApi::start(p2p.clone(), Registration::Open)
            .await
            .map_err(|e| js_err(e.message))?;
        Ok(Hyphae {
            node: Rc::new(Node {
                api,
                p2p,
                store,
                bootstrap,
                stopped: Cell::new(false),
            }),
        })
    }

    #[wasm_bindgen(getter, js_name = peerId)]
    pub fn peer_id(&self) -> String {
        self.node.p2p.peer_id().to_string()
    }

    #[wasm_bindgen(getter, js_name = serverName)]
    pub fn server_name(&self) -> String {
        self.node.p2p.server_name().to_string()
    }

    /// The Client-Server API of this tab's homeserver as a `fetch(input, init)` function: hand
    /// `hs.fetch.bind(hs)` to a Matrix client (matrix-js-sdk's `fetchFn`) with any base URL,
    /// e.g. `https://hyphae.invalid`. No request leaves the tab.
    pub fn fetch(&self, input: JsValue, init: JsValue) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            // A tab that no longer runs the homeserver stores nothing.
            if !node.stopped.get() {
                if let Some(resp) = blob_upload(&node.api, &input, &init).await? {
                    return from_api_response(resp).map(JsValue::from);
                }
            }
            let req = to_api_request(&input, &init).await?;
            let resp = if node.stopped.get() {
                let e = ApiError::unknown("this tab no longer runs the homeserver");
                crate::api::json_response(http::StatusCode::SERVICE_UNAVAILABLE, &e.body())
            } else {
                node.api.handle(req, Caller { local: true }).await
            };
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

    /// What the network looks like from this tab: `{connections: [{peer_id, address, relayed,
    /// bootstrap}], bootstrap: [{address, connected}], catch_up: {active, fetched}}`.
    pub fn status(&self) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            let connections = node.p2p.connections().await.map_err(js_err)?;
            let bootstrap_peer = |a: &Multiaddr| {
                a.iter().find_map(|p| match p {
                    libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                    _ => None,
                })
            };
            let list: Vec<serde_json::Value> = connections
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "peer_id": c.peer.to_string(),
                        "server_name": ServerName::from_peer_id(&c.peer).map(|s| s.to_string()),
                        "address": c.address.to_string(),
                        "relayed": c.relayed(),
                        "bootstrap": node.bootstrap.iter().any(|b| bootstrap_peer(b) == Some(c.peer)),
                    })
                })
                .collect();
            let bootstrap: Vec<serde_json::Value> = node
                .bootstrap
                .iter()
                .map(|b| {
                    let peer = bootstrap_peer(b);
                    serde_json::json!({
                        "address": b.to_string(),
                        "connected": connections.iter().any(|c| Some(c.peer) == peer),
                    })
                })
                .collect();
            let progress = node.p2p.catch_up_progress();
            to_js(&serde_json::json!({
                "connections": list,
                "bootstrap": bootstrap,
                "catch_up": {"active": progress.active, "fetched": progress.fetched},
            }))
        })
    }

    /// For each event id, whether another server in its room has acknowledged storing it
    /// (known for events sent since this tab opened the profile).
    pub fn delivered(&self, event_ids: Vec<String>) -> Vec<u8> {
        event_ids
            .iter()
            .map(|id| {
                OwnedEventId::try_from(id.as_str()).is_ok_and(|id| self.node.p2p.delivered(&id))
                    as u8
            })
            .collect()
    }

    /// Calls `callback(count)` now and whenever the number of connected peers changes.
    #[wasm_bindgen(js_name = onPeersChanged)]
    pub fn on_peers_changed(&self, callback: js_sys::Function) {
        let node = self.node.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let mut last = None;
            while !node.stopped.get() {
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

    /// Dials a peer (a multiaddr with `/p2p/<id>`), e.g. the one a join link names.
    pub fn dial(&self, address: String) -> Result<(), JsValue> {
        let addr: Multiaddr = address.parse().map_err(js_err)?;
        self.node.p2p.dial(addr).map_err(js_err)
    }

    /// Cuts every connection and stays offline (`true`), or reconnects (`false`): a page
    /// follows the browser's `offline`/`online` events with it.
    #[wasm_bindgen(js_name = setOffline)]
    pub fn set_offline(&self, offline: bool) -> Result<(), JsValue> {
        self.node.p2p.set_offline(offline).map_err(js_err)
    }

    /// Stops this homeserver for good: the network goes down, requests answer 503, and the
    /// profile's database is closed once a write in flight has finished. Resolves when nothing
    /// more will be written, so that another tab can take the profile over.
    pub fn shutdown(&self) -> Promise {
        let node = self.node.clone();
        future_to_promise(async move {
            node.stopped.set(true);
            node.p2p.shutdown().await;
            node.store.close();
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The whole profile (identity, accounts, rooms, history) as an export file's text.
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

/// Bytes of linear memory the wasm module holds (for memory figures).
#[wasm_bindgen(js_name = wasmMemoryBytes)]
pub fn wasm_memory_bytes() -> f64 {
    wasm_bindgen::memory()
        .unchecked_into::<js_sys::WebAssembly::Memory>()
        .buffer()
        .unchecked_into::<js_sys::ArrayBuffer>()
        .byte_length() as f64
}

/// Imports an export file into the profile `profile`, which must be empty (see
/// [`delete_profile`]).
#[wasm_bindgen(js_name = importProfile)]
pub async fn import_profile(profile: String, data: String) -> Result<u32, JsValue> {
    install_panic_hook();
    let store = IndexedDbStore::open(&profile).await.map_err(js_err)?;
    let n = crate::store::export::import(&store, &data).await;
    store.close();
    n.map(|n| n as u32).map_err(js_err)
}

/// Deletes the profile `profile` and everything in it (no tab may have it open).
#[wasm_bindgen(js_name = deleteProfile)]
pub async fn delete_profile(profile: String) -> Result<(), JsValue> {
    IndexedDbStore::delete(&profile).await.map_err(js_err)
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

/// An upload whose body is a `Blob` (a picked or dropped file): read and stored a slice at a
/// time, so the file is never whole in the module's memory. `None` for any other request.
async fn blob_upload(
    api: &ClientApi,
    input: &JsValue,
    init: &JsValue,
) -> Result<Option<crate::api::ApiResponse>, JsValue> {
    let body = if init.is_object() {
        get(init, "body")
    } else {
        return Ok(None);
    };
    let Some(blob) = body.dyn_ref::<web_sys::Blob>() else {
        return Ok(None);
    };
    let head_init = js_sys::Object::assign(&js_sys::Object::new(), init.unchecked_ref());
    js_sys::Reflect::delete_property(&head_init, &"body".into())?;
    let head = to_api_request(input, &head_init).await?;
    let Some(target) = crate::api::media::upload_target(head.method(), head.uri().path()) else {
        return Ok(None);
    };
    let (mut parts, _) = head.into_parts();
    parts.headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(blob.size() as u64),
    );
    let refused = |e: ApiError| crate::api::json_response(e.status, &e.body());
    let mut upload = match api.begin_upload(&parts, target).await {
        Ok(u) => u,
        Err(e) => return Ok(Some(refused(e))),
    };
    let size = blob.size();
    let mut offset = 0.0;
    while offset < size {
        let end = (offset + crate::media::CHUNK_BYTES as f64 * 4.0).min(size);
        let slice = blob.slice_with_f64_and_f64(offset, end)?;
        let buffer = wasm_bindgen_futures::JsFuture::from(slice.array_buffer()).await?;
        if let Err(e) = upload
            .write(&js_sys::Uint8Array::new(&buffer).to_vec())
            .await
        {
            upload.abort().await;
            return Ok(Some(refused(e)));
        }
        offset = end;
    }
    Ok(Some(
        api.finish_upload(upload).await.unwrap_or_else(refused),
    ))
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
