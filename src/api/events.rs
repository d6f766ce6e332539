//! PDUs as clients see them: the client event format, with redactions applied and the
//! `unsigned` data the Client-Server API adds.

use ruma::canonical_json::CanonicalJsonValue;
use ruma::{MilliSecondsSinceUnixEpoch, RoomVersionId, UserId};
use serde_json::{json, Value};

use crate::engine::pdu::StoredEvent;
use crate::engine::Engine;
use crate::store::StoreError;

/// Extra facts about an event for the client that asks.
#[derive(Default)]
pub struct Unsigned {
    pub transaction_id: Option<String>,
    pub prev_content: Option<Value>,
    pub redacted_because: Option<Value>,
    /// Bundled aggregations (`m.relations`): threads, edits, references.
    pub relations: Option<Value>,
}

/// The client format of `ev` (with its content redacted under `version`'s rules if
/// `unsigned.redacted_because` is set).
pub fn client_event(
    ev: &StoredEvent,
    version: &RoomVersionId,
    unsigned: Unsigned,
    now: MilliSecondsSinceUnixEpoch,
) -> Value {
    let pdu = &ev.pdu;
    let mut content: Value = serde_json::from_str(pdu.content.get()).unwrap_or_else(|_| json!({}));
    if unsigned.redacted_because.is_some() {
        content = redacted_content(ev, version).unwrap_or_else(|| json!({}));
    }
    let mut out = json!({
        "type": pdu.kind.to_string(),
        "event_id": pdu.event_id,
        "room_id": pdu.room_id,
        "sender": pdu.sender,
        "origin_server_ts": pdu.origin_server_ts,
        "content": content,
    });
    if let Some(k) = &pdu.state_key {
        out["state_key"] = k.as_str().into();
    }
    if let Some(r) = &pdu.redacts {
        out["redacts"] = r.as_str().into();
    }
    let age = u64::from(now.get()).saturating_sub(u64::from(pdu.origin_server_ts.get()));
    let mut u = json!({ "age": age });
    if let Some(t) = unsigned.transaction_id {
        u["transaction_id"] = t.into();
    }
    if let Some(p) = unsigned.prev_content {
        u["prev_content"] = p;
    }
    if let Some(r) = unsigned.redacted_because {
        u["redacted_because"] = r;
    }
    if let Some(r) = unsigned.relations {
        u["m.relations"] = r;
    }
    out["unsigned"] = u;
    out
}

/// The content `ev` keeps once redacted, under its room version's rules.
fn redacted_content(ev: &StoredEvent, version: &RoomVersionId) -> Option<Value> {
    let redacted = ev.pdu.redacted(version)?;
    match redacted.get("content") {
        Some(CanonicalJsonValue::Object(c)) => serde_json::to_value(c).ok(),
        _ => Some(json!({})),
    }
}

/// A user's power level in a room state (room v12: creators outrank everyone).
pub async fn power_level(
    engine: &Engine,
    state: &crate::engine::SortedState,
    user: &UserId,
) -> Result<i64, StoreError> {
    let content = |id| async move {
        Ok::<_, StoreError>(match engine.event(id).await? {
            Some(ev) => serde_json::from_str::<Value>(ev.pdu.content.get()).unwrap_or(Value::Null),
            None => Value::Null,
        })
    };
    if let Some(id) = state.get(&("m.room.create".to_owned(), String::new())) {
        let create = engine.event(id).await?;
        if let Some(create) = create {
            let c: Value = serde_json::from_str(create.pdu.content.get()).unwrap_or(Value::Null);
            let v12 = c["room_version"].as_str() == Some("12");
            let extra = c["additional_creators"]
                .as_array()
                .is_some_and(|a| a.iter().any(|u| u.as_str() == Some(user.as_str())));
            if v12 && (create.pdu.sender == user || extra) {
                return Ok(i64::MAX);
            }
            if !state.contains_key(&("m.room.power_levels".to_owned(), String::new())) {
                return Ok(if create.pdu.sender == user { 100 } else { 0 });
            }
        }
    }
    let Some(id) = state.get(&("m.room.power_levels".to_owned(), String::new())) else {
        return Ok(0);
    };
    let pl = content(id).await?;
    Ok(pl["users"][user.as_str()]
        .as_i64()
        .or_else(|| pl["users_default"].as_i64())
        .unwrap_or(0))
}

/// The power level a state-key-less setting of the power levels event asks for (`redact`,
/// `invite`, ...), with the spec's defaults.
pub async fn required_level(
    engine: &Engine,
    state: &crate::engine::SortedState,
    field: &str,
    default: i64,
) -> Result<i64, StoreError> {
    let Some(id) = state.get(&("m.room.power_levels".to_owned(), String::new())) else {
        return Ok(default);
    };
    let Some(ev) = engine.event(id).await? else {
        return Ok(default);
    };
    let pl: Value = serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
    Ok(pl[field].as_i64().unwrap_or(default))
}

/// Whether `redaction` takes effect on `target`: in room versions 3+ auth lets any member send
/// a redaction, and the server that serves the event checks that the redacter is on the
/// original sender's server or has the room's `redact` power.
async fn redaction_applies(
    engine: &Engine,
    target: &StoredEvent,
    redaction: &StoredEvent,
) -> Result<bool, StoreError> {
    if redaction.pdu.sender.server_name() == target.pdu.sender.server_name() {
        return Ok(true);
    }
    let Some(state) = engine.state_before(&redaction.pdu.event_id).await? else {
        return Ok(false);
    };
    let have = power_level(engine, &state, &redaction.pdu.sender).await?;
    Ok(have >= required_level(engine, &state, "redact", 50).await?)
}

/// The power level needed to send a state event of `kind` in a room with `state`: its entry in
/// `events`, else `state_default` (50, or 0 when the room has no power levels at all).
pub async fn state_event_level(
    engine: &Engine,
    state: &crate::engine::SortedState,
    kind: &str,
) -> Result<i64, StoreError> {
    let Some(id) = state.get(&("m.room.power_levels".to_owned(), String::new())) else {
        return Ok(0);
    };
    let Some(ev) = engine.event(id).await? else {
        return Ok(0);
    };
    let pl: Value = serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
    // Rooms before version 10 may write levels as strings.
    let level = |v: &Value| v.as_i64().or_else(|| v.as_str()?.trim().parse().ok());
    Ok(level(&pl["events"][kind])
        .or_else(|| level(&pl["state_default"]))
        .unwrap_or(50))
}

/// The client format of `ev`, with redaction and `prev_content` worked out.
pub async fn format_event(
    engine: &Engine,
    ev: &StoredEvent,
    transaction_id: Option<String>,
    now: MilliSecondsSinceUnixEpoch,
) -> Result<Value, StoreError> {
    Ok(format_event_parts(engine, ev, transaction_id, now)
        .await?
        .value)
}

/// An event in client format, with what its bundled aggregations are made from.
pub struct Formatted {
    pub value: Value,
    /// The events that redact or relate to it, in stream order.
    pub related: Vec<std::sync::Arc<StoredEvent>>,
    pub redacted: bool,
    pub version: RoomVersionId,
}

/// [`format_event`], keeping the related events for [`aggregate`].
pub async fn format_event_parts(
    engine: &Engine,
    ev: &StoredEvent,
    transaction_id: Option<String>,
    now: MilliSecondsSinceUnixEpoch,
) -> Result<Formatted, StoreError> {
    let mut unsigned = Unsigned {
        transaction_id,
        ..Unsigned::default()
    };
    let version = engine
        .room(&ev.pdu.room_id)
        .await?
        .map(|r| r.room_version)
        .unwrap_or(RoomVersionId::V12);
    let related = engine.relations(&ev.pdu.event_id).await?;
    for rel in &related {
        if rel.pdu.redacts.as_ref() == Some(&ev.pdu.event_id)
            && redaction_applies(engine, ev, rel).await?
        {
            unsigned.redacted_because = Some(client_event(rel, &version, Unsigned::default(), now));
            break;
        }
    }
    let redacted = unsigned.redacted_because.is_some();
    if let Some((kind, key)) = ev.pdu.state_key_pair() {
        if let Some(before) = engine.state_before(&ev.pdu.event_id).await? {
            if let Some(prev_id) = before.get(&(kind.to_string(), key)) {
                if let Some(prev) = engine.event(prev_id).await? {
                    unsigned.prev_content = serde_json::from_str(prev.pdu.content.get()).ok();
                }
            }
        }
    }
    Ok(Formatted {
        value: client_event(ev, &version, unsigned, now),
        related,
        redacted,
        version,
    })
}

/// What `rel_type` an event's `m.relates_to` names, and the event it relates to.
pub fn relation_of(ev: &StoredEvent) -> Option<(String, String)> {
    let content: Value = serde_json::from_str(ev.pdu.content.get()).ok()?;
    let rel = content.get("m.relates_to")?;
    Some((
        rel.get("rel_type")?.as_str()?.to_owned(),
        rel.get("event_id")?.as_str()?.to_owned(),
    ))
}

/// Whether a redaction that applies has removed `ev`.
pub async fn is_redacted(engine: &Engine, ev: &StoredEvent) -> Result<bool, StoreError> {
    for rel in engine.relations(&ev.pdu.event_id).await? {
        if rel.pdu.redacts.as_ref() == Some(&ev.pdu.event_id)
            && redaction_applies(engine, ev, &rel).await?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Related events one event's aggregations look at, newest first, and references they list.
const MAX_AGGREGATED: usize = 1000;
const MAX_REFERENCES: usize = 50;
/// Edits and replies tried, newest first, for one that is not redacted.
const MAX_REDACTION_CHECKS: usize = 10;

/// Whether any of `related` is a thread reply, an edit or a reference of `ev` (most events
/// have none, and then no reader needs to be built).
pub fn has_aggregations(ev: &StoredEvent, related: &[std::sync::Arc<StoredEvent>]) -> bool {
    related.iter().any(|rel| {
        relation_of(rel).is_some_and(|(kind, target)| {
            target == ev.pdu.event_id.as_str()
                && matches!(kind.as_str(), "m.thread" | "m.replace" | "m.reference")
        })
    })
}

/// The bundled aggregations of `ev` from the events that relate to it (`related`, in stream
/// order) that `reader` may see: its thread (reply count, latest reply, whether the reader took
/// part), its latest edit by its own sender, and the events that reference it. A redacted edit,
/// reference or latest reply does not count; the reply count includes redacted replies
/// (checking each would cost a look-up per reply every time the root is served). At most the
/// newest [`MAX_AGGREGATED`] related events are looked at.
pub(super) async fn aggregate(
    engine: &Engine,
    ev: &StoredEvent,
    related: &[std::sync::Arc<StoredEvent>],
    version: &RoomVersionId,
    reader: &super::visibility::Reader<'_>,
    user: &UserId,
    now: MilliSecondsSinceUnixEpoch,
) -> Result<Option<Value>, StoreError> {
    let mut replies = Vec::new();
    let mut participated = ev.pdu.sender == user;
    let mut edits = Vec::new();
    let mut references = Vec::new();
    let newest = related.len().saturating_sub(MAX_AGGREGATED);
    for rel in &related[newest..] {
        if rel.pdu.redacts.is_some() || rel.pdu.room_id != ev.pdu.room_id {
            continue;
        }
        let Some((kind, target)) = relation_of(rel) else {
            continue;
        };
        if target != ev.pdu.event_id.as_str()
            || !matches!(kind.as_str(), "m.thread" | "m.replace" | "m.reference")
            || !reader.may_see(rel).await?
        {
            continue;
        }
        match kind.as_str() {
            "m.thread" => {
                participated |= rel.pdu.sender == user;
                replies.push(rel.as_ref());
            }
            // Only the sender may edit, and an edit keeps the event's type.
            "m.replace" if rel.pdu.sender == ev.pdu.sender && rel.pdu.kind == ev.pdu.kind => {
                edits.push(rel.as_ref());
            }
            "m.reference" => references.push(rel.as_ref()),
            _ => {}
        }
    }
    let mut out = serde_json::Map::new();
    let mut latest_reply = None;
    for reply in replies.iter().rev().take(MAX_REDACTION_CHECKS) {
        if !is_redacted(engine, reply).await? {
            latest_reply = Some(*reply);
            break;
        }
    }
    if let Some(latest) = latest_reply {
        out.insert(
            "m.thread".into(),
            json!({
                "latest_event": client_event(latest, version, Unsigned::default(), now),
                "count": replies.len(),
                "current_user_participated": participated,
            }),
        );
    }
    // The newest edit by origin_server_ts (then event id), as the spec orders them.
    edits.sort_by(|a, b| {
        (b.pdu.origin_server_ts, &b.pdu.event_id).cmp(&(a.pdu.origin_server_ts, &a.pdu.event_id))
    });
    for edit in edits.into_iter().take(MAX_REDACTION_CHECKS) {
        if !is_redacted(engine, edit).await? {
            out.insert(
                "m.replace".into(),
                client_event(edit, version, Unsigned::default(), now),
            );
            break;
        }
    }
    let mut chunk = Vec::new();
    for r in references.into_iter().rev().take(MAX_REFERENCES) {
        if !is_redacted(engine, r).await? {
            chunk.push(json!({"event_id": r.pdu.event_id}));
        }
    }
    if !chunk.is_empty() {
        out.insert("m.reference".into(), json!({ "chunk": chunk }));
    }
    Ok((!out.is_empty()).then_some(Value::Object(out)))
}

/// Stripped state (for invites): type, state_key, sender and content only.
pub fn stripped(ev: &StoredEvent) -> Value {
    json!({
        "type": ev.pdu.kind.to_string(),
        "state_key": ev.pdu.state_key.clone().unwrap_or_default(),
        "sender": ev.pdu.sender,
        "content": serde_json::from_str::<Value>(ev.pdu.content.get()).unwrap_or_else(|_| json!({})),
    })
}

/// `membership` of a member event's content.
pub fn membership_of(ev: &StoredEvent) -> Option<String> {
    serde_json::from_str::<Value>(ev.pdu.content.get())
        .ok()?
        .get("membership")?
        .as_str()
        .map(str::to_owned)
}
