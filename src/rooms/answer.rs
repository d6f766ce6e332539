//! Answers to peers' requests, each authorised by who asks: the asking PeerId is a server name,
//! and a server is told only what [`ServerView`] lets it see. A room it may not see answers
//! exactly like a room unknown here, and an event in such a room like an unknown event, so no
//! answer is an oracle for what exists.

use libp2p::PeerId;
use ruma::events::StateEventType;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::visibility::{entry_content, membership_in, Membership, ServerView};
use super::{NodeError, P2pNode};
use crate::engine::{IngestError, Outcome, Received, Scope};
use crate::identity::ServerName;
use crate::net::protocol::{
    FedErrorCode, FedRequest, FedResponse, MAX_MISSING_EVENTS, MAX_RESPONSE_BYTES,
};
use crate::net::ReplyTo;

/// What a room the asker may not see, or does not exist, answers.
pub(super) fn unknown_room() -> FedResponse {
    FedResponse::error(FedErrorCode::NotFound, "room unknown here")
}

/// The room, user and content of `pdu` if it is the asking server's own user's `membership`
/// event (a join or knock handed back from a template); `Err` with the answer if it is not an
/// event at all.
pub(super) fn own_membership(
    pdu: &str,
    asker: &ServerName,
    membership: &str,
) -> Result<Option<(OwnedRoomId, OwnedUserId, Value)>, FedResponse> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "type")]
        kind: String,
        sender: OwnedUserId,
        state_key: Option<String>,
        room_id: Option<OwnedRoomId>,
        content: Value,
    }
    let Ok(shape) = serde_json::from_str::<Shape>(pdu) else {
        return Err(FedResponse::error(FedErrorCode::BadRequest, "not an event"));
    };
    let own = shape.kind == "m.room.member"
        && shape.state_key.as_deref() == Some(shape.sender.as_str())
        && shape.content["membership"] == membership
        && ServerName::try_from(shape.sender.server_name())
            .ok()
            .as_ref()
            == Some(asker);
    Ok(shape
        .room_id
        .filter(|_| own)
        .map(|room| (room, shape.sender, shape.content)))
}

/// What an event the asker may not see, or does not exist, answers.
fn unknown_event() -> FedResponse {
    FedResponse::error(FedErrorCode::NotFound, "no such event")
}

/// Room for the CBOR framing of an `Events` answer beside its PDUs.
const ANSWER_OVERHEAD: usize = 64 * 1024;

impl P2pNode {
    /// Takes one request from the swarm: refuses it if oversized, queues a push for the
    /// ingest task (answered once stored), and hands back anything else, to be answered by
    /// [`P2pNode::answer`].
    pub(super) fn take_request(
        &self,
        peer: PeerId,
        request: FedRequest,
        reply: ReplyTo,
    ) -> Option<(FedRequest, ReplyTo)> {
        if let Err(e) = request.check_bounds() {
            tracing::warn!(%peer, reason = %e, "oversized request refused");
            let response = FedResponse::error(FedErrorCode::BadRequest, e);
            self.shared.net.respond(reply, response);
            return None;
        }
        match request {
            FedRequest::Push { room_id, pdus } => {
                self.take_push(peer, room_id, pdus, reply);
                None
            }
            request => Some((request, reply)),
        }
    }

    /// Answers a pull, an invite or a join from `peer`.
    pub(super) async fn answer(&self, peer: PeerId, request: FedRequest) -> FedResponse {
        let Some(asker) = ServerName::from_peer_id(&peer) else {
            tracing::warn!(%peer, "request from a peer whose id is not a server key");
            return FedResponse::error(FedErrorCode::Forbidden, "not a Hyphae peer");
        };
        let result: Result<FedResponse, NodeError> = async {
            Ok(match request {
                FedRequest::GetEvent { event_id } => {
                    self.answer_get_event(&asker, &event_id).await?
                }
                FedRequest::GetMissingEvents {
                    room_id,
                    earliest,
                    latest,
                    limit,
                } => {
                    self.answer_missing_events(&asker, &room_id, &earliest, &latest, limit)
                        .await?
                }
                FedRequest::Extremities { room_id } => {
                    match ServerView::new(&self.shared.engine, &room_id, &asker).await? {
                        Some(view) if view.in_room() => {
                            match self.shared.engine.room(&room_id).await? {
                                Some(room) => FedResponse::Extremities {
                                    event_ids: room.forward_extremities,
                                },
                                None => unknown_room(),
                            }
                        }
                        _ => unknown_room(),
                    }
                }
                FedRequest::MakeJoin { room_id, user_id } => {
                    self.answer_make_join(peer, &asker, room_id, user_id)
                        .await?
                }
                FedRequest::SendJoin { pdu } => self.answer_send_join(peer, &asker, pdu).await?,
                FedRequest::MakeKnock { room_id, user_id } => {
                    self.answer_make_knock(peer, &asker, room_id, user_id)
                        .await?
                }
                FedRequest::SendKnock { pdu } => self.answer_send_knock(peer, &asker, pdu).await?,
                FedRequest::Invite {
                    room_version,
                    pdu,
                    room_state,
                } => {
                    self.accept_invite(peer, &room_version, &pdu, &room_state)
                        .await?
                }
                FedRequest::Edu { edu } => self.take_edu(peer, &edu).await?,
                request @ (FedRequest::QueryKeys { .. }
                | FedRequest::ClaimKeys { .. }
                | FedRequest::ToDevice { .. }
                | FedRequest::DeviceListChanged { .. }) => {
                    self.answer_devices(&asker, request).await?
                }
                FedRequest::GetMedia { media_id, offset } => {
                    self.answer_get_media(&asker, &media_id, offset).await?
                }
                // Pushes are queued for ingest by `take_request`, never answered here.
                FedRequest::Push { .. } => {
                    FedResponse::error(FedErrorCode::BadRequest, "a push is not a pull")
                }
            })
        }
        .await;
        result.unwrap_or_else(|e| FedResponse::error(FedErrorCode::Internal, e.to_string()))
    }

    async fn answer_get_event(
        &self,
        asker: &ServerName,
        event_id: &ruma::EventId,
    ) -> Result<FedResponse, NodeError> {
        let engine = &self.shared.engine;
        let Some(ev) = engine.event(event_id).await? else {
            return Ok(unknown_event());
        };
        let Some(view) = ServerView::new(engine, &ev.pdu.room_id, asker).await? else {
            return Ok(unknown_event());
        };
        if !view.may_read_room() {
            tracing::info!(server = %asker, %event_id, "event refused: server not in its room");
            return Ok(unknown_event());
        }
        Ok(match view.pdu_for(&ev).await? {
            Some(pdu) => FedResponse::Event { pdu },
            None => unknown_event(),
        })
    }

    async fn answer_missing_events(
        &self,
        asker: &ServerName,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: u32,
    ) -> Result<FedResponse, NodeError> {
        let engine = &self.shared.engine;
        let Some(view) = ServerView::new(engine, room_id, asker).await? else {
            return Ok(unknown_room());
        };
        if !view.may_read_room() {
            tracing::info!(server = %asker, %room_id, "missing events refused: server not in the room");
            return Ok(unknown_room());
        }
        let limit = limit.min(MAX_MISSING_EVENTS) as usize;
        let events = engine
            .missing_events(room_id, earliest, latest, limit)
            .await?;
        let mut pdus = Vec::with_capacity(events.len());
        let mut event_ids = Vec::with_capacity(events.len());
        let mut bytes = ANSWER_OVERHEAD;
        for ev in events {
            let Some(pdu) = view.pdu_for(&ev).await? else {
                continue;
            };
            // Depth order: a cut answer is a prefix the asker can ingest, then ask again.
            bytes += pdu.len() + ev.pdu.event_id.as_str().len() + 16;
            if bytes > MAX_RESPONSE_BYTES {
                break;
            }
            pdus.push(pdu);
            event_ids.push(ev.pdu.event_id.clone());
        }
        Ok(FedResponse::Events { pdus, event_ids })
    }

    /// A join template, only for the asking server's own user and only when the room's join
    /// rules would let that user in; otherwise the room does not exist for the asker.
    async fn answer_make_join(
        &self,
        peer: PeerId,
        asker: &ServerName,
        room_id: OwnedRoomId,
        user_id: OwnedUserId,
    ) -> Result<FedResponse, NodeError> {
        if ServerName::try_from(user_id.server_name()).ok().as_ref() != Some(asker) {
            tracing::warn!(%peer, %user_id, "make_join for another server's user refused");
            return Ok(FedResponse::error(
                FedErrorCode::Forbidden,
                "a peer asks to join only for its own users",
            ));
        }
        if !self.may_join(&room_id, &user_id).await? {
            tracing::info!(%peer, %room_id, %user_id, "make_join refused: join rules");
            return Ok(unknown_room());
        }
        self.membership_template(room_id, &user_id, "join").await
    }

    /// A template for `user_id`'s own `membership` event in the room (the caller checked that
    /// the asker may have it).
    pub(super) async fn membership_template(
        &self,
        room_id: OwnedRoomId,
        user_id: &UserId,
        membership: &str,
    ) -> Result<FedResponse, NodeError> {
        let content = json!({ "membership": membership });
        Ok(
            match self
                .shared
                .engine
                .template(
                    &room_id,
                    user_id,
                    "m.room.member",
                    Some(user_id.as_str()),
                    &content,
                )
                .await
            {
                Ok(template) => FedResponse::JoinTemplate { room_id, template },
                Err(IngestError::UnknownRoom(_)) => unknown_room(),
                Err(e) => FedResponse::error(FedErrorCode::BadRequest, e.to_string()),
            },
        )
    }

    /// Whether the room's join rules let `user` join now: joined or invited already, a public
    /// room, or a restricted rule naming a room the user is joined to here. Banned: never.
    async fn may_join(&self, room_id: &RoomId, user: &UserId) -> Result<bool, NodeError> {
        let engine = &self.shared.engine;
        let Some(state) = engine.current_state_map(room_id).await? else {
            return Ok(false);
        };
        match membership_in(engine, &state, user).await? {
            Membership::Ban => return Ok(false),
            Membership::Join | Membership::Invite => return Ok(true),
            _ => {}
        }
        let rules = entry_content(engine, &state, StateEventType::RoomJoinRules, "")
            .await?
            .unwrap_or_default();
        match rules["join_rule"].as_str() {
            Some("public") => Ok(true),
            Some("restricted" | "knock_restricted") => {
                let allowed_rooms = rules["allow"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|rule| rule["type"] == "m.room_membership")
                    .filter_map(|rule| rule["room_id"].as_str())
                    .filter_map(|r| OwnedRoomId::try_from(r).ok());
                for other in allowed_rooms {
                    if let Some(other_state) = engine.current_state_map(&other).await? {
                        if membership_in(engine, &other_state, user).await? == Membership::Join {
                            return Ok(true);
                        }
                    }
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// A join built from our template: only the asking server's own user's join, then pushed
    /// to the room's other servers.
    async fn answer_send_join(
        &self,
        peer: PeerId,
        asker: &ServerName,
        pdu: String,
    ) -> Result<FedResponse, NodeError> {
        let (room_id, sender, _) = match own_membership(&pdu, asker, "join") {
            Err(not_an_event) => return Ok(not_an_event),
            Ok(Some(own)) => own,
            Ok(None) => {
                tracing::warn!(%peer, "send_join that is not the asker's own join refused");
                return Ok(FedResponse::error(
                    FedErrorCode::Forbidden,
                    "send_join takes the asking server's own user's join",
                ));
            }
        };
        if !self.may_join(&room_id, &sender).await? {
            return Ok(unknown_room());
        }
        Ok(match self.take_membership(peer, &room_id, &pdu).await? {
            Ok(_) => FedResponse::Ok,
            Err(refused) => refused,
        })
    }

    /// Ingests a remote user's own membership event for `room_id` (join or knock, checked by
    /// the caller) and pushes it to the room's servers; its id, or the answer refusing it.
    pub(super) async fn take_membership(
        &self,
        peer: PeerId,
        room_id: &RoomId,
        pdu: &str,
    ) -> Result<Result<OwnedEventId, FedResponse>, NodeError> {
        let taken = self
            .shared
            .engine
            .receive_batch_in(&Scope::room(room_id), &[pdu.as_bytes()])
            .await?
            .pop()
            .expect("one result per event");
        Ok(match taken {
            Ok(Received {
                outcome: Outcome::Accepted { .. } | Outcome::Duplicate,
                room_id,
                event_id,
            }) => {
                tracing::info!(%peer, %event_id, "remote membership accepted");
                self.push_events(&room_id, std::slice::from_ref(&event_id))
                    .await;
                self.changed();
                Ok(event_id)
            }
            Ok(Received { outcome, .. }) => Err(FedResponse::error(
                FedErrorCode::Forbidden,
                format!("{outcome:?}"),
            )),
            Err(e) => Err(FedResponse::error(FedErrorCode::BadRequest, e.to_string())),
        })
    }
}
