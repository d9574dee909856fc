//! The rows' state on the denoiser's device (`--device-loop`): the ONNX Runtime side of
//! [`crate::sampler::device`].
//!
//! Each worker keeps `x_t` and `self_cond` of its rows in two *state pools*
//! (`[slots, L, D]` each) in the denoiser's memory, one slot per row; slot 0 is a
//! scratch slot that the padding rows of a bucket read and write. A step is three
//! graph runs on the bucket of the call's row count, all on buffers bound once:
//! 1. `state_gather` (embedded, from `models/ladic/device_loop.py`) writes the
//!    denoiser bucket's inputs: each denoiser row's `x_t` and `self_cond`, read from
//!    the pools by slot, and its `t` and `kv_index`;
//! 2. the denoiser ([`FixedShapeCalls::run_written`]);
//! 3. `state_update` combines each row's guided pair, re-noises it with the noise the
//!    host sent, and writes the new `x_t` and `self_cond` into the pools' *other* copy
//!    (a graph cannot update its input in place), which the next step reads.
//!
//! Before the three runs the host sends three buffers: every per-row number of the
//! step packed into `indices` (int64) and `coefficients` (float32), and the noise of
//! the rows that re-noise. After them only the `x0` rows the host asked for come back.
//! With CUDA graphs each of the three runs is a captured graph per bucket (and per pool
//! copy for 1 and 3), so a step is a handful of launches and small copies.

use std::collections::BTreeMap;

use ndarray::Array2;
use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::Tensor;

use crate::call_layout::HalfLayout;
use crate::device_copy::HostBuffer;
use crate::fixed_shapes::{BucketTensor, Buffer, FixedShapeCalls, Transfer, bucket_rows};
use crate::sampler::{DeviceRow, DeviceStep, StateSlots};

/// The gather graph: the denoiser's inputs, `x_t` and `self_cond` of each denoiser row
/// from the pools, and `t` and `kv_index` from the step's `indices`.
pub const GATHER_GRAPH: &[u8] = include_bytes!("graphs/state_gather.onnx");
/// The update graph: each row's x0, new `x_t` and `self_cond`, into the pools' next copy.
pub const UPDATE_GRAPH: &[u8] = include_bytes!("graphs/state_update.onnx");

/// Columns of the graphs' `indices` input (models/ladic/device_loop.py): per denoiser
/// row its state slot, timestep and K/V slot; per candidate its conditional and
/// unconditional rows of the denoiser's output, whether self_cond keeps x0, its slot.
const STATE_ROW: usize = 0;
const T: usize = 1;
const KV_INDEX: usize = 2;
const COND_ROW: usize = 3;
const UNCOND_ROW: usize = 4;
const KEEP_SELF_COND: usize = 5;
const STATE_SLOT: usize = 6;
const INDEX_COLUMNS: usize = 7;
/// Columns of `coefficients`, per candidate: 1 + w, w, sqrt(ab), r sqrt(1 - ab).
const GUIDE_COND: usize = 0;
const GUIDE_UNCOND: usize = 1;
const RENOISE_X0: usize = 2;
const RENOISE_NOISE: usize = 3;
const COEFFICIENT_COLUMNS: usize = 4;

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLoopStats {
    /// Steps run (each a gather, a denoiser pass and an update).
    pub steps: u64,
    /// Rows' `x_t` or `self_cond` sent to the pools (new rows and restarts).
    pub states_sent: u64,
    /// Rows' `x0` read back.
    pub x0_read: u64,
    /// Slots of each state pool, the scratch slot included.
    pub slots: usize,
}

/// Which of a row's two states.
#[derive(Debug, Clone, Copy)]
enum State {
    X,
    SelfCond,
}

/// One run of a graph on bound buffers.
struct BoundRun {
    binding: IoBinding,
    options: RunOptions,
}

impl BoundRun {
    fn new(session: &Session, graph_id: Option<usize>) -> Result<BoundRun, String> {
        let mut options = RunOptions::new().map_err(|e| e.to_string())?;
        if let Some(id) = graph_id {
            options
                .set("gpu_graph_id", id.to_string())
                .map_err(|e| e.to_string())?;
        }
        Ok(BoundRun {
            binding: session.create_binding().map_err(|e| e.to_string())?,
            options,
        })
    }

    fn run(&self, session: &mut Session) -> Result<(), String> {
        session
            .run_binding_with_options(&self.binding, &self.options)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// The inputs and output of one bucket's gather and update, and their runs.
struct LoopBucket {
    /// `[rows, INDEX_COLUMNS]`.
    indices: Buffer<i64>,
    /// `[rows, COEFFICIENT_COLUMNS]`.
    coefficients: Buffer<f32>,
    noise: Buffer<f32>,
    x0: Buffer<f32>,
    /// By the pool copy read (0 and 1): gather from it, update from it into the other.
    gather: Vec<BoundRun>,
    update: Vec<BoundRun>,
}

/// A worker's state pools and the two graphs that read and write them.
pub struct DeviceLoopState {
    gather: Session,
    update: Session,
    latent: (usize, usize),
    x_pool: [Tensor<f32>; 2],
    self_cond_pool: [Tensor<f32>; 2],
    /// The pool copy the next step reads.
    current: usize,
    slots: StateSlots,
    /// One row, on its way to a pool on a GPU.
    staging: Option<HostBuffer<f32>>,
    buckets: BTreeMap<usize, LoopBucket>,
    /// The step's `indices` and `coefficients`, built here and reused.
    indices: Vec<i64>,
    coefficients: Vec<f32>,
    pub stats: DeviceLoopStats,
}

impl std::fmt::Debug for DeviceLoopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoopState")
            .field("latent", &self.latent)
            .field("stats", &self.stats)
            .finish()
    }
}

impl DeviceLoopState {
    /// State pools of `slots` slots (the scratch slot included) in `device`'s memory,
    /// and the gather and update runs of every bucket of `calls`, bound to them and to
    /// the buckets' denoiser buffers (`capture`: each run is a CUDA graph). Allocate
    /// before any capture in `device`'s memory (the denoiser's, [`FixedShapeCalls::allocate`]);
    /// then call [`run_first`](Self::run_first).
    pub fn new(
        gather: Session,
        update: Session,
        calls: &mut FixedShapeCalls,
        device: &Allocator,
        latent: (usize, usize),
        slots: usize,
        capture: bool,
    ) -> Result<DeviceLoopState, String> {
        let (l, d) = latent;
        let slots = slots.max(2);
        let pool = || Tensor::<f32>::new(device, [slots, l, d]).map_err(|e| e.to_string());
        let staging = match calls.transfer() {
            Transfer::InPlace => None,
            Transfer::Cuda(cuda) => Some(HostBuffer::new(cuda, l * d, 0.0)?),
        };
        let mut state = DeviceLoopState {
            gather,
            update,
            latent,
            x_pool: [pool()?, pool()?],
            self_cond_pool: [pool()?, pool()?],
            current: 0,
            slots: StateSlots::new(slots),
            staging,
            buckets: BTreeMap::new(),
            indices: Vec::new(),
            coefficients: Vec::new(),
            stats: DeviceLoopStats {
                slots,
                ..DeviceLoopStats::default()
            },
        };
        // Padding rows read the scratch slot 0 before any step writes it, so it starts as
        // zeros. Every other slot is written when a row takes it (the row's first x_t and
        // self_cond) before anything reads it.
        let zeros = Array2::<f32>::zeros(latent);
        for copy in 0..2 {
            state.write_slot(copy, 0, &zeros, State::X)?;
            state.write_slot(copy, 0, &zeros, State::SelfCond)?;
        }
        for rows in calls.bucket_sizes() {
            let bucket = state.new_bucket(calls, device, rows, capture)?;
            state.buckets.insert(rows, bucket);
        }
        Ok(state)
    }

    /// Runs the gather and the update of every bucket once from each pool copy (the
    /// captures, with CUDA graphs): after every buffer in the denoiser's memory is
    /// allocated, and after the denoiser's own first runs.
    pub fn run_first(&mut self, calls: &mut FixedShapeCalls) -> Result<(), String> {
        let start = std::time::Instant::now();
        for (&rows, bucket) in &self.buckets {
            calls.inputs_written_on_device(rows);
            for copy in 0..2 {
                bucket.gather[copy].run(&mut self.gather)?;
                bucket.update[copy].run(&mut self.update)?;
            }
        }
        tracing::info!(
            slots = self.stats.slots,
            buckets = self.buckets.len(),
            seconds = start.elapsed().as_secs_f64(),
            "rows' state kept on the denoiser's device (--device-loop)"
        );
        Ok(())
    }

    /// Checks, once at load, that each bucket's buffers are the ones its runs use: on a
    /// GPU a wrong binding or offset would otherwise only show as wrong captions. Per
    /// bucket, one step of a made-up row in the pools' last slot: the gather must copy
    /// that slot's `x_t` and `self_cond` into the denoiser's first row, the update must
    /// return the denoiser's first output as that row's `x0` (guidance weight 0) and
    /// write the noise it was sent as the row's next `x_t` (re-noise coefficients of 0
    /// for x0 and 1 for the noise) into the same slot of the other pool copy, and
    /// `self_cond` as zeros there. Run after [`run_first`](Self::run_first); it leaves
    /// no slot held.
    pub fn check_buckets(
        &mut self,
        calls: &mut FixedShapeCalls,
        denoiser: &mut Session,
    ) -> Result<(), String> {
        let (l, d) = self.latent;
        let row = l * d;
        let slot = self.stats.slots - 1;
        // Distinct values, exact in f32, so that a copy compares equal bit for bit.
        let pattern = |first: f32| {
            Array2::from_shape_fn((l, d), |(i, j)| first + (i * d + j) as f32 / 1024.0)
        };
        let (x, self_cond, noise) = (pattern(1.0), pattern(-2.0), pattern(3.0));
        let calls_stats = calls.stats;
        for rows in calls.bucket_sizes() {
            let copy = self.current;
            self.write_slot(copy, slot, &x, State::X)?;
            self.write_slot(copy, slot, &self_cond, State::SelfCond)?;
            let Some(bucket) = self.buckets.get_mut(&rows) else {
                return Err(format!(
                    "no gather and update for the bucket of {rows} rows"
                ));
            };
            let mut indices = [0i64; INDEX_COLUMNS];
            indices[STATE_ROW] = slot as i64;
            indices[STATE_SLOT] = slot as i64;
            let mut coefficients = [0f32; COEFFICIENT_COLUMNS];
            coefficients[GUIDE_COND] = 1.0;
            coefficients[RENOISE_NOISE] = 1.0;
            bucket.indices.upload(&indices, 0)?;
            bucket.coefficients.upload(&coefficients, 0.0)?;
            bucket
                .noise
                .upload(noise.as_slice().expect("standard layout"), 0.0)?;
            let wrong = |what: &str| {
                format!(
                    "device loop check, bucket of {rows} rows: {what} (a buffer bound at a \
                     wrong address?)"
                )
            };

            bucket.gather[copy].run(&mut self.gather)?;
            if calls.read_bucket(rows, BucketTensor::XT, row)? != x.as_slice().unwrap() {
                return Err(wrong("the gather did not copy the slot's x_t"));
            }
            if calls.read_bucket(rows, BucketTensor::SelfCond, row)?
                != self_cond.as_slice().unwrap()
            {
                return Err(wrong("the gather did not copy the slot's self_cond"));
            }
            calls.run_written(denoiser, rows)?;
            bucket.update[copy].run(&mut self.update)?;
            let denoised = calls.read_bucket(rows, BucketTensor::X0, row)?;
            if bucket.x0.download(row)? != denoised.as_slice() {
                return Err(wrong("the update's x0 is not the denoiser's output"));
            }
            // The next step reads the other copy: the row's new state must be there.
            bucket.gather[1 - copy].run(&mut self.gather)?;
            if calls.read_bucket(rows, BucketTensor::XT, row)? != noise.as_slice().unwrap() {
                return Err(wrong("the update did not write the next x_t into the slot"));
            }
            if calls
                .read_bucket(rows, BucketTensor::SelfCond, row)?
                .iter()
                .any(|&v| v != 0.0)
            {
                return Err(wrong("the update did not clear the slot's self_cond"));
            }
            self.current = 1 - copy;
        }
        // The check's calls are set-up, not calls.
        calls.stats = calls_stats;
        tracing::debug!(
            buckets = calls.bucket_sizes().len(),
            "device loop buffers checked"
        );
        Ok(())
    }

    fn new_bucket(
        &mut self,
        calls: &mut FixedShapeCalls,
        device: &Allocator,
        rows: usize,
        capture: bool,
    ) -> Result<LoopBucket, String> {
        let (l, d) = self.latent;
        let t = calls.transfer();
        let fail = |e: ort::Error| e.to_string();
        let inputs = calls
            .bucket_tensors(rows)
            .ok_or_else(|| format!("no denoiser bucket of {rows} rows"))?;
        let mut b = LoopBucket {
            indices: Buffer::new(device, t, &[rows, INDEX_COLUMNS])?,
            coefficients: Buffer::new(device, t, &[rows, COEFFICIENT_COLUMNS])?,
            noise: Buffer::new(device, t, &[rows, l, d])?,
            x0: Buffer::new(device, t, &[rows, l, d])?,
            gather: Vec::with_capacity(2),
            update: Vec::with_capacity(2),
        };
        // Every input starts written (zeros), so that the first runs read defined values.
        b.indices.upload(&[], 0)?;
        b.coefficients.upload(&[], 0.0)?;
        b.noise.upload(&[], 0.0)?;
        for copy in 0..2 {
            let graph_id = capture.then(|| 2 * rows.trailing_zeros() as usize + copy);
            let mut gather = BoundRun::new(&self.gather, graph_id)?;
            let g = &mut gather.binding;
            g.bind_input("x_pool", &self.x_pool[copy]).map_err(fail)?;
            g.bind_input("self_cond_pool", &self.self_cond_pool[copy])
                .map_err(fail)?;
            g.bind_input("indices", &b.indices.device).map_err(fail)?;
            g.bind_output("x_t", &mut *inputs.x_t).map_err(fail)?;
            g.bind_output("self_cond", &mut *inputs.self_cond)
                .map_err(fail)?;
            g.bind_output("t", &mut *inputs.t).map_err(fail)?;
            g.bind_output("kv_index", &mut *inputs.kv_index)
                .map_err(fail)?;
            b.gather.push(gather);

            let mut update = BoundRun::new(&self.update, graph_id)?;
            let u = &mut update.binding;
            u.bind_input("x_pool", &self.x_pool[copy]).map_err(fail)?;
            u.bind_input("self_cond_pool", &self.self_cond_pool[copy])
                .map_err(fail)?;
            u.bind_input("denoised", inputs.x0).map_err(fail)?;
            u.bind_input("indices", &b.indices.device).map_err(fail)?;
            u.bind_input("coefficients", &b.coefficients.device)
                .map_err(fail)?;
            u.bind_input("noise", &b.noise.device).map_err(fail)?;
            let other = 1 - copy;
            u.bind_output("x_pool_next", &mut self.x_pool[other])
                .map_err(fail)?;
            u.bind_output("self_cond_pool_next", &mut self.self_cond_pool[other])
                .map_err(fail)?;
            u.bind_output("x0", &mut b.x0.device).map_err(fail)?;
            b.update.push(update);
        }
        Ok(b)
    }

    /// Writes one row's `state` into its slot of a pool copy.
    fn write_slot(
        &mut self,
        copy: usize,
        slot: usize,
        values: &Array2<f32>,
        state: State,
    ) -> Result<(), String> {
        let (l, d) = self.latent;
        let row = l * d;
        if values.dim() != (l, d) || slot >= self.stats.slots {
            return Err(format!(
                "a state of shape {:?} for slot {slot}; the pool holds {} slots of [{l}, {d}]",
                values.dim(),
                self.stats.slots
            ));
        }
        let values = values.as_standard_layout();
        let values = values.as_slice().expect("standard layout is contiguous");
        let pool = match state {
            State::X => &mut self.x_pool[copy],
            State::SelfCond => &mut self.self_cond_pool[copy],
        };
        match &mut self.staging {
            None => {
                pool.extract_tensor_mut().1[slot * row..(slot + 1) * row].copy_from_slice(values);
                Ok(())
            }
            Some(staging) => {
                staging.values_mut().copy_from_slice(values);
                let cuda = staging.cuda();
                // A device address: offset, never dereferenced here.
                let at = pool
                    .data_ptr_mut()
                    .wrapping_byte_add(slot * row * std::mem::size_of::<f32>());
                // SAFETY: the pool is GPU memory of `slots * row` floats and `slot <
                // slots`, so the row at `slot` lies inside it.
                unsafe { cuda.upload(at, staging.values()) }
            }
        }
    }

    /// Slots held by rows now.
    pub fn slots_held(&self) -> usize {
        self.slots.held()
    }

    /// One step over `rows` (see the module docs). `kv_index`: the K/V slot of each
    /// denoiser row, in the order of the rows, a guided row's conditional pass first.
    /// `layout`: where those denoiser rows go in the batch, for a denoiser that reads
    /// its second half as unconditional; without one they are consecutive.
    pub fn step(
        &mut self,
        calls: &mut FixedShapeCalls,
        denoiser: &mut Session,
        rows: Vec<DeviceRow<'_>>,
        kv_index: &[i64],
        layout: Option<&HalfLayout>,
    ) -> Result<DeviceStep, String> {
        let (l, d) = self.latent;
        let (slot_of, new_slots) = self.slots.assign(&rows)?;
        let mut out = DeviceStep {
            new_slots,
            x0: Vec::new(),
        };
        for (row, &slot) in rows.iter().zip(&slot_of) {
            for (values, state) in [
                (&row.send_x, State::X),
                (&row.send_self_cond, State::SelfCond),
            ] {
                if let Some(values) = values {
                    self.write_slot(self.current, slot, values, state)?;
                    self.stats.states_sent += 1;
                }
            }
        }

        // Denoiser row n and candidate n share row n of `indices`; a call has at least as
        // many denoiser rows as candidates.
        let denoiser_rows: usize = rows.iter().map(DeviceRow::denoiser_rows).sum();
        if kv_index.len() != denoiser_rows {
            return Err(format!(
                "{} K/V slots for {denoiser_rows} denoiser rows",
                kv_index.len()
            ));
        }
        let batch_rows = match layout {
            Some(layout) if layout.positions.len() != denoiser_rows => {
                return Err(format!(
                    "a layout of {} rows for {denoiser_rows} denoiser rows",
                    layout.positions.len()
                ));
            }
            Some(layout) => layout.rows,
            None => denoiser_rows,
        };
        let position = |k: usize| layout.map_or(k, |layout| layout.positions[k]);
        let bucket_size = bucket_rows(batch_rows);
        let Some(bucket) = self.buckets.get_mut(&bucket_size) else {
            return Err(format!(
                "{denoiser_rows} rows in one denoiser call; the fixed shapes go up to {}",
                calls.max_rows()
            ));
        };
        let indices = &mut self.indices;
        indices.clear();
        indices.resize(batch_rows * INDEX_COLUMNS, 0);
        let coefficients = &mut self.coefficients;
        coefficients.clear();
        coefficients.resize(rows.len() * COEFFICIENT_COLUMNS, 0.0);
        let mut next = 0;
        for (n, (row, &slot)) in rows.iter().zip(&slot_of).enumerate() {
            let cond = position(next);
            for _ in 0..row.denoiser_rows() {
                let p = position(next);
                let at = &mut indices[p * INDEX_COLUMNS..(p + 1) * INDEX_COLUMNS];
                at[STATE_ROW] = slot as i64;
                at[T] = row.t_in;
                at[KV_INDEX] = kv_index[next];
                next += 1;
            }
            let at = &mut indices[n * INDEX_COLUMNS..(n + 1) * INDEX_COLUMNS];
            at[COND_ROW] = cond as i64;
            // An unguided row's w = 0 makes the update take x0 = cond.
            at[UNCOND_ROW] = position(next - 1) as i64;
            at[KEEP_SELF_COND] = i64::from(row.update.keep_self_cond);
            at[STATE_SLOT] = slot as i64;
            let at = &mut coefficients[n * COEFFICIENT_COLUMNS..(n + 1) * COEFFICIENT_COLUMNS];
            let (a, b) = row.update.guidance.unwrap_or((1.0, 0.0));
            at[GUIDE_COND] = a;
            at[GUIDE_UNCOND] = b;
            match &row.update.renoise {
                Some((a, b, eps)) if eps.dim() == (l, d) => {
                    at[RENOISE_X0] = *a;
                    at[RENOISE_NOISE] = *b;
                }
                Some((_, _, eps)) => return Err(format!("noise of shape {:?}", eps.dim())),
                // Coefficients 0: the row's noise (stale, but finite) is multiplied by 0.
                None => {}
            }
        }
        // Padding rows are all zeros: they read and write the scratch slot 0 with zero
        // coefficients, at t = 0 on the null K/V.
        bucket.indices.upload(indices, 0)?;
        bucket.coefficients.upload(coefficients, 0.0)?;
        // Each re-noised row's noise goes straight into the buffer the device reads;
        // other rows' (and the padding's) values are multiplied by 0 and stay as they were.
        let row_len = l * d;
        let renoised = rows.iter().filter(|r| r.update.renoise.is_some()).count();
        // On a row's last step there is none: then nothing is sent.
        let sent = if renoised == 0 { 0 } else { rows.len() };
        bucket.noise.write_prefix(sent * row_len, |noise| {
            for (row, target) in rows.iter().zip(noise.chunks_mut(row_len)) {
                if let Some((_, _, eps)) = &row.update.renoise {
                    match eps.as_slice() {
                        Some(values) => target.copy_from_slice(values),
                        None => target.iter_mut().zip(eps).for_each(|(t, &e)| *t = e),
                    }
                }
            }
        })?;
        let copy = self.current;
        bucket.gather[copy].run(&mut self.gather)?;
        calls.run_written(denoiser, batch_rows)?;
        calls.stats.padding_rows += (batch_rows - denoiser_rows) as u64;
        bucket.update[copy].run(&mut self.update)?;
        self.current = 1 - copy;
        self.stats.steps += 1;

        // Only the rows of x0 up to the last one asked for come back.
        let wanted = rows.iter().rposition(|r| r.update.needs_x0);
        out.x0 = vec![None; rows.len()];
        if let Some(last) = wanted {
            let x0 = bucket.x0.download((last + 1) * l * d)?;
            for (b, row) in rows.iter().enumerate().take(last + 1) {
                if row.update.needs_x0 {
                    let values = x0[b * l * d..(b + 1) * l * d].to_vec();
                    out.x0[b] =
                        Some(Array2::from_shape_vec((l, d), values).map_err(|e| e.to_string())?);
                    self.stats.x0_read += 1;
                }
            }
        }
        Ok(out)
    }
}
