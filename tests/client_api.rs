//! The Client-Server API in-process: the client scenario on one peer and across two peers
//! joined only by libp2p, and malformed requests that must change nothing.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::client::{register, scenario, Transport};
use common::in_process::{peer, redb_peer, InProcess};
use hyphae::api::{Caller, ClientApi, Registration};
use hyphae::rooms::P2pNode;
use hyphae::store::{scan_all, Table, WriteBatch};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_on_one_peer() {
    let (_node, api) = peer(None).await;
    scenario(&api, &api, "", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_on_two_peers_over_libp2p() {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
    scenario(&api_a, &api_b, "", Some(&a.server_name().to_string())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_policy_is_enforced() {
    let (node, api) = peer(None).await;
    let closed = ClientApi::start(node.clone(), Registration::Closed)
        .await
        .unwrap();
    let body = json!({"username": "x", "password": "y", "auth": {"type": "m.login.dummy"}});
    let (status, v) = InProcess(closed)
        .call(
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(body.clone()),
        )
        .await;
    assert_eq!((status, v["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    // Loopback policy refuses a remote caller.
    let req = http::Request::builder()
        .method("POST")
        .uri("/_matrix/client/v3/register")
        .body(body.to_string().into_bytes())
        .unwrap();
    let resp = api.0.handle(req, Caller { local: false }).await;
    assert_eq!(resp.status().as_u16(), 403);
    let token = ClientApi::start(node, Registration::Token("s3cret".into()))
        .await
        .unwrap();
    let token = InProcess(token);
    let (status, first) = token
        .call(
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(json!({"username": "t", "password": "p"})),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(first["flows"][0]["stages"][0], "m.login.registration_token");
    let session = first["session"].clone();
    let wrong = json!({"username": "t", "password": "p", "auth": {"type": "m.login.registration_token", "token": "guess", "session": session}});
    let (status, _) = token
        .call("POST", "/_matrix/client/v3/register", None, Some(wrong))
        .await;
    assert_eq!(status, 403);
    let right = json!({"username": "t", "password": "p", "auth": {"type": "m.login.registration_token", "token": "s3cret", "session": session}});
    let (status, v) = token
        .call("POST", "/_matrix/client/v3/register", None, Some(right))
        .await;
    assert_eq!(status, 200, "{v}");
}

/// Every table's full contents, to compare before and after.
async fn dump(node: &P2pNode) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let store = node.engine().store();
    let mut out = Vec::new();
    for t in Table::ALL {
        out.push(scan_all(store.as_ref(), t).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_matrix_errors_and_change_nothing() {
    let (node, api) = peer(None).await;
    let alice = register(&api, "alice", "pw").await;
    let room = alice.create_room(json!({"name": "R"})).await;
    let r = common::client::enc(&room);
    let me = common::client::enc(&alice.user_id);
    let before = dump(&node).await;
    let tok = Some(alice.token.as_str());
    let not_json = b"{not json".to_vec();
    let huge = vec![b' '; 2 << 20];
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/_matrix/client/v3/login".into(),
            not_json.clone(),
            400,
            "M_NOT_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/login".into(),
            br#"{"type": 5}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/register".into(),
            br#"{"username": 7}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/register".into(),
            huge.clone(),
            413,
            "M_TOO_LARGE",
        ),
        (
            "POST",
            "/_matrix/client/v3/createRoom".into(),
            not_json.clone(),
            400,
            "M_NOT_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/createRoom".into(),
            br#"{"name": 1}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/createRoom".into(),
            br#"{"initial_state": [{"type": "x"}]}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/createRoom".into(),
            br#"{"room_version": "1"}"#.to_vec(),
            400,
            "M_UNSUPPORTED_ROOM_VERSION",
        ),
        (
            "POST",
            format!("/_matrix/client/v3/join/{r}"),
            not_json.clone(),
            400,
            "M_NOT_JSON",
        ),
        (
            "POST",
            "/_matrix/client/v3/join/notaroom".into(),
            b"{}".to_vec(),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/t1"),
            not_json.clone(),
            400,
            "M_NOT_JSON",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/t2"),
            b"[1,2]".to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/t3"),
            huge.clone(),
            413,
            "M_TOO_LARGE",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/t4"),
            format!(r#"{{"body": "{}"}}"#, "x".repeat(70_000)).into_bytes(),
            413,
            "M_TOO_LARGE",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/state/m.room.name"),
            not_json.clone(),
            400,
            "M_NOT_JSON",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/state/m.room.power_levels"),
            br#"{"users": 5}"#.to_vec(),
            403,
            "M_FORBIDDEN",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/profile/{me}/displayname"),
            br#"{"displayname": 5}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            format!("/_matrix/client/v3/user/{me}/filter"),
            br#"{"room": 3}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "GET",
            "/_matrix/client/v3/sync?since=garbage".into(),
            Vec::new(),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "GET",
            "/_matrix/client/v3/sync?filter=%7Bbad".into(),
            Vec::new(),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/user/{me}/account_data/x"),
            b"3".to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/typing/{me}"),
            br#"{"typing": "yes"}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            format!("/_matrix/client/v3/rooms/{r}/receipt/m.read/notanevent"),
            b"{}".to_vec(),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "POST",
            "/_matrix/client/v3/keys/upload".into(),
            br#"{"one_time_keys": 4}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "PUT",
            "/_matrix/client/v3/sendToDevice/m.x/1".into(),
            br#"{"messages": []}"#.to_vec(),
            400,
            "M_BAD_JSON",
        ),
        (
            "GET",
            "/_matrix/client/v3/nonexistent".into(),
            Vec::new(),
            404,
            "M_UNRECOGNIZED",
        ),
        (
            "DELETE",
            "/_matrix/client/v3/login".into(),
            Vec::new(),
            405,
            "M_UNRECOGNIZED",
        ),
        (
            "DELETE",
            "/_matrix/client/v3/joined_rooms".into(),
            Vec::new(),
            405,
            "M_UNRECOGNIZED",
        ),
        (
            "GET",
            "/_matrix/media/v3/no-such-endpoint".into(),
            Vec::new(),
            404,
            "M_UNRECOGNIZED",
        ),
    ];
    for (method, path, body, status, errcode) in cases {
        let (got, v) = api.raw(method, &path, tok, body).await;
        assert_eq!(
            (got, v["errcode"].as_str()),
            (status, Some(errcode)),
            "{method} {path}: {v}"
        );
    }
    let (status, v) = api
        .raw("GET", "/_matrix/client/v3/account/whoami", None, Vec::new())
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
    assert_eq!(dump(&node).await, before, "bad requests changed the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typing_notice_that_runs_out_wakes_sync() {
    let (_node, api) = peer(None).await;
    let mut alice = register(&api, "alice", "pw").await;
    let bob = register(&api, "bob", "pw").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let r = common::client::enc(&room);
    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{r}"),
        Some(json!({})),
    )
    .await;
    let typing_path = format!(
        "/_matrix/client/v3/rooms/{r}/typing/{}",
        common::client::enc(&bob.user_id)
    );
    bob.ok(
        "PUT",
        &typing_path,
        Some(json!({"typing": true, "timeout": 300})),
    )
    .await;
    let typing_users = |s: &Value| -> Option<Vec<Value>> {
        s["rooms"]["join"][&room]["ephemeral"]["events"]
            .as_array()?
            .iter()
            .find(|e| e["type"] == "m.typing")
            .map(|e| e["content"]["user_ids"].as_array().unwrap().clone())
    };
    let first = alice
        .sync_until("bob typing", |s| typing_users(s).filter(|u| !u.is_empty()))
        .await;
    assert_eq!(first, vec![json!(bob.user_id)]);
    // Nothing else happens in the room: only the expiry itself can produce this update.
    let stopped = alice
        .sync_until("bob stopping", |s| typing_users(s).filter(|u| u.is_empty()))
        .await;
    assert!(stopped.is_empty());
}

/// Ten senders at once (one group commit carries many of their events) while a reader
/// long-polls: every event arrives through /sync exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_reach_a_syncing_reader_exactly_once() {
    let (_node, api) = peer(None).await;
    let api = Arc::new(api);
    let mut reader = register(api.as_ref(), "reader", "pw").await;
    // Room for every new event in each sync, so that no timeline is `limited`.
    reader.filter = Some(json!({"room": {"timeline": {"limit": 500}}}).to_string());
    let room = reader.create_room(json!({"preset": "public_chat"})).await;
    let r = common::client::enc(&room);
    reader
        .sync_until("the room", |s| s["rooms"]["join"].get(&room).map(|_| ()))
        .await;
    let mut senders = Vec::new();
    for i in 0..10 {
        let api = api.clone();
        let r = r.clone();
        senders.push(tokio::spawn(async move {
            let me = register(api.as_ref(), &format!("sender{i}"), "pw").await;
            me.ok(
                "POST",
                &format!("/_matrix/client/v3/join/{r}"),
                Some(json!({})),
            )
            .await;
            let mut ids = Vec::new();
            for j in 0..20 {
                let path = format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/m{j}");
                let v = me
                    .ok(
                        "PUT",
                        &path,
                        Some(json!({"msgtype": "m.text", "body": format!("{i}/{j}")})),
                    )
                    .await;
                ids.push(v["event_id"].as_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 200 {
        let room_key = room.clone();
        let batch = reader
            .sync_until("more messages", |s| {
                let events = s["rooms"]["join"][&room_key]["timeline"]["events"].as_array()?;
                let ids: Vec<String> = events
                    .iter()
                    .filter(|e| e["type"] == "m.room.message")
                    .map(|e| e["event_id"].as_str().unwrap().to_owned())
                    .collect();
                (!ids.is_empty()).then_some(ids)
            })
            .await;
        seen.extend(batch);
    }
    let mut per_sender = Vec::new();
    for h in senders {
        per_sender.push(h.await.unwrap());
    }
    for id in per_sender.iter().flatten() {
        assert!(seen.contains(id), "{id} never came through /sync");
    }
    // Each sender sent one after another: their events arrive in that order.
    for ids in &per_sender {
        let at: Vec<usize> = ids
            .iter()
            .map(|id| seen.iter().position(|s| s == id).expect("seen"))
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "a sender's events came out of order: {at:?}"
        );
    }
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "some events came through /sync twice"
    );
    assert_eq!(seen.len(), 200);
    // And in the room's own order: what /sync delivered is what /messages reads back.
    let page = reader
        .ok(
            "GET",
            &format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=500"),
            None,
        )
        .await;
    let mut stored: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    stored.reverse();
    assert_eq!(
        seen, stored,
        "/sync delivered the events out of stream order"
    );
}

// ---- history visibility ----------------------------------------------------------------------

type Api = InProcess;
type User<'a> = common::client::Client<'a, Api>;

fn rooms_path(room: &str, rest: &str) -> String {
    format!(
        "/_matrix/client/v3/rooms/{}/{rest}",
        common::client::enc(room)
    )
}

/// The `m.room.message` bodies among `events`.
fn bodies(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["type"] == "m.room.message")
                .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The phases whose message (`m<phase>`) is among `bodies`, in order.
fn phases_of(bodies: &[String]) -> Vec<usize> {
    let mut out: Vec<usize> = bodies
        .iter()
        .filter_map(|b| b.strip_prefix('m')?.parse().ok())
        .collect();
    out.sort();
    out
}

/// The position a token-less backward `/messages` starts at: every event so far is below it.
async fn position_now(alice: &User<'_>, room: &str) -> String {
    let v = alice
        .ok("GET", &rooms_path(room, "messages?dir=b&limit=1"), None)
        .await;
    v["start"].as_str().unwrap().to_owned()
}

const SYNC_FILTER: &str = r#"{"room":{"include_leave":true,"timeline":{"limit":100}}}"#;

/// One `/sync` (initial or since `since`) with room for every event and left rooms included.
async fn sync_once(user: &User<'_>, since: Option<&str>) -> Value {
    let mut path = format!(
        "/_matrix/client/v3/sync?timeout=0&filter={}",
        common::client::enc(SYNC_FILTER)
    );
    if let Some(s) = since {
        path.push_str(&format!("&since={s}"));
    }
    user.ok("GET", &path, None).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// Joined before anything was said.
    Early,
    /// Invited in phase 1, joined at the start of phase 2.
    InvitedThenJoined,
    /// Joined at the start of phase 2, never invited.
    Late,
    /// Joined at the start of phase 2, left at the start of phase 3.
    Left,
    /// Joined at the start of phase 2, banned at the start of phase 3.
    Banned,
    /// Never had a membership in the room.
    Never,
}

const EVERYONE: [Who; 6] = [
    Who::Early,
    Who::InvitedThenJoined,
    Who::Late,
    Who::Left,
    Who::Banned,
    Who::Never,
];

/// The phases (0: before the invite, 1: between invite and join, 2: after the join, 3: after
/// the leave or ban) whose events `who` may read under `visibility`.
fn expected(visibility: &str, who: Who) -> Vec<usize> {
    use Who::*;
    match (visibility, who) {
        (_, Early) => vec![0, 1, 2, 3],
        ("world_readable" | "shared", InvitedThenJoined | Late | Never) => vec![0, 1, 2, 3],
        ("world_readable" | "shared", Left | Banned) => vec![0, 1, 2],
        ("invited", InvitedThenJoined) => vec![1, 2, 3],
        ("invited" | "joined", InvitedThenJoined | Late)
            if who == Late || visibility == "joined" =>
        {
            vec![2, 3]
        }
        ("invited" | "joined", Left | Banned) => vec![2],
        _ => vec![],
    }
}

/// May `who` read the room at all (else every read is `M_FORBIDDEN`)?
fn may_read(visibility: &str, who: Who) -> bool {
    who != Who::Never || visibility == "world_readable"
}

/// The room one visibility value is tested in, with what was sent in each phase.
struct History {
    room: String,
    /// `m<phase>`'s event id, per phase.
    messages: Vec<String>,
    /// Reactions: (target phase, phase sent in, key).
    reactions: Vec<(usize, usize, String)>,
    /// A `/messages` token at the end of each phase.
    ends: Vec<String>,
    /// Each user's sync tokens: before phase 0, and before phase 2 (after the joins).
    tokens: Vec<(Who, String, String)>,
}

async fn live_history(alice: &User<'_>, users: &[(Who, &User<'_>)], visibility: &str) -> History {
    let user = |w: Who| users.iter().find(|(x, _)| *x == w).unwrap().1;
    let room = alice
        .create_room(json!({
            "preset": "public_chat",
            "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": {"history_visibility": visibility},
            }],
        }))
        .await;
    let join = format!("/_matrix/client/v3/join/{}", common::client::enc(&room));
    user(Who::Early).ok("POST", &join, Some(json!({}))).await;
    let mut t0 = Vec::new();
    for (who, u) in users {
        t0.push((
            *who,
            sync_once(u, None).await["next_batch"]
                .as_str()
                .unwrap()
                .to_owned(),
        ));
    }
    let mut h = History {
        room: room.clone(),
        messages: Vec::new(),
        reactions: Vec::new(),
        ends: Vec::new(),
        tokens: Vec::new(),
    };
    let mut txn = 0;
    let mut t1 = Vec::new();
    for phase in 0..4 {
        match phase {
            1 => {
                alice
                    .ok(
                        "POST",
                        &rooms_path(&room, "invite"),
                        Some(json!({"user_id": user(Who::InvitedThenJoined).user_id})),
                    )
                    .await;
            }
            2 => {
                for w in [Who::InvitedThenJoined, Who::Late, Who::Left, Who::Banned] {
                    user(w).ok("POST", &join, Some(json!({}))).await;
                }
                for (who, u) in users {
                    let since = &t0.iter().find(|(w, _)| w == who).unwrap().1;
                    let v = sync_once(u, Some(since)).await;
                    t1.push((*who, v["next_batch"].as_str().unwrap().to_owned()));
                }
            }
            3 => {
                user(Who::Left)
                    .ok("POST", &rooms_path(&room, "leave"), Some(json!({})))
                    .await;
                alice
                    .ok(
                        "POST",
                        &rooms_path(&room, "ban"),
                        Some(json!({"user_id": user(Who::Banned).user_id})),
                    )
                    .await;
            }
            _ => {}
        }
        txn += 1;
        let id = alice
            .send_text(&room, &format!("{visibility}-{txn}"), &format!("m{phase}"))
            .await;
        h.messages.push(id);
        for target in 0..=phase {
            txn += 1;
            let key = format!("r{target}{phase}");
            let path = rooms_path(&room, &format!("send/m.reaction/{visibility}-{txn}"));
            let content = json!({"m.relates_to": {
                "rel_type": "m.annotation", "event_id": h.messages[target], "key": key,
            }});
            alice.ok("PUT", &path, Some(content)).await;
            h.reactions.push((target, phase, key));
        }
        if phase == 3 {
            alice
                .ok(
                    "PUT",
                    &rooms_path(&room, "state/m.room.topic"),
                    Some(json!({"topic": "after the leave"})),
                )
                .await;
        }
        h.ends.push(position_now(alice, &room).await);
    }
    for (who, t) in t0 {
        let t1 = t1.iter().find(|(w, _)| *w == who).unwrap().1.clone();
        h.tokens.push((who, t, t1));
    }
    h
}

/// Everything `who` reads of `h`'s room through each endpoint matches `expected`.
async fn check_reads(h: &History, visibility: &str, who: Who, u: &User<'_>, alice: &User<'_>) {
    let cell = format!("{visibility} × {who:?}");
    let want = expected(visibility, who);
    let room = &h.room;
    let readable = may_read(visibility, who);
    let refused = |v: &Value| v["errcode"] == "M_FORBIDDEN";

    // /messages, back from the end.
    let (status, v) = u
        .call("GET", &rooms_path(room, "messages?dir=b&limit=100"), None)
        .await;
    if readable {
        assert_eq!(status, 200, "{cell}: /messages {v}");
        assert_eq!(phases_of(&bodies(&v["chunk"])), want, "{cell}: /messages");
    } else {
        assert!(status == 403 && refused(&v), "{cell}: /messages {v}");
    }
    // /messages forward from the start.
    let (status, v) = u
        .call("GET", &rooms_path(room, "messages?dir=f&limit=100"), None)
        .await;
    if readable {
        assert_eq!(
            phases_of(&bodies(&v["chunk"])),
            want,
            "{cell}: /messages dir=f"
        );
    } else {
        assert_eq!(status, 403, "{cell}: /messages dir=f {v}");
    }

    for (phase, id) in h.messages.iter().enumerate() {
        let visible = want.contains(&phase);
        let enc_id = common::client::enc(id);
        // /event
        let (status, v) = u
            .call("GET", &rooms_path(room, &format!("event/{enc_id}")), None)
            .await;
        match (readable, visible) {
            (false, _) => assert!(status == 403 && refused(&v), "{cell}: /event m{phase} {v}"),
            (true, true) => {
                assert_eq!(status, 200, "{cell}: /event m{phase} {v}");
                assert_eq!(v["content"]["body"], format!("m{phase}"), "{cell}");
            }
            (true, false) => assert!(
                status == 404 && v["errcode"] == "M_NOT_FOUND",
                "{cell}: /event m{phase} should be hidden: {v}"
            ),
        }
        // /context
        let (status, v) = u
            .call(
                "GET",
                &rooms_path(room, &format!("context/{enc_id}?limit=100")),
                None,
            )
            .await;
        match (readable, visible) {
            (false, _) => assert_eq!(status, 403, "{cell}: /context m{phase} {v}"),
            (true, true) => {
                assert_eq!(status, 200, "{cell}: /context m{phase} {v}");
                let mut all = bodies(&v["events_before"]);
                all.extend(bodies(&json!([v["event"]])));
                all.extend(bodies(&v["events_after"]));
                assert_eq!(phases_of(&all), want, "{cell}: /context around m{phase}");
                // The state at the last event returned: the topic only if that came after it.
                let topic_after_leave = v["state"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["type"] == "m.room.topic");
                assert_eq!(
                    topic_after_leave,
                    want.contains(&3),
                    "{cell}: /context m{phase} state"
                );
            }
            (true, false) => assert_eq!(status, 404, "{cell}: /context m{phase} {v}"),
        }
        // /relations
        let (status, v) = u
            .call(
                "GET",
                &rooms_path(room, &format!("relations/{enc_id}?limit=100")),
                None,
            )
            .await;
        match (readable, visible) {
            (false, _) => assert_eq!(status, 403, "{cell}: /relations m{phase} {v}"),
            (true, true) => {
                assert_eq!(status, 200, "{cell}: /relations m{phase} {v}");
                let mut got: Vec<String> = v["chunk"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        e["content"]["m.relates_to"]["key"]
                            .as_str()
                            .unwrap()
                            .to_owned()
                    })
                    .collect();
                got.sort();
                let mut wanted: Vec<String> = h
                    .reactions
                    .iter()
                    .filter(|(t, sent, _)| *t == phase && want.contains(sent))
                    .map(|(_, _, k)| k.clone())
                    .collect();
                wanted.sort();
                assert_eq!(got, wanted, "{cell}: /relations of m{phase}");
            }
            (true, false) => assert_eq!(status, 404, "{cell}: /relations m{phase} {v}"),
        }
    }

    // /members?at= the end of each phase: the state there, if the user may see that point; a
    // user who left reads the members as of their leave at the latest.
    let invitee = u.user_id.clone();
    for (phase, at) in h.ends.iter().enumerate() {
        let (status, v) = u
            .call("GET", &rooms_path(room, &format!("members?at={at}")), None)
            .await;
        let departed = matches!(who, Who::Left | Who::Banned) && phase == 3;
        if !readable || !(want.contains(&phase) || departed) {
            assert!(
                status == 403 && refused(&v),
                "{cell}: /members at end of {phase}: {v}"
            );
            continue;
        }
        assert_eq!(status, 200, "{cell}: /members at end of {phase}: {v}");
        let membership_of = |user: &str| {
            v["chunk"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["state_key"] == user)
                .map(|e| e["content"]["membership"].as_str().unwrap().to_owned())
        };
        let own = membership_of(&invitee);
        let own_want = match (who, phase) {
            (Who::Never, _) => None,
            (Who::Early, _) => Some("join"),
            (Who::InvitedThenJoined, 0) | (Who::Late | Who::Left | Who::Banned, 0 | 1) => None,
            (Who::InvitedThenJoined, 1) => Some("invite"),
            (Who::Left, 3) => Some("leave"),
            (Who::Banned, 3) => Some("ban"),
            _ => Some("join"),
        };
        assert_eq!(
            own.as_deref(),
            own_want,
            "{cell}: own membership at end of {phase}"
        );
    }

    // /state: a user who left reads it as of their leave (the topic came after).
    let (status, v) = u
        .call("GET", &rooms_path(room, "state/m.room.topic"), None)
        .await;
    match (readable, who) {
        (false, _) => assert_eq!(status, 403, "{cell}: /state {v}"),
        (true, Who::Left | Who::Banned) => assert_eq!(status, 404, "{cell}: /state {v}"),
        (true, _) => assert_eq!(v["topic"], "after the leave", "{cell}: /state"),
    }

    // /sync: initial, and incremental from before phase 0 and from after the joins. A user who
    // left finds the room under `leave`, up to their leave.
    let section = if matches!(who, Who::Left | Who::Banned) {
        "leave"
    } else {
        "join"
    };
    let other = if section == "join" { "leave" } else { "join" };
    let (_, t0, t1) = h.tokens.iter().find(|(w, _, _)| *w == who).unwrap();
    for (what, since, phases) in [
        ("initial /sync", None, want.clone()),
        ("/sync since phase 0", Some(t0.as_str()), want.clone()),
        (
            "/sync since the joins",
            Some(t1.as_str()),
            want.iter().copied().filter(|p| *p >= 2).collect(),
        ),
    ] {
        let v = sync_once(u, since).await;
        assert!(
            v["rooms"][other].get(room).is_none(),
            "{cell}: {what} has the room under {other}: {v}"
        );
        let entry = &v["rooms"][section][room];
        if who == Who::Never {
            assert!(entry.is_null(), "{cell}: {what} shows the room: {v}");
            assert!(v["rooms"]["join"].get(room).is_none());
            continue;
        }
        if phases.is_empty() && since.is_some() {
            // Nothing new the user may see: the room may be left out.
            if entry.is_null() {
                continue;
            }
        }
        let timeline = &entry["timeline"]["events"];
        assert_eq!(
            phases_of(&bodies(timeline)),
            phases,
            "{cell}: {what} timeline"
        );
        let topic = timeline
            .as_array()
            .unwrap()
            .iter()
            .chain(entry["state"]["events"].as_array().unwrap())
            .any(|e| e["type"] == "m.room.topic");
        assert_eq!(
            topic,
            phases.contains(&3),
            "{cell}: {what}: the topic set after the leave"
        );
        if since.is_none() {
            // Paging back from the timeline finds nothing more of what is hidden.
            let prev = entry["timeline"]["prev_batch"].as_str().unwrap();
            let back = u
                .ok(
                    "GET",
                    &rooms_path(room, &format!("messages?dir=b&limit=100&from={prev}")),
                    None,
                )
                .await;
            let mut all = bodies(&back["chunk"]);
            all.extend(bodies(timeline));
            assert_eq!(
                phases_of(&all),
                want,
                "{cell}: timeline and /messages from prev_batch"
            );
        }
    }
    let _ = alice;
}

/// Every `history_visibility` value × every kind of user × every reading endpoint, on one peer:
/// exactly the messages each user may see come back, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_visibility_matrix() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", "pw").await;
    let mut clients = Vec::new();
    for who in EVERYONE {
        clients.push((
            who,
            register(&api, &format!("{who:?}").to_lowercase(), "pw").await,
        ));
    }
    let users: Vec<(Who, &User<'_>)> = clients.iter().map(|(w, c)| (*w, c)).collect();
    for visibility in ["world_readable", "shared", "invited", "joined"] {
        let h = live_history(&alice, &users, visibility).await;
        for (who, u) in &users {
            check_reads(&h, visibility, *who, u, &alice).await;
        }
    }
}

/// Waits until `node` holds `event`.
async fn holds(node: &P2pNode, event: &str) {
    let id = ruma::OwnedEventId::try_from(event).unwrap();
    let found = node
        .wait_until(Duration::from_secs(30), || {
            let id = id.clone();
            async move { node.engine().event(&id).await.ok().flatten().is_some() }
        })
        .await;
    assert!(found, "{} never received {event}", node.server_name());
}

/// `joined` history across two peers: users of the second peer who joined late see nothing of
/// what came before; one who left sees nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_history_on_two_peers() {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
    let alice = register(&api_a, "alice", "pw").await;
    let bob = register(&api_b, "bob", "pw").await;
    let carol = register(&api_b, "carol", "pw").await;
    let room = alice
        .create_room(json!({
            "preset": "public_chat",
            "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": {"history_visibility": "joined"},
            }],
        }))
        .await;
    let m0 = alice.send_text(&room, "t0", "m0").await;
    let join = format!(
        "/_matrix/client/v3/join/{}?via={}",
        common::client::enc(&room),
        a.server_name()
    );
    bob.ok("POST", &join, Some(json!({}))).await;
    carol.ok("POST", &join, Some(json!({}))).await;
    let room_id = ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    let member_on_b = |user: String| {
        let (b, room_id) = (&b, &room_id);
        async move {
            let state = b.engine().current_state(room_id).await.unwrap().unwrap();
            state
                .get(&("m.room.member".to_owned(), user))
                .unwrap()
                .to_string()
        }
    };
    // The history after the joins is what follows them in the room's graph: alice's peer
    // must hold them before she speaks.
    for user in [&bob.user_id, &carol.user_id] {
        holds(&a, &member_on_b(user.clone()).await).await;
    }
    let m1 = alice.send_text(&room, "t1", "m1").await;
    holds(&b, &m1).await;
    carol
        .ok("POST", &rooms_path(&room, "leave"), Some(json!({})))
        .await;
    let leave = member_on_b(carol.user_id.clone()).await;
    holds(&a, &leave).await;
    let m2 = alice.send_text(&room, "t2", "m2").await;
    holds(&b, &m2).await;
    for (u, want, section) in [(&bob, vec![1, 2], "join"), (&carol, vec![1], "leave")] {
        let who = &u.user_id;
        let v = u
            .ok("GET", &rooms_path(&room, "messages?dir=b&limit=100"), None)
            .await;
        assert_eq!(phases_of(&bodies(&v["chunk"])), want, "{who}: /messages");
        for (phase, id) in [&m0, &m1, &m2].into_iter().enumerate() {
            let enc_id = common::client::enc(id);
            let (status, v) = u
                .call("GET", &rooms_path(&room, &format!("event/{enc_id}")), None)
                .await;
            let visible = want.contains(&phase);
            assert_eq!(
                status,
                if visible { 200 } else { 404 },
                "{who}: /event m{phase}: {v}"
            );
            let (status, v) = u
                .call(
                    "GET",
                    &rooms_path(&room, &format!("context/{enc_id}")),
                    None,
                )
                .await;
            if visible {
                let mut all = bodies(&v["events_before"]);
                all.extend(bodies(&json!([v["event"]])));
                all.extend(bodies(&v["events_after"]));
                assert_eq!(phases_of(&all), want, "{who}: /context m{phase}");
            } else {
                assert_eq!(status, 404, "{who}: /context m{phase}: {v}");
            }
        }
        let v = sync_once(u, None).await;
        let entry = &v["rooms"][section][&room];
        assert_eq!(
            phases_of(&bodies(&entry["timeline"]["events"])),
            want,
            "{who}: initial /sync: {v}"
        );
    }
}

/// `m.read.private` receipts reach only their owner: not another user of the same peer, and
/// never another peer (whose users see the owner's public receipt sent after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_receipt_reaches_only_its_owner() {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
    let mut alice = register(&api_a, "alice", "pw").await;
    let mut bob = register(&api_b, "bob", "pw").await;
    let mut dave = register(&api_b, "dave", "pw").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let join = format!(
        "/_matrix/client/v3/join/{}?via={}",
        common::client::enc(&room),
        a.server_name()
    );
    bob.ok("POST", &join, Some(json!({}))).await;
    dave.ok("POST", &join, Some(json!({}))).await;
    // Alice's peer takes bob's receipts once it holds his join.
    let room_id = ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    let state = b.engine().current_state(&room_id).await.unwrap().unwrap();
    let bobs_join = state
        .get(&("m.room.member".to_owned(), bob.user_id.clone()))
        .unwrap()
        .to_string();
    holds(&a, &bobs_join).await;
    let m1 = alice.send_text(&room, "t1", "m1").await;
    let m2 = alice.send_text(&room, "t2", "m2").await;
    holds(&b, &m2).await;
    let receipt = |kind: &str, event: &str| {
        rooms_path(
            &room,
            &format!("receipt/{kind}/{}", common::client::enc(event)),
        )
    };
    bob.ok("POST", &receipt("m.read.private", &m1), Some(json!({})))
        .await;
    // Then a public one: once another user sees it, they would have seen the private one.
    bob.ok("POST", &receipt("m.read", &m2), Some(json!({})))
        .await;
    let receipts_in = |s: &Value, room: &str| -> Vec<Value> {
        s["rooms"]["join"][room]["ephemeral"]["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["type"] == "m.receipt")
                    .map(|e| e["content"].clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    let bob_id = bob.user_id.clone();
    for other in [&mut alice, &mut dave] {
        let r = room.clone();
        let mut seen = Vec::new();
        other
            .sync_until("bob's public receipt", |s| {
                let found = receipts_in(s, &r);
                seen.extend(found.iter().cloned());
                found
                    .iter()
                    .any(|c| c[&m2]["m.read"].get(&bob_id).is_some())
                    .then_some(())
            })
            .await;
        for c in &seen {
            assert!(
                !c.to_string().contains("m.read.private"),
                "{} saw a private receipt: {c}",
                other.user_id
            );
        }
        // A fresh sync shows it none either.
        let fresh = sync_once(other, None).await;
        assert!(
            !receipts_in(&fresh, &room)
                .iter()
                .any(|c| c.to_string().contains("m.read.private")),
            "{}: {fresh}",
            other.user_id
        );
    }
    let r = room.clone();
    let own = bob
        .sync_until("bob's own private receipt", |s| {
            receipts_in(s, &r)
                .into_iter()
                .find(|c| c[&m1]["m.read.private"].get(&bob_id).is_some())
        })
        .await;
    assert!(own[&m1]["m.read.private"][&bob_id]["ts"].is_u64());
}

/// A user's `m.ignored_user_list` hides the ignored users' events, invites and typing from
/// them, and from nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_users_are_hidden() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", "pw").await;
    let bob = register(&api, "bob", "pw").await;
    let carol = register(&api, "carol", "pw").await;
    let room = carol.create_room(json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/join/{}", common::client::enc(&room));
    alice.ok("POST", &join, Some(json!({}))).await;
    bob.ok("POST", &join, Some(json!({}))).await;
    alice
        .ok(
            "PUT",
            &format!(
                "/_matrix/client/v3/user/{}/account_data/m.ignored_user_list",
                common::client::enc(&alice.user_id)
            ),
            Some(json!({"ignored_users": {bob.user_id.clone(): {}}})),
        )
        .await;
    let m0 = carol.send_text(&room, "c0", "m0").await;
    let from_bob = bob.send_text(&room, "b1", "m1").await;
    let m2 = carol.send_text(&room, "c2", "m2").await;
    for u in [&bob, &carol] {
        let typing = rooms_path(
            &room,
            &format!("typing/{}", common::client::enc(&u.user_id)),
        );
        u.ok(
            "PUT",
            &typing,
            Some(json!({"typing": true, "timeout": 60000})),
        )
        .await;
    }
    let bobs_room = bob
        .create_room(json!({"preset": "private_chat", "invite": [alice.user_id]}))
        .await;

    for (u, want) in [(&alice, vec![0, 2]), (&carol, vec![0, 1, 2])] {
        let who = &u.user_id;
        let v = u
            .ok("GET", &rooms_path(&room, "messages?dir=b&limit=100"), None)
            .await;
        assert_eq!(phases_of(&bodies(&v["chunk"])), want, "{who}: /messages");
        let v = u
            .ok(
                "GET",
                &rooms_path(&room, &format!("context/{}", common::client::enc(&m2))),
                None,
            )
            .await;
        let mut all = bodies(&v["events_before"]);
        all.extend(bodies(&json!([v["event"]])));
        assert_eq!(phases_of(&all), want, "{who}: /context");
        let (status, _) = u
            .call(
                "GET",
                &rooms_path(&room, &format!("event/{}", common::client::enc(&from_bob))),
                None,
            )
            .await;
        assert_eq!(
            status,
            if want.contains(&1) { 200 } else { 404 },
            "{who}: /event"
        );
        let s = sync_once(u, None).await;
        let entry = &s["rooms"]["join"][&room];
        assert_eq!(
            phases_of(&bodies(&entry["timeline"]["events"])),
            want,
            "{who}: /sync"
        );
        let typing: Vec<String> = entry["ephemeral"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "m.typing")
            .map(|e| {
                e["content"]["user_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|u| u.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let mut typing_want = vec![carol.user_id.clone()];
        if u.user_id == carol.user_id {
            typing_want.insert(0, bob.user_id.clone());
        }
        assert_eq!(typing, typing_want, "{who}: typing");
    }
    let s = sync_once(&alice, None).await;
    assert!(
        s["rooms"]["invite"].get(&bobs_room).is_none(),
        "an invite from an ignored user: {s}"
    );
    let _ = m0;
}

// ---- abuse: floods, races and permissions ----------------------------------------------------

const LOGIN: &str = "/_matrix/client/v3/login";
const REGISTER: &str = "/_matrix/client/v3/register";

fn login_body(user: &str, password: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
    })
}

/// Thirty wrong passwords for one user sent at once: each is counted before its password is
/// checked, so at most the allowed number are checked and the rest are told when to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_are_counted_before_they_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, api) = redb_peer(&dir).await;
    register(&api, "alice", "right").await;
    register(&api, "bob", "bobs").await;
    let guesses = (0..30).map(|i| {
        let body = login_body("alice", &format!("guess{i}"));
        api.call("POST", LOGIN, None, Some(body))
    });
    let answers = futures::future::join_all(guesses).await;
    let mut checked = 0;
    for (status, v) in &answers {
        match (status, v["errcode"].as_str()) {
            (403, Some("M_FORBIDDEN")) => checked += 1,
            (429, Some("M_LIMIT_EXCEEDED")) => {
                assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}")
            }
            _ => panic!("a wrong password got {status} {v}"),
        }
    }
    assert!(
        (1..=10).contains(&checked),
        "{checked} of 30 concurrent guesses had their password checked"
    );
    // The limit is alice's: bob still logs in.
    let (status, v) = api
        .call("POST", LOGIN, None, Some(login_body("bob", "bobs")))
        .await;
    assert_eq!(status, 200, "{v}");
}

/// A flood of logins (right and wrong passwords, several users) while a logged-in client sends
/// and syncs: the client is answered while the flood is still being answered. The runtime has
/// one worker thread, so password hashing on it would be unmistakable: every login would run to
/// its end before the client's request was even polled.
#[tokio::test(flavor = "current_thread")]
async fn a_login_flood_does_not_stall_other_clients() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const FLOOD: usize = 200;
    let (_node, api) = peer(None).await;
    let api = Arc::new(api);
    let honest = register(api.as_ref(), "honest", "pw").await;
    let room = honest.create_room(json!({})).await;
    let (token, user_id) = (honest.token.clone(), honest.user_id.clone());
    for i in 0..4 {
        register(api.as_ref(), &format!("flood{i}"), "pw").await;
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let (api, answered) = (api.clone(), answered.clone());
        flood.push(tokio::spawn(async move {
            let password = if i % 2 == 0 { "pw" } else { "wrong" };
            let body = login_body(&format!("flood{}", i % 4), password);
            let (status, v) = api.call("POST", LOGIN, None, Some(body)).await;
            answered.fetch_add(1, Ordering::SeqCst);
            (status, v)
        }));
    }
    let served = {
        let (api, answered) = (api.clone(), answered.clone());
        tokio::spawn(async move {
            let mut me = common::client::Client {
                t: api.as_ref(),
                token,
                user_id,
                since: None,
                filter: None,
            };
            let sent = me.send_text(&room, "h1", "still here").await;
            me.sync_until("its own message", |s| {
                s["rooms"]["join"][&room]["timeline"]["events"]
                    .as_array()?
                    .iter()
                    .any(|e| e["event_id"] == sent)
                    .then_some(())
            })
            .await;
            answered.load(Ordering::SeqCst)
        })
    };
    let answered_when_served = served.await.unwrap();
    assert!(
        answered_when_served < FLOOD,
        "the client was served only after all {FLOOD} logins were answered"
    );
    let mut outcomes = std::collections::BTreeMap::new();
    for h in flood {
        let (status, v) = h.await.unwrap();
        assert!(
            matches!(status, 200 | 403 | 429),
            "a login got {status} {v}"
        );
        if status == 429 {
            assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED", "{v}");
            assert!(v["retry_after_ms"].as_u64().is_some(), "{v}");
        }
        *outcomes.entry(status).or_insert(0) += 1;
    }
    assert!(
        outcomes.contains_key(&200),
        "no right password got through: {outcomes:?}"
    );
}

/// Sixteen registrations of one name at once (each with its own finished UIA session): exactly
/// one gets an account, the others `M_USER_IN_USE`, and the store holds one user and one device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_of_one_name_make_one_account() {
    let dir = tempfile::tempdir().unwrap();
    let (node, api) = redb_peer(&dir).await;
    let api = Arc::new(api);
    let mut attempts = Vec::new();
    for i in 0..16 {
        let body = json!({"username": "same", "password": format!("pw{i}")});
        let (status, first) = api.call("POST", REGISTER, None, Some(body.clone())).await;
        assert_eq!(status, 401, "{first}");
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": first["session"]});
        attempts.push(body);
    }
    let attempts: Vec<_> = attempts
        .into_iter()
        .map(|body| {
            let api = api.clone();
            tokio::spawn(async move { api.call("POST", REGISTER, None, Some(body)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for a in attempts {
        answers.push(a.await.unwrap());
    }
    let winners: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i].0 == 200)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for (status, v) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(
            (*status, v["errcode"].as_str()),
            (400, Some("M_USER_IN_USE")),
            "{v}"
        );
    }
    let store = node.engine().store();
    let accounts = scan_all(store.as_ref(), Table::Accounts).await.unwrap();
    let count = |prefix: &str| {
        accounts
            .iter()
            .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
            .count()
    };
    assert_eq!(count("user\0@same:"), 1);
    assert_eq!(count("device\0@same:"), 1);
    // The account is the winner's: its password logs in.
    let (status, v) = api
        .call(
            "POST",
            LOGIN,
            None,
            Some(login_body("same", &format!("pw{}", winners[0]))),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// The events of `kind` in a room's timeline, as its member `user` reads them.
async fn events_of(user: &User<'_>, room: &str, kind: &str) -> Vec<Value> {
    let v = user
        .ok("GET", &rooms_path(room, "messages?dir=b&limit=100"), None)
        .await;
    v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect()
}

/// A client that retries a send, a redaction or a to-device message before the first attempt
/// has committed gets one event (one message) and the same answer every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_transaction_make_one_event() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", "pw").await;
    let mut bob = register(&api, "bob", "pw").await;
    let room = alice.create_room(json!({})).await;
    let send = rooms_path(&room, "send/m.room.message/t1");
    let body = json!({"msgtype": "m.text", "body": "once"});
    let answers =
        futures::future::join_all((0..10).map(|_| alice.call("PUT", &send, Some(body.clone()))))
            .await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, v)| {
            assert_eq!(*status, 200, "{v}");
            v["event_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "retries answered different events: {ids:?}");
    let messages = events_of(&alice, &room, "m.room.message").await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let message = ids.into_iter().next().unwrap();

    let redact = rooms_path(
        &room,
        &format!("redact/{}/r1", common::client::enc(&message)),
    );
    let answers = futures::future::join_all(
        (0..10).map(|_| alice.call("PUT", &redact, Some(json!({"reason": "oops"})))),
    )
    .await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, v)| {
            assert_eq!(*status, 200, "{v}");
            v["event_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "retries answered different redactions: {ids:?}"
    );
    let redactions = events_of(&alice, &room, "m.room.redaction").await;
    assert_eq!(redactions.len(), 1, "{redactions:?}");

    // A to-device message retried at once reaches its device once.
    bob.sync_until("an initial sync", |_| Some(())).await;
    let path = "/_matrix/client/v3/sendToDevice/m.test/d1";
    let msg = json!({"messages": {bob.user_id.clone(): {"*": {"n": 1}}}});
    let answers =
        futures::future::join_all((0..10).map(|_| alice.call("PUT", path, Some(msg.clone()))))
            .await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let got = bob
        .sync_until("the to-device message", |s| {
            let events = s["to_device"]["events"].as_array()?;
            (!events.is_empty()).then_some(events.len())
        })
        .await;
    assert_eq!(got, 1, "one to-device message arrived {got} times");
}

fn alias_path(alias: &str) -> String {
    format!(
        "/_matrix/client/v3/directory/room/{}",
        common::client::enc(alias)
    )
}

/// The room an alias points at now (`None` if it points nowhere).
async fn alias_target(api: &InProcess, alias: &str) -> Option<String> {
    let (status, v) = api.call("GET", &alias_path(alias), None, None).await;
    (status == 200).then(|| v["room_id"].as_str().unwrap().to_owned())
}

/// An alias is never re-pointed, and only the user who made it or one who may set the room's
/// canonical alias removes it — also for aliases stored before their creator was recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_are_removed_only_by_their_creator_or_a_room_moderator() {
    let (node, api) = peer(None).await;
    let server = node.server_name().to_string();
    let alice = register(&api, "alice", "pw").await;
    let bob = register(&api, "bob", "pw").await;
    let carol = register(&api, "carol", "pw").await;
    let room = alice
        .create_room(json!({"preset": "public_chat", "room_alias_name": "made"}))
        .await;
    let bobs_room = bob.create_room(json!({"preset": "public_chat"})).await;
    let join = format!("/_matrix/client/v3/join/{}", common::client::enc(&room));
    bob.ok("POST", &join, Some(json!({}))).await;
    carol.ok("POST", &join, Some(json!({}))).await;
    let a = format!("#a:{server}");
    alice
        .ok("PUT", &alias_path(&a), Some(json!({"room_id": room})))
        .await;

    // bob (a plain member) may neither re-point nor remove alice's aliases.
    let (status, v) = bob
        .call("PUT", &alias_path(&a), Some(json!({"room_id": bobs_room})))
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (409, Some("M_UNKNOWN")),
        "{v}"
    );
    for alias in [a.clone(), format!("#made:{server}")] {
        bob.fails("DELETE", &alias_path(&alias), None, "M_FORBIDDEN")
            .await;
        assert_eq!(
            alias_target(&api, &alias).await.as_deref(),
            Some(room.as_str())
        );
    }
    // An alias bob makes is his to remove, and the room's admin may remove it too.
    for name in ["b1", "b2"] {
        let alias = format!("#{name}:{server}");
        bob.ok("PUT", &alias_path(&alias), Some(json!({"room_id": room})))
            .await;
        carol
            .fails("DELETE", &alias_path(&alias), None, "M_FORBIDDEN")
            .await;
    }
    bob.ok("DELETE", &alias_path(&format!("#b1:{server}")), None)
        .await;
    alice
        .ok("DELETE", &alias_path(&format!("#b2:{server}")), None)
        .await;
    // Power over the room's canonical alias is what counts: carol, once a moderator, may.
    let levels = rooms_path(&room, "state/m.room.power_levels");
    let mut pl = alice.ok("GET", &levels, None).await;
    pl["users"][&carol.user_id] = json!(50);
    alice.ok("PUT", &levels, Some(pl)).await;
    carol.ok("DELETE", &alias_path(&a), None).await;
    assert_eq!(alias_target(&api, &a).await, None);
    // alice made `#made` with the room.
    alice
        .ok("DELETE", &alias_path(&format!("#made:{server}")), None)
        .await;

    // A record from before creators were stored: a plain room id.
    let old = format!("#old:{server}");
    let mut batch = WriteBatch::new();
    batch.put(
        Table::ClientData,
        format!("alias\0{old}").into_bytes(),
        Value::from(room.as_str()).to_string().into_bytes(),
    );
    node.engine().store().write(batch).await.unwrap();
    assert_eq!(
        alias_target(&api, &old).await.as_deref(),
        Some(room.as_str())
    );
    bob.fails("DELETE", &alias_path(&old), None, "M_FORBIDDEN")
        .await;
    alice.ok("DELETE", &alias_path(&old), None).await;
    assert_eq!(alias_target(&api, &old).await, None);

    // Two rooms claiming one new alias at once: one wins, the other is told it exists.
    let contested = format!("#contested:{server}");
    let contested_path = alias_path(&contested);
    let (x, y) = futures::join!(
        alice.call("PUT", &contested_path, Some(json!({"room_id": room}))),
        bob.call("PUT", &contested_path, Some(json!({"room_id": bobs_room}))),
    );
    let winner = match (x.0, y.0) {
        (200, 409) => &room,
        (409, 200) => &bobs_room,
        other => panic!("two claims of one alias answered {other:?}: {x:?} {y:?}"),
    };
    assert_eq!(alias_target(&api, &contested).await.as_ref(), Some(winner));
}

const DEVICES: &str = "/_matrix/client/v3/devices";

/// `DELETE /devices/{id}` asks for the account's password (user-interactive auth) first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_device_needs_the_password() {
    let (_node, api) = peer(None).await;
    let alice = register(&api, "alice", "correct horse").await;
    let (status, second) = api
        .call(
            "POST",
            LOGIN,
            None,
            Some(login_body("alice", "correct horse")),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    let device = second["device_id"].as_str().unwrap().to_owned();
    let other_token = second["access_token"].as_str().unwrap().to_owned();
    let path = format!("{DEVICES}/{device}");
    let still_there = || async {
        let v = alice.ok("GET", DEVICES, None).await;
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device_id"] == device.as_str())
    };

    let (status, first) = alice.call("DELETE", &path, None).await;
    assert_eq!(status, 401, "{first}");
    assert_eq!(
        first["flows"][0]["stages"][0], "m.login.password",
        "{first}"
    );
    let session = first["session"].as_str().expect("a UIA session").to_owned();
    assert!(still_there().await);

    let auth = |password: &str, user: &str| {
        json!({"auth": {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "session": session,
        }})
    };
    alice
        .fails(
            "DELETE",
            &path,
            Some(auth("battery staple", &alice.user_id)),
            "M_FORBIDDEN",
        )
        .await;
    let (status, _) = alice
        .call("DELETE", &path, Some(auth("wrong", "alice")))
        .await;
    assert_eq!(status, 403);
    // Someone else's password is no better, even a right one.
    register(&api, "mallory", "mallorys").await;
    alice
        .fails(
            "DELETE",
            &path,
            Some(auth("mallorys", "mallory")),
            "M_FORBIDDEN",
        )
        .await;
    // A session the server never handed out starts over.
    let mut made_up = auth("correct horse", "alice");
    made_up["auth"]["session"] = json!("made-up");
    let (status, v) = alice.call("DELETE", &path, Some(made_up)).await;
    assert_eq!(status, 401, "{v}");
    assert!(still_there().await);
    let (status, _) = api
        .call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&other_token),
            None,
        )
        .await;
    assert_eq!(
        status, 200,
        "the device's token stopped working before it was deleted"
    );

    alice
        .ok("DELETE", &path, Some(auth("correct horse", "alice")))
        .await;
    assert!(!still_there().await);
    let (status, v) = api
        .call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&other_token),
            None,
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
    // The session was used up: it deletes no other device.
    let (_, third) = api
        .call(
            "POST",
            LOGIN,
            None,
            Some(login_body("alice", "correct horse")),
        )
        .await;
    let third = format!("{DEVICES}/{}", third["device_id"].as_str().unwrap());
    let (status, v) = alice
        .call("DELETE", &third, Some(auth("correct horse", "alice")))
        .await;
    assert_eq!(status, 401, "{v}");
}

fn register_from(origin: Option<&str>, body: &Value) -> http::Request<Vec<u8>> {
    let mut req = http::Request::builder().method("POST").uri(REGISTER);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    req.body(body.to_string().into_bytes()).unwrap()
}

/// In loopback mode a web page of another origin, open in a browser on the node's machine, is
/// refused an account; the node's own web app and clients that send no `Origin` are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_registration_refuses_other_web_origins() {
    let (node, api) = peer(None).await;
    let body = json!({"username": "victim", "password": "pw"});
    for origin in ["http://evil.example", "null", "http://127.0.0.1:9999"] {
        let (status, v) = api.send(register_from(Some(origin), &body)).await;
        assert_eq!(
            (status, v["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "{origin}: {v}"
        );
        assert!(
            v["error"].as_str().unwrap().contains("--allow-origin"),
            "{v}"
        );
    }
    let (status, v) = api.send(register_from(None, &body)).await;
    assert_eq!(status, 401, "no Origin: {v}");

    // What a node that serves its web app on 127.0.0.1:8008 allows, with one more origin
    // the operator added (`--allow-origin http://localhost:3000`).
    let mut web_origins = hyphae::api::server::own_origins("127.0.0.1:8008".parse().unwrap());
    web_origins.push("http://localhost:3000".into());
    let served = InProcess(
        ClientApi::start(node, Registration::Loopback { web_origins })
            .await
            .unwrap(),
    );
    for (name, origin) in [
        ("own", "http://127.0.0.1:8008"),
        ("ownbyname", "http://localhost:8008"),
        ("allowed", "http://LOCALHOST:3000"),
    ] {
        let body = json!({"username": name, "password": "pw"});
        let (status, first) = served.send(register_from(Some(origin), &body)).await;
        assert_eq!(status, 401, "{origin}: {first}");
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": first["session"]});
        let (status, v) = served.send(register_from(Some(origin), &body)).await;
        assert_eq!(status, 200, "{origin}: {v}");
    }
    let (status, v) = served
        .send(register_from(Some("http://evil.example"), &body))
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{v}"
    );
    drop(api);
}

/// A node whose swarm has stopped (shut down, or ended by a panic) answers every request with
/// an error at once, and a `/sync` long-poll in flight ends instead of waiting out its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_answers_errors_and_ends_long_polls() {
    let (node, api) = peer(None).await;
    let alice = register(&api, "alice", "pw").await;
    let first = alice.ok("GET", "/_matrix/client/v3/sync", None).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/sync?since={since}&timeout=60000");
    let poll = alice.call("GET", &path, None);
    let stop = async {
        node.shutdown().await;
    };
    let started = std::time::Instant::now();
    let ((status, body), ()) = tokio::join!(poll, stop);
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the long-poll hung"
    );
    for (method, path) in [
        ("GET", "/_matrix/client/v3/account/whoami"),
        ("GET", "/_matrix/client/versions"),
        ("POST", "/_matrix/client/v3/createRoom"),
    ] {
        let (status, body) = alice.call(method, path, Some(json!({}))).await;
        assert_eq!(status, 503, "{method} {path}: {body}");
        assert_eq!(body["errcode"], "M_UNKNOWN");
    }
}

/// Bob declines alice's invite to a room on her peer: his peer forgets it, and his next
/// `/sync` moves the room from `invite` to `leave`, as clients need to drop it from their list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_remote_invite_moves_to_leave_in_sync() {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
    let alice = register(&api_a, "alice", "pw-alice-1").await;
    let mut bob = register(&api_b, "bob", "pw-bob-1").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await;
    bob.sync_until("the invite", |v| {
        v["rooms"]["invite"].get(&room).map(|_| ())
    })
    .await;

    bob.ok(
        "POST",
        &format!(
            "/_matrix/client/v3/rooms/{}/leave",
            common::client::enc(&room)
        ),
        Some(json!({})),
    )
    .await;
    assert!(b.invites().is_empty(), "the declined invite is still held");
    let left = bob
        .sync_until("the room in leave", |v| {
            v["rooms"]["leave"].get(&room).cloned()
        })
        .await;
    let events = left["timeline"]["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["content"]["membership"], "leave");
    assert_eq!(events.last().unwrap()["state_key"], bob.user_id.as_str());
    // Once: the pass after that has neither the invite nor the leave again.
    let path = format!(
        "/_matrix/client/v3/sync?timeout=0&since={}",
        bob.since.clone().unwrap()
    );
    let v = bob.ok("GET", &path, None).await;
    assert!(v["rooms"]["invite"].get(&room).is_none(), "{v}");
    assert!(v["rooms"]["leave"].get(&room).is_none(), "{v}");
}

/// Knocking on a room held by another peer: refused where the join rule does not allow it
/// (nothing changes), taken where it does — the room's members see the knock and the knocker
/// sees the room under `rooms.knock` — and answered by an invite the knocker then takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knocking_across_peers() {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
    let alice = register(&api_a, "alice", "pw").await;
    let bob = register(&api_b, "bob", "pw").await;
    let closed = alice.create_room(json!({"name": "invite only"})).await;
    let room = alice
        .create_room(json!({"name": "knock here", "initial_state": [{
            "type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"},
        }]}))
        .await;
    let knock_path = |room: &str| {
        format!(
            "/_matrix/client/v3/knock/{}?via={}",
            common::client::enc(room),
            a.server_name()
        )
    };

    let (status, v) = bob
        .call("POST", &knock_path(&closed), Some(json!({})))
        .await;
    assert!(status >= 400, "knocking on an invite-only room: {v}");
    let state = a
        .engine()
        .current_state(&ruma::OwnedRoomId::try_from(closed.as_str()).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !state.contains_key(&("m.room.member".to_owned(), bob.user_id.clone())),
        "no membership for bob in the invite-only room"
    );
    bob.fails(
        "POST",
        &knock_path(&room),
        Some(json!({"reason": "x".repeat(5000)})),
        "M_INVALID_PARAM",
    )
    .await;

    bob.ok(
        "POST",
        &knock_path(&room),
        Some(json!({"reason": "let me in"})),
    )
    .await;
    let v = sync_once(&bob, None).await;
    let knocked = &v["rooms"]["knock"][&room]["knock_state"]["events"];
    let names: Vec<&Value> = knocked
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.name")
        .collect();
    assert_eq!(names[0]["content"]["name"], "knock here", "{v}");
    let member = alice
        .ok(
            "GET",
            &rooms_path(
                &room,
                &format!("state/m.room.member/{}", common::client::enc(&bob.user_id)),
            ),
            None,
        )
        .await;
    assert_eq!(member["membership"], "knock");
    assert_eq!(member["reason"], "let me in");

    alice
        .ok(
            "POST",
            &rooms_path(&room, "invite"),
            Some(json!({"user_id": bob.user_id})),
        )
        .await;
    let join = format!(
        "/_matrix/client/v3/join/{}?via={}",
        common::client::enc(&room),
        a.server_name()
    );
    bob.ok("POST", &join, Some(json!({}))).await;
    let v = sync_once(&bob, None).await;
    assert!(v["rooms"]["join"].get(&room).is_some(), "{v}");
    assert!(
        v["rooms"]["knock"].get(&room).is_none(),
        "the knock was answered"
    );
}
