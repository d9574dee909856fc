//! The cross-attention K/V of the images in flight, one slot each, kept in memory of
//! the device the denoiser runs on, so that a denoising step sends none of it.
//!
//! The denoiser of a current bundle takes `image_kv` as a pool plus `kv_index` per row
//! (docs/bundle.md). Without this pool every step would copy each image's K/V into a
//! fresh batch: about 29 MB per image for the full-size model (14.5 MB with f16 K/V,
//! [`KvElement::F16`]), most of what a GPU step would move. Here an image's K/V is
//! copied once, when it first appears in a call, and stays until its rows have not been
//! in a call for [`IDLE_CALLS`] calls.
//! Slot 0 holds the unconditional (null) K/V for good. The pool doubles when full.
//!
//! Two kinds of entries:
//! - *host* K/V ([`KvRef::Image`]): keyed by the address of the image's `Arc`ed K/V,
//!   keeping a clone of the `Arc` (so the address cannot be reused by another image);
//!   copied in on first use, let go after [`IDLE_CALLS`] idle calls, copied in again if
//!   it comes back;
//! - *resident* K/V ([`ResidentKv`]): the encoder wrote it straight into a run of slots
//!   ([`KvPool::reserve_run`] and [`KvPool::run_view`]), so it never went through host
//!   memory; there is no other copy, so it is never let go early: its slot is freed
//!   when its [`ResidentKv`] is dropped (its request finished or failed).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use half::f16;
use ndarray::Array3;
use ort::memory::Allocator;
use ort::value::{
    DynTensorRef, DynValueTypeMarker, PrimitiveTensorElementType, Shape, Tensor, TensorRefMut,
    ValueRefMut,
};

use crate::sampler::KvRef;

/// Calls an entry may go unused before its slot is freed (a request held back by the
/// row limit keeps its slot for a few steps).
pub const IDLE_CALLS: u64 = 4;

struct Entry {
    slot: usize,
    kv: Arc<Array3<f32>>,
    last_call: u64,
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// K/V copied into a slot.
    pub uploads: u64,
    /// Times the pool grew.
    pub grows: u64,
    /// Slots the pool has.
    pub capacity: usize,
    /// Slots held by resident K/V now.
    pub resident: usize,
}

/// One image's K/V in a slot of a [`KvPool`], written there by the encoder. Dropping
/// it hands the slot back to the pool (a request shares it through an `Arc`).
#[derive(Debug)]
pub struct ResidentKv {
    slot: usize,
    /// The pool that owns the slot (a handle never indexes another pool).
    pool: u64,
    released: Arc<Mutex<Vec<usize>>>,
}

impl ResidentKv {
    pub fn slot(&self) -> usize {
        self.slot
    }
}

impl Drop for ResidentKv {
    fn drop(&mut self) {
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        released.push(self.slot);
    }
}

static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The element type of a pool: the bundle's image K/V (`Manifest::kv_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvElement {
    F32,
    /// Half the bytes to keep and to gather; the host's K/V (f32) is converted on upload.
    F16,
}

/// The pool's memory, in its element type.
enum Storage {
    F32(Tensor<f32>),
    F16(Tensor<f16>),
}

impl Storage {
    fn new(
        allocator: &Allocator,
        element: KvElement,
        shape: [usize; 4],
    ) -> Result<Self, ort::Error> {
        Ok(match element {
            KvElement::F32 => Storage::F32(Tensor::new(allocator, shape)?),
            KvElement::F16 => Storage::F16(Tensor::new(allocator, shape)?),
        })
    }

    /// `count` slots from `first`, as a value of their own over the same memory.
    fn slots(
        &mut self,
        item: [usize; 3],
        first: usize,
        count: usize,
    ) -> Result<ValueRefMut<'_, DynValueTypeMarker>, String> {
        Ok(match self {
            Storage::F32(t) => slots_view(t, item, first, count)?.into_dyn(),
            Storage::F16(t) => slots_view(t, item, first, count)?.into_dyn(),
        })
    }
}

pub struct KvPool {
    allocator: Allocator,
    storage: Storage,
    capacity: usize,
    /// Shape of one image's K/V.
    item: [usize; 3],
    entries: HashMap<usize, Entry>,
    /// Free slots (lowest first, so that runs of free slots stay together).
    free: BTreeSet<usize>,
    /// The most slots the pool may grow to.
    limit: usize,
    /// Slots of resident K/V whose last handle was dropped since the last look.
    released: Arc<Mutex<Vec<usize>>>,
    id: u64,
    calls: u64,
    pub stats: PoolStats,
}

fn err(reason: impl std::fmt::Display) -> String {
    format!("K/V pool: {reason}")
}

impl KvPool {
    /// A pool of `capacity` slots (at least 2) of f32 in `allocator`'s memory, with
    /// `null_kv` in slot 0.
    pub fn new(
        allocator: Allocator,
        null_kv: &Array3<f32>,
        capacity: usize,
    ) -> Result<Self, String> {
        Self::with_element(allocator, null_kv, capacity, KvElement::F32)
    }

    /// [`new`](Self::new) with slots of `element`.
    pub fn with_element(
        allocator: Allocator,
        null_kv: &Array3<f32>,
        capacity: usize,
        element: KvElement,
    ) -> Result<Self, String> {
        let (a, b, c) = null_kv.dim();
        let capacity = capacity.clamp(2, max_slots([a, b, c]));
        let storage = Storage::new(&allocator, element, [capacity, a, b, c]).map_err(err)?;
        let mut pool = KvPool {
            allocator,
            storage,
            capacity,
            item: [a, b, c],
            entries: HashMap::new(),
            free: (1..capacity).collect(),
            limit: max_slots([a, b, c]),
            released: Arc::new(Mutex::new(Vec::new())),
            id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            calls: 0,
            stats: PoolStats {
                capacity,
                ..PoolStats::default()
            },
        };
        pool.upload(0, null_kv)?;
        Ok(pool)
    }

    /// The pool, for the denoiser's `image_kv` input.
    pub fn tensor(&self) -> DynTensorRef<'_> {
        match &self.storage {
            Storage::F32(t) => t.upcast_ref(),
            Storage::F16(t) => t.upcast_ref(),
        }
    }

    /// The pool's element type.
    pub fn element(&self) -> KvElement {
        match self.storage {
            Storage::F32(_) => KvElement::F32,
            Storage::F16(_) => KvElement::F16,
        }
    }

    /// The slot of each row's K/V for one denoiser call (its `kv_index`), copying in
    /// the K/V that are not in the pool yet.
    pub fn assign(&mut self, kv: &[KvRef<'_>]) -> Result<Vec<i64>, String> {
        self.reclaim();
        self.calls += 1;
        let call = self.calls;
        // Mark first what this call uses, so that making room never evicts it.
        for src in kv {
            if let KvRef::Image(a) = src
                && let Some(e) = self.entries.get_mut(&key(a))
            {
                e.last_call = call;
            }
        }
        let mut index = Vec::with_capacity(kv.len());
        for src in kv {
            let slot = match src {
                KvRef::Null => 0,
                KvRef::Resident(r) => {
                    if r.pool != self.id || r.slot >= self.capacity {
                        return Err(err(format!("slot {} is not this pool's", r.slot)));
                    }
                    r.slot
                }
                KvRef::Image(a) => match self.entries.get(&key(a)) {
                    Some(e) => e.slot,
                    None => {
                        if a.dim() != (self.item[0], self.item[1], self.item[2]) {
                            return Err(err(format!(
                                "image K/V of shape {:?}; expected {:?}",
                                a.dim(),
                                self.item
                            )));
                        }
                        let slot = self.take_slot(call)?;
                        self.upload(slot, a)?;
                        self.entries.insert(
                            key(a),
                            Entry {
                                slot,
                                kv: Arc::clone(a),
                                last_call: call,
                            },
                        );
                        slot
                    }
                },
            };
            index.push(slot as i64);
        }
        // Let go of images whose rows have left (their requests finished or failed).
        let idle: Vec<usize> = self
            .entries
            .iter()
            .filter(|(_, e)| e.last_call + IDLE_CALLS < call)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.release(k);
        }
        Ok(index)
    }

    fn release(&mut self, key: usize) {
        if let Some(e) = self.entries.remove(&key) {
            self.free.insert(e.slot);
            drop(e.kv);
        }
    }

    /// Frees the slots of resident K/V whose handles were dropped.
    fn reclaim(&mut self) {
        let released =
            std::mem::take(&mut *self.released.lock().unwrap_or_else(|e| e.into_inner()));
        self.stats.resident -= released.len();
        self.free.extend(released);
    }

    /// Up to `count` consecutive free slots for resident K/V: `(first, got)`. The pool
    /// grows (keeping its slots) until it has a run of `count`; at its size limit
    /// ([`max_slots`]) it gives the longest free run instead (`got < count`), and fails
    /// only when no slot is free. Write the K/V into
    /// [`run_view`](Self::run_view)`(first, got)`, then take a handle per slot with
    /// [`resident`](Self::resident); a slot with no handle taken stays reserved.
    pub fn reserve_run(&mut self, count: usize) -> Result<(usize, usize), String> {
        self.reclaim();
        if count == 0 {
            return Err(err("a run of no slots"));
        }
        let (first, got) = loop {
            if let Some(first) = self.find_run(count) {
                break (first, count);
            }
            if let Err(e) = self.grow() {
                match self.longest_run() {
                    Some(run) => break run,
                    None => return Err(e),
                }
            }
        };
        for slot in first..first + got {
            self.free.remove(&slot);
        }
        self.stats.resident += got;
        Ok((first, got))
    }

    /// Free slots as runs of consecutive slots: (first, length), lowest first.
    fn runs(&self) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &slot in &self.free {
            match runs.last_mut() {
                Some((first, len)) if *first + *len == slot => *len += 1,
                _ => runs.push((slot, 1)),
            }
        }
        runs
    }

    /// The lowest run of `count` free slots.
    fn find_run(&self, count: usize) -> Option<usize> {
        self.runs()
            .into_iter()
            .find(|&(_, len)| len >= count)
            .map(|(first, _)| first)
    }

    /// The longest run of free slots (the lowest of equals).
    fn longest_run(&self) -> Option<(usize, usize)> {
        self.runs().into_iter().rev().max_by_key(|&(_, len)| len)
    }

    fn full(&self) -> String {
        err(format!(
            "full at {} images of K/V (ONNX Runtime's CUDA Gather indexes with 32-bit \
             offsets); lower --max-batch-rows",
            self.capacity
        ))
    }

    /// The most images whose K/V the pool can hold at once (slot 0 is the null K/V's).
    pub fn max_images(&self) -> usize {
        self.limit - 1
    }

    /// Lowers the size limit below [`max_slots`] (a smaller memory budget; tests).
    pub fn limit_slots(&mut self, slots: usize) {
        self.limit = slots.clamp(self.capacity, max_slots(self.item));
    }

    /// The slots `first..first + count`, to write K/V into (the encoder's output, of the
    /// pool's element type).
    pub fn run_view(
        &mut self,
        first: usize,
        count: usize,
    ) -> Result<ValueRefMut<'_, DynValueTypeMarker>, String> {
        self.storage.slots(self.item, first, count)
    }

    /// The handle of a slot reserved with [`reserve_run`](Self::reserve_run).
    pub fn resident(&self, slot: usize) -> ResidentKv {
        ResidentKv {
            slot,
            pool: self.id,
            released: Arc::clone(&self.released),
        }
    }

    /// A free slot: a free one, else one not used in this call, else a doubled pool.
    fn take_slot(&mut self, call: u64) -> Result<usize, String> {
        if let Some(slot) = self.free.pop_first() {
            return Ok(slot);
        }
        let unused: Vec<usize> = self
            .entries
            .iter()
            .filter(|(_, e)| e.last_call < call)
            .map(|(k, _)| *k)
            .collect();
        for k in unused {
            self.release(k);
        }
        if let Some(slot) = self.free.pop_first() {
            return Ok(slot);
        }
        self.grow()?;
        self.free
            .pop_first()
            .ok_or_else(|| err("no free slot after growing"))
    }

    /// Doubles the pool (at most to [`max_slots`]), copying the old slots over on the
    /// device. When the device has no memory for the larger pool, the pool stays as it
    /// is for good ([`max_images`](Self::max_images) drops to its size, so that the
    /// worker admits no more images than it holds) and the allocation's error is
    /// returned.
    fn grow(&mut self) -> Result<(), String> {
        let [a, b, c] = self.item;
        let capacity = (self.capacity * 2).min(self.limit);
        if capacity <= self.capacity {
            return Err(self.full());
        }
        let mut storage = match Storage::new(&self.allocator, self.element(), [capacity, a, b, c]) {
            Ok(storage) => storage,
            Err(e) => {
                let had = self.capacity;
                self.limit = had;
                tracing::warn!(
                    slots = had,
                    wanted = capacity,
                    reason = %e,
                    "the K/V pool cannot grow; it keeps its size"
                );
                return Err(err(format!(
                    "cannot grow from {had} to {capacity} images: {e}"
                )));
            }
        };
        match (&self.storage, &mut storage) {
            (Storage::F32(old), Storage::F32(new)) => old
                .copy_into(slots_view(new, self.item, 0, self.capacity)?)
                .map_err(err)?,
            (Storage::F16(old), Storage::F16(new)) => old
                .copy_into(slots_view(new, self.item, 0, self.capacity)?)
                .map_err(err)?,
            _ => unreachable!("a pool grows in its own element type"),
        }
        self.free.extend(self.capacity..capacity);
        self.storage = storage;
        self.capacity = capacity;
        self.stats.grows += 1;
        self.stats.capacity = capacity;
        Ok(())
    }

    /// Copies one image's K/V into `slot` (host to device on a GPU).
    fn upload(&mut self, slot: usize, kv: &Array3<f32>) -> Result<(), String> {
        // An owned source: ONNX Runtime's copy of a borrowed host view within one
        // device clones it first through the same copy machinery, which deadlocks.
        let item = self.item;
        match &mut self.storage {
            Storage::F32(t) => {
                let source =
                    Tensor::from_array(kv.to_owned().insert_axis(ndarray::Axis(0))).map_err(err)?;
                source
                    .copy_into(slots_view(t, item, slot, 1)?)
                    .map_err(err)?;
            }
            Storage::F16(t) => {
                let values = kv.mapv(f16::from_f32).insert_axis(ndarray::Axis(0));
                let source = Tensor::from_array(values).map_err(err)?;
                source
                    .copy_into(slots_view(t, item, slot, 1)?)
                    .map_err(err)?;
            }
        }
        self.stats.uploads += 1;
        Ok(())
    }
}

/// The most slots a pool of K/V shaped `item` may have: its tensor must stay under
/// 2^31 elements, since ONNX Runtime's CUDA Gather (the denoiser's `kv_index` lookup)
/// computes offsets in 32-bit integers. 295 for the full-size model.
pub fn max_slots(item: [usize; 3]) -> usize {
    (i32::MAX as usize / item.iter().product::<usize>().max(1)).max(2)
}

/// `count` slots from `first` of `storage` (slots of shape `item`), as a tensor of
/// their own over the same memory.
fn slots_view<T: PrimitiveTensorElementType + std::fmt::Debug>(
    storage: &mut Tensor<T>,
    item: [usize; 3],
    first: usize,
    count: usize,
) -> Result<TensorRefMut<'_, T>, String> {
    let [a, b, c] = item;
    let total: i64 = storage.shape().iter().product();
    if ((first + count) * a * b * c) as i64 > total {
        return Err(err("slot outside the pool"));
    }
    let info = storage.memory_info().to_owned();
    // Plain address arithmetic: the pointer may be device memory, never read here.
    let base = storage.data_ptr_mut() as usize;
    let ptr = base + first * a * b * c * std::mem::size_of::<T>();
    let shape = Shape::from([count as i64, a as i64, b as i64, c as i64]);
    // SAFETY: the range lies inside `storage` (checked above), whose memory `info`
    // describes, and the view borrows `storage` mutably for as long as it lives.
    unsafe { TensorRefMut::from_raw(info, ptr as *mut std::ffi::c_void, shape) }.map_err(err)
}

fn key(a: &Arc<Array3<f32>>) -> usize {
    Arc::as_ptr(a) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_stays_under_two_to_the_31_elements() {
        // The full-size model: 24 K/V layers x 197 tokens x 1536.
        assert_eq!(max_slots([24, 197, 1536]), 295);
        assert!(295 * 24 * 197 * 1536 <= i32::MAX as usize);
        assert!(296 * 24 * 197 * 1536 > i32::MAX as usize);
        // Small models are bounded far above any batch.
        assert!(max_slots([6, 65, 128]) > 40_000);
    }
}
