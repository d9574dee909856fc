//! Clients that are slow or stall: a connection that sends no request head, or only
//! part of one, is closed after `--header-read-timeout-ms` (also when it idles
//! between keep-alive requests); a body that does not arrive by the request's deadline
//! is answered 408; a decode that outlasts the deadline is answered 504 at the
//! deadline, not when the decode ends; a client that stops reading its answers is
//! disconnected after `--send-stall-timeout-ms`. The server goes on serving throughout.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, blank_rgba16_png, scene_png, test_args, wait_for};
use ladic_serve::http::body::LINGER_IDLE;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; what it sent, and when it closed.
/// Fails the test if it stays open for `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Instant) {
    let (got, _, closed) = read_until_closed_timed(stream, limit).await;
    (got, closed)
}

/// [`read_until_closed`], and when the first bytes came.
async fn read_until_closed_timed(
    stream: &mut TcpStream,
    limit: Duration,
) -> (Vec<u8>, Option<Instant>, Instant) {
    let mut got = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection is still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, first, Instant::now()),
            Ok(Ok(n)) => {
                first.get_or_insert_with(Instant::now);
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
}

#[tokio::test]
async fn connections_without_a_request_head_are_closed() {
    let mut args = test_args();
    args.header_read_timeout_ms = 400;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;

    // Nothing sent at all.
    let start = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let (got, closed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{got:?}"
    );
    assert!(
        closed - start >= Duration::from_millis(350),
        "{:?}",
        closed - start
    );

    // A head that trickles in, a header line every 100 ms, never finishing.
    let start = Instant::now();
    let mut trickle = TcpStream::connect(addr).await.unwrap();
    let mut open = true;
    let mut line = 0;
    while open && start.elapsed() < Duration::from_secs(10) {
        let bytes: &[u8] = if line == 0 {
            b"GET /health/live HTTP/1.1\r\n"
        } else {
            b"x-slow: 1\r\n"
        };
        line += 1;
        open = trickle.write_all(bytes).await.is_ok();
        let mut buf = [0u8; 256];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await
        {
            open = !matches!(read, Ok(0) | Err(_));
        }
    }
    assert!(!open, "a trickled head kept its connection for 10 s");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // A keep-alive connection: served, then closed once it idles past the timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let answered = Instant::now();
    let (got, closed) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(closed - answered >= Duration::from_millis(350));
    let timed_out = s
        .state()
        .metrics
        .connections_closed_total
        .with_label_values(&["header_timeout"])
        .get();
    assert!(
        timed_out >= 2,
        "{timed_out} connections closed by the head timeout"
    );

    // Everyone else is still served.
    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_by_the_deadline_gets_408() {
    let mut args = test_args();
    args.request_timeout_ms = 700;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;

    // The query's timeout_ms, then the server's default: 10 of 1000 bytes, then nothing.
    for (query, deadline) in [("?timeout_ms=300", 300), ("", 700)] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /caption{query} HTTP/1.1\r\nhost: test\r\ncontent-type: image/png\r\n\
             content-length: 1000\r\n\r\n0123456789"
        );
        let start = Instant::now();
        stream.write_all(head.as_bytes()).await.unwrap();
        let (got, answered, closed) =
            read_until_closed_timed(&mut stream, Duration::from_secs(10)).await;
        let answered = answered.map(|t| t - start);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error_type"], "request_timeout", "{body}");
        // The answer comes at the deadline; the connection closes once the rest of the
        // body has not come for the linger's idle limit.
        let (answered, closed) = (answered.expect("an answer"), closed - start);
        assert!(
            answered >= Duration::from_millis(deadline - 50),
            "{answered:?}"
        );
        assert!(
            answered < Duration::from_millis(deadline + 3000),
            "{answered:?}"
        );
        assert!(
            closed < answered + LINGER_IDLE + Duration::from_secs(3),
            "{closed:?}"
        );
    }

    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(r#"ladic_requests_total{route="/caption",status="408"} 2"#),
        "{metrics}"
    );
    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn a_decode_past_the_deadline_is_answered_at_the_deadline() {
    let s = TestServer::default().await;

    // How long the decode (and a 1-step caption) takes here, with time to spare: the
    // smallest of these images that takes at least 300 ms (the largest is 36 megapixels,
    // under the default limit of 40).
    let mut measured = None;
    for side in [3000, 4500, 6000] {
        let png = blank_rgba16_png(side);
        let start = Instant::now();
        let r = s.post_png("/caption?steps=1", png.clone()).await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        measured = Some((png, start.elapsed()));
        if start.elapsed() >= Duration::from_millis(300) {
            break;
        }
    }
    let (png, full) = measured.unwrap();
    assert!(
        full >= Duration::from_millis(300),
        "the largest image decoded in {full:?}: too fast to test a deadline with"
    );

    // A deadline at an eighth of that is answered near it, not after the decode.
    let timeout = (full / 8).as_millis().max(1);
    let start = Instant::now();
    let r = s
        .post_png(&format!("/caption?steps=1&timeout_ms={timeout}"), png)
        .await;
    let waited = start.elapsed();
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "timeout");
    assert!(
        waited < full / 2,
        "answered after {waited:?}; the decode takes {full:?}"
    );

    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    s.stop().await;
}

/// A client that stops reading its answers: once the socket's buffers are full and it
/// has taken nothing for `--send-stall-timeout-ms`, the connection is closed, and the
/// stream it was on is dropped (counted as a client that left, its rows freed) instead
/// of staying open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let mut args = test_args();
    args.send_stall_timeout_ms = 300;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let left = || {
        metrics
            .requests_total
            .with_label_values(&["/caption", "499"])
            .get()
    };

    // Pipelined streams of about 2.5 MB each, on a connection with a small receive
    // buffer that is never read: more than the socket buffers hold.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let png = scene_png(1);
    let head = format!(
        "POST /caption?steps=100&candidates=8&guidance=1&back_refine=true&stream=true HTTP/1.1\r\n\
         host: x\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
        png.len()
    );
    for _ in 0..4 {
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&png).await.unwrap();
    }
    let start = Instant::now();
    while left() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "a stream nobody reads is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    while metrics.rows_in_flight.get() != 0
        || s.state().in_flight() != 0
        || metrics
            .connections_closed_total
            .with_label_values(&["send_stall"])
            .get()
            != 1
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rows still held, or the close not counted as a send stall"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server goes on serving.
    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    drop(stream);
    s.stop().await;
}

/// Connections are counted while open, and when they close, by how: heads the server
/// answers itself (400, 431) as malformed_request, which requests_total never sees.
#[tokio::test]
async fn connections_are_counted_open_and_by_how_they_close() {
    let s = TestServer::default().await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let closed = |reason: &str| {
        metrics
            .connections_closed_total
            .with_label_values(&[reason])
            .get()
    };
    let before = metrics.open_connections.get();
    let idle: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(TcpStream::connect(addr).await.unwrap());
        }
        v
    };
    wait_for("three more open", Duration::from_secs(20), || {
        metrics.open_connections.get() == before + 3
    })
    .await;
    let clean = closed("clean");
    drop(idle);
    wait_for("back to before", Duration::from_secs(20), || {
        metrics.open_connections.get() == before
    })
    .await;
    assert_eq!(closed("clean"), clean + 3);

    let long_header = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-long: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    for (head, status) in [
        ("NOT HTTP AT ALL\r\n\r\n".to_string(), "HTTP/1.1 400"),
        (long_header, "HTTP/1.1 431"),
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(head.as_bytes()).await;
        let (got, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(status), "{got}");
    }
    wait_for(
        "two malformed heads counted",
        Duration::from_secs(20),
        || closed("malformed_request") == 2,
    )
    .await;
    // A head that breaks off.
    let mut cut = TcpStream::connect(addr).await.unwrap();
    cut.write_all(b"GET /health/live HTTP/1.1\r\nhost")
        .await
        .unwrap();
    drop(cut);
    wait_for("a head cut short counted", Duration::from_secs(20), || {
        closed("client_closed") == 1
    })
    .await;
    assert!(
        !s.metrics_text().await.contains(r#"status="400""#),
        "not in requests_total"
    );
    s.stop().await;
}

/// Sends `head` on a new connection and reads the answer until the server closes it.
async fn answer_to(addr: std::net::SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(head.as_bytes()).await;
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    String::from_utf8_lossy(&got).into_owned()
}

const LIVE: &str = "GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/// A `POST /caption` of a PNG declared `declared` bytes long, with `sent` of its body.
fn png_post(declared: usize, sent: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /caption HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n\
         content-length: {declared}\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(sent);
    request
}

/// Beyond `--max-connections` open connections, a new one still gets its health probe
/// answered and any other request 503 `overloaded` (the probe lane, 32 connections);
/// beyond that too, 503 at once, which reaches a client that sent a body as well. Once
/// a connection closes, requests are served again.
#[tokio::test]
async fn connections_beyond_the_limit_get_503_but_probes_get_through() {
    let mut args = test_args();
    args.max_connections = 2;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let mut idle = vec![
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    wait_for("two open", Duration::from_secs(20), || {
        metrics.open_connections.get() == 2
    })
    .await;

    // The probe lane: probes answered, captions refused.
    let got = answer_to(addr, LIVE).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let post = |body: &[u8]| png_post(body.len(), body);
    let refused = |got: &str| {
        assert!(got.starts_with("HTTP/1.1 503"), "{got}");
        assert!(got.contains("retry-after: 1\r\n"), "{got}");
        let body: Value = serde_json::from_str(got.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error_type"], "overloaded", "{got}");
    };
    let mut lane = TcpStream::connect(addr).await.unwrap();
    lane.write_all(&post(&scene_png(0))).await.unwrap();
    let (got, _) = read_until_closed(&mut lane, Duration::from_secs(10)).await;
    refused(&String::from_utf8_lossy(&got));
    let refused_by = |reason: &str| {
        metrics
            .requests_refused_total
            .with_label_values(&[reason])
            .get()
    };
    assert_eq!(refused_by("connection_limit"), 1);

    // The probe lane full too: 503 before the request is read, which a client that
    // sends a body still gets. The lane is held by refused uploads whose body never
    // comes (kept for the lane's 5 s lifetime, longer than its 2 s for a head).
    wait_for(
        "the first lane connection closed",
        Duration::from_secs(20),
        || metrics.open_connections.get() == 2,
    )
    .await;
    let mut lane_held = Vec::new();
    for _ in 0..32 {
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(&png_post(100_000, b"")).await.unwrap();
        lane_held.push(held);
    }
    wait_for("the lane full", Duration::from_secs(20), || {
        metrics.open_connections.get() == 34
    })
    .await;
    let mut late = TcpStream::connect(addr).await.unwrap();
    let _ = late.write_all(&post(&vec![7u8; 20_000])).await;
    let (got, _) = read_until_closed(&mut late, Duration::from_secs(10)).await;
    refused(&String::from_utf8_lossy(&got));
    let over = || {
        metrics
            .connections_closed_total
            .with_label_values(&["over_limit"])
            .get()
    };
    assert_eq!(over(), 1);

    drop(lane_held);
    idle.pop();
    wait_for("one open", Duration::from_secs(20), || {
        metrics.open_connections.get() == 1
    })
    .await;
    let got = answer_to(
        addr,
        "GET /info HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// A request head longer than `--max-header-bytes` gets 431; a shorter one is served.
#[tokio::test]
async fn a_request_head_over_the_limit_gets_431() {
    let mut args = test_args();
    args.max_header_bytes = 8192;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;
    let with_header = |bytes: usize| {
        format!(
            "GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-pad: {}\r\n\r\n",
            "a".repeat(bytes)
        )
    };
    let got = answer_to(addr, &with_header(4000)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // Checked before each read: up to about twice the limit may be read whole.
    let got = answer_to(addr, &with_header(40_000)).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
}

/// A client that closes its connection in the middle of its body is counted as one
/// that left (499), not as a malformed request (400).
#[tokio::test]
async fn an_upload_cut_off_by_its_client_counts_as_499() {
    let s = TestServer::default().await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let counted = |status: &str| {
        metrics
            .requests_total
            .with_label_values(&["/caption", status])
            .get()
    };
    let mut upload = TcpStream::connect(addr).await.unwrap();
    upload
        .write_all(&png_post(100_000, b"0123456789"))
        .await
        .unwrap();
    wait_for("the request in flight", Duration::from_secs(20), || {
        s.state().in_flight() == 1
    })
    .await;
    drop(upload);
    wait_for("the request counted", Duration::from_secs(20), || {
        counted("499") == 1
    })
    .await;
    assert_eq!(counted("400"), 0);
}

/// A connection of the probe lane (over `--max-connections`) is closed a few seconds
/// after it opened, even while its client goes on sending the body of its refused
/// request, so that the lane's slots come back for the probes.
#[tokio::test]
async fn a_probe_lane_connection_is_closed_within_seconds() {
    let mut args = test_args();
    args.max_connections = 1;
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;
    let metrics = s.state().metrics.clone();
    let _idle = TcpStream::connect(addr).await.unwrap();
    wait_for("one open", Duration::from_secs(20), || {
        metrics.open_connections.get() == 1
    })
    .await;
    let opened = Instant::now();
    let mut lane = TcpStream::connect(addr).await.unwrap();
    lane.write_all(&png_post(10_000_000, b"")).await.unwrap();
    let (mut reader, mut writer) = lane.into_split();
    let trickle = tokio::spawn(async move {
        while writer.write_all(&[0u8; 100]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(
        opened.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        opened.elapsed()
    );
    trickle.abort();
}
