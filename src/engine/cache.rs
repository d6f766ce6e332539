//! The engine's event cache: least recently used events are dropped once the cache holds more
//! than its byte budget. Trimmed only between operations (see `Inner::trim`), so an event
//! loaded during one ingest stays until that ingest is done.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use ruma::{EventId, OwnedEventId};

use super::pdu::StoredEvent;

/// Bytes of events kept in memory (their JSON plus bookkeeping).
#[cfg(not(target_arch = "wasm32"))]
pub const EVENT_CACHE_BYTES: usize = 64 << 20;
#[cfg(target_arch = "wasm32")]
pub const EVENT_CACHE_BYTES: usize = 24 << 20;
/// State groups and memoised resolutions kept in memory (state maps share structure, so these
/// are counted, not weighed).
pub const MAX_CACHED_GROUPS: usize = 4096;
pub const MAX_CACHED_RESOLUTIONS: usize = 4096;

/// What an event costs beyond its JSON: ids, parsed fields, the map entry.
const PER_EVENT_OVERHEAD: usize = 512;

#[derive(Default)]
pub(super) struct EventCache {
    map: HashMap<OwnedEventId, (Arc<StoredEvent>, Cell<u64>)>,
    bytes: usize,
    clock: Cell<u64>,
}

/// What an event holds in memory: its JSON, and its content again as a value of its own.
fn weight(ev: &StoredEvent) -> usize {
    ev.pdu.json.get().len() + ev.pdu.content.get().len() + PER_EVENT_OVERHEAD
}

impl EventCache {
    pub(super) fn get(&self, id: &EventId) -> Option<&Arc<StoredEvent>> {
        let (ev, used) = self.map.get(id)?;
        let now = self.clock.get() + 1;
        self.clock.set(now);
        used.set(now);
        Some(ev)
    }

    pub(super) fn contains_key(&self, id: &EventId) -> bool {
        self.map.contains_key(id)
    }

    pub(super) fn insert(&mut self, id: OwnedEventId, ev: Arc<StoredEvent>) {
        let now = self.clock.get() + 1;
        self.clock.set(now);
        self.bytes += weight(&ev);
        if let Some((old, _)) = self.map.insert(id, (ev, Cell::new(now))) {
            self.bytes -= weight(&old);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Drops the least recently used events until the cache is within three quarters of
    /// `budget` (so trimming is rare, not once per event).
    pub(super) fn trim(&mut self, budget: usize) {
        if self.bytes <= budget {
            return;
        }
        let mut by_use: Vec<(u64, OwnedEventId)> = self
            .map
            .iter()
            .map(|(id, (_, used))| (used.get(), id.clone()))
            .collect();
        by_use.sort_unstable_by_key(|(used, _)| *used);
        let target = budget / 4 * 3;
        for (_, id) in by_use {
            if self.bytes <= target {
                break;
            }
            if let Some((ev, _)) = self.map.remove(&id) {
                self.bytes -= weight(&ev);
            }
        }
    }
}
