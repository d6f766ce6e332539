//! Media: `POST /_matrix/media/v3/upload`, `POST /_matrix/media/v1/create` with
//! `PUT /_matrix/media/v3/upload/{server}/{id}`, and the authenticated
//! `/_matrix/client/v1/media/{download,thumbnail,config,preview_url}`. The unauthenticated
//! `/_matrix/media/v3/download` and `/thumbnail` are frozen (spec v1.11): they answer
//! `M_NOT_FOUND` for everything, as the spec says for media uploaded after the freeze.
//!
//! An upload's body is the file, not JSON: it is written to the media store chunk by chunk as
//! it arrives ([`Upload`]), so `hyphae-node` streams it from the socket and a tab hands it over
//! in slices.

use http::{header, HeaderValue, Method, StatusCode};
use serde_json::json;

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::{now_ms, ok, url_query, ApiRequest, ApiResponse, ClientApi};
use crate::media::{
    valid_media_id, MediaError, MediaInfo, MediaWriter, CHUNK_BYTES, MAX_UPLOAD_BYTES, PENDING_MS,
};
use crate::net::rt::Duration;
use crate::rooms::media::FetchError;

/// How long a download waits for another server to send a file.
const REMOTE_FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Content types a browser may show in place (the spec's list); anything else downloads as an
/// attachment, so an uploaded page or script never runs on this origin.
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// The longest file name kept with an upload.
const MAX_FILE_NAME: usize = 255;

/// Where an upload goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadTarget {
    /// `POST /upload`: a new id.
    New,
    /// `PUT /upload/{server}/{id}`: an id handed out by `/create`.
    Reserved { server: String, id: String },
}

/// The path below `/_matrix/media/<version>/`, percent-decoded, split on `/`.
pub(super) fn media_path(path: &str) -> Option<Vec<String>> {
    let mut segs = super::decoded_segments(path.strip_prefix("/_matrix/media/")?);
    match segs.first().map(String::as_str) {
        Some("r0" | "v3" | "v1") => {
            segs.remove(0);
            Some(segs)
        }
        _ => None,
    }
}

/// Whether a request is an upload (its body is the file), and where to.
pub fn upload_target(method: &Method, path: &str) -> Option<UploadTarget> {
    let segs = media_path(path)?;
    match (method, segs.as_slice()) {
        (&Method::POST, [upload]) if upload == "upload" => Some(UploadTarget::New),
        (&Method::PUT, [upload, server, id]) if upload == "upload" => {
            Some(UploadTarget::Reserved {
                server: server.clone(),
                id: id.clone(),
            })
        }
        _ => None,
    }
}

/// A `type/subtype` content type (parameters allowed), as RFC 9110 spells tokens.
fn valid_content_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match essence.split_once('/') {
        Some((t, sub)) => token(t) && token(sub) && ct.len() <= 255,
        None => false,
    }
}

fn media_error(e: MediaError) -> ApiError {
    match e {
        MediaError::TooLarge { .. } | MediaError::QuotaFull { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", e.to_string())
        }
        MediaError::Truncated { .. } | MediaError::Overlong { .. } | MediaError::Mismatch => {
            ApiError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", e.to_string())
        }
        MediaError::Taken => ApiError::new(
            StatusCode::CONFLICT,
            "M_CANNOT_OVERWRITE_MEDIA",
            e.to_string(),
        ),
        // The browser's storage for this site is full.
        MediaError::Store(ref s) if s.to_string().contains("QuotaExceeded") => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            "this browser's storage for the site is full: free some space or delete old files",
        ),
        MediaError::Store(_) | MediaError::Corrupt(_) => ApiError::unknown(e.to_string()),
    }
}

/// An upload under way: the bytes go to the store as they come.
pub struct Upload {
    writer: MediaWriter,
    for_room: Option<ruma::OwnedRoomId>,
    content_type: String,
    file_name: Option<String>,
    uploader: String,
    mxc: String,
    reserved: bool,
}

impl Upload {
    pub async fn write(&mut self, bytes: &[u8]) -> ApiResult<()> {
        self.writer.write(bytes).await.map_err(media_error)
    }

    /// Gives up, deleting what was written.
    pub async fn abort(self) {
        self.writer.abort().await;
    }
}

impl ClientApi {
    /// Checks an upload before its body is read: the caller's token, the content type, the
    /// announced size against the limit and the quota, and (for `PUT`) the reserved id.
    pub async fn begin_upload(
        &self,
        parts: &http::request::Parts,
        target: UploadTarget,
    ) -> ApiResult<Upload> {
        if self.node.is_stopped() {
            return Err(ApiError::stopped());
        }
        let head = http::Request::from_parts(parts.clone(), Vec::new());
        let s = self.session(&head).await?;
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "M_MISSING_PARAM",
                    "an upload needs a Content-Type",
                )
            })?
            .to_str()
            .ok()
            .filter(|ct| valid_content_type(ct))
            .ok_or_else(|| ApiError::invalid_param("Content-Type is not a media type"))?
            .to_owned();
        let query = url_query(parts.uri.query().unwrap_or(""));
        let file_name = match query.get("filename") {
            Some(name)
                if name.len() > MAX_FILE_NAME
                    || name
                        .chars()
                        .any(|c| c.is_control() || c == '/' || c == '\\') =>
            {
                return Err(ApiError::invalid_param(
                    "filename must be at most 255 bytes, without control characters or slashes",
                ))
            }
            Some(name) if !name.is_empty() => Some(name.clone()),
            _ => None,
        };
        let expected = match parts.headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| ApiError::invalid_param("Content-Length is not a number"))?,
            ),
            None => None,
        };
        // `org.hyphae.room_id`: the room the file is for, when no event the server can read
        // will name it (an attachment in an encrypted room): the servers of that room may
        // fetch it. The uploader must be joined there.
        let for_room = match query.get("org.hyphae.room_id") {
            Some(room) => {
                let room = ruma::OwnedRoomId::try_from(room.as_str())
                    .map_err(|e| ApiError::invalid_param(format!("bad room id: {e}")))?;
                self.require_joined(&room, &s.user_id).await?;
                Some(room)
            }
            None => None,
        };
        let (id, reserved) = match target {
            UploadTarget::New => (crate::media::new_media_id(), false),
            UploadTarget::Reserved { server, id } => {
                if server != self.node.server_name().to_string() || !valid_media_id(&id) {
                    return Err(ApiError::forbidden("not a media id this server handed out"));
                }
                match self.media.pending(&id).await.map_err(media_error)? {
                    Some(p) if p.uploader == s.user_id.as_str() && p.expires_ms > now_ms() => {}
                    Some(_) | None
                        if self.media.info(&id).await.map_err(media_error)?.is_some() =>
                    {
                        return Err(media_error(MediaError::Taken))
                    }
                    _ => return Err(ApiError::forbidden("not a media id handed out to you")),
                }
                (id, true)
            }
        };
        let writer = self
            .media
            .writer(id.clone(), expected)
            .await
            .map_err(media_error)?;
        Ok(Upload {
            writer,
            for_room,
            content_type,
            file_name,
            uploader: s.user_id.to_string(),
            mxc: format!("mxc://{}/{id}", self.node.server_name()),
            reserved,
        })
    }

    /// Makes an upload's file visible and answers its client.
    pub async fn finish_upload(&self, upload: Upload) -> ApiResult<ApiResponse> {
        let Upload {
            writer,
            for_room,
            content_type,
            file_name,
            uploader,
            mxc,
            reserved,
        } = upload;
        let info = writer
            .finish(content_type, file_name, &uploader, now_ms(), None)
            .await
            .map_err(media_error)?;
        tracing::debug!(%mxc, size = info.size, "media stored");
        if let (Some(room), Some(id)) = (for_room, mxc.rsplit('/').next()) {
            self.media
                .add_refs(&[id.to_owned()], room.as_str(), None)
                .await
                .map_err(media_error)?;
        }
        if reserved {
            ok(json!({}))
        } else {
            ok(json!({ "content_uri": mxc }))
        }
    }

    /// An upload whose body is already in memory (in the tab, and for in-process callers).
    pub(super) async fn upload_whole(
        &self,
        req: ApiRequest,
        target: UploadTarget,
    ) -> ApiResult<ApiResponse> {
        let (parts, body) = req.into_parts();
        if body.len() as u64 > MAX_UPLOAD_BYTES {
            return Err(media_error(MediaError::TooLarge {
                limit: MAX_UPLOAD_BYTES,
            }));
        }
        let mut upload = self.begin_upload(&parts, target).await?;
        for slice in body.chunks(CHUNK_BYTES) {
            if let Err(e) = upload.write(slice).await {
                upload.abort().await;
                return Err(e);
            }
        }
        self.finish_upload(upload).await
    }

    /// `POST /_matrix/media/v1/create`: an id to upload to later.
    pub(super) async fn create_media(&self, s: &Session) -> ApiResult<ApiResponse> {
        let now = now_ms();
        let id = self
            .media
            .reserve(s.user_id.as_str(), now)
            .await
            .map_err(media_error)?
            .ok_or_else(|| ApiError::limit_exceeded(60_000))?;
        ok(json!({
            "content_uri": format!("mxc://{}/{id}", self.node.server_name()),
            "unused_expires_at": now + PENDING_MS,
        }))
    }

    pub(super) fn media_config(&self) -> ApiResult<ApiResponse> {
        ok(json!({ "m.upload.size": MAX_UPLOAD_BYTES }))
    }

    /// A link preview: always empty, since a tab must not fetch arbitrary URLs for its users
    /// (and a node follows the tab's rules).
    pub(super) fn preview_url(&self, req: &ApiRequest) -> ApiResult<ApiResponse> {
        let query = url_query(req.uri().query().unwrap_or(""));
        if query.get("url").is_none_or(|u| u.is_empty()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "M_MISSING_PARAM",
                "url is required",
            ));
        }
        ok(json!({}))
    }

    /// Where the file `mxc://<server>/<id>` is kept here, and what it is: this server's own,
    /// or another's, fetched from its server the first time a user here asks.
    pub(super) async fn media_to_serve(
        &self,
        server: &str,
        id: &str,
    ) -> ApiResult<(String, MediaInfo)> {
        if !valid_media_id(id) {
            return Err(ApiError::not_found("no such media"));
        }
        if server != self.node.server_name().to_string() {
            return self.remote_media(server, id).await;
        }
        match self.media.info(id).await.map_err(media_error)? {
            Some(info) => Ok((id.to_owned(), info)),
            None if self.media.pending(id).await.map_err(media_error)?.is_some() => {
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "M_NOT_YET_UPLOADED",
                    "the media has not been uploaded yet",
                ))
            }
            None => Err(ApiError::not_found("no such media")),
        }
    }

    async fn remote_media(&self, server: &str, id: &str) -> ApiResult<(String, MediaInfo)> {
        let Ok(origin) = server.parse::<crate::identity::ServerName>() else {
            return Err(ApiError::not_found("no such media"));
        };
        let key = crate::media::remote_key(server, id);
        // One fetch per file at a time; whoever waited finds it kept.
        let _fetching = self.txns.lock(format!("media-fetch\0{key}")).await;
        if let Some(info) = self.media.info(&key).await.map_err(media_error)? {
            return Ok((key, info));
        }
        let mut writer = self
            .media
            .writer(key.clone(), None)
            .await
            .map_err(media_error)?;
        let fetched = crate::net::rt::timeout(
            REMOTE_FETCH_TIMEOUT,
            self.node.fetch_media(&origin, id, &mut writer),
        )
        .await;
        let (content_type, _, sha256) = match fetched {
            Some(Ok(done)) => done,
            Some(Err(e)) => {
                writer.abort().await;
                tracing::info!(%server, media_id = id, error = %e, "remote media not fetched");
                return Err(match e {
                    FetchError::Refused(_) => ApiError::not_found("no such media"),
                    FetchError::Media(e @ MediaError::TooLarge { .. }) => media_error(e),
                    other => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "M_UNKNOWN",
                        format!("fetching the media: {other}"),
                    ),
                });
            }
            None => {
                writer.abort().await;
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "M_UNKNOWN",
                    "the media's server did not send it in time",
                ));
            }
        };
        let info = writer
            .finish(content_type, None, server, now_ms(), Some(&sha256))
            .await
            .map_err(|e| {
                tracing::warn!(%server, media_id = id, error = %e, "remote media refused");
                match e {
                    MediaError::Mismatch => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "M_UNKNOWN",
                        "the media's server sent bytes that do not match its digest",
                    ),
                    e => media_error(e),
                }
            })?;
        Ok((key, info))
    }

    /// `GET /_matrix/client/v1/media/download/{server}/{id}[/{file name}]`.
    pub(super) async fn download(
        &self,
        server: &str,
        id: &str,
        file_name: Option<&str>,
    ) -> ApiResult<ApiResponse> {
        let (key, info) = self.media_to_serve(server, id).await?;
        self.serve_kept(&key, &info, file_name).await
    }

    /// The whole file kept under `key` in one response body (`hyphae-node` streams it
    /// instead: [`super::server`]).
    pub(super) async fn serve_kept(
        &self,
        key: &str,
        info: &MediaInfo,
        file_name: Option<&str>,
    ) -> ApiResult<ApiResponse> {
        let body = self
            .media
            .read(
                key,
                info,
                0,
                usize::try_from(info.size).unwrap_or(usize::MAX),
            )
            .await
            .map_err(media_error)?;
        let mut resp = http::Response::new(body);
        media_headers(&mut resp, info, file_name);
        Ok(resp)
    }

    /// The media routes under `/_matrix/client/v1/media/`.
    pub(super) async fn media_route(
        &self,
        req: &ApiRequest,
        _s: &Session,
        path: &[&str],
    ) -> ApiResult<ApiResponse> {
        match (req.method(), path) {
            (&Method::GET, ["config"]) => self.media_config(),
            (&Method::GET, ["preview_url"]) => self.preview_url(req),
            (&Method::GET, ["download", server, id]) => self.download(server, id, None).await,
            (&Method::GET, ["download", server, id, name]) => {
                self.download(server, id, Some(name)).await
            }
            (&Method::GET, ["thumbnail", server, id]) => self.thumbnail(req, server, id).await,
            (_, ["config" | "preview_url" | "download" | "thumbnail", ..]) => {
                Err(ApiError::unrecognized(StatusCode::METHOD_NOT_ALLOWED))
            }
            _ => Err(ApiError::unrecognized(StatusCode::NOT_FOUND)),
        }
    }

    /// `/_matrix/media/<version>/…` other than uploads.
    pub(super) async fn legacy_media_route(
        &self,
        req: &ApiRequest,
        path: &[&str],
    ) -> ApiResult<ApiResponse> {
        match (req.method(), path) {
            // Frozen: everything here was uploaded after the freeze.
            (&Method::GET, ["download" | "thumbnail", ..]) => Err(ApiError::not_found(
                "unauthenticated media is frozen: use /_matrix/client/v1/media",
            )),
            (&Method::GET, ["config"]) => {
                self.session(req).await?;
                self.media_config()
            }
            (&Method::GET, ["preview_url"]) => {
                self.session(req).await?;
                self.preview_url(req)
            }
            (&Method::POST, ["create"]) => {
                let s = self.session(req).await?;
                self.create_media(&s).await
            }
            _ => Err(ApiError::unrecognized(StatusCode::NOT_FOUND)),
        }
    }

    /// `GET /_matrix/client/v1/media/thumbnail/{server}/{id}`: the picture scaled to fit (or
    /// cropped to fill) the asked size. Natively it is made with the `image` crate and kept as
    /// media of its own; in the tab the original picture is served (the spec lets a thumbnail be
    /// larger than asked), and the browser scales it.
    async fn thumbnail(&self, req: &ApiRequest, server: &str, id: &str) -> ApiResult<ApiResponse> {
        let query = url_query(req.uri().query().unwrap_or(""));
        let dim = |name: &str| -> ApiResult<u32> {
            query
                .get(name)
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|v| (1..=4096).contains(v))
                .ok_or_else(|| {
                    ApiError::invalid_param(format!("{name} must be a number from 1 to 4096"))
                })
        };
        let (width, height) = (dim("width")?, dim("height")?);
        let crop = match query.get("method").map(String::as_str) {
            None | Some("scale") => false,
            Some("crop") => true,
            Some(_) => return Err(ApiError::invalid_param("method must be crop or scale")),
        };
        let (id, info) = self.media_to_serve(server, id).await?;
        if !can_thumbnail(&info.content_type) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                format!("no thumbnails of {}", info.content_type),
            ));
        }
        serve_thumbnail(self, &id, &info, width, height, crop).await
    }
}

/// Content type, disposition and the headers that keep a file from acting as a page.
pub(super) fn media_headers<B>(
    resp: &mut http::Response<B>,
    info: &MediaInfo,
    file_name: Option<&str>,
) {
    let essence = info
        .content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let inline = INLINE_TYPES.contains(&essence.as_str());
    let name = file_name.or(info.file_name.as_deref());
    let disposition = match name {
        Some(n) => format!(
            "{}; filename*=utf-8''{}",
            if inline { "inline" } else { "attachment" },
            percent_encoding::utf8_percent_encode(n, percent_encoding::NON_ALPHANUMERIC)
        ),
        None => (if inline { "inline" } else { "attachment" }).to_owned(),
    };
    let h = resp.headers_mut();
    let content_type = if inline {
        HeaderValue::from_str(&info.content_type)
    } else {
        // Whatever it claims to be, a browser treats it as bytes.
        Ok(HeaderValue::from_static("application/octet-stream"))
    };
    h.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
             style-src 'unsafe-inline'; media-src 'self'; object-src 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400, immutable"),
    );
}

/// Pictures thumbnails are made of.
fn can_thumbnail(content_type: &str) -> bool {
    matches!(
        content_type.split(';').next().unwrap_or("").trim(),
        "image/jpeg" | "image/png" | "image/gif" | "image/webp"
    )
}

/// A thumbnail of the picture kept under `key`: made once (natively with the `image` crate,
/// in the tab by the browser), then kept as media of its own.
async fn serve_thumbnail(
    api: &ClientApi,
    key: &str,
    info: &MediaInfo,
    width: u32,
    height: u32,
    crop: bool,
) -> ApiResult<ApiResponse> {
    let thumb_id = format!(
        "thumb_{key}_{width}x{height}_{}",
        if crop { "c" } else { "s" }
    );
    if let Some(thumb) = api.media.info(&thumb_id).await.map_err(media_error)? {
        return api.serve_kept(&thumb_id, &thumb, None).await;
    }
    if info.size > thumbnails::MAX_SOURCE_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            "the picture is too large to make a thumbnail of",
        ));
    }
    let source = api
        .media
        .read(
            key,
            info,
            0,
            usize::try_from(info.size).unwrap_or(usize::MAX),
        )
        .await
        .map_err(media_error)?;
    let (bytes, content_type) =
        thumbnails::make(source, info.content_type.clone(), width, height, crop)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "M_UNKNOWN",
                    format!("cannot read the picture: {e}"),
                )
            })?;
    let thumb = MediaInfo {
        content_type: content_type.to_owned(),
        file_name: None,
        size: bytes.len() as u64,
        uploader: info.uploader.clone(),
        created_ms: now_ms(),
        sha256: String::new(),
    };
    match api.media.writer(thumb_id.clone(), None).await {
        Ok(mut w) => {
            w.write(&bytes).await.map_err(media_error)?;
            w.finish(
                thumb.content_type.clone(),
                None,
                &info.uploader,
                now_ms(),
                None,
            )
            .await
            .map_err(media_error)?;
        }
        // Another request is making the same thumbnail: this one is served uncached.
        Err(MediaError::Taken) => {}
        Err(e) => return Err(media_error(e)),
    }
    let mut resp = http::Response::new(bytes);
    media_headers(&mut resp, &thumb, None);
    Ok(resp)
}

#[cfg(not(target_arch = "wasm32"))]
mod thumbnails {
    /// Pictures larger than this are not decoded for a thumbnail.
    pub const MAX_SOURCE_BYTES: u64 = 40 * 1024 * 1024;
    /// Nor pictures with more pixels than this (a small file can decode to a huge image).
    const MAX_SOURCE_PIXELS: u64 = 10_000 * 10_000;

    /// Decodes and scales on a blocking thread, off the runtime's workers.
    pub async fn make(
        source: Vec<u8>,
        _content_type: String,
        width: u32,
        height: u32,
        crop: bool,
    ) -> Result<(Vec<u8>, &'static str), String> {
        tokio::task::spawn_blocking(move || scale(&source, width, height, crop))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Decodes a picture and scales it down to fit `width`×`height` (or to fill it, cropping
    /// the middle); never up. PNG when the picture has transparency, JPEG otherwise.
    fn scale(
        source: &[u8],
        width: u32,
        height: u32,
        crop: bool,
    ) -> Result<(Vec<u8>, &'static str), image::ImageError> {
        use image::{imageops::FilterType, ImageReader};
        let mut reader = ImageReader::new(std::io::Cursor::new(source)).with_guessed_format()?;
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(512 * 1024 * 1024);
        reader.limits(limits);
        let (w, h) = reader.into_dimensions()?;
        if u64::from(w) * u64::from(h) > MAX_SOURCE_PIXELS {
            return Err(image::ImageError::Limits(
                image::error::LimitError::from_kind(image::error::LimitErrorKind::DimensionError),
            ));
        }
        let picture = ImageReader::new(std::io::Cursor::new(source))
            .with_guessed_format()?
            .decode()?;
        let out = if crop {
            if picture.width() <= width && picture.height() <= height {
                picture
            } else {
                picture.resize_to_fill(
                    width.min(picture.width()),
                    height.min(picture.height()),
                    FilterType::Triangle,
                )
            }
        } else if picture.width() <= width && picture.height() <= height {
            picture
        } else {
            picture.resize(width, height, FilterType::Triangle)
        };
        let mut bytes = Vec::new();
        if out.color().has_alpha() {
            out.write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )?;
            Ok((bytes, "image/png"))
        } else {
            out.to_rgb8().write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Jpeg,
            )?;
            Ok((bytes, "image/jpeg"))
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod thumbnails {
    //! In the tab, pictures are decoded and scaled by the browser (`createImageBitmap` and an
    //! `OffscreenCanvas`): no image decoder has to be compiled into the module.
    use wasm_bindgen::{JsCast, JsValue};
    use wasm_bindgen_futures::JsFuture;

    /// Pictures larger than this are not decoded for a thumbnail.
    pub const MAX_SOURCE_BYTES: u64 = 20 * 1024 * 1024;

    pub async fn make(
        source: Vec<u8>,
        content_type: String,
        width: u32,
        height: u32,
        crop: bool,
    ) -> Result<(Vec<u8>, &'static str), String> {
        scale(&source, &content_type, width, height, crop)
            .await
            .map_err(|e| e.as_string().unwrap_or_else(|| format!("{e:?}")))
    }

    /// Scales down to fit `width`×`height` (or to fill it, cropping the middle); never up.
    /// PNG for pictures that may be transparent, JPEG for JPEGs.
    async fn scale(
        source: &[u8],
        content_type: &str,
        width: u32,
        height: u32,
        crop: bool,
    ) -> Result<(Vec<u8>, &'static str), JsValue> {
        let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(source));
        let bag = web_sys::BlobPropertyBag::new();
        bag.set_type(content_type);
        let blob = web_sys::Blob::new_with_u8_array_sequence_and_options(&parts, &bag)?;
        let global = js_sys::global();
        let create: js_sys::Function =
            js_sys::Reflect::get(&global, &"createImageBitmap".into())?.dyn_into()?;
        let bitmap: web_sys::ImageBitmap = JsFuture::from(
            create
                .call1(&global, &blob)?
                .dyn_into::<js_sys::Promise>()?,
        )
        .await?
        .dyn_into()?;
        let (w, h) = (f64::from(bitmap.width()), f64::from(bitmap.height()));
        let (tw, th) = (f64::from(width), f64::from(height));
        // Source rectangle and output size.
        let (sx, sy, sw, sh, ow, oh) = if crop {
            let (ow, oh) = (tw.min(w), th.min(h));
            let scale = (ow / w).max(oh / h);
            let (sw, sh) = (ow / scale, oh / scale);
            ((w - sw) / 2.0, (h - sh) / 2.0, sw, sh, ow, oh)
        } else {
            let scale = (tw / w).min(th / h).min(1.0);
            (
                0.0,
                0.0,
                w,
                h,
                (w * scale).round().max(1.0),
                (h * scale).round().max(1.0),
            )
        };
        let canvas = web_sys::OffscreenCanvas::new(ow as u32, oh as u32)?;
        let ctx: web_sys::OffscreenCanvasRenderingContext2d = canvas
            .get_context("2d")?
            .ok_or_else(|| JsValue::from_str("no 2d context"))?
            .dyn_into()?;
        ctx.draw_image_with_image_bitmap_and_sw_and_sh_and_dx_and_dy_and_dw_and_dh(
            &bitmap, sx, sy, sw, sh, 0.0, 0.0, ow, oh,
        )?;
        bitmap.close();
        let out_type = if content_type.starts_with("image/jpeg") {
            "image/jpeg"
        } else {
            "image/png"
        };
        let options = web_sys::ImageEncodeOptions::new();
        options.set_type(out_type);
        let encoded: web_sys::Blob = JsFuture::from(canvas.convert_to_blob_with_options(&options)?)
            .await?
            .dyn_into()?;
        let buffer = JsFuture::from(encoded.array_buffer()).await?;
        Ok((js_sys::Uint8Array::new(&buffer).to_vec(), out_type))
    }
}
