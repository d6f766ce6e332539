//! The Client-Server API over HTTP (`hyphae-node --http`), with CORS so web clients on other
//! origins can use it; with `--web`, also the built web app and the page's bootstrap addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::routing::{any, get};
use tower_http::services::ServeDir;

use super::error::ApiError;
use super::{Caller, ClientApi, MAX_BODY_BYTES};

/// The web app a node serves next to its API: the built files, and the addresses the page
/// bootstraps from (`/hyphae/bootstrap.json`).
pub struct WebApp {
    pub dir: PathBuf,
    /// `{"server_name": …, "peer_id": …, "addrs": [multiaddr with /p2p/, …]}`.
    pub bootstrap: serde_json::Value,
}

/// The origins of the pages this node serves when its HTTP listener is bound to `addr`, under
/// every name a browser on this machine may give it (`localhost`, `127.0.0.1`, `[::1]` for a
/// loopback or wildcard address). A request from one of these pages carries one of them in
/// `Origin`.
pub fn own_origins(addr: SocketAddr) -> Vec<String> {
    let ip = addr.ip();
    let hosts = if ip.is_loopback() || ip.is_unspecified() {
        vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "[::1]".to_owned(),
        ]
    } else {
        vec![SocketAddr::new(ip, 0)
            .to_string()
            .trim_end_matches(":0")
            .to_owned()]
    };
    hosts
        .into_iter()
        .map(|host| format!("http://{host}:{}", addr.port()))
        .collect()
}

/// Serves `api` on `listener` (and the web app, if given) until `shutdown` resolves.
pub async fn serve(
    api: Arc<ClientApi>,
    listener: tokio::net::TcpListener,
    web: Option<WebApp>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = match web {
        None => axum::Router::new().fallback(handle),
        Some(web) => {
            let bootstrap = Arc::new(web.bootstrap);
            axum::Router::new()
                .route("/_matrix/{*path}", any(handle))
                .route("/.well-known/matrix/client", any(handle))
                .route(
                    "/hyphae/bootstrap.json",
                    get(move || {
                        let bootstrap = bootstrap.clone();
                        async move {
                            super::json_response(http::StatusCode::OK, &bootstrap)
                                .map(axum::body::Body::from)
                        }
                    }),
                )
                // `scripts/build-web.sh` writes a `.gz` next to each file; browsers that accept
                // gzip get those (the module is 3.4 MB raw, 1.1 MB gzipped).
                .fallback_service(
                    axum::Router::new()
                        .fallback_service(ServeDir::new(web.dir).precompressed_gzip())
                        .layer(axum::middleware::from_fn(cache_for_web_files)),
                )
        }
    };
    let app = app.with_state(api);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Lets browsers keep the web app's files. A name webpack stamped with its content's hash never
/// changes meaning, so it is kept a year without asking again (a new browser reads the modules
/// from its disk cache, where Chromium may also keep their compiled code). The rest (the page
/// and its script) is asked for each time, a 304 while unchanged, so a new build shows on the
/// next load.
async fn cache_for_web_files(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let policy = if content_hashed(req.uri().path()) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut resp = next.run(req).await;
    if resp.status().is_success() || resp.status() == http::StatusCode::NOT_MODIFIED {
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static(policy),
        );
        // The body is gzipped for some requests and not for others: a cache must tell them apart.
        headers.insert(
            http::header::VARY,
            http::HeaderValue::from_static("accept-encoding"),
        );
    }
    resp
}

/// Whether a file name carries webpack's `[contenthash:8]`: `name.0123abcd.ext`.
fn content_hashed(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 3
        && parts[1..parts.len() - 1]
            .iter()
            .any(|p| p.len() == 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn handle(
    State(api): State<Arc<ClientApi>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    if let Some(target) = super::media::upload_target(&parts.method, parts.uri.path()) {
        let mut resp = match stream_upload(&api, &parts, target, body).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(errcode = e.errcode, error = %e.message, "upload refused");
                super::json_response(e.status, &e.body())
            }
        };
        super::add_cors(&mut resp);
        return resp.map(axum::body::Body::from);
    }
    if parts.method == http::Method::GET {
        if let Some(segs) = super::client_path(parts.uri.path()) {
            if let ["media", "download", server, id, rest @ ..] = segs
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
            {
                if rest.len() <= 1 {
                    let mut resp = match stream_download(
                        &api,
                        &parts,
                        server,
                        id,
                        rest.first().copied(),
                    )
                    .await
                    {
                        Ok(resp) => resp,
                        Err(e) => {
                            super::json_response(e.status, &e.body()).map(axum::body::Body::from)
                        }
                    };
                    let mut head = http::Response::new(Vec::new());
                    super::add_cors(&mut head);
                    resp.headers_mut().extend(head.headers().clone());
                    return resp;
                }
            }
        }
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => {
            let mut resp = super::json_response(e.status, &e.body());
            super::add_cors(&mut resp);
            return resp.map(axum::body::Body::from);
        }
    };
    let caller = Caller {
        local: addr.ip().is_loopback(),
    };
    let handled = api.handle(http::Request::from_parts(parts, body), caller);
    // A bug in one handler must not drop the connection without an answer.
    let resp = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(handled)).await {
        Ok(resp) => resp,
        Err(panic) => {
            tracing::error!(
                panic = crate::net::rt::panic_message(&*panic),
                "request handler panicked"
            );
            let e = ApiError::unknown("internal error");
            let mut resp = super::json_response(e.status, &e.body());
            super::add_cors(&mut resp);
            resp
        }
    };
    resp.map(axum::body::Body::from)
}

/// An upload, written to the media store as its body arrives: never the whole file in memory.
async fn stream_upload(
    api: &ClientApi,
    parts: &http::request::Parts,
    target: super::media::UploadTarget,
    body: axum::body::Body,
) -> Result<super::ApiResponse, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut upload = match api.begin_upload(parts, target).await {
        Ok(u) => u,
        Err(e) => {
            drain(stream).await;
            return Err(e);
        }
    };
    while let Some(chunk) = stream.next().await {
        let written = match chunk {
            Ok(bytes) => upload.write(&bytes).await,
            Err(e) => Err(ApiError::bad_json(format!("reading the upload: {e}"))),
        };
        if let Err(e) = written {
            upload.abort().await;
            drain(stream).await;
            return Err(e);
        }
    }
    api.finish_upload(upload).await
}

/// A download, read from the store a chunk at a time as the client takes it: a large file is
/// never whole in memory.
async fn stream_download(
    api: &ClientApi,
    parts: &http::request::Parts,
    server: &str,
    id: &str,
    file_name: Option<&str>,
) -> Result<axum::response::Response, ApiError> {
    let head = http::Request::from_parts(parts.clone(), Vec::new());
    api.session(&head).await?;
    let (key, info) = api.media_to_serve(server, id).await?;
    let media = api.media.clone();
    let chunks = info.chunks();
    let body = futures::stream::unfold(0u32, move |index| {
        let (media, key) = (media.clone(), key.clone());
        async move {
            if index >= chunks {
                return None;
            }
            let chunk = media
                .chunk(&key, index)
                .await
                .map(axum::body::Bytes::from)
                .map_err(std::io::Error::other);
            Some((chunk, index + 1))
        }
    });
    let mut resp = http::Response::new(axum::body::Body::from_stream(body));
    super::media::media_headers(&mut resp, &info, file_name);
    resp.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(info.size),
    );
    Ok(resp)
}

/// Reads and drops up to [`DRAIN_BYTES`] of a refused body, so the client reads the answer.
async fn drain(mut stream: axum::body::BodyDataStream) {
    use futures::StreamExt;
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen = seen.saturating_add(chunk.len());
        if seen > DRAIN_BYTES {
            break;
        }
    }
}

/// How much of an oversized body is still read (and dropped) before answering `M_TOO_LARGE`:
/// closing a connection with unread data resets it, and the client may then lose the answer
/// while it is still sending.
const DRAIN_BYTES: usize = 16 * MAX_BODY_BYTES;

/// The request body, or `M_TOO_LARGE` past [`MAX_BODY_BYTES`] (after draining up to
/// [`DRAIN_BYTES`] so the client reads the answer).
async fn read_body(body: axum::body::Body) -> Result<Vec<u8>, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_json(format!("reading the body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        } else if seen > DRAIN_BYTES {
            break;
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::{content_hashed, own_origins};

    #[test]
    fn content_hashed_names_are_those_webpack_stamps() {
        assert!(content_hashed("/hyphae_bg.2403c2f4.wasm"));
        assert!(content_hashed("/419.76fc25be.js"));
        assert!(!content_hashed("/app.js"));
        assert!(!content_hashed("/"));
        assert!(!content_hashed("/index.html"));
        assert!(
            !content_hashed("/2403c2f4.wasm"),
            "the hash is a part of its own, not the name"
        );
        assert!(
            !content_hashed("/app.2403c2f.js"),
            "seven digits are not the hash"
        );
        assert!(!content_hashed("/notes.deadbeeg.txt"));
    }

    #[test]
    fn own_origins_name_the_listener() {
        assert_eq!(
            own_origins("127.0.0.1:8008".parse().unwrap()),
            [
                "http://localhost:8008",
                "http://127.0.0.1:8008",
                "http://[::1]:8008"
            ]
        );
        assert_eq!(own_origins("0.0.0.0:80".parse().unwrap()).len(), 3);
        assert_eq!(
            own_origins("192.168.1.5:8008".parse().unwrap()),
            ["http://192.168.1.5:8008"]
        );
        assert_eq!(
            own_origins("[fe80::1]:8008".parse().unwrap()),
            ["http://[fe80::1]:8008"]
        );
    }
}
