//! The one error type of the HTTP API and its mapping to status codes, in one place.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::preprocess::PreprocessError;
use crate::scheduler::{InferError, SubmitError};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The image bytes could not be decoded.
    #[error("{0}")]
    InvalidImage(String),
    /// Malformed JSON, base64, multipart or a missing field.
    #[error("{0}")]
    MalformedRequest(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A parameter outside its range or of the wrong type.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("missing or wrong API key")]
    Unauthorized,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the server is busy: the request queue is full; retry later")]
    Overloaded,
    /// The request bodies being received take all of `--body-memory-mib`.
    #[error(
        "the server is busy: the uploads in progress take all of its memory for request \
         bodies; retry later"
    )]
    UploadsBusy,
    /// Jobs wait in the queue for longer than this request has before its deadline.
    #[error(
        "the server is busy: the queue's wait is about {:.1} s, longer than the {:.1} s this \
         request has before its deadline (timeout_ms); retry later, elsewhere, or with a \
         longer timeout_ms",
        wait.as_secs_f64(),
        left.as_secs_f64()
    )]
    QueueTooSlow { wait: Duration, left: Duration },
    /// The client closed the connection before its body arrived in full: nobody will
    /// read the answer, which is counted and logged as [`CLIENT_CLOSED`](super::CLIENT_CLOSED).
    #[error("the client closed the connection before its request body arrived in full")]
    ClientClosed,
    /// `--max-connections` connections are open (a request of the probe lane).
    #[error("the server is busy: it has as many connections open as it takes; retry later")]
    TooManyConnections,
    #[error("{0}")]
    NotReady(String),
    /// The body did not arrive in full before the deadline (a slow or stalled upload).
    #[error(
        "the request body did not arrive in full before the request's deadline \
         (timeout_ms in the query string, else the server's default)"
    )]
    BodyTimeout,
    #[error("the request did not finish before its deadline")]
    Timeout,
    #[error("{0}")]
    Inference(String),
    /// A worker has been stuck in one step for longer than `--worker-stall-timeout-ms`.
    #[error("{0}")]
    WorkerStalled(String),
}

/// What an error response was, for the access log and the metrics: put in the
/// response's extensions by [`ApiError::into_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCause {
    pub error_type: &'static str,
    /// Why a request was refused `overloaded` (`requests_refused_total`'s reason).
    pub refusal: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
    pub error_type: &'static str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidImage(_) | ApiError::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidParameter(_) | ApiError::ImageTooLarge(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded | ApiError::UploadsBusy | ApiError::QueueTooSlow { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::NotReady(_) | ApiError::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::ClientClosed => {
                StatusCode::from_u16(super::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::WorkerStalled(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable name; clients branch on this, not on the message.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::MalformedRequest(_) => "malformed_request",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Overloaded
            | ApiError::UploadsBusy
            | ApiError::QueueTooSlow { .. }
            | ApiError::TooManyConnections => "overloaded",
            ApiError::NotReady(_) => "not_ready",
            ApiError::BodyTimeout => "request_timeout",
            ApiError::ClientClosed => "client_closed",
            ApiError::Timeout => "timeout",
            ApiError::Inference(_) => "inference_failed",
            ApiError::WorkerStalled(_) => "worker_stalled",
        }
    }

    /// Why an `overloaded` refusal happened, as `requests_refused_total` labels it.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            ApiError::Overloaded => Some("queue_full"),
            ApiError::UploadsBusy => Some("uploads_busy"),
            ApiError::QueueTooSlow { .. } => Some("queue_too_slow"),
            ApiError::TooManyConnections => Some("connection_limit"),
            _ => None,
        }
    }

    /// The JSON body of this error's answer.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            error_type: self.error_type(),
        }
    }

    /// This error's whole answer as HTTP/1.1 bytes, `Connection: close`, for a
    /// connection the server answers without reading its request (hyper is not
    /// involved): status, `Retry-After` and the JSON body as [`IntoResponse`] gives them.
    pub fn raw_http_answer(&self) -> String {
        let status = self.status();
        let body = serde_json::to_string(&self.body()).unwrap_or_default();
        let retry = self
            .retry_after()
            .map_or_else(String::new, |secs| format!("retry-after: {secs}\r\n"));
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{retry}\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
    }

    /// Logs a server-side error once (client errors are not logged): the model failing
    /// is the server's problem (warn); a deadline that passed or a server not (yet, or
    /// any more) ready happens now and then (info).
    pub fn log(&self) {
        let status = self.status();
        if matches!(self, ApiError::TooManyConnections) {
            // Thousands a second under a connection flood; counted by reason, and the
            // server warns of the limit itself.
            return;
        }
        if matches!(self, ApiError::Inference(_) | ApiError::WorkerStalled(_)) {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else if status.is_server_error() {
            tracing::info!(status = status.as_u16(), error = %self, "request not served");
        }
    }

    /// Seconds a client should wait before retrying, for the statuses where that helps.
    fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::Overloaded | ApiError::UploadsBusy | ApiError::TooManyConnections => Some(1),
            // About when the queue's wait might have come down (at most a minute).
            ApiError::QueueTooSlow { wait, .. } => Some(wait.as_secs().clamp(1, 60) as u32),
            ApiError::NotReady(_) | ApiError::WorkerStalled(_) => Some(5),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        self.log();
        let retry = self.retry_after();
        let unauthorized = matches!(self, ApiError::Unauthorized);
        let cause = ErrorCause {
            error_type: self.error_type(),
            refusal: self.refusal(),
        };
        let mut response = (status, Json(self.body())).into_response();
        response.extensions_mut().insert(cause);
        if let Some(secs) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ladic-serve\""),
            );
        }
        response
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        match e {
            PreprocessError::TooLarge { .. } | PreprocessError::TooMuchMemory => {
                ApiError::ImageTooLarge(e.to_string())
            }
            PreprocessError::Empty
            | PreprocessError::UnknownFormat
            | PreprocessError::Undecodable(_) => ApiError::InvalidImage(e.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull => ApiError::Overloaded,
            SubmitError::WouldMissDeadline { wait, left } => ApiError::QueueTooSlow { wait, left },
            SubmitError::Closed => ApiError::NotReady("the server is shutting down".into()),
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Deadline => ApiError::Timeout,
            InferError::Failed(_) => ApiError::Inference(e.to_string()),
            InferError::ShuttingDown => ApiError::NotReady(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer written without hyper says what the routed answer says.
    #[test]
    fn the_raw_answer_has_the_status_retry_after_and_body() {
        let e = ApiError::TooManyConnections;
        let raw = e.raw_http_answer();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
        assert!(
            head.ends_with(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error_type"], "overloaded");
        assert_eq!(body["error"], e.to_string());
        assert!(!ApiError::NotFound.raw_http_answer().contains("retry-after"));
    }

    #[test]
    fn statuses_and_types() {
        let cases = [
            (ApiError::InvalidImage("x".into()), 400, "invalid_image"),
            (
                ApiError::MalformedRequest("x".into()),
                400,
                "malformed_request",
            ),
            (
                ApiError::PayloadTooLarge { limit: 1 },
                413,
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType("x".into()),
                415,
                "unsupported_media_type",
            ),
            (
                ApiError::InvalidParameter("x".into()),
                422,
                "invalid_parameter",
            ),
            (ApiError::ImageTooLarge("x".into()), 422, "image_too_large"),
            (ApiError::Overloaded, 429, "overloaded"),
            (ApiError::UploadsBusy, 429, "overloaded"),
            (
                ApiError::QueueTooSlow {
                    wait: Duration::from_secs(6),
                    left: Duration::from_secs(3),
                },
                429,
                "overloaded",
            ),
            (ApiError::NotReady("x".into()), 503, "not_ready"),
            (ApiError::BodyTimeout, 408, "request_timeout"),
            (ApiError::Timeout, 504, "timeout"),
            (ApiError::Inference("x".into()), 500, "inference_failed"),
            (ApiError::WorkerStalled("x".into()), 503, "worker_stalled"),
        ];
        for (e, status, ty) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.error_type(), ty);
        }
    }

    #[test]
    fn retry_after_on_overload() {
        let r = ApiError::Overloaded.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::Timeout.into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        // A queue too slow for the deadline: about its wait, within 1..=60 s.
        for (wait_ms, retry) in [(6_400, "6"), (200, "1"), (600_000, "60")] {
            let wait = Duration::from_millis(wait_ms);
            let left = Duration::from_millis(100);
            let r = ApiError::QueueTooSlow { wait, left }.into_response();
            assert_eq!(r.headers()[header::RETRY_AFTER], retry);
        }
    }

    #[test]
    fn preprocess_errors_map_to_400_and_422() {
        assert_eq!(ApiError::from(PreprocessError::UnknownFormat).status(), 400);
        let big = PreprocessError::TooLarge {
            width: 1,
            height: 1,
            max_side: 1,
            max_pixels: 1,
        };
        assert_eq!(ApiError::from(big).status(), 422);
    }
}
