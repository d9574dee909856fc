//! One caption candidate as a state machine, so that a scheduler can put rows of
//! different requests, at different timesteps, into one denoiser call.
//!
//! A row only says what it needs next ([`Need`]) and takes the result of that call
//! (`apply_*`); who batches the calls is the caller's business. Driven one row at a
//! time this is exactly the loop of docs/bundle.md.

use std::sync::Arc;

use ndarray::{Array2, ArrayView1, ArrayView2, Zip};

use super::device::StateSlot;
use super::noise::{NoiseExhausted, NoiseSource};
use super::schedule::Schedule;
use super::{SamplerParams, TraceStep};

/// The next model call a row is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A denoiser pass at timestep `t_in` (plus the unconditional pass if guided).
    Denoise {
        t_in: i64,
    },
    /// Decoder confidences of the current `x0`, to pick what Back&Refine keeps.
    Confidence,
    /// The final decoder pass.
    Decode,
    Done,
}

/// The finished row: the decoder's raw output for the final `x0`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    pub ids: Vec<i64>,
    pub confidence: Vec<f32>,
}

pub struct Row {
    params: SamplerParams,
    schedule: Arc<Schedule>,
    stride: usize,
    t: usize,
    rounds_left: usize,
    x: Array2<f32>,
    self_cond: Array2<f32>,
    x0: Array2<f32>,
    need: Need,
    noise: Box<dyn NoiseSource>,
    /// The next draw of `noise`, made ahead while a model call ran ([`Row::prefetch_noise`]).
    prefetched: Option<Result<Array2<f32>, NoiseExhausted>>,
    trace: Option<Vec<TraceStep>>,
    /// (t, t_in, refined) of the last [`Row::advance`], until its `x0` is recorded.
    pending_trace: Option<(i64, i64, bool)>,
    output: Option<RowOutput>,
    iterations: usize,
    /// With the loop on the device: the row's slot in the state pool.
    device_slot: Option<StateSlot>,
    /// `x_t` and `self_cond` changed on the host since the device last took them.
    send_x: bool,
    send_self_cond: bool,
}

/// What happens to a row's arrays after a denoiser pass ([`Row::advance`]).
#[derive(Debug)]
pub struct Update {
    /// `(1 + w, w)` as f32: `x0 = (1+w) cond - w uncond`; None: `x0 = cond`.
    pub guidance: Option<(f32, f32)>,
    /// `self_cond` becomes `x0`; else zeros.
    pub keep_self_cond: bool,
    /// `x_t = a x0 + b eps` as `(a, b, eps)`; None: `x_t` is not needed any more (the row
    /// goes to Back&Refine or to its final decode).
    pub renoise: Option<(f32, f32, Array2<f32>)>,
    /// The host needs the new `x0`: for the decoder, or for a trace.
    pub needs_x0: bool,
}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Row")
            .field("t", &self.t)
            .field("rounds_left", &self.rounds_left)
            .field("need", &self.need)
            .finish()
    }
}

impl Row {
    /// Starts a row at t = T-1 from the noise source's first draw.
    pub fn new(
        params: SamplerParams,
        schedule: Arc<Schedule>,
        latent_shape: (usize, usize),
        mut noise: Box<dyn NoiseSource>,
        record_trace: bool,
    ) -> Result<Row, NoiseExhausted> {
        let (l, d) = latent_shape;
        let x = noise.draw(l, d)?;
        let last = schedule.num_timesteps() - 1;
        let mut row = Row {
            stride: schedule.stride(params.steps),
            t: last,
            rounds_left: params.back_refine_rounds(),
            x,
            self_cond: Array2::zeros((l, d)),
            x0: Array2::zeros((l, d)),
            need: Need::Done,
            noise,
            prefetched: None,
            trace: record_trace.then(Vec::new),
            pending_trace: None,
            output: None,
            iterations: 0,
            device_slot: None,
            send_x: true,
            send_self_cond: true,
            params,
            schedule,
        };
        row.need = row.denoise_need();
        Ok(row)
    }

    fn denoise_need(&self) -> Need {
        let last = self.schedule.num_timesteps() - 1;
        Need::Denoise {
            t_in: (self.t + self.params.time_shift).min(last) as i64,
        }
    }

    pub fn need(&self) -> Need {
        self.need
    }

    pub fn guided(&self) -> bool {
        self.params.guided()
    }

    /// Denoiser rows this row takes per call: 2 with guidance (cond + uncond), else 1.
    pub fn denoiser_rows(&self) -> usize {
        self.params.denoiser_rows_per_candidate()
    }

    pub fn x(&self) -> ArrayView2<'_, f32> {
        self.x.view()
    }

    pub fn self_cond(&self) -> ArrayView2<'_, f32> {
        self.self_cond.view()
    }

    pub fn x0(&self) -> ArrayView2<'_, f32> {
        self.x0.view()
    }

    pub fn iterations(&self) -> usize {
        self.iterations
    }

    /// The current timestep: the one the next denoiser pass starts from.
    pub fn t(&self) -> usize {
        self.t
    }

    pub fn take_trace(&mut self) -> Vec<TraceStep> {
        self.trace.take().unwrap_or_default()
    }

    pub fn output(&self) -> Option<&RowOutput> {
        self.output.as_ref()
    }

    pub fn into_output(self) -> Option<RowOutput> {
        self.output
    }

    /// Draws now the noise the row's next update will take, if its next update takes
    /// one (a re-noise or a Back&Refine restart, not the final decode). The draw is the
    /// same as it would be then: only its time changes, so a caller can make it while
    /// a model call keeps the device busy and the host idle.
    pub fn prefetch_noise(&mut self) {
        if self.prefetched.is_none() && self.draws_after_denoising() {
            self.prefetched = Some(self.noise.draw(self.x.nrows(), self.x.ncols()));
        }
    }

    /// Whether the update after the pending denoiser pass draws noise: a re-noise or a
    /// Back&Refine restart (`t > stride`), not the final decode (see `apply_denoised`).
    fn draws_after_denoising(&self) -> bool {
        matches!(self.need, Need::Denoise { .. }) && self.t > self.stride
    }

    /// The row's next noise draw: the prefetched one, or a fresh one.
    fn next_noise(&mut self) -> Result<Array2<f32>, NoiseExhausted> {
        match self.prefetched.take() {
            Some(draw) => draw,
            None => self.noise.draw(self.x.nrows(), self.x.ncols()),
        }
    }

    /// Takes the denoiser's prediction(s) for this row and advances the loop.
    pub fn apply_denoised(
        &mut self,
        cond: ArrayView2<f32>,
        uncond: Option<ArrayView2<f32>>,
    ) -> Result<(), NoiseExhausted> {
        let Some(update) = self.advance(uncond.is_some())? else {
            return Ok(());
        };
        match (update.guidance, uncond) {
            (Some((a, b)), Some(u)) => {
                Zip::from(&mut self.x0)
                    .and(&cond)
                    .and(&u)
                    .for_each(|o, &c, &u| *o = a * c - b * u);
            }
            _ => self.x0.assign(&cond),
        }
        if update.keep_self_cond {
            self.self_cond.assign(&self.x0);
        } else {
            self.self_cond.fill(0.0);
        }
        self.record_trace();
        if let Some((a, b, eps)) = update.renoise {
            Zip::from(&mut self.x)
                .and(&self.x0)
                .and(&eps)
                .for_each(|x, &x0, &e| *x = a * x0 + b * e);
        }
        Ok(())
    }

    /// The bookkeeping half of [`apply_denoised`](Self::apply_denoised): moves the row
    /// past its pending denoiser pass (its timestep, what it needs next, the noise the
    /// re-noise takes) and says what to do with the arrays, which the caller does on
    /// the host or on the device ([`super::device`]). `guided_pair`: the pass included
    /// the unconditional row. None when the row was not waiting for a denoiser pass.
    pub fn advance(&mut self, guided_pair: bool) -> Result<Option<Update>, NoiseExhausted> {
        let Need::Denoise { t_in } = self.need else {
            debug_assert!(false, "advance on a row that needs {:?}", self.need);
            return Ok(None);
        };
        let w = self.params.guidance;
        // numpy rounds the Python floats (1 + w) and w to float32 and then computes in
        // float32.
        let guidance = (guided_pair && w != 0.0).then_some(((1.0 + w) as f32, w as f32));
        self.iterations += 1;
        let refine = self.rounds_left > 0
            && self.t <= self.params.back_refine.trigger_t
            && self.t > self.stride;
        if self.trace.is_some() {
            self.pending_trace = Some((self.t as i64, t_in, refine));
        }
        let mut renoise = None;
        if refine {
            self.need = Need::Confidence;
        } else if self.t <= self.stride {
            debug_assert!(self.prefetched.is_none(), "a draw made for no update");
            self.need = Need::Decode;
        } else {
            let n = self.t - self.stride;
            let eps = self.next_noise()?;
            let (a, b) = self.renoise_coefficients(n);
            renoise = Some((a, b, eps));
            self.t = n;
            self.need = self.denoise_need();
        }
        Ok(Some(Update {
            guidance,
            keep_self_cond: self.params.self_conditioning,
            renoise,
            needs_x0: self.trace.is_some() || matches!(self.need, Need::Confidence | Need::Decode),
        }))
    }

    /// Takes the `x0` the device computed for the row's last [`advance`](Self::advance)
    /// (its `x_t` and `self_cond` stay on the device).
    pub fn take_device_x0(&mut self, x0: Array2<f32>) {
        debug_assert_eq!(x0.dim(), self.x0.dim());
        self.x0 = x0;
        self.record_trace();
    }

    fn record_trace(&mut self) {
        if let (Some(trace), Some((t, t_in, refined))) =
            (&mut self.trace, self.pending_trace.take())
        {
            trace.push(TraceStep {
                t,
                t_in,
                x0: self.x0.clone(),
                refined,
            });
        }
    }

    /// `sqrt(ab(n))` and `r * sqrt(1 - ab(n))`, rounded to f32 as numpy does when it
    /// multiplies a float32 array by a Python float.
    fn renoise_coefficients(&self, n: usize) -> (f32, f32) {
        let ab = self.schedule.alpha_bar(n);
        (
            ab.sqrt() as f32,
            (self.params.renoise_scale * (1.0 - ab).sqrt()) as f32,
        )
    }

    /// Back&Refine: keeps the most confident positions of `x0` (re-noised to the next
    /// timestep), replaces the rest with fresh noise, and restarts at t = T-1.
    pub fn apply_confidence(&mut self, confidence: ArrayView1<f32>) -> Result<(), NoiseExhausted> {
        if self.need != Need::Confidence {
            debug_assert!(
                false,
                "apply_confidence on a row that needs {:?}",
                self.need
            );
            return Ok(());
        }
        let l = self.x.nrows();
        let keep_count =
            ((self.params.back_refine.keep_fraction * l as f64).ceil() as usize).min(l);
        let mut keep = vec![false; l];
        for pos in most_confident_first(confidence.slice(ndarray::s![..l])).take(keep_count) {
            keep[pos] = true;
        }
        let eps = self.next_noise()?;
        let n = self.t - self.stride;
        let (a, b) = self.renoise_coefficients(n);
        for (pos, kept) in keep.iter().enumerate() {
            let mut x = self.x.row_mut(pos);
            let x0 = self.x0.row(pos);
            let e = eps.row(pos);
            if *kept {
                Zip::from(&mut x)
                    .and(&x0)
                    .and(&e)
                    .for_each(|x, &x0, &e| *x = a * x0 + b * e);
            } else {
                x.assign(&e);
            }
        }
        self.t = self.schedule.num_timesteps() - 1;
        self.rounds_left -= 1;
        self.send_x = true;
        self.need = self.denoise_need();
        Ok(())
    }

    /// Takes the final decoder output; the row is done.
    pub fn apply_decoded(&mut self, ids: ArrayView1<i64>, confidence: ArrayView1<f32>) {
        self.output = Some(RowOutput {
            ids: ids.to_vec(),
            confidence: confidence.to_vec(),
        });
        self.need = Need::Done;
        self.device_slot = None;
    }

    /// The row's slot in the device's state pool, if it has one.
    pub(super) fn device_slot(&self) -> Option<usize> {
        self.device_slot.as_ref().map(StateSlot::index)
    }

    pub(super) fn set_device_slot(&mut self, slot: StateSlot) {
        self.device_slot = Some(slot);
    }

    /// `x_t` and `self_cond` the device has not got yet (copies), as sent from now on.
    pub(super) fn take_arrays_to_send(&mut self) -> (Option<Array2<f32>>, Option<Array2<f32>>) {
        let x = std::mem::take(&mut self.send_x).then(|| self.x.clone());
        let self_cond = std::mem::take(&mut self.send_self_cond).then(|| self.self_cond.clone());
        (x, self_cond)
    }
}

/// Positions by descending confidence, ties in position order, NaN last: numpy's
/// stable `argsort(-confidence)`, as the reference sampler orders them. (A comparison
/// that called NaN equal to everything would not be a total order, which the sort
/// may answer with a panic.)
fn most_confident_first(confidence: ArrayView1<f32>) -> impl Iterator<Item = usize> {
    let mut order: Vec<usize> = (0..confidence.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (confidence[a], confidence[b]);
        match (x.is_nan(), y.is_nan()) {
            (false, false) => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
            (nan_a, nan_b) => nan_a.cmp(&nan_b),
        }
    });
    order.into_iter()
}

#[cfg(test)]
mod order_tests {
    use super::most_confident_first;

    #[test]
    fn confidence_order_is_numpys_stable_argsort_with_nan_last() {
        let order = |c: &[f32]| most_confident_first(c.into()).collect::<Vec<_>>();
        assert_eq!(order(&[0.1, 0.9, 0.5, 0.9]), [1, 3, 2, 0]);
        assert_eq!(order(&[f32::NAN, 0.9, 0.8, 0.1]), [1, 2, 3, 0]);
        assert_eq!(order(&[0.2, f32::NAN, 0.7, f32::NAN]), [2, 0, 1, 3]);
        let many: Vec<f32> = (0..64)
            .map(|i| if i % 3 == 0 { f32::NAN } else { (i % 7) as f32 })
            .collect();
        assert_eq!(order(&many).len(), 64);
    }
}
