//! A hostile peer can neither corrupt a room, impersonate a user, nor make a node hold or do
//! more than its budgets: each attack here is made by a peer with a key of its own (or by a
//! member server turned hostile), and each must change nothing.
#![cfg(not(target_arch = "wasm32"))]

mod common;

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
