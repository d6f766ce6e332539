//! What Element X and search cost on one node (redb on disk, in-process API, one run):
//! - sliding sync: the first response for an account in 100 rooms (one list, `timeline_limit`
//!   1, the room list's required state), against the first `/sync` of the same account; then
//!   the delivery latency of a new message to a long-polling reader through each;
//! - `/search` over 10,000 messages in 10 rooms: p50 and p99 per query.
//!
//! Run: `cargo bench --bench client_features`.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hyphae::api::{Caller, ClientApi, Registration};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use serde_json::{json, Value};

    const ROOMS: usize = 100;
    const DELIVERIES: usize = 50;
    const SEARCH_ROOMS: usize = 10;
    const SEARCH_MESSAGES: usize = 10_000;
    const QUERIES: usize = 50;
    const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

    async fn call(
        api: &ClientApi,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> Value {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = api
            .handle(
                req.body(body.to_string().into_bytes()).unwrap(),
                Caller { local: true },
            )
            .await;
        let v: Value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        assert!(resp.status().is_success(), "{path}: {v}");
        v
    }

    async fn register(api: &ClientApi, name: &str) -> String {
        let v = call(
            api,
            "POST",
            "/_matrix/client/v3/register",
            None,
            json!({"username": name, "password": "bench password", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
        v["access_token"].as_str().unwrap().to_owned()
    }

    fn enc(s: &str) -> String {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    fn room_list_body() -> Value {
        json!({"lists": {"all_rooms": {
            "ranges": [[0, 99]],
            "timeline_limit": 1,
            "required_state": [["m.room.name", ""], ["m.room.encryption", ""], ["m.room.member", "$LAZY"],
                ["m.room.member", "$ME"], ["m.room.topic", ""], ["m.room.avatar", ""],
                ["m.room.canonical_alias", ""], ["m.room.power_levels", ""], ["m.room.join_rules", ""],
                ["m.room.create", ""], ["m.room.history_visibility", ""]],
        }}, "extensions": {"account_data": {"enabled": true}, "receipts": {"enabled": true, "rooms": ["*"]},
            "typing": {"enabled": true}}})
    }

    fn pct(sorted: &[f64], p: f64) -> f64 {
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    async fn send(api: &ClientApi, token: &str, room: &str, txn: &str, body: &str) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        );
        call(
            api,
            "PUT",
            &path,
            Some(token),
            json!({"msgtype": "m.text", "body": body}),
        )
        .await;
    }

    /// Delivery latency of `DELIVERIES` messages to a reader long-polling with `poll`, which
    /// returns once the message is in what it got.
    async fn deliveries<F, Fut>(
        api: &Arc<ClientApi>,
        alice: &str,
        room: &str,
        tag: &str,
        poll: F,
    ) -> Vec<f64>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut out = Vec::new();
        for i in 0..DELIVERIES {
            let body = format!("{tag} {i}");
            let sender = {
                let api = api.clone();
                let (alice, room, body) = (alice.to_owned(), room.to_owned(), body.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let sent = Instant::now();
                    send(&api, &alice, &room, &format!("{tag}{i}"), &body).await;
                    sent
                }
            };
            let (sent, received) = tokio::join!(sender, async {
                poll(body).await;
                Instant::now()
            });
            out.push(ms(received - sent));
        }
        out.sort_by(f64::total_cmp);
        out
    }

    pub async fn run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("hyphae.redb")).unwrap());
        let config = NodeConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: vec![],
            anti_entropy_every: Duration::from_secs(60),
            mdns: false,
            start_offline: true,
        };
        let node = P2pNode::start(store, config).await.unwrap();
        let api = ClientApi::start(node.clone(), Registration::Open)
            .await
            .unwrap();
        let alice = register(&api, "alice").await;
        let bob = register(&api, "bob").await;
        let bob_id = format!("@bob:{}", node.server_name());
        let mut rooms = Vec::new();
        for i in 0..ROOMS {
            let v = call(
                &api,
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(&alice),
                json!({"name": format!("room {i}"), "invite": [bob_id]}),
            )
            .await;
            let room = v["room_id"].as_str().unwrap().to_owned();
            call(
                &api,
                "POST",
                &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
                Some(&bob),
                json!({}),
            )
            .await;
            for m in 0..5 {
                send(
                    &api,
                    &alice,
                    &room,
                    &format!("r{i}m{m}"),
                    &format!("message {m} in room {i}"),
                )
                .await;
            }
            rooms.push(room);
        }

        // First responses, alternating so that neither warms the caches for the other.
        let (mut sliding_first, mut sync_first) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            let v = call(&api, "POST", SLIDING, Some(&bob), room_list_body()).await;
            sliding_first.push(ms(t.elapsed()));
            assert_eq!(v["lists"]["all_rooms"]["count"], ROOMS);
            let t = Instant::now();
            let v = call(&api, "GET", "/_matrix/client/v3/sync?filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1%7D%7D%7D", Some(&bob), json!({})).await;
            sync_first.push(ms(t.elapsed()));
            assert_eq!(v["rooms"]["join"].as_object().unwrap().len(), ROOMS);
        }
        sliding_first.sort_by(f64::total_cmp);
        sync_first.sort_by(f64::total_cmp);
        println!(
            "BENCH first response, {ROOMS} rooms, timeline_limit 1: sliding sync p50 {:.1} ms, /sync p50 {:.1} ms",
            pct(&sliding_first, 0.5),
            pct(&sync_first, 0.5)
        );

        // Delivery through a long poll: bob waits with his latest token; alice sends.
        let room = rooms[ROOMS / 2].clone();
        let first = call(&api, "POST", SLIDING, Some(&bob), room_list_body()).await;
        let pos = std::sync::Mutex::new(first["pos"].as_str().unwrap().to_owned());
        let sliding = deliveries(&api, &alice, &room, "sliding", |want| {
            let (api, bob, pos) = (&api, &bob, &pos);
            async move {
                loop {
                    let p = pos.lock().unwrap().clone();
                    let v = call(
                        api,
                        "POST",
                        &format!("{SLIDING}?pos={}&timeout=30000", enc(&p)),
                        Some(bob),
                        room_list_body(),
                    )
                    .await;
                    *pos.lock().unwrap() = v["pos"].as_str().unwrap().to_owned();
                    if v.to_string().contains(&want) {
                        return;
                    }
                }
            }
        })
        .await;
        let initial = call(
            &api,
            "GET",
            "/_matrix/client/v3/sync?timeout=0",
            Some(&bob),
            json!({}),
        )
        .await;
        let since = std::sync::Mutex::new(initial["next_batch"].as_str().unwrap().to_owned());
        let synced = deliveries(&api, &alice, &room, "sync", |want| {
            let (api, bob, since) = (&api, &bob, &since);
            async move {
                loop {
                    let s = since.lock().unwrap().clone();
                    let v = call(
                        api,
                        "GET",
                        &format!("/_matrix/client/v3/sync?since={}&timeout=30000", enc(&s)),
                        Some(bob),
                        json!({}),
                    )
                    .await;
                    *since.lock().unwrap() = v["next_batch"].as_str().unwrap().to_owned();
                    if v.to_string().contains(&want) {
                        return;
                    }
                }
            }
        })
        .await;
        println!(
            "BENCH delivery of a new message to a long-polling reader in {ROOMS} rooms: sliding sync p50 {:.2} / p99 {:.2} ms, /sync p50 {:.2} / p99 {:.2} ms",
            pct(&sliding, 0.5), pct(&sliding, 0.99), pct(&synced, 0.5), pct(&synced, 0.99)
        );

        // One incremental pass with nothing new, each way: the cost of looking.
        let (mut sliding_idle, mut sync_idle) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let p = pos.lock().unwrap().clone();
            let t = Instant::now();
            let v = call(
                &api,
                "POST",
                &format!("{SLIDING}?pos={}&timeout=0", enc(&p)),
                Some(&bob),
                room_list_body(),
            )
            .await;
            sliding_idle.push(ms(t.elapsed()));
            *pos.lock().unwrap() = v["pos"].as_str().unwrap().to_owned();
            let s = since.lock().unwrap().clone();
            let t = Instant::now();
            let v = call(
                &api,
                "GET",
                &format!("/_matrix/client/v3/sync?since={}&timeout=0", enc(&s)),
                Some(&bob),
                json!({}),
            )
            .await;
            sync_idle.push(ms(t.elapsed()));
            *since.lock().unwrap() = v["next_batch"].as_str().unwrap().to_owned();
        }
        sliding_idle.sort_by(f64::total_cmp);
        sync_idle.sort_by(f64::total_cmp);
        println!(
            "BENCH an incremental pass with nothing new, {ROOMS} rooms: sliding sync p50 {:.2} ms, /sync p50 {:.2} ms",
            pct(&sliding_idle, 0.5),
            pct(&sync_idle, 0.5)
        );

        // Search: 10,000 messages in 10 rooms, words drawn so each query matches a few.
        let mut search_rooms = Vec::new();
        for i in 0..SEARCH_ROOMS {
            let v = call(
                &api,
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(&alice),
                json!({"name": format!("search {i}")}),
            )
            .await;
            search_rooms.push(v["room_id"].as_str().unwrap().to_owned());
        }
        const WORDS: &[&str] = &[
            "apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel",
        ];
        for m in 0..SEARCH_MESSAGES {
            let room = &search_rooms[m % SEARCH_ROOMS];
            let body = format!(
                "{} and {} number {m}",
                WORDS[m % WORDS.len()],
                WORDS[(m / 7) % WORDS.len()]
            );
            send(&api, &alice, room, &format!("s{m}"), &body).await;
        }
        let mut times = Vec::new();
        for q in 0..QUERIES {
            let term = format!("{} number {}", WORDS[q % WORDS.len()], 9000 + q);
            let t = Instant::now();
            let v = call(
                &api,
                "POST",
                "/_matrix/client/v3/search",
                Some(&alice),
                json!({"search_categories": {"room_events": {"search_term": term}}}),
            )
            .await;
            times.push(ms(t.elapsed()));
            assert!(
                !v["search_categories"]["room_events"]["results"]
                    .as_array()
                    .unwrap()
                    .is_empty(),
                "{term}"
            );
        }
        times.sort_by(f64::total_cmp);
        println!(
            "BENCH /search over {SEARCH_MESSAGES} messages in {SEARCH_ROOMS} rooms: p50 {:.1} ms, p99 {:.1} ms per query",
            pct(&times, 0.5),
            pct(&times, 0.99)
        );
        node.shutdown().await;
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(native::run());
}

#[cfg(target_arch = "wasm32")]
fn main() {}
