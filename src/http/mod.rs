//! The HTTP API: routes, shared state, and the middleware every response passes
//! through (request id, timing header, metrics, auth).

pub mod error;
mod handlers;
pub mod request;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tokio::sync::Semaphore;

pub use error::ApiError;

use crate::bundle::Manifest;
use crate::config::BatchingMode;
use crate::metrics::Metrics;
use crate::preprocess::ImageLimits;
use crate::runtime::ActiveDevice;
use crate::sampler::SamplerParams;
use crate::scheduler::Scheduler;

/// Every route the server answers, as (method, path). The router is built from this
/// list and a test checks it against openapi.yaml, so the two cannot drift apart.
pub const ROUTES: &[(&str, &str)] = &[
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
    pub api_key: Option<String>,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub queue_size: usize,
    pub workers: usize,
    pub batching: BatchingMode,
    pub max_batch_rows: usize,
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
    /// Bounds concurrent image decodes so a burst cannot take every core and memory.
    pub decode_permits: Semaphore,
    pub started: Instant,
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
            decode_permits: Semaphore::new(cores * 2),
            started: Instant::now(),
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
    router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Request id, total time header and the request metrics, for every response.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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
    let method = req.method().clone();
    let mut response = next.run(req).await;
    let elapsed = start.elapsed();
    let headers = response.headers_mut();
    headers.insert(X_REQUEST_ID.clone(), request_id);
    if !headers.contains_key(&X_TOTAL_TIME) {
        headers.insert(X_TOTAL_TIME.clone(), millis_header(elapsed));
    }
    if method != Method::OPTIONS {
        let status = response.status().as_u16().to_string();
        state
            .metrics
            .requests_total
            .with_label_values(&[route.as_str(), status.as_str()])
            .inc();
        state
            .metrics
            .request_duration_seconds
            .with_label_values(&[route.as_str()])
            .observe(elapsed.as_secs_f64());
    }
    response
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
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
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

/// Compares without an early exit, so response time does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
