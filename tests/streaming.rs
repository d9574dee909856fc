//! Streaming captions (Server-Sent Events from `POST /caption`) and the demo page at
//! `/`, against a real server with the real bundle.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{TestServer, png_form, scene_png};
use serde_json::{Value, json};

/// One parsed Server-Sent Event: its name and its JSON data.
type Sse = (String, Value);

/// Parses complete events out of `buf`, leaving an unfinished one in it.
fn take_events(buf: &mut String) -> Vec<Sse> {
    let mut events = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let mut name = "message".to_string();
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !data.is_empty() {
            let value = serde_json::from_str(&data.join("\n")).expect("event data is JSON");
            events.push((name, value));
        }
    }
    events
}

/// Reads a whole event stream.
async fn all_events(mut r: reqwest::Response) -> Vec<Sse> {
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = r.chunk().await.expect("stream reads") {
        buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        events.extend(take_events(&mut buf));
    }
    assert!(buf.trim().is_empty(), "unterminated event: {buf:?}");
    events
}

/// The response body without its timings, which differ from call to call.
fn without_timings(mut body: Value) -> Value {
    body.as_object_mut().expect("object").remove("timings");
    body
}

/// `POST path` with a raw `image/png` body, asking for an event stream.
async fn post_png_sse(
    s: &TestServer,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    s.png_request(path, body)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
}

async fn plain_caption(s: &TestServer, query: &str) -> Value {
    let r = s.post_png(&format!("/caption?{query}"), scene_png(0)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

/// Start, steps, done; per candidate, steps 0.. in order. Returns the step events per
/// candidate and the done event's data.
fn check_shape(events: &[Sse], candidates: usize) -> (Vec<Vec<Value>>, Value) {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"), "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert!(
        names[1..names.len() - 1].iter().all(|n| *n == "step"),
        "{names:?}"
    );
    let start = &events[0].1;
    assert_eq!(start["candidates"].as_u64(), Some(candidates as u64));
    let iterations = start["iterations"].as_u64().expect("iterations") as usize;
    let mut per: Vec<Vec<Value>> = vec![Vec::new(); candidates];
    for (_, step) in &events[1..events.len() - 1] {
        let c = step["candidate"].as_u64().expect("candidate") as usize;
        assert!(step["t"].as_u64().is_some_and(|t| t < 1000), "{step}");
        assert!(
            step["caption"].as_str().is_some_and(|c| c.ends_with('.')),
            "{step}"
        );
        let conf = step["confidence"].as_f64().expect("confidence");
        assert!((0.0..=1.0).contains(&conf), "{step}");
        assert!(step["refine"].is_boolean());
        let mut last_position = None;
        for token in step["tokens"].as_array().expect("tokens") {
            let p = token["position"].as_u64().expect("position");
            assert!(last_position.is_none_or(|l| p > l), "positions ascend");
            last_position = Some(p);
            assert!(token["text"].is_string());
            let c = token["confidence"].as_f64().expect("token confidence");
            assert!((0.0..=1.0).contains(&c), "{token}");
        }
        per[c].push(step.clone());
    }
    for (c, steps) in per.iter().enumerate() {
        let indexes: Vec<u64> = steps.iter().map(|s| s["step"].as_u64().unwrap()).collect();
        let want: Vec<u64> = (0..iterations as u64).collect();
        assert_eq!(
            indexes, want,
            "candidate {c}: one event per iteration, in order"
        );
    }
    (per, events.last().unwrap().1.clone())
}

#[tokio::test]
async fn streams_every_step_then_the_plain_answer() {
    let s = TestServer::default().await;

    // Accept: text/event-stream on a raw-body request.
    let r = post_png_sse(&s, "/caption?steps=5&seed=11", scene_png(0)).await;
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let events = all_events(r).await;
    let start = &events[0].1;
    assert_eq!(start["steps"], 5);
    assert_eq!(start["iterations"], 5, "plain sampling: one event per step");
    assert_eq!(start["seed"], 11);
    assert_eq!(start["model"], "scenes-tiny");
    let (per, done) = check_shape(&events, 1);
    let ts: Vec<u64> = per[0].iter().map(|s| s["t"].as_u64().unwrap()).collect();
    assert_eq!(ts, [999, 799, 599, 399, 199]);
    assert!(per[0].iter().all(|s| s["refine"] == false));
    // The last step decodes the final x0: its caption is the answer.
    assert_eq!(per[0].last().unwrap()["caption"], done["caption"]);
    let plain = plain_caption(&s, "steps=5&seed=11").await;
    assert!(done["timings"]["total_ms"].as_f64().is_some());
    assert_eq!(without_timings(done), without_timings(plain));

    // stream=true as a JSON field, with MBR candidates and Back&Refine.
    let b64 = STANDARD.encode(scene_png(0));
    let r = s
        .post_json(
            "/caption",
            &json!({"image": b64, "stream": true, "steps": 10, "seed": 4,
                      "candidates": 3, "back_refine": true}),
        )
        .await;
    let events = all_events(r).await;
    // Back&Refine at t = 599 (trigger 599, stride 100) restarts once: 5 + 10.
    assert_eq!(events[0].1["iterations"], 15);
    let (per, done) = check_shape(&events, 3);
    for steps in &per {
        let refines: Vec<u64> = steps
            .iter()
            .filter(|s| s["refine"] == true)
            .map(|s| s["step"].as_u64().unwrap())
            .collect();
        assert_eq!(refines, [4], "one restart, after the t = 599 iteration");
        assert_eq!(steps[4]["t"], 599);
        assert_eq!(steps[5]["t"], 999, "the restart starts again at T-1");
    }
    assert_eq!(done["candidates"].as_array().unwrap().len(), 3);
    let plain = plain_caption(&s, "steps=10&seed=4&candidates=3&back_refine=true").await;
    assert_eq!(without_timings(done), without_timings(plain));

    // stream=true as a multipart field; stream=false wins over Accept.
    let form = png_form(scene_png(1))
        .text("steps", "2")
        .text("stream", "true");
    let r = s.post_multipart("/caption", form).await;
    check_shape(&all_events(r).await, 1);
    let r = post_png_sse(&s, "/caption?steps=2&stream=false", scene_png(0)).await;
    assert_eq!(r.headers()["content-type"], "application/json");
    s.stop().await;
}

#[tokio::test]
async fn streaming_errors() {
    let s = TestServer::default().await;

    // Found before the image is queued: the usual status and JSON body.
    let r = post_png_sse(&s, "/caption?steps=2", "not a PNG").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "invalid_image");
    let r = post_png_sse(&s, "/caption?steps=0", scene_png(0)).await;
    assert_eq!(r.status(), 422);
    let r = post_png_sse(&s, "/caption?stream=maybe", scene_png(0)).await;
    assert_eq!(r.status(), 422);
    let r = s
        .post_json(
            "/caption/batch?stream=true",
            &json!({"images": [STANDARD.encode(scene_png(0))]}),
        )
        .await;
    assert_eq!(r.status(), 422, "the batch route does not stream");

    // Once streaming, a failure is an `error` event with the usual body: a deadline
    // about a hundred times what the decode of this small image takes, and a few times
    // shorter than 100 guided steps of 8 candidates with Back&Refine (about 2400 rows).
    let r = post_png_sse(
        &s,
        "/caption?steps=100&candidates=8&guidance=10&back_refine=true&timeout_ms=400",
        scene_png(0),
    )
    .await;
    let events = all_events(r).await;
    assert_eq!(events.first().unwrap().0, "start");
    let (name, body) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(body["error_type"], "timeout");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    // The request metrics count the stream when it ends, with its last event's status
    // and its whole duration (not the 200 of its response head).
    let m = &s.state().metrics;
    let counted = |status: &str| {
        m.requests_total
            .with_label_values(&["/caption", status])
            .get()
    };
    assert_eq!(counted("504"), 1);
    let plain_200s = counted("200");
    let stream = post_png_sse(&s, "/caption?steps=3", scene_png(1)).await;
    assert_eq!(all_events(stream).await.last().unwrap().0, "done");
    assert_eq!(counted("200"), plain_200s + 1);
    let durations = m
        .request_duration_seconds
        .with_label_values(&["/caption", "5xx"]);
    assert!(
        durations.get_sample_sum() >= 0.4,
        "the 400 ms stream's time is counted, as a 504"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_frees_its_rows() {
    let s = TestServer::default().await;
    let metrics = s.state().metrics.clone();
    let mut r = post_png_sse(
        &s,
        "/caption?steps=100&candidates=8&back_refine=true",
        scene_png(2),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut buf = String::new();
    let mut steps = 0;
    while steps < 16 {
        let chunk = r.chunk().await.unwrap().expect("more events");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        steps += take_events(&mut buf)
            .iter()
            .filter(|(n, _)| n == "step")
            .count();
    }
    assert_eq!(metrics.rows_in_flight.get(), 8, "the job is running");
    drop(r);

    // The worker notices at one of its next steps, long before the ~140 iterations end.
    let gone = || {
        metrics
            .images_dropped_total
            .with_label_values(&["client_gone"])
            .get()
    };
    let t0 = Instant::now();
    while (gone() == 0 || metrics.rows_in_flight.get() != 0)
        && t0.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gone(), 1, "dropped as client_gone, not finished");
    assert_eq!(metrics.rows_in_flight.get(), 0);
    assert_eq!(
        s.state().in_flight(),
        0,
        "the stream no longer counts as in flight"
    );
    let left = s
        .state()
        .metrics
        .requests_total
        .with_label_values(&["/caption", "499"])
        .get();
    assert_eq!(left, 1, "counted as a client that left");

    // The server carries on.
    let body = plain_caption(&s, "steps=2").await;
    assert!(body["caption"].as_str().unwrap().ends_with('.'));
    s.stop().await;
}

#[tokio::test]
async fn the_demo_page_is_self_contained() {
    let s = TestServer::default().await;
    let r = s.get("/").await;
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let page = r.text().await.unwrap();
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains(r#"<meta name="viewport""#));
    assert!(page.contains("prefers-color-scheme: dark"));
    assert!(page.contains(r#"type="file""#));
    assert!(page.contains("text/event-stream"));
    // Nothing from the network: no absolute or protocol-relative URLs anywhere.
    for needle in [
        "http://",
        "https://",
        "src=\"//",
        "href=\"//",
        "url(//",
        "@import",
    ] {
        assert!(!page.contains(needle), "the page contains {needle:?}");
    }
    s.stop().await;
}
