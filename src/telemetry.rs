//! Logging setup: `tracing` with human-readable lines by default or JSON lines on request.
//! `RUST_LOG` overrides the configured level. Secrets are never put in log fields.
//!
//! A filter is checked before it is used ([`check_filter`]): `tracing` reads a bare word as
//! a target name, so `RUST_LOG=warning` would log only a target called `warning`, which is
//! to say nothing, errors included. A `RUST_LOG` that fails the check is not used: the
//! configured level is, and a line on stderr says why.
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

/// The levels a bare directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Every directive of `filter` (comma-separated) must parse, and one without a target must
/// be a level; the error names the directive and what is wrong with it. A filter with no
/// directive at all is refused too: tracing would read it as `error` and drop every line
/// below that, the router's start included.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.split(',').all(|d| d.trim().is_empty()) {
        return Err(format!(
            "{filter:?}: no directive; name a level (trace, debug, info, warn, error, off)"
        ));
    }
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if let Err(e) = d.parse::<tracing_subscriber::filter::Directive>() {
            return Err(format!("{d:?}: {e}"));
        }
        let bare = !d.contains(['=', '[']);
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)) {
            return Err(format!(
                "{d:?}: not a level (trace, debug, info, warn, error, off); a target takes target=level"
            ));
        }
    }
    Ok(())
}

/// The filter to log with: `RUST_LOG` when it is set and passes [`check_filter`], else
/// `level` (already checked with the config), and what to tell the operator about a
/// `RUST_LOG` that was not used.
fn choose_filter(rust_log: Option<&str>, level: &str) -> (EnvFilter, Option<String>) {
    if let Some(env) = rust_log.filter(|v| !v.trim().is_empty()) {
        match check_filter(env).and_then(|()| EnvFilter::try_new(env).map_err(|e| e.to_string())) {
            Ok(f) => return (f, None),
            Err(why) => {
                let note = format!("roomrouter: RUST_LOG ignored ({why}); logging at {level:?}");
                return (EnvFilter::new(level), Some(note));
            }
        }
    }
    (EnvFilter::new(level), None)
}

/// Installs the global subscriber once; later calls are ignored (tests start many routers)
/// and their guard holds nothing.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (filter, note) = choose_filter(rust_log.as_deref(), level);
    if let Some(note) = note {
        // Before the subscriber exists, and whatever the level: straight to stderr.
        eprintln!("{note}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_target_directives_pass_and_bare_words_that_are_not_levels_do_not() {
        for good in [
            "info",
            "WARN",
            "roomrouter=debug,info",
            "off",
            "hyper=warn, error",
            "info,",
        ] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
        for bad in ["warning", "info,warning", "verbose", "roomrouter=loud"] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.contains(bad.rsplit(',').next().unwrap()), "{bad}: {e}");
        }
        // No directive at all: tracing would log errors only.
        for empty in ["", " ", ",", " , "] {
            let e = check_filter(empty).unwrap_err();
            assert!(e.contains("no directive"), "{empty:?}: {e}");
        }
    }

    #[test]
    fn a_rust_log_that_is_not_a_filter_is_not_used_and_says_so() {
        let (f, note) = choose_filter(Some("warning"), "info");
        assert_eq!(f.to_string(), "info");
        let note = note.unwrap();
        assert!(
            note.contains("RUST_LOG ignored") && note.contains("\"warning\""),
            "{note}"
        );

        let (f, note) = choose_filter(Some("debug"), "info");
        assert_eq!((f.to_string(), note), ("debug".to_string(), None));
        let (f, note) = choose_filter(None, "warn");
        assert_eq!((f.to_string(), note), ("warn".to_string(), None));
        let (f, note) = choose_filter(Some("  "), "warn");
        assert_eq!((f.to_string(), note), ("warn".to_string(), None));
    }
}
