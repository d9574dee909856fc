//! Denoiser calls at fixed shapes, with every input and the output in buffers bound
//! once at fixed addresses: what ONNX Runtime needs to capture a call as a CUDA graph
//! and replay it (`--cuda-graph`).
//!
//! At batch 1 a full-size denoiser step is a few hundred small kernels, each launched
//! from the host; replaying a captured graph launches them as one. A graph holds the
//! shapes and addresses it was captured with, so:
//! - a call of `n` rows runs at the next power of two (a *bucket*); the padding rows
//!   read the null K/V (slot 0) at t = 0 and their outputs are dropped. Rows do not
//!   mix in the denoiser, so the real rows get the same values (up to the rounding of
//!   kernels chosen for another row count);
//! - each bucket owns device buffers for `x_t`, `self_cond`, `t`, `kv_index` and `x0`
//!   and one binding that names them and the K/V pool; a call writes its inputs into
//!   them (only those that changed since the bucket's last call) and reads its rows of
//!   `x0` out of them: on a GPU through page-locked host buffers of the same shape, one
//!   `cudaMemcpy` each ([`crate::device_copy`]); on the CPU in place;
//! - each bucket is its own graph (`gpu_graph_id` = log2 of its rows);
//! - the K/V pool must not move: it is allocated at its final size and never grows.
//!
//! Every bucket up to the largest call is set up and run once when the worker loads,
//! which is when ONNX Runtime captures the graphs, for two reasons. Buffers that live
//! across calls must be allocated before any capture: ONNX Runtime may hand the memory
//! a captured graph uses for its intermediate tensors back to the session's arena after
//! the capture, while the graph writes there at every replay, so a buffer allocated
//! later could be overwritten. And a capture must not overlap other CUDA work of the process (ONNX
//! Runtime captures in CUDA's global mode), so the workers load and capture one at a
//! time, before any request is served ([`CAPTURE_LOCK`]).
//!
//! On the CPU nothing is captured; the same buffers, bindings and warm-up are used, so
//! that this path is tested without a GPU.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use ndarray::{Array3, ArrayView3};
use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{DynTensor, Tensor};

use crate::bundle::names;
use crate::device_copy::{CudaRuntime, HostBuffer, Plain};

/// Held by a worker while it loads with `--cuda-graph`, so that no other worker's
/// CUDA work overlaps its captures.
pub static CAPTURE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The largest bucket (`--max-batch-rows` goes up to 4096).
pub const MAX_BUCKET_ROWS: usize = 4096;

/// The row count a call of `rows` rows runs at.
pub fn bucket_rows(rows: usize) -> usize {
    rows.max(1).next_power_of_two()
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FixedShapeStats {
    /// Denoiser calls made.
    pub calls: u64,
    /// Rows run only to fill a bucket.
    pub padding_rows: u64,
    /// Buckets set up (one captured graph each on a GPU).
    pub buckets: usize,
    /// Inputs written to the device: at most 4 per call, none that the device holds
    /// already.
    pub input_copies: u64,
    /// Host buffers page-locked for copies to and from a GPU (5 per bucket at best).
    pub pinned_host_buffers: usize,
}

/// How the host reaches the buffers the model reads and writes.
#[derive(Debug, Clone, Copy)]
pub enum Transfer {
    /// The model's memory is host memory (the CPU provider): buffers are written and
    /// read in place.
    InPlace,
    /// GPU memory, reached through host buffers and the CUDA runtime's copies.
    Cuda(&'static CudaRuntime),
}

/// One tensor of a bucket: where the model reads or writes it, and, on a GPU, its
/// host copy.
pub(crate) struct Buffer<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Plain> {
    pub(crate) device: Tensor<T>,
    /// None when the device buffer is host memory.
    host: Option<HostBuffer<T>>,
    /// The device buffer holds what the host copy holds.
    in_sync: bool,
}

impl<T> Buffer<T>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Plain + Default,
{
    pub(crate) fn new(
        device: &Allocator,
        transfer: Transfer,
        shape: &[usize],
    ) -> Result<Self, String> {
        let device = Tensor::<T>::new(device, shape.to_vec()).map_err(|e| e.to_string())?;
        let host = match transfer {
            Transfer::InPlace => None,
            Transfer::Cuda(cuda) => {
                Some(HostBuffer::new(cuda, shape.iter().product(), T::default())?)
            }
        };
        Ok(Buffer {
            device,
            host,
            in_sync: false,
        })
    }

    /// Writes `values` and then `fill` up to the buffer's length, into the device
    /// buffer itself or into the host copy that is then copied to the device, unless
    /// the device holds exactly that already (as it does for `self_cond`, all zeros at
    /// every step without self-conditioning). Returns whether the device buffer changed.
    pub(crate) fn upload(&mut self, values: &[T], fill: T) -> Result<bool, String> {
        let target = self.writable();
        if values.len() > target.len() {
            return Err(format!(
                "{} values for a buffer of {}",
                values.len(),
                target.len()
            ));
        }
        let (head, tail) = target.split_at_mut(values.len());
        let changed = write_changed(head, values) | fill_changed(tail, fill);
        if self.in_sync && !changed {
            return Ok(false);
        }
        self.in_sync = false;
        let len = self.writable().len();
        self.send(len)?;
        self.in_sync = true;
        Ok(true)
    }

    /// Lets `write` change the first `len` values (in the host copy on a GPU, in the
    /// device buffer itself on the CPU), then sends those to the device. The caller
    /// writes what changed; the rest keeps what it held.
    pub(crate) fn write_prefix(
        &mut self,
        len: usize,
        write: impl FnOnce(&mut [T]),
    ) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        let target = self.writable();
        let Some(prefix) = target.get_mut(..len) else {
            return Err(format!("{len} values for a buffer of {}", target.len()));
        };
        write(prefix);
        let was_in_sync = std::mem::take(&mut self.in_sync);
        self.send(len)?;
        self.in_sync = was_in_sync;
        Ok(())
    }

    /// Where the host writes: the host copy on a GPU, the device buffer itself on the CPU.
    fn writable(&mut self) -> &mut [T] {
        match &mut self.host {
            Some(h) => h.values_mut(),
            None => self.device.extract_tensor_mut().1,
        }
    }

    /// On a GPU, copies the first `len` values of the host copy to the device buffer.
    fn send(&mut self, len: usize) -> Result<(), String> {
        let Some(h) = &self.host else {
            return Ok(());
        };
        let Some(values) = h.values().get(..len) else {
            return Err(format!("{len} values for a buffer of {}", h.values().len()));
        };
        // SAFETY: `device` is GPU memory of the host copy's length, at least `len`.
        unsafe { h.cuda().upload(self.device.data_ptr_mut(), values) }
    }

    /// The first `len` values of the device buffer (copied into the host copy on a GPU).
    pub(crate) fn download(&mut self, len: usize) -> Result<&[T], String> {
        match &mut self.host {
            Some(h) => {
                let cuda = h.cuda();
                // SAFETY: `device` is GPU memory at least `len` long; run has returned.
                unsafe { cuda.download(&mut h.values_mut()[..len], self.device.data_ptr()) }?;
                Ok(&h.values()[..len])
            }
            None => Ok(&self.device.extract_tensor().1[..len]),
        }
    }
}

/// Copies `values` into `target` (as long); returns whether that changed it. Split over
/// the cores when large, as the sampler's other host work is
/// ([`crate::sampler::PARALLEL_HOST_ELEMENTS`]).
fn write_changed<T: Plain>(target: &mut [T], values: &[T]) -> bool {
    fn write<T: Plain>(target: &mut [T], values: &[T]) -> bool {
        let mut changed = false;
        for (slot, &v) in target.iter_mut().zip(values) {
            changed |= *slot != v;
            *slot = v;
        }
        changed
    }
    if !crate::sampler::runs_in_parallel(values.len()) {
        return write(target, values);
    }
    use rayon::prelude::*;
    let chunk = crate::sampler::PARALLEL_HOST_ELEMENTS / 4;
    target
        .par_chunks_mut(chunk)
        .zip(values.par_chunks(chunk))
        .map(|(t, v)| write(t, v))
        .reduce(|| false, |a, b| a | b)
}

/// Sets every element of `target` to `fill`; returns whether that changed it. Padding
/// rows usually hold `fill` already: then they are only read.
fn fill_changed<T: Plain>(target: &mut [T], fill: T) -> bool {
    let changed = target.iter().any(|v| *v != fill);
    if changed {
        target.fill(fill);
    }
    changed
}

impl Buffer<f32> {
    /// On a GPU: sends a pattern and reads it back, so that a wrong address or copy
    /// fails at load, not as wrong captions.
    fn check_round_trip(&mut self) -> Result<(), String> {
        if self.host.is_none() {
            return Ok(());
        }
        let len = self.device.shape().iter().product::<i64>() as usize;
        let pattern: Vec<f32> = (0..len).map(|i| (i % 251) as f32 - 125.0).collect();
        self.upload(&pattern, 0.0)?;
        if let Some(h) = &mut self.host {
            h.values_mut().fill(0.0);
        }
        self.in_sync = false;
        let back = self.download(len)?;
        match back.iter().zip(&pattern).position(|(b, p)| b != p) {
            None => Ok(()),
            Some(i) => Err(format!(
                "a buffer copied to the GPU and back differs at element {i} of {len}"
            )),
        }
    }
}

/// A bucket's device buffers, for another graph's bindings.
pub(crate) struct BucketTensors<'a> {
    pub x_t: &'a mut Tensor<f32>,
    pub self_cond: &'a mut Tensor<f32>,
    pub t: &'a mut Tensor<i64>,
    pub kv_index: &'a mut Tensor<i64>,
    pub x0: &'a Tensor<f32>,
}

/// A float buffer of a bucket: the denoiser's inputs `x_t` and `self_cond`, its output.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BucketTensor {
    XT,
    SelfCond,
    X0,
}

/// The buffers and binding of one row count (the key it is stored under).
struct Bucket {
    x_t: Buffer<f32>,
    self_cond: Buffer<f32>,
    t: Buffer<i64>,
    kv_index: Buffer<i64>,
    x0: Buffer<f32>,
    binding: IoBinding,
    options: RunOptions,
}

impl Bucket {
    /// The device buffers of the inputs no longer hold what their host copies hold.
    fn inputs_written_on_device(&mut self) {
        self.x_t.in_sync = false;
        self.self_cond.in_sync = false;
        self.t.in_sync = false;
        self.kv_index.in_sync = false;
    }

    fn host_buffers_pinned(&self) -> usize {
        [
            self.x_t.host.as_ref().map(HostBuffer::is_pinned),
            self.self_cond.host.as_ref().map(HostBuffer::is_pinned),
            self.t.host.as_ref().map(HostBuffer::is_pinned),
            self.kv_index.host.as_ref().map(HostBuffer::is_pinned),
            self.x0.host.as_ref().map(HostBuffer::is_pinned),
        ]
        .into_iter()
        .filter(|p| *p == Some(true))
        .count()
    }
}

/// The fixed-shape denoiser calls of one worker (see the module docs).
pub struct FixedShapeCalls {
    latent: (usize, usize),
    capture: bool,
    transfer: Transfer,
    /// By row count: 1, 2, 4, ... up to the largest call.
    buckets: BTreeMap<usize, Bucket>,
    pub stats: FixedShapeStats,
}

impl std::fmt::Debug for FixedShapeCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedShapeCalls")
            .field("latent", &self.latent)
            .field("capture", &self.capture)
            .field("transfer", &self.transfer)
            .field("stats", &self.stats)
            .finish()
    }
}

impl FixedShapeCalls {
    /// Sets up a bucket for every power of two from the smallest call of `rows` to its
    /// largest (`1..=max` for any call; from 2 for a denoiser that runs even batches only,
    /// [`crate::call_layout`]), for latents `latent` = (L, D): buffers in `device`'s memory, reached from the host as `transfer` says,
    /// bound with `pool` (the K/V pool, which must never move) to `session`, the
    /// denoiser's. Then runs each bucket once,
    /// which is when ONNX Runtime captures it when `capture` is set (the session must
    /// have been created with CUDA graphs enabled). Call it before the session has run.
    pub fn new(
        session: &mut Session,
        device: &Allocator,
        pool: &DynTensor,
        latent: (usize, usize),
        rows: RangeInclusive<usize>,
        capture: bool,
        transfer: Transfer,
    ) -> Result<FixedShapeCalls, String> {
        let mut calls =
            FixedShapeCalls::allocate(session, device, pool, latent, rows, capture, transfer)?;
        calls.run_first(session)?;
        Ok(calls)
    }

    /// [`new`](Self::new) without the first runs: every buffer is allocated and bound.
    /// Allocate anything else in `device`'s memory that must outlive the captures now,
    /// then call [`run_first`](Self::run_first).
    pub fn allocate(
        session: &mut Session,
        device: &Allocator,
        pool: &DynTensor,
        latent: (usize, usize),
        rows: RangeInclusive<usize>,
        capture: bool,
        transfer: Transfer,
    ) -> Result<FixedShapeCalls, String> {
        let (min_rows, max_rows) = (*rows.start(), *rows.end());
        if max_rows == 0 || max_rows > MAX_BUCKET_ROWS {
            return Err(format!(
                "fixed-shape calls need a largest call of 1 to {MAX_BUCKET_ROWS} rows, not {max_rows}"
            ));
        }
        if min_rows == 0 || min_rows > max_rows {
            return Err(format!(
                "fixed-shape calls of {min_rows} to {max_rows} rows: no such calls"
            ));
        }
        let mut calls = FixedShapeCalls {
            latent,
            capture,
            transfer,
            buckets: BTreeMap::new(),
            stats: FixedShapeStats::default(),
        };
        let sizes: Vec<usize> = (bucket_rows(min_rows).trailing_zeros()
            ..=bucket_rows(max_rows).trailing_zeros())
            .map(|k| 1usize << k)
            .collect();
        for &rows in &sizes {
            let mut bucket = calls.new_bucket(session, device, pool, rows)?;
            bucket.x_t.check_round_trip()?;
            bucket.x0.check_round_trip()?;
            calls.buckets.insert(rows, bucket);
        }
        let pinned = calls
            .buckets
            .values()
            .map(|b| b.host_buffers_pinned())
            .sum::<usize>();
        calls.stats = FixedShapeStats {
            buckets: sizes.len(),
            pinned_host_buffers: pinned,
            ..FixedShapeStats::default()
        };
        Ok(calls)
    }

    /// Runs every bucket once (the captures, with CUDA graphs): after every buffer that
    /// must outlive them is allocated (see the module docs).
    pub fn run_first(&mut self, session: &mut Session) -> Result<(), String> {
        let start = std::time::Instant::now();
        let sizes = self.bucket_sizes();
        let stats = self.stats;
        for &rows in &sizes {
            let (l, d) = self.latent;
            let zeros = Array3::<f32>::zeros((rows, l, d));
            let index = vec![0i64; rows];
            self.run(session, zeros.view(), zeros.view(), &index, &index)?;
        }
        // The first runs are set-up, not calls.
        self.stats = stats;
        tracing::info!(
            buckets = ?sizes,
            capture = self.capture,
            copies = match self.transfer {
                Transfer::InPlace => "none (host memory)",
                Transfer::Cuda(cuda) => cuda.library,
            },
            pinned_host_buffers = stats.pinned_host_buffers,
            seconds = start.elapsed().as_secs_f64(),
            "denoiser buckets set up and run once{}",
            if self.capture { " (CUDA graphs captured)" } else { "" }
        );
        Ok(())
    }

    fn new_bucket(
        &self,
        session: &Session,
        device: &Allocator,
        pool: &DynTensor,
        rows: usize,
    ) -> Result<Bucket, String> {
        let (l, d) = self.latent;
        let fail = |e: ort::Error| e.to_string();
        let transfer = self.transfer;
        let mut b = Bucket {
            x_t: Buffer::new(device, transfer, &[rows, l, d])?,
            self_cond: Buffer::new(device, transfer, &[rows, l, d])?,
            t: Buffer::new(device, transfer, &[rows])?,
            kv_index: Buffer::new(device, transfer, &[rows])?,
            x0: Buffer::new(device, transfer, &[rows, l, d])?,
            binding: session.create_binding().map_err(fail)?,
            options: RunOptions::new().map_err(fail)?,
        };
        b.binding
            .bind_input(names::X_T, &b.x_t.device)
            .map_err(fail)?;
        b.binding
            .bind_input(names::SELF_COND, &b.self_cond.device)
            .map_err(fail)?;
        b.binding.bind_input(names::T, &b.t.device).map_err(fail)?;
        b.binding
            .bind_input(names::KV_INDEX, &b.kv_index.device)
            .map_err(fail)?;
        b.binding.bind_input(names::IMAGE_KV, pool).map_err(fail)?;
        b.binding
            .bind_output(names::X0, &mut b.x0.device)
            .map_err(fail)?;
        if self.capture {
            let graph_id = rows.trailing_zeros().to_string();
            b.options.set("gpu_graph_id", graph_id).map_err(fail)?;
        }
        Ok(b)
    }

    /// How the host reaches the buckets' buffers.
    pub(crate) fn transfer(&self) -> Transfer {
        self.transfer
    }

    /// The row counts of the buckets, smallest first.
    pub(crate) fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.keys().copied().collect()
    }

    /// The device buffers of the bucket of `rows` rows: its inputs `x_t`, `self_cond`, `t`
    /// and `kv_index` (for another graph to write, [`crate::device_loop`]), and `x0`.
    pub(crate) fn bucket_tensors(&mut self, rows: usize) -> Option<BucketTensors<'_>> {
        self.buckets.get_mut(&rows).map(|b| BucketTensors {
            x_t: &mut b.x_t.device,
            self_cond: &mut b.self_cond.device,
            t: &mut b.t.device,
            kv_index: &mut b.kv_index.device,
            x0: &b.x0.device,
        })
    }

    /// The first `len` values of one of the bucket of `rows` rows' float buffers, as
    /// the device holds them (for the device loop's check at load).
    pub(crate) fn read_bucket(
        &mut self,
        rows: usize,
        tensor: BucketTensor,
        len: usize,
    ) -> Result<Vec<f32>, String> {
        let bucket = self
            .buckets
            .get_mut(&rows)
            .ok_or_else(|| format!("no denoiser bucket of {rows} rows"))?;
        let buffer = match tensor {
            BucketTensor::XT => &mut bucket.x_t,
            BucketTensor::SelfCond => &mut bucket.self_cond,
            BucketTensor::X0 => &mut bucket.x0,
        };
        // The host copy now holds what the device does, not what was last sent.
        buffer.in_sync = false;
        Ok(buffer.download(len)?.to_vec())
    }

    /// Says that another graph wrote the inputs of the bucket of `rows` rows on the
    /// device, so that a later [`run`](Self::run) sends its own again.
    pub(crate) fn inputs_written_on_device(&mut self, rows: usize) {
        if let Some(bucket) = self.buckets.get_mut(&rows) {
            bucket.inputs_written_on_device();
        }
    }

    /// One denoiser pass over `n` rows whose inputs another graph has just written into
    /// the bucket's device buffers; `x0` stays there. Sends nothing.
    pub(crate) fn run_written(&mut self, session: &mut Session, n: usize) -> Result<(), String> {
        let rows = bucket_rows(n);
        let largest = self.max_rows();
        let Some(bucket) = self.buckets.get_mut(&rows) else {
            return Err(format!(
                "{n} rows in one denoiser call; the fixed shapes go up to {largest}"
            ));
        };
        bucket.inputs_written_on_device();
        session
            .run_binding_with_options(&bucket.binding, &bucket.options)
            .map_err(|e| e.to_string())?;
        self.stats.calls += 1;
        self.stats.padding_rows += (rows - n) as u64;
        Ok(())
    }

    /// The largest call these buckets take.
    pub fn max_rows(&self) -> usize {
        self.buckets.keys().next_back().copied().unwrap_or(0)
    }

    /// One denoiser pass over `x [n,L,D]`, `self_cond [n,L,D]`, `t [n]` and
    /// `kv_index [n]` (slots of the K/V pool), run at [`bucket_rows`]`(n)` rows.
    pub fn run(
        &mut self,
        session: &mut Session,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv_index: &[i64],
    ) -> Result<Array3<f32>, String> {
        let n = x.dim().0;
        let (l, d) = self.latent;
        if x.dim() != (n, l, d) || self_cond.dim() != (n, l, d) {
            return Err(format!(
                "x_t {:?} and self_cond {:?}; expected [{n}, {l}, {d}]",
                x.dim(),
                self_cond.dim()
            ));
        }
        if t.len() != n || kv_index.len() != n {
            return Err(format!(
                "{n} rows, but t has {} and kv_index {}",
                t.len(),
                kv_index.len()
            ));
        }
        // Slices, not ndarray's element iterators: at full size a call's inputs are
        // tens of megabytes, and a slice's loop is several times faster (and can be
        // split over the cores).
        let (x, self_cond) = (x.as_standard_layout(), self_cond.as_standard_layout());
        let (Some(x), Some(self_cond)) = (x.as_slice(), self_cond.as_slice()) else {
            return Err("x_t or self_cond is not contiguous".into());
        };
        let rows = bucket_rows(n);
        let largest = self.max_rows();
        let Some(bucket) = self.buckets.get_mut(&rows) else {
            return Err(format!(
                "{n} rows in one denoiser call; the fixed shapes go up to {largest}"
            ));
        };
        let copied = [
            bucket.x_t.upload(x, 0.0)?,
            bucket.self_cond.upload(self_cond, 0.0)?,
            // Padding rows: t = 0 on the null K/V, a valid input whatever the pool holds.
            bucket.t.upload(t, 0)?,
            bucket.kv_index.upload(kv_index, 0)?,
        ];
        session
            .run_binding_with_options(&bucket.binding, &bucket.options)
            .map_err(|e| e.to_string())?;
        // Only the real rows come back.
        let x0 = bucket.x0.download(n * l * d)?;
        let out = ArrayView3::from_shape((n, l, d), x0)
            .map_err(|e| e.to_string())?
            .to_owned();
        self.stats.calls += 1;
        self.stats.padding_rows += (rows - n) as u64;
        self.stats.input_copies += copied.iter().filter(|&&c| c).count() as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_writes_split_over_the_cores_say_whether_anything_changed() {
        for len in [10, crate::sampler::PARALLEL_HOST_ELEMENTS + 12_345] {
            let values: Vec<f32> = (0..len).map(|i| (i % 101) as f32).collect();
            let mut target = vec![0.0f32; len];
            assert!(write_changed(&mut target, &values));
            assert_eq!(target, values);
            assert!(
                !write_changed(&mut target, &values),
                "the same values again"
            );
            let mut one_off = values.clone();
            one_off[len - 3] = -1.0;
            assert!(write_changed(&mut target, &one_off));
            assert_eq!(target, one_off);
            assert!(fill_changed(&mut target, 0.5));
            assert!(target.iter().all(|&v| v == 0.5));
            assert!(!fill_changed(&mut target, 0.5));
        }
    }

    #[test]
    fn calls_run_at_the_next_power_of_two() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 8, 9, 100, 256, 257]
            .iter()
            .map(|&n| bucket_rows(n))
            .collect();
        assert_eq!(got, vec![1, 1, 2, 4, 4, 8, 8, 16, 128, 256, 512]);
    }
}
