//! An honest client's latency with and without a login flood: one logged-in user sends a message
//! and syncs it back, over and over, first alone, then while 64 other clients log in as fast as
//! they are answered (half with right passwords, half with wrong ones, over 16 accounts). The API
//! runs in-process on a redb store, on a multi-threaded runtime with one worker per core, as in
//! `hyphae-node`; every request is its own task, as a connection is under the HTTP server.
//! Run: `cargo bench --bench login_flood`.

#[cfg(not(target_arch = "wasm32"))]
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::common::client::{enc, register, Transport};
    use hyphae::api::{Caller, ClientApi, Registration};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use serde_json::{json, Value};

    const ROUNDS: usize = 300;
    const FLOODERS: usize = 64;
    const ACCOUNTS: usize = 16;

    #[derive(Clone)]
    struct InProcess(Arc<ClientApi>);

    impl Transport for InProcess {
        async fn call(
            &self,
            method: &str,
            path: &str,
            token: Option<&str>,
            body: Option<Value>,
        ) -> (u16, Value) {
            let mut req = http::Request::builder().method(method).uri(path);
            if let Some(t) = token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
            let req = req.body(body).unwrap();
            // Each request is its own task, as each connection is under the HTTP server.
            let api = self.0.clone();
            let resp = tokio::spawn(async move { api.handle(req, Caller { local: true }).await })
                .await
                .unwrap();
            let json = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
            (resp.status().as_u16(), json)
        }
    }

    fn login(user: &str, password: &str) -> Value {
        json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        })
    }

    fn percentile(sorted: &[f64], p: usize) -> f64 {
        sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
    }

    /// `ROUNDS` sends and incremental syncs by the honest client; their latencies in ms.
    async fn honest_rounds(t: &InProcess, token: &str, room: &str, tag: &str) -> [Vec<f64>; 2] {
        let r = enc(room);
        let (_, first) = t
            .call("GET", "/_matrix/client/v3/sync", Some(token), None)
            .await;
        let mut since = first["next_batch"].as_str().unwrap().to_owned();
        let (mut send, mut sync) = (Vec::new(), Vec::new());
        for i in 0..ROUNDS {
            let path = format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/{tag}{i}");
            let start = Instant::now();
            let (status, v) = t
                .call("PUT", &path, Some(token), Some(json!({"body": "hi"})))
                .await;
            assert_eq!(status, 200, "{v}");
            send.push(start.elapsed().as_secs_f64() * 1000.0);
            let path = format!("/_matrix/client/v3/sync?timeout=10000&since={since}");
            let start = Instant::now();
            let (status, v) = t.call("GET", &path, Some(token), None).await;
            assert_eq!(status, 200, "{v}");
            sync.push(start.elapsed().as_secs_f64() * 1000.0);
            since = v["next_batch"].as_str().unwrap().to_owned();
        }
        send.sort_by(f64::total_cmp);
        sync.sort_by(f64::total_cmp);
        [send, sync]
    }

    fn report(what: &str, [send, sync]: &[Vec<f64>; 2]) {
        println!(
            "{what:<22} send p50 {:>7.2} ms  p99 {:>7.2} ms   sync p50 {:>7.2} ms  p99 {:>7.2} ms",
            percentile(send, 50),
            percentile(send, 99),
            percentile(sync, 50),
            percentile(sync, 99),
        );
    }

    pub async fn run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("hyphae.redb")).unwrap());
        let config = NodeConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: Vec::new(),
            anti_entropy_every: Duration::from_secs(30),
            mdns: false,
            start_offline: false,
        };
        let node = P2pNode::start(store, config).await.unwrap();
        let api = ClientApi::start(node.clone(), Registration::Open)
            .await
            .unwrap();
        let t = InProcess(api);
        let honest = register(&t, "honest", "pw").await;
        let room = honest.create_room(json!({})).await;
        let token = honest.token.clone();
        for i in 0..ACCOUNTS {
            register(&t, &format!("user{i}"), "pw").await;
        }
        honest_rounds(&t, &token, &room, "warm").await;

        let alone = honest_rounds(&t, &token, &room, "alone").await;
        report("alone", &alone);
        // What one password check costs: logins one after another, nothing else running.
        let mut logins = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let (status, v) = t
                .call(
                    "POST",
                    "/_matrix/client/v3/login",
                    None,
                    Some(login("user0", "pw")),
                )
                .await;
            assert_eq!(status, 200, "{v}");
            logins.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        logins.sort_by(f64::total_cmp);
        println!(
            "one login alone        p50 {:>7.2} ms",
            percentile(&logins, 50)
        );

        let stop = Arc::new(AtomicBool::new(false));
        // Answers by status: 200, 403, 429, other.
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let mut flooders = Vec::new();
        for f in 0..FLOODERS {
            let (t, stop, counts) = (t.clone(), stop.clone(), counts.clone());
            flooders.push(tokio::spawn(async move {
                let mut i = f;
                while !stop.load(Ordering::Relaxed) {
                    let password = if i % 2 == 0 { "pw" } else { "wrong" };
                    let body = login(&format!("user{}", i % ACCOUNTS), password);
                    let (status, _) = t
                        .call("POST", "/_matrix/client/v3/login", None, Some(body))
                        .await;
                    let slot = match status {
                        200 => 0,
                        403 => 1,
                        429 => 2,
                        _ => 3,
                    };
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                    i += FLOODERS;
                }
            }));
        }
        // Measure once the flood is under way.
        while counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            < FLOODERS as u64
        {
            tokio::task::yield_now().await;
        }
        let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let start = Instant::now();
        let flooded = honest_rounds(&t, &token, &room, "flood").await;
        let secs = start.elapsed().as_secs_f64();
        let during: Vec<u64> = counts
            .iter()
            .zip(&before)
            .map(|(c, b)| c.load(Ordering::Relaxed) - b)
            .collect();
        stop.store(true, Ordering::Relaxed);
        for f in flooders {
            f.await.unwrap();
        }
        report(&format!("during {FLOODERS} flooders"), &flooded);
        println!(
            "flood while measured:  {:.0} logins/s answered — {:.0}/s 200, {:.0}/s 403, {:.0}/s 429 M_LIMIT_EXCEEDED, {} other",
            during.iter().sum::<u64>() as f64 / secs,
            during[0] as f64 / secs,
            during[1] as f64 / secs,
            during[2] as f64 / secs,
            during[3],
        );
        println!(
            "({ROUNDS} rounds each; {} cores; cargo bench --bench login_flood)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(native::run());
}

#[cfg(target_arch = "wasm32")]
fn main() {}
