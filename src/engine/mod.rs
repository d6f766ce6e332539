//! The room engine: accepts events (local or received), runs the spec's checks on receipt of a
//! PDU in order, and keeps the DAG, state before/after every event, forward extremities, current
//! state (resolved across forks) and a stream-ordered timeline per room.
//!
//! The engine reads no clock and no socket: callers pass `now`, peers' bytes, and a [`Store`].
//! Everything it loads is cached in memory; every change of one call (one event, a batch, or a
//! whole room creation) becomes one [`WriteBatch`], and the call returns only after that batch is
//! durable. If the write fails the caches are dropped and reloaded, so memory never runs ahead of
//! disk.

mod cache;
pub mod parallel;
pub use cache::{EVENT_CACHE_BYTES, MAX_CACHED_GROUPS, MAX_CACHED_RESOLUTIONS};
pub mod create_room;
pub mod pdu;
pub mod resolve;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::lock::Mutex;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::Verified;
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId,
};
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, ServerName};
use crate::store::{
    schema, Direction, KeyRange, SharedStore, Store, StoreError, Table, WriteBatch,
};
use create_room::{initial_events, CreateRoom, DEFAULT_ROOM_VERSION};
use pdu::{
    build_signed, event_id_of, rules_for, EventStatus, NewEvent, Pdu, StoredEvent, MAX_PDU_BYTES,
};
use state::{apply_record, record_for, StateGroup, StateGroupRecord, StateMap, EMPTY_GROUP};

/// Most prev_events a local event lists (the spec recommends a small bound).
const MAX_PREV_EVENTS: usize = 10;
/// Most forward extremities a room keeps: every accepted event resolves the state across all
/// of them, so a peer that forks a room a thousand ways must not make each event cost a
/// thousand-way resolution. Past this the oldest are dropped (a later event naming them as
/// prev_events brings their branch back). An honest room has a handful.
pub const MAX_FORWARD_EXTREMITIES: usize = 64;

/// Why a PDU was refused outright. Nothing about it is stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("event is {0} bytes, over the 65536-byte limit")]
    TooLarge(usize),
    #[error("event is not JSON: {0}")]
    NotJson(String),
    #[error("event is not valid canonical JSON: {0}")]
    BadJson(String),
    #[error("event has an invalid format: {0}")]
    BadFormat(String),
    #[error("room version {0} is not supported")]
    UnsupportedRoomVersion(String),
    #[error("event is for unknown room {0}")]
    UnknownRoom(String),
    #[error("event signature does not verify: {0}")]
    BadSignature(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

/// What became of a PDU that passed the format and signature checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted into the DAG, state and timeline at `stream`.
    Accepted { stream: u64 },
    /// Valid at its place in the DAG but not against current state: stored, not shown.
    SoftFailed { reason: String },
    /// Failed authorisation: stored as rejected, never in state or timeline.
    Rejected { reason: String },
    /// Already known; nothing changed.
    Duplicate,
    /// Some prev_events or auth_events are unknown; fetch these and deliver the event again.
    /// Nothing was stored.
    MissingEvents(Vec<OwnedEventId>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub outcome: Outcome,
}

/// A room as stored: its version, DAG frontier and current state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomRecord {
    pub room_id: OwnedRoomId,
    pub room_version: RoomVersionId,
    pub create_event: OwnedEventId,
    pub forward_extremities: Vec<OwnedEventId>,
    pub current_state: u64,
}

/// A local event to build and sign (see [`Engine::send_many`]).
pub struct LocalEvent {
    pub room_id: OwnedRoomId,
    pub sender: ruma::OwnedUserId,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: serde_json::Value,
    /// Writes that must become durable together with the event (say, the client's
    /// transaction id), given the event's id once it is signed.
    pub also_write: Option<AlsoWrite>,
}

/// See [`LocalEvent::also_write`].
pub type AlsoWrite = Box<dyn FnOnce(&EventId, &mut WriteBatch) + Send>;

/// Where a new event would go in a room (see [`Engine::template`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Template {
    pub room_version: RoomVersionId,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: u64,
}

/// A room state as `(type, state_key) -> event id`, sorted, for callers and comparisons.
pub type SortedState = BTreeMap<(String, String), OwnedEventId>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin<'a> {
    /// Built here: refused with an error (and not stored) unless fully accepted.
    Local,
    /// From a peer, within `Scope`: stored whatever the verdict.
    Remote(&'a Scope),
}

/// Which PDUs from a peer a caller takes: those of one room (or of any), and whether a create
/// event may start a room here. A peer must not make a node adopt rooms nobody asked for, nor
/// slip one room's events in with another's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub room: Option<OwnedRoomId>,
    pub adopt: bool,
}

impl Scope {
    /// Any room, new ones included (replaying a trusted log, tests).
    pub fn any() -> Self {
        Self {
            room: None,
            adopt: true,
        }
    }

    /// Events of rooms known here already.
    pub fn known_rooms() -> Self {
        Self {
            room: None,
            adopt: false,
        }
    }

    /// Events of `room`, which must be known here already.
    pub fn room(room: &RoomId) -> Self {
        Self {
            room: Some(room.to_owned()),
            adopt: false,
        }
    }

    /// Events of `room`, which this node is joining: its create event starts it here.
    pub fn joining(room: &RoomId) -> Self {
        Self {
            room: Some(room.to_owned()),
            adopt: true,
        }
    }
}

/// A PDU past the format checks, with its id computed.
struct Prepared {
    object: CanonicalJsonObject,
    version: RoomVersionId,
    rules: RoomVersionRules,
    known_room: Option<RoomRecord>,
    event_id: OwnedEventId,
    /// Steps 2 and 3 (signature, content hash) and parsing, when they were run ahead of the
    /// ordered pass.
    checked: Option<Result<Pdu, IngestError>>,
}

/// A parsed PDU whose room is known, before its id is computed.
struct Placed {
    object: CanonicalJsonObject,
    version: RoomVersionId,
    rules: RoomVersionRules,
    known_room: Option<RoomRecord>,
}

/// A PDU parsed as JSON, with what says where it belongs: its room, or (for a create event)
/// its room version.
struct Parsed {
    object: CanonicalJsonObject,
    belongs: Belongs,
}

enum Belongs {
    Room(OwnedRoomId),
    NewRoom(RoomVersionId),
}

pub struct Engine {
    store: SharedStore,
    inner: Mutex<Inner>,
    /// What readers see: only what is durable.
    published: Arc<std::sync::Mutex<Published>>,
    /// Sealed batches, written one at a time in the order they were sealed.
    writes: Arc<WriteQueue>,
}

/// The durable view readers get, while later batches are still being written.
#[derive(Default)]
struct Published {
    /// Every accepted event below this stream position is durable.
    next_stream: u64,
    /// Rooms that batches not yet durable changed: the ticket of the last batch that changed
    /// each, and its last durable record (`None`: the room is not durable yet).
    shadow: HashMap<OwnedRoomId, (u64, Option<RoomRecord>)>,
}

/// A batch ready to be written: the writes, and what becomes visible once they are durable.
struct Sealed {
    ticket: u64,
    batch: WriteBatch,
    rooms: Vec<(OwnedRoomId, RoomRecord)>,
    next_stream: u64,
}

/// How a sealed batch's write ended.
enum Written {
    Done(Result<(), StoreError>),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// A sealed batch on its way to the disk. What it holds is not to be acknowledged to anyone
/// before [`WriteInFlight::durable`] says so.
#[must_use = "a write is acknowledged only once durable() says so"]
pub struct WriteInFlight(Option<futures::channel::oneshot::Receiver<Written>>);

impl WriteInFlight {
    /// Waits until the batch is durable (and visible to readers), or its write failed.
    pub async fn durable(self) -> Result<(), StoreError> {
        let Some(outcome) = self.0 else {
            return Ok(());
        };
        match outcome.await {
            Ok(Written::Done(result)) => result,
            // A store that panics (a bug) panics its caller, as it would without the task.
            Ok(Written::Panicked(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(StoreError::Backend("the write task ended".into())),
        }
    }
}

/// Writes a sealed batch in its turn, then makes it visible to readers. Its turn always ends,
/// whatever the store does.
async fn write_sealed(
    store: SharedStore,
    published: &std::sync::Mutex<Published>,
    writes: &WriteQueue,
    sealed: Sealed,
) -> Written {
    use futures::FutureExt;
    writes.turn(sealed.ticket).await;
    let mut panicked = None;
    let result = if writes.poisoned() {
        Err(StoreError::Backend(
            "an earlier write failed; nothing of this one was stored".into(),
        ))
    } else {
        match std::panic::AssertUnwindSafe(store.write(sealed.batch))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => {
                panicked = Some(panic);
                Err(StoreError::Backend(
                    "the store panicked while writing".into(),
                ))
            }
        }
    };
    match &result {
        Ok(()) => {
            let mut published = published.lock().expect("published lock");
            published.next_stream = published.next_stream.max(sealed.next_stream);
            for (room, record) in sealed.rooms {
                let latest = published.shadow.get(&room).map(|(t, _)| *t);
                match latest {
                    Some(t) if t == sealed.ticket => {
                        published.shadow.remove(&room);
                    }
                    Some(_) => {
                        // A later batch changed it again: this is its durable record now.
                        if let Some(entry) = published.shadow.get_mut(&room) {
                            entry.1 = Some(record);
                        }
                    }
                    None => {}
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "store write failed; the caches reload"),
    }
    writes.done(sealed.ticket, result.is_err());
    match panicked {
        Some(panic) => Written::Panicked(panic),
        None => Written::Done(result),
    }
}

/// Orders the durable writes: a batch is sealed (and takes a ticket) under the engine lock,
/// then written outside it once every earlier ticket was written, so the next batch forms
/// while one is being written and readers never wait for the disk. A failed write poisons the
/// queue: the batches sealed after it are refused too (they build on it), and the next
/// operation reloads the caches once nothing is in flight.
#[derive(Default)]
struct WriteQueue {
    state: std::sync::Mutex<QueueState>,
    turn: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    next_ticket: u64,
    /// The ticket whose turn it is.
    serving: u64,
    poisoned: bool,
}

impl WriteQueue {
    fn take_ticket(&self) -> u64 {
        let mut st = self.state.lock().expect("write queue lock");
        let t = st.next_ticket;
        st.next_ticket += 1;
        t
    }

    fn idle(&self) -> bool {
        let st = self.state.lock().expect("write queue lock");
        st.serving == st.next_ticket
    }

    fn poisoned(&self) -> bool {
        self.state.lock().expect("write queue lock").poisoned
    }

    /// Waits until `ticket` may write.
    async fn turn(&self, ticket: u64) {
        loop {
            let notified = self.turn.notified();
            if self.state.lock().expect("write queue lock").serving == ticket {
                return;
            }
            notified.await;
        }
    }

    /// Ends `ticket`'s turn (`failed`: its write did not happen).
    fn done(&self, ticket: u64, failed: bool) {
        let mut st = self.state.lock().expect("write queue lock");
        debug_assert_eq!(st.serving, ticket);
        st.serving += 1;
        st.poisoned |= failed;
        drop(st);
        self.turn.notify_waiters();
    }

    /// Waits until no batch is in flight.
    async fn drained(&self) {
        loop {
            let notified = self.turn.notified();
            if self.idle() {
                return;
            }
            notified.await;
        }
    }

    fn clear_poison(&self) {
        self.state.lock().expect("write queue lock").poisoned = false;
    }
}

#[derive(Default)]
struct Inner {
    events: cache::EventCache,
    groups: HashMap<u64, StateGroup>,
    rooms: HashMap<OwnedRoomId, RoomRecord>,
    /// Memo of resolutions: sorted input groups -> resolved group.
    resolved: HashMap<Vec<u64>, u64>,
    /// Groups created since the last write; stored with the next batch.
    pending_groups: Vec<(u64, StateGroupRecord)>,
    /// Event ids a batch prefetch found absent from the store (valid until the batch ends).
    known_absent: HashSet<OwnedEventId>,
    /// Rooms the batch being built changed, with their records before it.
    touched: HashMap<OwnedRoomId, Option<RoomRecord>>,
    next_stream: u64,
    next_group: u64,
}

const NEXT_STREAM_KEY: &[u8] = b"next_stream";
const NEXT_GROUP_KEY: &[u8] = b"next_group";

fn timeline_key(room_id: &RoomId, stream: u64) -> Vec<u8> {
    let mut key = timeline_prefix(room_id);
    key.extend_from_slice(&stream.to_be_bytes());
    key
}

fn timeline_prefix(room_id: &RoomId) -> Vec<u8> {
    let mut key = room_id.as_bytes().to_vec();
    key.push(0);
    key
}

fn relation_key(target: &EventId, stream: u64) -> Vec<u8> {
    let mut key = target.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&stream.to_be_bytes());
    key
}

/// The event an event points at: what a redaction redacts, or its `m.relates_to` target.
fn relation_target(pdu: &Pdu) -> Option<OwnedEventId> {
    if let Some(r) = &pdu.redacts {
        return Some(r.clone());
    }
    #[derive(Deserialize)]
    struct RelatesTo {
        event_id: OwnedEventId,
    }
    #[derive(Deserialize)]
    struct Content {
        #[serde(rename = "m.relates_to")]
        relates_to: Option<RelatesTo>,
    }
    serde_json::from_str::<Content>(pdu.content.get())
        .ok()?
        .relates_to
        .map(|r| r.event_id)
}

fn corrupt(what: impl std::fmt::Display) -> IngestError {
    IngestError::Corrupt(what.to_string())
}

async fn read_counter(store: &dyn Store, key: &[u8], default: u64) -> Result<u64, StoreError> {
    match store.get(Table::Meta, key).await? {
        None => Ok(default),
        Some(raw) => raw
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("counter is not 8 bytes".into())),
    }
}

impl Engine {
    /// Opens the engine on `store`, preparing (or migrating) its schema.
    pub async fn open(store: SharedStore) -> Result<Self, StoreError> {
        schema::prepare(store.as_ref()).await?;
        let inner = Inner::load(store.as_ref()).await?;
        let published = Published {
            next_stream: inner.next_stream,
            shadow: HashMap::new(),
        };
        Ok(Self {
            store,
            inner: Mutex::new(inner),
            published: Arc::new(std::sync::Mutex::new(published)),
            writes: Arc::new(WriteQueue::default()),
        })
    }

    /// The caches, locked, trimmed to their budgets first (between operations, when nothing
    /// borrowed from them is in use and every new state group is stored). A panic while they
    /// are held (a bug, or a store that panics) may leave them half-updated — an event cached
    /// as stored whose write never happened — so the guard drops them if it is released by
    /// unwinding; they reload from the store. The counters stay: they only ever run ahead of
    /// the store, so keeping them leaves gaps, never reuse.
    async fn lock(&self) -> InnerGuard<'_> {
        let mut inner = InnerGuard(self.inner.lock().await);
        if self.writes.poisoned() {
            // A write failed: what the caches hold may never have reached the disk.
            if let Err(e) = self.settle(&mut inner).await {
                tracing::error!(error = %e, "reloading the engine after a failed write failed");
            }
        }
        // Batches in flight may need their state groups until they are durable (their events
        // are the most recently used, which the event cache keeps).
        if self.writes.idle() {
            inner.trim();
        } else {
            inner.trim_events();
        }
        inner
    }

    /// Drops the caches and reloads the counters once no write is in flight: after a failed
    /// write, or when an operation must forget what it half-built.
    async fn settle(&self, inner: &mut InnerGuard<'_>) -> Result<(), StoreError> {
        self.writes.drained().await;
        inner.reset(self.store.as_ref()).await?;
        let mut published = self.published.lock().expect("published lock");
        published.shadow.clear();
        published.next_stream = inner.next_stream;
        drop(published);
        self.writes.clear_poison();
        Ok(())
    }

    /// Makes `batch` durable (with the pending state groups and the counters) and then visible
    /// to readers. The engine lock is released while the disk works: the next batch can be
    /// built meanwhile, and readers go on reading what was durable before.
    async fn commit(&self, inner: InnerGuard<'_>, batch: WriteBatch) -> Result<(), StoreError> {
        self.begin_write(inner, batch).durable().await
    }

    /// Seals `batch` and sets its write going; the engine is free again once this returns.
    fn begin_write(&self, mut inner: InnerGuard<'_>, batch: WriteBatch) -> WriteInFlight {
        let Some(sealed) = inner.seal(batch, &self.writes) else {
            return WriteInFlight(None);
        };
        {
            // Until it is durable, readers keep the rooms' records as they were.
            let mut published = self.published.lock().expect("published lock");
            for (room, before) in inner.touched.drain() {
                published
                    .shadow
                    .entry(room)
                    .and_modify(|(t, _)| *t = sealed.ticket)
                    .or_insert((sealed.ticket, before));
            }
        }
        drop(inner);
        // The write runs as a task of its own, so that a caller that gives up (a client that
        // hangs up) cannot leave its ticket unserved and the queue stuck behind it.
        let (store, published, writes) = (
            self.store.clone(),
            self.published.clone(),
            self.writes.clone(),
        );
        let (done, outcome) = futures::channel::oneshot::channel();
        crate::net::rt::spawn(async move {
            let outcome = write_sealed(store, &published, &writes, sealed).await;
            let _ = done.send(outcome);
        });
        WriteInFlight(Some(outcome))
    }

    /// Waits until every sealed batch has been written (or refused): nothing is written after
    /// this returns unless something new is sent.
    pub async fn writes_done(&self) {
        self.writes.drained().await;
    }

    /// A room's durable record, as readers see it.
    async fn durable_room(
        &self,
        inner: &mut InnerGuard<'_>,
        room_id: &RoomId,
    ) -> Result<Option<RoomRecord>, StoreError> {
        let shadowed = self
            .published
            .lock()
            .expect("published lock")
            .shadow
            .get(room_id)
            .map(|(_, record)| record.clone());
        match shadowed {
            Some(record) => Ok(record),
            None => inner.load_room(self.store.as_ref(), room_id).await,
        }
    }

    /// Events cached in memory now, and their weight in bytes.
    pub async fn cached_events(&self) -> (usize, usize) {
        let inner = self.lock().await;
        (inner.events.len(), inner.events.bytes())
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Runs the receipt checks on one PDU from a peer and stores the result durably.
    pub async fn receive(&self, raw: &[u8]) -> Result<Received, IngestError> {
        let mut results = self.receive_batch(&[raw]).await?;
        results.pop().expect("one result per event")
    }

    /// Ingests many PDUs (in order) with a single durable commit — the bulk path.
    /// The outer error is a storage failure (then nothing of the batch was stored).
    pub async fn receive_batch(
        &self,
        raws: &[&[u8]],
    ) -> Result<Vec<Result<Received, IngestError>>, StoreError> {
        self.receive_batch_in(&Scope::any(), raws).await
    }

    /// [`Engine::receive_batch`] for PDUs that must fall within `scope`; the others are refused
    /// (`BadFormat` for another room, `Forbidden` for a room not being joined) and not stored.
    pub async fn receive_batch_in(
        &self,
        scope: &Scope,
        raws: &[&[u8]],
    ) -> Result<Vec<Result<Received, IngestError>>, StoreError> {
        // Parsing, hashing and signature checks depend on nothing the batch changes: they run
        // on every core ahead of the ordered pass (parsing before the engine is locked; the
        // rest needs the rooms and the stored events looked up first).
        let parsed = parallel::map(raws.to_vec(), parse_pdu);
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        // Place what can be placed now (rooms created inside this batch come later).
        let mut placed = Vec::with_capacity(raws.len());
        for p in parsed {
            placed.push(match p {
                Ok(p) => match inner.place(store, p).await {
                    Err(IngestError::UnknownRoom(_)) => None,
                    other => Some(other),
                },
                Err(e) => Some(Err(e)),
            });
        }
        let mut prepared: Vec<Option<Result<Prepared, IngestError>>> =
            parallel::map(placed, |p| p.map(|p| p.and_then(identify)));
        // Every new event id is looked up in one read instead of one per event.
        let ids: Vec<&OwnedEventId> = prepared
            .iter()
            .filter_map(|p| p.as_ref()?.as_ref().ok())
            .map(|p| &p.event_id)
            .collect();
        let fetched = inner.prefetch(store, &ids).await;
        let origin = Origin::Remote(scope);
        if fetched.is_ok() {
            // Each event once: a second copy in the batch (pushed by two peers) is a duplicate
            // by the time the ordered pass reaches it, or is checked there if the first failed.
            let mut first_copies = HashSet::new();
            let mut to_check: Vec<&mut Prepared> = prepared
                .iter_mut()
                .filter_map(|p| p.as_mut()?.as_mut().ok())
                .filter(|p| inner.worth_checking(p, origin))
                .filter(|p| first_copies.insert(p.event_id.clone()))
                .collect();
            parallel::for_each(&mut to_check, |p| {
                p.checked = Some(check_signed(&p.object, &p.rules, &p.event_id));
            });
        }
        let mut batch = WriteBatch::new();
        let mut results = Vec::with_capacity(raws.len());
        let mut failure = fetched.err();
        for (raw, p) in raws.iter().zip(prepared) {
            if failure.is_some() {
                break;
            }
            let result = match p {
                Some(Ok(p)) => inner.ingest_prepared(store, p, &mut batch, origin).await,
                Some(Err(e)) => Err(e),
                None => inner.ingest(store, raw, &mut batch, origin).await,
            };
            match result {
                Err(IngestError::Store(e)) => failure = Some(e),
                other => results.push(other),
            }
        }
        inner.known_absent.clear();
        if let Some(e) = failure {
            self.settle(&mut inner).await?;
            return Err(e);
        }
        self.commit(inner, batch).await?;
        Ok(results)
    }

    /// Builds, signs and stores a local event from `sender` in `room_id`.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        identity: &Identity,
        room_id: &RoomId,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
        now: MilliSecondsSinceUnixEpoch,
    ) -> Result<Received, IngestError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let mut batch = WriteBatch::new();
        let received = inner
            .send_local(
                store,
                identity,
                Some(room_id),
                sender,
                kind,
                state_key,
                content,
                now,
                None,
                &mut batch,
            )
            .await;
        let received = match received {
            Err(IngestError::Store(e)) => {
                self.settle(&mut inner).await?;
                return Err(e.into());
            }
            other => other?,
        };
        self.commit(inner, batch).await?;
        Ok(received)
    }

    /// Builds, signs and stores many local events with one durable commit (group commit for
    /// concurrent senders). Each event gets its own verdict; a refused one does not affect the
    /// others. Fails as a whole only if the write fails, and then nothing was stored.
    pub async fn send_many(
        &self,
        identity: &Identity,
        events: Vec<LocalEvent>,
        now: MilliSecondsSinceUnixEpoch,
    ) -> Result<Vec<Result<Received, IngestError>>, StoreError> {
        let (results, write) = self.seal_many(identity, events, now).await?;
        write.durable().await?;
        Ok(results)
    }

    /// [`Engine::send_many`] up to the point where the batch is sealed: the verdicts, and the
    /// write they depend on. The engine is free for the next batch while this one is written;
    /// the verdicts hold only once the write is durable.
    pub async fn seal_many(
        &self,
        identity: &Identity,
        events: Vec<LocalEvent>,
        now: MilliSecondsSinceUnixEpoch,
    ) -> Result<(Vec<Result<Received, IngestError>>, WriteInFlight), StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let mut batch = WriteBatch::new();
        let mut results = Vec::with_capacity(events.len());
        for ev in events {
            let r = inner
                .send_local(
                    store,
                    identity,
                    Some(&ev.room_id),
                    &ev.sender,
                    &ev.kind,
                    ev.state_key.as_deref(),
                    ev.content,
                    now,
                    None,
                    &mut batch,
                )
                .await;
            if let Err(IngestError::Store(e)) = r {
                self.settle(&mut inner).await?;
                return Err(e);
            }
            if let (Ok(received), Some(also)) = (&r, ev.also_write) {
                also(&received.event_id, &mut batch);
            }
            results.push(r);
        }
        Ok((results, self.begin_write(inner, batch)))
    }

    /// Creates a room with the preset's initial events, all committed at once.
    pub async fn create_room(
        &self,
        identity: &Identity,
        creator: &UserId,
        opts: &CreateRoom,
        now: MilliSecondsSinceUnixEpoch,
    ) -> Result<(OwnedRoomId, Vec<OwnedEventId>), IngestError> {
        let version = opts.room_version.clone().unwrap_or(DEFAULT_ROOM_VERSION);
        rules_for(&version)
            .ok_or_else(|| IngestError::UnsupportedRoomVersion(version.to_string()))?;
        if ServerName::try_from(creator.server_name()).ok() != Some(identity.server_name()) {
            return Err(IngestError::Forbidden(
                "the creator must be a user of this server".into(),
            ));
        }
        let events = initial_events(creator, opts, &version);
        // Room versions before 12 name the room before its create event exists.
        let early_room_id = (version != RoomVersionId::V12).then(|| {
            let mut nonce = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
            let local: String = hex::encode(nonce);
            OwnedRoomId::try_from(format!("!{local}:{}", identity.server_name()))
                .expect("valid room id")
        });
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let mut batch = WriteBatch::new();
        let mut ids = Vec::new();
        let mut room_id = early_room_id;
        let result: Result<(), IngestError> = async {
            for (kind, state_key, content) in events {
                let r = inner
                    .send_local(
                        store,
                        identity,
                        room_id.as_deref(),
                        creator,
                        &kind,
                        Some(&state_key),
                        content,
                        now,
                        Some(&version),
                        &mut batch,
                    )
                    .await?;
                room_id = Some(r.room_id);
                ids.push(r.event_id);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // Nothing was written; drop what the cache learned from the half-built room.
            self.settle(&mut inner).await?;
            return Err(e);
        }
        self.commit(inner, batch).await?;
        Ok((room_id.expect("create event sets the room id"), ids))
    }

    /// The position a new event from `sender` (possibly a user of another server, as for a
    /// remote join) would take in the room: what `make_join` hands out.
    pub async fn template(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: &serde_json::Value,
    ) -> Result<Template, IngestError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let room = inner
            .load_room(store, room_id)
            .await?
            .ok_or_else(|| IngestError::UnknownRoom(room_id.to_string()))?;
        let rules = rules_for(&room.room_version)
            .ok_or_else(|| IngestError::UnsupportedRoomVersion(room.room_version.to_string()))?;
        let (prev_events, depth, auth_events) = inner
            .position(store, &room, &rules, sender, kind, state_key, content)
            .await?;
        Ok(Template {
            room_version: room.room_version,
            prev_events,
            auth_events,
            depth,
        })
    }

    /// Events of `room_id` reachable backwards from `latest` through prev_events, stopping at
    /// `earliest` and at events already listed, at most `limit`, in an order where every
    /// event comes after its prev_events (so the receiver can ingest them in turn).
    pub async fn missing_events(
        &self,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let stop: HashSet<&OwnedEventId> = earliest.iter().collect();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut found: Vec<Arc<StoredEvent>> = Vec::new();
        let mut queue: std::collections::VecDeque<OwnedEventId> = latest.iter().cloned().collect();
        while let Some(id) = queue.pop_front() {
            if found.len() >= limit {
                break;
            }
            if stop.contains(&id) || !seen.insert(id.clone()) {
                continue;
            }
            let Some(ev) = inner.load_event(store, &id).await? else {
                continue;
            };
            if ev.pdu.room_id != room_id || ev.status == EventStatus::Outlier {
                continue;
            }
            queue.extend(ev.pdu.prev_events.iter().cloned());
            found.push(ev);
        }
        // Depth order with prev_events first: stable, since an event's prevs are deeper in the walk.
        found.reverse();
        found.sort_by_key(|e| e.pdu.depth);
        Ok(found)
    }

    pub async fn room(&self, room_id: &RoomId) -> Result<Option<RoomRecord>, StoreError> {
        let mut inner = self.lock().await;
        self.durable_room(&mut inner, room_id).await
    }

    /// Every room this store knows.
    pub async fn rooms(&self) -> Result<Vec<OwnedRoomId>, StoreError> {
        let entries = crate::store::scan_all(self.store.as_ref(), Table::Rooms).await?;
        entries
            .into_iter()
            .map(|(k, _)| {
                let s = String::from_utf8(k).map_err(|_| StoreError::Corrupt("room key".into()))?;
                OwnedRoomId::try_from(s).map_err(|_| StoreError::Corrupt("room key".into()))
            })
            .collect()
    }

    pub async fn event(&self, event_id: &EventId) -> Result<Option<Arc<StoredEvent>>, StoreError> {
        let mut inner = self.lock().await;
        inner.load_event(self.store.as_ref(), event_id).await
    }

    pub async fn current_state(&self, room_id: &RoomId) -> Result<Option<SortedState>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let Some(room) = self.durable_room(&mut inner, room_id).await? else {
            return Ok(None);
        };
        let group = inner.load_group(store, room.current_state).await?;
        Ok(Some(sorted(&group.map)))
    }

    /// The state before `event_id` (what it was authorised against).
    pub async fn state_before(
        &self,
        event_id: &EventId,
    ) -> Result<Option<SortedState>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let Some(ev) = inner.load_event(store, event_id).await? else {
            return Ok(None);
        };
        let Some(g) = ev.state_before else {
            return Ok(None);
        };
        Ok(Some(sorted(&inner.load_group(store, g).await?.map)))
    }

    /// The state after `event_id` (for state events, including the event itself).
    pub async fn state_after(&self, event_id: &EventId) -> Result<Option<SortedState>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let Some(ev) = inner.load_event(store, event_id).await? else {
            return Ok(None);
        };
        let Some(g) = ev.state_after else {
            return Ok(None);
        };
        Ok(Some(sorted(&inner.load_group(store, g).await?.map)))
    }

    /// The states before and after `event_id` as shared maps (no copy: for lookups of a few
    /// keys per event, as visibility checks make). `None` for unknown events and outliers.
    pub async fn states_at(
        &self,
        event_id: &EventId,
    ) -> Result<Option<(Arc<StateMap>, Arc<StateMap>)>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let Some(ev) = inner.load_event(store, event_id).await? else {
            return Ok(None);
        };
        let (Some(before), Some(after)) = (ev.state_before, ev.state_after) else {
            return Ok(None);
        };
        let before = inner.load_group(store, before).await?.map;
        let after = inner.load_group(store, after).await?.map;
        Ok(Some((before, after)))
    }

    /// Events by id, read under one lock with one store round trip for those not cached
    /// (absent ids are left out).
    pub async fn events(&self, ids: &[&OwnedEventId]) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        inner.prefetch(store, ids).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(ev) = inner.load_event(store, id).await? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Events with the state after each (shared maps), under one lock: what a push needs.
    /// Unknown events and outliers are left out.
    pub async fn events_with_state_after(
        &self,
        ids: &[OwnedEventId],
    ) -> Result<Vec<(Arc<StoredEvent>, Arc<StateMap>)>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(ev) = inner.load_event(store, id).await? else {
                continue;
            };
            let Some(group) = ev.state_after else {
                continue;
            };
            let after = inner.load_group(store, group).await?.map;
            out.push((ev, after));
        }
        Ok(out)
    }

    /// A room's current state as a shared map (no copy).
    pub async fn current_state_map(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<Arc<StateMap>>, StoreError> {
        let mut inner = self.lock().await;
        let store = self.store.as_ref();
        let Some(room) = self.durable_room(&mut inner, room_id).await? else {
            return Ok(None);
        };
        Ok(Some(inner.load_group(store, room.current_state).await?.map))
    }

    /// Accepted events that redact or relate to `target`, in stream order.
    pub async fn relations(&self, target: &EventId) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let mut prefix = target.as_bytes().to_vec();
        prefix.push(0);
        let entries = self
            .store
            .scan(
                Table::Relations,
                KeyRange::prefix(&prefix),
                Direction::Forward,
                usize::MAX,
            )
            .await?;
        let mut inner = self.lock().await;
        let mut out = Vec::with_capacity(entries.len());
        for (_, id) in entries {
            let id = String::from_utf8(id)
                .ok()
                .and_then(|s| OwnedEventId::try_from(s).ok())
                .ok_or_else(|| StoreError::Corrupt("relation entry".into()))?;
            if let Some(ev) = inner.load_event(self.store.as_ref(), &id).await? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The stream position the next accepted event will take: every event at a lower position
    /// is already stored.
    pub async fn stream_position(&self) -> u64 {
        self.published.lock().expect("published lock").next_stream
    }

    /// Up to `limit` timeline events of a room, starting after/before stream position `from`
    /// (exclusive; `None` starts at the beginning or the end).
    pub async fn timeline(
        &self,
        room_id: &RoomId,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<Arc<StoredEvent>>, StoreError> {
        let prefix = timeline_prefix(room_id);
        let mut range = KeyRange::prefix(&prefix);
        if let Some(from) = from {
            let bound = std::ops::Bound::Excluded(timeline_key(room_id, from));
            match direction {
                Direction::Forward => range.start = bound,
                Direction::Backward => range.end = bound,
            }
        }
        let entries = self
            .store
            .scan(Table::Timeline, range, direction, limit)
            .await?;
        let ids = entries
            .into_iter()
            .map(|(_, id)| {
                String::from_utf8(id)
                    .ok()
                    .and_then(|s| OwnedEventId::try_from(s).ok())
                    .ok_or_else(|| StoreError::Corrupt("timeline entry".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut inner = self.lock().await;
        // One store read for the page rather than one per event (each is a round trip to
        // IndexedDB in the tab).
        inner
            .prefetch(self.store.as_ref(), &ids.iter().collect::<Vec<_>>())
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let ev = inner.load_event(self.store.as_ref(), &id).await?;
            out.push(
                ev.ok_or_else(|| StoreError::Corrupt(format!("timeline names unknown {id}")))?,
            );
        }
        Ok(out)
    }
}

fn sorted(map: &StateMap) -> SortedState {
    map.iter()
        .map(|((t, k), v)| ((t.to_string(), k.clone()), v.clone()))
        .collect()
}

struct InnerGuard<'a>(futures::lock::MutexGuard<'a, Inner>);

impl std::ops::Deref for InnerGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::DerefMut for InnerGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.0
    }
}

impl Drop for InnerGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let Inner {
                next_stream,
                next_group,
                ..
            } = *self.0;
            *self.0 = Inner {
                next_stream,
                next_group,
                ..Inner::default()
            };
        }
    }
}

impl Inner {
    async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        Ok(Self {
            next_stream: read_counter(store, NEXT_STREAM_KEY, 1).await?,
            next_group: read_counter(store, NEXT_GROUP_KEY, EMPTY_GROUP + 1).await?,
            ..Self::default()
        })
    }

    /// Keeps the caches within their budgets. Groups not yet stored are never dropped.
    fn trim(&mut self) {
        self.trim_events();
        if self.pending_groups.is_empty() && self.groups.len() > cache::MAX_CACHED_GROUPS {
            // Dropped groups are reloaded from the store when next needed.
            let keep: HashSet<u64> = self.rooms.values().map(|r| r.current_state).collect();
            self.groups.retain(|id, _| keep.contains(id));
        }
    }

    /// [`Inner::trim`] without dropping state groups: while a batch is being written, a group
    /// it made may be needed again before the store has it.
    fn trim_events(&mut self) {
        // Absences found by a prefetch hold for one operation only.
        self.known_absent.clear();
        self.events.trim(cache::EVENT_CACHE_BYTES);
        if self.resolved.len() > cache::MAX_CACHED_RESOLUTIONS {
            self.resolved.clear();
        }
    }

    /// Forgets everything cached (after a failed write) and reloads the counters.
    async fn reset(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        *self = Self::load(store).await?;
        Ok(())
    }

    /// Seals `batch` with the pending state groups and the counters, and takes its ticket in
    /// the write queue; `None` if there is nothing to write.
    fn seal(&mut self, mut batch: WriteBatch, writes: &WriteQueue) -> Option<Sealed> {
        if batch.is_empty() && self.pending_groups.is_empty() {
            return None;
        }
        for (id, record) in self.pending_groups.drain(..) {
            batch.put(
                Table::StateGroups,
                id.to_be_bytes(),
                serde_json::to_vec(&record).expect("serialises"),
            );
        }
        batch.put(Table::Meta, NEXT_STREAM_KEY, self.next_stream.to_be_bytes());
        batch.put(Table::Meta, NEXT_GROUP_KEY, self.next_group.to_be_bytes());
        let rooms = self
            .touched
            .keys()
            .filter_map(|r| Some((r.clone(), self.rooms.get(r)?.clone())))
            .collect();
        Some(Sealed {
            ticket: writes.take_ticket(),
            batch,
            rooms,
            next_stream: self.next_stream,
        })
    }

    async fn load_room(
        &mut self,
        store: &dyn Store,
        room_id: &RoomId,
    ) -> Result<Option<RoomRecord>, StoreError> {
        if let Some(r) = self.rooms.get(room_id) {
            return Ok(Some(r.clone()));
        }
        let Some(raw) = store.get(Table::Rooms, room_id.as_bytes()).await? else {
            return Ok(None);
        };
        let record: RoomRecord = serde_json::from_slice(&raw)
            .map_err(|e| StoreError::Corrupt(format!("room record: {e}")))?;
        self.rooms.insert(room_id.to_owned(), record.clone());
        Ok(Some(record))
    }

    async fn load_event(
        &mut self,
        store: &dyn Store,
        id: &EventId,
    ) -> Result<Option<Arc<StoredEvent>>, StoreError> {
        if let Some(ev) = self.events.get(id) {
            return Ok(Some(ev.clone()));
        }
        if self.known_absent.contains(id) {
            return Ok(None);
        }
        let Some(raw) = store.get(Table::Events, id.as_bytes()).await? else {
            return Ok(None);
        };
        let ev = Arc::new(
            StoredEvent::decode(id, &raw)
                .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?,
        );
        self.events.insert(id.to_owned(), ev.clone());
        Ok(Some(ev))
    }

    /// Loads `ids` and their whole auth chains into the cache (state resolution needs them).
    async fn load_auth_closure(
        &mut self,
        store: &dyn Store,
        ids: impl IntoIterator<Item = OwnedEventId>,
    ) -> Result<(), IngestError> {
        let mut stack: Vec<OwnedEventId> = ids.into_iter().collect();
        let mut seen = HashSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let ev = self
                .load_event(store, &id)
                .await?
                .ok_or_else(|| corrupt(format!("auth chain names unknown {id}")))?;
            stack.extend(
                ev.pdu
                    .auth_events
                    .iter()
                    .filter(|a| !seen.contains(*a))
                    .cloned(),
            );
        }
        Ok(())
    }

    async fn load_group(&mut self, store: &dyn Store, id: u64) -> Result<StateGroup, StoreError> {
        if id == EMPTY_GROUP {
            return Ok(StateGroup {
                map: Arc::new(StateMap::new()),
                chain: 0,
            });
        }
        if let Some(g) = self.groups.get(&id) {
            return Ok(g.clone());
        }
        // Walk up to a cached ancestor or a snapshot, then apply the deltas downwards.
        let mut chain: Vec<(u64, StateGroupRecord)> = Vec::new();
        let mut cursor = Some(id);
        let mut base: Option<StateGroup> = None;
        while let Some(g) = cursor {
            if let Some(cached) = self.groups.get(&g) {
                base = Some(cached.clone());
                break;
            }
            let raw = store
                .get(Table::StateGroups, &g.to_be_bytes())
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("state group {g} missing")))?;
            let record: StateGroupRecord = serde_json::from_slice(&raw)
                .map_err(|e| StoreError::Corrupt(format!("state group {g}: {e}")))?;
            cursor = record.parent;
            chain.push((g, record));
            if chain.len() > 10 * state::SNAPSHOT_EVERY as usize {
                return Err(StoreError::Corrupt("state group chain too long".into()));
            }
        }
        let mut current = base;
        for (g, record) in chain.into_iter().rev() {
            let map = apply_record(current.as_ref().map(|c| c.map.as_ref()), &record);
            let chain = if record.parent.is_some() {
                current.as_ref().map_or(0, |c| c.chain + 1)
            } else {
                0
            };
            let group = StateGroup {
                map: Arc::new(map),
                chain,
            };
            self.groups.insert(g, group.clone());
            current = Some(group);
        }
        Ok(current.expect("loop ran at least once"))
    }

    /// Registers a state group for `map` (derived from `parent`), to be stored with the next write.
    fn new_group(&mut self, map: StateMap, parent: u64) -> u64 {
        let parent_group = self.groups.get(&parent).cloned();
        if parent == EMPTY_GROUP && map.is_empty() {
            return EMPTY_GROUP;
        }
        if let Some(p) = &parent_group {
            if *p.map == map {
                return parent;
            }
        }
        let id = self.next_group;
        self.next_group += 1;
        let parent_ref = parent_group
            .as_ref()
            .filter(|_| parent != EMPTY_GROUP)
            .map(|g| (parent, g));
        let (record, chain) = record_for(&map, parent_ref);
        self.pending_groups.push((id, record));
        self.groups.insert(
            id,
            StateGroup {
                map: Arc::new(map),
                chain,
            },
        );
        id
    }

    /// The group of the state resolved from `groups` (memoised).
    async fn resolve_groups(
        &mut self,
        store: &dyn Store,
        rules: &RoomVersionRules,
        groups: Vec<u64>,
    ) -> Result<u64, IngestError> {
        let mut key = groups;
        key.sort_unstable();
        key.dedup();
        if key.len() == 1 {
            return Ok(key[0]);
        }
        if let Some(&g) = self.resolved.get(&key) {
            return Ok(g);
        }
        let mut maps = Vec::with_capacity(key.len());
        for &g in &key {
            maps.push(self.load_group(store, g).await?.map);
        }
        let ids: Vec<OwnedEventId> = maps
            .iter()
            .flat_map(|m| m.values().cloned())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.load_auth_closure(store, ids).await?;
        let refs: Vec<&StateMap> = maps.iter().map(|m| m.as_ref()).collect();
        let events = &self.events;
        let resolved = resolve::resolve(rules, &refs, |id| events.get(id).map(|e| e.as_ref()))
            .map_err(|e| corrupt(format!("state resolution: {e}")))?;
        let group = self.new_group(resolved, key[0]);
        self.resolved.insert(key, group);
        Ok(group)
    }

    /// Builds and signs a local event on top of the room's current state, then ingests it.
    #[allow(clippy::too_many_arguments)]
    async fn send_local(
        &mut self,
        store: &dyn Store,
        identity: &Identity,
        room_id: Option<&RoomId>,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
        now: MilliSecondsSinceUnixEpoch,
        create_version: Option<&RoomVersionId>,
        batch: &mut WriteBatch,
    ) -> Result<Received, IngestError> {
        if ServerName::try_from(sender.server_name()).ok() != Some(identity.server_name()) {
            return Err(IngestError::Forbidden(
                "the sender must be a user of this server".into(),
            ));
        }
        let is_create = kind == "m.room.create" && state_key == Some("");
        let (rules, room) = if is_create {
            let version = create_version.cloned().unwrap_or(DEFAULT_ROOM_VERSION);
            let rules = rules_for(&version)
                .ok_or_else(|| IngestError::UnsupportedRoomVersion(version.to_string()))?;
            (rules, None)
        } else {
            let room_id = room_id.ok_or_else(|| IngestError::BadFormat("room id needed".into()))?;
            let room = self
                .load_room(store, room_id)
                .await?
                .ok_or_else(|| IngestError::UnknownRoom(room_id.to_string()))?;
            let rules = rules_for(&room.room_version).ok_or_else(|| {
                IngestError::UnsupportedRoomVersion(room.room_version.to_string())
            })?;
            (rules, Some(room))
        };
        let (prev_events, depth, auth_events) = match &room {
            None => (Vec::new(), 1, Vec::new()),
            Some(room) => {
                self.position(store, room, &rules, sender, kind, state_key, &content)
                    .await?
            }
        };
        let room_id_field = if is_create && rules.authorization.room_create_event_id_as_room_id {
            None
        } else {
            room_id
        };
        let content_bytes = content.to_string().len();
        if content_bytes > MAX_PDU_BYTES {
            return Err(IngestError::TooLarge(content_bytes));
        }
        let new = NewEvent {
            room_id: room_id_field,
            sender,
            kind,
            state_key,
            content,
            prev_events,
            auth_events,
            depth,
            origin_server_ts: now,
            redacts: None,
        };
        let (_, bytes) = build_signed(identity, &rules, new).map_err(IngestError::BadFormat)?;
        if bytes.len() > MAX_PDU_BYTES {
            return Err(IngestError::TooLarge(bytes.len()));
        }
        self.ingest(store, &bytes, batch, Origin::Local).await
    }

    /// Where a new event from `sender` goes: prev_events (the room's forward extremities),
    /// depth, and auth_events chosen from the current state.
    #[allow(clippy::too_many_arguments)]
    async fn position(
        &mut self,
        store: &dyn Store,
        room: &RoomRecord,
        rules: &RoomVersionRules,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: &serde_json::Value,
    ) -> Result<(Vec<OwnedEventId>, u64, Vec<OwnedEventId>), IngestError> {
        let prev: Vec<OwnedEventId> = room
            .forward_extremities
            .iter()
            .rev()
            .take(MAX_PREV_EVENTS)
            .cloned()
            .collect();
        let mut depth = 0;
        for p in &prev {
            let ev = self
                .load_event(store, p)
                .await?
                .ok_or_else(|| corrupt("extremity missing"))?;
            depth = depth.max(ev.pdu.depth);
        }
        let current = self.load_group(store, room.current_state).await?;
        let raw_content = serde_json::value::to_raw_value(content)
            .map_err(|e| IngestError::BadJson(e.to_string()))?;
        let types = ruma::state_res::auth_types_for_event(
            &TimelineEventType::from(kind),
            sender,
            state_key,
            &raw_content,
            &rules.authorization,
        )
        .map_err(IngestError::BadFormat)?;
        let mut auth: Vec<OwnedEventId> = types
            .iter()
            .filter_map(|k| current.map.get(k).cloned())
            .collect();
        auth.sort();
        auth.dedup();
        Ok((prev, depth + 1, auth))
    }

    async fn ingest(
        &mut self,
        store: &dyn Store,
        raw: &[u8],
        batch: &mut WriteBatch,
        origin: Origin<'_>,
    ) -> Result<Received, IngestError> {
        let prepared = self.prepare(store, raw).await?;
        self.ingest_prepared(store, prepared, batch, origin).await
    }

    /// Step 1 of the receipt checks (size, JSON, format) and the event id. Needs the room to
    /// be known already (except for create events).
    async fn prepare(&mut self, store: &dyn Store, raw: &[u8]) -> Result<Prepared, IngestError> {
        let placed = self.place(store, parse_pdu(raw)?).await?;
        identify(placed)
    }

    /// The room (or, for a create event, the room version) a parsed PDU belongs to, and the
    /// rules that follow from it. The event id is left to [`identify`].
    async fn place(&mut self, store: &dyn Store, parsed: Parsed) -> Result<Placed, IngestError> {
        let (version, known_room) = match parsed.belongs {
            Belongs::NewRoom(version) => (version, None),
            Belongs::Room(room_id) => {
                let room = self
                    .load_room(store, &room_id)
                    .await?
                    .ok_or_else(|| IngestError::UnknownRoom(room_id.to_string()))?;
                (room.room_version.clone(), Some(room))
            }
        };
        let rules = rules_for(&version)
            .ok_or_else(|| IngestError::UnsupportedRoomVersion(version.to_string()))?;
        Ok(Placed {
            object: parsed.object,
            version,
            rules,
            known_room,
        })
    }

    /// Whether a prepared PDU gets as far as the signature check: not one stored already, and
    /// within the scope (what the scope refuses costs no signature check).
    fn worth_checking(&self, p: &Prepared, origin: Origin<'_>) -> bool {
        let stored = self
            .events
            .get(&p.event_id)
            .is_some_and(|e| e.status != EventStatus::Outlier);
        !stored && !outside_scope(origin, p.known_room.as_ref())
    }

    /// Loads the events named by `ids` that are not cached yet, in one store read.
    async fn prefetch(
        &mut self,
        store: &dyn Store,
        ids: &[&OwnedEventId],
    ) -> Result<(), StoreError> {
        let wanted: Vec<&OwnedEventId> = ids
            .iter()
            .copied()
            .filter(|id| !self.events.contains_key(id))
            .collect();
        let keys: Vec<&[u8]> = wanted.iter().map(|id| id.as_bytes()).collect();
        let values = store.get_many(Table::Events, &keys).await?;
        for (id, value) in wanted.into_iter().zip(values) {
            match value {
                Some(raw) => {
                    let ev = StoredEvent::decode(id, &raw)
                        .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
                    self.events.insert(id.clone(), Arc::new(ev));
                }
                None => {
                    self.known_absent.insert(id.clone());
                }
            }
        }
        Ok(())
    }

    /// Steps 2-6 of the receipt checks on a prepared PDU, then the bookkeeping.
    async fn ingest_prepared(
        &mut self,
        store: &dyn Store,
        prepared: Prepared,
        batch: &mut WriteBatch,
        origin: Origin<'_>,
    ) -> Result<Received, IngestError> {
        let Prepared {
            object,
            version,
            rules,
            known_room,
            event_id,
            checked,
        } = prepared;
        // Earlier events of the same batch may have moved the room on since `prepare`.
        let known_room = match known_room {
            Some(room) => Some(
                self.load_room(store, &room.room_id)
                    .await?
                    .ok_or_else(|| corrupt("room vanished"))?,
            ),
            None => None,
        };
        if let Some(existing) = self.load_event(store, &event_id).await? {
            if existing.status != EventStatus::Outlier {
                return Ok(Received {
                    event_id,
                    room_id: existing.pdu.room_id.clone(),
                    outcome: Outcome::Duplicate,
                });
            }
        }

        // What the scope refuses costs no signature check.
        if outside_scope(origin, known_room.as_ref()) {
            return Err(IngestError::Forbidden(format!(
                "{event_id} is outside what this node takes now"
            )));
        }
        // 2. Signature of the origin, whose key is its server name. 3. Content hash.
        let pdu = match checked {
            Some(checked) => checked?,
            None => check_signed(&object, &rules, &event_id)?,
        };
        if let Some(room) = &known_room {
            if pdu.room_id != room.room_id {
                return Err(IngestError::BadFormat(
                    "room_id changed during parsing".into(),
                ));
            }
        } else if self.load_room(store, &pdu.room_id).await?.is_some() {
            return Err(IngestError::Forbidden("a room has one create event".into()));
        }
        if let Origin::Remote(scope) = origin {
            if scope.room.as_ref().is_some_and(|r| *r != pdu.room_id) {
                return Err(IngestError::BadFormat(format!(
                    "an event of {} where only {} is taken",
                    pdu.room_id,
                    scope.room.as_ref().expect("checked")
                )));
            }
            if known_room.is_none() && !scope.adopt {
                return Err(IngestError::Forbidden(format!(
                    "{} is not a room this node is joining",
                    pdu.room_id
                )));
            }
        }

        // Everything the checks need must be here; otherwise ask for it and store nothing.
        let mut missing = Vec::new();
        for id in pdu.prev_events.iter().chain(&pdu.auth_events) {
            match self.load_event(store, id).await? {
                Some(ev) if ev.status != EventStatus::Outlier || pdu.auth_events.contains(id) => {}
                _ if missing.contains(id) => {}
                _ => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            return Ok(Received {
                event_id,
                room_id: pdu.room_id.clone(),
                outcome: Outcome::MissingEvents(missing),
            });
        }
        // Every prev and auth event must be in the event's own room: otherwise a member of one
        // room could graft another room's state (its create, its power levels) onto it.
        for id in pdu.prev_events.iter().chain(&pdu.auth_events) {
            let referenced = self.events.get(id).expect("loaded above");
            if referenced.pdu.room_id != pdu.room_id {
                return Err(IngestError::BadFormat(format!(
                    "{id} is in another room ({})",
                    referenced.pdu.room_id
                )));
            }
        }

        // State before the event: resolved from the states after its prev_events.
        let mut prev_groups = Vec::with_capacity(pdu.prev_events.len());
        for p in &pdu.prev_events {
            let ev = self.events.get(p).expect("loaded above");
            prev_groups.push(
                ev.state_after
                    .ok_or_else(|| corrupt(format!("{p} has no state")))?,
            );
        }
        let state_before = if prev_groups.is_empty() {
            EMPTY_GROUP
        } else {
            self.resolve_groups(store, &rules, prev_groups).await?
        };
        let before = self.load_group(store, state_before).await?;
        // The auth checks read events through the cache only: load the ones they may consult.
        let create_event_id = known_room.as_ref().map(|r| r.create_event.clone());
        self.load_auth_state(store, &pdu, &rules, &before.map, create_event_id.as_ref())
            .await?;

        // The event as ruma's checks see it; filled in and stored once the verdict is known.
        let mut candidate = StoredEvent {
            pdu,
            status: EventStatus::Accepted,
            reason: None,
            stream: None,
            state_before: Some(state_before),
            state_after: None,
        };

        // 4-5. Authorisation against auth_events, then against the state before the event.
        let mut verdict = self.authorise(&candidate, &rules, &before.map, create_event_id.as_ref());

        // 6. Soft fail against the room's current state.
        let mut status = if verdict.is_some() {
            EventStatus::Rejected
        } else {
            EventStatus::Accepted
        };
        if status == EventStatus::Accepted {
            if let Some(room) = &known_room {
                if room.current_state != state_before {
                    let current = self.load_group(store, room.current_state).await?;
                    self.load_auth_state(store, &candidate.pdu, &rules, &current.map, None)
                        .await?;
                    let fetch = |t: &StateEventType, k: &str| {
                        current
                            .map
                            .get(&(t.clone(), k.to_owned()))
                            .and_then(|id| self.events.get(id))
                            .map(|e| e.as_ref())
                    };
                    if let Err(reason) = ruma::state_res::check_state_dependent_auth_rules(
                        &rules.authorization,
                        &candidate,
                        fetch,
                    ) {
                        status = EventStatus::SoftFailed;
                        verdict = Some(reason);
                    }
                }
            }
        }
        if matches!(origin, Origin::Local) && status != EventStatus::Accepted {
            return Err(IngestError::Forbidden(verdict.unwrap_or_default()));
        }

        // State after: rejected events leave state as it was.
        let state_after = match (status, candidate.pdu.state_key_pair()) {
            (EventStatus::Rejected, _) | (_, None) => state_before,
            (_, Some(key)) => {
                let mut map = (*before.map).clone();
                map.insert(key, event_id.clone());
                self.new_group(map, state_before)
            }
        };
        let stream = (status == EventStatus::Accepted).then(|| {
            let s = self.next_stream;
            self.next_stream += 1;
            s
        });
        candidate.status = status;
        candidate.reason = verdict.clone();
        candidate.stream = stream;
        candidate.state_after = Some(state_after);
        let stored = Arc::new(candidate);
        batch.put(Table::Events, event_id.as_bytes(), stored.encode());
        let room_id = stored.pdu.room_id.clone();
        self.events.insert(event_id.clone(), stored.clone());

        let outcome = match status {
            EventStatus::Accepted => {
                let stream = stream.expect("accepted events get a stream position");
                batch.put(
                    Table::Timeline,
                    timeline_key(&room_id, stream),
                    event_id.as_bytes(),
                );
                if let Some(target) = relation_target(&stored.pdu) {
                    batch.put(
                        Table::Relations,
                        relation_key(&target, stream),
                        event_id.as_bytes(),
                    );
                }
                let room = match known_room {
                    None => RoomRecord {
                        room_id: room_id.clone(),
                        room_version: version,
                        create_event: event_id.clone(),
                        forward_extremities: vec![event_id.clone()],
                        current_state: state_after,
                    },
                    Some(mut room) => {
                        room.forward_extremities
                            .retain(|e| !stored.pdu.prev_events.contains(e));
                        room.forward_extremities.push(event_id.clone());
                        if room.forward_extremities.len() > MAX_FORWARD_EXTREMITIES {
                            let excess = room.forward_extremities.len() - MAX_FORWARD_EXTREMITIES;
                            room.forward_extremities.drain(..excess);
                        }
                        room.current_state = if room.forward_extremities.len() == 1 {
                            state_after
                        } else {
                            let groups = room
                                .forward_extremities
                                .iter()
                                .map(|e| {
                                    self.events
                                        .get(e)
                                        .and_then(|ev| ev.state_after)
                                        .ok_or_else(|| corrupt("extremity state"))
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            self.resolve_groups(store, &rules, groups).await?
                        };
                        room
                    }
                };
                batch.put(
                    Table::Rooms,
                    room_id.as_bytes(),
                    serde_json::to_vec(&room).expect("serialises"),
                );
                let before = self.rooms.get(&room_id).cloned();
                self.touched.entry(room_id.clone()).or_insert(before);
                self.rooms.insert(room_id.clone(), room);
                Outcome::Accepted { stream }
            }
            EventStatus::SoftFailed => Outcome::SoftFailed {
                reason: verdict.unwrap_or_default(),
            },
            EventStatus::Rejected => {
                tracing::info!(%event_id, reason = verdict.as_deref().unwrap_or(""), "event rejected");
                Outcome::Rejected {
                    reason: verdict.unwrap_or_default(),
                }
            }
            EventStatus::Outlier => unreachable!("not produced here"),
        };
        Ok(Received {
            event_id,
            room_id,
            outcome,
        })
    }

    /// Loads into the cache the events of `state` that authorising `pdu` may look at (the
    /// spec's auth event selection, plus the create event).
    async fn load_auth_state(
        &mut self,
        store: &dyn Store,
        pdu: &Pdu,
        rules: &RoomVersionRules,
        state: &StateMap,
        create: Option<&OwnedEventId>,
    ) -> Result<(), IngestError> {
        let mut keys = ruma::state_res::auth_types_for_event(
            &pdu.kind,
            &pdu.sender,
            pdu.state_key.as_deref(),
            &pdu.content,
            &rules.authorization,
        )
        .unwrap_or_default();
        keys.push((StateEventType::RoomCreate, String::new()));
        let ids: Vec<OwnedEventId> = keys
            .iter()
            .filter_map(|k| state.get(k).cloned())
            .chain(create.cloned())
            .collect();
        for id in ids {
            if self.load_event(store, &id).await?.is_none() {
                return Err(corrupt(format!("state names unknown event {id}")));
            }
        }
        Ok(())
    }

    /// Runs the state-independent rules and the state-dependent rules against the event's
    /// auth_events and against the state before it. Returns the reason for rejection, if any.
    fn authorise(
        &self,
        event: &StoredEvent,
        rules: &RoomVersionRules,
        before: &StateMap,
        create: Option<&OwnedEventId>,
    ) -> Option<String> {
        let pdu = &event.pdu;
        let fetch_event = |id: &EventId| self.events.get(id).map(|e| e.as_ref());
        if let Err(reason) = ruma::state_res::check_state_independent_auth_rules(
            &rules.authorization,
            event,
            fetch_event,
        ) {
            return Some(reason);
        }
        if pdu.kind == TimelineEventType::RoomCreate {
            return None;
        }
        // The auth_events as a state map (room version 12 implies the create event).
        let mut auth_state: HashMap<(StateEventType, String), &StoredEvent> = HashMap::new();
        for id in pdu.auth_events.iter().chain(create) {
            if let Some(ev) = self.events.get(id) {
                if let Some(key) = ev.pdu.state_key_pair() {
                    auth_state.insert(key, ev.as_ref());
                }
            }
        }
        let by_auth_events =
            |t: &StateEventType, k: &str| auth_state.get(&(t.clone(), k.to_owned())).copied();
        if let Err(reason) = ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            event,
            by_auth_events,
        ) {
            return Some(format!("auth events: {reason}"));
        }
        let by_state = |t: &StateEventType, k: &str| {
            before
                .get(&(t.clone(), k.to_owned()))
                .and_then(|id| self.events.get(id))
                .map(|e| e.as_ref())
        };
        if let Err(reason) =
            ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, event, by_state)
        {
            return Some(format!("state before event: {reason}"));
        }
        None
    }
}

/// Checks a PDU for a room this engine may not know (an invite to a room elsewhere): format,
/// origin signature and content hash, but no authorisation. Returns the parsed event.
pub fn verify_standalone(raw: &[u8], version: &RoomVersionId) -> Result<Pdu, IngestError> {
    if raw.len() > MAX_PDU_BYTES {
        return Err(IngestError::TooLarge(raw.len()));
    }
    let object: CanonicalJsonObject =
        serde_json::from_slice(raw).map_err(|e| IngestError::BadJson(e.to_string()))?;
    let rules = rules_for(version)
        .ok_or_else(|| IngestError::UnsupportedRoomVersion(version.to_string()))?;
    ruma::state_res::check_pdu_format(&object, &rules.event_format)
        .map_err(IngestError::BadFormat)?;
    let event_id = event_id_of(&object, &rules).map_err(IngestError::BadFormat)?;
    let object = verify_and_redact(&object, &rules)?;
    Pdu::from_canonical(event_id, &object).map_err(|e| IngestError::BadFormat(e.to_string()))
}

/// Step 1, the part that needs no room: size and JSON, and where the PDU belongs.
fn parse_pdu(raw: &[u8]) -> Result<Parsed, IngestError> {
    if raw.len() > MAX_PDU_BYTES {
        return Err(IngestError::TooLarge(raw.len()));
    }
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| IngestError::NotJson(e.to_string()))?;
    let object = match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => o,
        Ok(_) => return Err(IngestError::BadJson("a PDU is a JSON object".into())),
        Err(e) => return Err(IngestError::BadJson(e.to_string())),
    };
    let is_create =
        matches!(object.get("type"), Some(CanonicalJsonValue::String(t)) if t == "m.room.create");
    let belongs = if is_create {
        let v = match object.get("content") {
            Some(CanonicalJsonValue::Object(c)) => match c.get("room_version") {
                Some(CanonicalJsonValue::String(v)) => v.clone(),
                None => "1".to_owned(),
                Some(_) => {
                    return Err(IngestError::BadFormat(
                        "room_version is not a string".into(),
                    ))
                }
            },
            _ => {
                return Err(IngestError::BadFormat(
                    "create event without content".into(),
                ))
            }
        };
        let version = RoomVersionId::try_from(v.as_str())
            .map_err(|_| IngestError::UnsupportedRoomVersion(v.clone()))?;
        Belongs::NewRoom(version)
    } else {
        match object.get("room_id") {
            Some(CanonicalJsonValue::String(r)) => Belongs::Room(
                RoomId::parse(r).map_err(|e| IngestError::BadFormat(format!("room_id: {e}")))?,
            ),
            _ => return Err(IngestError::BadFormat("missing room_id".into())),
        }
    };
    Ok(Parsed { object, belongs })
}

/// The rest of step 1 (the room version's format) and the event id: pure, like [`parse_pdu`].
fn identify(placed: Placed) -> Result<Prepared, IngestError> {
    let Placed {
        object,
        version,
        rules,
        known_room,
    } = placed;
    ruma::state_res::check_pdu_format(&object, &rules.event_format)
        .map_err(IngestError::BadFormat)?;
    let event_id = event_id_of(&object, &rules).map_err(IngestError::BadFormat)?;
    Ok(Prepared {
        object,
        version,
        rules,
        known_room,
        event_id,
        checked: None,
    })
}

/// Whether `origin` refuses an event of `room` (`None`: a room the event would create).
fn outside_scope(origin: Origin<'_>, room: Option<&RoomRecord>) -> bool {
    match origin {
        Origin::Remote(scope) => match room {
            Some(room) => scope.room.as_ref().is_some_and(|r| *r != room.room_id),
            None => !scope.adopt,
        },
        Origin::Local => false,
    }
}

/// Steps 2 and 3, then the event parsed as the engine keeps it.
fn check_signed(
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
    event_id: &EventId,
) -> Result<Pdu, IngestError> {
    let object = verify_and_redact(object, rules)?;
    Pdu::from_canonical(event_id.to_owned(), &object)
        .map_err(|e| IngestError::BadFormat(e.to_string()))
}

/// Step 2 and 3 of the receipt checks: the origin's signature must verify against the key that
/// is its server name; a content-hash mismatch means the event is kept in redacted form.
fn verify_and_redact(
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<CanonicalJsonObject, IngestError> {
    let sender = match object.get("sender") {
        Some(CanonicalJsonValue::String(s)) => {
            UserId::parse(s.as_str()).map_err(|e| IngestError::BadFormat(format!("sender: {e}")))?
        }
        _ => return Err(IngestError::BadFormat("missing sender".into())),
    };
    let origin = ServerName::try_from(sender.server_name())
        .map_err(|e| IngestError::BadSignature(format!("origin {}: {e}", sender.server_name())))?;
    match ruma::signatures::verify_event(&origin.public_key_map(), object, rules) {
        Ok(Verified::All) => Ok(object.clone()),
        Ok(Verified::Signatures) => {
            tracing::info!("content hash mismatch: keeping the event redacted");
            ruma::canonical_json::redact(object.clone(), &rules.redaction, None)
                .map_err(|e| IngestError::BadFormat(format!("cannot redact: {e}")))
        }
        Err(e) => Err(IngestError::BadSignature(e.to_string())),
    }
}
