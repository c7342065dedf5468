//! Daemon scaffolding, written once: logging set-up, reading a TOML config
//! file, printing an error with its whole source chain on one line, and
//! serving gRPC on a unix socket.
//!
//! A daemon's `main` calls [`init_tracing`], loads its config with
//! [`load_toml`], runs, and on failure logs [`chain`] of the error once, at the
//! top, so every start-up failure is one line that says what went wrong.

use std::path::{Path, PathBuf};

mod serve;

pub use serve::{Bound, ServeError, bind_unix, serve_unix, shutdown_signal};

use serde::de::DeserializeOwned;

/// Logs to stderr, level from `THINBOX_LOG` (default `info`), colour only on a terminal.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("THINBOX_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Renders an error and its sources as one line: `outer: inner: root cause`.
/// A source whose text the line already ends with (an error that prints its
/// source itself) is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Errors reading a config file. Each renders on one line with the file and,
/// for a parse error, the line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}, line {line}, column {column}: {message}")]
    Parse { path: PathBuf, line: usize, column: usize, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads and parses a TOML file into `T` (whose serde derive should say
/// `deny_unknown_fields`, so a mistyped key is an error, not a silent default).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_toml(path, &text)
}

/// [`load_toml`] on text already read.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        // toml's message may span lines; the config error is one line.
        let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
        ConfigError::Parse { path: path.to_owned(), line, column, message }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        #[serde(default)]
        pool: Pool,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Pool {
        backend: Option<String>,
    }

    #[test]
    fn unknown_key_is_one_line_with_its_position() {
        let e = parse_toml::<Cfg>(Path::new("/etc/t.toml"), "[pool]\nbackend = \"auto\"\n  bogus = 1\n").unwrap_err();
        let s = chain(&e);
        assert!(!s.contains('\n'), "{s}");
        assert!(s.starts_with("config /etc/t.toml, line 3, column 3: unknown field `bogus`, expected `backend`"), "{s}");
    }

    #[test]
    fn read_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_toml::<Cfg>(&dir.path().join("absent.toml")).unwrap_err();
        assert!(chain(&e).starts_with(&format!("read config {}/absent.toml: ", dir.path().display())), "{}", chain(&e));
    }

    #[test]
    fn chain_joins_sources() {
        let e = ConfigError::Read { path: "/x".into(), source: std::io::Error::other("boom") };
        assert_eq!(chain(&e), "read config /x: boom");
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] std::io::Error);
        assert_eq!(chain(&Repeats(std::io::Error::other("inner"))), "outer: inner", "a source already printed is not repeated");
    }
}
