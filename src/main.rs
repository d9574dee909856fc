//! `ladic-serve`: parse the configuration, set up logging, run the chosen command.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ladic_serve::config::{Cli, Command, ServeArgs};
use ladic_serve::{pipeline, server};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = cli.log_json;
    init_tracing(json);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Caption(args) => pipeline::caption_files(&args)
            .map(|lines| {
                for line in lines {
                    println!("{line}");
                }
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, most general first; a JSON log line when
            // the logs are JSON, so that a log collector keeps why the process ended.
            if json {
                tracing::error!(error = %format!("{e:#}"), "exiting");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,ort=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in files and log collectors.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    // A panic is logged as one event in the log's format (one JSON line with
    // --log-json), instead of the default hook's plain lines on stderr. The workers
    // catch theirs and go on; the event says where it happened.
    // Where RUST_LOG turns this program's errors off, the default hook still prints.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !tracing::enabled!(tracing::Level::ERROR) {
            default_hook(info);
            return;
        }
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        // With RUST_BACKTRACE=1 (or RUST_LIB_BACKTRACE=1) only.
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(thread, panic = %info, backtrace = %backtrace, "panicked");
        } else {
            tracing::error!(thread, panic = %info, "panicked");
        }
    }));
}

/// Open files kept for other uses than the regular connections: the bundle's files,
/// the logs, the runtime's own, the probe lane and the connections being refused.
const FILES_FOR_OTHER_USES: u64 = 128;

fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    ladic_serve::process::return_large_blocks_to_the_system();
    match ladic_serve::process::raise_open_files_limit() {
        // The connection limit must be what bounds the connections: with more allowed
        // than there are files, accepting fails before the limit (and its probe lane)
        // is ever reached.
        Some(files) if files < args.max_connections as u64 + FILES_FOR_OTHER_USES => {
            let usable = files.saturating_sub(FILES_FOR_OTHER_USES).max(1) as usize;
            tracing::warn!(
                open_files_limit = files,
                max_connections = args.max_connections,
                lowered_to = usable,
                "the open files limit is below --max-connections; the connection limit is \
                 lowered to fit it (raise the limit, e.g. `ulimit -n`, to keep the flag's)"
            );
            args.max_connections = usable;
        }
        files => tracing::debug!(open_files_limit = ?files, "open files limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ladic-http")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let mut server = server::start(&args)
            .await
            .with_context(|| format!("cannot start serving {}", args.model.bundle.display()))?;
        tracing::info!(addr = %server.addr, "listening");
        tokio::select! {
            loaded = server.wait_ready() => loaded.context("cannot load the model")?,
            () = &mut shutdown => {
                server.shutdown(Duration::ZERO).await;
                return Ok(());
            }
        }
        shutdown.await;
        // A second signal does not wait for the grace period. Listening from here on
        // (the future is made now, not when the task first runs), and leaving with
        // _exit: no exit handlers of the model runtime while a worker may be in a call.
        let second = shutdown_signal();
        tokio::spawn(async move {
            second.await;
            tracing::warn!(
                "second shutdown signal; exiting without waiting for the requests in flight"
            );
            // SAFETY: _exit ends the process at once; nothing runs after it.
            unsafe { libc::_exit(130) }
        });
        server
            .shutdown(Duration::from_secs(args.shutdown_grace_seconds))
            .await;
        Ok(())
    });
    // Dropping the runtime would wait for every blocking task (an image decode, a
    // worker left in a model call); the shutdown has answered every client already.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so no signal in between takes the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = term => {},
                () = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}
