//! Ingest of pushed PDUs: one task, in arrival order, a burst of pushes at a time in one durable
//! commit; each push is answered once its PDUs are stored. Whatever the engine reports missing
//! is pulled from the peer that pushed it.

use libp2p::PeerId;
use ruma::{OwnedRoomId, RoomId};
use tokio::sync::mpsc;

use super::P2pNode;
use crate::engine::{IngestError, Outcome, Received, Scope};
use crate::net::protocol::{FedErrorCode, FedResponse};
use crate::net::{rt, ReplyTo};

/// Pushes waiting for the ingest task; past this a peer is told `LimitExceeded`.
pub const INBOUND_PUSHES: usize = 1024;
/// Most pushes one commit takes together.
const BURST: usize = 64;

/// PDUs a peer pushed for one room.
pub struct Inbound {
    pub(super) from: PeerId,
    pub(super) room_id: OwnedRoomId,
    pub(super) pdus: Vec<String>,
    /// Answered once stored (absent for a retry after catch-up).
    pub(super) reply: Option<ReplyTo>,
    /// Catch-ups already tried for these PDUs (bounded so a bad peer cannot loop us).
    pub(super) attempts: u8,
}

/// The room a PDU names, if it names one (v12 create events name none: they are never pushed).
fn named_room(pdu: &str) -> Option<OwnedRoomId> {
    #[derive(serde::Deserialize)]
    struct Shape {
        room_id: Option<OwnedRoomId>,
    }
    serde_json::from_str::<Shape>(pdu).ok()?.room_id
}

impl P2pNode {
    /// Queues a push for the ingest task, or answers why not.
    pub(super) fn take_push(
        &self,
        peer: PeerId,
        room_id: OwnedRoomId,
        pdus: Vec<String>,
        reply: ReplyTo,
    ) {
        let inbound = Inbound {
            from: peer,
            room_id,
            pdus,
            reply: Some(reply),
            attempts: 0,
        };
        if let Err(e) = self.shared.inbound.try_send(inbound) {
            tracing::warn!(%peer, "push queue full; push refused");
            if let Some(reply) = e.into_inner().reply {
                let response = FedResponse::error(FedErrorCode::LimitExceeded, "busy");
                self.shared.net.respond(reply, response);
            }
        }
    }

    /// Whether a push for `room_id` is one we take: the room is ours and every PDU names it.
    async fn push_acceptable(&self, item: &Inbound) -> Result<(), FedResponse> {
        let known = matches!(self.shared.engine.room(&item.room_id).await, Ok(Some(_)));
        if !known {
            tracing::info!(peer = %item.from, room_id = %item.room_id, "push for a room not held here refused");
            return Err(FedResponse::error(
                FedErrorCode::NotFound,
                "room unknown here",
            ));
        }
        let foreign = item
            .pdus
            .iter()
            .any(|p| named_room(p).as_deref() != Some(item.room_id.as_ref() as &RoomId));
        if foreign {
            tracing::warn!(peer = %item.from, room_id = %item.room_id, "push carries a PDU of another room; refused");
            return Err(FedResponse::error(
                FedErrorCode::BadRequest,
                "a push carries PDUs of its own room only",
            ));
        }
        Ok(())
    }
}

/// The ingest task.
pub(super) async fn ingest_loop(
    node: std::sync::Weak<super::Shared>,
    inbound: &mut mpsc::Receiver<Inbound>,
) {
    while let Some(first) = inbound.recv().await {
        let mut burst = vec![first];
        while burst.len() < BURST {
            match inbound.try_recv() {
                Ok(next) => burst.push(next),
                Err(_) => break,
            }
        }
        let Some(shared) = node.upgrade() else { return };
        let node = P2pNode { shared };
        let mut taken = Vec::new();
        for mut item in burst {
            match node.push_acceptable(&item).await {
                Ok(()) => taken.push(item),
                Err(response) => {
                    if let Some(reply) = item.reply.take() {
                        node.shared.net.respond(reply, response);
                    }
                }
            }
        }
        let refs: Vec<&[u8]> = taken
            .iter()
            .flat_map(|i| i.pdus.iter().map(|p| p.as_bytes()))
            .collect();
        // Each push was checked to be of a room held here and to carry only that room's PDUs.
        let results = match node
            .shared
            .engine
            .receive_batch_in(&Scope::known_rooms(), &refs)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store write failed; pushes refused (anti-entropy will refetch)");
                for item in taken {
                    if let Some(reply) = item.reply {
                        let response = FedResponse::error(FedErrorCode::Internal, "store failed");
                        node.shared.net.respond(reply, response);
                    }
                }
                continue;
            }
        };
        let mut results = results.into_iter();
        let mut stored = false;
        for item in taken {
            let mut missing = Vec::new();
            let mut retry = Vec::new();
            for pdu in &item.pdus {
                let Some(result) = results.next() else { break };
                match result {
                    Ok(Received {
                        outcome: Outcome::Accepted { .. } | Outcome::SoftFailed { .. },
                        ..
                    }) => stored = true,
                    Ok(Received {
                        outcome: Outcome::Duplicate,
                        ..
                    }) => {}
                    Ok(Received {
                        outcome: Outcome::Rejected { reason },
                        event_id,
                        ..
                    }) => {
                        stored = true;
                        tracing::warn!(peer = %item.from, %event_id, %reason, "peer pushed an unauthorised event");
                    }
                    Ok(Received {
                        outcome: Outcome::MissingEvents(ids),
                        ..
                    }) => {
                        missing.extend(ids);
                        retry.push(pdu.clone());
                    }
                    Err(IngestError::UnknownRoom(_)) => {}
                    Err(e) => {
                        tracing::warn!(peer = %item.from, error = %e, "peer pushed an invalid event")
                    }
                }
            }
            if let Some(reply) = item.reply {
                node.shared.net.respond(reply, FedResponse::Ok);
            }
            if !retry.is_empty() && item.attempts < 3 {
                let node = node.clone();
                let again = Inbound {
                    from: item.from,
                    room_id: item.room_id,
                    pdus: retry,
                    reply: None,
                    attempts: item.attempts + 1,
                };
                missing.sort();
                missing.dedup();
                rt::spawn(async move {
                    match node
                        .catch_up(again.from, &again.room_id, missing, None)
                        .await
                    {
                        Ok(_) => {
                            let _ = node.shared.inbound.send(again).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "catch-up failed"),
                    }
                });
            }
        }
        if stored {
            node.changed();
        }
    }
}
