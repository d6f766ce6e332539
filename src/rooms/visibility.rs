//! Who may see which event: the spec's "History visibility" rules, for users (the client API)
//! and for servers (what a peer is answered or pushed). This is the one place that decides it;
//! every path that hands room data to a client or a peer asks here.
//!
//! At each event the rules read the `m.room.history_visibility` in force (the state before it;
//! for a visibility change itself, the more permissive of before and after) and the viewer's
//! membership (the state before it; for the viewer's own membership event, the more privileged
//! of before and after, so a user sees their own leave and join).

use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::{OwnedUserId, RoomId, RoomVersionId, UserId};
use serde_json::Value;

use crate::engine::pdu::StoredEvent;
use crate::engine::state::StateMap;
use crate::engine::Engine;
use crate::identity::ServerName;
use crate::store::StoreError;

/// `m.room.history_visibility`, most permissive first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HistoryVisibility {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl HistoryVisibility {
    /// The value of a content's `history_visibility`; unknown values count as `shared`, as the
    /// spec says.
    pub(crate) fn parse(content: &Value) -> Self {
        match content["history_visibility"].as_str() {
            Some("world_readable") => Self::WorldReadable,
            Some("invited") => Self::Invited,
            Some("joined") => Self::Joined,
            _ => Self::Shared,
        }
    }
}

/// A membership, most privileged first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Membership {
    Join,
    Invite,
    Knock,
    Leave,
    Ban,
}

impl Membership {
    pub(crate) fn parse(content: &Value) -> Self {
        match content["membership"].as_str() {
            Some("join") => Self::Join,
            Some("invite") => Self::Invite,
            Some("knock") => Self::Knock,
            Some("ban") => Self::Ban,
            _ => Self::Leave,
        }
    }
}

fn content(ev: &StoredEvent) -> Value {
    serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null)
}

/// The content of the state event at `(kind, state_key)` in `state`, if there is one.
pub(crate) async fn entry_content(
    engine: &Engine,
    state: &StateMap,
    kind: StateEventType,
    state_key: &str,
) -> Result<Option<Value>, StoreError> {
    let Some(id) = state.get(&(kind, state_key.to_owned())) else {
        return Ok(None);
    };
    Ok(engine.event(id).await?.map(|ev| content(&ev)))
}

/// The history visibility in force in `state` (absent: `shared`).
async fn visibility_in(engine: &Engine, state: &StateMap) -> Result<HistoryVisibility, StoreError> {
    Ok(
        entry_content(engine, state, StateEventType::RoomHistoryVisibility, "")
            .await?
            .map_or(HistoryVisibility::Shared, |c| HistoryVisibility::parse(&c)),
    )
}

/// `user`'s membership in `state` (absent: leave).
pub(crate) async fn membership_in(
    engine: &Engine,
    state: &StateMap,
    user: &UserId,
) -> Result<Membership, StoreError> {
    Ok(
        entry_content(engine, state, StateEventType::RoomMember, user.as_str())
            .await?
            .map_or(Membership::Leave, |c| Membership::parse(&c)),
    )
}

/// What the rules need to know about one event.
struct AtEvent {
    visibility: HistoryVisibility,
    before: Arc<StateMap>,
    after: Arc<StateMap>,
}

impl AtEvent {
    async fn load(engine: &Engine, ev: &StoredEvent) -> Result<Option<Self>, StoreError> {
        let Some((before, after)) = engine.states_at(&ev.pdu.event_id).await? else {
            return Ok(None);
        };
        let mut visibility = visibility_in(engine, &before).await?;
        if ev.pdu.kind.to_string() == "m.room.history_visibility"
            && ev.pdu.state_key.as_deref() == Some("")
        {
            visibility = visibility.min(visibility_in(engine, &after).await?);
        }
        Ok(Some(Self {
            visibility,
            before,
            after,
        }))
    }

    /// `user`'s membership at the event: the state before it, or for the user's own membership
    /// event the more privileged of before and after.
    async fn membership(
        &self,
        engine: &Engine,
        ev: &StoredEvent,
        user: &UserId,
    ) -> Result<Membership, StoreError> {
        let before = membership_in(engine, &self.before, user).await?;
        let own = ev.pdu.kind.to_string() == "m.room.member"
            && ev.pdu.state_key.as_deref() == Some(user.as_str());
        if own {
            Ok(before.min(membership_in(engine, &self.after, user).await?))
        } else {
            Ok(before)
        }
    }
}

/// Decides, event by event, what one user may see of one room. Build it once per request:
/// it reads the user's current membership once.
pub struct UserView<'e> {
    engine: &'e Engine,
    user: OwnedUserId,
    joined_now: bool,
    /// Stream position of the user's latest join, for `shared` history before it.
    last_join: Option<u64>,
}

impl<'e> UserView<'e> {
    pub async fn new(
        engine: &'e Engine,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<Self, StoreError> {
        let (joined_now, last_join) = match engine.current_state_map(room_id).await? {
            Some(state) => (
                membership_in(engine, &state, user).await? == Membership::Join,
                latest_join(engine, &state, user).await?,
            ),
            None => (false, None),
        };
        Ok(Self {
            engine,
            user: user.to_owned(),
            joined_now,
            last_join,
        })
    }

    /// Whether the user may see `ev` (rejected, soft-failed and outlier events are for nobody).
    pub async fn may_see(&self, ev: &StoredEvent) -> Result<bool, StoreError> {
        let Some(at) = AtEvent::load(self.engine, ev).await? else {
            return Ok(false);
        };
        if at.visibility == HistoryVisibility::WorldReadable {
            return Ok(true);
        }
        let membership = at.membership(self.engine, ev, &self.user).await?;
        Ok(match membership {
            Membership::Join => true,
            Membership::Invite => at.visibility <= HistoryVisibility::Invited,
            // `shared` history is for whoever joined the room at any point after the event (the
            // spec's rule 3): one who joined late sees what came before, and keeps it after
            // leaving; one who never joined sees none of it.
            _ => {
                at.visibility == HistoryVisibility::Shared
                    && (self.joined_now
                        || self
                            .last_join
                            .zip(ev.stream)
                            .is_some_and(|(join, pos)| pos < join))
            }
        })
    }

    /// `events`, less what the user may not see (order kept).
    pub async fn filter(
        &self,
        events: Vec<Arc<StoredEvent>>,
    ) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            if self.may_see(&ev).await? {
                out.push(ev);
            }
        }
        Ok(out)
    }
}

/// The users of `server` that the room's state names (every user who ever had a membership
/// keeps a member entry, so this finds past members too).
fn users_of(state: &StateMap, server: &ServerName) -> Vec<OwnedUserId> {
    let name = server.to_string();
    state
        .keys()
        .filter(|(kind, _)| *kind == StateEventType::RoomMember)
        .filter_map(|(_, key)| UserId::parse(key.as_str()).ok())
        .filter(|u| u.server_name().as_str() == name)
        .collect()
}

/// Decides what one server (a peer) may see of one room. A server that may not see the room at
/// all is told nothing, exactly as if the room were unknown.
pub struct ServerView<'e> {
    engine: &'e Engine,
    users: Vec<OwnedUserId>,
    /// A user of the server is joined now.
    in_room: bool,
    world_readable: bool,
    room_version: RoomVersionId,
    /// The room's current state when the view was made.
    current: Arc<StateMap>,
}

impl<'e> ServerView<'e> {
    /// `None` when the room is unknown here.
    pub async fn new(
        engine: &'e Engine,
        room_id: &RoomId,
        server: &ServerName,
    ) -> Result<Option<Self>, StoreError> {
        let (Some(room), Some(state)) = (
            engine.room(room_id).await?,
            engine.current_state_map(room_id).await?,
        ) else {
            return Ok(None);
        };
        let users = users_of(&state, server);
        let mut in_room = false;
        for user in &users {
            if membership_in(engine, &state, user).await? == Membership::Join {
                in_room = true;
                break;
            }
        }
        let world_readable =
            visibility_in(engine, &state).await? == HistoryVisibility::WorldReadable;
        Ok(Some(Self {
            engine,
            users,
            in_room,
            world_readable,
            room_version: room.room_version,
            current: state,
        }))
    }

    /// A user of the server is joined to the room now.
    pub fn in_room(&self) -> bool {
        self.in_room
    }

    /// Whether the server may pull from the room at all: it is in the room, or the room is
    /// world-readable.
    pub fn may_read_room(&self) -> bool {
        self.in_room || self.world_readable
    }

    /// Whether the server may see `ev` in full. Past the room gate, `shared` and
    /// `world_readable` history is visible; `invited` and `joined` need one of the server's
    /// users invited or joined (resp. joined) at the event. Events in the room's current state
    /// are always visible to a server in the room: it needs them to take part.
    pub async fn may_see(&self, ev: &StoredEvent) -> Result<bool, StoreError> {
        let Some(at) = AtEvent::load(self.engine, ev).await? else {
            return Ok(false);
        };
        if at.visibility == HistoryVisibility::WorldReadable {
            return Ok(true);
        }
        if !self.in_room {
            return Ok(false);
        }
        if at.visibility == HistoryVisibility::Shared {
            return Ok(true);
        }
        if self.is_current_state(ev) {
            return Ok(true);
        }
        for user in &self.users {
            match at.membership(self.engine, ev, user).await? {
                Membership::Join => return Ok(true),
                Membership::Invite if at.visibility == HistoryVisibility::Invited => {
                    return Ok(true)
                }
                _ => {}
            }
        }
        Ok(false)
    }

    fn is_current_state(&self, ev: &StoredEvent) -> bool {
        let Some(state_key) = &ev.pdu.state_key else {
            return false;
        };
        let key = (
            StateEventType::from(ev.pdu.kind.to_string()),
            state_key.clone(),
        );
        self.current.get(&key) == Some(&ev.pdu.event_id)
    }

    /// The PDU to hand this server for `ev`: in full if it may see it, else redacted (the DAG
    /// stays walkable and the signatures still verify; the receiver stores it redacted).
    /// `None` if it may not see the event and it cannot be redacted: then it is left out.
    pub async fn pdu_for(&self, ev: &StoredEvent) -> Result<Option<String>, StoreError> {
        if self.may_see(ev).await? {
            return Ok(Some(ev.pdu.json.get().to_owned()));
        }
        let redacted = ev.pdu.redacted(&self.room_version);
        Ok(redacted.and_then(|object| serde_json::to_string(&object).ok()))
    }
}

/// The servers with a user joined in `state`: where a room's new events and EDUs go.
pub async fn joined_servers(
    engine: &Engine,
    state: &StateMap,
) -> Result<std::collections::BTreeSet<ServerName>, StoreError> {
    let members: Vec<(ServerName, &ruma::OwnedEventId)> = state
        .iter()
        .filter(|((kind, _), _)| *kind == StateEventType::RoomMember)
        .filter_map(|((_, key), id)| {
            let user = UserId::parse(key.as_str()).ok()?;
            Some((ServerName::try_from(user.server_name()).ok()?, id))
        })
        .collect();
    let ids: Vec<&ruma::OwnedEventId> = members.iter().map(|(_, id)| *id).collect();
    let joined: std::collections::HashSet<ruma::OwnedEventId> = engine
        .events(&ids)
        .await?
        .into_iter()
        .filter(|ev| Membership::parse(&content(ev)) == Membership::Join)
        .map(|ev| ev.pdu.event_id.clone())
        .collect();
    Ok(members
        .into_iter()
        .filter(|(_, id)| joined.contains(*id))
        .map(|(server, _)| server)
        .collect())
}

/// Most membership events followed back from a user's current one to find their latest join.
const MAX_MEMBERSHIP_HOPS: usize = 64;

/// The stream position of `user`'s latest join to the room whose current state is `state`,
/// following the user's membership events back (each one's state before names the previous).
async fn latest_join(
    engine: &Engine,
    state: &StateMap,
    user: &UserId,
) -> Result<Option<u64>, StoreError> {
    let key = (StateEventType::RoomMember, user.as_str().to_owned());
    let mut next = state.get(&key).cloned();
    for _ in 0..MAX_MEMBERSHIP_HOPS {
        let Some(id) = next else {
            return Ok(None);
        };
        let Some(ev) = engine.event(&id).await? else {
            return Ok(None);
        };
        if Membership::parse(&content(&ev)) == Membership::Join {
            return Ok(ev.stream);
        }
        let Some((before, _)) = engine.states_at(&id).await? else {
            return Ok(None);
        };
        next = before.get(&key).cloned();
    }
    Ok(None)
}
