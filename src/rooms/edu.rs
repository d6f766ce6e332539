//! EDUs: typing notices and read receipts, signed by the user's own server, pushed to the
//! servers joined to the room, and taken from peers only for users joined to the room here.

use libp2p::PeerId;
use ruma::{RoomId, UserId};

use super::visibility::{membership_in, Membership};
use super::{NodeError, P2pNode};
use crate::net::protocol::{Edu, FedErrorCode, FedResponse};

impl P2pNode {
    /// Tells the room's servers that `user` (of this server) is typing or stopped.
    pub fn send_typing(&self, room_id: &RoomId, user: &UserId, typing: bool) {
        self.publish_edu(Edu::Typing {
            room_id: room_id.to_owned(),
            user_id: user.to_owned(),
            typing,
        });
    }

    /// Tells the room's servers that `user` (of this server) has read up to `event_id`.
    pub fn send_receipt(&self, room_id: &RoomId, user: &UserId, event_id: &ruma::EventId) {
        self.publish_edu(Edu::Receipt {
            room_id: room_id.to_owned(),
            user_id: user.to_owned(),
            event_id: event_id.to_owned(),
        });
    }

    fn publish_edu(&self, edu: Edu) {
        let room_id = edu.room_id().to_owned();
        let signed = String::from_utf8(edu.sign(&self.shared.identity)).expect("JSON is UTF-8");
        let node = self.clone();
        crate::net::rt::spawn(async move { node.push_edu(&room_id, signed).await });
    }

    /// An EDU a peer pushed: kept only if signed by the user's server, for a room known here,
    /// and for a user joined to it.
    pub(super) async fn take_edu(&self, peer: PeerId, raw: &str) -> Result<FedResponse, NodeError> {
        let edu = match Edu::verify(raw.as_bytes()) {
            Ok(edu) => edu,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "invalid EDU refused");
                return Ok(FedResponse::error(FedErrorCode::BadRequest, e));
            }
        };
        let engine = &self.shared.engine;
        let joined = match engine.current_state_map(edu.room_id()).await? {
            Some(state) => membership_in(engine, &state, edu.user_id()).await? == Membership::Join,
            None => false,
        };
        if !joined {
            tracing::info!(%peer, room_id = %edu.room_id(), user = %edu.user_id(), "EDU for a user not joined here dropped");
            return Ok(FedResponse::error(
                FedErrorCode::NotFound,
                "room unknown here",
            ));
        }
        let _ = self.shared.edus.send(edu);
        Ok(FedResponse::Ok)
    }
}
