//! The LaDiC denoising loop (docs/bundle.md), in pure Rust over a [`Denoiser`] trait
//! so it is testable without ONNX Runtime.
//!
//! Each caption candidate is a [`Row`]: a small state machine that says which model
//! call it needs next. [`step`] gathers those needs from any set of rows, whatever
//! requests they belong to and whatever timestep they are at, into one batched
//! denoiser call and one batched decoder call. That is what lets the scheduler do
//! iteration-level batching.

pub mod device;
pub mod mbr;
pub mod noise;
mod row;
pub mod schedule;

use std::sync::Arc;

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};

pub use device::{DeviceLoop, DeviceRow, DeviceStep, StateSlot, StateSlots};
pub use noise::{NoiseExhausted, NoiseSource, RecordedNoise, SeededNoise};
pub use row::{Need, Row, RowOutput, Update};
pub use schedule::Schedule;

use crate::bundle::{BackRefineSpec, Manifest};
use crate::kv_pool::ResidentKv;

/// The most iterations, the largest guidance weight and the most candidates a caption
/// may use, whether a request asks for them or a bundle sets them as defaults; wider
/// values only cost time without helping captions.
pub const MAX_STEPS: usize = 100;
pub const MAX_GUIDANCE: f64 = 10.0;
pub const MAX_CANDIDATES: usize = 8;

/// Back&Refine settings; `rounds = 0` or `enabled = false` turns it off.
pub type BackRefine = BackRefineSpec;

/// Everything that decides one candidate's trajectory besides its noise and image.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerParams {
    pub steps: usize,
    /// CFG weight w: `x0 = (1+w) cond - w uncond`. Kept as f64 and rounded where the
    /// Python reference rounds, so parity holds to the last bit where it can.
    pub guidance: f64,
    pub time_shift: usize,
    pub renoise_scale: f64,
    pub self_conditioning: bool,
    pub back_refine: BackRefine,
    pub candidates: usize,
}

impl SamplerParams {
    /// Whether a candidate runs the unconditional pass too (guidance not 0).
    pub fn guided(&self) -> bool {
        self.guidance != 0.0
    }

    /// Denoiser rows one candidate takes per call: 2 with guidance (conditional and
    /// unconditional), else 1.
    pub fn denoiser_rows_per_candidate(&self) -> usize {
        if self.guided() { 2 } else { 1 }
    }

    /// The bundle's defaults.
    pub fn defaults(m: &Manifest) -> SamplerParams {
        SamplerParams {
            steps: m.sampler.steps,
            guidance: m.sampler.guidance,
            time_shift: m.sampler.time_shift,
            renoise_scale: m.sampler.renoise_scale,
            self_conditioning: m.sampler.self_conditioning,
            back_refine: m.back_refine.clone(),
            candidates: m.mbr.candidates,
        }
    }

    pub fn back_refine_rounds(&self) -> usize {
        if self.back_refine.enabled {
            self.back_refine.rounds
        } else {
            0
        }
    }
}

/// One iteration of one row, recorded for parity tests.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    pub t: i64,
    pub t_in: i64,
    pub x0: Array2<f32>,
    pub refined: bool,
}

/// The image K/V a denoiser row attends to: a request's image, or the unconditional
/// K/V the denoiser implementation computed once at load.
#[derive(Debug, Clone, Copy)]
pub enum KvRef<'a> {
    /// An image's K/V in host memory, shared by its rows (the `Arc` identifies it
    /// across calls).
    Image(&'a Arc<Array3<f32>>),
    /// An image's K/V that the encoder wrote into the denoiser's resident pool.
    Resident(&'a ResidentKv),
    Null,
}

/// One image's encoded K/V, as a request holds it while its rows run.
#[derive(Debug, Clone)]
pub enum ImageKv {
    /// In host memory.
    Host(Arc<Array3<f32>>),
    /// Only in a slot of the worker's resident K/V pool (on the GPU with CUDA); the slot
    /// is freed when the last clone is dropped.
    Resident(Arc<ResidentKv>),
}

impl ImageKv {
    pub fn as_kv_ref(&self) -> KvRef<'_> {
        match self {
            ImageKv::Host(a) => KvRef::Image(a),
            ImageKv::Resident(r) => KvRef::Resident(r),
        }
    }
}

/// The two model calls the loop needs, batched over rows.
pub trait Denoiser {
    type Error;

    /// `x0` predictions for `x [B,L,D]`, `self_cond [B,L,D]`, one timestep and one K/V
    /// per row.
    fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, Self::Error>;

    /// Token ids and per-token confidence `[B,L]` for `x0 [B,L,D]`.
    fn decode(&mut self, x0: ArrayView3<f32>) -> Result<(Array2<i64>, Array2<f32>), Self::Error>;

    /// A denoiser call mostly waits for another device (a GPU) while the host's cores
    /// are idle: the sampler then draws the rows' next noise during the call.
    fn waits_on_device(&self) -> bool {
        false
    }

    /// The denoiser keeps the rows' state on its device ([`device`]): then the sampler
    /// steps through this instead of [`denoise`](Self::denoise).
    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop<Error = Self::Error>> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError<E> {
    #[error(transparent)]
    Model(E),
    #[error(transparent)]
    Noise(#[from] NoiseExhausted),
    #[error("rows of one batch have different latent shapes")]
    Shape,
    #[error(
        "the device loop gave back {got} results for {rows} rows, or no x0 for a row that needs it"
    )]
    DeviceOutput { rows: usize, got: usize },
}

/// Latent elements (rows x tokens x dims) of one denoiser step from which the rows'
/// updates run on all cores (rayon): about 8 full-size rows, or 50 of the tiny model's.
/// Below it a thread hand-off costs more than it saves.
pub const PARALLEL_HOST_ELEMENTS: usize = 1 << 17;

thread_local! {
    /// x_t and self_cond of the denoiser call being assembled, reused across steps.
    static INPUT_BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

static PARALLEL_HOST_THRESHOLD: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(PARALLEL_HOST_ELEMENTS);

/// Changes [`PARALLEL_HOST_ELEMENTS`] for the whole process (`usize::MAX`: never in
/// parallel); for benchmarks that compare the two.
pub fn set_parallel_host_threshold(elements: usize) {
    PARALLEL_HOST_THRESHOLD.store(elements, std::sync::atomic::Ordering::Relaxed);
}

/// Whether host work over `elements` latent elements (the rows' updates, stacking
/// their inputs, writing a denoiser call's buffers) is split over the cores.
pub(crate) fn runs_in_parallel(elements: usize) -> bool {
    elements >= PARALLEL_HOST_THRESHOLD.load(std::sync::atomic::Ordering::Relaxed)
}

/// The threads that draw noise during device calls (one per core).
fn prefetch_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("noise-{i}"))
            .build()
            .expect("a thread pool for noise draws starts")
    })
}

/// Runs `call` (a model call that waits on a device) while the rows' next noise is
/// drawn on the cores the host leaves idle. On a pool of its own: on the global one the
/// draws would queue ahead of the call's own parallel work (writing its inputs) and hold
/// up the device.
fn drawing_noise_during<R>(rows: &mut [ActiveRow<'_>], call: impl FnOnce() -> R) -> R {
    prefetch_pool().in_place_scope(|s| {
        s.spawn(|_| {
            use rayon::prelude::*;
            rows.par_iter_mut().for_each(|r| r.row.prefetch_noise());
        });
        call()
    })
}

/// Writes `parts` one after the other into `buffer` (`row` elements each, as long as
/// all of them), split over the cores when `parallel`.
fn stack_rows<'a>(
    buffer: &mut [f32],
    parts: impl Iterator<Item = ArrayView2<'a, f32>>,
    row: usize,
    parallel: bool,
) {
    let copy = |(dst, part): (&mut [f32], ArrayView2<'_, f32>)| match part.as_slice() {
        Some(slice) => dst.copy_from_slice(slice),
        None => dst.iter_mut().zip(part.iter()).for_each(|(d, &v)| *d = v),
    };
    if row == 0 {
        return;
    }
    if parallel {
        use rayon::prelude::*;
        let parts: Vec<ArrayView2<'_, f32>> = parts.collect();
        buffer
            .par_chunks_mut(row)
            .zip(parts.into_par_iter())
            .for_each(copy);
    } else {
        buffer.chunks_mut(row).zip(parts).for_each(copy);
    }
}

/// A row together with the image K/V its conditional pass uses.
pub struct ActiveRow<'a> {
    pub row: &'a mut Row,
    pub kv: KvRef<'a>,
}

/// What one [`step`] ran, for metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepStats {
    /// Rows of each denoiser call made.
    pub denoiser_calls: Vec<usize>,
    /// Rows of each decoder call made.
    pub decoder_calls: Vec<usize>,
}

/// Advances every row by one model call: one denoiser pass over all rows that need
/// one (cond and uncond rows together), then one decoder pass over all rows that
/// need confidences or their final tokens. Calls are split to at most `max_rows`.
pub fn step<D: Denoiser>(
    denoiser: &mut D,
    rows: &mut [ActiveRow<'_>],
    max_rows: usize,
) -> Result<StepStats, StepError<D::Error>> {
    step_observed(denoiser, rows, max_rows, &[]).map(|(stats, _)| stats)
}

/// The decoder's reading of one row's `x0` estimate after an iteration, for streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Index of the row in the `rows` given to [`step_observed`].
    pub row: usize,
    /// 0-based iteration of the row (Back&Refine restarts keep counting).
    pub iteration: usize,
    /// The timestep the iteration denoised from.
    pub t: usize,
    /// This iteration triggered a Back&Refine restart.
    pub refine: bool,
    pub ids: Vec<i64>,
    pub confidence: Vec<f32>,
}

/// [`step`], and for every row `i` with `observe[i]` that was denoised, a
/// [`Snapshot`] of its new `x0`. The extra decoder rows go into the same decoder
/// calls as the rows that need confidences or final tokens (which are not decoded
/// twice), and leave the rows' trajectories untouched.
pub fn step_observed<D: Denoiser>(
    denoiser: &mut D,
    rows: &mut [ActiveRow<'_>],
    max_rows: usize,
    observe: &[bool],
) -> Result<(StepStats, Vec<Snapshot>), StepError<D::Error>> {
    let max_rows = max_rows.max(1);
    let mut stats = StepStats::default();
    // (iteration, t, refine) of the rows to snapshot, once denoised.
    let mut observed: Vec<Option<(usize, usize, bool)>> = vec![None; rows.len()];
    if denoiser.device_loop().is_some() {
        denoise_on_device(denoiser, rows, max_rows, observe, &mut stats, &mut observed)?;
    } else {
        denoise_on_host(denoiser, rows, max_rows, observe, &mut stats, &mut observed)?;
    }
    let snapshots = decode_rows(denoiser, rows, max_rows, &mut stats, &observed)?;
    Ok((stats, snapshots))
}

/// The denoiser pass of [`step_observed`] with the rows' arrays on the host.
fn denoise_on_host<D: Denoiser>(
    denoiser: &mut D,
    rows: &mut [ActiveRow<'_>],
    max_rows: usize,
    observe: &[bool],
    stats: &mut StepStats,
    observed: &mut [Option<(usize, usize, bool)>],
) -> Result<(), StepError<D::Error>> {
    // (row index, unconditional?) for every denoiser row.
    let mut entries: Vec<(usize, bool, i64)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if let Need::Denoise { t_in } = r.row.need() {
            entries.push((i, false, t_in));
            if r.row.guided() {
                entries.push((i, true, t_in));
            }
        }
    }
    if !entries.is_empty() {
        // Each call's x0, and where entry k's row of it is: (call, row in the call).
        let mut outputs: Vec<Array3<f32>> = Vec::new();
        let mut at: Vec<(usize, usize)> = Vec::with_capacity(entries.len());
        let (l, d) = rows[entries[0].0].row.x().dim();
        let overlap = denoiser.waits_on_device();
        let mut first_call = true;
        for chunk in entries.chunks(max_rows) {
            let shape = (chunk.len(), l, d);
            // The batch's x_t and self_cond, gathered into buffers kept from the last
            // step: fresh multi-megabyte allocations cost more than the copies.
            let mut parts: Vec<(ArrayView2<'_, f32>, ArrayView2<'_, f32>)> =
                Vec::with_capacity(chunk.len());
            for &(i, _, _) in chunk {
                let row = &rows[i].row;
                if row.x().dim() != (l, d) || row.self_cond().dim() != (l, d) {
                    return Err(StepError::Shape);
                }
                parts.push((row.x(), row.self_cond()));
            }
            let parallel = runs_in_parallel(chunk.len().saturating_mul(l * d));
            let (x, sc) = INPUT_BUFFERS.with_borrow_mut(|(xb, sb)| {
                // Every element is written below, so only growth needs filling.
                xb.resize(chunk.len() * l * d, 0.0);
                sb.resize(chunk.len() * l * d, 0.0);
                stack_rows(xb, parts.iter().map(|p| p.0), l * d, parallel);
                stack_rows(sb, parts.iter().map(|p| p.1), l * d, parallel);
                (std::mem::take(xb), std::mem::take(sb))
            });
            let t: Vec<i64> = chunk.iter().map(|&(_, _, t)| t).collect();
            let kv: Vec<KvRef<'_>> = chunk
                .iter()
                .map(
                    |&(i, uncond, _)| {
                        if uncond { KvRef::Null } else { rows[i].kv }
                    },
                )
                .collect();
            let x_view = ArrayView3::from_shape(shape, &x).map_err(|_| StepError::Shape)?;
            let sc_view = ArrayView3::from_shape(shape, &sc).map_err(|_| StepError::Shape)?;
            let x0 = if overlap && first_call {
                drawing_noise_during(rows, || denoiser.denoise(x_view, sc_view, &t, &kv))
            } else {
                denoiser.denoise(x_view, sc_view, &t, &kv)
            };
            first_call = false;
            INPUT_BUFFERS.with_borrow_mut(|buffers| *buffers = (x, sc));
            let x0 = x0.map_err(StepError::Model)?;
            stats.denoiser_calls.push(chunk.len());
            at.extend((0..chunk.len()).map(|r| (outputs.len(), r)));
            outputs.push(x0);
        }
        let x0_of = |k: usize| outputs[at[k].0].index_axis(Axis(0), at[k].1);
        // Per row: its conditional entry and its unconditional one, if guided.
        let mut pairs: Vec<Option<(usize, Option<usize>)>> = vec![None; rows.len()];
        let mut k = 0;
        while k < entries.len() {
            let (i, _, _) = entries[k];
            let uncond = match entries.get(k + 1) {
                Some(&(j, true, _)) if j == i => Some(k + 1),
                _ => None,
            };
            pairs[i] = Some((k, uncond));
            k += if uncond.is_some() { 2 } else { 1 };
        }
        let t_before: Vec<usize> = rows.iter().map(|r| r.row.t()).collect();
        // The x0 update and the next noise draw, row by row: independent (each row has
        // its own noise stream), so large batches spread them over the cores.
        let apply = |(r, pair): (&mut ActiveRow<'_>, &Option<(usize, Option<usize>)>)| match pair {
            Some((cond, uncond)) => r.row.apply_denoised(x0_of(*cond), uncond.map(x0_of)),
            None => Ok(()),
        };
        if runs_in_parallel(entries.len().saturating_mul(l * d)) {
            use rayon::prelude::*;
            rows.par_iter_mut()
                .zip(pairs.par_iter())
                .try_for_each(apply)?;
        } else {
            rows.iter_mut().zip(pairs.iter()).try_for_each(apply)?;
        }
        for (i, pair) in pairs.iter().enumerate() {
            if pair.is_some() && observe.get(i).copied().unwrap_or(false) {
                let row = &rows[i].row;
                let refine = row.need() == Need::Confidence;
                observed[i] = Some((row.iterations().saturating_sub(1), t_before[i], refine));
            }
        }
    }

    Ok(())
}

/// The denoiser pass of [`step_observed`] with the rows' state on the device
/// ([`device`]): each row's bookkeeping moves on here, its arrays there. Unlike the host
/// path, a failed call leaves its rows advanced (see [`DeviceLoop::step`]).
fn denoise_on_device<D: Denoiser>(
    denoiser: &mut D,
    rows: &mut [ActiveRow<'_>],
    max_rows: usize,
    observe: &[bool],
    stats: &mut StepStats,
    observed: &mut [Option<(usize, usize, bool)>],
) -> Result<(), StepError<D::Error>> {
    let pending: Vec<usize> = (0..rows.len())
        .filter(|&i| matches!(rows[i].row.need(), Need::Denoise { .. }))
        .collect();
    let Some(&first) = pending.first() else {
        return Ok(());
    };
    let shape = rows[first].row.x().dim();
    if pending.iter().any(|&i| rows[i].row.x().dim() != shape) {
        return Err(StepError::Shape);
    }
    let overlap = denoiser.waits_on_device();
    let mut start = 0;
    while start < pending.len() {
        // As many rows as fit `max_rows` denoiser rows; a guided pair is never split.
        let (mut end, mut used) = (start, 0);
        while let Some(&i) = pending.get(end) {
            let more = rows[i].row.denoiser_rows();
            if used > 0 && used + more > max_rows {
                break;
            }
            used += more;
            end += 1;
        }
        let chunk = &pending[start..end];
        let mut calls = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let kv = rows[i].kv;
            let row = &mut *rows[i].row;
            let Need::Denoise { t_in } = row.need() else {
                unreachable!("only rows waiting for a denoiser pass are pending")
            };
            let t_before = row.t();
            let (send_x, send_self_cond) = row.take_arrays_to_send();
            let Some(mut update) = row.advance(row.guided())? else {
                unreachable!("the row waits for a denoiser pass")
            };
            if observe.get(i).copied().unwrap_or(false) {
                update.needs_x0 = true;
                let refine = row.need() == Need::Confidence;
                observed[i] = Some((row.iterations() - 1, t_before, refine));
            }
            calls.push(DeviceRow {
                slot: row.device_slot(),
                send_x,
                send_self_cond,
                t_in,
                kv,
                update,
            });
        }
        let needs_x0: Vec<bool> = calls.iter().map(|c| c.update.needs_x0).collect();
        let device = denoiser
            .device_loop()
            .expect("the caller checked that the denoiser has a device loop");
        let out = if overlap && start == 0 {
            drawing_noise_during(rows, || device.step(calls))
        } else {
            device.step(calls)
        };
        let mut out = out.map_err(StepError::Model)?;
        let got = out.new_slots.len().min(out.x0.len());
        if got != chunk.len() {
            return Err(StepError::DeviceOutput {
                rows: chunk.len(),
                got,
            });
        }
        for (k, &i) in chunk.iter().enumerate() {
            let row = &mut *rows[i].row;
            if let Some(slot) = out.new_slots.get_mut(k).and_then(Option::take) {
                row.set_device_slot(slot);
            }
            match out.x0.get_mut(k).and_then(Option::take) {
                Some(x0) => row.take_device_x0(x0),
                None if needs_x0[k] => {
                    return Err(StepError::DeviceOutput {
                        rows: chunk.len(),
                        got,
                    });
                }
                None => {}
            }
        }
        stats.denoiser_calls.push(used);
        start = end;
    }
    Ok(())
}

/// The decoder pass of [`step_observed`]: confidences, final tokens and snapshots.
fn decode_rows<D: Denoiser>(
    denoiser: &mut D,
    rows: &mut [ActiveRow<'_>],
    max_rows: usize,
    stats: &mut StepStats,
    observed: &[Option<(usize, usize, bool)>],
) -> Result<Vec<Snapshot>, StepError<D::Error>> {
    let decode: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|&(i, r)| {
            observed[i].is_some() || matches!(r.row.need(), Need::Confidence | Need::Decode)
        })
        .map(|(i, _)| i)
        .collect();
    let mut snapshots = Vec::new();
    for chunk in decode.chunks(max_rows) {
        let views: Vec<_> = chunk.iter().map(|&i| rows[i].row.x0()).collect();
        let x0 = ndarray::stack(Axis(0), &views).map_err(|_| StepError::Shape)?;
        let (ids, conf) = denoiser.decode(x0.view()).map_err(StepError::Model)?;
        stats.decoder_calls.push(chunk.len());
        for (b, &i) in chunk.iter().enumerate() {
            if let Some((iteration, t, refine)) = observed[i] {
                snapshots.push(Snapshot {
                    row: i,
                    iteration,
                    t,
                    refine,
                    ids: ids.row(b).to_vec(),
                    confidence: conf.row(b).to_vec(),
                });
            }
            let row = &mut rows[i].row;
            match row.need() {
                Need::Confidence => row.apply_confidence(conf.row(b))?,
                Need::Decode => row.apply_decoded(ids.row(b), conf.row(b)),
                _ => {}
            }
        }
    }
    Ok(snapshots)
}

/// The number of iterations (denoiser passes per row) `params` takes with `schedule`,
/// Back&Refine restarts included: the loop of docs/bundle.md without the models.
pub fn planned_iterations(params: &SamplerParams, schedule: &Schedule) -> usize {
    let last = schedule.num_timesteps() - 1;
    let stride = schedule.stride(params.steps);
    let mut t = last;
    let mut rounds_left = params.back_refine_rounds();
    let mut n = 0;
    loop {
        n += 1;
        if rounds_left > 0 && t <= params.back_refine.trigger_t && t > stride {
            t = last;
            rounds_left -= 1;
            continue;
        }
        if t <= stride {
            return n;
        }
        t -= stride;
    }
}

/// Runs rows that share one image to completion, on one thread and without a queue
/// (tests and the micro-benchmarks; the server and the `caption` command go through the
/// scheduler, which calls [`step`] itself).
pub fn run_to_completion<D: Denoiser>(
    denoiser: &mut D,
    rows: &mut [Row],
    kv: &Arc<Array3<f32>>,
    max_rows: usize,
) -> Result<(), StepError<D::Error>> {
    loop {
        let mut active: Vec<ActiveRow<'_>> = rows
            .iter_mut()
            .filter(|r| r.need() != Need::Done)
            .map(|row| ActiveRow {
                row,
                kv: KvRef::Image(kv),
            })
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        step(denoiser, &mut active, max_rows)?;
    }
}

#[cfg(test)]
mod tests;
