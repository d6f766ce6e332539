//! The media repository through the client API in this process: uploads (whole and
//! reserved with `/create`), authenticated downloads, thumbnails, the frozen unauthenticated
//! endpoints, and what bad uploads leave behind (nothing).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;

use common::client::{register, Client};
use common::in_process::{alice_and_bob, peer, peer_on, InProcess};
use hyphae::store::{Direction, KeyRange, SharedStore, Table};
use serde_json::{json, Value};

/// A request with a body that is not JSON, as clients upload files.
async fn send_bytes(
    api: &InProcess,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("Authorization", format!("Bearer {token}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = api
        .0
        .handle(req.body(body).unwrap(), hyphae::api::Caller { local: true })
        .await;
    let (parts, body) = resp.into_parts();
    (parts.status.as_u16(), parts.headers, body)
}

async fn upload(
    c: &Client<'_, InProcess>,
    content_type: &str,
    name: &str,
    body: Vec<u8>,
) -> String {
    let len = body.len().to_string();
    let (status, _, resp) = send_bytes(
        c.t,
        "POST",
        &format!("/_matrix/media/v3/upload?filename={name}"),
        &c.token,
        &[("Content-Type", content_type), ("Content-Length", &len)],
        body,
    )
    .await;
    let v: Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(status, 200, "{v}");
    v["content_uri"].as_str().unwrap().to_owned()
}

async fn download(c: &Client<'_, InProcess>, mxc: &str) -> (u16, http::HeaderMap, Vec<u8>) {
    let rest = mxc.strip_prefix("mxc://").unwrap();
    send_bytes(
        c.t,
        "GET",
        &format!("/_matrix/client/v1/media/download/{rest}"),
        &c.token,
        &[],
        Vec::new(),
    )
    .await
}

fn errcode(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body).unwrap_or(Value::Null)["errcode"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Every key of the media table.
async fn media_keys(store: &SharedStore) -> Vec<Vec<u8>> {
    store
        .scan(
            Table::Media,
            KeyRange::all(),
            Direction::Forward,
            usize::MAX,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// A picture of `w`×`h` pixels as a PNG.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Bytes that do not repeat in chunk-sized runs, so a chunk put in the wrong place shows.
fn file_of(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_download_byte_identical_with_safe_headers_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore =
        Arc::new(hyphae::store::redb::RedbStore::open(&dir.path().join("h.redb")).unwrap());
    let (node, api) = peer_on(store.clone(), None).await;
    let alice = register(&api, "alice", "pw-alice-1").await;

    let big = file_of(20 * 1024 * 1024 + 12_345);
    let big_mxc = upload(&alice, "application/octet-stream", "big.bin", big.clone()).await;
    let picture = png(640, 480);
    let png_mxc = upload(&alice, "image/png", "cat.png", picture.clone()).await;
    let page_mxc = upload(
        &alice,
        "text/html",
        "page.html",
        b"<script>alert(1)</script>".to_vec(),
    )
    .await;
    assert!(
        big_mxc.starts_with(&format!("mxc://{}/", node.server_name())),
        "{big_mxc}"
    );

    let (status, headers, body) = download(&alice, &big_mxc).await;
    assert_eq!(status, 200);
    assert!(body == big, "the 20 MB file came back different");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename*=utf-8''big%2Ebin"
    );
    let (_, headers, body) = download(&alice, &png_mxc).await;
    assert_eq!(body, picture);
    assert_eq!(headers["content-type"], "image/png");
    assert!(headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("inline"));
    // An uploaded page never renders as one.
    let (_, headers, _) = download(&alice, &page_mxc).await;
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("sandbox"));

    // Thumbnails: scaled to fit, or cropped to fill.
    let rest = png_mxc.strip_prefix("mxc://").unwrap();
    for (query, want) in [
        ("width=320&height=320&method=scale", (320, 240)),
        ("width=96&height=96&method=crop", (96, 96)),
        ("width=2000&height=2000", (640, 480)),
    ] {
        let (status, headers, body) = send_bytes(
            &api,
            "GET",
            &format!("/_matrix/client/v1/media/thumbnail/{rest}?{query}"),
            &alice.token,
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(status, 200, "{query}: {}", String::from_utf8_lossy(&body));
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("image/"));
        let thumb = image::load_from_memory(&body).unwrap();
        assert_eq!((thumb.width(), thumb.height()), want, "{query}");
    }

    // Without a token nothing is served; the unauthenticated endpoints are frozen.
    let (status, _) = api
        .raw(
            "GET",
            &format!("/_matrix/client/v1/media/download/{rest}"),
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, 401);
    let (status, v) = api
        .raw(
            "GET",
            &format!("/_matrix/media/v3/download/{rest}"),
            None,
            Vec::new(),
        )
        .await;
    assert_eq!((status, v["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let config = alice
        .ok("GET", "/_matrix/client/v1/media/config", None)
        .await;
    assert!(
        config["m.upload.size"].as_u64().unwrap() >= 100 * 1024 * 1024,
        "{config}"
    );
    let preview = alice
        .ok(
            "GET",
            "/_matrix/client/v1/media/preview_url?url=https%3A%2F%2Fexample.org",
            None,
        )
        .await;
    assert_eq!(preview, json!({}));

    // A restart on the same data keeps the media.
    let token = alice.token.clone();
    node.shutdown().await;
    drop(alice);
    drop(api);
    drop(node);
    drop(store);
    // Reopened from the file, as a restarted node does (once the old one has let go of it).
    let path = dir.path().join("h.redb");
    let mut reopened = None;
    for _ in 0..100 {
        match hyphae::store::redb::RedbStore::open(&path) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    let store: SharedStore = Arc::new(reopened.expect("the store reopens"));
    let (_node, api) = peer_on(store, None).await;
    let alice = Client {
        t: &api,
        token,
        user_id: String::new(),
        since: None,
        filter: None,
    };
    let (status, _, body) = download(&alice, &big_mxc).await;
    assert_eq!(status, 200);
    assert!(body == big, "the file changed across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_uploads_go_once_to_their_owner() {
    let (node, api) = peer(None).await;
    let alice = register(&api, "alice", "pw-alice-1").await;
    let bob = register(&api, "bob", "pw-bob-1").await;
    let created = alice
        .ok("POST", "/_matrix/media/v1/create", Some(json!({})))
        .await;
    let mxc = created["content_uri"].as_str().unwrap().to_owned();
    assert!(created["unused_expires_at"].as_u64().unwrap() > 0);
    let rest = mxc.strip_prefix("mxc://").unwrap().to_owned();
    // Not uploaded yet: the download says so.
    let (status, _, body) = download(&alice, &mxc).await;
    assert_eq!(
        (status, errcode(&body)),
        (504, "M_NOT_YET_UPLOADED".to_owned())
    );
    let put = format!("/_matrix/media/v3/upload/{rest}");
    let headers = [("Content-Type", "text/plain")];
    // Only alice may fill it, once.
    let (status, _, body) =
        send_bytes(&api, "PUT", &put, &bob.token, &headers, b"bob's".to_vec()).await;
    assert_eq!((status, errcode(&body)), (403, "M_FORBIDDEN".to_owned()));
    let (status, _, body) =
        send_bytes(&api, "PUT", &put, &alice.token, &headers, b"hello".to_vec()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) =
        send_bytes(&api, "PUT", &put, &alice.token, &headers, b"again".to_vec()).await;
    assert_eq!(
        (status, errcode(&body)),
        (409, "M_CANNOT_OVERWRITE_MEDIA".to_owned())
    );
    let (_, _, body) = download(&bob, &mxc).await;
    assert_eq!(body, b"hello");
    // An id this server never handed out, or of another server.
    for path in [
        format!(
            "/_matrix/media/v3/upload/{}/notreserved",
            node.server_name()
        ),
        "/_matrix/media/v3/upload/other.example/abc".to_owned(),
    ] {
        let (status, _, body) =
            send_bytes(&api, "PUT", &path, &alice.token, &headers, b"x".to_vec()).await;
        assert_eq!(
            (status, errcode(&body)),
            (403, "M_FORBIDDEN".to_owned()),
            "{path}"
        );
    }
    // Reservations are bounded per user.
    let mut limited = false;
    for _ in 0..20 {
        let (status, v) = alice
            .call("POST", "/_matrix/media/v1/create", Some(json!({})))
            .await;
        if status == 429 {
            assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED");
            limited = true;
            break;
        }
    }
    assert!(limited, "reservations never ran out");
}

/// What is sent (a name, headers, the body) and the status and errcode that must come back.
type BadUpload<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_leave_nothing() {
    let (node, api) = peer(None).await;
    let store = node.engine().store().clone();
    let alice = register(&api, "alice", "pw-alice-1").await;
    upload(&alice, "text/plain", "ok.txt", b"kept".to_vec()).await;
    let before = media_keys(&store).await;
    let up = "/_matrix/media/v3/upload";
    let t = alice.token.as_str();
    let over = (100 * 1024 * 1024 + 1).to_string();
    let cases: Vec<BadUpload> = vec![
        // Announced over the limit: refused before a byte is read.
        (
            "oversize",
            vec![
                ("Content-Type", "application/octet-stream".into()),
                ("Content-Length", over),
            ],
            vec![0; 10],
            413,
            "M_TOO_LARGE",
        ),
        // Over the limit without announcing it.
        (
            "oversize body",
            vec![("Content-Type", "application/octet-stream".into())],
            vec![0; 100 * 1024 * 1024 + 1],
            413,
            "M_TOO_LARGE",
        ),
        (
            "no content type",
            vec![],
            b"x".to_vec(),
            400,
            "M_MISSING_PARAM",
        ),
        (
            "bad content type",
            vec![("Content-Type", "not a type".into())],
            b"x".to_vec(),
            400,
            "M_INVALID_PARAM",
        ),
        // The body ends before the length it announced (several chunks in).
        (
            "truncated",
            vec![
                ("Content-Type", "text/plain".into()),
                ("Content-Length", "2000000".into()),
            ],
            vec![1; 1_000_000],
            400,
            "M_BAD_JSON",
        ),
        (
            "overlong",
            vec![
                ("Content-Type", "text/plain".into()),
                ("Content-Length", "1000".into()),
            ],
            vec![1; 1_000_000],
            400,
            "M_BAD_JSON",
        ),
    ];
    for (what, headers, body, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, _, resp) = send_bytes(&api, "POST", up, t, &headers, body).await;
        assert_eq!((got, errcode(&resp)), (status, code.to_owned()), "{what}");
        assert_eq!(
            media_keys(&store).await,
            before,
            "{what} left something stored"
        );
    }
    let (status, _, resp) = send_bytes(
        &api,
        "POST",
        &format!("{up}?filename=..%2F..%2Fetc"),
        t,
        &[("Content-Type", "text/plain")],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(
        (status, errcode(&resp)),
        (400, "M_INVALID_PARAM".to_owned())
    );
    // Ids with path characters name nothing.
    let server = node.server_name().to_string();
    for id in ["..%2F..%2Fmeta", "a%00b", "%2E%2E", "x%2Fy"] {
        let (status, _, resp) = send_bytes(
            &api,
            "GET",
            &format!("/_matrix/client/v1/media/download/{server}/{id}"),
            t,
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(
            (status, errcode(&resp)),
            (404, "M_NOT_FOUND".to_owned()),
            "{id}"
        );
    }
    assert_eq!(media_keys(&store).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_reaches_the_servers_of_its_room_and_no_others() {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    let (c, api_c) = peer(Some(&a)).await;
    assert!(
        b.wait_for_peers(1, std::time::Duration::from_secs(10))
            .await
    );
    assert!(
        c.wait_for_peers(1, std::time::Duration::from_secs(10))
            .await
    );
    let (alice, bob, room) = alice_and_bob(&a, &api_a, &api_b).await;
    let carol = register(&api_c, "carol", "pw-carol-1").await;

    let big = file_of(20 * 1024 * 1024 + 777);
    let big_mxc = upload(&alice, "application/zip", "big.zip", big.clone()).await;
    let picture = png(1200, 900);
    let png_mxc = upload(&alice, "image/png", "view.png", picture.clone()).await;
    let secret = upload(
        &alice,
        "text/plain",
        "secret.txt",
        b"not named anywhere".to_vec(),
    )
    .await;
    // Before any event names them, nobody elsewhere may have them.
    let (status, _, body) = download(&bob, &png_mxc).await;
    assert_eq!((status, errcode(&body)), (404, "M_NOT_FOUND".to_owned()));
    for (i, (mxc, kind)) in [(&big_mxc, "m.file"), (&png_mxc, "m.image")]
        .into_iter()
        .enumerate()
    {
        alice
            .ok(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/m{i}",
                    common::client::enc(&room)
                ),
                Some(json!({"msgtype": kind, "body": "look", "url": mxc})),
            )
            .await;
    }

    let (status, _, body) = download(&bob, &big_mxc).await;
    assert_eq!(
        status,
        200,
        "{}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    assert!(body == big, "the 20 MB file came back different");
    let (status, headers, body) = download(&bob, &png_mxc).await;
    assert_eq!(status, 200);
    assert_eq!(body, picture);
    assert_eq!(headers["content-type"], "image/png");
    let rest = png_mxc.strip_prefix("mxc://").unwrap();
    let (status, _, body) = send_bytes(
        &api_b,
        "GET",
        &format!("/_matrix/client/v1/media/thumbnail/{rest}?width=300&height=300&method=scale"),
        &bob.token,
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    let thumb = image::load_from_memory(&body).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (300, 225));
    // Media no event names stays with its server, for bob too.
    let (status, _, body) = download(&bob, &secret).await;
    assert_eq!((status, errcode(&body)), (404, "M_NOT_FOUND".to_owned()));
    // Unless it was uploaded for the room (an encrypted attachment: no event the servers can
    // read names it), which only a member of the room may say.
    let for_room = format!(
        "/_matrix/media/v3/upload?filename=c.bin&org.hyphae.room_id={}",
        common::client::enc(&room)
    );
    let headers = [("Content-Type", "application/octet-stream")];
    let (status, _, resp) = send_bytes(
        &api_a,
        "POST",
        &for_room,
        &alice.token,
        &headers,
        b"ciphertext".to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let cipher_mxc = serde_json::from_slice::<Value>(&resp).unwrap()["content_uri"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, body) = download(&bob, &cipher_mxc).await;
    assert_eq!((status, body.as_slice()), (200, &b"ciphertext"[..]));
    let (status, _, resp) = send_bytes(
        &api_c,
        "POST",
        &for_room,
        &carol.token,
        &headers,
        b"x".to_vec(),
    )
    .await;
    assert_eq!((status, errcode(&resp)), (403, "M_FORBIDDEN".to_owned()));

    // Alice's avatar and name reach bob through her member events, and her avatar with them.
    let avatar = png(64, 64);
    let avatar_mxc = upload(&alice, "image/png", "me.png", avatar.clone()).await;
    let profile = format!("/_matrix/client/v3/profile/{}", alice.user_id);
    alice
        .ok(
            "PUT",
            &format!("{profile}/avatar_url"),
            Some(json!({"avatar_url": avatar_mxc})),
        )
        .await;
    alice
        .ok(
            "PUT",
            &format!("{profile}/displayname"),
            Some(json!({"displayname": "Alice Liddell"})),
        )
        .await;
    // Shown once her new member event has reached bob's server.
    let renamed = b
        .wait_until(std::time::Duration::from_secs(20), || {
            let (bob, profile) = (&bob, &profile);
            async move { bob.ok("GET", profile, None).await["displayname"] == "Alice Liddell" }
        })
        .await;
    assert!(renamed, "bob never saw alice's new name");
    let seen = bob.ok("GET", &profile, None).await;
    assert_eq!(
        seen,
        json!({"displayname": "Alice Liddell", "avatar_url": avatar_mxc})
    );
    let (status, _, body) = download(&bob, &avatar_mxc).await;
    assert_eq!((status, body == avatar), (200, true));
    let found = bob
        .ok(
            "POST",
            "/_matrix/client/v3/user_directory/search",
            Some(json!({"search_term": "alice lid"})),
        )
        .await;
    assert_eq!(
        found["results"][0]["user_id"],
        alice.user_id.as_str(),
        "{found}"
    );
    assert_eq!(found["results"][0]["display_name"], "Alice Liddell");
    // Carol shares no room with alice: no profile, no directory entry.
    let (status, _) = carol.call("GET", &profile, None).await;
    assert_eq!(status, 404);
    let found = carol
        .ok(
            "POST",
            "/_matrix/client/v3/user_directory/search",
            Some(json!({"search_term": "alice"})),
        )
        .await;
    assert_eq!(found["results"], json!([]));

    // Carol's server has no member in the room: it is told there is no such file.
    let (status, _, body) = download(&carol, &png_mxc).await;
    assert_eq!((status, errcode(&body)), (404, "M_NOT_FOUND".to_owned()));
    // Nor does a bare peer asking directly learn anything.
    let outsider =
        common::outsider::Outsider::dial(a.listen_addrs().await[0].clone(), a.peer_id(), vec![])
            .await;
    let id = png_mxc.rsplit('/').next().unwrap().to_owned();
    match outsider
        .ask(hyphae::net::protocol::FedRequest::GetMedia {
            media_id: id,
            offset: 0,
        })
        .await
    {
        Ok(hyphae::net::protocol::FedResponse::Error { code, .. }) => {
            assert_eq!(code, hyphae::net::protocol::FedErrorCode::NotFound)
        }
        other => panic!("an outsider got {other:?}"),
    }
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lies_about_its_media_leaves_nothing_here() {
    use hyphae::net::protocol::{FedRequest, FedResponse};
    let (b, api_b) = peer(None).await;
    let bob = register(&api_b, "bob", "pw-bob-1").await;
    let store = b.engine().store().clone();
    let before = media_keys(&store).await;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let key_peer = key.public().to_peer_id();
    let liar = hyphae::identity::ServerName::from_peer_id(&key_peer)
        .unwrap()
        .to_string();
    let real = b"the real bytes".to_vec();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&real))
    };
    let answer: common::outsider::Answer = std::sync::Arc::new(move |req: &FedRequest| {
        let FedRequest::GetMedia { media_id, .. } = req else {
            return FedResponse::Ok;
        };
        let mut bytes = real.clone();
        let mut size = real.len() as u64;
        let mut sha256 = digest.clone();
        match media_id.as_str() {
            // More bytes than the size it announces.
            "overlong" => bytes.extend_from_slice(b" and more"),
            // Fewer.
            "short" => size += 100,
            // The right length, other bytes.
            "tampered" => bytes[0] ^= 1,
            // A size over the upload limit.
            "huge" => size = 1 << 40,
            // Not even a media answer.
            "other" => return FedResponse::Ok,
            _ => sha256 = "00".repeat(32),
        }
        FedResponse::Media {
            content_type: "text/plain".into(),
            size,
            sha256,
            bytes,
        }
    });
    let mut connections = b.connected_peer_events();
    let _liar = common::outsider::Outsider::dial_as(
        key,
        b.listen_addrs().await[0].clone(),
        b.peer_id(),
        vec![],
        answer,
    )
    .await;
    // Asked only once this node has the connection too (else it would look the peer up).
    while !b.connected_peers().await.unwrap().contains(&key_peer) {
        let peer = tokio::time::timeout(std::time::Duration::from_secs(10), connections.recv())
            .await
            .expect("the lying server connects");
        if peer.ok() == Some(key_peer) {
            break;
        }
    }
    for (id, status, why) in [
        ("overlong", 502, "were due"),
        ("short", 502, "were due"),
        ("tampered", 502, "do not match"),
        ("huge", 413, "larger than"),
        ("other", 502, "not a media answer"),
        ("baddigest", 502, "do not match"),
    ] {
        let (got, _, body) = download(&bob, &format!("mxc://{liar}/{id}")).await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(got, status, "{id}: {text}");
        assert!(text.contains(why), "{id}: {text}");
        assert_eq!(
            media_keys(&store).await,
            before,
            "{id} left something stored"
        );
    }
}

/// Under `joined` history visibility a server that joins late may not see the room's earlier
/// events, so neither may it fetch the files only those events name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_named_before_a_server_joined_stays_hidden_under_joined_visibility() {
    let (a, api_a) = peer(None).await;
    let (c, api_c) = peer(Some(&a)).await;
    assert!(
        c.wait_for_peers(1, std::time::Duration::from_secs(10))
            .await
    );
    let alice = register(&api_a, "alice", "pw-alice-1").await;
    let mut carol = register(&api_c, "carol", "pw-carol-1").await;
    let room = alice
        .create_room(json!({
            "preset": "private_chat",
            "initial_state": [{"type": "m.room.history_visibility", "state_key": "",
                               "content": {"history_visibility": "joined"}}],
        }))
        .await;
    let mxc = upload(&alice, "image/png", "early.png", png(40, 30)).await;
    let send = |txn: &str| {
        format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            common::client::enc(&room)
        )
    };
    alice
        .ok(
            "PUT",
            &send("early"),
            Some(json!({"msgtype": "m.image", "body": "early", "url": mxc})),
        )
        .await;
    alice
        .ok(
            "POST",
            &format!(
                "/_matrix/client/v3/rooms/{}/invite",
                common::client::enc(&room)
            ),
            Some(json!({"user_id": carol.user_id})),
        )
        .await;
    carol
        .sync_until("the invite", |v| {
            v["rooms"]["invite"].get(&room).map(|_| ())
        })
        .await;
    let join = format!(
        "/_matrix/client/v3/join/{}?via={}",
        common::client::enc(&room),
        a.server_name()
    );
    carol.ok("POST", &join, Some(json!({}))).await;
    let (status, _, body) = download(&carol, &mxc).await;
    assert_eq!(
        (status, errcode(&body)),
        (404, "M_NOT_FOUND".to_owned()),
        "a file named only before carol's server joined reached it"
    );
    // Named again after the join: now her server may see an event that names it.
    alice
        .ok(
            "PUT",
            &send("again"),
            Some(json!({"msgtype": "m.image", "body": "again", "url": mxc})),
        )
        .await;
    let (status, _, _) = download(&carol, &mxc).await;
    assert_eq!(status, 200);
}
