//! The rows' state on the denoiser's device (`--device-loop`): the ONNX Runtime side of
//! [`crate::sampler::device`].
//!
//! Each worker keeps `x_t` and `self_cond` of its rows in two *state pools*
//! (`[slots, L, D]` each) in the denoiser's memory, one slot per row; slot 0 is a
//! scratch slot that the padding rows of a bucket read and write. A step is three
//! graph runs on the bucket of the call's row count, all on buffers bound once:
//! 1. `state_gather` (embedded, from `models/ladic/device_loop.py`) writes each
//!    denoiser row's `x_t` and `self_cond`, read from the pools by slot, into the
//!    denoiser bucket's input buffers;
//! 2. the denoiser ([`FixedShapeCalls::run_written`]): only `t` and `kv_index` are sent;
//! 3. `state_update` combines each row's guided pair, re-noises it with the noise the
//!    host sent, and writes the new `x_t` and `self_cond` into the pools' *other* copy
//!    (a graph cannot update its input in place), which the next step reads.
//!
//! Then only the `x0` rows the host asked for come back. With CUDA graphs each of the
//! three runs is a captured graph per bucket (and per pool copy for 1 and 3), so a step
//! is a handful of launches and small copies.

use std::collections::BTreeMap;

use ndarray::Array2;
use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::Tensor;

use crate::device_copy::HostBuffer;
use crate::fixed_shapes::{Buffer, FixedShapeCalls, Transfer, bucket_rows};
use crate::sampler::{DeviceRow, DeviceStep, StateSlots};

/// The gather graph: `x_t`, `self_cond` of each denoiser row from the pools.
pub const GATHER_GRAPH: &[u8] = include_bytes!("graphs/state_gather.onnx");
/// The update graph: each row's x0, new `x_t` and `self_cond`, into the pools' next copy.
pub const UPDATE_GRAPH: &[u8] = include_bytes!("graphs/state_update.onnx");

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

/// The update graph's inputs and output of one bucket, and its runs.
struct LoopBucket {
    state_row: Buffer<i64>,
    cond_row: Buffer<i64>,
    uncond_row: Buffer<i64>,
    guide_cond: Buffer<f32>,
    guide_uncond: Buffer<f32>,
    keep_self_cond: Buffer<i64>,
    renoise_x0: Buffer<f32>,
    renoise_noise: Buffer<f32>,
    noise: Buffer<f32>,
    state_slot: Buffer<i64>,
    x0: Buffer<f32>,
    /// By the pool copy read (0 and 1): gather from it, update from it into the other.
    gather: Vec<BoundRun>,
    update: Vec<BoundRun>,
}

/// The host-side inputs of one update, reused across steps.
#[derive(Default)]
struct UpdateInputs {
    state_row: Vec<i64>,
    cond_row: Vec<i64>,
    uncond_row: Vec<i64>,
    guide_cond: Vec<f32>,
    guide_uncond: Vec<f32>,
    keep_self_cond: Vec<i64>,
    renoise_x0: Vec<f32>,
    renoise_noise: Vec<f32>,
    state_slot: Vec<i64>,
    t: Vec<i64>,
}

/// A worker's state pools and the two graphs that read and write them.
pub struct DeviceLoopState {
    gather: Session,
    update: Session,
    transfer: Transfer,
    latent: (usize, usize),
    x_pool: [Tensor<f32>; 2],
    self_cond_pool: [Tensor<f32>; 2],
    /// The pool copy the next step reads.
    current: usize,
    slots: StateSlots,
    /// One row, on its way to a pool on a GPU.
    staging: Option<HostBuffer<f32>>,
    buckets: BTreeMap<usize, LoopBucket>,
    inputs: UpdateInputs,
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
        let transfer = calls.transfer();
        let staging = match transfer {
            Transfer::InPlace => None,
            Transfer::Cuda(cuda) => Some(HostBuffer::new(cuda, l * d, 0.0)?),
        };
        let mut state = DeviceLoopState {
            gather,
            update,
            transfer,
            latent,
            x_pool: [pool()?, pool()?],
            self_cond_pool: [pool()?, pool()?],
            current: 0,
            slots: StateSlots::new(slots),
            staging,
            buckets: BTreeMap::new(),
            inputs: UpdateInputs::default(),
            stats: DeviceLoopStats {
                slots,
                ..DeviceLoopStats::default()
            },
        };
        // The pools start as zeros: slot 0 is read by padding rows before any write.
        let zeros = Array2::<f32>::zeros(latent);
        for copy in 0..2 {
            for slot in 0..slots {
                state.write_slot(copy, slot, &zeros, State::X)?;
                state.write_slot(copy, slot, &zeros, State::SelfCond)?;
            }
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
    pub fn run_first(&mut self) -> Result<(), String> {
        let start = std::time::Instant::now();
        for bucket in self.buckets.values() {
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

    fn new_bucket(
        &mut self,
        calls: &mut FixedShapeCalls,
        device: &Allocator,
        rows: usize,
        capture: bool,
    ) -> Result<LoopBucket, String> {
        let (l, d) = self.latent;
        let t = self.transfer;
        let fail = |e: ort::Error| e.to_string();
        let per_row = [rows, 1, 1];
        let (x_t, self_cond, denoised) = calls
            .bucket_tensors(rows)
            .ok_or_else(|| format!("no denoiser bucket of {rows} rows"))?;
        let mut b = LoopBucket {
            state_row: Buffer::new(device, t, &[rows])?,
            cond_row: Buffer::new(device, t, &[rows])?,
            uncond_row: Buffer::new(device, t, &[rows])?,
            guide_cond: Buffer::new(device, t, &per_row)?,
            guide_uncond: Buffer::new(device, t, &per_row)?,
            keep_self_cond: Buffer::new(device, t, &per_row)?,
            renoise_x0: Buffer::new(device, t, &per_row)?,
            renoise_noise: Buffer::new(device, t, &per_row)?,
            noise: Buffer::new(device, t, &[rows, l, d])?,
            state_slot: Buffer::new(device, t, &[rows, 1])?,
            x0: Buffer::new(device, t, &[rows, l, d])?,
            gather: Vec::with_capacity(2),
            update: Vec::with_capacity(2),
        };
        // Every input starts written (zeros), so that the first runs read defined values.
        b.state_row.upload(&[], 0)?;
        b.cond_row.upload(&[], 0)?;
        b.uncond_row.upload(&[], 0)?;
        b.guide_cond.upload(&[], 0.0)?;
        b.guide_uncond.upload(&[], 0.0)?;
        b.keep_self_cond.upload(&[], 0)?;
        b.renoise_x0.upload(&[], 0.0)?;
        b.renoise_noise.upload(&[], 0.0)?;
        b.noise.upload(&[], 0.0)?;
        b.state_slot.upload(&[], 0)?;
        for copy in 0..2 {
            let graph_id = capture.then(|| 2 * rows.trailing_zeros() as usize + copy);
            let mut gather = BoundRun::new(&self.gather, graph_id)?;
            let g = &mut gather.binding;
            g.bind_input("x_pool", &self.x_pool[copy]).map_err(fail)?;
            g.bind_input("self_cond_pool", &self.self_cond_pool[copy])
                .map_err(fail)?;
            g.bind_input("state_row", &b.state_row.device)
                .map_err(fail)?;
            g.bind_output("x_t", &mut *x_t).map_err(fail)?;
            g.bind_output("self_cond", &mut *self_cond).map_err(fail)?;
            b.gather.push(gather);

            let mut update = BoundRun::new(&self.update, graph_id)?;
            let u = &mut update.binding;
            u.bind_input("x_pool", &self.x_pool[copy]).map_err(fail)?;
            u.bind_input("self_cond_pool", &self.self_cond_pool[copy])
                .map_err(fail)?;
            u.bind_input("denoised", denoised).map_err(fail)?;
            for (name, buffer) in [
                ("cond_row", &b.cond_row),
                ("uncond_row", &b.uncond_row),
                ("keep_self_cond", &b.keep_self_cond),
                ("state_slot", &b.state_slot),
            ] {
                u.bind_input(name, &buffer.device).map_err(fail)?;
            }
            for (name, buffer) in [
                ("guide_cond", &b.guide_cond),
                ("guide_uncond", &b.guide_uncond),
                ("renoise_x0", &b.renoise_x0),
                ("renoise_noise", &b.renoise_noise),
                ("noise", &b.noise),
            ] {
                u.bind_input(name, &buffer.device).map_err(fail)?;
            }
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
    pub fn step(
        &mut self,
        calls: &mut FixedShapeCalls,
        denoiser: &mut Session,
        rows: Vec<DeviceRow<'_>>,
        kv_index: &[i64],
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

        let inputs = &mut self.inputs;
        inputs.state_row.clear();
        inputs.t.clear();
        inputs.cond_row.clear();
        inputs.uncond_row.clear();
        inputs.guide_cond.clear();
        inputs.guide_uncond.clear();
        inputs.keep_self_cond.clear();
        inputs.renoise_x0.clear();
        inputs.renoise_noise.clear();
        inputs.state_slot.clear();
        for (row, &slot) in rows.iter().zip(&slot_of) {
            let cond = inputs.state_row.len() as i64;
            inputs.state_row.push(slot as i64);
            inputs.t.push(row.t_in);
            let (guide_cond, guide_uncond, uncond) = match row.update.guidance {
                Some((a, b)) => {
                    inputs.state_row.push(slot as i64);
                    inputs.t.push(row.t_in);
                    (a, b, cond + 1)
                }
                // guide_uncond = 0 marks the row as unguided: x0 = cond.
                None => (1.0, 0.0, cond),
            };
            inputs.cond_row.push(cond);
            inputs.uncond_row.push(uncond);
            inputs.guide_cond.push(guide_cond);
            inputs.guide_uncond.push(guide_uncond);
            inputs
                .keep_self_cond
                .push(i64::from(row.update.keep_self_cond));
            inputs.state_slot.push(slot as i64);
            let (a, b) = match &row.update.renoise {
                Some((a, b, eps)) if eps.dim() == (l, d) => (*a, *b),
                Some((_, _, eps)) => return Err(format!("noise of shape {:?}", eps.dim())),
                // Coefficients 0: the row's noise is not read (it is stale but finite).
                None => (0.0, 0.0),
            };
            inputs.renoise_x0.push(a);
            inputs.renoise_noise.push(b);
        }
        let denoiser_rows = inputs.state_row.len();
        if kv_index.len() != denoiser_rows {
            return Err(format!(
                "{} K/V slots for {denoiser_rows} denoiser rows",
                kv_index.len()
            ));
        }
        let bucket_size = bucket_rows(denoiser_rows);
        let Some(bucket) = self.buckets.get_mut(&bucket_size) else {
            return Err(format!(
                "{denoiser_rows} rows in one denoiser call; the fixed shapes go up to {}",
                calls.max_rows()
            ));
        };
        let copy = self.current;
        // Padding rows read and write the scratch slot 0, with zero coefficients.
        bucket.state_row.upload(&inputs.state_row, 0)?;
        bucket.gather[copy].run(&mut self.gather)?;
        calls.run_written(denoiser, denoiser_rows, &inputs.t, kv_index)?;
        bucket.cond_row.upload(&inputs.cond_row, 0)?;
        bucket.uncond_row.upload(&inputs.uncond_row, 0)?;
        bucket.guide_cond.upload(&inputs.guide_cond, 0.0)?;
        bucket.guide_uncond.upload(&inputs.guide_uncond, 0.0)?;
        bucket.keep_self_cond.upload(&inputs.keep_self_cond, 0)?;
        bucket.renoise_x0.upload(&inputs.renoise_x0, 0.0)?;
        bucket.renoise_noise.upload(&inputs.renoise_noise, 0.0)?;
        // Each re-noised row's noise goes straight into the buffer the device reads;
        // other rows' (and the padding's) values are multiplied by 0 and stay as they were.
        let row_len = l * d;
        bucket.noise.write_prefix(rows.len() * row_len, |noise| {
            for (row, target) in rows.iter().zip(noise.chunks_mut(row_len)) {
                if let Some((_, _, eps)) = &row.update.renoise {
                    match eps.as_slice() {
                        Some(values) => target.copy_from_slice(values),
                        None => target.iter_mut().zip(eps).for_each(|(t, &e)| *t = e),
                    }
                }
            }
        })?;
        bucket.state_slot.upload(&inputs.state_slot, 0)?;
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
