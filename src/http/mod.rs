//! The HTTP API: routes, shared state, and the middleware every response passes
//! through (request id, timing header, metrics, auth).

pub mod body;
pub mod error;
mod handlers;
pub mod request;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::HttpBody;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tokio::sync::Semaphore;

pub use error::ApiError;

use crate::bundle::Manifest;
use crate::config::BatchingMode;
use crate::http::error::ErrorCause;
use crate::metrics::Metrics;
use crate::preprocess::ImageLimits;
use crate::runtime::ActiveDevice;
use crate::sampler::SamplerParams;
use crate::scheduler::Scheduler;

/// Every route the server answers, as (method, path). The router is built from this
/// list and a test checks it against openapi.yaml, so the two cannot drift apart.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("POST", "/caption"),
    ("POST", "/caption/batch"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/info"),
    ("GET", "/metrics"),
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_TOTAL_TIME: HeaderName = HeaderName::from_static("x-total-time");
pub static X_QUEUE_TIME: HeaderName = HeaderName::from_static("x-queue-time");
pub static X_INFERENCE_TIME: HeaderName = HeaderName::from_static("x-inference-time");

/// Limits and defaults the handlers apply.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_body_bytes: usize,
    pub image_limits: ImageLimits,
    pub max_batch_images: usize,
    /// MiB the images decoded at once may take together (`--decode-memory-mib`).
    pub decode_memory_mib: u32,
    /// MiB the request bodies being read or held may take together
    /// (`--body-memory-mib`).
    pub body_memory_mib: u32,
    pub api_key: Option<String>,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub queue_size: usize,
    pub workers: usize,
    pub batching: BatchingMode,
    pub max_batch_rows: usize,
    /// Origins allowed by CORS (`*`: any); empty sends no CORS headers at all.
    pub cors_allow_origins: Vec<String>,
    /// A worker in one step for longer than this fails the health probes; `None`: never.
    pub worker_stall_timeout: Option<Duration>,
}

/// State shared by all handlers.
pub struct AppState {
    pub settings: HttpSettings,
    pub manifest: Arc<Manifest>,
    pub defaults: SamplerParams,
    pub metrics: Arc<Metrics>,
    /// Set once the workers have loaded the bundle.
    pub scheduler: OnceLock<Arc<Scheduler>>,
    pub device: OnceLock<ActiveDevice>,
    /// Loaded and warmed up, and not draining.
    ready: AtomicBool,
    draining: AtomicBool,
    /// Caption requests being handled, for the shutdown drain.
    in_flight: AtomicUsize,
    /// Bounds concurrent image decodes so a burst cannot take every core...
    pub decode_permits: Arc<Semaphore>,
    /// ...nor more memory than the budget: one permit per MiB.
    pub decode_memory: Arc<Semaphore>,
    /// Memory of the request bodies being read or held.
    pub body_budget: body::BodyBudget,
    pub started: Instant,
    /// True once the shutdown grace period is over.
    grace_over: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl AppState {
    pub fn new(settings: HttpSettings, manifest: Arc<Manifest>, metrics: Arc<Metrics>) -> AppState {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let decode_memory_mib = settings.decode_memory_mib.max(1) as usize;
        let body_budget = body::BodyBudget::new(settings.body_memory_mib);
        metrics.queue_capacity.set(settings.queue_size as i64);
        AppState {
            defaults: SamplerParams::defaults(&manifest),
            settings,
            manifest,
            metrics,
            scheduler: OnceLock::new(),
            device: OnceLock::new(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            decode_permits: Arc::new(Semaphore::new(cores * 2)),
            decode_memory: Arc::new(Semaphore::new(decode_memory_mib)),
            body_budget,
            started: Instant::now(),
            grace_over: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The shutdown grace period is over: requests still receiving their body get 503.
    pub fn end_grace(&self) {
        self.grace_over.send_replace(true);
    }

    /// Reads a request's body ([`body::read_body`]) within `--max-body-bytes` and the
    /// body memory budget, unless the shutdown grace period ends first, and then
    /// answers 503 `not_ready`: a request still receiving its body when the grace
    /// period ends (a stalled upload) hears why at once, instead of its connection
    /// closing seconds later without an answer.
    pub async fn read_body(
        &self,
        headers: &axum::http::HeaderMap,
        body: axum::body::Body,
        deadline: Instant,
        kind: body::BodyKind,
    ) -> Result<(axum::body::Bytes, body::Reservation), ApiError> {
        let read = body::read_body(
            headers,
            body,
            self.settings.max_body_bytes,
            deadline,
            &self.body_budget,
            kind,
        );
        let mut over = self.grace_over.subscribe();
        let grace_over = async move {
            if over.wait_for(|over| *over).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = read => result,
            () = grace_over => Err(ApiError::NotReady("the server is shutting down".into())),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Readiness turns false and new caption requests get 503; in-flight ones finish.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// A worker stuck in one step for longer than the stall timeout, as the error the
    /// health probes answer.
    fn stalled_worker(&self) -> Option<ApiError> {
        let limit = self.settings.worker_stall_timeout?;
        let (worker, age) = self.scheduler.get()?.stalled_worker(limit)?;
        Some(ApiError::WorkerStalled(format!(
            "worker {worker} has been in one denoising step for {:.1} s, more than \
             --worker-stall-timeout-ms allows: it is stuck; restart the server",
            age.as_secs_f64()
        )))
    }

    /// The scheduler, if the server may take caption requests now.
    fn ready_scheduler(&self) -> Result<Arc<Scheduler>, ApiError> {
        if self.is_draining() {
            return Err(ApiError::NotReady("the server is shutting down".into()));
        }
        if !self.ready.load(Ordering::SeqCst) {
            return Err(ApiError::NotReady(
                "the model is still loading; retry shortly".into(),
            ));
        }
        self.scheduler
            .get()
            .cloned()
            .ok_or_else(|| ApiError::NotReady("the model is still loading".into()))
    }
}

/// Counts a caption request as in flight until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn route_handler(method: &str, path: &str) -> MethodRouter<Arc<AppState>> {
    match (method, path) {
        ("GET", "/") => get(handlers::index),
        ("POST", "/caption") => post(handlers::caption),
        ("POST", "/caption/batch") => post(handlers::caption_batch),
        ("GET", "/health/live") => get(handlers::live),
        ("GET", "/health/ready") => get(handlers::ready),
        ("GET", "/info") => get(handlers::info),
        ("GET", "/metrics") => get(handlers::metrics),
        _ => unreachable!("every entry of ROUTES has a handler"),
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for (method, path) in ROUTES {
        let mut handler = route_handler(method, path);
        if *method == "POST" {
            handler = handler.layer(middleware::from_fn_with_state(
                state.clone(),
                require_api_key,
            ));
        }
        router = router.route(path, handler);
    }
    let mut router = router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(refuse_over_connection_limit));
    if let Some(cors) = cors_layer(&state.settings.cors_allow_origins) {
        router = router.layer(cors);
    }
    router
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(request_span)
                // ApiError logs its own server errors, with the reason.
                .on_failure(()),
        )
        .layer(middleware::from_fn(assign_request_id))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            close_if_body_unread,
        ))
        .with_state(state)
}

/// Adds `Connection: close` to responses sent before the request body was read to its
/// end (a full queue, a wrong key or media type, a declared length over the limit).
/// The server then drops the connection, and without the header a keep-alive client
/// would send its next request into a closed socket. The rest of such a body is read
/// and thrown away meanwhile (see [`body::discard_unread`]), up to four times the body
/// limit; a body declared longer than that is not, nor one whose client waits for
/// `100 Continue` and was not sent it (nothing was read: it sends nothing more).
async fn close_if_body_unread(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let done = Arc::new(AtomicBool::new(HttpBody::is_end_stream(&body)));
    let most = state.settings.max_body_bytes.saturating_mul(4);
    let declared = body::declared_length(&parts.headers);
    // As hyper decides it: HTTP/1.1 only, the last Expect line.
    let waits_for_continue = parts.version == axum::http::Version::HTTP_11
        && parts
            .headers
            .get_all(axum::http::header::EXPECT)
            .iter()
            .next_back()
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let linger = declared.is_none_or(|n| n <= most as u64).then_some(most);
    let body = axum::body::Body::new(EndTracked {
        inner: body,
        done: done.clone(),
        linger,
        waits_for_continue,
        read_from: false,
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !done.load(Ordering::SeqCst) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that records when it has been read to its end, and, dropped before
/// then, has its rest discarded (at most `linger` bytes).
struct EndTracked {
    inner: axum::body::Body,
    done: Arc<AtomicBool>,
    linger: Option<usize>,
    /// The request said `Expect: 100-continue`: the server sends `100 Continue` when the
    /// body is first read, and the client sends the body only then.
    waits_for_continue: bool,
    /// Whether the body has been read from (so `100 Continue` went out).
    read_from: bool,
}

impl HttpBody for EndTracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.read_from = true;
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.done.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EndTracked {
    fn drop(&mut self) {
        let Some(most) = self.linger else { return };
        let never_asked_for = self.waits_for_continue && !self.read_from;
        if never_asked_for || self.done.load(Ordering::SeqCst) || self.inner.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let rest = std::mem::take(&mut self.inner);
            runtime.spawn(body::discard_unread(rest, most));
        }
    }
}

/// CORS for the configured origins; `None` (no CORS headers) when none are.
/// Origins that are not valid header values are skipped (`server::start` refuses them).
pub fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                axum::http::header::CONTENT_TYPE,
                axum::http::header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
                X_REQUEST_ID.clone(),
            ])
            .expose_headers([
                X_REQUEST_ID.clone(),
                X_TOTAL_TIME.clone(),
                X_QUEUE_TIME.clone(),
                X_INFERENCE_TIME.clone(),
                axum::http::header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Gives every request an `x-request-id` before anything logs: the client's, when it
/// is 1 to 128 visible ASCII characters, else a new one. The response echoes it.
async fn assign_request_id(mut req: Request, next: Next) -> Response {
    let valid = req.headers().get(&X_REQUEST_ID).is_some_and(|v| {
        !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    });
    if !valid {
        req.headers_mut()
            .insert(X_REQUEST_ID.clone(), new_request_id());
    }
    next.run(req).await
}

/// The span every log line of a request carries: method, path (no query, no body)
/// and request id.
fn request_span(req: &Request) -> tracing::Span {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", method = %req.method(), path = req.uri().path(), request_id = id)
}

/// Request id, total time header and the request metrics, for every response.
async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| v.len() <= 128 && !v.is_empty())
        .cloned()
        .unwrap_or_else(new_request_id);
    // CORS preflights are not counted. The record is counted when the response is
    // ready, or by a stream when it ends, or, if neither happens (the client left
    // before its answer), as 499 when it is dropped.
    let slot = RecordSlot::default();
    if req.method() != Method::OPTIONS {
        let record = RequestRecord {
            metrics: state.metrics.clone(),
            method: req.method().clone(),
            route,
            request_id: request_id.to_str().unwrap_or("-").to_string(),
            start,
            error_type: None,
            quiet: false,
            counted: false,
        };
        *slot.lock() = Some(record);
        req.extensions_mut().insert(slot.clone());
    }
    let mut response = next.run(req).await;
    let elapsed = start.elapsed();
    let headers = response.headers_mut();
    headers.insert(X_REQUEST_ID.clone(), request_id);
    if !headers.contains_key(&X_TOTAL_TIME) {
        headers.insert(X_TOTAL_TIME.clone(), millis_header(elapsed));
    }
    let cause = response.extensions().get::<ErrorCause>().copied();
    if let Some(reason) = cause.and_then(|c| c.refusal) {
        state
            .metrics
            .requests_refused_total
            .with_label_values(&[reason])
            .inc();
    }
    if let Some(mut record) = slot.take() {
        record.quiet = cause.is_some_and(|c| c.refusal == Some("connection_limit"));
        record.finish_with_error_type(response.status().as_u16(), cause.map(|c| c.error_type));
    }
    response
}

/// In a request's extensions when its connection was accepted beyond
/// `--max-connections` (the server's probe lane): only the health probes are answered.
#[derive(Debug, Clone, Copy)]
pub struct OverConnectionLimit;

/// Answers 503 `overloaded` to every request of a connection over the connection limit
/// but the health probes, which an orchestrator must still get through.
async fn refuse_over_connection_limit(req: Request, next: Next) -> Response {
    if req.extensions().get::<OverConnectionLimit>().is_some()
        && !req.uri().path().starts_with("/health/")
    {
        return ApiError::TooManyConnections.into_response();
    }
    next.run(req).await
}

/// The target of the access log's lines (see [`RequestRecord`]).
pub const ACCESS_LOG: &str = "ladic_serve::access";

/// The status counted for a request whose client left before its answer (nginx's
/// "client closed request"), or whose connection the server closed first (a client
/// that stopped reading, the end of a shutdown).
pub const CLIENT_CLOSED: u16 = 499;

/// One request's entry in the request metrics (`requests_total`,
/// `request_duration_seconds`), counted once: by [`finish`](Self::finish), or as
/// [`CLIENT_CLOSED`] when dropped unfinished.
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    method: Method,
    route: String,
    request_id: String,
    start: Instant,
    /// The `error_type` of an error answer, for the access log.
    error_type: Option<&'static str>,
    /// Logged at debug, as probes are: the 503s of the connection limit, which come by
    /// thousands a second under a connection flood.
    quiet: bool,
    counted: bool,
}

impl RequestRecord {
    pub fn finish(mut self, status: u16) {
        self.count(status);
        self.counted = true;
    }

    /// [`finish`](Self::finish) for an answer whose `error_type` the access log should
    /// name (a stream's `error` event).
    pub fn finish_with_error_type(mut self, status: u16, error_type: Option<&'static str>) {
        self.error_type = error_type;
        self.finish(status);
    }

    fn count(&self, status: u16) {
        let elapsed = self.start.elapsed();
        let code = status.to_string();
        self.metrics
            .requests_total
            .with_label_values(&[self.route.as_str(), code.as_str()])
            .inc();
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.metrics
            .request_duration_seconds
            .with_label_values(&[self.route.as_str(), class])
            .observe(elapsed.as_secs_f64());
        self.log(status, elapsed);
    }

    /// The access log: one line per request, when it is counted, with the
    /// `error_type` of an error answer. Probes and scrapes, which come every few
    /// seconds, at debug; the rest at info. `RUST_LOG` with `ladic_serve::access=warn`
    /// turns it off.
    fn log(&self, status: u16, elapsed: Duration) {
        let ms = (elapsed.as_secs_f64() * 1e4).round() / 10.0;
        let (method, route, id) = (&self.method, &self.route, &self.request_id);
        macro_rules! answered {
            ($level:ident) => {
                match self.error_type {
                    Some(error_type) => tracing::$level!(
                        target: ACCESS_LOG,
                        %method, %route, status, ms, request_id = %id, error_type, "answered"
                    ),
                    None => tracing::$level!(
                        target: ACCESS_LOG,
                        %method, %route, status, ms, request_id = %id, "answered"
                    ),
                }
            };
        }
        if self.quiet || route.starts_with("/health/") || route == "/metrics" {
            answered!(debug);
        } else {
            answered!(info);
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.counted {
            // Dropped while unwinding: a bug of ours, not a client that left.
            let status = if std::thread::panicking() {
                500
            } else {
                CLIENT_CLOSED
            };
            self.count(status);
        }
    }
}

/// Where a request's [`RequestRecord`] waits, in the request's extensions: a handler
/// that answers with a stream takes it, to count the request when the stream ends.
#[derive(Clone, Default)]
pub struct RecordSlot(Arc<std::sync::Mutex<Option<RequestRecord>>>);

impl RecordSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<RequestRecord>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn take(&self) -> Option<RequestRecord> {
        self.lock().take()
    }
}

fn new_request_id() -> HeaderValue {
    let id: u128 = rand::random();
    HeaderValue::from_str(&format!("{id:032x}")).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Milliseconds with microsecond precision, as the timing headers carry them.
pub fn millis_header(d: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// With an API key configured, POST routes need `Authorization: Bearer <key>` or
/// `x-api-key: <key>`.
async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = state.settings.api_key.as_deref() else {
        return next.run(req).await;
    };
    let headers = req.headers();
    // The scheme name is case-insensitive (RFC 9110, 11.1).
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let plain = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let ok = [bearer, plain]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(given.as_bytes(), key.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Compares a presented key with the configured one without an early exit: the time
/// taken depends only on the length of `given` (which the client chose), not on where
/// the first difference is, nor on the key's length.
fn constant_time_eq(given: &[u8], key: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != key.len());
    for (i, &g) in given.iter().enumerate() {
        diff |= g ^ key[i % key.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(
            !constant_time_eq(b"s3crets3cret", b"s3cret"),
            "a repeat of the key"
        );
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(!constant_time_eq(b"", b""));
    }

    #[test]
    fn cors_only_when_configured() {
        assert!(cors_layer(&[]).is_none());
        assert!(cors_layer(&["https://a.example".to_string()]).is_some());
    }
}
