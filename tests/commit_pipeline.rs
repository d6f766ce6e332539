//! Commits that do not block readers: while a batch is being written, readers answer at once
//! with what was durable before it (never with the batch), the next batch forms meanwhile, and
//! a write that fails takes nothing visible with it.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ts, Peer};
use hyphae::engine::create_room::CreateRoom;
use hyphae::engine::Engine;
use hyphae::store::memory::MemoryStore;
use hyphae::store::{
    Direction, Entry, KeyRange, Snapshot, Store, StoreError, StoreResult, Table, WriteBatch,
};
use serde_json::json;
use tokio::sync::oneshot;

/// A store whose next write, once armed, waits to be let through (telling that it started),
/// and fails instead if armed to.
struct HeldWrites {
    inner: Arc<MemoryStore>,
    hold: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    fail_next: AtomicBool,
}

impl HeldWrites {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(MemoryStore::new()),
            hold: Mutex::new(None),
            fail_next: AtomicBool::new(false),
        })
    }

    /// Holds the next write: returns (it started, let it through).
    fn hold_next(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (started_tx, started) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        *self.hold.lock().unwrap() = Some((started_tx, release_rx));
        (started, release)
    }
}

#[async_trait::async_trait]
impl Store for HeldWrites {
    async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.inner.get(table, key).await
    }
    async fn scan(
        &self,
        table: Table,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> StoreResult<Vec<Entry>> {
        self.inner.scan(table, range, direction, limit).await
    }
    async fn write(&self, batch: WriteBatch) -> StoreResult<()> {
        let held = self.hold.lock().unwrap().take();
        if let Some((started, release)) = held {
            let _ = started.send(());
            let _ = release.await;
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Backend("disk full".into()));
        }
        self.inner.write(batch).await
    }
    async fn snapshot(&self) -> StoreResult<Snapshot> {
        self.inner.snapshot().await
    }
}

const QUICK: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_answer_during_a_commit_with_what_was_durable() {
    let store = HeldWrites::new();
    let engine = Arc::new(Engine::open(store.clone()).await.unwrap());
    let alice = Arc::new(Peer::new(1, "alice"));
    let (room, _) = engine
        .create_room(&alice.identity, &alice.user, &CreateRoom::default(), ts(1))
        .await
        .unwrap();
    let position = engine.stream_position().await;
    let state = engine.current_state(&room).await.unwrap().unwrap();

    let (started, release) = store.hold_next();
    let sending = {
        let (engine, alice, room) = (engine.clone(), alice.clone(), room.clone());
        tokio::spawn(async move {
            engine
                .send(
                    &alice.identity,
                    &room,
                    &alice.user,
                    "m.room.topic",
                    Some(""),
                    json!({"topic": "held"}),
                    ts(2),
                )
                .await
        })
    };
    started.await.unwrap();
    // The write is on the disk's side now: readers are not kept waiting, and see none of it.
    let during = tokio::time::timeout(QUICK, engine.stream_position())
        .await
        .expect("the stream position is answered during a commit");
    assert_eq!(
        during, position,
        "nothing of the batch is visible before it is durable"
    );
    let state_during = tokio::time::timeout(QUICK, engine.current_state(&room))
        .await
        .expect("the room's state is answered during a commit")
        .unwrap()
        .unwrap();
    assert_eq!(state_during, state);
    // The next batch forms meanwhile, and is written after the first.
    let second = {
        let (engine, alice, room) = (engine.clone(), alice.clone(), room.clone());
        tokio::spawn(async move {
            engine
                .send(
                    &alice.identity,
                    &room,
                    &alice.user,
                    "m.room.message",
                    None,
                    json!({"msgtype": "m.text", "body": "after"}),
                    ts(3),
                )
                .await
        })
    };
    release.send(()).unwrap();
    let topic = sending.await.unwrap().unwrap();
    let message = second.await.unwrap().unwrap();
    let after = engine.current_state(&room).await.unwrap().unwrap();
    assert_eq!(
        after.get(&("m.room.topic".to_owned(), String::new())),
        Some(&topic.event_id)
    );
    let newest = engine
        .timeline(&room, None, Direction::Backward, 2)
        .await
        .unwrap();
    let ids: Vec<_> = newest.iter().map(|e| e.pdu.event_id.clone()).collect();
    assert_eq!(ids, [message.event_id, topic.event_id], "written in order");
    assert_eq!(engine.stream_position().await, position + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_takes_nothing_visible_with_it() {
    let store = HeldWrites::new();
    let engine = Engine::open(store.clone()).await.unwrap();
    let alice = Peer::new(1, "alice");
    let (room, _) = engine
        .create_room(&alice.identity, &alice.user, &CreateRoom::default(), ts(1))
        .await
        .unwrap();
    let position = engine.stream_position().await;
    let state = engine.current_state(&room).await.unwrap().unwrap();
    store.fail_next.store(true, Ordering::SeqCst);
    let send = |body: &'static str, at: u64| {
        engine.send(
            &alice.identity,
            &room,
            &alice.user,
            "m.room.message",
            None,
            json!({"msgtype": "m.text", "body": body}),
            ts(at),
        )
    };
    assert!(send("lost", 2).await.is_err());
    assert_eq!(engine.stream_position().await, position);
    assert_eq!(engine.current_state(&room).await.unwrap().unwrap(), state);
    let kept = send("kept", 3).await.unwrap();
    let fresh = Engine::open(store.inner.clone()).await.unwrap();
    let stored = fresh.event(&kept.event_id).await.unwrap().unwrap();
    for prev in &stored.pdu.prev_events {
        assert!(
            fresh.event(prev).await.unwrap().is_some(),
            "the next event builds on {prev}, which was never stored"
        );
    }
    assert_eq!(
        engine.room(&room).await.unwrap(),
        fresh.room(&room).await.unwrap()
    );
}

/// A client that hangs up while its send is being written, then retries with the same
/// transaction id: the retry waits for the first send and answers with its event; the room
/// gets the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_hung_up_send_is_written_makes_no_second_event() {
    use common::client::{enc, register, Transport};
    let store = HeldWrites::new();
    let (_node, api) = common::in_process::peer_on(store.clone(), None).await;
    let api = Arc::new(api);
    let alice = register(api.as_ref(), "alice", "pw").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    let token = alice.token.clone();
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
        enc(&room)
    );
    let body = json!({"msgtype": "m.text", "body": "once"});

    let (started, release) = store.hold_next();
    let first = {
        let (api, path, token, body) = (api.clone(), path.clone(), token.clone(), body.clone());
        tokio::spawn(async move { api.call("PUT", &path, Some(&token), Some(body)).await })
    };
    started.await.expect("the send's write started");
    // The client hangs up while its event is on the way to the disk.
    first.abort();
    let _ = first.await;
    let retry = {
        let (api, path, token, body) = (api.clone(), path.clone(), token.clone(), body.clone());
        tokio::spawn(async move { api.call("PUT", &path, Some(&token), Some(body)).await })
    };
    release.send(()).unwrap();
    let (status, answer) = retry.await.unwrap();
    assert_eq!(status, 200, "{answer}");

    let page = alice
        .ok(
            "GET",
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
                enc(&room)
            ),
            None,
        )
        .await;
    let ids: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["body"] == "once")
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "the message is in the room {} times",
        ids.len()
    );
    assert_eq!(answer["event_id"].as_str(), Some(ids[0]));
}
