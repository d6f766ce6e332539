//! The browser backend: one IndexedDB database per profile, one object store per [`Table`].
//!
//! Keys and values are `Uint8Array`s; IndexedDB orders binary keys byte-wise, exactly like redb,
//! so ranges mean the same on both. A write is one readwrite transaction over the tables it
//! touches, opened with `durability: "strict"` (the browser flushes it to disk before `complete`,
//! so it survives a power cut, not only a tab crash), and returns only after `complete`.

use std::ops::Bound;

use async_trait::async_trait;
use idb::{
    CursorDirection, Database, DatabaseEvent, Factory, ObjectStoreParams, Query, TransactionMode,
};
use js_sys::Uint8Array;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{IdbDatabase, IdbTransaction};

use super::{
    Direction, Entry, KeyRange, Op, Snapshot, Store, StoreError, StoreResult, Table, WriteBatch,
};

/// Bumped whenever the set of object stores changes; independent of the data schema version
/// (which lives in the `meta` table and is migrated by [`super::schema`]).
const IDB_LAYOUT_VERSION: u32 = 4;

fn backend<E: std::fmt::Debug>(e: E) -> StoreError {
    StoreError::Backend(format!("{e:?}"))
}

fn bytes(value: &JsValue) -> StoreResult<Vec<u8>> {
    if value.is_instance_of::<Uint8Array>() || value.is_instance_of::<js_sys::ArrayBuffer>() {
        Ok(Uint8Array::new(value).to_vec())
    } else {
        Err(StoreError::Corrupt(
            "IndexedDB holds a non-binary key or value".into(),
        ))
    }
}

fn js_bytes(b: &[u8]) -> JsValue {
    Uint8Array::from(b).into()
}

#[wasm_bindgen]
extern "C" {
    /// An `IDBDatabase`, for `transaction(names, mode, options)`: web-sys offers the options
    /// only behind its unstable-API cfg, and idb not at all.
    #[wasm_bindgen(js_name = IDBDatabase)]
    type DatabaseWithOptions;

    #[wasm_bindgen(method, catch, js_name = transaction)]
    fn transaction_with_options(
        this: &DatabaseWithOptions,
        names: &js_sys::Array,
        mode: &str,
        options: &JsValue,
    ) -> Result<IdbTransaction, JsValue>;
}

pub struct IndexedDbStore {
    db: Database,
    /// The same connection, for what idb does not wrap (transaction options).
    raw: IdbDatabase,
    /// `{durability: "strict"}`, the options of every readwrite transaction.
    strict: JsValue,
}

impl IndexedDbStore {
    /// Opens (or creates) the database `name`, creating any missing object stores.
    pub async fn open(name: &str) -> StoreResult<Self> {
        let factory = Factory::new().map_err(backend)?;
        let mut request = factory
            .open(name, Some(IDB_LAYOUT_VERSION))
            .map_err(backend)?;
        request.on_upgrade_needed(|event| {
            // Runs inside the versionchange transaction; failures surface when the open resolves.
            if let Ok(db) = event.database() {
                let existing = db.store_names();
                for table in Table::ALL {
                    if !existing.iter().any(|n| n == table.name()) {
                        let _ = db.create_object_store(table.name(), ObjectStoreParams::new());
                    }
                }
            }
        });
        let raw: IdbDatabase = request.await.map_err(backend)?.into();
        let db = Database::from(raw.clone());
        let names = db.store_names();
        for table in Table::ALL {
            if !names.iter().any(|n| n == table.name()) {
                return Err(StoreError::Backend(format!(
                    "object store {} missing",
                    table.name()
                )));
            }
        }
        let strict = js_sys::Object::new();
        js_sys::Reflect::set(&strict, &"durability".into(), &"strict".into()).map_err(backend)?;
        Ok(Self {
            db,
            raw,
            strict: strict.into(),
        })
    }

    /// A readwrite transaction over `names` that commits only once the data is on disk.
    fn write_transaction(&self, names: &[&str]) -> StoreResult<idb::Transaction> {
        let names: js_sys::Array = names.iter().map(|n| JsValue::from_str(n)).collect();
        self.raw
            .unchecked_ref::<DatabaseWithOptions>()
            .transaction_with_options(&names, "readwrite", &self.strict)
            .map(idb::Transaction::from)
            .map_err(backend)
    }

    /// Deletes the database `name` (for tests and profile removal).
    pub async fn delete(name: &str) -> StoreResult<()> {
        let factory = Factory::new().map_err(backend)?;
        factory
            .delete(name)
            .map_err(backend)?
            .await
            .map_err(backend)
    }

    pub fn close(&self) {
        self.db.close();
    }

    fn idb_range(range: &KeyRange) -> StoreResult<Option<Query>> {
        let bound = |b: &Bound<Vec<u8>>| match b {
            Bound::Included(k) => Some((js_bytes(k), false)),
            Bound::Excluded(k) => Some((js_bytes(k), true)),
            Bound::Unbounded => None,
        };
        let r = match (bound(&range.start), bound(&range.end)) {
            (None, None) => return Ok(None),
            (Some((lo, lo_open)), None) => idb::KeyRange::lower_bound(&lo, Some(lo_open)),
            (None, Some((hi, hi_open))) => idb::KeyRange::upper_bound(&hi, Some(hi_open)),
            (Some((lo, lo_open)), Some((hi, hi_open))) => {
                idb::KeyRange::bound(&lo, &hi, Some(lo_open), Some(hi_open))
            }
        };
        Ok(Some(Query::KeyRange(r.map_err(backend)?)))
    }
}

#[async_trait(?Send)]
impl Store for IndexedDbStore {
    async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let tx = self
            .db
            .transaction(&[table.name()], TransactionMode::ReadOnly)
            .map_err(backend)?;
        let store = tx.object_store(table.name()).map_err(backend)?;
        let value = store
            .get(Query::Key(js_bytes(key)))
            .map_err(backend)?
            .await
            .map_err(backend)?;
        value.map(|v| bytes(&v)).transpose()
    }

    async fn get_many(&self, table: Table, keys: &[&[u8]]) -> StoreResult<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self
            .db
            .transaction(&[table.name()], TransactionMode::ReadOnly)
            .map_err(backend)?;
        let store = tx.object_store(table.name()).map_err(backend)?;
        // Issue every request before awaiting any: they run back to back in one transaction.
        let requests = keys
            .iter()
            .map(|k| store.get(Query::Key(js_bytes(k))).map_err(backend))
            .collect::<StoreResult<Vec<_>>>()?;
        let mut out = Vec::with_capacity(keys.len());
        for request in requests {
            let value = request.await.map_err(backend)?;
            out.push(value.map(|v| bytes(&v)).transpose()?);
        }
        Ok(out)
    }

    async fn scan(
        &self,
        table: Table,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> StoreResult<Vec<Entry>> {
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let tx = self
            .db
            .transaction(&[table.name()], TransactionMode::ReadOnly)
            .map_err(backend)?;
        let store = tx.object_store(table.name()).map_err(backend)?;
        let query = Self::idb_range(&range)?;
        let count = u32::try_from(limit).unwrap_or(u32::MAX);
        match direction {
            Direction::Forward => {
                // Two bulk reads in one transaction see the same snapshot.
                let keys = store
                    .get_all_keys(query.clone(), Some(count))
                    .map_err(backend)?;
                let values = store.get_all(query, Some(count)).map_err(backend)?;
                let keys = keys.await.map_err(backend)?;
                let values = values.await.map_err(backend)?;
                if keys.len() != values.len() {
                    return Err(StoreError::Backend("getAll and getAllKeys disagree".into()));
                }
                keys.iter()
                    .zip(values.iter())
                    .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
                    .collect()
            }
            Direction::Backward => {
                let mut out = Vec::new();
                let cursor = store
                    .open_cursor(query, Some(CursorDirection::Prev))
                    .map_err(backend)?
                    .await
                    .map_err(backend)?;
                let Some(cursor) = cursor else { return Ok(out) };
                let mut cursor = cursor.into_managed();
                while out.len() < limit {
                    let (Some(k), Some(v)) = (
                        cursor.key().map_err(backend)?,
                        cursor.value().map_err(backend)?,
                    ) else {
                        break;
                    };
                    out.push((bytes(&k)?, bytes(&v)?));
                    cursor.next(None).await.map_err(backend)?;
                }
                Ok(out)
            }
        }
    }

    async fn write(&self, batch: WriteBatch) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&'static str> = batch
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { table, .. } | Op::Delete { table, .. } => table.name(),
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        let tx = self.write_transaction(&names)?;
        // Issue every request at once: IndexedDB runs them in order within the transaction, and
        // awaiting each one would cost a task hop per op.
        for op in &batch.ops {
            match op {
                Op::Put { table, key, value } => {
                    let store = tx.object_store(table.name()).map_err(backend)?;
                    store
                        .put(&js_bytes(value), Some(&js_bytes(key)))
                        .map_err(backend)?;
                }
                Op::Delete { table, key } => {
                    let store = tx.object_store(table.name()).map_err(backend)?;
                    store.delete(Query::Key(js_bytes(key))).map_err(backend)?;
                }
            }
        }
        let result = tx.commit().map_err(backend)?.await.map_err(backend)?;
        if result.is_committed() {
            Ok(())
        } else {
            Err(StoreError::NotCommitted(
                "IndexedDB transaction aborted".into(),
            ))
        }
    }

    async fn snapshot(&self) -> StoreResult<Snapshot> {
        // One readonly transaction over every object store: IndexedDB runs a readwrite
        // transaction that overlaps its scope wholly before or wholly after it.
        let names: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
        let tx = self
            .db
            .transaction(&names, TransactionMode::ReadOnly)
            .map_err(backend)?;
        let mut requests = Vec::with_capacity(Table::ALL.len());
        for table in Table::ALL {
            let store = tx.object_store(table.name()).map_err(backend)?;
            let keys = store.get_all_keys(None, None).map_err(backend)?;
            let values = store.get_all(None, None).map_err(backend)?;
            requests.push((table, keys, values));
        }
        let mut out = Vec::with_capacity(requests.len());
        for (table, keys, values) in requests {
            let keys = keys.await.map_err(backend)?;
            let values = values.await.map_err(backend)?;
            if keys.len() != values.len() {
                return Err(StoreError::Backend("getAll and getAllKeys disagree".into()));
            }
            let entries = keys
                .iter()
                .zip(values.iter())
                .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
                .collect::<StoreResult<Vec<Entry>>>()?;
            out.push((table, entries));
        }
        Ok(out)
    }
}
