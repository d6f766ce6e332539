//! EDUs: typing notices and read receipts, signed by the user's own server, pushed to the
//! servers joined to the room, and taken from peers only when signed by the user's server alone,
//! fresh, newer than the last one heard for that user, about an event in the room, for a user
//! joined to it, and within the origin server's EDU budget.

use std::collections::HashMap;

use libp2p::PeerId;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::visibility::{membership_in, Membership};
use super::{NodeError, P2pNode};
use crate::net::protocol::{Edu, FedErrorCode, FedResponse};
use crate::net::rt::Instant;

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

    /// An EDU a peer pushed. Anything refused is logged and changes nothing.
    pub(super) async fn take_edu(&self, peer: PeerId, raw: &str) -> Result<FedResponse, NodeError> {
        match self.check_edu(raw).await? {
            Ok(edu) => {
                let _ = self.shared.edus.send(edu);
                Ok(FedResponse::Ok)
            }
            Err((code, reason)) => {
                tracing::warn!(%peer, reason, "EDU refused");
                Ok(FedResponse::error(code, reason))
            }
        }
    }

    async fn check_edu(&self, raw: &str) -> Result<Result<Edu, (FedErrorCode, String)>, NodeError> {
        let bad = |reason: String| Ok(Err((FedErrorCode::BadRequest, reason)));
        let (edu, ts) = match Edu::verify(raw.as_bytes()) {
            Ok(v) => v,
            Err(e) => return bad(e),
        };
        // This server speaks for its own users; nobody else does.
        if edu.user_id().server_name().as_str() == self.server_name().to_string() {
            return bad("EDU about a user of this server".into());
        }
        let now_ms: u64 = super::now().get().into();
        if ts.abs_diff(now_ms) > EDU_MAX_SKEW_MS {
            return bad(format!(
                "EDU ts {ts} is not within {EDU_MAX_SKEW_MS} ms of now"
            ));
        }
        let engine = &self.shared.engine;
        let Some(state) = engine.current_state_map(edu.room_id()).await? else {
            return Ok(Err((FedErrorCode::NotFound, "room unknown here".into())));
        };
        if membership_in(engine, &state, edu.user_id()).await? != Membership::Join {
            return Ok(Err((FedErrorCode::NotFound, "room unknown here".into())));
        }
        if let Edu::Receipt { event_id, .. } = &edu {
            let in_room = engine
                .event(event_id)
                .await?
                .is_some_and(|ev| ev.pdu.room_id == edu.room_id());
            if !in_room {
                return bad(format!("receipt for {event_id}, which is not in the room"));
            }
        }
        let verdict = self
            .shared
            .edu_guard
            .lock()
            .expect("EDU guard")
            .admit(&edu, ts, now_ms);
        Ok(verdict.map(|()| edu))
    }
}

/// How far an EDU's `ts` may be from this node's clock (peers' clocks differ a little).
pub(crate) const EDU_MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// EDUs per second an origin server may send on average, and in a burst.
pub(crate) const EDUS_PER_SECOND: f64 = 20.0;
pub(crate) const EDU_BURST: f64 = 40.0;
/// Most (room, user, kind) entries remembered for replay detection.
const MAX_REMEMBERED: usize = 100_000;

/// Replay detection and the per-origin EDU budget.
#[derive(Default)]
pub(crate) struct EduGuard {
    /// The newest `ts` accepted per (room, user, kind): an EDU must be newer.
    last: HashMap<(OwnedRoomId, OwnedUserId, bool), u64>,
    budgets: HashMap<String, (f64, Instant)>,
}

impl EduGuard {
    fn admit(&mut self, edu: &Edu, ts: u64, now_ms: u64) -> Result<(), (FedErrorCode, String)> {
        let origin = edu.user_id().server_name().to_string();
        let now = Instant::now();
        let (tokens, at) = self.budgets.entry(origin).or_insert((EDU_BURST, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * EDUS_PER_SECOND).min(EDU_BURST);
        *at = now;
        if *tokens < 1.0 {
            return Err((FedErrorCode::LimitExceeded, "EDU rate exceeded".into()));
        }
        let key = (
            edu.room_id().to_owned(),
            edu.user_id().to_owned(),
            matches!(edu, Edu::Typing { .. }),
        );
        if self.last.get(&key).is_some_and(|last| ts <= *last) {
            return Err((
                FedErrorCode::BadRequest,
                format!("EDU ts {ts} replayed or out of order"),
            ));
        }
        *tokens -= 1.0;
        if self.last.len() >= MAX_REMEMBERED {
            // Entries older than the skew window cannot be replayed any more: a stale EDU fails
            // the freshness check first.
            self.last
                .retain(|_, t| now_ms.saturating_sub(*t) <= EDU_MAX_SKEW_MS);
            let full = now
                .checked_sub(std::time::Duration::from_secs(2))
                .unwrap_or(now);
            self.budgets.retain(|_, (_, at)| *at > full);
        }
        if self.last.len() >= MAX_REMEMBERED {
            return Err((FedErrorCode::LimitExceeded, "too many EDUs".into()));
        }
        self.last.insert(key, ts);
        Ok(())
    }
}
