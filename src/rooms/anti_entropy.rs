//! Anti-entropy: with a peer whose server is in a room, compare the room's forward extremities
//! and fetch what we lack. Push is the fast path; this makes delivery complete for peers that
//! were away. Only rooms the peer's server is joined to are ever named to it.

use libp2p::PeerId;

use super::visibility::ServerView;
use super::{NodeError, P2pNode};
use crate::identity::ServerName;
use crate::net::protocol::{FedRequest, FedResponse, MAX_IDS_PER_REQUEST};

impl P2pNode {
    pub(super) async fn anti_entropy_logged(&self, peer: PeerId) {
        if let Err(e) = self.anti_entropy(peer).await {
            tracing::debug!(%peer, error = %e, "anti-entropy round failed");
        }
    }

    /// Compares forward extremities with `peer` for every room its server is in, and pulls
    /// what we lack.
    async fn anti_entropy(&self, peer: PeerId) -> Result<(), NodeError> {
        let Some(server) = ServerName::from_peer_id(&peer) else {
            return Ok(());
        };
        let engine = &self.shared.engine;
        for room_id in engine.rooms().await? {
            let shares_room = ServerView::new(engine, &room_id, &server)
                .await?
                .is_some_and(|v| v.in_room());
            if !shares_room {
                continue;
            }
            let request = FedRequest::Extremities {
                room_id: room_id.clone(),
            };
            let ids = match self.request_with(peer, request, false).await {
                Ok(FedResponse::Extremities { event_ids }) => event_ids,
                Ok(_) | Err(NodeError::Refused(..)) => continue,
                Err(e) => return Err(e),
            };
            let mut unknown = Vec::new();
            // An honest room has a handful of extremities; a peer answering thousands of ids
            // gets the first ones looked at.
            for id in ids.into_iter().take(MAX_IDS_PER_REQUEST) {
                if engine.event(&id).await?.is_none() {
                    unknown.push(id);
                }
            }
            if !unknown.is_empty() {
                let n = self.catch_up(peer, &room_id, unknown, None).await?;
                tracing::info!(%peer, %room_id, events = n, "anti-entropy caught up");
            }
        }
        Ok(())
    }
}
