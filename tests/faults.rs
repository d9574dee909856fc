//! Faults: a graph that fails at run time, bundles that cannot be loaded, and SIGTERM
//! under load, against the real binary where the process's own behaviour (exit code,
//! messages, logs) is the point. A panicking worker is covered by the unit test in
//! src/scheduler/worker.rs (a fake backend that panics).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{TestServer, crc32, metrics_text, png_request, scene_png, test_args};
use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ladic-serve"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn parity_bundle() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bundle")
}

/// A copy of the parity bundle in a temporary directory, to break.
fn bundle_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(parity_bundle()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

async fn caption(s: &TestServer, query: &str) -> (u16, Value) {
    s.post_png_json(&format!("/caption?{query}"), scene_png(0))
        .await
}

/// tests/fixtures/faulty/denoiser.onnx (scripts/make-faulty-bundle.py) fails whenever a
/// denoiser call has more than 2 rows: the requests of such a batch get 500
/// inference_failed, and the worker goes on serving.
#[tokio::test]
async fn a_graph_failing_at_run_time_fails_its_batch_only() {
    let dir = bundle_copy();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faulty/denoiser.onnx"),
        dir.path().join("denoiser.onnx"),
    )
    .unwrap();
    let mut args = test_args();
    args.model.bundle = dir.path().to_path_buf();
    // The warm-up caption (one guided candidate: 2 rows) works.
    let s = TestServer::start(args).await;

    let (status, body) = caption(&s, "steps=3&seed=1&guidance=0").await;
    assert_eq!(status, 200, "{body}");

    // 2 guided candidates: 4 rows in one call.
    let (status, body) = caption(&s, "steps=3&seed=1&guidance=1&candidates=2").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error_type"], "inference_failed");
    assert!(
        body["error"].as_str().unwrap().contains("denoiser"),
        "{body}"
    );

    // A burst: whichever requests share a call fail together; all others succeed.
    let burst = (0..4).map(|i| caption(&s, if i == 0 { "steps=20" } else { "steps=3" }));
    for (status, body) in futures_util::future::join_all(burst).await {
        assert!(status == 200 || status == 500, "{status} {body}");
        if status == 500 {
            assert_eq!(body["error_type"], "inference_failed");
        }
    }

    // And the worker is still there.
    for _ in 0..2 {
        let (status, body) = caption(&s, "steps=3&guidance=0").await;
        assert_eq!(status, 200, "{body}");
    }
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(r#"ladic_requests_total{route="/caption",status="500"}"#),
        "{metrics}"
    );
    // A model error is not a panic: no restart.
    assert!(
        metrics.contains("ladic_worker_restarts_total 0"),
        "{metrics}"
    );
    s.stop().await;
}

/// Runs `serve` on a bundle that cannot work; it must exit non-zero, quickly, with one
/// clear line naming what is wrong.
fn serve_fails(bundle: &Path, expect: &[&str]) {
    let out = bin()
        .args(["serve", "--bind", "127.0.0.1:0", "--intra-op-threads", "1"])
        .arg("--bundle")
        .arg(bundle)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let error = common::refusal_line(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{} {stderr}", bundle.display());
    for e in expect {
        assert!(error.contains(e), "{e:?} not in {error:?}");
    }
}

/// `serve` on a bundle that does not exist: it logs its start and stops with exit 1.
fn serve_without_a_bundle() -> Command {
    let mut c = bin();
    c.args([
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--bundle",
        "/nonexistent/bundle",
    ]);
    c
}

/// Runs a `serve` that must fail to start, with the default log filter: its logs
/// (stderr), once it has exited 1.
fn failed_start_logs(mut serve: Command) -> String {
    let out = serve
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// The `configuration` line of plain-text logs.
fn configuration_line(logs: &str) -> &str {
    logs.lines()
        .find(|l| l.contains("configuration"))
        .unwrap_or_else(|| panic!("no configuration line: {logs}"))
}

/// With JSON logs, the line that says why the process stops is a JSON line too (a log
/// collector drops or mangles plain text); `LADIC_LOG_JSON=1` turns them on.
#[test]
fn with_json_logs_the_reason_for_stopping_is_json() {
    let out = serve_without_a_bundle()
        .env("LADIC_LOG_JSON", "1")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last: Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    let error = last["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot start serving /nonexistent/bundle")
            && error.contains("manifest.json"),
        "{last}"
    );
}

/// The logs of a start that fails still say the version and the configuration (the
/// API key only as set); plain-text logs written to a pipe carry no colour codes.
#[test]
fn a_failed_start_still_logs_its_configuration() {
    let mut serve = serve_without_a_bundle();
    serve.args(["--workers", "3", "--api-key", "sekrit-key"]);
    let stderr = failed_start_logs(serve);
    assert!(!stderr.contains('\x1b'), "colour codes: {stderr:?}");
    let config = configuration_line(&stderr);
    for field in [
        "version=",
        "workers=3",
        "api_key=true",
        "bundle=/nonexistent/bundle",
    ] {
        assert!(config.contains(field), "{field} not in {config}");
    }
    assert!(!stderr.contains("sekrit-key"), "{stderr}");
}

#[test]
fn a_missing_or_corrupt_bundle_stops_startup() {
    serve_fails(
        Path::new("/nonexistent/bundle"),
        &["/nonexistent/bundle", "manifest.json"],
    );

    let dir = bundle_copy();
    std::fs::write(dir.path().join("manifest.json"), "{ not json").unwrap();
    serve_fails(
        dir.path(),
        &["manifest.json", "not a valid bundle manifest"],
    );

    let dir = bundle_copy();
    std::fs::remove_file(dir.path().join("decoder.onnx")).unwrap();
    serve_fails(dir.path(), &["decoder.onnx", "missing"]);

    // Present but not an ONNX graph: found when the sessions are created.
    let dir = bundle_copy();
    std::fs::write(
        dir.path().join("denoiser.onnx"),
        b"\x08\x07garbage, not a graph",
    )
    .unwrap();
    serve_fails(dir.path(), &["cannot load the model", "denoiser"]);

    // A graph that loads but does not match the manifest.
    let dir = bundle_copy();
    std::fs::copy(
        parity_bundle().join("decoder.onnx"),
        dir.path().join("denoiser.onnx"),
    )
    .unwrap();
    serve_fails(dir.path(), &["cannot load the model", "denoiser"]);
}

/// The server binary with its stderr collected line by line.
struct Process {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn start(args: &[&str]) -> Process {
        Process::start_logging(args, "info,ort=warn,tower_http=debug,ladic_serve=debug")
    }

    /// [`Process::start`] with `RUST_LOG` set to `filter`.
    fn start_logging(args: &[&str], filter: &str) -> Process {
        let mut child = bin()
            .args(["--log-json", "serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The address from the "listening" line.
    fn addr(&self) -> String {
        let start = Instant::now();
        loop {
            for line in self.log.lock().unwrap().iter() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v["fields"]["message"] == "listening" {
                    return v["fields"]["addr"].as_str().unwrap().to_string();
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "not listening: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("still running after {limit:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str, p: &Process) {
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{}", p.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(p: &Process) {
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A PNG carrying a recognisable text chunk, to look for in the logs.
fn marked_png(marker: &str) -> Vec<u8> {
    let png = scene_png(1);
    let mut chunk = b"tEXt".to_vec();
    chunk.extend_from_slice(b"Comment\0");
    chunk.extend_from_slice(marker.as_bytes());
    // After the signature (8) and IHDR (25).
    let mut out = png[..33].to_vec();
    out.extend_from_slice(&((chunk.len() - 4) as u32).to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    out.extend_from_slice(&png[33..]);
    out
}

/// SIGTERM with captions in flight: readiness turns 503 at once, new captions get 503
/// (or find the port closed), the in-flight ones finish with 200, and the process exits
/// 0. The logs of it all carry request ids and never the images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_0() {
    let mut p = Process::start(&[
        "--intra-op-threads",
        "1",
        "--request-timeout-ms",
        "600000",
        "--max-request-timeout-ms",
        "600000",
        "--shutdown-grace-seconds",
        "300",
    ]);
    let base = format!("http://{}", p.addr());
    let client = reqwest::Client::new();
    wait_ready(&client, &base, &p).await;

    let marker = "LADIC-LOG-MARKER-7f3a9c";
    let png = marked_png(marker);
    let b64 = STANDARD.encode(&png);
    // Requests that must not leave their bytes in the logs: a JSON image, and invalid
    // base64 that carries the marker.
    let r = client
        .post(format!("{base}/caption?steps=2"))
        .json(&serde_json::json!({"image": b64}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/caption"))
        .json(&serde_json::json!({"image": format!("{marker}%%%{marker}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(!body.contains(marker), "{body}");

    // Three long captions in flight.
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let request = png_request(
                &client,
                format!("{base}/caption?steps=100&candidates=4"),
                png.clone(),
            )
            .header("x-request-id", format!("drain-{i}"))
            .send();
            tokio::spawn(request)
        })
        .collect();
    loop {
        let m = metrics_text(&client, &base).await;
        if gauge(&m, "ladic_rows_in_flight") >= 12.0 {
            break;
        }
        assert!(
            in_flight.iter().all(|h| !h.is_finished()),
            "a request finished before all three were admitted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    sigterm(&p);
    loop {
        let r = client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match png_request(&client, format!("{base}/caption?steps=2"), png.clone())
        .send()
        .await
    {
        Ok(r) => {
            assert_eq!(r.status(), 503);
            assert!(r.headers().contains_key("retry-after"));
        }
        Err(e) => assert!(e.is_connect(), "{e}"),
    }
    assert!(
        in_flight.iter().any(|h| !h.is_finished()),
        "the in-flight requests finished before the drain could be observed"
    );
    for h in in_flight {
        let r = h.await.unwrap().expect("in-flight request answered");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert!(body["caption"].as_str().unwrap().ends_with('.'));
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = p.wait(Duration::from_secs(60));
        (status, p)
    })
    .await
    .unwrap();
    let (status, p) = status;
    let log = p.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("shutdown signal received"), "{log}");
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("\"stopped\""), "{log}");
    assert!(log.contains("\"request_id\":\"drain-1\""), "{log}");

    // No image bytes in the logs: neither the marker nor any long piece of the base64.
    assert!(!log.contains(marker), "the marker is in the logs");
    for piece in b64
        .as_bytes()
        .chunks(24)
        .map(|c| std::str::from_utf8(c).unwrap())
    {
        if piece.len() == 24 {
            assert!(
                !log.contains(piece),
                "base64 of the image in the logs: {piece}"
            );
        }
    }
}

/// SIGTERM with more work held than the grace period allows: when the grace ends, the
/// requests still waiting (running or queued) are answered 503 `not_ready` with
/// `Retry-After`, none is cut off, and the process exits soon after the grace instead
/// of when the last request would have finished. An orchestrator's kill deadline can
/// then be set from the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_answers_503_and_exits() {
    let grace = Duration::from_secs(1);
    let mut p = Process::start(&[
        "--intra-op-threads",
        "1",
        "--row-parallelism",
        "1",
        "--batching",
        "off",
        "--request-timeout-ms",
        "600000",
        "--max-request-timeout-ms",
        "600000",
        "--shutdown-grace-seconds",
        "1",
    ]);
    let base = format!("http://{}", p.addr());
    let client = reqwest::Client::new();
    wait_ready(&client, &base, &p).await;

    // One at a time (batching off), each 100 steps of 16 rows: far more work than the
    // grace period.
    let requests = 12;
    let png = scene_png(2);
    let started = Instant::now();
    let in_flight: Vec<_> = (0..requests)
        .map(|_| {
            let request = png_request(
                &client,
                format!("{base}/caption?steps=100&candidates=8&guidance=2"),
                png.clone(),
            )
            .send();
            tokio::spawn(request)
        })
        .collect();
    loop {
        let m = metrics_text(&client, &base).await;
        if gauge(&m, "ladic_queue_depth") + gauge(&m, "ladic_rows_in_flight") / 8.0
            >= requests as f64
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{}", p.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let one_caption = metrics_text(&client, &base).await;
    assert!(
        gauge(&one_caption, "ladic_queue_depth") >= (requests - 2) as f64,
        "the requests ran faster than this test assumes: {one_caption}"
    );
    sigterm(&p);
    let signalled = Instant::now();
    let mut refused = 0;
    for h in in_flight {
        let r = h.await.unwrap().expect("every request is answered");
        match r.status().as_u16() {
            200 => {}
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error_type"], "not_ready", "{body}");
                assert!(
                    body["error"].as_str().unwrap().contains("shutting down"),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("status {other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(refused >= requests - 3, "{refused} of {requests} refused");
    let (status, p) = tokio::task::spawn_blocking(move || {
        let status = p.wait(Duration::from_secs(60));
        (status, p)
    })
    .await
    .unwrap();
    let exited_after = signalled.elapsed();
    let log = p.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("grace period over"), "{log}");
    // The grace, then a step of the running batch and the close; far less than the
    // ~10 s the held work would take.
    assert!(
        exited_after < grace + Duration::from_secs(4),
        "exited {exited_after:?} after SIGTERM: {log}"
    );
}

/// A worker inside one step for longer than `--worker-stall-timeout-ms` turns both
/// health probes 503 `worker_stalled` (an orchestrator then restarts a stuck server),
/// and they recover once it comes out. Here the limit is 1 ms, so that the ordinary
/// steps of a long caption count as stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stuck_in_a_step_fails_the_health_probes() {
    let mut args = test_args();
    args.worker_stall_timeout_ms = 1;
    args.batching = ladic_serve::config::BatchingMode::Off;
    let s = TestServer::start(args).await;
    let info: Value = s.get("/info").await.json().await.unwrap();
    assert_eq!(info["limits"]["worker_stall_timeout_ms"], 1);
    // (A reply is sent before its worker's step ends: the warm-up's step may still be
    // finishing.)
    probes_pass_soon(&s).await;

    let long = s.post_png("/caption?steps=100&candidates=8&guidance=2", scene_png(3));
    let probe = async {
        let start = Instant::now();
        let (mut live_failed, mut ready_failed) = (false, false);
        while !(live_failed && ready_failed) {
            for (path, failed) in [
                ("/health/live", &mut live_failed),
                ("/health/ready", &mut ready_failed),
            ] {
                let r = s.get(path).await;
                if r.status() == 503 {
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(body["error_type"], "worker_stalled", "{path}: {body}");
                    assert!(
                        body["error"].as_str().unwrap().contains("worker 0"),
                        "{body}"
                    );
                    *failed = true;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "never stalled");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    };
    let (r, ()) = tokio::join!(long, probe);
    assert_eq!(r.status(), 200);
    // Out of its steps, the worker is not stalled any more.
    probes_pass_soon(&s).await;
    s.stop().await;
}

async fn probes_pass_soon(s: &TestServer) {
    let start = Instant::now();
    while s.get("/health/live").await.status() != 200
        || s.get("/health/ready").await.status() != 200
    {
        assert!(start.elapsed() < Duration::from_secs(10), "still stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With the default limit (2 minutes), ordinary steps never fail the probes: both
/// answer 200 all through a long caption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_steps_do_not_fail_the_health_probes() {
    let s = TestServer::start(test_args()).await;
    let long = s.png_request("/caption?steps=100&candidates=8&guidance=2", scene_png(3));
    let long = tokio::spawn(long.send());
    let mut probes = 0;
    while !long.is_finished() {
        assert_eq!(s.get("/health/live").await.status(), 200);
        assert_eq!(s.get("/health/ready").await.status(), 200);
        probes += 1;
    }
    assert_eq!(long.await.unwrap().unwrap().status(), 200);
    assert!(probes > 10, "only {probes} probes during the caption");
    s.stop().await;
}

/// The access log: one JSON line per request at info, with its method, route, status,
/// time and request id (a stream's when it ends); probes and scrapes at debug, so the
/// default level leaves them out.
#[tokio::test]
async fn every_request_gets_an_access_log_line() {
    let mut p = Process::start_logging(&["--intra-op-threads", "1"], "info,ort=warn");
    let base = format!("http://{}", p.addr());
    let client = reqwest::Client::new();
    wait_ready(&client, &base, &p).await;
    let post = |path: &str, id: &str, body: Vec<u8>| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "image/png")
            .header("x-request-id", id)
            .body(body)
            .send()
    };
    assert_eq!(
        post("/caption?steps=2", "log-ok", scene_png(1))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("/caption", "log-bad", b"not an image".to_vec())
            .await
            .unwrap()
            .status(),
        400
    );
    let streamed = post("/caption?steps=2&stream=true", "log-stream", scene_png(2))
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    streamed.bytes().await.unwrap();
    // A stream that ends in an `error` event: a deadline far shorter than its work (on a
    // very slow machine it may pass before the stream starts: a plain 504, logged the
    // same way).
    let timed_out = post(
        "/caption?stream=true&steps=100&candidates=8&guidance=10&back_refine=true&timeout_ms=300",
        "log-stream-timeout",
        scene_png(3),
    )
    .await
    .unwrap();
    if timed_out.status() == 200 {
        let events = timed_out.text().await.unwrap();
        assert!(events.contains("event: error"), "{events}");
    } else {
        assert_eq!(timed_out.status(), 504);
    }
    client.get(format!("{base}/metrics")).send().await.unwrap();
    let lines = || -> Vec<Value> {
        p.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "ladic_serve::access")
            .collect()
    };
    let start = Instant::now();
    while lines().len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = lines();
    let find = |id: &str| {
        lines
            .iter()
            .find(|v| v["fields"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}: {lines:?}"))
            .clone()
    };
    for (id, status) in [("log-ok", 200), ("log-bad", 400), ("log-stream", 200)] {
        let line = find(id);
        assert_eq!(line["level"], "INFO", "{line}");
        let f = &line["fields"];
        assert_eq!(
            (
                f["method"].as_str(),
                f["route"].as_str(),
                f["status"].as_u64()
            ),
            (Some("POST"), Some("/caption"), Some(status)),
            "{line}"
        );
        assert!(f["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");
        // An error answer says which error; a success has no error_type.
        let error_type = (status == 400).then_some("invalid_image");
        assert_eq!(f["error_type"].as_str(), error_type, "{line}");
    }
    let f = &find("log-stream-timeout")["fields"];
    assert_eq!(
        f["status"], 504,
        "a stream is logged with its last event's status"
    );
    assert_eq!(f["error_type"], "timeout", "{f}");
    assert_eq!(
        lines.len(),
        4,
        "probes and scrapes are debug lines: {lines:?}"
    );
    sigterm(&p);
    assert!(p.wait(Duration::from_secs(30)).success());
}

/// A server with `--shutdown-grace-seconds grace`, ready, and a request in flight for as
/// long as its body does not arrive (10 of its 100000 bytes sent).
async fn ready_with_a_stalled_upload(grace: &str) -> (Process, std::net::TcpStream) {
    let p = Process::start(&["--shutdown-grace-seconds", grace]);
    let addr = p.addr();
    let client = reqwest::Client::new();
    wait_ready(&client, &format!("http://{addr}"), &p).await;
    let mut upload = std::net::TcpStream::connect(&addr).unwrap();
    upload
        .write_all(
            b"POST /caption HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n\
              content-length: 100000\r\n\r\n0123456789",
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (p, upload)
}

/// A second SIGTERM or SIGINT during the grace period ends the process at once, with
/// exit code 130, instead of waiting for the request still in flight.
#[tokio::test]
async fn a_second_signal_exits_without_waiting_for_the_grace_period() {
    let (p, _upload) = ready_with_a_stalled_upload("60").await;
    sigterm(&p);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut p = p;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the first signal waits for the request in flight: {}",
        p.log()
    );
    let start = Instant::now();
    sigterm(&p);
    let status = p.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", p.log());
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(p.log().contains("second shutdown signal"), "{}", p.log());
}

/// A request still receiving its body when the shutdown grace period ends (a stalled
/// upload) is answered 503 `not_ready` then, not left to see its connection close.
#[tokio::test]
async fn a_stalled_upload_gets_503_when_the_grace_period_ends() {
    let (mut p, mut upload) = ready_with_a_stalled_upload("1").await;
    let signalled = Instant::now();
    sigterm(&p);
    upload
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut upload, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?} {}", p.log());
    assert!(answer.contains("not_ready"), "{answer}");
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "answered when the 1 s grace period ended: {:?}",
        signalled.elapsed()
    );
    assert!(p.wait(Duration::from_secs(10)).success(), "{}", p.log());
}

/// With fewer open files allowed than `--max-connections`, the connection limit is
/// lowered to fit (else accepting would fail before the limit and its probe lane were
/// reached), with a warning; the configuration line gives the limit in effect.
#[test]
fn the_connection_limit_is_lowered_to_fit_the_open_files_limit() {
    let mut serve = Command::new("sh");
    serve
        .arg("-c")
        .arg(r#"ulimit -n 200 && exec "$0" serve --bind 127.0.0.1:0 --bundle /nonexistent/bundle"#)
        .arg(bin().get_program());
    let stderr = failed_start_logs(serve);
    assert!(
        stderr.contains("the connection limit is lowered") && stderr.contains("lowered_to=72"),
        "{stderr}"
    );
    let config = configuration_line(&stderr);
    assert!(config.contains("max_connections=72"), "{config}");
}
