//! The store conformance suite on the native backends (memory, redb), plus what only a disk
//! store can show: data survives reopening.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::sync::Arc;

use common::conformance;
use hyphae::engine::create_room::CreateRoom;
use hyphae::engine::Engine;
use hyphae::identity::Identity;
use hyphae::store::memory::MemoryStore;
use hyphae::store::redb::RedbStore;
use hyphae::store::{Store, Table, WriteBatch};

fn redb(dir: &tempfile::TempDir, name: &str) -> RedbStore {
    RedbStore::open(&dir.path().join(name)).unwrap()
}

#[tokio::test]
async fn memory_conformance() {
    conformance::basics(&MemoryStore::new()).await;
    conformance::large_table(&MemoryStore::new()).await;
    conformance::get_many(&MemoryStore::new()).await;
    conformance::schema_and_migrations(&MemoryStore::new()).await;
}

#[tokio::test]
async fn redb_conformance() {
    let dir = tempfile::tempdir().unwrap();
    conformance::basics(&redb(&dir, "a.redb")).await;
    conformance::large_table(&redb(&dir, "b.redb")).await;
    conformance::get_many(&redb(&dir, "e.redb")).await;
    conformance::schema_and_migrations(&redb(&dir, "c.redb")).await;
}

#[tokio::test]
async fn memory_export_under_writes() {
    conformance::export_under_writes(&MemoryStore::new()).await;
    conformance::export_while_engine_writes(
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryStore::new()),
    )
    .await;
}

/// Exports run while commits land on the blocking pool; each export must be one snapshot.
#[tokio::test]
async fn redb_export_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let partial = conformance::export_under_writes(&redb(&dir, "f.redb")).await;
    println!("exports that overlapped a write: {partial}");
    conformance::export_while_engine_writes(
        Arc::new(redb(&dir, "g.redb")),
        Arc::new(redb(&dir, "h.redb")),
    )
    .await;
}

#[tokio::test]
async fn redb_writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = redb(&dir, "d.redb");
        let mut b = WriteBatch::new();
        b.put(Table::Events, b"k", b"v");
        store.write(b).await.unwrap();
    }
    let store = redb(&dir, "d.redb");
    assert_eq!(
        store.get(Table::Events, b"k").await.unwrap(),
        Some(b"v".to_vec())
    );
}

/// A store holding a real room, for the export/import round trips.
async fn populated(store: Arc<dyn Store>) -> Engine {
    let engine = Engine::open(store).await.unwrap();
    let alice = common::Peer::new(1, "alice");
    let opts = CreateRoom {
        name: Some("Export me".into()),
        topic: Some("t".into()),
        ..Default::default()
    };
    let (room, _) = engine
        .create_room(&alice.identity, &alice.user, &opts, common::ts(1000))
        .await
        .unwrap();
    for i in 0..50 {
        let content = serde_json::json!({ "msgtype": "m.text", "body": format!("message {i}") });
        engine
            .send(
                &alice.identity,
                &room,
                &alice.user,
                "m.room.message",
                None,
                content,
                common::ts(2000 + i),
            )
            .await
            .unwrap();
    }
    Identity::load_or_create(engine.store().as_ref())
        .await
        .unwrap();
    engine
}

#[tokio::test]
async fn export_import_memory_to_redb_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let source = populated(memory.clone()).await;
    let disk: Arc<dyn Store> = Arc::new(redb(&dir, "import.redb"));
    conformance::export_import(memory.as_ref(), disk.as_ref()).await;

    // The imported store opens as the same rooms, state and timeline.
    let imported = Engine::open(disk.clone()).await.unwrap();
    assert_eq!(
        common::room_ids(&source).await,
        common::room_ids(&imported).await
    );
    for room in common::room_ids(&source).await {
        assert_eq!(
            common::picture(&source, &room).await,
            common::picture(&imported, &room).await
        );
    }
    // Same identity too.
    let a = Identity::load_or_create(memory.as_ref()).await.unwrap();
    let b = Identity::load_or_create(disk.as_ref()).await.unwrap();
    assert_eq!(a.server_name(), b.server_name());

    let back: Arc<dyn Store> = Arc::new(MemoryStore::new());
    conformance::export_import(disk.as_ref(), back.as_ref()).await;
}
