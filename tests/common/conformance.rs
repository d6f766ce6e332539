//! The store conformance suite: written once, run against memory, redb and IndexedDB.

use std::ops::Bound;

use hyphae::store::export::{export, import};
use hyphae::store::schema::{self, Migration, CURRENT_SCHEMA_VERSION};
use hyphae::store::{
    scan_all, Direction, KeyRange, MaybeSendFuture, Store, StoreError, StoreResult, Table,
    WriteBatch,
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
