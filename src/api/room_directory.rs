//! Finding rooms: the public room directory of this server (`/publicRooms`, with rooms
//! published through `/directory/list/room/{id}` or created with `visibility: public`), the
//! local aliases of a room, and the hierarchy of a space.
//!
//! Only what a room's members chose to publish is listed, and a space's hierarchy shows a
//! child room only to someone who may already read it or could join it (public or
//! world-readable rooms), as the spec has it.

use std::collections::{HashSet, VecDeque};

use ruma::{OwnedRoomId, RoomId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::{membership_of, stripped};
use super::rooms::room_id;
use super::user_data::{key, prefix};
use super::{body_object, ok, url_query, ApiRequest, ApiResponse, ClientApi};
use crate::engine::SortedState;

/// Rooms one directory page lists at most.
const MAX_PAGE: usize = 100;
/// Rooms one hierarchy request walks at most, and how deep.
const MAX_HIERARCHY_ROOMS: usize = 500;
const MAX_HIERARCHY_DEPTH: usize = 10;

impl ClientApi {
    /// What the directory shows of a room: its name, topic, alias, avatar, member count and
    /// who may join and read it.
    async fn room_chunk(&self, room: &RoomId, state: &SortedState) -> ApiResult<Value> {
        let engine = self.node.engine();
        let content = |kind: &str| {
            let id = state.get(&(kind.to_owned(), String::new())).cloned();
            async move {
                Ok::<Value, ApiError>(match id {
                    Some(id) => match engine.event(&id).await? {
                        Some(ev) => {
                            serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null)
                        }
                        None => Value::Null,
                    },
                    None => Value::Null,
                })
            }
        };
        let mut joined = 0u64;
        let from = ("m.room.member".to_owned(), String::new());
        for ((kind, _), id) in state.range(from..) {
            if kind != "m.room.member" {
                break;
            }
            if let Some(ev) = engine.event(id).await? {
                joined += u64::from(membership_of(&ev).as_deref() == Some("join"));
            }
        }
        let join_rule = content("m.room.join_rules").await?["join_rule"]
            .as_str()
            .unwrap_or("invite")
            .to_owned();
        let history = content("m.room.history_visibility").await?;
        let guest = content("m.room.guest_access").await?;
        let mut chunk = json!({
            "room_id": room,
            "num_joined_members": joined,
            "world_readable": history["history_visibility"] == "world_readable",
            "guest_can_join": guest["guest_access"] == "can_join",
            "join_rule": join_rule,
        });
        for (kind, field, out) in [
            ("m.room.name", "name", "name"),
            ("m.room.topic", "topic", "topic"),
            ("m.room.canonical_alias", "alias", "canonical_alias"),
            ("m.room.avatar", "url", "avatar_url"),
            ("m.room.create", "type", "room_type"),
        ] {
            if let Some(v) = content(kind).await?[field].as_str() {
                chunk[out] = v.into();
            }
        }
        Ok(chunk)
    }

    /// `GET`/`POST /publicRooms`: this server's published rooms, most members first.
    pub(super) async fn public_rooms(&self, req: &ApiRequest) -> ApiResult<ApiResponse> {
        let q = url_query(req.uri().query().unwrap_or(""));
        let body = if req.method() == http::Method::POST {
            body_object(req)?
        } else {
            Default::default()
        };
        let param = |name: &str| {
            body.get(name)
                .cloned()
                .or_else(|| q.get(name).map(|v| Value::String(v.clone())))
        };
        if let Some(server) = param("server").as_ref().and_then(Value::as_str) {
            if server != self.node.server_name().to_string() {
                return Err(ApiError::not_found(
                    "this server lists only its own public rooms",
                ));
            }
        }
        let limit = match param("limit") {
            None | Some(Value::Null) => MAX_PAGE,
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as usize,
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| ApiError::invalid_param("limit must be a number"))?,
            Some(_) => return Err(ApiError::bad_json("limit must be a number")),
        }
        .clamp(1, MAX_PAGE);
        let offset = match param("since").as_ref().and_then(Value::as_str) {
            None => 0,
            Some(t) => t
                .strip_prefix('p')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| ApiError::invalid_param("not a directory token of this server"))?,
        };
        let term = body
            .get("filter")
            .and_then(|f| f.get("generic_search_term"))
            .and_then(Value::as_str)
            .map(str::to_lowercase);
        if term.as_ref().is_some_and(|t| t.len() > 512) {
            return Err(ApiError::invalid_param(
                "search terms are at most 512 bytes",
            ));
        }
        let engine = self.node.engine();
        let mut chunks = Vec::new();
        for (k, _) in self.data.scan(&prefix(&["published"])).await? {
            let Some(room) = String::from_utf8(k)
                .ok()
                .and_then(|k| k.rsplit('\0').next().map(str::to_owned))
                .and_then(|r| OwnedRoomId::try_from(r).ok())
            else {
                continue;
            };
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            let chunk = self.room_chunk(&room, &state).await?;
            // Published once, but listed only while anyone may join, knock or read it.
            let open = matches!(
                chunk["join_rule"].as_str(),
                Some("public" | "knock" | "knock_restricted")
            ) || chunk["world_readable"] == true;
            if !open {
                continue;
            }
            if let Some(term) = &term {
                let hit = ["name", "topic", "canonical_alias"].iter().any(|f| {
                    chunk[*f]
                        .as_str()
                        .is_some_and(|v| v.to_lowercase().contains(term.as_str()))
                });
                if !hit {
                    continue;
                }
            }
            chunks.push(chunk);
        }
        chunks.sort_by(|a, b| {
            b["num_joined_members"]
                .as_u64()
                .cmp(&a["num_joined_members"].as_u64())
                .then_with(|| a["room_id"].as_str().cmp(&b["room_id"].as_str()))
        });
        let total = chunks.len();
        let page: Vec<Value> = chunks.into_iter().skip(offset).take(limit).collect();
        let mut out = json!({"chunk": page, "total_room_count_estimate": total});
        if offset.saturating_add(limit) < total {
            out["next_batch"] = format!("p{}", offset + limit).into();
        }
        if offset > 0 {
            out["prev_batch"] = format!("p{}", offset.saturating_sub(limit)).into();
        }
        ok(out)
    }

    /// `GET /directory/list/room/{room}`: whether the room is in the public directory.
    pub(super) async fn room_visibility(&self, room: &str) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        if self.node.engine().room(&room).await?.is_none() {
            return Err(ApiError::not_found("this server does not know that room"));
        }
        let published = self.data.get(&key(&["published", room.as_str()])).await?;
        ok(json!({"visibility": if published.is_some() { "public" } else { "private" }}))
    }

    /// `PUT /directory/list/room/{room}`: a member with the power to set the room's canonical
    /// alias publishes it or takes it out.
    pub(super) async fn set_room_visibility(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let body = body_object(req)?;
        let public = match body.get("visibility").and_then(Value::as_str) {
            Some("public") => true,
            Some("private") | None => false,
            Some(other) => {
                return Err(ApiError::bad_json(format!(
                    "visibility is public or private, not {other}"
                )))
            }
        };
        let state = self.require_joined(&room, &s.user_id).await?;
        if !self.may_set_canonical_alias(&state, &s.user_id).await? {
            return Err(ApiError::forbidden(
                "publishing a room needs the power to set its canonical alias",
            ));
        }
        self.publish(&room, &s.user_id, public).await?;
        ok(json!({}))
    }

    pub(super) async fn publish(
        &self,
        room: &RoomId,
        by: &ruma::UserId,
        public: bool,
    ) -> ApiResult<()> {
        let k = key(&["published", room.as_str()]);
        if public {
            self.data.put_value(k, &json!({"by": by})).await
        } else {
            self.data.delete_value(k).await
        }
    }

    /// `GET /rooms/{room}/aliases`: the room's aliases on this server, for its members (and
    /// anyone, if it is world-readable).
    pub(super) async fn room_aliases(&self, s: &Session, room: &str) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let state = self.state_of(&room).await?;
        let joined = self.membership(&state, &s.user_id).await?.as_deref() == Some("join");
        if !joined && self.room_chunk(&room, &state).await?["world_readable"] != true {
            return Err(ApiError::forbidden("you are not in that room"));
        }
        let p = prefix(&["alias"]);
        let mut aliases = Vec::new();
        for (k, v) in self.data.scan(&p).await? {
            let v = super::user_data::decode(&v)?;
            let points_at = v.as_str().or_else(|| v["room_id"].as_str());
            if points_at == Some(room.as_str()) {
                aliases.push(String::from_utf8_lossy(&k[p.len()..]).into_owned());
            }
        }
        ok(json!({ "aliases": aliases }))
    }

    /// `GET /rooms/{room}/hierarchy`: the space and the rooms below it (breadth first), those
    /// the user may see; `from` goes on after the rooms a page already listed.
    pub(super) async fn hierarchy(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        let root = room_id(room)?;
        let q = url_query(req.uri().query().unwrap_or(""));
        let number = |name: &str, default: usize, max: usize| -> ApiResult<usize> {
            Ok(q.get(name)
                .map(|v| v.parse::<usize>())
                .transpose()
                .map_err(|_| ApiError::invalid_param(format!("{name} must be a number")))?
                .unwrap_or(default)
                .min(max))
        };
        let limit = number("limit", 50, MAX_PAGE)?.max(1);
        let max_depth = number("max_depth", MAX_HIERARCHY_DEPTH, MAX_HIERARCHY_DEPTH)?;
        let suggested_only = matches!(q.get("suggested_only").map(String::as_str), Some("true"));
        let skip = match q.get("from") {
            None => 0,
            Some(t) => t
                .strip_prefix('h')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| ApiError::invalid_param("not a hierarchy token of this server"))?,
        };
        let engine = self.node.engine();
        let root_state = engine
            .current_state(&root)
            .await?
            .ok_or_else(|| ApiError::forbidden("you may not see that space"))?;
        if !self.may_peek(&root, &root_state, s).await? {
            return Err(ApiError::forbidden("you may not see that space"));
        }
        let mut queue = VecDeque::from([(root.clone(), 0usize)]);
        let mut seen = HashSet::from([root.clone()]);
        let mut rooms = Vec::new();
        let mut listed = 0;
        let mut more = false;
        while let Some((room, depth)) = queue.pop_front() {
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            if room != root && !self.may_peek(&room, &state, s).await? {
                continue;
            }
            let mut chunk = self.room_chunk(&room, &state).await?;
            let mut children = Vec::new();
            let from = ("m.space.child".to_owned(), String::new());
            for ((kind, child), id) in state.range(from..) {
                if kind != "m.space.child" {
                    break;
                }
                let Some(ev) = engine.event(id).await? else {
                    continue;
                };
                let content: Value =
                    serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
                // A child event without `via` is a removed child.
                if content["via"].as_array().is_none_or(|v| v.is_empty())
                    || (suggested_only && content["suggested"] != true)
                {
                    continue;
                }
                let mut child_event = stripped(&ev);
                child_event["origin_server_ts"] = json!(ev.pdu.origin_server_ts);
                children.push(child_event);
                if let Ok(child) = OwnedRoomId::try_from(child.as_str()) {
                    if depth < max_depth
                        && seen.len() < MAX_HIERARCHY_ROOMS
                        && seen.insert(child.clone())
                    {
                        queue.push_back((child, depth + 1));
                    }
                }
            }
            chunk["children_state"] = children.into();
            if listed >= skip {
                if rooms.len() == limit {
                    more = true;
                    break;
                }
                rooms.push(chunk);
            }
            listed += 1;
        }
        let mut out = json!({ "rooms": rooms });
        if more {
            out["next_batch"] = format!("h{}", skip + limit).into();
        }
        ok(out)
    }

    /// Whether the user may see a room's summary: they are in it or invited, or it is
    /// world-readable, or anyone may join it.
    async fn may_peek(&self, room: &RoomId, state: &SortedState, s: &Session) -> ApiResult<bool> {
        let membership = self.membership(state, &s.user_id).await?;
        if matches!(membership.as_deref(), Some("join" | "invite")) {
            return Ok(true);
        }
        let chunk = self.room_chunk(room, state).await?;
        Ok(chunk["world_readable"] == true || chunk["join_rule"] == "public")
    }
}
