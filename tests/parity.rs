//! Replays the Python reference sampler's recorded runs (tests/fixtures/parity, written
//! by `python -m ladic.fixtures`) through the Rust sampler and the real ONNX Runtime:
//! same noise in, so the same x0 at every iteration (within 1e-4), the same token ids,
//! the same MBR choice and the same caption must come out.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladic_serve::bundle::{BackRefineSpec, Bundle};
use ladic_serve::runtime::{self, Models};
use ladic_serve::sampler::{
    self, ActiveRow, KvRef, Need, RecordedNoise, Row, SamplerParams, Schedule, mbr,
};
use ladic_serve::text::TextDecoder;
use ndarray::{Array2, Array4, Axis};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    params: Params,
    pixels: Vec<f32>,
    noise: Vec<Vec<Vec<f32>>>,
    trace: Vec<Vec<Step>>,
    ids: Vec<Vec<i64>>,
    chosen: usize,
    caption: String,
}

#[derive(Deserialize)]
struct Params {
    steps: usize,
    guidance: f64,
    time_shift: usize,
    renoise_scale: f64,
    self_conditioning: bool,
    back_refine: BackRefineSpec,
    candidates: usize,
}

#[derive(Deserialize)]
struct Step {
    t: i64,
    t_in: i64,
    x0: Vec<f32>,
    refined: bool,
}

fn fixture_dir() -> PathBuf {
    common::parity_fixtures()
}

#[test]
fn rust_sampler_matches_the_python_reference() {
    let dir = fixture_dir();
    let cases_path = dir.join("cases.json");
    let text = std::fs::read_to_string(&cases_path).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}); regenerate it with `python -m ladic.fixtures` in models/",
            cases_path.display()
        )
    });
    let cases: Vec<Case> = serde_json::from_str(&text).expect("cases.json parses");
    assert!(!cases.is_empty());
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert!(
        cases.iter().any(|c| c.params.back_refine.enabled),
        "a Back&Refine case: {names:?}"
    );
    assert!(
        cases.iter().any(|c| c.params.candidates > 1),
        "an MBR case: {names:?}"
    );

    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let bundle = Bundle::load(&dir.join("bundle")).expect("parity bundle loads");
    let m = &bundle.manifest;
    let text = TextDecoder::load(&bundle.tokenizer_path, &m.text).expect("tokenizer loads");
    let schedule = Arc::new(Schedule::from_spec(&m.schedule));
    let (l, d) = (m.text.max_len, m.text.latent_dim);
    let size = m.image.size as usize;

    // One session per graph, then three whose row slices run at once (uneven slices
    // included): both must replay the reference. The bundle's denoiser takes a K/V
    // pool and `kv_index`; the same bundle with the denoiser as it was exported before
    // `kv_index` (one K/V row per row) must replay it too, and so must the same weights
    // exported with fused attention (ONNX Runtime's MultiHeadAttention nodes).
    assert!(m.denoiser_gathers_kv(), "the parity bundle is current");
    let legacy_dir = tempfile::tempdir().expect("temp dir");
    let legacy = legacy_bundle(legacy_dir.path());
    assert!(!legacy.manifest.denoiser_gathers_kv());
    let fused_dir = tempfile::tempdir().expect("temp dir");
    let fused = fused_bundle(&dir, fused_dir.path());
    // The same weights with a denoiser that reads the second half of its batch as the
    // unconditional pass: the service lays out each call for it (on the sliced CPU path
    // too, in one slice), and splits calls that do not fit the largest fixed shape (2
    // rows below: every guided pair, and each unguided row alone).
    let half_dir = tempfile::tempdir().expect("temp dir");
    let half = common::unconditional_half_bundle(half_dir.path());
    assert!(half.manifest.denoiser_unconditional_half());
    // Then the denoiser calls of `--cuda-graph` (padded to fixed shapes, in bound
    // buffers; nothing is captured on the CPU), and last those with the rows' state
    // kept in the device's memory (`--device-loop`).
    // `kv_pool` false: each call sends its distinct K/V from the host (the null K/V in
    // slot 0 for the halves' layout).
    for (bundle, row_parallelism, kv_pool, cuda_graph, device_loop, max_batch_rows) in [
        (&bundle, 1, true, false, false, 64),
        (&bundle, 3, true, false, false, 64),
        (&legacy, 2, true, false, false, 64),
        (&fused, 2, true, false, false, 64),
        (&bundle, 1, true, true, false, 64),
        (&bundle, 1, true, true, true, 64),
        (&half, 1, true, false, false, 64),
        (&half, 3, true, false, false, 64),
        (&half, 1, false, false, false, 64),
        (&half, 3, false, false, false, 64),
        (&half, 1, true, true, false, 64),
        (&half, 1, true, true, false, 2),
        (&half, 1, true, true, true, 64),
        (&half, 1, true, true, true, 2),
    ] {
        let opts = common::cpu_options(
            row_parallelism,
            kv_pool,
            cuda_graph,
            device_loop,
            max_batch_rows,
        );
        let mut models = Models::load(&rt, bundle, &opts).expect("sessions load");
        assert_eq!(models.row_parallelism, row_parallelism);
        for case in &cases {
            replay(case, &mut models, &text, &schedule, (l, d), size);
        }
        // The unguided case pads each call's second half (the /metrics counter).
        let halves = bundle.manifest.denoiser_unconditional_half();
        if halves || !cuda_graph {
            assert_eq!(models.padding_rows_total() > 0, halves);
        }
        if cuda_graph {
            let stats = models.fixed_shape_stats().expect("fixed-shape calls");
            // Padding rows are checked against the plain path in tests/kv_pool.rs.
            assert!(stats.calls > 0, "{stats:?}");
        }
        if device_loop {
            let (stats, held) = models.device_loop_stats().expect("device loop");
            assert!(stats.steps > 0, "{stats:?}");
            assert_eq!(held, 0, "every finished row gave its state slot back");
        }
    }
}

/// The parity bundle with its three graphs replaced by tests/fixtures/parity/fused/
/// (the same weights, every attention one MultiHeadAttention node), written to `out`.
fn fused_bundle(fixtures: &Path, out: &Path) -> Bundle {
    copy_files(&fixtures.join("bundle"), out);
    let fused = fixtures.join("fused");
    for graph in ["encoder.onnx", "denoiser.onnx", "decoder.onnx"] {
        let bytes =
            std::fs::read(fused.join(graph)).expect("fused graph (python -m ladic.fixtures)");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("MultiHeadAttention"),
            "{graph} is exported fused"
        );
        std::fs::write(out.join(graph), bytes).expect("write graph");
    }
    Bundle::load(out).expect("fused bundle loads")
}

fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("parity bundle") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// The parity bundle with tests/fixtures/parity/legacy-denoiser.onnx (no `kv_index`)
/// and its manifest changed to match, written to `out`.
fn legacy_bundle(out: &Path) -> Bundle {
    common::parity_bundle_with(out, "legacy-denoiser.onnx", |manifest| {
        let inputs = manifest["graphs"]["denoiser"]["inputs"]
            .as_array_mut()
            .expect("inputs");
        inputs.retain(|i| i["name"] != "kv_index");
        for input in inputs.iter_mut().filter(|i| i["name"] == "image_kv") {
            input["shape"][0] = serde_json::json!("batch");
        }
    })
}

fn replay(
    case: &Case,
    models: &mut Models,
    text: &TextDecoder,
    schedule: &Arc<Schedule>,
    (l, d): (usize, usize),
    size: usize,
) {
    {
        let p = &case.params;
        let params = SamplerParams {
            steps: p.steps,
            guidance: p.guidance,
            time_shift: p.time_shift,
            renoise_scale: p.renoise_scale,
            self_conditioning: p.self_conditioning,
            back_refine: p.back_refine.clone(),
            candidates: p.candidates,
        };
        let pixels = Array4::from_shape_vec((1, 3, size, size), case.pixels.clone())
            .expect("pixels have the bundle's image shape");
        let kv = models.encode(pixels.view()).expect("encoder runs");
        let kv = Arc::new(kv.index_axis(Axis(0), 0).to_owned());
        assert_eq!(
            case.noise.len(),
            p.candidates,
            "{}: one noise stream per candidate",
            case.name
        );
        let mut rows: Vec<Row> = case
            .noise
            .iter()
            .map(|draws| {
                Row::new(
                    params.clone(),
                    schedule.clone(),
                    (l, d),
                    Box::new(RecordedNoise::new(draws.clone())),
                    true,
                )
                .expect("first draw")
            })
            .collect();
        // All candidates in one batch, as the reference runs them.
        while rows.iter().any(|r| r.need() != Need::Done) {
            let mut active: Vec<ActiveRow<'_>> = rows
                .iter_mut()
                .filter(|r| r.need() != Need::Done)
                .map(|row| ActiveRow {
                    row,
                    kv: KvRef::Image(&kv),
                })
                .collect();
            sampler::step(models, &mut active, 64).expect("step runs");
        }

        let mut cleaned = Vec::new();
        for (c, row) in rows.iter_mut().enumerate() {
            let trace = row.take_trace();
            let want = &case.trace[c];
            assert_eq!(
                trace.len(),
                want.len(),
                "{} candidate {c}: iteration count",
                case.name
            );
            for (i, (got, want)) in trace.iter().zip(want).enumerate() {
                let at = format!("{} candidate {c} iteration {i}", case.name);
                assert_eq!(
                    (got.t, got.t_in, got.refined),
                    (want.t, want.t_in, want.refined),
                    "{at}"
                );
                let want_x0 = Array2::from_shape_vec((l, d), want.x0.clone()).expect("x0 shape");
                let diff = (&got.x0 - &want_x0)
                    .mapv(f32::abs)
                    .fold(0.0f32, |m, &v| m.max(v));
                assert!(diff <= 1e-4, "{at}: x0 differs by {diff}");
            }
            let out = row.output().expect("row finished");
            assert_eq!(
                out.ids, case.ids[c],
                "{} candidate {c}: token ids",
                case.name
            );
            cleaned.push(text.rules.clean(&out.ids));
        }
        let chosen = mbr::choose(&cleaned);
        assert_eq!(chosen, case.chosen, "{}: MBR choice", case.name);
        let caption = text.caption(&cleaned[chosen]).expect("caption decodes");
        assert_eq!(caption, case.caption, "{}: caption", case.name);
    }
}

/// `Denoiser::denoise` with the `--unconditional-half` denoiser gives the plain
/// denoiser's x0 for any call: 1 to 9 rows in any order, rows on the null K/V anywhere
/// (more of them than half the call, or none), on every path that lays calls out
/// (host K/V sliced or not, the resident pool, fixed shapes whose largest call splits
/// them).
#[test]
fn unconditional_half_denoiser_matches_the_plain_one_for_any_rows() {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let dir = tempfile::tempdir().expect("temp dir");
    let half = common::unconditional_half_bundle(dir.path());
    let plain_bundle = Bundle::load(&fixture_dir().join("bundle")).expect("parity bundle");
    let m = &plain_bundle.manifest;
    let (l, d, size) = (m.text.max_len, m.text.latent_dim, m.image.size as usize);
    let mut plain = Models::load(
        &rt,
        &plain_bundle,
        &common::cpu_options(1, true, false, false, 64),
    )
    .expect("sessions load");
    let images = common::encoded_images(&mut plain, 3, size);
    // A small xorshift: the same calls every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    let calls: Vec<Vec<Option<usize>>> = (0..40)
        .map(|_| {
            let rows = 1 + next(9);
            (0..rows)
                .map(|_| match next(4) {
                    0 => None,
                    i => Some(i - 1),
                })
                .collect()
        })
        .collect();
    for (row_parallelism, kv_pool, cuda_graph, max_batch_rows) in [
        (1, false, false, 64),
        (3, false, false, 64),
        (1, true, false, 64),
        (1, true, true, 64),
        (1, true, true, 4),
        (1, true, true, 2),
    ] {
        let opts = common::cpu_options(row_parallelism, kv_pool, cuda_graph, false, max_batch_rows);
        let mut models = Models::load(&rt, &half, &opts).expect("sessions load");
        for (n, rows) in calls.iter().enumerate() {
            let diff = common::x0_difference(&mut models, &mut plain, &images, rows, n, (l, d));
            assert!(
                diff <= 1e-4,
                "{opts:?}, call {n} {rows:?}: x0 differs by {diff}"
            );
        }
    }
}
