//! The Client-Server API in-process: the client scenario on one peer and across two peers
//! joined only by libp2p, and malformed requests that must change nothing.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::client::{register, scenario, Transport};
use hyphae::api::{Caller, ClientApi, Registration};
use hyphae::rooms::{NodeConfig, P2pNode};
use hyphae::store::memory::MemoryStore;
use hyphae::store::{scan_all, Table};
use serde_json::{json, Value};

struct InProcess(Arc<ClientApi>);

impl Transport for InProcess {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.raw(method, path, token, body).await
    }
}

impl InProcess {
    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = self
            .0
            .handle(req.body(body).unwrap(), Caller { local: true })
            .await;
        let status = resp.status().as_u16();
        let json = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        (status, json)
    }
}

async fn peer(bootstrap: Option<&P2pNode>) -> (P2pNode, InProcess) {
    let mut addrs = Vec::new();
    if let Some(b) = bootstrap {
        addrs.push(b.listen_addrs().await[0].clone());
    }
    let config = NodeConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: addrs,
        anti_entropy_every: Duration::from_secs(2),
        mdns: false,
        start_offline: false,
    };
    let node = P2pNode::start(Arc::new(MemoryStore::new()), config)
        .await
        .unwrap();
    let api = ClientApi::start(node.clone(), Registration::Loopback)
        .await
        .unwrap();
    (node, InProcess(api))
}

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
            "/_matrix/media/v3/config".into(),
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
    let mut sent = Vec::new();
    for h in senders {
        sent.extend(h.await.unwrap());
    }
    for id in &sent {
        assert!(seen.contains(id), "{id} never came through /sync");
    }
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "some events came through /sync twice"
    );
    assert_eq!(seen.len(), 200);
}
