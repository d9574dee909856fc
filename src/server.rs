//! The server's life: check the bundle, listen, load the workers in the background
//! (liveness answers meanwhile), warm up with one real caption, report ready; on
//! shutdown, turn unready, let in-flight requests finish, stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServeArgs;
use crate::http::{self, AppState, HttpSettings};
use crate::metrics::Metrics;
use crate::pipeline::{self, LoadError, Prepared};
use crate::scheduler::SchedulerConfig;

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    load: Option<JoinHandle<Result<(), LoadError>>>,
    serve: JoinHandle<std::io::Result<()>>,
    stop_tx: watch::Sender<bool>,
}

/// How long [`Server::shutdown`] waits, after its grace period, for the connections to
/// close and the workers to stop.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request deadline the server uses, whatever the configuration.
const MAX_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Validates the bundle and library, binds, and starts loading; returns at once.
pub async fn start(args: &ServeArgs) -> Result<Server, LoadError> {
    args.check().map_err(LoadError::Infer)?;
    log_configuration(args);
    let model = args.model.clone();
    let prepared = tokio::task::spawn_blocking(move || pipeline::prepare(&model))
        .await
        .map_err(|e| LoadError::Infer(format!("startup task failed: {e}")))??;
    let metrics = Arc::new(Metrics::new()?);
    // Deadlines are `Instant + timeout`: a week is longer than any caption and far from
    // overflowing, whatever the flags say.
    let max_timeout = Duration::from_millis(args.max_request_timeout_ms.max(1)).min(MAX_DEADLINE);
    let settings = HttpSettings {
        max_body_bytes: args.max_body_bytes,
        image_limits: args.image_limits(),
        max_batch_images: args.max_batch_images.max(1),
        decode_memory_mib: args.decode_memory_mib.max(1),
        body_memory_mib: args.body_memory_mib.max(1),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        // At most the largest (`serve` refuses more; a server started in-process clamps).
        default_timeout: args.request_timeout().min(max_timeout),
        max_timeout,
        queue_size: args.queue_size,
        workers: usize::from(args.workers),
        batching: args.batching,
        max_batch_rows: args.max_batch_rows as usize,
        cors_allow_origins: cors_origins(&args.cors_allow_origin)?,
        worker_stall_timeout: (args.worker_stall_timeout_ms > 0)
            .then(|| Duration::from_millis(args.worker_stall_timeout_ms)),
    };
    let state = Arc::new(AppState::new(
        settings,
        Arc::new(prepared.bundle.manifest.clone()),
        metrics.clone(),
    ));
    let listener = TcpListener::bind(args.bind)
        .await
        .map_err(|source| LoadError::Bind {
            addr: args.bind.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| LoadError::Bind {
        addr: args.bind.to_string(),
        source,
    })?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let app = http::router(state.clone());
    let limits = ConnectionLimits {
        max_connections: args.max_connections.max(1),
        max_header_bytes: (args.max_header_bytes as usize).max(8192),
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
        send_stall_timeout: Duration::from_millis(args.send_stall_timeout_ms.max(1)),
    };
    let serve = tokio::spawn(serve_connections(
        listener,
        app,
        metrics.clone(),
        limits,
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        },
    ));
    let config = SchedulerConfig {
        workers: usize::from(args.workers),
        batching: args.batching,
        max_batch_rows: args.max_batch_rows as usize,
        queue_size: args.queue_size,
        session: args.model.session_options(),
    };
    let load = tokio::spawn(load_and_warm_up(state.clone(), prepared, config, metrics));
    Ok(Server {
        addr,
        state,
        load: Some(load),
        serve,
        stop_tx,
    })
}

/// What one connection may hold, and how many may be open.
struct ConnectionLimits {
    max_connections: usize,
    /// hyper's read buffer, which holds a request head while it arrives.
    max_header_bytes: usize,
    header_read_timeout: Duration,
    send_stall_timeout: Duration,
}

/// Connections accepted beyond `--max-connections`, one request each, whose health
/// probes are answered (everything else gets 503): an orchestrator's probes still get
/// through while idle clients hold every regular connection.
const PROBE_LANE_CONNECTIONS: usize = 32;

/// The time a connection of the probe lane gets to send its request head.
const PROBE_LANE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a connection of the probe lane stays open.
const PROBE_LANE_LIFETIME: Duration = Duration::from_secs(5);

/// Refused connections whose input is read and thrown away at once (each for up to a
/// second); beyond them, a refused connection is closed as soon as its answer is
/// written, so that a flood cannot hold many sockets this way.
const DRAINING_REFUSALS: usize = 64;

/// Accepts connections and serves `app` on each (HTTP/1.1) until `stop` completes, then
/// lets the open connections finish their requests (the caller bounds that wait).
/// Unlike `axum::serve`, a connection that sends no complete request head within
/// `header_read_timeout` is closed, so idle or trickling clients cannot hold sockets;
/// so is one that takes no bytes of its response for `send_stall_timeout` (a client
/// that stopped reading a stream). Each connection buffers at most `max_header_bytes`
/// of a request head. Beyond `max_connections` open ones, a new connection gets its
/// health probe answered and any other request 503 (the probe lane, up to
/// [`PROBE_LANE_CONNECTIONS`]), or, beyond that too, 503 at once and is closed.
async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    metrics: Arc<Metrics>,
    limits: ConnectionLimits,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let probe_lane = Arc::new(tokio::sync::Semaphore::new(PROBE_LANE_CONNECTIONS));
    let draining_refusals = Arc::new(tokio::sync::Semaphore::new(DRAINING_REFUSALS));
    let refusal: Arc<str> = http::ApiError::TooManyConnections.raw_http_answer().into();
    let mut last_refusal_logged: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A client that gave up before it was accepted: nothing to do.
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait for connections to
                    // close, and say so once a second at most.
                    tracing::warn!(error = %e, "accepting a connection failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let (slot, over_limit) = match open.clone().try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => {
                if last_refusal_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections get 503 (health probes \
                         are still answered)"
                    );
                    last_refusal_logged = Some(std::time::Instant::now());
                }
                match probe_lane.clone().try_acquire_owned() {
                    Ok(slot) => (slot, true),
                    Err(_) => {
                        refuse_connection(stream, &refusal, &metrics, &draining_refusals);
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service =
            app.clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    if over_limit {
                        req.extensions_mut().insert(http::OverConnectionLimit);
                    }
                    req
                });
        // A connection of the probe lane has one request, sent promptly.
        let header_read_timeout = if over_limit {
            limits.header_read_timeout.min(PROBE_LANE_HEADER_TIMEOUT)
        } else {
            limits.header_read_timeout
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(!over_limit)
            .max_buf_size(limits.max_header_bytes)
            .serve_connection(
                TokioIo::new(SendStallTimeout::new(stream, limits.send_stall_timeout)),
                TowerToHyperService::new(service),
            );
        let connection = graceful.watch(connection);
        let counted = OpenConnection::new(&metrics);
        tokio::spawn(async move {
            let _slot = slot;
            // A connection of the probe lane is closed after a few seconds whatever it
            // does (a client trickling the body of its refused request would otherwise
            // keep a slot of the lane while the answer's body is thrown away).
            let lifetime = if over_limit {
                PROBE_LANE_LIFETIME
            } else {
                Duration::MAX
            };
            let reason = match tokio::time::timeout(lifetime, connection).await {
                Ok(result) => {
                    if let Err(e) = &result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    close_reason(&result)
                }
                Err(_) => "over_limit",
            };
            counted.closed(reason);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answers a connection over the limit `answer` (a 503) and closes it, within a second
/// (a client that reads nothing does not hold it longer), counted in
/// `connections_closed_total{reason="over_limit"}`. What the client sent meanwhile is
/// read and thrown away (up to 1 MiB) before the socket closes, by
/// [`DRAINING_REFUSALS`] connections at most: closing it with unread bytes would reset
/// the connection, and the client would likely lose the answer.
fn refuse_connection(
    mut stream: tokio::net::TcpStream,
    answer: &Arc<str>,
    metrics: &Arc<Metrics>,
    draining: &Arc<tokio::sync::Semaphore>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    metrics
        .connections_closed_total
        .with_label_values(&["over_limit"])
        .inc();
    let answer = answer.clone();
    let drain = draining.clone().try_acquire_owned().ok();
    tokio::spawn(async move {
        let answer = async {
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let Some(_drain) = drain else {
                return Ok(());
            };
            let mut sink = [0u8; 16 * 1024];
            let mut read = 0;
            while read < (1 << 20) {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => read += n,
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
    });
}

/// One connection in the `open_connections` gauge, until it is closed (or dropped, when
/// the runtime ends first).
struct OpenConnection {
    metrics: Arc<Metrics>,
}

impl OpenConnection {
    fn new(metrics: &Arc<Metrics>) -> OpenConnection {
        metrics.open_connections.inc();
        OpenConnection {
            metrics: metrics.clone(),
        }
    }

    /// Counts the close in `connections_closed_total`.
    fn closed(self, reason: &str) {
        self.metrics
            .connections_closed_total
            .with_label_values(&[reason])
            .inc();
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open_connections.dec();
    }
}

/// How a connection ended, as `connections_closed_total` labels it.
fn close_reason(result: &Result<(), hyper::Error>) -> &'static str {
    use std::io::ErrorKind;
    let Err(e) = result else { return "clean" };
    if e.is_timeout() {
        return "header_timeout";
    }
    if e.is_parse() {
        return "malformed_request";
    }
    if e.is_incomplete_message() {
        return "client_closed";
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                // Only SendStallTimeout fails a write this way.
                ErrorKind::TimedOut => "send_stall",
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => "client_closed",
                _ => "error",
            };
        }
        source = cause.source();
    }
    "error"
}

/// A connection whose writes fail once the peer has taken no bytes for `limit`: the
/// socket's buffers are full and the client is not reading. The write error ends the
/// connection, and with it the response (a stream's rows are then freed, as for a
/// client that left).
struct SendStallTimeout<IO> {
    io: IO,
    limit: Duration,
    /// Armed when a write could not go through; cleared by any progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> SendStallTimeout<IO> {
    fn new(io: IO, limit: Duration) -> Self {
        SendStallTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// After a write attempt: progress clears the timer; no progress arms it, and fails
    /// the write once it has run out.
    fn after_write<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        attempt: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if attempt.is_ready() {
            self.stalled = None;
            return attempt;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took none of its response for {} ms",
                    limit.as_millis()
                ),
            )));
        }
        Poll::Pending
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendStallTimeout<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendStallTimeout<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let attempt = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.after_write(cx, attempt)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let attempt = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.after_write(cx, attempt)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let attempt = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.after_write(cx, attempt)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An accept error that concerns one connection only.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// One line with the version and the settings that shape serving, so that the logs of
/// a pod that never became ready still say how it was configured (the API key only as
/// set or not).
fn log_configuration(args: &ServeArgs) {
    let m = &args.model;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        bundle = %m.bundle.display(),
        device = ?m.device,
        workers = args.workers,
        batching = ?args.batching,
        max_batch_rows = args.max_batch_rows,
        queue_size = args.queue_size,
        request_timeout_ms = args.request_timeout_ms,
        max_request_timeout_ms = args.max_request_timeout_ms,
        kv_pool = m.kv_pool,
        cuda_graph = m.cuda_graph,
        device_loop = m.device_loop,
        max_connections = args.max_connections,
        max_body_bytes = args.max_body_bytes,
        api_key = args.api_key.as_deref().is_some_and(|k| !k.is_empty()),
        "configuration"
    );
}

/// The configured CORS origins, each checked to be usable as a header value.
fn cors_origins(origins: &[String]) -> Result<Vec<String>, LoadError> {
    let origins: Vec<String> = origins
        .iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    for o in &origins {
        if axum::http::HeaderValue::from_str(o).is_err() {
            return Err(LoadError::Infer(format!(
                "--cors-allow-origin: {o:?} is not a valid origin"
            )));
        }
    }
    Ok(origins)
}

async fn load_and_warm_up(
    state: Arc<AppState>,
    prepared: Prepared,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> Result<(), LoadError> {
    let start = Instant::now();
    let prepared = Arc::new(prepared);
    let p = prepared.clone();
    let m = metrics.clone();
    let scheduler = tokio::task::spawn_blocking(move || pipeline::start_scheduler(&p, config, m))
        .await
        .map_err(|e| LoadError::Infer(format!("loading task failed: {e}")))??;
    let device = scheduler.info.device;
    metrics.set_build_info(&prepared.bundle.manifest.name, &device.to_string());
    let _ = state.device.set(device);
    let scheduler = Arc::new(scheduler);
    let _ = state.scheduler.set(scheduler.clone());

    // One real caption through the whole pipeline, so the first user request does not
    // pay for lazy allocations, and "ready" means "has captioned".
    let pixels = pipeline::warm_up_pixels(&prepared.bundle);
    let rx = pipeline::submit(
        &scheduler,
        pixels,
        state.defaults.clone(),
        0,
        Duration::from_secs(600),
    )
    .map_err(|e| LoadError::WarmUp(e.to_string()))?;
    let output = rx
        .await
        .map_err(|_| LoadError::WarmUp("the worker stopped".into()))?
        .map_err(|e| LoadError::WarmUp(e.to_string()))?;
    state.set_ready(true);
    tracing::info!(
        model = %prepared.bundle.manifest.name,
        %device,
        seconds = start.elapsed().as_secs_f64(),
        warm_up_caption = output.best().map_or("", |c| c.caption.as_str()),
        "ready"
    );
    Ok(())
}

impl Server {
    /// Waits until the server is ready, or returns why loading failed.
    pub async fn wait_ready(&mut self) -> Result<(), LoadError> {
        match self.load.take() {
            Some(handle) => handle
                .await
                .map_err(|e| LoadError::Infer(format!("loading task failed: {e}")))?,
            None => Ok(()),
        }
    }

    /// Turns unready, waits up to `grace` for in-flight requests, then answers the
    /// requests still waiting for a caption 503, stops serving and stops the workers.
    /// Returns within `grace` plus [`CLOSE_TIMEOUT`], so that an orchestrator's kill
    /// deadline can be set from it: a worker still inside a model call then is not
    /// waited for (its batch's connections close when the process exits).
    pub async fn shutdown(self, grace: Duration) {
        self.state.begin_drain();
        tracing::info!(in_flight = self.state.in_flight(), "draining");
        let deadline = Instant::now() + grace;
        while self.state.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let scheduler = self.state.scheduler.get().cloned();
        let left = self.state.in_flight();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "grace period over; answering the requests still waiting 503"
            );
        }
        // Also when nothing is in flight: a request may still reach the queue.
        if let Some(scheduler) = &scheduler {
            scheduler.abandon();
        }
        self.state.end_grace();
        let _ = self.stop_tx.send(true);
        let close_by = Instant::now() + CLOSE_TIMEOUT;
        if tokio::time::timeout(CLOSE_TIMEOUT, self.serve)
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open {} s after the grace period; they end with the process",
                CLOSE_TIMEOUT.as_secs()
            );
        }
        if let Some(load) = self.load {
            load.abort();
        }
        if let Some(scheduler) = scheduler {
            let wait = close_by
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let stopped = tokio::task::spawn_blocking(move || scheduler.stop_within(wait))
                .await
                .unwrap_or(false);
            if !stopped {
                tracing::warn!("a worker is still in a model call; it ends with the process");
            }
        }
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::SendStallTimeout;

    #[tokio::test]
    async fn writes_fail_once_the_peer_has_taken_nothing_for_the_limit() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = SendStallTimeout::new(near, Duration::from_millis(100));
        // Writes that go through, slowly taken, never time out.
        for _ in 0..5 {
            near.write_all(&[1; 64]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            let mut taken = [0; 64];
            far.read_exact(&mut taken).await.unwrap();
        }
        // Nobody reads: the buffer fills, and the write fails after the limit.
        let start = std::time::Instant::now();
        let e = near.write_all(&[1; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
}
