//! Denoiser calls at fixed shapes, with every input and the output in buffers bound
//! once at fixed addresses: what ONNX Runtime needs to capture a call as a CUDA graph
//! and replay it (`--cuda-graph`).
//!
//! At batch 1 a full-size denoiser step is a few hundred small kernels, each launched
//! from the host; replaying a captured graph launches them all at once. A graph holds
//! the shapes and addresses it was captured with, so:
//! - a call of `n` rows runs at the next power of two (a *bucket*); the padding rows
//!   read the null K/V (slot 0) at t = 0 and their outputs are dropped. Rows do not
//!   mix in the denoiser, so padding changes nothing in the real rows;
//! - each bucket owns device buffers for `x_t`, `self_cond`, `t`, `kv_index` and `x0`
//!   and one binding that names them and the K/V pool; a call copies its inputs into
//!   them and `x0` out of them (through host buffers of the same shape);
//! - each bucket is its own graph (`gpu_graph_id` = log2 of its rows), captured by
//!   ONNX Runtime on the bucket's first call and replayed after;
//! - the K/V pool must not move: it is allocated at its final size and never grows.
//!
//! On the CPU nothing is captured; the same buffers and bindings are used, so that
//! this path is tested without a GPU.

use std::collections::BTreeMap;

use ndarray::{Array3, ArrayView3, Axis};
use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::Tensor;

use crate::bundle::names;

/// The largest bucket: calls are split to `--max-batch-rows` (at most 4096) anyway.
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
    /// Inputs copied to the device: at most 4 per call, none that the device holds
    /// already.
    pub input_copies: u64,
}

/// One tensor of a bucket: where the model reads or writes it, and its host copy.
struct Buffer<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static> {
    device: Tensor<T>,
    host: Tensor<T>,
    /// The device buffer holds what the host copy holds.
    in_sync: bool,
}

impl<T> Buffer<T>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + PartialEq + 'static,
{
    fn new(device: &Allocator, shape: &[usize]) -> Result<Self, String> {
        let device = Tensor::<T>::new(device, shape.to_vec()).map_err(|e| e.to_string())?;
        let host =
            Tensor::<T>::new(&Allocator::default(), shape.to_vec()).map_err(|e| e.to_string())?;
        Ok(Buffer {
            device,
            host,
            in_sync: false,
        })
    }

    /// Writes `values` and then `fill` up to the buffer's length into the host copy,
    /// then copies it to the device, unless the device holds exactly that already (as
    /// it does for `self_cond`, all zeros at every step without self-conditioning).
    /// Returns whether it copied.
    fn upload(&mut self, values: impl Iterator<Item = T>, fill: T) -> Result<bool, String> {
        let (_, host) = self.host.extract_tensor_mut();
        let mut written = 0;
        let mut changed = false;
        for (slot, v) in host.iter_mut().zip(values) {
            changed |= *slot != v;
            *slot = v;
            written += 1;
        }
        for slot in &mut host[written..] {
            changed |= *slot != fill;
            *slot = fill.clone();
        }
        if self.in_sync && !changed {
            return Ok(false);
        }
        self.in_sync = false;
        self.host
            .copy_into(&mut self.device)
            .map_err(|e| format!("copy to the model's device: {e}"))?;
        self.in_sync = true;
        Ok(true)
    }

    /// Copies the device buffer into the host copy and returns it.
    fn download(&mut self) -> Result<&[T], String> {
        self.device
            .copy_into(&mut self.host)
            .map_err(|e| format!("copy from the model's device: {e}"))?;
        Ok(self.host.extract_tensor().1)
    }
}

struct Bucket {
    rows: usize,
    x_t: Buffer<f32>,
    self_cond: Buffer<f32>,
    t: Buffer<i64>,
    kv_index: Buffer<i64>,
    x0: Buffer<f32>,
    binding: IoBinding,
    options: RunOptions,
    /// The K/V pool's address when it was bound: a captured graph reads it there.
    pool_address: usize,
}

/// The fixed-shape denoiser calls of one worker (see the module docs).
pub struct FixedShapeCalls {
    device: Allocator,
    latent: (usize, usize),
    capture: bool,
    buckets: BTreeMap<usize, Bucket>,
    pub stats: FixedShapeStats,
}

impl std::fmt::Debug for FixedShapeCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedShapeCalls")
            .field("latent", &self.latent)
            .field("capture", &self.capture)
            .field("stats", &self.stats)
            .finish()
    }
}

impl FixedShapeCalls {
    /// Calls whose buffers live in `device`'s memory, for latents of `latent` = (L, D);
    /// `capture`: ask ONNX Runtime to capture each bucket as a CUDA graph (the
    /// denoiser's session must have been created with CUDA graphs enabled).
    pub fn new(device: Allocator, latent: (usize, usize), capture: bool) -> FixedShapeCalls {
        FixedShapeCalls {
            device,
            latent,
            capture,
            buckets: BTreeMap::new(),
            stats: FixedShapeStats::default(),
        }
    }

    fn bucket(
        &mut self,
        session: &Session,
        pool: &Tensor<f32>,
        rows: usize,
    ) -> Result<&mut Bucket, String> {
        let pool_address = pool.data_ptr() as usize;
        if let Some(b) = self.buckets.get(&rows)
            && b.pool_address != pool_address
        {
            // The pool is allocated once at its final size; a move would leave every
            // captured graph reading freed memory.
            return Err("the K/V pool moved after a denoiser graph was captured".into());
        }
        if !self.buckets.contains_key(&rows) {
            let (l, d) = self.latent;
            let fail = |e: ort::Error| e.to_string();
            let mut bucket = Bucket {
                rows,
                x_t: Buffer::new(&self.device, &[rows, l, d])?,
                self_cond: Buffer::new(&self.device, &[rows, l, d])?,
                t: Buffer::new(&self.device, &[rows])?,
                kv_index: Buffer::new(&self.device, &[rows])?,
                x0: Buffer::new(&self.device, &[rows, l, d])?,
                binding: session.create_binding().map_err(fail)?,
                options: RunOptions::new().map_err(fail)?,
                pool_address,
            };
            let b = &mut bucket;
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
            tracing::info!(
                rows,
                capture = self.capture,
                "denoiser bucket set up{}",
                if self.capture {
                    ": its CUDA graph is captured on this call"
                } else {
                    ""
                }
            );
            self.buckets.insert(rows, bucket);
            self.stats.buckets = self.buckets.len();
        }
        Ok(self.buckets.get_mut(&rows).expect("inserted above"))
    }

    /// One denoiser pass over `x [n,L,D]`, `self_cond [n,L,D]`, `t [n]` and
    /// `kv_index [n]` (slots of `pool`), run at [`bucket_rows`]`(n)` rows.
    pub fn run(
        &mut self,
        session: &mut Session,
        pool: &Tensor<f32>,
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
        let rows = bucket_rows(n);
        if rows > MAX_BUCKET_ROWS {
            return Err(format!("{n} rows in one call; at most {MAX_BUCKET_ROWS}"));
        }
        let bucket = self.bucket(session, pool, rows)?;
        let copied = [
            bucket.x_t.upload(x.iter().copied(), 0.0)?,
            bucket.self_cond.upload(self_cond.iter().copied(), 0.0)?,
            // Padding rows: t = 0 on the null K/V, a valid input whatever the pool holds.
            bucket.t.upload(t.iter().copied(), 0)?,
            bucket.kv_index.upload(kv_index.iter().copied(), 0)?,
        ];
        session
            .run_binding_with_options(&bucket.binding, &bucket.options)
            .map_err(|e| e.to_string())?;
        let x0 = bucket.x0.download()?;
        let out = ArrayView3::from_shape((bucket.rows, l, d), x0)
            .map_err(|e| e.to_string())?
            .slice_axis(Axis(0), ndarray::Slice::from(0..n))
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
    fn calls_run_at_the_next_power_of_two() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 8, 9, 100, 256, 257]
            .iter()
            .map(|&n| bucket_rows(n))
            .collect();
        assert_eq!(got, vec![1, 1, 2, 4, 4, 8, 8, 16, 128, 256, 512]);
    }
}
