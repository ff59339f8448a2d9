//! The process's logger: `env_logger` (`RUST_LOG`, default `info`), with one change. actix-http
//! logs at ERROR every request it cannot parse (a URL over 64 KiB, a head over 128 KiB, bytes
//! that are not HTTP) and answers it by itself, before any of our code runs; so any client
//! could write an ERROR line per request. Those lines are logged at DEBUG instead. Every other
//! record is passed on as it is.

use std::io::Write;
use std::sync::OnceLock;

use log::{Level, Log, Metadata, Record};

/// The node's id, once it serves on a shared Redis: every line then says which node wrote it.
static NODE: OnceLock<String> = OnceLock::new();

/// Names the node in every log line from now on (`--node-id`, section 10).
pub fn set_node(id: &str) {
    let _ = NODE.set(id.to_string());
}

/// The target and message start of actix-http's log line for a request it could not parse.
const PARSE_ERROR_TARGET: &str = "actix_http::h1::dispatcher";
const PARSE_ERROR_PREFIX: &str = "stream error: request parse error";

struct Logger {
    inner: env_logger::Logger,
}

/// True for actix-http's ERROR about a request it could not parse: the client's fault.
fn is_client_parse_error(record: &Record<'_>) -> bool {
    record.level() == Level::Error
        && record.target() == PARSE_ERROR_TARGET
        && record.args().to_string().starts_with(PARSE_ERROR_PREFIX)
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !is_client_parse_error(record) {
            self.inner.log(record);
            return;
        }
        let demoted = Record::builder()
            .args(*record.args())
            .level(Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.inner.enabled(demoted.metadata()) {
            self.inner.log(&demoted);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger; a second call does nothing.
pub fn init() {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let ts = buf.timestamp();
            match NODE.get() {
                Some(node) => writeln!(
                    buf,
                    "[{ts} {:<5} {node} {}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
                None => writeln!(
                    buf,
                    "[{ts} {:<5} {}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
            }
        })
        .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Logger { inner })).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_is_parse_error(level: Level, target: &str, message: &str) -> bool {
        is_client_parse_error(
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{message}"))
                .build(),
        )
    }

    #[test]
    fn only_actix_parse_errors_are_demoted() {
        let msg = "stream error: request parse error: URI error: uri too long";
        assert!(record_is_parse_error(Level::Error, PARSE_ERROR_TARGET, msg));
        assert!(!record_is_parse_error(Level::Warn, PARSE_ERROR_TARGET, msg));
        assert!(!record_is_parse_error(
            Level::Error,
            "agentcast::server",
            msg
        ));
        assert!(!record_is_parse_error(
            Level::Error,
            PARSE_ERROR_TARGET,
            "stream error: upgrade error"
        ));
    }
}
