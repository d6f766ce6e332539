//! Property: the same set of events, delivered to independent engines in any order (gaps filled
//! later), yields identical current state, forward extremities, and accepted/rejected sets.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{accept, event_on, Peer};
use hyphae::engine::create_room::{CreateRoom, Preset};
use hyphae::engine::pdu::EventStatus;
use hyphae::engine::{Engine, IngestError, Outcome};
use hyphae::store::memory::MemoryStore;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use ruma::{OwnedEventId, OwnedRoomId};
use serde_json::json;

async fn engine() -> Engine {
    Engine::open(Arc::new(MemoryStore::new())).await.unwrap()
}

/// A random DAG over a public room: alice (creator), bob (power 50) and carol (power 0) send
/// messages, topics, names and join-rule changes on random forks and merges. Carol's state
/// changes fail auth, so some events are rejected.
async fn random_room(seed: u64, n: usize) -> (OwnedRoomId, Vec<(OwnedEventId, Vec<u8>)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let builder = engine().await;
    let peers = [
        Peer::new(1, "alice"),
        Peer::new(2, "bob"),
        Peer::new(3, "carol"),
    ];
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let (room, ids) = builder
        .create_room(&peers[0].identity, &peers[0].user, &opts, common::ts(1))
        .await
        .unwrap();
    let mut events = Vec::new();
    for id in &ids {
        events.push((id.clone(), common::raw(&builder, id).await));
    }
    let mut head = ids.last().unwrap().clone();
    for p in &peers[1..] {
        let (id, raw) = event_on(
            &builder,
            p,
            &room,
            "m.room.member",
            Some(p.user.as_str()),
            json!({"membership": "join"}),
            std::slice::from_ref(&head),
            2,
        )
        .await;
        head = accept(&builder, &raw).await;
        events.push((id, raw));
    }
    let mut pl = common::state_content(&builder, &room, "m.room.power_levels", "")
        .await
        .unwrap();
    pl["users"][peers[1].user.as_str()] = json!(50);
    let (id, raw) = event_on(
        &builder,
        &peers[0],
        &room,
        "m.room.power_levels",
        Some(""),
        pl,
        std::slice::from_ref(&head),
        3,
    )
    .await;
    accept(&builder, &raw).await;
    events.push((id.clone(), raw));

    // Events whose auth is stable from here on: only these are candidates for prev_events.
    let mut accepted = vec![id];
    for i in 0..n {
        let sender = &peers[rng.gen_range(0..3)];
        let mut prevs =
            vec![accepted[rng.gen_range(accepted.len().saturating_sub(6)..accepted.len())].clone()];
        if rng.gen_bool(0.25) {
            let other = accepted[rng.gen_range(0..accepted.len())].clone();
            if !prevs.contains(&other) {
                prevs.push(other);
            }
        }
        let at = 10 + i as u64;
        let (kind, key, content) = match rng.gen_range(0..10) {
            0..=4 => (
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": format!("m{i}")}),
            ),
            5 | 6 => (
                "m.room.topic",
                Some(""),
                json!({"topic": format!("topic {i}")}),
            ),
            7 | 8 => (
                "m.room.name",
                Some(""),
                json!({"name": format!("name {i}")}),
            ),
            _ => (
                "m.room.join_rules",
                Some(""),
                json!({"join_rule": if rng.gen_bool(0.5) { "public" } else { "invite" }}),
            ),
        };
        let (id, raw) = event_on(&builder, sender, &room, kind, key, content, &prevs, at).await;
        let r = builder.receive(&raw).await.unwrap();
        if matches!(r.outcome, Outcome::Accepted { .. }) {
            accepted.push(id.clone());
        }
        events.push((id, raw));
    }
    (room, events)
}

/// Delivers `order` to a fresh engine, holding back events whose dependencies have not arrived
/// and retrying them as gaps fill.
async fn deliver(events: &[(OwnedEventId, Vec<u8>)], order: &[usize]) -> Engine {
    let e = engine().await;
    let mut pending: Vec<usize> = Vec::new();
    for &i in order {
        pending.push(i);
        loop {
            let mut progressed = false;
            let mut still = Vec::new();
            for &p in &pending {
                match e.receive(&events[p].1).await {
                    Ok(r) if matches!(r.outcome, Outcome::MissingEvents(_)) => still.push(p),
                    Err(IngestError::UnknownRoom(_)) => still.push(p),
                    Ok(_) => progressed = true,
                    Err(err) => panic!("valid event refused: {err}"),
                }
            }
            pending = still;
            if !progressed || pending.is_empty() {
                break;
            }
        }
    }
    assert!(pending.is_empty(), "every event eventually fits");
    e
}

type Verdicts = BTreeMap<OwnedEventId, EventStatus>;

async fn verdicts(e: &Engine, events: &[(OwnedEventId, Vec<u8>)]) -> Verdicts {
    let mut out = BTreeMap::new();
    for (id, _) in events {
        out.insert(
            id.clone(),
            e.event(id).await.unwrap().expect("stored").status,
        );
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn engines_converge_whatever_the_delivery_order(seed in any::<u64>(), shuffles in proptest::collection::vec(any::<u64>(), 3)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (room, events) = random_room(seed, 40).await;
            let mut results = Vec::new();
            for s in &shuffles {
                let mut order: Vec<usize> = (0..events.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(*s));
                let e = deliver(&events, &order).await;
                let room_record = e.room(&room).await.unwrap().unwrap();
                let mut ext = room_record.forward_extremities.clone();
                ext.sort();
                results.push((e.current_state(&room).await.unwrap().unwrap(), ext, verdicts(&e, &events).await));
            }
            // In creation order too, as the reference.
            let e = deliver(&events, &(0..events.len()).collect::<Vec<_>>()).await;
            let mut ext = e.room(&room).await.unwrap().unwrap().forward_extremities.clone();
            ext.sort();
            let reference = (e.current_state(&room).await.unwrap().unwrap(), ext, verdicts(&e, &events).await);
            for r in &results {
                assert_eq!(r, &reference);
            }
        });
    }
}
