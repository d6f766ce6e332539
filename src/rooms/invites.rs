//! Invites: handing one to the invitee's server (with the stripped state that lets it show the
//! room), and taking ones for this server's users from peers.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId};
use serde_json::json;

use super::{NodeError, P2pNode};
use crate::engine::verify_standalone;
use crate::identity::ServerName;
use crate::net::protocol::{FedErrorCode, FedRequest, FedResponse};
use crate::store::{Table, WriteBatch};
use libp2p::PeerId;

/// The stored form of an [`Invite`] (table `invites`, keyed by event id).
#[derive(serde::Serialize, serde::Deserialize)]
struct InviteRecord {
    room_id: OwnedRoomId,
    room_version: RoomVersionId,
    event_id: OwnedEventId,
    sender: OwnedUserId,
    invitee: OwnedUserId,
    from: String,
    /// Absent in records stored before invites carried room state.
    #[serde(default)]
    room_state: Vec<serde_json::Value>,
}

impl From<&Invite> for InviteRecord {
    fn from(i: &Invite) -> Self {
        Self {
            room_id: i.room_id.clone(),
            room_version: i.room_version.clone(),
            event_id: i.event_id.clone(),
            sender: i.sender.clone(),
            invitee: i.invitee.clone(),
            from: i.from.to_string(),
            room_state: i.room_state.clone(),
        }
    }
}

pub(super) async fn load_invites(
    store: &dyn crate::store::Store,
) -> Result<Vec<Invite>, NodeError> {
    let mut out = Vec::new();
    for (_, value) in crate::store::scan_all(store, Table::Invites).await? {
        let r: InviteRecord = serde_json::from_slice(&value)
            .map_err(|e| crate::store::StoreError::Corrupt(format!("invite: {e}")))?;
        let from = r
            .from
            .parse()
            .map_err(|_| crate::store::StoreError::Corrupt("invite peer id".into()))?;
        out.push(Invite {
            room_id: r.room_id,
            room_version: r.room_version,
            event_id: r.event_id,
            sender: r.sender,
            invitee: r.invitee,
            from,
            room_state: r.room_state,
        });
    }
    Ok(out)
}

/// An invite for one of this peer's users to a room elsewhere.
#[derive(Debug, Clone)]
pub struct Invite {
    pub room_id: OwnedRoomId,
    pub room_version: RoomVersionId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    pub invitee: OwnedUserId,
    pub from: PeerId,
    /// Stripped state the inviter sent: `{type, state_key, sender, content}` objects.
    pub room_state: Vec<serde_json::Value>,
}

/// The state an invite carries so the invitee can show the room before joining (the spec's
/// recommended stripped state).
pub const STRIPPED_STATE: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
];

/// One stripped state event from an inviter, if it is one: an object with a known state type,
/// an empty state key, a valid sender and object content. Anything else is dropped (and
/// logged): it is display information, never authority.
fn stripped_state_event(raw: &str, room_id: &RoomId) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let kind = v["type"].as_str()?;
    let ok = STRIPPED_STATE.contains(&kind)
        && v["state_key"] == ""
        && v["sender"]
            .as_str()
            .is_some_and(|s| ruma::UserId::parse(s).is_ok())
        && v["content"].is_object();
    if !ok {
        tracing::warn!(%room_id, "malformed stripped state in an invite dropped");
        return None;
    }
    Some(json!({"type": kind, "state_key": "", "sender": v["sender"], "content": v["content"]}))
}

impl P2pNode {
    /// Invites `invitee` (on any server) and hands the invite to the invitee's peer directly.
    pub async fn invite(
        &self,
        room_id: &RoomId,
        localpart: &str,
        invitee: &OwnedUserId,
    ) -> Result<(), NodeError> {
        self.send(
            room_id,
            localpart,
            "m.room.member",
            Some(invitee.as_str()),
            json!({"membership": "invite"}),
        )
        .await?;
        self.deliver_invite(room_id, invitee).await
    }

    pub(super) async fn deliver_invite(
        &self,
        room_id: &RoomId,
        invitee: &OwnedUserId,
    ) -> Result<(), NodeError> {
        let server = ServerName::try_from(invitee.server_name())
            .map_err(|e| NodeError::Refused(FedErrorCode::BadRequest, e.to_string()))?;
        if server == self.server_name() {
            return Ok(());
        }
        let state = self
            .shared
            .engine
            .current_state(room_id)
            .await?
            .unwrap_or_default();
        let Some(id) = state.get(&("m.room.member".to_owned(), invitee.to_string())) else {
            return Ok(());
        };
        let ev = self
            .shared
            .engine
            .event(id)
            .await?
            .ok_or(NodeError::Stopped)?;
        let room = self
            .shared
            .engine
            .room(room_id)
            .await?
            .ok_or(NodeError::Stopped)?;
        let mut room_state = Vec::new();
        for kind in STRIPPED_STATE {
            let Some(id) = state.get(&(kind.to_owned(), String::new())) else {
                continue;
            };
            if let Some(e) = self.shared.engine.event(id).await? {
                let stripped = json!({
                    "type": kind,
                    "state_key": "",
                    "sender": e.pdu.sender,
                    "content": serde_json::from_str::<serde_json::Value>(e.pdu.content.get())
                        .unwrap_or_default(),
                });
                room_state.push(stripped.to_string());
            }
        }
        let request = FedRequest::Invite {
            room_version: room.room_version,
            pdu: ev.pdu.json.get().to_owned(),
            room_state,
        };
        // The invitee may be offline: the invite is in the room DAG anyway, and reaches them
        // when they next meet a member.
        if let Err(e) = self.request(server.peer_id(), request).await {
            tracing::info!(%invitee, error = %e, "invite not delivered now");
        }
        Ok(())
    }

    pub(super) async fn accept_invite(
        &self,
        peer: PeerId,
        room_version: &RoomVersionId,
        pdu: &str,
        room_state: &[String],
    ) -> Result<FedResponse, NodeError> {
        use FedErrorCode::*;
        let ev = match verify_standalone(pdu.as_bytes(), room_version) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "invalid invite refused");
                return Ok(FedResponse::error(BadRequest, e.to_string()));
            }
        };
        let membership = serde_json::from_str::<serde_json::Value>(ev.content.get())
            .ok()
            .and_then(|c| c["membership"].as_str().map(str::to_owned));
        let invitee = ev
            .state_key
            .as_deref()
            .and_then(|k| OwnedUserId::try_from(k).ok());
        let Some(invitee) = invitee.filter(|_| {
            ev.kind.to_string() == "m.room.member" && membership.as_deref() == Some("invite")
        }) else {
            return Ok(FedResponse::error(BadRequest, "not an invite"));
        };
        if ServerName::try_from(invitee.server_name()).ok() != Some(self.server_name()) {
            return Ok(FedResponse::error(
                Forbidden,
                "the invitee is not on this server",
            ));
        }
        let invite = Invite {
            room_id: ev.room_id.clone(),
            room_version: room_version.clone(),
            event_id: ev.event_id.clone(),
            sender: ev.sender.clone(),
            invitee,
            from: peer,
            room_state: room_state
                .iter()
                .filter_map(|e| stripped_state_event(e, &ev.room_id))
                .collect(),
        };
        // Durable before we say Ok: the invite must survive a restart.
        let record = InviteRecord::from(&invite);
        let mut batch = WriteBatch::new();
        batch.put(
            Table::Invites,
            invite.event_id.as_bytes(),
            serde_json::to_vec(&record).expect("serialises"),
        );
        self.shared.engine.store().write(batch).await?;
        let mut invites = self.shared.invites.lock().expect("invites lock");
        if !invites.iter().any(|i| i.event_id == invite.event_id) {
            invites.push(invite);
        }
        drop(invites);
        self.changed();
        Ok(FedResponse::Ok)
    }
}
