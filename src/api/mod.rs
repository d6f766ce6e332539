//! The Matrix Client-Server API, independent of any transport: an `http::Request` goes in and
//! an `http::Response` comes out. `hyphae-node` serves it over HTTP (`api::server`); in the
//! browser the wasm module hands it to the page as a `fetch` function, so no request leaves
//! the tab.
//!
//! Requests are parsed with ruma's client-api request types (which also settle what is a bad
//! body); errors are Matrix error JSON (`api::error`).

mod account_changes;
pub mod accounts;
mod directory;
pub mod error;
pub mod events;
mod key_backup;
mod key_data;
pub mod keys;
mod knock;
mod limits;
pub mod media;
mod notifications;
mod passwords;
mod presence;
// Natively the push rules are judged by ruma's evaluator; the tab's (smaller) one is still
// built there, so a test can hold the two to the same answers.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod push_eval;
mod push_rules;
mod room_directory;
mod rooms;
mod search;
#[cfg(not(target_arch = "wasm32"))]
pub mod server;
// Sliding sync is for native clients (Element X, matrix-rust-sdk), none of which can reach a
// tab: the tab's module leaves it out, and stays within its size budget.
#[cfg(not(target_arch = "wasm32"))]
mod sliding_sync;
mod sync;
mod threads;
pub mod to_device;
mod user_data;
mod visibility;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use http::{header, Method, StatusCode};
use ruma::api::{IncomingRequest, IncomingRequestExt};
use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, UserId};
use serde_json::{json, Value};

use crate::net::rt::{Duration, Instant};
use crate::rooms::P2pNode;
use accounts::{check_localpart, Accounts, Session};
use error::{ApiError, ApiResult};
use limits::{KeyedLocks, LoginLimiter};
use user_data::UserData;

/// Largest request body accepted (events are at most 64 KiB; this leaves room for key uploads).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most open user-interactive auth sessions kept in memory (past that the oldest is dropped).
const MAX_UIA_SESSIONS: usize = 10_000;
/// How long a user-interactive auth session stays open.
const UIA_SESSION_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest `/sync` long-poll.
const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

pub type ApiRequest = http::Request<Vec<u8>>;
pub type ApiResponse = http::Response<Vec<u8>>;

/// Who may register new accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Anyone who can reach the API.
    Open,
    /// Clients on this machine (loopback HTTP) and the page in the tab. Any web page open in a
    /// browser on this machine reaches the API from loopback too, so a request a browser sends
    /// for a page (it carries `Origin`) is refused unless it is one of `web_origins`: the
    /// node's own web app and what the operator allows.
    Loopback {
        web_origins: Vec<String>,
    },
    /// Whoever presents this registration token (`m.login.registration_token`).
    Token(String),
    Closed,
}

/// Facts about a request that do not travel in it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller {
    /// The client connects from this machine (or is the page in the tab).
    pub local: bool,
}

/// What a user-interactive auth session was started for: it completes nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UiaPurpose {
    Register,
    DeleteDevice {
        user: OwnedUserId,
        device: String,
    },
    /// Replacing the user's cross-signing keys.
    CrossSigning {
        user: OwnedUserId,
    },
    /// Signing these devices out (sorted, without repeats).
    DeleteDevices {
        user: OwnedUserId,
        devices: Vec<String>,
    },
    ChangePassword {
        user: OwnedUserId,
    },
    Deactivate {
        user: OwnedUserId,
    },
}

/// Who is typing where, with expiry; kept in memory only, like every homeserver does.
#[derive(Default)]
struct Typing {
    rooms: HashMap<OwnedRoomId, (u64, HashMap<OwnedUserId, Instant>)>,
}

pub struct ClientApi {
    node: P2pNode,
    accounts: Accounts,
    data: UserData,
    registration: Registration,
    typing: Mutex<Typing>,
    typing_serial: AtomicU64,
    /// Open user-interactive auth sessions: when each started, and what for.
    uia_sessions: Mutex<HashMap<String, (Instant, UiaPurpose)>>,
    logins: LoginLimiter,
    /// Held while a client transaction (device, txn id) runs, so a retry waits for it.
    txns: KeyedLocks,
    /// Invites to rooms on other peers, with the client-data position they were first seen at.
    seen_invites: Mutex<HashMap<OwnedEventId, u64>>,
    /// Remote invites a user declined, with the client-data position of the decline, so the
    /// next `/sync` moves the room from `invite` to `leave`. Bounded like the invites themselves.
    declined_invites: Mutex<HashMap<(OwnedUserId, OwnedRoomId), u64>>,
    /// Keys of other servers' users, as their servers last answered.
    remote_keys: Mutex<keys::RemoteKeys>,
    /// Uploaded files.
    media: crate::media::MediaStore,
    /// Wakes the to-device outbox (messages were queued).
    outbox_wake: std::sync::Arc<tokio::sync::Notify>,
    /// Who of this server's users is around.
    presence: Mutex<presence::PresenceMap>,
    /// Sliding-sync connections: what each was sent, per `pos`.
    #[cfg(not(target_arch = "wasm32"))]
    sliding: Mutex<sliding_sync::Connections>,
    /// Per room: the stream position last looked at for what moves it up the room list, and
    /// the position of that event.
    #[cfg(not(target_arch = "wasm32"))]
    bumps: Mutex<HashMap<OwnedRoomId, (u64, u64)>>,
    /// This API itself, for tasks it starts (typing expiry) that must not keep it alive.
    me: std::sync::Weak<ClientApi>,
}

fn now() -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch::now()
}

fn now_ms() -> u64 {
    now().get().into()
}

/// The path below `/_matrix/client/<version>/`, percent-decoded, split on `/`.
fn client_path(path: &str) -> Option<Vec<String>> {
    let mut segs = decoded_segments(path.strip_prefix("/_matrix/client/")?);
    if segs.first().map(String::as_str) == Some("versions") {
        return Some(segs);
    }
    match segs.first().map(String::as_str) {
        Some("r0" | "v3" | "v1" | "unstable") => {
            segs.remove(0);
            Some(segs)
        }
        _ => None,
    }
}

/// A path's segments, percent-decoded.
fn decoded_segments(rest: &str) -> Vec<String> {
    rest.split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> ApiResponse {
    let mut resp = http::Response::new(serde_json::to_vec(body).expect("JSON serialises"));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(body: Value) -> ApiResult<ApiResponse> {
    Ok(json_response(StatusCode::OK, &body))
}

pub(crate) fn add_cors(resp: &mut ApiResponse) {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"),
    );
}

/// Parses `req` as the ruma request type `R`, mapping failures to Matrix errors.
fn parse<R: IncomingRequest>(req: &ApiRequest, args: &[&str]) -> ApiResult<R> {
    let mut borrowed = http::Request::new(req.body().as_slice());
    *borrowed.method_mut() = req.method().clone();
    *borrowed.uri_mut() = req.uri().clone();
    *borrowed.headers_mut() = req.headers().clone();
    R::try_from_http_request(borrowed, args).map_err(|e| {
        use ruma::api::error::{DeserializationError, FromHttpRequestError};
        match e {
            FromHttpRequestError::Deserialization(DeserializationError::Query(e)) => {
                ApiError::invalid_param(format!("bad query string: {e}"))
            }
            FromHttpRequestError::Deserialization(DeserializationError::Ident(e)) => {
                ApiError::invalid_param(format!("bad identifier: {e}"))
            }
            other => ApiError::bad_json(other.to_string()),
        }
    })
}

/// A string field the body must have (`M_BAD_JSON` otherwise).
fn required_str<'b>(body: &'b serde_json::Map<String, Value>, field: &str) -> ApiResult<&'b str> {
    body.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_json(format!("{field} is required")))
}

/// The request body as a JSON object (`{}` when empty).
fn body_object(req: &ApiRequest) -> ApiResult<serde_json::Map<String, Value>> {
    if req.body().is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(req.body()) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::bad_json("the body must be a JSON object")),
        Err(e) => Err(ApiError::not_json(e.to_string())),
    }
}

fn access_token(req: &ApiRequest) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        return v
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_owned());
    }
    let query = req.uri().query()?;
    url_query(query).remove("access_token")
}

fn url_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (!k.is_empty()).then(|| (dec(k), dec(v)))
        })
        .collect()
}

/// The form origins are compared in: what browsers send in `Origin` (`scheme://host[:port]`,
/// lowercase, no trailing slash).
pub fn normalise_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Refuses a request a browser sent for a web page (it carries `Origin`) unless the page's
/// origin is one of `allowed`. Clients that are not web pages send no `Origin`.
fn check_web_origin(req: &ApiRequest, allowed: &[String]) -> ApiResult<()> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = String::from_utf8_lossy(origin.as_bytes());
    let normal = normalise_origin(&origin);
    if allowed.iter().any(|a| normalise_origin(a) == normal) {
        return Ok(());
    }
    let shown: String = origin.chars().take(200).collect();
    Err(ApiError::forbidden(format!(
        "registration from web pages is open only to this node's own web app, and {shown} is \
         not it; the node's operator can allow that origin with --allow-origin {shown}"
    )))
}

/// Applies the typing notices and receipts peers send, until the node or the API is gone.
async fn apply_edus(
    api: std::sync::Weak<ClientApi>,
    edus: &mut tokio::sync::broadcast::Receiver<crate::net::protocol::Edu>,
) {
    loop {
        let edu = match edus.recv().await {
            Ok(edu) => edu,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "typing/receipt notices dropped");
                continue;
            }
            Err(_) => return,
        };
        let Some(api) = api.upgrade() else { return };
        if let Err(e) = api.apply_edu(edu).await {
            tracing::debug!(error = %e.message, "peer EDU not applied");
        }
    }
}

impl ClientApi {
    /// Serves the Client-Server API for the users of `node`.
    async fn new(node: P2pNode, registration: Registration) -> ApiResult<Self> {
        let store = node.engine().store().clone();
        Ok(Self {
            accounts: Accounts::new(store.clone()),
            media: crate::media::MediaStore::new(store.clone()),
            data: UserData::open(store).await?,
            node,
            registration,
            typing: Mutex::new(Typing::default()),
            typing_serial: AtomicU64::new(1),
            uia_sessions: Mutex::new(HashMap::new()),
            logins: LoginLimiter::default(),
            txns: KeyedLocks::default(),
            seen_invites: Mutex::new(HashMap::new()),
            declined_invites: Mutex::new(HashMap::new()),
            remote_keys: Mutex::new(keys::RemoteKeys::default()),
            outbox_wake: std::sync::Arc::new(tokio::sync::Notify::new()),
            #[cfg(not(target_arch = "wasm32"))]
            sliding: Mutex::default(),
            presence: Mutex::default(),
            #[cfg(not(target_arch = "wasm32"))]
            bumps: Mutex::default(),
            me: std::sync::Weak::new(),
        })
    }

    /// Serves the API and applies the typing notices and receipts peers send for their users.
    pub async fn start(
        node: P2pNode,
        registration: Registration,
    ) -> ApiResult<std::sync::Arc<Self>> {
        // One type on both targets: in the tab there is a single thread and nothing is sent
        // across threads, so Arc's atomics are merely unneeded there.
        let mut api = Self::new(node, registration).await?;
        let swept = api
            .media
            .sweep()
            .await
            .map_err(|e| ApiError::unknown(e.to_string()))?;
        if swept > 0 {
            tracing::info!(swept, "deleted uploads a stop interrupted");
        }
        #[allow(clippy::arc_with_non_send_sync)]
        let api = std::sync::Arc::new_cyclic(|me| {
            api.me = me.clone();
            api
        });
        let weak = std::sync::Arc::downgrade(&api);
        // A notice that trips a bug must not end typing and receipts for good: restart.
        crate::net::rt::spawn_restarting("peer EDUs", api.node.edus(), move |edus| {
            Box::pin(apply_edus(weak.clone(), edus))
        });
        if let Some(requests) = api.node.take_device_requests() {
            let weak = std::sync::Arc::downgrade(&api);
            crate::net::rt::spawn_restarting("peer device requests", requests, move |requests| {
                Box::pin(keys::serve_device_requests(weak.clone(), requests))
            });
        }
        let weak = std::sync::Arc::downgrade(&api);
        crate::net::rt::spawn_restarting(
            "remote keys on reconnect",
            api.node.connected_peer_events(),
            move |connected| Box::pin(keys::forget_keys_on_reconnect(weak.clone(), connected)),
        );
        let waker = to_device::OutboxWaker {
            connected: api.node.connected_peer_events(),
        };
        let weak = std::sync::Arc::downgrade(&api);
        crate::net::rt::spawn_restarting("to-device outbox", waker, move |waker| {
            Box::pin(to_device::deliver_outbox(weak.clone(), waker))
        });
        Ok(api)
    }

    async fn apply_edu(&self, edu: crate::net::protocol::Edu) -> ApiResult<()> {
        use crate::net::protocol::Edu;
        let state = self.state_of(edu.room_id()).await?;
        if self.membership(&state, edu.user_id()).await?.as_deref() != Some("join") {
            return Err(ApiError::forbidden("EDU from a user not in the room"));
        }
        match edu {
            Edu::Typing {
                room_id,
                user_id,
                typing,
            } => {
                let until = typing.then(|| Instant::now() + Duration::from_secs(30));
                self.set_typing(&room_id, &user_id, until);
            }
            Edu::Receipt {
                room_id,
                user_id,
                event_id,
            } => self.remote_receipt(&room_id, &user_id, &event_id).await?,
        }
        Ok(())
    }

    pub fn node(&self) -> &P2pNode {
        &self.node
    }

    /// Answers one request. Never fails: errors become Matrix error responses.
    pub async fn handle(&self, req: ApiRequest, caller: Caller) -> ApiResponse {
        let mut resp = if req.method() == Method::OPTIONS {
            json_response(StatusCode::OK, &json!({}))
        } else if self.node.is_stopped() {
            let e = ApiError::stopped();
            json_response(e.status, &e.body())
        } else if let Some(target) = media::upload_target(req.method(), req.uri().path()) {
            self.upload_whole(req, target).await.unwrap_or_else(|e| {
                tracing::debug!(errcode = e.errcode, error = %e.message, "upload refused");
                json_response(e.status, &e.body())
            })
        } else if req.body().len() > MAX_BODY_BYTES {
            let e = ApiError::too_large(MAX_BODY_BYTES);
            json_response(e.status, &e.body())
        } else {
            match self.route(&req, caller).await {
                Ok(resp) => resp,
                Err(e) => {
                    if e.status.is_server_error() {
                        tracing::warn!(method = %req.method(), path = req.uri().path(), error = %e.message, "request failed");
                    } else {
                        tracing::debug!(method = %req.method(), path = req.uri().path(), errcode = e.errcode, "request refused");
                    }
                    json_response(e.status, &e.body())
                }
            }
        };
        add_cors(&mut resp);
        resp
    }

    async fn session(&self, req: &ApiRequest) -> ApiResult<Session> {
        let token = access_token(req).ok_or_else(ApiError::missing_token)?;
        self.accounts.authenticate(&token).await
    }

    async fn route(&self, req: &ApiRequest, caller: Caller) -> ApiResult<ApiResponse> {
        if req.uri().path() == "/.well-known/matrix/client" {
            return match *req.method() {
                Method::GET => self.well_known(req),
                _ => Err(ApiError::unrecognized(StatusCode::METHOD_NOT_ALLOWED)),
            };
        }
        let Some(segs) = client_path(req.uri().path()) else {
            if let Some(segs) = media::media_path(req.uri().path()) {
                let path: Vec<&str> = segs.iter().map(String::as_str).collect();
                return self.legacy_media_route(req, &path).await;
            }
            return Err(ApiError::unrecognized(StatusCode::NOT_FOUND));
        };
        // Bodies of writes must be JSON before anything else is looked at.
        if matches!(*req.method(), Method::POST | Method::PUT) && !req.body().is_empty() {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(req.body()) {
                return Err(ApiError::not_json(format!("body is not JSON: {e}")));
            }
        }
        let path: Vec<&str> = segs.iter().map(String::as_str).collect();
        let m = req.method().clone();
        use Method as M;
        // Endpoints that need no access token.
        match (&m, path.as_slice()) {
            (&M::GET, ["versions"]) => return self.versions(),
            (&M::GET, ["login"]) => {
                return ok(json!({"flows": [{"type": "m.login.password"}]}));
            }
            (&M::POST, ["login"]) => return self.login(req).await,
            (&M::POST, ["register"]) => return self.register(req, caller).await,
            (&M::GET, ["register", "available"]) => return self.username_available(req).await,
            (&M::GET, ["profile", user]) => return self.get_profile(req, user, None).await,
            (&M::GET, ["profile", user, field]) => {
                return self.get_profile(req, user, Some(field)).await
            }
            (&M::GET, ["directory", "room", alias]) => return self.get_alias(alias).await,
            (&M::GET, ["publicRooms"]) => return self.public_rooms(req).await,
            (&M::GET, ["directory", "list", "room", room]) => {
                return self.room_visibility(room).await
            }
            _ => {}
        }
        if matches!(
            path.as_slice(),
            ["versions"] | ["login"] | ["register"] | ["register", "available"]
        ) {
            return Err(ApiError::unrecognized(StatusCode::METHOD_NOT_ALLOWED));
        }
        let known = self.is_known_path(&path);
        let session = match self.session(req).await {
            Ok(s) => s,
            // Unknown endpoints are unknown whoever asks.
            Err(_) if !known => return Err(ApiError::unrecognized(StatusCode::NOT_FOUND)),
            Err(e) => return Err(e),
        };
        let s = &session;
        self.presence
            .lock()
            .expect("presence lock")
            .active(&s.user_id);
        let resp = match (&m, path.as_slice()) {
            (_, ["media", rest @ ..]) => self.media_route(req, s, rest).await,
            (&M::POST, ["user_directory", "search"]) => self.search_users(req, s).await,
            (&M::GET, ["account", "whoami"]) => ok(json!({
                "user_id": s.user_id, "device_id": s.device_id, "is_guest": false
            })),
            (&M::POST, ["logout"]) => self.logout(s, false).await,
            (&M::POST, ["logout", "all"]) => self.logout(s, true).await,
            (&M::GET, ["devices"]) => self.devices(s).await,
            (&M::GET, ["devices", device]) => self.device(s, device).await,
            (&M::PUT, ["devices", device]) => self.rename_device(req, s, device).await,
            (&M::DELETE, ["devices", device]) => self.delete_device(req, s, device).await,
            (&M::POST, ["delete_devices"]) => self.delete_devices(req, s).await,
            (&M::POST, ["account", "password"]) => self.change_password(req, s).await,
            (&M::POST, ["account", "deactivate"]) => self.deactivate(req, s).await,
            (&M::GET, ["capabilities"]) => self.capabilities(),
            (_, ["pushrules", rest @ ..]) => self.push_rules_route(req, s, rest).await,
            (&M::GET, ["voip", "turnServer"]) => ok(json!({})),
            (&M::GET, ["sync"]) => self.sync(req, s).await,
            (&M::POST, ["org.matrix.simplified_msc3575", "sync"]) => {
                #[cfg(not(target_arch = "wasm32"))]
                let answer = self.sliding_sync(req, s).await;
                #[cfg(target_arch = "wasm32")]
                let answer = Err(ApiError::unrecognized(StatusCode::NOT_FOUND));
                answer
            }
            (&M::POST, ["createRoom"]) => self.create_room(req, s).await,
            (&M::POST, ["join", target]) => {
                use ruma::api::client::membership::join_room_by_id_or_alias::v3::Request;
                parse::<Request>(req, &[target])?;
                self.join(req, s, target).await
            }
            (&M::POST, ["rooms", room, "join"]) => {
                use ruma::api::client::membership::join_room_by_id::v3::Request;
                parse::<Request>(req, &[room])?;
                self.join(req, s, room).await
            }
            (&M::POST, ["rooms", room, "invite"]) => self.invite(req, s, room).await,
            (&M::POST, ["rooms", room, "leave"]) => self.leave(req, s, room).await,
            (&M::POST, ["rooms", room, "forget"]) => self.forget(s, room).await,
            (&M::POST, ["rooms", room, action @ ("kick" | "ban" | "unban")]) => {
                self.moderate(req, s, room, action).await
            }
            (&M::PUT, ["rooms", room, "send", kind, txn]) => {
                self.send_event(req, s, room, kind, txn).await
            }
            (&M::PUT, ["rooms", room, "state", kind]) => {
                self.put_state(req, s, room, kind, "").await
            }
            (&M::PUT, ["rooms", room, "state", kind, key]) => {
                self.put_state(req, s, room, kind, key).await
            }
            (&M::GET, ["rooms", room, "state"]) => self.get_state(s, room, None).await,
            (&M::GET, ["rooms", room, "state", kind]) => {
                self.get_state(s, room, Some((kind, ""))).await
            }
            (&M::GET, ["rooms", room, "state", kind, key]) => {
                self.get_state(s, room, Some((kind, key))).await
            }
            (&M::GET, ["rooms", room, "event", event]) => self.get_event(s, room, event).await,
            (&M::GET, ["rooms", room, "context", event]) => self.context(req, s, room, event).await,
            (&M::PUT, ["rooms", room, "redact", event, txn]) => {
                self.redact(req, s, room, event, txn).await
            }
            (&M::GET, ["rooms", room, "members"]) => self.members(req, s, room).await,
            (&M::GET, ["rooms", room, "joined_members"]) => self.joined_members(s, room).await,
            (&M::GET, ["joined_rooms"]) => self.joined_rooms(s).await,
            (&M::GET, ["rooms", room, "messages"]) => self.messages(req, s, room).await,
            (&M::POST, ["search"]) => self.search(req, s).await,
            (&M::POST, ["knock", target]) => self.knock(req, s, target).await,
            (&M::GET, ["rooms", room, "timestamp_to_event"]) => {
                self.timestamp_to_event(req, s, room).await
            }
            // No third-party ids (email, phone) are kept: none to list, none to add.
            (&M::GET, ["account", "3pid"]) => ok(json!({"threepids": []})),
            (&M::GET, ["notifications"]) => self.notifications(req, s).await,
            (&M::GET, ["pushers"]) => self.pushers(s).await,
            (&M::POST, ["pushers", "set"]) => self.set_pusher(req, s).await,
            (&M::POST, ["publicRooms"]) => self.public_rooms(req).await,
            (&M::PUT, ["directory", "list", "room", room]) => {
                self.set_room_visibility(req, s, room).await
            }
            (&M::GET, ["rooms", room, "aliases"]) => self.room_aliases(s, room).await,
            (&M::GET, ["rooms", room, "hierarchy"]) => self.hierarchy(req, s, room).await,
            (&M::GET, ["rooms", room, "threads"]) => self.threads(req, s, room).await,
            (&M::GET, ["rooms", room, "relations", event, rest @ ..]) if rest.len() <= 2 => {
                self.relations(req, s, room, event, rest).await
            }
            (&M::PUT, ["directory", "room", alias]) => self.put_alias(req, s, alias).await,
            (&M::DELETE, ["directory", "room", alias]) => self.delete_alias(s, alias).await,
            (&M::PUT, ["profile", user, field]) => self.put_profile(req, s, user, field).await,
            (&M::PUT, ["rooms", room, "typing", user]) => self.typing(req, s, room, user).await,
            (&M::POST, ["rooms", room, "receipt", kind, event]) => {
                self.receipt(req, s, room, kind, event).await
            }
            (&M::POST, ["rooms", room, "read_markers"]) => self.read_markers(req, s, room).await,
            (&M::PUT, ["user", user, "account_data", kind]) => {
                self.put_account_data(req, s, user, None, kind).await
            }
            (&M::GET, ["user", user, "account_data", kind]) => {
                self.get_account_data(s, user, None, kind).await
            }
            (&M::PUT, ["user", user, "rooms", room, "account_data", kind]) => {
                self.put_account_data(req, s, user, Some(room), kind).await
            }
            (&M::GET, ["user", user, "rooms", room, "account_data", kind]) => {
                self.get_account_data(s, user, Some(room), kind).await
            }
            (&M::GET, ["user", user, "rooms", room, "tags"]) => self.tags(s, user, room).await,
            (&M::PUT, ["user", user, "rooms", room, "tags", tag]) => {
                self.set_tag(Some(req), s, user, room, tag).await
            }
            (&M::DELETE, ["user", user, "rooms", room, "tags", tag]) => {
                self.set_tag(None, s, user, room, tag).await
            }
            (&M::POST, ["user", user, "filter"]) => self.create_filter(req, s, user).await,
            (&M::GET, ["user", user, "filter", id]) => self.get_filter(s, user, id).await,
            (&M::POST, ["keys", "upload"]) => self.upload_keys(req, s).await,
            (&M::POST, ["keys", "query"]) => self.query_keys(req, s).await,
            (&M::POST, ["keys", "claim"]) => self.claim_keys(req, s).await,
            (&M::GET, ["keys", "changes"]) => self.key_changes(req, s).await,
            (&M::POST, ["keys", "device_signing", "upload"]) => {
                self.upload_cross_signing(req, s).await
            }
            (&M::POST, ["keys", "signatures", "upload"]) => self.upload_signatures(req, s).await,
            (_, ["room_keys", ..]) => self.room_keys(req, s, &path[1..]).await,
            (&M::PUT, ["sendToDevice", kind, txn]) => self.send_to_device(req, s, kind, txn).await,
            (&M::GET, ["presence", user, "status"]) => self.get_presence(s, user).await,
            (&M::PUT, ["presence", user, "status"]) => self.set_presence(req, s, user).await,
            _ if known => Err(ApiError::unrecognized(StatusCode::METHOD_NOT_ALLOWED)),
            _ => Err(ApiError::unrecognized(StatusCode::NOT_FOUND)),
        };
        resp
    }

    /// Whether some method is served at `path` (so a wrong method gets 405, not 404).
    fn is_known_path(&self, path: &[&str]) -> bool {
        matches!(
            path,
            ["versions"]
                | ["login"]
                | ["logout"]
                | ["logout", "all"]
                | ["register"]
                | ["register", "available"]
                | ["account", "whoami" | "password" | "deactivate"]
                | ["delete_devices"]
                | ["devices"]
                | ["devices", _]
                | ["capabilities"]
                | ["pushrules", ..]
                | ["voip", "turnServer"]
                | ["sync"]
                | ["org.matrix.simplified_msc3575", "sync"]
                | ["createRoom"]
                | ["join", _]
                | ["joined_rooms"]
                | [
                    "rooms",
                    _,
                    "join" | "invite" | "leave" | "forget" | "kick" | "ban" | "unban"
                ]
                | ["rooms", _, "send", _, _]
                | ["rooms", _, "state", ..]
                | ["rooms", _, "event" | "context", _]
                | ["rooms", _, "redact", _, _]
                | [
                    "rooms",
                    _,
                    "members" | "joined_members" | "messages" | "read_markers"
                ]
                | ["rooms", _, "relations", ..]
                | ["rooms", _, "threads"]
                | ["search"]
                | ["knock", _]
                | ["notifications"]
                | ["pushers"]
                | ["pushers", "set"]
                | ["publicRooms"]
                | ["directory", "list", "room", _]
                | ["rooms", _, "aliases" | "hierarchy" | "timestamp_to_event"]
                | ["account", "3pid"]
                | ["rooms", _, "typing", _]
                | ["rooms", _, "receipt", _, _]
                | ["directory", "room", _]
                | ["profile", ..]
                | ["user", _, "account_data", _]
                | ["user", _, "rooms", _, "account_data", _]
                | ["user", _, "rooms", _, "tags", ..]
                | ["user", _, "filter", ..]
                | ["keys", "upload" | "query" | "claim" | "changes"]
                | ["keys", "device_signing" | "signatures", "upload"]
                | ["room_keys", ..]
                | ["sendToDevice", _, _]
                | ["presence", _, "status"]
                | [
                    "media",
                    "config" | "preview_url" | "download" | "thumbnail",
                    ..
                ]
        )
    }

    fn versions(&self) -> ApiResult<ApiResponse> {
        ok(json!({
            "versions": ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12"],
            // Only what is served: the tab leaves sliding sync out.
            "unstable_features": {
                "org.matrix.simplified_msc3575": cfg!(not(target_arch = "wasm32")),
            }
        }))
    }

    /// `/.well-known/matrix/client`: this API is where the client reached it (behind a proxy
    /// that says so, over HTTPS).
    fn well_known(&self, req: &ApiRequest) -> ApiResult<ApiResponse> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .ok_or_else(|| ApiError::not_found("no host to name"))?;
        let scheme = match req.headers().get("x-forwarded-proto").map(|v| v.as_bytes()) {
            Some(b"https") => "https",
            Some(_) => "http",
            None => req.uri().scheme_str().unwrap_or("http"),
        };
        ok(json!({"m.homeserver": {"base_url": format!("{scheme}://{host}")}}))
    }

    fn capabilities(&self) -> ApiResult<ApiResponse> {
        let available: serde_json::Map<String, Value> =
            (3..=12).map(|v| (v.to_string(), json!("stable"))).collect();
        ok(json!({"capabilities": {
            "m.room_versions": {"default": "12", "available": available},
            "m.change_password": {"enabled": true},
            "m.set_displayname": {"enabled": true},
            "m.set_avatar_url": {"enabled": true},
            "m.3pid_changes": {"enabled": false},
        }}))
    }

    // ---- accounts -------------------------------------------------------------------------

    /// Checks `user`'s password. Each attempt is counted by the failed-login limiter before
    /// the password is checked, and the check runs on the password workers.
    async fn check_user_password(&self, user: &UserId, password: &str) -> ApiResult<()> {
        let wrong = || ApiError::forbidden("wrong user name or password");
        // An account that does not exist has no password to guess: nothing to count.
        let record = self.accounts.user(user).await?.ok_or_else(wrong)?;
        if record.deactivated {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "M_USER_DEACTIVATED",
                "this account was deactivated",
            ));
        }
        let attempt = self.logins.begin(user)?;
        match self.accounts.password_matches(&record, password).await {
            Ok(true) => {
                attempt.uncount();
                Ok(())
            }
            // A wrong password: the attempt stays counted.
            Ok(false) => Err(wrong()),
            Err(not_checked) => {
                attempt.uncount();
                Err(not_checked)
            }
        }
    }

    /// Holds the client transaction `txn` of the session's device: a retry that arrives while
    /// the first request still runs waits for it, then finds what it stored.
    pub(super) async fn txn_lock(&self, s: &Session, txn: &str) -> limits::KeyedGuard {
        let key = format!("{}\0{}\0{txn}", s.user_id, s.device_id);
        self.txns.lock(key).await
    }

    /// Opens a user-interactive auth session for `purpose` and answers 401 with its flow.
    fn uia_challenge(&self, stage: &str, purpose: UiaPurpose) -> ApiResponse {
        let session = format!("{:016x}", rand::random::<u64>());
        let mut sessions = self.uia_sessions.lock().expect("uia sessions");
        if sessions.len() >= MAX_UIA_SESSIONS {
            sessions.retain(|_, (started, _)| started.elapsed() < UIA_SESSION_LIFETIME);
        }
        if sessions.len() >= MAX_UIA_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, (started, _))| *started)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(session.clone(), (Instant::now(), purpose));
        drop(sessions);
        json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"flows": [{"stages": [stage]}], "params": {}, "session": session}),
        )
    }

    /// Whether `session` is an open user-interactive auth session for `purpose`.
    fn uia_open(&self, session: Option<&str>, purpose: &UiaPurpose) -> bool {
        let Some(session) = session else { return false };
        let sessions = self.uia_sessions.lock().expect("uia sessions");
        sessions
            .get(session)
            .is_some_and(|(started, p)| p == purpose && started.elapsed() < UIA_SESSION_LIFETIME)
    }

    /// Closes `session` if it is open for `purpose`, and says whether it was: a session
    /// completes one request only.
    fn uia_take(&self, session: &str, purpose: &UiaPurpose) -> bool {
        let mut sessions = self.uia_sessions.lock().expect("uia sessions");
        match sessions.get(session) {
            Some((started, p)) if p == purpose => {
                let fresh = started.elapsed() < UIA_SESSION_LIFETIME;
                sessions.remove(session);
                fresh
            }
            _ => false,
        }
    }

    /// A user id on this server from a localpart or a full id; other servers' users are refused.
    fn local_user(&self, name: &str) -> ApiResult<OwnedUserId> {
        let id = if name.starts_with('@') {
            OwnedUserId::try_from(name).map_err(|e| ApiError::invalid_username(e.to_string()))?
        } else {
            self.node
                .user_checked(name)
                .map_err(ApiError::invalid_username)?
        };
        if id.server_name().as_str() != self.node.server_name().to_string() {
            return Err(ApiError::forbidden("that user is not on this server"));
        }
        Ok(id)
    }

    async fn login(&self, req: &ApiRequest) -> ApiResult<ApiResponse> {
        use ruma::api::client::session::login::v3::{LoginInfo, Request};
        // ruma's login parser assumes `type` is present.
        if !body_object(req)?.get("type").is_some_and(Value::is_string) {
            return Err(ApiError::bad_json("`type` is required"));
        }
        let r: Request = parse(req, &[])?;
        let LoginInfo::Password(p) = r.login_info else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "only m.login.password is supported",
            ));
        };
        #[allow(deprecated)]
        let name = match (&p.identifier, &p.user) {
            (Some(ruma::api::client::uiaa::UserIdentifier::Matrix(m)), _) => m.user.clone(),
            (None, Some(u)) => u.clone(),
            (None, None) => return Err(ApiError::bad_json("`identifier` is required")),
            _ => return Err(ApiError::forbidden("log in with a user name")),
        };
        let user = self
            .local_user(&name)
            .map_err(|_| ApiError::forbidden("wrong user name or password"))?;
        self.check_user_password(&user, &p.password).await?;
        let s = self
            .accounts
            .login(&user, r.device_id, r.initial_device_display_name, now_ms())
            .await?;
        self.session_response(&s)
    }

    async fn register(&self, req: &ApiRequest, caller: Caller) -> ApiResult<ApiResponse> {
        use ruma::api::client::account::register::{v3::Request, RegistrationKind};
        use ruma::api::client::uiaa::AuthData;
        let r: Request = parse(req, &[])?;
        if r.kind == RegistrationKind::Guest {
            return Err(ApiError::forbidden("guest access is not offered"));
        }
        let stage = match &self.registration {
            Registration::Closed => return Err(ApiError::forbidden("registration is closed")),
            Registration::Loopback { .. } if !caller.local => {
                return Err(ApiError::forbidden(
                    "registration is open to clients on this machine only",
                ))
            }
            Registration::Loopback { web_origins } => {
                check_web_origin(req, web_origins)?;
                "m.login.dummy"
            }
            Registration::Token(_) => "m.login.registration_token",
            Registration::Open => "m.login.dummy",
        };
        let session_ok = match &r.auth {
            // Where the dummy stage is the only one, it proves nothing a session would: a
            // client may complete it without asking for one first (as Synapse allows, and as
            // matrix-rust-sdk's test clients do).
            Some(AuthData::Dummy(d)) if stage == "m.login.dummy" => {
                if let Some(sess) = &d.session {
                    self.uia_take(sess, &UiaPurpose::Register);
                }
                true
            }
            Some(AuthData::RegistrationToken(t)) => match &self.registration {
                Registration::Token(want) if *want == t.token => t
                    .session
                    .as_ref()
                    .is_some_and(|sess| self.uia_take(sess, &UiaPurpose::Register)),
                _ => return Err(ApiError::forbidden("wrong registration token")),
            },
            _ => false,
        };
        let localpart = match &r.username {
            Some(u) => u.to_lowercase(),
            None => format!("user{}", rand::random::<u32>()),
        };
        check_localpart(&localpart)?;
        let user = self.local_user(&localpart)?;
        if self.accounts.user(&user).await?.is_some() {
            return Err(ApiError::user_in_use());
        }
        if !session_ok {
            return Ok(self.uia_challenge(stage, UiaPurpose::Register));
        }
        let password = r
            .password
            .ok_or_else(|| ApiError::bad_json("a password is required"))?;
        self.accounts.create_user(&user, &password).await?;
        if r.inhibit_login {
            return ok(json!({"user_id": user}));
        }
        let s = self
            .accounts
            .login(&user, r.device_id, r.initial_device_display_name, now_ms())
            .await?;
        self.session_response(&s)
    }

    /// What `/login` and `/register` answer with a new session.
    fn session_response(&self, s: &Session) -> ApiResult<ApiResponse> {
        ok(json!({
            "user_id": s.user_id, "access_token": s.access_token, "device_id": s.device_id,
            "home_server": self.node.server_name().to_string(),
        }))
    }

    async fn username_available(&self, req: &ApiRequest) -> ApiResult<ApiResponse> {
        use ruma::api::client::account::get_username_availability::v3::Request;
        let r: Request = parse(req, &[])?;
        check_localpart(&r.username)?;
        let user = self.local_user(&r.username)?;
        if self.accounts.user(&user).await?.is_some() {
            return Err(ApiError::user_in_use());
        }
        ok(json!({"available": true}))
    }

    async fn logout(&self, s: &Session, all: bool) -> ApiResult<ApiResponse> {
        let devices = self.accounts.devices(&s.user_id).await?;
        let gone: Vec<_> = devices
            .into_iter()
            .filter(|d| all || d.device_id == s.device_id)
            .collect();
        self.accounts.remove_devices(&s.user_id, &gone).await?;
        let ids: Vec<String> = gone.iter().map(|d| d.device_id.to_string()).collect();
        self.devices_removed(&s.user_id, &ids).await?;
        ok(json!({}))
    }

    async fn devices(&self, s: &Session) -> ApiResult<ApiResponse> {
        let devices: Vec<Value> = self
            .accounts
            .devices(&s.user_id)
            .await?
            .into_iter()
            .map(|d| json!({"device_id": d.device_id, "display_name": d.display_name, "last_seen_ts": d.last_seen_ts}))
            .collect();
        ok(json!({ "devices": devices }))
    }

    async fn device(&self, s: &Session, device: &str) -> ApiResult<ApiResponse> {
        let d = self
            .accounts
            .device(&s.user_id, device)
            .await?
            .ok_or_else(|| ApiError::not_found("no such device"))?;
        ok(
            json!({"device_id": d.device_id, "display_name": d.display_name, "last_seen_ts": d.last_seen_ts}),
        )
    }

    async fn rename_device(
        &self,
        req: &ApiRequest,
        s: &Session,
        device: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::device::update_device::v3::Request;
        let r: Request = parse(req, &[device])?;
        self.accounts
            .rename_device(&s.user_id, device, r.display_name)
            .await?;
        ok(json!({}))
    }

    /// Deletes a device once the user has given their password again (user-interactive auth,
    /// `m.login.password`): an access token alone does not end other sessions.
    async fn delete_device(
        &self,
        req: &ApiRequest,
        s: &Session,
        device: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::device::delete_device::v3::Request;
        let r: Request = parse(req, &[device])?;
        let d = self
            .accounts
            .device(&s.user_id, device)
            .await?
            .ok_or_else(|| ApiError::not_found("no such device"))?;
        let purpose = UiaPurpose::DeleteDevice {
            user: s.user_id.clone(),
            device: device.to_owned(),
        };
        if let Some(challenge) = self.password_uia(r.auth, s, purpose).await? {
            return Ok(challenge);
        }
        self.accounts.remove_devices(&s.user_id, &[d]).await?;
        self.devices_removed(&s.user_id, &[device.to_owned()])
            .await?;
        ok(json!({}))
    }

    /// User-interactive auth by password for `purpose`: `None` once the user has given their
    /// password in a session opened for it, else the challenge to answer with.
    async fn password_uia(
        &self,
        auth: Option<ruma::api::client::uiaa::AuthData>,
        s: &Session,
        purpose: UiaPurpose,
    ) -> ApiResult<Option<ApiResponse>> {
        use ruma::api::client::uiaa::{AuthData, UserIdentifier};
        let auth = match auth {
            Some(AuthData::Password(p)) if self.uia_open(p.session.as_deref(), &purpose) => p,
            _ => return Ok(Some(self.uia_challenge("m.login.password", purpose))),
        };
        let UserIdentifier::Matrix(id) = &auth.identifier else {
            return Err(ApiError::forbidden("authenticate with your user name"));
        };
        if self.local_user(&id.user).ok().as_ref() != Some(&s.user_id) {
            return Err(ApiError::forbidden("that is not your account"));
        }
        self.check_user_password(&s.user_id, &auth.password).await?;
        if let Some(session) = &auth.session {
            self.uia_take(session, &purpose);
        }
        Ok(None)
    }

    // ---- typing ---------------------------------------------------------------------------

    /// Records (or clears) a typing notice. A notice that runs out wakes `/sync` again: the
    /// serial moves when it expires, so clients see the user stop typing.
    fn set_typing(&self, room: &ruma::RoomId, user: &UserId, until: Option<Instant>) {
        let already_typing = self
            .typing
            .lock()
            .expect("typing lock")
            .rooms
            .get(room)
            .is_some_and(|(_, users)| users.contains_key(user));
        self.record_typing(room, user, until);
        // One expiry task per user typing in a room, however often the notice is renewed: it
        // sleeps until the latest deadline and clears the notice once that has passed.
        if until.is_none() || already_typing {
            return;
        }
        let weak = self.me.clone();
        let (room, user) = (room.to_owned(), user.to_owned());
        crate::net::rt::spawn(async move {
            loop {
                let deadline = {
                    let Some(api) = weak.upgrade() else { return };
                    let typing = api.typing.lock().expect("typing lock");
                    match typing
                        .rooms
                        .get(&room)
                        .and_then(|(_, users)| users.get(&user))
                    {
                        Some(until) => *until,
                        None => return,
                    }
                };
                if deadline <= Instant::now() {
                    if let Some(api) = weak.upgrade() {
                        api.record_typing(&room, &user, None);
                    }
                    return;
                }
                crate::net::rt::sleep(deadline.saturating_duration_since(Instant::now())).await;
            }
        });
    }

    fn record_typing(&self, room: &ruma::RoomId, user: &UserId, until: Option<Instant>) {
        let serial = self.typing_serial.fetch_add(1, Ordering::SeqCst) + 1;
        let mut typing = self.typing.lock().expect("typing lock");
        let entry = typing.rooms.entry(room.to_owned()).or_default();
        entry.0 = serial;
        match until {
            Some(t) => {
                entry.1.insert(user.to_owned(), t);
            }
            None => {
                entry.1.remove(user);
            }
        }
        drop(typing);
        self.node.changed();
    }

    /// Users typing in `room` now, and the serial of the room's last typing change.
    fn typing_in(&self, room: &ruma::RoomId) -> (u64, Vec<OwnedUserId>) {
        let mut typing = self.typing.lock().expect("typing lock");
        let Some((serial, users)) = typing.rooms.get_mut(room) else {
            return (0, Vec::new());
        };
        let now = Instant::now();
        users.retain(|_, until| *until > now);
        let mut list: Vec<OwnedUserId> = users.keys().cloned().collect();
        list.sort();
        (*serial, list)
    }
}
