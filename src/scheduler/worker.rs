//! One worker thread: owns a set of sessions and runs the denoising loop over the
//! rows of every job it holds.
//!
//! Each pass of the loop is one "tick": take in new jobs (as the batching mode
//! allows), drop jobs whose client left or whose deadline passed, encode new images
//! in one encoder call, advance every row by one model call with [`sampler::step`],
//! and answer the jobs whose rows are all done. In continuous mode a job arriving
//! mid-way joins at the next tick, at its own timestep, in the same denoiser call.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use crossbeam_channel::{Receiver, TryRecvError};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis};

use super::{
    BatchingMode, Candidate, CaptionJob, CaptionOutput, InferError, LoadedInfo, Queued,
    SchedulerConfig, StepEvent, StepSender, StepToken,
};
use crate::bundle::Bundle;
use crate::metrics::Metrics;
use crate::runtime::{Models, OrtRuntime, RuntimeError};
use crate::sampler::{
    self, ActiveRow, Denoiser, DeviceLoop, DeviceRow, DeviceStep, ImageKv, KvRef, Need, Row,
    SeededNoise, Snapshot,
};
use crate::sampler::{Schedule, mbr};
use crate::text::TextDecoder;

pub(super) struct WorkerContext {
    pub index: usize,
    pub rx: Receiver<Queued>,
    pub bundle: Arc<Bundle>,
    pub text: Arc<TextDecoder>,
    pub metrics: Arc<Metrics>,
    pub config: SchedulerConfig,
    /// Set when the server's shutdown grace period is over: every job held or queued is
    /// answered [`InferError::ShuttingDown`] at once (see [`Scheduler::abandon`]).
    ///
    /// [`Scheduler::abandon`]: super::Scheduler::abandon
    pub abandoned: Arc<AtomicBool>,
    /// Where this worker says it is in a step, for the health probes.
    pub steps: Arc<super::WorkerSteps>,
    /// Jobs taken from the queue that did not fit a running batch, shared by the
    /// workers.
    pub held: Arc<super::HeldJobs>,
    /// The wait of the last job taken, for refusing jobs that would wait out their
    /// deadline ([`super::Scheduler::expected_wait`]).
    pub last_admission: Arc<super::LastAdmission>,
}

/// A job a worker has taken from the queue.
struct ActiveJob {
    job: CaptionJob,
    admitted: Instant,
    /// The image K/V, once encoded.
    kv: Option<ImageKv>,
    rows: Vec<Row>,
    /// Step events of a streaming request.
    progress: Option<StepSender>,
}

impl ActiveJob {
    /// Denoiser rows this job adds to each call.
    fn denoiser_rows(&self) -> usize {
        denoiser_rows(&self.job.params)
    }
}

/// Denoiser rows a job with `params` adds to each call: one per candidate, two when
/// guided.
fn denoiser_rows(params: &sampler::SamplerParams) -> usize {
    params.denoiser_rows_per_candidate() * params.candidates.max(1)
}

/// What a worker runs its batches on: the bundle's sessions ([`Models`]), or a fake in
/// tests.
pub(super) trait Backend: Denoiser<Error = RuntimeError> {
    /// `pixels [B,3,H,W]` -> each image's K/V (`[2*layers, tokens, hidden]`).
    fn encode_images(&mut self, pixels: ArrayView4<f32>) -> Result<Vec<ImageKv>, RuntimeError>;

    /// The most images the backend can hold K/V for at once.
    fn max_images_in_flight(&self) -> usize {
        usize::MAX
    }

    /// Rows run so far only to fill denoiser calls (fixed shapes, a batch laid out in
    /// halves).
    fn padding_rows_total(&self) -> u64 {
        0
    }
}

impl Backend for Models {
    fn encode_images(&mut self, pixels: ArrayView4<f32>) -> Result<Vec<ImageKv>, RuntimeError> {
        Models::encode_images(self, pixels)
    }

    fn max_images_in_flight(&self) -> usize {
        Models::max_images_in_flight(self)
    }

    fn padding_rows_total(&self) -> u64 {
        Models::padding_rows_total(self)
    }
}

/// Times denoiser calls and counts their rows for the metrics.
struct Instrumented<'a, B> {
    models: &'a mut B,
    metrics: &'a Metrics,
}

impl<B: Backend> Instrumented<'_, B> {
    /// `padding_before`: the backend's padding count before the call.
    fn record_denoiser_call(&self, start: Instant, rows: usize, padding_before: u64) {
        self.metrics
            .denoiser_step_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        self.metrics.batch_rows.observe(rows as f64);
        let padding = self
            .models
            .padding_rows_total()
            .saturating_sub(padding_before);
        self.metrics.denoiser_padding_rows_total.inc_by(padding);
    }
}

impl<B: Backend> DeviceLoop for Instrumented<'_, B> {
    type Error = RuntimeError;

    fn step(&mut self, rows: Vec<DeviceRow<'_>>) -> Result<DeviceStep, RuntimeError> {
        let denoiser_rows = rows.iter().map(DeviceRow::denoiser_rows).sum();
        let start = Instant::now();
        let padding_before = self.models.padding_rows_total();
        let Some(device) = self.models.device_loop() else {
            return Err(RuntimeError::Inference {
                graph: "denoiser",
                reason: "the backend has no device loop".into(),
            });
        };
        let out = device.step(rows);
        self.record_denoiser_call(start, denoiser_rows, padding_before);
        out
    }
}

impl<B: Backend> Denoiser for Instrumented<'_, B> {
    type Error = RuntimeError;

    fn waits_on_device(&self) -> bool {
        self.models.waits_on_device()
    }

    fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, RuntimeError> {
        let start = Instant::now();
        let padding_before = self.models.padding_rows_total();
        let out = Denoiser::denoise(self.models, x, self_cond, t, kv);
        self.record_denoiser_call(start, t.len(), padding_before);
        out
    }

    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop<Error = RuntimeError>> {
        if self.models.device_loop().is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn decode(
        &mut self,
        x0: ArrayView3<f32>,
    ) -> Result<(ndarray::Array2<i64>, ndarray::Array2<f32>), RuntimeError> {
        let start = Instant::now();
        let out = Denoiser::decode(self.models, x0);
        self.metrics
            .decoder_call_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        out
    }
}

pub(super) fn run(
    ctx: WorkerContext,
    runtime: OrtRuntime,
    loaded: mpsc::Sender<Result<LoadedInfo, RuntimeError>>,
) {
    // The load's log lines say which worker they are about.
    let span = tracing::info_span!("worker", index = ctx.index);
    let load = std::panic::catch_unwind(AssertUnwindSafe(|| {
        span.in_scope(|| Models::load(&runtime, &ctx.bundle, &ctx.config.session))
    }));
    let models = match load {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let _ = loaded.send(Err(e));
            return;
        }
        Err(panic) => {
            let _ = loaded.send(Err(RuntimeError::Session {
                graph: "worker",
                path: ctx.bundle.dir.clone(),
                reason: format!(
                    "worker {} panicked while loading the bundle: {}",
                    ctx.index,
                    panic_message(panic.as_ref())
                ),
            }));
            return;
        }
    };
    if ctx.index == 0 {
        ctx.metrics.model_load_seconds.set(models.load_seconds);
    }
    let _ = loaded.send(Ok(LoadedInfo {
        device: models.device,
        load_seconds: models.load_seconds,
        row_parallelism: models.row_parallelism,
        intra_op_threads: models.intra_op_threads,
        state_on_device: models.device_loop_stats().is_some(),
    }));
    drop(loaded);
    Worker::new(ctx, models).run();
}

struct Worker<B> {
    ctx: WorkerContext,
    models: B,
    schedule: Arc<Schedule>,
    latent_shape: (usize, usize),
    active: Vec<ActiveJob>,
    closed: bool,
}

impl<B: Backend> Worker<B> {
    fn new(ctx: WorkerContext, models: B) -> Worker<B> {
        let m = &ctx.bundle.manifest;
        Worker {
            schedule: Arc::new(Schedule::from_spec(&m.schedule)),
            latent_shape: (m.text.max_len, m.text.latent_dim),
            models,
            active: Vec::new(),
            closed: false,
            ctx,
        }
    }

    /// Serves until the queue is closed and drained. A panic anywhere in the loop is
    /// caught here: the requests of the running batch get an error, the batch state is
    /// rebuilt from scratch, the restart is logged and counted
    /// (`ladic_worker_restarts_total`), and the loop starts again. Jobs taken from the
    /// queue but not yet in the batch (`held`) are kept; so are the sessions, which hold
    /// no state between calls.
    fn run(mut self) {
        loop {
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.serve())) {
                Ok(()) => break,
                Err(panic) => self.restart(&panic_message(panic.as_ref())),
            }
        }
        tracing::debug!(worker = self.ctx.index, "worker stopped");
    }

    fn serve(&mut self) {
        loop {
            self.admit();
            if self.ctx.abandoned.load(Ordering::SeqCst) {
                self.abandon_all();
            }
            if self.active.is_empty() {
                if self.closed && self.ctx.held.is_empty() && self.ctx.rx.is_empty() {
                    return;
                }
                continue;
            }
            let start = Instant::now();
            let steps = self.ctx.steps.clone();
            let in_step = steps.enter(self.ctx.index);
            let result = self.tick();
            drop(in_step);
            self.ctx
                .metrics
                .worker_tick_duration_seconds
                .observe(start.elapsed().as_secs_f64());
            if let Err(e) = result {
                let reason = e.to_string();
                tracing::error!(worker = self.ctx.index, %reason, "batch failed; failing its requests");
                self.fail_active(&InferError::Failed(reason));
            }
        }
    }

    fn restart(&mut self, panic: &str) {
        tracing::error!(
            worker = self.ctx.index,
            panic,
            failed_requests = self.active.len(),
            "worker panicked; failing its batch and restarting"
        );
        self.ctx.metrics.worker_restarts_total.inc();
        self.fail_active(&InferError::Failed(
            "internal error in the worker".to_string(),
        ));
    }

    /// Answers every job of the running batch with `error` and empties the batch.
    fn fail_active(&mut self, error: &InferError) {
        for job in std::mem::take(&mut self.active) {
            self.release(&job);
            let _ = job.job.reply.send(Err(error.clone()));
        }
    }

    /// The shutdown grace period is over: answers every job this worker holds, and
    /// every job still in the queue, [`InferError::ShuttingDown`], so that their
    /// clients hear at once instead of being cut off when the process exits.
    fn abandon_all(&mut self) {
        let mut jobs: Vec<CaptionJob> = Vec::new();
        for job in std::mem::take(&mut self.active) {
            self.release(&job);
            jobs.push(job.job);
        }
        jobs.extend(self.ctx.held.take_all().into_iter().map(|q| q.job));
        jobs.extend(self.ctx.rx.try_iter().map(|q| q.job));
        if jobs.is_empty() {
            return;
        }
        tracing::info!(
            worker = self.ctx.index,
            requests = jobs.len(),
            "shutdown grace period over; answering the requests still held 503"
        );
        self.set_queue_depth();
        let now = Instant::now();
        for job in jobs {
            // Gone or past its deadline anyway: counted (and answered) as such.
            let reason = leave_reason(&job, now).unwrap_or(SHUTDOWN);
            self.drop_job(job, reason);
        }
    }

    fn rows_in_batch(&self) -> usize {
        self.active.iter().map(ActiveJob::denoiser_rows).sum()
    }

    /// Takes jobs as the batching mode allows, the held ones first (oldest first), then
    /// the queue's; blocks only when idle. A job that does not fit the running batch is
    /// held for whichever worker has room first, and the jobs behind it wait their turn.
    fn admit(&mut self) {
        let max_rows = self.ctx.config.max_batch_rows.max(1);
        let may_join_running = self.ctx.config.batching == BatchingMode::Continuous;
        if !self.active.is_empty() && !may_join_running {
            return;
        }
        let one_job_only = self.ctx.config.batching == BatchingMode::Off;
        let max_images = self.models.max_images_in_flight().max(1);
        loop {
            let idle = self.active.is_empty();
            let fits = |job: &CaptionJob| {
                idle || (self.rows_in_batch() + denoiser_rows(&job.params) <= max_rows
                    && self.active.len() < max_images)
            };
            let now = Instant::now();
            let held = self
                .ctx
                .held
                .pop_if(|q| leave_reason(&q.job, now).is_some() || fits(&q.job));
            let queued = if let Some(queued) = held {
                queued
            } else if !self.ctx.held.is_empty() {
                break; // the oldest held job does not fit: nothing newer goes first
            } else if self.closed {
                return;
            } else if idle {
                // Idle: wait for a job, queued or held by a busy worker, but wake up now
                // and then to notice a closed queue.
                crossbeam_channel::select! {
                    recv(self.ctx.rx) -> job => match job {
                        Ok(job) => job,
                        Err(_) => {
                            self.closed = true;
                            return;
                        }
                    },
                    recv(self.ctx.held.wakes()) -> _ => continue,
                    default(std::time::Duration::from_millis(200)) => return,
                }
            } else {
                match self.ctx.rx.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            };
            let Queued { job, progress } = queued;
            let now = Instant::now();
            let waited = now.duration_since(job.enqueued);
            let leaving = leave_reason(&job, now);
            if leaving.is_none() && !fits(&job) {
                self.ctx.held.push(Queued { job, progress });
                self.set_queue_depth();
                break;
            }
            // The job leaves the queue, admitted or dropped. Both waits are counted (under
            // overload the waits that end in a drop are the longest) and both measure the
            // queue's wait: when every job waits out its deadline, the drops are the only
            // measure.
            self.set_queue_depth();
            self.ctx
                .metrics
                .queue_wait_seconds
                .observe(waited.as_secs_f64());
            self.ctx
                .last_admission
                .record(now, waited, job.queued_behind);
            if let Some(reason) = leaving {
                self.drop_job(job, reason);
                continue;
            }
            self.ctx
                .metrics
                .rows_in_flight
                .add(job.params.candidates as i64);
            let candidates = job.params.candidates;
            let mut admitted = ActiveJob {
                job,
                admitted: now,
                kv: None,
                rows: Vec::new(),
                progress,
            };
            admitted.rows.reserve(candidates);
            self.active.push(admitted);
            if one_job_only || self.rows_in_batch() >= max_rows || self.active.len() >= max_images {
                break;
            }
        }
    }

    /// The queue-depth gauge: jobs queued or held.
    fn set_queue_depth(&self) {
        let depth = self.ctx.rx.len() + self.ctx.held.len();
        self.ctx.metrics.queue_depth.set(depth as i64);
    }

    fn release(&self, job: &ActiveJob) {
        self.ctx
            .metrics
            .rows_in_flight
            .sub(job.job.params.candidates as i64);
    }

    /// Drops jobs nobody waits for any more and fails those past their deadline.
    fn prune(&mut self) {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(self.active.len());
        for job in std::mem::take(&mut self.active) {
            if let Some(reason) = leave_reason(&job.job, now) {
                self.release(&job);
                self.drop_job(job.job, reason);
            } else {
                kept.push(job);
            }
        }
        self.active = kept;
    }

    fn drop_job(&self, job: CaptionJob, reason: &'static str) {
        drop_job(&self.ctx.metrics, job, reason);
    }

    /// Encodes the images of newly admitted jobs in batched encoder calls and starts
    /// their rows. An encoder call that fails fails the jobs of its images only: the
    /// jobs already running keep their rows and go on with the step.
    fn encode_new(&mut self) {
        let new: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].kv.is_none())
            .collect();
        if new.is_empty() {
            return;
        }
        let max_rows = self.ctx.config.max_batch_rows.max(1);
        // Per job of `active`: the error that fails it.
        let mut errors: Vec<Option<InferError>> = vec![None; self.active.len()];
        for chunk in new.chunks(max_rows) {
            if let Err(e) = self.encode_chunk(chunk) {
                let reason = e.to_string();
                tracing::error!(
                    worker = self.ctx.index,
                    %reason,
                    images = chunk.len(),
                    "encoding failed; failing the requests of those images"
                );
                for &i in chunk {
                    errors[i] = Some(InferError::Failed(reason.clone()));
                }
            }
        }
        if errors.iter().all(Option::is_none) {
            return;
        }
        let mut kept = Vec::with_capacity(self.active.len());
        for (job, error) in std::mem::take(&mut self.active).into_iter().zip(errors) {
            match error {
                Some(error) => {
                    self.release(&job);
                    let _ = job.job.reply.send(Err(error));
                }
                None => kept.push(job),
            }
        }
        self.active = kept;
    }

    /// Encodes the images of the jobs at `chunk` (indices into `active`) in one
    /// encoder call and starts their rows.
    fn encode_chunk(&mut self, chunk: &[usize]) -> Result<(), RuntimeError> {
        let views: Vec<_> = chunk
            .iter()
            .map(|&i| self.active[i].job.pixels.view())
            .collect();
        let pixels: Array4<f32> =
            ndarray::stack(Axis(0), &views).map_err(|e| RuntimeError::Inference {
                graph: "encoder",
                reason: format!("images of different sizes in one batch: {e}"),
            })?;
        let start = Instant::now();
        let kv = self.models.encode_images(pixels.view())?;
        self.ctx
            .metrics
            .encoder_call_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        if kv.len() != chunk.len() {
            return Err(RuntimeError::Inference {
                graph: "encoder",
                reason: format!("{} K/V for {} images", kv.len(), chunk.len()),
            });
        }
        for (kv, &i) in kv.into_iter().zip(chunk) {
            let job = &mut self.active[i];
            job.kv = Some(kv);
            for c in 0..job.job.params.candidates {
                let noise = SeededNoise::new(job.job.seed, c as u64);
                let row = Row::new(
                    job.job.params.clone(),
                    self.schedule.clone(),
                    self.latent_shape,
                    Box::new(noise),
                    false,
                )
                .map_err(|e| RuntimeError::Inference {
                    graph: "sampler",
                    reason: e.to_string(),
                })?;
                job.rows.push(row);
            }
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), RuntimeError> {
        self.prune();
        self.encode_new();
        let max_rows = self.ctx.config.max_batch_rows.max(1);
        let (snapshots, owners) = {
            let mut rows: Vec<ActiveRow<'_>> = Vec::new();
            // Per row: streamed or not, and (job, candidate) it belongs to.
            let mut observe: Vec<bool> = Vec::new();
            let mut owners: Vec<(usize, usize)> = Vec::new();
            for (j, job) in self.active.iter_mut().enumerate() {
                let Some(kv) = job.kv.as_ref() else { continue };
                let streaming = job.progress.as_ref().is_some_and(|p| !p.is_closed());
                for (c, row) in job.rows.iter_mut().enumerate() {
                    if row.need() != Need::Done {
                        rows.push(ActiveRow {
                            row,
                            kv: kv.as_kv_ref(),
                        });
                        observe.push(streaming);
                        owners.push((j, c));
                    }
                }
            }
            let mut den = Instrumented {
                models: &mut self.models,
                metrics: &self.ctx.metrics,
            };
            let (_, snapshots) = sampler::step_observed(&mut den, &mut rows, max_rows, &observe)
                .map_err(|e| match e {
                    sampler::StepError::Model(e) => e,
                    other => RuntimeError::Inference {
                        graph: "sampler",
                        reason: other.to_string(),
                    },
                })?;
            (snapshots, owners)
        };
        self.send_steps(snapshots, &owners);
        self.finish_done();
        Ok(())
    }

    /// Sends each snapshot to its job's stream; drops it when the stream is full.
    fn send_steps(&self, snapshots: Vec<Snapshot>, owners: &[(usize, usize)]) {
        for snap in snapshots {
            let (j, candidate) = owners[snap.row];
            let Some(tx) = self.active[j].progress.as_ref() else {
                continue;
            };
            let event = step_event(&self.ctx.text, candidate, snap);
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = tx.try_send(event) {
                self.ctx.metrics.stream_events_dropped_total.inc();
            }
        }
    }

    /// Answers every job whose rows are all done.
    fn finish_done(&mut self) {
        let (done, running): (Vec<ActiveJob>, Vec<ActiveJob>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|j| !j.rows.is_empty() && j.rows.iter().all(|r| r.need() == Need::Done));
        self.active = running;
        // All released first: a panic while assembling one answer must not leave the
        // others' rows counted in flight.
        for job in &done {
            self.release(job);
        }
        for job in done {
            let result = assemble(&self.ctx.text, &job);
            let _ = job.job.reply.send(result);
        }
    }
}

/// A snapshot of a candidate's x0 as the step event a streaming client gets.
fn step_event(text: &TextDecoder, candidate: usize, snap: Snapshot) -> StepEvent {
    let cleaned = text.rules.clean(&snap.ids);
    let tokens = snap
        .ids
        .iter()
        .zip(&snap.confidence)
        .enumerate()
        .filter(|(_, (id, _))| !text.rules.special_ids.contains(id))
        .map(|(position, (&id, &confidence))| StepToken {
            position,
            text: text.token(id).unwrap_or_default(),
            confidence,
        })
        .collect();
    StepEvent {
        candidate,
        step: snap.iteration,
        t: snap.t,
        caption: text.caption(&cleaned).unwrap_or_default(),
        confidence: text.rules.caption_confidence(&snap.ids, &snap.confidence),
        tokens,
        refine: snap.refine,
    }
}

/// The text of a caught panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Candidates -> cleaned ids, texts, confidences and the MBR choice.
fn assemble(text: &TextDecoder, job: &ActiveJob) -> Result<CaptionOutput, InferError> {
    let mut candidates = Vec::with_capacity(job.rows.len());
    for row in &job.rows {
        let out = row
            .output()
            .ok_or_else(|| InferError::Failed("a candidate finished without output".into()))?;
        let ids = text.rules.clean(&out.ids);
        let confidence = text.rules.caption_confidence(&out.ids, &out.confidence);
        let caption = text
            .caption(&ids)
            .map_err(|e| InferError::Failed(e.to_string()))?;
        candidates.push(Candidate {
            caption,
            confidence,
            ids,
        });
    }
    let cleaned: Vec<Vec<i64>> = candidates.iter().map(|c| c.ids.clone()).collect();
    let chosen = mbr::choose(&cleaned);
    Ok(CaptionOutput {
        candidates,
        chosen,
        queue_time: job.admitted.duration_since(job.job.enqueued),
        inference_time: job.admitted.elapsed(),
    })
}

/// The `reason` label of `images_dropped_total` for a passed deadline.
const DEADLINE: &str = "deadline";

/// The `reason` label of `images_dropped_total` for a job still held when the
/// shutdown grace period ended.
const SHUTDOWN: &str = "shutdown";

/// Counts a job that leaves before its answer, and answers it as its reason says:
/// 504 for its deadline, 503 for the end of a shutdown's grace period (a client that
/// left hears nothing).
pub(super) fn drop_job(metrics: &Metrics, job: CaptionJob, reason: &'static str) {
    metrics
        .images_dropped_total
        .with_label_values(&[reason])
        .inc();
    let answer = match reason {
        DEADLINE => InferError::Deadline,
        SHUTDOWN => InferError::ShuttingDown,
        _ => return,
    };
    let _ = job.reply.send(Err(answer));
}

/// Why a job leaves before its answer, if it does: its deadline passed, or its client
/// left. The deadline is checked first: when it passes, the handler's own timer closes
/// the reply at about the same moment, and the reason is still the deadline.
pub(super) fn leave_reason(job: &CaptionJob, now: Instant) -> Option<&'static str> {
    if now >= job.deadline {
        Some(DEADLINE)
    } else if job.reply.is_closed() {
        Some("client_gone")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use ndarray::Array2;
    use tokio::sync::oneshot;

    use super::*;
    use crate::runtime::{DeviceChoice, SessionOptions};
    use crate::sampler::SamplerParams;

    /// A backend without ONNX Runtime: zeros in, a fixed caption out, and a panic in
    /// the next denoiser call whenever `panic_next` is set.
    struct Fake {
        kv_shape: (usize, usize, usize),
        ids: Vec<i64>,
        panic_next: Arc<AtomicBool>,
        /// What `max_images_in_flight` says.
        max_images: usize,
        /// The most distinct images one denoiser call has seen.
        most_images: Arc<std::sync::atomic::AtomicUsize>,
        /// How long each denoiser call takes.
        step_time: Duration,
    }

    /// The first pixel value of an image the fake encoder fails on.
    const UNENCODABLE: f32 = 1.0;

    impl Fake {
        fn new(m: &crate::bundle::Manifest, max_images: usize) -> Fake {
            let d = &m.diffuser;
            Fake {
                kv_shape: (2 * d.layers, d.image_tokens, d.hidden),
                // [CLS] <first word> [SEP]: a one-word caption.
                ids: vec![m.text.cls_id, 6, m.text.sep_id],
                panic_next: Arc::new(AtomicBool::new(false)),
                max_images,
                most_images: Arc::default(),
                step_time: Duration::ZERO,
            }
        }
    }

    fn worker_context(
        bundle: &Arc<Bundle>,
        metrics: &Arc<Metrics>,
        rx: crossbeam_channel::Receiver<Queued>,
    ) -> WorkerContext {
        let text = TextDecoder::load(&bundle.tokenizer_path, &bundle.manifest.text).unwrap();
        WorkerContext {
            index: 0,
            rx,
            bundle: bundle.clone(),
            text: Arc::new(text),
            metrics: metrics.clone(),
            abandoned: Arc::default(),
            steps: Arc::new(super::super::WorkerSteps::new(1)),
            held: Arc::new(super::super::HeldJobs::new()),
            last_admission: Arc::new(super::super::LastAdmission::new()),
            config: SchedulerConfig {
                workers: 1,
                batching: BatchingMode::Continuous,
                max_batch_rows: 32,
                queue_size: 8,
                session: SessionOptions {
                    device: DeviceChoice::Cpu,
                    intra_op_threads: 1,
                    row_parallelism: 1,
                    kv_pool: true,
                    cuda_graph: false,
                    device_loop: false,
                    max_batch_rows: 32,
                },
            },
        }
    }

    fn parity_bundle() -> Arc<Bundle> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bundle");
        Arc::new(Bundle::load(&dir).unwrap())
    }

    impl Denoiser for Fake {
        type Error = RuntimeError;

        fn denoise(
            &mut self,
            x: ArrayView3<f32>,
            _self_cond: ArrayView3<f32>,
            _t: &[i64],
            kv: &[KvRef<'_>],
        ) -> Result<Array3<f32>, RuntimeError> {
            if self.panic_next.swap(false, Ordering::SeqCst) {
                panic!("injected fault in the fake denoiser");
            }
            let mut images: Vec<*const Array3<f32>> = kv
                .iter()
                .filter_map(|k| match k {
                    KvRef::Image(a) => Some(Arc::as_ptr(a)),
                    _ => None,
                })
                .collect();
            images.sort_unstable();
            images.dedup();
            self.most_images.fetch_max(images.len(), Ordering::SeqCst);
            std::thread::sleep(self.step_time);
            Ok(Array3::zeros(x.dim()))
        }

        fn decode(
            &mut self,
            x0: ArrayView3<f32>,
        ) -> Result<(Array2<i64>, Array2<f32>), RuntimeError> {
            let (b, l, _) = x0.dim();
            let ids = Array2::from_shape_fn((b, l), |(_, i)| self.ids.get(i).copied().unwrap_or(0));
            Ok((ids, Array2::from_elem((b, l), 0.9)))
        }
    }

    impl Backend for Fake {
        fn encode_images(&mut self, pixels: ArrayView4<f32>) -> Result<Vec<ImageKv>, RuntimeError> {
            if pixels.outer_iter().any(|p| p[[0, 0, 0]] == UNENCODABLE) {
                return Err(RuntimeError::Inference {
                    graph: "encoder",
                    reason: "injected encoder fault".to_string(),
                });
            }
            let (a, b, c) = self.kv_shape;
            Ok((0..pixels.dim().0)
                .map(|_| ImageKv::Host(Arc::new(Array3::zeros((a, b, c)))))
                .collect())
        }

        fn max_images_in_flight(&self) -> usize {
            self.max_images
        }
    }

    fn submit(
        tx: &crossbeam_channel::Sender<Queued>,
        params: &SamplerParams,
        size: usize,
    ) -> oneshot::Receiver<Result<CaptionOutput, InferError>> {
        submit_pixels(tx, params, Array3::zeros((3, size, size)))
    }

    fn submit_pixels(
        tx: &crossbeam_channel::Sender<Queued>,
        params: &SamplerParams,
        pixels: Array3<f32>,
    ) -> oneshot::Receiver<Result<CaptionOutput, InferError>> {
        let (job, rx) = CaptionJob::new(
            pixels,
            params.clone(),
            1,
            Instant::now() + Duration::from_secs(60),
        );
        tx.send(Queued {
            job,
            progress: None,
        })
        .unwrap();
        rx
    }

    #[test]
    fn a_panic_fails_the_batch_and_the_worker_keeps_serving() {
        let bundle = parity_bundle();
        let m = &bundle.manifest;
        let metrics = Arc::new(Metrics::new().unwrap());
        let (tx, rx) = crossbeam_channel::bounded(8);
        let ctx = worker_context(&bundle, &metrics, rx);
        let fake = Fake::new(m, usize::MAX);
        let panic_next = fake.panic_next.clone();
        panic_next.store(true, Ordering::SeqCst);
        let worker = std::thread::spawn(move || Worker::new(ctx, fake).run());
        let mut params = SamplerParams::defaults(m);
        params.steps = 3;
        let size = m.image.size as usize;

        let failed = submit(&tx, &params, size).blocking_recv().unwrap();
        assert!(
            matches!(&failed, Err(InferError::Failed(m)) if m.contains("internal error")),
            "{failed:?}"
        );
        assert_eq!(metrics.worker_restarts_total.get(), 1);
        assert_eq!(
            metrics.rows_in_flight.get(),
            0,
            "the failed batch is released"
        );

        // The same worker thread serves the next requests.
        for _ in 0..2 {
            let out = submit(&tx, &params, size).blocking_recv().unwrap().unwrap();
            assert!(out.best().unwrap().caption.ends_with('.'));
        }
        assert_eq!(metrics.worker_restarts_total.get(), 1);

        // A second panic is caught as well.
        panic_next.store(true, Ordering::SeqCst);
        assert!(submit(&tx, &params, size).blocking_recv().unwrap().is_err());
        assert!(submit(&tx, &params, size).blocking_recv().unwrap().is_ok());
        assert_eq!(metrics.worker_restarts_total.get(), 2);

        drop(tx);
        worker
            .join()
            .expect("the worker exits cleanly once the queue closes");
    }

    #[test]
    fn an_encoder_failure_fails_only_the_requests_of_its_images() {
        let bundle = parity_bundle();
        let m = &bundle.manifest;
        let metrics = Arc::new(Metrics::new().unwrap());
        let (tx, rx) = crossbeam_channel::bounded(8);
        let ctx = worker_context(&bundle, &metrics, rx);
        let mut fake = Fake::new(m, usize::MAX);
        fake.step_time = Duration::from_millis(5);
        let worker = std::thread::spawn(move || Worker::new(ctx, fake).run());
        let mut params = SamplerParams::defaults(m);
        params.steps = 60;
        let size = m.image.size as usize;

        // A long request is running when an image the encoder fails on joins it.
        let running = submit(&tx, &params, size);
        let start = Instant::now();
        while metrics.rows_in_flight.get() == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        let bad = submit_pixels(
            &tx,
            &params,
            Array3::from_elem((3, size, size), UNENCODABLE),
        );
        let failed = bad.blocking_recv().unwrap();
        assert!(
            matches!(&failed, Err(InferError::Failed(m)) if m.contains("injected encoder fault")),
            "{failed:?}"
        );
        let out = running.blocking_recv().unwrap();
        assert!(out.is_ok(), "the running request goes on: {out:?}");
        assert_eq!(metrics.rows_in_flight.get(), 0, "both are released");
        assert!(submit(&tx, &params, size).blocking_recv().unwrap().is_ok());
        drop(tx);
        worker.join().unwrap();
    }

    #[test]
    fn no_more_images_in_flight_than_the_backend_holds() {
        let bundle = parity_bundle();
        let m = &bundle.manifest;
        let metrics = Arc::new(Metrics::new().unwrap());
        let (tx, rx) = crossbeam_channel::bounded(8);
        let ctx = worker_context(&bundle, &metrics, rx);
        let fake = Fake::new(m, 2);
        let most = fake.most_images.clone();
        let mut params = SamplerParams::defaults(m);
        params.steps = 4;
        let size = m.image.size as usize;
        // Queued before the worker starts, so that it could take all six at once.
        let replies: Vec<_> = (0..6).map(|_| submit(&tx, &params, size)).collect();
        let worker = std::thread::spawn(move || Worker::new(ctx, fake).run());
        for reply in replies {
            assert!(reply.blocking_recv().unwrap().is_ok());
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "batched, but two images at most"
        );
        drop(tx);
        worker.join().unwrap();
    }
}
