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
                .fallback_service(ServeDir::new(web.dir).precompressed_gzip())
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

async fn handle(
    State(api): State<Arc<ClientApi>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
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
