//! The Matrix client scenario, written once against any way of reaching the Client-Server API:
//! the router in-process (native tests) or the tab's `fetch` export (browser tests).
#![allow(async_fn_in_trait, dead_code)]

use std::collections::HashSet;

use serde_json::{json, Value};

/// Sends one Client-Server API request; returns the status and the JSON body.
pub trait Transport {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value);
}

pub struct Client<'a, T: Transport> {
    pub t: &'a T,
    pub token: String,
    pub user_id: String,
    pub since: Option<String>,
    /// A sync filter (JSON) for [`Client::sync_until`].
    pub filter: Option<String>,
}

pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Registers `name` through the `m.login.dummy` flow.
pub async fn register<'a, T: Transport>(t: &'a T, name: &str, password: &str) -> Client<'a, T> {
    let body = json!({"username": name, "password": password});
    let (status, first) = t
        .call(
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 401, "{first}");
    let session = first["session"].as_str().expect("a UIA session").to_owned();
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy", "session": session});
    let (status, done) = t
        .call("POST", "/_matrix/client/v3/register", None, Some(body))
        .await;
    assert_eq!(status, 200, "{done}");
    Client {
        t,
        token: done["access_token"].as_str().unwrap().to_owned(),
        user_id: done["user_id"].as_str().unwrap().to_owned(),
        since: None,
        filter: None,
    }
}

impl<'a, T: Transport> Client<'a, T> {
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.t.call(method, path, Some(&self.token), body).await
    }

    /// A request that must succeed.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v
    }

    /// A request that must fail with `errcode`.
    pub async fn fails(&self, method: &str, path: &str, body: Option<Value>, errcode: &str) {
        let (status, v) = self.call(method, path, body).await;
        assert!(status >= 400, "{method} {path} should fail: {v}");
        assert_eq!(v["errcode"], errcode, "{method} {path}: {v}");
    }

    /// Creates a room with the `/createRoom` body `body`; returns its id.
    pub async fn create_room(&self, body: Value) -> String {
        let v = self
            .ok("POST", "/_matrix/client/v3/createRoom", Some(body))
            .await;
        v["room_id"].as_str().unwrap().to_owned()
    }

    pub async fn send_text(&self, room: &str, txn: &str, body: &str) -> String {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        );
        let v = self
            .ok(
                "PUT",
                &path,
                Some(json!({"msgtype": "m.text", "body": body})),
            )
            .await;
        v["event_id"].as_str().unwrap().to_owned()
    }

    /// Long-polls `/sync` until `found` picks something out of a response (at most ~60 s).
    pub async fn sync_until<R>(
        &mut self,
        what: &str,
        mut found: impl FnMut(&Value) -> Option<R>,
    ) -> R {
        for _ in 0..30 {
            let path = match &self.since {
                Some(s) => format!("/_matrix/client/v3/sync?timeout=2000&since={s}"),
                None => "/_matrix/client/v3/sync".to_owned(),
            };
            let path = match &self.filter {
                Some(f) if path.contains('?') => format!("{path}&filter={}", enc(f)),
                Some(f) => format!("{path}?filter={}", enc(f)),
                None => path,
            };
            let v = self.ok("GET", &path, None).await;
            self.since = Some(v["next_batch"].as_str().unwrap().to_owned());
            if let Some(r) = found(&v) {
                return r;
            }
        }
        panic!("{} never saw {what}", self.user_id);
    }
}

fn timeline<'v>(sync: &'v Value, room: &str) -> Vec<&'v Value> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn has_event(sync: &Value, room: &str, pred: impl Fn(&Value) -> bool) -> bool {
    timeline(sync, room).into_iter().any(pred)
}

/// Two users (on one server or two) go through a room's life: invite, join, chat, rename,
/// edit, react, redact, type, read, page back to the start, leave; then the error cases.
/// `via` is alice's server name when bob is on another server.
pub async fn scenario<T: Transport>(alice_t: &T, bob_t: &T, tag: &str, via: Option<&str>) {
    let mut alice = register(alice_t, &format!("alice{tag}"), "correct horse").await;
    let mut bob = register(bob_t, &format!("bob{tag}"), "battery staple").await;
    let who = alice
        .ok("GET", "/_matrix/client/v3/account/whoami", None)
        .await;
    assert_eq!(who["user_id"], alice.user_id);

    // Create, invite, join.
    let created = alice
        .ok(
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(json!({"preset": "private_chat", "name": "Planning", "topic": "Q3", "invite": [bob.user_id]})),
        )
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let r = room.clone();
    bob.sync_until("the invite", |s| s["rooms"]["invite"].get(&r).map(|_| ()))
        .await;
    let join_path = match via {
        Some(server) => format!("/_matrix/client/v3/join/{}?via={server}", enc(&room)),
        None => format!("/_matrix/client/v3/join/{}", enc(&room)),
    };
    bob.ok("POST", &join_path, Some(json!({}))).await;
    let bob_id = bob.user_id.clone();
    alice
        .sync_until("bob's join", |s| {
            has_event(s, &r, |e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == bob_id
                    && e["content"]["membership"] == "join"
            })
            .then_some(())
        })
        .await;

    // Messages both ways, seen through sync.
    let hello = alice.send_text(&room, "a1", "hello bob").await;
    bob.sync_until("alice's message", |s| {
        has_event(s, &r, |e| e["event_id"] == hello).then_some(())
    })
    .await;
    let reply = bob.send_text(&room, "b1", "hello alice").await;
    alice
        .sync_until("bob's reply", |s| {
            has_event(s, &r, |e| e["event_id"] == reply).then_some(())
        })
        .await;
    // A repeated transaction id returns the same event.
    let again = alice.send_text(&room, "a1", "hello bob").await;
    assert_eq!(again, hello);

    // Name and topic.
    let state = |kind: &str| format!("/_matrix/client/v3/rooms/{}/state/{kind}", enc(&room));
    alice
        .ok(
            "PUT",
            &state("m.room.name"),
            Some(json!({"name": "Planning 2"})),
        )
        .await;
    alice
        .ok("PUT", &state("m.room.topic"), Some(json!({"topic": "Q4"})))
        .await;
    bob.sync_until("the new topic", |s| {
        has_event(s, &r, |e| {
            e["type"] == "m.room.topic" && e["content"]["topic"] == "Q4"
        })
        .then_some(())
    })
    .await;
    assert_eq!(
        bob.ok("GET", &state("m.room.name"), None).await["name"],
        "Planning 2"
    );

    // Edit, reaction, redaction.
    let send = |kind: &str, txn: &str| {
        format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(&room))
    };
    let edit = alice
        .ok(
            "PUT",
            &send("m.room.message", "a2"),
            Some(json!({"msgtype": "m.text", "body": "* hello, bob", "m.new_content": {"msgtype": "m.text", "body": "hello, bob"}, "m.relates_to": {"rel_type": "m.replace", "event_id": hello}})),
        )
        .await["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reaction = bob
        .ok(
            "PUT",
            &send("m.reaction", "b2"),
            Some(json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": hello, "key": "👍"}})),
        )
        .await["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    bob.sync_until("the edit", |s| {
        has_event(s, &r, |e| e["event_id"] == edit).then_some(())
    })
    .await;
    alice
        .sync_until("the reaction", |s| {
            has_event(s, &r, |e| e["event_id"] == reaction).then_some(())
        })
        .await;
    let relations = alice
        .ok(
            "GET",
            &format!(
                "/_matrix/client/v1/rooms/{}/relations/{}/m.annotation",
                enc(&room),
                enc(&hello)
            ),
            None,
        )
        .await;
    assert_eq!(
        relations["chunk"].as_array().unwrap().len(),
        1,
        "{relations}"
    );
    let doomed = alice.send_text(&room, "a3", "oops").await;
    alice
        .ok(
            "PUT",
            &format!(
                "/_matrix/client/v3/rooms/{}/redact/{}/a4",
                enc(&room),
                enc(&doomed)
            ),
            Some(json!({"reason": "typo"})),
        )
        .await;
    bob.sync_until("the redaction", |s| {
        has_event(s, &r, |e| {
            e["type"] == "m.room.redaction" && e["redacts"] == doomed
        })
        .then_some(())
    })
    .await;
    let redacted = bob
        .ok(
            "GET",
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&doomed)
            ),
            None,
        )
        .await;
    assert_eq!(redacted["content"], json!({}), "{redacted}");
    assert!(redacted["unsigned"]["redacted_because"].is_object());

    // Typing and receipts.
    let bob_path = enc(&bob.user_id);
    bob.ok(
        "PUT",
        &format!("/_matrix/client/v3/rooms/{}/typing/{bob_path}", enc(&room)),
        Some(json!({"typing": true, "timeout": 10000})),
    )
    .await;
    let bob_id = bob.user_id.clone();
    alice
        .sync_until("bob typing", |s| {
            s["rooms"]["join"][&r]["ephemeral"]["events"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["type"] == "m.typing"
                        && e["content"]["user_ids"]
                            .as_array()
                            .is_some_and(|u| u.iter().any(|x| *x == bob_id))
                })?;
            Some(())
        })
        .await;
    alice
        .ok(
            "POST",
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&room),
                enc(&reply)
            ),
            Some(json!({})),
        )
        .await;
    let alice_id = alice.user_id.clone();
    let rp = reply.clone();
    bob.sync_until("alice's receipt", |s| {
        s["rooms"]["join"][&r]["ephemeral"]["events"]
            .as_array()?
            .iter()
            .find(|e| {
                e["type"] == "m.receipt" && e["content"][&rp]["m.read"][&alice_id].is_object()
            })?;
        Some(())
    })
    .await;

    // Page back to the create event in small pages, with no gaps or duplicates.
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(
            alice
                .send_text(&room, &format!("bulk{i}"), &format!("message {i}"))
                .await,
        );
    }
    let last = sent.last().unwrap().clone();
    bob.sync_until("the last bulk message", |s| {
        has_event(s, &r, |e| e["event_id"] == last).then_some(())
    })
    .await;
    let mut seen = HashSet::new();
    let mut ordered = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let mut path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
            enc(&room)
        );
        if let Some(f) = &from {
            path.push_str(&format!("&from={f}"));
        }
        let page = bob.ok("GET", &path, None).await;
        for e in page["chunk"].as_array().unwrap() {
            let id = e["event_id"].as_str().unwrap().to_owned();
            assert!(seen.insert(id.clone()), "{id} came twice");
            ordered.push((id, e["type"].as_str().unwrap().to_owned()));
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        ordered.last().unwrap().1,
        "m.room.create",
        "paging ends at the create event"
    );
    for id in &sent {
        assert!(seen.contains(id), "{id} missing from history");
    }

    // Leave; sending afterwards is refused.
    bob.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(json!({})),
    )
    .await;
    let bob_id = bob.user_id.clone();
    alice
        .sync_until("bob's leave", |s| {
            has_event(s, &r, |e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == bob_id
                    && e["content"]["membership"] == "leave"
            })
            .then_some(())
        })
        .await;
    bob.fails(
        "PUT",
        &send("m.room.message", "b3"),
        Some(json!({"msgtype": "m.text", "body": "still here?"})),
        "M_FORBIDDEN",
    )
    .await;

    // Error cases.
    let (status, v) = alice_t
        .call("POST", "/_matrix/client/v3/login", None, Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": format!("alice{tag}")}, "password": "wrong"})))
        .await;
    assert_eq!((status, v["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, v) = alice_t
        .call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some("nope"),
            None,
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
    let (status, v) = alice_t
        .call(
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(json!({"username": format!("alice{tag}"), "password": "x"})),
        )
        .await;
    assert_eq!(
        (status, v["errcode"].as_str()),
        (400, Some("M_USER_IN_USE"))
    );
    let carol = register(alice_t, &format!("carol{tag}"), "pw").await;
    carol
        .fails(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(json!({})),
            "M_FORBIDDEN",
        )
        .await;
    // Logging in again works and the new device syncs.
    let (status, v) = alice_t
        .call("POST", "/_matrix/client/v3/login", None, Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": format!("alice{tag}")}, "password": "correct horse"})))
        .await;
    assert_eq!(status, 200, "{v}");
    let joined = alice_t
        .call(
            "GET",
            "/_matrix/client/v3/joined_rooms",
            v["access_token"].as_str(),
            None,
        )
        .await;
    assert_eq!(joined.1["joined_rooms"], json!([room]));
}
