//! A `hyphae-node` killed with SIGKILL in the middle of group commits: every send it
//! acknowledged is there after the restart, and clients that retry with the same transaction ids
//! (as matrix-js-sdk and matrix-rust-sdk do) make no duplicates.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::client::{enc, register};
use common::node_process::{try_call_at, NodeProcess};
use serde_json::json;

const SENDERS: usize = 10;
/// Acknowledged sends before the kill: enough that several group commits are in flight.
const ACKED_BEFORE_KILL: usize = 150;

/// What one sender tried: per transaction id, the body and the event id it was answered with
/// (`None`: no answer came, the node died first).
type Attempts = Vec<(String, String, Option<String>)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_group_commit_loses_no_acknowledged_send_and_retries_make_no_duplicates() {
    let bin = env!("CARGO_BIN_EXE_hyphae-node");
    let data = tempfile::tempdir().unwrap();
    let mut hs = NodeProcess::start_in(bin, data.path());
    let (room, tokens) = {
        let node = &hs;
        let alice = register(node, "alice", "pw").await;
        let room = alice.create_room(json!({"preset": "public_chat"})).await;
        let mut tokens = Vec::new();
        for i in 0..SENDERS {
            let me = register(node, &format!("sender{i}"), "pw").await;
            me.ok(
                "POST",
                &format!("/_matrix/client/v3/join/{}", enc(&room)),
                Some(json!({})),
            )
            .await;
            tokens.push(me.token);
        }
        (room, tokens)
    };

    // Ten senders, each one send after another, until the node stops answering.
    let acked = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    let dead = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let (host, room, token) = (hs.http.clone(), room.clone(), token.clone());
        let (acked, enough, dead) = (acked.clone(), enough.clone(), dead.clone());
        senders.push(tokio::spawn(async move {
            let mut attempts: Attempts = Vec::new();
            for j in 0.. {
                if dead.load(Ordering::SeqCst) {
                    break;
                }
                let (txn, body) = (format!("t{j}"), format!("{i}/{j}"));
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                    enc(&room)
                );
                let answer = try_call_at(
                    host.clone(),
                    "PUT",
                    &path,
                    Some(&token),
                    Some(json!({"msgtype": "m.text", "body": body})),
                )
                .await;
                match answer {
                    Ok((200, v)) => {
                        let id = v["event_id"].as_str().unwrap().to_owned();
                        attempts.push((txn, body, Some(id)));
                        if acked.fetch_add(1, Ordering::SeqCst) + 1 == ACKED_BEFORE_KILL {
                            enough.notify_one();
                        }
                    }
                    // The node went away under this request: its fate is unknown.
                    Ok((status, v)) if status >= 500 => {
                        attempts.push((txn, body, None));
                        assert!(
                            dead.load(Ordering::SeqCst),
                            "a failed send while alive: {v}"
                        );
                        break;
                    }
                    Ok((status, v)) => panic!("send answered {status}: {v}"),
                    Err(e) => {
                        assert!(
                            dead.load(Ordering::SeqCst),
                            "the node failed while alive: {e}"
                        );
                        attempts.push((txn, body, None));
                        break;
                    }
                }
            }
            attempts
        }));
    }
    // A bound for a node that stops answering early (the assertions above then say why).
    tokio::time::timeout(std::time::Duration::from_secs(300), enough.notified())
        .await
        .expect("150 sends acknowledged before the kill");
    // Killed while the senders keep going: some of their sends are in commits under way.
    dead.store(true, Ordering::SeqCst);
    hs.kill_9();
    let mut attempts: Vec<Attempts> = Vec::new();
    for s in senders {
        attempts.push(s.await.unwrap());
    }
    let acknowledged: usize = attempts
        .iter()
        .flatten()
        .filter(|(_, _, id)| id.is_some())
        .count();
    assert!(acknowledged >= ACKED_BEFORE_KILL);

    // Restart on the same data, and retry everything each sender tried, with the same ids.
    let node = NodeProcess::start_in(bin, data.path());
    for (token, tried) in tokens.iter().zip(&attempts) {
        for (txn, body, acked_id) in tried {
            let path = format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                enc(&room)
            );
            let (status, v) = node
                .try_call(
                    "PUT",
                    &path,
                    Some(token),
                    Some(json!({"msgtype": "m.text", "body": body})),
                )
                .await
                .unwrap();
            assert_eq!(status, 200, "retry of {txn}: {v}");
            if let Some(id) = acked_id {
                assert_eq!(
                    v["event_id"].as_str(),
                    Some(id.as_str()),
                    "a retry of an acknowledged send ({body}) made another event"
                );
            }
        }
    }

    // The room holds each body exactly once, and every acknowledged event.
    let (status, page) = node
        .try_call(
            "GET",
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000",
                enc(&room)
            ),
            Some(&tokens[0]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{page}");
    let mut bodies: HashMap<String, Vec<String>> = HashMap::new();
    for ev in page["chunk"].as_array().unwrap() {
        if ev["type"] == "m.room.message" {
            bodies
                .entry(ev["content"]["body"].as_str().unwrap().to_owned())
                .or_default()
                .push(ev["event_id"].as_str().unwrap().to_owned());
        }
    }
    for tried in &attempts {
        for (txn, body, acked_id) in tried {
            let ids = bodies.get(body).map(Vec::as_slice).unwrap_or_default();
            assert_eq!(
                ids.len(),
                1,
                "{body} ({txn}) is in the room {} times",
                ids.len()
            );
            if let Some(id) = acked_id {
                assert_eq!(
                    &ids[0], id,
                    "{body}: the acknowledged event is not the one kept"
                );
            }
        }
    }
    let tried: usize = attempts.iter().map(Vec::len).sum();
    assert_eq!(bodies.len(), tried, "the room holds messages nobody sent");
}
