//! `/keys/query` for users on other peers: alice (on her node) asks for the device keys of ten
//! users, each on a node of their own, all sharing a room with her; first cold (every server is
//! asked over libp2p, in parallel), then cached.
//! Run: `cargo bench --bench keys`.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hyphae::api::{Caller, ClientApi, Registration};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::memory::MemoryStore;
    use serde_json::{json, Value};

    const USERS: usize = 10;
    const ROUNDS: usize = 20;

    async fn peer(bootstrap: Option<&P2pNode>) -> (P2pNode, Arc<ClientApi>) {
        let mut addrs = Vec::new();
        if let Some(b) = bootstrap {
            addrs.push(b.listen_addrs().await[0].clone());
        }
        let config = NodeConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: addrs,
            anti_entropy_every: Duration::from_secs(5),
            mdns: false,
            start_offline: false,
        };
        let node = P2pNode::start(Arc::new(MemoryStore::new()), config)
            .await
            .unwrap();
        let api = ClientApi::start(node.clone(), Registration::Open)
            .await
            .unwrap();
        (node, api)
    }

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
        assert!(
            resp.status().is_success() || resp.status() == 401,
            "{path}: {v}"
        );
        v
    }

    /// Registers `name` (dummy auth); returns its access token, user id and device id.
    async fn register(api: &ClientApi, name: &str) -> (String, String, String) {
        let path = "/_matrix/client/v3/register";
        let body = json!({"username": name, "password": "pw-bench-1"});
        let first = call(api, "POST", path, None, body.clone()).await;
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": first["session"]});
        let done = call(api, "POST", path, None, body).await;
        let s = |k: &str| done[k].as_str().unwrap().to_owned();
        (s("access_token"), s("user_id"), s("device_id"))
    }

    fn device_keys(user: &str, device: &str) -> Value {
        use base64::Engine as _;
        use ruma::signatures::Ed25519KeyPair;
        let pair =
            Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), device.to_owned()).unwrap();
        let public = base64::engine::general_purpose::STANDARD_NO_PAD.encode(pair.public_key());
        let keys = json!({
            "user_id": user, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {format!("curve25519:{device}"): "curve", format!("ed25519:{device}"): public},
        });
        let ruma::CanonicalJsonValue::Object(mut o) =
            ruma::CanonicalJsonValue::try_from(keys).unwrap()
        else {
            unreachable!()
        };
        ruma::signatures::sign_json(user, &pair, &mut o).unwrap();
        serde_json::to_value(o).unwrap()
    }

    pub async fn run() {
        let (a, api_a) = peer(None).await;
        let (alice, _, _) = register(&api_a, "alice").await;
        let room = call(
            &api_a,
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({"preset": "public_chat"}),
        )
        .await["room_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut users = Vec::new();
        let mut others = Vec::new();
        for i in 0..USERS {
            let (n, api) = peer(Some(&a)).await;
            assert!(n.wait_for_peers(1, Duration::from_secs(30)).await);
            let (token, user, device) = register(&api, &format!("user{i}")).await;
            let join = format!("/_matrix/client/v3/join/{room}?via={}", a.server_name());
            call(&api, "POST", &join, Some(&token), json!({})).await;
            call(
                &api,
                "POST",
                "/_matrix/client/v3/keys/upload",
                Some(&token),
                json!({"device_keys": device_keys(&user, &device)}),
            )
            .await;
            users.push(user);
            others.push((n, api));
        }
        let query = json!({"device_keys": users.iter().map(|u| (u.clone(), json!([]))).collect::<serde_json::Map<_, _>>()});
        let ask = || async {
            let start = Instant::now();
            let v = call(
                &api_a,
                "POST",
                "/_matrix/client/v3/keys/query",
                Some(&alice),
                query.clone(),
            )
            .await;
            assert_eq!(v["failures"], json!({}), "{v}");
            assert_eq!(v["device_keys"].as_object().unwrap().len(), USERS);
            start.elapsed().as_secs_f64() * 1000.0
        };
        let cold = ask().await;
        let mut cached: Vec<f64> = Vec::new();
        for _ in 0..ROUNDS {
            cached.push(ask().await);
        }
        cached.sort_by(|x, y| x.partial_cmp(y).unwrap());
        println!("== /keys/query for {USERS} users, each on a peer of their own (in-process, loopback TCP)");
        println!(
            "cold (every server asked over libp2p, in parallel): {cold:.2} ms; cached: p50 {:.3} ms, max {:.3} ms over {ROUNDS}",
            cached[ROUNDS / 2],
            cached[ROUNDS - 1]
        );
        drop(others);
    }
}

fn main() {
    #[cfg(not(target_arch = "wasm32"))]
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(native::run());
}
