//! The wire protocol between peers.
//!
//! - Push: one gossipsub topic per room, `hyphae/room/<room id>`, carrying PDUs (canonical JSON).
//! - Pull: `/hyphae/fed/1`, a CBOR request-response protocol with federation-shaped requests.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId};
use serde::{Deserialize, Serialize};

use crate::engine::Template;

pub const FED_PROTOCOL: &str = "/hyphae/fed/1";
/// Most events one `GetMissingEvents` answer carries.
pub const MAX_MISSING_EVENTS: u32 = 500;
/// Most ids one request may name.
pub const MAX_IDS_PER_REQUEST: usize = 100;

pub fn room_topic(room_id: &RoomId) -> String {
    format!("hyphae/room/{room_id}")
}

/// The room id of a gossip topic, if it is one of ours.
pub fn topic_room(topic: &str) -> Option<OwnedRoomId> {
    topic
        .strip_prefix("hyphae/room/")
        .and_then(|r| OwnedRoomId::try_from(r).ok())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FedRequest {
    /// One event by id.
    GetEvent { event_id: OwnedEventId },
    /// Events reachable backwards from `latest`, stopping at `earliest`, oldest first.
    GetMissingEvents {
        room_id: OwnedRoomId,
        earliest: Vec<OwnedEventId>,
        latest: Vec<OwnedEventId>,
        limit: u32,
    },
    /// The room's forward extremities, for anti-entropy.
    Extremities { room_id: OwnedRoomId },
    /// A template for `user_id`'s join event.
    MakeJoin {
        room_id: OwnedRoomId,
        user_id: OwnedUserId,
    },
    /// A signed join event built from a `MakeJoin` template.
    SendJoin { pdu: String },
    /// An invite event for one of this peer's users (the room may be unknown here).
    Invite {
        room_version: RoomVersionId,
        pdu: String,
        /// Stripped state (`{type, state_key, sender, content}` JSON) that lets the invitee
        /// show the room (its name, topic, join rule) before joining it.
        #[serde(default)]
        room_state: Vec<String>,
    },
}

/// Stripped state events an invite carries at most.
pub const MAX_INVITE_STATE: usize = 16;

impl FedRequest {
    /// Rejects requests larger than the protocol allows before any work is done.
    pub fn check_bounds(&self) -> Result<(), String> {
        match self {
            FedRequest::GetMissingEvents {
                earliest, latest, ..
            } if earliest.len() > MAX_IDS_PER_REQUEST || latest.len() > MAX_IDS_PER_REQUEST => {
                Err(format!("at most {MAX_IDS_PER_REQUEST} ids per list"))
            }
            FedRequest::SendJoin { pdu } | FedRequest::Invite { pdu, .. }
                if pdu.len() > crate::engine::pdu::MAX_PDU_BYTES =>
            {
                Err("PDU over the size limit".into())
            }
            FedRequest::Invite { room_state, .. }
                if room_state.len() > MAX_INVITE_STATE
                    || room_state
                        .iter()
                        .any(|e| e.len() > crate::engine::pdu::MAX_PDU_BYTES) =>
            {
                Err("too much invite state".into())
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FedErrorCode {
    NotFound,
    Forbidden,
    BadRequest,
    LimitExceeded,
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FedResponse {
    Event {
        pdu: String,
    },
    /// PDUs with their event ids (a hint for what to ask next; receivers compute the real ids).
    Events {
        pdus: Vec<String>,
        event_ids: Vec<OwnedEventId>,
    },
    Extremities {
        event_ids: Vec<OwnedEventId>,
    },
    JoinTemplate {
        room_id: OwnedRoomId,
        template: Template,
    },
    Ok,
    Error {
        code: FedErrorCode,
        message: String,
    },
}

impl FedResponse {
    pub fn error(code: FedErrorCode, message: impl Into<String>) -> Self {
        FedResponse::Error {
            code,
            message: message.into(),
        }
    }
}

/// Gossip topic for a room's ephemeral events (typing, read receipts).
pub fn edu_topic(room_id: &RoomId) -> String {
    format!("hyphae/edu/{room_id}")
}

/// The room id of an EDU gossip topic.
pub fn edu_topic_room(topic: &str) -> Option<OwnedRoomId> {
    topic
        .strip_prefix("hyphae/edu/")
        .and_then(|r| OwnedRoomId::try_from(r).ok())
}

/// An ephemeral event about one user, signed by that user's server: peers act on it only if
/// the signature verifies against the key that is the user's server name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum Edu {
    #[serde(rename = "m.typing")]
    Typing {
        room_id: OwnedRoomId,
        user_id: ruma::OwnedUserId,
        typing: bool,
    },
    #[serde(rename = "m.receipt")]
    Receipt {
        room_id: OwnedRoomId,
        user_id: ruma::OwnedUserId,
        event_id: OwnedEventId,
    },
}

impl Edu {
    pub fn room_id(&self) -> &RoomId {
        match self {
            Edu::Typing { room_id, .. } | Edu::Receipt { room_id, .. } => room_id,
        }
    }

    pub fn user_id(&self) -> &ruma::UserId {
        match self {
            Edu::Typing { user_id, .. } | Edu::Receipt { user_id, .. } => user_id,
        }
    }

    /// Canonical JSON signed by `identity` (which must be the user's server).
    pub fn sign(&self, identity: &crate::identity::Identity) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("EDU serialises");
        let Ok(ruma::CanonicalJsonValue::Object(mut object)) =
            ruma::CanonicalJsonValue::try_from(value)
        else {
            unreachable!("EDUs are objects of strings and booleans");
        };
        // Gossip ids are content hashes: the time keeps "typing" twice in a minute from
        // looking like a duplicate.
        let ms: u64 = ruma::MilliSecondsSinceUnixEpoch::now().get().into();
        object.insert(
            "ts".into(),
            ruma::CanonicalJsonValue::Integer(ruma::Int::new_saturating(ms as i64)),
        );
        ruma::signatures::sign_json(
            &identity.server_name().to_string(),
            identity.signing_key(),
            &mut object,
        )
        .expect("signing an object succeeds");
        serde_json::to_vec(&object).expect("canonical JSON serialises")
    }

    /// Parses and checks a signed EDU: well-formed, and signed by the user's own server.
    pub fn verify(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > 4096 {
            return Err(format!("EDU of {} bytes is too large", bytes.len()));
        }
        let object: ruma::CanonicalJsonObject =
            serde_json::from_slice(bytes).map_err(|e| format!("not canonical JSON: {e}"))?;
        let mut plain = object.clone();
        plain.remove("signatures");
        let edu: Edu =
            serde_json::from_value(serde_json::to_value(&plain).map_err(|e| e.to_string())?)
                .map_err(|e| format!("not an EDU: {e}"))?;
        let origin = crate::identity::ServerName::try_from(edu.user_id().server_name())
            .map_err(|e| format!("user's server is not a key: {e}"))?;
        ruma::signatures::verify_json(&origin.public_key_map(), &object)
            .map_err(|e| format!("signature: {e}"))?;
        Ok(edu)
    }
}
