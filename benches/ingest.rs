//! Validated ingest (signature check + auth + durable commit) and state resolution benchmarks.
//! Run: `cargo bench --bench ingest` (prints figures; see docs/benchmarks.md).

#[cfg(not(target_arch = "wasm32"))]
#[path = "../tests/common/mod.rs"]
mod common;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Instant;

    use super::common::{self, workload, Peer};
    use hyphae::engine::create_room::{CreateRoom, Preset};
    use hyphae::engine::pdu::{rules_for, StoredEvent};
    use hyphae::engine::state::StateMap;
    use hyphae::engine::Engine;
    use hyphae::store::memory::MemoryStore;
    use hyphae::store::redb::RedbStore;
    use hyphae::store::{
        Direction, Entry, KeyRange, SharedStore, Store, StoreResult, Table, WriteBatch,
    };
    use ruma::OwnedEventId;
    use serde_json::json;

    /// Wraps a store to measure how much of the ingest time is spent committing.
    struct Timed {
        inner: SharedStore,
        write_nanos: std::sync::atomic::AtomicU64,
        read_nanos: std::sync::atomic::AtomicU64,
    }

    #[async_trait::async_trait]
    impl Store for Timed {
        async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
            let start = Instant::now();
            let r = self.inner.get(table, key).await;
            self.read_nanos.fetch_add(
                start.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            r
        }
        async fn get_many(
            &self,
            table: Table,
            keys: &[&[u8]],
        ) -> StoreResult<Vec<Option<Vec<u8>>>> {
            let start = Instant::now();
            let r = self.inner.get_many(table, keys).await;
            self.read_nanos.fetch_add(
                start.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            r
        }
        async fn scan(
            &self,
            table: Table,
            range: KeyRange,
            dir: Direction,
            limit: usize,
        ) -> StoreResult<Vec<Entry>> {
            self.inner.scan(table, range, dir, limit).await
        }
        async fn snapshot(&self) -> StoreResult<hyphae::store::Snapshot> {
            self.inner.snapshot().await
        }
        async fn write(&self, batch: WriteBatch) -> StoreResult<()> {
            let start = Instant::now();
            let r = self.inner.write(batch).await;
            self.write_nanos.fetch_add(
                start.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            r
        }
    }

    async fn run(label: &str, store: SharedStore, events: &[Vec<u8>], batch: usize) {
        let timed = Arc::new(Timed {
            inner: store,
            write_nanos: Default::default(),
            read_nanos: Default::default(),
        });
        let engine = Engine::open(timed.clone()).await.unwrap();
        timed
            .write_nanos
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let accepted = workload::ingest(&engine, events, batch).await;
        let secs = start.elapsed().as_secs_f64();
        let commit = timed.write_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        let reads = timed.read_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        assert_eq!(accepted, events.len(), "{label}: every event accepted");
        println!(
            "{label:<40} {:>6} events {:>7.0} ev/s  ({:.2} s; commits {:.2} s, reads {:.2} s)",
            events.len(),
            events.len() as f64 / secs,
            secs,
            commit,
            reads
        );
    }

    pub async fn ingest() {
        let linear = workload::linear(10_000).await;
        let forks = workload::forks(100, 100).await;
        println!("== validated ingest (signature + hash + auth + state + durable commit)");
        for (name, w) in [("linear", &linear), ("100-way forks", &forks)] {
            run(
                &format!("{name}, memory, 100 per commit"),
                Arc::new(MemoryStore::new()),
                &w.events,
                100,
            )
            .await;
            let dir = tempfile::tempdir().unwrap();
            let redb = Arc::new(RedbStore::open(&dir.path().join("b.redb")).unwrap());
            run(
                &format!("{name}, redb, 100 per commit"),
                redb,
                &w.events,
                100,
            )
            .await;
            let dir = tempfile::tempdir().unwrap();
            let redb = Arc::new(RedbStore::open(&dir.path().join("b.redb")).unwrap());
            run(
                &format!("{name}, redb, 1 per commit"),
                redb,
                &w.events[..2000.min(w.events.len())],
                1,
            )
            .await;
        }
    }

    /// Two conflicting branches in a room with 1,000 members: how long resolution takes.
    pub async fn state_resolution() {
        let engine = Engine::open(Arc::new(MemoryStore::new())).await.unwrap();
        let alice = Peer::new(1, "alice");
        let opts = CreateRoom {
            preset: Preset::PublicChat,
            ..Default::default()
        };
        let (room, ids) = engine
            .create_room(&alice.identity, &alice.user, &opts, common::ts(1))
            .await
            .unwrap();
        let mut head = ids.last().unwrap().clone();
        let mut members = Vec::new();
        for i in 0..1000u32 {
            let mut seed = [7u8; 32];
            seed[..4].copy_from_slice(&i.to_be_bytes());
            let p = Peer {
                identity: hyphae::identity::Identity::from_seed(seed),
                user: "@x:y".try_into().unwrap(),
            };
            let p = Peer {
                user: format!("@m{i}:{}", p.identity.server_name())
                    .try_into()
                    .unwrap(),
                ..p
            };
            let (_, raw) = common::event_on(
                &engine,
                &p,
                &room,
                "m.room.member",
                Some(p.user.as_str()),
                json!({"membership": "join"}),
                &[head.clone()],
                10 + i as u64,
            )
            .await;
            head = common::accept(&engine, &raw).await;
            members.push(p);
        }
        // Branch 1: alice promotes a member and renames; branch 2: alice kicks another and sets the topic.
        let mut pl = common::state_content(&engine, &room, "m.room.power_levels", "")
            .await
            .unwrap();
        pl["users"][members[1].user.as_str()] = json!(50);
        let (_, a1) = common::event_on(
            &engine,
            &alice,
            &room,
            "m.room.power_levels",
            Some(""),
            pl,
            &[head.clone()],
            5000,
        )
        .await;
        let a1 = common::accept(&engine, &a1).await;
        let (_, a2) = common::event_on(
            &engine,
            &alice,
            &room,
            "m.room.name",
            Some(""),
            json!({"name": "one"}),
            &[a1],
            5001,
        )
        .await;
        let a2 = common::accept(&engine, &a2).await;
        let (_, b1) = common::event_on(
            &engine,
            &alice,
            &room,
            "m.room.member",
            Some(members[2].user.as_str()),
            json!({"membership": "leave"}),
            &[head.clone()],
            5002,
        )
        .await;
        let b1 = common::accept(&engine, &b1).await;
        let (_, b2) = common::event_on(
            &engine,
            &alice,
            &room,
            "m.room.topic",
            Some(""),
            json!({"topic": "two"}),
            &[b1],
            5003,
        )
        .await;
        // Receiving it extends the fork: the engine resolves current state over both branches.
        let start = Instant::now();
        let b2 = common::accept(&engine, &b2).await;
        let fork_ms = start.elapsed().as_secs_f64() * 1000.0;

        // Resolve the two states directly, in memory, as the engine does.
        let to_map = |s: hyphae::engine::SortedState| -> StateMap {
            s.into_iter()
                .map(|((t, k), v)| ((t.as_str().into(), k), v))
                .collect()
        };
        let s1 = to_map(engine.state_after(&a2).await.unwrap().unwrap());
        let s2 = to_map(engine.state_after(&b2).await.unwrap().unwrap());
        let mut events: HashMap<OwnedEventId, Arc<StoredEvent>> = HashMap::new();
        let mut stack: Vec<OwnedEventId> = s1.values().chain(s2.values()).cloned().collect();
        while let Some(id) = stack.pop() {
            if events.contains_key(&id) {
                continue;
            }
            let ev = engine.event(&id).await.unwrap().unwrap();
            stack.extend(ev.pdu.auth_events.iter().cloned());
            events.insert(id, ev);
        }
        let rules = rules_for(&ruma::RoomVersionId::V12).unwrap();
        let runs = 20;
        let start = Instant::now();
        let mut resolved = StateMap::new();
        for _ in 0..runs {
            resolved = hyphae::engine::resolve::resolve(&rules, &[&s1, &s2], |id| {
                events.get(id).map(|e| e.as_ref())
            })
            .unwrap();
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0 / runs as f64;
        assert!(resolved.len() >= 1000);
        println!("== state resolution, 1,000 members, two conflicting branches");
        println!(
            "resolve (auth chains + ruma state_res v2.1)       {ms:>8.2} ms  ({} state entries)",
            resolved.len()
        );
        println!("event extending the fork, received end to end     {fork_ms:>8.2} ms  (checks + resolution + commit)");
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        native::state_resolution().await;
        native::ingest().await;
    });
}

#[cfg(target_arch = "wasm32")]
fn main() {}
