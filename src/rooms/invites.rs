//! Invites: handing one to the invitee's server (with the stripped state that lets it show the
//! room), and taking ones for this server's users from peers.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId};
use serde_json::json;

use super::{NodeError, P2pNode};
use crate::engine::verify_standalone;
use crate::identity::ServerName;
use crate::net::protocol::{FedErrorCode, FedRequest, FedResponse, MAX_INVITE_STATE};
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
    /// When it arrived (ms since the epoch); 0 in records stored before invites expired.
    #[serde(default)]
    received_ms: u64,
}

/// Invites kept for this server's users at once, and from one inviting server.
pub const MAX_INVITES: usize = 500;
pub const MAX_INVITES_PER_SERVER: usize = 20;
/// Bytes of stripped state kept per invite (display information only).
pub const MAX_INVITE_STATE_BYTES: usize = 16 << 10;
/// An invite not answered in this long is dropped.
pub const INVITE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

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
            received_ms: i.received_ms,
        }
    }
}

pub(super) async fn load_invites(
    store: &dyn crate::store::Store,
) -> Result<Vec<Invite>, NodeError> {
    let mut out = Vec::new();
    let now_ms = now_ms();
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
            // Records from before expiry count from now.
            received_ms: if r.received_ms == 0 {
                now_ms
            } else {
                r.received_ms
            },
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
    /// When it arrived (ms since the epoch).
    pub received_ms: u64,
}

impl Invite {
    fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.received_ms) > INVITE_TTL_MS
    }
}

fn now_ms() -> u64 {
    super::now().get().into()
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

    /// The stripped state of a room in `state` (`STRIPPED_STATE`), as JSON strings: what an
    /// invitee or knocker is shown of a room they are not in.
    pub(super) async fn stripped_state(
        &self,
        state: &crate::engine::SortedState,
    ) -> Result<Vec<String>, NodeError> {
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
        Ok(room_state)
    }

    /// Stripped state a peer sent (with an invite, or in answer to a knock), checked: one event
    /// per known type, within a byte budget; anything else is dropped.
    pub(super) fn checked_stripped_state(
        room_state: &[String],
        room_id: &RoomId,
    ) -> Vec<serde_json::Value> {
        let mut kept: Vec<serde_json::Value> = Vec::new();
        let mut bytes = 0;
        for e in room_state.iter().take(MAX_INVITE_STATE) {
            let Some(v) = stripped_state_event(e, room_id) else {
                continue;
            };
            bytes += e.len();
            if bytes > MAX_INVITE_STATE_BYTES || kept.iter().any(|k| k["type"] == v["type"]) {
                continue;
            }
            kept.push(v);
        }
        kept
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
        let room_state = self.stripped_state(&state).await?;
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
        let kept = Self::checked_stripped_state(room_state, &ev.room_id);
        let invite = Invite {
            room_id: ev.room_id.clone(),
            room_version: room_version.clone(),
            event_id: ev.event_id.clone(),
            sender: ev.sender.clone(),
            invitee,
            from: peer,
            room_state: kept,
            received_ms: now_ms(),
        };
        // Room for it: expired invites go, an older invite to the same room for the same user
        // is replaced, and each inviting server and all of them together have a cap.
        let mut batch = WriteBatch::new();
        {
            let invites = self.shared.invites.lock().expect("invites lock");
            if invites.iter().any(|i| i.event_id == invite.event_id) {
                return Ok(FedResponse::Ok);
            }
            let now = now_ms();
            let server = invite.sender.server_name();
            let mut kept = 0;
            let mut from_server = 0;
            for i in invites.iter() {
                let replaced = i.room_id == invite.room_id && i.invitee == invite.invitee;
                if i.expired(now) || replaced {
                    batch.delete(Table::Invites, i.event_id.as_bytes());
                    continue;
                }
                kept += 1;
                from_server += usize::from(i.sender.server_name() == server);
            }
            if kept >= MAX_INVITES || from_server >= MAX_INVITES_PER_SERVER {
                tracing::warn!(%peer, %server, "invite refused: too many pending invites");
                return Ok(FedResponse::error(
                    LimitExceeded,
                    "too many pending invites here",
                ));
            }
        }
        // Durable before we say Ok: the invite must survive a restart.
        let record = InviteRecord::from(&invite);
        batch.put(
            Table::Invites,
            invite.event_id.as_bytes(),
            serde_json::to_vec(&record).expect("serialises"),
        );
        self.shared.engine.store().write(batch).await?;
        let mut invites = self.shared.invites.lock().expect("invites lock");
        let now = now_ms();
        invites.retain(|i| {
            !(i.expired(now) || (i.room_id == invite.room_id && i.invitee == invite.invitee))
        });
        if !invites.iter().any(|i| i.event_id == invite.event_id) {
            invites.push(invite);
        }
        drop(invites);
        self.changed();
        Ok(FedResponse::Ok)
    }

    /// Declines `invitee`'s invites to `room_id` (a room not held here): they are forgotten.
    /// Returns whether there was one.
    pub async fn decline_invite(
        &self,
        room_id: &RoomId,
        invitee: &ruma::UserId,
    ) -> Result<bool, NodeError> {
        let declined: Vec<OwnedEventId> = self
            .shared
            .invites
            .lock()
            .expect("invites lock")
            .iter()
            .filter(|i| i.room_id == room_id && i.invitee == invitee)
            .map(|i| i.event_id.clone())
            .collect();
        if declined.is_empty() {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        for id in &declined {
            batch.delete(Table::Invites, id.as_bytes());
        }
        self.shared.engine.store().write(batch).await?;
        self.shared
            .invites
            .lock()
            .expect("invites lock")
            .retain(|i| !declined.contains(&i.event_id));
        self.changed();
        Ok(true)
    }
}
