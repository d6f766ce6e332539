//! Fuzzing, on stable Rust with proptest, of everything a peer or a client sends: PDU JSON,
//! `FedRequest`/`FedResponse` CBOR, EDUs, invites with stripped state, every request a member
//! server can make, and the client router with arbitrary bytes and valid-looking JSON.
//!
//! Each target must answer every input without a panic or a hang and change nothing it should
//! not. `HYPHAE_FUZZ_CASES` sets the cases per target (the test command runs a short pass;
//! `scripts/bench.sh` a long one). Each target prints
//! `FUZZ <target> cases=<n> secs=<s> per_sec=<r> panics=<p>`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mallory::Mallory;
use common::outsider::Outsider;
use common::peers::{node, PATIENCE};
use hyphae::api::{Caller, ClientApi, Registration};
use hyphae::engine::create_room::{CreateRoom, Preset};
use hyphae::engine::{verify_standalone, Engine, Scope};
use hyphae::net::protocol::{fed_codec, Edu, FedRequest, FedResponse, FED_PROTOCOL};
use hyphae::rooms::P2pNode;
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use ruma::{OwnedEventId, OwnedRoomId, RoomVersionId};
use serde_json::{json, Map, Value};

/// Cases per target: a short pass unless `HYPHAE_FUZZ_CASES` says otherwise.
fn cases() -> u32 {
    std::env::var("HYPHAE_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(500)
}

/// Runs `test` on `cases()` inputs from `strategy`, prints the target's figures, and fails
/// with the smallest failing input if any case panicked or failed.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let cases = cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, test);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "FUZZ {name} cases={cases} secs={secs:.2} per_sec={:.0} panics={}",
        f64::from(cases) / secs,
        u32::from(result.is_err())
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs one case's async work, failing the case if it takes longer than a peer may make us wait.
fn within<T>(rt: &tokio::runtime::Runtime, work: impl std::future::Future<Output = T>) -> T {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .expect("a case hung")
    })
}

// ---- Generators ----------------------------------------------------------------------------

/// Strings a hostile sender would try: ids of every sigil, empty, huge, control characters,
/// non-ASCII, numbers as strings, and arbitrary text.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("@u:x".to_owned()),
        Just("!r:x".to_owned()),
        Just("$e".to_owned()),
        Just("#a:x".to_owned()),
        Just("m.room.member".to_owned()),
        Just("join".to_owned()),
        Just("\u{0}".to_owned()),
        Just("x".repeat(70_000)),
        Just("9007199254740993".to_owned()),
        "[@!$#]?[a-z0-9:._=-]{0,40}",
        "\\PC{0,30}",
    ]
}

/// Arbitrary JSON, nested a few levels, with keys that matter to Matrix among random ones.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        nasty_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec((json_key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&[
            "type", "content", "sender", "room_id", "state_key", "event_id", "prev_events",
            "auth_events", "depth", "hashes", "signatures", "origin_server_ts", "unsigned",
            "redacts", "membership", "body", "msgtype", "user_id", "typing", "ts", "name",
            "topic", "join_rule", "users", "events", "limit", "filter", "room", "timeline",
            "auth", "session", "password", "username", "device_id", "identifier", "m.relates_to",
            "rel_type", "invite", "preset", "visibility", "creation_content", "initial_state",
        ][..])
        .prop_map(str::to_owned),
        1 => "[a-z_.]{0,12}",
    ]
}

/// One change a fuzzer makes to a well-formed JSON document.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(String),
    Set(String, Value),
    SetInside(String, String, Value),
    Truncate(usize),
    FlipByte(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        json_key().prop_map(Mutation::Remove),
        (json_key(), json_value()).prop_map(|(k, v)| Mutation::Set(k, v)),
        (json_key(), json_key(), json_value()).prop_map(|(k, i, v)| Mutation::SetInside(k, i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::FlipByte(at, b)),
    ]
}

/// `doc` with `mutations` applied, as bytes (byte-level changes may leave it not JSON at all).
fn mutate(doc: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut value: Value = serde_json::from_str(doc).unwrap_or(Value::Null);
    let mut byte_level = Vec::new();
    for m in mutations {
        let Value::Object(object) = &mut value else {
            break;
        };
        match m {
            Mutation::Remove(k) => {
                object.remove(k);
            }
            Mutation::Set(k, v) => {
                object.insert(k.clone(), v.clone());
            }
            Mutation::SetInside(k, inner, v) => {
                let slot = object
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(o) = slot {
                    o.insert(inner.clone(), v.clone());
                } else {
                    *slot = json!({ inner.as_str(): v });
                }
            }
            other => byte_level.push(other.clone()),
        }
    }
    let mut bytes = serde_json::to_vec(&value).unwrap();
    for m in byte_level {
        match m {
            Mutation::Truncate(at) if !bytes.is_empty() => bytes.truncate(at % bytes.len()),
            Mutation::FlipByte(at, b) if !bytes.is_empty() => {
                let n = bytes.len();
                bytes[at % n] ^= b | 1;
            }
            _ => {}
        }
    }
    bytes
}

/// A well-formed document from `docs` with up to four mutations, or (one time in eight) an
/// arbitrary JSON value in its place.
fn mutated_from(docs: Vec<String>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        7 => (prop::sample::select(docs), prop::collection::vec(mutation(), 0..4))
            .prop_map(|(doc, ms)| mutate(&doc, &ms)),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
    .boxed()
}

fn as_text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---- PDU JSON into the engine --------------------------------------------------------------

/// Every PDU stored in `engine`, as a peer would send it.
async fn all_pdus(engine: &Engine) -> Vec<String> {
    let mut out = Vec::new();
    for room in engine.rooms().await.unwrap() {
        for ev in engine
            .timeline(&room, None, hyphae::store::Direction::Forward, usize::MAX)
            .await
            .unwrap()
        {
            out.push(ev.pdu.json.get().to_owned());
        }
    }
    out
}

#[test]
fn fuzz_pdu_json_into_the_engine() {
    let rt = runtime();
    let (engine, room, pdus, before) = rt.block_on(async {
        let store = Arc::new(hyphae::store::memory::MemoryStore::new());
        let engine = Engine::open(store).await.unwrap();
        common::sample_history(&engine).await;
        let room = engine.rooms().await.unwrap().pop().unwrap();
        let pdus = all_pdus(&engine).await;
        let before = common::picture(&engine, &room).await;
        (engine, room, pdus, before)
    });
    fuzz("pdu_json", mutated_from(pdus), |raw| {
        within(&rt, async {
            // Both ways in: the standalone check (invites) and ingest (pushes, joins, catch-up).
            let _ = verify_standalone(&raw, &RoomVersionId::V12);
            let _ = engine.receive_batch_in(&Scope::any(), &[&raw]).await;
            let _ = engine
                .receive_batch_in(&Scope::room(&room), &[&raw, &raw])
                .await;
        });
        Ok(())
    });
    // Nothing a mutated PDU carries can be a new valid event: the room is as it was.
    let after = rt.block_on(common::picture(&engine, &room));
    assert_eq!(after, before, "a mutated PDU changed the room");
}

// ---- CBOR framing of requests and answers --------------------------------------------------

fn event_id() -> impl Strategy<Value = OwnedEventId> {
    "[A-Za-z0-9_-]{43}".prop_map(|s| format!("${s}").try_into().unwrap())
}

fn room_id() -> impl Strategy<Value = OwnedRoomId> {
    "[A-Za-z0-9]{1,20}".prop_map(|s| format!("!{s}:example.org").try_into().unwrap())
}

fn user_id() -> impl Strategy<Value = ruma::OwnedUserId> {
    "[a-z0-9]{1,12}".prop_map(|s| format!("@{s}:example.org").try_into().unwrap())
}

/// Requests of every kind with arbitrary contents (well-typed ids, arbitrary strings).
fn any_request() -> impl Strategy<Value = FedRequest> {
    let ids = || prop::collection::vec(event_id(), 0..4);
    let text = || nasty_string();
    prop_oneof![
        event_id().prop_map(|event_id| FedRequest::GetEvent { event_id }),
        (room_id(), ids(), ids(), any::<u32>()).prop_map(|(room_id, earliest, latest, limit)| {
            FedRequest::GetMissingEvents {
                room_id,
                earliest,
                latest,
                limit,
            }
        }),
        room_id().prop_map(|room_id| FedRequest::Extremities { room_id }),
        (room_id(), user_id())
            .prop_map(|(room_id, user_id)| FedRequest::MakeJoin { room_id, user_id }),
        text().prop_map(|pdu| FedRequest::SendJoin { pdu }),
        (room_id(), user_id())
            .prop_map(|(room_id, user_id)| FedRequest::MakeKnock { room_id, user_id }),
        text().prop_map(|pdu| FedRequest::SendKnock { pdu }),
        (text(), prop::collection::vec(text(), 0..3)).prop_map(|(pdu, room_state)| {
            FedRequest::Invite {
                room_version: RoomVersionId::V12,
                pdu,
                room_state,
            }
        }),
        (room_id(), prop::collection::vec(text(), 0..3))
            .prop_map(|(room_id, pdus)| FedRequest::Push { room_id, pdus }),
        text().prop_map(|edu| FedRequest::Edu { edu }),
    ]
}

fn any_response() -> impl Strategy<Value = FedResponse> {
    prop_oneof![
        nasty_string().prop_map(|pdu| FedResponse::Event { pdu }),
        (
            prop::collection::vec(nasty_string(), 0..3),
            prop::collection::vec(event_id(), 0..3)
        )
            .prop_map(|(pdus, event_ids)| FedResponse::Events { pdus, event_ids }),
        prop::collection::vec(event_id(), 0..4)
            .prop_map(|event_ids| FedResponse::Extremities { event_ids }),
        Just(FedResponse::Ok),
        nasty_string()
            .prop_map(|m| FedResponse::error(hyphae::net::protocol::FedErrorCode::BadRequest, m)),
    ]
}

/// What goes on the wire: a well-formed message (request or answer), then up to four byte
/// changes, or arbitrary bytes.
#[derive(Debug)]
enum Wire {
    Request(FedRequest, Vec<(usize, u8)>),
    Response(FedResponse, Vec<(usize, u8)>),
    Bytes(Vec<u8>),
}

fn wire() -> impl Strategy<Value = Wire> {
    let flips = || prop::collection::vec((any::<usize>(), any::<u8>()), 0..4);
    prop_oneof![
        (any_request(), flips()).prop_map(|(r, f)| Wire::Request(r, f)),
        (any_response(), flips()).prop_map(|(r, f)| Wire::Response(r, f)),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Wire::Bytes),
    ]
}

#[test]
fn fuzz_cbor_requests_and_answers() {
    let protocol = StreamProtocol::new(FED_PROTOCOL);
    fuzz("fed_cbor", wire(), |w| {
        futures::executor::block_on(async {
            let mut codec = fed_codec();
            let (mut bytes, flips) = match w {
                Wire::Request(r, flips) => {
                    let mut out = Vec::new();
                    codec
                        .write_request(&protocol, &mut out, r.clone())
                        .await
                        .unwrap();
                    // Untouched, what is written reads back as itself.
                    let back = codec
                        .read_request(&protocol, &mut futures::io::Cursor::new(&out))
                        .await
                        .unwrap();
                    prop_assert_eq!(&back, &r);
                    (out, flips)
                }
                Wire::Response(r, flips) => {
                    let mut out = Vec::new();
                    codec
                        .write_response(&protocol, &mut out, r.clone())
                        .await
                        .unwrap();
                    let back = codec
                        .read_response(&protocol, &mut futures::io::Cursor::new(&out))
                        .await
                        .unwrap();
                    prop_assert_eq!(&back, &r);
                    (out, flips)
                }
                Wire::Bytes(b) => (b, Vec::new()),
            };
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let n = bytes.len();
                    bytes[at % n] ^= b | 1;
                }
            }
            // Changed or arbitrary bytes: an error or some message, never a panic.
            let _ = codec
                .read_request(&protocol, &mut futures::io::Cursor::new(&bytes))
                .await;
            let _ = codec
                .read_response(&protocol, &mut futures::io::Cursor::new(&bytes))
                .await;
            Ok(())
        })
    });
}

// ---- EDU JSON ------------------------------------------------------------------------------

#[test]
fn fuzz_edu_json() {
    let identity = hyphae::identity::Identity::generate();
    let user: ruma::OwnedUserId = format!("@m:{}", identity.server_name()).try_into().unwrap();
    let room: OwnedRoomId = "!r:example.org".try_into().unwrap();
    let signed: Vec<String> = [
        Edu::Typing {
            room_id: room.clone(),
            user_id: user.clone(),
            typing: true,
        },
        Edu::Receipt {
            room_id: room,
            user_id: user,
            event_id: "$e".try_into().unwrap(),
        },
    ]
    .iter()
    .map(|e| String::from_utf8(e.sign(&identity)).unwrap())
    .collect();
    fuzz("edu_json", mutated_from(signed), |raw| {
        if let Ok((edu, _)) = Edu::verify(&raw) {
            // Only what the key signed survives: the same EDU signed again verifies to it.
            prop_assert_eq!(Edu::verify(&edu.sign(&identity)).unwrap().0, edu);
        }
        Ok(())
    });
}

// ---- Every request a member server can make, against a live node ---------------------------

/// A node with alice's public room, which Mallory (the fuzzer's server) has joined, and what
/// the fuzzer draws ids and documents from.
struct MemberFixture {
    a: P2pNode,
    room: OwnedRoomId,
    mallory: Mallory,
    m: Outsider,
    pdus: Vec<String>,
    event_ids: Vec<OwnedEventId>,
}

async fn member_fixture() -> MemberFixture {
    let a = node(&[]).await;
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        ..Default::default()
    };
    let room = a.create_room("alice", &opts).await.unwrap();
    for i in 0..5 {
        a.send(
            &room,
            "alice",
            "m.room.message",
            None,
            json!({"msgtype": "m.text", "body": format!("hello {i}")}),
        )
        .await
        .unwrap();
    }
    let mallory = Mallory::new().await;
    let m = Outsider::dial_as(
        mallory.identity.libp2p_keypair().clone(),
        a.listen_addrs().await[0].clone(),
        a.peer_id(),
        Vec::new(),
        Arc::new(|_| FedResponse::error(hyphae::net::protocol::FedErrorCode::NotFound, "no")),
    )
    .await;
    let auth = mallory.join(&m, &room).await;
    let mut pdus = all_pdus(a.engine()).await;
    pdus.push(mallory.dangling(&room, &auth, 0, 10));
    let event_ids = a
        .engine()
        .timeline(&room, None, hyphae::store::Direction::Forward, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.pdu.event_id.clone())
        .collect();
    MemberFixture {
        a,
        room,
        mallory,
        m,
        pdus,
        event_ids,
    }
}

/// A member's request with contents drawn from the room (real ids and PDUs, mutated) and from
/// nowhere (arbitrary ids and strings).
fn member_request(f: &MemberFixture) -> impl Strategy<Value = FedRequest> {
    let room = f.room.clone();
    let rooms = prop_oneof![3 => Just(room), 1 => room_id()];
    let ids = {
        let real = prop::sample::select(f.event_ids.clone());
        move || prop::collection::vec(prop_oneof![3 => real.clone(), 1 => event_id()], 0..4)
    };
    let users = prop_oneof![
        Just(f.mallory.user.clone()),
        Just(format!("@alice:{}", f.a.server_name()).try_into().unwrap()),
        user_id(),
    ];
    let pdus = mutated_from(f.pdus.clone()).prop_map(as_text).boxed();
    let edus = {
        let typing = Edu::Typing {
            room_id: f.room.clone(),
            user_id: f.mallory.user.clone(),
            typing: true,
        };
        let receipt = Edu::Receipt {
            room_id: f.room.clone(),
            user_id: f.mallory.user.clone(),
            event_id: f.event_ids[0].clone(),
        };
        let signed = [typing, receipt]
            .iter()
            .map(|e| String::from_utf8(e.sign(&f.mallory.identity)).unwrap())
            .collect();
        mutated_from(signed).prop_map(as_text)
    };
    let stripped = prop::collection::vec(
        json_value().prop_map(|v| v.to_string()),
        0..hyphae::net::protocol::MAX_INVITE_STATE + 2,
    );
    let versions = prop::sample::select(vec![
        RoomVersionId::V12,
        RoomVersionId::V10,
        RoomVersionId::V1,
    ]);
    prop_oneof![
        prop::sample::select(f.event_ids.clone())
            .prop_map(|event_id| FedRequest::GetEvent { event_id }),
        (rooms.clone(), ids(), ids(), any::<u32>()).prop_map(
            |(room_id, earliest, latest, limit)| {
                FedRequest::GetMissingEvents {
                    room_id,
                    earliest,
                    latest,
                    limit,
                }
            }
        ),
        rooms
            .clone()
            .prop_map(|room_id| FedRequest::Extremities { room_id }),
        (rooms.clone(), users.clone())
            .prop_map(|(room_id, user_id)| FedRequest::MakeJoin { room_id, user_id }),
        pdus.clone().prop_map(|pdu| FedRequest::SendJoin { pdu }),
        (rooms.clone(), users)
            .prop_map(|(room_id, user_id)| FedRequest::MakeKnock { room_id, user_id }),
        pdus.clone().prop_map(|pdu| FedRequest::SendKnock { pdu }),
        (versions, pdus.clone(), stripped).prop_map(|(room_version, pdu, room_state)| {
            FedRequest::Invite {
                room_version,
                pdu,
                room_state,
            }
        }),
        (rooms, prop::collection::vec(pdus, 0..4))
            .prop_map(|(room_id, pdus)| FedRequest::Push { room_id, pdus }),
        edus.prop_map(|edu| FedRequest::Edu { edu }),
    ]
}

#[test]
fn fuzz_member_requests_at_a_live_node() {
    let rt = runtime();
    let f = rt.block_on(member_fixture());
    let before = rt.block_on(common::picture(f.a.engine(), &f.room));
    let rooms_before = rt.block_on(common::room_ids(f.a.engine()));
    fuzz("fed_requests", member_request(&f), |request| {
        within(&rt, async {
            // Over its request rate the node answers `busy`: ask again, as a peer would.
            loop {
                match f.m.ask(request.clone()).await {
                    Ok(FedResponse::Error { message, .. })
                        if message == "busy" || message == "too many requests" =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Ok(_) => break,
                    Err(e) => panic!("no answer: {e}"),
                }
            }
        });
        Ok(())
    });
    rt.block_on(async {
        // Nothing the fuzzer sent is in the room, and no room was adopted.
        let after = common::picture(f.a.engine(), &f.room).await;
        assert_eq!(
            after.state, before.state,
            "a fuzzed request changed the room's state"
        );
        assert_eq!(common::room_ids(f.a.engine()).await, rooms_before);
        assert!(f.a.invites().len() <= hyphae::rooms::invites::MAX_INVITES_PER_SERVER);
        // And the node still serves its own user.
        f.a.send(
            &f.room,
            "alice",
            "m.room.message",
            None,
            json!({"msgtype": "m.text", "body": "still here"}),
        )
        .await
        .unwrap();
        assert!(f.a.wait_for_peers(1, PATIENCE).await);
    });
}

// ---- The client router ---------------------------------------------------------------------

/// Path segments a client (or an attacker) would put in a URL.
fn segment(room: String, user: String) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(&[
            "rooms", "send", "state", "m.room.message", "m.room.member", "m.room.name",
            "m.room.power_levels", "sync", "createRoom", "join", "leave", "invite", "kick", "ban",
            "unban", "forget", "redact", "profile", "displayname", "avatar_url", "user",
            "filter", "account_data", "keys", "upload", "query", "claim", "changes",
            "sendToDevice", "devices", "pushrules", "global", "register", "available", "login",
            "directory", "room", "list", "messages", "context", "members", "joined_members",
            "typing", "receipt", "m.read", "read_markers", "relations", "m.annotation",
            "publicRooms", "capabilities", "whoami", "joined_rooms", "tags", "event",
            "aliases", "presence", "status", "voip", "turnServer", "thirdparty", "protocols",
            "1", "0", "", "..", "%00", "%ZZ", "txn1",
        ][..])
        .prop_map(str::to_owned),
        2 => Just(room.clone()),
        1 => Just(percent_encode(&room)),
        1 => Just(user),
        1 => nasty_string().prop_map(|s| percent_encode(&s)),
    ]
}

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[derive(Debug)]
struct ClientCall {
    method: &'static str,
    path: String,
    token: Option<usize>,
    body: Vec<u8>,
}

/// The routes clients call, `{}` standing for a segment the fuzzer fills.
const ROUTES: &[&str] = &[
    "sync",
    "createRoom",
    "join/{}",
    "joined_rooms",
    "publicRooms",
    "capabilities",
    "account/whoami",
    "account/password",
    "register",
    "register/available",
    "login",
    "rooms/{}/send/{}/{}",
    "rooms/{}/state/{}/{}",
    "rooms/{}/state/{}",
    "rooms/{}/state",
    "rooms/{}/messages",
    "rooms/{}/members",
    "rooms/{}/joined_members",
    "rooms/{}/join",
    "rooms/{}/leave",
    "rooms/{}/forget",
    "rooms/{}/invite",
    "rooms/{}/kick",
    "rooms/{}/ban",
    "rooms/{}/unban",
    "rooms/{}/event/{}",
    "rooms/{}/context/{}",
    "rooms/{}/redact/{}/{}",
    "rooms/{}/receipt/{}/{}",
    "rooms/{}/read_markers",
    "rooms/{}/typing/{}",
    "rooms/{}/relations/{}",
    "rooms/{}/relations/{}/{}",
    "rooms/{}/aliases",
    "profile/{}",
    "profile/{}/displayname",
    "profile/{}/avatar_url",
    "user/{}/filter",
    "user/{}/filter/{}",
    "user/{}/account_data/{}",
    "user/{}/rooms/{}/account_data/{}",
    "user/{}/rooms/{}/tags",
    "user/{}/rooms/{}/tags/{}",
    "keys/upload",
    "keys/query",
    "keys/claim",
    "keys/changes",
    "sendToDevice/{}/{}",
    "devices",
    "devices/{}",
    "delete_devices",
    "pushrules/",
    "pushrules/global/{}/{}",
    "directory/room/{}",
    "directory/list/room/{}",
    "presence/{}/status",
    "voip/turnServer",
    "user_directory/search",
    "media/download/{}/{}",
    "media/download/{}/{}/{}",
    "media/thumbnail/{}/{}",
    "media/config",
    "media/preview_url",
    "upload",
    "upload/{}/{}",
    "create",
];

fn client_call(room: String, user: String) -> impl Strategy<Value = ClientCall> {
    let method = prop::sample::select(&["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"][..]);
    let prefix = prop::sample::select(
        &[
            "/_matrix/client/v3/",
            "/_matrix/client/r0/",
            "/_matrix/client/v1/",
            "/_matrix/client/unstable/",
            "/_matrix/media/v3/",
            "/_matrix/client/",
            "/",
        ][..],
    );
    let segments = prop::collection::vec(segment(room, user), 7);
    let routed = (prop::sample::select(ROUTES), segments).prop_map(|(route, segs)| {
        let mut out = String::new();
        let mut fill = segs.into_iter();
        for (i, part) in route.split("{}").enumerate() {
            if i > 0 {
                out.push_str(&fill.next().unwrap_or_default());
            }
            out.push_str(part);
        }
        out
    });
    let wild = prop::collection::vec(segment(String::new(), String::new()), 1..7)
        .prop_map(|segs| segs.join("/"));
    let query = prop::collection::vec((json_key(), nasty_string()), 1..4).prop_map(|kv| {
        kv.iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    });
    let path = (
        prefix,
        prop_oneof![3 => routed, 1 => wild],
        prop::option::of(query),
    )
        .prop_map(|(prefix, rest, query)| match query {
            Some(q) => format!("{prefix}{rest}?{q}"),
            None => format!("{prefix}{rest}"),
        });
    let body = prop_oneof![
        4 => prop::collection::vec((json_key(), json_value()), 0..6)
            .prop_map(|kv| serde_json::to_vec(&Value::Object(kv.into_iter().collect())).unwrap()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => Just(Vec::new()),
    ];
    (method, path, prop::option::of(0..3usize), body).prop_map(|(method, path, token, body)| {
        ClientCall {
            method,
            path,
            token,
            body,
        }
    })
}

async fn register(api: &ClientApi, name: &str) -> String {
    let call = |body: Value| {
        http::Request::builder()
            .method("POST")
            .uri("/_matrix/client/v3/register")
            .body(body.to_string().into_bytes())
            .unwrap()
    };
    let first = api
        .handle(
            call(json!({"username": name, "password": "pw-fuzz-1"})),
            Caller { local: true },
        )
        .await;
    let session = serde_json::from_slice::<Value>(first.body()).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = api
        .handle(
            call(json!({"username": name, "password": "pw-fuzz-1",
                        "auth": {"type": "m.login.dummy", "session": session}})),
            Caller { local: true },
        )
        .await;
    serde_json::from_slice::<Value>(done.body()).unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn fuzz_the_client_router() {
    let rt = runtime();
    let (api, tokens, alice, room) = rt.block_on(async {
        let a = node(&[]).await;
        let api = ClientApi::start(
            a,
            Registration::Loopback {
                web_origins: vec![],
            },
        )
        .await
        .unwrap();
        let fuzzer = register(&api, "fuzzer").await;
        let other = register(&api, "other").await;
        let alice = register(&api, "alice").await;
        let create = http::Request::builder()
            .method("POST")
            .uri("/_matrix/client/v3/createRoom")
            .header("Authorization", format!("Bearer {fuzzer}"))
            .body(br#"{"preset":"public_chat","name":"fuzzed"}"#.to_vec())
            .unwrap();
        let created = api.handle(create, Caller { local: true }).await;
        let room = serde_json::from_slice::<Value>(created.body()).unwrap()["room_id"]
            .as_str()
            .unwrap()
            .to_owned();
        (
            api,
            vec![fuzzer, other, "syt_not_a_token".to_owned()],
            alice,
            room,
        )
    });
    let user = "@fuzzer:x".to_owned();
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    fuzz("client_router", client_call(room, user), |call| {
        let mut req = http::Request::builder()
            .method(call.method)
            .uri(call.path.as_str());
        if let Some(t) = call.token {
            req = req.header("Authorization", format!("Bearer {}", tokens[t]));
        }
        let Ok(req) = req.body(call.body) else {
            // Not a URI `http` accepts: no server would be handed it.
            return Ok(());
        };
        let resp = within(&rt, api.handle(req, Caller { local: true }));
        let status = resp.status().as_u16();
        *statuses.lock().unwrap().entry(status).or_default() += 1;
        // Bad input is the client's error, told as a Matrix error, never a server failure.
        prop_assert!(
            status != 500,
            "{status}: {}",
            String::from_utf8_lossy(resp.body())
        );
        if status >= 400 {
            let v: Value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
            // A user-interactive auth challenge is a 401 that lists flows instead.
            let challenge = status == 401 && v["flows"].is_array();
            prop_assert!(
                v["errcode"].is_string() || challenge,
                "{status} without an errcode: {v}"
            );
        }
        Ok(())
    });
    // How deep the inputs went: a run answered only 404 would have fuzzed the router alone.
    println!("FUZZ client_router statuses {:?}", statuses.lock().unwrap());
    // Another user's session was never touched.
    let whoami = http::Request::builder()
        .uri("/_matrix/client/v3/account/whoami")
        .header("Authorization", format!("Bearer {alice}"))
        .body(Vec::new())
        .unwrap();
    let resp = rt.block_on(api.handle(whoami, Caller { local: true }));
    assert_eq!(resp.status(), 200);
}
