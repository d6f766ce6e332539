//! Generated rooms for benchmarks: a long linear history and a room with many concurrent forks.
//! Every event is signed by a simulated remote peer, so ingest runs the full receipt checks.

use hyphae::engine::create_room::{CreateRoom, Preset};
use hyphae::engine::pdu::{build_signed, rules_for, NewEvent};
use hyphae::engine::{Engine, Outcome};
use hyphae::store::memory::MemoryStore;
use ruma::{OwnedEventId, OwnedRoomId};
use serde_json::json;

use super::{accept, event_on, ts, Peer};

pub struct Workload {
    pub room_id: OwnedRoomId,
    /// Raw PDUs in delivery order (dependencies first).
    pub events: Vec<Vec<u8>>,
}

struct Base {
    room_id: OwnedRoomId,
    events: Vec<Vec<u8>>,
    head: OwnedEventId,
    peers: [Peer; 2],
    /// auth_events of a message or topic change, per peer.
    auth: [Vec<OwnedEventId>; 2],
}

fn shared_store() -> hyphae::store::SharedStore {
    #[cfg(not(target_arch = "wasm32"))]
    return std::sync::Arc::new(MemoryStore::new());
    #[cfg(target_arch = "wasm32")]
    return std::rc::Rc::new(MemoryStore::new());
}

/// A public room by alice (power 100) that bob joined and was given power 50.
async fn base() -> Base {
    let builder = Engine::open(shared_store()).await.unwrap();
    let alice = Peer::new(1, "alice");
    let bob = Peer::new(2, "bob");
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        name: Some("bench".into()),
        ..Default::default()
    };
    let (room_id, ids) = builder
        .create_room(&alice.identity, &alice.user, &opts, ts(1))
        .await
        .unwrap();
    let mut events = Vec::new();
    for id in &ids {
        events.push(super::raw(&builder, id).await);
    }
    let (_, join) = event_on(
        &builder,
        &bob,
        &room_id,
        "m.room.member",
        Some(bob.user.as_str()),
        json!({"membership": "join"}),
        std::slice::from_ref(ids.last().unwrap()),
        2,
    )
    .await;
    accept(&builder, &join).await;
    events.push(join);
    let mut pl = super::state_content(&builder, &room_id, "m.room.power_levels", "")
        .await
        .unwrap();
    pl["users"][bob.user.as_str()] = json!(50);
    let r = builder
        .send(
            &alice.identity,
            &room_id,
            &alice.user,
            "m.room.power_levels",
            Some(""),
            pl,
            ts(3),
        )
        .await
        .unwrap();
    events.push(super::raw(&builder, &r.event_id).await);
    let state = builder.current_state(&room_id).await.unwrap().unwrap();
    let member = |p: &Peer| state[&("m.room.member".to_owned(), p.user.to_string())].clone();
    let pl_id = state[&("m.room.power_levels".to_owned(), String::new())].clone();
    let mut auth_a = vec![pl_id.clone(), member(&alice)];
    let mut auth_b = vec![pl_id, member(&bob)];
    auth_a.sort();
    auth_b.sort();
    Base {
        room_id,
        events,
        head: r.event_id,
        peers: [alice, bob],
        auth: [auth_a, auth_b],
    }
}

#[allow(clippy::too_many_arguments)]
fn sign(
    base: &Base,
    who: usize,
    kind: &str,
    state_key: Option<&str>,
    content: serde_json::Value,
    prev: Vec<OwnedEventId>,
    depth: u64,
    at: u64,
) -> (OwnedEventId, Vec<u8>) {
    let rules = rules_for(&ruma::RoomVersionId::V12).unwrap();
    let peer = &base.peers[who];
    build_signed(
        &peer.identity,
        &rules,
        NewEvent {
            room_id: Some(&base.room_id),
            sender: &peer.user,
            kind,
            state_key,
            content,
            prev_events: prev,
            auth_events: base.auth[who].clone(),
            depth,
            origin_server_ts: ts(at),
            redacts: None,
        },
    )
    .unwrap()
}

fn message(i: usize) -> serde_json::Value {
    json!({ "msgtype": "m.text", "body": format!("message number {i}: the quick brown fox jumps over the lazy dog") })
}

/// `n` messages in one chain after the room's setup.
pub async fn linear(n: usize) -> Workload {
    let base = base().await;
    let mut events = base.events.clone();
    let mut head = base.head.clone();
    for i in 0..n {
        let (id, raw) = sign(
            &base,
            i % 2,
            "m.room.message",
            None,
            message(i),
            vec![head],
            10 + i as u64,
            100 + i as u64,
        );
        events.push(raw);
        head = id;
    }
    Workload {
        room_id: base.room_id,
        events,
    }
}

/// `branches` concurrent chains of `per_branch` events from one point, each opening with a
/// topic change (so every branch has its own state), delivered interleaved, then merged back
/// with events of 20 prev_events each.
pub async fn forks(branches: usize, per_branch: usize) -> Workload {
    let base = base().await;
    let mut events = base.events.clone();
    let mut heads = vec![base.head.clone(); branches];
    for step in 0..per_branch {
        for (b, head) in heads.iter_mut().enumerate() {
            let at = 100 + (step * branches + b) as u64;
            let (id, raw) = if step == 0 {
                sign(
                    &base,
                    b % 2,
                    "m.room.topic",
                    Some(""),
                    json!({ "topic": format!("branch {b}") }),
                    vec![head.clone()],
                    10,
                    at,
                )
            } else {
                sign(
                    &base,
                    b % 2,
                    "m.room.message",
                    None,
                    message(step),
                    vec![head.clone()],
                    10 + step as u64,
                    at,
                )
            };
            events.push(raw);
            *head = id;
        }
    }
    let mut depth = 10 + per_branch as u64;
    let mut at = 1_000_000;
    while heads.len() > 1 {
        let mut next = Vec::new();
        for group in heads.chunks(20) {
            depth += 1;
            at += 1;
            let (id, raw) = sign(
                &base,
                0,
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": "merge"}),
                group.to_vec(),
                depth,
                at,
            );
            events.push(raw);
            next.push(id);
        }
        heads = next;
    }
    Workload {
        room_id: base.room_id,
        events,
    }
}

/// Ingests `events` in batches of `batch` and returns how many were accepted.
pub async fn ingest(engine: &Engine, events: &[Vec<u8>], batch: usize) -> usize {
    let mut accepted = 0;
    for chunk in events.chunks(batch.max(1)) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        for r in engine.receive_batch(&refs).await.unwrap() {
            if matches!(r.unwrap().outcome, Outcome::Accepted { .. }) {
                accepted += 1;
            }
        }
    }
    accepted
}
