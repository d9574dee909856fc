//! ONNX Runtime: loading the shared library, choosing the execution provider, and the
//! three sessions of a bundle behind typed methods.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`) so one binary works with
//! the CPU build and the CUDA build of ONNX Runtime. Loading is done here, explicitly
//! and once, because `ort` would otherwise load it lazily on first use and panic if it
//! is missing; we want a one-line error that says how to get it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use std::ops::Range;

use ndarray::{Array2, Array3, Array4, ArrayView3, ArrayView4, Axis, s};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::bundle::{Bundle, DType, GraphSpec, names};
use crate::call_layout::HalfLayout;
use crate::device_copy::CudaRuntime;
use crate::device_loop::{DeviceLoopState, DeviceLoopStats};
use crate::fixed_shapes::{FixedShapeCalls, FixedShapeStats, Transfer};
use crate::kv_pool::{KvElement, KvPool};
use crate::sampler::{Denoiser, DeviceLoop, DeviceRow, DeviceStep, ImageKv, KvRef};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};

/// Slots the K/V pool starts with (it doubles when full).
const KV_POOL_SLOTS: usize = 64;
/// Slots of the K/V pool with CUDA graphs, which cannot grow (a captured graph reads
/// it at a fixed address); capped by [`crate::kv_pool::max_slots`] (295 for the
/// full-size model, whose 256 slots take 7.4 GB).
pub const FIXED_KV_POOL_SLOTS: usize = 256;

/// Where the setup script puts the library, relative to the working directory.
pub const LOCAL_LIBRARY: &str = ".ort/lib/libonnxruntime.so";
/// The name the dynamic loader searches for when nothing else is configured.
pub const SYSTEM_LIBRARY: &str = "libonnxruntime.so";
const HOW_TO_GET: &str = "run scripts/fetch-onnxruntime.sh (puts it at .ort/lib/libonnxruntime.so) or set ORT_DYLIB_PATH to an ONNX Runtime >= 1.31 library";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot load the ONNX Runtime library {path}: {reason}; {HOW_TO_GET}")]
    Library { path: String, reason: String },
    #[error("the {graph} graph does not match the manifest: {reason}")]
    GraphMismatch { graph: &'static str, reason: String },
    #[error("cannot create the {graph} session from {path}: {reason}")]
    Session {
        graph: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("device cuda was asked for but {0}")]
    CudaUnavailable(String),
    #[error("{graph} inference failed: {reason}")]
    Inference { graph: &'static str, reason: String },
}

/// Which execution provider to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this build has it and it registers, otherwise CPU.
    Auto,
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider; start-up fails if it cannot be used.
    Cuda,
}

/// The execution provider the sessions actually use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveDevice {
    Cpu,
    Cuda,
}

impl std::fmt::Display for ActiveDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ActiveDevice::Cpu => "cpu",
            ActiveDevice::Cuda => "cuda",
        })
    }
}

/// The loaded library and the process-wide ONNX Runtime environment.
#[derive(Clone)]
pub struct OrtRuntime {
    pub library: PathBuf,
    environment: ort::environment::Environment,
}

impl OrtRuntime {
    /// The environment sessions are created in.
    pub fn environment(&self) -> &ort::environment::Environment {
        &self.environment
    }
}

impl std::fmt::Debug for OrtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtRuntime")
            .field("library", &self.library)
            .finish()
    }
}

/// Picks the library file: `ORT_DYLIB_PATH`, then the configured path, then the
/// setup script's location, then the loader's search path.
pub fn library_candidate(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    let local = Path::new(LOCAL_LIBRARY);
    if local.is_file() {
        return local.to_path_buf();
    }
    PathBuf::from(SYSTEM_LIBRARY)
}

static RUNTIME: OnceLock<OrtRuntime> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime once per process; later calls return the first result's runtime
/// (the library cannot be swapped once loaded).
pub fn init_onnxruntime(configured: Option<&Path>) -> Result<OrtRuntime, RuntimeError> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.clone());
    }
    let candidate = library_candidate(configured);
    let bare_name = candidate.components().count() == 1;
    let path = if bare_name {
        candidate
    } else {
        if !candidate.is_file() {
            return Err(RuntimeError::Library {
                path: candidate.display().to_string(),
                reason: "no such file".into(),
            });
        }
        // `ort` resolves relative paths against the executable's directory; we mean the
        // working directory.
        candidate.canonicalize().unwrap_or(candidate)
    };
    let lib_err = |reason: String| RuntimeError::Library {
        path: path.display().to_string(),
        reason,
    };
    // `ort` asserts on a few impossible-in-practice conditions while loading; a foreign
    // library must not take the process down with a backtrace.
    let loaded = std::panic::catch_unwind(|| {
        ort::init_from(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                b.with_name("ladic-serve")
                    .build()
                    .map_err(|e| e.to_string())
            })
    })
    .map_err(|_| lib_err("the library panicked while loading".into()))?
    .map_err(lib_err)?;
    let rt = OrtRuntime {
        library: path,
        environment: loaded,
    };
    let _ = RUNTIME.set(rt.clone());
    Ok(rt)
}

/// Slots of each device-loop state pool: one per row a worker may hold, and the
/// scratch slot. The scheduler admits rows up to `max_batch_rows` denoiser rows (each
/// row takes one or two), except one request alone, of at most
/// [`crate::sampler::MAX_CANDIDATES`] rows or the bundle's default candidates.
pub fn device_loop_slots(max_batch_rows: usize, default_candidates: usize) -> usize {
    max_batch_rows
        .max(crate::sampler::MAX_CANDIDATES)
        .max(default_candidates)
        + 1
}

/// How to build sessions.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: DeviceChoice,
    /// ONNX Runtime threads per session; 0 = ONNX Runtime's default (one per core).
    pub intra_op_threads: usize,
    /// On CPU, how many sessions of each graph a worker holds; a model call's rows are
    /// cut into that many slices that run at the same time, one per session. 0 = auto
    /// (see [`SessionOptions::for_workers`]); [`Models::load`] reads 0 as 1. CUDA
    /// sessions are never sliced.
    pub row_parallelism: usize,
    /// Keep each image's K/V in a pool on the denoiser's device for as long as its rows
    /// are in flight (`kv_pool`), with a denoiser that takes `kv_index`; else copy the
    /// call's K/V at every step.
    pub kv_pool: bool,
    /// Denoiser calls at fixed shapes in bound buffers ([`crate::fixed_shapes`]), each
    /// shape captured as a CUDA graph with the CUDA provider (on the CPU the same calls
    /// run without capture). Needs `kv_pool` and a denoiser that takes `kv_index`; the
    /// pool is then allocated at its final size ([`FIXED_KV_POOL_SLOTS`]).
    pub cuda_graph: bool,
    /// The most rows of one denoiser call (`--max-batch-rows`); with `cuda_graph` every
    /// fixed shape up to it is set up, and captured, when the sessions load.
    /// [`Scheduler::start`](crate::scheduler::Scheduler::start) sets it from its own
    /// configuration's, so that the two cannot differ.
    pub max_batch_rows: usize,
    /// Keep the rows' `x_t` and `self_cond` on the denoiser's device between steps
    /// ([`crate::device_loop`]); needs `cuda_graph`.
    pub device_loop: bool,
}

impl SessionOptions {
    /// Resolves the automatic settings for `workers` workers sharing `cores` cores.
    ///
    /// On a CPU, small model calls use cores badly through ONNX Runtime's intra-op
    /// threads (a 2-row denoiser call takes longer on 2 threads than on 1) but well
    /// through row slices on single-threaded sessions (the 2 rows at once on 2 cores).
    /// So, when neither setting is given, each worker gets one single-threaded session
    /// per core it can count on. An explicit thread count alone keeps one session per
    /// graph; explicit slices without a thread count get one thread each, so that the
    /// slices do not oversubscribe the cores.
    pub fn for_workers(&self, workers: usize, cores: usize) -> SessionOptions {
        let share = (cores / workers.max(1)).max(1);
        let (row_parallelism, intra_op_threads) =
            match (self.row_parallelism, self.intra_op_threads) {
                (0, 0) => (share, 1),
                (0 | 1, threads) => (1, threads),
                (slices, 0) => (slices, 1),
                (slices, threads) => (slices, threads),
            };
        SessionOptions {
            device: self.device,
            intra_op_threads,
            row_parallelism,
            kv_pool: self.kv_pool,
            cuda_graph: self.cuda_graph,
            max_batch_rows: self.max_batch_rows,
            device_loop: self.device_loop,
        }
    }
}

/// Cores this process may use (its CPU affinity and cgroup quota), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn ort_dtype(d: DType) -> TensorElementType {
    match d {
        DType::Float32 => TensorElementType::Float32,
        DType::Float16 => TensorElementType::Float16,
        DType::Int64 => TensorElementType::Int64,
    }
}

/// Checks that a session's inputs and outputs are exactly the manifest's, so that a
/// re-exported graph with renamed or retyped tensors fails at load, not per request.
fn check_graph(
    graph: &'static str,
    session: &Session,
    spec: &GraphSpec,
) -> Result<(), RuntimeError> {
    let mismatch = |reason: String| RuntimeError::GraphMismatch { graph, reason };
    for (kind, outlets, specs) in [
        ("input", session.inputs(), &spec.inputs),
        ("output", session.outputs(), &spec.outputs),
    ] {
        let mut found: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
        let mut want: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        found.sort_unstable();
        want.sort_unstable();
        if found != want {
            return Err(mismatch(format!(
                "{kind}s are {found:?}; the manifest says {want:?}"
            )));
        }
        for outlet in outlets {
            let Some(s) = specs.iter().find(|s| s.name == outlet.name()) else {
                continue;
            };
            let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
                return Err(mismatch(format!("{kind} {:?} is not a tensor", s.name)));
            };
            if *ty != ort_dtype(s.dtype) {
                return Err(mismatch(format!(
                    "{kind} {:?} has element type {ty:?}; the manifest says {:?}",
                    s.name, s.dtype
                )));
            }
            if shape.len() != s.shape.len() {
                return Err(mismatch(format!(
                    "{kind} {:?} has rank {}; the manifest says {}",
                    s.name,
                    shape.len(),
                    s.shape.len()
                )));
            }
            // `fixed_tail` starts after the batch axis.
            for (got, want) in shape.iter().skip(1).zip(s.fixed_tail()) {
                if let Some(want) = want
                    && *got >= 0
                    && *got != want
                {
                    return Err(mismatch(format!(
                        "{kind} {:?} has shape {shape}; the manifest says {:?}",
                        s.name, s.shape
                    )));
                }
            }
        }
    }
    Ok(())
}

/// One graph of a bundle: a single session, or on CPU several copies whose slices of a
/// call's rows run at the same time (see [`SessionOptions::row_parallelism`]).
struct Graph {
    name: &'static str,
    sessions: Vec<Session>,
}

/// `rows` cut into `slices` contiguous ranges whose lengths differ by at most one.
fn row_slices(rows: usize, slices: usize) -> Vec<Range<usize>> {
    let slices = slices.clamp(1, rows.max(1));
    let (base, extra) = (rows / slices, rows % slices);
    let mut start = 0;
    (0..slices)
        .map(|i| {
            let len = base + usize::from(i < extra);
            start += len;
            start - len..start
        })
        .collect()
}

impl Graph {
    fn fail(&self, reason: impl Into<String>) -> RuntimeError {
        RuntimeError::Inference {
            graph: self.name,
            reason: reason.into(),
        }
    }

    /// Runs `call` over the rows `0..rows`: on one session, or cut into one slice per
    /// session, this thread taking the first slice and `helpers` the others. The
    /// results come back in row order.
    ///
    /// The helpers are long-lived threads, not threads spawned per call: ONNX Runtime
    /// keeps per-thread scratch memory, and a fresh thread per call made a sliced
    /// call slower than an unsliced one.
    fn run_rows<T, F>(
        &mut self,
        helpers: Option<&rayon::ThreadPool>,
        rows: usize,
        call: F,
    ) -> Result<Vec<T>, RuntimeError>
    where
        T: Send,
        F: Fn(&mut Session, Range<usize>) -> Result<T, RuntimeError> + Sync,
    {
        let ranges = row_slices(rows, self.sessions.len());
        let Some((first, rest)) = self.sessions.split_first_mut() else {
            return Err(self.fail("no session"));
        };
        let Some(helpers) = helpers.filter(|_| ranges.len() > 1) else {
            return Ok(vec![call(first, 0..rows)?]);
        };
        let mut slots: Vec<Option<Result<T, RuntimeError>>> = ranges.iter().map(|_| None).collect();
        let (first_slot, other_slots) = slots.split_at_mut(1);
        let call = &call;
        // A panic in a slice is re-raised here, where the worker catches panics.
        helpers.in_place_scope(|scope| {
            for ((session, range), slot) in rest
                .iter_mut()
                .zip(ranges[1..].iter().cloned())
                .zip(other_slots.iter_mut())
            {
                scope.spawn(move |_| *slot = Some(call(session, range)));
            }
            first_slot[0] = Some(call(first, ranges[0].clone()));
        });
        slots
            .into_iter()
            .map(|slot| slot.unwrap_or_else(|| Err(self.fail("a row slice did not run"))))
            .collect()
    }
}

/// Joins per-slice arrays along the row axis (no copy when there is one slice).
fn join_rows<D: ndarray::RemoveAxis, A: Clone>(
    graph: &Graph,
    mut parts: Vec<ndarray::Array<A, D>>,
) -> Result<ndarray::Array<A, D>, RuntimeError> {
    if parts.len() == 1 {
        return parts.pop().ok_or_else(|| graph.fail("no result"));
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).map_err(|e| graph.fail(e.to_string()))
}

/// The denoiser's `image_kv` for one call.
enum KvInput<'a> {
    /// One K/V per row (a denoiser without `kv_index`).
    PerRow(ArrayView4<'a, f32>),
    /// Distinct K/V on the host, indexed by `kv_index`.
    Pool(ArrayView4<'a, f32>),
    /// The same, for a denoiser that reads its K/V in f16.
    PoolF16(ArrayView4<'a, half::f16>),
    /// The worker's [`KvPool`], where the denoiser runs, indexed by `kv_index`.
    Resident(&'a ort::value::DynTensor),
}

/// The three graphs of one bundle, owned by one worker thread.
pub struct Models {
    encoder: Graph,
    denoiser: Graph,
    decoder: Graph,
    /// `encoder(zeros)`: the unconditional branch's K/V, computed once at load.
    null_kv: Array3<f32>,
    /// The K/V pool of the last denoiser call, kept so that each call copies the
    /// distinct K/V into memory that is already mapped instead of a fresh allocation.
    kv_batch: Vec<f32>,
    /// The inputs of the last call laid out in halves (`unconditional_half`), kept for
    /// the same reason.
    layout_buffers: (Vec<f32>, Vec<f32>),
    /// Padding rows of calls laid out in halves without fixed shapes (those with fixed
    /// shapes count in the fixed-shape calls' stats).
    layout_padding_rows: u64,
    /// Whether the denoiser takes `kv_index` (see [`names::KV_INDEX`]).
    gathers_kv: bool,
    /// The element type of the image K/V between the encoder and the denoiser (the
    /// host keeps it in f32 either way).
    kv_element: KvElement,
    /// Whether the denoiser reads the second half of its batch as unconditional: every
    /// call is then laid out by [`HalfLayout`] and runs on one session.
    unconditional_half: bool,
    /// The images' K/V where the denoiser runs (with `gathers_kv` and the option on).
    kv_pool: Option<KvPool>,
    /// With `--cuda-graph`: the denoiser's fixed-shape calls, which then run every
    /// denoiser call of [`Denoiser::denoise`].
    fixed_calls: Option<FixedShapeCalls>,
    /// With `--device-loop`: the rows' state on the denoiser's device, which then runs
    /// every denoiser call through [`DeviceLoop::step`].
    device_loop: Option<DeviceLoopState>,
    image_size: usize,
    pub device: ActiveDevice,
    /// Sessions of the encoder and decoder (row slices that run at once), and of the
    /// denoiser unless it reads its second half as unconditional (then 1, on as many
    /// threads); 1 on CUDA.
    pub row_parallelism: usize,
    /// Threads that run the row slices after the first (`row_parallelism - 1`).
    helpers: Option<rayon::ThreadPool>,
    /// ONNX Runtime intra-op threads per session (0 = its default).
    pub intra_op_threads: usize,
    pub load_seconds: f64,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("device", &self.device)
            .field("row_parallelism", &self.row_parallelism)
            .finish()
    }
}

fn base_builder(rt: &OrtRuntime, opts: &SessionOptions) -> Result<SessionBuilder, String> {
    let b = Session::builder(&rt.environment).map_err(|e| e.to_string())?;
    let b = b
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| e.to_string())?;
    let b = if opts.intra_op_threads > 0 {
        b.with_intra_threads(opts.intra_op_threads)
            .map_err(|e| e.to_string())?
    } else {
        b
    };
    // Spinning threads burn the cores that other workers and the HTTP side need; the
    // latency they save is small next to a denoiser call.
    b.with_intra_op_spinning(false).map_err(|e| e.to_string())
}

/// Adds the CUDA provider; `cuda_graph`: with CUDA graph capture enabled.
#[cfg(feature = "cuda")]
fn with_cuda(b: SessionBuilder, cuda_graph: bool) -> Result<SessionBuilder, String> {
    let cuda = ort::ep::CUDA::default().with_cuda_graph(cuda_graph);
    b.with_execution_providers([cuda.build().error_on_failure()])
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(_b: SessionBuilder, _cuda_graph: bool) -> Result<SessionBuilder, String> {
    Err("this binary was built without the `cuda` feature".into())
}

fn extract<T: ort::value::PrimitiveTensorElementType + Clone, D: ndarray::Dimension>(
    outputs: &ort::session::SessionOutputs<'_>,
    name: &str,
) -> Result<ndarray::Array<T, D>, String> {
    outputs
        .get(name)
        .ok_or_else(|| format!("no {name} output"))?
        .try_extract_array::<T>()
        .map_err(|e| e.to_string())?
        .into_dimensionality::<D>()
        .map_err(|e| e.to_string())
        .map(|a| a.to_owned())
}

impl Models {
    /// Creates the sessions, checks them against the manifest and computes the
    /// unconditional K/V.
    pub fn load(
        rt: &OrtRuntime,
        bundle: &Bundle,
        opts: &SessionOptions,
    ) -> Result<Models, RuntimeError> {
        // With CUDA graphs, one worker loads (and captures) at a time.
        let _capturing = opts.cuda_graph.then(|| {
            crate::fixed_shapes::CAPTURE_LOCK
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        });
        let start = Instant::now();
        if opts.device_loop && !opts.cuda_graph {
            return Err(RuntimeError::Session {
                graph: "denoiser",
                path: bundle.denoiser_path.clone(),
                reason: "--device-loop runs on the fixed-shape calls of --cuda-graph true".into(),
            });
        }
        if opts.device_loop && opts.max_batch_rows < 2 {
            // A guided row's two passes go into one call.
            return Err(RuntimeError::Session {
                graph: "denoiser",
                path: bundle.denoiser_path.clone(),
                reason: "--device-loop needs --max-batch-rows of at least 2".into(),
            });
        }
        if opts.cuda_graph && !(opts.kv_pool && bundle.manifest.denoiser_gathers_kv()) {
            return Err(RuntimeError::Session {
                graph: "denoiser",
                path: bundle.denoiser_path.clone(),
                reason: "CUDA graphs need the resident K/V pool (--kv-pool true) and a \
                         denoiser that takes kv_index (re-export the bundle)"
                    .into(),
            });
        }
        let graphs = &bundle.manifest.graphs;
        let mut device = ActiveDevice::Cpu;
        let mut loaded = Vec::with_capacity(3);
        for (name, path, spec) in [
            ("encoder", &bundle.encoder_path, &graphs.encoder),
            ("denoiser", &bundle.denoiser_path, &graphs.denoiser),
            ("decoder", &bundle.decoder_path, &graphs.decoder),
        ] {
            let session_err = |reason: String| RuntimeError::Session {
                graph: name,
                path: path.clone(),
                reason,
            };
            let want_cuda = match opts.device {
                DeviceChoice::Cpu => false,
                DeviceChoice::Cuda => true,
                // The first graph decides; the others follow so all three share one device.
                DeviceChoice::Auto => {
                    cfg!(feature = "cuda") && (loaded.is_empty() || device == ActiveDevice::Cuda)
                }
            };
            let mut sessions = Vec::new();
            if want_cuda {
                // Only the denoiser runs often enough at one shape to be worth capturing.
                let capture = opts.cuda_graph && name == "denoiser";
                let attempt = base_builder(rt, opts)
                    .and_then(|b| with_cuda(b, capture))
                    .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()))
                    .map_err(|reason| {
                        // ONNX Runtime refuses capture when a node would run on the CPU
                        // with a copy in between (or the graph has control flow).
                        if capture {
                            format!("{reason} (with CUDA graph capture on, --cuda-graph)")
                        } else {
                            reason
                        }
                    });
                match attempt {
                    Ok(s) => {
                        device = ActiveDevice::Cuda;
                        sessions.push(s);
                    }
                    Err(reason) if opts.device == DeviceChoice::Cuda => {
                        return Err(RuntimeError::CudaUnavailable(reason));
                    }
                    Err(reason) if loaded.is_empty() => {
                        tracing::info!(%reason, "CUDA execution provider unavailable; using CPU");
                    }
                    Err(reason) => return Err(session_err(reason)),
                }
            }
            // A denoiser that reads its second half as unconditional runs each call in
            // one piece (the halves' layout spans the call): one session on the threads
            // that the row slices would have had.
            let (copies, session_opts) =
                if name == "denoiser" && bundle.manifest.denoiser_unconditional_half() {
                    let mut one = opts.clone();
                    if opts.intra_op_threads > 0 {
                        one.intra_op_threads = opts.intra_op_threads * opts.row_parallelism.max(1);
                    }
                    (1, one)
                } else {
                    (opts.row_parallelism.max(1), opts.clone())
                };
            if sessions.is_empty() {
                for _ in 0..copies {
                    let session = base_builder(rt, &session_opts)
                        .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()))
                        .map_err(session_err)?;
                    check_graph(name, &session, spec)?;
                    sessions.push(session);
                }
            } else {
                check_graph(name, &sessions[0], spec)?;
            }
            tracing::info!(graph = name, device = %device, sessions = sessions.len(), "graph loaded");
            loaded.push(Graph { name, sessions });
        }
        let mut it = loaded.into_iter();
        let (Some(encoder), Some(denoiser), Some(decoder)) = (it.next(), it.next(), it.next())
        else {
            unreachable!("three graphs were pushed")
        };
        let size = bundle.manifest.image.size as usize;
        let row_parallelism = encoder.sessions.len();
        let helpers = if row_parallelism > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(row_parallelism - 1)
                .thread_name(|i| format!("ladic-slice-{}", i + 1))
                .build()
                .map_err(|e| RuntimeError::Session {
                    graph: "worker",
                    path: bundle.dir.clone(),
                    reason: format!("cannot start the row-slice threads: {e}"),
                })?;
            Some(pool)
        } else {
            None
        };
        let mut models = Models {
            encoder,
            denoiser,
            decoder,
            null_kv: Array3::zeros((0, 0, 0)),
            kv_batch: Vec::new(),
            layout_buffers: (Vec::new(), Vec::new()),
            layout_padding_rows: 0,
            gathers_kv: bundle.manifest.denoiser_gathers_kv(),
            kv_element: match bundle.manifest.kv_dtype() {
                DType::Float16 => KvElement::F16,
                _ => KvElement::F32,
            },
            unconditional_half: bundle.manifest.denoiser_unconditional_half(),
            kv_pool: None,
            fixed_calls: None,
            device_loop: None,
            image_size: size,
            device,
            row_parallelism,
            helpers,
            intra_op_threads: opts.intra_op_threads,
            load_seconds: 0.0,
        };
        let zeros = Array4::<f32>::zeros((1, 3, size, size));
        let null = models.encode(zeros.view())?;
        models.null_kv = null.index_axis_move(Axis(0), 0);
        if models.gathers_kv && opts.kv_pool {
            let pool_err = |reason| RuntimeError::Session {
                graph: "denoiser",
                path: bundle.denoiser_path.clone(),
                reason,
            };
            let pool = models.new_kv_pool(opts.cuda_graph).map_err(pool_err)?;
            if opts.cuda_graph {
                let latent = (
                    bundle.manifest.text.max_len,
                    bundle.manifest.text.latent_dim,
                );
                let capture = device == ActiveDevice::Cuda;
                let transfer = match device {
                    ActiveDevice::Cpu => Transfer::InPlace,
                    ActiveDevice::Cuda => Transfer::Cuda(CudaRuntime::get().map_err(pool_err)?),
                };
                let allocator = models.device_allocator().map_err(pool_err)?;
                // Every buffer in the denoiser's memory first, then the first runs (the
                // captures): memory allocated after a capture may be where the captured
                // graph keeps its intermediate tensors (src/fixed_shapes.rs).
                // A denoiser that splits its batch in halves runs even batches only.
                let rows = if models.unconditional_half {
                    2..=opts.max_batch_rows.max(2)
                } else {
                    1..=opts.max_batch_rows
                };
                let mut calls = FixedShapeCalls::allocate(
                    &mut models.denoiser.sessions[0],
                    &allocator,
                    &pool.tensor(),
                    latent,
                    rows,
                    capture,
                    transfer,
                )
                .map_err(pool_err)?;
                let mut state = if opts.device_loop {
                    let slots =
                        device_loop_slots(opts.max_batch_rows, bundle.manifest.mbr.candidates);
                    let state = Self::load_device_loop(
                        rt, opts, &mut calls, &allocator, latent, slots, device, capture,
                    )
                    .map_err(pool_err)?;
                    Some(state)
                } else {
                    None
                };
                calls
                    .run_first(&mut models.denoiser.sessions[0])
                    .map_err(pool_err)?;
                if let Some(state) = state.as_mut() {
                    state.run_first(&mut calls).map_err(pool_err)?;
                    state
                        .check_buckets(&mut calls, &mut models.denoiser.sessions[0])
                        .map_err(pool_err)?;
                }
                models.device_loop = state;
                models.fixed_calls = Some(calls);
                if !capture {
                    tracing::warn!(
                        "--cuda-graph on the CPU: denoiser calls are padded to fixed shapes, \
                         nothing is captured"
                    );
                }
            }
            models.kv_pool = Some(pool);
        }
        if models.unconditional_half {
            tracing::info!(
                denoiser_sessions = models.denoiser.sessions.len(),
                "the denoiser reads the second half of each call as the unconditional pass \
                 (one null K/V for all of it); its calls are laid out in halves and not \
                 sliced"
            );
            if bundle.manifest.sampler.guidance == 0.0 {
                tracing::warn!(
                    "the bundle's default guidance is 0, but its denoiser is exported \
                     --unconditional-half: unguided calls run twice their rows (padding); \
                     export it without that option for unguided traffic"
                );
            }
        }
        tracing::info!(
            kv_index = models.gathers_kv,
            resident_kv_pool = models.kv_pool.is_some(),
            "image K/V: {}",
            match (models.gathers_kv, models.kv_pool.is_some()) {
                (true, true) =>
                    "written by the encoder into a pool on the model's device, read there by the denoiser",
                (true, false) => "sent once per image per denoiser call (--kv-pool false)",
                _ => "sent once per row per denoiser call (a denoiser without kv_index)",
            }
        );
        models.load_seconds = start.elapsed().as_secs_f64();
        tracing::info!(
            device = %device,
            requested = ?opts.device,
            cuda_built = cfg!(feature = "cuda"),
            row_parallelism,
            intra_op_threads = opts.intra_op_threads,
            seconds = models.load_seconds,
            "bundle sessions loaded"
        );
        Ok(models)
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// The gather and update graphs of the device loop, on the denoiser's device, and
    /// the state pools of `slots` slots ([`device_loop_slots`]).
    #[allow(clippy::too_many_arguments)]
    fn load_device_loop(
        rt: &OrtRuntime,
        opts: &SessionOptions,
        calls: &mut FixedShapeCalls,
        allocator: &Allocator,
        latent: (usize, usize),
        slots: usize,
        device: ActiveDevice,
        capture: bool,
    ) -> Result<DeviceLoopState, String> {
        let session = |bytes: &[u8]| {
            let b = base_builder(rt, opts)?;
            let mut b = match device {
                ActiveDevice::Cuda => with_cuda(b, capture)?,
                ActiveDevice::Cpu => b,
            };
            b.commit_from_memory(bytes).map_err(|e| e.to_string())
        };
        let gather = session(crate::device_loop::GATHER_GRAPH)?;
        let update = session(crate::device_loop::UPDATE_GRAPH)?;
        DeviceLoopState::new(gather, update, calls, allocator, latent, slots, capture)
    }

    /// The device loop's counters and the state slots held now, with `--device-loop`.
    pub fn device_loop_stats(&self) -> Option<(DeviceLoopStats, usize)> {
        self.device_loop
            .as_ref()
            .map(|state| (state.stats, state.slots_held()))
    }

    /// An allocator of the memory the denoiser reads its inputs from: the GPU's with
    /// CUDA.
    fn device_allocator(&self) -> Result<Allocator, String> {
        Ok(match self.device {
            ActiveDevice::Cpu => Allocator::default(),
            ActiveDevice::Cuda => {
                let info = MemoryInfo::new(
                    AllocationDevice::CUDA,
                    0,
                    AllocatorType::Device,
                    MemoryType::Default,
                )
                .map_err(|e| e.to_string())?;
                Allocator::new(&self.denoiser.sessions[0], info).map_err(|e| e.to_string())?
            }
        })
    }

    /// A K/V pool in the denoiser's memory; `fixed`: at its final size, never growing
    /// (for CUDA graphs).
    fn new_kv_pool(&self, fixed: bool) -> Result<KvPool, String> {
        let allocator = self.device_allocator()?;
        let element = self.kv_element;
        if !fixed {
            return KvPool::with_element(allocator, &self.null_kv, KV_POOL_SLOTS, element);
        }
        let mut pool =
            KvPool::with_element(allocator, &self.null_kv, FIXED_KV_POOL_SLOTS, element)?;
        let capacity = pool.stats.capacity;
        pool.limit_slots(capacity);
        Ok(pool)
    }

    /// The rows a denoiser call of `rows` rows runs at: the next power of two with
    /// `--cuda-graph`, else `rows`.
    pub fn padded_rows(&self, rows: usize) -> usize {
        match self.fixed_calls {
            Some(_) => crate::fixed_shapes::bucket_rows(rows),
            None => rows,
        }
    }

    /// Rows run so far only to fill denoiser calls: the fixed-shape buckets' padding,
    /// and the padding of calls laid out in halves ([`HalfLayout`]).
    pub fn padding_rows_total(&self) -> u64 {
        self.fixed_calls
            .as_ref()
            .map_or(0, |calls| calls.stats.padding_rows)
            + self.layout_padding_rows
    }

    /// The fixed-shape calls' counters, with `--cuda-graph`.
    pub fn fixed_shape_stats(&self) -> Option<FixedShapeStats> {
        self.fixed_calls.as_ref().map(|c| c.stats)
    }

    /// The K/V pool's counters, when there is one.
    pub fn kv_pool_stats(&self) -> Option<crate::kv_pool::PoolStats> {
        self.kv_pool.as_ref().map(|p| p.stats)
    }

    /// `pixels [B,3,H,W]` -> `image_kv [B, 2*layers, tokens, hidden]`.
    pub fn encode(&mut self, pixels: ArrayView4<f32>) -> Result<Array4<f32>, RuntimeError> {
        let pixels = pixels.as_standard_layout();
        let kv_element = self.kv_element;
        let rows = pixels.dim().0;
        let parts = self
            .encoder
            .run_rows(self.helpers.as_ref(), rows, |session, range| {
                let fail = |reason: String| RuntimeError::Inference {
                    graph: "encoder",
                    reason,
                };
                let slice = pixels.slice(s![range.clone(), .., .., ..]);
                let input = TensorRef::from_array_view(slice).map_err(|e| fail(e.to_string()))?;
                let outputs = session
                    .run(ort::inputs![names::PIXELS => input])
                    .map_err(|e| fail(e.to_string()))?;
                let kv: Array4<f32> = match kv_element {
                    KvElement::F32 => extract(&outputs, names::IMAGE_KV).map_err(fail)?,
                    // Exact: every f16 is an f32.
                    KvElement::F16 => extract::<half::f16, _>(&outputs, names::IMAGE_KV)
                        .map_err(fail)?
                        .mapv(half::f16::to_f32),
                };
                if kv.dim().0 != range.len() {
                    return Err(fail(format!(
                        "image_kv has {} rows for {} images",
                        kv.dim().0,
                        range.len()
                    )));
                }
                Ok(kv)
            })?;
        join_rows(&self.encoder, parts)
    }

    /// Encodes `pixels [B,3,H,W]`, one [`ImageKv`] per image. With a resident pool
    /// the encoder writes straight into a run of its slots (device memory with CUDA):
    /// the K/V never passes through the host. Otherwise the K/V comes back to the host.
    pub fn encode_images(&mut self, pixels: ArrayView4<f32>) -> Result<Vec<ImageKv>, RuntimeError> {
        if self.kv_pool.is_none() {
            let kv = self.encode(pixels)?;
            return Ok(kv
                .outer_iter()
                .map(|k| ImageKv::Host(std::sync::Arc::new(k.to_owned())))
                .collect());
        }
        let images = pixels.dim().0;
        if images == 0 {
            return Ok(Vec::new());
        }
        let fail = |reason: String| RuntimeError::Inference {
            graph: "encoder",
            reason,
        };
        let pixels = pixels.as_standard_layout();
        let mut handles: Vec<ImageKv> = Vec::with_capacity(images);
        // Usually one encoder call; at the pool's size limit, one per free run of slots.
        while handles.len() < images {
            let done = handles.len();
            let pool = self.kv_pool.as_mut().expect("checked above");
            let (first, count) = pool.reserve_run(images - done).map_err(fail)?;
            // Handles first: if the encoder fails, dropping them frees the run.
            handles.extend(
                (first..first + count)
                    .map(|slot| ImageKv::Resident(std::sync::Arc::new(pool.resident(slot)))),
            );
            let output = pool.run_view(first, count).map_err(fail)?;
            // One session: the slices of a CPU worker would each need their own binding.
            let session = &mut self.encoder.sessions[0];
            let part = pixels.slice(s![done..done + count, .., .., ..]).to_owned();
            let input = ort::value::Tensor::from_array(part).map_err(|e| fail(e.to_string()))?;
            let mut binding = session.create_binding().map_err(|e| fail(e.to_string()))?;
            binding
                .bind_input(names::PIXELS, &input)
                .map_err(|e| fail(e.to_string()))?;
            binding
                .bind_output(names::IMAGE_KV, output)
                .map_err(|e| fail(e.to_string()))?;
            session
                .run_binding(&binding)
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(handles)
    }

    /// The most images whose K/V a worker can hold at once: the resident pool's limit;
    /// without a pool, no limit.
    pub fn max_images_in_flight(&self) -> usize {
        self.kv_pool.as_ref().map_or(usize::MAX, KvPool::max_images)
    }

    /// One denoiser pass; row i is at timestep `t[i]` with K/V `kv[i]`, a K/V per row
    /// (the micro-benchmarks' ready batch). Named apart from [`Denoiser::denoise`], which
    /// the sampler calls with references to each row's K/V.
    pub fn denoise_one_kv_per_row(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: ArrayView4<f32>,
    ) -> Result<Array3<f32>, RuntimeError> {
        let identity: Vec<i64> = (0..kv.dim().0 as i64).collect();
        self.denoise_gathered(x, self_cond, t, kv, &identity)
    }

    /// One denoiser pass; row i is at timestep `t[i]` with K/V `kv_pool[kv_index[i]]`.
    /// With a bundle whose denoiser takes `kv_index` the pool is sent as is (each
    /// distinct K/V once); with an older one the rows' K/V are gathered here. Not for a
    /// denoiser that reads its second half as unconditional (use [`Denoiser::denoise`],
    /// which lays the rows out for it).
    pub fn denoise_gathered(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv_pool: ArrayView4<f32>,
        kv_index: &[i64],
    ) -> Result<Array3<f32>, RuntimeError> {
        if self.unconditional_half {
            return Err(self.denoiser.fail(
                "this denoiser reads the second half of its rows as unconditional; \
                 its calls must be laid out for it (Denoiser::denoise)",
            ));
        }
        self.run_gathered(x, self_cond, t, kv_pool, kv_index)
    }

    fn run_gathered(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv_pool: ArrayView4<f32>,
        kv_index: &[i64],
    ) -> Result<Array3<f32>, RuntimeError> {
        let slots = kv_pool.dim().0;
        if let Some(bad) = kv_index.iter().find(|&&i| i < 0 || i as usize >= slots) {
            return Err(self
                .denoiser
                .fail(format!("kv_index {bad} outside the pool of {slots}")));
        }
        let rows = kv_index.len();
        let identity = slots == rows && kv_index.iter().enumerate().all(|(i, &k)| k as usize == i);
        if self.gathers_kv && self.kv_element == KvElement::F16 {
            // The host keeps K/V in f32; this denoiser reads it in f16 (the same values:
            // the encoder computed them in f16).
            let pool = kv_pool.mapv(half::f16::from_f32);
            self.run_denoiser(x, self_cond, t, KvInput::PoolF16(pool.view()), kv_index)
        } else if self.gathers_kv {
            let pool = kv_pool.as_standard_layout();
            self.run_denoiser(x, self_cond, t, KvInput::Pool(pool.view()), kv_index)
        } else if identity {
            let per_row = kv_pool.as_standard_layout();
            self.run_denoiser(x, self_cond, t, KvInput::PerRow(per_row.view()), kv_index)
        } else {
            // Old graphs take one K/V row per input row: gather them on the host.
            let picks: Vec<usize> = kv_index.iter().map(|&i| i as usize).collect();
            let per_row = kv_pool.select(Axis(0), &picks);
            self.run_denoiser(x, self_cond, t, KvInput::PerRow(per_row.view()), kv_index)
        }
    }

    fn run_denoiser(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: KvInput<'_>,
        kv_index: &[i64],
    ) -> Result<Array3<f32>, RuntimeError> {
        if self.fixed_calls.is_some() {
            // A CUDA-graph session would capture this call's shapes as its default graph.
            return Err(self.denoiser.fail(
                "with --cuda-graph the denoiser runs only fixed-shape calls on the K/V pool",
            ));
        }
        let x = x.as_standard_layout();
        let sc = self_cond.as_standard_layout();
        let rows = x.dim().0;
        if sc.dim().0 != rows || t.len() != rows || kv_index.len() != rows {
            return Err(self.denoiser.fail(format!(
                "inputs disagree on the rows: x {rows}, self_cond {}, t {}, kv_index {}",
                sc.dim().0,
                t.len(),
                kv_index.len()
            )));
        }
        let kv = &kv;
        // (A denoiser that reads its second half as unconditional has one session, so
        // its calls, laid out in halves, are never sliced.)
        let parts = self
            .denoiser
            .run_rows(self.helpers.as_ref(), rows, |session, range| {
                let fail = |reason: String| RuntimeError::Inference {
                    graph: "denoiser",
                    reason,
                };
                let tensor_err = |e: ort::Error| fail(e.to_string());
                let x_part = x.slice(s![range.clone(), .., ..]);
                let x_t = TensorRef::from_array_view(x_part).map_err(tensor_err)?;
                let sc_part = TensorRef::from_array_view(sc.slice(s![range.clone(), .., ..]))
                    .map_err(tensor_err)?;
                let t_part =
                    TensorRef::from_array_view(ndarray::ArrayView1::from(&t[range.clone()]))
                        .map_err(tensor_err)?;
                let index =
                    TensorRef::from_array_view(ndarray::ArrayView1::from(&kv_index[range.clone()]))
                        .map_err(tensor_err)?;
                // Every slice gets the whole pool and its rows' indices into it.
                let outputs = match kv {
                    KvInput::PerRow(per_row) => {
                        let kv_part = TensorRef::from_array_view(per_row.slice(s![
                            range.clone(),
                            ..,
                            ..,
                            ..
                        ]))
                        .map_err(tensor_err)?;
                        session.run(ort::inputs![
                            names::X_T => x_t,
                            names::SELF_COND => sc_part,
                            names::T => t_part,
                            names::IMAGE_KV => kv_part,
                        ])
                    }
                    pooled => {
                        let pool: ort::session::SessionInputValue<'_> = match pooled {
                            KvInput::Pool(pool) => TensorRef::from_array_view(*pool)
                                .map_err(tensor_err)?
                                .into(),
                            KvInput::PoolF16(pool) => TensorRef::from_array_view(*pool)
                                .map_err(tensor_err)?
                                .into(),
                            KvInput::Resident(pool) => (*pool).into(),
                            KvInput::PerRow(_) => unreachable!("matched above"),
                        };
                        session.run(ort::inputs![
                            names::X_T => x_t,
                            names::SELF_COND => sc_part,
                            names::T => t_part,
                            names::IMAGE_KV => pool,
                            names::KV_INDEX => index,
                        ])
                    }
                }
                .map_err(tensor_err)?;
                let x0: Array3<f32> = extract(&outputs, names::X0).map_err(fail)?;
                if x0.dim() != x_part.dim() {
                    return Err(fail(format!(
                        "x0 has shape {:?}; expected {:?}",
                        x0.dim(),
                        x_part.dim()
                    )));
                }
                Ok(x0)
            })?;
        join_rows(&self.denoiser, parts)
    }

    /// `x0 [B,L,D]` -> (`token_ids [B,L]`, `confidence [B,L]`).
    pub fn decode(
        &mut self,
        x0: ArrayView3<f32>,
    ) -> Result<(Array2<i64>, Array2<f32>), RuntimeError> {
        let x0 = x0.as_standard_layout();
        let rows = x0.dim().0;
        let parts = self.decoder.run_rows(self.helpers.as_ref(), rows, |session, range| {
            let fail = |reason: String| RuntimeError::Inference {
                graph: "decoder",
                reason,
            };
            let part = x0.slice(s![range.clone(), .., ..]);
            let want = (part.dim().0, part.dim().1);
            let outputs = session
                .run(ort::inputs![names::X0 => TensorRef::from_array_view(part).map_err(|e| fail(e.to_string()))?])
                .map_err(|e| fail(e.to_string()))?;
            let ids: Array2<i64> = extract(&outputs, names::TOKEN_IDS).map_err(fail)?;
            let conf: Array2<f32> = extract(&outputs, names::CONFIDENCE).map_err(fail)?;
            if ids.dim() != want || conf.dim() != want {
                return Err(fail(format!(
                    "token_ids {:?} and confidence {:?}; expected {want:?}",
                    ids.dim(),
                    conf.dim()
                )));
            }
            Ok((ids, conf))
        })?;
        let (ids, conf): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        Ok((
            join_rows(&self.decoder, ids)?,
            join_rows(&self.decoder, conf)?,
        ))
    }
}

impl DeviceLoop for Models {
    type Error = RuntimeError;

    fn step(&mut self, rows: Vec<DeviceRow<'_>>) -> Result<DeviceStep, RuntimeError> {
        let fail = |reason: String| RuntimeError::Inference {
            graph: "denoiser",
            reason,
        };
        let (Some(state), Some(calls), Some(pool)) = (
            self.device_loop.as_mut(),
            self.fixed_calls.as_mut(),
            self.kv_pool.as_mut(),
        ) else {
            return Err(fail(
                "the device loop was not set up (--device-loop)".into(),
            ));
        };
        // Each row's conditional pass, then its unconditional one if guided; `groups`:
        // each row's passes among them.
        let mut kv = Vec::with_capacity(2 * rows.len());
        let mut groups = Vec::with_capacity(rows.len());
        for row in &rows {
            let first = kv.len();
            kv.push(row.kv);
            if row.denoiser_rows() == 2 {
                kv.push(KvRef::Null);
            }
            groups.push(first..kv.len());
        }
        if !self.unconditional_half {
            let kv_index = pool.assign(&kv).map_err(fail)?;
            return state
                .step(calls, &mut self.denoiser.sessions[0], rows, &kv_index, None)
                .map_err(fail);
        }
        // The batch's halves (HalfLayout), in as many steps as the largest fixed shape
        // needs; a guided row's two passes stay in one. Each step updates the pools'
        // next copy from the last, so the rows of a later one read what an earlier one
        // left of them, unchanged.
        let null: Vec<bool> = kv.iter().map(|k| matches!(k, KvRef::Null)).collect();
        let parts = HalfLayout::split(&null, &groups, calls.max_rows());
        let mut out = DeviceStep {
            new_slots: Vec::with_capacity(rows.len()),
            x0: Vec::with_capacity(rows.len()),
        };
        let mut rows = rows.into_iter();
        for part in parts {
            let passes = groups[part.start].start..groups[part.end - 1].end;
            let layout = HalfLayout::new(&null[passes.clone()], crate::fixed_shapes::bucket_rows);
            let kv_index = pool.assign(&kv[passes]).map_err(fail)?;
            let part: Vec<DeviceRow<'_>> = rows.by_ref().take(part.len()).collect();
            let step = state
                .step(
                    calls,
                    &mut self.denoiser.sessions[0],
                    part,
                    &kv_index,
                    Some(&layout),
                )
                .map_err(fail)?;
            out.new_slots.extend(step.new_slots);
            out.x0.extend(step.x0);
        }
        Ok(out)
    }
}

impl Denoiser for Models {
    type Error = RuntimeError;

    fn waits_on_device(&self) -> bool {
        self.device == ActiveDevice::Cuda
    }

    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop<Error = RuntimeError>> {
        if self.device_loop.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, RuntimeError> {
        if self.unconditional_half {
            self.denoise_in_halves(x, self_cond, t, kv)
        } else {
            self.denoise_rows(x, self_cond, t, kv)
        }
    }

    fn decode(&mut self, x0: ArrayView3<f32>) -> Result<(Array2<i64>, Array2<f32>), RuntimeError> {
        Models::decode(self, x0)
    }
}

impl Models {
    /// [`Denoiser::denoise`] for a denoiser that reads the second half of its batch as
    /// unconditional: the rows laid out by [`HalfLayout`], in as many calls as the
    /// largest fixed shape needs, and the results put back in the rows' order.
    fn denoise_in_halves(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, RuntimeError> {
        let (n, l, d) = x.dim();
        if self_cond.dim() != x.dim() || t.len() != n || kv.len() != n {
            return Err(self.denoiser.fail(format!(
                "inputs disagree on the rows: x {n}, self_cond {}, t {}, kv {}",
                self_cond.dim().0,
                t.len(),
                kv.len()
            )));
        }
        let null: Vec<bool> = kv.iter().map(|k| matches!(k, KvRef::Null)).collect();
        let max_rows = self
            .fixed_calls
            .as_ref()
            .map_or(usize::MAX, FixedShapeCalls::max_rows);
        // A guided caption's two passes (a row on an image's K/V, then one on the null
        // K/V) stay in one call, as in the device loop's steps.
        let mut groups: Vec<Range<usize>> = Vec::new();
        for i in 0..n {
            match groups.last_mut() {
                Some(last) if null[i] && last.len() == 1 && !null[last.start] => last.end += 1,
                _ => groups.push(i..i + 1),
            }
        }
        let parts = HalfLayout::split(&null, &groups, max_rows)
            .into_iter()
            .map(|calls| groups[calls.start].start..groups[calls.end - 1].end);
        let mut out = Array3::<f32>::zeros((n, l, d));
        for part in parts {
            let layout = HalfLayout::new(&null[part.clone()], |rows| self.padded_rows(rows));
            // The call's row at each batch row; None: padding, zeros at t = 0 on the null
            // K/V, as the fixed shapes pad.
            let mut source: Vec<Option<usize>> = vec![None; layout.rows];
            for (i, &at) in part.clone().zip(&layout.positions) {
                source[at] = Some(i);
            }
            let ts: Vec<i64> = source.iter().map(|s| s.map_or(0, |i| t[i])).collect();
            let kvs: Vec<KvRef<'_>> = source
                .iter()
                .map(|s| s.map_or(KvRef::Null, |i| kv[i]))
                .collect();
            // Into buffers kept from the last call, as the sampler stacks its inputs:
            // fresh multi-megabyte arrays cost more than the copies.
            let (mut xs, mut scs) = std::mem::take(&mut self.layout_buffers);
            let row = l * d;
            for (buffer, input) in [(&mut xs, &x), (&mut scs, &self_cond)] {
                buffer.resize(layout.rows * row, 0.0);
                for (target, from) in buffer.chunks_mut(row).zip(&source) {
                    let Some(i) = from else {
                        target.fill(0.0);
                        continue;
                    };
                    let values = input.index_axis(Axis(0), *i);
                    match values.as_slice() {
                        Some(values) => target.copy_from_slice(values),
                        None => target.iter_mut().zip(values).for_each(|(t, &v)| *t = v),
                    }
                }
            }
            let shape = (layout.rows, l, d);
            let result = match (
                ArrayView3::from_shape(shape, &xs),
                ArrayView3::from_shape(shape, &scs),
            ) {
                (Ok(xv), Ok(sv)) => self.denoise_rows(xv, sv, &ts, &kvs),
                _ => Err(self.denoiser.fail("laid-out inputs of the wrong length")),
            };
            self.layout_buffers = (xs, scs);
            let x0 = result?;
            match self.fixed_calls.as_mut() {
                Some(calls) => calls.stats.padding_rows += layout.padding() as u64,
                None => self.layout_padding_rows += layout.padding() as u64,
            }
            for (i, &at) in part.zip(&layout.positions) {
                out.index_axis_mut(Axis(0), i)
                    .assign(&x0.index_axis(Axis(0), at));
            }
        }
        Ok(out)
    }

    /// One denoiser call on the rows as they are.
    fn denoise_rows(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, RuntimeError> {
        if let Some(pool) = self.kv_pool.as_mut() {
            let kv_index = pool.assign(kv).map_err(|reason| RuntimeError::Inference {
                graph: "denoiser",
                reason,
            })?;
            if let Some(calls) = self.fixed_calls.as_mut() {
                // The buckets' inputs are bound to the pool already.
                return calls
                    .run(&mut self.denoiser.sessions[0], x, self_cond, t, &kv_index)
                    .map_err(|reason| self.denoiser.fail(reason));
            }
            // The call borrows all of `self`, so the pool is lent out for it, and put
            // back even if the call panics: the worker survives a panic, and its later
            // calls need the pool (without it they would take the host path).
            let pool = self.kv_pool.take().expect("the pool was just used");
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let tensor = pool.tensor();
                self.run_denoiser(x, self_cond, t, KvInput::Resident(&tensor), &kv_index)
            }));
            self.kv_pool = Some(pool);
            return result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        }
        // The pool holds each distinct K/V once, in order of first use: a guided pair and
        // the MBR candidates of one image share theirs, and every unconditional row
        // shares the null K/V. The same allocation is the same K/V.
        let dim = self.null_kv.dim();
        let mut pool = std::mem::take(&mut self.kv_batch);
        pool.clear();
        let mut slot_of: std::collections::HashMap<*const f32, i64> =
            std::collections::HashMap::new();
        let mut kv_index = Vec::with_capacity(kv.len());
        if self.unconditional_half {
            // The denoiser's second half reads slot 0: the null K/V goes there.
            pool.extend(self.null_kv.iter().copied());
            slot_of.insert(self.null_kv.as_ptr(), 0);
        }
        for src in kv {
            let a = match src {
                KvRef::Image(a) => a.as_ref(),
                KvRef::Null => &self.null_kv,
                KvRef::Resident(_) => {
                    return Err(RuntimeError::Inference {
                        graph: "denoiser",
                        reason: "resident K/V without a resident pool".into(),
                    });
                }
            };
            if a.dim() != dim {
                return Err(RuntimeError::Inference {
                    graph: "denoiser",
                    reason: format!("image K/V of shape {:?}; expected {dim:?}", a.dim()),
                });
            }
            let next = slot_of.len() as i64;
            let slot = *slot_of.entry(a.as_ptr()).or_insert_with(|| {
                match a.as_slice() {
                    Some(s) => pool.extend_from_slice(s),
                    None => pool.extend(a.iter().copied()),
                }
                next
            });
            kv_index.push(slot);
        }
        let result = ArrayView4::from_shape((slot_of.len(), dim.0, dim.1, dim.2), &pool)
            .map_err(|e| RuntimeError::Inference {
                graph: "denoiser",
                reason: e.to_string(),
            })
            .and_then(|pool| self.run_gathered(x, self_cond, t, pool, &kv_index));
        self.kv_batch = pool;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_slices_cover_the_rows_in_order_and_evenly() {
        assert_eq!(row_slices(5, 2), vec![0..3, 3..5]);
        assert_eq!(row_slices(6, 3), vec![0..2, 2..4, 4..6]);
        assert_eq!(row_slices(7, 3), vec![0..3, 3..5, 5..7]);
        // Never an empty slice: fewer rows than sessions use fewer slices.
        assert_eq!(row_slices(2, 4), vec![0..1, 1..2]);
        assert_eq!(row_slices(1, 4), vec![0..1]);
        assert_eq!(row_slices(0, 4), vec![0..0]);
        assert_eq!(row_slices(9, 1), vec![0..9]);
    }

    #[test]
    fn automatic_threading_gives_each_worker_one_session_per_core() {
        let opts = |row_parallelism, intra_op_threads| SessionOptions {
            device: DeviceChoice::Cpu,
            intra_op_threads,
            row_parallelism,
            kv_pool: true,
            cuda_graph: false,
            device_loop: false,
            max_batch_rows: 64,
        };
        let plan = |o: SessionOptions, workers, cores| {
            let r = o.for_workers(workers, cores);
            (r.row_parallelism, r.intra_op_threads)
        };
        // Nothing set: the cores are shared among the workers, one thread per session.
        assert_eq!(plan(opts(0, 0), 1, 8), (8, 1));
        assert_eq!(plan(opts(0, 0), 2, 8), (4, 1));
        assert_eq!(plan(opts(0, 0), 3, 2), (1, 1));
        // An explicit thread count keeps one session per graph.
        assert_eq!(plan(opts(0, 4), 1, 8), (1, 4));
        assert_eq!(plan(opts(1, 0), 1, 8), (1, 0));
        // Explicit slices without threads get one thread each.
        assert_eq!(plan(opts(3, 0), 1, 8), (3, 1));
        assert_eq!(plan(opts(3, 2), 1, 8), (3, 2));
    }

    #[test]
    fn missing_library_is_a_one_line_error_with_the_fix() {
        let err = RuntimeError::Library {
            path: "/nowhere/libonnxruntime.so".into(),
            reason: "no such file".into(),
        }
        .to_string();
        assert!(!err.contains('\n'));
        assert!(err.contains("scripts/fetch-onnxruntime.sh"), "{err}");
    }
}
