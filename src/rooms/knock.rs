//! Knocking on a room held by other peers (room versions 7 and later, join rule `knock` or
//! `knock_restricted`): a template from a peer in the room, our signed knock handed back, and
//! the room's stripped state in answer, so the user sees what they knocked on. The room's
//! members see the knock; the knocker's server gets nothing more of the room until a member
//! invites or lets them in (the room's events go to joined servers only).

use libp2p::PeerId;
use ruma::events::StateEventType;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::visibility::{entry_content, membership_in, Membership};
use super::{now, NodeError, P2pNode};
use crate::engine::pdu::{build_signed, rules_for, NewEvent};
use crate::engine::{IngestError, Outcome, Received, Scope};
use crate::identity::ServerName;
use crate::net::protocol::{FedErrorCode, FedRequest, FedResponse};

/// Longest knock `reason` (it goes into the event).
pub const MAX_REASON_BYTES: usize = 1024;

fn refused_knock() -> FedResponse {
    FedResponse::error(FedErrorCode::NotFound, "no room to knock on here")
}

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
        let FedResponse::JoinTemplate {
            room_id: tpl_room,
            template,
        } = self
            .request(
                via,
                FedRequest::MakeKnock {
                    room_id: room_id.to_owned(),
                    user_id: user.clone(),
                },
            )
            .await?
        else {
            return Err(NodeError::Network("unexpected answer to make_knock".into()));
        };
        if tpl_room != room_id {
            return Err(NodeError::Network(
                "make_knock answered for another room".into(),
            ));
        }
        let rules = rules_for(&template.room_version).ok_or_else(|| {
            IngestError::UnsupportedRoomVersion(template.room_version.to_string())
        })?;
        if !rules.authorization.knocking {
            return Err(NodeError::Refused(
                FedErrorCode::Forbidden,
                format!("room version {} has no knocking", template.room_version),
            ));
        }
        let mut content = json!({"membership": "knock"});
        if let Some(reason) = reason {
            content["reason"] = reason.into();
        }
        let (event_id, pdu) = build_signed(
            &self.shared.identity,
            &rules,
            NewEvent {
                room_id: Some(room_id),
                sender: &user,
                kind: "m.room.member",
                state_key: Some(user.as_str()),
                content,
                prev_events: template.prev_events,
                auth_events: template.auth_events,
                depth: template.depth,
                origin_server_ts: now(),
                redacts: None,
            },
        )
        .map_err(IngestError::BadFormat)?;
        let pdu = String::from_utf8(pdu).expect("canonical JSON is UTF-8");
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
            return Ok(refused_knock());
        }
        let content = json!({"membership": "knock"});
        Ok(
            match self
                .shared
                .engine
                .template(
                    &room_id,
                    &user_id,
                    "m.room.member",
                    Some(user_id.as_str()),
                    &content,
                )
                .await
            {
                Ok(template) => FedResponse::JoinTemplate { room_id, template },
                Err(IngestError::UnknownRoom(_)) => refused_knock(),
                Err(e) => FedResponse::error(FedErrorCode::BadRequest, e.to_string()),
            },
        )
    }

    pub(super) async fn answer_send_knock(
        &self,
        peer: PeerId,
        asker: &ServerName,
        pdu: String,
    ) -> Result<FedResponse, NodeError> {
        #[derive(serde::Deserialize)]
        struct KnockShape {
            #[serde(rename = "type")]
            kind: String,
            sender: OwnedUserId,
            state_key: Option<String>,
            room_id: Option<OwnedRoomId>,
            content: Value,
        }
        let Ok(shape) = serde_json::from_str::<KnockShape>(&pdu) else {
            return Ok(FedResponse::error(FedErrorCode::BadRequest, "not an event"));
        };
        let own_knock = shape.kind == "m.room.member"
            && shape.state_key.as_deref() == Some(shape.sender.as_str())
            && shape.content["membership"] == "knock"
            && shape.content["reason"]
                .as_str()
                .is_none_or(|r| r.len() <= MAX_REASON_BYTES)
            && ServerName::try_from(shape.sender.server_name())
                .ok()
                .as_ref()
                == Some(asker);
        let Some(room_id) = shape.room_id.filter(|_| own_knock) else {
            tracing::warn!(%peer, "send_knock that is not the asker's own knock refused");
            return Ok(FedResponse::error(
                FedErrorCode::Forbidden,
                "send_knock takes the asking server's own user's knock",
            ));
        };
        if !self.may_knock(&room_id, &shape.sender).await? {
            return Ok(refused_knock());
        }
        let taken = self
            .shared
            .engine
            .receive_batch_in(&Scope::room(&room_id), &[pdu.as_bytes()])
            .await?
            .pop()
            .expect("one result per event");
        Ok(match taken {
            Ok(Received {
                outcome: Outcome::Accepted { .. } | Outcome::Duplicate,
                room_id,
                event_id,
            }) => {
                tracing::info!(%peer, %event_id, "remote knock accepted");
                self.push_events(&room_id, std::slice::from_ref(&event_id))
                    .await;
                self.changed();
                let state = self
                    .shared
                    .engine
                    .current_state(&room_id)
                    .await?
                    .unwrap_or_default();
                FedResponse::KnockState {
                    room_state: self.stripped_state(&state).await?,
                }
            }
            Ok(Received { outcome, .. }) => {
                FedResponse::error(FedErrorCode::Forbidden, format!("{outcome:?}"))
            }
            Err(e) => FedResponse::error(FedErrorCode::BadRequest, e.to_string()),
        })
    }
}
