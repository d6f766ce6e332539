//! `/sync`: what changed for a user since a token, long-polled on the node's change notifier.
//!
//! A sync token is `s<event position>_<client-data position>_<typing serial>`: every event
//! below the first position, every client-data change below the second and every typing change
//! up to the third was already delivered. `/messages` tokens are `t<event position>`; a sync
//! token works there too (its event position counts).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::{membership_of, stripped};
use super::push_rules::PUSH_RULES;
use super::visibility::Reader;
use super::{
    now, ok, parse, ApiRequest, ApiResponse, ClientApi, Duration, Instant, MAX_SYNC_TIMEOUT,
};
use crate::engine::pdu::StoredEvent;
use crate::engine::SortedState;
use crate::net::rt;
use crate::store::Direction;

/// Timeline events per room when the filter names no limit.
const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// How far back unread counts look.
const UNREAD_SCAN_LIMIT: usize = 100;
/// Timeline events a user may not see that one room's sync timeline skips before it stops
/// looking further back (and marks the timeline limited).
const MAX_HIDDEN_SCAN: usize = 200;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SyncToken {
    pub(super) events: u64,
    pub(super) client: u64,
    pub(super) typing: u64,
}

impl SyncToken {
    pub(super) fn parse(s: &str) -> ApiResult<Self> {
        let bad = || ApiError::invalid_param(format!("`{s}` is not a sync token of this server"));
        let rest = s.strip_prefix('s').ok_or_else(bad)?;
        let mut parts = rest.split('_').map(|p| p.parse::<u64>().map_err(|_| bad()));
        let token = Self {
            events: parts.next().ok_or_else(bad)??,
            client: parts.next().ok_or_else(bad)??,
            typing: parts.next().ok_or_else(bad)??,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(token)
    }

    pub(super) fn render(&self) -> String {
        format!("s{}_{}_{}", self.events, self.client, self.typing)
    }
}

/// The event position of a `/messages` or sync token.
pub fn parse_position(token: &str) -> ApiResult<u64> {
    if let Some(n) = token.strip_prefix('t') {
        return n
            .parse()
            .map_err(|_| ApiError::invalid_param(format!("`{token}` is not a pagination token")));
    }
    Ok(SyncToken::parse(token)?.events)
}

/// The parts of a room event filter this server applies.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub limit: Option<usize>,
    types: Option<Vec<String>>,
    not_types: Vec<String>,
    senders: Option<Vec<String>>,
    not_senders: Vec<String>,
    pub lazy_load_members: bool,
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    })
}

/// Matrix type patterns: exact, or a prefix ending in `*`.
fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

impl EventFilter {
    pub fn from_value(v: &Value) -> Self {
        Self {
            limit: v["limit"].as_u64().map(|l| l as usize),
            types: strings(&v["types"]),
            not_types: strings(&v["not_types"]).unwrap_or_default(),
            senders: strings(&v["senders"]),
            not_senders: strings(&v["not_senders"]).unwrap_or_default(),
            lazy_load_members: v["lazy_load_members"].as_bool().unwrap_or(false),
        }
    }

    pub fn matches(&self, ev: &StoredEvent) -> bool {
        let kind = ev.pdu.kind.to_string();
        let sender = ev.pdu.sender.as_str();
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|p| type_matches(p, &kind)))
            && !self.not_types.iter().any(|p| type_matches(p, &kind))
            && self
                .senders
                .as_ref()
                .is_none_or(|s| s.iter().any(|x| x == sender))
            && !self.not_senders.iter().any(|x| x == sender)
    }
}

/// The newest events of a room in a position range that pass a filter and that a reader may see.
pub(super) struct TimelineSlice {
    /// Oldest first.
    pub events: Vec<Arc<StoredEvent>>,
    /// Events were left out: more than the limit, or much hidden history.
    pub limited: bool,
    /// The oldest position looked at.
    pub cursor: Option<u64>,
}

/// Up to `limit` of the newest events in `range` that pass `filter` and that `reader` may see.
pub(super) async fn visible_timeline(
    engine: &crate::engine::Engine,
    room: &RoomId,
    reader: &Reader<'_>,
    range: std::ops::Range<u64>,
    limit: usize,
    filter: &EventFilter,
) -> ApiResult<TimelineSlice> {
    let (lower, upper) = (range.start, range.end);
    let mut timeline: Vec<Arc<StoredEvent>> = Vec::new();
    let mut cursor = Some(upper);
    let mut limited = false;
    let mut hidden = 0;
    if limit == 0 {
        // Nothing asked for: only whether there is anything at all.
        let newest = engine
            .timeline(room, cursor, Direction::Backward, 1)
            .await?;
        let limited = newest
            .first()
            .is_some_and(|ev| ev.stream.is_some_and(|p| p >= lower));
        return Ok(TimelineSlice {
            events: timeline,
            limited,
            cursor,
        });
    }
    // An incremental pass rarely has more than a few new events: reading `limit` index
    // entries each time would cost an IndexedDB cursor step apiece in the tab.
    let page_size = if lower == 0 {
        limit
    } else {
        let in_range = usize::try_from(upper.saturating_sub(lower)).unwrap_or(usize::MAX);
        limit.min(in_range.saturating_add(1)).max(1)
    };
    'pages: loop {
        let page = engine
            .timeline(room, cursor, Direction::Backward, page_size)
            .await?;
        let exhausted = page.len() < page_size;
        for ev in page {
            let pos = ev.stream.expect("timeline events have positions");
            if pos < lower {
                break 'pages;
            }
            cursor = Some(pos);
            if !filter.matches(&ev) {
                continue;
            }
            if !reader.may_see(&ev).await? {
                // Much history the user may not see (they joined late): stop looking; the
                // client pages on with `/messages`, which filters the same way.
                hidden += 1;
                if hidden > MAX_HIDDEN_SCAN {
                    limited = true;
                    break 'pages;
                }
                continue;
            }
            if timeline.len() == limit {
                limited = true;
                break 'pages;
            }
            timeline.push(ev);
        }
        if exhausted {
            break;
        }
    }
    timeline.reverse();
    Ok(TimelineSlice {
        events: timeline,
        limited,
        cursor,
    })
}

/// What one pass of `/sync` found.
struct Delta {
    body: Value,
    empty: bool,
}

impl ClientApi {
    pub(super) async fn sync(&self, req: &ApiRequest, s: &Session) -> ApiResult<ApiResponse> {
        use ruma::api::client::sync::sync_events::v3::{Filter, Request};
        let r: Request = parse(req, &[])?;
        let filter = match &r.filter {
            None => json!({}),
            Some(Filter::FilterDefinition(f)) => {
                serde_json::to_value(f).map_err(|e| ApiError::bad_json(e.to_string()))?
            }
            Some(Filter::FilterId(id)) => self
                .data
                .filter(&s.user_id, id)
                .await?
                .ok_or_else(|| ApiError::invalid_param(format!("no filter {id}")))?,
            Some(_) => json!({}),
        };
        let since = r.since.as_deref().map(SyncToken::parse).transpose()?;
        let timeout = r.timeout.unwrap_or(Duration::ZERO).min(MAX_SYNC_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let mut changes = self.node.changes();
        loop {
            changes.borrow_and_update();
            let delta = self.sync_once(s, since, &filter, r.full_state).await?;
            let now = Instant::now();
            if since.is_none() || r.full_state || !delta.empty || now >= deadline {
                return ok(delta.body);
            }
            // Woken by any change on this node; a pass that finds nothing for this user waits again.
            // A node that stops ends the wait too, so the client hears it now.
            let woken =
                futures::future::select(Box::pin(changes.changed()), Box::pin(self.node.stopped()));
            if rt::timeout(deadline - now, woken).await.is_none() {
                return ok(delta.body);
            }
            if self.node.is_stopped() {
                return Err(ApiError::stopped());
            }
        }
    }

    async fn sync_once(
        &self,
        s: &Session,
        since: Option<SyncToken>,
        filter: &Value,
        full_state: bool,
    ) -> ApiResult<Delta> {
        let engine = self.node.engine();
        let mut next = SyncToken {
            events: engine.stream_position().await,
            client: self.data.position(),
            typing: self.typing_serial.load(Ordering::SeqCst),
        };
        let mut from = since.unwrap_or_default();
        if from.typing > next.typing {
            // The typing serial restarts with the node.
            from.typing = 0;
        }
        let room_filter = &filter["room"];
        let timeline_filter = EventFilter::from_value(&room_filter["timeline"]);
        let lazy_members = EventFilter::from_value(&room_filter["state"]).lazy_load_members;
        let include_leave = room_filter["include_leave"].as_bool().unwrap_or(false);
        let (account, rooms, ignored, rules) = futures::try_join!(
            self.data
                .account_data_since(&s.user_id, from.client, next.client),
            async { Ok(engine.rooms().await?) },
            self.ignored_users(&s.user_id),
            self.push_ruleset(&s.user_id),
        )?;

        let mut join = serde_json::Map::new();
        let mut invite = serde_json::Map::new();
        let mut leave = serde_json::Map::new();
        let mut knock = serde_json::Map::new();
        let mut known_rooms = HashSet::new();
        for room in rooms {
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            let Some(member) = self.member_event(&state, &s.user_id).await? else {
                continue;
            };
            known_rooms.insert(room.clone());
            if self.data.forgotten(&s.user_id, &room).await? {
                continue;
            }
            let member_pos = member.stream.unwrap_or(0);
            if member_pos >= next.events {
                // Changed after this pass took its positions: the next pass has it whole.
                continue;
            }
            let changed_membership = since.is_some() && member_pos >= from.events;
            let membership = membership_of(&member);
            match membership.as_deref() {
                Some("join" | "leave" | "ban") => {
                    let joined = membership.as_deref() == Some("join");
                    let show_left = changed_membership || (since.is_none() && include_leave);
                    if !joined && !show_left {
                        continue;
                    }
                    // One reader per room and pass: it reads the user's membership once.
                    let reader =
                        Reader::new(engine, &room, &s.user_id, Some(&member), ignored.clone())
                            .await?;
                    let fresh = since.is_none() || full_state || (joined && changed_membership);
                    let entry = self
                        .room_entry(
                            s,
                            &room,
                            &state,
                            &reader,
                            (from, next),
                            fresh,
                            &timeline_filter,
                            lazy_members,
                            &account,
                            &rules,
                        )
                        .await?;
                    match entry {
                        Some(entry) if joined => {
                            join.insert(room.to_string(), entry);
                        }
                        Some(entry) => {
                            leave.insert(room.to_string(), entry);
                        }
                        None => {}
                    }
                }
                Some("knock") if since.is_none() || changed_membership => {
                    knock.insert(
                        room.to_string(),
                        json!({"knock_state": {"events": self.invite_state(&state, &member).await?}}),
                    );
                }
                Some("invite")
                    if (since.is_none() || changed_membership)
                        && !ignored.contains(&member.pdu.sender) =>
                {
                    invite.insert(
                        room.to_string(),
                        json!({"invite_state": {"events": self.invite_state(&state, &member).await?}}),
                    );
                }
                _ => {}
            }
        }
        // Invites to rooms this peer does not hold yet, handed over by the inviter's peer.
        for inv in self.node.invites() {
            if inv.invitee != s.user_id
                || known_rooms.contains(&inv.room_id)
                || ignored.contains(&inv.sender)
            {
                continue;
            }
            let seen = self
                .seen_invites
                .lock()
                .expect("invites lock")
                .get(&inv.event_id)
                .copied();
            let pos = match seen {
                Some(p) => p,
                None => {
                    let p = self.data.bump().await?;
                    self.seen_invites
                        .lock()
                        .expect("invites lock")
                        .insert(inv.event_id.clone(), p);
                    next.client = self.data.position();
                    p
                }
            };
            if since.is_some() && pos < from.client {
                continue;
            }
            let member = json!({
                "type": "m.room.member", "state_key": inv.invitee, "sender": inv.sender,
                "content": {"membership": "invite"}, "event_id": inv.event_id,
                "origin_server_ts": now(),
            });
            let mut events = inv.room_state.clone();
            events.push(member);
            invite.insert(
                inv.room_id.to_string(),
                json!({"invite_state": {"events": events}}),
            );
        }

        // Knocks on rooms this peer does not hold, until an invite or a join answers them.
        for (room, event_id, mut events, pos) in self.remote_knocks(&s.user_id).await? {
            if known_rooms.contains(&room)
                || invite.contains_key(room.as_str())
                || pos >= next.client
                || (since.is_some() && pos < from.client)
            {
                continue;
            }
            events.push(json!({
                "type": "m.room.member", "state_key": s.user_id, "sender": s.user_id,
                "content": {"membership": "knock"}, "event_id": event_id,
                "origin_server_ts": now(),
            }));
            knock.insert(room.to_string(), json!({"knock_state": {"events": events}}));
        }

        // Remote invites declined since the last pass: the room moves to `leave` once.
        if since.is_some() {
            let declined: Vec<(OwnedRoomId, u64)> = self
                .declined_invites
                .lock()
                .expect("invites lock")
                .iter()
                .filter(|((user, room), pos)| {
                    // In this pass's window only: a decline after it took its positions is
                    // the next pass's.
                    *user == s.user_id
                        && (from.client..next.client).contains(*pos)
                        && !known_rooms.contains(room)
                })
                .map(|((_, room), pos)| (room.clone(), *pos))
                .collect();
            for (room, pos) in declined {
                let leave_event = json!({
                    "type": "m.room.member", "state_key": s.user_id, "sender": s.user_id,
                    "content": {"membership": "leave"},
                    "event_id": format!("$declined-{pos}"),
                    "origin_server_ts": now(),
                });
                leave.insert(
                    room.to_string(),
                    json!({"timeline": {"events": [leave_event]}, "state": {"events": []}}),
                );
            }
        }

        let mut global_account = Vec::new();
        for (room, kind, content) in &account {
            if room.is_none() {
                global_account.push(json!({"type": kind, "content": content}));
            }
        }
        // Rules the user never changed are the defaults, which no account data holds.
        if since.is_none()
            && !account
                .iter()
                .any(|(r, kind, _)| r.is_none() && kind == PUSH_RULES)
        {
            global_account.push(json!({"type": PUSH_RULES, "content": {"global": rules}}));
        }
        // Independent reads: issued together, so in the tab their IndexedDB round trips overlap.
        let (to_device, otk_counts, fallback_types) = futures::try_join!(
            self.data.to_device(s, from.client, next.client),
            self.data
                .one_time_key_counts(&s.user_id, s.device_id.as_str()),
            self.data
                .unused_fallback_key_types(&s.user_id, s.device_id.as_str()),
        )?;
        // Device changes of the user and of those sharing a room with them, and who joined or
        // left (an initial sync has none: the client queries every user it tracks).
        let (devices_changed, devices_left) = match since {
            Some(_) => self.device_list_changes(s, from, next).await?,
            None => Default::default(),
        };
        let empty = join.is_empty()
            && invite.is_empty()
            && leave.is_empty()
            && knock.is_empty()
            && global_account.is_empty()
            && to_device.is_empty()
            && devices_changed.is_empty()
            && devices_left.is_empty();
        let body = json!({
            "next_batch": next.render(),
            "rooms": {"join": join, "invite": invite, "leave": leave, "knock": knock},
            "account_data": {"events": global_account},
            "presence": {"events": []},
            "to_device": {"events": to_device},
            "device_lists": {"changed": devices_changed, "left": devices_left},
            "device_one_time_keys_count": otk_counts,
            "device_unused_fallback_key_types": fallback_types,
        });
        Ok(Delta { body, empty })
    }

    /// A room's part of a sync response — joined, or left (then up to the user's leave, with no
    /// ephemeral events or counts) — or `None` if nothing changed in it.
    #[allow(clippy::too_many_arguments)]
    async fn room_entry(
        &self,
        s: &Session,
        room: &RoomId,
        state: &SortedState,
        reader: &Reader<'_>,
        (from, next): (SyncToken, SyncToken),
        fresh: bool,
        filter: &EventFilter,
        lazy_members: bool,
        account: &[(Option<String>, String, Value)],
        rules: &ruma::push::Ruleset,
    ) -> ApiResult<Option<Value>> {
        let engine = self.node.engine();
        let joined = reader.until().is_none();
        let limit = filter
            .limit
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .clamp(1, 1000);
        let lower = if fresh { 0 } else { from.events };
        let upper = reader.bound(next.events);
        let TimelineSlice {
            events: timeline,
            limited,
            cursor,
        } = visible_timeline(engine, room, reader, lower..upper, limit, filter).await?;
        let first_pos = timeline.first().and_then(|e| e.stream).or(cursor);

        // State up to the start of the timeline: all of it for a fresh room, else what changed
        // in the gap a limited timeline skipped.
        let mut state_events = Vec::new();
        if fresh || limited {
            let at_start = match timeline.first() {
                Some(first) => engine.state_before(&first.pdu.event_id).await?,
                None if joined => None,
                None => reader.state(room).await?,
            }
            // A left user is never handed the room's current state.
            .unwrap_or_else(|| {
                if joined {
                    state.clone()
                } else {
                    SortedState::new()
                }
            });
            let senders: HashSet<String> = timeline
                .iter()
                .map(|e| e.pdu.sender.to_string())
                .chain([s.user_id.to_string()])
                .collect();
            for ((kind, key), id) in &at_start {
                if lazy_members && kind == "m.room.member" && !senders.contains(key) {
                    continue;
                }
                let Some(ev) = engine.event(id).await? else {
                    continue;
                };
                if !fresh && ev.stream.is_some_and(|p| p < from.events) {
                    continue;
                }
                state_events.push(self.client_format(s, &ev).await?);
            }
        }

        let room_account: Vec<Value> = account
            .iter()
            .filter(|(r, _, _)| r.as_deref() == Some(room.as_str()))
            .map(|(_, kind, content)| json!({"type": kind, "content": content}))
            .collect();
        let prev_batch = format!("t{}", first_pos.unwrap_or(from.events.max(1)));
        if !joined {
            let events = self
                .client_format_all(s, timeline.iter().map(|e| e.as_ref()))
                .await?;
            return Ok(Some(json!({
                "timeline": {"events": events, "limited": limited, "prev_batch": prev_batch},
                "state": {"events": state_events},
                "account_data": {"events": room_account},
            })));
        }

        let mut ephemeral = Vec::new();
        let (typing_serial, mut typing_users) = self.typing_in(room);
        typing_users.retain(|u| !reader.ignores(u));
        if typing_serial > from.typing || (fresh && !typing_users.is_empty()) {
            ephemeral.push(json!({"type": "m.typing", "content": {"user_ids": typing_users}}));
        }
        let receipts_from = if fresh { 0 } else { from.client };
        if let Some(content) = self
            .data
            .receipts_since(room, receipts_from, next.client, &s.user_id)
            .await?
        {
            ephemeral.push(json!({"type": "m.receipt", "content": content}));
        }

        if timeline.is_empty()
            && state_events.is_empty()
            && ephemeral.is_empty()
            && room_account.is_empty()
            && !fresh
        {
            return Ok(None);
        }
        let (events, summary, (notifications, highlights)) = futures::try_join!(
            self.client_format_all(s, timeline.iter().map(|e| e.as_ref())),
            self.summary(state, s),
            self.unread_counts(room, state, s, reader, rules),
        )?;
        Ok(Some(json!({
            "timeline": {"events": events, "limited": limited, "prev_batch": prev_batch},
            "state": {"events": state_events},
            "ephemeral": {"events": ephemeral},
            "account_data": {"events": room_account},
            "summary": summary,
            "unread_notifications": {
                "notification_count": notifications,
                "highlight_count": highlights,
            },
        })))
    }

    /// Heroes and member counts, so clients can name rooms without a name.
    pub(super) async fn summary(&self, state: &SortedState, s: &Session) -> ApiResult<Value> {
        let engine = self.node.engine();
        let (mut joined, mut invited, mut heroes) = (0, 0, Vec::new());
        for ((kind, key), id) in state {
            if kind != "m.room.member" {
                continue;
            }
            let Some(ev) = engine.event(id).await? else {
                continue;
            };
            match membership_of(&ev).as_deref() {
                Some("join") => joined += 1,
                Some("invite") => invited += 1,
                _ => continue,
            }
            if key != s.user_id.as_str() && heroes.len() < 5 {
                heroes.push(key.clone());
            }
        }
        Ok(json!({
            "m.heroes": heroes,
            "m.joined_member_count": joined,
            "m.invited_member_count": invited,
        }))
    }

    /// Notifying and highlighting events from others after the user's read receipt, as
    /// their push rules judge them (looking back a bounded distance).
    pub(super) async fn unread_counts(
        &self,
        room: &RoomId,
        state: &SortedState,
        s: &Session,
        reader: &Reader<'_>,
        rules: &ruma::push::Ruleset,
    ) -> ApiResult<(u64, u64)> {
        let read = self.data.receipt_of(room, &s.user_id).await?;
        let (mut notifications, mut highlights) = (0, 0);
        let mut scanned = 0;
        let mut cursor = None;
        // Built at the first event to judge: most rooms have none.
        let mut notifier = None;
        // The read marker is usually a few events back: look in small pages first.
        let mut page = 8;
        'scan: while scanned < UNREAD_SCAN_LIMIT {
            let want = page.min(UNREAD_SCAN_LIMIT - scanned);
            let recent = self
                .node
                .engine()
                .timeline(room, cursor, Direction::Backward, want)
                .await?;
            let exhausted = recent.len() < want;
            for ev in recent {
                scanned += 1;
                cursor = ev.stream;
                if read.as_deref() == Some(ev.pdu.event_id.as_str()) || ev.pdu.sender == s.user_id {
                    break 'scan;
                }
                if !reader.may_see(&ev).await? {
                    continue;
                }
                if notifier.is_none() {
                    notifier = Some(self.notifier(room, state, &s.user_id, rules).await?);
                }
                let judged = notifier.as_ref().expect("just built").judge(&ev).await;
                notifications += u64::from(judged.notify);
                highlights += u64::from(judged.highlight);
            }
            if exhausted {
                break;
            }
            page *= 4;
        }
        Ok((notifications, highlights))
    }

    /// Remembers that `user` declined a remote invite to `room` at client-data position `pos`.
    pub(super) fn note_declined_invite(&self, user: &UserId, room: &RoomId, pos: u64) {
        let mut declined = self.declined_invites.lock().expect("invites lock");
        declined.insert((user.to_owned(), room.to_owned()), pos);
        // As many as invites can be held; the oldest declines were long since synced.
        while declined.len() > crate::rooms::invites::MAX_INVITES {
            let oldest = declined
                .iter()
                .min_by_key(|(_, pos)| **pos)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            declined.remove(&oldest);
        }
    }

    /// Stripped state an invitee sees: enough to name the room and know who invited them.
    pub(super) async fn invite_state(
        &self,
        state: &SortedState,
        member: &StoredEvent,
    ) -> ApiResult<Vec<Value>> {
        let engine = self.node.engine();
        let mut out = Vec::new();
        for kind in crate::rooms::STRIPPED_STATE {
            if let Some(id) = state.get(&(kind.to_owned(), String::new())) {
                if let Some(ev) = engine.event(id).await? {
                    out.push(stripped(&ev));
                }
            }
        }
        if let Some(id) = state.get(&("m.room.member".to_owned(), member.pdu.sender.to_string())) {
            if let Some(ev) = engine.event(id).await? {
                out.push(stripped(&ev));
            }
        }
        let mut own = stripped(member);
        own["event_id"] = member.pdu.event_id.as_str().into();
        own["origin_server_ts"] = json!(member.pdu.origin_server_ts);
        out.push(own);
        Ok(out)
    }
}
