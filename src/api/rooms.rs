//! Room endpoints: creating, joining, leaving and moderating rooms, sending events, and reading
//! state, single events, members, history and relations.

use http::StatusCode;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::{format_event, membership_of};
use super::sync::{parse_position, EventFilter};
use super::visibility::Reader;
use super::{body_object, now, ok, parse, required_str, ApiRequest, ApiResponse, ClientApi};
use crate::engine::create_room::{CreateRoom, Preset};
use crate::engine::pdu::StoredEvent;
use crate::engine::SortedState;
use crate::identity::ServerName;
use crate::store::Direction;

/// A run of timeline events a reader may see, and where reading stopped.
struct VisiblePage {
    events: Vec<std::sync::Arc<StoredEvent>>,
    /// The token position to read on from.
    cursor: u64,
    /// The timeline (or the reader's part of it) ends here.
    exhausted: bool,
}

pub fn room_id(s: &str) -> ApiResult<OwnedRoomId> {
    OwnedRoomId::try_from(s).map_err(|e| ApiError::invalid_param(format!("bad room id: {e}")))
}

pub(super) fn event_id(s: &str) -> ApiResult<OwnedEventId> {
    OwnedEventId::try_from(s).map_err(|e| ApiError::invalid_param(format!("bad event id: {e}")))
}

fn user_id(s: &str) -> ApiResult<OwnedUserId> {
    OwnedUserId::try_from(s).map_err(|e| ApiError::invalid_param(format!("bad user id: {e}")))
}

impl ClientApi {
    /// The room's current state, or `M_NOT_FOUND` if this peer does not know the room.
    pub(super) async fn state_of(&self, room: &RoomId) -> ApiResult<SortedState> {
        self.node
            .engine()
            .current_state(room)
            .await?
            .ok_or_else(|| ApiError::not_found("this server does not know that room"))
    }

    pub(super) async fn member_event(
        &self,
        state: &SortedState,
        user: &UserId,
    ) -> ApiResult<Option<std::sync::Arc<StoredEvent>>> {
        let Some(id) = state.get(&("m.room.member".to_owned(), user.to_string())) else {
            return Ok(None);
        };
        Ok(self.node.engine().event(id).await?)
    }

    pub(super) async fn membership(
        &self,
        state: &SortedState,
        user: &UserId,
    ) -> ApiResult<Option<String>> {
        Ok(self
            .member_event(state, user)
            .await?
            .and_then(|e| membership_of(&e)))
    }

    /// Refuses unless `user` is joined to `room`; returns the room's state.
    pub(super) async fn require_joined(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> ApiResult<SortedState> {
        let state = self
            .state_of(room)
            .await
            .map_err(|_| ApiError::forbidden("you are not in that room"))?;
        match self.membership(&state, user).await?.as_deref() {
            Some("join") => Ok(state),
            _ => Err(ApiError::forbidden("you are not in that room")),
        }
    }

    /// The room's state as `reader` may read it now (for a user who left: as of their leave).
    async fn reader_state(&self, reader: &Reader<'_>, room: &RoomId) -> ApiResult<SortedState> {
        match reader.state(room).await? {
            Some(state) => Ok(state),
            None => self.state_of(room).await,
        }
    }

    /// Sends an event as the session's user and returns its id.
    pub(super) async fn send_as(
        &self,
        s: &Session,
        room: &RoomId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> ApiResult<OwnedEventId> {
        let r = self
            .node
            .send(room, s.user_id.localpart(), kind, state_key, content)
            .await?;
        Ok(r.event_id)
    }

    pub(super) async fn create_room(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::room::create_room::v3::{Request, RoomPreset};
        use ruma::api::client::room::Visibility;
        let r: Request = parse(req, &[])?;
        let preset = match (&r.preset, &r.visibility) {
            (Some(RoomPreset::PublicChat), _) => Preset::PublicChat,
            (Some(RoomPreset::TrustedPrivateChat), _) => Preset::TrustedPrivateChat,
            (Some(RoomPreset::PrivateChat), _) => Preset::PrivateChat,
            (None, Visibility::Public) => Preset::PublicChat,
            _ => Preset::PrivateChat,
        };
        let as_object = |raw: &str, what: &str| -> ApiResult<serde_json::Map<String, Value>> {
            match serde_json::from_str(raw) {
                Ok(Value::Object(o)) => Ok(o),
                _ => Err(ApiError::bad_json(format!("{what} must be an object"))),
            }
        };
        let mut initial_state = Vec::new();
        for ev in &r.initial_state {
            let v = as_object(ev.json().get(), "initial_state entries")?;
            let kind = v.get("type").and_then(Value::as_str);
            let content = v.get("content").filter(|c| c.is_object());
            let (Some(kind), Some(content)) = (kind, content) else {
                return Err(ApiError::bad_json(
                    "initial_state entries need type and content",
                ));
            };
            let key = v.get("state_key").and_then(Value::as_str).unwrap_or("");
            initial_state.push((kind.to_owned(), key.to_owned(), content.clone()));
        }
        // The alias is claimed before the room is made, so no other request takes it meanwhile.
        let alias = match &r.room_alias_name {
            Some(name) => {
                let alias = format!("#{name}:{}", self.node.server_name());
                ruma::OwnedRoomAliasId::try_from(alias.as_str())
                    .map_err(|e| ApiError::invalid_param(format!("bad alias: {e}")))?;
                let claim = self.data.claim_alias(&alias).await?.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "M_ROOM_IN_USE",
                        "that alias is taken",
                    )
                })?;
                Some((alias, claim))
            }
            None => None,
        };
        if let Some((alias, _)) = &alias {
            initial_state.push((
                "m.room.canonical_alias".into(),
                String::new(),
                json!({"alias": alias}),
            ));
        }
        let opts = CreateRoom {
            preset,
            room_version: r.room_version.clone(),
            name: r.name.clone(),
            topic: r.topic.clone(),
            invite: r.invite.clone(),
            is_direct: r.is_direct,
            creation_content: match &r.creation_content {
                Some(c) => as_object(c.json().get(), "creation_content")?,
                None => Default::default(),
            },
            initial_state,
            power_level_content_override: match &r.power_level_content_override {
                Some(c) => Some(as_object(c.json().get(), "power_level_content_override")?),
                None => None,
            },
            creator_profile: self.profile_content(&s.user_id).await?,
        };
        let room_id = self.node.create_room(s.user_id.localpart(), &opts).await?;
        if let Some((_, claim)) = alias {
            claim.store(&room_id, &s.user_id).await?;
        }
        if r.visibility == Visibility::Public {
            self.publish(&room_id, &s.user_id, true).await?;
        }
        ok(json!({ "room_id": room_id }))
    }

    pub(super) async fn join(
        &self,
        req: &ApiRequest,
        s: &Session,
        target: &str,
    ) -> ApiResult<ApiResponse> {
        body_object(req)?;
        let room = self.room_of(target).await?;
        let via = super::knock::via_servers(req);
        if let Some(state) = self.node.engine().current_state(&room).await? {
            match self.membership(&state, &s.user_id).await?.as_deref() {
                Some("join") => return ok(json!({ "room_id": room })),
                Some("ban") => return Err(ApiError::forbidden("you are banned from that room")),
                _ => {}
            }
            // Known here: the join is a local event, authorised like any other.
            let mut content = json!({"membership": "join"});
            self.add_profile(&s.user_id, &mut content).await?;
            self.send_as(s, &room, "m.room.member", Some(s.user_id.as_str()), content)
                .await?;
            return ok(json!({ "room_id": room }));
        }
        // A room on other peers: join through one that is in it.
        let mut peers = Vec::new();
        for server in &via {
            let parsed = <&ruma::ServerName>::try_from(server.as_str());
            if let Some(name) = parsed.ok().and_then(|n| ServerName::try_from(n).ok()) {
                peers.push(name.peer_id());
            }
        }
        // The inviter's server before the peer that delivered the invite: anyone can deliver
        // (replay) a genuine invite, only the inviter's server signed it.
        for invite in self.node.invites() {
            if invite.room_id == room && invite.invitee == s.user_id {
                if let Ok(name) = ServerName::try_from(invite.sender.server_name()) {
                    peers.push(name.peer_id());
                }
                peers.push(invite.from);
            }
        }
        peers.dedup();
        if peers.is_empty() {
            return Err(ApiError::not_found(
                "this server does not know that room; give a `via` server that is in it",
            ));
        }
        let mut last_error = None;
        let profile = self.profile_content(&s.user_id).await?;
        for peer in peers {
            match self
                .node
                .join_with_profile(&room, s.user_id.localpart(), peer, profile.clone())
                .await
            {
                Ok(_) => {
                    // Let in: a knock that waited is answered.
                    self.forget_knock(&s.user_id, &room).await?;
                    return ok(json!({ "room_id": room }));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error
            .map(ApiError::from)
            .unwrap_or_else(|| ApiError::not_found("no peer could let you in")))
    }

    pub(super) async fn invite(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let invitee = required_str(&body, "user_id")?;
        let invitee = user_id(invitee)?;
        let room = room_id(room)?;
        self.require_joined(&room, &s.user_id).await?;
        self.node
            .invite(&room, s.user_id.localpart(), &invitee)
            .await?;
        ok(json!({}))
    }

    pub(super) async fn leave(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let room = room_id(room)?;
        // An invite to a room not held here is declined by forgetting it; the next /sync moves
        // the room to `leave` so clients drop the invite too.
        if self.node.engine().room(&room).await?.is_none()
            && self.node.decline_invite(&room, &s.user_id).await?
        {
            let pos = self.data.bump().await?;
            self.note_declined_invite(&s.user_id, &room, pos);
            self.node.changed();
            return ok(json!({}));
        }
        // A knock on a room not held here is taken back by forgetting it, like a declined
        // invite (the room keeps it until a member answers).
        if self.node.engine().room(&room).await?.is_none()
            && self.forget_knock(&s.user_id, &room).await?
        {
            let pos = self.data.bump().await?;
            self.note_declined_invite(&s.user_id, &room, pos);
            self.node.changed();
            return ok(json!({}));
        }
        let state = self.state_of(&room).await?;
        match self.membership(&state, &s.user_id).await?.as_deref() {
            Some("join" | "invite" | "knock") => {}
            Some("leave") => return ok(json!({})),
            _ => return Err(ApiError::forbidden("you are not in that room")),
        }
        let mut content = json!({"membership": "leave"});
        if let Some(reason) = body.get("reason").and_then(Value::as_str) {
            content["reason"] = reason.into();
        }
        self.send_as(s, &room, "m.room.member", Some(s.user_id.as_str()), content)
            .await?;
        ok(json!({}))
    }

    pub(super) async fn forget(&self, s: &Session, room: &str) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        if let Some(state) = self.node.engine().current_state(&room).await? {
            if matches!(
                self.membership(&state, &s.user_id).await?.as_deref(),
                Some("join" | "invite")
            ) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "M_UNKNOWN",
                    "leave the room before forgetting it",
                ));
            }
        }
        self.data.forget(&s.user_id, &room).await?;
        ok(json!({}))
    }

    pub(super) async fn moderate(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        action: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let target = required_str(&body, "user_id")?;
        let target = user_id(target)?;
        let room = room_id(room)?;
        let state = self.require_joined(&room, &s.user_id).await?;
        let current = self.membership(&state, &target).await?;
        let membership = match action {
            "kick" => {
                if !matches!(current.as_deref(), Some("join" | "invite" | "knock")) {
                    return Err(ApiError::forbidden("that user is not in the room"));
                }
                "leave"
            }
            "ban" => "ban",
            _ => {
                if current.as_deref() != Some("ban") {
                    return Err(ApiError::forbidden("that user is not banned"));
                }
                "leave"
            }
        };
        let mut content = json!({ "membership": membership });
        if let Some(reason) = body.get("reason").and_then(Value::as_str) {
            content["reason"] = reason.into();
        }
        self.send_as(s, &room, "m.room.member", Some(target.as_str()), content)
            .await?;
        ok(json!({}))
    }

    pub(super) async fn send_event(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        kind: &str,
        txn: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::message::send_message_event::v3::Request;
        let r: Request = parse(req, &[room, kind, txn])?;
        let content: Value = serde_json::from_str(r.body.json().get())
            .map_err(|e| ApiError::bad_json(e.to_string()))?;
        if !content.is_object() {
            return Err(ApiError::bad_json("event content must be an object"));
        }
        let one_at_a_time = self.txn_lock(s, txn).await;
        if let Some(id) = self.data.txn(s, txn).await? {
            return ok(json!({ "event_id": id }));
        }
        self.require_joined(&r.room_id, &s.user_id).await?;
        let kind = r.event_type.to_string();
        let id = self
            .send_for_txn(s, &r.room_id, &kind, content, txn, one_at_a_time)
            .await?;
        ok(json!({ "event_id": id }))
    }

    /// Sends a non-state event for a client transaction. The transaction id is stored in the
    /// event's own commit: a retry after a crash finds it exactly when the event exists. The
    /// caller holds the transaction ([`ClientApi::txn_lock`]) from its check of the id on and
    /// hands the hold to the group commit: once the event is queued, the transaction stays held
    /// until it is durable even if the client hangs up, so a retry meanwhile waits for it and
    /// finds the event instead of sending it again.
    async fn send_for_txn(
        &self,
        s: &Session,
        room: &RoomId,
        kind: &str,
        content: Value,
        txn: &str,
        held: super::limits::KeyedGuard,
    ) -> ApiResult<OwnedEventId> {
        let (session, txn_id) = (s.clone(), txn.to_owned());
        let also: crate::engine::AlsoWrite = Box::new(move |id, batch| {
            super::user_data::UserData::txn_records(&session, &txn_id, id, batch)
        });
        let txn = crate::rooms::TxnSend {
            record: also,
            hold: Box::new(held),
        };
        let sent = self
            .node
            .send_with(room, s.user_id.localpart(), kind, None, content, Some(txn))
            .await?;
        Ok(sent.event_id)
    }

    pub(super) async fn put_state(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        kind: &str,
        key: &str,
    ) -> ApiResult<ApiResponse> {
        let content = body_object(req)?;
        let room = room_id(room)?;
        let mut content = Value::Object(content);
        if kind == "m.room.member" {
            if let Ok(target) = OwnedUserId::try_from(key) {
                if target == s.user_id && content["membership"] == "join" {
                    self.add_profile(&s.user_id, &mut content).await?;
                }
            }
        }
        self.require_joined(&room, &s.user_id).await?;
        let id = self.send_as(s, &room, kind, Some(key), content).await?;
        ok(json!({ "event_id": id }))
    }

    pub(super) async fn get_state(
        &self,
        s: &Session,
        room: &str,
        which: Option<(&str, &str)>,
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let reader = self.room_reader(&room, &s.user_id).await?;
        let state = self.reader_state(&reader, &room).await?;
        let engine = self.node.engine();
        match which {
            Some((kind, key)) => {
                let id = state
                    .get(&(kind.to_owned(), key.to_owned()))
                    .ok_or_else(|| ApiError::not_found("no such state event"))?;
                let ev = engine
                    .event(id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("no such state event"))?;
                let content: Value = serde_json::from_str(ev.pdu.content.get())
                    .map_err(|e| ApiError::unknown(e.to_string()))?;
                ok(content)
            }
            None => {
                let mut out = Vec::with_capacity(state.len());
                for id in state.values() {
                    if let Some(ev) = engine.event(id).await? {
                        out.push(format_event(engine, &ev, None, now()).await?);
                    }
                }
                ok(Value::Array(out))
            }
        }
    }

    pub(super) async fn get_event(
        &self,
        s: &Session,
        room: &str,
        event: &str,
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let event = event_id(event)?;
        let reader = self.room_reader(&room, &s.user_id).await?;
        let ev = self.visible_event(&reader, &room, &event).await?;
        ok(self.client_format(s, &ev).await?)
    }

    /// `event` if it is in `room`'s timeline, else `M_NOT_FOUND`.
    async fn timeline_event(
        &self,
        room: &RoomId,
        event: &ruma::EventId,
    ) -> ApiResult<std::sync::Arc<StoredEvent>> {
        match self.node.engine().event(event).await? {
            Some(ev) if ev.pdu.room_id == room && ev.stream.is_some() => Ok(ev),
            _ => Err(ApiError::not_found("no such event in that room")),
        }
    }

    /// `event` if `reader` may see it, else `M_NOT_FOUND` (as for an unknown event: a user is
    /// not told what exists where they may not look).
    pub(super) async fn visible_event(
        &self,
        reader: &Reader<'_>,
        room: &RoomId,
        event: &ruma::EventId,
    ) -> ApiResult<std::sync::Arc<StoredEvent>> {
        let ev = self.timeline_event(room, event).await?;
        if !reader.may_see(&ev).await? {
            return Err(ApiError::not_found("no such event in that room"));
        }
        Ok(ev)
    }

    pub(super) async fn context(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        event: &str,
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let event = event_id(event)?;
        let limit = super::url_query(req.uri().query().unwrap_or(""))
            .get("limit")
            .map(|l| l.parse::<usize>())
            .transpose()
            .map_err(|_| ApiError::invalid_param("limit must be a number"))?
            .unwrap_or(10)
            .min(100);
        let reader = self.room_reader(&room, &s.user_id).await?;
        let ev = self.visible_event(&reader, &room, &event).await?;
        let stream = ev.stream.expect("visible events are in the timeline");
        let engine = self.node.engine();
        let before_n = limit / 2;
        let after_n = limit - before_n;
        let all = EventFilter::default();
        let (before, after) = futures::try_join!(
            self.read_visible(&reader, &room, stream, true, before_n, None, &all),
            self.read_visible(&reader, &room, stream + 1, false, after_n, None, &all),
        )?;
        let (start, end) = (before.cursor, after.cursor);
        let (before, after) = (before.events, after.events);
        let fmt = self
            .client_format_all(s, before.iter().chain(after.iter()).map(|e| e.as_ref()))
            .await?;
        let (before_fmt, after_fmt) = fmt.split_at(before.len());
        // The state at the last event returned, as the spec says.
        let last = after.last().unwrap_or(&ev);
        let state = engine
            .state_after(&last.pdu.event_id)
            .await?
            .unwrap_or_default();
        let mut state_events = Vec::new();
        for id in state.values() {
            if let Some(e) = engine.event(id).await? {
                state_events.push(format_event(engine, &e, None, now()).await?);
            }
        }
        ok(json!({
            "event": self.client_format(s, &ev).await?,
            "events_before": before_fmt,
            "events_after": after_fmt,
            "start": format!("t{start}"),
            "end": format!("t{end}"),
            "state": state_events,
        }))
    }

    /// The client format of `ev` for the session (with its transaction id if it sent it).
    pub(super) async fn client_format(&self, s: &Session, ev: &StoredEvent) -> ApiResult<Value> {
        let engine = self.node.engine();
        let txn = self.data.txn_of(s, ev).await?;
        let mut formatted = super::events::format_event_parts(engine, ev, txn, now()).await?;
        if !formatted.redacted && super::events::has_aggregations(ev, &formatted.related) {
            // What relates to it counts only as far as the user may see it.
            let reader = self.any_reader(&ev.pdu.room_id, &s.user_id).await?;
            let bundled = super::events::aggregate(
                engine,
                ev,
                &formatted.related,
                &formatted.version,
                &reader,
                &s.user_id,
                now(),
            )
            .await?;
            if let Some(bundled) = bundled {
                formatted.value["unsigned"]["m.relations"] = bundled;
            }
        }
        Ok(formatted.value)
    }

    /// A reader of `room` for `user` whatever their membership (what they may see is the
    /// reader's to say).
    async fn any_reader(&self, room: &RoomId, user: &UserId) -> ApiResult<Reader<'_>> {
        let state = self.state_of(room).await?;
        let member = self.member_event(&state, user).await?;
        let ignored = self.ignored_users(user).await?;
        Ok(Reader::new(self.node.engine(), room, user, member.as_deref(), ignored).await?)
    }

    /// [`ClientApi::client_format`] for many events at once: their store reads (transaction ids,
    /// relations) overlap instead of queueing one after another — in the tab each is an
    /// IndexedDB round trip.
    pub(super) async fn client_format_all(
        &self,
        s: &Session,
        evs: impl IntoIterator<Item = &StoredEvent>,
    ) -> ApiResult<Vec<Value>> {
        futures::future::try_join_all(evs.into_iter().map(|ev| self.client_format(s, ev))).await
    }

    pub(super) async fn redact(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        event: &str,
        txn: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::redact::redact_event::v3::Request;
        let r: Request = parse(req, &[room, event, txn])?;
        let one_at_a_time = self.txn_lock(s, txn).await;
        if let Some(id) = self.data.txn(s, txn).await? {
            return ok(json!({ "event_id": id }));
        }
        self.require_joined(&r.room_id, &s.user_id).await?;
        let target = self.timeline_event(&r.room_id, &r.event_id).await?;
        if target.pdu.sender != s.user_id {
            let state = self.state_of(&r.room_id).await?;
            let engine = self.node.engine();
            let have = super::events::power_level(engine, &state, &s.user_id).await?;
            let need = super::events::required_level(engine, &state, "redact", 50).await?;
            if have < need {
                return Err(ApiError::forbidden(
                    "you may only redact your own events here",
                ));
            }
        }
        let mut content = json!({ "redacts": r.event_id });
        if let Some(reason) = &r.reason {
            content["reason"] = reason.as_str().into();
        }
        // Room versions before 11 carry `redacts` at the top level; the engine reads either.
        let id = self
            .send_for_txn(
                s,
                &r.room_id,
                "m.room.redaction",
                content,
                txn,
                one_at_a_time,
            )
            .await?;
        ok(json!({ "event_id": id }))
    }

    pub(super) async fn members(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let q = super::url_query(req.uri().query().unwrap_or(""));
        let reader = self.room_reader(&room, &s.user_id).await?;
        let state = match q.get("at") {
            Some(at) => {
                // The members as of a token: refused if the user may not see the room there; a
                // user who left reads them as of their leave at the latest.
                let pos = reader.bound(parse_position(at)?);
                let last = reader
                    .last_below(&room, pos)
                    .await?
                    .ok_or_else(|| ApiError::not_found("the room has no events before that"))?;
                if !reader.may_see_history(&last).await? {
                    return Err(ApiError::forbidden(
                        "you may not see the room's members at that point",
                    ));
                }
                self.node
                    .engine()
                    .state_after(&last.pdu.event_id)
                    .await?
                    .unwrap_or_default()
            }
            None => self.reader_state(&reader, &room).await?,
        };
        let engine = self.node.engine();
        let mut out = Vec::new();
        for ((kind, _), id) in &state {
            if kind != "m.room.member" {
                continue;
            }
            let Some(ev) = engine.event(id).await? else {
                continue;
            };
            let m = membership_of(&ev).unwrap_or_default();
            if q.get("membership").is_some_and(|want| *want != m)
                || q.get("not_membership").is_some_and(|not| *not == m)
            {
                continue;
            }
            out.push(format_event(engine, &ev, None, now()).await?);
        }
        ok(json!({ "chunk": out }))
    }

    pub(super) async fn joined_members(&self, s: &Session, room: &str) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let state = self.require_joined(&room, &s.user_id).await?;
        let engine = self.node.engine();
        let mut joined = serde_json::Map::new();
        for ((kind, key), id) in &state {
            if kind != "m.room.member" {
                continue;
            }
            let Some(ev) = engine.event(id).await? else {
                continue;
            };
            if membership_of(&ev).as_deref() != Some("join") {
                continue;
            }
            let c: Value = serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
            joined.insert(
                key.clone(),
                json!({"display_name": c["displayname"], "avatar_url": c["avatar_url"]}),
            );
        }
        ok(json!({ "joined": joined }))
    }

    /// Rooms `user` is joined to.
    pub(super) async fn joined_room_ids(&self, user: &UserId) -> ApiResult<Vec<OwnedRoomId>> {
        let mut out = Vec::new();
        for room in self.node.engine().rooms().await? {
            let Some(state) = self.node.engine().current_state(&room).await? else {
                continue;
            };
            if self.membership(&state, user).await?.as_deref() == Some("join") {
                out.push(room);
            }
        }
        Ok(out)
    }

    pub(super) async fn joined_rooms(&self, s: &Session) -> ApiResult<ApiResponse> {
        ok(json!({ "joined_rooms": self.joined_room_ids(&s.user_id).await? }))
    }

    pub(super) async fn messages(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::message::get_message_events::v3::Request;
        let r: Request = parse(req, &[room])?;
        let reader = self.room_reader(&r.room_id, &s.user_id).await?;
        let filter = EventFilter::from_value(
            &serde_json::to_value(&r.filter).map_err(|e| ApiError::bad_json(e.to_string()))?,
        );
        let backward = r.dir == ruma::api::Direction::Backward;
        let limit = u64::from(r.limit).clamp(1, 1000) as usize;
        let engine = self.node.engine();
        // Positions are exclusive bounds: events below `from` come before it.
        let from = match &r.from {
            Some(t) => parse_position(t)?,
            None if backward => engine.stream_position().await,
            None => 0,
        };
        let to = r.to.as_deref().map(parse_position).transpose()?;
        let page = self
            .read_visible(&reader, &r.room_id, from, backward, limit, to, &filter)
            .await?;
        let chunk = self
            .client_format_all(s, page.events.iter().map(|e| e.as_ref()))
            .await?;
        let mut out = json!({
            "chunk": chunk,
            "start": format!("t{from}"),
        });
        if !page.exhausted {
            out["end"] = format!("t{}", page.cursor).into();
        }
        ok(out)
    }

    /// Up to `limit` events of the room's timeline that match `filter` and that `reader` may
    /// see, from position `from` (exclusive bounds: backward reads below it, forward from it)
    /// towards `to`. Hidden and filtered-out events still advance the cursor.
    #[allow(clippy::too_many_arguments)]
    async fn read_visible(
        &self,
        reader: &Reader<'_>,
        room: &RoomId,
        from: u64,
        backward: bool,
        limit: usize,
        to: Option<u64>,
        filter: &EventFilter,
    ) -> ApiResult<VisiblePage> {
        let engine = self.node.engine();
        // A user who left reads nothing after their leave.
        let upper = reader.bound(u64::MAX);
        let mut cursor = if backward { reader.bound(from) } else { from };
        let mut events = Vec::new();
        let mut exhausted = false;
        while events.len() < limit && !exhausted {
            let page = if backward {
                engine
                    .timeline(room, Some(cursor), Direction::Backward, limit)
                    .await?
            } else {
                engine
                    .timeline(
                        room,
                        Some(cursor.saturating_sub(1)),
                        Direction::Forward,
                        limit,
                    )
                    .await?
            };
            exhausted = page.len() < limit;
            for ev in page {
                let pos = ev.stream.expect("timeline events have positions");
                let past_to = match (to, backward) {
                    (Some(t), true) => pos < t,
                    (Some(t), false) => pos >= t,
                    _ => false,
                };
                if past_to || (!backward && pos >= upper) {
                    exhausted = true;
                    break;
                }
                cursor = if backward { pos } else { pos + 1 };
                if filter.matches(&ev) && reader.may_see(&ev).await? {
                    events.push(ev);
                    if events.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(VisiblePage {
            events,
            cursor,
            exhausted,
        })
    }

    /// `GET /rooms/{room}/timestamp_to_event`: the visible event nearest to `ts` in the
    /// direction `dir` (`f`: at or after it, `b`: at or before it), looking through a bounded
    /// stretch of the room's timeline.
    pub(super) async fn timestamp_to_event(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        /// Timeline events looked at, newest first.
        const MAX_SCAN: usize = 20_000;
        let room = room_id(room)?;
        let reader = self.room_reader(&room, &s.user_id).await?;
        let q = super::url_query(req.uri().query().unwrap_or(""));
        let ts: u64 = q
            .get("ts")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ApiError::invalid_param("ts (milliseconds) is required"))?;
        let forward = match q.get("dir").map(String::as_str) {
            Some("f") => true,
            Some("b") => false,
            _ => return Err(ApiError::invalid_param("dir is f or b")),
        };
        let engine = self.node.engine();
        let mut best: Option<std::sync::Arc<StoredEvent>> = None;
        let mut cursor = Some(reader.bound(engine.stream_position().await));
        let mut scanned = 0;
        'scan: while scanned < MAX_SCAN {
            let page = engine
                .timeline(&room, cursor, Direction::Backward, 200)
                .await?;
            let exhausted = page.len() < 200;
            for ev in page {
                scanned += 1;
                cursor = ev.stream;
                let at = u64::from(ev.pdu.origin_server_ts.get());
                let fits = if forward { at >= ts } else { at <= ts };
                if fits && reader.may_see(&ev).await? {
                    let closer = best.as_ref().is_none_or(|b| {
                        let b_at = u64::from(b.pdu.origin_server_ts.get());
                        if forward {
                            at < b_at
                        } else {
                            at > b_at
                        }
                    });
                    if closer {
                        best = Some(ev.clone());
                    }
                    // Going back in time: the first event at or before `ts` is the nearest.
                    if !forward {
                        break 'scan;
                    }
                }
                if forward && at < ts {
                    // Older still: nothing further back is at or after `ts`.
                    break 'scan;
                }
            }
            if exhausted {
                break;
            }
        }
        let ev = best.ok_or_else(|| ApiError::not_found("no event in that direction"))?;
        ok(json!({
            "event_id": ev.pdu.event_id,
            "origin_server_ts": ev.pdu.origin_server_ts,
        }))
    }

    /// Whether `user`'s power in a room with `state` lets them send `m.room.canonical_alias`:
    /// what removing a room's alias and publishing the room both ask for.
    pub(super) async fn may_set_canonical_alias(
        &self,
        state: &SortedState,
        user: &UserId,
    ) -> ApiResult<bool> {
        let engine = self.node.engine();
        let have = super::events::power_level(engine, state, user).await?;
        let need =
            super::events::state_event_level(engine, state, "m.room.canonical_alias").await?;
        Ok(have >= need)
    }

    pub(super) async fn put_alias(
        &self,
        req: &ApiRequest,
        s: &Session,
        alias: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let room = required_str(&body, "room_id")?;
        let room = room_id(room)?;
        let parsed = ruma::OwnedRoomAliasId::try_from(alias)
            .map_err(|e| ApiError::invalid_param(format!("bad alias: {e}")))?;
        if parsed.server_name().as_str() != self.node.server_name().to_string() {
            return Err(ApiError::invalid_param("aliases must be on this server"));
        }
        self.require_joined(&room, &s.user_id).await?;
        let claim = self.data.claim_alias(alias).await?.ok_or_else(|| {
            ApiError::new(StatusCode::CONFLICT, "M_UNKNOWN", "alias already exists")
        })?;
        claim.store(&room, &s.user_id).await?;
        ok(json!({}))
    }

    pub(super) async fn get_alias(&self, alias: &str) -> ApiResult<ApiResponse> {
        let room = self
            .data
            .alias(alias)
            .await?
            .ok_or_else(|| ApiError::not_found("no room has that alias here"))?;
        ok(json!({ "room_id": room, "servers": [self.node.server_name().to_string()] }))
    }

    /// Removes an alias: its creator may, and so may (as in Synapse) a member of its room with
    /// the power to set the room's canonical alias.
    pub(super) async fn delete_alias(&self, s: &Session, alias: &str) -> ApiResult<ApiResponse> {
        let record = self
            .data
            .alias_record(alias)
            .await?
            .ok_or_else(|| ApiError::not_found("no room has that alias here"))?;
        if record.creator.as_ref() != Some(&s.user_id) {
            let refused = || {
                ApiError::forbidden(
                    "only the alias's creator, or a room member who may set the room's \
                     canonical alias, may remove it",
                )
            };
            let room = room_id(&record.room_id)?;
            let state = self
                .require_joined(&room, &s.user_id)
                .await
                .map_err(|_| refused())?;
            if !self.may_set_canonical_alias(&state, &s.user_id).await? {
                return Err(refused());
            }
        }
        self.data.delete_alias(alias).await?;
        ok(json!({}))
    }
}
