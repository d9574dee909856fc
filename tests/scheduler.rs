//! The worker pool with the real bundle: batching modes, skipped and expired jobs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ladic_serve::config::BatchingMode;
use ladic_serve::metrics::Metrics;
use ladic_serve::pipeline::{self, Prepared};
use ladic_serve::preprocess;
use ladic_serve::runtime::DeviceChoice;
use ladic_serve::sampler::SamplerParams;
use ladic_serve::scheduler::{CaptionJob, InferError, Scheduler, SchedulerConfig};

fn prepared() -> Prepared {
    let mut args = common::test_args().model;
    args.device = DeviceChoice::Cpu;
    pipeline::prepare(&args).expect("bundle and library load")
}

fn scheduler(p: &Prepared, batching: BatchingMode, max_rows: usize) -> (Scheduler, Arc<Metrics>) {
    scheduler_of(p, 1, batching, max_rows)
}

fn scheduler_of(
    p: &Prepared,
    workers: usize,
    batching: BatchingMode,
    max_rows: usize,
) -> (Scheduler, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = SchedulerConfig {
        workers,
        batching,
        max_batch_rows: max_rows,
        queue_size: 32,
        session: ladic_serve::runtime::SessionOptions {
            device: DeviceChoice::Cpu,
            intra_op_threads: 1,
            row_parallelism: 2,
            kv_pool: true,
            cuda_graph: false,
            device_loop: false,
            max_batch_rows: 64,
        },
    };
    (
        pipeline::start_scheduler(p, config, metrics.clone()).unwrap(),
        metrics,
    )
}

fn pixels(p: &Prepared, variant: u8) -> ndarray::Array3<f32> {
    preprocess::to_tensor(&common::scene(variant), &p.bundle.manifest.image)
}

/// Captions 4 images submitted at once; returns the chosen captions' ids and the bits
/// of their confidence (equal bits: each row computed exactly as alone), and the mean
/// rows per denoiser call.
fn run_four(p: &Prepared, batching: BatchingMode, max_rows: usize) -> (Vec<(Vec<i64>, u32)>, f64) {
    let (s, metrics) = scheduler(p, batching, max_rows);
    let mut params = SamplerParams::defaults(&p.bundle.manifest);
    params.steps = 4;
    params.guidance = 1.0;
    // Prepared first so the four arrive back to back.
    let images: Vec<_> = (0..4).map(|v| pixels(p, v)).collect();
    let rxs: Vec<_> = images
        .into_iter()
        .map(|px| pipeline::submit(&s, px, params.clone(), 7, Duration::from_secs(60)).unwrap())
        .collect();
    let ids = rxs
        .into_iter()
        .map(|rx| {
            let out = rx.blocking_recv().unwrap().unwrap();
            let best = out.best().unwrap();
            (best.ids.clone(), best.confidence.to_bits())
        })
        .collect();
    let mean = metrics.batch_rows.get_sample_sum() / metrics.batch_rows.get_sample_count() as f64;
    s.stop();
    (ids, mean)
}

#[test]
fn continuous_batching_shares_calls_and_keeps_results() {
    let p = prepared();
    let (continuous, mean_rows) = run_four(&p, BatchingMode::Continuous, 32);
    let (off, off_rows) = run_four(&p, BatchingMode::Off, 32);
    let (request, _) = run_four(&p, BatchingMode::Request, 32);
    let (one_row, one_rows) = run_four(&p, BatchingMode::Continuous, 1);
    // One guided request is 2 rows per call; four at once must share some calls (the
    // worker may start the first alone before the others arrive).
    assert!(
        mean_rows > 2.0 + 1e-9,
        "continuous batching: {mean_rows} rows per call"
    );
    assert!(
        (off_rows - 2.0).abs() < 1e-9,
        "batching off: {off_rows} rows per call"
    );
    assert!(
        (one_rows - 1.0).abs() < 1e-9,
        "max 1 row: {one_rows} rows per call"
    );
    // Bit for bit: what else is in a call must not change a row's numbers (on the
    // CPU; a GPU's kernels may differ by batch size, which the GPU benchmark's caption
    // comparison watches).
    assert_eq!(continuous, off, "batching must not change captions");
    assert_eq!(continuous, request);
    assert_eq!(continuous, one_row);
}

#[test]
fn gone_clients_and_expired_deadlines_cost_nothing() {
    let p = prepared();
    let (s, metrics) = scheduler(&p, BatchingMode::Continuous, 32);
    let params = SamplerParams::defaults(&p.bundle.manifest);

    // A long job occupies the worker while the others wait in the queue.
    let mut long = params.clone();
    long.steps = 100;
    long.candidates = 8;
    let busy = pipeline::submit(&s, pixels(&p, 0), long, 1, Duration::from_secs(60)).unwrap();

    let gone = pipeline::submit(
        &s,
        pixels(&p, 1),
        params.clone(),
        1,
        Duration::from_secs(60),
    )
    .unwrap();
    drop(gone);
    let (job, expired) = CaptionJob::new(pixels(&p, 2), params.clone(), 1, Instant::now());
    s.submit(job).unwrap();
    // What a request whose HTTP handler timed out leaves: the deadline passed and
    // nobody waits for the answer. The reason is still the deadline.
    let (job, timed_out) = CaptionJob::new(pixels(&p, 2), params.clone(), 1, Instant::now());
    s.submit(job).unwrap();
    drop(timed_out);

    assert!(busy.blocking_recv().unwrap().is_ok());
    assert_eq!(
        expired.blocking_recv().unwrap().unwrap_err(),
        InferError::Deadline
    );
    // The dropped job is skipped when the worker reaches it.
    let ok = pipeline::submit(&s, pixels(&p, 1), params, 1, Duration::from_secs(60)).unwrap();
    assert!(ok.blocking_recv().unwrap().is_ok());
    let dropped = |reason: &str| {
        metrics
            .images_dropped_total
            .with_label_values(&[reason])
            .get()
    };
    assert_eq!(dropped("client_gone"), 1);
    assert_eq!(dropped("deadline"), 2);
    assert_eq!(metrics.rows_in_flight.get(), 0);
    s.stop();
}

#[test]
fn a_slow_stream_loses_step_events_not_time() {
    let p = prepared();
    let (s, metrics) = scheduler(&p, BatchingMode::Continuous, 32);
    let mut params = SamplerParams::defaults(&p.bundle.manifest);
    params.steps = 10;
    params.candidates = 2;
    let plain = pipeline::submit(
        &s,
        pixels(&p, 0),
        params.clone(),
        3,
        Duration::from_secs(60),
    )
    .unwrap()
    .blocking_recv()
    .unwrap()
    .unwrap();

    // Room for one event, and nobody reads until the answer is in: the worker must
    // neither wait for the reader nor change the result.
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(1);
    let (job, rx) = CaptionJob::new(
        pixels(&p, 0),
        params,
        3,
        Instant::now() + Duration::from_secs(60),
    );
    s.submit_streaming(job, events_tx).unwrap();
    let streamed = rx.blocking_recv().unwrap().unwrap();
    assert_eq!(streamed.candidates, plain.candidates);
    assert_eq!(streamed.chosen, plain.chosen);
    let first = events_rx.blocking_recv().expect("the first event was kept");
    assert_eq!((first.candidate, first.step, first.t), (0, 0, 999));
    assert!(first.caption.ends_with('.'));
    assert!(events_rx.blocking_recv().is_none(), "the rest were dropped");
    // 2 candidates x 10 iterations, one delivered.
    assert_eq!(metrics.stream_events_dropped_total.get(), 19);
    s.stop();
}

/// With two workers, a job that does not fit the batch of the worker that took it from
/// the queue runs on the other worker as soon as that one has room, not after the
/// first worker's (long) batch. Which worker takes it is up to chance, so three rounds.
#[test]
fn a_held_job_goes_to_whichever_worker_has_room_first() {
    let p = prepared();
    let mut params = SamplerParams::defaults(&p.bundle.manifest);
    params.guidance = 1.0;
    params.candidates = 8; // 16 rows: a whole batch of --max-batch-rows 16
    let with_steps = |steps| SamplerParams {
        steps,
        ..params.clone()
    };
    let wait_rows = |metrics: &Metrics, rows: i64| {
        let start = Instant::now();
        while metrics.rows_in_flight.get() < rows {
            assert!(start.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    for round in 0..3 {
        let (s, metrics) = scheduler_of(&p, 2, BatchingMode::Continuous, 16);
        let submit = |params: SamplerParams| {
            pipeline::submit(&s, pixels(&p, 0), params, 1, Duration::from_secs(120)).unwrap()
        };
        let mut long = submit(with_steps(100));
        wait_rows(&metrics, 8);
        let short = submit(with_steps(30));
        wait_rows(&metrics, 16);
        // Both workers are busy: one of them takes this job from the queue and holds it.
        let held = submit(with_steps(2));
        assert!(held.blocking_recv().unwrap().is_ok());
        assert!(
            long.try_recv().is_err(),
            "round {round}: the held job waited for the long batch"
        );
        assert!(short.blocking_recv().unwrap().is_ok());
        assert!(long.blocking_recv().unwrap().is_ok());
        assert_eq!(metrics.queue_depth.get(), 0);
        s.stop();
    }
}
