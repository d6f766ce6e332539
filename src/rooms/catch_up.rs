//! Catch-up: pulling from a peer what places some events in our DAG. The bookkeeping is a plain
//! state machine ([`CatchUp`]): it says what to ask next, takes answers, and knows when to stop;
//! [`P2pNode::catch_up`] drives it over the network and the engine.

use std::collections::HashSet;

use libp2p::PeerId;
use ruma::{OwnedEventId, RoomId, RoomVersionId};

use super::visibility::ServerView;
use super::{NodeError, P2pNode, Shared};
use crate::engine::{verify_standalone, IngestError, Outcome, Received, Scope};
use crate::net::protocol::{FedRequest, FedResponse, MAX_IDS_PER_REQUEST, MAX_MISSING_EVENTS};

/// Most rounds of `GetMissingEvents` one catch-up makes, and most events it accepts.
pub const MAX_CATCH_UP_ROUNDS: usize = 64;
pub const MAX_CATCH_UP_EVENTS: usize = 100_000;
/// Most bytes of PDUs one catch-up holds while they wait for what they depend on; past this
/// the catch-up stops (anti-entropy tries again later). Only verified PDUs are held.
pub const MAX_HELD_BYTES: usize = 32 << 20;
/// Catch-ups that run at once (each holds at most [`MAX_HELD_BYTES`]); one per peer and room.
pub const MAX_CATCH_UPS: usize = 4;

/// How far catching up rooms from peers has got: for a progress indicator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatchUpProgress {
    /// Catch-ups running now.
    pub active: usize,
    /// Events they have fetched so far.
    pub fetched: usize,
}

/// The catch-ups running now, by peer and room.
#[derive(Default)]
pub(crate) struct Running(HashSet<(PeerId, ruma::OwnedRoomId)>);

/// A catch-up's place among the running ones: counted while it lives; the count of fetched
/// events restarts when no catch-up runs.
struct CatchUpGuard<'a> {
    shared: &'a Shared,
    key: (PeerId, ruma::OwnedRoomId),
}

impl<'a> CatchUpGuard<'a> {
    /// A place for a catch-up of `room_id` from `peer`, unless one runs already or all
    /// [`MAX_CATCH_UPS`] places are taken.
    fn start(shared: &'a Shared, peer: PeerId, room_id: &RoomId) -> Option<Self> {
        let key = (peer, room_id.to_owned());
        let mut running = shared.catch_ups.lock().expect("not poisoned");
        if running.0.len() >= MAX_CATCH_UPS || !running.0.insert(key.clone()) {
            return None;
        }
        let mut progress = shared.catch_up.lock().expect("not poisoned");
        if progress.active == 0 {
            progress.fetched = 0;
        }
        progress.active += 1;
        Some(CatchUpGuard { shared, key })
    }
}

impl Drop for CatchUpGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .catch_ups
            .lock()
            .expect("not poisoned")
            .0
            .remove(&self.key);
        self.shared.catch_up.lock().expect("not poisoned").active -= 1;
        self.shared.changes.send_modify(|c| *c += 1);
    }
}

/// A verified PDU fetched during catch-up that waits for its dependencies.
#[derive(Debug)]
pub struct Held {
    pub depth: u64,
    pub id: OwnedEventId,
    /// prev_events and auth_events: what it waits for.
    pub refs: Vec<OwnedEventId>,
    pub is_create: bool,
    pub pdu: Vec<u8>,
}

impl Held {
    /// Checks a PDU from a catch-up answer of `room_id` (format, signature, content hash: the
    /// checks that need no state) before it may be held.
    pub fn verify(raw: String, room_id: &RoomId, version: &RoomVersionId) -> Result<Self, String> {
        let pdu = verify_standalone(raw.as_bytes(), version).map_err(|e| e.to_string())?;
        if pdu.room_id != room_id {
            return Err(format!("{} is in another room", pdu.event_id));
        }
        Ok(Held {
            depth: pdu.depth,
            refs: pdu
                .prev_events
                .iter()
                .chain(&pdu.auth_events)
                .cloned()
                .collect(),
            is_create: pdu.kind == ruma::events::TimelineEventType::RoomCreate,
            id: pdu.event_id,
            pdu: raw.into_bytes(),
        })
    }
}

/// Why a catch-up stopped before placing everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    Rounds,
    Events,
    HeldBytes,
}

/// The state of one catch-up of one room from one peer.
#[derive(Debug)]
pub struct CatchUp {
    room_id: ruma::OwnedRoomId,
    /// What the catch-up is for: asked for again until placed (an answer cut to fit the codec
    /// may stop short of them).
    targets: Vec<OwnedEventId>,
    wanted: Vec<OwnedEventId>,
    held: Vec<Held>,
    held_bytes: usize,
    rounds: usize,
    total: usize,
    stopped: Option<Stopped>,
}

impl CatchUp {
    /// A catch-up that must place `latest`.
    pub fn new(room_id: &RoomId, latest: Vec<OwnedEventId>) -> Self {
        Self {
            room_id: room_id.to_owned(),
            targets: latest.clone(),
            wanted: latest,
            held: Vec::new(),
            held_bytes: 0,
            rounds: 0,
            total: 0,
            stopped: None,
        }
    }

    /// The next request, given our forward extremities (`earliest`), or `None` when there is
    /// nothing left to ask or a bound is reached.
    pub fn next_request(&mut self, earliest: Vec<OwnedEventId>) -> Option<FedRequest> {
        if self.wanted.is_empty() || self.stopped.is_some() {
            return None;
        }
        if self.rounds >= MAX_CATCH_UP_ROUNDS {
            self.stopped = Some(Stopped::Rounds);
            return None;
        }
        if self.total >= MAX_CATCH_UP_EVENTS {
            self.stopped = Some(Stopped::Events);
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

    /// Takes verified PDUs of an answer: keeps those not held yet, in depth order, within the
    /// held-bytes budget. Returns how many were new; 0 means the peer has nothing more.
    pub fn take_answer(&mut self, pdus: Vec<Held>) -> usize {
        let known: HashSet<OwnedEventId> = self.held.iter().map(|h| h.id.clone()).collect();
        let mut fresh = 0;
        for h in pdus {
            if known.contains(&h.id) {
                continue;
            }
            if self.held_bytes + h.pdu.len() > MAX_HELD_BYTES {
                tracing::warn!(room_id = %self.room_id, "catch-up holds {} bytes; stopped", self.held_bytes);
                self.stopped = Some(Stopped::HeldBytes);
                break;
            }
            self.held_bytes += h.pdu.len();
            self.held.push(h);
            fresh += 1;
        }
        self.held.sort_by_key(|h| h.depth);
        self.total += fresh;
        fresh
    }

    /// The PDUs to ingest now (depth order).
    pub fn take_held(&mut self) -> Vec<Held> {
        self.held_bytes = 0;
        std::mem::take(&mut self.held)
    }

    /// Whether a create event is held (a room being joined can be stored only from there).
    pub fn holds_create(&self) -> bool {
        self.held.iter().any(|h| h.is_create)
    }

    /// The targets and everything the held PDUs refer to that is not held: what to ask for
    /// while the room is not stored here yet.
    pub fn unheld_refs(&self) -> Vec<OwnedEventId> {
        let held: HashSet<&OwnedEventId> = self.held.iter().map(|h| &h.id).collect();
        let mut out: Vec<OwnedEventId> = self
            .held
            .iter()
            .flat_map(|h| &h.refs)
            .chain(&self.targets)
            .filter(|id| !held.contains(id))
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// After ingesting: what is still held, and what to ask for next.
    pub fn ingested(&mut self, still_held: Vec<Held>, missing: Vec<OwnedEventId>) {
        self.held_bytes = still_held.iter().map(|h| h.pdu.len()).sum();
        self.held = still_held;
        self.wanted = missing;
    }

    /// The ids to ask for next without ingesting (the room is not stored yet).
    pub fn want(&mut self, missing: Vec<OwnedEventId>) {
        self.wanted = missing;
    }

    /// The events the catch-up is for.
    pub fn targets(&self) -> &[OwnedEventId] {
        &self.targets
    }

    /// Events taken so far.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Why it stopped early, if it did.
    pub fn stopped(&self) -> Option<&Stopped> {
        self.stopped.as_ref()
    }
}

impl P2pNode {
    /// Pulls from `peer` everything needed to place `latest` in our DAG, for a room held here,
    /// or (with `joining`, the room's version) for one this node is joining. A catch-up of the
    /// same room from the same peer already running, or all places taken, makes this one a
    /// no-op (`Ok(0)`) unless it is for a join, which waits for a place.
    pub(super) async fn catch_up(
        &self,
        peer: PeerId,
        room_id: &RoomId,
        latest: Vec<OwnedEventId>,
        joining: Option<&RoomVersionId>,
    ) -> Result<usize, NodeError> {
        let engine = &self.shared.engine;
        let (version, scope) = match (engine.room(room_id).await?, joining) {
            (Some(room), _) => {
                // Our request names the room's extremities: ask only a server in the room.
                let in_room = match crate::identity::ServerName::from_peer_id(&peer) {
                    Some(server) => ServerView::new(engine, room_id, &server)
                        .await?
                        .is_some_and(|v| v.in_room()),
                    None => false,
                };
                if !in_room {
                    tracing::info!(%peer, %room_id, "no catch-up from a server not in the room");
                    return Ok(0);
                }
                (room.room_version, Scope::room(room_id))
            }
            (None, Some(v)) => (v.clone(), Scope::joining(room_id)),
            (None, None) => return Ok(0),
        };
        let _place = loop {
            match CatchUpGuard::start(&self.shared, peer, room_id) {
                Some(place) => break place,
                None if joining.is_some() => {
                    crate::net::rt::sleep(crate::net::rt::Duration::from_millis(50)).await
                }
                None => {
                    tracing::debug!(%peer, %room_id, "catch-up skipped: already running or at the limit");
                    return Ok(0);
                }
            }
        };
        let mut state = CatchUp::new(room_id, latest);
        loop {
            let room = engine.room(room_id).await?;
            let earliest = room
                .as_ref()
                .map(|r| r.forward_extremities.clone())
                .unwrap_or_default();
            let Some(request) = state.next_request(earliest) else {
                break;
            };
            let FedResponse::Events { pdus, .. } = self.request(peer, request).await? else {
                return Err(NodeError::Network(
                    "unexpected answer to get_missing_events".into(),
                ));
            };
            // Checked before held (on every core): a peer answering junk costs itself the
            // signature checks and makes this node hold nothing.
            let checked =
                crate::engine::parallel::map(pdus, |raw| Held::verify(raw, room_id, &version));
            let mut verified = Vec::with_capacity(checked.len());
            for h in checked {
                match h {
                    Ok(h) => verified.push(h),
                    Err(e) => {
                        tracing::warn!(%peer, %room_id, error = %e, "catch-up answer PDU refused")
                    }
                }
            }
            let fresh = state.take_answer(verified);
            if fresh == 0 {
                break;
            }
            self.shared.catch_up.lock().expect("not poisoned").fetched += fresh;
            self.changed();
            if room.is_none() && !state.holds_create() {
                // Nothing can be stored before the create event: ask on, ingest nothing.
                let unheld = state.unheld_refs();
                state.want(unheld);
                continue;
            }
            let (still_held, mut missing) = self.ingest_held(&scope, state.take_held()).await?;
            for target in state.targets() {
                let placed = engine.event(target).await?.is_some();
                if !placed && !still_held.iter().any(|h| h.id == *target) {
                    missing.push(target.clone());
                }
            }
            missing.sort();
            missing.dedup();
            state.ingested(still_held, missing);
        }
        if let Some(why) = state.stopped() {
            tracing::warn!(%peer, %room_id, ?why, "catch-up stopped at its bound");
        }
        self.changed();
        Ok(state.total())
    }

    /// Ingests `held` (depth order) in one batch, in passes while that makes progress. Returns
    /// the PDUs that still lack something, and the ids to ask for next (what the engine
    /// reported missing, minus what is already held).
    async fn ingest_held(
        &self,
        scope: &Scope,
        mut held: Vec<Held>,
    ) -> Result<(Vec<Held>, Vec<OwnedEventId>), NodeError> {
        // A PDU that refers to something neither stored nor held cannot be placed this round:
        // it is kept back from the engine (whose lock every sync and send waits on), and what
        // it lacks is asked for.
        let mut missing = Vec::new();
        let mut waiting = Vec::new();
        {
            let held_ids: HashSet<OwnedEventId> = held.iter().map(|h| h.id.clone()).collect();
            let refs: Vec<&OwnedEventId> = held
                .iter()
                .flat_map(|h| &h.refs)
                .filter(|r| !held_ids.contains(*r))
                .collect();
            let stored: HashSet<OwnedEventId> = self
                .shared
                .engine
                .events(&refs)
                .await?
                .into_iter()
                .map(|ev| ev.pdu.event_id.clone())
                .collect();
            let (ready, not_ready): (Vec<Held>, Vec<Held>) = held.into_iter().partition(|h| {
                h.refs
                    .iter()
                    .all(|r| held_ids.contains(r) || stored.contains(r))
            });
            for h in &not_ready {
                missing.extend(
                    h.refs
                        .iter()
                        .filter(|r| !held_ids.contains(*r) && !stored.contains(*r))
                        .cloned(),
                );
            }
            waiting.extend(not_ready);
            held = ready;
        }
        loop {
            if held.is_empty() {
                missing.sort();
                missing.dedup();
                return Ok((waiting, missing));
            }
            let refs: Vec<&[u8]> = held.iter().map(|h| h.pdu.as_slice()).collect();
            let results = self.shared.engine.receive_batch_in(scope, &refs).await?;
            let before = held.len();
            let mut still = Vec::new();
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
                        missing.extend(h.refs.iter().cloned());
                        still.push(h);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "catch-up event refused"),
                }
            }
            held = still;
            // Another pass helps only if this one stored something the rest may depend on.
            if held.is_empty() || held.len() == before {
                held.append(&mut waiting);
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

    fn held(n: u32, depth: u64, bytes: usize) -> Held {
        Held {
            depth,
            id: id(n),
            refs: vec![id(n + 1000)],
            is_create: false,
            pdu: vec![b'x'; bytes],
        }
    }

    #[test]
    fn asks_until_nothing_is_wanted_and_keeps_depth_order() {
        let mut c = CatchUp::new(&room(), vec![id(3)]);
        let Some(FedRequest::GetMissingEvents { latest, .. }) = c.next_request(vec![]) else {
            panic!("first request")
        };
        assert_eq!(latest, vec![id(3)]);
        let fresh = c.take_answer(vec![held(3, 3, 10), held(1, 1, 10)]);
        assert_eq!(fresh, 2);
        assert_eq!(c.unheld_refs(), vec![id(1001), id(1003)]);
        assert_eq!(c.targets(), &[id(3)]);
        let held = c.take_held();
        assert_eq!(held.iter().map(|h| h.depth).collect::<Vec<_>>(), vec![1, 3]);
        c.ingested(Vec::new(), Vec::new());
        assert!(c.next_request(vec![]).is_none(), "nothing left to want");
        assert_eq!(c.total(), 2);
    }

    #[test]
    fn repeats_are_not_new() {
        let mut c = CatchUp::new(&room(), vec![id(2)]);
        c.next_request(vec![]);
        assert_eq!(c.take_answer(vec![held(2, 2, 10)]), 1);
        assert_eq!(c.take_answer(vec![held(2, 2, 10)]), 0);
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
        assert_eq!(c.stopped(), Some(&Stopped::Rounds));
    }

    #[test]
    fn holds_no_more_than_its_byte_budget() {
        let mut c = CatchUp::new(&room(), vec![id(1)]);
        let mut n = 0;
        while c.next_request(vec![]).is_some() {
            // A peer answering ever more PDUs that never connect to anything.
            let answer: Vec<Held> = (0..100).map(|i| held(n * 100 + i, 5, 64 << 10)).collect();
            n += 1;
            if c.take_answer(answer) == 0 {
                break;
            }
            let missing = c.unheld_refs();
            c.want(missing);
        }
        assert_eq!(c.stopped(), Some(&Stopped::HeldBytes));
        assert!(c.held.iter().map(|h| h.pdu.len()).sum::<usize>() <= MAX_HELD_BYTES);
    }
}
