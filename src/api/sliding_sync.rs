//! Simplified Sliding Sync (MSC4186: `POST /unstable/org.matrix.simplified_msc3575/sync`), as
//! Element X and matrix-rust-sdk use it: lists of the user's rooms sorted by recency, each
//! cut to windows by ranges; rooms the client subscribes to by id; and the extensions
//! (to-device, e2ee, account data, receipts, typing).
//!
//! A connection (user, device, `conn_id`) remembers, for each `pos` it hands out, which rooms
//! it has sent and up to which stream position. A request with that `pos` gets what is new
//! since; a room that enters a window for the first time arrives whole (`initial`). The last
//! few `pos` of a connection stay valid, so a client whose response was lost asks again from
//! where it really is. This lives in memory: after the node restarts a `pos` is unknown
//! (`M_UNKNOWN_POS`) and the client starts its connection again, as the MSC provides.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::StatusCode;
use ruma::api::client::sync::sync_events::v5::{request, Request};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::membership_of;
use super::push_rules::PUSH_RULES;
use super::sync::{visible_timeline, EventFilter, SyncToken, TimelineSlice};
use super::visibility::{Ignored, Reader};
use super::{ok, parse, ApiRequest, ApiResponse, ClientApi, Duration, Instant, MAX_SYNC_TIMEOUT};
use crate::engine::pdu::StoredEvent;
use crate::engine::SortedState;
use crate::net::rt;
use crate::store::Direction;

/// Lists in one request, ranges per list, rooms subscribed to, and `required_state` entries
/// per list or subscription: past these a request is refused.
const MAX_LISTS: usize = 64;
const MAX_RANGES: usize = 64;
const MAX_SUBSCRIPTIONS: usize = 1000;
const MAX_REQUIRED_STATE: usize = 256;
/// Timeline events per room at most (a larger `timeline_limit` is cut to this).
const MAX_TIMELINE_LIMIT: usize = 1000;
/// Longest `conn_id`, `txn_id` and extension token.
const MAX_ID_LEN: usize = 256;
/// Connections remembered per device, and on the whole node (the least recently used go).
const MAX_CONNECTIONS_PER_DEVICE: usize = 8;
const MAX_CONNECTIONS_PER_USER: usize = 32;
const MAX_CONNECTIONS: usize = 10_000;
/// `pos` values that stay valid per connection: the newest and those before it (a client that
/// drops a long poll asks again from where it was, while the dropped one may still finish).
const SNAPSHOTS_KEPT: usize = 8;
/// Events looked at, newest first, for what last moved a room up the list.
const BUMP_SCAN_LIMIT: usize = 256;
/// Event types that move a room up the list (Synapse's defaults): what a user notices.
const BUMP_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "m.beacon_info",
];

/// What a connection has sent of one room.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SentRoom {
    /// Every event below this stream position was sent (or left out of a limited timeline).
    upto: u64,
    /// The hash of the settings it was sent with.
    settings: u64,
    /// It was sent as an invite (a join then sends it whole).
    invite: bool,
}

/// What a connection had been sent when a `pos` was handed out.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    token: SyncToken,
    rooms: imbl::HashMap<OwnedRoomId, SentRoom>,
    counts: BTreeMap<String, usize>,
}

/// (user, device, `conn_id`)
type ConnKey = (OwnedUserId, String, String);

struct Connection {
    /// Oldest first: (serial, what was sent).
    snapshots: Vec<(u64, Arc<Snapshot>)>,
    last_used: u64,
}

/// Every sliding-sync connection of the node's users.
pub(super) struct Connections {
    /// Differs on every start of the node, so `pos` values of an earlier run are unknown.
    epoch: u32,
    serial: u64,
    conns: HashMap<ConnKey, Connection>,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            epoch: rand::random(),
            serial: 0,
            conns: HashMap::new(),
        }
    }
}

impl Connections {
    fn snapshot(&mut self, key: &ConnKey, pos: &str) -> ApiResult<Arc<Snapshot>> {
        let unknown = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN_POS",
                "unknown position: start the connection again without `pos`",
            )
        };
        let (epoch, serial) = pos.split_once('_').ok_or_else(unknown)?;
        if u32::from_str_radix(epoch, 16).ok() != Some(self.epoch) {
            return Err(unknown());
        }
        let serial: u64 = serial.parse().map_err(|_| unknown())?;
        self.serial += 1;
        let used = self.serial;
        let conn = self.conns.get_mut(key).ok_or_else(unknown)?;
        conn.last_used = used;
        conn.snapshots
            .iter()
            .find(|(s, _)| *s == serial)
            .map(|(_, snap)| snap.clone())
            .ok_or_else(unknown)
    }

    /// Keeps `snap` for the connection and returns the `pos` that names it.
    fn remember(&mut self, key: ConnKey, snap: Snapshot) -> String {
        self.serial += 1;
        let serial = self.serial;
        let (user, device) = (key.0.clone(), key.1.clone());
        let conn = self.conns.entry(key).or_insert_with(|| Connection {
            snapshots: Vec::new(),
            last_used: serial,
        });
        conn.last_used = serial;
        conn.snapshots.push((serial, Arc::new(snap)));
        if conn.snapshots.len() > SNAPSHOTS_KEPT {
            conn.snapshots.remove(0);
        }
        let of_device = |k: &ConnKey| k.0 == user && k.1 == device;
        while self.conns.keys().filter(|k| of_device(k)).count() > MAX_CONNECTIONS_PER_DEVICE {
            self.drop_least_used(of_device);
        }
        // One user's many logins cannot push everyone else's connections out.
        let of_user = |k: &ConnKey| k.0 == user;
        while self.conns.keys().filter(|k| of_user(k)).count() > MAX_CONNECTIONS_PER_USER {
            self.drop_least_used(of_user);
        }
        while self.conns.len() > MAX_CONNECTIONS {
            self.drop_least_used(|_| true);
        }
        format!("{:08x}_{serial}", self.epoch)
    }

    fn drop_least_used(&mut self, among: impl Fn(&ConnKey) -> bool) {
        let oldest = self
            .conns
            .iter()
            .filter(|(k, _)| among(k))
            .min_by_key(|(_, c)| c.last_used)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.conns.remove(&k);
        }
    }
}

/// How much of a room the client asked for: the union over the lists and subscriptions that
/// hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct RoomSettings {
    timeline_limit: usize,
    required_state: BTreeSet<(String, String)>,
}

impl RoomSettings {
    fn new(required_state: &[(ruma::events::StateEventType, String)], timeline_limit: u64) -> Self {
        Self {
            timeline_limit: usize::try_from(timeline_limit)
                .unwrap_or(usize::MAX)
                .min(MAX_TIMELINE_LIMIT),
            required_state: required_state
                .iter()
                .map(|(kind, key)| (kind.to_string(), key.clone()))
                .collect(),
        }
    }

    fn merge(&mut self, other: &Self) {
        self.timeline_limit = self.timeline_limit.max(other.timeline_limit);
        self.required_state
            .extend(other.required_state.iter().cloned());
    }

    fn key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// The state keys of `state` these settings ask for, given who sent the timeline.
    fn pick<'s>(
        &self,
        state: &'s SortedState,
        me: &UserId,
        senders: &HashSet<String>,
    ) -> BTreeSet<&'s (String, String)> {
        let mut out = BTreeSet::new();
        for (kind, key) in &self.required_state {
            let keys: Vec<String> = match key.as_str() {
                "*" => Vec::new(),
                "$ME" => vec![me.to_string()],
                "$LAZY" => senders.iter().cloned().collect(),
                k => vec![k.to_owned()],
            };
            if kind == "*" {
                for entry in state.keys() {
                    if key == "*" || keys.contains(&entry.1) {
                        out.insert(entry);
                    }
                }
            } else if key == "*" {
                let from = (kind.clone(), String::new());
                for entry in state.range(from..).map(|(k, _)| k) {
                    if entry.0 != *kind {
                        break;
                    }
                    out.insert(entry);
                }
            } else {
                for k in keys {
                    if let Some((entry, _)) = state.get_key_value(&(kind.clone(), k)) {
                        out.insert(entry);
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Join,
    Invite,
    /// Left, kicked or banned since the connection last heard of the room.
    Left,
}

/// One of the user's rooms as the lists see it.
struct Candidate {
    room: OwnedRoomId,
    membership: Membership,
    bump: u64,
    is_dm: bool,
    encrypted: bool,
    room_type: Option<String>,
    /// The room's current state; `None` for an invite to a room this server does not hold.
    state: Option<SortedState>,
    member: Option<Arc<StoredEvent>>,
    /// For an invite to a room this server does not hold: its stripped state.
    remote_invite: Option<Vec<Value>>,
}

impl Candidate {
    fn passes(&self, f: &request::ListFilters) -> bool {
        let type_in = |types: &[ruma::directory::RoomTypeFilter]| {
            types
                .iter()
                .any(|t| t.as_str() == self.room_type.as_deref())
        };
        f.is_dm.is_none_or(|want| want == self.is_dm)
            && f.is_encrypted.is_none_or(|want| want == self.encrypted)
            && f.is_invite
                .is_none_or(|want| want == (self.membership == Membership::Invite))
            && (f.room_types.is_empty() || type_in(&f.room_types))
            && !type_in(&f.not_room_types)
    }
}

/// What one pass found.
struct Pass {
    body: Value,
    snapshot: Snapshot,
    has_data: bool,
}

/// Which rooms an extension covers: those of the named lists' windows (all lists when it
/// names none, or `*`) and the subscriptions (all when it names none, or `*`) or named rooms.
fn extension_rooms(
    lists: Option<&Vec<String>>,
    rooms: Option<&Vec<request::ExtensionRoomConfig>>,
    windows: &BTreeMap<String, Vec<OwnedRoomId>>,
    subscribed: &[OwnedRoomId],
    known: &HashSet<OwnedRoomId>,
) -> BTreeSet<OwnedRoomId> {
    let mut out = BTreeSet::new();
    for (name, window) in windows {
        if lists.is_none_or(|l| l.iter().any(|n| n == "*" || n == name)) {
            out.extend(window.iter().cloned());
        }
    }
    match rooms {
        None => out.extend(subscribed.iter().cloned()),
        Some(rooms) => {
            for r in rooms {
                match r {
                    request::ExtensionRoomConfig::AllSubscribed => {
                        out.extend(subscribed.iter().cloned())
                    }
                    request::ExtensionRoomConfig::Room(id) if known.contains(id) => {
                        out.insert(id.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Refuses what no client sends and what would cost too much.
fn check_request(req: &ApiRequest, r: &Request) -> ApiResult<()> {
    let too_many = |what: &str, max: usize| {
        ApiError::invalid_param(format!("at most {max} {what} per request"))
    };
    if r.lists.len() > MAX_LISTS {
        return Err(too_many("lists", MAX_LISTS));
    }
    if r.room_subscriptions.len() > MAX_SUBSCRIPTIONS {
        return Err(too_many("room subscriptions", MAX_SUBSCRIPTIONS));
    }
    for id in [&r.conn_id, &r.txn_id, &r.pos, &r.extensions.to_device.since] {
        if id.as_ref().is_some_and(|s| s.len() > MAX_ID_LEN) {
            return Err(ApiError::invalid_param(format!(
                "ids and tokens are at most {MAX_ID_LEN} bytes"
            )));
        }
    }
    for (name, list) in &r.lists {
        if name.len() > MAX_ID_LEN {
            return Err(ApiError::invalid_param("list name too long"));
        }
        if list.ranges.len() > MAX_RANGES {
            return Err(too_many("ranges in a list", MAX_RANGES));
        }
        if let Some((a, b)) = list.ranges.iter().find(|(a, b)| a > b) {
            return Err(ApiError::invalid_param(format!(
                "list {name}: range [{a}, {b}] ends before it starts"
            )));
        }
        if list.room_details.required_state.len() > MAX_REQUIRED_STATE {
            return Err(too_many(
                "required_state entries in a list",
                MAX_REQUIRED_STATE,
            ));
        }
    }
    if r.room_subscriptions
        .values()
        .any(|s| s.required_state.len() > MAX_REQUIRED_STATE)
    {
        return Err(too_many(
            "required_state entries in a subscription",
            MAX_REQUIRED_STATE,
        ));
    }
    // Extensions this server does not know are ignored (newer clients ask for more), but
    // each must be an object like every known one.
    let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
    if let Some(exts) = body.get("extensions").and_then(Value::as_object) {
        for (name, ext) in exts {
            if !ext.is_object() {
                return Err(ApiError::bad_json(format!(
                    "extension {name} must be an object"
                )));
            }
        }
    }
    Ok(())
}

impl ClientApi {
    pub(super) async fn sliding_sync(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        let r: Request = parse(req, &[])?;
        check_request(req, &r)?;
        if let Some(since) = &r.extensions.to_device.since {
            since.parse::<u64>().map_err(|_| {
                ApiError::invalid_param(format!(
                    "`{since}` is not a to-device token of this server"
                ))
            })?;
        }
        let key: ConnKey = (
            s.user_id.clone(),
            s.device_id.to_string(),
            r.conn_id.clone().unwrap_or_default(),
        );
        let prev = match &r.pos {
            None => None,
            Some(pos) => Some(
                self.sliding
                    .lock()
                    .expect("sliding lock")
                    .snapshot(&key, pos)?,
            ),
        };
        let timeout = r.timeout.unwrap_or(Duration::ZERO).min(MAX_SYNC_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let mut changes = self.node.changes();
        loop {
            changes.borrow_and_update();
            let pass = self.sliding_once(s, &r, prev.as_deref()).await?;
            let now = Instant::now();
            if prev.is_none() || pass.has_data || now >= deadline {
                let pos = self
                    .sliding
                    .lock()
                    .expect("sliding lock")
                    .remember(key, pass.snapshot);
                let mut body = pass.body;
                body["pos"] = pos.into();
                if let Some(txn) = &r.txn_id {
                    body["txn_id"] = txn.as_str().into();
                }
                return ok(body);
            }
            // Woken by any change on this node, as `/sync` is.
            let woken =
                futures::future::select(Box::pin(changes.changed()), Box::pin(self.node.stopped()));
            if rt::timeout(deadline - now, woken).await.is_none() {
                continue;
            }
            if self.node.is_stopped() {
                return Err(ApiError::stopped());
            }
        }
    }

    async fn sliding_once(
        &self,
        s: &Session,
        r: &Request,
        prev: Option<&Snapshot>,
    ) -> ApiResult<Pass> {
        let engine = self.node.engine();
        let next = SyncToken {
            events: engine.stream_position().await,
            client: self.data.position(),
            typing: self.typing_serial.load(Ordering::SeqCst),
        };
        let mut from = prev.map(|p| p.token).unwrap_or_default();
        if from.typing > next.typing {
            // The typing serial restarts with the node.
            from.typing = 0;
        }
        let (ignored, rules) = futures::try_join!(
            self.ignored_users(&s.user_id),
            self.push_ruleset(&s.user_id),
        )?;
        let wants_types = r.lists.values().any(|l| {
            l.filters
                .as_ref()
                .is_some_and(|f| !f.room_types.is_empty() || !f.not_room_types.is_empty())
        });
        let (mut candidates, deferred) = self
            .candidates(s, prev, (from, next), &ignored, wants_types)
            .await?;
        candidates.sort_by(|a, b| b.bump.cmp(&a.bump).then_with(|| a.room.cmp(&b.room)));
        let by_id: HashMap<OwnedRoomId, &Candidate> =
            candidates.iter().map(|c| (c.room.clone(), c)).collect();

        // The lists' windows, and what each room in them asks for.
        let mut wanted: BTreeMap<OwnedRoomId, RoomSettings> = BTreeMap::new();
        let mut windows: BTreeMap<String, Vec<OwnedRoomId>> = BTreeMap::new();
        let mut counts = BTreeMap::new();
        let mut lists_out = serde_json::Map::new();
        for (name, list) in &r.lists {
            let matching: Vec<&Candidate> = candidates
                .iter()
                .filter(|c| list.filters.as_ref().is_none_or(|f| c.passes(f)))
                .collect();
            counts.insert(name.clone(), matching.len());
            lists_out.insert(name.clone(), json!({"count": matching.len()}));
            let settings = RoomSettings::new(
                &list.room_details.required_state,
                list.room_details.timeline_limit.into(),
            );
            let window = windows.entry(name.clone()).or_default();
            for (start, end) in &list.ranges {
                let start = usize::try_from(u64::from(*start)).unwrap_or(usize::MAX);
                let end = usize::try_from(u64::from(*end)).unwrap_or(usize::MAX);
                let take = end.saturating_sub(start).saturating_add(1);
                for c in matching.iter().skip(start).take(take) {
                    wanted.entry(c.room.clone()).or_default().merge(&settings);
                    window.push(c.room.clone());
                }
            }
        }
        let mut subscribed = Vec::new();
        for (room, sub) in &r.room_subscriptions {
            // A room the user is not in is not theirs to read: the subscription waits.
            if by_id.contains_key(room) {
                let settings = RoomSettings::new(&sub.required_state, sub.timeline_limit.into());
                wanted.entry(room.clone()).or_default().merge(&settings);
                subscribed.push(room.clone());
            }
        }

        let mut sent = prev.map(|p| p.rooms.clone()).unwrap_or_default();
        // Rooms no longer the user's are forgotten: should they come back, they come whole.
        // (A room whose membership changed during this pass is the next pass's to judge.)
        sent.retain(|room, _| by_id.contains_key(room) || deferred.contains(room));
        let mut rooms_out = serde_json::Map::new();
        let mut initial_rooms = HashSet::new();
        for (room, settings) in &wanted {
            let c = by_id[room];
            let before = prev.and_then(|p| p.rooms.get(room));
            let initial = before.is_none_or(|b| b.invite && c.membership != Membership::Invite);
            if initial {
                initial_rooms.insert(room.clone());
            }
            let entry = self
                .sliding_room(
                    s,
                    c,
                    settings,
                    before.filter(|_| !initial),
                    (from, next),
                    prev.is_some(),
                    &ignored,
                    &rules,
                )
                .await?;
            if let Some(entry) = entry {
                rooms_out.insert(room.to_string(), entry);
            }
            sent.insert(
                room.clone(),
                SentRoom {
                    upto: next.events,
                    settings: settings.key(),
                    invite: c.membership == Membership::Invite,
                },
            );
        }

        let known: HashSet<OwnedRoomId> = wanted.keys().cloned().collect();
        let exts = &r.extensions;
        let mut ext_out = serde_json::Map::new();
        let mut ext_data = false;
        if exts.to_device.enabled == Some(true) {
            let since = exts
                .to_device
                .since
                .as_deref()
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
            let events = self.data.to_device(s, since, next.client).await?;
            ext_data |= !events.is_empty();
            ext_out.insert(
                "to_device".into(),
                json!({"next_batch": next.client.to_string(), "events": events}),
            );
        }
        if exts.e2ee.enabled == Some(true) {
            let (changed, left) = match prev {
                Some(_) => self.device_list_changes(s, from, next).await?,
                None => Default::default(),
            };
            ext_data |= !changed.is_empty() || !left.is_empty();
            let (otk_counts, fallback_types) = futures::try_join!(
                self.data
                    .one_time_key_counts(&s.user_id, s.device_id.as_str()),
                self.data
                    .unused_fallback_key_types(&s.user_id, s.device_id.as_str()),
            )?;
            ext_out.insert(
                "e2ee".into(),
                json!({
                    "device_lists": {"changed": changed, "left": left},
                    "device_one_time_keys_count": otk_counts,
                    "device_unused_fallback_key_types": fallback_types,
                }),
            );
        }
        if exts.account_data.enabled == Some(true) {
            let scope = extension_rooms(
                exts.account_data.lists.as_ref(),
                exts.account_data.rooms.as_ref(),
                &windows,
                &subscribed,
                &known,
            );
            let since = if prev.is_some() { from.client } else { 0 };
            let recent = self
                .data
                .account_data_since(&s.user_id, since, next.client)
                .await?;
            let everything = if prev.is_some() && scope.iter().any(|r| initial_rooms.contains(r)) {
                self.data
                    .account_data_since(&s.user_id, 0, next.client)
                    .await?
            } else {
                Vec::new()
            };
            let mut global = Vec::new();
            let mut rooms = serde_json::Map::new();
            for (room, kind, content) in &recent {
                match room {
                    None => global.push(json!({"type": kind, "content": content})),
                    Some(room) => {
                        let Ok(id) = RoomId::parse(room) else {
                            continue;
                        };
                        if scope.contains(&id) && !(prev.is_some() && initial_rooms.contains(&id)) {
                            push_to(&mut rooms, room, json!({"type": kind, "content": content}));
                        }
                    }
                }
            }
            for (room, kind, content) in &everything {
                let Some(id) = room.as_deref().and_then(|r| RoomId::parse(r).ok()) else {
                    continue;
                };
                if scope.contains(&id) && initial_rooms.contains(&id) {
                    push_to(
                        &mut rooms,
                        id.as_str(),
                        json!({"type": kind, "content": content}),
                    );
                }
            }
            // Rules the user never changed are the defaults, which no account data holds.
            let stored_rules = recent
                .iter()
                .any(|(r, kind, _)| r.is_none() && kind == PUSH_RULES);
            if prev.is_none() && !stored_rules {
                global.push(json!({"type": PUSH_RULES, "content": {"global": rules}}));
            }
            ext_data |= !global.is_empty() || !rooms.is_empty();
            ext_out.insert(
                "account_data".into(),
                json!({"global": global, "rooms": rooms}),
            );
        }
        if exts.receipts.enabled == Some(true) {
            let scope = extension_rooms(
                exts.receipts.lists.as_ref(),
                exts.receipts.rooms.as_ref(),
                &windows,
                &subscribed,
                &known,
            );
            let mut rooms = serde_json::Map::new();
            for room in &scope {
                if by_id[room].membership != Membership::Join {
                    continue;
                }
                let since = if initial_rooms.contains(room) {
                    0
                } else {
                    from.client
                };
                if since >= next.client {
                    // No client data moved: no receipt did.
                    continue;
                }
                if let Some(content) = self
                    .data
                    .receipts_since(room, since, next.client, &s.user_id)
                    .await?
                {
                    rooms.insert(
                        room.to_string(),
                        json!({"type": "m.receipt", "content": content}),
                    );
                }
            }
            ext_data |= !rooms.is_empty();
            ext_out.insert("receipts".into(), json!({"rooms": rooms}));
        }
        if exts.typing.enabled == Some(true) {
            let scope = extension_rooms(
                exts.typing.lists.as_ref(),
                exts.typing.rooms.as_ref(),
                &windows,
                &subscribed,
                &known,
            );
            let mut rooms = serde_json::Map::new();
            for room in &scope {
                if by_id[room].membership != Membership::Join {
                    continue;
                }
                let (serial, mut users) = self.typing_in(room);
                users.retain(|u| !ignored.contains(u));
                let initial = initial_rooms.contains(room);
                if serial > from.typing || (initial && !users.is_empty()) {
                    rooms.insert(
                        room.to_string(),
                        json!({"type": "m.typing", "content": {"user_ids": users}}),
                    );
                }
            }
            ext_data |= !rooms.is_empty();
            ext_out.insert("typing".into(), json!({"rooms": rooms}));
        }

        let has_data = !rooms_out.is_empty() || ext_data || prev.is_none_or(|p| p.counts != counts);
        Ok(Pass {
            body: json!({"lists": lists_out, "rooms": rooms_out, "extensions": ext_out}),
            snapshot: Snapshot {
                token: next,
                rooms: sent,
                counts,
            },
            has_data,
        })
    }

    /// The user's rooms the lists may show: joined and invited, and those they left since the
    /// connection last had them (once, so the client sees them go).
    async fn candidates(
        &self,
        s: &Session,
        prev: Option<&Snapshot>,
        (from, next): (SyncToken, SyncToken),
        ignored: &Ignored,
        wants_types: bool,
    ) -> ApiResult<(Vec<Candidate>, HashSet<OwnedRoomId>)> {
        let engine = self.node.engine();
        let direct = self.direct_rooms(&s.user_id).await?;
        let mut out = Vec::new();
        let mut known = HashSet::new();
        let mut deferred = HashSet::new();
        for room in engine.rooms().await? {
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            let Some(member) = self.member_event(&state, &s.user_id).await? else {
                continue;
            };
            known.insert(room.clone());
            let member_pos = member.stream.unwrap_or(0);
            if member_pos >= next.events {
                deferred.insert(room);
                continue;
            }
            if self.data.forgotten(&s.user_id, &room).await? {
                continue;
            }
            let membership = match membership_of(&member).as_deref() {
                Some("join") => Membership::Join,
                Some("invite") if !ignored.contains(&member.pdu.sender) => Membership::Invite,
                Some("leave" | "ban")
                    if prev.is_some_and(|p| p.rooms.contains_key(&room))
                        && member_pos >= from.events =>
                {
                    Membership::Left
                }
                _ => continue,
            };
            let bump = match membership {
                Membership::Join => self.room_bump(&room, next.events).await?.max(member_pos),
                _ => member_pos,
            };
            let content: Value =
                serde_json::from_str(member.pdu.content.get()).unwrap_or(Value::Null);
            let room_type = if wants_types {
                self.room_type(&state).await?
            } else {
                None
            };
            out.push(Candidate {
                is_dm: direct.contains(&room) || content["is_direct"] == true,
                encrypted: state.contains_key(&("m.room.encryption".to_owned(), String::new())),
                room_type,
                room,
                membership,
                bump,
                state: Some(state),
                member: Some(member),
                remote_invite: None,
            });
        }
        // Invites to rooms this server does not hold yet, handed over by the inviter's peer:
        // newest activity there is, so they sort first.
        for inv in self.node.invites() {
            if inv.invitee != s.user_id
                || known.contains(&inv.room_id)
                || ignored.contains(&inv.sender)
            {
                continue;
            }
            let member = json!({
                "type": "m.room.member", "state_key": inv.invitee, "sender": inv.sender,
                "content": {"membership": "invite"}, "event_id": inv.event_id,
                "origin_server_ts": inv.received_ms,
            });
            let mut stripped = inv.room_state.clone();
            stripped.push(member);
            let room_type = stripped
                .iter()
                .find(|e| e["type"] == "m.room.create")
                .and_then(|e| e["content"]["type"].as_str().map(str::to_owned));
            out.push(Candidate {
                room: inv.room_id.clone(),
                membership: Membership::Invite,
                bump: next.events,
                is_dm: direct.contains(&inv.room_id),
                encrypted: stripped.iter().any(|e| e["type"] == "m.room.encryption"),
                room_type,
                state: None,
                member: None,
                remote_invite: Some(stripped),
            });
        }
        Ok((out, deferred))
    }

    /// One room's part of the response, or `None` if the connection has it all already.
    #[allow(clippy::too_many_arguments)]
    async fn sliding_room(
        &self,
        s: &Session,
        c: &Candidate,
        settings: &RoomSettings,
        before: Option<&SentRoom>,
        (from, next): (SyncToken, SyncToken),
        live: bool,
        ignored: &Ignored,
        rules: &ruma::push::Ruleset,
    ) -> ApiResult<Option<Value>> {
        let engine = self.node.engine();
        let initial = before.is_none();
        if c.membership == Membership::Invite {
            if !initial {
                return Ok(None);
            }
            let invite_state = match (&c.remote_invite, &c.state, &c.member) {
                (Some(stripped), _, _) => stripped.clone(),
                (None, Some(state), Some(member)) => self.invite_state(state, member).await?,
                _ => Vec::new(),
            };
            return Ok(Some(json!({
                "initial": true,
                "invite_state": invite_state,
                "bump_stamp": c.bump,
                "is_dm": c.is_dm,
            })));
        }
        let (Some(state), Some(member)) = (&c.state, &c.member) else {
            return Ok(None);
        };
        let room = c.room.as_ref();
        let reader = Reader::new(engine, room, &s.user_id, Some(member), ignored.clone()).await?;
        let upper = reader.bound(next.events);
        let lower = before.map_or(0, |b| b.upto);
        let settings_changed = before.is_some_and(|b| b.settings != settings.key());
        let TimelineSlice {
            events: timeline,
            limited,
            cursor,
        } = visible_timeline(
            engine,
            room,
            &reader,
            lower..upper,
            settings.timeline_limit,
            &EventFilter::default(),
        )
        .await?;
        let news = !timeline.is_empty() || (settings.timeline_limit == 0 && limited);
        if !initial
            && !news
            && !settings_changed
            && !self
                .own_receipt_moved(room, &s.user_id, from.client, next.client)
                .await?
        {
            return Ok(None);
        }

        // Required state: all that is asked for when the room is new to the connection (or
        // asks for more now), else what changed since it was last sent.
        let at = if c.membership == Membership::Join {
            state.clone()
        } else {
            // A user who left reads the state as it was when they left.
            reader.state(room).await?.unwrap_or_default()
        };
        let senders: HashSet<String> = timeline.iter().map(|e| e.pdu.sender.to_string()).collect();
        let mut required = Vec::new();
        let mut members_changed = initial;
        for entry in settings.pick(&at, &s.user_id, &senders) {
            let Some(ev) = engine.event(&at[entry]).await? else {
                continue;
            };
            let fresh_enough = ev.stream.is_none_or(|p| p >= lower);
            let lazy_sender = entry.0 == "m.room.member" && senders.contains(&entry.1);
            if !initial && !settings_changed && !fresh_enough && !lazy_sender {
                continue;
            }
            members_changed |= entry.0 == "m.room.member" && fresh_enough;
            required.push(self.client_format(s, &ev).await?);
        }
        members_changed |= timeline
            .iter()
            .any(|e| e.pdu.kind.to_string() == "m.room.member");

        let first_pos = timeline.first().and_then(|e| e.stream).or(cursor);
        let num_live = if live {
            timeline
                .iter()
                .filter(|e| e.stream.is_some_and(|p| p >= from.events))
                .count()
        } else {
            0
        };
        let (events, (notifications, highlights)) = futures::try_join!(
            self.client_format_all(s, timeline.iter().map(|e| e.as_ref())),
            self.unread_counts(room, &at, s, &reader, rules),
        )?;
        let mut entry = json!({
            "timeline": events,
            "required_state": required,
            "prev_batch": format!("t{}", first_pos.unwrap_or(lower.max(1))),
            "limited": limited,
            "num_live": num_live,
            "bump_stamp": c.bump,
            "notification_count": notifications,
            "highlight_count": highlights,
            "is_dm": c.is_dm,
        });
        if initial {
            entry["initial"] = true.into();
        }
        if initial || settings_changed || news {
            if let Some(name) = self.state_content(&at, "m.room.name").await?["name"]
                .as_str()
                .filter(|n| !n.is_empty())
            {
                entry["name"] = name.into();
            }
            if let Some(url) = self.state_content(&at, "m.room.avatar").await?["url"].as_str() {
                entry["avatar"] = url.into();
            }
        }
        if members_changed {
            let (joined, invited, heroes) = self.members_and_heroes(&at, &s.user_id).await?;
            entry["joined_count"] = joined.into();
            entry["invited_count"] = invited.into();
            entry["heroes"] = heroes.into();
        }
        Ok(Some(entry))
    }

    /// Member counts and up to five other members to name the room by.
    async fn members_and_heroes(
        &self,
        state: &SortedState,
        me: &UserId,
    ) -> ApiResult<(u64, u64, Vec<Value>)> {
        let engine = self.node.engine();
        let (mut joined, mut invited, mut heroes) = (0, 0, Vec::new());
        let from = ("m.room.member".to_owned(), String::new());
        for ((kind, key), id) in state.range(from..) {
            if kind != "m.room.member" {
                break;
            }
            let Some(ev) = engine.event(id).await? else {
                continue;
            };
            match membership_of(&ev).as_deref() {
                Some("join") => joined += 1,
                Some("invite") => invited += 1,
                _ => continue,
            }
            if key != me.as_str() && heroes.len() < 5 {
                let content: Value =
                    serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
                let mut hero = json!({"user_id": key});
                for field in ["displayname", "avatar_url"] {
                    if let Some(v) = content[field].as_str() {
                        hero[field] = v.into();
                    }
                }
                heroes.push(hero);
            }
        }
        Ok((joined, invited, heroes))
    }

    /// The content of a state event with an empty state key (`null` if there is none).
    async fn state_content(&self, state: &SortedState, kind: &str) -> ApiResult<Value> {
        let Some(id) = state.get(&(kind.to_owned(), String::new())) else {
            return Ok(Value::Null);
        };
        Ok(match self.node.engine().event(id).await? {
            Some(ev) => serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null),
            None => Value::Null,
        })
    }

    async fn room_type(&self, state: &SortedState) -> ApiResult<Option<String>> {
        Ok(self.state_content(state, "m.room.create").await?["type"]
            .as_str()
            .map(str::to_owned))
    }

    /// The rooms `m.direct` names as direct chats.
    async fn direct_rooms(&self, user: &UserId) -> ApiResult<HashSet<OwnedRoomId>> {
        let content = self.data.account_data(user, None, "m.direct").await?;
        Ok(content
            .as_ref()
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|by_user| by_user.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|r| r.as_str().and_then(|r| OwnedRoomId::try_from(r).ok()))
            .collect())
    }

    /// Whether the user's own read receipt in `room` moved in `since..until` (their unread
    /// counts changed).
    async fn own_receipt_moved(
        &self,
        room: &RoomId,
        user: &UserId,
        since: u64,
        until: u64,
    ) -> ApiResult<bool> {
        // Receipts move the client-data position: when it stood still, none moved.
        if since >= until {
            return Ok(false);
        }
        for kind in ["m.read", "m.read.private"] {
            let k = super::user_data::key(&["receipt", room.as_str(), user.as_str(), kind]);
            if let Some(v) = self.data.get(&k).await? {
                if (since..until).contains(&v["pos"].as_u64().unwrap_or(0)) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The stream position of the newest event that moved `room` up the list, looking back
    /// from `upper` no further than the last look (remembered per room).
    async fn room_bump(&self, room: &RoomId, upper: u64) -> ApiResult<u64> {
        let (checked, known) = self
            .bumps
            .lock()
            .expect("bumps lock")
            .get(room)
            .copied()
            .unwrap_or((0, 0));
        if checked >= upper {
            return Ok(known);
        }
        let engine = self.node.engine();
        let mut cursor = Some(upper);
        let (mut scanned, mut found, mut newest) = (0, None, None);
        // Most rooms have nothing new since the last look: one event read tells.
        let mut page = 1;
        'scan: while scanned < BUMP_SCAN_LIMIT {
            let want = page.min(BUMP_SCAN_LIMIT - scanned);
            page = 32;
            let page = engine
                .timeline(room, cursor, Direction::Backward, want)
                .await?;
            let exhausted = page.len() < want;
            for ev in page {
                let pos = ev.stream.unwrap_or(0);
                if pos < checked {
                    break 'scan;
                }
                newest.get_or_insert(pos);
                scanned += 1;
                cursor = Some(pos);
                if BUMP_TYPES.contains(&ev.pdu.kind.to_string().as_str()) {
                    found = Some(pos);
                    break 'scan;
                }
            }
            if exhausted {
                break;
            }
        }
        // Nothing that bumps within reach: the newest event, for a room never placed yet.
        let bump = found
            .or(if known == 0 { newest } else { None })
            .unwrap_or(known)
            .max(known);
        self.bumps
            .lock()
            .expect("bumps lock")
            .insert(room.to_owned(), (upper, bump));
        Ok(bump)
    }
}

fn push_to(rooms: &mut serde_json::Map<String, Value>, room: &str, ev: Value) {
    if let Value::Array(list) = rooms.entry(room.to_owned()).or_insert_with(|| json!([])) {
        list.push(ev);
    }
}
