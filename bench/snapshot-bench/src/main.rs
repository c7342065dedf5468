//! `thinbox-snapshot-bench`: see the library documentation and `--help`.

use std::process::ExitCode;

use clap::Parser;
use thinbox_snapshot_bench::{Cli, Outcome, main_with};

#[tokio::main]
async fn main() -> ExitCode {
    match main_with(Cli::parse()).await {
        Ok(Outcome::Complete(_)) => ExitCode::SUCCESS,
        Ok(Outcome::Partial(_)) => ExitCode::from(1),
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("thinbox-snapshot-bench: {e}");
            ExitCode::from(2)
        }
    }
}
