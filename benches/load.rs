//! The load benchmark: `cargo bench --bench load` (or `scripts/bench-load.sh`).
//!
//! For each batching mode (continuous, request, off) it starts the release binary on a
//! loopback port with the default bundle and default parameters, and drives it over
//! HTTP with
//! - closed-loop clients (1, 4, 16: each sends its next request when the last one is
//!   answered) for a fixed time, and
//! - open-loop Poisson arrivals at 25%, 50%, 100% and 200% of that mode's saturation
//!   throughput (the best closed-loop throughput), latency measured from each request's
//!   scheduled arrival so a slow server cannot hide queueing ("coordinated omission");
//!
//! then, with continuous batching, a 60 s phase at 2x saturation that also polls the
//! health routes and samples the server's resident memory from /proc. Before the
//! servers it runs the Python reference sampler (`models/ladic/bench_reference.py`) at
//! batch 1 with the same steps. It prints the tables and the goal ratios and writes
//! them to `benches/RESULTS.md` between the `load:begin`/`load:end` markers (text
//! outside the markers is kept).
//!
//! Everything is bounded in time (about 8 minutes with the defaults) and loopback only.
//! Settings, all optional: `LOAD_PHASE_SECS` (12), `LOAD_WARMUP_SECS` (2),
//! `LOAD_OVERLOAD_SECS` (60; 0 skips), `LOAD_MODES` (continuous,request,off),
//! `LOAD_CONCURRENCY` (1,4,16), `LOAD_RATES` (0.25,0.5,1,2), `LOAD_REF_REPEATS` (30; 0
//! skips the Python reference), `LOAD_SERVER_ARGS` (extra `serve` flags),
//! `LOAD_RESULTS` (output file; `-` writes none), `LOAD_SERVER_BIN` (another build of
//! the server, for before/after comparisons), `LOAD_COMMAND` (the command line to
//! record), `LOAD_LABEL` (a heading for this run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SERVER_BIN: &str = env!("CARGO_BIN_EXE_ladic-serve");
/// Client-side limit of one request; the server's own default deadline is 30 s.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most open-loop requests outstanding at once; arrivals beyond are counted, not sent.
const MAX_OUTSTANDING: usize = 4096;

// ------------------------------------------------------------------------- settings

struct Settings {
    phase: Duration,
    warmup: Duration,
    overload: Duration,
    modes: Vec<String>,
    concurrency: Vec<usize>,
    rates: Vec<f64>,
    reference_repeats: usize,
    server_args: Vec<String>,
    results: Option<PathBuf>,
    command: String,
    label: Option<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not valid")),
        _ => Ok(default),
    }
}

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Result<Vec<T>> {
    let raw = std::env::var(name).unwrap_or_else(|_| default.to_string());
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| anyhow::anyhow!("{name}: {s:?} is not valid"))
        })
        .collect()
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let secs = |name, default| -> Result<Duration> {
            Ok(Duration::from_secs_f64(env_or::<f64>(name, default)?))
        };
        let results = match std::env::var("LOAD_RESULTS") {
            Ok(v) if v == "-" => None,
            Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
            _ => Some(Path::new(ROOT).join("benches/RESULTS.md")),
        };
        let modes: Vec<String> = env_list("LOAD_MODES", "continuous,request,off")?;
        for m in &modes {
            if !["continuous", "request", "off"].contains(&m.as_str()) {
                bail!("LOAD_MODES: unknown mode {m:?}");
            }
        }
        Ok(Settings {
            phase: secs("LOAD_PHASE_SECS", 12.0)?,
            warmup: secs("LOAD_WARMUP_SECS", 2.0)?,
            overload: secs("LOAD_OVERLOAD_SECS", 60.0)?,
            modes,
            concurrency: env_list("LOAD_CONCURRENCY", "1,4,16")?,
            rates: env_list("LOAD_RATES", "0.25,0.5,1,2")?,
            reference_repeats: env_or("LOAD_REF_REPEATS", 30)?,
            server_args: std::env::var("LOAD_SERVER_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
            results,
            command: std::env::var("LOAD_COMMAND")
                .ok()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "cargo bench --bench load".into()),
            label: std::env::var("LOAD_LABEL").ok().filter(|l| !l.is_empty()),
        })
    }

    /// The non-default settings, for the record.
    fn overrides() -> Vec<String> {
        let mut v: Vec<String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("LOAD_") && k != "LOAD_COMMAND" && k != "LOAD_LABEL")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        v.sort();
        v
    }
}

// ---------------------------------------------------------------------- the server

struct ServerProcess {
    child: Child,
    base: String,
    log: PathBuf,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl ServerProcess {
    async fn start(mode: &str, extra: &[String], client: &reqwest::Client) -> Result<Self> {
        let port = free_port()?;
        let dir = Path::new(ROOT).join("target/load-bench");
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("server-{mode}.log"));
        let out = std::fs::File::create(&log)?;
        let bin = std::env::var("LOAD_SERVER_BIN").unwrap_or_else(|_| SERVER_BIN.to_string());
        let child = Command::new(&bin)
            .current_dir(ROOT)
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .args(["--batching", mode, "--device", "cpu"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let mut server = ServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the server exited with {status} while starting; see {}",
                    server.log.display()
                );
            }
            if let Ok(r) = client
                .get(format!("{}/health/ready", server.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && r.status() == 200
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let _ = server.child.kill();
                bail!("the server was not ready within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for a clean exit (the graceful shutdown path); kills it
    /// after 20 s. Returns how it ended.
    async fn stop(mut self) -> String {
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!(
                    "{status} after SIGTERM in {:.2} s",
                    started.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        "killed: no exit within 20 s of SIGTERM".into()
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time so far, in clock ticks: the whole machine (busy, all CPUs), the server
/// process and this process (the load generator).
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    machine: u64,
    server: u64,
    me: u64,
}

fn process_ticks(pid: &str) -> u64 {
    // Fields 14 and 15 (utime, stime), counted after the parenthesised command name.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

impl CpuSnapshot {
    fn take(server: u32) -> CpuSnapshot {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let machine = stat
            .lines()
            .next()
            .map(|l| {
                let v: Vec<u64> = l
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: busy = all but idle, iowait.
                v.iter().take(8).sum::<u64>()
                    - v.get(3).copied().unwrap_or(0)
                    - v.get(4).copied().unwrap_or(0)
            })
            .unwrap_or(0);
        CpuSnapshot {
            at: Instant::now(),
            machine,
            server: process_ticks(&server.to_string()),
            me: process_ticks("self"),
        }
    }

    /// Cores used on average since `self`: (server, load generator, everything else).
    fn cores_since(&self, server: u32) -> (f64, f64, f64) {
        let now = CpuSnapshot::take(server);
        let hz = clock_ticks_per_second();
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / hz / secs;
        let server = d(now.server, self.server);
        let me = d(now.me, self.me);
        let machine = d(now.machine, self.machine);
        (server, me, (machine - server - me).max(0.0))
    }
}

fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Mean rows per denoiser call and mean call time, from the server's metrics.
async fn batch_stats(client: &reqwest::Client, base: &str) -> Option<(f64, f64)> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let rows = value("ladic_batch_rows_sum")? / value("ladic_batch_rows_count")?;
    let step = value("ladic_denoiser_step_duration_seconds_sum")?
        / value("ladic_denoiser_step_duration_seconds_count")?;
    Some((rows, step))
}

// ---------------------------------------------------------------------- load

/// Scene-like test images: 128x128 PNGs (the Scenes data set's size) with a few
/// coloured shapes and a little grain, different per index.
fn images(n: usize) -> Vec<axum::body::Bytes> {
    (0..n)
        .map(|i| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            let bg = [rng.random_range(180..250u8); 3];
            let shapes: Vec<(u32, u32, u32, [u8; 3])> = (0..3)
                .map(|_| {
                    (
                        rng.random_range(8..90),
                        rng.random_range(8..90),
                        rng.random_range(12..36),
                        [rng.random(), rng.random(), rng.random()],
                    )
                })
                .collect();
            let img = ImageBuffer::from_fn(128, 128, |x, y| {
                let mut px = bg;
                for &(sx, sy, side, colour) in &shapes {
                    if (sx..sx + side).contains(&x) && (sy..sy + side).contains(&y) {
                        px = colour;
                    }
                }
                let grain: i16 = rng.random_range(-6..=6);
                Rgb(px.map(|c| (i16::from(c) + grain).clamp(0, 255) as u8))
            });
            let mut buf = Cursor::new(Vec::new());
            DynamicImage::ImageRgb8(img)
                .write_to(&mut buf, ImageFormat::Png)
                .expect("PNG encodes");
            axum::body::Bytes::from(buf.into_inner())
        })
        .collect()
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Status(u16),
    ClientTimeout,
    Connection,
    /// Open loop: the arrival was not sent because too many were outstanding.
    NotSent,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Status(s) => write!(f, "{s}"),
            Outcome::ClientTimeout => f.write_str("client-timeout"),
            Outcome::Connection => f.write_str("connection-error"),
            Outcome::NotSent => f.write_str("not-sent"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    outcome: Outcome,
    latency: Duration,
    /// When the answer was complete.
    done: Instant,
    /// The server's `x-inference-time`, milliseconds.
    inference_ms: Option<f64>,
}

#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    url: String,
    images: Arc<Vec<axum::body::Bytes>>,
}

impl Target {
    async fn caption(&self, i: usize, since: Instant) -> Sample {
        let body = self.images[i % self.images.len()].clone();
        let r = self
            .client
            .post(&self.url)
            .header("content-type", "image/png")
            .body(body)
            .send()
            .await;
        let (outcome, inference_ms) = match r {
            Ok(r) => {
                let status = r.status().as_u16();
                let inference = r
                    .headers()
                    .get("x-inference-time")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                // Read the whole answer: a caption is only delivered once read.
                match r.bytes().await {
                    Ok(_) => (Outcome::Status(status), inference),
                    Err(e) if e.is_timeout() => (Outcome::ClientTimeout, None),
                    Err(_) => (Outcome::Connection, None),
                }
            }
            Err(e) if e.is_timeout() => (Outcome::ClientTimeout, None),
            Err(_) => (Outcome::Connection, None),
        };
        Sample {
            outcome,
            latency: since.elapsed(),
            done: Instant::now(),
            inference_ms,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct PhaseResult {
    name: String,
    /// Clients (closed loop) or arrivals per second (open loop).
    offered: f64,
    seconds: f64,
    ok: usize,
    throughput: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    max_ms: f64,
    inference_mean_ms: f64,
    outcomes: BTreeMap<String, usize>,
    /// Average cores used during the phase by the server, the load generator, and
    /// every other process of the machine (other people's work skews the numbers).
    server_cores: f64,
    loadgen_cores: f64,
    other_cores: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarize(name: String, offered: f64, seconds: f64, samples: &[Sample]) -> PhaseResult {
    let mut ok: Vec<f64> = samples
        .iter()
        .filter(|s| s.outcome == Outcome::Status(200))
        .map(|s| s.latency.as_secs_f64() * 1e3)
        .collect();
    ok.sort_by(f64::total_cmp);
    let inference: Vec<f64> = samples.iter().filter_map(|s| s.inference_ms).collect();
    let mut outcomes = BTreeMap::new();
    for s in samples {
        *outcomes.entry(s.outcome.to_string()).or_insert(0) += 1;
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    PhaseResult {
        name,
        offered,
        seconds,
        ok: ok.len(),
        throughput: ok.len() as f64 / seconds,
        p50_ms: percentile(&ok, 50.0),
        p90_ms: percentile(&ok, 90.0),
        p99_ms: percentile(&ok, 99.0),
        mean_ms: mean(&ok),
        max_ms: ok.last().copied().unwrap_or(f64::NAN),
        inference_mean_ms: mean(&inference),
        outcomes,
        ..PhaseResult::default()
    }
}

/// `clients` closed-loop clients; counts answers completed within the measured window
/// after a warm-up.
async fn closed_loop(
    target: &Target,
    clients: usize,
    warmup: Duration,
    window: Duration,
) -> PhaseResult {
    let start = Instant::now();
    let from = start + warmup;
    let end = from + window;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        let samples = samples.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < end {
                let sent = Instant::now();
                let s = target.caption(i, sent).await;
                let done = Instant::now();
                if done >= from && done <= end {
                    samples.lock().unwrap().push(s);
                }
                i += clients;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let samples = samples.lock().unwrap().clone();
    summarize(
        format!("closed {clients}"),
        clients as f64,
        window.as_secs_f64(),
        &samples,
    )
}

/// Poisson arrivals at `rate` per second for `warmup + window`; the statistics are over
/// the arrivals of the window, each request timed from its scheduled arrival.
async fn open_loop(
    target: &Target,
    rate: f64,
    warmup: Duration,
    window: Duration,
    seed: u64,
) -> PhaseResult {
    let exp = Exp::new(rate.max(1e-3)).expect("positive rate");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let from = start + warmup;
    let end = from + window;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut at = start;
    let mut i = 0usize;
    loop {
        at += Duration::from_secs_f64(exp.sample(&mut rng));
        if at >= end {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let measured = at >= from;
        if outstanding.load(Ordering::SeqCst) >= MAX_OUTSTANDING {
            if measured {
                samples.lock().unwrap().push(Sample {
                    outcome: Outcome::NotSent,
                    latency: Duration::ZERO,
                    done: at,
                    inference_ms: None,
                });
            }
            continue;
        }
        outstanding.fetch_add(1, Ordering::SeqCst);
        let (target, samples, outstanding) = (target.clone(), samples.clone(), outstanding.clone());
        let scheduled = at;
        tasks.push(tokio::spawn(async move {
            let s = target.caption(i, scheduled).await;
            outstanding.fetch_sub(1, Ordering::SeqCst);
            if measured {
                samples.lock().unwrap().push(s);
            }
        }));
        i += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    let samples = samples.lock().unwrap().clone();
    // Answered captions per second from the window's start until the last answer to
    // an arrival of the window: under overload the queue drains after the window.
    let last = samples.iter().map(|s| s.done).max().unwrap_or(end).max(end);
    summarize(
        format!("open {rate:.1}/s"),
        rate,
        last.duration_since(from).as_secs_f64(),
        &samples,
    )
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct OverloadResult {
    phase: PhaseResult,
    rate: f64,
    window_s: f64,
    health_checks: usize,
    health_failures: usize,
    health_max_ms: f64,
    rss_before_mib: f64,
    rss_first_half_max_mib: f64,
    rss_second_half_max_mib: f64,
    rss_end_mib: f64,
    hwm_mib: f64,
    rss_after_drain_mib: f64,
}

async fn overload(
    target: &Target,
    base: &str,
    pid: u32,
    rate: f64,
    window: Duration,
) -> OverloadResult {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let before = memory_kib(pid).map_or(f64::NAN, |m| m.0 as f64 / 1024.0);
    // Resident memory once a second.
    let rss = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let sampler = {
        let (stop, rss) = (stop.clone(), rss.clone());
        let start = Instant::now();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Some((now, _)) = memory_kib(pid) {
                    rss.lock()
                        .unwrap()
                        .push((start.elapsed().as_secs_f64(), now as f64 / 1024.0));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // Liveness and readiness probes, as an orchestrator would send them.
    let probes = {
        let stop = stop.clone();
        let client = target.client.clone();
        let base = base.to_string();
        tokio::spawn(async move {
            let (mut n, mut failed, mut max) = (0usize, 0usize, 0f64);
            while !stop.load(Ordering::SeqCst) {
                for path in ["/health/live", "/health/ready"] {
                    let t = Instant::now();
                    let r = client
                        .get(format!("{base}{path}"))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    n += 1;
                    max = max.max(t.elapsed().as_secs_f64() * 1e3);
                    if !matches!(r, Ok(ref r) if r.status() == 200) {
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (n, failed, max)
        })
    };
    let phase = open_loop(target, rate, Duration::ZERO, window, 99).await;
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    let (health_checks, health_failures, health_max_ms) = probes.await.unwrap_or((0, 0, 0.0));
    let rss = rss.lock().unwrap().clone();
    let half = window.as_secs_f64() / 2.0;
    let max_of = |it: &mut dyn Iterator<Item = f64>| it.fold(f64::NAN, f64::max);
    let hwm = memory_kib(pid).map_or(f64::NAN, |m| m.1 as f64 / 1024.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    OverloadResult {
        phase,
        rate,
        window_s: window.as_secs_f64(),
        health_checks,
        health_failures,
        health_max_ms,
        rss_before_mib: before,
        rss_first_half_max_mib: max_of(&mut rss.iter().filter(|r| r.0 < half).map(|r| r.1)),
        rss_second_half_max_mib: max_of(&mut rss.iter().filter(|r| r.0 >= half).map(|r| r.1)),
        rss_end_mib: rss.last().map_or(f64::NAN, |r| r.1),
        hwm_mib: hwm,
        rss_after_drain_mib: memory_kib(pid).map_or(f64::NAN, |m| m.0 as f64 / 1024.0),
    }
}

// ---------------------------------------------------------------------- a mode

#[derive(Debug, Clone, Default, serde::Serialize)]
struct ModeResult {
    mode: String,
    closed: Vec<PhaseResult>,
    saturation: f64,
    open: Vec<(f64, PhaseResult)>,
    overload: Option<OverloadResult>,
    mean_batch_rows: f64,
    mean_step_ms: f64,
    peak_rss_mib: f64,
    shutdown: String,
}

impl ModeResult {
    fn closed_at(&self, clients: usize) -> Option<&PhaseResult> {
        self.closed.iter().find(|p| p.offered as usize == clients)
    }

    fn open_at(&self, fraction: f64) -> Option<&PhaseResult> {
        self.open
            .iter()
            .find(|(f, _)| (f - fraction).abs() < 1e-9)
            .map(|(_, p)| p)
    }
}

async fn run_mode(settings: &Settings, mode: &str, client: &reqwest::Client) -> Result<ModeResult> {
    eprintln!("== {mode}: starting the server");
    let server = ServerProcess::start(mode, &settings.server_args, client).await?;
    let target = Target {
        client: client.clone(),
        url: format!("{}/caption", server.base),
        images: Arc::new(images(8)),
    };
    let mut result = ModeResult {
        mode: mode.to_string(),
        ..ModeResult::default()
    };
    let pid = server.pid();
    let account = |p: &mut PhaseResult, since: CpuSnapshot| {
        (p.server_cores, p.loadgen_cores, p.other_cores) = since.cores_since(pid);
    };
    for &c in &settings.concurrency {
        let cpu = CpuSnapshot::take(pid);
        let mut p = closed_loop(&target, c, settings.warmup, settings.phase).await;
        account(&mut p, cpu);
        eprintln!("   {}", line(&p));
        result.closed.push(p);
    }
    result.saturation = result
        .closed
        .iter()
        .map(|p| p.throughput)
        .fold(0.0, f64::max);
    if result.saturation > 0.0 {
        for (k, &f) in settings.rates.iter().enumerate() {
            let rate = f * result.saturation;
            let cpu = CpuSnapshot::take(pid);
            let mut p = open_loop(&target, rate, settings.warmup, settings.phase, k as u64).await;
            account(&mut p, cpu);
            eprintln!("   {} ({:.0}% of saturation)", line(&p), f * 100.0);
            result.open.push((f, p));
        }
        if mode == "continuous" && !settings.overload.is_zero() {
            let rate = 2.0 * result.saturation;
            eprintln!(
                "   overload: {rate:.1}/s for {:.0} s",
                settings.overload.as_secs_f64()
            );
            let cpu = CpuSnapshot::take(pid);
            let mut o = overload(&target, &server.base, pid, rate, settings.overload).await;
            account(&mut o.phase, cpu);
            eprintln!("   {}", line(&o.phase));
            result.overload = Some(o);
        }
    }
    if let Some((rows, step)) = batch_stats(client, &server.base).await {
        result.mean_batch_rows = rows;
        result.mean_step_ms = step * 1e3;
    }
    result.peak_rss_mib = memory_kib(server.pid()).map_or(f64::NAN, |m| m.1 as f64 / 1024.0);
    result.shutdown = server.stop().await;
    eprintln!("   shutdown: {}", result.shutdown);
    Ok(result)
}

fn line(p: &PhaseResult) -> String {
    format!(
        "{:<14} {:>7.1} captions/s  p50 {:>7.1} ms  p90 {:>7.1} ms  p99 {:>7.1} ms  cores: server {:.2}, loadgen {:.2}, other {:.2}  {}",
        p.name,
        p.throughput,
        p.p50_ms,
        p.p90_ms,
        p.p99_ms,
        p.server_cores,
        p.loadgen_cores,
        p.other_cores,
        outcomes(p)
    )
}

fn cores(p: &PhaseResult) -> String {
    format!(
        "{:.2} / {:.2} / {:.2}",
        p.server_cores, p.loadgen_cores, p.other_cores
    )
}

fn outcomes(p: &PhaseResult) -> String {
    p.outcomes
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------- reference

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
struct Reference {
    runtime: String,
    source: String,
    torch_threads: usize,
    steps: usize,
    candidates: usize,
    repeats: usize,
    mean_s: f64,
    p50_s: f64,
    min_s: f64,
    torch: String,
}

/// The reference at batch 1 with `threads` torch threads (0: torch's default).
fn run_reference(repeats: usize, threads: usize) -> Result<Reference> {
    eprintln!(
        "== Python reference sampler, batch 1, {repeats} captions, {} threads",
        if threads == 0 {
            "default".to_string()
        } else {
            threads.to_string()
        }
    );
    let out = Command::new("python3")
        .current_dir(Path::new(ROOT).join("models"))
        .args(["-m", "ladic.bench_reference"])
        .args(["--bundle", "scenes-tiny", "--run", "runs/scenes-tiny"])
        .args(["--repeats", &repeats.to_string()])
        .args(["--threads", &threads.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run python3 -m ladic.bench_reference")?;
    if !out.status.success() {
        bail!("python3 -m ladic.bench_reference failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let r: Reference = serde_json::from_str(last)
        .with_context(|| format!("unexpected bench_reference output {last:?}"))?;
    eprintln!(
        "   {} ({}): {:.1} ms per caption (p50 {:.1} ms)",
        r.runtime,
        r.source,
        r.mean_s * 1e3,
        r.p50_s * 1e3
    );
    Ok(r)
}

// ---------------------------------------------------------------------- report

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(ROOT)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn machine() -> BTreeMap<&'static str, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("?".into(), |s| s.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or("?".into(), |kib| format!("{:.1} GiB", kib / 1048576.0));
    let dirty = if sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    let mut m = BTreeMap::new();
    m.insert("nproc", sh("nproc", &[]));
    m.insert("cpu", cpu);
    m.insert("memory", mem);
    m.insert("date", sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]));
    m.insert(
        "commit",
        format!("{}{dirty}", sh("git", &["rev-parse", "--short", "HEAD"])),
    );
    m.insert(
        "loadavg",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    m.insert("others", other_heavy_processes());
    m
}

/// Other CPU-heavy processes known to share this machine (model training).
fn other_heavy_processes() -> String {
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("ladic.train") || cmd.contains("ar_baseline") {
                found.push(cmd.trim().to_string());
            }
        }
    }
    if found.is_empty() {
        "none".into()
    } else {
        found.join("; ")
    }
}

fn manifest_summary() -> (String, String, usize) {
    let path = Path::new(ROOT).join("models/scenes-tiny/manifest.json");
    let m: serde_json::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    (
        m["name"].as_str().unwrap_or("?").to_string(),
        m["description"].as_str().unwrap_or("?").to_string(),
        m["sampler"]["steps"].as_u64().unwrap_or(0) as usize,
    )
}

struct Goal {
    name: &'static str,
    target: String,
    measured: String,
    met: Option<bool>,
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn goals(modes: &[ModeResult], reference: Option<&Reference>) -> Vec<Goal> {
    let get = |m: &str| modes.iter().find(|r| r.mode == m);
    let thr16 = |m: &str| get(m).and_then(|r| r.closed_at(16)).map(|p| p.throughput);
    let mut goals = Vec::new();
    let ratio = match (thr16("continuous"), thr16("off")) {
        (Some(c), Some(o)) if o > 0.0 => Some(c / o),
        _ => None,
    };
    goals.push(Goal {
        name: "throughput at 16 clients, continuous / off",
        target: ">= 3x".into(),
        measured: ratio.map_or("-".into(), |r| format!("{r:.2}x")),
        met: ratio.map(|r| r >= 3.0),
    });
    let cont = get("continuous");
    let single = cont.and_then(|r| r.closed_at(1)).map(|p| p.p50_ms);
    let half = cont.and_then(|r| r.open_at(0.5)).map(|p| p.p99_ms);
    let ratio = match (half, single) {
        (Some(h), Some(s)) if s > 0.0 => Some(h / s),
        _ => None,
    };
    goals.push(Goal {
        name: "p99 at half saturation / single-request p50 (continuous)",
        target: "<= 2x".into(),
        measured: match (ratio, half, single) {
            (Some(r), Some(h), Some(s)) => format!("{r:.2}x ({h:.1} ms / {s:.1} ms)"),
            _ => "-".into(),
        },
        met: ratio.map(|r| r <= 2.0),
    });
    let service = cont.and_then(|r| r.closed_at(1)).map(|p| p.mean_ms);
    let speedup = match (reference, service) {
        (Some(r), Some(s)) if s > 0.0 => Some(r.mean_s * 1e3 / s),
        _ => None,
    };
    goals.push(Goal {
        name: "reference per caption / service batch-1 latency",
        target: ">= 5x".into(),
        measured: match (speedup, reference, service) {
            (Some(x), Some(r), Some(s)) => {
                format!("{x:.1}x ({:.1} ms / {s:.1} ms)", r.mean_s * 1e3)
            }
            _ => "-".into(),
        },
        met: speedup.map(|x| x >= 5.0),
    });
    let o = cont.and_then(|r| r.overload.as_ref());
    let (measured, met) = match o {
        Some(o) => {
            let bad: Vec<String> = o
                .phase
                .outcomes
                .iter()
                .filter(|(k, _)| !["200", "429", "503", "504"].contains(&k.as_str()))
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let bounded = o.rss_second_half_max_mib <= o.rss_first_half_max_mib * 1.10 + 16.0;
            let healthy = o.health_failures == 0;
            (
                format!(
                    "{}; other errors: {}; health {}/{} ok (max {:.0} ms); RSS max {:.0} MiB first half, {:.0} MiB second half",
                    outcomes(&o.phase),
                    if bad.is_empty() {
                        "none".into()
                    } else {
                        bad.join(", ")
                    },
                    o.health_checks - o.health_failures,
                    o.health_checks,
                    o.health_max_ms,
                    o.rss_first_half_max_mib,
                    o.rss_second_half_max_mib
                ),
                Some(bad.is_empty() && bounded && healthy),
            )
        }
        None => ("-".into(), None),
    };
    goals.push(Goal {
        name: "2x overload: only 429/503/504, bounded memory, health answers",
        target: "all three".into(),
        measured,
        met,
    });
    goals
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}")
    }
}

fn report(
    settings: &Settings,
    modes: &[ModeResult],
    reference: Option<&Reference>,
    references: &[Reference],
    machine: &BTreeMap<&'static str, String>,
    total: Duration,
) -> String {
    let (name, description, steps) = manifest_summary();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Load benchmark{}\n",
        settings
            .label
            .as_ref()
            .map_or(String::new(), |l| format!(": {l}"))
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| command | `{}` |", settings.command);
    let overrides = Settings::overrides();
    if !overrides.is_empty() {
        let _ = writeln!(s, "| settings | `{}` |", overrides.join(" "));
    }
    let _ = writeln!(s, "| date | {} |", machine["date"]);
    let _ = writeln!(s, "| commit | {} |", machine["commit"]);
    let _ = writeln!(
        s,
        "| machine | {} CPUs (`nproc`), {}, {} RAM |",
        machine["nproc"], machine["cpu"], machine["memory"]
    );
    let _ = writeln!(s, "| load average at start | {} |", machine["loadavg"]);
    let _ = writeln!(s, "| other heavy processes | {} |", machine["others"]);
    let _ = writeln!(
        s,
        "| bundle | `models/scenes-tiny`: {name}, \"{description}\" |"
    );
    let _ = writeln!(
        s,
        "| request | `POST /caption`, 128x128 PNG, bundle defaults (steps {steps}) |"
    );
    let _ = writeln!(
        s,
        "| server | release build, `serve --device cpu --batching MODE{}`, other flags default |",
        if settings.server_args.is_empty() {
            String::new()
        } else {
            format!(" {}", settings.server_args.join(" "))
        }
    );
    let _ = writeln!(
        s,
        "| phases | {:.1} s measured after {:.1} s warm-up; overload {:.0} s; total run {:.0} s |\n",
        settings.phase.as_secs_f64(),
        settings.warmup.as_secs_f64(),
        settings.overload.as_secs_f64(),
        total.as_secs_f64()
    );

    let _ = writeln!(s, "### Goals\n");
    let _ = writeln!(s, "| goal | target | measured | |\n|---|---|---|---|");
    for g in goals(modes, reference) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            g.name,
            g.target,
            g.measured,
            verdict(g.met)
        );
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "### Ratios\n");
    let thr = |m: &str, c: usize| {
        modes
            .iter()
            .find(|r| r.mode == m)
            .and_then(|r| r.closed_at(c))
            .map(|p| p.throughput)
    };
    let _ = writeln!(s, "| ratio | value |\n|---|---|");
    for (label, a, b) in [
        (
            "throughput at 16 clients: continuous / off",
            thr("continuous", 16),
            thr("off", 16),
        ),
        (
            "throughput at 16 clients: request / off",
            thr("request", 16),
            thr("off", 16),
        ),
        (
            "throughput at 16 clients: continuous / request",
            thr("continuous", 16),
            thr("request", 16),
        ),
    ] {
        let v = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(s, "| {label} | {v} |");
    }
    for m in modes {
        let single = m.closed_at(1).map(|p| p.p50_ms);
        if let (Some(h), Some(one)) = (m.open_at(0.5), single) {
            let _ = writeln!(
                s,
                "| {}: p99 at half saturation / single-request p50 | {:.2}x |",
                m.mode,
                h.p99_ms / one
            );
        }
    }
    if let Some(r) = reference {
        for m in modes {
            if let Some(p) = m.closed_at(1) {
                let _ = writeln!(
                    s,
                    "| PyTorch reference per caption (faster thread setting) / {} service at 1 client (HTTP mean; server inference mean {} ms) | {:.1}x |",
                    m.mode,
                    ms(p.inference_mean_ms),
                    r.mean_s * 1e3 / p.mean_ms
                );
            }
        }
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "### Per mode\n");
    let _ = writeln!(
        s,
        "Latency in ms from sending (closed loop) or from the scheduled arrival (open loop) to the whole answer; percentiles over 200 answers only. Outcomes count every request of the window by HTTP status. Cores: average CPU use during the phase (from /proc) by the server, by this load generator, and by every other process on the machine; a large \"other\" means someone else's work competed with the measurement.\n"
    );
    let _ = writeln!(
        s,
        "| mode | load | captions/s | p50 | p90 | p99 | max | server inference mean | outcomes | cores: server / loadgen / other |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for m in modes {
        for p in &m.closed {
            let _ = writeln!(
                s,
                "| {} | {} clients | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                m.mode,
                p.offered,
                p.throughput,
                ms(p.p50_ms),
                ms(p.p90_ms),
                ms(p.p99_ms),
                ms(p.max_ms),
                ms(p.inference_mean_ms),
                outcomes(p),
                cores(p)
            );
        }
        for (f, p) in &m.open {
            let _ = writeln!(
                s,
                "| {} | {:.1}/s ({:.0}% sat.) | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                m.mode,
                p.offered,
                f * 100.0,
                p.throughput,
                ms(p.p50_ms),
                ms(p.p90_ms),
                ms(p.p99_ms),
                ms(p.max_ms),
                ms(p.inference_mean_ms),
                outcomes(p),
                cores(p)
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| mode | saturation (best closed loop) | mean rows per denoiser call | mean denoiser call | peak RSS | shutdown |\n|---|---|---|---|---|---|"
    );
    for m in modes {
        let _ = writeln!(
            s,
            "| {} | {:.1} captions/s | {:.2} | {:.2} ms | {:.0} MiB | {} |",
            m.mode, m.saturation, m.mean_batch_rows, m.mean_step_ms, m.peak_rss_mib, m.shutdown
        );
    }
    let _ = writeln!(s);
    if let Some(o) = modes.iter().find_map(|m| m.overload.as_ref()) {
        let _ = writeln!(s, "### 2x overload (continuous)\n");
        let _ = writeln!(
            s,
            "{:.1} arrivals/s (Poisson) for {:.0} s: {:.1} captions/s answered (until the last answer), p50 {} ms, p99 {} ms; outcomes {}. Health probes (`/health/live` and `/health/ready` every 250 ms): {}/{} answered 200, slowest {:.0} ms. Cores (server / load generator / other processes): {}. Server RSS: {:.0} MiB before, max {:.0} MiB in the first half, max {:.0} MiB in the second half, {:.0} MiB at the end, {:.0} MiB one second after; VmHWM {:.0} MiB.\n",
            o.rate,
            o.window_s,
            o.phase.throughput,
            ms(o.phase.p50_ms),
            ms(o.phase.p99_ms),
            outcomes(&o.phase),
            o.health_checks - o.health_failures,
            o.health_checks,
            o.health_max_ms,
            cores(&o.phase),
            o.rss_before_mib,
            o.rss_first_half_max_mib,
            o.rss_second_half_max_mib,
            o.rss_end_mib,
            o.rss_after_drain_mib,
            o.hwm_mib
        );
    }
    if !references.is_empty() {
        let _ = writeln!(s, "### Python reference sampler\n");
        let _ = writeln!(
            s,
            "`python3 -m ladic.bench_reference` (models/ladic/bench_reference.py): `caption_images` at batch 1, the bundle's default parameters, the unconditional K/V computed once; per caption: image encoding, the denoising loop, the decode. The goal compares against the faster of the thread settings.\n"
        );
        let _ = writeln!(
            s,
            "| model | torch | threads | steps | candidates | captions | mean | p50 | min |\n|---|---|---|---|---|---|---|---|---|"
        );
        for r in references {
            let _ = writeln!(
                s,
                "| {} (`{}`) | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
                if r.runtime == "pytorch" {
                    "PyTorch, `TorchBackend` on `load_run`"
                } else {
                    "ONNX Runtime, `OnnxBackend` (no trained run found)"
                },
                r.source,
                r.torch,
                r.torch_threads,
                r.steps,
                r.candidates,
                r.repeats,
                r.mean_s * 1e3,
                r.p50_s * 1e3,
                r.min_s * 1e3
            );
        }
        let _ = writeln!(s);
    }
    s
}

const BEGIN: &str = "<!-- load:begin (written by benches/load.rs; edit outside the markers) -->";
const END: &str = "<!-- load:end -->";

fn write_results(path: &Path, section: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{BEGIN}\n{section}{END}{}",
            &old[..b],
            &old[e + END.len()..]
        ),
        _ if old.trim().is_empty() => format!(
            "# Benchmark results\n\nThe latest `cargo bench --bench load` run is between the markers below; it rewrites only that part.\n\n{BEGIN}\n{section}{END}\n"
        ),
        _ => format!("{}\n{BEGIN}\n{section}{END}\n", old.trim_end()),
    };
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------- main

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter or other arguments mean nothing here.
    let settings = Settings::from_env()?;
    let started = Instant::now();
    let machine = machine();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // torch's default thread count and one thread: the faster is the baseline, so
    // the comparison does not flatter the service.
    let mut references = Vec::new();
    if settings.reference_repeats > 0 {
        for threads in [0, 1] {
            match run_reference(settings.reference_repeats, threads) {
                Ok(r) => references.push(r),
                Err(e) => eprintln!("   reference skipped: {e:#}"),
            }
        }
    }
    let reference = references
        .iter()
        .min_by(|a, b| a.mean_s.total_cmp(&b.mean_s))
        .cloned();
    let modes = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .pool_max_idle_per_host(MAX_OUTSTANDING)
            .build()?;
        let mut modes = Vec::new();
        for mode in &settings.modes {
            modes.push(run_mode(&settings, mode, &client).await?);
        }
        anyhow::Ok(modes)
    })?;
    let section = report(
        &settings,
        &modes,
        reference.as_ref(),
        &references,
        &machine,
        started.elapsed(),
    );
    println!("{section}");
    let dir = Path::new(ROOT).join("target/load-bench");
    std::fs::create_dir_all(&dir)?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::write(
        dir.join(format!("results-{stamp}.json")),
        serde_json::to_string_pretty(&serde_json::json!({
            "machine": machine,
            "modes": modes,
            "references": references,
        }))?,
    )?;
    std::fs::write(dir.join(format!("results-{stamp}.md")), &section)?;
    if let Some(path) = &settings.results {
        write_results(path, &section)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
