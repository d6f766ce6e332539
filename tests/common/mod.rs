//! Helpers shared by the test files: signed-event builders for simulated peers, and the store
//! conformance suite that runs on every backend.
#![allow(dead_code)]

pub mod client;
pub mod conformance;
#[cfg(not(target_arch = "wasm32"))]
pub mod in_process;
#[cfg(not(target_arch = "wasm32"))]
pub mod mallory;
#[cfg(not(target_arch = "wasm32"))]
pub mod node_process;
#[cfg(not(target_arch = "wasm32"))]
pub mod outsider;
#[cfg(not(target_arch = "wasm32"))]
pub mod peers;
#[cfg(target_arch = "wasm32")]
pub mod tab_fetch;
#[cfg(target_arch = "wasm32")]
pub mod tabs;
pub mod workload;

use std::collections::BTreeMap;

use hyphae::engine::pdu::{build_signed, rules_for, NewEvent};
use hyphae::engine::{Engine, Outcome};
use hyphae::identity::Identity;
use ruma::events::TimelineEventType;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt};
use serde_json::Value;

pub fn ts(ms: u64) -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch(UInt::new(ms).expect("small"))
}

/// A simulated remote server with one user on it.
pub struct Peer {
    pub identity: Identity,
    pub user: OwnedUserId,
}

impl Peer {
    pub fn new(seed: u8, localpart: &str) -> Self {
        let identity = Identity::from_seed([seed; 32]);
        let user = format!("@{localpart}:{}", identity.server_name())
            .try_into()
            .expect("valid user id");
        Self { identity, user }
    }
}

/// Builds a signed event by `peer` on top of `prev_events`, choosing auth_events from the state
/// after the first prev event as `engine` knows it.
#[allow(clippy::too_many_arguments)]
pub async fn event_on(
    engine: &Engine,
    peer: &Peer,
    room_id: &RoomId,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
    prev_events: &[OwnedEventId],
    at: u64,
) -> (OwnedEventId, Vec<u8>) {
    let room = engine
        .room(room_id)
        .await
        .unwrap()
        .expect("room known to the builder engine");
    let rules = rules_for(&room.room_version).unwrap();
    let state = engine
        .state_after(&prev_events[0])
        .await
        .unwrap()
        .expect("prev event has state");
    let mut depth = 0;
    for p in prev_events {
        depth = depth.max(
            engine
                .event(p)
                .await
                .unwrap()
                .expect("prev known")
                .pdu
                .depth,
        );
    }
    let raw_content = serde_json::value::to_raw_value(&content).unwrap();
    let types = ruma::state_res::auth_types_for_event(
        &TimelineEventType::from(kind),
        &peer.user,
        state_key,
        &raw_content,
        &rules.authorization,
    )
    .unwrap();
    let mut auth: Vec<OwnedEventId> = types
        .iter()
        .filter_map(|(t, k)| state.get(&(t.to_string(), k.clone())).cloned())
        .collect();
    auth.sort();
    auth.dedup();
    build_signed(
        &peer.identity,
        &rules,
        NewEvent {
            room_id: Some(room_id),
            sender: &peer.user,
            kind,
            state_key,
            content,
            prev_events: prev_events.to_vec(),
            auth_events: auth,
            depth: depth + 1,
            origin_server_ts: ts(at),
            redacts: None,
        },
    )
    .expect("builds")
}

/// The canonical JSON of a stored event, as a peer would receive it.
pub async fn raw(engine: &Engine, id: &ruma::EventId) -> Vec<u8> {
    let ev = engine.event(id).await.unwrap().expect("event stored");
    ev.pdu.json.get().as_bytes().to_vec()
}

/// The content of the current state event `(kind, state_key)` of a room (which must exist), if
/// there is one.
pub async fn state_content(
    engine: &Engine,
    room: &RoomId,
    kind: &str,
    state_key: &str,
) -> Option<Value> {
    let state = engine
        .current_state(room)
        .await
        .unwrap()
        .expect("room exists");
    let id = state.get(&(kind.to_owned(), state_key.to_owned()))?;
    let ev = engine.event(id).await.unwrap().expect("state event stored");
    Some(serde_json::from_str(ev.pdu.content.get()).expect("content is JSON"))
}

/// Re-signs `raw` (an event `peer` built in a room-version-12 room) with other prev_events: a
/// well-signed event that points wherever a test wants.
pub fn with_prev_events(
    peer: &Peer,
    raw: &[u8],
    prev_events: Vec<OwnedEventId>,
) -> (OwnedEventId, Vec<u8>) {
    let v: Value = serde_json::from_slice(raw).unwrap();
    let rules = rules_for(&ruma::RoomVersionId::V12).unwrap();
    let room_id: OwnedRoomId = v["room_id"].as_str().unwrap().try_into().unwrap();
    build_signed(
        &peer.identity,
        &rules,
        NewEvent {
            room_id: Some(&room_id),
            sender: &peer.user,
            kind: v["type"].as_str().unwrap(),
            state_key: v["state_key"].as_str(),
            content: v["content"].clone(),
            prev_events,
            auth_events: serde_json::from_value(v["auth_events"].clone()).unwrap(),
            depth: v["depth"].as_u64().unwrap(),
            origin_server_ts: ts(v["origin_server_ts"].as_u64().unwrap()),
            redacts: None,
        },
    )
    .expect("builds")
}

/// Delivers `raw` and expects it to be accepted.
pub async fn accept(engine: &Engine, raw: &[u8]) -> OwnedEventId {
    let r = engine.receive(raw).await.expect("valid event");
    assert!(
        matches!(r.outcome, Outcome::Accepted { .. }),
        "expected acceptance, got {:?}",
        r.outcome
    );
    r.event_id
}

/// A comparable picture of a room: current state, sorted extremities, timeline ids.
#[derive(Debug, PartialEq, Eq)]
pub struct RoomPicture {
    pub state: BTreeMap<(String, String), OwnedEventId>,
    pub extremities: Vec<OwnedEventId>,
    pub timeline: Vec<OwnedEventId>,
}

pub async fn picture(engine: &Engine, room_id: &RoomId) -> RoomPicture {
    let room = engine.room(room_id).await.unwrap().expect("room exists");
    let mut extremities = room.forward_extremities.clone();
    extremities.sort();
    let timeline = engine
        .timeline(room_id, None, hyphae::store::Direction::Forward, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.pdu.event_id.clone())
        .collect();
    RoomPicture {
        state: engine.current_state(room_id).await.unwrap().unwrap(),
        extremities,
        timeline,
    }
}

/// The room ids of every room an engine holds, sorted.
pub async fn room_ids(engine: &Engine) -> Vec<OwnedRoomId> {
    let mut ids = engine.rooms().await.unwrap();
    ids.sort();
    ids
}

/// Every room of an engine as JSON (for comparing stores across processes and targets).
pub async fn summary(engine: &Engine) -> Value {
    let mut rooms = Vec::new();
    for room in room_ids(engine).await {
        let p = picture(engine, &room).await;
        let state: Vec<(String, String, String)> = p
            .state
            .into_iter()
            .map(|((t, k), v)| (t, k, v.to_string()))
            .collect();
        rooms.push(serde_json::json!({
            "room_id": room,
            "state": state,
            "forward_extremities": p.extremities,
            "timeline": p.timeline,
        }));
    }
    let identity = Identity::load_or_create(engine.store().as_ref())
        .await
        .unwrap();
    serde_json::json!({ "server_name": identity.server_name().to_string(), "rooms": rooms })
}

/// Fills an engine with a small but complete history: a room made by the local user, a remote
/// member joining and both talking, and a rejected event.
pub async fn sample_history(engine: &Engine) {
    let local = Identity::load_or_create(engine.store().as_ref())
        .await
        .unwrap();
    let alice: OwnedUserId = format!("@alice:{}", local.server_name())
        .try_into()
        .unwrap();
    let bob = Peer::new(2, "bob");
    let carol = Peer::new(3, "carol");
    let opts = hyphae::engine::create_room::CreateRoom {
        preset: hyphae::engine::create_room::Preset::PublicChat,
        name: Some("Sample".into()),
        topic: Some("exported and imported".into()),
        ..Default::default()
    };
    let (room, _) = engine
        .create_room(&local, &alice, &opts, ts(1000))
        .await
        .unwrap();
    let head = engine
        .room(&room)
        .await
        .unwrap()
        .unwrap()
        .forward_extremities[0]
        .clone();
    let (_, join) = event_on(
        engine,
        &bob,
        &room,
        "m.room.member",
        Some(bob.user.as_str()),
        serde_json::json!({"membership": "join"}),
        &[head],
        1001,
    )
    .await;
    let mut head = accept(engine, &join).await;
    for i in 0..20u64 {
        let body = serde_json::json!({"msgtype": "m.text", "body": format!("bob {i}")});
        let (_, raw) = event_on(
            engine,
            &bob,
            &room,
            "m.room.message",
            None,
            body,
            &[head.clone()],
            1100 + i,
        )
        .await;
        accept(engine, &raw).await;
        let r = engine
            .send(
                &local,
                &room,
                &alice,
                "m.room.message",
                None,
                serde_json::json!({"msgtype": "m.text", "body": format!("alice {i}")}),
                ts(1200 + i),
            )
            .await
            .unwrap();
        head = r.event_id;
    }
    let (_, intruder) = event_on(
        engine,
        &carol,
        &room,
        "m.room.message",
        None,
        serde_json::json!({"body": "no"}),
        &[head],
        1300,
    )
    .await;
    let r = engine.receive(&intruder).await.unwrap();
    assert!(matches!(r.outcome, Outcome::Rejected { .. }));
}
