//! Route handlers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::body::{BodyKind, hold, is_raw_image_type};
use super::error::{ApiError, ErrorBody};
use super::request::{
    self, BatchJson, CaptionJson, CaptionParams, Resolved, decode_base64_image, media_type,
    parse_json, parse_multipart,
};
use super::{
    AppState, InFlight, RecordSlot, RequestRecord, X_INFERENCE_TIME, X_QUEUE_TIME, X_TOTAL_TIME,
    millis_header,
};
use crate::preprocess;
use crate::sampler::{Schedule, planned_iterations};
use crate::scheduler::{
    Candidate, CaptionJob, CaptionOutput, CaptionReply, InferError, Scheduler, StepEvent,
};

#[derive(Debug, Serialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub inference_ms: f64,
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[derive(Debug, Serialize)]
pub struct CaptionResponse {
    pub caption: String,
    pub confidence: f32,
    pub candidates: Vec<Candidate>,
    pub model: String,
    pub steps: usize,
    pub seed: u64,
    pub timings: Timings,
}

#[derive(Debug, Serialize)]
pub struct BatchItem {
    pub caption: String,
    pub confidence: f32,
    pub candidates: Vec<Candidate>,
    pub timings: Timings,
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    pub results: Vec<BatchItem>,
    pub model: String,
    pub steps: usize,
    pub seed: u64,
    pub timings: Timings,
}

const ACCEPTED: &str = "send the image as image/* or application/octet-stream, as multipart/form-data field \"image\", or as application/json {\"image\": \"<base64>\"}";

/// `POST /caption`.
pub async fn caption(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let scheduler = state.ready_scheduler()?;
    let _in_flight = InFlight::new(&state.in_flight);
    refuse_if_queue_full(&scheduler, 1)?;

    let (parts, body) = req.into_parts();
    let query = CaptionParams::from_query(parts.uri.query())?;
    // Checked on their own too: a value the body overrides is still refused. Their
    // timeout is what the body must arrive within, before the body's own is known.
    let query_timeout = resolve(&state, &query)?.timeout;
    let media = media_type(&parts.headers)?.ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!("missing Content-Type; {ACCEPTED}"))
    })?;
    if is_raw_image_type(&media) {
        // Every parameter is in the query string: a request that would wait out its
        // deadline in the queue is refused before its body is read.
        scheduler.refuse_if_late(start, query_timeout)?;
    }
    let body_deadline = start + query_timeout;
    let read = |kind| state.read_body(&parts.headers, body, body_deadline, kind);
    // The image bytes keep the body's memory reserved until they are decoded.
    let (image, params): (Bytes, CaptionParams) = if is_raw_image_type(&media) {
        let (bytes, reserved) = read(BodyKind::Raw).await?;
        (hold(bytes, Arc::new(reserved)), query)
    } else if media == "multipart/form-data" {
        let (bytes, reserved) = read(BodyKind::Multipart).await?;
        let (image, form) = parse_multipart(&parts.headers, bytes).await?;
        (hold(image, Arc::new(reserved)), query.overridden_by(form))
    } else if media == "application/json" {
        let (bytes, reserved) = read(BodyKind::Json).await?;
        // The reservation goes with the bytes: a client that leaves meanwhile does not
        // free the memory that the parse still uses.
        let (image, body_params) = off_the_runtime(move || {
            let json: CaptionJson = parse_json(&bytes)?;
            drop(bytes);
            let image = hold(decode_base64_image(&json.image)?, Arc::new(reserved));
            Ok((image, json.params()))
        })
        .await?;
        (image, query.overridden_by(body_params))
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "unsupported Content-Type {media:?}; {ACCEPTED}"
        )));
    };
    let resolved = resolve(&state, &params)?;
    if params
        .stream
        .unwrap_or_else(|| accepts_event_stream(&parts.headers))
    {
        let record = parts.extensions.get::<RecordSlot>().cloned();
        return stream_caption(state.clone(), &scheduler, image, resolved, start, record).await;
    }
    let output = run_caption(&state, &scheduler, image, &resolved, start).await?;
    let total = start.elapsed();
    let body = caption_body(&state, &resolved, &output, total)?;
    Ok(with_timing_headers(
        Json(body).into_response(),
        output.queue_time,
        output.inference_time,
        total,
    ))
}

/// The body of a `POST /caption` answer (and of the `done` event of a stream).
fn caption_body(
    state: &AppState,
    resolved: &Resolved,
    output: &CaptionOutput,
    total: Duration,
) -> Result<CaptionResponse, ApiError> {
    let best = output
        .best()
        .cloned()
        .ok_or_else(|| ApiError::Inference("no caption candidates".into()))?;
    Ok(CaptionResponse {
        caption: best.caption,
        confidence: best.confidence,
        candidates: output.candidates.clone(),
        model: state.manifest.name.clone(),
        steps: resolved.sampler.steps,
        seed: resolved.seed,
        timings: Timings {
            queue_ms: ms(output.queue_time),
            inference_ms: ms(output.inference_time),
            total_ms: ms(total),
        },
    })
}

/// `Accept` lists `text/event-stream`, and not with `q=0` ("not acceptable").
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.split_once('=').is_some_and(|(name, q)| {
                    name.trim().eq_ignore_ascii_case("q") && q.trim().parse::<f32>() == Ok(0.0)
                })
            });
            media.eq_ignore_ascii_case("text/event-stream") && !refused
        })
}

/// Step events a streaming request may have waiting; past that the worker drops
/// intermediate events instead of waiting for a slow client.
const STREAM_BUFFER: usize = 256;

/// The `start` event of a stream: what is about to run.
#[derive(Debug, Serialize)]
struct StreamStart {
    model: String,
    seed: u64,
    steps: usize,
    /// Step events each candidate will send (Back&Refine restarts included).
    iterations: usize,
    candidates: usize,
    guidance: f64,
    back_refine: bool,
}

/// `POST /caption` answered with Server-Sent Events: `start`, a `step` per iteration
/// and candidate, then `done` (the JSON body of a plain answer) or `error`. Problems
/// found before the image is queued (bad request, full queue) are still plain JSON
/// errors with their status; only later ones arrive as an `error` event.
async fn stream_caption(
    state: Arc<AppState>,
    scheduler: &Scheduler,
    image: Bytes,
    resolved: Resolved,
    start: Instant,
    record: Option<RecordSlot>,
) -> Result<Response, ApiError> {
    let deadline = start + resolved.timeout;
    let pixels = decode_image(&state, image, deadline).await?;
    let (job, reply_rx) =
        CaptionJob::new(pixels, resolved.sampler.clone(), resolved.seed, deadline);
    let (events_tx, events_rx) = mpsc::channel(STREAM_BUFFER);
    scheduler.submit_streaming(job, events_tx)?;
    let schedule = Schedule::from_spec(&state.manifest.schedule);
    let first = StreamStart {
        model: state.manifest.name.clone(),
        seed: resolved.seed,
        steps: resolved.sampler.steps,
        iterations: planned_iterations(&resolved.sampler, &schedule),
        candidates: resolved.sampler.candidates,
        guidance: resolved.sampler.guidance,
        back_refine: resolved.sampler.back_refine.enabled,
    };
    let stream = CaptionStream {
        first: Some(json_event("start", &first)),
        events: events_rx,
        reply: Some(reply_rx),
        deadline: tokio::time::Instant::from_std(deadline),
        resolved,
        start,
        // The stream counts the request in the metrics when it ends, with the status
        // of its last event.
        record: record.and_then(|slot| slot.take()),
        in_flight: Some(StreamInFlight::new(state.clone())),
        state,
    };
    let events = futures_util::stream::unfold(stream, CaptionStream::next);
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Proxies that buffer responses (nginx) would hold the events back.
    response.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// Counts a streaming request as in flight until its last event is out (or the stream
/// is dropped), so a draining server lets it finish.
struct StreamInFlight(Arc<AppState>);

impl StreamInFlight {
    fn new(state: Arc<AppState>) -> StreamInFlight {
        state
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StreamInFlight(state)
    }
}

impl Drop for StreamInFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The body of a streaming answer. Dropping it (the client went away) drops both
/// receivers, and the worker frees the job's rows at its next step.
struct CaptionStream {
    first: Option<Event>,
    events: mpsc::Receiver<StepEvent>,
    /// `None` once the last event went out.
    reply: Option<oneshot::Receiver<Result<CaptionOutput, InferError>>>,
    deadline: tokio::time::Instant,
    resolved: Resolved,
    start: Instant,
    state: Arc<AppState>,
    /// `None` once the last event is out (or the middleware counted the request).
    record: Option<RequestRecord>,
    /// `None` once the last event is out: what the socket still holds is not the
    /// server's work, and must not hold up a drain.
    in_flight: Option<StreamInFlight>,
}

impl CaptionStream {
    async fn next(mut self) -> Option<(Result<Event, std::convert::Infallible>, Self)> {
        if let Some(first) = self.first.take() {
            return Some((Ok(first), self));
        }
        let reply = self.reply.take()?;
        // Step events until the worker lets go of the job, then its answer.
        match tokio::time::timeout_at(self.deadline, self.events.recv()).await {
            Ok(Some(step)) => {
                self.reply = Some(reply);
                return Some((Ok(json_event("step", &step)), self));
            }
            Ok(None) => {}
            Err(_) => return Some((Ok(self.last_event(Err(ApiError::Timeout))), self)),
        }
        let result = match tokio::time::timeout_at(self.deadline, reply).await {
            Err(_) => Err(ApiError::Timeout),
            Ok(Err(_)) => Err(ApiError::Inference("the worker dropped the request".into())),
            Ok(Ok(result)) => result.map_err(ApiError::from),
        };
        let body = result.and_then(|output| {
            caption_body(&self.state, &self.resolved, &output, self.start.elapsed())
        });
        Some((Ok(self.last_event(body)), self))
    }

    /// The `done` or `error` event; the request is counted with its status, and no
    /// longer in flight.
    fn last_event(&mut self, body: Result<CaptionResponse, ApiError>) -> Event {
        let (event, status, error_type) = match body {
            Ok(body) => (json_event("done", &body), 200, None),
            Err(e) => (error_event(&e), e.status().as_u16(), Some(e.error_type())),
        };
        if let Some(record) = self.record.take() {
            record.finish_with_error_type(status, error_type);
        }
        self.in_flight = None;
        event
    }
}

fn json_event<T: Serialize>(name: &str, data: &T) -> Event {
    // Serializing these plain structs cannot fail; compact JSON has no line breaks.
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_default())
}

fn error_event(e: &ApiError) -> Event {
    e.log();
    json_event(
        "error",
        &ErrorBody {
            error: e.to_string(),
            error_type: e.error_type(),
        },
    )
}

/// `POST /caption/batch`.
pub async fn caption_batch(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let scheduler = state.ready_scheduler()?;
    let _in_flight = InFlight::new(&state.in_flight);
    let (parts, body) = req.into_parts();
    let query = CaptionParams::from_query(parts.uri.query())?;
    // Checked on their own too: a value the body overrides is still refused. Their
    // timeout is what the body must arrive within, before the body's own is known.
    let query_timeout = resolve(&state, &query)?.timeout;
    refuse_batch_stream(&query)?;
    match media_type(&parts.headers)?.as_deref() {
        Some("application/json") => {}
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "POST /caption/batch takes application/json {{\"images\": [\"<base64>\", ...]}}, got {}",
                other.unwrap_or("no Content-Type")
            )));
        }
    }
    let body_deadline = start + query_timeout;
    let (bytes, reserved) = state
        .read_body(&parts.headers, body, body_deadline, BodyKind::Json)
        .await?;
    // The reservation goes with the bytes (see `caption`).
    let (json, reserved): (BatchJson, _) =
        off_the_runtime(move || Ok((parse_json(&bytes)?, reserved))).await?;
    let max = state.settings.max_batch_images;
    if json.images.is_empty() || json.images.len() > max {
        return Err(ApiError::InvalidParameter(format!(
            "images must hold between 1 and {max} images, got {}",
            json.images.len()
        )));
    }
    let params = query.overridden_by(json.params());
    refuse_batch_stream(&params)?;
    refuse_if_queue_full(&scheduler, json.images.len())?;
    let resolved = resolve(&state, &params)?;
    // The images keep the body's reservation (shared) until the last is decoded; each
    // base64 string goes as soon as it is decoded.
    let reserved = Arc::new(reserved);
    let encoded = json.images;
    let images: Vec<Bytes> = off_the_runtime(move || {
        encoded
            .into_iter()
            .enumerate()
            .map(|(i, b64)| match decode_base64_image(&b64) {
                Ok(image) => Ok(hold(image, reserved.clone())),
                Err(e) => Err(at_index(i, e)),
            })
            .collect()
    })
    .await?;
    // Every image is decoded, and refused if it must be, before any is queued: a bad
    // image is answered at once, not after the other images' captions.
    let deadline = start + resolved.timeout;
    let state_ref = &state;
    let decodes = images.into_iter().enumerate().map(|(i, image)| async move {
        decode_image(state_ref, image, deadline)
            .await
            .map_err(|e| at_index(i, e))
    });
    let pixels = futures_util::future::try_join_all(decodes).await?;
    let (jobs, replies): (Vec<_>, Vec<_>) = pixels
        .into_iter()
        .map(|pixels| CaptionJob::new(pixels, resolved.sampler.clone(), resolved.seed, deadline))
        .unzip();
    // All or none: images queued while another request took the rest of the room
    // would run for nothing, and the 429 would come only after them.
    scheduler.submit_all(jobs)?;
    let waits = replies
        .into_iter()
        .map(|reply| wait_for_caption(reply, deadline));
    let outputs = futures_util::future::join_all(waits).await;
    let mut results = Vec::with_capacity(outputs.len());
    let (mut queue, mut inference) = (Duration::ZERO, Duration::ZERO);
    for (i, output) in outputs.into_iter().enumerate() {
        let output = output.map_err(|e| at_index(i, e))?;
        let best = output
            .best()
            .cloned()
            .ok_or_else(|| ApiError::Inference("no caption candidates".into()))?;
        queue = queue.max(output.queue_time);
        inference = inference.max(output.inference_time);
        results.push(BatchItem {
            caption: best.caption,
            confidence: best.confidence,
            candidates: output.candidates.clone(),
            timings: Timings {
                queue_ms: ms(output.queue_time),
                inference_ms: ms(output.inference_time),
                total_ms: ms(output.queue_time + output.inference_time),
            },
        });
    }
    let total = start.elapsed();
    let body = BatchResponse {
        results,
        model: state.manifest.name.clone(),
        steps: resolved.sampler.steps,
        seed: resolved.seed,
        timings: Timings {
            queue_ms: ms(queue),
            inference_ms: ms(inference),
            total_ms: ms(total),
        },
    };
    Ok(with_timing_headers(
        Json(body).into_response(),
        queue,
        inference,
        total,
    ))
}

fn refuse_batch_stream(params: &CaptionParams) -> Result<(), ApiError> {
    if params.stream == Some(true) {
        return Err(ApiError::InvalidParameter(
            "stream: POST /caption/batch does not stream; stream single images with POST /caption"
                .into(),
        ));
    }
    Ok(())
}

/// Prefixes image-specific errors with the image's position in the batch.
fn at_index(i: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidImage(m) => ApiError::InvalidImage(format!("images[{i}]: {m}")),
        ApiError::MalformedRequest(m) => ApiError::MalformedRequest(format!("images[{i}]: {m}")),
        ApiError::ImageTooLarge(m) => ApiError::ImageTooLarge(format!("images[{i}]: {m}")),
        other => other,
    }
}

fn resolve(state: &AppState, params: &CaptionParams) -> Result<Resolved, ApiError> {
    let s = &state.settings;
    request::resolve(params, &state.defaults, s.default_timeout, s.max_timeout)
}

/// Refuses before decoding anything when the queue cannot take `n` more images.
fn refuse_if_queue_full(scheduler: &Scheduler, n: usize) -> Result<(), ApiError> {
    if !scheduler.has_room_for(n) {
        return Err(ApiError::Overloaded);
    }
    Ok(())
}

/// Decode + preprocess on the blocking pool, queue, and wait for the worker's answer,
/// all within the request's deadline.
async fn run_caption(
    state: &AppState,
    scheduler: &Scheduler,
    image: Bytes,
    resolved: &Resolved,
    start: Instant,
) -> Result<CaptionOutput, ApiError> {
    let deadline = start + resolved.timeout;
    let pixels = decode_image(state, image, deadline).await?;
    queue_and_wait(scheduler, pixels, resolved, deadline).await
}

/// Queues decoded pixels and waits for the worker's answer until `deadline`.
async fn queue_and_wait(
    scheduler: &Scheduler,
    pixels: ndarray::Array3<f32>,
    resolved: &Resolved,
    deadline: Instant,
) -> Result<CaptionOutput, ApiError> {
    let (job, reply) = CaptionJob::new(pixels, resolved.sampler.clone(), resolved.seed, deadline);
    scheduler.submit(job)?;
    wait_for_caption(reply, deadline).await
}

/// A queued job's answer, or 504 when `deadline` passes first.
async fn wait_for_caption(
    reply: CaptionReply,
    deadline: Instant,
) -> Result<CaptionOutput, ApiError> {
    match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), reply).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(_)) => Err(ApiError::Inference("the worker dropped the request".into())),
        Ok(Ok(result)) => result.map_err(ApiError::from),
    }
}

/// Decode + preprocess on the blocking pool, a bounded number at a time and within
/// the decode memory budget; 504 when the deadline passes first. A decode that has
/// started runs to its end (it cannot be interrupted) and keeps its permits until then,
/// so abandoned decodes still count against the bounds; one whose deadline passed
/// while it waited does not start.
async fn decode_image(
    state: &AppState,
    image: Bytes,
    deadline: Instant,
) -> Result<ndarray::Array3<f32>, ApiError> {
    const MIB: u64 = 1 << 20;
    let deadline = tokio::time::Instant::from_std(deadline);
    let budget = state.settings.decode_memory_mib.max(1);
    let limits = state.settings.image_limits;
    // The header is parsed off the async threads: a PNG's chunks before its pixels, or
    // a JPEG's copy of its input, are the client's to make large.
    let header = image.clone();
    let estimate =
        tokio::task::spawn_blocking(move || preprocess::decode_memory_estimate(&header, &limits));
    let estimate = tokio::time::timeout_at(deadline, estimate)
        .await
        .map_err(|_| ApiError::Timeout)?
        .map_err(|e| ApiError::Inference(format!("image header task failed: {e}")))?;
    let shutting_down = |_| ApiError::NotReady("the server is shutting down".into());
    // No estimate: the decode refuses the image from its header, needing no room.
    let memory = match estimate {
        None => None,
        Some(bytes) => {
            let mib = bytes.div_ceil(MIB).clamp(1, u64::from(budget)) as u32;
            let memory = state.decode_memory.clone().acquire_many_owned(mib);
            let memory = tokio::time::timeout_at(deadline, memory)
                .await
                .map_err(|_| ApiError::Timeout)?
                .map_err(shutting_down)?;
            Some(memory)
        }
    };
    let permit = tokio::time::timeout_at(deadline, state.decode_permits.clone().acquire_owned())
        .await
        .map_err(|_| ApiError::Timeout)?
        .map_err(shutting_down)?;
    if tokio::time::Instant::now() >= deadline {
        return Err(ApiError::Timeout);
    }
    let spec = state.manifest.image.clone();
    let decode = tokio::task::spawn_blocking(move || {
        let _permits = (permit, memory);
        preprocess::preprocess(&image, &spec, &limits)
    });
    tokio::time::timeout_at(deadline, decode)
        .await
        .map_err(|_| ApiError::Timeout)?
        .map_err(|e| ApiError::Inference(format!("image decoding task failed: {e}")))?
        .map_err(ApiError::from)
}

/// Runs `work`, parsing that takes tens of milliseconds on a large body (JSON, base64),
/// on the blocking pool, so that the async threads go on serving other connections and
/// the health probes meanwhile.
async fn off_the_runtime<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Inference(format!("request parsing task failed: {e}")))?
}

fn with_timing_headers(
    mut response: Response,
    queue: Duration,
    inference: Duration,
    total: Duration,
) -> Response {
    let h = response.headers_mut();
    h.insert(X_QUEUE_TIME.clone(), millis_header(queue));
    h.insert(X_INFERENCE_TIME.clone(), millis_header(inference));
    h.insert(X_TOTAL_TIME.clone(), millis_header(total));
    response
}

/// The demo page: one self-contained HTML file (inline CSS and JS, nothing fetched
/// from elsewhere).
const INDEX_HTML: &str = include_str!("index.html");

/// What the page may load: itself, its inline style and script, the image the user
/// picks, and this server's API. Nothing from any other origin.
const INDEX_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the demo page.
pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, INDEX_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

/// `GET /health/live`: the process is up and serving HTTP, and no worker is stuck in
/// a step (then only a restart helps).
pub async fn live(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.stalled_worker() {
        Some(stalled) => Err(stalled),
        None => Ok(Json(serde_json::json!({"status": "alive"}))),
    }
}

/// `GET /health/ready`: the bundle is loaded, a warm-up caption succeeded, the server
/// is not draining, and no worker is stuck in a step.
pub async fn ready(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(stalled) = state.stalled_worker() {
        Err(stalled)
    } else if state.is_ready() {
        Ok(Json(serde_json::json!({"status": "ready"})))
    } else if state.is_draining() {
        Err(ApiError::NotReady("the server is shutting down".into()))
    } else {
        Err(ApiError::NotReady(
            "the model is loading or warming up".into(),
        ))
    }
}

/// `GET /info`: what is being served and how it is configured.
pub async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let m = &state.manifest;
    let s = &state.settings;
    let d = &state.defaults;
    Json(serde_json::json!({
        "service": "ladic-serve",
        "version": env!("CARGO_PKG_VERSION"),
        "model": m.name,
        "ready": state.is_ready(),
        "device": state.device.get().map(|d| d.to_string()),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "bundle": {
            "name": m.name,
            "description": m.description,
            "created_by": m.created_by,
            "format_version": m.format_version,
            "image_size": m.image.size,
            "max_len": m.text.max_len,
            "vocab_size": m.text.vocab_size,
            "num_timesteps": m.schedule.num_timesteps,
            "unconditional_half": m.denoiser_unconditional_half(),
            "kv_dtype": m.kv_dtype(),
        },
        "defaults": {
            "steps": d.steps,
            "guidance": d.guidance,
            "back_refine": d.back_refine.enabled,
            "candidates": d.candidates,
            "timeout_ms": s.default_timeout.as_millis() as u64,
        },
        "limits": {
            "max_steps": request::MAX_STEPS,
            "max_guidance": request::MAX_GUIDANCE,
            "max_candidates": request::MAX_CANDIDATES,
            "max_timeout_ms": s.max_timeout.as_millis() as u64,
            "max_body_bytes": s.max_body_bytes,
            "max_image_pixels": s.image_limits.max_pixels,
            "max_image_side": s.image_limits.max_side,
            "max_batch_images": s.max_batch_images,
            "decode_memory_mib": s.decode_memory_mib,
            "worker_stall_timeout_ms": s.worker_stall_timeout.map(|t| t.as_millis() as u64),
            "body_memory_mib": s.body_memory_mib,
        },
        "scheduler": {
            "workers": s.workers,
            "batching": s.batching,
            "max_batch_rows": s.max_batch_rows,
            "queue_size": s.queue_size,
            // Known once the workers have loaded (null before).
            "row_parallelism": state.scheduler.get().map(|x| x.info.row_parallelism),
            "intra_op_threads": state.scheduler.get().map(|x| x.info.intra_op_threads),
            "state_on_device": state.scheduler.get().map(|x| x.info.state_on_device),
        },
    }))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(s) = state.scheduler.get() {
        state.metrics.queue_depth.set(s.queue_depth() as i64);
    }
    state
        .metrics
        .requests_in_flight
        .set(state.in_flight() as i64);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (StatusCode::OK, headers, state.metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_streams_are_asked_for_in_accept_unless_refused_by_q_zero() {
        let accepts = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::ACCEPT, v.parse().unwrap());
            }
            accepts_event_stream(&headers)
        };
        assert!(accepts(&["text/event-stream"]));
        assert!(accepts(&["application/json, Text/Event-Stream;q=0.5"]));
        assert!(accepts(&["application/json", "text/event-stream"]));
        assert!(!accepts(&[]));
        assert!(!accepts(&["application/json"]));
        assert!(!accepts(&["*/*"]));
        assert!(!accepts(&["application/json;q=1, text/event-stream;q=0"]));
        assert!(!accepts(&["text/event-stream; q=0.000"]));
    }
}
