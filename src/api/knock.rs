//! Knocking (`POST /knock/{roomIdOrAlias}`): asking to be let into a room whose join rule is
//! `knock` (room versions 7 and later). A room held here takes the knock as a local event; a
//! room on other peers gets it through one of the `via` servers, whose answer (the room's
//! stripped state) is kept so `/sync` shows the room under `rooms.knock` until the user is
//! invited or let in — or takes the knock back by leaving, which here forgets it (the room
//! keeps the knock until a member answers it).

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::rooms::room_id;
use super::user_data::{decode, key, prefix};
use super::{body_object, ok, ApiRequest, ApiResponse, ClientApi};
use crate::identity::ServerName;
use crate::rooms::knock::MAX_REASON_BYTES;

/// Knocks on other peers' rooms one user may have waiting.
const MAX_PENDING_KNOCKS: usize = 100;

/// Every `via` / `server_name` value of a request's query (the key may repeat).
pub(super) fn via_servers(req: &ApiRequest) -> Vec<String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "via" || *k == "server_name")
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

impl ClientApi {
    /// The room an id or a local alias names.
    pub(super) async fn room_of(&self, target: &str) -> ApiResult<OwnedRoomId> {
        if target.starts_with('#') {
            let id = self
                .data
                .alias(target)
                .await?
                .ok_or_else(|| ApiError::not_found("no room has that alias here"))?;
            return room_id(&id);
        }
        room_id(target)
    }

    pub(super) async fn knock(
        &self,
        req: &ApiRequest,
        s: &Session,
        target: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let reason = match body.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) if r.len() <= MAX_REASON_BYTES => Some(r.clone()),
            Some(Value::String(_)) => {
                return Err(ApiError::invalid_param(format!(
                    "a reason is at most {MAX_REASON_BYTES} bytes"
                )))
            }
            Some(_) => return Err(ApiError::bad_json("reason is a string")),
        };
        let room = self.room_of(target).await?;
        if let Some(state) = self.node.engine().current_state(&room).await? {
            match self.membership(&state, &s.user_id).await?.as_deref() {
                Some("join") => return Err(ApiError::forbidden("you are in that room already")),
                Some("invite") => {
                    return Err(ApiError::forbidden("you are invited to that room: join it"))
                }
                Some("ban") => return Err(ApiError::forbidden("you are banned from that room")),
                Some("knock") => return ok(json!({ "room_id": room })),
                _ => {}
            }
            // Held here: a local event, authorised against the join rules like any other.
            let mut content = json!({"membership": "knock"});
            if let Some(r) = &reason {
                content["reason"] = r.as_str().into();
            }
            self.send_as(s, &room, "m.room.member", Some(s.user_id.as_str()), content)
                .await?;
            return ok(json!({ "room_id": room }));
        }
        // Counted and written one knock at a time, so the limit holds.
        let _one_at_a_time = self.txns.lock(format!("knock\0{}", s.user_id)).await;
        let pending = self
            .data
            .scan(&prefix(&["knock", s.user_id.as_str()]))
            .await?
            .len();
        if pending >= MAX_PENDING_KNOCKS {
            return Err(ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "M_LIMIT_EXCEEDED",
                format!("at most {MAX_PENDING_KNOCKS} knocks may wait for an answer"),
            ));
        }
        let peers: Vec<_> = via_servers(req)
            .iter()
            .filter_map(|server| <&ruma::ServerName>::try_from(server.as_str()).ok())
            .filter_map(|name| ServerName::try_from(name).ok())
            .map(|name| name.peer_id())
            .collect();
        if peers.is_empty() {
            return Err(ApiError::not_found(
                "this server does not know that room; give a `via` server that is in it",
            ));
        }
        let mut last_error = None;
        for peer in peers {
            match self
                .node
                .knock(&room, s.user_id.localpart(), peer, reason.as_deref())
                .await
            {
                Ok((event_id, room_state)) => {
                    let k = key(&["knock", s.user_id.as_str(), room.as_str()]);
                    self.data
                        .write_at(|pos, b| {
                            let record =
                                json!({"pos": pos, "event_id": event_id, "state": room_state});
                            b.put(crate::store::Table::ClientData, k, record.to_string());
                        })
                        .await?;
                    self.node.changed();
                    return ok(json!({ "room_id": room }));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error
            .map(ApiError::from)
            .unwrap_or_else(|| ApiError::not_found("no peer took the knock")))
    }

    /// The user's knocks on rooms not held here: (room, event id, stripped state, position).
    pub(super) async fn remote_knocks(
        &self,
        user: &UserId,
    ) -> ApiResult<Vec<(OwnedRoomId, String, Vec<Value>, u64)>> {
        let p = prefix(&["knock", user.as_str()]);
        let mut out = Vec::new();
        for (k, v) in self.data.scan(&p).await? {
            let Ok(room) = OwnedRoomId::try_from(String::from_utf8_lossy(&k[p.len()..]).as_ref())
            else {
                continue;
            };
            let v = decode(&v)?;
            let state = v["state"].as_array().cloned().unwrap_or_default();
            out.push((
                room,
                v["event_id"].as_str().unwrap_or_default().to_owned(),
                state,
                v["pos"].as_u64().unwrap_or(0),
            ));
        }
        Ok(out)
    }

    /// Forgets the user's knock on a room not held here; says whether there was one.
    pub(super) async fn forget_knock(&self, user: &UserId, room: &RoomId) -> ApiResult<bool> {
        let k = key(&["knock", user.as_str(), room.as_str()]);
        if self.data.get(&k).await?.is_none() {
            return Ok(false);
        }
        self.data.delete_value(k).await?;
        Ok(true)
    }
}
