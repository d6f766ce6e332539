//! The wire protocol between peers.
//!
//! One authenticated request-response protocol, `/hyphae/fed/1` (CBOR over noise-encrypted
//! streams), carries everything: pushes of new PDUs and EDUs to a room's member servers, and
//! federation-shaped pulls. There is no gossip topic: a topic anyone can subscribe to is not a
//! private channel. The asking peer's PeerId is its server name, so every request is
//! authorised by who asks.

use std::collections::BTreeMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId};
use serde::{Deserialize, Serialize};

use crate::engine::Template;

pub const FED_PROTOCOL: &str = "/hyphae/fed/1";
/// Most events one `GetMissingEvents` answer carries.
pub const MAX_MISSING_EVENTS: u32 = 500;
/// Most ids one request may name.
pub const MAX_IDS_PER_REQUEST: usize = 100;

/// Largest request a peer may send (a push of PDUs, an invite with its state).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest answer a peer may send; answers are built to stay under it.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;
/// Most PDUs one push carries.
pub const MAX_PUSH_PDUS: usize = 100;

/// The codec for [`FED_PROTOCOL`], with its size limits set explicitly: every answer is built
/// to stay under them (a larger message would be dropped by the codec, not truncated).
pub fn fed_codec() -> libp2p::request_response::cbor::codec::Codec<FedRequest, FedResponse> {
    libp2p::request_response::cbor::codec::Codec::default()
        .set_request_size_maximum(MAX_REQUEST_BYTES as u64)
        .set_response_size_maximum(MAX_RESPONSE_BYTES as u64)
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
    /// A template for `user_id`'s knock (answered with `JoinTemplate`).
    MakeKnock {
        room_id: OwnedRoomId,
        user_id: OwnedUserId,
    },
    /// A signed knock built from a `MakeKnock` template (answered with `KnockState`).
    SendKnock { pdu: String },
    /// An invite event for one of this peer's users (the room may be unknown here).
    Invite {
        room_version: RoomVersionId,
        pdu: String,
        /// Stripped state (`{type, state_key, sender, content}` JSON) that lets the invitee
        /// show the room (its name, topic, join rule) before joining it.
        #[serde(default)]
        room_state: Vec<String>,
    },
    /// New PDUs of a room, pushed by a server in it to the room's other member servers.
    Push {
        room_id: OwnedRoomId,
        pdus: Vec<String>,
    },
    /// A signed EDU (typing, receipt; see [`Edu`]) pushed to the room's member servers.
    Edu { edu: String },
    /// The device keys and cross-signing keys of users of the answering server.
    QueryKeys { user_ids: Vec<OwnedUserId> },
    /// One one-time key (or the fallback key) per device, for devices of the answering
    /// server's users: user → device → algorithm.
    ClaimKeys {
        claims: BTreeMap<OwnedUserId, BTreeMap<String, String>>,
    },
    /// To-device messages from `sender` (a user of the asking server), JSON
    /// `{user: {device or "*": content}}`. `seq` grows with every message the asking server
    /// sends this one, so a retried message is taken once and in order.
    ToDevice {
        seq: u64,
        sender: OwnedUserId,
        kind: String,
        messages: String,
    },
    /// `user_id` (of the asking server) added or removed a device or changed its keys:
    /// keys cached for that user are stale.
    DeviceListChanged {
        user_id: OwnedUserId,
        stream_id: u64,
    },
    /// Bytes of `mxc://<answering server>/<media_id>` from `offset`: at most
    /// [`MEDIA_PART_BYTES`], for a server that may read a room where the media is named.
    GetMedia { media_id: String, offset: u64 },
}

/// Most bytes of a file one `Media` answer carries.
pub const MEDIA_PART_BYTES: usize = 1 << 20;

/// Most bytes of one `ToDevice` request's messages.
pub const MAX_TO_DEVICE_BYTES: usize = 128 << 10;
/// Most devices one `ClaimKeys` request may name.
pub const MAX_CLAIMED_DEVICES: usize = 1000;

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
            FedRequest::SendJoin { pdu }
            | FedRequest::SendKnock { pdu }
            | FedRequest::Invite { pdu, .. }
                if pdu.len() > crate::engine::pdu::MAX_PDU_BYTES =>
            {
                Err("PDU over the size limit".into())
            }
            FedRequest::Push { pdus, .. } if pdus.len() > MAX_PUSH_PDUS => {
                Err(format!("at most {MAX_PUSH_PDUS} PDUs per push"))
            }
            FedRequest::Push { pdus, .. }
                if pdus
                    .iter()
                    .any(|p| p.len() > crate::engine::pdu::MAX_PDU_BYTES) =>
            {
                Err("PDU over the size limit".into())
            }
            FedRequest::Edu { edu } if edu.len() > MAX_EDU_BYTES => Err("EDU too large".into()),
            FedRequest::GetMedia { media_id, .. } if !crate::media::valid_media_id(media_id) => {
                Err("not a media id".into())
            }
            FedRequest::QueryKeys { user_ids } if user_ids.len() > MAX_IDS_PER_REQUEST => {
                Err(format!("at most {MAX_IDS_PER_REQUEST} users per query"))
            }
            FedRequest::ClaimKeys { claims }
                if claims.len() > MAX_IDS_PER_REQUEST
                    || claims.values().map(BTreeMap::len).sum::<usize>() > MAX_CLAIMED_DEVICES =>
            {
                Err(format!("at most {MAX_CLAIMED_DEVICES} devices per claim"))
            }
            FedRequest::ToDevice { kind, messages, .. }
                if messages.len() > MAX_TO_DEVICE_BYTES || kind.len() > 255 =>
            {
                Err("to-device message too large".into())
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
    /// A knock was taken: the room's stripped state (JSON), for the knocker to show it.
    KnockState {
        room_state: Vec<String>,
    },
    /// Keys asked for with `QueryKeys` or `ClaimKeys`, as the JSON of the client API's answer
    /// (`device_keys`, `master_keys`, `self_signing_keys`; or `one_time_keys`).
    Keys {
        json: String,
    },
    /// Part of a file (`GetMedia`): what the whole is, and the bytes from the asked offset.
    Media {
        content_type: String,
        size: u64,
        /// SHA-256 of the whole file, hex.
        sha256: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
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

/// Largest signed EDU.
pub const MAX_EDU_BYTES: usize = 4096;

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
        // When it was said: receivers can tell a fresh notice from a replayed one.
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

    /// Parses and checks a signed EDU: well-formed, stamped with when it was said, and signed
    /// by the user's own server. Returns the EDU and its `ts` (milliseconds since the epoch).
    pub fn verify(bytes: &[u8]) -> Result<(Self, u64), String> {
        if bytes.len() > MAX_EDU_BYTES {
            return Err(format!("EDU of {} bytes is too large", bytes.len()));
        }
        let object: ruma::CanonicalJsonObject =
            serde_json::from_slice(bytes).map_err(|e| format!("not canonical JSON: {e}"))?;
        let ts = match object.get("ts") {
            Some(ruma::CanonicalJsonValue::Integer(ts)) => {
                u64::try_from(i64::from(*ts)).map_err(|_| "negative ts".to_owned())?
            }
            _ => return Err("no ts".into()),
        };
        let mut plain = object.clone();
        plain.remove("signatures");
        plain.remove("ts");
        let edu: Edu =
            serde_json::from_value(serde_json::to_value(&plain).map_err(|e| e.to_string())?)
                .map_err(|e| format!("not an EDU: {e}"))?;
        let origin = crate::identity::ServerName::try_from(edu.user_id().server_name())
            .map_err(|e| format!("user's server is not a key: {e}"))?;
        // ruma checks only the servers the `signatures` map lists: an empty map would pass, so
        // the user's server must be among them (and no other server may be).
        let signers = match object.get("signatures") {
            Some(ruma::CanonicalJsonValue::Object(s)) => s,
            _ => return Err("unsigned EDU".into()),
        };
        let origin_name = origin.to_string();
        if signers.len() != 1 || !signers.contains_key(&origin_name) {
            return Err(format!("EDU must be signed by {origin_name} alone"));
        }
        ruma::signatures::verify_json(&origin.public_key_map(), &object)
            .map_err(|e| format!("signature: {e}"))?;
        Ok((edu, ts))
    }
}
