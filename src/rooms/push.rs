//! Push: new PDUs and EDUs of a room go straight to the peers of the room's member servers over
//! the authenticated request-response protocol (a server name is a PeerId, so the recipient is
//! the server it claims to be). Who gets an event is decided from the room's membership at that
//! event: the servers with a user joined after it, plus the server whose user it changes (so a
//! user who leaves or is kicked learns of it). Nobody else ever receives it. A server that is
//! not reachable now gets it through anti-entropy when it next connects.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ruma::{OwnedEventId, RoomId, UserId};

use super::visibility::joined_servers;
use super::P2pNode;
use crate::identity::ServerName;
use crate::net::protocol::{FedRequest, MAX_PUSH_PDUS, MAX_REQUEST_BYTES};
use crate::net::rt;

/// Room for the CBOR framing of a push beside its PDUs.
const PUSH_OVERHEAD: usize = 16 * 1024;

impl P2pNode {
    /// Pushes accepted events of one room to its member servers, in the order given, batched
    /// per server. Returns once the pushes are on their way; each answer marks its events
    /// delivered.
    pub(super) async fn push_events(&self, room_id: &RoomId, event_ids: &[OwnedEventId]) {
        let engine = &self.shared.engine;
        let me = self.server_name();
        let events = match engine.events_with_state_after(event_ids).await {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "cannot read events to push; anti-entropy will deliver them");
                return;
            }
        };
        let mut per_server: BTreeMap<ServerName, Vec<(OwnedEventId, String)>> = BTreeMap::new();
        // Consecutive events mostly share the state after them: work out its servers once
        // per state group.
        let mut servers_at: HashMap<u64, BTreeSet<ServerName>> = HashMap::new();
        for (ev, after) in events {
            let Some(group) = ev.state_after else {
                continue;
            };
            let mut servers = match servers_at.get(&group) {
                Some(s) => s.clone(),
                None => match joined_servers(engine, &after).await {
                    Ok(s) => servers_at.entry(group).or_insert(s).clone(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the room's servers; not pushed");
                        continue;
                    }
                },
            };
            if ev.pdu.kind.to_string() == "m.room.member" {
                if let Some(server) = ev
                    .pdu
                    .state_key
                    .as_deref()
                    .and_then(|k| UserId::parse(k).ok())
                    .and_then(|u| ServerName::try_from(u.server_name()).ok())
                {
                    servers.insert(server);
                }
            }
            servers.remove(&me);
            for server in servers {
                per_server
                    .entry(server)
                    .or_default()
                    .push((ev.pdu.event_id.clone(), ev.pdu.json.get().to_owned()));
            }
        }
        for (server, events) in per_server {
            for chunk in chunks(events) {
                let node = self.clone();
                let room_id = room_id.to_owned();
                rt::spawn(async move {
                    let (ids, pdus): (Vec<_>, Vec<_>) = chunk.into_iter().unzip();
                    let peer = server.peer_id();
                    let request = FedRequest::Push { room_id, pdus };
                    match node.request_with(peer, request, true).await {
                        Ok(_) => {
                            let mut delivered = node.shared.delivered.lock().expect("not poisoned");
                            let mut news = false;
                            for id in ids {
                                news |= delivered.insert(id);
                            }
                            drop(delivered);
                            // The first member server to store an event is news for the
                            // page ("delivered"); the others are not worth waking anyone.
                            if news {
                                node.changed();
                            }
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "push not delivered (anti-entropy will)")
                        }
                    }
                });
            }
        }
    }

    /// Pushes a signed EDU to the servers with a user joined to its room now. Ephemeral: no
    /// retry.
    pub(super) async fn push_edu(&self, room_id: &RoomId, edu: String) {
        let engine = &self.shared.engine;
        let Ok(Some(state)) = engine.current_state_map(room_id).await else {
            return;
        };
        let Ok(mut servers) = joined_servers(engine, &state).await else {
            return;
        };
        servers.remove(&self.server_name());
        for server in servers {
            let node = self.clone();
            let request = FedRequest::Edu { edu: edu.clone() };
            rt::spawn(async move {
                if let Err(e) = node.request_with(server.peer_id(), request, false).await {
                    tracing::debug!(%server, error = %e, "EDU not delivered");
                }
            });
        }
    }
}

/// Splits a server's events into pushes within the protocol's count and byte limits.
fn chunks(events: Vec<(OwnedEventId, String)>) -> Vec<Vec<(OwnedEventId, String)>> {
    let mut out: Vec<Vec<(OwnedEventId, String)>> = Vec::new();
    let mut bytes = 0;
    for event in events {
        let size = event.1.len() + 16;
        let full = out.last().is_none_or(|c| {
            c.len() >= MAX_PUSH_PDUS || bytes + size > MAX_REQUEST_BYTES - PUSH_OVERHEAD
        });
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        out.last_mut().expect("just pushed").push(event);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_stay_within_count_and_byte_limits() {
        let id = OwnedEventId::try_from("$a").unwrap();
        let small: Vec<_> = (0..250).map(|_| (id.clone(), "x".repeat(100))).collect();
        let sizes: Vec<usize> = chunks(small).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        let big: Vec<_> = (0..40).map(|_| (id.clone(), "x".repeat(60_000))).collect();
        let out = chunks(big);
        assert!(out.len() >= 3);
        for c in &out {
            let bytes: usize = c.iter().map(|e| e.1.len() + 16).sum();
            assert!(bytes <= MAX_REQUEST_BYTES - PUSH_OVERHEAD);
        }
        assert_eq!(out.iter().map(Vec::len).sum::<usize>(), 40);
    }
}
