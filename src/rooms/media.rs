//! Media across peers. A file lives on its uploader's server; another server's users get it
//! through their own server, which asks the file's server with `GetMedia`, part by part.
//!
//! The room service decides who may fetch: a server may have `mxc://<this server>/<id>` only if
//! it may read a room where an event of this server's users names that id (the same rule as
//! for the room's events). Anything else is answered as if there were no such file.

use ruma::{EventId, RoomId};

use super::visibility::ServerView;
use super::{NodeError, P2pNode};
use crate::identity::ServerName;
use crate::media::{media_ids_in, MediaError, MediaStore, MediaWriter, MAX_UPLOAD_BYTES};
use crate::net::protocol::{FedErrorCode, FedRequest, FedResponse, MEDIA_PART_BYTES};

/// Rooms naming one file that are looked at when a server asks for it.
const MAX_REFS_CHECKED: usize = 200;

fn no_such_media() -> FedResponse {
    FedResponse::error(FedErrorCode::NotFound, "no such media")
}

/// Why a file could not be fetched from its server.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the file's server answered: {0}")]
    Refused(String),
    #[error("{0}")]
    Node(#[from] NodeError),
    #[error("{0}")]
    Media(#[from] MediaError),
    #[error("the file's server sent a bad answer: {0}")]
    BadAnswer(String),
}

impl P2pNode {
    /// Notes the media of this server that a local event names, so the servers that may see
    /// `event` may fetch it. `None` before the event exists: the room stands in for it until
    /// [`P2pNode::settle_media_refs`].
    /// Returns the ids it noted.
    pub(super) async fn note_media_refs(
        &self,
        room: &RoomId,
        content: &serde_json::Value,
        event: Option<&EventId>,
    ) -> Vec<String> {
        let ids = media_ids_in(content, &self.server_name().to_string());
        if ids.is_empty() {
            return ids;
        }
        let media = MediaStore::new(self.shared.engine.store().clone());
        if let Err(e) = media
            .add_refs(&ids, room.as_str(), event.map(EventId::as_str))
            .await
        {
            tracing::warn!(%room, error = %e, "media references not noted");
        }
        ids
    }

    /// Ties the media `ids` a sent event names to that event, in place of its room.
    pub(super) async fn settle_media_refs(&self, room: &RoomId, ids: &[String], event: &EventId) {
        if ids.is_empty() {
            return;
        }
        let media = MediaStore::new(self.shared.engine.store().clone());
        if let Err(e) = media.settle_refs(ids, room.as_str(), event.as_str()).await {
            tracing::warn!(%room, error = %e, "media references not settled");
        }
    }

    /// Answers `GetMedia` from `asker`.
    pub(super) async fn answer_get_media(
        &self,
        asker: &ServerName,
        media_id: &str,
        offset: u64,
    ) -> Result<FedResponse, NodeError> {
        let media = MediaStore::new(self.shared.engine.store().clone());
        let refused =
            |e: MediaError| NodeError::Store(crate::store::StoreError::Backend(e.to_string()));
        let Some(info) = media.info(media_id).await.map_err(refused)? else {
            return Ok(no_such_media());
        };
        let mut entitled = false;
        for (room, event) in media
            .refs(media_id, MAX_REFS_CHECKED)
            .await
            .map_err(refused)?
        {
            let Ok(room) = RoomId::parse(&room) else {
                continue;
            };
            let Some(view) = ServerView::new(&self.shared.engine, &room, asker).await? else {
                continue;
            };
            if !view.may_read_room() {
                continue;
            }
            // Named by an event: the asker must be allowed to see that event (history
            // visibility), not merely be in its room.
            entitled = match event.as_deref().map(EventId::parse) {
                None => true,
                Some(Ok(event_id)) => match self.shared.engine.event(&event_id).await? {
                    Some(ev) if ev.pdu.room_id == room => view.may_see(&ev).await?,
                    _ => false,
                },
                Some(Err(_)) => false,
            };
            if entitled {
                break;
            }
        }
        if !entitled {
            tracing::info!(server = %asker, media_id, "media refused: it sees no event that names it");
            return Ok(no_such_media());
        }
        if offset > info.size {
            return Ok(FedResponse::error(
                FedErrorCode::BadRequest,
                "offset past the end",
            ));
        }
        let bytes = media
            .read(media_id, &info, offset, MEDIA_PART_BYTES)
            .await
            .map_err(refused)?;
        Ok(FedResponse::Media {
            content_type: info.content_type,
            size: info.size,
            sha256: info.sha256,
            bytes,
        })
    }

    /// Fetches `mxc://<server>/<media_id>` from its server into `writer`, part by part, each
    /// checked against what the first announced; the digest is checked by the writer's
    /// `finish`. Returns the content type, size and digest.
    pub async fn fetch_media(
        &self,
        server: &ServerName,
        media_id: &str,
        writer: &mut MediaWriter,
    ) -> Result<(String, u64, String), FetchError> {
        let mut offset = 0u64;
        let mut first: Option<(String, u64, String)> = None;
        loop {
            let request = FedRequest::GetMedia {
                media_id: media_id.to_owned(),
                offset,
            };
            let answer = match self.request(server.peer_id(), request).await {
                Ok(a) => a,
                Err(NodeError::Refused(_, message)) => return Err(FetchError::Refused(message)),
                Err(e) => return Err(e.into()),
            };
            let FedResponse::Media {
                content_type,
                size,
                sha256,
                bytes,
            } = answer
            else {
                return Err(FetchError::BadAnswer("not a media answer".into()));
            };
            match &first {
                None => {
                    if size > MAX_UPLOAD_BYTES {
                        return Err(MediaError::TooLarge {
                            limit: MAX_UPLOAD_BYTES,
                        }
                        .into());
                    }
                    first = Some((content_type, size, sha256));
                }
                Some((ct, sz, digest)) => {
                    if *ct != content_type || *sz != size || *digest != sha256 {
                        return Err(FetchError::BadAnswer(
                            "the file changed between parts".into(),
                        ));
                    }
                }
            }
            let want = (size - offset).min(MEDIA_PART_BYTES as u64);
            if bytes.len() as u64 != want {
                return Err(FetchError::BadAnswer(format!(
                    "{} bytes at {offset}, where {want} were due",
                    bytes.len()
                )));
            }
            writer.write(&bytes).await?;
            offset += want;
            if offset >= size {
                return Ok(first.expect("set by the first answer"));
            }
        }
    }
}
