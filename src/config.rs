//! Command line and environment configuration. Every flag has a `LADIC_*` environment
//! variable so the same binary is configured the same way in a shell and in a
//! container.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::preprocess::ImageLimits;
use crate::runtime::{DeviceChoice, SessionOptions};

#[derive(Debug, Parser)]
#[command(
    name = "ladic-serve",
    version,
    about = "Image captioning with LaDiC over HTTP"
)]
pub struct Cli {
    /// Log as JSON lines (for log collectors) instead of human-readable text. The
    /// variable takes true/false, 1/0, yes/no or on/off.
    #[arg(
        long,
        env = "LADIC_LOG_JSON",
        global = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub log_json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Caption image files and print one caption per line (the same pipeline, no HTTP).
    Caption(CaptionArgs),
}

/// Options shared by everything that loads a bundle.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model bundle directory (manifest.json, three ONNX graphs, tokenizer.json).
    #[arg(long, env = "LADIC_BUNDLE", default_value = "models/scenes-tiny")]
    pub bundle: PathBuf,

    /// Execution provider: auto picks CUDA when this build has it and it works, else CPU.
    #[arg(long, env = "LADIC_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,

    /// ONNX Runtime threads per session (0 = auto: 1 when row slices are used, else
    /// ONNX Runtime's default of one per core).
    #[arg(long, env = "LADIC_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,

    /// On CPU, sessions per graph in each worker: a model call's rows are cut into this
    /// many slices that run at the same time (0 = auto: the cores divided among the
    /// workers, when --intra-op-threads is not set; else 1). Each slice's session holds
    /// its own copy of the weights.
    #[arg(long, env = "LADIC_ROW_PARALLELISM", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub row_parallelism: u16,

    /// Keep each image's cross-attention K/V in a pool on the model's device while its
    /// rows are in flight: the encoder writes it there and the denoiser reads it there
    /// (bundles whose denoiser takes `kv_index`). False: it comes back to the host and
    /// goes with every denoiser step.
    #[arg(long, env = "LADIC_KV_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub kv_pool: bool,

    /// Capture the denoiser as CUDA graphs, one per power-of-two row count up to
    /// --max-batch-rows (calls are padded to the next one), while the workers load (one
    /// at a time), and replay them: a step launches its kernels at once instead of one
    /// by one. Meant for --device cuda (on the CPU the padded calls run
    /// without capture); needs the K/V pool, which is then allocated at its final size
    /// (256 slots: 255 images in flight per worker, 7.4 GB for the full-size model)
    /// instead of growing.
    #[arg(long, env = "LADIC_CUDA_GRAPH", default_value_t = false, action = clap::ArgAction::Set)]
    pub cuda_graph: bool,

    /// Keep each row's x_t and self_cond on the denoiser's device between steps: the
    /// guided pair, self-conditioning and re-noising run there too, in two small graphs
    /// around the denoiser, so a step sends only the rows' slots, timesteps,
    /// coefficients and noise, and reads back x0 only for rows that finish, refine
    /// (Back&Refine) or stream. Runs on the fixed-shape calls (needs --cuda-graph
    /// true); same captions for the same seed.
    #[arg(long, env = "LADIC_DEVICE_LOOP", default_value_t = false, action = clap::ArgAction::Set)]
    pub device_loop: bool,

    /// ONNX Runtime shared library; ORT_DYLIB_PATH takes precedence, and
    /// .ort/lib/libonnxruntime.so (from scripts/fetch-onnxruntime.sh) is the fallback.
    #[arg(long, env = "LADIC_ORT_LIBRARY")]
    pub ort_library: Option<PathBuf>,
}

impl ModelArgs {
    /// The session options these flags ask for. `max_batch_rows` is left 0: it is the
    /// scheduler's setting, which [`Scheduler::start`](crate::scheduler::Scheduler::start)
    /// copies in (a [`Models::load`](crate::runtime::Models::load) of its own with
    /// `cuda_graph` needs it set).
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            device: self.device,
            intra_op_threads: self.intra_op_threads,
            row_parallelism: usize::from(self.row_parallelism),
            kv_pool: self.kv_pool,
            cuda_graph: self.cuda_graph,
            max_batch_rows: 0,
            device_loop: self.device_loop,
        }
    }
}

/// How the workers group rows into model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchingMode {
    /// Iteration-level: requests join and leave the running batch at every step.
    Continuous,
    /// Request-level: a batch of waiting requests runs to completion before the next.
    Request,
    /// One request at a time (its candidates and guidance rows still share calls).
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Address to listen on.
    #[arg(long, env = "LADIC_BIND", default_value = "0.0.0.0:8080")]
    pub bind: SocketAddr,

    /// Worker threads; each owns its own ONNX Runtime sessions and runs one batch at a time.
    #[arg(long, env = "LADIC_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// Batching strategy of the workers.
    #[arg(long, env = "LADIC_BATCHING", value_enum, default_value = "continuous")]
    pub batching: BatchingMode,

    /// Most rows in one denoiser or decoder call (a guided candidate is two rows).
    #[arg(long, env = "LADIC_MAX_BATCH_ROWS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_batch_rows: u32,

    /// Images that may wait for a worker (a batch request's count as one each); more are
    /// refused with 429. At least --max-batch-images.
    #[arg(long, env = "LADIC_QUEUE_SIZE", default_value_t = 64, value_parser = at_least_one::<usize>)]
    pub queue_size: usize,

    /// Default deadline of a request, in milliseconds, from arrival to answer (504 after).
    #[arg(long, env = "LADIC_REQUEST_TIMEOUT_MS", default_value_t = 30_000, value_parser = at_least_one::<u64>)]
    pub request_timeout_ms: u64,

    /// Largest deadline a request may ask for with `timeout_ms` (at least
    /// --request-timeout-ms).
    #[arg(long, env = "LADIC_MAX_REQUEST_TIMEOUT_MS", default_value_t = 120_000, value_parser = at_least_one::<u64>)]
    pub max_request_timeout_ms: u64,

    /// Largest request body in bytes (413 above).
    #[arg(long, env = "LADIC_MAX_BODY_BYTES", default_value_t = 20 * 1024 * 1024, value_parser = at_least_one::<usize>)]
    pub max_body_bytes: usize,

    /// Largest image in pixels, width times height (422 above); checked before decoding.
    #[arg(long, env = "LADIC_MAX_IMAGE_PIXELS", default_value_t = 40_000_000, value_parser = at_least_one::<u64>)]
    pub max_image_pixels: u64,

    /// Largest image width or height (422 above); checked before decoding.
    #[arg(long, env = "LADIC_MAX_IMAGE_SIDE", default_value_t = 16_384, value_parser = at_least_one::<u32>)]
    pub max_image_side: u32,

    /// Memory, in MiB, that the images being decoded at once may take together, each
    /// counted from its header (decoded frame plus its RGB copy, and a JPEG's copy of
    /// its file: a 6000x6000 16-bit RGBA PNG takes about 400 MiB); decodes wait for
    /// room, within their request's deadline. An image larger than the whole budget
    /// decodes alone.
    #[arg(long, env = "LADIC_DECODE_MEMORY_MIB", default_value_t = 1024, value_parser = at_least_one::<u32>)]
    pub decode_memory_mib: u32,

    /// Memory, in MiB, that the request bodies being received or held at once may take
    /// together, each counted at its size times the copies its parsing makes (1 for a
    /// raw image, 2 multipart, 3 JSON) until its image is decoded. A body with no room
    /// gets 429 (after the rest of it is read and thrown away). At least 3 x --max-body-bytes.
    #[arg(long, env = "LADIC_BODY_MEMORY_MIB", default_value_t = 256, value_parser = at_least_one::<u32>)]
    pub body_memory_mib: u32,

    /// Most images in one POST /caption/batch request.
    #[arg(long, env = "LADIC_MAX_BATCH_IMAGES", default_value_t = 16, value_parser = at_least_one::<usize>)]
    pub max_batch_images: usize,

    /// If set, POST routes need `Authorization: Bearer <key>` or `x-api-key: <key>`.
    #[arg(long, env = "LADIC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Milliseconds a connection gets to send a request's headers, counted from when the
    /// server starts waiting for them: on a new connection, and on an idle keep-alive
    /// one, which is closed after that. Keep it above the idle timeout of the load
    /// balancer in front (often 60 s), so that it never reuses a connection the server
    /// is closing. Request bodies are bounded by each request's deadline instead.
    #[arg(long, env = "LADIC_HEADER_READ_TIMEOUT_MS", default_value_t = 75_000, value_parser = at_least_one::<u64>)]
    pub header_read_timeout_ms: u64,

    /// Most connections open at once (at most 1000000), so that idle clients cannot hold
    /// the server's memory or file descriptors. Beyond them, up to 32 more connections
    /// get one request each, answered for the health probes and 503 `overloaded`
    /// (`Retry-After: 1`) for the rest, so that an orchestrator's probes still get
    /// through; a connection beyond those too gets 503 before its request is read.
    /// Lowered at start-up, with a warning, to what the open files limit allows.
    #[arg(long, env = "LADIC_MAX_CONNECTIONS", default_value_t = 4096, value_parser = connection_count)]
    pub max_connections: usize,

    /// Largest request head (request line and headers) in bytes, 8192 or more: what
    /// each connection may buffer while its head arrives. The check comes before each
    /// read of the socket, so a head up to about twice this may still be read whole;
    /// larger ones, and more than 100 headers, get 431.
    #[arg(long, env = "LADIC_MAX_HEADER_BYTES", default_value_t = 32768, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,

    /// Milliseconds a connection may take none of its response before it is closed: a
    /// client that stopped reading (a stream, or a large answer) cannot hold a socket
    /// and its buffered events for ever.
    #[arg(long, env = "LADIC_SEND_STALL_TIMEOUT_MS", default_value_t = 30_000, value_parser = at_least_one::<u64>)]
    pub send_stall_timeout_ms: u64,

    /// A worker that has been inside one denoising step (its model calls) for longer
    /// than this is stuck, a hung GPU for instance: `/health/live` and `/health/ready`
    /// answer 503 `worker_stalled` until it comes out, so that an orchestrator restarts
    /// the server. 0 turns the check off.
    #[arg(long, env = "LADIC_WORKER_STALL_TIMEOUT_MS", default_value_t = 120_000)]
    pub worker_stall_timeout_ms: u64,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT; those still
    /// waiting for a caption then get 503, and the server exits within about 5 s more.
    #[arg(long, env = "LADIC_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,

    /// Origins browsers may call the API from (comma-separated, or `*` for any); no
    /// CORS headers are sent unless this is set.
    #[arg(long, env = "LADIC_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
}

/// A connection limit: 1 to [`MAX_CONNECTIONS`].
fn connection_count(s: &str) -> Result<usize, String> {
    let n: usize = at_least_one(s)?;
    if n > MAX_CONNECTIONS {
        return Err(format!("must be at most {MAX_CONNECTIONS}"));
    }
    Ok(n)
}

/// The most `--max-connections` may be: far beyond what one process serves well.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Parses a size, count or time that must be at least 1: 0 would leave the service
/// unable to answer (every request timed out, every image too large, ...).
fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialEq + From<u8>,
    T::Err: std::fmt::Display,
{
    let v: T = s.parse().map_err(|e: T::Err| e.to_string())?;
    if v == T::from(0) {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

impl ServeArgs {
    /// What the flags cannot check one by one.
    pub fn check(&self) -> Result<(), String> {
        if self.request_timeout_ms > self.max_request_timeout_ms {
            return Err(format!(
                "--request-timeout-ms {} is more than --max-request-timeout-ms {}; the default deadline may be at most the largest one",
                self.request_timeout_ms, self.max_request_timeout_ms
            ));
        }
        if self.queue_size < self.max_batch_images {
            return Err(format!(
                "--queue-size {} is less than --max-batch-images {}: a batch of that many images could never be queued",
                self.queue_size, self.max_batch_images
            ));
        }
        let largest_body = (self.max_body_bytes as u64).saturating_mul(3);
        if u64::from(self.body_memory_mib) << 20 < largest_body {
            return Err(format!(
                "--body-memory-mib {} is less than 3 x --max-body-bytes ({} MiB): a JSON body of the largest size could never be read",
                self.body_memory_mib,
                largest_body.div_ceil(1 << 20)
            ));
        }
        Ok(())
    }

    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_pixels: self.max_image_pixels,
            max_side: self.max_image_side,
            ..ImageLimits::default()
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Defaults for an in-process server (tests, benchmarks): loopback, any free port.
    pub fn for_bundle(bundle: impl Into<PathBuf>) -> ServeArgs {
        let cli = Cli::parse_from(["ladic-serve", "serve", "--bind", "127.0.0.1:0"]);
        match cli.command {
            Command::Serve(mut args) => {
                args.model.bundle = bundle.into();
                args
            }
            Command::Caption(_) => unreachable!("parsed the serve subcommand"),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CaptionArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Image files to caption.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,

    /// Denoising iterations, 1 to 100 (bundle default if unset).
    #[arg(long)]
    pub steps: Option<usize>,

    /// Classifier-free guidance weight, 0 to 10 (bundle default if unset).
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,

    /// Caption candidates for MBR selection, 1 to 8 (bundle default if unset).
    #[arg(long)]
    pub candidates: Option<usize>,

    /// Run Back&Refine (bundle default if unset).
    #[arg(long)]
    pub back_refine: Option<bool>,

    /// Noise seed; the same seed gives the same caption.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults() {
        let cli = Cli::try_parse_from(["ladic-serve", "serve"]).unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("serve expected")
        };
        assert_eq!(s.model.bundle, PathBuf::from("models/scenes-tiny"));
        assert_eq!(s.bind.to_string(), "0.0.0.0:8080");
        assert_eq!(s.model.device, DeviceChoice::Auto);
        assert_eq!(s.batching, BatchingMode::Continuous);
    }

    #[test]
    fn every_flag_has_a_ladic_env_var() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands().filter(|s| s.get_name() == "serve") {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let env = arg
                    .get_env()
                    .unwrap_or_else(|| panic!("--{id} has no env var"));
                assert!(env.to_string_lossy().starts_with("LADIC_"), "--{id}");
            }
        }
    }

    #[test]
    fn caption_needs_images() {
        assert!(Cli::try_parse_from(["ladic-serve", "caption"]).is_err());
        let cli = Cli::try_parse_from(["ladic-serve", "caption", "a.png", "b.jpg", "--steps", "5"])
            .unwrap();
        let Command::Caption(c) = cli.command else {
            panic!("caption expected")
        };
        assert_eq!(c.images.len(), 2);
        assert_eq!(c.steps, Some(5));
    }

    #[test]
    fn caption_help_gives_the_api_ranges() {
        use crate::http::request::{MAX_CANDIDATES, MAX_GUIDANCE, MAX_STEPS};
        let cmd = Cli::command();
        let caption = cmd.find_subcommand("caption").unwrap();
        let help = |id: &str| {
            let arg = caption.get_arguments().find(|a| a.get_id() == id);
            arg.and_then(|a| a.get_help()).unwrap().to_string()
        };
        assert!(help("steps").contains(&format!("1 to {MAX_STEPS} ")));
        assert!(help("guidance").contains(&format!("0 to {MAX_GUIDANCE} ")));
        assert!(help("candidates").contains(&format!("1 to {MAX_CANDIDATES} ")));
    }

    #[test]
    fn zero_limits_and_inverted_timeouts_are_refused() {
        for flag in [
            "--request-timeout-ms",
            "--max-request-timeout-ms",
            "--queue-size",
            "--max-body-bytes",
            "--max-image-pixels",
            "--max-image-side",
            "--max-batch-images",
            "--header-read-timeout-ms",
            "--max-batch-rows",
            "--workers",
            "--max-connections",
            "--max-header-bytes",
        ] {
            let err = Cli::try_parse_from(["ladic-serve", "serve", flag, "0"]).unwrap_err();
            assert!(err.to_string().contains(flag), "{flag}: {err}");
        }
        // A connection limit tokio's semaphore could not hold is refused, not a server
        // that starts and refuses every connection.
        let err = Cli::try_parse_from(["ladic-serve", "serve", "--max-connections", "1000001"])
            .unwrap_err();
        assert!(err.to_string().contains("at most 1000000"), "{err}");
        let serve = |extra: &[&str]| {
            let cli = Cli::try_parse_from([["ladic-serve", "serve"].as_slice(), extra].concat());
            match cli.unwrap().command {
                Command::Serve(s) => s,
                Command::Caption(_) => unreachable!(),
            }
        };
        assert!(serve(&[]).check().is_ok());
        let inverted = serve(&[
            "--request-timeout-ms",
            "5000",
            "--max-request-timeout-ms",
            "4000",
        ]);
        let err = inverted.check().unwrap_err();
        assert!(err.contains("--request-timeout-ms 5000"), "{err}");
        assert!(err.contains("--max-request-timeout-ms 4000"), "{err}");
        let small_queue = serve(&["--queue-size", "8"]);
        let err = small_queue.check().unwrap_err();
        assert!(
            err.contains("--queue-size 8 is less than --max-batch-images 16"),
            "{err}"
        );
        assert!(
            serve(&["--queue-size", "8", "--max-batch-images", "8"])
                .check()
                .is_ok()
        );
    }
}
