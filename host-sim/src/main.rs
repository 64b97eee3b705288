//! `pcsim`: trains, evaluates and exports fixedpc networks, and runs them on boards.

use std::process::ExitCode;

use clap::Parser;
use fixedpc_host_sim::cli::{Cli, Command};
use fixedpc_host_sim::data::InputError;
use fixedpc_host_sim::{bench, check, demo, export, learn, sweep};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => export::run_train(&args),
        Command::Eval(args) => export::run_eval(&args.model, &args.data, args.report.as_deref()),
        Command::Demo(args) => demo::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Board(command) => learn::run(&command),
        Command::Bench(args) => bench::run(&args),
        Command::Sweep(args) => sweep::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.chain().any(|cause| cause.is::<InputError>()) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
