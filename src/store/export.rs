//! Whole-store export and import, for backups and for moving a profile between browsers or from
//! a browser to a node.
//!
//! The format is JSON lines (UTF-8, one JSON object per line):
//! - line 1, the header: `{"format":"hyphae-store-export","version":1,"schema":<schema version>}`
//! - then one line per entry: `{"table":"<table name>","key":"<base64>","value":"<base64>"}`
//!   (standard base64 with padding), tables in [`Table::ALL`] order, keys in byte order, all as
//!   of one instant (one read transaction).
//!
//! Import goes only into an empty store of any backend. The file is parsed and checked in full
//! before anything is written; entries are then written in batches and the schema stamp last, so
//! an interrupted import is recognisable (data but no version) rather than silently partial.
//! A file from an older schema is migrated after import.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::schema::{self, SCHEMA_VERSION_KEY};
use super::{is_empty, Store, StoreError, StoreResult, Table, WriteBatch};

pub const EXPORT_FORMAT: &str = "hyphae-store-export";
pub const EXPORT_FORMAT_VERSION: u32 = 1;
const IMPORT_BATCH: usize = 2000;

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    schema: u32,
}

#[derive(Serialize, Deserialize)]
struct Record {
    table: String,
    key: String,
    value: String,
}

/// Serialises every entry of `store` (except the schema stamp, carried in the header), all from
/// one [`Store::snapshot`]: the store may keep taking writes meanwhile (a tab keeps syncing),
/// and the file still shows it as of one instant, counters in `meta` agreeing with the rows.
/// Recomputing counters on import instead would mean knowing what every counter counts (the
/// engine's business, not the store's) and would still leave other rows of a write torn apart.
pub async fn export(store: &dyn Store) -> StoreResult<String> {
    let snapshot = store.snapshot().await?;
    let schema = snapshot
        .iter()
        .find(|(table, _)| *table == Table::Meta)
        .and_then(|(_, entries)| entries.iter().find(|(k, _)| k == SCHEMA_VERSION_KEY))
        .map(|(_, v)| schema::decode_version(v))
        .transpose()?
        .ok_or_else(|| {
            StoreError::Corrupt("cannot export a store with no schema version".into())
        })?;
    let header = Header {
        format: EXPORT_FORMAT.into(),
        version: EXPORT_FORMAT_VERSION,
        schema,
    };
    let mut out = serde_json::to_string(&header).expect("header serialises");
    out.push('\n');
    for (table, entries) in snapshot {
        for (key, value) in entries {
            if table == Table::Meta && key == SCHEMA_VERSION_KEY {
                continue;
            }
            let record = Record {
                table: table.name().into(),
                key: B64.encode(&key),
                value: B64.encode(&value),
            };
            out.push_str(&serde_json::to_string(&record).expect("record serialises"));
            out.push('\n');
        }
    }
    Ok(out)
}

/// Loads an export into an empty store; returns the number of entries written.
pub async fn import(store: &dyn Store, data: &str) -> StoreResult<usize> {
    let bad = |line: usize, reason: String| StoreError::BadExport { line, reason };
    let mut lines = data
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines.next().ok_or_else(|| bad(1, "empty file".into()))?;
    let header: Header = serde_json::from_str(first).map_err(|e| bad(1, e.to_string()))?;
    if header.format != EXPORT_FORMAT || header.version != EXPORT_FORMAT_VERSION {
        return Err(bad(
            1,
            format!("not a {EXPORT_FORMAT} v{EXPORT_FORMAT_VERSION} file"),
        ));
    }
    if header.schema > schema::CURRENT_SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: header.schema,
            supported: schema::CURRENT_SCHEMA_VERSION,
        });
    }
    let mut entries = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let r: Record = serde_json::from_str(line).map_err(|e| bad(n, e.to_string()))?;
        let table = Table::from_name(&r.table)
            .ok_or_else(|| bad(n, format!("unknown table {}", r.table)))?;
        let key = B64
            .decode(&r.key)
            .map_err(|e| bad(n, format!("key: {e}")))?;
        let value = B64
            .decode(&r.value)
            .map_err(|e| bad(n, format!("value: {e}")))?;
        if table == Table::Meta && key == SCHEMA_VERSION_KEY {
            return Err(bad(n, "schema version belongs in the header".into()));
        }
        entries.push((table, key, value));
    }
    if !is_empty(store).await? {
        return Err(StoreError::NotEmpty);
    }
    let count = entries.len();
    let mut batch = WriteBatch::new();
    for (table, key, value) in entries {
        batch.put(table, key, value);
        if batch.len() >= IMPORT_BATCH {
            store.write(std::mem::take(&mut batch)).await?;
        }
    }
    schema::stamp(&mut batch, header.schema);
    store.write(batch).await?;
    schema::prepare(store).await?;
    Ok(count)
}
