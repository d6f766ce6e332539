//! Durable storage: one ordered key-value interface with three backends (memory, redb on disk,
//! IndexedDB in the browser), its schema version and migrations, and whole-store export/import.
//!
//! This layer knows nothing about Matrix: keys and values are bytes, tables are fixed names. The
//! engine owns the meaning of every key. A successful [`Store::write`] means the batch is committed
//! (redb commit, IndexedDB transaction `complete`) — callers rely on that before acknowledging.

pub mod export;
pub mod memory;
pub mod schema;

#[cfg(target_arch = "wasm32")]
pub mod indexeddb;
#[cfg(not(target_arch = "wasm32"))]
pub mod redb;

use std::ops::Bound;

use async_trait::async_trait;

/// The tables (redb tables / IndexedDB object stores) every backend provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Schema version, identity, counters.
    Meta,
    /// Event id -> stored event (canonical JSON + status + state groups).
    Events,
    /// Room id, stream ordering -> event id: the timeline of each room in stream order.
    Timeline,
    /// State group id -> delta against its parent group (or a full snapshot).
    StateGroups,
    /// Room id -> room record (version, forward extremities, current state group).
    Rooms,
    /// Event id -> an invite to a room on another peer, until it is answered.
    Invites,
    /// Event id, stream ordering -> id of an accepted event relating to it (redactions and
    /// `m.relates_to` relations: edits, reactions, replies in threads).
    Relations,
    /// Client-API accounts: users, devices, access tokens.
    Accounts,
    /// Client-API per-user data: account data, filters, transaction ids, receipts, aliases,
    /// device keys, to-device messages.
    ClientData,
    /// Uploaded files, in chunks, with what is known of each (see [`crate::media`]).
    Media,
}

impl Table {
    pub const ALL: [Table; 10] = [
        Table::Meta,
        Table::Events,
        Table::Timeline,
        Table::StateGroups,
        Table::Rooms,
        Table::Invites,
        Table::Relations,
        Table::Accounts,
        Table::ClientData,
        Table::Media,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Events => "events",
            Table::Timeline => "timeline",
            Table::StateGroups => "state_groups",
            Table::Rooms => "rooms",
            Table::Invites => "invites",
            Table::Relations => "relations",
            Table::Accounts => "accounts",
            Table::ClientData => "client_data",
            Table::Media => "media",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// One change in a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
}

/// Changes applied atomically and durably by [`Store::write`], in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<Op>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put {
            table,
            key: key.into(),
            value: value.into(),
        });
    }

    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete {
            table,
            key: key.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A key range for [`Store::scan`]: byte-wise ordered, like both backends.
#[derive(Clone, Debug)]
pub struct KeyRange {
    pub start: Bound<Vec<u8>>,
    pub end: Bound<Vec<u8>>,
}

impl KeyRange {
    pub fn all() -> Self {
        Self {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
        }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        let end = prefix_successor(prefix).map_or(Bound::Unbounded, Bound::Excluded);
        Self {
            start: Bound::Included(prefix.to_vec()),
            end,
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        let after_start = match &self.start {
            Bound::Included(s) => key >= s.as_slice(),
            Bound::Excluded(s) => key > s.as_slice(),
            Bound::Unbounded => true,
        };
        let before_end = match &self.end {
            Bound::Included(e) => key <= e.as_slice(),
            Bound::Excluded(e) => key < e.as_slice(),
            Bound::Unbounded => true,
        };
        after_start && before_end
    }

    /// True when no key can lie in the range (IndexedDB refuses such ranges, so we short-cut).
    pub fn is_empty(&self) -> bool {
        match (&self.start, &self.end) {
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s), Bound::Excluded(e))
            | (Bound::Excluded(s), Bound::Included(e))
            | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
            _ => false,
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (None if there is none).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// A key and its value, as returned by [`Store::scan`].
pub type Entry = (Vec<u8>, Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend failed: {0}")]
    Backend(String),
    #[error("the transaction did not commit: {0}")]
    NotCommitted(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store schema version {found} is newer than this build supports ({supported})")]
    TooNew { found: u32, supported: u32 },
    #[error("no migration from schema version {0}")]
    NoMigration(u32),
    #[error("import needs an empty store")]
    NotEmpty,
    #[error("export file is invalid at line {line}: {reason}")]
    BadExport { line: usize, reason: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An ordered key-value store with atomic, durable batches.
///
/// Native futures are `Send` (the node runs on a multi-threaded runtime); in the browser nothing
/// is `Send`, so the trait drops that bound there.
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
pub trait Store: MaybeSendSync {
    async fn get(&self, table: Table, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;

    /// Several lookups at once (one read transaction where the backend has them).
    async fn get_many(&self, table: Table, keys: &[&[u8]]) -> StoreResult<Vec<Option<Vec<u8>>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(table, key).await?);
        }
        Ok(out)
    }

    /// Entries whose keys lie in `range`, in key order (or reverse), at most `limit` of them.
    async fn scan(
        &self,
        table: Table,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> StoreResult<Vec<Entry>>;

    /// Applies every op of the batch atomically; returns once the batch is durable.
    async fn write(&self, batch: WriteBatch) -> StoreResult<()>;

    /// Every entry of every table as of one instant (one read transaction), tables in
    /// [`Table::ALL`] order: a concurrent [`Store::write`] is in it wholly or not at all. Reading
    /// table by table instead lets a batch land in between, and an export made so pairs counters
    /// in `meta` with rows written after them.
    async fn snapshot(&self) -> StoreResult<Snapshot>;
}

/// Every table's entries in key order, as [`Store::snapshot`] returns them.
pub type Snapshot = Vec<(Table, Vec<Entry>)>;

#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSendSync: Send + Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + Sync> MaybeSendSync for T {}
#[cfg(target_arch = "wasm32")]
pub trait MaybeSendSync {}
#[cfg(target_arch = "wasm32")]
impl<T> MaybeSendSync for T {}

/// A shareable handle to any backend.
#[cfg(not(target_arch = "wasm32"))]
pub type SharedStore = std::sync::Arc<dyn Store>;
#[cfg(target_arch = "wasm32")]
pub type SharedStore = std::rc::Rc<dyn Store>;

/// Reads a whole table in key order, in pages, so large tables never need one huge read.
pub async fn scan_all(store: &dyn Store, table: Table) -> StoreResult<Vec<Entry>> {
    const PAGE: usize = 4096;
    let mut out = Vec::new();
    let mut range = KeyRange::all();
    loop {
        let page = store
            .scan(table, range.clone(), Direction::Forward, PAGE)
            .await?;
        let done = page.len() < PAGE;
        if let Some((last, _)) = page.last() {
            range.start = Bound::Excluded(last.clone());
        }
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// A boxed future that is `Send` natively and need not be in the browser.
#[cfg(not(target_arch = "wasm32"))]
pub type MaybeSendFuture<'a, T> = futures::future::BoxFuture<'a, T>;
#[cfg(target_arch = "wasm32")]
pub type MaybeSendFuture<'a, T> = futures::future::LocalBoxFuture<'a, T>;

/// True when no table holds any entry.
pub async fn is_empty(store: &dyn Store) -> StoreResult<bool> {
    for table in Table::ALL {
        if !store
            .scan(table, KeyRange::all(), Direction::Forward, 1)
            .await?
            .is_empty()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_cover_exactly_the_prefix() {
        let r = KeyRange::prefix(b"ab");
        assert!(r.contains(b"ab"));
        assert!(r.contains(b"ab\xff\xff"));
        assert!(!r.contains(b"ac"));
        assert!(!r.contains(b"aa\xff"));
        let r = KeyRange::prefix(b"a\xff");
        assert!(r.contains(b"a\xff\x00"));
        assert!(!r.contains(b"b"));
        assert!(KeyRange::prefix(b"\xff\xff").contains(b"\xff\xff\xff"));
    }
}
