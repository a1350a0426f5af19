//! The agent's log: `tracing` events on stderr, as text for people or as one JSON object
//! a line for collectors. Transitions (health, admin, VRRP, reload) are one event each
//! with an `event` field and their particulars as fields.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL message key=value ...`
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `fields` (with `message`).
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-level {0:?}: {1}")]
    Level(String, tracing_subscriber::filter::ParseError),
    #[error("a logger is already installed")]
    Installed,
}

/// The logger, writing to `writer`. `level` is a level (`error`, `warn`, `info`,
/// `debug`, `trace`) or a filter in `RUST_LOG` syntax (`info,lb_userspace::vrrp=debug`).
pub fn subscriber<W>(
    format: LogFormat,
    level: &str,
    writer: W,
    ansi: bool,
) -> Result<Box<dyn Subscriber + Send + Sync>, LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(level).map_err(|e| LogError::Level(level.to_string(), e))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    Ok(match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    })
}

/// Installs the logger on stderr for the whole process.
pub fn init(format: LogFormat, level: &str) -> Result<(), LogError> {
    let ansi = std::io::stderr().is_terminal();
    let s = subscriber(format, level, std::io::stderr, ansi)?;
    tracing::subscriber::set_global_default(s).map_err(|_| LogError::Installed)
}

/// For tests about what the agent logs: a JSON logger for the current thread whose
/// lines are kept.
#[cfg(test)]
pub(crate) mod capture {
    use std::sync::{Arc, Mutex};

    use super::{LogFormat, subscriber};

    /// A writer that keeps what it is given.
    #[derive(Clone, Default)]
    pub struct Buffer(pub Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    thread_local! {
        /// Where this thread's log lines go while a `Captured` of it lives.
        static SINK: std::cell::RefCell<Option<Buffer>> = const { std::cell::RefCell::new(None) };
    }

    /// Writes into the current thread's sink, if any; drops the line otherwise.
    struct ThreadSink;

    impl std::io::Write for ThreadSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            SINK.with(|s| {
                if let Some(b) = s.borrow_mut().as_mut() {
                    b.write(buf)
                } else {
                    Ok(buf.len())
                }
            })
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The captured log of this thread, while it lives.
    pub struct Captured {
        buffer: Buffer,
    }

    impl Drop for Captured {
        fn drop(&mut self) {
            SINK.with(|s| *s.borrow_mut() = None);
        }
    }

    /// Captures this thread's log, as JSON at `info`. One global logger serves every
    /// test and routes each line to its thread's sink: a logger per thread
    /// (`set_default`) races with other threads over tracing's cached callsite interest,
    /// and then loses events now and then.
    pub fn json() -> Captured {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            let s = subscriber(LogFormat::Json, "info", || ThreadSink, false)
                .unwrap_or_else(|e| panic!("{e}"));
            // Nothing else in the unit tests installs a global logger.
            let _ = tracing::subscriber::set_global_default(s);
        });
        let buffer = Buffer::default();
        SINK.with(|s| *s.borrow_mut() = Some(buffer.clone()));
        Captured { buffer }
    }

    impl Captured {
        /// The lines logged so far, parsed, that carry an `event` field of `kind`;
        /// taken, so the next call sees only what came after.
        pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
            let bytes =
                std::mem::take(&mut *self.buffer.0.lock().unwrap_or_else(|e| e.into_inner()));
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|e| panic!("{e}: {l}"))
                })
                .filter(|v| v["fields"]["event"] == kind)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, level: &str) -> String {
        let buffer = Buffer::default();
        let keep = buffer.clone();
        let s = subscriber(format, level, move || keep.clone(), false).unwrap();
        tracing::subscriber::with_default(s, || {
            tracing::info!(
                event = "admin",
                service = "web",
                backend = "b1",
                disabled = true,
                "service web: backend b1 disabled"
            );
            tracing::debug!("not shown at info");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_carry_the_event_and_its_fields() {
        let text = logged(LogFormat::Json, "info");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["event"], "admin");
        assert_eq!(v["fields"]["backend"], "b1");
        assert_eq!(v["fields"]["disabled"], true);
        assert_eq!(v["fields"]["message"], "service web: backend b1 disabled");
    }

    #[test]
    fn text_lines_say_the_message_then_the_fields_and_levels_filter() {
        let text = logged(LogFormat::Text, "info");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("INFO"), "{text}");
        assert!(
            text.contains("service web: backend b1 disabled event=\"admin\""),
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "no colour codes off a terminal: {text}"
        );
        assert_eq!(logged(LogFormat::Text, "warn"), "");
        assert_eq!(logged(LogFormat::Text, "debug").lines().count(), 2);
    }

    #[test]
    fn a_bad_level_is_named() {
        let err = subscriber(LogFormat::Text, "info,=loud", std::io::stderr, false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--log-level"), "{err}");
    }
}
