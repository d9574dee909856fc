//! The denoising loop with the rows' state kept on the device (`--device-loop`).
//!
//! On the host path ([`super::step`]) every step sends each row's `x_t` and `self_cond`
//! to the denoiser and takes its `x0` back, and the host combines the guided pair and
//! re-noises. Here the device holds `x_t` and `self_cond` in a *state pool*, one slot
//! per row, and does that arithmetic itself right after the denoiser. The host still
//! decides everything (a row's bookkeeping, [`Row::advance`], needs no arrays) and
//! sends per step only each row's slot, timestep, K/V and coefficients, plus the noise
//! of the rows that re-noise. What crosses back is `x0` of the rows the host needs it
//! for: Back&Refine confidences, the final decode, streaming and traces.
//!
//! A row's arrays go to the device when it has none there yet (a new row: its first
//! `x_t` and zero `self_cond`) and after a Back&Refine restart, which the host computes
//! from `x0` (its new `x_t` only; `self_cond` stays where the device put it).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use ndarray::Array2;

use super::KvRef;
use super::row::Update;

/// A row's slot in a state pool. Dropping it hands the slot back.
#[derive(Debug)]
pub struct StateSlot {
    slot: usize,
    released: Arc<Mutex<Vec<usize>>>,
}

impl StateSlot {
    pub fn index(&self) -> usize {
        self.slot
    }
}

impl Drop for StateSlot {
    fn drop(&mut self) {
        self.released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.slot);
    }
}

/// Hands out the slots `1..capacity` of a state pool (slot 0 is the padding rows'
/// scratch slot) and takes back those whose [`StateSlot`] was dropped.
#[derive(Debug)]
pub struct StateSlots {
    /// Free slots (the lowest is taken first).
    free: BTreeSet<usize>,
    released: Arc<Mutex<Vec<usize>>>,
    capacity: usize,
}

impl StateSlots {
    pub fn new(capacity: usize) -> StateSlots {
        let capacity = capacity.max(1);
        StateSlots {
            free: (1..capacity).collect(),
            released: Arc::new(Mutex::new(Vec::new())),
            capacity,
        }
    }

    /// A free slot, or None when every slot but the scratch slot is held.
    pub fn take(&mut self) -> Option<StateSlot> {
        let released =
            std::mem::take(&mut *self.released.lock().unwrap_or_else(|e| e.into_inner()));
        self.free.extend(released);
        self.free.pop_first().map(|slot| StateSlot {
            slot,
            released: Arc::clone(&self.released),
        })
    }

    /// Each row's slot: its own, or a free one taken for it (also returned, as the
    /// row's new handle, for [`DeviceStep::new_slots`]). An error when the pool runs
    /// out (the slots taken so far go back when the handles are dropped).
    pub fn assign(
        &mut self,
        rows: &[DeviceRow<'_>],
    ) -> Result<(Vec<usize>, Vec<Option<StateSlot>>), String> {
        let mut slots = Vec::with_capacity(rows.len());
        let mut new_slots = Vec::with_capacity(rows.len());
        for row in rows {
            match row.slot {
                Some(slot) => {
                    slots.push(slot);
                    new_slots.push(None);
                }
                None => {
                    let Some(slot) = self.take() else {
                        return Err(format!(
                            "the state pool is full: {} rows hold its {} slots",
                            self.held(),
                            self.capacity - 1
                        ));
                    };
                    slots.push(slot.index());
                    new_slots.push(Some(slot));
                }
            }
        }
        Ok((slots, new_slots))
    }

    /// Slots in all, the scratch slot included.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots held by rows now.
    pub fn held(&self) -> usize {
        let released = self
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        self.capacity - 1 - self.free.len() - released
    }
}

/// One row of a [`DeviceLoop::step`] call.
#[derive(Debug)]
pub struct DeviceRow<'a> {
    /// The row's slot; None for a row the device has no state of yet, which then gets
    /// one ([`DeviceStep::new_slots`]).
    pub slot: Option<usize>,
    /// `x_t` the device must take from the host before the call (a new row, a
    /// Back&Refine restart).
    pub send_x: Option<Array2<f32>>,
    /// `self_cond` the device must take from the host before the call (a new row).
    pub send_self_cond: Option<Array2<f32>>,
    /// The denoiser's timestep for the row (its unconditional pass too, if guided).
    pub t_in: i64,
    /// The K/V of the conditional pass.
    pub kv: KvRef<'a>,
    /// What to do with the denoiser's output (and whether `x0` comes back).
    pub update: Update,
}

impl DeviceRow<'_> {
    /// Denoiser rows the row takes: its conditional pass, and its unconditional one when
    /// guided.
    pub fn denoiser_rows(&self) -> usize {
        if self.update.guidance.is_some() { 2 } else { 1 }
    }
}

/// What a [`DeviceLoop::step`] call gives back, by row.
#[derive(Debug, Default)]
pub struct DeviceStep {
    /// The slot given to each row that had none.
    pub new_slots: Vec<Option<StateSlot>>,
    /// `x0` of each row whose update asked for it.
    pub x0: Vec<Option<Array2<f32>>>,
}

/// A denoiser that keeps the rows' state on its device (see the module docs).
pub trait DeviceLoop {
    type Error;

    /// One denoiser pass over `rows` (each with its unconditional pass too when its
    /// update is guided), then each row's update, on the device. On an error the rows'
    /// bookkeeping has moved on while their state has not: the caller drops them (the
    /// worker fails their requests).
    fn step(&mut self, rows: Vec<DeviceRow<'_>>) -> Result<DeviceStep, Self::Error>;
}
