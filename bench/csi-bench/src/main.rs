//! `thinbox-csi-bench`: see the library documentation and `--help`.

use std::process::ExitCode;

use clap::Parser;
use thinbox_csi_bench::{Cli, Error, main_with};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("THINBOX_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match main_with(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Interrupted) => ExitCode::from(130),
        Err(e) => {
            tracing::error!(error = %e, "thinbox-csi-bench failed");
            ExitCode::FAILURE
        }
    }
}
