//! Catch-up: pulling from a peer what places some events in our DAG. The bookkeeping is a plain
//! state machine ([`CatchUp`]): it says what to ask next, takes answers, and knows when to stop;
//! [`P2pNode::catch_up`] drives it over the network and the engine.

use std::collections::HashSet;

use libp2p::PeerId;
use ruma::{OwnedEventId, RoomId};

use super::{NodeError, P2pNode, Shared};
use crate::engine::{IngestError, Outcome, Received};
use crate::net::protocol::{FedRequest, FedResponse, MAX_IDS_PER_REQUEST, MAX_MISSING_EVENTS};

/// Most rounds of `GetMissingEvents` one catch-up makes, and most events it accepts.
pub const MAX_CATCH_UP_ROUNDS: usize = 64;
pub const MAX_CATCH_UP_EVENTS: usize = 100_000;

/// How far catching up rooms from peers has got: for a progress indicator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatchUpProgress {
    /// Catch-ups running now.
    pub active: usize,
    /// Events they have fetched so far.
    pub fetched: usize,
}

/// Counts a catch-up as running while it lives; the count of fetched events restarts when no
/// catch-up runs.
struct CatchUpGuard<'a>(&'a Shared);

impl<'a> CatchUpGuard<'a> {
    fn start(shared: &'a Shared) -> Self {
        let mut progress = shared.catch_up.lock().expect("not poisoned");
        if progress.active == 0 {
            progress.fetched = 0;
        }
        progress.active += 1;
        CatchUpGuard(shared)
    }
}

impl Drop for CatchUpGuard<'_> {
    fn drop(&mut self) {
        self.0.catch_up.lock().expect("not poisoned").active -= 1;
        self.0.changes.send_modify(|c| *c += 1);
    }
}

/// A PDU fetched during catch-up that waits for its dependencies.
#[derive(Debug)]
pub struct Held {
    pub depth: u64,
    /// The id the sending peer gave (used only to decide what to ask for next).
    pub id: OwnedEventId,
    pub pdu: Vec<u8>,
}

/// The state of one catch-up of one room from one peer.
#[derive(Debug)]
pub struct CatchUp {
    room_id: ruma::OwnedRoomId,
    wanted: Vec<OwnedEventId>,
    held: Vec<Held>,
    rounds: usize,
    total: usize,
}

impl CatchUp {
    /// A catch-up that must place `latest`.
    pub fn new(room_id: &RoomId, latest: Vec<OwnedEventId>) -> Self {
        Self {
            room_id: room_id.to_owned(),
            wanted: latest,
            held: Vec::new(),
            rounds: 0,
            total: 0,
        }
    }

    /// The next request, given our forward extremities (`earliest`), or `None` when there is
    /// nothing left to ask or the bounds are reached.
    pub fn next_request(&mut self, earliest: Vec<OwnedEventId>) -> Option<FedRequest> {
        if self.wanted.is_empty()
            || self.rounds >= MAX_CATCH_UP_ROUNDS
            || self.total >= MAX_CATCH_UP_EVENTS
        {
            return None;
        }
        self.rounds += 1;
        let latest = self
            .wanted
            .iter()
            .take(MAX_IDS_PER_REQUEST)
            .cloned()
            .collect();
        Some(FedRequest::GetMissingEvents {
            room_id: self.room_id.clone(),
            earliest,
            latest,
            limit: MAX_MISSING_EVENTS,
        })
    }

    /// Takes an answer: keeps the PDUs not held yet (and claiming this room, when they name
    /// one), in depth order. Returns how many were new; 0 means the peer has nothing more.
    pub fn take_answer(&mut self, pdus: Vec<String>, event_ids: Vec<OwnedEventId>) -> usize {
        let known: HashSet<OwnedEventId> = self.held.iter().map(|h| h.id.clone()).collect();
        let mut fresh = 0;
        for (pdu, id) in pdus.into_iter().zip(event_ids) {
            if known.contains(&id) {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&pdu).unwrap_or_default();
            if v["room_id"]
                .as_str()
                .is_some_and(|r| r != self.room_id.as_str())
            {
                tracing::warn!(room_id = %self.room_id, %id, "catch-up answer names another room; dropped");
                continue;
            }
            let depth = v["depth"].as_u64().unwrap_or(u64::MAX);
            self.held.push(Held {
                depth,
                id,
                pdu: pdu.into_bytes(),
            });
            fresh += 1;
        }
        self.held.sort_by_key(|h| h.depth);
        self.total += fresh;
        fresh
    }

    /// The PDUs to ingest now (depth order).
    pub fn take_held(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.held)
    }

    /// After ingesting: what is still held, and what to ask for next.
    pub fn ingested(&mut self, still_held: Vec<Held>, missing: Vec<OwnedEventId>) {
        self.held = still_held;
        self.wanted = missing;
    }

    /// Events taken so far.
    pub fn total(&self) -> usize {
        self.total
    }
}

impl P2pNode {
    /// Pulls from `peer` everything needed to place `latest` in our DAG.
    pub(super) async fn catch_up(
        &self,
        peer: PeerId,
        room_id: &RoomId,
        latest: Vec<OwnedEventId>,
    ) -> Result<usize, NodeError> {
        let engine = &self.shared.engine;
        let mut state = CatchUp::new(room_id, latest);
        let _progress = CatchUpGuard::start(&self.shared);
        loop {
            let earliest = engine
                .room(room_id)
                .await?
                .map(|r| r.forward_extremities)
                .unwrap_or_default();
            let Some(request) = state.next_request(earliest) else {
                break;
            };
            let FedResponse::Events { pdus, event_ids } = self.request(peer, request).await? else {
                return Err(NodeError::Network(
                    "unexpected answer to get_missing_events".into(),
                ));
            };
            let fresh = state.take_answer(pdus, event_ids);
            if fresh == 0 {
                break;
            }
            self.shared.catch_up.lock().expect("not poisoned").fetched += fresh;
            self.changed();
            let (still_held, missing) = self.ingest_held(state.take_held()).await?;
            state.ingested(still_held, missing);
        }
        self.changed();
        Ok(state.total())
    }

    /// Ingests `held` (depth order) in one batch, in passes while that makes progress. Returns
    /// the PDUs that still lack something, and the ids to ask for next: what the engine reported
    /// missing, or — while the room itself is unknown here — the prev_events of the held PDUs;
    /// minus what is already held.
    async fn ingest_held(
        &self,
        mut held: Vec<Held>,
    ) -> Result<(Vec<Held>, Vec<OwnedEventId>), NodeError> {
        loop {
            let refs: Vec<&[u8]> = held.iter().map(|h| h.pdu.as_slice()).collect();
            let results = self.shared.engine.receive_batch(&refs).await?;
            let before = held.len();
            let mut still = Vec::new();
            let mut missing = Vec::new();
            for (h, result) in held.into_iter().zip(results) {
                match result {
                    Ok(Received {
                        outcome: Outcome::MissingEvents(ids),
                        ..
                    }) => {
                        missing.extend(ids);
                        still.push(h);
                    }
                    Err(IngestError::UnknownRoom(_)) => {
                        let v: serde_json::Value =
                            serde_json::from_slice(&h.pdu).unwrap_or_default();
                        let prevs = v["prev_events"].as_array().cloned().unwrap_or_default();
                        missing.extend(
                            prevs
                                .iter()
                                .filter_map(|p| p.as_str())
                                .filter_map(|p| OwnedEventId::try_from(p).ok()),
                        );
                        still.push(h);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "catch-up event refused"),
                }
            }
            held = still;
            // Another pass helps only if this one stored something the rest may depend on.
            if held.is_empty() || held.len() == before {
                let held_ids: HashSet<&OwnedEventId> = held.iter().map(|h| &h.id).collect();
                missing.retain(|id| !held_ids.contains(id));
                missing.sort();
                missing.dedup();
                return Ok((held, missing));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> OwnedEventId {
        OwnedEventId::try_from(format!("$e{n}")).unwrap()
    }

    fn room() -> ruma::OwnedRoomId {
        ruma::OwnedRoomId::try_from("!r:example.org").unwrap()
    }

    fn pdu(room: &str, depth: u64) -> String {
        serde_json::json!({"room_id": room, "depth": depth}).to_string()
    }

    #[test]
    fn asks_until_nothing_is_wanted_and_keeps_depth_order() {
        let mut c = CatchUp::new(&room(), vec![id(3)]);
        let Some(FedRequest::GetMissingEvents { latest, .. }) = c.next_request(vec![]) else {
            panic!("first request")
        };
        assert_eq!(latest, vec![id(3)]);
        let fresh = c.take_answer(
            vec![pdu("!r:example.org", 3), pdu("!r:example.org", 1)],
            vec![id(3), id(1)],
        );
        assert_eq!(fresh, 2);
        let held = c.take_held();
        assert_eq!(held.iter().map(|h| h.depth).collect::<Vec<_>>(), vec![1, 3]);
        c.ingested(Vec::new(), Vec::new());
        assert!(c.next_request(vec![]).is_none(), "nothing left to want");
        assert_eq!(c.total(), 2);
    }

    #[test]
    fn drops_pdus_of_other_rooms_and_repeats() {
        let mut c = CatchUp::new(&room(), vec![id(2)]);
        c.next_request(vec![]);
        assert_eq!(
            c.take_answer(vec![pdu("!other:example.org", 1)], vec![id(1)]),
            0
        );
        assert_eq!(
            c.take_answer(vec![pdu("!r:example.org", 2)], vec![id(2)]),
            1
        );
        // Held and answered again: not new.
        assert_eq!(
            c.take_answer(vec![pdu("!r:example.org", 2)], vec![id(2)]),
            0
        );
    }

    #[test]
    fn stops_after_the_round_bound() {
        let mut c = CatchUp::new(&room(), vec![id(1)]);
        let mut rounds = 0;
        while c.next_request(vec![]).is_some() {
            rounds += 1;
            // A peer that always claims something is still missing.
            c.ingested(Vec::new(), vec![id(rounds as u32 + 1)]);
        }
        assert_eq!(rounds, MAX_CATCH_UP_ROUNDS);
    }
}
