//! State resolution over events already in memory: builds the auth chains and the conflicted
//! state subgraph ruma's resolver needs, then runs `ruma::state_res::resolve` (v2 / v2.1).
//!
//! Pure: no I/O. The engine loads every event these functions may touch before calling them.

use std::collections::{HashMap, HashSet};

use ruma::room_version_rules::RoomVersionRules;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId};

use super::pdu::StoredEvent;
use super::state::StateMap;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("room version has no state resolution v2 rules")]
    Unsupported,
    #[error("event {0} needed for state resolution is not loaded")]
    Missing(OwnedEventId),
    #[error("state resolution failed: {0}")]
    Ruma(String),
}

/// Every event reachable from `roots` through `auth_events` (excluding the roots themselves
/// unless reachable from another root).
pub fn auth_chain<'a, 'r, F>(
    roots: impl IntoIterator<Item = &'r OwnedEventId>,
    fetch: &F,
) -> Result<HashSet<OwnedEventId>, ResolveError>
where
    F: Fn(&EventId) -> Option<&'a StoredEvent>,
{
    let mut chain = HashSet::new();
    let mut stack: Vec<&OwnedEventId> = Vec::new();
    for root in roots {
        let ev = fetch(root).ok_or_else(|| ResolveError::Missing(root.clone()))?;
        stack.extend(ev.pdu.auth_events.iter());
    }
    while let Some(id) = stack.pop() {
        if chain.contains(id) {
            continue;
        }
        let ev = fetch(id).ok_or_else(|| ResolveError::Missing(id.clone()))?;
        stack.extend(ev.pdu.auth_events.iter());
        chain.insert(id.clone());
    }
    Ok(chain)
}

/// The conflicted state subgraph (room version 12): events that are, through `auth_events`,
/// both reachable from a conflicted event and able to reach a conflicted event. Conflicted
/// events themselves are included (they are in the full conflicted set anyway).
pub fn conflicted_subgraph<'a, F>(
    conflicted: &HashSet<OwnedEventId>,
    fetch: &F,
) -> EventIdSet<OwnedEventId>
where
    F: Fn(&EventId) -> Option<&'a StoredEvent>,
{
    let parents = |id: &EventId| {
        fetch(id)
            .map(|ev| ev.pdu.auth_events.as_slice())
            .unwrap_or_default()
    };
    // For every event below a conflicted event: does a conflicted event lie below it?
    // Iterative post-order walk, since auth chains can be thousands of events deep.
    let mut reaches: HashMap<OwnedEventId, bool> = HashMap::new();
    for start in conflicted {
        let mut stack = vec![(start.clone(), false)];
        while let Some((id, expanded)) = stack.pop() {
            if reaches.contains_key(&id) {
                continue;
            }
            if expanded {
                let r = parents(&id)
                    .iter()
                    .any(|p| conflicted.contains(p) || reaches.get(p).copied().unwrap_or(false));
                reaches.insert(id, r);
            } else {
                stack.push((id.clone(), true));
                for p in parents(&id) {
                    if !reaches.contains_key(p) {
                        stack.push((p.clone(), false));
                    }
                }
            }
        }
    }
    reaches
        .into_iter()
        .filter(|(id, r)| *r || conflicted.contains(id))
        .map(|(id, _)| id)
        .collect()
}

/// Resolves several room states into one.
pub fn resolve<'a, F>(
    rules: &RoomVersionRules,
    states: &[&StateMap],
    fetch: F,
) -> Result<StateMap, ResolveError>
where
    F: Fn(&EventId) -> Option<&'a StoredEvent>,
{
    let v2 = rules
        .state_res
        .v2_rules()
        .ok_or(ResolveError::Unsupported)?;
    let maps: Vec<ruma::state_res::StateMap<OwnedEventId>> = states
        .iter()
        .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .collect();
    let mut auth_chains = Vec::with_capacity(maps.len());
    for map in &maps {
        let mut chain = auth_chain(map.values(), &fetch)?;
        chain.extend(map.values().cloned());
        auth_chains.push(chain.into_iter().collect::<EventIdSet<OwnedEventId>>());
    }
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        v2,
        &maps,
        auth_chains,
        |id| fetch(id),
        |conflicted_set| {
            let conflicted: HashSet<OwnedEventId> =
                conflicted_set.values().flatten().cloned().collect();
            Some(conflicted_subgraph(&conflicted, &fetch))
        },
    )
    .map_err(|e| ResolveError::Ruma(e.to_string()))?;
    Ok(resolved.into_iter().collect())
}
