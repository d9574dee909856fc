//! The row state machine and the batched driver against a direct transliteration of
//! the loop in docs/bundle.md, with a fake denoiser.

use std::sync::Arc;

use ndarray::{Array2, Array3, ArrayView3, Axis};

use super::*;

const L: usize = 6;
const D: usize = 4;
const T: usize = 1000;

/// A cheap, deterministic, per-row function of its inputs (so batching cannot change
/// results), which depends on every input so a wrong wiring shows up.
struct FakeDenoiser {
    null_kv: Array3<f32>,
    denoise_calls: usize,
    decode_calls: usize,
    /// Claims to wait on a device, so that the sampler prefetches noise during calls.
    waits: bool,
    /// Keeps the rows' state itself, as a device would ([`device`]).
    state: Option<FakeStatePool>,
}

/// A device loop on the host: the state pool's slots as arrays, the update written as
/// the device-loop graph computes it.
struct FakeStatePool {
    slots: StateSlots,
    x: Vec<Array2<f32>>,
    self_cond: Vec<Array2<f32>>,
    /// x0 sent back, and states sent, over all calls.
    x0_sent_back: usize,
    states_received: usize,
}

impl FakeStatePool {
    fn new(capacity: usize) -> FakeStatePool {
        FakeStatePool {
            slots: StateSlots::new(capacity),
            x: vec![Array2::zeros((L, D)); capacity],
            self_cond: vec![Array2::zeros((L, D)); capacity],
            x0_sent_back: 0,
            states_received: 0,
        }
    }
}

impl DeviceLoop for FakeDenoiser {
    type Error = std::convert::Infallible;

    fn step(&mut self, rows: Vec<DeviceRow<'_>>) -> Result<DeviceStep, Self::Error> {
        let mut pool = self.state.take().expect("a fake with a state pool");
        let (slot_of, new_slots) = pool.slots.assign(&rows).expect("a free slot");
        let mut out = DeviceStep {
            new_slots,
            x0: Vec::new(),
        };
        for (row, &slot) in rows.iter().zip(&slot_of) {
            if let Some(x) = &row.send_x {
                pool.x[slot].assign(x);
                pool.states_received += 1;
            }
            if let Some(sc) = &row.send_self_cond {
                pool.self_cond[slot].assign(sc);
            }
        }
        // The denoiser's rows: each row's conditional pass, then its unconditional one.
        let (mut x, mut sc, mut t, mut kv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (row, &slot) in rows.iter().zip(&slot_of) {
            let passes: &[KvRef<'_>] = if row.update.guidance.is_some() {
                &[row.kv, KvRef::Null]
            } else {
                &[row.kv]
            };
            for &k in passes {
                x.push(pool.x[slot].view());
                sc.push(pool.self_cond[slot].view());
                t.push(row.t_in);
                kv.push(k);
            }
        }
        let (x, sc) = (
            ndarray::stack(Axis(0), &x).unwrap(),
            ndarray::stack(Axis(0), &sc).unwrap(),
        );
        let denoised = self.denoise(x.view(), sc.view(), &t, &kv)?;
        let mut k = 0;
        for (row, &slot) in rows.iter().zip(&slot_of) {
            let cond = denoised.index_axis(Axis(0), k);
            let x0 = match row.update.guidance {
                Some((a, b)) => {
                    let uncond = denoised.index_axis(Axis(0), k + 1);
                    k += 2;
                    ndarray::Zip::from(&cond)
                        .and(&uncond)
                        .map_collect(|&c, &u| a * c - b * u)
                }
                None => {
                    k += 1;
                    cond.to_owned()
                }
            };
            if row.update.keep_self_cond {
                pool.self_cond[slot].assign(&x0);
            } else {
                pool.self_cond[slot].fill(0.0);
            }
            if let Some((a, b, eps)) = &row.update.renoise {
                pool.x[slot] = ndarray::Zip::from(&x0)
                    .and(eps)
                    .map_collect(|&x0, &e| a * x0 + b * e);
            }
            if row.update.needs_x0 {
                pool.x0_sent_back += 1;
                out.x0.push(Some(x0));
            } else {
                out.x0.push(None);
            }
        }
        self.state = Some(pool);
        Ok(out)
    }
}

impl FakeDenoiser {
    fn new() -> Self {
        FakeDenoiser {
            null_kv: Array3::from_elem((2, 1, 1), -0.25),
            denoise_calls: 0,
            decode_calls: 0,
            waits: false,
            state: None,
        }
    }

    fn on_device(capacity: usize) -> Self {
        FakeDenoiser {
            state: Some(FakeStatePool::new(capacity)),
            ..FakeDenoiser::new()
        }
    }
}

fn fake_x0(
    x: ndarray::ArrayView2<f32>,
    sc: ndarray::ArrayView2<f32>,
    t: i64,
    kv: &Array3<f32>,
) -> Array2<f32> {
    let bias = kv.sum();
    let tt = t as f32 / T as f32;
    Array2::from_shape_fn(x.dim(), |(l, d)| {
        0.6 * x[[l, d]] * (1.0 - tt)
            + 0.3 * sc[[l, d]]
            + bias * (l as f32 + 1.0) / 10.0
            + 0.01 * d as f32
    })
}

fn fake_decode(x0: ndarray::ArrayView2<f32>) -> (Vec<i64>, Vec<f32>) {
    let ids = x0
        .rows()
        .into_iter()
        .map(|r| ((r.sum().abs() * 3.0) as i64) % 9)
        .collect();
    let conf = x0
        .rows()
        .into_iter()
        .map(|r| 1.0 / (1.0 + (-r[0]).exp()))
        .collect();
    (ids, conf)
}

impl Denoiser for FakeDenoiser {
    type Error = std::convert::Infallible;

    fn waits_on_device(&self) -> bool {
        self.waits
    }

    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop<Error = Self::Error>> {
        if self.state.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        sc: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, Self::Error> {
        self.denoise_calls += 1;
        let mut out = Array3::zeros(x.dim());
        for b in 0..x.dim().0 {
            let k = match kv[b] {
                KvRef::Image(k) => k.as_ref(),
                KvRef::Null => &self.null_kv,
                KvRef::Resident(_) => unreachable!("the fake model has no resident pool"),
            };
            out.index_axis_mut(Axis(0), b).assign(&fake_x0(
                x.index_axis(Axis(0), b),
                sc.index_axis(Axis(0), b),
                t[b],
                k,
            ));
        }
        Ok(out)
    }

    fn decode(&mut self, x0: ArrayView3<f32>) -> Result<(Array2<i64>, Array2<f32>), Self::Error> {
        self.decode_calls += 1;
        let b = x0.dim().0;
        let mut ids = Array2::zeros((b, L));
        let mut conf = Array2::zeros((b, L));
        for i in 0..b {
            let (a, c) = fake_decode(x0.index_axis(Axis(0), i));
            ids.row_mut(i).assign(&ndarray::Array1::from(a));
            conf.row_mut(i).assign(&ndarray::Array1::from(c));
        }
        Ok((ids, conf))
    }
}

fn params(steps: usize, guidance: f64, br: bool) -> SamplerParams {
    SamplerParams {
        steps,
        guidance,
        time_shift: 5,
        renoise_scale: 0.9,
        self_conditioning: true,
        back_refine: BackRefine {
            enabled: br,
            keep_fraction: 0.5,
            trigger_t: 599,
            rounds: 2,
        },
        candidates: 1,
    }
}

/// docs/bundle.md's loop, written out as plainly as possible.
fn reference(
    p: &SamplerParams,
    kv: &Array3<f32>,
    null_kv: &Array3<f32>,
    seed: u64,
) -> (Vec<i64>, Vec<TraceStep>) {
    let sched = Schedule::linear(1e-4, 0.02, T);
    let mut noise = SeededNoise::new(seed, 0);
    let stride = sched.stride(p.steps);
    let mut t = T - 1;
    let mut rounds_left = p.back_refine_rounds();
    let mut x = noise.draw(L, D).unwrap();
    let mut sc = Array2::<f32>::zeros((L, D));
    let w = p.guidance;
    let mut trace = Vec::new();
    let x0 = loop {
        let t_in = (t + p.time_shift).min(T - 1) as i64;
        let c = fake_x0(x.view(), sc.view(), t_in, kv);
        let x0 = if w == 0.0 {
            c
        } else {
            let u = fake_x0(x.view(), sc.view(), t_in, null_kv);
            (1.0 + w) as f32 * &c - w as f32 * &u
        };
        sc = if p.self_conditioning {
            x0.clone()
        } else {
            Array2::zeros((L, D))
        };
        let refine = t <= p.back_refine.trigger_t && rounds_left > 0 && t > stride;
        trace.push(TraceStep {
            t: t as i64,
            t_in,
            x0: x0.clone(),
            refined: refine,
        });
        if refine {
            let (_, conf) = fake_decode(x0.view());
            let k = (p.back_refine.keep_fraction * L as f64).ceil() as usize;
            let mut order: Vec<usize> = (0..L).collect();
            order.sort_by(|&a, &b| conf[b].partial_cmp(&conf[a]).unwrap());
            let keep: Vec<usize> = order[..k].to_vec();
            let eps = noise.draw(L, D).unwrap();
            let n = t - stride;
            let ab = sched.alpha_bar(n);
            let renoised =
                ab.sqrt() as f32 * &x0 + (p.renoise_scale * (1.0 - ab).sqrt()) as f32 * &eps;
            x = eps.clone();
            for pos in keep {
                x.row_mut(pos).assign(&renoised.row(pos));
            }
            t = T - 1;
            rounds_left -= 1;
            continue;
        }
        if t <= stride {
            break x0;
        }
        let eps = noise.draw(L, D).unwrap();
        let n = t - stride;
        let ab = sched.alpha_bar(n);
        x = ab.sqrt() as f32 * &x0 + (p.renoise_scale * (1.0 - ab).sqrt()) as f32 * &eps;
        t = n;
    };
    (fake_decode(x0.view()).0, trace)
}

fn image_kv(v: f32) -> Arc<Array3<f32>> {
    Arc::new(Array3::from_elem((2, 1, 1), v))
}

fn new_row(p: &SamplerParams, seed: u64) -> Row {
    let sched = Arc::new(Schedule::linear(1e-4, 0.02, T));
    Row::new(
        p.clone(),
        sched,
        (L, D),
        Box::new(SeededNoise::new(seed, 0)),
        true,
    )
    .unwrap()
}

#[test]
fn rows_follow_the_reference_loop() {
    // (steps, guidance, Back&Refine, self-conditioning, keep_fraction): 0.3 of the 6
    // positions is 1.8, which Back&Refine rounds up to 2.
    for (steps, w, br, sc, keep) in [
        (5, 0.0, false, true, 0.5),
        (10, 1.5, false, true, 0.5),
        (34, 0.7, false, true, 0.5),
        (10, 1.0, true, true, 0.5),
        (5, 0.0, true, true, 0.5),
        (1, 2.0, true, true, 0.5),
        (10, 1.5, false, false, 0.5),
        (10, 1.0, true, false, 0.5),
        (10, 1.0, true, true, 0.3),
        (10, 0.0, true, false, 0.3),
    ] {
        let mut p = params(steps, w, br);
        p.self_conditioning = sc;
        p.back_refine.keep_fraction = keep;
        let kv = image_kv(0.1);
        let (want_ids, want_trace) = reference(&p, &kv, &FakeDenoiser::new().null_kv, 42);
        let mut den = FakeDenoiser::new();
        let mut rows = vec![new_row(&p, 42)];
        run_to_completion(&mut den, &mut rows, &kv, 64).unwrap();
        let row = &mut rows[0];
        let trace = row.take_trace();
        let case = format!("steps {steps} w {w} br {br} sc {sc} keep {keep}");
        assert_eq!(trace.len(), want_trace.len(), "{case}");
        for (a, b) in trace.iter().zip(&want_trace) {
            assert_eq!((a.t, a.t_in, a.refined), (b.t, b.t_in, b.refined));
            let diff = (&a.x0 - &b.x0)
                .mapv(f32::abs)
                .fold(0.0f32, |m, &v| m.max(v));
            assert!(diff < 1e-5, "{case}: x0 differs by {diff}");
        }
        assert_eq!(rows[0].output().unwrap().ids, want_ids, "{case}");
    }
}

#[test]
fn iteration_counts() {
    let kv = image_kv(0.0);
    for (steps, br, want) in [
        (5, false, 5),
        (34, false, 34),
        (10, false, 10),
        (1, false, 1),
    ] {
        let mut den = FakeDenoiser::new();
        let mut rows = vec![new_row(&params(steps, 0.0, br), 1)];
        run_to_completion(&mut den, &mut rows, &kv, 8).unwrap();
        assert_eq!(rows[0].iterations(), want, "steps {steps}");
    }
    // Back&Refine with stride 100, trigger 599, 2 rounds: t=999..599 is 5 iterations,
    // then restart twice: 5 + 5 + 10.
    let mut den = FakeDenoiser::new();
    let mut rows = vec![new_row(&params(10, 0.0, true), 1)];
    run_to_completion(&mut den, &mut rows, &kv, 8).unwrap();
    assert_eq!(rows[0].iterations(), 20);
}

#[test]
fn batching_and_staggered_rows_do_not_change_results() {
    let p_guided = params(10, 1.0, true);
    let p_plain = params(5, 0.0, false);
    let kvs = [image_kv(0.1), image_kv(-0.3), image_kv(0.2)];
    let solo = |p: &SamplerParams, kv: &Arc<Array3<f32>>, seed| {
        let mut den = FakeDenoiser::new();
        let mut rows = vec![new_row(p, seed)];
        run_to_completion(&mut den, &mut rows, kv, 64).unwrap();
        rows.remove(0).into_output().unwrap()
    };
    let want = [
        solo(&p_guided, &kvs[0], 1),
        solo(&p_plain, &kvs[1], 2),
        solo(&p_guided, &kvs[2], 3),
    ];
    for max_rows in [1, 2, 3, 64] {
        let mut den = FakeDenoiser::new();
        let mut rows = [
            new_row(&p_guided, 1),
            new_row(&p_plain, 2),
            new_row(&p_guided, 3),
        ];
        let mut ticks = 0;
        while rows.iter().any(|r| r.need() != Need::Done) {
            // The third row joins two ticks late, as a new request would.
            let mut active: Vec<ActiveRow<'_>> = rows
                .iter_mut()
                .zip(&kvs)
                .enumerate()
                .filter(|(i, (r, _))| r.need() != Need::Done && (*i < 2 || ticks >= 2))
                .map(|(_, (row, kv))| ActiveRow {
                    row,
                    kv: KvRef::Image(kv),
                })
                .collect();
            let stats = step(&mut den, &mut active, max_rows).unwrap();
            assert!(stats.denoiser_calls.iter().all(|&n| n <= max_rows));
            ticks += 1;
        }
        for (r, w) in rows.iter().zip(&want) {
            assert_eq!(r.output().unwrap(), w, "max_rows {max_rows}");
        }
    }
}

#[test]
fn guidance_zero_skips_the_unconditional_pass() {
    let kv = image_kv(0.1);
    let mut den = FakeDenoiser::new();
    let mut rows = [new_row(&params(5, 0.0, false), 3)];
    let mut active = vec![ActiveRow {
        row: &mut rows[0],
        kv: KvRef::Image(&kv),
    }];
    let stats = step(&mut den, &mut active, 8).unwrap();
    assert_eq!(stats.denoiser_calls, vec![1]);
    let mut rows = [new_row(&params(5, 1.0, false), 3)];
    let mut active = vec![ActiveRow {
        row: &mut rows[0],
        kv: KvRef::Image(&kv),
    }];
    let stats = step(&mut den, &mut active, 8).unwrap();
    assert_eq!(stats.denoiser_calls, vec![2]);
}

#[test]
fn back_refine_keeps_the_most_confident_positions_ties_low() {
    // All confidences equal: the first ceil(0.5 * 6) = 3 positions are kept, so they are
    // a renoised x0, the rest the fresh draw exactly.
    let sched = Arc::new(Schedule::linear(1e-4, 0.02, T));
    let mut p = params(10, 0.0, true);
    p.back_refine.trigger_t = 999;
    let draws: Vec<Vec<f32>> = (0..3).map(|k| vec![k as f32 + 1.0; L * D]).collect();
    let mut row = Row::new(p, sched, (L, D), Box::new(RecordedNoise::new(draws)), false).unwrap();
    let x0 = Array2::from_elem((L, D), 0.5f32);
    row.apply_denoised(x0.view(), None).unwrap();
    assert_eq!(row.need(), Need::Confidence);
    row.apply_confidence(ndarray::Array1::from_elem(L, 0.7).view())
        .unwrap();
    let x = row.x();
    for pos in 0..L {
        let v = x[[pos, 0]];
        if pos < 3 {
            assert!(v != 2.0, "position {pos} should be kept");
        } else {
            assert_eq!(v, 2.0, "position {pos} should be fresh noise");
        }
    }
    assert_eq!(
        row.need(),
        Need::Denoise {
            t_in: (T - 1) as i64
        }
    );
}

#[test]
fn planned_iterations_match_the_loop() {
    let sched = Schedule::linear(1e-4, 0.02, T);
    let kv = image_kv(0.2);
    for steps in [1, 2, 5, 7, 10, 34, 60, 100] {
        for br in [false, true] {
            let p = params(steps, 0.5, br);
            let mut den = FakeDenoiser::new();
            let mut rows = vec![new_row(&p, 4)];
            run_to_completion(&mut den, &mut rows, &kv, 8).unwrap();
            assert_eq!(
                planned_iterations(&p, &sched),
                rows[0].iterations(),
                "steps {steps} br {br}"
            );
        }
    }
}

#[test]
fn observed_steps_snapshot_every_iteration_without_changing_results() {
    let kv = image_kv(0.1);
    let p = params(10, 1.0, true);
    let mut den = FakeDenoiser::new();
    let mut plain = vec![new_row(&p, 9)];
    run_to_completion(&mut den, &mut plain, &kv, 8).unwrap();
    let want_trace = plain[0].take_trace();

    // Two rows, only the second observed.
    let mut rows = [new_row(&p, 9), new_row(&p, 9)];
    let mut snapshots = Vec::new();
    let mut decode_calls = 0;
    while rows.iter().any(|r| r.need() != Need::Done) {
        let mut active: Vec<ActiveRow<'_>> = rows
            .iter_mut()
            .map(|row| ActiveRow {
                row,
                kv: KvRef::Image(&kv),
            })
            .collect();
        let (stats, snaps) = step_observed(&mut den, &mut active, 8, &[false, true]).unwrap();
        decode_calls += stats.decoder_calls.len();
        snapshots.extend(snaps);
    }
    assert!(snapshots.iter().all(|s| s.row == 1));
    assert_eq!(snapshots.len(), want_trace.len());
    // At most one decoder call per tick: observed rows share it with the others.
    assert_eq!(decode_calls, want_trace.len());
    for (i, (s, w)) in snapshots.iter().zip(&want_trace).enumerate() {
        assert_eq!(s.iteration, i);
        assert_eq!((s.t as i64, s.refine), (w.t, w.refined));
        assert_eq!(s.ids, fake_decode(w.x0.view()).0);
    }
    assert!(snapshots.iter().any(|s| s.refine));
    let last = snapshots.last().unwrap();
    assert_eq!(&last.ids, &rows[1].output().unwrap().ids);
    assert_eq!(rows[0].output(), plain[0].output());
    assert_eq!(rows[1].output(), plain[0].output());
}

/// Steps `rows` together until all are done, row i attending to `kvs[i % 2]`.
fn run_all(den: &mut FakeDenoiser, rows: &mut [Row], kvs: &[Arc<Array3<f32>>; 2], max_rows: usize) {
    while rows.iter().any(|r| r.need() != Need::Done) {
        let mut active: Vec<ActiveRow<'_>> = rows
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.need() != Need::Done)
            .map(|(i, row)| ActiveRow {
                row,
                kv: KvRef::Image(&kvs[i % 2]),
            })
            .collect();
        step(den, &mut active, max_rows).unwrap();
    }
}

#[test]
fn large_batches_update_rows_in_parallel_with_the_same_results() {
    // Enough rows that one step's updates run on the rayon pool.
    let n = PARALLEL_HOST_ELEMENTS / (L * D) + 40;
    let kvs = [image_kv(0.1), image_kv(-0.3)];
    let p = |i: usize| {
        params(
            5,
            if i.is_multiple_of(3) { 0.0 } else { 1.0 },
            i.is_multiple_of(7),
        )
    };
    let mut rows: Vec<Row> = (0..n).map(|i| new_row(&p(i), i as u64)).collect();
    run_all(&mut FakeDenoiser::new(), &mut rows, &kvs, usize::MAX);
    for i in (0..n).step_by(97).chain([n - 1]) {
        let mut den = FakeDenoiser::new();
        let mut solo = vec![new_row(&p(i), i as u64)];
        run_to_completion(&mut den, &mut solo, &kvs[i % 2], 1).unwrap();
        assert_eq!(rows[i].output(), solo[0].output(), "row {i}");
    }
}

#[test]
fn noise_drawn_during_device_calls_changes_nothing() {
    // Guided and not, with and without Back&Refine, at different stride counts, so that
    // rows re-noise, restart and finish in the same steps.
    let ps = [
        params(5, 1.0, false),
        params(6, 0.0, true),
        params(4, 1.0, true),
        params(9, 0.0, false),
    ];
    let kvs = [image_kv(0.2), image_kv(-0.1)];
    let run = |waits: bool| {
        let mut rows: Vec<Row> = (0..12)
            .map(|i| new_row(&ps[i % 4], 50 + i as u64))
            .collect();
        let mut den = FakeDenoiser::new();
        den.waits = waits;
        run_all(&mut den, &mut rows, &kvs, 5);
        rows.into_iter()
            .map(|mut r| (r.take_trace(), r.into_output()))
            .collect::<Vec<_>>()
    };
    let (plain, prefetched) = (run(false), run(true));
    assert!(
        plain
            .iter()
            .any(|(trace, _)| trace.iter().any(|s| s.refined))
    );
    assert_eq!(plain, prefetched);
}

#[test]
fn a_prefetched_draw_that_ran_out_fails_where_the_draw_would_have() {
    // Recorded noise for the first x and one re-noise, for a 3-step row: the second
    // re-noise runs out, prefetched or not.
    let mut p = params(3, 0.0, false);
    p.self_conditioning = false;
    for waits in [false, true] {
        let draws = vec![vec![0.5; L * D], vec![0.25; L * D]];
        let sched = Arc::new(Schedule::linear(1e-4, 0.02, T));
        let mut row = Row::new(
            p.clone(),
            sched,
            (L, D),
            Box::new(crate::sampler::RecordedNoise::new(draws)),
            false,
        )
        .unwrap();
        let kv = image_kv(0.0);
        let mut den = FakeDenoiser::new();
        den.waits = waits;
        let kv_ref = KvRef::Image(&kv);
        let mut first = vec![ActiveRow {
            row: &mut row,
            kv: kv_ref,
        }];
        step(&mut den, &mut first, 4).expect("first re-noise has its draw");
        let mut second = vec![ActiveRow {
            row: &mut row,
            kv: kv_ref,
        }];
        let err = step(&mut den, &mut second, 4).expect_err("no draw left");
        assert!(matches!(err, StepError::Noise(_)), "waits = {waits}");
    }
}

/// A finished row's trace and output.
type Finished = (Vec<TraceStep>, Option<RowOutput>);

/// Rows of every kind, staggered, through `den`: their traces, outputs and snapshots.
fn mixed_run(
    den: &mut FakeDenoiser,
    max_rows: usize,
    trace: bool,
) -> (Vec<Finished>, Vec<Snapshot>) {
    let ps = [
        params(5, 1.0, false),
        params(6, 0.0, true),
        params(4, 1.0, true),
        params(9, 0.0, false),
    ];
    let mut no_self_cond = params(7, 1.0, true);
    no_self_cond.self_conditioning = false;
    let kvs = [image_kv(0.2), image_kv(-0.1)];
    let sched = Arc::new(Schedule::linear(1e-4, 0.02, T));
    let mut rows: Vec<Row> = (0..13)
        .map(|i| {
            let p = if i == 12 { &no_self_cond } else { &ps[i % 4] };
            let noise = Box::new(SeededNoise::new(50 + i as u64, 0));
            Row::new(p.clone(), sched.clone(), (L, D), noise, trace).unwrap()
        })
        .collect();
    let mut snapshots = Vec::new();
    let mut tick = 0;
    while rows.iter().any(|r| r.need() != Need::Done) {
        // Rows 8.. join three ticks late; row 3 is streamed.
        let mut observe = Vec::new();
        let mut active: Vec<ActiveRow<'_>> = Vec::new();
        for (i, row) in rows.iter_mut().enumerate() {
            if row.need() != Need::Done && (i < 8 || tick >= 3) {
                observe.push(i == 3);
                active.push(ActiveRow {
                    row,
                    kv: KvRef::Image(&kvs[i % 2]),
                });
            }
        }
        let (_, snaps) = step_observed(den, &mut active, max_rows, &observe).unwrap();
        snapshots.extend(snaps.into_iter().map(|s| Snapshot { row: 0, ..s }));
        tick += 1;
    }
    let rows = rows
        .into_iter()
        .map(|mut r| (r.take_trace(), r.into_output()))
        .collect();
    (rows, snapshots)
}

#[test]
fn the_loop_on_the_device_gives_the_host_loops_results() {
    for (max_rows, waits) in [(64, false), (5, true), (2, false)] {
        let (want, want_snapshots) = mixed_run(&mut FakeDenoiser::new(), max_rows, true);
        assert!(
            want.iter()
                .any(|(trace, _)| trace.iter().any(|s| s.refined))
        );
        let mut den = FakeDenoiser::on_device(20);
        den.waits = waits;
        let (got, snapshots) = mixed_run(&mut den, max_rows, true);
        assert_eq!(got, want, "max_rows {max_rows}");
        assert_eq!(snapshots, want_snapshots, "max_rows {max_rows}");
        let pool = den.state.as_ref().unwrap();
        assert_eq!(
            pool.slots.held(),
            0,
            "every finished row gave its slot back"
        );
    }
}

#[test]
fn the_device_sends_back_only_the_x0_the_host_needs() {
    let mut den = FakeDenoiser::on_device(20);
    let (rows, snapshots) = mixed_run(&mut den, 64, false);
    let pool = den.state.as_ref().unwrap();
    // Each row's final x0, each Back&Refine restart's, and the streamed row's every step.
    let restarts = 2 * 3 + 2 * 3 + 2; // rows 1, 5, 9 (6 steps) and 2, 6, 10 (4 steps): 2 rounds each; row 12: 2
    let streamed_row_iterations = snapshots.len();
    assert_eq!(streamed_row_iterations, 9);
    assert_eq!(
        pool.x0_sent_back,
        rows.len() + restarts + streamed_row_iterations - 1
    );
    // States went over once per row and once per restart, not per step.
    assert_eq!(pool.states_received, rows.len() + restarts);
}
