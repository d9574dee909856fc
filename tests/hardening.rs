//! The security-facing behaviour of the HTTP API: CORS off unless configured, which
//! routes the API key guards, request ids, no URL fetching, bombs over HTTP, and error
//! messages that do not echo what was sent.

mod common;

use common::{TestServer, blank_rgba16_png, lying_png, scene_png, test_args};
use serde_json::{Value, json};

async fn error_type(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    (
        status,
        body["error_type"].as_str().unwrap_or_default().to_string(),
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// A GIF whose logical screen claims `w x h`, with one 1x1 frame.
fn lying_gif(w: u16, h: u16) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&w.to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff]);
    out.extend_from_slice(&[
        0x2c, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0x02, 0x02, 0x44, 0x01, 0x00,
    ]);
    out.push(0x3b);
    out
}

#[tokio::test]
async fn hostile_requests() {
    let mut args = test_args();
    args.max_batch_images = 2;
    let s = TestServer::start(args).await;

    // No CORS headers unless configured, on any route, preflight included.
    let r = s
        .png_request("/caption?steps=2", scene_png(0))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !r.headers()
            .keys()
            .any(|k| k.as_str().starts_with("access-control-")),
        "{:?}",
        r.headers()
    );
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/caption"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // Decompression bombs: tiny files claiming 50000x50000 are 422 image_too_large.
    for (what, bytes, ct) in [
        ("PNG", lying_png(50_000, 50_000), "image/png"),
        ("GIF", lying_gif(50_000, 50_000), "image/gif"),
    ] {
        let r = s
            .post("/caption")
            .header("content-type", ct)
            .body(bytes)
            .send()
            .await
            .unwrap();
        let (status, ty, _) = error_type(r).await;
        assert_eq!((status, ty.as_str()), (422, "image_too_large"), "{what}");
    }

    // The server never fetches URLs: a URL where the image goes is not base64.
    for url in [
        "https://example.com/cat.png",
        "http://169.254.169.254/latest/",
    ] {
        let r = s.post_json("/caption", &json!({"image": url})).await;
        let (status, ty, error) = error_type(r).await;
        assert_eq!((status, ty.as_str()), (400, "malformed_request"), "{url}");
        assert!(error.contains("never fetches"), "{error}");
    }

    // Error messages do not echo large inputs: an image where a number goes, a
    // base64 string where a list goes, invalid base64, a huge unknown parameter.
    let big = "QUJD".repeat(50_000);
    for body in [
        json!({"image": "AAAA", "steps": big}),
        json!({"image": format!("{big}%{big}")}),
    ] {
        let r = s.post_json("/caption", &body).await;
        let (status, _, error) = error_type(r).await;
        assert!(status == 400 || status == 422, "{status}");
        assert!(error.len() < 300, "{} bytes: {error}", error.len());
    }
    // A string where the list of images goes: not the request's shape.
    let r = s.post_json("/caption/batch", &json!({"images": big})).await;
    let (status, _, error) = error_type(r).await;
    assert_eq!(status, 400);
    assert!(error.len() < 300, "{error}");
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(scene_png(0)))
        .text(big.clone(), big.clone());
    let r = s.post_multipart("/caption", form).await;
    let (status, ty, error) = error_type(r).await;
    assert_eq!((status, ty.as_str()), (422, "invalid_parameter"));
    assert!(error.len() < 100, "{error}");

    // The batch request count limit is the configured one.
    let img = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, scene_png(0));
    let r = s
        .post_json("/caption/batch", &json!({"images": [img, img, img]}))
        .await;
    let (status, ty, error) = error_type(r).await;
    assert_eq!((status, ty.as_str()), (422, "invalid_parameter"));
    assert!(error.contains("between 1 and 2"), "{error}");

    // A refusal sent before the body was read closes the connection, and says so, so
    // keep-alive clients do not write their next request into a closed socket.
    let r = s
        .post("/caption")
        .header("content-type", "text/plain")
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(r.headers()["connection"], "close");
    let r = s.post_png("/caption?steps=2", scene_png(0)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("connection").is_none());

    // Request ids: echoed when sane, replaced when not.
    let r = s
        .client
        .get(s.url("/health/live"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    for bad in ["x".repeat(129), "has space".to_string()] {
        let r = s
            .client
            .get(s.url("/health/live"))
            .header("x-request-id", bad.as_str())
            .send()
            .await
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap();
        assert!(id != bad && id.len() == 32, "{id}");
    }
    s.stop().await;
}

#[tokio::test]
async fn cors_when_configured() {
    let mut args = test_args();
    args.cors_allow_origin = vec!["https://app.example".into()];
    args.api_key = Some("k".into());
    let s = TestServer::start(args).await;

    // Preflight for the caption route, answered without the API key.
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/caption"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = h["access-control-allow-headers"].to_str().unwrap();
    assert!(headers.contains("authorization"), "{headers}");

    // A real request from that origin sees the headers it may read.
    let r = s
        .png_request("/caption?steps=2", scene_png(0))
        .header("origin", "https://app.example")
        .header("authorization", "Bearer k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    // Other origins get no grant.
    let r = s
        .client
        .get(s.url("/info"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    s.stop().await;
}

/// With an API key, only the caption routes need it.
#[tokio::test]
async fn api_key_guards_captions_only() {
    let mut args = test_args();
    args.api_key = Some("s3cret".into());
    let s = TestServer::start(args).await;
    for path in ["/health/live", "/health/ready", "/info", "/metrics"] {
        let r = s.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
    }
    for (path, auth) in [
        ("/caption", None),
        ("/caption", Some("Bearer s3cre")),
        ("/caption", Some("Bearer s3cret0")),
        ("/caption", Some("s3cret")),
        ("/caption/batch", None),
    ] {
        let mut req = s
            .client
            .post(s.url(path))
            .header("content-type", "application/json")
            .body("{}");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        let challenge = r.headers().get("www-authenticate").cloned();
        let (status, ty, _) = error_type(r).await;
        assert_eq!(
            (status, ty.as_str()),
            (401, "unauthorized"),
            "{path} {auth:?}"
        );
        assert!(
            challenge.is_some_and(|c| c.to_str().unwrap().starts_with("Bearer ")),
            "a 401 names the scheme to use"
        );
    }
    // The scheme's name is case-insensitive: past the key check, to the body's error.
    for auth in ["bearer s3cret", "BEARER s3cret", "Bearer  s3cret"] {
        let r = s
            .client
            .post(s.url("/caption"))
            .header("content-type", "application/json")
            .header("authorization", auth)
            .body("{}")
            .send()
            .await
            .unwrap();
        let (status, ty, _) = error_type(r).await;
        assert_eq!((status, ty.as_str()), (400, "malformed_request"), "{auth}");
    }
    s.stop().await;
}

#[tokio::test]
async fn decodes_wait_for_room_in_the_memory_budget() {
    let mut args = test_args();
    args.decode_memory_mib = 8;
    let s = TestServer::start(args).await;
    let info: Value = s.get("/info").await.json().await.unwrap();
    assert_eq!(info["limits"]["decode_memory_mib"], 8);

    // While the whole budget is taken, a decode waits, and its deadline passes.
    let budget = s.state().decode_memory.clone();
    let held = budget.clone().acquire_many_owned(8).await.unwrap();
    let r = s
        .post_png("/caption?steps=2&timeout_ms=300", scene_png(0))
        .await;
    assert_eq!(error_type(r).await.0, 504);
    // An image over the limits needs no room: it is refused from its header at once.
    let r = s
        .post_png(
            "/caption?steps=2&timeout_ms=5000",
            lying_png(50_000, 50_000),
        )
        .await;
    assert_eq!(error_type(r).await.1, "image_too_large");
    drop(held);

    // Images larger than the budget (1000 x 1000 16-bit RGBA: about 11 MiB) decode one
    // at a time, all of them, and give the budget back.
    let big = blank_rgba16_png(1000);
    // (A deadline, so that a budget never given back fails the test instead of hanging.)
    let requests = (0..4).map(|_| s.post_png("/caption?steps=1&timeout_ms=60000", big.clone()));
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(budget.available_permits(), 8);
    s.stop().await;
}

/// Sends a request head announcing `length` bytes of raw image, and all of them but
/// one: an upload in progress, holding its part of the body budget while the stream is
/// open.
async fn stalled_upload(addr: std::net::SocketAddr, length: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /caption?timeout_ms=60000 HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![0u8; length - 1]).await.unwrap();
    stream
}

/// Concurrent uploads share `--body-memory-mib`: one with no room left is refused with
/// 429 (read to its end, so that the client sees the answer), smaller ones still fit,
/// and an upload that ends gives its share back. Connections that send headers only
/// hold nothing.
#[tokio::test]
async fn uploads_share_the_body_memory_budget() {
    const KIB: usize = 1024;
    let mut args = test_args();
    args.body_memory_mib = 1;
    args.max_body_bytes = 300 * KIB;
    let s = TestServer::start(args).await;
    let info: Value = s.get("/info").await.json().await.unwrap();
    assert_eq!(info["limits"]["body_memory_mib"], 1);
    let budget = &s.state().body_budget;

    let mut headers_only = Vec::new();
    for _ in 0..8 {
        // (A body of one byte, none of it sent.)
        headers_only.push(stalled_upload(s.server.as_ref().unwrap().addr, 1).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(budget.available_kib(), 1024);

    let mut uploads = Vec::new();
    for _ in 0..3 {
        uploads.push(stalled_upload(s.server.as_ref().unwrap().addr, 300 * KIB).await);
    }
    let start = std::time::Instant::now();
    while budget.available_kib() > 1024 - 900 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // 124 KiB left: a 200 KiB body is refused, whatever its deadline...
    let r = s
        .post_png("/caption?timeout_ms=60000", vec![0u8; 200 * KIB])
        .await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, ty, message) = error_type(r).await;
    assert_eq!((status, ty.as_str()), (429, "overloaded"), "{message}");
    assert!(message.contains("uploads in progress"), "{message}");
    // ...as is a JSON body of 50 KiB (three times its size with its parsed copies)...
    let json_body = json!({"image": "A".repeat(50 * KIB)});
    let r = s.post_json("/caption", &json_body).await;
    assert_eq!(error_type(r).await.0, 429);
    // ...while a small image still fits and is captioned.
    let r = s.post_png("/caption?steps=2", scene_png(1)).await;
    assert_eq!(r.status(), 200);

    // An upload that ends (the client left) gives its share back.
    drop(uploads.pop());
    let start = std::time::Instant::now();
    while budget.available_kib() < 1024 - 600 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let r = s
        .post_png("/caption?timeout_ms=60000", vec![0u8; 200 * KIB])
        .await;
    assert_eq!(error_type(r).await.1, "invalid_image");
    drop(uploads);
    drop(headers_only);
    let start = std::time::Instant::now();
    while budget.available_kib() < 1024 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    s.stop().await;
}

/// An upload refused for want of room is still read to its end, so a client sending a
/// body larger than the socket buffers gets its 429 instead of a reset connection.
#[tokio::test]
async fn a_refused_large_upload_still_gets_its_429() {
    const MIB: usize = 1 << 20;
    let mut args = test_args();
    args.body_memory_mib = 64;
    args.max_body_bytes = 20 * MIB;
    let s = TestServer::start(args).await;
    let budget = &s.state().body_budget;
    let addr = s.server.as_ref().unwrap().addr;
    let mut uploads = Vec::new();
    for _ in 0..3 {
        uploads.push(stalled_upload(addr, 20 * MIB).await);
    }
    let start = std::time::Instant::now();
    while budget.available_kib() > 4 * 1024 {
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let answer = whole_upload_then_answer(addr, "content-type: image/png\r\n", 16 * MIB).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    // One that waits for 100 Continue (as curl does for large bodies): told to send, it
    // sends the whole body, and the 429 still reaches it.
    let answer = continued_upload_then_answer(addr, 16 * MIB).await;
    assert!(
        answer.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    drop(uploads);
    s.stop().await;
}

/// What a client that writes a whole `length`-byte body to `POST /caption` (headers
/// `extra`, each ending in CRLF) before it reads gets back, read to the connection's end.
async fn whole_upload_then_answer(
    addr: std::net::SocketAddr,
    extra: &str,
    length: usize,
) -> String {
    whole_upload_then_answer_over("HTTP/1.1", addr, extra, length).await
}

/// [`whole_upload_then_answer`] in HTTP `version`.
async fn whole_upload_then_answer_over(
    version: &str,
    addr: std::net::SocketAddr,
    extra: &str,
    length: usize,
) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head =
        format!("POST /caption {version}\r\nhost: x\r\n{extra}content-length: {length}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    send_body_then_read(stream, length, Vec::new()).await
}

/// What a client that sends `Expect: 100-continue` for a `length`-byte `image/png`
/// body gets back: it waits for `100 Continue`, then writes the whole body before it
/// reads on to the connection's end.
async fn continued_upload_then_answer(addr: std::net::SocketAddr, length: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /caption HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\nexpect: 100-continue\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before any answer");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    send_body_then_read(stream, length, answer).await
}

/// Writes `length` zero bytes of body to `stream`, then reads to the connection's end
/// within 30 s; what came before (`answer`) and after, as text.
async fn send_body_then_read(
    mut stream: tokio::net::TcpStream,
    length: usize,
    mut answer: Vec<u8>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(&vec![0u8; length])
        .await
        .expect("the whole body is taken in");
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the server closes the connection after its answer")
    .expect("the answer arrives, not a reset");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Answers given before the body was read (wrong media type, wrong key, a declared
/// length over the limit) still reach a client that writes its whole large body first:
/// the rest of the body is read and thrown away after the answer, and the connection
/// then closes. Closing at once reset the connection and lost the answer.
#[tokio::test]
async fn early_refusals_of_large_uploads_reach_the_client() {
    const MIB: usize = 1 << 20;
    let mut args = test_args();
    args.max_body_bytes = 12 * MIB;
    args.api_key = Some("s3cret".into());
    let s = TestServer::start(args).await;
    let addr = s.server.as_ref().unwrap().addr;
    let key = "authorization: Bearer s3cret\r\n";
    let cases = [
        (
            format!("{key}content-type: text/plain\r\n"),
            16 * MIB,
            "415",
            "unsupported_media_type",
        ),
        (
            "content-type: image/png\r\n".to_string(),
            16 * MIB,
            "401",
            "unauthorized",
        ),
        (
            format!("{key}content-type: image/png\r\n"),
            16 * MIB,
            "413",
            "payload_too_large",
        ),
    ];
    for (extra, length, status, error_type) in cases {
        let answer = whole_upload_then_answer(addr, &extra, length).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.contains(error_type), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // HTTP/1.0 has no 100 Continue: its client sends the body at once, Expect or not.
    let extra = format!("{key}content-type: text/plain\r\nexpect: 100-continue\r\n");
    let answer = whole_upload_then_answer_over("HTTP/1.0", addr, &extra, 16 * MIB).await;
    assert!(answer.starts_with("HTTP/1.0 415"), "{answer}");
    // A client waiting for 100 Continue is not told to send: it gets the answer at once,
    // and the connection closes without waiting for a body that will not come.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /caption HTTP/1.1\r\nhost: x\r\n{key}content-type: text/plain\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            16 * MIB
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(3),
            stream.read_to_end(&mut answer),
        )
        .await
        .expect("closed at once, not after the linger")
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
    }
    // The server keeps serving.
    let (status, _) = s.post_png_json("/caption?steps=2", scene_png(1)).await;
    assert_eq!(status, 401, "the key is still required");
    let r = s
        .png_request("/caption?steps=2", scene_png(1))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

/// A body's memory is given back once its images are decoded, not when its answer is
/// sent: while a batch and a JSON caption are being denoised, the budget is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_gives_its_memory_back_once_its_images_are_decoded() {
    use base64::Engine;
    let mut args = test_args();
    // Room for all three images' rows in the running batch.
    args.max_batch_rows = 64;
    let s = TestServer::start(args).await;
    let budget = &s.state().body_budget;
    let full = budget.available_kib();
    let b64 = base64::engine::general_purpose::STANDARD.encode(scene_png(2));
    let query = "steps=100&candidates=8&guidance=2";
    let (batch_path, single_path) = (
        format!("/caption/batch?{query}"),
        format!("/caption?{query}"),
    );
    let (batch_body, single_body) = (
        json!({"images": [b64.clone(), b64.clone()]}),
        json!({"image": b64}),
    );
    let batch = s.post_json(&batch_path, &batch_body);
    let single = s.post_json(&single_path, &single_body);
    let look = async {
        let start = std::time::Instant::now();
        // All three images are being denoised (8 guided candidates each: 48 rows)...
        loop {
            let m = s.metrics_text().await;
            let rows = m
                .lines()
                .find_map(|l| l.strip_prefix("ladic_rows_in_flight "))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if rows >= 24.0 {
                break;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "{m}");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // ...and their bodies hold nothing.
        budget.available_kib()
    };
    let (batch, single, available) = tokio::join!(batch, single, look);
    assert_eq!(available, full);
    assert_eq!(batch.status(), 200);
    assert_eq!(single.status(), 200);
    s.stop().await;
}
