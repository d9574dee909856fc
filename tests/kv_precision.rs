//! A bundle converted with `--kv-precision fp16` keeps the image K/V in f16 between the
//! encoder and the denoiser (and in the worker's K/V pool): half the bytes to keep and
//! to gather. It computes exactly what the fp16 bundle of the same weights computes
//! (the encoder makes its K/V in fp16 either way, and a cast commutes with a gather), so
//! on every denoiser path the service must end the same rows bit for bit with both.

mod common;

use std::sync::Arc;

use ladic_serve::bundle::{Bundle, DType};
use ladic_serve::runtime::{self, Models, SessionOptions};
use ladic_serve::sampler::{
    self, ActiveRow, ImageKv, Need, Row, RowOutput, SamplerParams, Schedule, SeededNoise, TraceStep,
};
use ndarray::Array4;

/// The parity bundle with its graphs replaced by those of `dir` (a folder of
/// tests/fixtures/parity), its manifest marked fp16 and, with `kv16`, its K/V float16.
fn converted(dir: &str, kv16: bool, out: &std::path::Path) -> Bundle {
    let fixtures = common::parity_fixtures();
    let bundle = common::parity_bundle_with(out, &format!("{dir}/denoiser.onnx"), |m| {
        m["precision"] = serde_json::json!("fp16");
        if kv16 {
            m["graphs"]["encoder"]["outputs"][0]["dtype"] = serde_json::json!("float16");
            let inputs = m["graphs"]["denoiser"]["inputs"].as_array_mut().unwrap();
            for input in inputs.iter_mut().filter(|i| i["name"] == "image_kv") {
                input["dtype"] = serde_json::json!("float16");
            }
        }
    });
    for graph in ["encoder.onnx", "decoder.onnx"] {
        std::fs::copy(fixtures.join(dir).join(graph), out.join(graph))
            .expect("converted graph (python -m ladic.fixtures)");
    }
    bundle
}

fn params(steps: usize, guidance: f64, back_refine: bool) -> SamplerParams {
    common::sampler_params(steps, guidance, back_refine, true)
}

type Run = Vec<(Vec<TraceStep>, Option<RowOutput>)>;

/// Six rows over three images, guided and not, with and without Back&Refine.
fn run(bundle: &Bundle, opts: &SessionOptions) -> Run {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let mut models = Models::load(&rt, bundle, opts).expect("sessions load");
    let m = &bundle.manifest;
    let size = m.image.size as usize;
    let pixels = Array4::from_shape_fn((3, 3, size, size), |(i, c, y, x)| {
        (((i * 5 + c * 11 + y * 3 + x) % 19) as f32) / 9.0 - 1.0
    });
    let kv: Vec<ImageKv> = models.encode_images(pixels.view()).expect("encoder runs");
    let schedule = Arc::new(Schedule::from_spec(&m.schedule));
    let mix = [
        params(5, 1.0, false),
        params(6, 0.0, true),
        params(4, 2.0, true),
    ];
    let mut rows: Vec<Row> = (0..6)
        .map(|i| {
            let noise = Box::new(SeededNoise::new(3, i as u64));
            let latent = (m.text.max_len, m.text.latent_dim);
            Row::new(mix[i % 3].clone(), schedule.clone(), latent, noise, true).expect("draw")
        })
        .collect();
    while rows.iter().any(|r| r.need() != Need::Done) {
        let mut active: Vec<ActiveRow<'_>> = rows
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.need() != Need::Done)
            .map(|(i, row)| ActiveRow {
                row,
                kv: kv[i % 3].as_kv_ref(),
            })
            .collect();
        sampler::step(&mut models, &mut active, 16).expect("step runs");
    }
    if opts.kv_pool {
        assert!(models.kv_pool_stats().is_some());
    }
    rows.into_iter()
        .map(|mut r| (r.take_trace(), r.into_output()))
        .collect()
}

#[test]
fn fp16_kv_gives_the_fp16_bundles_results_on_every_path() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fp16 = converted("fp16", false, a.path());
    let kv16 = converted("fp16-kv", true, b.path());
    assert_eq!(fp16.manifest.kv_dtype(), DType::Float32);
    assert_eq!(kv16.manifest.kv_dtype(), DType::Float16);
    // K/V sent from the host per call (sliced or not), kept in the worker's pool, the
    // fixed-shape calls, and the rows' state on the device.
    for (row_parallelism, kv_pool, cuda_graph, device_loop) in [
        (1, false, false, false),
        (2, false, false, false),
        (1, true, false, false),
        (2, true, false, false),
        (1, true, true, false),
        (1, true, true, true),
    ] {
        let opts = common::cpu_options(row_parallelism, kv_pool, cuda_graph, device_loop, 16);
        let want = run(&fp16, &opts);
        assert!(
            want.iter()
                .all(|(trace, out)| !trace.is_empty() && out.is_some())
        );
        let got = run(&kv16, &opts);
        assert_eq!(got, want, "{opts:?}");
    }
}
