//! Loading a bundle into running workers, shared by the server and the `caption`
//! command so both caption through exactly the same code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bundle::{Bundle, BundleError};
use crate::config::{BatchingMode, CaptionArgs, ModelArgs};
use crate::http::request::{self, CaptionParams};
use crate::metrics::{Metrics, MetricsError};
use crate::preprocess::{self, ImageLimits, PreprocessError};
use crate::runtime::{self, OrtRuntime, RuntimeError};
use crate::sampler::SamplerParams;
use crate::scheduler::{CaptionJob, CaptionReply, Scheduler, SchedulerConfig, SubmitError};
use crate::text::{TextDecoder, TextError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("warm-up caption failed: {0}")]
    WarmUp(String),
    #[error("cannot use image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: PreprocessError,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid caption parameter: {0}")]
    Parameter(String),
    #[error("{0}")]
    Infer(String),
}

/// What can be checked in milliseconds, before any session is created: the library
/// loads, the manifest is valid, the tokenizer parses. Fails fast with clear errors.
pub struct Prepared {
    pub runtime: OrtRuntime,
    pub bundle: Arc<Bundle>,
    pub text: Arc<TextDecoder>,
}

pub fn prepare(model: &ModelArgs) -> Result<Prepared, LoadError> {
    let runtime = runtime::init_onnxruntime(model.ort_library.as_deref())?;
    let (bundle, text) = load_bundle(model)?;
    Ok(Prepared {
        runtime,
        bundle,
        text,
    })
}

/// The bundle's manifest and tokenizer (no ONNX Runtime needed).
fn load_bundle(model: &ModelArgs) -> Result<(Arc<Bundle>, Arc<TextDecoder>), LoadError> {
    let bundle = Arc::new(Bundle::load(&model.bundle)?);
    let text = Arc::new(TextDecoder::load(
        &bundle.tokenizer_path,
        &bundle.manifest.text,
    )?);
    Ok((bundle, text))
}

/// Starts the workers (blocking: creates the sessions).
pub fn start_scheduler(
    prepared: &Prepared,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> Result<Scheduler, LoadError> {
    Ok(Scheduler::start(
        config,
        prepared.runtime.clone(),
        prepared.bundle.clone(),
        prepared.text.clone(),
        metrics,
    )?)
}

/// Queues one preprocessed image and returns the receiver of its result.
pub fn submit(
    scheduler: &Scheduler,
    pixels: ndarray::Array3<f32>,
    params: SamplerParams,
    seed: u64,
    timeout: Duration,
) -> Result<CaptionReply, SubmitError> {
    let (job, rx) = CaptionJob::new(pixels, params, seed, Instant::now() + timeout);
    scheduler.submit(job)?;
    Ok(rx)
}

/// A synthetic image (colour gradient) for the warm-up caption.
pub fn warm_up_pixels(bundle: &Bundle) -> ndarray::Array3<f32> {
    let img = image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    }));
    preprocess::to_tensor(&img, &bundle.manifest.image)
}

/// The `caption` command: captions files and returns one line per image.
///
/// Everything a user can get wrong (a path, a flag's value, a file that is not an
/// image) is checked before ONNX Runtime loads and the sessions are created, which
/// takes seconds at full size.
pub fn caption_files(args: &CaptionArgs) -> Result<Vec<String>, LoadError> {
    let files = args
        .images
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| LoadError::Read {
                path: path.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (bundle, text) = load_bundle(&args.model)?;
    let manifest = &bundle.manifest;
    // The HTTP API's ranges and messages; no deadline worth the name.
    let requested = CaptionParams {
        steps: args.steps,
        guidance: args.guidance,
        back_refine: args.back_refine,
        candidates: args.candidates,
        seed: Some(args.seed),
        ..CaptionParams::default()
    };
    let hour = Duration::from_secs(3600);
    let resolved = request::resolve(&requested, &SamplerParams::defaults(manifest), hour, hour)
        // The HTTP API's message starts with the parameter's name; here it is a flag.
        .map_err(|e| LoadError::Parameter(format!("--{e}")))?;
    let params = resolved.sampler;
    let limits = ImageLimits::default();
    let images = args
        .images
        .iter()
        .zip(files)
        .map(|(path, bytes)| {
            preprocess::preprocess(&bytes, &manifest.image, &limits).map_err(|source| {
                LoadError::Image {
                    path: path.clone(),
                    source,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prepared = Prepared {
        runtime: runtime::init_onnxruntime(args.model.ort_library.as_deref())?,
        bundle: bundle.clone(),
        text,
    };
    let metrics = Arc::new(Metrics::new()?);
    let config = SchedulerConfig {
        workers: 1,
        batching: BatchingMode::Continuous,
        // One image's rows always fit one call (and, with --device-loop, the state pool).
        max_batch_rows: 64.max(2 * params.candidates),
        queue_size: args.images.len().max(1),
        session: args.model.session_options(),
    };
    let scheduler = start_scheduler(&prepared, config, metrics)?;
    let mut receivers = Vec::with_capacity(images.len());
    for pixels in images {
        let rx = submit(
            &scheduler,
            pixels,
            params.clone(),
            resolved.seed,
            resolved.timeout,
        )
        .map_err(|e| LoadError::Infer(e.to_string()))?;
        receivers.push(rx);
    }
    let mut lines = Vec::with_capacity(receivers.len());
    for rx in receivers {
        let output = rx
            .blocking_recv()
            .map_err(|_| LoadError::Infer("the worker stopped".into()))?
            .map_err(|e| LoadError::Infer(e.to_string()))?;
        let best = output
            .best()
            .ok_or_else(|| LoadError::Infer("no caption candidates".into()))?;
        lines.push(best.caption.clone());
    }
    scheduler.stop();
    Ok(lines)
}
