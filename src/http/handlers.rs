//! Route handlers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::request::{
    self, BatchJson, CaptionJson, CaptionParams, Resolved, decode_base64_image, is_raw_image_type,
    media_type, parse_json, parse_multipart, read_body,
};
use super::{AppState, InFlight, X_INFERENCE_TIME, X_QUEUE_TIME, X_TOTAL_TIME, millis_header};
use crate::preprocess;
use crate::scheduler::{Candidate, CaptionJob, CaptionOutput, Scheduler};

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
    refuse_if_queue_full(&state, &scheduler, 1)?;

    let (parts, body) = req.into_parts();
    let query = CaptionParams::from_query(parts.uri.query())?;
    let media = media_type(&parts.headers).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!("missing Content-Type; {ACCEPTED}"))
    })?;
    let limit = state.settings.max_body_bytes;
    let (image, params): (Bytes, CaptionParams) = if is_raw_image_type(&media) {
        (read_body(&parts.headers, body, limit).await?, query)
    } else if media == "multipart/form-data" {
        let bytes = read_body(&parts.headers, body, limit).await?;
        let (image, form) = parse_multipart(&parts.headers, bytes).await?;
        (image, query.overridden_by(form))
    } else if media == "application/json" {
        let bytes = read_body(&parts.headers, body, limit).await?;
        let json: CaptionJson = parse_json(&bytes)?;
        let image = Bytes::from(decode_base64_image(&json.image)?);
        (image, query.overridden_by(json.params()))
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "unsupported Content-Type {media:?}; {ACCEPTED}"
        )));
    };
    let resolved = resolve(&state, &params)?;
    let output = run_caption(&state, &scheduler, image, &resolved, start).await?;
    let best = output
        .best()
        .cloned()
        .ok_or_else(|| ApiError::Inference("no caption candidates".into()))?;
    let total = start.elapsed();
    let body = CaptionResponse {
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
    };
    Ok(with_timing_headers(
        Json(body).into_response(),
        output.queue_time,
        output.inference_time,
        total,
    ))
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
    match media_type(&parts.headers).as_deref() {
        Some("application/json") => {}
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "POST /caption/batch takes application/json {{\"images\": [\"<base64>\", ...]}}, got {}",
                other.unwrap_or("no Content-Type")
            )));
        }
    }
    let bytes = read_body(&parts.headers, body, state.settings.max_body_bytes).await?;
    let json: BatchJson = parse_json(&bytes)?;
    let max = state.settings.max_batch_images;
    if json.images.is_empty() || json.images.len() > max {
        return Err(ApiError::InvalidParameter(format!(
            "images must hold between 1 and {max} images, got {}",
            json.images.len()
        )));
    }
    refuse_if_queue_full(&state, &scheduler, json.images.len())?;
    let resolved = resolve(&state, &query.overridden_by(json.params()))?;
    let mut images = Vec::with_capacity(json.images.len());
    for (i, b64) in json.images.iter().enumerate() {
        images.push(Bytes::from(
            decode_base64_image(b64).map_err(|e| at_index(i, e))?,
        ));
    }
    let runs = images
        .into_iter()
        .map(|image| run_caption(&state, &scheduler, image, &resolved, start));
    let outputs = futures_util::future::join_all(runs).await;
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
    request::resolve(
        params,
        &state.defaults,
        state
            .settings
            .default_timeout
            .min(state.settings.max_timeout),
        state.settings.max_timeout,
    )
}

/// Refuses before decoding anything when the queue cannot take `n` more images.
fn refuse_if_queue_full(state: &AppState, scheduler: &Scheduler, n: usize) -> Result<(), ApiError> {
    if scheduler.queue_depth() + n > state.settings.queue_size.max(1) {
        return Err(ApiError::Overloaded);
    }
    Ok(())
}

/// Decode + preprocess on the blocking pool, queue, and wait for the worker's answer.
async fn run_caption(
    state: &AppState,
    scheduler: &Scheduler,
    image: Bytes,
    resolved: &Resolved,
    start: Instant,
) -> Result<CaptionOutput, ApiError> {
    let deadline = start + resolved.timeout;
    let pixels = {
        let _permit = state
            .decode_permits
            .acquire()
            .await
            .map_err(|_| ApiError::NotReady("the server is shutting down".into()))?;
        let spec = state.manifest.image.clone();
        let limits = state.settings.image_limits;
        tokio::task::spawn_blocking(move || preprocess::preprocess(&image, &spec, &limits))
            .await
            .map_err(|e| ApiError::Inference(format!("image decoding task failed: {e}")))??
    };
    let (reply, rx) = oneshot::channel();
    scheduler.submit(CaptionJob {
        pixels,
        params: resolved.sampler.clone(),
        seed: resolved.seed,
        deadline,
        enqueued: Instant::now(),
        reply,
    })?;
    match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), rx).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(_)) => Err(ApiError::Inference("the worker dropped the request".into())),
        Ok(Ok(result)) => result.map_err(ApiError::from),
    }
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

/// `GET /health/live`: the process is up and serving HTTP.
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "alive"}))
}

/// `GET /health/ready`: the bundle is loaded, a warm-up caption succeeded, and the
/// server is not draining.
pub async fn ready(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if state.is_ready() {
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
        },
        "scheduler": {
            "workers": s.workers,
            "batching": s.batching,
            "max_batch_rows": s.max_batch_rows,
            "queue_size": s.queue_size,
        },
    }))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(s) = state.scheduler.get() {
        state.metrics.queue_depth.set(s.queue_depth() as i64);
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (StatusCode::OK, headers, state.metrics.render()).into_response()
}
