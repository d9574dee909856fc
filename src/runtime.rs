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

use ndarray::{Array2, Array3, Array4, ArrayView3, ArrayView4, Axis, Ix2, Ix3, Ix4};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::bundle::{Bundle, DType, GraphSpec, names};
use crate::sampler::{Denoiser, KvRef};

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

/// How to build sessions.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: DeviceChoice,
    pub intra_op_threads: usize,
}

fn ort_dtype(d: DType) -> TensorElementType {
    match d {
        DType::Float32 => TensorElementType::Float32,
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

/// The three sessions of one bundle, owned by one worker thread.
pub struct Models {
    encoder: Session,
    denoiser: Session,
    decoder: Session,
    /// `encoder(zeros)`: the unconditional branch's K/V, computed once at load.
    null_kv: Array3<f32>,
    /// The K/V batch of the last denoiser call, kept so that each call copies the rows'
    /// K/V into memory that is already mapped instead of a fresh zeroed allocation.
    kv_batch: Vec<f32>,
    image_size: usize,
    pub device: ActiveDevice,
    pub load_seconds: f64,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("device", &self.device)
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

#[cfg(feature = "cuda")]
fn with_cuda(b: SessionBuilder) -> Result<SessionBuilder, String> {
    b.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(_b: SessionBuilder) -> Result<SessionBuilder, String> {
    Err("this binary was built without the `cuda` feature".into())
}

impl Models {
    /// Creates the sessions, checks them against the manifest and computes the
    /// unconditional K/V.
    pub fn load(
        rt: &OrtRuntime,
        bundle: &Bundle,
        opts: &SessionOptions,
    ) -> Result<Models, RuntimeError> {
        let start = Instant::now();
        let graphs = &bundle.manifest.graphs;
        let mut device = ActiveDevice::Cpu;
        let mut sessions = Vec::with_capacity(3);
        for (graph, path, spec) in [
            ("encoder", &bundle.encoder_path, &graphs.encoder),
            ("denoiser", &bundle.denoiser_path, &graphs.denoiser),
            ("decoder", &bundle.decoder_path, &graphs.decoder),
        ] {
            let session_err = |reason: String| RuntimeError::Session {
                graph,
                path: path.clone(),
                reason,
            };
            let want_cuda = match opts.device {
                DeviceChoice::Cpu => false,
                DeviceChoice::Cuda => true,
                // The first graph decides; the others follow so all three share one device.
                DeviceChoice::Auto => {
                    cfg!(feature = "cuda") && (sessions.is_empty() || device == ActiveDevice::Cuda)
                }
            };
            let mut session = None;
            if want_cuda {
                let attempt = base_builder(rt, opts)
                    .and_then(with_cuda)
                    .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()));
                match attempt {
                    Ok(s) => {
                        device = ActiveDevice::Cuda;
                        session = Some(s);
                    }
                    Err(reason) if opts.device == DeviceChoice::Cuda => {
                        return Err(RuntimeError::CudaUnavailable(reason));
                    }
                    Err(reason) if sessions.is_empty() => {
                        tracing::info!(%reason, "CUDA execution provider unavailable; using CPU");
                    }
                    Err(reason) => return Err(session_err(reason)),
                }
            }
            let session = match session {
                Some(s) => s,
                None => base_builder(rt, opts)
                    .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()))
                    .map_err(session_err)?,
            };
            check_graph(graph, &session, spec)?;
            sessions.push(session);
        }
        let mut it = sessions.into_iter();
        let (Some(encoder), Some(denoiser), Some(decoder)) = (it.next(), it.next(), it.next())
        else {
            unreachable!("three sessions were pushed")
        };
        let size = bundle.manifest.image.size as usize;
        let mut models = Models {
            encoder,
            denoiser,
            decoder,
            null_kv: Array3::zeros((0, 0, 0)),
            kv_batch: Vec::new(),
            image_size: size,
            device,
            load_seconds: 0.0,
        };
        let zeros = Array4::<f32>::zeros((1, 3, size, size));
        let null = models.encode(zeros.view())?;
        models.null_kv = null.index_axis_move(Axis(0), 0);
        models.load_seconds = start.elapsed().as_secs_f64();
        tracing::info!(
            device = %device,
            requested = ?opts.device,
            cuda_built = cfg!(feature = "cuda"),
            seconds = models.load_seconds,
            "bundle sessions loaded"
        );
        Ok(models)
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `pixels [B,3,H,W]` -> `image_kv [B, 2*layers, tokens, hidden]`.
    pub fn encode(&mut self, pixels: ArrayView4<f32>) -> Result<Array4<f32>, RuntimeError> {
        let fail = |reason: String| RuntimeError::Inference {
            graph: "encoder",
            reason,
        };
        let pixels = pixels.as_standard_layout();
        let input = TensorRef::from_array_view(pixels.view()).map_err(|e| fail(e.to_string()))?;
        let outputs = self
            .encoder
            .run(ort::inputs![names::PIXELS => input])
            .map_err(|e| fail(e.to_string()))?;
        let kv = outputs
            .get(names::IMAGE_KV)
            .ok_or_else(|| fail("no image_kv output".into()))?
            .try_extract_array::<f32>()
            .map_err(|e| fail(e.to_string()))?
            .into_dimensionality::<Ix4>()
            .map_err(|e| fail(e.to_string()))?
            .to_owned();
        if kv.dim().0 != pixels.dim().0 {
            return Err(fail(format!(
                "image_kv has {} rows for {} images",
                kv.dim().0,
                pixels.dim().0
            )));
        }
        Ok(kv)
    }

    /// One denoiser pass; row i is at timestep `t[i]` with K/V `kv[i]`.
    pub fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: ArrayView4<f32>,
    ) -> Result<Array3<f32>, RuntimeError> {
        let fail = |reason: String| RuntimeError::Inference {
            graph: "denoiser",
            reason,
        };
        let x = x.as_standard_layout();
        let sc = self_cond.as_standard_layout();
        let kv = kv.as_standard_layout();
        let t = ndarray::ArrayView1::from(t);
        let outputs = self
            .denoiser
            .run(ort::inputs![
                names::X_T => TensorRef::from_array_view(x.view()).map_err(|e| fail(e.to_string()))?,
                names::SELF_COND => TensorRef::from_array_view(sc.view()).map_err(|e| fail(e.to_string()))?,
                names::T => TensorRef::from_array_view(t).map_err(|e| fail(e.to_string()))?,
                names::IMAGE_KV => TensorRef::from_array_view(kv.view()).map_err(|e| fail(e.to_string()))?,
            ])
            .map_err(|e| fail(e.to_string()))?;
        let x0 = outputs
            .get(names::X0)
            .ok_or_else(|| fail("no x0 output".into()))?
            .try_extract_array::<f32>()
            .map_err(|e| fail(e.to_string()))?
            .into_dimensionality::<Ix3>()
            .map_err(|e| fail(e.to_string()))?
            .to_owned();
        if x0.dim() != x.dim() {
            return Err(fail(format!(
                "x0 has shape {:?}; expected {:?}",
                x0.dim(),
                x.dim()
            )));
        }
        Ok(x0)
    }

    /// `x0 [B,L,D]` -> (`token_ids [B,L]`, `confidence [B,L]`).
    pub fn decode(
        &mut self,
        x0: ArrayView3<f32>,
    ) -> Result<(Array2<i64>, Array2<f32>), RuntimeError> {
        let fail = |reason: String| RuntimeError::Inference {
            graph: "decoder",
            reason,
        };
        let x0 = x0.as_standard_layout();
        let outputs = self
            .decoder
            .run(ort::inputs![names::X0 => TensorRef::from_array_view(x0.view()).map_err(|e| fail(e.to_string()))?])
            .map_err(|e| fail(e.to_string()))?;
        let ids = outputs
            .get(names::TOKEN_IDS)
            .ok_or_else(|| fail("no token_ids output".into()))?
            .try_extract_array::<i64>()
            .map_err(|e| fail(e.to_string()))?
            .into_dimensionality::<Ix2>()
            .map_err(|e| fail(e.to_string()))?
            .to_owned();
        let conf = outputs
            .get(names::CONFIDENCE)
            .ok_or_else(|| fail("no confidence output".into()))?
            .try_extract_array::<f32>()
            .map_err(|e| fail(e.to_string()))?
            .into_dimensionality::<Ix2>()
            .map_err(|e| fail(e.to_string()))?
            .to_owned();
        let want = (x0.dim().0, x0.dim().1);
        if ids.dim() != want || conf.dim() != want {
            return Err(fail(format!(
                "token_ids {:?} and confidence {:?}; expected {want:?}",
                ids.dim(),
                conf.dim()
            )));
        }
        Ok((ids, conf))
    }
}

impl Denoiser for Models {
    type Error = RuntimeError;

    fn denoise(
        &mut self,
        x: ArrayView3<f32>,
        self_cond: ArrayView3<f32>,
        t: &[i64],
        kv: &[KvRef<'_>],
    ) -> Result<Array3<f32>, RuntimeError> {
        let dim = self.null_kv.dim();
        let mut buf = std::mem::take(&mut self.kv_batch);
        buf.clear();
        buf.reserve(kv.len() * self.null_kv.len());
        for src in kv {
            let a = match src {
                KvRef::Image(a) => *a,
                KvRef::Null => &self.null_kv,
            };
            if a.dim() != dim {
                return Err(RuntimeError::Inference {
                    graph: "denoiser",
                    reason: format!("image K/V of shape {:?}; expected {dim:?}", a.dim()),
                });
            }
            match a.as_slice() {
                Some(s) => buf.extend_from_slice(s),
                None => buf.extend(a.iter().copied()),
            }
        }
        let result = ArrayView4::from_shape((kv.len(), dim.0, dim.1, dim.2), &buf)
            .map_err(|e| RuntimeError::Inference {
                graph: "denoiser",
                reason: e.to_string(),
            })
            .and_then(|batch| Models::denoise(self, x, self_cond, t, batch));
        self.kv_batch = buf;
        result
    }

    fn decode(&mut self, x0: ArrayView3<f32>) -> Result<(Array2<i64>, Array2<f32>), RuntimeError> {
        Models::decode(self, x0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
