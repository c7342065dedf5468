//! `fio-bench`: see the library documentation and `--help`.

use std::process::ExitCode;

use clap::Parser;
use fio_bench::{Cli, Outcome, main_with};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("THINBOX_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    match main_with(Cli::parse()) {
        Ok(Outcome::Complete(_)) => ExitCode::SUCCESS,
        Ok(Outcome::Partial(_, failures)) => {
            eprintln!("fio-bench: {} problem(s):", failures.len());
            for f in failures {
                eprintln!("  {f}");
            }
            ExitCode::from(1)
        }
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("fio-bench: {}", fio_bench::chain(&e));
            ExitCode::from(2)
        }
    }
}
