//! The media repository of one profile: uploaded files in the store's `media` table, in chunks,
//! so no file has to be one value or wholly in memory.
//!
//! - `info\0<media id>` → [`MediaInfo`] (JSON): what a download needs before the first byte
//! - `chunk\0<media id>\0<index, u32 big-endian>` → up to [`CHUNK_BYTES`] of the file
//! - `partial\0<media id>` → a file being written; chunks of ids named here but without `info`
//!   are what a crash left, and are deleted when the store opens ([`MediaStore::sweep`])
//! - `pending\0<media id>` → `{"uploader", "expires_ms"}`: an id handed out by `/create`, until
//!   its content is uploaded
//! - `used` → the bytes of every complete file (u64 big-endian), for the quota
//! - `ref\0<media id>\0<room id>\0<event id>` → an event of this server's users that names
//!   `mxc://<this server>/<media id>`: servers that may see that event may fetch the file. An
//!   empty event id stands for the room itself: a file uploaded for an encrypted room, whose
//!   events the servers cannot read, and a send whose event id is not known yet
//!
//! Files of other servers, fetched for this server's users, are kept under `<server>~<id>`
//! (`~` is not a media id character, so nobody can upload to or ask for such a key as an id of
//! this server).
//!
//! A file becomes visible in one write: its `info`, its last chunk and the new `used` total
//! together. Until then nothing serves it, and a failed upload deletes what it wrote.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::{Direction, KeyRange, SharedStore, StoreError, Table, WriteBatch};

/// Bytes per stored chunk: big enough that a 100 MB file is 400 writes, small enough that a
/// read holds little.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// The largest file one upload may be (`m.upload.size`).
pub const MAX_UPLOAD_BYTES: u64 = 100 * 1024 * 1024;
/// Bytes of complete files a profile may hold.
pub const QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Ids handed out by `/create` that are not uploaded yet, per user, and how long each lasts.
pub const MAX_PENDING_PER_USER: usize = 16;
pub const PENDING_MS: u64 = 24 * 60 * 60 * 1000;
/// Length of a media id (letters and digits).
const ID_LEN: usize = 24;

const USED_KEY: &[u8] = b"used";

/// What is known of a stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaInfo {
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    pub size: u64,
    pub uploader: String,
    pub created_ms: u64,
    /// SHA-256 of the content, hex.
    #[serde(default)]
    pub sha256: String,
}

impl MediaInfo {
    pub fn chunks(&self) -> u32 {
        u32::try_from(self.size.div_ceil(CHUNK_BYTES as u64)).unwrap_or(u32::MAX)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("the file is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the media store is full ({used} of {quota} bytes used)")]
    QuotaFull { used: u64, quota: u64 },
    #[error("the upload ended after {got} of the {expected} bytes it announced")]
    Truncated { got: u64, expected: u64 },
    #[error("the upload sent more than the {expected} bytes it announced")]
    Overlong { expected: u64 },
    #[error("the content does not match the digest its server announced")]
    Mismatch,
    #[error("this media id already has content, or another upload is writing it")]
    Taken,
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("stored media is damaged: {0}")]
    Corrupt(String),
}

/// Whether `id` can be a media id of this server: 1–255 characters of `[A-Za-z0-9_-]`, so it
/// never carries a path or a separator.
pub fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where a file of another server is kept here.
pub fn remote_key(server: &str, id: &str) -> String {
    format!("{server}~{id}")
}

/// The `mxc://<server>/<id>` ids of `server` that a piece of event content names (at most 16).
pub fn media_ids_in(content: &serde_json::Value, server: &str) -> Vec<String> {
    let prefix = format!("mxc://{server}/");
    let mut out = Vec::new();
    let mut stack = vec![content];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::String(s) => {
                if let Some(id) = s.strip_prefix(&prefix) {
                    if valid_media_id(id) && !out.iter().any(|o| o == id) && out.len() < 16 {
                        out.push(id.to_owned());
                    }
                }
            }
            serde_json::Value::Array(a) => stack.extend(a),
            serde_json::Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
    out
}

/// A new media id.
pub fn new_media_id() -> String {
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(ID_LEN)
        .map(char::from)
        .collect()
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

fn info_key(id: &str) -> Vec<u8> {
    key(&[b"info", id.as_bytes()])
}

fn partial_key(id: &str) -> Vec<u8> {
    key(&[b"partial", id.as_bytes()])
}

fn pending_key(id: &str) -> Vec<u8> {
    key(&[b"pending", id.as_bytes()])
}

fn ref_key(id: &str, room: &str, event: &str) -> Vec<u8> {
    key(&[b"ref", id.as_bytes(), room.as_bytes(), event.as_bytes()])
}

fn chunk_prefix(id: &str) -> Vec<u8> {
    let mut k = key(&[b"chunk", id.as_bytes()]);
    k.push(0);
    k
}

fn chunk_key(id: &str, index: u32) -> Vec<u8> {
    let mut k = chunk_prefix(id);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn corrupt(e: impl fmt::Display) -> MediaError {
    MediaError::Corrupt(e.to_string())
}

/// The media table of one store.
#[derive(Clone)]
pub struct MediaStore {
    store: SharedStore,
    /// Held while the quota total is read and written.
    used_lock: std::sync::Arc<futures::lock::Mutex<()>>,
    /// Ids some upload is writing right now: a second upload to one waits for nobody, it is
    /// refused.
    writing: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl MediaStore {
    pub fn new(store: SharedStore) -> Self {
        Self {
            store,
            used_lock: Default::default(),
            writing: Default::default(),
        }
    }

    /// Deletes what uploads interrupted by a crash left behind.
    pub async fn sweep(&self) -> Result<usize, MediaError> {
        let partial = self
            .store
            .scan(
                Table::Media,
                KeyRange::prefix(b"partial\0"),
                Direction::Forward,
                usize::MAX,
            )
            .await?;
        for (k, _) in &partial {
            let id = String::from_utf8_lossy(&k[b"partial\0".len()..]).into_owned();
            self.delete_chunks(&id, Some(&partial_key(&id))).await?;
        }
        Ok(partial.len())
    }

    /// What is known of the file kept under `id` (a media id of this server, or a
    /// [`remote_key`]).
    pub async fn info(&self, id: &str) -> Result<Option<MediaInfo>, MediaError> {
        self.get_json(&info_key(id)).await
    }

    /// A JSON record of the media table.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
    ) -> Result<Option<T>, MediaError> {
        match self.store.get(Table::Media, k).await? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(corrupt),
            None => Ok(None),
        }
    }

    /// Chunk `index` of a complete file.
    pub async fn chunk(&self, id: &str, index: u32) -> Result<Vec<u8>, MediaError> {
        self.store
            .get(Table::Media, &chunk_key(id, index))
            .await?
            .ok_or_else(|| corrupt(format!("{id} has no chunk {index}")))
    }

    /// Up to `len` bytes of a complete file from `offset` (fewer at its end).
    pub async fn read(
        &self,
        id: &str,
        info: &MediaInfo,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, MediaError> {
        let end = info.size.min(offset.saturating_add(len as u64));
        let mut out = Vec::with_capacity(usize::try_from(end.saturating_sub(offset)).unwrap_or(0));
        let mut pos = offset;
        while pos < end {
            let index = u32::try_from(pos / CHUNK_BYTES as u64).map_err(corrupt)?;
            let chunk = self.chunk(id, index).await?;
            let start = (pos % CHUNK_BYTES as u64) as usize;
            let take = (chunk.len().saturating_sub(start)).min((end - pos) as usize);
            if take == 0 {
                return Err(corrupt(format!("{id} is shorter than its size")));
            }
            out.extend_from_slice(&chunk[start..start + take]);
            pos += take as u64;
        }
        Ok(out)
    }

    /// Notes that `event` in `room` (or the room itself, for `None`) names this server's
    /// media `ids`.
    pub async fn add_refs(
        &self,
        ids: &[String],
        room: &str,
        event: Option<&str>,
    ) -> Result<(), MediaError> {
        let mut batch = WriteBatch::new();
        for id in ids {
            batch.put(
                Table::Media,
                ref_key(id, room, event.unwrap_or("")),
                Vec::new(),
            );
        }
        if !batch.is_empty() {
            self.store.write(batch).await?;
        }
        Ok(())
    }

    /// Replaces the room-wide references of `ids` in `room` with `event`'s, once the event a
    /// send made is known.
    pub async fn settle_refs(
        &self,
        ids: &[String],
        room: &str,
        event: &str,
    ) -> Result<(), MediaError> {
        let mut batch = WriteBatch::new();
        for id in ids {
            batch.put(Table::Media, ref_key(id, room, event), Vec::new());
            batch.delete(Table::Media, ref_key(id, room, ""));
        }
        if !batch.is_empty() {
            self.store.write(batch).await?;
        }
        Ok(())
    }

    /// Where this server's media `id` is named: (room, event or `None` for the room itself),
    /// at most `limit`.
    pub async fn refs(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<(String, Option<String>)>, MediaError> {
        let mut prefix = key(&[b"ref", id.as_bytes()]);
        prefix.push(0);
        let entries = self
            .store
            .scan(
                Table::Media,
                KeyRange::prefix(&prefix),
                Direction::Forward,
                limit,
            )
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, _)| {
                let rest = String::from_utf8(k[prefix.len()..].to_vec()).ok()?;
                let (room, event) = rest.split_once('\0')?;
                Some((
                    room.to_owned(),
                    (!event.is_empty()).then(|| event.to_owned()),
                ))
            })
            .collect())
    }

    /// Bytes of complete files held.
    pub async fn used(&self) -> Result<u64, MediaError> {
        Ok(match self.store.get(Table::Media, USED_KEY).await? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(corrupt)?),
            None => 0,
        })
    }

    /// Hands out an id for an upload to come (`/create`). At most [`MAX_PENDING_PER_USER`] wait
    /// per user; expired ones are dropped first.
    pub async fn reserve(&self, uploader: &str, now_ms: u64) -> Result<Option<String>, MediaError> {
        let pending = self.pending_entries().await?;
        let mut batch = WriteBatch::new();
        let mut mine = 0;
        for (id, record) in &pending {
            if record.expires_ms <= now_ms {
                batch.delete(Table::Media, pending_key(id));
            } else if record.uploader == uploader {
                mine += 1;
            }
        }
        if mine >= MAX_PENDING_PER_USER {
            self.store.write(batch).await?;
            return Ok(None);
        }
        let id = new_media_id();
        let record = Pending {
            uploader: uploader.to_owned(),
            expires_ms: now_ms + PENDING_MS,
        };
        batch.put(
            Table::Media,
            pending_key(&id),
            serde_json::to_vec(&record).expect("pending record serialises"),
        );
        self.store.write(batch).await?;
        Ok(Some(id))
    }

    /// Who reserved `id` and until when, if it still waits for its content.
    pub async fn pending(&self, id: &str) -> Result<Option<Pending>, MediaError> {
        if !valid_media_id(id) {
            return Ok(None);
        }
        self.get_json(&pending_key(id)).await
    }

    async fn pending_entries(&self) -> Result<Vec<(String, Pending)>, MediaError> {
        let entries = self
            .store
            .scan(
                Table::Media,
                KeyRange::prefix(b"pending\0"),
                Direction::Forward,
                usize::MAX,
            )
            .await?;
        entries
            .into_iter()
            .map(|(k, v)| {
                let id = String::from_utf8_lossy(&k[b"pending\0".len()..]).into_owned();
                Ok((id, serde_json::from_slice(&v).map_err(corrupt)?))
            })
            .collect()
    }

    /// Starts writing file `id` of `expected` bytes (if announced). Refuses a file over the
    /// upload limit or the quota before anything is stored, and an id another upload is
    /// writing or that already has content.
    pub async fn writer(
        &self,
        id: String,
        expected: Option<u64>,
    ) -> Result<MediaWriter, MediaError> {
        if let Some(n) = expected {
            self.check_room(n).await?;
        }
        if !self.writing.lock().expect("media lock").insert(id.clone()) {
            return Err(MediaError::Taken);
        }
        let claim = Claim {
            writing: self.writing.clone(),
            id: id.clone(),
        };
        if self.info(&id).await?.is_some() {
            return Err(MediaError::Taken);
        }
        Ok(MediaWriter {
            _claim: claim,
            media: self.clone(),
            id,
            expected,
            buf: Vec::with_capacity(CHUNK_BYTES),
            written: 0,
            chunks: 0,
            started: false,
            digest: sha2::Sha256::default(),
        })
    }

    async fn check_room(&self, size: u64) -> Result<(), MediaError> {
        if size > MAX_UPLOAD_BYTES {
            return Err(MediaError::TooLarge {
                limit: MAX_UPLOAD_BYTES,
            });
        }
        let used = self.used().await?;
        if used.saturating_add(size) > QUOTA_BYTES {
            return Err(MediaError::QuotaFull {
                used,
                quota: QUOTA_BYTES,
            });
        }
        Ok(())
    }

    /// Deletes the chunks of `id`, and `also` in the same last write.
    async fn delete_chunks(&self, id: &str, also: Option<&[u8]>) -> Result<(), MediaError> {
        let prefix = chunk_prefix(id);
        loop {
            // Keys only matter here, but the store reads values too: a few at a time.
            let chunks = self
                .store
                .scan(
                    Table::Media,
                    KeyRange::prefix(&prefix),
                    Direction::Forward,
                    16,
                )
                .await?;
            let last = chunks.len() < 16;
            let mut batch = WriteBatch::new();
            for (k, _) in chunks {
                batch.delete(Table::Media, k);
            }
            if last {
                if let Some(k) = also {
                    batch.delete(Table::Media, k.to_vec());
                }
            }
            if !batch.is_empty() {
                self.store.write(batch).await?;
            }
            if last {
                return Ok(());
            }
        }
    }
}

/// An id being written, released when its writer goes.
struct Claim {
    writing: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.writing.lock().expect("media lock").remove(&self.id);
    }
}

/// An id reserved by `/create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub uploader: String,
    pub expires_ms: u64,
}

/// A file being written, chunk by chunk. Nothing of it is served until [`MediaWriter::finish`];
/// dropping it unfinished leaves chunks that [`MediaWriter::abort`] (or the next
/// [`MediaStore::sweep`]) deletes.
pub struct MediaWriter {
    _claim: Claim,
    media: MediaStore,
    id: String,
    expected: Option<u64>,
    buf: Vec<u8>,
    written: u64,
    chunks: u32,
    started: bool,
    digest: sha2::Sha256,
}

impl MediaWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Takes the next bytes of the file.
    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), MediaError> {
        let total = self.written + self.buf.len() as u64 + bytes.len() as u64;
        match self.expected {
            Some(expected) if total > expected => return Err(MediaError::Overlong { expected }),
            None if total > MAX_UPLOAD_BYTES => {
                return Err(MediaError::TooLarge {
                    limit: MAX_UPLOAD_BYTES,
                })
            }
            _ => {}
        }
        sha2::Digest::update(&mut self.digest, bytes);
        while !bytes.is_empty() {
            let take = (CHUNK_BYTES - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == CHUNK_BYTES && !bytes.is_empty() {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Writes the full chunk in the buffer (the last one waits for `finish`).
    async fn flush(&mut self) -> Result<(), MediaError> {
        let mut batch = WriteBatch::new();
        if !self.started {
            // Named before its first chunk, so a crash from here on is swept.
            batch.put(Table::Media, partial_key(&self.id), Vec::new());
            self.started = true;
        }
        batch.put(
            Table::Media,
            chunk_key(&self.id, self.chunks),
            std::mem::take(&mut self.buf),
        );
        self.media.store.write(batch).await?;
        self.buf.reserve(CHUNK_BYTES);
        self.written += CHUNK_BYTES as u64;
        self.chunks += 1;
        Ok(())
    }

    /// Makes the file visible, with its last chunk, in one write: its info, the new quota
    /// total, and the `/create` reservation (if any) gone. On an error nothing is visible and
    /// the chunks written are deleted.
    /// `expected_sha256` (hex), when given, must be the content's digest.
    pub async fn finish(
        mut self,
        content_type: String,
        file_name: Option<String>,
        uploader: &str,
        now_ms: u64,
        expected_sha256: Option<&str>,
    ) -> Result<MediaInfo, MediaError> {
        let size = self.written + self.buf.len() as u64;
        if let Some(expected) = self.expected.filter(|e| size < *e) {
            self.abort().await;
            return Err(MediaError::Truncated {
                got: size,
                expected,
            });
        }
        let sha256 = hex::encode(sha2::Digest::finalize(std::mem::take(&mut self.digest)));
        if expected_sha256.is_some_and(|e| !e.eq_ignore_ascii_case(&sha256)) {
            self.abort().await;
            return Err(MediaError::Mismatch);
        }
        let info = MediaInfo {
            content_type,
            file_name,
            size,
            uploader: uploader.to_owned(),
            created_ms: now_ms,
            sha256,
        };
        let media = self.media.clone();
        let result = async {
            let _used = media.used_lock.lock().await;
            media.check_room(size).await?;
            let used = media.used().await?;
            let mut batch = WriteBatch::new();
            if !self.buf.is_empty() {
                batch.put(
                    Table::Media,
                    chunk_key(&self.id, self.chunks),
                    std::mem::take(&mut self.buf),
                );
            }
            batch.put(
                Table::Media,
                info_key(&self.id),
                serde_json::to_vec(&info).expect("media info serialises"),
            );
            batch.put(Table::Media, USED_KEY, (used + size).to_be_bytes().to_vec());
            batch.delete(Table::Media, partial_key(&self.id));
            batch.delete(Table::Media, pending_key(&self.id));
            media.store.write(batch).await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(info),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Deletes what was written (best effort: what is left is swept at the next start).
    pub async fn abort(self) {
        if !self.started {
            return;
        }
        if let Err(e) = self
            .media
            .delete_chunks(&self.id, Some(&partial_key(&self.id)))
            .await
        {
            tracing::warn!(media = %self.id, error = %e, "an aborted upload's chunks stay until the next start");
        }
    }
}
