//! Matrix error responses: an `errcode`, a message, and the HTTP status that goes with them.

use http::StatusCode;
use serde_json::json;

use crate::engine::IngestError;
use crate::rooms::NodeError;
use crate::store::StoreError;

/// A Client-Server API error, rendered as `{"errcode": ..., "error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// For `M_LIMIT_EXCEEDED`: when the client may retry.
    pub retry_after_ms: Option<u64>,
    /// A field some errors carry beside `errcode` and `error` (`current_version`).
    pub extra: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            retry_after_ms: None,
            extra: None,
        }
    }

    pub fn with_field(self, name: &'static str, value: serde_json::Value) -> Self {
        Self {
            extra: Some((name, value)),
            ..self
        }
    }

    pub fn not_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", m)
    }
    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", m)
    }
    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", m)
    }
    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "no access token given",
        )
    }
    pub fn unknown_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "access token is not known",
        )
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", m)
    }
    pub fn unrecognized(status: StatusCode) -> Self {
        Self::new(status, "M_UNRECOGNIZED", "unrecognized request")
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("request body is over {limit} bytes"),
        )
    }
    /// The node has stopped (shut down, or its swarm ended by a panic).
    pub fn stopped() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            "the homeserver has stopped",
        )
    }
    pub fn user_in_use() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "that user id is taken",
        )
    }
    pub fn invalid_username(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", m)
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "M_LIMIT_EXCEEDED",
                "too many requests",
            )
        }
    }
    pub fn unknown(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", m)
    }

    pub fn body(&self) -> serde_json::Value {
        let mut body = json!({ "errcode": self.errcode, "error": self.message });
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = ms.into();
        }
        if let Some((name, value)) = &self.extra {
            body[*name] = value.clone();
        }
        body
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failed");
        Self::unknown(format!("storage: {e}"))
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Forbidden(m) => Self::forbidden(m),
            IngestError::UnknownRoom(r) => Self::not_found(format!("unknown room {r}")),
            IngestError::TooLarge(n) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("event is {n} bytes, over the 65536-byte limit"),
            ),
            IngestError::UnsupportedRoomVersion(v) => Self::new(
                StatusCode::BAD_REQUEST,
                "M_UNSUPPORTED_ROOM_VERSION",
                format!("room version {v} is not supported"),
            ),
            IngestError::NotJson(m) | IngestError::BadJson(m) | IngestError::BadFormat(m) => {
                Self::bad_json(m)
            }
            IngestError::Store(e) => e.into(),
            other => Self::unknown(other.to_string()),
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Ingest(e) => e.into(),
            NodeError::Store(e) => e.into(),
            NodeError::Refused(code, m) => Self::forbidden(format!("peer refused ({code:?}): {m}")),
            NodeError::Network(m) => Self::new(
                StatusCode::BAD_GATEWAY,
                "M_UNKNOWN",
                format!("could not reach the room's peers: {m}"),
            ),
            NodeError::Stopped => Self::unknown("the node has stopped"),
            // 504: the join went through, the room is not here yet; the client may retry.
            NodeError::JoinIncomplete(m) => Self::new(StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN", m),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
