//! What a client may read of a room, on top of the history-visibility rules of
//! [`crate::rooms::visibility`]: who may read the room at all, the bound for a user who left or
//! was banned (they read up to that membership event and nothing after, as Synapse does), and
//! the user's `m.ignored_user_list`.

use std::collections::HashSet;
use std::sync::Arc;

use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::Value;

use super::error::{ApiError, ApiResult};
use super::events::membership_of;
use super::ClientApi;
use crate::engine::pdu::StoredEvent;
use crate::engine::{Engine, SortedState};
use crate::rooms::visibility::UserView;
use crate::store::{Direction, StoreError};

/// The users a user ignores.
pub(super) type Ignored = Arc<HashSet<OwnedUserId>>;

/// Decides what one user reads of one room. Build one per request (or per room in a `/sync`
/// pass): it reads the user's membership once.
pub(super) struct Reader<'e> {
    engine: &'e Engine,
    view: UserView<'e>,
    user: OwnedUserId,
    /// For a user who left or was banned: the stream position of that membership event.
    until: Option<u64>,
    ignored: Ignored,
}

impl<'e> Reader<'e> {
    /// A reader for `user`, whose current membership event in the room is `member`.
    pub async fn new(
        engine: &'e Engine,
        room: &RoomId,
        user: &UserId,
        member: Option<&StoredEvent>,
        ignored: Ignored,
    ) -> Result<Self, StoreError> {
        // (A membership in the current state is always in the timeline; were it not, the
        // user would read nothing.)
        let until = member
            .filter(|m| matches!(membership_of(m).as_deref(), Some("leave" | "ban")))
            .map(|m| m.stream.unwrap_or(0));
        Ok(Self {
            engine,
            view: UserView::new(engine, room, user).await?,
            user: user.to_owned(),
            until,
            ignored,
        })
    }

    /// The stream position of the user's leave or ban, if they left or were banned.
    pub fn until(&self) -> Option<u64> {
        self.until
    }

    /// `pos` (an exclusive upper stream bound) clamped to what the user may read.
    pub fn bound(&self, pos: u64) -> u64 {
        match self.until {
            Some(u) => pos.min(u + 1),
            None => pos,
        }
    }

    /// Whether `user`'s events are hidden from this reader (it ignores them).
    pub fn ignores(&self, user: &UserId) -> bool {
        user != self.user && self.ignored.contains(user)
    }

    /// Whether the user may see the room's history at `ev`: within their bound and allowed by
    /// the history visibility in force there.
    pub async fn may_see_history(&self, ev: &StoredEvent) -> Result<bool, StoreError> {
        let Some(pos) = ev.stream else {
            return Ok(false);
        };
        if self.until.is_some_and(|u| pos > u) {
            return Ok(false);
        }
        // Users always see their own membership changes (an invite they rejected, a kick or
        // ban), whatever the history visibility.
        if ev.pdu.kind.to_string() == "m.room.member"
            && ev.pdu.state_key.as_deref() == Some(self.user.as_str())
        {
            return Ok(true);
        }
        self.view.may_see(ev).await
    }

    /// Whether `ev` is shown to the user: [`Reader::may_see_history`], and not sent by a user
    /// they ignore.
    pub async fn may_see(&self, ev: &StoredEvent) -> Result<bool, StoreError> {
        if self.ignores(&ev.pdu.sender) {
            return Ok(false);
        }
        self.may_see_history(ev).await
    }

    /// The room's state as the user may read it now: the current state, or for a user who
    /// left or was banned the state right after that.
    pub async fn state(&self, room: &RoomId) -> Result<Option<SortedState>, StoreError> {
        match self.until {
            Some(pos) => self.state_below(room, pos + 1).await,
            None => self.engine.current_state(room).await,
        }
    }

    /// The room's state after the last event below stream position `pos` (`None` if there is
    /// none).
    pub async fn state_below(
        &self,
        room: &RoomId,
        pos: u64,
    ) -> Result<Option<SortedState>, StoreError> {
        let Some(last) = self.last_below(room, pos).await? else {
            return Ok(None);
        };
        self.engine.state_after(&last.pdu.event_id).await
    }

    /// The room's last timeline event below stream position `pos`.
    pub async fn last_below(
        &self,
        room: &RoomId,
        pos: u64,
    ) -> Result<Option<Arc<StoredEvent>>, StoreError> {
        Ok(self
            .engine
            .timeline(room, Some(pos), Direction::Backward, 1)
            .await?
            .pop())
    }
}

impl ClientApi {
    /// The users `user` ignores (their `m.ignored_user_list` account data).
    pub(super) async fn ignored_users(&self, user: &UserId) -> ApiResult<Ignored> {
        let content = self
            .data
            .account_data(user, None, "m.ignored_user_list")
            .await?;
        let users = content
            .as_ref()
            .and_then(|c| c["ignored_users"].as_object())
            .map(|o| {
                o.keys()
                    .filter_map(|k| OwnedUserId::try_from(k.as_str()).ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok(Arc::new(users))
    }

    /// A reader for `user` in `room`, refusing (`M_FORBIDDEN`) a user who may not read the room
    /// at all: one who is not and never was in it, unless its history is world-readable now.
    /// A user who is joined, left or was banned reads (up to their leave); an invited user
    /// reads only a world-readable room, as on Synapse.
    pub(super) async fn room_reader(&self, room: &RoomId, user: &UserId) -> ApiResult<Reader<'_>> {
        let refuse = || ApiError::forbidden("you are not in that room");
        let state = self.state_of(room).await.map_err(|_| refuse())?;
        let member = self.member_event(&state, user).await?;
        let membership = member.as_deref().and_then(membership_of);
        if !matches!(membership.as_deref(), Some("join" | "leave" | "ban"))
            && !self.world_readable(&state).await?
        {
            return Err(refuse());
        }
        let ignored = self.ignored_users(user).await?;
        Ok(Reader::new(self.node.engine(), room, user, member.as_deref(), ignored).await?)
    }

    /// Whether the room's history is world-readable in `state`.
    async fn world_readable(&self, state: &SortedState) -> ApiResult<bool> {
        let Some(id) = state.get(&("m.room.history_visibility".to_owned(), String::new())) else {
            return Ok(false);
        };
        let Some(ev) = self.node.engine().event(id).await? else {
            return Ok(false);
        };
        let content: Value = serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
        Ok(content["history_visibility"] == "world_readable")
    }
}
