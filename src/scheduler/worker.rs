//! One worker thread: owns a set of sessions and runs the denoising loop over the
//! rows of every job it holds.
//!
//! Each pass of the loop is one "tick": take in new jobs (as the batching mode
//! allows), drop jobs whose client left or whose deadline passed, encode new images
//! in one encoder call, advance every row by one model call with [`sampler::step`],
//! and answer the jobs whose rows are all done. In continuous mode a job arriving
//! mid-way joins at the next tick, at its own timestep, in the same denoiser call.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use ndarray::{Array3, Array4, ArrayView3, Axis};

use super::{
    BatchingMode, Candidate, CaptionJob, CaptionOutput, InferError, LoadedInfo, SchedulerConfig,
};
use crate::bundle::Bundle;
use crate::metrics::Metrics;
use crate::runtime::{Models, OrtRuntime, RuntimeError};
use crate::sampler::{self, ActiveRow, Denoiser, KvRef, Need, Row, SeededNoise};
use crate::sampler::{Schedule, mbr};
use crate::text::TextDecoder;

pub(super) struct WorkerContext {
    pub index: usize,
    pub rx: Receiver<CaptionJob>,
    pub runtime: OrtRuntime,
    pub bundle: Arc<Bundle>,
    pub text: Arc<TextDecoder>,
    pub metrics: Arc<Metrics>,
    pub config: SchedulerConfig,
}

/// A job a worker has taken from the queue.
struct ActiveJob {
    job: CaptionJob,
    admitted: Instant,
    /// The image K/V, once encoded.
    kv: Option<Arc<Array3<f32>>>,
    rows: Vec<Row>,
}

impl ActiveJob {
    /// Denoiser rows this job adds to each call.
    fn denoiser_rows(&self) -> usize {
        let per = if self.job.params.guidance != 0.0 {
            2
        } else {
            1
        };
        per * self.job.params.candidates.max(1)
    }
}

/// Times denoiser calls and counts their rows for the metrics.
struct Instrumented<'a> {
    models: &'a mut Models,
    metrics: &'a Metrics,
}

impl Denoiser for Instrumented<'_> {
    type Error = RuntimeError;

    fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, RuntimeError> {
        let start = Instant::now();
        let out = Denoiser::denoise(self.models, x, self_cond, t, kv);
        self.metrics
            .denoiser_step_duration_seconds
            .observe(start.elapsed().as_secs_f64());
        self.metrics.batch_rows.observe(t.len() as f64);
        out
    }

    fn decode(
        &mut self,
        x0: ArrayView3<f32>,
    ) -> Result<(ndarray::Array2<i64>, ndarray::Array2<f32>), RuntimeError> {
        Denoiser::decode(self.models, x0)
    }
}

pub(super) fn run(ctx: WorkerContext, loaded: mpsc::Sender<Result<LoadedInfo, RuntimeError>>) {
    let models = match Models::load(&ctx.runtime, &ctx.bundle, &ctx.config.session) {
        Ok(m) => m,
        Err(e) => {
            let _ = loaded.send(Err(e));
            return;
        }
    };
    if ctx.index == 0 {
        ctx.metrics.model_load_seconds.set(models.load_seconds);
    }
    let _ = loaded.send(Ok(LoadedInfo {
        device: models.device,
        load_seconds: models.load_seconds,
    }));
    drop(loaded);
    Worker::new(ctx, models).run();
}

struct Worker {
    ctx: WorkerContext,
    models: Models,
    schedule: Arc<Schedule>,
    latent_shape: (usize, usize),
    active: Vec<ActiveJob>,
    /// A job taken from the queue that did not fit in the running batch yet.
    held: VecDeque<CaptionJob>,
    closed: bool,
}

impl Worker {
    fn new(ctx: WorkerContext, models: Models) -> Worker {
        let m = &ctx.bundle.manifest;
        Worker {
            schedule: Arc::new(Schedule::from_spec(&m.schedule)),
            latent_shape: (m.text.max_len, m.text.latent_dim),
            models,
            active: Vec::new(),
            held: VecDeque::new(),
            closed: false,
            ctx,
        }
    }

    fn run(mut self) {
        loop {
            self.admit();
            if self.active.is_empty() {
                if self.closed && self.held.is_empty() {
                    break;
                }
                continue;
            }
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.tick()));
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("internal error in the worker (panic)".to_string()),
            };
            if let Some(reason) = failure {
                tracing::error!(worker = self.ctx.index, %reason, "batch failed; failing its requests");
                for job in std::mem::take(&mut self.active) {
                    self.release(&job);
                    let _ = job.job.reply.send(Err(InferError::Failed(reason.clone())));
                }
            }
        }
        tracing::debug!(worker = self.ctx.index, "worker stopped");
    }

    fn rows_in_batch(&self) -> usize {
        self.active.iter().map(ActiveJob::denoiser_rows).sum()
    }

    /// Takes jobs from the queue as the batching mode allows; blocks only when idle.
    fn admit(&mut self) {
        let max_rows = self.ctx.config.max_batch_rows.max(1);
        let may_join_running = self.ctx.config.batching == BatchingMode::Continuous;
        if !self.active.is_empty() && !may_join_running {
            return;
        }
        let one_job_only = self.ctx.config.batching == BatchingMode::Off;
        loop {
            let idle = self.active.is_empty();
            let job = if let Some(job) = self.held.pop_front() {
                job
            } else if self.closed {
                return;
            } else if idle {
                // Idle: wait, but wake up now and then to notice a closed queue.
                match self
                    .ctx
                    .rx
                    .recv_timeout(std::time::Duration::from_millis(200))
                {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => return,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.closed = true;
                        return;
                    }
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
            self.ctx.metrics.queue_depth.set(self.ctx.rx.len() as i64);
            if job.reply.is_closed() {
                self.ctx
                    .metrics
                    .requests_dropped_total
                    .with_label_values(&["client_gone"])
                    .inc();
                continue;
            }
            let now = Instant::now();
            if now >= job.deadline {
                self.ctx
                    .metrics
                    .requests_dropped_total
                    .with_label_values(&["deadline"])
                    .inc();
                let _ = job.reply.send(Err(InferError::Deadline));
                continue;
            }
            let mut candidate = ActiveJob {
                job,
                admitted: now,
                kv: None,
                rows: Vec::new(),
            };
            if !idle && self.rows_in_batch() + candidate.denoiser_rows() > max_rows {
                self.held.push_front(candidate.job);
                break;
            }
            self.ctx
                .metrics
                .queue_wait_seconds
                .observe(now.duration_since(candidate.job.enqueued).as_secs_f64());
            self.ctx
                .metrics
                .rows_in_flight
                .add(candidate.job.params.candidates as i64);
            candidate.rows.reserve(candidate.job.params.candidates);
            self.active.push(candidate);
            if one_job_only || self.rows_in_batch() >= max_rows {
                break;
            }
        }
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
            if job.job.reply.is_closed() {
                self.release(&job);
                self.ctx
                    .metrics
                    .requests_dropped_total
                    .with_label_values(&["client_gone"])
                    .inc();
            } else if now >= job.job.deadline {
                self.release(&job);
                self.ctx
                    .metrics
                    .requests_dropped_total
                    .with_label_values(&["deadline"])
                    .inc();
                let _ = job.job.reply.send(Err(InferError::Deadline));
            } else {
                kept.push(job);
            }
        }
        self.active = kept;
    }

    /// Encodes the images of newly admitted jobs in batched encoder calls and starts
    /// their rows.
    fn encode_new(&mut self) -> Result<(), RuntimeError> {
        let new: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].kv.is_none())
            .collect();
        let max_rows = self.ctx.config.max_batch_rows.max(1);
        for chunk in new.chunks(max_rows) {
            let views: Vec<_> = chunk
                .iter()
                .map(|&i| self.active[i].job.pixels.view())
                .collect();
            let pixels: Array4<f32> =
                ndarray::stack(Axis(0), &views).map_err(|e| RuntimeError::Inference {
                    graph: "encoder",
                    reason: format!("images of different sizes in one batch: {e}"),
                })?;
            let kv = self.models.encode(pixels.view())?;
            for (b, &i) in chunk.iter().enumerate() {
                let job = &mut self.active[i];
                job.kv = Some(Arc::new(kv.index_axis(Axis(0), b).to_owned()));
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
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), RuntimeError> {
        self.prune();
        self.encode_new()?;
        let max_rows = self.ctx.config.max_batch_rows.max(1);
        {
            let mut rows: Vec<ActiveRow<'_>> = Vec::new();
            for job in &mut self.active {
                let Some(kv) = job.kv.as_ref() else { continue };
                for row in &mut job.rows {
                    if row.need() != Need::Done {
                        rows.push(ActiveRow { row, kv });
                    }
                }
            }
            let mut den = Instrumented {
                models: &mut self.models,
                metrics: &self.ctx.metrics,
            };
            sampler::step(&mut den, &mut rows, max_rows).map_err(|e| match e {
                sampler::StepError::Model(e) => e,
                other => RuntimeError::Inference {
                    graph: "sampler",
                    reason: other.to_string(),
                },
            })?;
        }
        self.finish_done();
        Ok(())
    }

    /// Answers every job whose rows are all done.
    fn finish_done(&mut self) {
        let (done, running): (Vec<ActiveJob>, Vec<ActiveJob>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|j| !j.rows.is_empty() && j.rows.iter().all(|r| r.need() == Need::Done));
        self.active = running;
        for job in done {
            self.release(&job);
            let result = assemble(&self.ctx.text, &job);
            let _ = job.job.reply.send(result);
        }
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
