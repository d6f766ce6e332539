//! The native on-disk backend: one redb database file, one redb table per [`Table`].
//!
//! redb is synchronous. Reads are B-tree lookups, usually in redb's page cache, so they run in
//! place (`block_in_place` on a multi-threaded runtime, so other tasks move off this worker);
//! a hop to the blocking pool per lookup cost more than the lookup. Writes run on tokio's
//! blocking pool and return after `commit()`, which redb makes durable (fsync) by default.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition};

use super::{
    Direction, Entry, KeyRange, Op, Snapshot, Store, StoreError, StoreResult, Table, WriteBatch,
};

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// redb's page cache. Its default (1 GiB) grows with every page written and read, so a node's
/// memory would follow the size of its store; the engine keeps its own event cache on top.
pub const REDB_CACHE_BYTES: usize = 64 << 20;

pub struct RedbStore {
    db: Arc<redb::Database>,
}

impl RedbStore {
    /// Opens (or creates) the database file at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        for table in Table::ALL {
            txn.open_table(definition(table)).map_err(backend)?;
        }
        txn.commit()
            .map_err(|e| StoreError::NotCommitted(e.to_string()))?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs a short synchronous read without stalling other tasks on this worker.
    fn read<T>(&self, f: impl FnOnce(&redb::Database) -> StoreResult<T>) -> StoreResult<T> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .unwrap_or(false);
        if multi_thread {
            tokio::task::block_in_place(|| f(&self.db))
        } else {
            f(&self.db)
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::Database) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let key = key.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(definition(table)).map_err(backend)?;
            Ok(t.get(key.as_slice())
                .map_err(backend)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn get_many(&self, table: Table, keys: &[&[u8]]) -> StoreResult<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.read(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(definition(table)).map_err(backend)?;
            keys.iter()
                .map(|k| Ok(t.get(*k).map_err(backend)?.map(|v| v.value().to_vec())))
                .collect()
        })
    }

    async fn scan(
        &self,
        table: Table,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> StoreResult<Vec<Entry>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let t = txn.open_table(definition(table)).map_err(backend)?;
            let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (
                range.start.as_ref().map(Vec::as_slice),
                range.end.as_ref().map(Vec::as_slice),
            );
            let iter = t.range::<&[u8]>(bounds).map_err(backend)?;
            let mut out = Vec::new();
            let mut push = |item: Result<_, redb::StorageError>| -> StoreResult<()> {
                let (k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) =
                    item.map_err(backend)?;
                out.push((k.value().to_vec(), v.value().to_vec()));
                Ok(())
            };
            match direction {
                Direction::Forward => {
                    for item in iter.take(limit) {
                        push(item)?;
                    }
                }
                Direction::Backward => {
                    for item in iter.rev().take(limit) {
                        push(item)?;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn write(&self, batch: WriteBatch) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                // Open each table once per transaction, lazily.
                let mut open: Vec<(Table, redb::Table<&[u8], &[u8]>)> = Vec::new();
                for op in &batch.ops {
                    let table = match op {
                        Op::Put { table, .. } | Op::Delete { table, .. } => *table,
                    };
                    let idx = match open.iter().position(|(t, _)| *t == table) {
                        Some(i) => i,
                        None => {
                            open.push((table, txn.open_table(definition(table)).map_err(backend)?));
                            open.len() - 1
                        }
                    };
                    let t = &mut open[idx].1;
                    match op {
                        Op::Put { key, value, .. } => {
                            t.insert(key.as_slice(), value.as_slice())
                                .map_err(backend)?;
                        }
                        Op::Delete { key, .. } => {
                            t.remove(key.as_slice()).map_err(backend)?;
                        }
                    }
                }
            }
            txn.commit()
                .map_err(|e| StoreError::NotCommitted(e.to_string()))
        })
        .await
    }

    async fn snapshot(&self) -> StoreResult<Snapshot> {
        self.blocking(|db| {
            // One read transaction: redb shows it the store as of its start, whatever commits.
            let txn = db.begin_read().map_err(backend)?;
            Table::ALL
                .into_iter()
                .map(|table| {
                    let t = txn.open_table(definition(table)).map_err(backend)?;
                    let entries = t
                        .iter()
                        .map_err(backend)?
                        .map(|item| {
                            let (k, v) = item.map_err(backend)?;
                            Ok((k.value().to_vec(), v.value().to_vec()))
                        })
                        .collect::<StoreResult<Vec<Entry>>>()?;
                    Ok((table, entries))
                })
                .collect()
        })
        .await
    }
}
