//! The request queue and the worker threads that run the models.
//!
//! Requests go into one bounded queue; a full queue is refused at once (the caller
//! answers 429) instead of growing latency without bound. Requests take turns in it:
//! the images of a batch request alternate with other requests' images. Each worker is
//! a dedicated OS thread that owns its ONNX Runtime sessions, so model calls never block
//! the async runtime and sessions need no locks. How a worker groups requests into model calls
//! is the [`BatchingMode`]; the default, continuous batching, lets requests join and
//! leave the running batch at every denoising step (see `worker.rs`).

mod worker;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use ndarray::Array3;
use tokio::sync::oneshot;

use crate::bundle::Bundle;
pub use crate::config::BatchingMode;
use crate::metrics::Metrics;
use crate::runtime::{ActiveDevice, OrtRuntime, RuntimeError, SessionOptions};
use crate::sampler::SamplerParams;
use crate::text::TextDecoder;

/// One image to caption.
pub struct CaptionJob {
    /// Normalized CHW pixels.
    pub pixels: Array3<f32>,
    pub params: SamplerParams,
    pub seed: u64,
    /// The job is answered with [`InferError::Deadline`] once this passes.
    pub deadline: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<CaptionOutput, InferError>>,
    /// Images waiting ahead of this one when it was queued.
    pub(crate) queued_behind: usize,
    /// The request it came with (the images of one batch request share it): the queue
    /// takes turns between requests.
    pub(crate) request: u64,
}

/// Where a job's answer arrives.
pub type CaptionReply = oneshot::Receiver<Result<CaptionOutput, InferError>>;

impl CaptionJob {
    /// A job enqueued now, and the receiver of its answer.
    pub fn new(
        pixels: Array3<f32>,
        params: SamplerParams,
        seed: u64,
        deadline: Instant,
    ) -> (CaptionJob, CaptionReply) {
        let (reply, rx) = oneshot::channel();
        let job = CaptionJob {
            pixels,
            params,
            seed,
            deadline,
            enqueued: Instant::now(),
            reply,
            queued_behind: 0,
            request: 0,
        };
        (job, rx)
    }
}

/// Where a streaming job's [`StepEvent`]s go. The worker only ever `try_send`s: when
/// the receiver lags and the channel is full, intermediate events are dropped (and
/// counted in `ladic_stream_events_dropped_total`); the batch never waits for it.
pub type StepSender = tokio::sync::mpsc::Sender<StepEvent>;

/// One denoising iteration of one candidate of a streaming job: the decoder's reading
/// of the current x0 estimate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepEvent {
    /// Index of the candidate (MBR row) in the job, 0-based.
    pub candidate: usize,
    /// 0-based iteration of the candidate; Back&Refine restarts keep counting.
    pub step: usize,
    /// The timestep this iteration denoised from.
    pub t: usize,
    /// The caption the current x0 estimate decodes to (cleaned as a final caption is).
    pub caption: String,
    /// Mean confidence over the caption's positions, as for a final caption.
    pub confidence: f32,
    /// Every position whose token is not a special token, in order, uncleaned.
    pub tokens: Vec<StepToken>,
    /// This iteration triggered a Back&Refine restart: its most confident positions
    /// are kept and the rest start again from noise at t = T-1.
    pub refine: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepToken {
    /// Position in the latent (0 is [CLS]).
    pub position: usize,
    pub text: String,
    pub confidence: f32,
}

/// A job in the queue, with the step-event channel of a streaming request.
pub(crate) struct Queued {
    pub job: CaptionJob,
    pub progress: Option<StepSender>,
}

/// One caption candidate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Candidate {
    pub caption: String,
    pub confidence: f32,
    /// Cleaned token ids (specials and periods dropped, repeats collapsed).
    #[serde(skip)]
    pub ids: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct CaptionOutput {
    pub candidates: Vec<Candidate>,
    /// Index of the MBR choice in `candidates`.
    pub chosen: usize,
    pub queue_time: Duration,
    pub inference_time: Duration,
}

impl CaptionOutput {
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates.get(self.chosen)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    #[error("the request deadline passed before its caption was ready")]
    Deadline,
    #[error("inference failed: {0}")]
    Failed(String),
    /// The server's shutdown grace period ended before the caption was ready.
    #[error(
        "the server is shutting down and its grace period ended before the caption was ready; retry"
    )]
    ShuttingDown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    /// Jobs wait in the queue, and the last one a worker took had waited longer than
    /// this job has left before its deadline: it would most likely wait out its
    /// deadline and get a 504 then. Refused at once instead, so that a client (or a
    /// load balancer) can go elsewhere or retry with a longer deadline.
    #[error(
        "the queue's wait is about {wait:?}, longer than the {left:?} left before the deadline"
    )]
    WouldMissDeadline { wait: Duration, left: Duration },
    #[error("the workers have stopped")]
    Closed,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub workers: usize,
    pub batching: BatchingMode,
    pub max_batch_rows: usize,
    pub queue_size: usize,
    pub session: SessionOptions,
}

/// Jobs a worker took from the queue but could not fit in its running batch, oldest
/// first, shared by all workers: whichever worker has room first takes them (before
/// the queue), so that a job never waits on one busy worker while another is idle.
pub(crate) struct HeldJobs {
    jobs: Mutex<VecDeque<Queued>>,
    /// A doorbell (one message at most) that wakes an idle worker when a job is held.
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl HeldJobs {
    pub(crate) fn new() -> HeldJobs {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        HeldJobs {
            jobs: Mutex::new(VecDeque::new()),
            wake_tx,
            wake_rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds a job (newer than every job held so far) and wakes an idle worker.
    pub fn push(&self, job: Queued) {
        self.lock().push_back(job);
        let _ = self.wake_tx.try_send(());
    }

    /// The oldest job held, if `fits` says it fits. The doorbell rings again while
    /// jobs remain, for another idle worker.
    pub fn pop_if(&self, fits: impl FnOnce(&Queued) -> bool) -> Option<Queued> {
        let mut jobs = self.lock();
        if !fits(jobs.front()?) {
            return None;
        }
        let job = jobs.pop_front();
        if !jobs.is_empty() {
            let _ = self.wake_tx.try_send(());
        }
        job
    }

    /// The jobs held whose client left or whose deadline passed, each with its
    /// reason; the others stay, in order.
    fn take_leaving(&self, now: Instant) -> Vec<(CaptionJob, &'static str)> {
        let mut jobs = self.lock();
        let mut leaving = Vec::new();
        for queued in std::mem::take(&mut *jobs) {
            match worker::leave_reason(&queued.job, now) {
                Some(reason) => leaving.push((queued.job, reason)),
                None => jobs.push_back(queued),
            }
        }
        leaving
    }

    /// Every job held.
    pub fn take_all(&self) -> Vec<Queued> {
        self.lock().drain(..).collect()
    }

    /// Where an idle worker hears that a job was held.
    pub fn wakes(&self) -> &Receiver<()> {
        &self.wake_rx
    }
}

/// Sends a job the queue held a moment ago (or a new one it has room for) back into it.
/// Only senders add to the queue and they hold its lock, so there is always room; a job
/// it refused anyway is answered, never lost silently.
fn put_back(tx: &Sender<Queued>, queued: Queued) {
    if let Err(TrySendError::Full(q) | TrySendError::Disconnected(q)) = tx.try_send(queued) {
        let _ = q.job.reply.send(Err(InferError::Failed(
            "the request queue refused a job it had held".into(),
        )));
    }
}

/// `jobs` in turns between their requests ([`CaptionJob::request`]): the first job of
/// each request in the order the requests first appear, then the second of each, and so
/// on. Jobs of one request keep their order.
fn take_turns(jobs: impl IntoIterator<Item = Queued>) -> Vec<Queued> {
    let mut lanes: Vec<VecDeque<Queued>> = Vec::new();
    let mut lane_of: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut count = 0;
    for queued in jobs {
        let lane = *lane_of.entry(queued.job.request).or_insert_with(|| {
            lanes.push(VecDeque::new());
            lanes.len() - 1
        });
        lanes[lane].push_back(queued);
        count += 1;
    }
    let mut order = Vec::with_capacity(count);
    while order.len() < count {
        for lane in &mut lanes {
            order.extend(lane.pop_front());
        }
    }
    order
}

/// The shortest expected queue wait that refuses a request whose deadline is nearer:
/// shorter waits are noise (a worker waking late), and not worth a refusal.
pub const MIN_EXPECTED_WAIT: Duration = Duration::from_secs(1);

/// How long the last job a worker took from the queue had waited, per image that was
/// ahead of it (itself included), and when it was taken.
#[derive(Debug)]
pub(crate) struct LastAdmission {
    epoch: Instant,
    /// Milliseconds from `epoch` to the admission, plus one (0: none yet).
    at_ms: std::sync::atomic::AtomicU64,
    wait_ms: std::sync::atomic::AtomicU64,
    /// Microseconds of that wait per image ahead.
    per_image_us: std::sync::atomic::AtomicU64,
}

impl LastAdmission {
    fn new() -> LastAdmission {
        LastAdmission {
            epoch: Instant::now(),
            at_ms: Default::default(),
            wait_ms: Default::default(),
            per_image_us: Default::default(),
        }
    }

    /// A worker took, at `now`, a job that had waited `wait` behind `ahead` images.
    pub(crate) fn record(&self, now: Instant, wait: Duration, ahead: usize) {
        let at = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        let per_image = wait.as_micros() as u64 / (ahead as u64 + 1);
        self.wait_ms
            .store(wait.as_millis() as u64, Ordering::Relaxed);
        self.per_image_us.store(per_image, Ordering::Relaxed);
        self.at_ms.store(at, Ordering::Relaxed);
    }

    /// The last wait per image ahead, if the job was taken no longer ago than it had
    /// waited.
    fn recent(&self, now: Instant) -> Option<Duration> {
        let at = self.at_ms.load(Ordering::Relaxed).checked_sub(1)?;
        let wait = self.wait_ms.load(Ordering::Relaxed);
        let now = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let per_image = Duration::from_micros(self.per_image_us.load(Ordering::Relaxed));
        (now.saturating_sub(at) <= wait).then_some(per_image)
    }
}

/// When each worker started the step it is in, if it is in one: a worker stuck inside
/// a model call (a hung GPU, a deadlock in a library) never comes out, and the health
/// probes tell from this ([`Scheduler::stalled_worker`]).
#[derive(Debug)]
pub struct WorkerSteps {
    epoch: Instant,
    /// Per worker: milliseconds from `epoch` to the start of its step, plus one; 0 when
    /// it is not in a step.
    started: Vec<std::sync::atomic::AtomicU64>,
}

impl WorkerSteps {
    pub fn new(workers: usize) -> WorkerSteps {
        WorkerSteps {
            epoch: Instant::now(),
            started: (0..workers).map(|_| Default::default()).collect(),
        }
    }

    /// Marks `worker` as in a step until the guard is dropped (also when the step
    /// panics).
    pub fn enter(&self, worker: usize) -> InStep<'_> {
        let since = self.epoch.elapsed().as_millis() as u64 + 1;
        if let Some(slot) = self.started.get(worker) {
            slot.store(since, Ordering::SeqCst);
        }
        InStep {
            steps: self,
            worker,
        }
    }

    /// The worker that has been in one step the longest, if that is longer than
    /// `limit`, and for how long.
    pub fn stalled(&self, limit: Duration) -> Option<(usize, Duration)> {
        let now = self.epoch.elapsed();
        self.started
            .iter()
            .enumerate()
            .filter_map(|(worker, slot)| {
                let since = slot.load(Ordering::SeqCst).checked_sub(1)?;
                Some((worker, now.saturating_sub(Duration::from_millis(since))))
            })
            .max_by_key(|&(_, age)| age)
            .filter(|&(_, age)| age > limit)
    }
}

/// A worker's step in progress; see [`WorkerSteps::enter`].
pub struct InStep<'a> {
    steps: &'a WorkerSteps,
    worker: usize,
}

impl Drop for InStep<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.steps.started.get(self.worker) {
            slot.store(0, Ordering::SeqCst);
        }
    }
}

/// What the workers loaded, reported once all are up.
#[derive(Debug, Clone)]
pub struct LoadedInfo {
    pub device: ActiveDevice,
    pub load_seconds: f64,
    /// Sessions per graph in each worker (row slices run at once).
    pub row_parallelism: usize,
    /// ONNX Runtime intra-op threads per session (0 = its default).
    pub intra_op_threads: usize,
    /// The rows' state stays on the denoiser's device between steps (`--device-loop`).
    pub state_on_device: bool,
}

pub struct Scheduler {
    tx: Mutex<Option<Sender<Queued>>>,
    rx: Receiver<Queued>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Shared with the workers: see [`Scheduler::abandon`].
    abandoned: Arc<AtomicBool>,
    held: Arc<HeldJobs>,
    steps: Arc<WorkerSteps>,
    /// How long the last job a worker took had waited, and when.
    last_admission: Arc<LastAdmission>,
    /// The number of the next request queued ([`CaptionJob::request`]).
    next_request: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
    pub info: LoadedInfo,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("info", &self.info)
            .finish()
    }
}

impl Scheduler {
    /// Starts the workers and waits until each has loaded its sessions; any load
    /// error stops the others and is returned.
    pub fn start(
        config: SchedulerConfig,
        runtime: OrtRuntime,
        bundle: Arc<Bundle>,
        text: Arc<TextDecoder>,
        metrics: Arc<Metrics>,
    ) -> Result<Scheduler, RuntimeError> {
        // A zero-capacity channel would be a rendezvous channel: every submit would fail
        // while the workers are busy. One slot is the least that makes sense.
        let (tx, rx) = crossbeam_channel::bounded::<Queued>(config.queue_size.max(1));
        let mut config = config;
        config.session = config
            .session
            .for_workers(config.workers.max(1), crate::runtime::available_cores());
        config.session.max_batch_rows = config.max_batch_rows;
        let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
        let abandoned = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(WorkerSteps::new(config.workers.max(1)));
        let held = Arc::new(HeldJobs::new());
        let last_admission = Arc::new(LastAdmission::new());
        let mut workers = Vec::new();
        for index in 0..config.workers.max(1) {
            let ctx = worker::WorkerContext {
                index,
                rx: rx.clone(),
                bundle: bundle.clone(),
                text: text.clone(),
                metrics: metrics.clone(),
                config: config.clone(),
                abandoned: abandoned.clone(),
                steps: steps.clone(),
                held: held.clone(),
                last_admission: last_admission.clone(),
            };
            let loaded_tx = loaded_tx.clone();
            let runtime = runtime.clone();
            let handle = std::thread::Builder::new()
                .name(format!("ladic-worker-{index}"))
                .spawn(move || worker::run(ctx, runtime, loaded_tx))
                .map_err(|e| RuntimeError::Session {
                    graph: "worker",
                    path: bundle.dir.clone(),
                    reason: format!("cannot spawn a worker thread: {e}"),
                })?;
            workers.push(handle);
        }
        drop(loaded_tx);
        let mut info: Option<LoadedInfo> = None;
        let mut first_error = None;
        let mut loaded = 0;
        for _ in 0..workers.len() {
            match loaded_rx.recv() {
                Ok(Ok(i)) => {
                    loaded += 1;
                    info.get_or_insert(i);
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        let spawned = workers.len();
        let scheduler = Scheduler {
            tx: Mutex::new(Some(tx)),
            rx,
            workers: Mutex::new(workers),
            abandoned,
            held,
            steps,
            last_admission,
            next_request: std::sync::atomic::AtomicU64::new(1),
            metrics,
            info: info.clone().unwrap_or(LoadedInfo {
                device: ActiveDevice::Cpu,
                load_seconds: 0.0,
                row_parallelism: 1,
                intra_op_threads: 0,
                state_on_device: false,
            }),
        };
        match (first_error, info) {
            (Some(e), _) => {
                scheduler.stop();
                Err(e)
            }
            (None, Some(_)) if loaded == spawned => Ok(scheduler),
            (None, _) => {
                scheduler.stop();
                Err(RuntimeError::Session {
                    graph: "worker",
                    path: bundle.dir.clone(),
                    reason: format!(
                        "{} of {spawned} workers exited while loading",
                        spawned - loaded
                    ),
                })
            }
        }
    }

    /// Queues a job without waiting; a full queue is an immediate error. A full queue
    /// first gives up the jobs whose client left or whose deadline passed, which a
    /// worker would skip anyway.
    pub fn submit(&self, job: CaptionJob) -> Result<(), SubmitError> {
        self.enqueue(vec![Queued {
            job,
            progress: None,
        }])
    }

    /// Queues every job, or none when they do not all fit (the images of one batch
    /// request: a batch is answered whole, so a part of it must not run for nothing).
    pub fn submit_all(&self, jobs: Vec<CaptionJob>) -> Result<(), SubmitError> {
        let queued = jobs
            .into_iter()
            .map(|job| Queued {
                job,
                progress: None,
            })
            .collect();
        self.enqueue(queued)
    }

    /// [`Scheduler::submit`], and a [`StepEvent`] to `progress` for every denoising
    /// iteration of every candidate, sent without ever blocking the worker.
    pub fn submit_streaming(
        &self,
        job: CaptionJob,
        progress: StepSender,
    ) -> Result<(), SubmitError> {
        self.enqueue(vec![Queued {
            job,
            progress: Some(progress),
        }])
    }

    /// Queues all of `jobs` or none. Only senders add to the queue, and they hold the
    /// lock: once there is room for all, every send succeeds.
    fn enqueue(&self, mut jobs: Vec<Queued>) -> Result<(), SubmitError> {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = guard.as_ref().ok_or(SubmitError::Closed)?;
        let capacity = self.rx.capacity().unwrap_or(usize::MAX);
        let fits = |this: &Self, n: usize| this.rx.len() + n <= capacity;
        let late = |this: &Self, jobs: &[Queued]| {
            let now = Instant::now();
            let left = jobs
                .iter()
                .map(|q| q.job.deadline.saturating_duration_since(now))
                .min()?;
            this.refuse_if_late(now, left).err()
        };
        // Jobs nobody waits for any more (clients that gave up and perhaps retried) are
        // taken out before refusing anything: a worker would skip each when it reached
        // it, but until then they would fill the queue and make its wait look longer.
        if !fits(self, jobs.len()) || late(self, &jobs).is_some() {
            self.sweep_leaving(tx);
        }
        let result = if let Some(late) = late(self, &jobs) {
            Err(late)
        } else if !fits(self, jobs.len()) {
            Err(SubmitError::QueueFull)
        } else {
            let request = self.next_request.fetch_add(1, Ordering::Relaxed);
            for queued in &mut jobs {
                queued.job.request = request;
            }
            // The queue is put back in turns between requests, the new one last: a
            // request waits for at most one image of each request ahead of it, not for
            // every image of a large batch. (A worker may take a job meanwhile.)
            let waiting: Vec<Queued> = self.rx.try_iter().collect();
            let held = self.held.len();
            let mut order = take_turns(waiting.into_iter().chain(jobs));
            for (at, queued) in order.iter_mut().enumerate() {
                if queued.job.request == request {
                    queued.job.queued_behind = held + at;
                }
            }
            for queued in order {
                put_back(tx, queued);
            }
            Ok(())
        };
        self.metrics.queue_depth.set(self.queue_depth() as i64);
        result
    }

    /// Takes every job whose client left or whose deadline passed out of the queue and
    /// out of the held jobs, counted and answered as a worker drops them; the others
    /// keep their order. Returns how many left. Needs the sending side's lock: nothing
    /// else is queued meanwhile, so the jobs put back always fit. (A worker may take a
    /// job meanwhile, perhaps one behind a job that is being put back.)
    fn sweep_leaving(&self, tx: &Sender<Queued>) -> usize {
        let now = Instant::now();
        let mut leaving = self.held.take_leaving(now);
        for queued in self.rx.try_iter().collect::<Vec<_>>() {
            match worker::leave_reason(&queued.job, now) {
                Some(reason) => leaving.push((queued.job, reason)),
                None => put_back(tx, queued),
            }
        }
        let count = leaving.len();
        for (job, reason) in leaving {
            let waited = now.duration_since(job.enqueued).as_secs_f64();
            self.metrics.queue_wait_seconds.observe(waited);
            worker::drop_job(&self.metrics, job, reason);
        }
        if count > 0 {
            tracing::debug!(
                requests = count,
                "took requests nobody waits for out of a full queue"
            );
        }
        count
    }

    /// Whether the queue can take `images` more now. When it could not, the jobs
    /// nobody waits for any more are taken out first (see [`Scheduler::submit`]).
    pub fn has_room_for(&self, images: usize) -> bool {
        let capacity = self.rx.capacity().unwrap_or(usize::MAX);
        if self.queue_depth() + images <= capacity {
            return true;
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = guard.as_ref() {
            self.sweep_leaving(tx);
        }
        self.metrics.queue_depth.set(self.queue_depth() as i64);
        self.queue_depth() + images <= capacity
    }

    /// Refuses a request with `left` before its deadline if the queue's expected wait
    /// is longer ([`Scheduler::expected_wait`]): it would only wait out its deadline.
    pub fn refuse_if_late(&self, now: Instant, left: Duration) -> Result<(), SubmitError> {
        match self.expected_wait(now) {
            Some(wait) if wait > left => Err(SubmitError::WouldMissDeadline { wait, left }),
            _ => Ok(()),
        }
    }

    /// How long a job queued now will likely wait for a worker, where that is known
    /// and long enough to matter: while jobs wait, the time per image ahead that the
    /// last job a worker took waited (its wait over the images that were ahead of it,
    /// and itself), times the images waiting now; only if that job was taken no longer
    /// ago than it had waited (an older figure says nothing about the queue of now),
    /// and only from [`MIN_EXPECTED_WAIT`] up. None when nothing waits, so an idle
    /// server never refuses on it.
    pub fn expected_wait(&self, now: Instant) -> Option<Duration> {
        let depth = self.queue_depth();
        if depth == 0 {
            return None;
        }
        let per_image = self.last_admission.recent(now)?;
        let wait = per_image.saturating_mul(u32::try_from(depth).unwrap_or(u32::MAX));
        (wait >= MIN_EXPECTED_WAIT).then_some(wait)
    }

    /// Images waiting for a worker: queued, or held for room in a batch.
    pub fn queue_depth(&self) -> usize {
        self.rx.len() + self.held.len()
    }

    /// A worker that has been inside one step (its model calls) for longer than
    /// `limit`, and for how long: it is stuck, and will not answer its requests.
    pub fn stalled_worker(&self, limit: Duration) -> Option<(usize, Duration)> {
        self.steps.stalled(limit)
    }

    /// Gives up on every job: the workers answer each one they hold or find in the
    /// queue [`InferError::ShuttingDown`] (503) at their next step, now and for any job
    /// queued later. For the end of a shutdown's grace period, so that the process can
    /// exit with every client answered.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }

    /// Closes the queue and waits for the workers: they finish what they hold
    /// (queued jobs included) and exit.
    pub fn stop(&self) {
        for handle in self.close() {
            join_worker(handle);
        }
    }

    /// [`stop`](Self::stop), waiting at most `timeout`; false if a worker was still
    /// busy then (in a long model call: it cannot be interrupted). Its thread is left
    /// to end with the process.
    pub fn stop_within(&self, timeout: Duration) -> bool {
        let workers = self.close();
        if workers.is_empty() {
            return true;
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let joiner = std::thread::Builder::new()
            .name("ladic-worker-join".into())
            .spawn(move || {
                for handle in workers {
                    join_worker(handle);
                }
                let _ = done_tx.send(());
            });
        joiner.is_ok() && done_rx.recv_timeout(timeout).is_ok()
    }

    /// Closes the queue and hands over the workers' threads.
    fn close(&self) -> Vec<JoinHandle<()>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn join_worker(handle: JoinHandle<()>) {
    if handle.join().is_err() {
        tracing::error!("a worker thread panicked while stopping");
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use super::*;

    /// A queued job of `seed` (to tell jobs apart) and the receiver of its answer.
    fn held_job(seed: u64, deadline: Instant) -> (Queued, CaptionReply) {
        let params = SamplerParams {
            steps: 1,
            guidance: 0.0,
            time_shift: 0,
            renoise_scale: 1.0,
            self_conditioning: false,
            back_refine: crate::bundle::BackRefineSpec {
                enabled: false,
                keep_fraction: 0.0,
                trigger_t: 0,
                rounds: 0,
            },
            candidates: 1,
        };
        let (job, reply) = CaptionJob::new(Array3::zeros((3, 2, 2)), params, seed, deadline);
        let queued = Queued {
            job,
            progress: None,
        };
        (queued, reply)
    }

    #[test]
    fn held_jobs_nobody_waits_for_leave_from_anywhere_in_line() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let held = HeldJobs::new();
        let (first, _first_reply) = held_job(1, later);
        let (gone, gone_reply) = held_job(2, later);
        let (past_deadline, mut past_reply) = held_job(3, now);
        let (last, _last_reply) = held_job(4, later);
        for queued in [first, gone, past_deadline, last] {
            held.push(queued);
        }
        drop(gone_reply);

        let leaving = held.take_leaving(now);
        let left: Vec<_> = leaving
            .iter()
            .map(|(j, reason)| (j.seed, *reason))
            .collect();
        assert_eq!(left, [(2, "client_gone"), (3, "deadline")]);
        let kept: Vec<_> = held.take_all().iter().map(|q| q.job.seed).collect();
        assert_eq!(kept, [1, 4]);

        // Answered as a worker answers them: the deadline's 504 reaches its client.
        let metrics = Metrics::new().unwrap();
        for (job, reason) in leaving {
            worker::drop_job(&metrics, job, reason);
        }
        assert!(matches!(
            past_reply.try_recv(),
            Ok(Err(InferError::Deadline))
        ));
        for reason in ["client_gone", "deadline"] {
            let count = metrics.images_dropped_total.with_label_values(&[reason]);
            assert_eq!(count.get(), 1, "{reason}");
        }
    }

    #[test]
    fn requests_take_turns_and_keep_their_own_order() {
        let far = Instant::now() + Duration::from_secs(60);
        let job = |request: u64, seed: u64| {
            let (mut queued, _) = held_job(seed, far);
            queued.job.request = request;
            queued
        };
        // A batch of four (request 1), then a single (2), then a batch of two (3).
        let jobs = [
            (1, 10),
            (1, 11),
            (1, 12),
            (1, 13),
            (2, 20),
            (3, 30),
            (3, 31),
        ];
        let order = take_turns(jobs.map(|(r, s)| job(r, s)));
        let seeds: Vec<u64> = order.iter().map(|q| q.job.seed).collect();
        assert_eq!(seeds, [10, 20, 30, 11, 31, 12, 13]);
        // Single-image requests: first come, first served.
        let order = take_turns([(4, 40), (5, 50), (6, 60)].map(|(r, s)| job(r, s)));
        let seeds: Vec<u64> = order.iter().map(|q| q.job.seed).collect();
        assert_eq!(seeds, [40, 50, 60]);
    }

    #[test]
    fn the_last_admissions_wait_counts_only_while_recent() {
        let last = LastAdmission::new();
        let start = Instant::now();
        assert_eq!(last.recent(start), None);
        let at = start + Duration::from_secs(10);
        // 6 s behind 2 images: 2 s per image ahead (itself included).
        last.record(at, Duration::from_secs(6), 2);
        assert_eq!(last.recent(at), Some(Duration::from_secs(2)));
        assert_eq!(
            last.recent(at + Duration::from_secs(5)),
            Some(Duration::from_secs(2))
        );
        // Taken longer ago than it had waited: no longer a figure for the queue of now.
        assert_eq!(last.recent(at + Duration::from_secs(7)), None);
        let later = at + Duration::from_secs(60);
        last.record(later, Duration::ZERO, 0);
        assert_eq!(last.recent(later), Some(Duration::ZERO));
    }

    #[test]
    fn a_worker_is_stalled_only_while_in_a_step_past_the_limit() {
        let steps = WorkerSteps::new(2);
        assert_eq!(steps.stalled(Duration::ZERO), None);
        let in_step = steps.enter(1);
        std::thread::sleep(Duration::from_millis(20));
        let (worker, age) = steps.stalled(Duration::from_millis(10)).unwrap();
        assert_eq!(worker, 1);
        assert!(age >= Duration::from_millis(20), "{age:?}");
        assert_eq!(steps.stalled(Duration::from_secs(60)), None);
        drop(in_step);
        assert_eq!(steps.stalled(Duration::ZERO), None);
        // A step that panics leaves it too.
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _in_step = steps.enter(0);
            panic!("a model call failed");
        }));
        assert!(caught.is_err());
        assert_eq!(steps.stalled(Duration::ZERO), None);
    }
}
