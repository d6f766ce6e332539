//! Mallory: a hostile server of its own, for the attacks in the hostile-peer and fuzz tests.

use hyphae::engine::create_room::CreateRoom;
use hyphae::identity::Identity;
use hyphae::net::protocol::{FedRequest, FedResponse};
use ruma::{OwnedEventId, OwnedRoomId};
use serde_json::json;

use super::outsider::Outsider;

/// A hostile server of its own: an engine to sign rooms and events with, and an outsider swarm
/// under the same key that answers requests with `answer`.
pub struct Mallory {
    pub identity: Identity,
    pub engine: hyphae::engine::Engine,
    pub user: ruma::OwnedUserId,
}

impl Mallory {
    pub async fn new() -> Self {
        let identity = Identity::generate();
        let user = format!("@mallory:{}", identity.server_name())
            .try_into()
            .unwrap();
        let store = std::sync::Arc::new(hyphae::store::memory::MemoryStore::new());
        let engine = hyphae::engine::Engine::open(store).await.unwrap();
        Self {
            identity,
            engine,
            user,
        }
    }

    /// Rooms of Mallory's own, each as its PDUs (create first) and their ids.
    pub async fn rooms(&self, n: usize) -> Vec<(OwnedRoomId, Vec<String>, Vec<OwnedEventId>)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (room, ids) = self
                .engine
                .create_room(
                    &self.identity,
                    &self.user,
                    &CreateRoom::default(),
                    ruma::MilliSecondsSinceUnixEpoch::now(),
                )
                .await
                .unwrap();
            let mut pdus = Vec::new();
            for id in &ids {
                let ev = self.engine.event(id).await.unwrap().unwrap();
                pdus.push(ev.pdu.json.get().to_owned());
            }
            out.push((room, pdus, ids));
        }
        out
    }

    /// Joins `room` on the node `m` is connected to, as a server would: template, sign, send.
    pub async fn join(&self, m: &Outsider, room: &OwnedRoomId) -> Vec<OwnedEventId> {
        let r = m
            .ask(FedRequest::MakeJoin {
                room_id: room.clone(),
                user_id: self.user.clone(),
            })
            .await;
        let Ok(FedResponse::JoinTemplate { template, .. }) = r else {
            panic!("make_join: {r:?}")
        };
        let rules = hyphae::engine::pdu::rules_for(&template.room_version).unwrap();
        let (id, pdu) = hyphae::engine::pdu::build_signed(
            &self.identity,
            &rules,
            hyphae::engine::pdu::NewEvent {
                room_id: Some(room),
                sender: &self.user,
                kind: "m.room.member",
                state_key: Some(self.user.as_str()),
                content: json!({"membership": "join"}),
                prev_events: template.prev_events,
                auth_events: template.auth_events.clone(),
                depth: template.depth,
                origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
                redacts: None,
            },
        )
        .unwrap();
        let r = m
            .ask(FedRequest::SendJoin {
                pdu: String::from_utf8(pdu).unwrap(),
            })
            .await;
        assert!(matches!(r, Ok(FedResponse::Ok)), "send_join: {r:?}");
        let mut auth = template.auth_events;
        auth.push(id);
        auth
    }

    /// A well-signed message of Mallory's in `room` that hangs off events nobody has.
    pub fn dangling(
        &self,
        room: &OwnedRoomId,
        auth: &[OwnedEventId],
        n: usize,
        body: usize,
    ) -> String {
        let rules = hyphae::engine::pdu::rules_for(&ruma::RoomVersionId::V12).unwrap();
        let fake: OwnedEventId = format!("$dangling{n:0>37}").try_into().unwrap();
        let (_, pdu) = hyphae::engine::pdu::build_signed(
            &self.identity,
            &rules,
            hyphae::engine::pdu::NewEvent {
                room_id: Some(room),
                sender: &self.user,
                kind: "m.room.message",
                state_key: None,
                content: json!({"msgtype": "m.text", "body": "x".repeat(body)}),
                prev_events: vec![fake],
                auth_events: auth.to_vec(),
                depth: 10,
                origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
                redacts: None,
            },
        )
        .unwrap();
        String::from_utf8(pdu).unwrap()
    }
}
