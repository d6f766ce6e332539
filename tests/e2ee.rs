//! End-to-end encryption across peers, through the client API in this process: device keys,
//! one-time and fallback keys, to-device messages (also to a server that is away), device-list
//! changes, cross-signing and key backup; and what hostile peers try against them.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::client::{enc, register, Client};
use common::in_process::{peer, InProcess};
use common::mallory::Mallory;
use common::outsider::Outsider;
use hyphae::net::protocol::{FedErrorCode, FedRequest, FedResponse};
use hyphae::rooms::P2pNode;
use ruma::signatures::{Ed25519KeyPair, KeyPair};
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

/// Alice (on `api_a`) and bob (on `api_b`) in a private room of alice's.
async fn alice_and_bob<'a>(
    a: &P2pNode,
    api_a: &'a InProcess,
    api_b: &'a InProcess,
) -> (Client<'a, InProcess>, Client<'a, InProcess>, String) {
    let alice = register(api_a, "alice", "pw-alice-1").await;
    let mut bob = register(api_b, "bob", "pw-bob-1").await;
    let room = alice
        .create_room(json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await;
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
    (alice, bob, room)
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
