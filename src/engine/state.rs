//! Room state as state groups: every distinct state (before or after some event) gets a numeric
//! group id. In memory a group is a persistent map that shares structure with its parent, so a
//! thousand membership changes cost a thousand small deltas, not a thousand full copies. On disk a
//! group is a delta against its parent, with a full snapshot every [`SNAPSHOT_EVERY`] links so
//! loading never walks a long chain.

use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::OwnedEventId;
use serde::{Deserialize, Serialize};

/// `(event type, state key)`.
pub type StateKey = (StateEventType, String);
/// A room state: which event holds each state key.
pub type StateMap = imbl::HashMap<StateKey, OwnedEventId>;

/// The state before the create event: nothing. Never stored.
pub const EMPTY_GROUP: u64 = 0;
/// Chain length after which a group is stored as a full snapshot.
pub const SNAPSHOT_EVERY: u32 = 64;

#[derive(Clone)]
pub struct StateGroup {
    pub map: Arc<StateMap>,
    /// Links to the nearest stored snapshot (0 for a snapshot).
    pub chain: u32,
}

/// The stored form of a state group.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateGroupRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
    /// `(type, state_key, event id or null for removal)`.
    pub delta: Vec<(String, String, Option<OwnedEventId>)>,
}

/// The record storing `map` as a delta against `parent` (or as a snapshot).
pub fn record_for(map: &StateMap, parent: Option<(u64, &StateGroup)>) -> (StateGroupRecord, u32) {
    match parent {
        Some((id, group)) if group.chain + 1 < SNAPSHOT_EVERY => {
            let mut delta = Vec::new();
            for (k, v) in map.iter() {
                if group.map.get(k) != Some(v) {
                    delta.push((k.0.to_string(), k.1.clone(), Some(v.clone())));
                }
            }
            for k in group.map.keys() {
                if !map.contains_key(k) {
                    delta.push((k.0.to_string(), k.1.clone(), None));
                }
            }
            (
                StateGroupRecord {
                    parent: Some(id),
                    delta,
                },
                group.chain + 1,
            )
        }
        _ => {
            let delta = map
                .iter()
                .map(|((t, k), v)| (t.to_string(), k.clone(), Some(v.clone())))
                .collect();
            (
                StateGroupRecord {
                    parent: None,
                    delta,
                },
                0,
            )
        }
    }
}

/// Applies a stored delta to its parent's map.
pub fn apply_record(parent: Option<&StateMap>, record: &StateGroupRecord) -> StateMap {
    let mut map = parent.cloned().unwrap_or_default();
    for (t, k, v) in &record.delta {
        let key = (StateEventType::from(t.as_str()), k.clone());
        match v {
            Some(id) => {
                map.insert(key, id.clone());
            }
            None => {
                map.remove(&key);
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, k: &str) -> StateKey {
        (t.into(), k.into())
    }

    #[test]
    fn deltas_round_trip() {
        let mut base = StateMap::new();
        base.insert(key("m.room.create", ""), "$a".try_into().unwrap());
        base.insert(key("m.room.topic", ""), "$b".try_into().unwrap());
        let parent = StateGroup {
            map: Arc::new(base.clone()),
            chain: 3,
        };
        let mut next = base.clone();
        next.insert(key("m.room.topic", ""), "$c".try_into().unwrap());
        next.remove(&key("m.room.create", ""));
        next.insert(key("m.room.member", "@u:x"), "$d".try_into().unwrap());
        let (record, chain) = record_for(&next, Some((5, &parent)));
        assert_eq!(chain, 4);
        assert_eq!(record.parent, Some(5));
        assert_eq!(record.delta.len(), 3);
        assert_eq!(apply_record(Some(&base), &record), next);

        let deep = StateGroup {
            map: Arc::new(base.clone()),
            chain: SNAPSHOT_EVERY - 1,
        };
        let (record, chain) = record_for(&next, Some((5, &deep)));
        assert_eq!((record.parent, chain), (None, 0));
        assert_eq!(apply_record(None, &record), next);
    }
}
