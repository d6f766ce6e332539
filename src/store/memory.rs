//! The in-memory backend: a `BTreeMap` per table. Used by tests, benchmarks and ephemeral peers.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Direction, Entry, KeyRange, Op, Snapshot, Store, StoreResult, Table, WriteBatch};

type Tables = BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
impl Store for MemoryStore {
    async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let tables = self.tables.lock().expect("memory store lock poisoned");
        Ok(tables.get(&table).and_then(|t| t.get(key)).cloned())
    }

    async fn scan(
        &self,
        table: Table,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> StoreResult<Vec<Entry>> {
        let tables = self.tables.lock().expect("memory store lock poisoned");
        let Some(t) = tables.get(&table) else {
            return Ok(Vec::new());
        };
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let iter = t.range::<[u8], _>((
            range.start.as_ref().map(Vec::as_slice),
            range.end.as_ref().map(Vec::as_slice),
        ));
        let clone = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        Ok(match direction {
            Direction::Forward => iter.take(limit).map(clone).collect(),
            Direction::Backward => iter.rev().take(limit).map(clone).collect(),
        })
    }

    async fn write(&self, batch: WriteBatch) -> StoreResult<()> {
        let mut tables = self.tables.lock().expect("memory store lock poisoned");
        for op in batch.ops {
            match op {
                Op::Put { table, key, value } => {
                    tables.entry(table).or_default().insert(key, value);
                }
                Op::Delete { table, key } => {
                    if let Some(t) = tables.get_mut(&table) {
                        t.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    async fn snapshot(&self) -> StoreResult<Snapshot> {
        let tables = self.tables.lock().expect("memory store lock poisoned");
        Ok(Table::ALL
            .into_iter()
            .map(|t| {
                let entries = tables.get(&t).map_or_else(Vec::new, |m| {
                    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                });
                (t, entries)
            })
            .collect())
    }
}
