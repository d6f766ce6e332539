//! Rooms are private: a peer whose server has no member in a room gets nothing of it by any
//! request and hears nothing of it while members chat; a server whose member left stops
//! receiving; a server that joins late into a `joined` room gets no earlier event in the clear.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::outsider::Outsider;
use common::peers::{node, wait_for_an_invite, PATIENCE};
use hyphae::engine::create_room::{CreateRoom, Preset};
use hyphae::net::protocol::{FedErrorCode, FedRequest, FedResponse};
use hyphae::rooms::P2pNode;
use hyphae::store::Direction;
use ruma::{OwnedEventId, OwnedRoomId};
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

/// Waits until `n` holds `event`.
async fn has(n: &P2pNode, event: &OwnedEventId) {
    let n2 = n.clone();
    let ok = n
        .wait_until(PATIENCE, || {
            let n2 = n2.clone();
            let e = event.clone();
            async move { n2.engine().event(&e).await.unwrap().is_some() }
        })
        .await;
    assert!(ok, "{event} never arrived");
}

/// Body of an event as `n` stores it (`None` if redacted or absent).
async fn body(n: &P2pNode, id: &OwnedEventId) -> Option<String> {
    let ev = n.engine().event(id).await.unwrap()?;
    let content: serde_json::Value = serde_json::from_str(ev.pdu.content.get()).unwrap();
    content["body"].as_str().map(str::to_owned)
}

fn not_found(r: &Result<FedResponse, String>) -> Option<String> {
    match r {
        Ok(FedResponse::Error {
            code: FedErrorCode::NotFound,
            message,
        }) => Some(message.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_gets_nothing_of_a_private_room() {
    let a = node(&[]).await;
    let b = node(&[&a]).await;
    assert!(a.wait_for_peers(1, PATIENCE).await);
    let opts = CreateRoom {
        preset: Preset::PrivateChat,
        name: Some("secret plans".into()),
        invite: vec![b.user("bob")],
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    wait_for_an_invite(&b).await;
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    let first = text(&a, &room, "alice", "the vault code is 1234").await;
    has(&b, &first).await;

    // The outsider knows the room id, an event id and the extremities (as if leaked); it
    // subscribes to every topic a room could be announced on.
    let addr = a.listen_addrs().await[0].clone();
    let topics = vec![
        format!("hyphae/room/{room}"),
        format!("hyphae/edu/{room}"),
        room.to_string(),
    ];
    let m = Outsider::dial(addr, a.peer_id(), topics).await;
    let extremities = a
        .engine()
        .room(&room)
        .await
        .unwrap()
        .unwrap()
        .forward_extremities;
    let create = a.engine().room(&room).await.unwrap().unwrap().create_event;

    // What an unknown room and an unknown event answer: the private room must answer the same.
    let nowhere: OwnedRoomId = "!nowhere:example.org".try_into().unwrap();
    let unknown_room = not_found(
        &m.ask(FedRequest::Extremities {
            room_id: nowhere.clone(),
        })
        .await,
    )
    .expect("an unknown room is not found");
    let nothing: OwnedEventId = "$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        .try_into()
        .unwrap();
    let unknown_event = not_found(&m.ask(FedRequest::GetEvent { event_id: nothing }).await)
        .expect("an unknown event is not found");

    for id in [&first, &create] {
        let r = m
            .ask(FedRequest::GetEvent {
                event_id: id.clone(),
            })
            .await;
        assert_eq!(
            not_found(&r).as_ref(),
            Some(&unknown_event),
            "GetEvent {id}: {r:?}"
        );
    }
    let requests = vec![
        FedRequest::Extremities {
            room_id: room.clone(),
        },
        FedRequest::GetMissingEvents {
            room_id: room.clone(),
            earliest: vec![],
            latest: extremities.clone(),
            limit: 500,
        },
        FedRequest::GetMissingEvents {
            room_id: room.clone(),
            earliest: vec![],
            latest: vec![first.clone(), create.clone()],
            limit: 500,
        },
    ];
    for request in requests {
        let r = m.ask(request.clone()).await;
        assert_eq!(
            not_found(&r).as_ref(),
            Some(&unknown_room),
            "{request:?}: {r:?}"
        );
    }
    // A join template for an invite-only room the outsider's user was never invited to.
    let user: ruma::OwnedUserId = format!(
        "@mallory:{}",
        hyphae::identity::ServerName::from_peer_id(&m.peer_id).unwrap()
    )
    .try_into()
    .unwrap();
    let r = m
        .ask(FedRequest::MakeJoin {
            room_id: room.clone(),
            user_id: user.clone(),
        })
        .await;
    assert_eq!(
        not_found(&r).as_ref(),
        Some(&unknown_room),
        "MakeJoin: {r:?}"
    );
    // Nor a knock template: the room takes no knocks, and says so as a room that is not there.
    let r = m
        .ask(FedRequest::MakeKnock {
            room_id: room.clone(),
            user_id: user,
        })
        .await;
    assert_eq!(
        not_found(&r).as_ref(),
        Some(&unknown_room),
        "MakeKnock: {r:?}"
    );

    // Members chat, type and read while the outsider listens.
    let mut last = first.clone();
    for i in 0..20 {
        last = text(&a, &room, "alice", &format!("secret {i}")).await;
        a.send_typing(&room, &a.user("alice"), true);
        text(&b, &room, "bob", &format!("reply {i}")).await;
        b.send_receipt(&room, &b.user("bob"), &last);
    }
    has(&b, &last).await;
    // A barrier: the members' traffic reached each other, and the outsider is asked once more
    // over the same connection, so anything sent to it before has arrived.
    let _ = m.ask(FedRequest::Extremities { room_id: nowhere }).await;
    let heard = m.received().await;
    assert!(heard.is_empty(), "the outsider heard: {heard:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_member_left_stops_receiving_the_room() {
    let a = node(&[]).await;
    let b = node(&[&a]).await;
    let c = node(&[&a]).await;
    assert!(a.wait_for_peers(2, PATIENCE).await);
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    c.join(&room, "carol", a.peer_id()).await.unwrap();
    let hello = text(&a, &room, "alice", "hello both").await;
    has(&b, &hello).await;
    has(&c, &hello).await;

    let left = b
        .send(
            &room,
            "bob",
            "m.room.member",
            Some(b.user("bob").as_str()),
            json!({"membership": "leave"}),
        )
        .await
        .unwrap()
        .event_id;
    has(&a, &left).await;
    has(&c, &left).await;
    let mut edus_b = b.edus();
    let mut after = Vec::new();
    for i in 0..10 {
        after.push(text(&a, &room, "alice", &format!("after bob left {i}")).await);
        a.send_typing(&room, &a.user("alice"), true);
    }
    for id in &after {
        has(&c, id).await;
    }
    // Bob's server asks for what it missed: it is not in the room any more.
    let r = b
        .request(
            a.peer_id(),
            FedRequest::GetMissingEvents {
                room_id: room.clone(),
                earliest: vec![left.clone()],
                latest: vec![after.last().unwrap().clone()],
                limit: 500,
            },
        )
        .await;
    assert!(
        matches!(
            r,
            Err(hyphae::rooms::NodeError::Refused(FedErrorCode::NotFound, _))
        ),
        "{r:?}"
    );
    // Reconnecting runs anti-entropy both ways; still nothing reaches Bob's server.
    b.set_offline(true).unwrap();
    b.set_offline(false).unwrap();
    assert!(b.wait_for_peers(1, PATIENCE).await);
    let marker = text(&c, &room, "carol", "marker").await;
    has(&a, &marker).await;
    for id in &after {
        assert!(
            b.engine().event(id).await.unwrap().is_none(),
            "{id} reached the server that left"
        );
    }
    assert!(b.engine().event(&marker).await.unwrap().is_none());
    if let Ok(edu) = edus_b.try_recv() {
        panic!("an EDU reached the server that left: {edu:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_to_a_joined_room_gets_no_earlier_event_in_the_clear() {
    let a = node(&[]).await;
    let b = node(&[&a]).await;
    assert!(a.wait_for_peers(1, PATIENCE).await);
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        initial_state: vec![(
            "m.room.history_visibility".into(),
            String::new(),
            json!({"history_visibility": "joined"}),
        )],
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    let mut before = Vec::new();
    for i in 0..5 {
        before.push(text(&a, &room, "alice", &format!("before bob {i}")).await);
    }
    b.join(&room, "bob", a.peer_id()).await.unwrap();
    let later = text(&a, &room, "alice", "welcome bob").await;
    has(&b, &later).await;
    for id in &before {
        has(&b, id).await;
        assert_eq!(
            body(&b, id).await,
            None,
            "{id} reached the late joiner in the clear"
        );
    }
    assert_eq!(body(&b, &later).await.as_deref(), Some("welcome bob"));
    // The DAG stayed walkable: the late joiner's timeline reaches back to the create event.
    let timeline = b
        .engine()
        .timeline(&room, None, Direction::Forward, 1)
        .await
        .unwrap();
    let create = b.engine().room(&room).await.unwrap().unwrap().create_event;
    assert_eq!(timeline[0].pdu.event_id, create);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_gets_nothing_from_a_running_hyphae_node() {
    let hs = common::node_process::NodeProcess::start(env!("CARGO_BIN_EXE_hyphae-node"));
    let alice = common::client::register(&hs, "alice", "correct horse").await;
    let room = alice
        .ok(
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(json!({"preset": "private_chat", "name": "secret plans"})),
        )
        .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
        common::client::enc(&room)
    );
    let sent = alice
        .ok(
            "PUT",
            &path,
            Some(json!({"msgtype": "m.text", "body": "the vault code is 1234"})),
        )
        .await;
    let event: OwnedEventId = sent["event_id"].as_str().unwrap().try_into().unwrap();
    let room: OwnedRoomId = room.try_into().unwrap();

    let m = Outsider::dial(
        hs.tcp.clone(),
        hs.peer_id,
        vec![format!("hyphae/room/{room}")],
    )
    .await;
    let nowhere: OwnedRoomId = "!nowhere:example.org".try_into().unwrap();
    let unknown_room = not_found(&m.ask(FedRequest::Extremities { room_id: nowhere }).await)
        .expect("an unknown room is not found");
    let nothing: OwnedEventId = "$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        .try_into()
        .unwrap();
    let unknown_event = not_found(&m.ask(FedRequest::GetEvent { event_id: nothing }).await)
        .expect("an unknown event is not found");
    let r = m
        .ask(FedRequest::GetEvent {
            event_id: event.clone(),
        })
        .await;
    assert_eq!(not_found(&r).as_ref(), Some(&unknown_event), "{r:?}");
    for request in [
        FedRequest::Extremities {
            room_id: room.clone(),
        },
        FedRequest::GetMissingEvents {
            room_id: room.clone(),
            earliest: vec![],
            latest: vec![event.clone()],
            limit: 500,
        },
    ] {
        let r = m.ask(request.clone()).await;
        assert_eq!(
            not_found(&r).as_ref(),
            Some(&unknown_room),
            "{request:?}: {r:?}"
        );
    }
    // Alice goes on talking; nothing reaches the outsider.
    alice
        .ok(
            "PUT",
            &path.replace("/t1", "/t2"),
            Some(json!({"msgtype": "m.text", "body": "and again"})),
        )
        .await;
    let _ = m.ask(FedRequest::Extremities { room_id: room }).await;
    assert!(m.received().await.is_empty());
}
