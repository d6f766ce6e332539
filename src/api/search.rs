//! `POST /search`: full-text search of the room events in the user's joined rooms, newest
//! first, with the same visibility rules as `/messages`. Every word of the search term must
//! begin a word of the event's text (`content.body`, `content.name`, `content.topic`, or the
//! request's `keys`). Encrypted events are not searchable: the server cannot read them.
//!
//! Rooms are walked backwards from the newest event in stream order (merged across rooms), a
//! bounded number of events per request; `next_batch` goes on from where a request stopped.

use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use ruma::OwnedRoomId;
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::sync::EventFilter;
use super::visibility::Reader;
use super::{body_object, ok, url_query, ApiRequest, ApiResponse, ClientApi};
use crate::engine::pdu::StoredEvent;
use crate::store::Direction;

/// Longest search term, and most words in it.
const MAX_TERM_BYTES: usize = 512;
const MAX_TERM_WORDS: usize = 16;
/// Events one request looks at before it answers what it found (and where to go on).
const MAX_SCAN: usize = 20_000;
/// Results per request when the filter names no limit, and at most.
const DEFAULT_RESULTS: usize = 10;
const MAX_RESULTS: usize = 100;
/// Events of context either side of a result, at most.
const MAX_CONTEXT: usize = 20;
/// Events read per room at a time.
const PAGE: usize = 64;

/// The words of `text`, lower-cased.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// What a search looks for.
struct Query {
    terms: Vec<String>,
    keys: Vec<String>,
    filter: EventFilter,
    rooms: Option<HashSet<String>>,
    not_rooms: HashSet<String>,
}

impl Query {
    /// How many times the terms occur in `ev`'s searched fields, if every term occurs.
    fn rank(&self, ev: &StoredEvent) -> Option<usize> {
        let content: Value = serde_json::from_str(ev.pdu.content.get()).ok()?;
        let kind = ev.pdu.kind.to_string();
        let mut found = vec![0usize; self.terms.len()];
        for key in &self.keys {
            let text = match key.as_str() {
                "content.body" if kind == "m.room.message" => content["body"].as_str(),
                "content.name" if kind == "m.room.name" => content["name"].as_str(),
                "content.topic" if kind == "m.room.topic" => content["topic"].as_str(),
                _ => None,
            };
            for word in words(text.unwrap_or("")) {
                for (i, term) in self.terms.iter().enumerate() {
                    if word.starts_with(term.as_str()) {
                        found[i] += 1;
                    }
                }
            }
        }
        found.iter().all(|n| *n > 0).then(|| found.iter().sum())
    }
}

/// One room's place in the merged walk: its newest unread page, newest last.
struct RoomCursor<'e> {
    room: OwnedRoomId,
    reader: Reader<'e>,
    page: Vec<Arc<StoredEvent>>,
    next: Option<u64>,
    done: bool,
}

impl ClientApi {
    pub(super) async fn search(&self, req: &ApiRequest, s: &Session) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let criteria = body
            .get("search_categories")
            .and_then(|c| c.get("room_events"))
            .and_then(Value::as_object)
            .ok_or_else(|| ApiError::bad_json("search_categories.room_events is required"))?;
        let term = criteria
            .get("search_term")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_json("search_term is required"))?;
        if term.len() > MAX_TERM_BYTES {
            return Err(ApiError::invalid_param(format!(
                "search terms are at most {MAX_TERM_BYTES} bytes"
            )));
        }
        let terms: Vec<String> = words(term).collect();
        if terms.is_empty() {
            return Err(ApiError::bad_json("the search term has no words"));
        }
        if terms.len() > MAX_TERM_WORDS {
            return Err(ApiError::invalid_param(format!(
                "search terms have at most {MAX_TERM_WORDS} words"
            )));
        }
        let keys = match criteria.get("keys") {
            None => vec![
                "content.body".into(),
                "content.name".into(),
                "content.topic".into(),
            ],
            Some(Value::Array(keys)) => {
                let keys: Vec<String> = keys
                    .iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect();
                if keys.is_empty()
                    || keys.iter().any(|k| {
                        !matches!(
                            k.as_str(),
                            "content.body" | "content.name" | "content.topic"
                        )
                    })
                {
                    return Err(ApiError::bad_json(
                        "keys are content.body, content.name and content.topic",
                    ));
                }
                keys
            }
            Some(_) => return Err(ApiError::bad_json("keys is a list")),
        };
        let filter_json = criteria.get("filter").cloned().unwrap_or(json!({}));
        if !filter_json.is_object() {
            return Err(ApiError::bad_json("filter is an object"));
        }
        let room_list = |field: &str| {
            filter_json[field].as_array().map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect::<HashSet<_>>()
            })
        };
        let query = Query {
            terms,
            keys,
            filter: EventFilter::from_value(&filter_json),
            rooms: room_list("rooms"),
            not_rooms: room_list("not_rooms").unwrap_or_default(),
        };
        let limit = query
            .filter
            .limit
            .unwrap_or(DEFAULT_RESULTS)
            .clamp(1, MAX_RESULTS);
        let context = criteria.get("event_context");
        let (before, after) = match context {
            Some(c) => (
                c["before_limit"]
                    .as_u64()
                    .unwrap_or(5)
                    .min(MAX_CONTEXT as u64) as usize,
                c["after_limit"]
                    .as_u64()
                    .unwrap_or(5)
                    .min(MAX_CONTEXT as u64) as usize,
            ),
            None => (0, 0),
        };
        let q = url_query(req.uri().query().unwrap_or(""));
        let from = q
            .get("next_batch")
            .map(|t| {
                t.strip_prefix('x')
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| ApiError::invalid_param("not a search token of this server"))
            })
            .transpose()?;

        // The walk: every joined room the filter allows, newest events first across rooms.
        let engine = self.node.engine();
        let top = from.unwrap_or(engine.stream_position().await);
        let mut cursors = Vec::new();
        for room in self.joined_room_ids(&s.user_id).await? {
            if query
                .rooms
                .as_ref()
                .is_some_and(|r| !r.contains(room.as_str()))
                || query.not_rooms.contains(room.as_str())
            {
                continue;
            }
            let reader = self.room_reader(&room, &s.user_id).await?;
            cursors.push(RoomCursor {
                room,
                reader,
                page: Vec::new(),
                next: Some(top),
                done: false,
            });
        }
        let mut heap = BinaryHeap::new();
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some(pos) = self.refill(c).await? {
                heap.push((pos, i));
            }
        }
        let mut results = Vec::new();
        let mut scanned = 0;
        let mut stopped_at = None;
        while let Some((pos, i)) = heap.pop() {
            if results.len() == limit || scanned == MAX_SCAN {
                stopped_at = Some(pos + 1);
                break;
            }
            scanned += 1;
            let c = &mut cursors[i];
            let ev = c.page.pop().expect("a queued room has an event");
            if let Some(pos) = self.refill(c).await? {
                heap.push((pos, i));
            }
            if !query.filter.matches(&ev) {
                continue;
            }
            let Some(rank) = query.rank(&ev) else {
                continue;
            };
            // A redacted event's text is gone: it must not be found by it.
            if !c.reader.may_see(&ev).await?
                || super::events::is_redacted(self.node.engine(), &ev).await?
            {
                continue;
            }
            let mut result = json!({"rank": rank, "result": self.client_format(s, &ev).await?});
            if context.is_some() {
                result["context"] = self
                    .search_context(s, &c.reader, &c.room, pos, before, after)
                    .await?;
            }
            results.push(result);
        }
        let mut room_events = json!({
            "results": results,
            "count": results.len(),
            "highlights": query.terms,
        });
        if let Some(next) = stopped_at {
            room_events["next_batch"] = format!("x{next}").into();
        }
        ok(json!({"search_categories": {"room_events": room_events}}))
    }

    /// Makes sure `c` holds its next event (reading a page when it ran out), and returns that
    /// event's position, or `None` once the room is done.
    async fn refill(&self, c: &mut RoomCursor<'_>) -> ApiResult<Option<u64>> {
        if c.page.is_empty() && !c.done {
            let mut page = self
                .node
                .engine()
                .timeline(&c.room, c.next, Direction::Backward, PAGE)
                .await?;
            c.done = page.len() < PAGE;
            c.next = page.last().and_then(|e| e.stream);
            // Oldest first, so `pop` hands out the newest.
            page.reverse();
            c.page = page;
        }
        Ok(c.page.last().and_then(|e| e.stream))
    }

    /// Visible events either side of a result.
    async fn search_context(
        &self,
        s: &Session,
        reader: &Reader<'_>,
        room: &OwnedRoomId,
        pos: u64,
        before: usize,
        after: usize,
    ) -> ApiResult<Value> {
        let engine = self.node.engine();
        let side = |dir: Direction, want: usize| async move {
            let mut out = Vec::new();
            if want == 0 {
                return Ok::<_, ApiError>(out);
            }
            for ev in engine.timeline(room, Some(pos), dir, want * 2).await? {
                if out.len() == want {
                    break;
                }
                if reader.may_see(&ev).await? {
                    out.push(self.client_format(s, &ev).await?);
                }
            }
            Ok(out)
        };
        let events_before = side(Direction::Backward, before).await?;
        let events_after = side(Direction::Forward, after).await?;
        Ok(json!({
            "events_before": events_before,
            "events_after": events_after,
            "start": format!("t{pos}"),
            "end": format!("t{}", pos + 1),
            "profile_info": {},
        }))
    }
}
