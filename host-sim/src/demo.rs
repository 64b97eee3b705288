//! The `demo` subcommand: digits in f32 and i16f16, then the emulated board.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

/// Options of `pcsim demo`.
#[derive(Args)]
pub struct DemoArgs {}

/// Runs `pcsim demo`.
pub fn run(_args: &DemoArgs) -> Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
