//! Logging setup: `tracing` with human-readable lines by default or JSON lines on request.
//! `RUST_LOG` overrides the configured level. Secrets are never put in log fields.
//!
//! Lines go to stderr through a writer thread (`tracing-appender`'s non-blocking writer):
//! an event loop that logs (a room placed, a split detected) only queues the line, so a
//! slow reader of stderr (journald busy, a full pipe) never stalls request handling. When
//! the queue holds [`QUEUED_LINES`] lines, further lines are dropped rather than waited for.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Lines the writer thread may fall behind by before lines are dropped.
pub const QUEUED_LINES: usize = 65_536;

/// Keeps the writer thread; dropping it writes out what is queued. Hold it until exit.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber once; later calls are ignored (tests start many routers)
/// and their guard holds nothing.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("roomrouter-log")
        .finish(std::io::stderr());
    // Colours only for a person at a terminal, not in journald or a log file.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard {
        _writer: installed.ok().map(|()| guard),
    }
}
