//! Presence of this server's users: what they set (`online`, `unavailable`, `offline`, and a
//! status message) and when they were last active (any request with their access token), kept
//! in memory as homeservers do. A user is shown to themself and to those sharing a room with
//! them; of users on other peers nothing is known, so they show as offline.

use std::collections::HashMap;

use ruma::{OwnedUserId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::{body_object, ok, ApiRequest, ApiResponse, ClientApi, Duration, Instant};

/// How long after their last request a user still counts as currently active.
const ACTIVE_FOR: Duration = Duration::from_secs(5 * 60);
/// Past this without a request, a user who said they were online shows as offline.
const ONLINE_FOR: Duration = Duration::from_secs(30 * 60);
/// Longest status message.
const MAX_STATUS_BYTES: usize = 1024;

#[derive(Debug, Clone)]
struct Presence {
    set: &'static str,
    status_msg: Option<String>,
    last_active: Instant,
}

#[derive(Default)]
pub(super) struct PresenceMap {
    users: HashMap<OwnedUserId, Presence>,
}

impl PresenceMap {
    /// The user made a request just now.
    pub(super) fn active(&mut self, user: &UserId) {
        let now = Instant::now();
        self.users
            .entry(user.to_owned())
            .and_modify(|p| p.last_active = now)
            .or_insert(Presence {
                set: "online",
                status_msg: None,
                last_active: now,
            });
    }
}

impl ClientApi {
    /// `GET /presence/{user}/status`.
    pub(super) async fn get_presence(&self, s: &Session, user: &str) -> ApiResult<ApiResponse> {
        let user = OwnedUserId::try_from(user)
            .map_err(|e| ApiError::invalid_param(format!("bad user id: {e}")))?;
        if user != s.user_id && !self.shares_room(s, &user).await? {
            return Err(ApiError::forbidden(
                "presence is shown to those who share a room with the user",
            ));
        }
        let known = self
            .presence
            .lock()
            .expect("presence lock")
            .users
            .get(&user)
            .cloned();
        let Some(p) = known else {
            return ok(json!({"presence": "offline"}));
        };
        let idle = p.last_active.elapsed();
        let presence = match p.set {
            "online" if idle > ONLINE_FOR => "offline",
            other => other,
        };
        let mut out = json!({
            "presence": presence,
            "currently_active": presence == "online" && idle < ACTIVE_FOR,
        });
        // Someone who chose to appear offline does not show when they were last around.
        if p.set != "offline" {
            out["last_active_ago"] = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).into();
        }
        if let Some(msg) = p.status_msg {
            out["status_msg"] = msg.into();
        }
        ok(out)
    }

    /// `PUT /presence/{user}/status`: the user's own presence and status message.
    pub(super) async fn set_presence(
        &self,
        req: &ApiRequest,
        s: &Session,
        user: &str,
    ) -> ApiResult<ApiResponse> {
        if user != s.user_id.as_str() {
            return Err(ApiError::forbidden("you may only set your own presence"));
        }
        let body = body_object(req)?;
        let set = match body.get("presence").and_then(Value::as_str) {
            Some("online") => "online",
            Some("unavailable") => "unavailable",
            Some("offline") => "offline",
            _ => {
                return Err(ApiError::bad_json(
                    "presence is online, unavailable or offline",
                ))
            }
        };
        let status_msg = match body.get("status_msg") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) if m.len() <= MAX_STATUS_BYTES => Some(m.clone()),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid_param(format!(
                    "status messages are at most {MAX_STATUS_BYTES} bytes"
                )))
            }
            Some(_) => return Err(ApiError::bad_json("status_msg is a string")),
        };
        self.presence.lock().expect("presence lock").users.insert(
            s.user_id.clone(),
            Presence {
                set,
                status_msg,
                last_active: Instant::now(),
            },
        );
        ok(json!({}))
    }

    /// Whether `other` is joined to a room the session's user is joined to.
    async fn shares_room(&self, s: &Session, other: &UserId) -> ApiResult<bool> {
        let engine = self.node.engine();
        for room in self.joined_room_ids(&s.user_id).await? {
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            if self.membership(&state, other).await?.as_deref() == Some("join") {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
