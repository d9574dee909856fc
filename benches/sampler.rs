//! Criterion micro-benchmarks on the default bundle and the real ONNX Runtime:
//! `cargo bench --bench sampler`.
//!
//! - `denoiser/B`: one denoiser call over B rows as the sampler makes it (half the rows
//!   attend to an image's K/V, half to the unconditional K/V, as guided rows do), the
//!   gathering of the rows' K/V into the batch included; `denoiser/kv_gathered/B`: the
//!   same call on a ready K/V batch;
//! - `preprocess/jpeg_640x480`: decode a 640x480 JPEG, resize and normalize it;
//! - `caption/direct`: one caption with the bundle's defaults (encode, every denoising
//!   iteration, decode) on one thread, no queue;
//! - `caption/scheduler`: the same through the worker pool the server uses (queue,
//!   worker thread, continuous batching, text), without HTTP;
//! - `host_step/{serial,parallel}/64`: the sampler's host work in one step of 64 guided
//!   full-size captions, with a model that costs nothing (see [`host_step`]);
//! - `fixed_host_step/64`: the same step through the fixed-shape calls of
//!   `--cuda-graph` on a graph that returns x_t (see [`fixed_host_step`]);
//! - `device_wait_step/{after,during}/64`: the same step with a model call that waits
//!   10 ms, the next noise drawn after it or during it (see [`device_wait_step`]).
//!
//! Sessions use ONNX Runtime's default thread count, as `serve` does; set
//! `LADIC_INTRA_OP_THREADS` to change it.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use ladic_serve::bundle::Bundle;
use ladic_serve::config::BatchingMode;
use ladic_serve::metrics::Metrics;
use ladic_serve::pipeline;
use ladic_serve::preprocess::{self, ImageLimits};
use ladic_serve::runtime::{self, DeviceChoice, Models, SessionOptions};
use ladic_serve::sampler::{self, Denoiser, KvRef, Row, SamplerParams, Schedule, SeededNoise};
use ladic_serve::scheduler::SchedulerConfig;
use ndarray::{Array3, Axis};

fn bundle_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes-tiny")
}

fn session_options() -> SessionOptions {
    SessionOptions {
        device: DeviceChoice::Cpu,
        intra_op_threads: std::env::var("LADIC_INTRA_OP_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        row_parallelism: std::env::var("LADIC_ROW_PARALLELISM")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        kv_pool: true,
        cuda_graph: false,
        device_loop: false,
        max_batch_rows: 64,
    }
}

fn load() -> (runtime::OrtRuntime, Bundle, Models) {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let bundle = Bundle::load(&bundle_dir()).expect("default bundle loads");
    let models = Models::load(&rt, &bundle, &session_options()).expect("sessions load");
    (rt, bundle, models)
}

/// A 640x480 photo-like JPEG: gradients, a few shapes, some texture.
fn jpeg_640x480() -> Vec<u8> {
    let img = ImageBuffer::from_fn(640, 480, |x, y| {
        let inside = (200..360).contains(&x) && (120..300).contains(&y);
        let texture = ((x * 7 + y * 13) % 23) as u8;
        if inside {
            Rgb([200, 40 + texture, 30])
        } else {
            Rgb([(x / 3) as u8, (y / 2) as u8, 128 + texture])
        }
    });
    let mut buf = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img)
        .write_to(&mut buf, ImageFormat::Jpeg)
        .expect("JPEG encodes");
    buf.into_inner()
}

fn image_kv(models: &mut Models, bundle: &Bundle) -> Arc<Array3<f32>> {
    let size = bundle.manifest.image.size as usize;
    let pixels = ndarray::Array4::<f32>::from_shape_fn((1, 3, size, size), |(_, c, y, x)| {
        ((c * 31 + y * 7 + x * 3) % 17) as f32 / 8.0 - 1.0
    });
    let kv = models.encode(pixels.view()).expect("encodes");
    Arc::new(kv.index_axis_move(Axis(0), 0))
}

fn denoiser(c: &mut Criterion) {
    let (_rt, bundle, mut models) = load();
    let kv = image_kv(&mut models, &bundle);
    let (l, d) = (
        bundle.manifest.text.max_len,
        bundle.manifest.text.latent_dim,
    );
    let mut group = c.benchmark_group("denoiser");
    group.measurement_time(Duration::from_secs(4));
    for batch in [1usize, 8, 32] {
        let x = Array3::<f32>::from_shape_fn((batch, l, d), |(b, i, j)| {
            ((b * 5 + i * 3 + j) % 11) as f32 / 5.0 - 1.0
        });
        let sc = Array3::<f32>::zeros((batch, l, d));
        let t: Vec<i64> = (0..batch).map(|b| 999 - 37 * b as i64).collect();
        let refs: Vec<KvRef<'_>> = (0..batch)
            .map(|b| {
                if b % 2 == 0 {
                    KvRef::Image(&kv)
                } else {
                    KvRef::Null
                }
            })
            .collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |bench, _| {
            bench.iter(|| {
                Denoiser::denoise(&mut models, x.view(), sc.view(), &t, &refs).expect("denoises")
            })
        });
        // The same call with the K/V batch already assembled: the difference is what
        // gathering each row's K/V into one tensor costs.
        let null = Arc::new(Array3::<f32>::zeros(kv.dim()));
        let views: Vec<_> = (0..batch)
            .map(|b| if b % 2 == 0 { kv.view() } else { null.view() })
            .collect();
        let gathered = ndarray::stack(Axis(0), &views).expect("same shapes");
        group.bench_with_input(
            BenchmarkId::new("kv_gathered", batch),
            &batch,
            |bench, _| {
                bench.iter(|| {
                    models
                        .denoise_one_kv_per_row(x.view(), sc.view(), &t, gathered.view())
                        .expect("denoises")
                })
            },
        );
    }
    group.finish();
}

fn preprocessing(c: &mut Criterion) {
    let bundle = Bundle::load(&bundle_dir()).expect("default bundle loads");
    let jpeg = jpeg_640x480();
    let limits = ImageLimits::default();
    let mut group = c.benchmark_group("preprocess");
    group.bench_function("jpeg_640x480", |b| {
        b.iter(|| preprocess::preprocess(&jpeg, &bundle.manifest.image, &limits).expect("decodes"))
    });
    group.finish();
}

fn caption(c: &mut Criterion) {
    let (rt, bundle, mut models) = load();
    let manifest = &bundle.manifest;
    let params = SamplerParams::defaults(manifest);
    let schedule = Arc::new(Schedule::from_spec(&manifest.schedule));
    let latent = (manifest.text.max_len, manifest.text.latent_dim);
    let size = manifest.image.size as usize;
    let pixels = ndarray::Array4::<f32>::from_shape_fn((1, 3, size, size), |(_, c, y, x)| {
        ((c * 31 + y * 7 + x * 3) % 17) as f32 / 8.0 - 1.0
    });
    let mut group = c.benchmark_group("caption");
    group.measurement_time(Duration::from_secs(5));
    let mut seed = 0u64;
    group.bench_function("direct", |b| {
        b.iter(|| {
            seed += 1;
            let kv = models.encode(pixels.view()).expect("encodes");
            let kv = Arc::new(kv.index_axis_move(Axis(0), 0));
            let mut rows: Vec<Row> = (0..params.candidates)
                .map(|c| {
                    Row::new(
                        params.clone(),
                        schedule.clone(),
                        latent,
                        Box::new(SeededNoise::new(seed, c as u64)),
                        false,
                    )
                    .expect("noise")
                })
                .collect();
            sampler::run_to_completion(&mut models, &mut rows, &kv, 64).expect("samples");
            rows
        })
    });
    drop(models);

    let prepared = pipeline::Prepared {
        runtime: rt,
        bundle: Arc::new(Bundle::load(&bundle_dir()).expect("default bundle loads")),
        text: Arc::new(
            ladic_serve::text::TextDecoder::load(&bundle.tokenizer_path, &manifest.text)
                .expect("tokenizer loads"),
        ),
    };
    let config = SchedulerConfig {
        workers: 1,
        batching: BatchingMode::Continuous,
        max_batch_rows: 32,
        queue_size: 4,
        session: session_options(),
    };
    let scheduler = pipeline::start_scheduler(&prepared, config, Arc::new(Metrics::new().unwrap()))
        .expect("workers start");
    let image = pixels.index_axis(Axis(0), 0).to_owned();
    group.bench_function("scheduler", |b| {
        b.iter(|| {
            seed += 1;
            let rx = pipeline::submit(
                &scheduler,
                image.clone(),
                params.clone(),
                seed,
                Duration::from_secs(60),
            )
            .expect("queued");
            rx.blocking_recv().expect("answered").expect("captioned")
        })
    });
    group.finish();
    scheduler.stop();
}

/// A model that costs nothing: what is left of a step is the sampler's own host work.
struct FreeModel;

impl Denoiser for FreeModel {
    type Error = std::convert::Infallible;

    fn denoise(
        &mut self,
        x: ndarray::ArrayView3<f32>,
        _self_cond: ndarray::ArrayView3<f32>,
        _t: &[i64],
        _kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, Self::Error> {
        Ok(x.to_owned())
    }

    fn decode(
        &mut self,
        x0: ndarray::ArrayView3<f32>,
    ) -> Result<(ndarray::Array2<i64>, ndarray::Array2<f32>), Self::Error> {
        let (b, l, _) = x0.dim();
        Ok((
            ndarray::Array2::zeros((b, l)),
            ndarray::Array2::zeros((b, l)),
        ))
    }
}

/// 64 guided full-size captions (128 denoiser rows) at their first step, 34 steps with
/// self-conditioning: the batch of the `*_step` benchmarks.
struct FullSizeBatch {
    params: SamplerParams,
    schedule: Arc<Schedule>,
    captions: usize,
}

impl FullSizeBatch {
    fn new() -> FullSizeBatch {
        let bundle = Bundle::load(&bundle_dir()).expect("default bundle loads");
        let mut params = SamplerParams::defaults(&bundle.manifest);
        params.guidance = 1.0;
        params.self_conditioning = true;
        params.steps = 34;
        FullSizeBatch {
            params,
            schedule: Arc::new(Schedule::from_spec(&bundle.manifest.schedule)),
            captions: 64,
        }
    }

    fn rows(&self) -> Vec<Row> {
        (0..self.captions)
            .map(|i| {
                Row::new(
                    self.params.clone(),
                    self.schedule.clone(),
                    (24, 768),
                    Box::new(SeededNoise::new(i as u64, 0)),
                    false,
                )
                .expect("noise")
            })
            .collect()
    }

    /// Times one step of fresh rows on `model`, caption i attending to `kv(i)`.
    fn bench<'k, D: Denoiser>(
        &self,
        b: &mut criterion::Bencher<'_>,
        model: &mut D,
        kv: impl Fn(usize) -> KvRef<'k>,
    ) where
        D::Error: std::fmt::Debug,
    {
        b.iter_batched_ref(
            || self.rows(),
            |rows| {
                let mut active: Vec<sampler::ActiveRow<'_>> = rows
                    .iter_mut()
                    .enumerate()
                    .map(|(i, row)| sampler::ActiveRow { row, kv: kv(i) })
                    .collect();
                sampler::step(model, &mut active, 256).expect("steps")
            },
            criterion::BatchSize::LargeInput,
        )
    }
}

/// `host_step/{serial,parallel}/64`: one sampler step of 64 guided captions (128
/// denoiser rows) with the full-size latent (24 x 768) and a free model, so only the
/// host's work is timed (stacking the inputs, the x0 updates, the noise draws), with the
/// rows' updates on one thread and on all cores.
fn host_step(c: &mut Criterion) {
    let batch = FullSizeBatch::new();
    let kv = Arc::new(Array3::<f32>::zeros((1, 1, 1)));
    let mut group = c.benchmark_group("host_step");
    group.throughput(Throughput::Elements(batch.captions as u64));
    for (name, threshold) in [
        ("serial", usize::MAX),
        ("parallel", sampler::PARALLEL_HOST_ELEMENTS),
    ] {
        group.bench_function(BenchmarkId::new(name, batch.captions), |b| {
            sampler::set_parallel_host_threshold(threshold);
            batch.bench(b, &mut FreeModel, |_| KvRef::Image(&kv));
        });
    }
    sampler::set_parallel_host_threshold(sampler::PARALLEL_HOST_ELEMENTS);
    group.finish();
}

/// [`FreeModel`] whose denoiser call sleeps for a while, as a host waiting for a GPU
/// does; `waits`: says so, so that the sampler draws the next noise meanwhile.
struct SleepingModel {
    call: Duration,
    waits: bool,
}

impl Denoiser for SleepingModel {
    type Error = std::convert::Infallible;

    fn waits_on_device(&self) -> bool {
        self.waits
    }

    fn denoise(
        &mut self,
        x: ndarray::ArrayView3<f32>,
        self_cond: ndarray::ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, Self::Error> {
        std::thread::sleep(self.call);
        FreeModel.denoise(x, self_cond, t, kv)
    }

    fn decode(
        &mut self,
        x0: ndarray::ArrayView3<f32>,
    ) -> Result<(ndarray::Array2<i64>, ndarray::Array2<f32>), Self::Error> {
        FreeModel.decode(x0)
    }
}

/// `device_wait_step/{after,during}/64`: [`host_step`]'s step with a denoiser call
/// that waits 10 ms (a GPU's share), the next noise drawn after the call returns or
/// during it.
fn device_wait_step(c: &mut Criterion) {
    let batch = FullSizeBatch::new();
    let kv = Arc::new(Array3::<f32>::zeros((1, 1, 1)));
    let mut group = c.benchmark_group("device_wait_step");
    group.throughput(Throughput::Elements(batch.captions as u64));
    for (name, waits) in [("after", false), ("during", true)] {
        let mut model = SleepingModel {
            call: Duration::from_millis(10),
            waits,
        };
        group.bench_function(BenchmarkId::new(name, batch.captions), |b| {
            batch.bench(b, &mut model, |_| KvRef::Image(&kv));
        });
    }
    group.finish();
}

/// The fixed-shape denoiser calls (`--cuda-graph`) on a graph whose x0 is x_t
/// (benches/fixtures/identity-denoiser.onnx), on the CPU, so that a step costs only
/// its host side: the sampler's stacking and updates, writing the inputs into the
/// bucket's buffers, reading x0 back.
struct IdentityFixed {
    session: ort::session::Session,
    calls: ladic_serve::fixed_shapes::FixedShapeCalls,
    pool: ladic_serve::kv_pool::KvPool,
}

impl IdentityFixed {
    fn new(rt: &runtime::OrtRuntime, max_rows: usize) -> IdentityFixed {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/fixtures/identity-denoiser.onnx");
        let mut session = ort::session::Session::builder(rt.environment())
            .expect("builder")
            .commit_from_file(file)
            .expect("identity denoiser loads");
        let allocator = ort::memory::Allocator::default();
        let pool = ladic_serve::kv_pool::KvPool::new(allocator, &Array3::zeros((2, 1, 1)), 256)
            .expect("pool");
        let calls = ladic_serve::fixed_shapes::FixedShapeCalls::new(
            &mut session,
            &ort::memory::Allocator::default(),
            &pool.tensor(),
            (24, 768),
            1..=max_rows,
            false,
            ladic_serve::fixed_shapes::Transfer::InPlace,
        )
        .expect("buckets");
        IdentityFixed {
            session,
            calls,
            pool,
        }
    }
}

impl Denoiser for IdentityFixed {
    type Error = String;

    fn denoise(
        &mut self,
        x: ndarray::ArrayView3<f32>,
        self_cond: ndarray::ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, String> {
        let index = self.pool.assign(kv)?;
        self.calls.run(&mut self.session, x, self_cond, t, &index)
    }

    fn decode(
        &mut self,
        x0: ndarray::ArrayView3<f32>,
    ) -> Result<(ndarray::Array2<i64>, ndarray::Array2<f32>), String> {
        FreeModel.decode(x0).map_err(|e| match e {})
    }
}

/// `fixed_host_step/64`: [`host_step`]'s step of 64 guided full-size captions (128
/// rows) through the fixed-shape calls on [`IdentityFixed`], rows' updates on all
/// cores: the host's share of a `--cuda-graph` step, less the copies' DMA time.
fn fixed_host_step(c: &mut Criterion) {
    let batch = FullSizeBatch::new();
    let kv: Vec<Arc<Array3<f32>>> = (0..batch.captions)
        .map(|i| Arc::new(Array3::from_elem((2, 1, 1), i as f32)))
        .collect();
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let mut model = IdentityFixed::new(&rt, 128);
    let mut group = c.benchmark_group("fixed_host_step");
    group.throughput(Throughput::Elements(batch.captions as u64));
    group.bench_function(BenchmarkId::from_parameter(batch.captions), |b| {
        batch.bench(b, &mut model, |i| KvRef::Image(&kv[i]));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = denoiser, preprocessing, caption, host_step, fixed_host_step, device_wait_step
}
criterion_main!(benches);
