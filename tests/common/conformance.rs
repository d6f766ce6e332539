//! The store conformance suite: written once, run against memory, redb and IndexedDB.

use std::ops::Bound;

use futures::channel::oneshot;
use hyphae::store::export::{export, import};
use hyphae::store::schema::{self, Migration, CURRENT_SCHEMA_VERSION};
use hyphae::store::{
    scan_all, Direction, KeyRange, MaybeSendFuture, SharedStore, Store, StoreError, StoreResult,
    Table, WriteBatch,
};

async fn put(store: &dyn Store, table: Table, key: &[u8], value: &[u8]) {
    let mut b = WriteBatch::new();
    b.put(table, key, value);
    store.write(b).await.unwrap();
}

fn keys(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    entries.iter().map(|(k, _)| k.clone()).collect()
}

/// Basic reads and writes, batches, ordering, ranges and limits. `store` must be empty.
pub async fn basics(store: &dyn Store) {
    assert_eq!(store.get(Table::Events, b"a").await.unwrap(), None);
    put(store, Table::Events, b"a", b"1").await;
    assert_eq!(
        store.get(Table::Events, b"a").await.unwrap(),
        Some(b"1".to_vec())
    );
    // Tables are separate namespaces.
    assert_eq!(store.get(Table::Rooms, b"a").await.unwrap(), None);
    put(store, Table::Events, b"a", b"2").await;
    assert_eq!(
        store.get(Table::Events, b"a").await.unwrap(),
        Some(b"2".to_vec())
    );

    // A batch over several tables, with a delete, applies in order.
    let mut b = WriteBatch::new();
    b.put(Table::Rooms, b"r", b"room");
    b.put(Table::Timeline, b"t", b"x");
    b.delete(Table::Events, b"a");
    b.put(Table::Timeline, b"t", b"y");
    store.write(b).await.unwrap();
    assert_eq!(store.get(Table::Events, b"a").await.unwrap(), None);
    assert_eq!(
        store.get(Table::Rooms, b"r").await.unwrap(),
        Some(b"room".to_vec())
    );
    assert_eq!(
        store.get(Table::Timeline, b"t").await.unwrap(),
        Some(b"y".to_vec())
    );
    // Deleting a missing key is fine; an empty batch is fine.
    let mut b = WriteBatch::new();
    b.delete(Table::Events, b"nope");
    store.write(b).await.unwrap();
    store.write(WriteBatch::new()).await.unwrap();

    // Binary keys order byte-wise (0x00 < 0x7f < 0x80 < 0xff), shorter prefix first.
    let binary: Vec<Vec<u8>> = vec![
        vec![0x00],
        vec![0x01, 0xff],
        vec![0x01],
        vec![0x7f],
        vec![0x80],
        vec![0xff, 0x00],
        vec![0xff],
    ];
    let mut b = WriteBatch::new();
    for k in &binary {
        b.put(Table::StateGroups, k.clone(), k.clone());
    }
    store.write(b).await.unwrap();
    let mut expected = binary.clone();
    expected.sort();
    let all = store
        .scan(Table::StateGroups, KeyRange::all(), Direction::Forward, 100)
        .await
        .unwrap();
    assert_eq!(keys(&all), expected);
    assert!(all.iter().all(|(k, v)| k == v));
    let back = store
        .scan(
            Table::StateGroups,
            KeyRange::all(),
            Direction::Backward,
            100,
        )
        .await
        .unwrap();
    let mut rev = expected.clone();
    rev.reverse();
    assert_eq!(keys(&back), rev);

    // Prefix ranges, bounds and limits, both directions.
    let pre = store
        .scan(
            Table::StateGroups,
            KeyRange::prefix(&[0x01]),
            Direction::Forward,
            100,
        )
        .await
        .unwrap();
    assert_eq!(keys(&pre), vec![vec![0x01], vec![0x01, 0xff]]);
    let pre = store
        .scan(
            Table::StateGroups,
            KeyRange::prefix(&[0xff]),
            Direction::Backward,
            1,
        )
        .await
        .unwrap();
    assert_eq!(keys(&pre), vec![vec![0xff, 0x00]]);
    let range = KeyRange {
        start: Bound::Excluded(vec![0x01]),
        end: Bound::Included(vec![0x80]),
    };
    let mid = store
        .scan(Table::StateGroups, range.clone(), Direction::Forward, 100)
        .await
        .unwrap();
    assert_eq!(keys(&mid), vec![vec![0x01, 0xff], vec![0x7f], vec![0x80]]);
    let mid = store
        .scan(Table::StateGroups, range, Direction::Backward, 2)
        .await
        .unwrap();
    assert_eq!(keys(&mid), vec![vec![0x80], vec![0x7f]]);
    let empty = KeyRange {
        start: Bound::Included(vec![0x80]),
        end: Bound::Excluded(vec![0x10]),
    };
    assert!(store
        .scan(Table::StateGroups, empty, Direction::Forward, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .scan(Table::Meta, KeyRange::all(), Direction::Forward, 10)
        .await
        .unwrap()
        .is_empty());

    // Values up to the PDU limit and beyond round-trip exactly.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    put(store, Table::Events, b"big", &big).await;
    assert_eq!(store.get(Table::Events, b"big").await.unwrap(), Some(big));
}

/// Paged full-table reads see every entry of a table bigger than one page.
pub async fn large_table(store: &dyn Store) {
    let n = 10_000u32;
    let mut b = WriteBatch::new();
    for i in 0..n {
        b.put(Table::Timeline, i.to_be_bytes(), i.to_le_bytes());
    }
    store.write(b).await.unwrap();
    let all = scan_all(store, Table::Timeline).await.unwrap();
    assert_eq!(all.len(), n as usize);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(all[1234].1, 1234u32.to_le_bytes());
}

/// Schema stamping and migrations. `store` must be empty.
pub async fn schema_and_migrations(store: &dyn Store) {
    // A new store gets version 1 (simulating the first release), then data in the v1 layout.
    assert_eq!(schema::migrate(store, 1, &[]).await.unwrap(), 1);
    assert_eq!(schema::read_version(store).await.unwrap(), Some(1));
    put(store, Table::Rooms, b"!a", b"v1:alpha").await;
    put(store, Table::Rooms, b"!b", b"v1:beta").await;

    // v2 code opens it: the v1 -> v2 step rewrites every room record.
    fn upgrade(store: &dyn Store) -> MaybeSendFuture<'_, StoreResult<WriteBatch>> {
        Box::pin(async move {
            let mut batch = WriteBatch::new();
            for (k, v) in scan_all(store, Table::Rooms).await? {
                let v = String::from_utf8(v).map_err(|_| StoreError::Corrupt("utf8".into()))?;
                batch.put(Table::Rooms, k, v.replace("v1:", "v2:").into_bytes());
            }
            Ok(batch)
        })
    }
    let steps = [Migration {
        from: 1,
        run: upgrade,
    }];
    assert_eq!(schema::migrate(store, 2, &steps).await.unwrap(), 2);
    assert_eq!(schema::read_version(store).await.unwrap(), Some(2));
    assert_eq!(
        store.get(Table::Rooms, b"!a").await.unwrap(),
        Some(b"v2:alpha".to_vec())
    );
    assert_eq!(
        store.get(Table::Rooms, b"!b").await.unwrap(),
        Some(b"v2:beta".to_vec())
    );
    // Opening again is a no-op.
    assert_eq!(schema::migrate(store, 2, &steps).await.unwrap(), 2);
    assert_eq!(
        store.get(Table::Rooms, b"!a").await.unwrap(),
        Some(b"v2:alpha".to_vec())
    );
    // Older code refuses a newer store; a missing step is an error, not a silent skip.
    assert!(matches!(
        schema::migrate(store, 1, &[]).await,
        Err(StoreError::TooNew {
            found: 2,
            supported: 1
        })
    ));
    assert!(matches!(
        schema::migrate(store, 3, &steps).await,
        Err(StoreError::NoMigration(2))
    ));
    assert_eq!(schema::read_version(store).await.unwrap(), Some(2));
}

/// Export from `source` (any non-empty store) and import into `target` (empty): identical.
pub async fn export_import(source: &dyn Store, target: &dyn Store) {
    let data = export(source).await.unwrap();
    let version = schema::read_version(source).await.unwrap();
    assert_eq!(version, Some(CURRENT_SCHEMA_VERSION));
    // Bad files change nothing.
    for bad in [
        "",
        "not json",
        "{\"format\":\"other\",\"version\":1,\"schema\":1}",
    ] {
        assert!(
            matches!(import(target, bad).await, Err(StoreError::BadExport { .. })),
            "{bad:?}"
        );
    }
    let corrupted = format!(
        "{}{{\"table\":\"nope\",\"key\":\"\",\"value\":\"\"}}\n",
        data
    );
    assert!(matches!(
        import(target, &corrupted).await,
        Err(StoreError::BadExport { .. })
    ));
    assert!(hyphae::store::is_empty(target).await.unwrap());

    let n = import(target, &data).await.unwrap();
    assert!(n > 0);
    for table in Table::ALL {
        assert_eq!(
            scan_all(source, table).await.unwrap(),
            scan_all(target, table).await.unwrap(),
            "{table:?}"
        );
    }
    // A second import is refused: imports go into empty stores only.
    assert!(matches!(
        import(target, &data).await,
        Err(StoreError::NotEmpty)
    ));
}

/// Batched lookups agree with single ones, in order, including misses.
pub async fn get_many(store: &dyn Store) {
    put(store, Table::Events, b"one", b"1").await;
    put(store, Table::Events, b"three", b"3").await;
    let keys: [&[u8]; 4] = [b"one", b"two", b"three", b"one"];
    let got = store.get_many(Table::Events, &keys).await.unwrap();
    assert_eq!(
        got,
        vec![
            Some(b"1".to_vec()),
            None,
            Some(b"3".to_vec()),
            Some(b"1".to_vec())
        ]
    );
    assert!(store.get_many(Table::Events, &[]).await.unwrap().is_empty());
}

/// Key of the counter [`export_under_writes`] advances together with its rows.
const COUNTER: &[u8] = b"test_counter";

/// Exports taken while writes keep landing are each one consistent snapshot: every write batch
/// advances a counter in `meta` together with one row in `events` and one in `timeline` (as the
/// engine's commits do), so in any export the three must agree. `store` must be empty. Returns
/// how many exports saw a partly written store (0 on a backend that never yields).
pub async fn export_under_writes(store: &dyn Store) -> usize {
    const WRITES: u64 = 150;
    schema::prepare(store).await.unwrap();
    let done = std::cell::Cell::new(false);
    let writer = async {
        for n in 1..=WRITES {
            let mut b = WriteBatch::new();
            b.put(Table::Meta, COUNTER, n.to_be_bytes());
            b.put(Table::Events, format!("ev{n:08}"), b"event".to_vec());
            b.put(Table::Timeline, format!("tl{n:08}"), b"position".to_vec());
            store.write(b).await.unwrap();
        }
        done.set(true);
    };
    let reader = async {
        let mut partial = 0;
        loop {
            let finished = done.get();
            let data = export(store).await.unwrap();
            let copy = hyphae::store::memory::MemoryStore::new();
            import(&copy, &data).await.unwrap();
            let counter = copy
                .get(Table::Meta, COUNTER)
                .await
                .unwrap()
                .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
            let events = scan_all(&copy, Table::Events).await.unwrap().len() as u64;
            let timeline = scan_all(&copy, Table::Timeline).await.unwrap().len() as u64;
            assert_eq!(
                (events, timeline),
                (counter, counter),
                "an export mixes states of the store"
            );
            if (1..WRITES).contains(&counter) {
                partial += 1;
            }
            if finished {
                return partial;
            }
        }
    };
    futures::join!(writer, reader).1
}

/// The ends of one pause: the writer waits for `paused`, writes, then sends `resume`.
type Pause = (oneshot::Sender<()>, oneshot::Receiver<()>);

/// A store wrapper that, once armed, holds the first read of a table other than `meta` until a
/// write has landed: the interleaving that made an export read the counters in `meta` before a
/// write and the rows after it.
pub struct PauseBeforeRead {
    pub inner: SharedStore,
    gate: std::sync::Arc<std::sync::Mutex<Option<Pause>>>,
}

/// Arms a [`PauseBeforeRead`].
pub struct Gate(std::sync::Arc<std::sync::Mutex<Option<Pause>>>);

impl Gate {
    /// Makes the next read of a table other than `meta` wait: returns the ends the writer uses.
    pub fn arm(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (paused_tx, paused) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *self.0.lock().unwrap() = Some((paused_tx, resume_rx));
        (paused, resume)
    }
}

impl PauseBeforeRead {
    pub fn new(inner: SharedStore) -> (Self, Gate) {
        let gate = std::sync::Arc::new(std::sync::Mutex::new(None));
        (
            Self {
                inner,
                gate: gate.clone(),
            },
            Gate(gate),
        )
    }

    async fn pause_once(&self) {
        let taken = self.gate.lock().unwrap().take();
        if let Some((paused, resume)) = taken {
            let _ = paused.send(());
            let _ = resume.await;
        }
    }
}

#[cfg_attr(not(target_arch = "wasm32"), async_trait::async_trait)]
#[cfg_attr(target_arch = "wasm32", async_trait::async_trait(?Send))]
impl Store for PauseBeforeRead {
    async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.inner.get(table, key).await
    }

    async fn scan(
        &self,
        table: Table,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        if table != Table::Meta {
            self.pause_once().await;
        }
        self.inner.scan(table, range, direction, limit).await
    }

    async fn write(&self, batch: WriteBatch) -> StoreResult<()> {
        self.inner.write(batch).await
    }

    async fn snapshot(&self) -> StoreResult<hyphae::store::Snapshot> {
        // One read of everything: a write lands wholly before it (or after).
        self.pause_once().await;
        self.inner.snapshot().await
    }
}

/// An export taken while the engine keeps sending restores to a store whose engine takes no
/// stream position twice. `source` and `target` must be empty.
pub async fn export_while_engine_writes(source: SharedStore, target: SharedStore) {
    use hyphae::engine::Engine;
    use hyphae::identity::Identity;
    let (paused_store, gate) = PauseBeforeRead::new(source);
    #[cfg(target_arch = "wasm32")]
    let shared: SharedStore = std::rc::Rc::new(paused_store);
    #[cfg(not(target_arch = "wasm32"))]
    let shared: SharedStore = std::sync::Arc::new(paused_store);
    let engine = Engine::open(shared.clone()).await.unwrap();
    let local = Identity::load_or_create(engine.store().as_ref())
        .await
        .unwrap();
    let alice: ruma::OwnedUserId = format!("@alice:{}", local.server_name())
        .try_into()
        .unwrap();
    let (room, _) = engine
        .create_room(&local, &alice, &Default::default(), super::ts(1000))
        .await
        .unwrap();
    let send = |i: u64| {
        let (engine, local, alice, room) = (&engine, &local, &alice, &room);
        async move {
            let body = serde_json::json!({"msgtype": "m.text", "body": format!("message {i}")});
            engine
                .send(
                    local,
                    room,
                    alice,
                    "m.room.message",
                    None,
                    body,
                    super::ts(2000 + i),
                )
                .await
                .unwrap();
        }
    };
    for i in 0..5 {
        send(i).await;
    }
    let (paused, resume) = gate.arm();
    let writer = async {
        paused.await.unwrap();
        send(100).await;
        resume.send(()).unwrap();
    };
    let (data, ()) = futures::join!(export(shared.as_ref()), writer);
    import(target.as_ref(), &data.unwrap()).await.unwrap();

    let restored = Engine::open(target.clone()).await.unwrap();
    let timeline_len = || async {
        scan_all(target.as_ref(), Table::Timeline)
            .await
            .unwrap()
            .len()
    };
    let before = timeline_len().await;
    let highest = scan_all(target.as_ref(), Table::Timeline)
        .await
        .unwrap()
        .iter()
        .map(|(k, _)| u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap()))
        .max()
        .unwrap();
    assert!(
        restored.stream_position().await > highest,
        "the restored store would hand out stream position {} again",
        restored.stream_position().await
    );
    // A new event takes a new position: nothing in the restored timeline is overwritten.
    let body = serde_json::json!({"msgtype": "m.text", "body": "after the restore"});
    restored
        .send(
            &local,
            &room,
            &alice,
            "m.room.message",
            None,
            body,
            super::ts(9000),
        )
        .await
        .unwrap();
    assert_eq!(timeline_len().await, before + 1);
}
