//! A hostile peer can neither corrupt a room, impersonate a user, nor make a node hold or do
//! more than its budgets: each attack here is made by a peer with a key of its own (or by a
//! member server turned hostile), and each must change nothing.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::mallory::Mallory;
use common::outsider::Outsider;
use common::peers::{node, PATIENCE};
use hyphae::engine::create_room::{CreateRoom, Preset};
use hyphae::identity::Identity;
use hyphae::net::protocol::{Edu, FedErrorCode, FedRequest, FedResponse};
use hyphae::rooms::P2pNode;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId};
use serde_json::json;

async fn text(n: &P2pNode, room: &OwnedRoomId, who: &str, body: &str) -> OwnedEventId {
    n.send(
        room,
        who,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": body}),
    )
    .await
    .unwrap()
    .event_id
}

/// Alice's public room on `a`, which bob (on `b`) has joined.
async fn two_members() -> (P2pNode, P2pNode, OwnedRoomId) {
    let a = node(&[]).await;
    let b = node(&[&a]).await;
    assert!(a.wait_for_peers(1, PATIENCE).await);
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    (a, b, room)
}

async fn outsider_at(n: &P2pNode) -> Outsider {
    Outsider::dial(n.listen_addrs().await[0].clone(), n.peer_id(), Vec::new()).await
}

/// An EDU as JSON, stamped `ts` and signed by each of `signers` (none: unsigned).
fn edu_json(edu: &Edu, ts: u64, signers: &[&Identity]) -> String {
    let CanonicalJsonValue::Object(mut object) =
        CanonicalJsonValue::try_from(serde_json::to_value(edu).unwrap()).unwrap()
    else {
        unreachable!()
    };
    object.insert(
        "ts".into(),
        CanonicalJsonValue::Integer(ruma::Int::new(ts as i64).unwrap()),
    );
    for id in signers {
        ruma::signatures::sign_json(&id.server_name().to_string(), id.signing_key(), &mut object)
            .unwrap();
    }
    if signers.is_empty() {
        object.insert(
            "signatures".into(),
            CanonicalJsonValue::Object(CanonicalJsonObject::new()),
        );
    }
    serde_json::to_string(&object).unwrap()
}

fn now_ms() -> u64 {
    ruma::MilliSecondsSinceUnixEpoch::now().get().into()
}

/// Asks, and asks again while the node answers that this peer is over its request rate (the
/// attacks here are about what is taken, not how fast).
async fn ask_patiently(m: &Outsider, request: FedRequest) -> Result<FedResponse, String> {
    loop {
        match m.ask(request.clone()).await {
            Ok(FedResponse::Error {
                code: FedErrorCode::LimitExceeded,
                ..
            }) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            other => return other,
        }
    }
}

fn refused(r: &Result<FedResponse, String>) -> bool {
    matches!(r, Ok(FedResponse::Error { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_stale_and_unsigned_edus_change_nothing() {
    let (a, b, room) = two_members().await;
    let hello = text(&a, &room, "alice", "hello").await;
    let (other_room, _) = (
        a.create_room("alice", &CreateRoom::default())
            .await
            .unwrap(),
        (),
    );
    let elsewhere = text(&a, &other_room, "alice", "in another room").await;
    let m = outsider_at(&a).await;
    let mallory = Identity::generate();
    let mut heard = a.edus();

    let receipt = |user: ruma::OwnedUserId, event_id: OwnedEventId| Edu::Receipt {
        room_id: room.clone(),
        user_id: user,
        event_id,
    };
    let bob_read = receipt(b.user("bob"), hello.clone());
    let alice_read = receipt(a.user("alice"), hello.clone());
    let bob_types = Edu::Typing {
        room_id: room.clone(),
        user_id: b.user("bob"),
        typing: true,
    };
    let attacks = [
        (
            "unsigned receipt for bob",
            edu_json(&bob_read, now_ms(), &[]),
        ),
        (
            "unsigned typing for bob",
            edu_json(&bob_types, now_ms(), &[]),
        ),
        (
            "bob's receipt signed by another server",
            edu_json(&bob_read, now_ms(), &[&mallory]),
        ),
        (
            "bob's receipt signed by his server and another",
            edu_json(&bob_read, now_ms(), &[b.identity(), &mallory]),
        ),
        // A forged receipt for a user of the receiving server would move her own read marker.
        (
            "unsigned receipt for alice, local",
            edu_json(&alice_read, now_ms(), &[]),
        ),
        (
            "alice's receipt signed by bob's server",
            edu_json(&alice_read, now_ms(), &[b.identity()]),
        ),
        (
            "a receipt an hour old",
            edu_json(&bob_read, now_ms() - 3_600_000, &[b.identity()]),
        ),
        (
            "a receipt an hour ahead",
            edu_json(&bob_read, now_ms() + 3_600_000, &[b.identity()]),
        ),
        (
            "a receipt for an event of another room",
            edu_json(
                &receipt(b.user("bob"), elsewhere.clone()),
                now_ms(),
                &[b.identity()],
            ),
        ),
        (
            "a receipt for an event nobody has",
            edu_json(
                &receipt(
                    b.user("bob"),
                    "$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                        .try_into()
                        .unwrap(),
                ),
                now_ms(),
                &[b.identity()],
            ),
        ),
    ];
    for (what, edu) in attacks {
        let r = m.ask(FedRequest::Edu { edu }).await;
        assert!(refused(&r), "{what}: {r:?}");
    }
    assert!(
        heard.try_recv().is_err(),
        "a refused EDU reached the client API"
    );

    // A genuine receipt passes once; the same bytes again are a replay.
    let genuine = edu_json(&bob_read, now_ms(), &[b.identity()]);
    let r = m
        .ask(FedRequest::Edu {
            edu: genuine.clone(),
        })
        .await;
    assert!(matches!(r, Ok(FedResponse::Ok)), "genuine: {r:?}");
    assert_eq!(heard.try_recv().unwrap(), bob_read);
    let r = m.ask(FedRequest::Edu { edu: genuine }).await;
    assert!(
        matches!(
            &r,
            Ok(FedResponse::Error {
                code: FedErrorCode::BadRequest,
                ..
            })
        ),
        "replay: {r:?}"
    );
    assert!(
        heard.try_recv().is_err(),
        "a replayed EDU reached the client API"
    );
}

async fn rooms_held(n: &P2pNode) -> Vec<OwnedRoomId> {
    n.engine().rooms().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_planting_500_rooms_leaves_the_node_tracking_none_of_them() {
    let (a, _b, room) = two_members().await;
    let mal = Mallory::new().await;
    let planted = mal.rooms(500).await;
    let creates: Vec<String> = planted.iter().map(|(_, p, _)| p[0].clone()).collect();
    // Mallory answers every catch-up with its rooms' whole histories (creates first), and
    // every extremities question with its rooms' latest events.
    let pdus: Vec<String> = planted
        .iter()
        .flat_map(|(_, p, _)| p.clone())
        .take(3000)
        .collect();
    let ids: Vec<OwnedEventId> = planted
        .iter()
        .flat_map(|(_, _, i)| i.clone())
        .take(3000)
        .collect();
    let latest: Vec<OwnedEventId> = planted
        .iter()
        .map(|(_, _, i)| i.last().unwrap().clone())
        .collect();
    let answer: common::outsider::Answer = {
        std::sync::Arc::new(move |req: &FedRequest| match req {
            FedRequest::GetMissingEvents { .. } => FedResponse::Events {
                pdus: pdus.clone(),
                event_ids: ids.clone(),
            },
            FedRequest::Extremities { .. } => FedResponse::Extremities {
                event_ids: latest.clone(),
            },
            _ => FedResponse::Ok,
        })
    };
    let m = Outsider::dial_as(
        mal.identity.libp2p_keypair().clone(),
        a.listen_addrs().await[0].clone(),
        a.peer_id(),
        Vec::new(),
        answer,
    )
    .await;
    let before = rooms_held(&a).await;
    let auth = mal.join(&m, &room).await;

    for (planted_room, pdus, _) in &planted {
        // Pushed as a room of its own, and smuggled into a push for the shared room.
        let r = ask_patiently(
            &m,
            FedRequest::Push {
                room_id: planted_room.clone(),
                pdus: pdus.clone(),
            },
        )
        .await;
        assert!(refused(&r), "push of a planted room: {r:?}");
    }
    let r = ask_patiently(
        &m,
        FedRequest::Push {
            room_id: room.clone(),
            pdus: creates[..100].to_vec(),
        },
    )
    .await;
    assert!(
        refused(&r),
        "planted creates in a push for the shared room: {r:?}"
    );
    for create in &creates[..50] {
        let r = ask_patiently(
            &m,
            FedRequest::SendJoin {
                pdu: create.clone(),
            },
        )
        .await;
        assert!(refused(&r), "send_join of a create event: {r:?}");
    }
    // A message that hangs off unknown events makes the node catch up from Mallory, a member.
    let bait = mal.dangling(&room, &auth, 0, 10);
    let r = ask_patiently(
        &m,
        FedRequest::Push {
            room_id: room.clone(),
            pdus: vec![bait],
        },
    )
    .await;
    assert!(matches!(r, Ok(FedResponse::Ok)), "{r:?}");
    // Wait for the node to have asked Mallory for the missing events, then for that catch-up
    // to end.
    let asked = a
        .wait_until(PATIENCE, || {
            let m = &m;
            async move {
                m.received()
                    .await
                    .iter()
                    .any(|r| r.starts_with("request: GetMissingEvents"))
            }
        })
        .await;
    assert!(
        asked,
        "the node never caught up from the member that pushed"
    );
    let done = a
        .wait_until(PATIENCE, || {
            let a = a.clone();
            async move { a.catch_up_progress().active == 0 }
        })
        .await;
    assert!(done);
    assert_eq!(
        rooms_held(&a).await,
        before,
        "the node adopted a planted room"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_of_large_events_is_caught_up_across() {
    // 200 events of ~60 KiB: 12 MB, more than one answer can carry, so catch-up takes rounds
    // of answers cut below the codec's limit.
    let a = node(&[]).await;
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    let mut last = None;
    for i in 0..200 {
        let body = format!("{i} {}", "y".repeat(60_000));
        last = Some(text(&a, &room, "alice", &body).await);
    }
    let last = last.unwrap();
    let b = node(&[&a]).await;
    assert!(b.wait_for_peers(1, PATIENCE).await);
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    let ev = b.engine().event(&last).await.unwrap();
    assert!(ev.is_some(), "the last large event was not caught up");
    let timeline = b
        .engine()
        .timeline(&room, None, hyphae::store::Direction::Forward, 1000)
        .await
        .unwrap();
    assert!(
        timeline.len() >= 200,
        "only {} events arrived",
        timeline.len()
    );
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_answering_catch_up_with_junk_is_held_to_its_budget_while_members_chat() {
    let (a, b, room) = two_members().await;
    let mal = std::sync::Arc::new(Mallory::new().await);
    let auth: std::sync::Arc<std::sync::Mutex<Vec<OwnedEventId>>> = Default::default();
    let round = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answer: common::outsider::Answer = {
        let (mal, auth, room, round, asked) = (
            mal.clone(),
            auth.clone(),
            room.clone(),
            round.clone(),
            asked.clone(),
        );
        std::sync::Arc::new(move |req: &FedRequest| match req {
            FedRequest::GetMissingEvents { .. } => {
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Every round: junk, and fresh well-signed events that hang off nothing, as
                // much as an answer may carry.
                let r = round.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let auth = auth.lock().unwrap().clone();
                let mut pdus: Vec<String> = (0..500)
                    .map(|i| format!("{{\"junk\":\"{i}{}\"}}", "z".repeat(2000)))
                    .collect();
                pdus.extend((0..90).map(|i| mal.dangling(&room, &auth, r * 1000 + i, 60_000)));
                FedResponse::Events {
                    event_ids: Vec::new(),
                    pdus,
                }
            }
            FedRequest::Extremities { .. } => FedResponse::Extremities {
                event_ids: (0..100)
                    .map(|i| format!("$random{i:0>38}").try_into().unwrap())
                    .collect(),
            },
            _ => FedResponse::Ok,
        })
    };
    let m = Outsider::dial_as(
        mal.identity.libp2p_keypair().clone(),
        a.listen_addrs().await[0].clone(),
        a.peer_id(),
        Vec::new(),
        answer,
    )
    .await;
    *auth.lock().unwrap() = mal.join(&m, &room).await;
    let rss_before = rss_mib();

    // Honest delivery without the attack.
    let mut quiet = Vec::new();
    for i in 0..30 {
        let t = std::time::Instant::now();
        let id = text(&a, &room, "alice", &format!("quiet {i}")).await;
        wait_for(&b, &id).await;
        quiet.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // The attack: a dangling event makes the node catch up from Mallory, a member.
    let bait = mal.dangling(&room, &auth.lock().unwrap().clone(), 0, 10);
    let r = ask_patiently(
        &m,
        FedRequest::Push {
            room_id: room.clone(),
            pdus: vec![bait],
        },
    )
    .await;
    assert!(matches!(r, Ok(FedResponse::Ok)), "{r:?}");
    let started = a
        .wait_until(PATIENCE, || {
            let asked = asked.clone();
            async move { asked.load(std::sync::atomic::Ordering::SeqCst) > 0 }
        })
        .await;
    assert!(started, "the node never caught up from Mallory");
    let mut loud = Vec::new();
    for i in 0..30 {
        let t = std::time::Instant::now();
        let id = text(&a, &room, "alice", &format!("under attack {i}")).await;
        wait_for(&b, &id).await;
        loud.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let done = a
        .wait_until(PATIENCE, || {
            let a = a.clone();
            async move { a.catch_up_progress().active == 0 }
        })
        .await;
    assert!(done, "the junk catch-up never ended");
    quiet.sort_by(f64::total_cmp);
    loud.sort_by(f64::total_cmp);
    println!(
        "BENCH honest delivery a -> b, p50/p99 ms: {:.1}/{:.1} quiet, {:.1}/{:.1} during a junk catch-up ({} rounds asked); RSS {} -> {} MiB",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&loud, 0.5),
        percentile(&loud, 0.99),
        asked.load(std::sync::atomic::Ordering::SeqCst),
        rss_before,
        rss_mib()
    );
    // Each catch-up stops at its held-bytes budget: far fewer rounds than the round bound.
    assert!(
        asked.load(std::sync::atomic::Ordering::SeqCst)
            < hyphae::rooms::catch_up::MAX_CATCH_UP_ROUNDS,
        "the budget did not stop the catch-up"
    );
    // None of Mallory's dangling events is stored.
    let timeline = a
        .engine()
        .timeline(&room, None, hyphae::store::Direction::Forward, 10_000)
        .await
        .unwrap();
    assert!(timeline
        .iter()
        .all(|ev| ev.pdu.sender != mal.user || ev.pdu.kind.to_string() == "m.room.member"));
}

async fn wait_for(n: &P2pNode, id: &OwnedEventId) {
    let ok = n
        .wait_until(PATIENCE, || {
            let (n, id) = (n.clone(), id.clone());
            async move { n.engine().event(&id).await.unwrap().is_some() }
        })
        .await;
    assert!(ok, "{id} never arrived");
}

/// Asks until the node takes the request in (it answers `busy` or `too many requests` while
/// this peer is over its request rate); any other answer, a refusal included, is returned.
async fn ask_until_heard(m: &Outsider, request: FedRequest) -> FedResponse {
    loop {
        match m.ask(request.clone()).await {
            Ok(FedResponse::Error { message, .. })
                if message == "busy" || message == "too many requests" =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Ok(answer) => return answer,
            Err(e) => panic!("invite not answered: {e}"),
        }
    }
}

/// An invite from `mallory` for `invitee` into one of Mallory's rooms, as an `Invite` request
/// carrying `room_state`.
fn invite_from(
    mallory: &Mallory,
    (room, ids): (&OwnedRoomId, &[OwnedEventId]),
    invitee: &str,
    room_state: Vec<String>,
) -> FedRequest {
    let rules = hyphae::engine::pdu::rules_for(&ruma::RoomVersionId::V12).unwrap();
    let (_, pdu) = hyphae::engine::pdu::build_signed(
        &mallory.identity,
        &rules,
        hyphae::engine::pdu::NewEvent {
            room_id: Some(room),
            sender: &mallory.user,
            kind: "m.room.member",
            state_key: Some(invitee),
            content: json!({"membership": "invite"}),
            prev_events: vec![ids.last().unwrap().clone()],
            // Room version 12: the create event is implied, never listed.
            auth_events: ids[1..].to_vec(),
            depth: ids.len() as u64 + 1,
            origin_server_ts: ruma::MilliSecondsSinceUnixEpoch::now(),
            redacts: None,
        },
    )
    .unwrap();
    FedRequest::Invite {
        room_version: ruma::RoomVersionId::V12,
        pdu: String::from_utf8(pdu).unwrap(),
        room_state,
    }
}

/// Invites cost the inviter, not us: 20 held from one inviting server, 500 in all, each with at
/// most 16 KiB of stripped state of known types; what is over is refused with `LimitExceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_flood_is_held_to_its_caps() {
    use hyphae::rooms::invites::{MAX_INVITES, MAX_INVITES_PER_SERVER, MAX_INVITE_STATE_BYTES};
    let a = node(&[]).await;
    let m = outsider_at(&a).await;
    let victim = |n: usize| format!("@victim{n}:{}", a.server_name());

    // The first inviting server: each invite carries 16 state events, 4 KiB apiece: every
    // stripped-state type twice over, then types and shapes that are not stripped state.
    let first = Mallory::new().await;
    let (room, _, ids) = first.rooms(1).await.pop().unwrap();
    let mut state: Vec<String> = hyphae::rooms::STRIPPED_STATE
        .iter()
        .chain(hyphae::rooms::STRIPPED_STATE.iter().take(5))
        .map(|kind| {
            json!({"type": kind, "state_key": "", "sender": first.user,
                   "content": {"name": "n".repeat(4000)}})
            .to_string()
        })
        .collect();
    state.push(
        json!({"type": "m.room.power_levels", "state_key": "", "sender": first.user,
                      "content": {"users": {first.user.as_str(): 100}}})
        .to_string(),
    );
    state.push(
        json!({"type": "m.room.topic", "state_key": "x", "sender": first.user,
                      "content": {"topic": "not stripped state"}})
        .to_string(),
    );
    state.push("not json".into());
    state.push(
        json!({"type": "m.room.topic", "state_key": "", "sender": "nobody",
                      "content": {"topic": "bad sender"}})
        .to_string(),
    );
    for n in 0..MAX_INVITES_PER_SERVER + 5 {
        let answer = ask_until_heard(
            &m,
            invite_from(&first, (&room, &ids), &victim(n), state.clone()),
        )
        .await;
        if n < MAX_INVITES_PER_SERVER {
            assert_eq!(answer, FedResponse::Ok, "invite {n}");
        } else {
            assert!(
                matches!(
                    answer,
                    FedResponse::Error {
                        code: FedErrorCode::LimitExceeded,
                        ..
                    }
                ),
                "invite {n} over the per-server cap: {answer:?}"
            );
        }
    }
    let held = a.invites();
    assert_eq!(held.len(), MAX_INVITES_PER_SERVER);
    for inv in &held {
        let bytes: usize = inv.room_state.iter().map(|e| e.to_string().len()).sum();
        assert!(
            bytes <= MAX_INVITE_STATE_BYTES,
            "{bytes} bytes of stripped state"
        );
        let kinds: Vec<&str> = inv
            .room_state
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        let distinct: std::collections::HashSet<&&str> = kinds.iter().collect();
        assert_eq!(distinct.len(), kinds.len(), "one event per type: {kinds:?}");
        assert!(!kinds.is_empty());
        assert!(
            kinds
                .iter()
                .all(|k| hyphae::rooms::STRIPPED_STATE.contains(k)),
            "{kinds:?}"
        );
    }

    // More inviting servers, each under its own cap, up to the cap for all of them.
    let mut n = MAX_INVITES_PER_SERVER + 5;
    let mut refused = 0;
    while refused == 0 {
        let other = Mallory::new().await;
        let (room, _, ids) = other.rooms(1).await.pop().unwrap();
        for _ in 0..MAX_INVITES_PER_SERVER {
            let answer = ask_until_heard(
                &m,
                invite_from(&other, (&room, &ids), &victim(n), Vec::new()),
            )
            .await;
            n += 1;
            match answer {
                FedResponse::Ok => {}
                FedResponse::Error {
                    code: FedErrorCode::LimitExceeded,
                    ..
                } => refused += 1,
                other => panic!("invite {n}: {other:?}"),
            }
        }
    }
    assert_eq!(
        a.invites().len(),
        MAX_INVITES,
        "the node holds the cap, no more"
    );
}
