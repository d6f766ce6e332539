//! The data schema version (kept in the `meta` table) and the migrations between versions.
//!
//! Every store is stamped with the schema version of the code that created it. Opening an older
//! store runs each migration step in turn; each step's changes and the new version number are
//! written in one atomic batch, so a crash mid-upgrade leaves a store at a consistent version.

use super::{is_empty, MaybeSendFuture, Store, StoreError, StoreResult, Table, WriteBatch};

/// The schema this build reads and writes.
pub const CURRENT_SCHEMA_VERSION: u32 = 1;

/// Key of the version stamp in [`Table::Meta`].
pub const SCHEMA_VERSION_KEY: &[u8] = b"schema_version";

/// One upgrade step: reads the store at version `from` and returns the batch that brings it to
/// `from + 1`.
pub struct Migration {
    pub from: u32,
    pub run: for<'a> fn(&'a dyn Store) -> MaybeSendFuture<'a, StoreResult<WriteBatch>>,
}

/// The upgrade steps of this build, oldest first. Version 1 is the first released layout.
pub const MIGRATIONS: &[Migration] = &[];

pub async fn read_version(store: &dyn Store) -> StoreResult<Option<u32>> {
    let Some(raw) = store.get(Table::Meta, SCHEMA_VERSION_KEY).await? else {
        return Ok(None);
    };
    decode_version(&raw).map(Some)
}

/// The stored form of a version stamp: u32 big-endian.
pub fn decode_version(raw: &[u8]) -> StoreResult<u32> {
    let bytes: [u8; 4] = raw
        .try_into()
        .map_err(|_| StoreError::Corrupt("schema version is not 4 bytes".into()))?;
    Ok(u32::from_be_bytes(bytes))
}

pub fn stamp(batch: &mut WriteBatch, version: u32) {
    batch.put(Table::Meta, SCHEMA_VERSION_KEY, version.to_be_bytes());
}

/// Brings `store` to this build's schema: stamps a new store, migrates an older one.
pub async fn prepare(store: &dyn Store) -> StoreResult<u32> {
    migrate(store, CURRENT_SCHEMA_VERSION, MIGRATIONS).await
}

/// Brings `store` to `target` using `migrations` (exposed so tests can exercise the mechanism
/// with steps beyond this build's schema).
pub async fn migrate(store: &dyn Store, target: u32, migrations: &[Migration]) -> StoreResult<u32> {
    let mut version = match read_version(store).await? {
        Some(v) => v,
        None if is_empty(store).await? => {
            let mut batch = WriteBatch::new();
            stamp(&mut batch, target);
            store.write(batch).await?;
            return Ok(target);
        }
        None => {
            return Err(StoreError::Corrupt(
                "store holds data but no schema version".into(),
            ))
        }
    };
    if version > target {
        return Err(StoreError::TooNew {
            found: version,
            supported: target,
        });
    }
    while version < target {
        let step = migrations
            .iter()
            .find(|m| m.from == version)
            .ok_or(StoreError::NoMigration(version))?;
        let mut batch = (step.run)(store).await?;
        stamp(&mut batch, version + 1);
        store.write(batch).await?;
        tracing::info!(from = version, to = version + 1, "store schema migrated");
        version += 1;
    }
    Ok(version)
}
