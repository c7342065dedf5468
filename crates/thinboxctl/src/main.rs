//! `thinboxctl [--address SOCK] [--json] [--timeout SECS] <status|devices|check|gc|host>`,
//! `thinboxctl gc --containerd [SOCK] [--snapshotter NAME] [--dry-run] [--min-age SECS]`:
//! see the library documentation and `--help`.

use std::process::ExitCode;

use clap::Parser;
use thinboxctl::{Cli, EXIT_ERROR, ask, render::render};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(thinboxctl::Error::Runtime).and_then(|rt| {
        let answer = rt.block_on(ask(&cli))?;
        render(&answer, cli.json, &mut std::io::stdout().lock(), &mut std::io::stderr().lock())
    });
    match result {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("thinboxctl: {}", thinbox_daemon::chain(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}
