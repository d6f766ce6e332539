//! Joining a room held by other peers: a template from a peer in the room, our signed join
//! handed back, then the room's history caught up.

use libp2p::PeerId;
use ruma::{OwnedEventId, RoomId};
use serde_json::json;

use super::{now, NodeError, P2pNode};
use crate::engine::pdu::EventStatus;
use crate::engine::pdu::{build_signed, rules_for, NewEvent};
use crate::engine::IngestError;
use crate::net::protocol::{FedRequest, FedResponse};
use crate::store::{Table, WriteBatch};

impl P2pNode {
    /// Joins `room_id` as `localpart` through `via`, a peer already in the room: asks it for a
    /// join template, signs it, hands it back, then catches up on the room's history.
    pub async fn join(
        &self,
        room_id: &RoomId,
        localpart: &str,
        via: PeerId,
    ) -> Result<OwnedEventId, NodeError> {
        self.join_with_profile(room_id, localpart, via, Default::default())
            .await
    }

    /// [`P2pNode::join`] with the user's profile (`displayname`, `avatar_url`) in the join event.
    pub async fn join_with_profile(
        &self,
        room_id: &RoomId,
        localpart: &str,
        via: PeerId,
        profile: serde_json::Map<String, serde_json::Value>,
    ) -> Result<OwnedEventId, NodeError> {
        let user = self.user(localpart);
        let mut content = serde_json::Value::Object(profile);
        content["membership"] = json!("join");
        let request = FedRequest::MakeJoin {
            room_id: room_id.to_owned(),
            user_id: user.clone(),
        };
        let (event_id, pdu, room_version) = self
            .signed_membership(room_id, &user, via, request, content)
            .await?;
        // The avatar the join names may be fetched by the servers that see the join.
        let named: serde_json::Value = serde_json::from_str::<serde_json::Value>(&pdu)
            .ok()
            .and_then(|p| p.get("content").cloned())
            .unwrap_or_default();
        self.note_media_refs(room_id, &named, Some(&event_id)).await;
        self.request(via, FedRequest::SendJoin { pdu }).await?;
        // The join is made at `via` now; we hold the room only once its history up to our
        // join is here and the join itself is accepted. Anything less is reported as it is.
        let caught_up = self
            .catch_up(via, room_id, vec![event_id.clone()], Some(&room_version))
            .await;
        let joined = matches!(
            self.shared.engine.event(&event_id).await?.as_deref(),
            Some(ev) if ev.status == EventStatus::Accepted && ev.pdu.room_id == room_id
        );
        if !joined {
            let why = match caught_up {
                Err(e) => e.to_string(),
                Ok(_) => "its history did not place the join".into(),
            };
            tracing::warn!(%via, %room_id, error = %why, "joined remotely, but the room is not here yet");
            return Err(NodeError::JoinIncomplete(format!(
                "the join was made through {via}, but the room's history could not be fetched \
                 ({why}); joining again retries"
            )));
        }
        let answered: Vec<OwnedEventId> = {
            let mut invites = self.shared.invites.lock().expect("invites lock");
            let ids = invites
                .iter()
                .filter(|i| i.room_id == room_id)
                .map(|i| i.event_id.clone())
                .collect();
            invites.retain(|i| i.room_id != room_id);
            ids
        };
        if !answered.is_empty() {
            let mut batch = WriteBatch::new();
            for id in answered {
                batch.delete(Table::Invites, id.as_bytes());
            }
            self.shared.engine.store().write(batch).await?;
        }
        Ok(event_id)
    }

    /// Asks `via` for a template (`request`: `MakeJoin` or `MakeKnock`) and signs `content` on
    /// it as `user`'s own membership event: its id, its JSON, and the room's version.
    pub(super) async fn signed_membership(
        &self,
        room_id: &RoomId,
        user: &ruma::OwnedUserId,
        via: PeerId,
        request: FedRequest,
        content: serde_json::Value,
    ) -> Result<(OwnedEventId, String, ruma::RoomVersionId), NodeError> {
        let FedResponse::JoinTemplate {
            room_id: tpl_room,
            template,
        } = self.request(via, request).await?
        else {
            return Err(NodeError::Network(
                "unexpected answer to a template request".into(),
            ));
        };
        if tpl_room != room_id {
            return Err(NodeError::Network(
                "a template answered for another room".into(),
            ));
        }
        let rules = rules_for(&template.room_version).ok_or_else(|| {
            IngestError::UnsupportedRoomVersion(template.room_version.to_string())
        })?;
        let (event_id, pdu) = build_signed(
            &self.shared.identity,
            &rules,
            NewEvent {
                room_id: Some(room_id),
                sender: user,
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
        Ok((event_id, pdu, template.room_version))
    }
}
