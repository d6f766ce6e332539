//! Threads and relations: `/relations` (paginated, optionally recursive) and `/threads` (the
//! room's threads, most recently active first). Bundled aggregations (`unsigned.m.relations`)
//! are worked out where events are formatted (`events::format_event`).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::relation_of;
use super::rooms::{event_id, room_id};
use super::sync::parse_position;
use super::{ok, url_query, ApiRequest, ApiResponse, ClientApi};
use crate::engine::pdu::StoredEvent;
use crate::store::Direction;

/// How deep `recurse` follows relations of relations (the spec's minimum is 3).
const MAX_RECURSION_DEPTH: usize = 3;
/// Timeline events one `/threads` request looks through for thread replies: past that it
/// answers what it found, with a token to go on from.
const MAX_THREAD_SCAN: usize = 5000;
/// Related events one `/relations` request gathers before it filters and pages.
const MAX_RELATIONS_GATHERED: usize = 10_000;

fn limit_param(q: &std::collections::HashMap<String, String>, default: usize) -> ApiResult<usize> {
    Ok(q.get("limit")
        .map(|l| l.parse::<usize>())
        .transpose()
        .map_err(|_| ApiError::invalid_param("limit must be a number"))?
        .unwrap_or(default)
        .clamp(1, 1000))
}

/// A `/relations` token: the stream position of the last event handed out.
fn relation_position(token: &str) -> ApiResult<u64> {
    token
        .strip_prefix('r')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ApiError::invalid_param(format!("`{token}` is not a relations token")))
}

impl ClientApi {
    /// `GET /rooms/{room}/relations/{event}[/{relType}[/{eventType}]]`.
    pub(super) async fn relations(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        event: &str,
        rest: &[&str],
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let event = event_id(event)?;
        let reader = self.room_reader(&room, &s.user_id).await?;
        self.visible_event(&reader, &room, &event).await?;
        let q = url_query(req.uri().query().unwrap_or(""));
        let limit = limit_param(&q, 50)?;
        let forward = match q.get("dir").map(String::as_str) {
            None | Some("b") => false,
            Some("f") => true,
            Some(other) => {
                return Err(ApiError::invalid_param(format!(
                    "dir must be b or f, not {other}"
                )))
            }
        };
        let from = q.get("from").map(|t| relation_position(t)).transpose()?;
        let to = q.get("to").map(|t| relation_position(t)).transpose()?;
        let recurse = matches!(q.get("recurse").map(String::as_str), Some("true" | "1"));
        let rel_type = rest.first().copied();
        let event_type = rest.get(1).copied();

        // The events relating to it (and, recursing, to those), in stream order.
        let engine = self.node.engine();
        let mut gathered: Vec<Arc<StoredEvent>> = Vec::new();
        let mut seen = HashSet::new();
        let mut targets = vec![event.clone()];
        let depth = if recurse { MAX_RECURSION_DEPTH } else { 1 };
        for _ in 0..depth {
            let mut next_targets = Vec::new();
            for target in &targets {
                for ev in engine.relations(target).await? {
                    if gathered.len() >= MAX_RELATIONS_GATHERED {
                        return Err(ApiError::new(
                            http::StatusCode::BAD_REQUEST,
                            "M_LIMIT_EXCEEDED",
                            "too many related events to list at once",
                        ));
                    }
                    if ev.pdu.redacts.is_some()
                        || ev.pdu.room_id != room
                        || !seen.insert(ev.pdu.event_id.clone())
                    {
                        continue;
                    }
                    next_targets.push(ev.pdu.event_id.clone());
                    gathered.push(ev);
                }
            }
            targets = next_targets;
        }
        gathered.sort_by_key(|e| e.stream);
        if !forward {
            gathered.reverse();
        }
        let mut chunk = Vec::new();
        let mut next_batch = None;
        for ev in gathered {
            let pos = ev.stream.unwrap_or(0);
            let past_from = from.is_none_or(|f| if forward { pos > f } else { pos < f });
            let before_to = to.is_none_or(|t| if forward { pos <= t } else { pos >= t });
            if !past_from {
                continue;
            }
            if !before_to {
                break;
            }
            let matches = relation_of(&ev).is_some_and(|(kind, _)| {
                rel_type.is_none_or(|t| t == kind)
                    && event_type.is_none_or(|t| ev.pdu.kind.to_string() == t)
            });
            if !matches || !reader.may_see(&ev).await? {
                continue;
            }
            if chunk.len() == limit {
                next_batch = chunk.last().map(|e: &(u64, Value)| format!("r{}", e.0));
                break;
            }
            chunk.push((pos, self.client_format(s, &ev).await?));
        }
        let mut body = json!({
            "chunk": chunk.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        });
        if let Some(t) = next_batch {
            body["next_batch"] = t.into();
        }
        if recurse {
            body["recursion_depth"] = MAX_RECURSION_DEPTH.into();
        }
        ok(body)
    }

    /// `GET /rooms/{room}/threads`: thread roots, the most recently replied to first;
    /// `include=participated` keeps those the user started or replied in.
    pub(super) async fn threads(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        let room = room_id(room)?;
        let reader = self.room_reader(&room, &s.user_id).await?;
        let q = url_query(req.uri().query().unwrap_or(""));
        let limit = limit_param(&q, 20)?;
        let participated_only = match q.get("include").map(String::as_str) {
            None | Some("all") => false,
            Some("participated") => true,
            Some(other) => {
                return Err(ApiError::invalid_param(format!(
                    "include must be all or participated, not {other}"
                )))
            }
        };
        let from = q.get("from").map(|t| parse_position(t)).transpose()?;
        let engine = self.node.engine();
        let mut cursor = Some(reader.bound(from.unwrap_or(engine.stream_position().await)));
        let mut roots = HashSet::new();
        let mut chunk = Vec::new();
        let mut scanned = 0;
        let mut more = false;
        'scan: loop {
            let page = engine
                .timeline(&room, cursor, Direction::Backward, 100)
                .await?;
            let exhausted = page.len() < 100;
            for ev in page {
                if scanned == MAX_THREAD_SCAN || chunk.len() == limit {
                    more = true;
                    break 'scan;
                }
                scanned += 1;
                cursor = ev.stream;
                let Some((kind, root_id)) = relation_of(&ev) else {
                    continue;
                };
                if kind != "m.thread" || roots.contains(&root_id) {
                    continue;
                }
                let Ok(root_id) = event_id(&root_id) else {
                    continue;
                };
                if !reader.may_see(&ev).await? {
                    continue;
                }
                roots.insert(root_id.to_string());
                let Some(root) = engine.event(&root_id).await? else {
                    continue;
                };
                if root.pdu.room_id != room || !reader.may_see(&root).await? {
                    continue;
                }
                let formatted = self.client_format(s, &root).await?;
                let thread = &formatted["unsigned"]["m.relations"]["m.thread"];
                // A thread is listed where its latest reply is: a page further back leaves out
                // what an earlier page had.
                if thread["latest_event"]["event_id"] != ev.pdu.event_id.as_str() {
                    continue;
                }
                let took_part = thread["current_user_participated"] == true;
                if participated_only && !took_part {
                    continue;
                }
                chunk.push(formatted);
            }
            if exhausted {
                break;
            }
        }
        let mut body = json!({ "chunk": chunk });
        if more {
            if let Some(c) = cursor {
                body["next_batch"] = format!("t{c}").into();
            }
        }
        ok(body)
    }
}
