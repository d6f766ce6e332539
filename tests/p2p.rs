//! Rooms across peers over real libp2p on loopback: invites and joins, chat in every direction,
//! concurrent senders, a partition healed by anti-entropy, a late joiner with a long history, and
//! a node restarted from its data directory.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use hyphae::engine::create_room::{CreateRoom, Preset};
use hyphae::engine::SortedState;
use hyphae::rooms::{NodeConfig, P2pNode};
use hyphae::store::memory::MemoryStore;
use hyphae::store::redb::RedbStore;
use hyphae::store::{Direction, SharedStore};
use ruma::{OwnedEventId, OwnedRoomId};
use serde_json::json;

use common::peers::{config, node, node_on, wait_connected, wait_for_an_invite, PATIENCE};

/// What must agree across peers: current state, forward extremities, the set of timeline events.
#[derive(Debug, PartialEq, Eq)]
struct View {
    state: SortedState,
    extremities: Vec<OwnedEventId>,
    events: Vec<OwnedEventId>,
}

async fn view(n: &P2pNode, room: &OwnedRoomId) -> Option<View> {
    let record = n.engine().room(room).await.unwrap()?;
    let mut extremities = record.forward_extremities;
    extremities.sort();
    let mut events: Vec<OwnedEventId> = n
        .engine()
        .timeline(room, None, Direction::Forward, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.pdu.event_id.clone())
        .collect();
    events.sort();
    Some(View {
        state: n.engine().current_state(room).await.unwrap()?,
        extremities,
        events,
    })
}

async fn message_count(n: &P2pNode, room: &OwnedRoomId) -> usize {
    n.engine()
        .timeline(room, None, Direction::Forward, usize::MAX)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.pdu.kind.to_string() == "m.room.message")
        .count()
}

/// Waits until every node holds the same view of `room` as the first, with at least
/// `messages` messages, re-checking whenever any node stores something.
async fn converge(nodes: &[&P2pNode], room: &OwnedRoomId, messages: usize) {
    let mut changes: Vec<_> = nodes.iter().map(|n| n.changes()).collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        for c in changes.iter_mut() {
            c.mark_unchanged();
        }
        let first = view(nodes[0], room).await;
        let mut same = first.is_some() && message_count(nodes[0], room).await >= messages;
        for n in &nodes[1..] {
            same = same && view(n, room).await == first;
        }
        if same {
            return;
        }
        let any_change =
            futures::future::select_all(changes.iter_mut().map(|c| Box::pin(c.changed())));
        if tokio::time::timeout_at(deadline, any_change).await.is_err() {
            for (i, n) in nodes.iter().enumerate() {
                let v = view(n, room).await;
                eprintln!(
                    "node {i}: {} events, extremities {:?}",
                    v.as_ref().map_or(0, |v| v.events.len()),
                    v.map(|v| v.extremities)
                );
            }
            panic!("nodes did not converge");
        }
    }
}

async fn text(n: &P2pNode, room: &OwnedRoomId, who: &str, body: &str) {
    n.send(
        room,
        who,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": body}),
    )
    .await
    .unwrap();
}

/// Three nodes; a private room on A with B's and C's users invited and joined.
async fn three_in_a_room() -> (P2pNode, P2pNode, P2pNode, OwnedRoomId) {
    let a = node(&[]).await;
    let b = node(&[&a]).await;
    let c = node(&[&a]).await;
    wait_connected(&a, 2).await;
    let opts = CreateRoom {
        preset: Preset::PrivateChat,
        name: Some("three".into()),
        invite: vec![b.user("bob"), c.user("carol")],
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    for (n, who) in [(&b, "bob"), (&c, "carol")] {
        let r = room.clone();
        let n2 = n.clone();
        assert!(
            n.wait_until(PATIENCE, || {
                let n2 = n2.clone();
                let r = r.clone();
                async move { n2.invites().iter().any(|i| i.room_id == r) }
            })
            .await
        );
        let invite = n.invites().into_iter().find(|i| i.room_id == room).unwrap();
        assert_eq!(invite.sender, a.user("alice"));
        assert_eq!(invite.invitee, n.user(who));
        // The invite carries enough stripped state to show the room before joining it.
        assert!(
            invite
                .room_state
                .iter()
                .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "three"),
            "{:?}",
            invite.room_state
        );
        n.join(&room, who, a.peer_id()).await.unwrap();
    }
    (a, b, c, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_invite_join_and_chat_both_ways() {
    let (a, b, c, room) = three_in_a_room().await;
    text(&a, &room, "alice", "hi from A").await;
    text(&b, &room, "bob", "hello from B").await;
    text(&c, &room, "carol", "hey from C").await;
    converge(&[&a, &b, &c], &room, 3).await;
    let state = view(&b, &room).await.unwrap().state;
    for user in [a.user("alice"), b.user("bob"), c.user("carol")] {
        assert!(state.contains_key(&("m.room.member".to_owned(), user.to_string())));
    }
    assert!(b.invites().is_empty(), "joining clears the invite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_sending_at_once_lose_nothing() {
    let (a, b, c, room) = three_in_a_room().await;
    let send = |n: P2pNode, who: &'static str| {
        let room = room.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                text(&n, &room, who, &format!("{who} {i}")).await;
            }
        })
    };
    let tasks = [
        send(a.clone(), "alice"),
        send(b.clone(), "bob"),
        send(c.clone(), "carol"),
    ];
    for t in tasks {
        t.await.unwrap();
    }
    converge(&[&a, &b, &c], &room, 600).await;
    assert_eq!(message_count(&a, &room).await, 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_to_one_resolved_state() {
    let (a, b, c, room) = three_in_a_room().await;
    converge(&[&a, &b, &c], &room, 0).await;
    c.set_offline(true).unwrap();
    // Both sides keep writing: messages, a rename, a power change and a kick on A's side;
    // messages on C's.
    for i in 0..20 {
        text(&a, &room, "alice", &format!("while C is away {i}")).await;
        text(&c, &room, "carol", &format!("C alone {i}")).await;
    }
    a.send(
        &room,
        "alice",
        "m.room.name",
        Some(""),
        json!({"name": "renamed during the split"}),
    )
    .await
    .unwrap();
    let mut pl = common::state_content(a.engine(), &room, "m.room.power_levels", "")
        .await
        .unwrap();
    pl["users"][b.user("bob").as_str()] = json!(50);
    a.send(&room, "alice", "m.room.power_levels", Some(""), pl)
        .await
        .unwrap();
    let bob = b.user("bob");
    a.send(
        &room,
        "alice",
        "m.room.member",
        Some(bob.as_str()),
        json!({"membership": "leave"}),
    )
    .await
    .unwrap();
    c.set_offline(false).unwrap();
    // Bob was kicked: his server is out of the room and no longer receives it, so only the
    // two servers still in it converge.
    converge(&[&a, &c], &room, 40).await;
    let state = view(&c, &room).await.unwrap().state;
    let name = &state[&("m.room.name".to_owned(), String::new())];
    let content = c
        .engine()
        .event(name)
        .await
        .unwrap()
        .unwrap()
        .pdu
        .content
        .get()
        .to_owned();
    assert!(content.contains("renamed during the split"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_pages_back_to_the_create_event() {
    let a = node(&[]).await;
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    for i in 0..5000 {
        a.engine()
            .send(
                &identity_of(&a),
                &room,
                &a.user("alice"),
                "m.room.message",
                None,
                json!({"body": format!("{i}")}),
                ruma::MilliSecondsSinceUnixEpoch::now(),
            )
            .await
            .unwrap();
    }
    let b = node(&[&a]).await;
    wait_connected(&b, 1).await;
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    // Page back from the newest event in pages of 100 until nothing is left.
    let mut from = None;
    let mut seen = Vec::new();
    loop {
        let page = b
            .engine()
            .timeline(&room, from, Direction::Backward, 100)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        from = last.stream;
        seen.extend(page.iter().map(|e| e.pdu.event_id.clone()));
    }
    assert!(seen.len() >= 5000 + 6, "{} events", seen.len());
    let create = b
        .engine()
        .event(seen.last().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(create.pdu.kind.to_string(), "m.room.create");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
}

fn identity_of(n: &P2pNode) -> hyphae::identity::Identity {
    // Tests reach the node's key the way the node does: through its store.
    futures::executor::block_on(hyphae::identity::Identity::load_or_create(
        n.engine().store().as_ref(),
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarts_from_its_data_dir_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.redb");
    let a = node(&[]).await;
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    let b = node_on(Arc::new(RedbStore::open(&path).unwrap()), &[&a]).await;
    wait_connected(&b, 1).await;
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    for i in 0..50 {
        text(&b, &room, "bob", &format!("before the crash {i}")).await;
    }
    converge(&[&a, &b], &room, 50).await;
    // Kill B without a goodbye while A keeps talking.
    b.set_offline(true).unwrap();
    drop(b);
    for i in 0..50 {
        text(&a, &room, "alice", &format!("while B is dead {i}")).await;
    }
    let b = loop {
        // The old swarm task releases the database file as it winds down.
        match RedbStore::open(&path) {
            Ok(store) => break node_on(Arc::new(store), &[&a]).await,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    converge(&[&a, &b], &room, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_peer_is_refused_and_throttled_while_honest_traffic_flows() {
    use hyphae::net::protocol::{FedErrorCode, FedRequest};
    let a = node(&[]).await;
    let b = node(&[&a]).await;
    let m = node(&[&a]).await;
    wait_connected(&a, 2).await;
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    text(&b, &room, "bob", "honest 1").await;
    converge(&[&a, &b], &room, 1).await;
    let before = view(&a, &room).await.unwrap();

    // Mallory signs with a key of her own; the transport peer `m` only carries her bytes.
    let mallory = common::Peer::new(9, "mallory");
    let head = before.extremities[0].clone();
    let at = 10_000;
    let mut junk = Vec::new();
    // A non-member's message, and a non-member granting herself power.
    let (_, raw) = common::event_on(
        a.engine(),
        &mallory,
        &room,
        "m.room.message",
        None,
        json!({"body": "spam"}),
        std::slice::from_ref(&head),
        at,
    )
    .await;
    junk.push(raw);
    let mut pl = common::state_content(a.engine(), &room, "m.room.power_levels", "")
        .await
        .unwrap();
    pl["users"][mallory.user.as_str()] = json!(100);
    let (_, raw) = common::event_on(
        a.engine(),
        &mallory,
        &room,
        "m.room.power_levels",
        Some(""),
        pl,
        std::slice::from_ref(&head),
        at + 1,
    )
    .await;
    junk.push(raw);
    // Bob's name on mallory's signature.
    let (_, raw) = common::event_on(
        a.engine(),
        &mallory,
        &room,
        "m.room.message",
        None,
        json!({"body": "i am bob"}),
        std::slice::from_ref(&head),
        at + 2,
    )
    .await;
    let mut forged: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    forged["sender"] = json!(b.user("bob"));
    junk.push(serde_json::to_vec(&forged).unwrap());
    // A reference into a DAG nobody can produce.
    let fake: OwnedEventId = "$BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
        .try_into()
        .unwrap();
    let (_, raw) = common::event_on(
        a.engine(),
        &mallory,
        &room,
        "m.room.message",
        None,
        json!({"body": "follow me"}),
        std::slice::from_ref(&head),
        at + 3,
    )
    .await;
    // Well signed, pointing into a DAG nobody can produce: A asks for it, gets nothing, stores nothing.
    let (dangling_id, dangling) = common::with_prev_events(&mallory, &raw, vec![fake]);
    junk.push(dangling);
    junk.push(b"not even json".to_vec());
    for j in junk {
        // Pushed as a member server would push, one PDU at a time; bytes that are not text
        // cannot even be framed as a push.
        let Ok(pdu) = String::from_utf8(j) else {
            continue;
        };
        let push = FedRequest::Push {
            room_id: room.clone(),
            pdus: vec![pdu],
        };
        let _ = m.request(a.peer_id(), push).await;
    }
    // An oversized join is refused before any work.
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(70_000));
    let r = m
        .request(a.peer_id(), FedRequest::SendJoin { pdu: huge })
        .await;
    assert!(
        matches!(
            r,
            Err(hyphae::rooms::NodeError::Refused(
                FedErrorCode::BadRequest,
                _
            ))
        ),
        "{r:?}"
    );
    // A flood of requests (50 in flight at a time) is throttled; those that get through are
    // answered as for a room that does not exist: the flooding peer is not in it.
    let mut limited = 0;
    for _ in 0..40 {
        let burst: Vec<_> = (0..50)
            .map(|_| {
                m.request(
                    a.peer_id(),
                    FedRequest::Extremities {
                        room_id: room.clone(),
                    },
                )
            })
            .collect();
        for r in futures::future::join_all(burst).await {
            match r {
                Err(hyphae::rooms::NodeError::Refused(FedErrorCode::LimitExceeded, _)) => {
                    limited += 1
                }
                Err(hyphae::rooms::NodeError::Refused(FedErrorCode::NotFound, _)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(limited > 0, "the flood was throttled");

    // Honest traffic still flows, and nothing of mallory's entered state or timeline.
    text(&a, &room, "alice", "honest 2").await;
    text(&b, &room, "bob", "honest 3").await;
    converge(&[&a, &b], &room, 3).await;
    let after = view(&a, &room).await.unwrap();
    assert_eq!(after.state, before.state);
    assert!(a.engine().event(&dangling_id).await.unwrap().is_none());
    for id in &after.events {
        let ev = a.engine().event(id).await.unwrap().unwrap();
        assert_ne!(
            ev.pdu.sender.as_str(),
            mallory.user.as_str(),
            "mallory's event in the timeline"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_survive_a_restart_until_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("invitee.redb");
    let reopen = || async {
        loop {
            match RedbStore::open(&path) {
                Ok(store) => break Arc::new(store) as SharedStore,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    };
    let a = node(&[]).await;
    let b = node_on(reopen().await, &[&a]).await;
    wait_connected(&a, 1).await;
    let invitee = b.user("bob");
    let opts = CreateRoom {
        invite: vec![invitee.clone()],
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    wait_for_an_invite(&b).await;
    drop(b);

    let b = node_on(reopen().await, &[&a]).await;
    let invites = b.invites();
    assert_eq!(invites.len(), 1, "the invite was kept across the restart");
    assert_eq!(
        (invites[0].room_id.clone(), invites[0].invitee.clone()),
        (room.clone(), invitee)
    );
    wait_connected(&b, 1).await;
    b.join(&room, "bob", invites[0].from).await.unwrap();
    assert!(b.invites().is_empty());
    drop(b);
    let b = node_on(reopen().await, &[&a]).await;
    assert!(b.invites().is_empty(), "an answered invite stays answered");
}

/// C knows only B; A's room is joined through A's server name alone: C finds A's address in
/// the DHT (B heard it from A through identify) and dials it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_known_only_by_name_is_found_through_kademlia() {
    let b = node(&[]).await;
    let a = node(&[&b]).await;
    let c = node(&[&b]).await;
    wait_connected(&b, 2).await;
    assert!(!c.connected_peers().await.unwrap().contains(&a.peer_id()));
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        name: Some("far away".into()),
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    c.join(&room, "carol", a.peer_id()).await.unwrap();
    assert!(c.connected_peers().await.unwrap().contains(&a.peer_id()));
    let state = view(&a, &room).await.unwrap().state;
    assert!(state.contains_key(&("m.room.member".to_owned(), c.user("carol").to_string())));
}

/// A node reached over WebRTC-direct only (the transport browsers use when they cannot open a
/// plain WebSocket): its address carries the certificate hash, and a room works over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_over_webrtc_direct() {
    let listen_webrtc = NodeConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/webrtc-direct".parse().unwrap()],
        ..config(Vec::new())
    };
    let a = P2pNode::start(Arc::new(MemoryStore::new()), listen_webrtc)
        .await
        .unwrap();
    let addr = a.listen_addrs().await[0].clone();
    assert!(
        addr.to_string().contains("/webrtc-direct/certhash/"),
        "{addr}"
    );
    // A native dialer sends from its own WebRTC socket, so it needs a listener too.
    let b = P2pNode::start(
        Arc::new(MemoryStore::new()),
        NodeConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/webrtc-direct".parse().unwrap()],
            ..config(vec![addr])
        },
    )
    .await
    .unwrap();
    wait_connected(&b, 1).await;
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    text(&a, &room, "alice", "over a data channel").await;
    text(&b, &room, "bob", "and back").await;
    converge(&[&a, &b], &room, 2).await;
}

/// A page opens its node offline and connects once its chat is on screen: nothing is dialled
/// before `set_offline(false)`, and the bootstrap peer is reached after it.
#[tokio::test]
async fn a_node_started_offline_dials_only_when_brought_online() {
    let a = node(&[]).await;
    let mut offline = config(vec![a.listen_addrs().await[0].clone()]);
    offline.start_offline = true;
    let b = P2pNode::start(Arc::new(MemoryStore::new()), offline)
        .await
        .unwrap();
    // The bootstrap redial runs every 250 ms: a few rounds without a connection.
    assert!(
        !b.wait_for_peers(1, Duration::from_secs(2)).await,
        "an offline node dialled its bootstrap peer"
    );
    b.set_offline(false).unwrap();
    assert!(
        b.wait_for_peers(1, Duration::from_secs(30)).await,
        "once online it reached its bootstrap peer"
    );
}
