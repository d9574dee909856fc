//! Clients that hang up mid-request, over real HTTP: their rows leave the batch at the
//! next step (or are skipped when their job reaches the front of the queue, or taken
//! out of a full queue when a new request needs the room), the
//! `images_dropped_total{reason="client_gone"}` counter says so, and the worker goes
//! on with other requests.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{TestServer, scene_png, test_args, wait_for};
use ladic_serve::config::{BatchingMode, ServeArgs};
use ladic_serve::metrics::Metrics;
use std::io::Write;
use std::net::TcpStream;
use tokio::task::JoinHandle;

/// Sends a whole `POST` with a PNG body on a fresh connection and returns the
/// connection unread, so the test decides when the client goes away. (A blocking
/// socket: the request is a few kilobytes.)
fn send_raw(addr: SocketAddr, path: &str, body: &[u8]) -> TcpStream {
    let mut conn = TcpStream::connect(addr).expect("connects");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    conn.flush().unwrap();
    conn
}

fn client_gone(metrics: &Metrics) -> u64 {
    metrics
        .images_dropped_total
        .with_label_values(&["client_gone"])
        .get()
}

/// The test server's settings with one worker and batching off: each request waits in
/// the queue, in its order, until the one before it has ended.
fn one_request_at_a_time() -> ServeArgs {
    let mut args = test_args();
    args.batching = BatchingMode::Off;
    args.workers = 1;
    args
}

/// Sends `path` with scene image `variant` in the background.
fn spawn_png(s: &TestServer, path: &str, variant: u8) -> JoinHandle<reqwest::Response> {
    let request = s.png_request(path, scene_png(variant)).send();
    tokio::spawn(async move { request.await.unwrap() })
}

/// Sends `path` (seconds of work, `rows` rows) in the background and waits until the
/// worker runs it, so that the requests after it wait in the queue.
async fn start_busy(s: &TestServer, path: &str, rows: i64) -> JoinHandle<reqwest::Response> {
    let busy = spawn_png(s, path, 0);
    let metrics = s.state().metrics.clone();
    wait_for("the first request to run", Duration::from_secs(60), || {
        metrics.rows_in_flight.get() == rows
    })
    .await;
    busy
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_frees_its_rows() {
    let s = TestServer::default().await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    assert_eq!(metrics.rows_in_flight.get(), 0);

    // Hundreds of denoiser calls over 16 rows: seconds of work, unless dropped.
    let conn = send_raw(addr, "/caption?steps=100&candidates=8", &scene_png(0));
    wait_for("the rows to be in flight", Duration::from_secs(60), || {
        metrics.rows_in_flight.get() == 8
    })
    .await;
    let hung_up = Instant::now();
    drop(conn);
    wait_for("the rows to be removed", Duration::from_secs(30), || {
        metrics.rows_in_flight.get() == 0
    })
    .await;
    // Removed, not finished: only a dropped job is counted.
    assert_eq!(client_gone(&metrics), 1);
    let freed_after = hung_up.elapsed();

    // The worker is free for the next client.
    let r = s.post_png("/caption?steps=2", scene_png(1)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(metrics.rows_in_flight.get(), 0);

    // The metrics endpoint tells operators the same.
    let text = s.metrics_text().await;
    assert!(
        text.contains(r#"ladic_images_dropped_total{reason="client_gone"} 1"#),
        "{text}"
    );
    assert!(text.contains("ladic_rows_in_flight 0"), "{text}");
    // The request itself is counted, as nginx does, as 499 "client closed request".
    assert!(
        text.contains(r#"ladic_requests_total{route="/caption",status="499"} 1"#),
        "{text}"
    );
    assert!(
        freed_after < Duration::from_secs(30),
        "rows freed {freed_after:?} after the hang-up"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_queued_request_whose_client_left_is_skipped() {
    // The second request waits in the queue behind the first.
    let s = TestServer::start(one_request_at_a_time()).await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let scheduler = s.state().scheduler.get().unwrap().clone();

    let busy = start_busy(&s, "/caption?steps=60&candidates=4", 4).await;
    let queued = send_raw(addr, "/caption?steps=60&candidates=4", &scene_png(1));
    wait_for(
        "the second request to queue",
        Duration::from_secs(30),
        || scheduler.queue_depth() == 1,
    )
    .await;
    drop(queued);

    assert_eq!(busy.await.unwrap().status(), 200);
    wait_for("the queue to empty", Duration::from_secs(30), || {
        scheduler.queue_depth() == 0 && metrics.rows_in_flight.get() == 0
    })
    .await;
    wait_for("the drop to be counted", Duration::from_secs(30), || {
        client_gone(&metrics) == 1
    })
    .await;
    // Its wait in the queue is counted too: the warm-up, the first request and it.
    assert_eq!(metrics.queue_wait_seconds.get_sample_count(), 3);
    s.stop().await;
}

#[tokio::test]
async fn a_queue_full_of_requests_whose_clients_left_still_takes_new_ones() {
    // Room for two in the queue.
    let mut args = one_request_at_a_time();
    args.queue_size = 2;
    args.max_batch_images = 2;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let scheduler = s.state().scheduler.get().unwrap().clone();

    let busy = start_busy(&s, "/caption?steps=100&candidates=8", 8).await;
    // Two clients fill the queue, then give up.
    let gave_up: Vec<_> = (1..3)
        .map(|i| send_raw(addr, "/caption?steps=100&candidates=8", &scene_png(i)))
        .collect();
    wait_for("the queue to fill", Duration::from_secs(30), || {
        scheduler.queue_depth() == 2
    })
    .await;
    drop(gave_up);
    let left = metrics
        .requests_total
        .with_label_values(&["/caption", "499"]);
    wait_for("both hang-ups to be seen", Duration::from_secs(30), || {
        left.get() == 2
    })
    .await;

    // Their jobs are still queued, but a new request takes their place instead of a 429.
    let fresh = spawn_png(&s, "/caption?steps=2", 3);
    wait_for(
        "the new request to be queued, or answered",
        Duration::from_secs(30),
        || (client_gone(&metrics) == 2 && scheduler.queue_depth() == 1) || fresh.is_finished(),
    )
    .await;
    if fresh.is_finished() {
        panic!(
            "answered {} at once while the queue held only requests nobody waits for",
            fresh.await.unwrap().status()
        );
    }
    assert_eq!(client_gone(&metrics), 2);
    assert_eq!(scheduler.queue_depth(), 1);
    // Taken out by the new request, not by the worker, which is still on the first one.
    assert_eq!(metrics.rows_in_flight.get(), 8);

    assert_eq!(busy.await.unwrap().status(), 200);
    assert_eq!(fresh.await.unwrap().status(), 200);
    let text = s.metrics_text().await;
    assert!(text.contains("ladic_queue_depth 0"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn a_request_that_would_wait_out_its_deadline_is_refused_at_once() {
    let s = TestServer::start(one_request_at_a_time()).await;
    let scheduler = s.state().scheduler.get().unwrap().clone();
    let long = "/caption?steps=100&candidates=8&back_refine=true";

    let running = start_busy(&s, long, 8).await;
    let waiting: Vec<_> = (1..10).map(|i| spawn_png(&s, long, i % 8)).collect();
    wait_for("nine requests to wait", Duration::from_secs(30), || {
        scheduler.queue_depth() == 9
    })
    .await;
    // The first ends; the second is taken after waiting for all of it (with nothing
    // ahead of it), and eight wait: about eight times that wait (counted from 1 s).
    let mut wait = Duration::ZERO;
    wait_for("a wait to be measured", Duration::from_secs(120), || {
        wait = scheduler.expected_wait(Instant::now()).unwrap_or_default();
        wait > Duration::ZERO
    })
    .await;

    // A deadline a quarter of that wait: refused at once, saying so.
    let asked = Instant::now();
    let timeout_ms = (wait.as_millis() / 4).max(1);
    let r = s
        .post_png(&format!("/caption?timeout_ms={timeout_ms}"), scene_png(3))
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "overloaded");
    let refused = s
        .state()
        .metrics
        .requests_refused_total
        .with_label_values(&["queue_too_slow"]);
    assert_eq!(refused.get(), 1, "counted with its reason");
    assert!(
        body["error"].as_str().unwrap().contains("timeout_ms"),
        "{body}"
    );
    assert!(
        asked.elapsed() < wait,
        "answered after {:?}",
        asked.elapsed()
    );
    // A raw image body (every parameter in the query) is refused before it is read:
    // headers alone get the 429, not a 408 for the body that never comes.
    let addr = s.server.as_ref().unwrap().addr;
    let head = format!(
        "POST /caption?timeout_ms={timeout_ms} HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: image/png\r\ncontent-length: 1000000\r\n\r\n"
    );
    let status_line = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, BufReader};
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(head.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(status_line.starts_with("HTTP/1.1 429"), "{status_line}");
    // With the default deadline (minutes here), it waits its turn.
    let patient = spawn_png(&s, "/caption?steps=2", 4);
    for r in std::iter::once(running).chain(waiting).chain([patient]) {
        assert_eq!(r.await.unwrap().status(), 200);
    }
    s.stop().await;
}

#[tokio::test]
async fn a_single_image_does_not_wait_for_every_image_of_a_batch_ahead() {
    use base64::Engine;
    // One image at a time, in the queue's order.
    let s = TestServer::start(one_request_at_a_time()).await;
    let scheduler = s.state().scheduler.get().unwrap().clone();

    let busy = start_busy(&s, "/caption?steps=100&candidates=8", 8).await;
    // Four long images in one batch request, then one short image.
    let images: Vec<String> = (1..5)
        .map(|i| base64::engine::general_purpose::STANDARD.encode(scene_png(i)))
        .collect();
    let batch_request = s
        .post("/caption/batch?steps=100&candidates=8")
        .json(&serde_json::json!({ "images": images }))
        .send();
    let batch = tokio::spawn(async move { batch_request.await.unwrap() });
    wait_for("the batch to queue", Duration::from_secs(30), || {
        scheduler.queue_depth() == 4
    })
    .await;
    let single = spawn_png(&s, "/caption?steps=2", 5);

    // It is taken right after the batch's first image, not after its fourth.
    let single = single.await.unwrap();
    assert_eq!(single.status(), 200);
    assert!(
        !batch.is_finished(),
        "the batch finished before the single image"
    );
    assert!(
        scheduler.queue_depth() >= 2,
        "the single image waited for {} of the batch's images",
        4 - scheduler.queue_depth()
    );
    assert_eq!(batch.await.unwrap().status(), 200);
    assert_eq!(busy.await.unwrap().status(), 200);
    s.stop().await;
}
