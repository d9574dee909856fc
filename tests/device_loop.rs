//! `--device-loop` (src/device_loop.rs) through the real ONNX Runtime on the parity
//! bundle: rows of every kind, joining at different steps, must end exactly as on the
//! host loop of the same fixed-shape calls, while their state crosses to the device only
//! when a row starts or restarts, and their x0 comes back only when the host needs it.

mod common;

use std::sync::Arc;

use ladic_serve::bundle::Bundle;
use ladic_serve::runtime::{self, Models, SessionOptions};
use ladic_serve::sampler::{
    self, ActiveRow, ImageKv, Need, Row, RowOutput, SamplerParams, Schedule, SeededNoise, Snapshot,
    TraceStep,
};
use ndarray::Array4;

fn parity_bundle() -> Bundle {
    Bundle::load(&common::parity_fixtures().join("bundle")).expect("parity bundle loads")
}

/// The fixed-shape calls of `--cuda-graph`, with or without the device loop.
fn options(device_loop: bool, max_batch_rows: usize) -> SessionOptions {
    common::cpu_options(1, true, true, device_loop, max_batch_rows)
}

fn load(device_loop: bool, max_batch_rows: usize) -> Models {
    load_bundle(&parity_bundle(), device_loop, max_batch_rows)
}

fn load_bundle(bundle: &Bundle, device_loop: bool, max_batch_rows: usize) -> Models {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    Models::load(&rt, bundle, &options(device_loop, max_batch_rows)).expect("sessions load")
}

/// Each row's parameters: guided or not, with Back&Refine or not, with and without
/// self-conditioning, at several step counts.
fn mix() -> Vec<SamplerParams> {
    vec![
        common::sampler_params(5, 1.0, false, true),
        common::sampler_params(6, 0.0, true, true),
        common::sampler_params(4, 1.0, true, true),
        common::sampler_params(7, 0.0, false, false),
        common::sampler_params(3, 1.0, true, false),
    ]
}

/// One finished row: its trace, output, and the streamed row's snapshots.
type Run = (Vec<(Vec<TraceStep>, Option<RowOutput>)>, Vec<Snapshot>);

/// Ten rows over three images; rows 5.. join two steps late; row 2 is streamed.
fn run(models: &mut Models, max_rows: usize, trace: bool) -> Run {
    let bundle = parity_bundle();
    let m = &bundle.manifest;
    let size = m.image.size as usize;
    let latent = (m.text.max_len, m.text.latent_dim);
    let pixels = Array4::from_shape_fn((3, 3, size, size), |(i, c, y, x)| {
        (((i * 7 + c * 13 + y * 3 + x) % 23) as f32) / 11.0 - 1.0
    });
    let kv: Vec<ImageKv> = models.encode_images(pixels.view()).expect("encoder runs");
    let schedule = Arc::new(Schedule::from_spec(&m.schedule));
    let mix = mix();
    let mut rows: Vec<Row> = (0..10)
        .map(|i| {
            let noise = Box::new(SeededNoise::new(7, i as u64));
            Row::new(
                mix[i % mix.len()].clone(),
                schedule.clone(),
                latent,
                noise,
                trace,
            )
            .expect("first draw")
        })
        .collect();
    let mut snapshots = Vec::new();
    let mut tick = 0;
    while rows.iter().any(|r| r.need() != Need::Done) {
        let mut active = Vec::new();
        let mut observe = Vec::new();
        for (i, row) in rows.iter_mut().enumerate() {
            if row.need() != Need::Done && (i < 5 || tick >= 2) {
                observe.push(i == 2);
                active.push(ActiveRow {
                    row,
                    kv: kv[i % 3].as_kv_ref(),
                });
            }
        }
        let (_, snaps) =
            sampler::step_observed(models, &mut active, max_rows, &observe).expect("step runs");
        snapshots.extend(snaps.into_iter().map(|s| Snapshot { row: 2, ..s }));
        tick += 1;
    }
    let rows = rows
        .into_iter()
        .map(|mut r| (r.take_trace(), r.into_output()))
        .collect();
    (rows, snapshots)
}

#[test]
fn the_device_loop_ends_every_row_as_the_host_loop_does() {
    for (max_rows, trace) in [(16, true), (16, false), (4, false)] {
        let (want, want_snapshots) = run(&mut load(false, 16), max_rows, trace);
        assert!(want.iter().all(|(_, out)| out.is_some()));
        let mut models = load(true, 16);
        // Twice on the same pools: the second time every row takes a slot that a row
        // of the first time held (and left its state in).
        for pass in 0..2 {
            let (got, snapshots) = run(&mut models, max_rows, trace);
            // Bit for bit: the same denoiser calls, and the update is the host's arithmetic.
            assert_eq!(got, want, "max_rows {max_rows}, trace {trace}, pass {pass}");
            assert_eq!(snapshots, want_snapshots);
            assert!(!snapshots.is_empty());
        }
        let (stats, held) = models.device_loop_stats().expect("device loop");
        assert_eq!(held, 0, "finished rows give their slots back");
        if !trace {
            // Back&Refine fires once for rows 1 and 2 and their repeats 6 and 7 (row 4's
            // 3 steps jump from t = 666 to 333, which is not above the stride).
            let restarts = 4;
            // x0 came back for each row's final decode and restart, and for every step of
            // the streamed row 2 (its restart and final decode among them).
            let streamed = want_snapshots.len() as u64;
            assert_eq!(
                stats.x0_read,
                2 * (9 + (restarts - 1) + streamed),
                "{stats:?}"
            );
            // States went over when each row started (x_t and self_cond) and at each
            // restart (x_t), not at every step.
            assert_eq!(stats.states_sent, 2 * (2 * 10 + restarts), "{stats:?}");
        }
    }
}

#[test]
fn with_an_unconditional_half_denoiser_the_device_loop_still_ends_rows_as_the_host_loop() {
    // Both lay each call out in halves (src/call_layout.rs) and split it the same way
    // where it does not fit the largest fixed shape: 16 rows here, while a step of all
    // 10 rows (6 guided, so 10 on images' K/V) needs 2 x 10.
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = common::unconditional_half_bundle(dir.path());
    for trace in [true, false] {
        let mut host = load_bundle(&bundle, false, 16);
        let (want, want_snapshots) = run(&mut host, 16, trace);
        assert!(want.iter().all(|(_, out)| out.is_some()));
        let mut models = load_bundle(&bundle, true, 16);
        let (got, snapshots) = run(&mut models, 16, trace);
        assert_eq!(got, want, "trace {trace}");
        assert_eq!(snapshots, want_snapshots);
        // The layouts padded the unguided rows' second halves.
        let padded = |m: &Models| m.fixed_shape_stats().expect("fixed shapes").padding_rows;
        assert!(padded(&host) > 0 && padded(&models) == padded(&host));
        assert_eq!(models.device_loop_stats().expect("device loop").1, 0);
    }
}

#[test]
fn rows_dropped_midway_give_their_slots_back_and_a_full_pool_is_a_clear_error() {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let err = Models::load(
        &rt,
        &parity_bundle(),
        &SessionOptions {
            cuda_graph: false,
            ..options(true, 16)
        },
    )
    .expect_err("needs the fixed-shape calls");
    assert!(err.to_string().contains("--cuda-graph true"), "{err}");
    let err = Models::load(&rt, &parity_bundle(), &options(true, 1))
        .expect_err("a guided row's two passes need a call of 2 rows");
    assert!(err.to_string().contains("at least 2"), "{err}");

    // max_batch_rows 16: 16 slots for rows (and the scratch slot).
    let mut models = load(true, 16);
    let bundle = parity_bundle();
    let m = &bundle.manifest;
    let size = m.image.size as usize;
    let latent = (m.text.max_len, m.text.latent_dim);
    let pixels = Array4::<f32>::zeros((1, 3, size, size));
    let kv = models.encode_images(pixels.view()).expect("encoder runs");
    let schedule = Arc::new(Schedule::from_spec(&m.schedule));
    let new_rows = |n: usize| -> Vec<Row> {
        (0..n)
            .map(|i| {
                let noise = Box::new(SeededNoise::new(1, i as u64));
                Row::new(
                    common::sampler_params(5, 0.0, false, true),
                    schedule.clone(),
                    latent,
                    noise,
                    false,
                )
                .expect("first draw")
            })
            .collect()
    };
    let step = |models: &mut Models, rows: &mut [Row]| {
        let mut active: Vec<ActiveRow<'_>> = rows
            .iter_mut()
            .map(|row| ActiveRow {
                row,
                kv: kv[0].as_kv_ref(),
            })
            .collect();
        sampler::step(models, &mut active, 16).map(drop)
    };
    let mut rows = new_rows(12);
    step(&mut models, &mut rows).expect("a step");
    assert_eq!(models.device_loop_stats().expect("loop").1, 12);
    // A request that leaves (its client went away) drops its rows mid-way.
    rows.truncate(4);
    assert_eq!(models.device_loop_stats().expect("loop").1, 4);
    let mut more = new_rows(12);
    step(&mut models, &mut more).expect("the freed slots serve new rows");
    assert_eq!(models.device_loop_stats().expect("loop").1, 16);
    let mut one_too_many = new_rows(1);
    let err = step(&mut models, &mut one_too_many).expect_err("no slot left");
    assert!(err.to_string().contains("state pool is full"), "{err}");
    drop(more);
    step(&mut models, &mut rows).expect("serves on");
    drop(rows);
    // And serves right: rows after the failure end as on the host loop.
    let (want, _) = run(&mut load(false, 16), 16, false);
    let (got, _) = run(&mut models, 16, false);
    assert_eq!(got, want);
}

#[test]
fn the_state_pools_hold_every_row_the_scheduler_may_admit() {
    // max_batch_rows denoiser rows (one or two per row), or one request alone: up to
    // the API's candidates limit, or the bundle's default.
    assert_eq!(runtime::device_loop_slots(64, 1), 65);
    assert_eq!(runtime::device_loop_slots(2, 1), 9);
    assert_eq!(runtime::device_loop_slots(2, 12), 13);
    let models = load(true, 4);
    let (stats, _) = models.device_loop_stats().expect("device loop");
    assert_eq!(stats.slots, runtime::device_loop_slots(4, 1));
}
