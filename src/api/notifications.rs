//! What a user was notified of (`/notifications`, from their push rules over the recent
//! events of their rooms) and the pushers their clients register (`/pushers`, `/pushers/set`).
//!
//! Pushers are stored and listed so clients can manage them; Hyphae delivers no pushes to
//! push gateways (a tab cannot, and the node does not yet).

use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::user_data::{decode, key, prefix};
use super::{body_object, ok, url_query, ApiRequest, ApiResponse, ClientApi};
use crate::store::Direction;

/// Recent events per room looked at for notifications.
const SCAN_PER_ROOM: usize = 100;
/// Notifications per page when the client names no limit, and at most.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;
/// Pushers one user may have.
const MAX_PUSHERS: usize = 64;
/// Longest `pushkey`, `app_id` and other pusher strings.
const MAX_FIELD_BYTES: usize = 512;

impl ClientApi {
    /// `GET /notifications`: events that notified the user, newest first.
    pub(super) async fn notifications(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        let q = url_query(req.uri().query().unwrap_or(""));
        let limit = q
            .get("limit")
            .map(|l| l.parse::<usize>())
            .transpose()
            .map_err(|_| ApiError::invalid_param("limit must be a number"))?
            .unwrap_or(DEFAULT_LIMIT)
            .clamp(1, MAX_LIMIT);
        let only_highlight = q.get("only").map(String::as_str) == Some("highlight");
        let before = q
            .get("from")
            .map(|t| {
                t.strip_prefix('n')
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| ApiError::invalid_param("not a notifications token"))
            })
            .transpose()?;
        let engine = self.node.engine();
        let rules = self.push_ruleset(&s.user_id).await?;
        let mut found = Vec::new();
        for room in self.joined_room_ids(&s.user_id).await? {
            let state = self.state_of(&room).await?;
            let reader = self.room_reader(&room, &s.user_id).await?;
            let read_pos = match self.data.receipt_of(&room, &s.user_id).await? {
                Some(id) => match ruma::OwnedEventId::try_from(id) {
                    Ok(id) => engine.event(&id).await?.and_then(|e| e.stream),
                    Err(_) => None,
                },
                None => None,
            };
            let mut notifier = None;
            let events = engine
                .timeline(&room, before, Direction::Backward, SCAN_PER_ROOM)
                .await?;
            for ev in events {
                if ev.pdu.sender == s.user_id || !reader.may_see(&ev).await? {
                    continue;
                }
                if notifier.is_none() {
                    notifier = Some(self.notifier(&room, &state, &s.user_id, &rules).await?);
                }
                let judged = notifier.as_ref().expect("just built").judge(&ev).await;
                if !judged.notify || (only_highlight && !judged.highlight) {
                    continue;
                }
                let pos = ev.stream.unwrap_or(0);
                found.push((pos, room.clone(), ev, judged.highlight, read_pos));
            }
        }
        found.sort_by_key(|n| std::cmp::Reverse(n.0));
        let more = found.len() > limit;
        found.truncate(limit);
        // Only the page is formatted.
        let mut notifications = Vec::with_capacity(found.len());
        for (pos, room, ev, highlight, read_pos) in &found {
            let mut actions = vec![json!("notify")];
            if *highlight {
                actions.push(json!({"set_tweak": "highlight"}));
            }
            notifications.push(json!({
                "actions": actions,
                "event": self.client_format(s, ev).await?,
                "read": read_pos.is_some_and(|r| *pos <= r),
                "room_id": room,
                "ts": ev.pdu.origin_server_ts,
            }));
        }
        let mut out = json!({ "notifications": notifications });
        if more {
            if let Some((pos, ..)) = found.last() {
                out["next_token"] = format!("n{pos}").into();
            }
        }
        ok(out)
    }

    /// `GET /pushers`.
    pub(super) async fn pushers(&self, s: &Session) -> ApiResult<ApiResponse> {
        let mut pushers = Vec::new();
        for (_, v) in self
            .data
            .scan(&prefix(&["pusher", s.user_id.as_str()]))
            .await?
        {
            pushers.push(decode(&v)?);
        }
        ok(json!({ "pushers": pushers }))
    }

    /// `POST /pushers/set`: adds, replaces or (with `kind: null`) removes a pusher.
    pub(super) async fn set_pusher(&self, req: &ApiRequest, s: &Session) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let text = |field: &str| -> ApiResult<String> {
            let v = body
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_json(format!("{field} is required")))?;
            if v.is_empty() || v.len() > MAX_FIELD_BYTES {
                return Err(ApiError::invalid_param(format!(
                    "{field} is 1 to {MAX_FIELD_BYTES} bytes"
                )));
            }
            Ok(v.to_owned())
        };
        let pushkey = text("pushkey")?;
        let app_id = text("app_id")?;
        let k = key(&["pusher", s.user_id.as_str(), &app_id, &pushkey]);
        match body.get("kind") {
            Some(Value::Null) => {
                self.data.delete_value(k).await?;
                return ok(json!({}));
            }
            Some(Value::String(kind)) if kind == "http" || kind == "email" => {}
            _ => return Err(ApiError::bad_json("kind is http, email or null")),
        }
        let mut pusher = serde_json::Map::new();
        for field in ["kind", "app_display_name", "device_display_name", "lang"] {
            pusher.insert(field.into(), text(field)?.into());
        }
        pusher.insert("pushkey".into(), pushkey.into());
        pusher.insert("app_id".into(), app_id.clone().into());
        if let Some(tag) = body.get("profile_tag").and_then(Value::as_str) {
            pusher.insert("profile_tag".into(), tag.into());
        }
        let data = body.get("data").cloned().unwrap_or(json!({}));
        if !data.is_object() || data.to_string().len() > 4 * MAX_FIELD_BYTES {
            return Err(ApiError::bad_json("data is an object of at most 2 KiB"));
        }
        if pusher["kind"] == "http"
            && !data["url"]
                .as_str()
                .is_some_and(|u| u.starts_with("https://") || u.starts_with("http://"))
        {
            return Err(ApiError::bad_json("an http pusher needs data.url"));
        }
        pusher.insert("data".into(), data);
        let existing = self
            .data
            .scan(&prefix(&["pusher", s.user_id.as_str()]))
            .await?;
        let append = body.get("append").and_then(Value::as_bool).unwrap_or(false);
        if !append {
            // Without `append`, this pushkey belongs to this app id alone.
            for (other, v) in &existing {
                let v = decode(v)?;
                if v["pushkey"] == pusher["pushkey"] && v["app_id"] != app_id.as_str() {
                    self.data.delete_value(other.clone()).await?;
                }
            }
        }
        if existing.len() >= MAX_PUSHERS && !existing.iter().any(|(ek, _)| *ek == k) {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_LIMIT_EXCEEDED",
                format!("at most {MAX_PUSHERS} pushers per user"),
            ));
        }
        self.data.put_value(k, &Value::Object(pusher)).await?;
        ok(json!({}))
    }
}
