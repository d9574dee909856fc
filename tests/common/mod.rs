//! Shared helpers: an in-process server on a loopback port with the real bundle and
//! the real ONNX Runtime, and test images made in code.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use ladic_serve::config::ServeArgs;
use ladic_serve::server::{self, Server};
use serde_json::Value;

/// The default bundle, as the README's serve command uses it.
pub fn bundle_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/scenes-tiny")
}

/// Server settings for tests: default bundle, loopback, any free port, one thread per
/// session so tests running side by side do not oversubscribe the cores.
pub fn test_args() -> ServeArgs {
    let mut args = ServeArgs::for_bundle(bundle_dir());
    args.model.intra_op_threads = 1;
    args.model.device = ladic_serve::runtime::DeviceChoice::Cpu;
    // Tests share a small machine with builds and other tests: only the tests that are
    // about deadlines should ever see one.
    args.request_timeout_ms = 600_000;
    args.max_request_timeout_ms = 600_000;
    args
}

pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(args: ServeArgs) -> TestServer {
        let mut server = server::start(&args).await.expect("server starts");
        tokio::time::timeout(Duration::from_secs(120), server.wait_ready())
            .await
            .expect("ready in time")
            .expect("bundle loads and warms up");
        let base = format!("http://{}", server.addr);
        TestServer {
            server: Some(server),
            base,
            client: reqwest::Client::new(),
        }
    }

    pub async fn default() -> TestServer {
        TestServer::start(test_args()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST path`, ready for headers and a body.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path))
    }

    /// `POST path` (query string included) with `body` sent raw as `image/png`, ready
    /// for more headers.
    pub fn png_request(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        png_request(&self.client, self.url(path), body)
    }

    /// `POST path` with `body` sent raw as `image/png`.
    pub async fn post_png(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.png_request(path, body).send().await.unwrap()
    }

    /// `POST path` with `body` sent raw as `image/png`; the status and the JSON body.
    pub async fn post_png_json(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self.post_png(path, body).await;
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON body"))
    }

    /// `POST path` with `body` as a JSON request.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post(path).json(body).send().await.unwrap()
    }

    /// `POST path` with a multipart form.
    pub async fn post_multipart(
        &self,
        path: &str,
        form: reqwest::multipart::Form,
    ) -> reqwest::Response {
        self.post(path).multipart(form).send().await.unwrap()
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// The text of `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        metrics_text(&self.client, &self.base).await
    }

    pub fn state(&self) -> &ladic_serve::http::AppState {
        &self.server.as_ref().expect("running").state
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// `POST url` with `body` sent raw as `image/png`, ready for more headers; for servers
/// that are not a [`TestServer`].
pub fn png_request(
    client: &reqwest::Client,
    url: String,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("content-type", "image/png")
        .body(body)
}

/// The text of `GET {base}/metrics`.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A multipart form whose `image` part is `png`, as a browser uploads a file
/// (`scene.png`, `image/png`); add the parameters as text fields.
pub fn png_form(png: Vec<u8>) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(png)
            .file_name("scene.png")
            .mime_str("image/png")
            .unwrap(),
    )
}

/// A PNG of `side` x `side` 16-bit RGBA zeros: a few hundred bytes per megapixel to
/// send, 8 bytes a pixel to decode.
pub fn blank_rgba16_png(side: u32) -> Vec<u8> {
    let img = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::new(side, side);
    encode(&DynamicImage::ImageRgba16(img), ImageFormat::Png)
}

pub fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, format).expect("encodes");
    buf.into_inner()
}

/// A small scene: a coloured square on a background, different per `variant`.
pub fn scene(variant: u8) -> DynamicImage {
    let (w, h) = (96u32, 80u32);
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        let inside = (20..60).contains(&x) && (15..55).contains(&y);
        match (inside, variant % 3) {
            (true, 0) => Rgb([220, 30, 30]),
            (true, 1) => Rgb([30, 200, 40]),
            (true, _) => Rgb([40, 40, 220]),
            (false, _) => Rgb([240, 240, 240]),
        }
    }))
}

pub fn scene_png(variant: u8) -> Vec<u8> {
    encode(&scene(variant), ImageFormat::Png)
}

/// The CRC-32 of a PNG chunk (over its type and data), as the chunk's trailer carries it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG header claiming `w x h` plus a few bytes: a tiny file asking for a huge buffer.
pub fn lying_png(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c\x03\x00";
    png.extend_from_slice(&4u32.to_be_bytes());
    png.extend_from_slice(idat);
    png.extend_from_slice(&crc32(idat).to_be_bytes());
    png
}

/// tests/fixtures/parity: the parity bundle and other exports of its weights
/// (`python -m ladic.fixtures`).
pub fn parity_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

/// The parity bundle copied to `out`, its denoiser replaced by `denoiser` (a file of
/// [`parity_fixtures`]) and its manifest changed by `edit`.
pub fn parity_bundle_with(
    out: &std::path::Path,
    denoiser: &str,
    edit: impl FnOnce(&mut Value),
) -> ladic_serve::bundle::Bundle {
    let fixtures = parity_fixtures();
    for entry in std::fs::read_dir(fixtures.join("bundle")).expect("parity bundle") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), out.join(entry.file_name())).expect("copy");
    }
    std::fs::copy(fixtures.join(denoiser), out.join("denoiser.onnx"))
        .unwrap_or_else(|e| panic!("{denoiser} (python -m ladic.fixtures): {e}"));
    let path = out.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("manifest")).expect("json");
    edit(&mut manifest);
    std::fs::write(&path, manifest.to_string()).expect("write manifest");
    ladic_serve::bundle::Bundle::load(out).expect("the changed parity bundle loads")
}

/// The parity bundle with the same weights' denoiser exported with
/// `--unconditional-half`, written to `out`.
pub fn unconditional_half_bundle(out: &std::path::Path) -> ladic_serve::bundle::Bundle {
    parity_bundle_with(out, "unconditional-half-denoiser.onnx", |manifest| {
        manifest["format_version"] = serde_json::json!(2);
        manifest["graphs"]["denoiser"]["unconditional_half"] = serde_json::json!(true);
    })
}

/// Sampler settings for the model-level tests: one candidate, Back&Refine (when on)
/// halving the kept tokens once below t = 600.
pub fn sampler_params(
    steps: usize,
    guidance: f64,
    back_refine: bool,
    self_conditioning: bool,
) -> ladic_serve::sampler::SamplerParams {
    ladic_serve::sampler::SamplerParams {
        steps,
        guidance,
        time_shift: 5,
        renoise_scale: 1.0,
        self_conditioning,
        back_refine: ladic_serve::sampler::BackRefine {
            enabled: back_refine,
            keep_fraction: 0.5,
            trigger_t: 599,
            rounds: 1,
        },
        candidates: 1,
    }
}

/// Sessions on the CPU with one thread each, as the model-level tests load them.
pub fn cpu_options(
    row_parallelism: usize,
    kv_pool: bool,
    cuda_graph: bool,
    device_loop: bool,
    max_batch_rows: usize,
) -> ladic_serve::runtime::SessionOptions {
    ladic_serve::runtime::SessionOptions {
        device: ladic_serve::runtime::DeviceChoice::Cpu,
        intra_op_threads: 1,
        row_parallelism,
        kv_pool,
        cuda_graph,
        device_loop,
        max_batch_rows,
    }
}

/// `count` images' K/V, each encoded by `models` from a pattern of its own.
pub fn encoded_images(
    models: &mut ladic_serve::runtime::Models,
    count: usize,
    size: usize,
) -> Vec<std::sync::Arc<ndarray::Array3<f32>>> {
    (0..count)
        .map(|i| {
            let pixels = ndarray::Array4::from_shape_fn((1, 3, size, size), |(_, c, y, x)| {
                (((i * 7 + c * 13 + y * 3 + x) % 23) as f32) / 11.0 - 1.0
            });
            let kv = models.encode(pixels.view()).expect("encoder runs");
            std::sync::Arc::new(kv.index_axis_move(ndarray::Axis(0), 0))
        })
        .collect()
}

/// Call `n` of a test: one denoiser call of `rows` (each on the K/V of `images[i]`, or
/// on the null K/V where None), latents `(l, d)`, on `a` and on `b`; the largest
/// difference of their x0.
pub fn x0_difference(
    a: &mut ladic_serve::runtime::Models,
    b: &mut ladic_serve::runtime::Models,
    images: &[std::sync::Arc<ndarray::Array3<f32>>],
    rows: &[Option<usize>],
    n: usize,
    (l, d): (usize, usize),
) -> f32 {
    use ladic_serve::sampler::{Denoiser, KvRef};
    let (x, sc, t) = call_inputs(n, rows.len(), (l, d));
    let kv: Vec<KvRef<'_>> = rows
        .iter()
        .map(|r| r.map_or(KvRef::Null, |i| KvRef::Image(&images[i])))
        .collect();
    let got = Denoiser::denoise(a, x.view(), sc.view(), &t, &kv).expect("first");
    let want = Denoiser::denoise(b, x.view(), sc.view(), &t, &kv).expect("second");
    max_abs_difference(&got, &want)
}

/// The inputs of call `n` of a test, `rows` rows of latents `(l, d)`: x_t, self_cond and
/// t, varied by row and by call.
pub fn call_inputs(
    n: usize,
    rows: usize,
    (l, d): (usize, usize),
) -> (ndarray::Array3<f32>, ndarray::Array3<f32>, Vec<i64>) {
    use ndarray::Array3;
    let x = Array3::from_shape_fn((rows, l, d), |(r, i, j)| {
        (((n * 5 + r * 3 + i * 2 + j) % 17) as f32) / 8.0 - 1.0
    });
    let sc = Array3::from_shape_fn((rows, l, d), |(r, i, j)| ((r + i + j) % 5) as f32 / 10.0);
    let t = (0..rows)
        .map(|r| ((n * 97 + r * 31) % 1000) as i64)
        .collect();
    (x, sc, t)
}

/// The largest absolute difference between two arrays of the same shape.
pub fn max_abs_difference(a: &ndarray::Array3<f32>, b: &ndarray::Array3<f32>) -> f32 {
    (a - b).mapv(f32::abs).fold(0.0f32, |m, &v| m.max(v))
}

/// The process failed without a panic; its `error:` line on stderr.
pub fn refusal_line(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
        .to_string()
}

/// Waits until `done`, checking every 5 ms; fails the test, naming `what`, after
/// `within`.
pub async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
