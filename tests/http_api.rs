//! The HTTP API end to end: a real server on a loopback port, the real default bundle,
//! the real ONNX Runtime.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{TestServer, lying_png, png_form, scene_png, test_args};
use image::ImageFormat;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

/// Checks the error body shape and returns its error_type.
/// The value of an unlabelled sample (`name value`) in the metrics text; 0 if absent.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn error_type(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status().as_u16(), status, "status");
    assert!(r.headers().contains_key("x-request-id"));
    let body = json_of(r).await;
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    body["error_type"].as_str().expect("error_type").to_string()
}

fn assert_caption_response(body: &Value, steps: u64) {
    assert!(
        body["caption"].as_str().is_some_and(|c| c.ends_with('.')),
        "{body}"
    );
    let conf = body["confidence"].as_f64().expect("confidence");
    assert!((0.0..=1.0).contains(&conf), "{body}");
    assert_eq!(body["model"], "scenes-tiny");
    assert_eq!(body["steps"].as_u64(), Some(steps));
    assert!(body["seed"].as_u64().is_some());
    let cands = body["candidates"].as_array().expect("candidates");
    assert!(!cands.is_empty());
    assert!(cands.iter().any(|c| c["caption"] == body["caption"]));
    for key in ["queue_ms", "inference_ms", "total_ms"] {
        assert!(body["timings"][key].as_f64().is_some(), "{key}");
    }
}

#[tokio::test]
async fn every_request_form_captions() {
    let s = TestServer::default().await;
    let png = scene_png(0);

    // Raw body, image/png, with parameters in the query string.
    let r = s
        .png_request("/caption?steps=3&seed=5&guidance=0.5", png.clone())
        .header("x-request-id", "my-request-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for h in ["x-total-time", "x-queue-time", "x-inference-time"] {
        let v: f64 = r.headers()[h].to_str().unwrap().parse().unwrap();
        assert!(v >= 0.0, "{h}");
    }
    assert_eq!(r.headers()["x-request-id"], "my-request-1");
    let raw = json_of(r).await;
    assert_caption_response(&raw, 3);
    assert_eq!(raw["seed"], 5);

    // application/octet-stream, JPEG; a request id is generated when absent.
    let r = s
        .client
        .post(s.url("/caption?steps=2"))
        .header("content-type", "application/octet-stream")
        .body(common::encode(&common::scene(1), ImageFormat::Jpeg))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!r.headers()["x-request-id"].is_empty());
    assert_caption_response(&json_of(r).await, 2);

    // Multipart with parameters as form fields: same seed and steps as the raw request,
    // so the same caption.
    let form = png_form(png.clone())
        .text("steps", "3")
        .text("seed", "5")
        .text("guidance", "0.5");
    let r = s.post_multipart("/caption", form).await;
    assert_eq!(r.status(), StatusCode::OK);
    let multipart = json_of(r).await;
    assert_eq!(multipart["caption"], raw["caption"]);

    // JSON with plain base64 and with a data URI.
    let b64 = STANDARD.encode(&png);
    for image in [b64.clone(), format!("data:image/png;base64,{b64}")] {
        let r = s
            .post_json(
                "/caption",
                &json!({"image": image, "steps": 3, "seed": 5, "guidance": 0.5}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = json_of(r).await;
        assert_caption_response(&body, 3);
        assert_eq!(body["caption"], raw["caption"]);
    }
    // The body's value wins over the query's, but an invalid query value is refused.
    let r = s
        .post_json("/caption?steps=4", &json!({"image": b64, "steps": 3}))
        .await;
    assert_caption_response(&json_of(r).await, 3);
    for (path, body) in [
        ("/caption?steps=700", json!({"image": b64, "steps": 3})),
        (
            "/caption/batch?steps=700",
            json!({"images": [b64], "steps": 3}),
        ),
    ] {
        let r = s.post_json(path, &body).await;
        assert_eq!(error_type(r, 422).await, "invalid_parameter", "{path}");
    }

    // MBR candidates and Back&Refine.
    let (status, body) = s
        .post_png_json(
            "/caption?candidates=3&back_refine=true&steps=4",
            png.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["candidates"].as_array().unwrap().len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn batch_endpoint() {
    let s = TestServer::default().await;
    let images: Vec<String> = (0..3).map(|v| STANDARD.encode(scene_png(v))).collect();
    let r = s
        .post_json(
            "/caption/batch",
            &json!({"images": images, "steps": 2, "seed": 9}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("x-inference-time"));
    let body = json_of(r).await;
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for item in results {
        assert!(item["caption"].as_str().unwrap().ends_with('.'));
    }
    assert_eq!(body["steps"], 2);
    assert_eq!(body["seed"], 9);

    // The same image with the same seed alone gives the same caption as in the batch.
    let (_, alone) = s
        .post_png_json("/caption?steps=2&seed=9", scene_png(1))
        .await;
    assert_eq!(alone["caption"], results[1]["caption"]);

    // Empty, too many, a bad image, wrong content type.
    let r = s.post_json("/caption/batch", &json!({"images": []})).await;
    assert_eq!(error_type(r, 422).await, "invalid_parameter");
    let many: Vec<String> = (0..17).map(|_| images[0].clone()).collect();
    let r = s
        .post_json("/caption/batch", &json!({"images": many}))
        .await;
    assert_eq!(error_type(r, 422).await, "invalid_parameter");
    // A bad image is refused before any image of the batch is queued: no denoiser call.
    let calls = || async { metric_value(&s.metrics_text().await, "ladic_batch_rows_count") };
    let calls_before = calls().await;
    let r = s
        .post_json(
            "/caption/batch",
            &json!({"images": [images[0], images[1], STANDARD.encode(b"not an image")]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(
        json_of(r).await["error"]
            .as_str()
            .unwrap()
            .contains("images[2]")
    );
    assert_eq!(
        calls().await,
        calls_before,
        "the good images were captioned"
    );
    // A batch does not stream, asked in the query or in the body.
    for (path, body) in [
        ("/caption/batch?stream=true", json!({"images": [images[0]]})),
        (
            "/caption/batch",
            json!({"images": [images[0]], "stream": true}),
        ),
    ] {
        let r = s.post_json(path, &body).await;
        let message = json_of(r).await["error"].as_str().unwrap().to_string();
        assert!(message.contains("does not stream"), "{message}");
    }
    let r = s.post_png("/caption/batch", scene_png(0)).await;
    assert_eq!(error_type(r, 415).await, "unsupported_media_type");
    s.stop().await;
}

#[tokio::test]
async fn error_statuses() {
    let mut args = test_args();
    args.max_body_bytes = 64 * 1024;
    args.max_image_pixels = 1_000_000;
    let s = TestServer::start(args).await;

    // 400: undecodable image, malformed JSON, bad base64, multipart without `image`.
    let r = s.post_png("/caption", "definitely not a PNG").await;
    assert_eq!(error_type(r, 400).await, "invalid_image");
    let mut truncated = scene_png(0);
    truncated.truncate(truncated.len() / 2);
    let r = s.post_png("/caption", truncated).await;
    assert_eq!(error_type(r, 400).await, "invalid_image");
    // A JPEG cut off in its image data, which its decoder alone would fill in with grey.
    let jpeg = common::encode(&common::scene(0), ImageFormat::Jpeg);
    let r = s
        .post("/caption")
        .header("content-type", "image/jpeg")
        .body(jpeg[..jpeg.len() * 3 / 4].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = json_of(r).await;
    assert_eq!(body["error_type"], "invalid_image");
    assert!(
        body["error"].as_str().unwrap().contains("truncated"),
        "{body}"
    );
    let r = s
        .post("/caption")
        .header("content-type", "application/json")
        .body("{\"image\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(error_type(r, 400).await, "malformed_request");
    let r = s
        .post_json("/caption", &json!({"image": "%%% not base64 %%%"}))
        .await;
    assert_eq!(error_type(r, 400).await, "malformed_request");
    let form = reqwest::multipart::Form::new().text("steps", "3");
    let r = s.post_multipart("/caption", form).await;
    assert_eq!(error_type(r, 400).await, "malformed_request");
    // Two images, or a parameter twice: which one counts would be a guess.
    let two_images = png_form(scene_png(0)).part(
        "image",
        reqwest::multipart::Part::bytes(scene_png(1))
            .mime_str("image/png")
            .unwrap(),
    );
    let r = s.post_multipart("/caption", two_images).await;
    assert_eq!(error_type(r, 400).await, "malformed_request");
    let steps_twice = png_form(scene_png(0)).text("steps", "2").text("steps", "3");
    let r = s.post_multipart("/caption", steps_twice).await;
    assert_eq!(error_type(r, 400).await, "malformed_request");
    // JSON that is not the request's shape: 400, like malformed JSON.
    for body in [json!({}), json!(null), json!([]), json!({"steps": 2})] {
        let r = s.post_json("/caption", &body).await;
        assert_eq!(error_type(r, 400).await, "malformed_request", "{body}");
    }
    let r = s
        .post("/caption")
        .header("content-type", "multipart/form-data")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_type(r, 400).await, "malformed_request");

    // 413: body over the limit, with and without a Content-Length.
    let big = vec![0u8; 100 * 1024];
    let r = s.post_png("/caption", big.clone()).await;
    assert_eq!(error_type(r, 413).await, "payload_too_large");
    let stream =
        futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![0u8; 16 * 1024])));
    let r = s
        .post("/caption")
        .header("content-type", "image/png")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(error_type(r, 413).await, "payload_too_large");

    // 415: unsupported or missing content type.
    let r = s
        .post("/caption")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(error_type(r, 415).await, "unsupported_media_type");
    let r = s.post("/caption").body(scene_png(0)).send().await.unwrap();
    assert_eq!(error_type(r, 415).await, "unsupported_media_type");
    // A Content-Type that is not text is not called missing.
    for route in ["/caption", "/caption/batch"] {
        let r = s
            .post(route)
            .header(
                "content-type",
                reqwest::header::HeaderValue::from_bytes(b"image/\xff").unwrap(),
            )
            .body(scene_png(0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);
        let body = json_of(r).await;
        assert!(
            body["error"].as_str().unwrap().contains("not plain ASCII"),
            "{body}"
        );
    }

    // 422: parameters out of range, unknown, of the wrong type; image too large.
    for q in [
        "steps=0",
        "steps=101",
        "guidance=11",
        "candidates=9",
        "steps=abc",
        "stepz=4",
        "timeout_ms=999999999",
    ] {
        let r = s.post_png(&format!("/caption?{q}"), scene_png(0)).await;
        assert_eq!(error_type(r, 422).await, "invalid_parameter", "{q}");
    }
    let r = s
        .post_json("/caption", &json!({"image": "AAAA", "guidance": "lots"}))
        .await;
    assert_eq!(error_type(r, 422).await, "invalid_parameter");
    let r = s.post_png("/caption", lying_png(50_000, 50_000)).await;
    assert_eq!(error_type(r, 422).await, "image_too_large");
    let r = s.post_png("/caption", lying_png(2000, 2000)).await;
    assert_eq!(error_type(r, 422).await, "image_too_large");

    // 504: a deadline too short for the work.
    let r = s
        .post_png("/caption?steps=100&candidates=8&timeout_ms=1", scene_png(0))
        .await;
    assert_eq!(error_type(r, 504).await, "timeout");

    // 404 and 405 keep the JSON error shape.
    let r = s.get("/nope").await;
    assert_eq!(error_type(r, 404).await, "not_found");
    let r = s.get("/caption").await;
    assert_eq!(error_type(r, 405).await, "method_not_allowed");
    s.stop().await;
}

#[tokio::test]
async fn full_queue_answers_429_with_retry_after() {
    let mut args = test_args();
    args.queue_size = 1;
    args.max_batch_images = 1;
    args.workers = 1;
    args.batching = ladic_serve::config::BatchingMode::Off;
    let s = TestServer::start(args).await;
    let png = scene_png(0);
    let sends = (0..12).map(|_| {
        s.png_request("/caption?steps=60&candidates=4", png.clone())
            .send()
    });
    let responses = futures_util::future::join_all(sends).await;
    let mut ok = 0;
    let mut overloaded = 0;
    for r in responses {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(r.headers()["retry-after"], "1");
                assert_eq!(error_type(r, 429).await, "overloaded");
                overloaded += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1, "some requests are served");
    assert!(overloaded >= 1, "some requests are refused");
    let refused = |reason: &str| {
        s.state()
            .metrics
            .requests_refused_total
            .with_label_values(&[reason])
            .get()
    };
    assert_eq!(
        refused("queue_full"),
        overloaded,
        "each refusal counted by reason"
    );
    assert_eq!(refused("queue_too_slow") + refused("uploads_busy"), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_batch_is_queued_whole_or_not_at_all() {
    use ladic_serve::sampler::SamplerParams;
    use ladic_serve::scheduler::{CaptionJob, SubmitError};
    use std::time::{Duration, Instant};

    let mut args = test_args();
    args.workers = 1;
    args.batching = ladic_serve::config::BatchingMode::Off;
    args.queue_size = 3;
    args.max_batch_images = 3;
    let s = TestServer::start(args).await;
    let scheduler = s.state().scheduler.get().unwrap().clone();
    let size = s.state().manifest.image.size as usize;
    let params: SamplerParams = s.state().defaults.clone();
    let job = || {
        let pixels = ndarray::Array3::zeros((3, size, size));
        let deadline = Instant::now() + Duration::from_secs(600);
        CaptionJob::new(pixels, params.clone(), 1, deadline)
    };

    // The worker is busy; two images wait.
    let busy_request = s
        .png_request("/caption?steps=100&candidates=8", scene_png(0))
        .send();
    let busy = tokio::spawn(async move { busy_request.await.unwrap().status() });
    let metrics = s.state().metrics.clone();
    common::wait_for("the first request to run", Duration::from_secs(60), || {
        metrics.rows_in_flight.get() == 8
    })
    .await;
    let (first, _first_reply) = job();
    let (second, _second_reply) = job();
    scheduler.submit_all(vec![first, second]).unwrap();
    assert_eq!(scheduler.queue_depth(), 2);

    // Two more do not fit: neither is queued.
    let (a, _) = job();
    let (b, _) = job();
    assert!(matches!(
        scheduler.submit_all(vec![a, b]),
        Err(SubmitError::QueueFull)
    ));
    assert_eq!(scheduler.queue_depth(), 2);
    // One does.
    let (c, _c_reply) = job();
    scheduler.submit_all(vec![c]).unwrap();
    assert_eq!(scheduler.queue_depth(), 3);
    assert_eq!(busy.await.unwrap(), 200);
    s.stop().await;
}

#[tokio::test]
async fn readiness_and_draining() {
    let s = TestServer::default().await;
    let r = s.get("/health/live").await;
    assert_eq!(r.status(), 200);
    let r = s.get("/health/ready").await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["status"], "ready");

    let info = json_of(s.get("/info").await).await;
    assert_eq!(info["model"], "scenes-tiny");
    assert_eq!(info["ready"], true);
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["bundle"]["image_size"], 112);
    assert_eq!(info["bundle"]["unconditional_half"], false);
    assert_eq!(info["bundle"]["kv_dtype"], "float32");

    // Draining: readiness turns false and new captions get 503, liveness stays up.
    s.state().begin_drain();
    let r = s.get("/health/ready").await;
    assert_eq!(error_type(r, 503).await, "not_ready");
    let r = s.post_png("/caption", scene_png(0)).await;
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(error_type(r, 503).await, "not_ready");
    let r = s.get("/health/live").await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn not_ready_until_warmed_up() {
    let s = TestServer::default().await;
    // Loading finished, so nothing else flips the flag: put the server back in the
    // state it is in before its warm-up caption.
    s.state().set_ready(false);
    let r = s.get("/health/ready").await;
    assert_eq!(error_type(r, 503).await, "not_ready");
    let r = s.post_png("/caption", scene_png(0)).await;
    let body_type = error_type(r, 503).await;
    assert_eq!(body_type, "not_ready");
    s.state().set_ready(true);
    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn same_seed_same_caption_different_seeds_differ() {
    let s = TestServer::default().await;
    let png = scene_png(2);
    let mut captions = Vec::new();
    for seed in [1u64, 1, 2, 3, 4] {
        let (status, body) = s
            .post_png_json(&format!("/caption?seed={seed}&candidates=2"), png.clone())
            .await;
        assert_eq!(status, 200);
        captions.push((body["caption"].clone(), body["candidates"].clone()));
    }
    assert_eq!(captions[0], captions[1], "same seed, same result");
    assert!(
        captions[2..].iter().any(|c| c.1 != captions[0].1),
        "different seeds should give different candidates"
    );
    // Without a seed the server picks one and reports it; replaying it reproduces.
    let (_, first) = s.post_png_json("/caption", png.clone()).await;
    let seed = first["seed"].as_u64().unwrap();
    let (_, replay) = s
        .post_png_json(&format!("/caption?seed={seed}"), png.clone())
        .await;
    assert_eq!(replay["caption"], first["caption"]);
    s.stop().await;
}

#[tokio::test]
async fn metrics_exposition() {
    let s = TestServer::default().await;
    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .post(s.url("/caption"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = s.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for family in [
        "ladic_requests_total",
        "ladic_request_duration_seconds",
        "ladic_queue_wait_seconds",
        "ladic_batch_rows",
        "ladic_denoiser_step_duration_seconds",
        "ladic_encoder_call_duration_seconds",
        "ladic_decoder_call_duration_seconds",
        "ladic_worker_tick_duration_seconds",
        "ladic_queue_depth",
        "ladic_queue_capacity",
        "ladic_requests_in_flight",
        "ladic_rows_in_flight",
        "ladic_model_load_seconds",
        "ladic_build_info",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "{family} HELP");
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} TYPE");
    }
    // The queue's size as configured; nothing in flight while only /metrics runs.
    assert!(text.contains("\nladic_queue_capacity 64\n"), "{text}");
    assert!(text.contains("\nladic_requests_in_flight 0\n"), "{text}");
    assert!(
        text.contains(r#"ladic_requests_total{route="/caption",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"ladic_requests_total{route="/caption",status="415"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"model="scenes-tiny""#));

    // promtool, where installed, must accept the exposition.
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn api_key_protects_post_routes() {
    let mut args = test_args();
    args.api_key = Some("s3cret".into());
    let s = TestServer::start(args).await;
    let r = s.post_png("/caption", scene_png(0)).await;
    assert_eq!(error_type(r, 401).await, "unauthorized");
    let r = s
        .png_request("/caption?steps=2", scene_png(0))
        .header("authorization", "Bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .png_request("/caption?steps=2", scene_png(0))
        .header("x-api-key", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(s.get("/health/ready").await.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut s = TestServer::default().await;
    let request = tokio::spawn(
        s.png_request("/caption?steps=100&candidates=4", scene_png(0))
            .send(),
    );
    let state = s.server.as_ref().unwrap().state.clone();
    while state.in_flight() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let server = s.server.take().unwrap();
    server.shutdown(std::time::Duration::from_secs(60)).await;
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert!(!state.is_ready());
}

/// `--cuda-graph` on the CPU: the denoiser calls are padded to fixed row counts in
/// bound buffers (nothing is captured without CUDA). The server answers as without
/// the flag, and the padding shows in `/metrics`.
#[tokio::test]
async fn cuda_graph_flag_serves_the_same_captions() {
    let mut args = common::test_args();
    args.model.cuda_graph = true;
    let padded = TestServer::start(args).await;
    let plain = TestServer::default().await;
    // Three candidates without guidance: three rows, run as four.
    let path = "/caption?steps=4&seed=11&guidance=0&candidates=3";
    for variant in [0u8, 3] {
        let png = scene_png(variant);
        let (status, got) = padded.post_png_json(path, png.clone()).await;
        assert_eq!(status, 200, "{got}");
        let (_, want) = plain.post_png_json(path, png).await;
        assert_eq!(got["caption"], want["caption"], "scene {variant}");
    }
    let metrics = padded.metrics_text().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("ladic_denoiser_padding_rows_total "))
        .expect("the padding counter");
    let rows: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(rows >= 2, "{line}");
    assert!(
        plain
            .metrics_text()
            .await
            .contains("ladic_denoiser_padding_rows_total 0")
    );
    padded.stop().await;
    plain.stop().await;
}

/// `--device-loop` on the CPU (the rows' state in pools in the model's memory, updated
/// by the two graphs around the denoiser): the server answers as without it, for guided
/// and unguided requests, with Back&Refine and several candidates, sent together.
#[tokio::test]
async fn device_loop_flag_serves_the_same_captions() {
    let mut args = common::test_args();
    args.model.cuda_graph = true;
    args.model.device_loop = true;
    let on_device = TestServer::start(args).await;
    let plain = TestServer::default().await;
    for (server, want) in [(&on_device, true), (&plain, false)] {
        let info: serde_json::Value = server.get("/info").await.json().await.unwrap();
        assert_eq!(info["scheduler"]["state_on_device"], want, "{info}");
    }
    let paths = [
        "/caption?steps=6&seed=3&back_refine=true&candidates=2",
        "/caption?steps=4&seed=11&guidance=0&candidates=3",
        "/caption?steps=9&seed=5",
    ];
    for variant in [0u8, 3, 5] {
        let png = scene_png(variant);
        let requests = paths.map(|path| {
            let png = png.clone();
            let on_device = &on_device;
            async move { on_device.post_png_json(path, png).await }
        });
        let answers = futures_util::future::join_all(requests).await;
        for (path, (status, got)) in paths.iter().zip(answers) {
            assert_eq!(status, 200, "{got}");
            let (_, want) = plain.post_png_json(path, png.clone()).await;
            assert_eq!(got["caption"], want["caption"], "scene {variant}, {path}");
        }
    }
    on_device.stop().await;
    plain.stop().await;
}

/// A bundle whose denoiser reads the second half of each call as the unconditional pass
/// (`--unconditional-half`; the parity bundle's weights, random): the server lays its
/// calls out for it, on the host path and on the device loop, and answers as the same
/// weights exported without it, for guided and unguided requests sent together; the
/// unguided ones' padding shows in `/metrics`.
#[tokio::test]
async fn unconditional_half_bundle_serves_the_same_captions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let half = common::unconditional_half_bundle(dir.path());
    let server_on = |bundle: &std::path::Path, on_device: bool| {
        let mut args = test_args();
        args.model.bundle = bundle.to_path_buf();
        args.model.cuda_graph = on_device;
        args.model.device_loop = on_device;
        TestServer::start(args)
    };
    let plain = server_on(&common::parity_fixtures().join("bundle"), false).await;
    let host = server_on(&half.dir, false).await;
    let on_device = server_on(&half.dir, true).await;
    let info: Value = host.get("/info").await.json().await.unwrap();
    assert_eq!(info["bundle"]["unconditional_half"], true, "{info}");
    let paths = [
        "/caption?steps=6&seed=3&back_refine=true&candidates=2",
        "/caption?steps=4&seed=11&guidance=0&candidates=3",
        "/caption?steps=9&seed=5",
    ];
    for variant in [0u8, 3] {
        let png = scene_png(variant);
        for server in [&host, &on_device] {
            let requests = paths.map(|path| {
                let png = png.clone();
                async move { server.post_png_json(path, png).await }
            });
            let answers = futures_util::future::join_all(requests).await;
            for (path, (status, got)) in paths.iter().zip(answers) {
                assert_eq!(status, 200, "{got}");
                let (_, want) = plain.post_png_json(path, png.clone()).await;
                let captions = |v: &Value| -> Vec<Value> {
                    let all = v["candidates"].as_array().expect("candidates");
                    all.iter().map(|c| c["caption"].clone()).collect()
                };
                assert_eq!(captions(&got), captions(&want), "scene {variant}, {path}");
                assert_ne!(want["caption"], "", "random weights still say something");
            }
        }
    }
    for server in [&host, &on_device] {
        let metrics = server.metrics_text().await;
        let padding = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ladic_denoiser_padding_rows_total "))
            .expect("the padding counter");
        assert!(padding.trim().parse::<f64>().unwrap() > 0.0, "{padding}");
    }
    for server in [plain, host, on_device] {
        server.stop().await;
    }
}
