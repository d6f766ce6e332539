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
    },
}

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
