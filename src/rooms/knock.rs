//! Knocking on a room held by other peers (room versions 7 and later, join rule `knock` or
//! `knock_restricted`): a template from a peer in the room, our signed knock handed back, and
//! the room's stripped state in answer, so the user sees what they knocked on. The room's
//! members see the knock; the knocker's server gets nothing more of the room until a member
//! invites or lets them in (the room's events go to joined servers only).

use libp2p::PeerId;
use ruma::events::StateEventType;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::answer::{own_membership, unknown_room};
use super::visibility::{entry_content, membership_in, Membership};
use super::{NodeError, P2pNode};
use crate::engine::pdu::rules_for;
use crate::identity::ServerName;
use crate::net::protocol::{FedErrorCode, FedRequest, FedResponse};

/// Longest knock `reason` (it goes into the event).
pub const MAX_REASON_BYTES: usize = 1024;

impl P2pNode {
    /// Knocks on `room_id` as `localpart` through `via`, a peer in the room. Returns the knock's
    /// id and the room's stripped state (checked) as the room's server answered it.
    pub async fn knock(
        &self,
        room_id: &RoomId,
        localpart: &str,
        via: PeerId,
        reason: Option<&str>,
    ) -> Result<(OwnedEventId, Vec<Value>), NodeError> {
        let user = self.user(localpart);
        let mut content = json!({"membership": "knock"});
        if let Some(reason) = reason {
            content["reason"] = reason.into();
        }
        let request = FedRequest::MakeKnock {
            room_id: room_id.to_owned(),
            user_id: user.clone(),
        };
        let (event_id, pdu, room_version) = self
            .signed_membership(room_id, &user, via, request, content)
            .await?;
        if !rules_for(&room_version).is_some_and(|r| r.authorization.knocking) {
            return Err(NodeError::Refused(
                FedErrorCode::Forbidden,
                format!("room version {room_version} has no knocking"),
            ));
        }
        match self.request(via, FedRequest::SendKnock { pdu }).await? {
            FedResponse::KnockState { room_state } => {
                Ok((event_id, Self::checked_stripped_state(&room_state, room_id)))
            }
            _ => Err(NodeError::Network("unexpected answer to send_knock".into())),
        }
    }

    /// Whether `user` may knock on `room_id` now: the room is here, its version has knocking,
    /// its join rule lets anyone knock, and the user is not already in it, invited or banned.
    async fn may_knock(&self, room_id: &RoomId, user: &UserId) -> Result<bool, NodeError> {
        let engine = &self.shared.engine;
        let Some(room) = engine.room(room_id).await? else {
            return Ok(false);
        };
        if !rules_for(&room.room_version).is_some_and(|r| r.authorization.knocking) {
            return Ok(false);
        }
        let Some(state) = engine.current_state_map(room_id).await? else {
            return Ok(false);
        };
        if matches!(
            membership_in(engine, &state, user).await?,
            Membership::Ban | Membership::Join | Membership::Invite
        ) {
            return Ok(false);
        }
        let rules = entry_content(engine, &state, StateEventType::RoomJoinRules, "")
            .await?
            .unwrap_or_default();
        Ok(matches!(
            rules["join_rule"].as_str(),
            Some("knock" | "knock_restricted")
        ))
    }

    pub(super) async fn answer_make_knock(
        &self,
        peer: PeerId,
        asker: &ServerName,
        room_id: OwnedRoomId,
        user_id: OwnedUserId,
    ) -> Result<FedResponse, NodeError> {
        if ServerName::try_from(user_id.server_name()).ok().as_ref() != Some(asker) {
            tracing::warn!(%peer, %user_id, "make_knock for another server's user refused");
            return Ok(FedResponse::error(
                FedErrorCode::Forbidden,
                "a peer knocks only for its own users",
            ));
        }
        if !self.may_knock(&room_id, &user_id).await? {
            tracing::info!(%peer, %room_id, %user_id, "make_knock refused");
            // As for a room that is not here: a prober learns nothing of rooms it may not knock on.
            return Ok(unknown_room());
        }
        self.membership_template(room_id, &user_id, "knock").await
    }

    pub(super) async fn answer_send_knock(
        &self,
        peer: PeerId,
        asker: &ServerName,
        pdu: String,
    ) -> Result<FedResponse, NodeError> {
        let own = match own_membership(&pdu, asker, "knock") {
            Err(not_an_event) => return Ok(not_an_event),
            Ok(own) => own.filter(|(_, _, content)| {
                content["reason"]
                    .as_str()
                    .is_none_or(|r| r.len() <= MAX_REASON_BYTES)
            }),
        };
        let Some((room_id, sender, _)) = own else {
            tracing::warn!(%peer, "send_knock that is not the asker's own knock refused");
            return Ok(FedResponse::error(
                FedErrorCode::Forbidden,
                "send_knock takes the asking server's own user's knock",
            ));
        };
        if !self.may_knock(&room_id, &sender).await? {
            return Ok(unknown_room());
        }
        if let Err(refused) = self.take_membership(peer, &room_id, &pdu).await? {
            return Ok(refused);
        }
        let state = self
            .shared
            .engine
            .current_state(&room_id)
            .await?
            .unwrap_or_default();
        Ok(FedResponse::KnockState {
            room_state: self.stripped_state(&state).await?,
        })
    }
}
