//! Simplified Sliding Sync (MSC4186) in-process: the order and windows of the room list, what a
//! `pos` has already been sent, invites and leaves, the extensions, long polling, who may read
//! what, and requests that must be refused.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::time::Duration;

use common::client::{enc, register, Client};
use common::in_process::{peer, InProcess};
use serde_json::{json, Value};

const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
const PASSWORD: &str = "sliding password";

type User<'a> = Client<'a, InProcess>;

async fn sliding(user: &User<'_>, pos: Option<&str>, body: Value) -> Value {
    let path = match pos {
        Some(p) => format!("{SLIDING}?pos={}&timeout=0", enc(p)),
        None => SLIDING.to_owned(),
    };
    user.ok("POST", &path, Some(body)).await
}

fn list(ranges: Value, timeline_limit: u64) -> Value {
    json!({"all": {
        "ranges": ranges,
        "timeline_limit": timeline_limit,
        "required_state": [["m.room.name", ""], ["m.room.member", "$ME"], ["m.room.member", "$LAZY"]],
    }})
}

fn names_in(resp: &Value) -> Vec<String> {
    let mut rooms: Vec<(u64, String)> = resp["rooms"]
        .as_object()
        .map(|rooms| {
            rooms
                .values()
                .map(|r| {
                    (
                        r["bump_stamp"].as_u64().unwrap_or(0),
                        r["name"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rooms.sort_by_key(|r| std::cmp::Reverse(r.0));
    rooms.into_iter().map(|(_, n)| n).collect()
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_is_a_window_on_the_rooms_by_activity() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", PASSWORD).await;
    let mut rooms = Vec::new();
    for name in ["one", "two", "three", "four", "five"] {
        rooms.push(alice.create_room(json!({"name": name})).await);
    }
    // Activity, oldest to newest: five (created last), then messages in two, then four.
    alice.send_text(&rooms[1], "t1", "in two").await;
    alice.send_text(&rooms[3], "t2", "in four").await;

    let first = sliding(&alice, None, json!({"lists": list(json!([[0, 1]]), 1)})).await;
    assert_eq!(first["lists"]["all"]["count"], 5, "{first}");
    assert_eq!(
        names_in(&first),
        ["four", "two"],
        "the two most recently active"
    );
    let four = &first["rooms"][&rooms[3]];
    assert_eq!(four["initial"], true);
    assert_eq!(
        bodies(four),
        ["in four"],
        "timeline_limit 1: the newest event"
    );
    assert_eq!(four["limited"], true);
    assert!(four["prev_batch"].is_string());
    assert_eq!(four["joined_count"], 1);
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Nothing new: nothing sent.
    let again = sliding(
        &alice,
        Some(&pos),
        json!({"lists": list(json!([[0, 1]]), 1)}),
    )
    .await;
    assert!(
        again["rooms"].as_object().is_none_or(|r| r.is_empty()),
        "{again}"
    );
    let pos = again["pos"].as_str().unwrap().to_owned();

    // A message in "one" moves it into the window: it was never sent, so it comes whole.
    alice.send_text(&rooms[0], "t3", "in one").await;
    let moved = sliding(
        &alice,
        Some(&pos),
        json!({"lists": list(json!([[0, 1]]), 1)}),
    )
    .await;
    assert_eq!(names_in(&moved), ["one"], "{moved}");
    let one = &moved["rooms"][&rooms[0]];
    assert_eq!(one["initial"], true);
    assert_eq!(bodies(one), ["in one"]);
    let pos = moved["pos"].as_str().unwrap().to_owned();

    // A second message there is a delta: only the new event, live, not initial.
    alice.send_text(&rooms[0], "t4", "again in one").await;
    let delta = sliding(
        &alice,
        Some(&pos),
        json!({"lists": list(json!([[0, 1]]), 1)}),
    )
    .await;
    let one = &delta["rooms"][&rooms[0]];
    assert_eq!(one.get("initial"), None, "{delta}");
    assert_eq!(bodies(one), ["again in one"]);
    assert_eq!(one["num_live"], 1);
    assert_eq!(one["limited"], false);

    // The same `pos` may be asked again (a response the client never got): same answer.
    let retried = sliding(
        &alice,
        Some(&pos),
        json!({"lists": list(json!([[0, 1]]), 1)}),
    )
    .await;
    assert_eq!(
        bodies(&retried["rooms"][&rooms[0]]),
        ["again in one"],
        "{retried}"
    );

    // Asking for more of a room than it was sent with sends the state again (not the room
    // whole: the client has its timeline).
    let pos = delta["pos"].as_str().unwrap().to_owned();
    let wider = sliding(
        &alice,
        Some(&pos),
        json!({"lists": list(json!([[0, 1]]), 5)}),
    )
    .await;
    let one = &wider["rooms"][&rooms[0]];
    assert_eq!(one.get("initial"), None, "{wider}");
    assert!(one["required_state"]
        .as_array()
        .is_some_and(|s| !s.is_empty()));

    // A wider window brings the rest, each once.
    let pos = wider["pos"].as_str().unwrap().to_owned();
    let all = sliding(
        &alice,
        Some(&pos),
        json!({"lists": list(json!([[0, 9]]), 5)}),
    )
    .await;
    let mut names = names_in(&all);
    names.sort();
    assert_eq!(
        names,
        ["five", "three", "two"],
        "the rooms not sent before: {all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_leaves_and_what_a_late_joiner_may_read() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", PASSWORD).await;
    let bob = register(&api, "bob", PASSWORD).await;
    let room = alice
        .create_room(json!({"name": "late", "initial_state": [{
            "type": "m.room.history_visibility", "state_key": "",
            "content": {"history_visibility": "joined"},
        }]}))
        .await;
    alice.send_text(&room, "t1", "before bob").await;
    alice
        .ok(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            Some(json!({"user_id": bob.user_id})),
        )
        .await;

    let invited = sliding(&bob, None, json!({"lists": list(json!([[0, 9]]), 5)})).await;
    let entry = &invited["rooms"][&room];
    assert!(entry["invite_state"].is_array(), "{invited}");
    assert!(
        entry.get("timeline").is_none(),
        "an invite carries no timeline"
    );
    let only_invites = sliding(
        &bob,
        None,
        json!({"lists": {"invites": {"ranges": [[0, 9]], "timeline_limit": 1, "filters": {"is_invite": true}},
                          "joined": {"ranges": [[0, 9]], "timeline_limit": 1, "filters": {"is_invite": false}}}}),
    )
    .await;
    assert_eq!(only_invites["lists"]["invites"]["count"], 1);
    assert_eq!(only_invites["lists"]["joined"]["count"], 0);
    let pos = invited["pos"].as_str().unwrap().to_owned();

    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(json!({})),
    )
    .await;
    alice.send_text(&room, "t2", "after bob").await;
    let joined = sliding(
        &bob,
        Some(&pos),
        json!({"lists": list(json!([[0, 9]]), 10)}),
    )
    .await;
    let entry = &joined["rooms"][&room];
    assert_eq!(
        entry["initial"], true,
        "joined after an invite: sent whole: {joined}"
    );
    let seen = bodies(entry);
    assert_eq!(
        seen,
        ["after bob"],
        "history from before the join stays hidden"
    );
    let pos = joined["pos"].as_str().unwrap().to_owned();

    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(json!({})),
    )
    .await;
    alice.send_text(&room, "t3", "after bob left").await;
    let left = sliding(
        &bob,
        Some(&pos),
        json!({"lists": list(json!([[0, 9]]), 10)}),
    )
    .await;
    let entry = &left["rooms"][&room];
    let me: Vec<&Value> = entry["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
        .collect();
    assert_eq!(me.len(), 1, "his leave, so the client knows: {left}");
    assert_eq!(me[0]["content"]["membership"], "leave");
    assert!(
        !bodies(entry).iter().any(|b| b == "after bob left"),
        "nothing after the leave"
    );
    let pos = left["pos"].as_str().unwrap().to_owned();
    let gone = sliding(
        &bob,
        Some(&pos),
        json!({"lists": list(json!([[0, 9]]), 10)}),
    )
    .await;
    assert_eq!(gone["lists"]["all"]["count"], 0, "{gone}");
    // A subscription to a room he left asks for nothing he may read now.
    let sub = sliding(
        &bob,
        None,
        json!({"room_subscriptions": {room.clone(): {"timeline_limit": 10}}}),
    )
    .await;
    assert!(sub["rooms"].get(&room).is_none(), "{sub}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_and_long_polling() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", PASSWORD).await;
    let bob = register(&api, "bob", PASSWORD).await;
    let room = alice
        .create_room(json!({"name": "ext", "invite": [bob.user_id]}))
        .await;
    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(json!({})),
    )
    .await;
    let whoami = bob
        .ok("GET", "/_matrix/client/v3/account/whoami", None)
        .await;
    let device = whoami["device_id"].as_str().unwrap().to_owned();
    alice
        .ok(
            "PUT",
            "/_matrix/client/v3/sendToDevice/org.hyphae.test/td1",
            Some(json!({"messages": {bob.user_id.clone(): {device.clone(): {"n": 1}}}})),
        )
        .await;
    let exts = |since: Option<&str>| {
        let mut to_device = json!({"enabled": true});
        if let Some(s) = since {
            to_device["since"] = s.into();
        }
        json!({
            "lists": list(json!([[0, 9]]), 1),
            "extensions": {
                "to_device": to_device,
                "e2ee": {"enabled": true},
                "account_data": {"enabled": true},
                "receipts": {"enabled": true, "rooms": ["*"]},
                "typing": {"enabled": true},
                "org.example.unknown": {"enabled": true},
            },
        })
    };
    let first = sliding(&bob, None, exts(None)).await;
    let to_device = &first["extensions"]["to_device"];
    assert_eq!(to_device["events"][0]["content"]["n"], 1, "{first}");
    let since = to_device["next_batch"].as_str().unwrap().to_owned();
    assert!(first["extensions"]["e2ee"]["device_one_time_keys_count"].is_object());
    let global = first["extensions"]["account_data"]["global"]
        .as_array()
        .unwrap();
    assert!(global.iter().any(|e| e["type"] == "m.push_rules"));
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Acknowledged with `since`: not delivered again.
    let second = sliding(&bob, Some(&pos), exts(Some(&since))).await;
    assert!(
        second["extensions"]["to_device"]["events"]
            .as_array()
            .is_none_or(|e| e.is_empty()),
        "{second}"
    );
    let pos = second["pos"].as_str().unwrap().to_owned();

    // A long poll is woken by typing, then by a receipt.
    let typing = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        alice
            .ok(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/typing/{}",
                    enc(&room),
                    enc(&alice.user_id)
                ),
                Some(json!({"typing": true, "timeout": 10000})),
            )
            .await;
    };
    let poll_path = format!("{SLIDING}?pos={}&timeout=20000", enc(&pos));
    let poll = bob.ok("POST", &poll_path, Some(exts(Some(&since))));
    let started = std::time::Instant::now();
    let (woken, ()) = tokio::join!(poll, typing);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken, not timed out"
    );
    let users = &woken["extensions"]["typing"]["rooms"][&room]["content"]["user_ids"];
    assert_eq!(users, &json!([alice.user_id]), "{woken}");
    let pos = woken["pos"].as_str().unwrap().to_owned();
    let event = alice.send_text(&room, "t1", "read me").await;
    bob.ok(
        "POST",
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(&room),
            enc(&event)
        ),
        Some(json!({})),
    )
    .await;
    let read = sliding(&bob, Some(&pos), exts(Some(&since))).await;
    let receipt = &read["extensions"]["receipts"]["rooms"][&room]["content"][&event]["m.read"];
    assert!(receipt.get(&bob.user_id).is_some(), "{read}");
    assert_eq!(
        read["rooms"][&room]["notification_count"], 0,
        "his own receipt cleared the count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", PASSWORD).await;
    let bob = register(&api, "bob", PASSWORD).await;
    alice.create_room(json!({"name": "mine"})).await;
    let ok = sliding(
        &alice,
        None,
        json!({"conn_id": "a", "lists": list(json!([[0, 9]]), 1)}),
    )
    .await;
    let pos = ok["pos"].as_str().unwrap().to_owned();

    let refused = |body: Value, pos: Option<String>, errcode: &'static str| {
        let alice = &alice;
        async move {
            let path = match pos {
                Some(p) => format!("{SLIDING}?pos={}", enc(&p)),
                None => SLIDING.to_owned(),
            };
            alice.fails("POST", &path, Some(body), errcode).await;
        }
    };
    refused(
        json!({"lists": {"all": {"ranges": [[5, 1]], "timeline_limit": 1}}}),
        None,
        "M_INVALID_PARAM",
    )
    .await;
    refused(
        json!({"lists": {"all": {"ranges": [[0, -1]], "timeline_limit": 1}}}),
        None,
        "M_BAD_JSON",
    )
    .await;
    refused(
        json!({"lists": {"all": {"ranges": "all", "timeline_limit": 1}}}),
        None,
        "M_BAD_JSON",
    )
    .await;
    refused(
        json!({"lists": {"all": {"ranges": [[0, 1]]}}}),
        None,
        "M_BAD_JSON",
    )
    .await;
    let many: serde_json::Map<String, Value> = (0..100)
        .map(|i| {
            (
                format!("l{i}"),
                json!({"ranges": [[0, 1]], "timeline_limit": 1}),
            )
        })
        .collect();
    refused(json!({ "lists": many }), None, "M_INVALID_PARAM").await;
    let ranges: Vec<Value> = (0..100).map(|i| json!([i, i])).collect();
    refused(
        json!({"lists": {"all": {"ranges": ranges, "timeline_limit": 1}}}),
        None,
        "M_INVALID_PARAM",
    )
    .await;
    refused(
        json!({"extensions": {"to_device": "yes"}}),
        None,
        "M_BAD_JSON",
    )
    .await;
    refused(
        json!({"extensions": {"org.example.x": 1}}),
        None,
        "M_BAD_JSON",
    )
    .await;
    refused(
        json!({"extensions": {"to_device": {"enabled": true, "since": "nope"}}}),
        None,
        "M_INVALID_PARAM",
    )
    .await;
    refused(
        json!({"room_subscriptions": {"not a room": {"timeline_limit": 1}}}),
        None,
        "M_BAD_JSON",
    )
    .await;
    refused(
        json!({"conn_id": "a"}),
        Some("garbage".into()),
        "M_UNKNOWN_POS",
    )
    .await;
    refused(json!({"conn_id": "b"}), Some(pos.clone()), "M_UNKNOWN_POS").await;
    bob.fails(
        "POST",
        &format!("{SLIDING}?pos={}", enc(&pos)),
        Some(json!({"conn_id": "a"})),
        "M_UNKNOWN_POS",
    )
    .await;
    // None of that touched the connection: its `pos` still works.
    let still = sliding(
        &alice,
        Some(&pos),
        json!({"conn_id": "a", "lists": list(json!([[0, 9]]), 1)}),
    )
    .await;
    assert_eq!(still["lists"]["all"]["count"], 1);
    let (status, _) = api.call("POST", SLIDING, None, Some(json!({}))).await;
    assert_eq!(status, 401, "an access token is needed");
}

use common::client::Transport as _;
