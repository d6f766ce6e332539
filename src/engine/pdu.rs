//! PDUs: parsing a received event into typed fields, building and signing local ones, and the
//! stored form (the event plus what the engine decided about it).

use std::collections::BTreeSet;

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId,
    RoomVersionId, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::identity::Identity;

/// The spec's size limit for a PDU in canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;
/// Matrix caps depth at the largest integer JSON can carry exactly.
pub const MAX_DEPTH: u64 = (1 << 53) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("event JSON has the wrong shape: {0}")]
    Shape(String),
    #[error("event lists {0} twice")]
    DuplicateReference(OwnedEventId),
}

/// A PDU's fields, parsed once. The canonical JSON (without `event_id`) is kept for re-serving.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    /// The room the event belongs to (for v12 create events: derived from the event id).
    pub room_id: OwnedRoomId,
    /// The `room_id` field as sent; absent on room-version-12 create events.
    room_id_field: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub state_key: Option<String>,
    pub content: Box<RawValue>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
    /// Canonical JSON of the event exactly as accepted (redacted if its content hash failed).
    pub json: Box<RawValue>,
}

#[derive(Deserialize)]
struct PduFields {
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    state_key: Option<String>,
    content: Box<RawValue>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    depth: u64,
}

#[derive(Deserialize)]
struct RedactsInContent {
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    /// Parses an event object whose id is `event_id` (computed by the caller from its reference hash).
    pub fn from_canonical(
        event_id: OwnedEventId,
        object: &CanonicalJsonObject,
    ) -> Result<Self, PduError> {
        let json = serde_json::to_string(object).map_err(|e| PduError::Shape(e.to_string()))?;
        let fields: PduFields =
            serde_json::from_str(&json).map_err(|e| PduError::Shape(e.to_string()))?;
        let room_id = match (&fields.room_id, &fields.kind) {
            (Some(id), _) => id.clone(),
            (None, TimelineEventType::RoomCreate) => room_id_from_create(&event_id)?,
            (None, _) => return Err(PduError::Shape("missing room_id".into())),
        };
        for list in [&fields.prev_events, &fields.auth_events] {
            let mut seen = BTreeSet::new();
            for id in list {
                if !seen.insert(id) {
                    return Err(PduError::DuplicateReference(id.clone()));
                }
            }
        }
        // Room versions 11+ moved `redacts` into the content; accept either place.
        let redacts = match fields.redacts {
            Some(r) => Some(r),
            None if fields.kind == TimelineEventType::RoomRedaction => {
                serde_json::from_str::<RedactsInContent>(fields.content.get())
                    .ok()
                    .and_then(|c| c.redacts)
            }
            None => None,
        };
        Ok(Self {
            event_id,
            room_id,
            room_id_field: fields.room_id,
            sender: fields.sender,
            origin_server_ts: fields.origin_server_ts,
            kind: fields.kind,
            state_key: fields.state_key,
            content: fields.content,
            prev_events: fields.prev_events,
            auth_events: fields.auth_events,
            redacts,
            depth: fields.depth,
            json: RawValue::from_string(json).map_err(|e| PduError::Shape(e.to_string()))?,
        })
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    pub fn state_key_pair(&self) -> Option<(ruma::events::StateEventType, String)> {
        self.state_key
            .as_ref()
            .map(|k| (self.kind.to_string().into(), k.clone()))
    }

    /// The canonical JSON object (for sending to peers or re-verifying).
    pub fn canonical_object(&self) -> CanonicalJsonObject {
        serde_json::from_str(self.json.get()).expect("stored canonical JSON parses")
    }

    /// The event as its room version's redaction rules prune it.
    pub fn redacted(&self, version: &RoomVersionId) -> Option<CanonicalJsonObject> {
        let rules = rules_for(version)?;
        ruma::canonical_json::redact(self.canonical_object(), &rules.redaction, None).ok()
    }
}

/// Room version 12: the room id is the create event's reference hash with a `!` sigil.
pub fn room_id_from_create(create_event_id: &EventId) -> Result<OwnedRoomId, PduError> {
    let hash = create_event_id.as_str().trim_start_matches('$');
    OwnedRoomId::try_from(format!("!{hash}")).map_err(|e| PduError::Shape(e.to_string()))
}

/// Computes the event id (`$` + reference hash) of an event object.
pub fn event_id_of(
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<OwnedEventId, String> {
    let hash = ruma::signatures::reference_hash(object, rules).map_err(|e| e.to_string())?;
    OwnedEventId::try_from(format!("${hash}")).map_err(|e| e.to_string())
}

/// The rules of a room version we can host (v3 and later: event ids are hashes, so the DAG
/// cannot contain cycles, and state resolution v2 applies).
pub fn rules_for(version: &RoomVersionId) -> Option<RoomVersionRules> {
    let rules = version.rules()?;
    match version {
        RoomVersionId::V1 | RoomVersionId::V2 => None,
        _ => Some(rules),
    }
}

/// A local event before signing.
pub struct NewEvent<'a> {
    pub room_id: Option<&'a RoomId>,
    pub sender: &'a UserId,
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub content: serde_json::Value,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: u64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub redacts: Option<OwnedEventId>,
}

/// Builds, hashes and signs a local event; returns its id and canonical JSON bytes.
pub fn build_signed(
    identity: &Identity,
    rules: &RoomVersionRules,
    new: NewEvent<'_>,
) -> Result<(OwnedEventId, Vec<u8>), String> {
    let mut value = serde_json::json!({
        "sender": new.sender,
        "type": new.kind,
        "content": new.content,
        "prev_events": new.prev_events,
        "auth_events": new.auth_events,
        "depth": new.depth.min(MAX_DEPTH),
        "origin_server_ts": new.origin_server_ts,
    });
    let obj = value.as_object_mut().expect("built as an object");
    if let Some(room_id) = new.room_id {
        obj.insert("room_id".into(), room_id.as_str().into());
    }
    if let Some(key) = new.state_key {
        obj.insert("state_key".into(), key.into());
    }
    if let Some(redacts) = new.redacts {
        obj.insert("redacts".into(), redacts.as_str().into());
    }
    let mut object: CanonicalJsonObject = match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => o,
        Ok(_) => unreachable!("built as an object"),
        Err(e) => return Err(format!("content is not canonical JSON: {e}")),
    };
    ruma::signatures::hash_and_sign_event(
        &identity.server_name().to_string(),
        identity.signing_key(),
        &mut object,
        &rules.redaction,
    )
    .map_err(|e| e.to_string())?;
    let event_id = event_id_of(&object, rules)?;
    // The size limit is for the receiver to enforce (`IngestError::TooLarge`).
    let bytes = serde_json::to_vec(&object).map_err(|e| e.to_string())?;
    Ok((event_id, bytes))
}

/// What the engine decided about a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Passed every check; in the timeline and (if state) in the room's state.
    Accepted,
    /// Passed auth at its position in the DAG but not against the room's current state: kept,
    /// but neither in the timeline nor a forward extremity.
    SoftFailed,
    /// Failed authorisation: kept so it is not fetched again, never in state or timeline.
    Rejected,
    /// Known without its place in the DAG (auth chain or state of a room we joined).
    Outlier,
}

/// An event as stored: the PDU plus the engine's verdict and the state around it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub pdu: Pdu,
    pub status: EventStatus,
    pub reason: Option<String>,
    /// Position in the room's timeline (accepted events only).
    pub stream: Option<u64>,
    /// State group of the state before / after the event (absent for outliers).
    pub state_before: Option<u64>,
    pub state_after: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredEventRecord<'a> {
    status: EventStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<u64>,
    #[serde(borrow)]
    pdu: &'a RawValue,
}

impl StoredEvent {
    pub fn encode(&self) -> Vec<u8> {
        let record = StoredEventRecord {
            status: self.status,
            reason: self.reason.clone(),
            stream: self.stream,
            before: self.state_before,
            after: self.state_after,
            pdu: &self.pdu.json,
        };
        serde_json::to_vec(&record).expect("record serialises")
    }

    pub fn decode(event_id: &EventId, bytes: &[u8]) -> Result<Self, String> {
        let record: StoredEventRecord<'_> =
            serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let object: CanonicalJsonObject =
            serde_json::from_str(record.pdu.get()).map_err(|e| e.to_string())?;
        let pdu = Pdu::from_canonical(event_id.to_owned(), &object).map_err(|e| e.to_string())?;
        Ok(Self {
            pdu,
            status: record.status,
            reason: record.reason,
            stream: record.stream,
            state_before: record.before,
            state_after: record.after,
        })
    }

    pub fn is_rejected(&self) -> bool {
        self.status == EventStatus::Rejected
    }
}

impl ruma::state_res::Event for StoredEvent {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.pdu.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.pdu.room_id_field.as_deref()
    }

    fn sender(&self) -> &UserId {
        &self.pdu.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.pdu.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.pdu.kind
    }

    fn content(&self) -> &RawValue {
        &self.pdu.content
    }

    fn state_key(&self) -> Option<&str> {
        self.pdu.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.pdu.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.pdu.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.pdu.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.is_rejected()
    }
}
