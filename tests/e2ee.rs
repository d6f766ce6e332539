//! End-to-end encryption across peers, through the client API in this process: device keys,
//! one-time and fallback keys, to-device messages (also to a server that is away), device-list
//! changes, cross-signing and key backup; and what hostile peers try against them.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::client::{enc, register, Client};
use common::in_process::{alice_and_bob, peer, InProcess};
use common::mallory::Mallory;
use common::outsider::Outsider;
use hyphae::net::protocol::{FedErrorCode, FedRequest, FedResponse};
use hyphae::rooms::P2pNode;
use ruma::signatures::Ed25519KeyPair;
use ruma::CanonicalJsonValue;
use serde_json::{json, Value};

/// A device's signing key, as a client holds it.
struct DeviceKey {
    pair: Ed25519KeyPair,
    device: String,
}

impl DeviceKey {
    fn new(device: &str) -> Self {
        let der = Ed25519KeyPair::generate();
        Self {
            pair: Ed25519KeyPair::from_der(&der, device.to_owned()).unwrap(),
            device: device.to_owned(),
        }
    }

    fn public(&self) -> String {
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.pair.public_key())
    }

    /// `object` signed by this key for `user`.
    fn sign(&self, user: &str, object: Value) -> Value {
        sign_with(&self.pair, user, object)
    }

    /// The device keys a client uploads: its curve25519 and ed25519 keys, self-signed.
    fn device_keys(&self, user: &str) -> Value {
        self.sign(
            user,
            json!({
                "user_id": user,
                "device_id": self.device,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {
                    format!("curve25519:{}", self.device): "curve".to_owned() + &self.device,
                    format!("ed25519:{}", self.device): self.public(),
                },
            }),
        )
    }

    fn one_time_key(&self, user: &str, n: usize) -> (String, Value) {
        let key = self.sign(user, json!({"key": format!("otk{n}-{}", self.device)}));
        (format!("signed_curve25519:AAAA{n}"), key)
    }
}

fn sign_with(pair: &Ed25519KeyPair, user: &str, object: Value) -> Value {
    let CanonicalJsonValue::Object(mut o) = CanonicalJsonValue::try_from(object).unwrap() else {
        unreachable!()
    };
    ruma::signatures::sign_json(user, pair, &mut o).unwrap();
    serde_json::to_value(o).unwrap()
}

async fn two_peers() -> (P2pNode, InProcess, P2pNode, InProcess) {
    let (a, api_a) = peer(None).await;
    let (b, api_b) = peer(Some(&a)).await;
    assert!(b.wait_for_peers(1, Duration::from_secs(10)).await);
    (a, api_a, b, api_b)
}

async fn upload(c: &Client<'_, InProcess>, key: &DeviceKey, otks: usize, fallback: bool) -> Value {
    let mut body = json!({"device_keys": key.device_keys(&c.user_id)});
    let mut keys = serde_json::Map::new();
    for n in 0..otks {
        let (id, k) = key.one_time_key(&c.user_id, n);
        keys.insert(id, k);
    }
    body["one_time_keys"] = Value::Object(keys);
    if fallback {
        let k = key.sign(&c.user_id, json!({"key": "fallback", "fallback": true}));
        body["fallback_keys"] = json!({"signed_curve25519:FFFF": k});
    }
    c.ok("POST", "/_matrix/client/v3/keys/upload", Some(body))
        .await
}

async fn whoami_device(c: &Client<'_, InProcess>) -> String {
    let v = c.ok("GET", "/_matrix/client/v3/account/whoami", None).await;
    v["device_id"].as_str().unwrap().to_owned()
}

async fn query(c: &Client<'_, InProcess>, user: &str) -> Value {
    c.ok(
        "POST",
        "/_matrix/client/v3/keys/query",
        Some(json!({"device_keys": {user: []}})),
    )
    .await
}

async fn claim(c: &Client<'_, InProcess>, user: &str, device: &str) -> Value {
    let v = c
        .ok(
            "POST",
            "/_matrix/client/v3/keys/claim",
            Some(json!({"one_time_keys": {user: {device: "signed_curve25519"}}})),
        )
        .await;
    v["one_time_keys"][user][device].clone()
}

async fn send_to_device(
    c: &Client<'_, InProcess>,
    user: &str,
    device: &str,
    txn: &str,
    body: &str,
) {
    c.ok(
        "PUT",
        &format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{txn}"),
        Some(json!({"messages": {user: {device: {"ciphertext": body}}}})),
    )
    .await;
}

/// Syncs until `n` to-device messages have arrived, then once more to see no repeat.
async fn to_device_messages(c: &mut Client<'_, InProcess>, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    c.sync_until("the to-device messages", |v| {
        for m in v["to_device"]["events"].as_array().into_iter().flatten() {
            got.push(
                m["content"]["ciphertext"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        (got.len() >= n).then_some(())
    })
    .await;
    let again = c
        .ok(
            "GET",
            &format!(
                "/_matrix/client/v3/sync?timeout=0&since={}",
                c.since.clone().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(
        again["to_device"]["events"],
        json!([]),
        "a to-device message came twice"
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_claims_and_to_device_across_two_peers() {
    let (a, api_a, b, api_b) = two_peers().await;
    let (mut alice, mut bob, _room) = alice_and_bob(&a, &api_a, &api_b).await;
    let bob_device = whoami_device(&bob).await;
    let bob_key = DeviceKey::new(&bob_device);
    let counts = upload(&bob, &bob_key, 3, true).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 3);

    // Alice's server asks bob's: bob's device, exactly as uploaded.
    let q = query(&alice, &bob.user_id).await;
    assert_eq!(q["failures"], json!({}), "{q}");
    assert_eq!(
        q["device_keys"][&bob.user_id][&bob_device],
        bob_key.device_keys(&bob.user_id)
    );

    // Three one-time keys, each once, then the fallback key (again and again).
    let mut seen = Vec::new();
    for _ in 0..3 {
        let k = claim(&alice, &bob.user_id, &bob_device).await;
        let (id, _) = k.as_object().unwrap().iter().next().unwrap();
        assert!(id.starts_with("signed_curve25519:AAAA"), "{k}");
        assert!(!seen.contains(id));
        seen.push(id.clone());
    }
    for _ in 0..2 {
        let k = claim(&alice, &bob.user_id, &bob_device).await;
        assert!(k.get("signed_curve25519:FFFF").is_some(), "{k}");
    }
    let synced = bob
        .sync_until("the fallback key marked used", |v| {
            (v["device_unused_fallback_key_types"] == json!([])).then(|| v.clone())
        })
        .await;
    let left = synced["device_one_time_keys_count"]["signed_curve25519"].as_u64();
    assert_eq!(left.unwrap_or(0), 0, "{synced}");

    // To-device: delivered once, in order.
    send_to_device(&alice, &bob.user_id, &bob_device, "t1", "first").await;
    send_to_device(&alice, &bob.user_id, &bob_device, "t2", "second").await;
    assert_eq!(to_device_messages(&mut bob, 2).await, ["first", "second"]);

    // Bob's server goes away; alice is told her messages are taken, and they arrive when it is
    // back.
    b.set_offline(true).unwrap();
    send_to_device(&alice, &bob.user_id, &bob_device, "t3", "while away 1").await;
    send_to_device(&alice, &bob.user_id, &bob_device, "t4", "while away 2").await;
    b.set_offline(false).unwrap();
    assert!(b.wait_for_peers(1, Duration::from_secs(30)).await);
    assert_eq!(
        to_device_messages(&mut bob, 2).await,
        ["while away 1", "while away 2"]
    );

    // Bob signs in on a second device: alice's sync says his devices changed, and a new query
    // finds both.
    let (status, login) = api_b
        .raw(
            "POST",
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": "pw-bob-1"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let second = Client {
        t: &api_b,
        token: login["access_token"].as_str().unwrap().to_owned(),
        user_id: bob.user_id.clone(),
        since: None,
        filter: None,
    };
    let second_key = DeviceKey::new(login["device_id"].as_str().unwrap());
    alice.sync_until("caught up", |_| Some(())).await;
    upload(&second, &second_key, 1, false).await;
    alice
        .sync_until("bob's devices changed", |v| {
            v["device_lists"]["changed"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|u| u == bob.user_id.as_str())
                .then_some(())
        })
        .await;
    let q = query(&alice, &bob.user_id).await;
    assert_eq!(
        q["device_keys"][&bob.user_id].as_object().unwrap().len(),
        2,
        "{q}"
    );
}

/// A cross-signing key: an ed25519 pair whose key id is its own public key.
fn cross_signing_pair() -> (Ed25519KeyPair, String) {
    let der = Ed25519KeyPair::generate();
    let probe = Ed25519KeyPair::from_der(&der, String::new()).unwrap();
    let public = base64::engine::general_purpose::STANDARD_NO_PAD.encode(probe.public_key());
    (
        Ed25519KeyPair::from_der(&der, public.clone()).unwrap(),
        public,
    )
}

fn cross_signing_key(user: &str, usage: &str, public: &str) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{public}"): public}})
}

/// A peer with no room in common with alice asks for her keys, claims them, sends her
/// devices messages and speaks for her: it learns nothing, takes nothing, and reaches no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_learns_no_keys_and_reaches_no_device() {
    let (a, api_a) = peer(None).await;
    let mut alice = register(&api_a, "alice", "pw-alice-1").await;
    let device = whoami_device(&alice).await;
    let key = DeviceKey::new(&device);
    upload(&alice, &key, 2, true).await;
    let m = Outsider::dial(a.listen_addrs().await[0].clone(), a.peer_id(), Vec::new()).await;
    let stranger: ruma::OwnedUserId = format!(
        "@eve:{}",
        hyphae::identity::ServerName::from_peer_id(&m.peer_id).unwrap()
    )
    .try_into()
    .unwrap();
    let alice_id: ruma::OwnedUserId = alice.user_id.clone().try_into().unwrap();

    let r = m
        .ask(FedRequest::QueryKeys {
            user_ids: vec![alice_id.clone()],
        })
        .await
        .unwrap();
    let FedResponse::Keys { json } = r else {
        panic!("{r:?}")
    };
    let keys: Value = serde_json::from_str(&json).unwrap();
    assert!(
        keys["device_keys"].get(alice.user_id.as_str()).is_none(),
        "{keys}"
    );

    let mut claims = std::collections::BTreeMap::new();
    claims.insert(
        alice_id.clone(),
        [(device.clone(), "signed_curve25519".to_owned())].into(),
    );
    let r = m.ask(FedRequest::ClaimKeys { claims }).await.unwrap();
    let FedResponse::Keys { json } = r else {
        panic!("{r:?}")
    };
    assert!(!json.contains("AAAA"), "a stranger claimed a key: {json}");

    let message = |sender: &ruma::OwnedUserId, seq: u64| FedRequest::ToDevice {
        seq,
        sender: sender.clone(),
        kind: "m.room.encrypted".into(),
        messages: json!({alice.user_id.as_str(): {"*": {"ciphertext": "from a stranger"}}})
            .to_string(),
    };
    assert_eq!(m.ask(message(&stranger, 1)).await.unwrap(), FedResponse::Ok);
    let r = m.ask(message(&alice_id, 2)).await.unwrap();
    assert!(
        matches!(
            r,
            FedResponse::Error {
                code: FedErrorCode::Forbidden,
                ..
            }
        ),
        "a to-device message in alice's own name: {r:?}"
    );
    let flood = FedRequest::ToDevice {
        seq: 3,
        sender: stranger.clone(),
        kind: "m.room.encrypted".into(),
        messages: "x".repeat(200 << 10),
    };
    let r = m.ask(flood).await.unwrap();
    assert!(
        matches!(
            r,
            FedResponse::Error {
                code: FedErrorCode::BadRequest,
                ..
            }
        ),
        "{r:?}"
    );
    let r = m
        .ask(FedRequest::DeviceListChanged {
            user_id: alice_id.clone(),
            stream_id: 1,
        })
        .await
        .unwrap();
    assert!(matches!(
        r,
        FedResponse::Error {
            code: FedErrorCode::Forbidden,
            ..
        }
    ));

    let v = alice.ok("GET", "/_matrix/client/v3/sync", None).await;
    assert_eq!(v["to_device"]["events"], json!([]), "{v}");
    assert_eq!(v["device_one_time_keys_count"]["signed_curve25519"], 2);
    assert_eq!(
        v["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    alice.since = v["next_batch"].as_str().map(str::to_owned);
}

/// A member server answers a key query with forged keys: devices whose signature does not
/// verify, that name another device, keys for a user of another server, and a self-signing key
/// its master key never signed. Only what verifies reaches alice's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_keys_from_a_member_server_are_dropped() {
    let (a, api_a) = peer(None).await;
    let alice = register(&api_a, "alice", "pw-alice-1").await;
    let alice_device = whoami_device(&alice).await;
    let alice_key = DeviceKey::new(&alice_device);
    upload(&alice, &alice_key, 0, false).await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;

    let mallory = Mallory::new().await;
    let mu = mallory.user.to_string();
    let good = DeviceKey::new("GOOD");
    let mut tampered = DeviceKey::new("BAD").device_keys(&mu);
    tampered["keys"]["curve25519:BAD"] = json!("swapped");
    let misnamed = DeviceKey::new("OTHER").device_keys(&mu);
    let evil = DeviceKey::new("EVIL").device_keys(&alice.user_id);
    let (master_pair, master_pub) = cross_signing_pair();
    let (_, ssk_pub) = cross_signing_pair();
    let master = sign_with(
        &master_pair,
        &mu,
        cross_signing_key(&mu, "master", &master_pub),
    );
    let unsigned_ssk = cross_signing_key(&mu, "self_signing", &ssk_pub);
    let forged = json!({
        "device_keys": {
            mu.as_str(): {"GOOD": good.device_keys(&mu), "BAD": tampered, "NOT-OTHER": misnamed},
            alice.user_id.as_str(): {"EVIL": evil},
        },
        "master_keys": {mu.as_str(): master},
        "self_signing_keys": {mu.as_str(): unsigned_ssk},
    })
    .to_string();
    let answer: common::outsider::Answer = Arc::new(move |r| match r {
        FedRequest::QueryKeys { .. } => FedResponse::Keys {
            json: forged.clone(),
        },
        _ => FedResponse::error(FedErrorCode::NotFound, "no"),
    });
    let m = Outsider::dial_as(
        mallory.identity.libp2p_keypair().clone(),
        a.listen_addrs().await[0].clone(),
        a.peer_id(),
        Vec::new(),
        answer,
    )
    .await;
    mallory
        .join(&m, &ruma::OwnedRoomId::try_from(room.as_str()).unwrap())
        .await;

    let q = query(&alice, &mu).await;
    let devices = q["device_keys"][&mu].as_object().unwrap();
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["GOOD"], "{q}");
    assert_eq!(q["master_keys"][&mu], master, "{q}");
    assert!(q["self_signing_keys"].get(&mu).is_none(), "{q}");
    // Alice's own devices are what her server holds, whatever a peer claims.
    let own = query(&alice, &alice.user_id).await;
    assert_eq!(
        own["device_keys"][&alice.user_id]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        [&alice_device]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unsigned_key_uploads_are_refused() {
    let (_a, api_a) = peer(None).await;
    let alice = register(&api_a, "alice", "pw-alice-1").await;
    let device = whoami_device(&alice).await;
    let key = DeviceKey::new(&device);
    upload(&alice, &key, 5, false).await;
    let path = "/_matrix/client/v3/keys/upload";
    let many: serde_json::Map<String, Value> = (0..201)
        .map(|n| key.one_time_key(&alice.user_id, 1000 + n))
        .collect();
    alice
        .fails(
            "POST",
            path,
            Some(json!({"one_time_keys": many})),
            "M_TOO_LARGE",
        )
        .await;
    let big = json!({"signed_curve25519:BIG": {"key": "k".repeat(5000)}});
    alice
        .fails(
            "POST",
            path,
            Some(json!({"one_time_keys": big})),
            "M_TOO_LARGE",
        )
        .await;
    let mut forged = key.device_keys(&alice.user_id);
    forged["keys"][format!("curve25519:{device}")] = json!("swapped");
    alice
        .fails(
            "POST",
            path,
            Some(json!({"device_keys": forged})),
            "M_BAD_JSON",
        )
        .await;
    let counts = alice.ok("POST", path, Some(json!({}))).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 5);
    let q = query(&alice, &alice.user_id).await;
    assert_eq!(
        q["device_keys"][&alice.user_id][&device],
        key.device_keys(&alice.user_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_signing_keys_and_signatures() {
    let (a, api_a, _b, api_b) = two_peers().await;
    let (mut alice, bob, _room) = alice_and_bob(&a, &api_a, &api_b).await;
    let user = bob.user_id.clone();
    let device = whoami_device(&bob).await;
    let key = DeviceKey::new(&device);
    upload(&bob, &key, 0, false).await;
    let (master_pair, master_pub) = cross_signing_pair();
    let (ssk_pair, ssk_pub) = cross_signing_pair();
    let (_, usk_pub) = cross_signing_pair();
    let master = cross_signing_key(&user, "master", &master_pub);
    let ssk = sign_with(
        &master_pair,
        &user,
        cross_signing_key(&user, "self_signing", &ssk_pub),
    );
    let usk = sign_with(
        &master_pair,
        &user,
        cross_signing_key(&user, "user_signing", &usk_pub),
    );
    let path = "/_matrix/client/v3/keys/device_signing/upload";
    // A self-signing key the master key did not sign is refused.
    let unsigned = cross_signing_key(&user, "self_signing", &ssk_pub);
    bob.fails(
        "POST",
        path,
        Some(json!({"master_key": master, "self_signing_key": unsigned})),
        "M_BAD_JSON",
    )
    .await;
    bob.ok(
        "POST",
        path,
        Some(json!({"master_key": master, "self_signing_key": ssk, "user_signing_key": usk})),
    )
    .await;

    // Bob signs his device with the self-signing key.
    let signed_device = sign_with(&ssk_pair, &user, key.device_keys(&user));
    let r = bob
        .ok(
            "POST",
            "/_matrix/client/v3/keys/signatures/upload",
            Some(json!({ user.as_str(): { device.as_str(): signed_device } })),
        )
        .await;
    assert_eq!(r["failures"], json!({}), "{r}");

    // Alice, on another server, sees his master and self-signing keys and the signed device;
    // the user-signing key stays his own.
    let q = query(&alice, &user).await;
    assert_eq!(q["master_keys"][&user], master, "{q}");
    assert_eq!(q["self_signing_keys"][&user], ssk, "{q}");
    assert!(q["user_signing_keys"].get(&user).is_none(), "{q}");
    let sigs = &q["device_keys"][&user][&device]["signatures"][&user];
    assert!(sigs.get(format!("ed25519:{ssk_pub}")).is_some(), "{q}");
    let own = query(&bob, &user).await;
    assert_eq!(own["user_signing_keys"][&user], usk);

    // Alice verifies bob: her user-signing key signs his master key. She sees her signature;
    // bob, and anyone else, does not.
    let (alice_master_pair, alice_master_pub) = cross_signing_pair();
    let (alice_usk_pair, alice_usk_pub) = cross_signing_pair();
    let alice_usk = sign_with(
        &alice_master_pair,
        &alice.user_id,
        cross_signing_key(&alice.user_id, "user_signing", &alice_usk_pub),
    );
    alice
        .ok(
            "POST",
            path,
            Some(json!({
                "master_key": cross_signing_key(&alice.user_id, "master", &alice_master_pub),
                "user_signing_key": alice_usk,
            })),
        )
        .await;
    let sig_path = "/_matrix/client/v3/keys/signatures/upload";
    let (forger, _) = cross_signing_pair();
    let forged = sign_with(&forger, &alice.user_id, master.clone());
    let r = alice
        .ok(
            "POST",
            sig_path,
            Some(json!({ user.as_str(): { master_pub.as_str(): forged } })),
        )
        .await;
    assert_eq!(
        r["failures"][&user][&master_pub]["errcode"], "M_INVALID_SIGNATURE",
        "{r}"
    );
    let signed_master = sign_with(&alice_usk_pair, &alice.user_id, master.clone());
    let r = alice
        .ok(
            "POST",
            sig_path,
            Some(json!({ user.as_str(): { master_pub.as_str(): signed_master } })),
        )
        .await;
    assert_eq!(r["failures"], json!({}), "{r}");
    let q = query(&alice, &user).await;
    let usk_id = format!("ed25519:{alice_usk_pub}");
    assert_eq!(
        q["master_keys"][&user]["signatures"][&alice.user_id][&usk_id],
        signed_master["signatures"][&alice.user_id][&usk_id],
        "{q}"
    );
    let own = query(&bob, &user).await;
    assert!(
        own["master_keys"][&user]["signatures"]
            .get(&alice.user_id)
            .is_none(),
        "{own}"
    );

    // Replacing the master key needs bob's password.
    alice.sync_until("caught up", |_| Some(())).await;
    let (_, other_pub) = cross_signing_pair();
    let new_master = cross_signing_key(&user, "master", &other_pub);
    let (status, challenge) = bob
        .call("POST", path, Some(json!({"master_key": new_master})))
        .await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().unwrap();
    bob.ok(
        "POST",
        path,
        Some(json!({"master_key": new_master, "auth": {
            "type": "m.login.password", "session": session, "password": "pw-bob-1",
            "identifier": {"type": "m.id.user", "user": "bob"}}})),
    )
    .await;
    let own = query(&bob, &user).await;
    assert_eq!(own["master_keys"][&user], new_master);
    // Alice's signature was of the old key: it is not shown on the new one.
    let bob_id = user.clone();
    alice
        .sync_until("bob's keys changed", |v| {
            v["device_lists"]["changed"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|u| u == bob_id.as_str())
                .then_some(())
        })
        .await;
    let q = query(&alice, &user).await;
    assert_eq!(q["master_keys"][&user], new_master, "{q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_backup_versions_and_keys() {
    let (_a, api_a) = peer(None).await;
    let alice = register(&api_a, "alice", "pw-alice-1").await;
    let version_path = "/_matrix/client/v3/room_keys/version";
    alice.fails("GET", version_path, None, "M_NOT_FOUND").await;
    let auth_data = json!({"public_key": "abc", "signatures": {}});
    let v = alice
        .ok(
            "POST",
            version_path,
            Some(json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth_data})),
        )
        .await;
    let version = v["version"].as_str().unwrap().to_owned();
    let session = |index: u64, verified: bool| {
        json!({"first_message_index": index, "forwarded_count": 0, "is_verified": verified,
               "session_data": {"ciphertext": format!("c{index}"), "ephemeral": "e", "mac": "m"}})
    };
    let keys_path = format!("/_matrix/client/v3/room_keys/keys?version={version}");
    let put = |sessions: Value| json!({"rooms": {"!r:x": {"sessions": sessions}}});
    let r = alice
        .ok(
            "PUT",
            &keys_path,
            Some(put(json!({"s1": session(5, false)}))),
        )
        .await;
    assert_eq!(
        (r["count"].clone(), r["etag"].clone()),
        (json!(1), json!("1"))
    );
    // A worse copy (a later first index) changes nothing; a better one replaces it.
    let r = alice
        .ok(
            "PUT",
            &keys_path,
            Some(put(json!({"s1": session(9, false)}))),
        )
        .await;
    assert_eq!(
        (r["count"].clone(), r["etag"].clone()),
        (json!(1), json!("1"))
    );
    let r = alice
        .ok(
            "PUT",
            &keys_path,
            Some(put(
                json!({"s1": session(2, false), "s2": session(0, true)}),
            )),
        )
        .await;
    assert_eq!(
        (r["count"].clone(), r["etag"].clone()),
        (json!(2), json!("2"))
    );
    let one = alice
        .ok(
            "GET",
            &format!(
                "/_matrix/client/v3/room_keys/keys/{}/s1?version={version}",
                enc("!r:x")
            ),
            None,
        )
        .await;
    assert_eq!(one, session(2, false));
    let info = alice.ok("GET", version_path, None).await;
    assert_eq!(info["count"], 2);
    assert_eq!(info["version"], version.as_str());
    let (status, wrong) = alice
        .call(
            "PUT",
            "/_matrix/client/v3/room_keys/keys?version=99",
            Some(put(json!({"s3": session(0, false)}))),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(wrong["errcode"], "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(wrong["current_version"], version.as_str());
    alice
        .ok("DELETE", &format!("{version_path}/{version}"), None)
        .await;
    alice.fails("GET", version_path, None, "M_NOT_FOUND").await;
}

/// A key query for a user whose server cannot be reached yet waits for it to come (within the
/// query's timeout) instead of answering "no devices": a tab that has just started finds its
/// peers within seconds, and a message encrypted meanwhile would reach nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_query_waits_for_a_server_that_is_coming() {
    let (a, api_a, b, api_b) = two_peers().await;
    let (alice, bob, _room) = alice_and_bob(&a, &api_a, &api_b).await;
    let device = whoami_device(&bob).await;
    let key = DeviceKey::new(&device);
    upload(&bob, &key, 1, false).await;
    b.set_offline(true).unwrap();
    let body = json!({"device_keys": {bob.user_id.as_str(): []}, "timeout": 10_000});
    let asked = alice.call("POST", "/_matrix/client/v3/keys/query", Some(body));
    let back = async {
        // Bob's server is away for a moment (its first attempt fails at once: the node refuses
        // every connection while offline), then comes back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.set_offline(false).unwrap();
    };
    let ((status, q), ()) = tokio::join!(asked, back);
    assert_eq!(status, 200, "{q}");
    assert_eq!(q["failures"], json!({}), "{q}");
    assert_eq!(
        q["device_keys"][&bob.user_id][&device],
        key.device_keys(&bob.user_id)
    );
}

/// While a server is away its to-device messages wait in the sender's outbox, up to a bound;
/// past it the sender is told to wait. When the server is back, every waiting message arrives,
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_for_a_server_that_is_away_is_bounded_and_delivered_in_order() {
    use hyphae::api::to_device::MAX_OUTBOX_PER_SERVER;
    let (a, api_a, b, api_b) = two_peers().await;
    let (alice, mut bob, _room) = alice_and_bob(&a, &api_a, &api_b).await;
    let device = whoami_device(&bob).await;
    b.set_offline(true).unwrap();
    for i in 0..MAX_OUTBOX_PER_SERVER {
        send_to_device(
            &alice,
            &bob.user_id,
            &device,
            &format!("t{i}"),
            &format!("m{i}"),
        )
        .await;
    }
    let path = "/_matrix/client/v3/sendToDevice/m.room.encrypted/over";
    let body = json!({"messages": {bob.user_id.as_str(): {device.as_str(): {"ciphertext": "one too many"}}}});
    alice
        .fails("PUT", path, Some(body), "M_LIMIT_EXCEEDED")
        .await;
    b.set_offline(false).unwrap();
    // They arrive over several syncs: collect until all are in (or the patience runs out).
    let deadline = std::time::Instant::now() + common::peers::PATIENCE;
    let mut got: Vec<String> = Vec::new();
    while got.len() < MAX_OUTBOX_PER_SERVER && std::time::Instant::now() < deadline {
        let path = match &bob.since {
            Some(s) => format!("/_matrix/client/v3/sync?timeout=2000&since={s}"),
            None => "/_matrix/client/v3/sync".to_owned(),
        };
        let v = bob.ok("GET", &path, None).await;
        bob.since = v["next_batch"].as_str().map(str::to_owned);
        for m in v["to_device"]["events"].as_array().into_iter().flatten() {
            got.push(
                m["content"]["ciphertext"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    let sent: Vec<String> = (0..MAX_OUTBOX_PER_SERVER)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(got, sent, "every message once, in order");
}

/// Bob adds a device while his server and alice's are apart, so its change notice never
/// reaches alice's server; when the two connect again, alice's server forgets what it cached of
/// bob's keys, and her next query finds the new device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_change_missed_while_apart_is_seen_after_reconnecting() {
    let (a, api_a, b, api_b) = two_peers().await;
    let (alice, bob, _room) = alice_and_bob(&a, &api_a, &api_b).await;
    upload(&bob, &DeviceKey::new(&whoami_device(&bob).await), 0, false).await;
    let q = query(&alice, &bob.user_id).await;
    assert_eq!(
        q["device_keys"][&bob.user_id].as_object().unwrap().len(),
        1,
        "{q}"
    );

    b.set_offline(true).unwrap();
    // Apart for sure before bob's new device is announced.
    while !b.connected_peers().await.unwrap().is_empty()
        || a.connected_peers().await.unwrap().contains(&b.peer_id())
    {
        tokio::task::yield_now().await;
    }
    let (status, login) = api_b
        .raw(
            "POST",
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": "pw-bob-1"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let second = Client {
        t: &api_b,
        token: login["access_token"].as_str().unwrap().to_owned(),
        user_id: bob.user_id.clone(),
        since: None,
        filter: None,
    };
    upload(
        &second,
        &DeviceKey::new(login["device_id"].as_str().unwrap()),
        0,
        false,
    )
    .await;
    b.set_offline(false).unwrap();
    // The reconnection reaches alice's server's key cache a moment after the connection count:
    // ask until the new device shows (the cache would keep the old answer for ten minutes).
    let deadline = std::time::Instant::now() + common::peers::PATIENCE;
    loop {
        let q = query(&alice, &bob.user_id).await;
        let devices = q["device_keys"][&bob.user_id]
            .as_object()
            .map_or(0, |d| d.len());
        if devices == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {devices} device(s): {q}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `user` is in a sync response's (or `/keys/changes` answer's) device-list `field`.
fn listed(v: &Value, field: &str, user: &str) -> bool {
    let list = v.get("device_lists").unwrap_or(v);
    list[field]
        .as_array()
        .into_iter()
        .flatten()
        .any(|u| u == user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_and_leaving_drive_device_lists() {
    let (a, api_a, _b, api_b) = two_peers().await;
    let mut alice = register(&api_a, "alice", "pw-alice-1").await;
    let mut bob = register(&api_b, "bob", "pw-bob-1").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await;
    alice.sync_until("caught up", |_| Some(())).await;
    let before = alice.since.clone().unwrap();
    bob.sync_until("the invite", |v| {
        v["rooms"]["invite"].get(&room).map(|_| ())
    })
    .await;
    let join = format!(
        "/_matrix/client/v3/join/{}?via={}",
        enc(&room),
        a.server_name()
    );
    bob.ok("POST", &join, Some(json!({}))).await;

    // Bob joining makes him someone alice's client must track, and alice someone bob's must.
    let bob_id = bob.user_id.clone();
    alice
        .sync_until("bob in changed", |v| {
            listed(v, "changed", &bob_id).then_some(())
        })
        .await;
    let alice_id = alice.user_id.clone();
    bob.sync_until("alice in changed", |v| {
        listed(v, "changed", &alice_id).then_some(())
    })
    .await;
    let joined = alice.since.clone().unwrap();
    let changes = alice
        .ok(
            "GET",
            &format!("/_matrix/client/v3/keys/changes?from={before}&to={joined}"),
            None,
        )
        .await;
    assert!(listed(&changes, "changed", &bob_id), "{changes}");
    assert!(!listed(&changes, "left", &bob_id), "{changes}");

    // Bob leaving their only shared room: alice stops tracking him, and he her.
    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(json!({})),
    )
    .await;
    alice
        .sync_until("bob in left", |v| {
            assert!(!listed(v, "changed", &bob_id), "{v}");
            listed(v, "left", &bob_id).then_some(())
        })
        .await;
    bob.sync_until("alice in left", |v| {
        listed(v, "left", &alice_id).then_some(())
    })
    .await;
    let after = alice.since.clone().unwrap();
    let changes = alice
        .ok(
            "GET",
            &format!("/_matrix/client/v3/keys/changes?from={joined}&to={after}"),
            None,
        )
        .await;
    assert!(listed(&changes, "left", &bob_id), "{changes}");

    // A leave from one of two shared rooms changes nothing: they still share the other.
    let second = alice
        .create_room(json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await;
    let third = alice
        .create_room(json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await;
    let mut invited = std::collections::HashSet::new();
    bob.sync_until("both invites", |v| {
        for r in [&second, &third] {
            if v["rooms"]["invite"].get(r).is_some() {
                invited.insert(r.clone());
            }
        }
        (invited.len() == 2).then_some(())
    })
    .await;
    for r in [&second, &third] {
        let join = format!("/_matrix/client/v3/join/{}?via={}", enc(r), a.server_name());
        bob.ok("POST", &join, Some(json!({}))).await;
    }
    alice
        .sync_until("bob joined both", |v| {
            v["rooms"]["join"][&third]["timeline"]["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob_id.as_str())
                .then_some(())
        })
        .await;
    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&second)),
        Some(json!({})),
    )
    .await;
    alice
        .sync_until("bob's leave of one room", |v| {
            assert!(!listed(v, "left", &bob_id), "{v}");
            v["rooms"]["join"][&second]["timeline"]["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave")
                .then_some(())
        })
        .await;
}
