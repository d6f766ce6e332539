//! Media: a 20 MB upload and its download on another node (fetched over libp2p, then cached),
//! a thumbnail of a 4000×3000 JPEG, and the memory a 100 MB upload over HTTP takes.
//! Run: `cargo bench --bench media`.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hyphae::api::{Caller, ClientApi, Registration};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use serde_json::{json, Value};

    const MB: usize = 1024 * 1024;

    async fn peer(dir: &std::path::Path, bootstrap: Option<&P2pNode>) -> (P2pNode, Arc<ClientApi>) {
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
        let store = Arc::new(RedbStore::open(&dir.join("hyphae.redb")).unwrap());
        let node = P2pNode::start(store, config).await.unwrap();
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
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = api
            .handle(req.body(body).unwrap(), Caller { local: true })
            .await;
        (resp.status().as_u16(), resp.into_body())
    }

    async fn json_call(
        api: &ClientApi,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> Value {
        let (status, body) =
            call(api, method, path, token, &[], body.to_string().into_bytes()).await;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert!(status == 200 || status == 401, "{path}: {v}");
        v
    }

    async fn register(api: &ClientApi, name: &str) -> String {
        let body = json!({"username": name, "password": "pw-bench-1"});
        let first = json_call(
            api,
            "POST",
            "/_matrix/client/v3/register",
            None,
            body.clone(),
        )
        .await;
        let mut body = body;
        body["auth"] = json!({"type": "m.login.dummy", "session": first["session"]});
        let v = json_call(api, "POST", "/_matrix/client/v3/register", None, body).await;
        v["access_token"].as_str().unwrap().to_owned()
    }

    fn bytes_of(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn upload(api: &ClientApi, token: &str, content_type: &str, body: Vec<u8>) -> String {
        let (status, resp) = call(
            api,
            "POST",
            "/_matrix/media/v3/upload",
            Some(token),
            &[("Content-Type", content_type)],
            body,
        )
        .await;
        let v: Value = serde_json::from_slice(&resp).unwrap();
        assert_eq!(status, 200, "{v}");
        v["content_uri"].as_str().unwrap().to_owned()
    }

    fn status_kb(field: &str) -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    }

    /// Resets the peak-RSS counter (`VmHWM`) to the current RSS.
    fn reset_peak() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    pub async fn run() {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, api_a) = peer(dirs.0.path(), None).await;
        let (b, api_b) = peer(dirs.1.path(), Some(&a)).await;
        assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
        let alice = register(&api_a, "alice").await;
        let bob = register(&api_b, "bob").await;
        let bob_id = json_call(
            &api_b,
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&bob),
            json!({}),
        )
        .await["user_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let room = json_call(
            &api_a,
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({"preset": "private_chat", "invite": [bob_id]}),
        )
        .await["room_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        // The invite reaches bob's node in the background: join once it is there.
        let join = format!(
            "/_matrix/client/v3/join/{}?via={}",
            enc(&room),
            a.server_name()
        );
        let joined = b
            .wait_until(Duration::from_secs(30), || {
                let (api_b, join, bob) = (&api_b, &join, &bob);
                async move {
                    call(api_b, "POST", join, Some(bob), &[], b"{}".to_vec())
                        .await
                        .0
                        == 200
                }
            })
            .await;
        assert!(joined, "bob could not join");

        // 20 MB: uploaded on alice's node, named in the room, downloaded on bob's.
        let file = bytes_of(20 * MB);
        let t = Instant::now();
        let mxc = upload(&api_a, &alice, "application/octet-stream", file.clone()).await;
        let upload_s = t.elapsed().as_secs_f64();
        json_call(
            &api_a,
            "PUT",
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/f1",
                enc(&room)
            ),
            Some(&alice),
            json!({"msgtype": "m.file", "body": "f", "url": mxc}),
        )
        .await;
        let path = format!(
            "/_matrix/client/v1/media/download/{}",
            mxc.trim_start_matches("mxc://")
        );
        let t = Instant::now();
        let (status, body) = call(&api_b, "GET", &path, Some(&bob), &[], Vec::new()).await;
        let first_s = t.elapsed().as_secs_f64();
        assert_eq!(
            status,
            200,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        assert!(body == file);
        let t = Instant::now();
        let (_, body) = call(&api_b, "GET", &path, Some(&bob), &[], Vec::new()).await;
        let cached_s = t.elapsed().as_secs_f64();
        assert!(body == file);
        let mbps = |s: f64| 20.0 / s;
        println!(
            "MEDIA upload_20mb_s={upload_s:.3} upload_mb_per_s={:.1}",
            mbps(upload_s)
        );
        println!(
            "MEDIA download_20mb_other_node_s={first_s:.3} mb_per_s={:.1} (fetched over libp2p, checked, kept)",
            mbps(first_s)
        );
        println!(
            "MEDIA download_20mb_cached_s={cached_s:.3} mb_per_s={:.1}",
            mbps(cached_s)
        );

        // A 4000×3000 JPEG, thumbnailed to 800×600 (made once, then kept).
        let picture = image::RgbImage::from_fn(4000, 3000, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
        });
        let mut jpeg = Vec::new();
        picture
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let jpeg_mxc = upload(&api_a, &alice, "image/jpeg", jpeg.clone()).await;
        let thumb = format!(
            "/_matrix/client/v1/media/thumbnail/{}?width=800&height=600&method=scale",
            jpeg_mxc.trim_start_matches("mxc://")
        );
        let t = Instant::now();
        let (status, _) = call(&api_a, "GET", &thumb, Some(&alice), &[], Vec::new()).await;
        let made_ms = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(status, 200);
        let t = Instant::now();
        call(&api_a, "GET", &thumb, Some(&alice), &[], Vec::new()).await;
        let kept_ms = t.elapsed().as_secs_f64() * 1000.0;
        println!(
            "MEDIA thumbnail_4000x3000_jpeg_ms={made_ms:.0} (jpeg {:.1} MB) kept_ms={kept_ms:.1}",
            jpeg.len() as f64 / MB as f64
        );

        // 100 MB over HTTP into hyphae-node's server: streamed to the store, so the process
        // grows by about a chunk, not by the file.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = api_a.clone();
        tokio::spawn(hyphae::api::server::serve(
            serving,
            listener,
            None,
            std::future::pending(),
        ));
        let before = status_kb("VmRSS:");
        reset_peak();
        let token = alice.clone();
        let t = Instant::now();
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let size = 100 * MB;
            write!(
                s,
                "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let block = vec![7u8; MB];
            for _ in 0..100 {
                s.write_all(&block).unwrap();
            }
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let peak = status_kb("VmHWM:");
        println!(
            "MEDIA upload_100mb_http_s={secs:.2} mb_per_s={:.1} rss_before_mib={:.1} peak_rss_mib={:.1} (peak above before: {:.1} MiB)",
            100.0 / secs,
            before / 1024.0,
            peak / 1024.0,
            (peak - before) / 1024.0
        );
        drop(api_b);
        b.shutdown().await;
        a.shutdown().await;
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[tokio::main]
async fn main() {
    native::run().await;
}

#[cfg(target_arch = "wasm32")]
fn main() {}
