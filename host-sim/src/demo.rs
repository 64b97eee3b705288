//! The `demo` subcommand: digits in f32 and i16f16, then the same i16f16 model on the
//! emulated board, compared with the host bit for bit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser};
use fixedpc::evaluate::{samples_encoded_len, write_samples};
use fixedpc::{Network, Scalar, I16F16};
use serde_json::json;

use crate::board::{self, BoardRun};
use crate::cli::TrainArgs;
use crate::data::Dataset;
use crate::export::{encode, print_epoch, write_file};
use crate::train::{self, ProtocolResult, Trained};

/// Options of `pcsim demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Passes over the 1000 training digits [default: 30, as `pcsim train`]
    #[arg(long)]
    epochs: Option<usize>,
    /// Seed of the initial weights and of the shuffling
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the exported model and test samples
    #[arg(long, default_value = "target/pcsim-demo", value_name = "DIR")]
    out_dir: PathBuf,
    /// Board crate to build and run [default: boards/qemu-m4 of this repository]
    #[arg(long, value_name = "DIR")]
    board_dir: Option<PathBuf>,
    /// Write a JSON summary to this file
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
}

/// Parses `pcsim train` options, so the demo uses the same defaults.
#[derive(Parser)]
struct TrainDefaults {
    #[command(flatten)]
    args: TrainArgs,
}

fn train_args(demo: &DemoArgs) -> TrainArgs {
    let mut argv = vec!["demo".to_string(), "--seed".into(), demo.seed.to_string()];
    if let Some(epochs) = demo.epochs {
        argv.extend(["--epochs".to_string(), epochs.to_string()]);
    }
    TrainDefaults::parse_from(argv).args
}

fn train_format<S: Scalar + Send + Sync>(
    args: &TrainArgs,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<Trained<S>> {
    let (spec, config) = args.spec_and_config(train_set)?;
    let name = S::FORMAT.name();
    eprintln!(
        "training {name} {:?} on {} digits",
        spec.widths,
        train_set.len()
    );
    train::train::<S>(&spec, &config, train_set, test_set, |report| {
        print_epoch(name, config.epochs, report)
    })
}

fn host_protocol(trained: &Trained<I16F16>, test_set: &Dataset) -> Result<ProtocolResult> {
    let arch = trained.spec.arch()?;
    let network = Network::new(arch, &trained.weights, &trained.scalings)?;
    let (inputs, _) = train::convert_features::<I16F16>(test_set, trained.spec.input_scale);
    train::run_protocol(
        &network,
        &trained.spec.inference(),
        &inputs,
        &test_set.labels,
    )
}

fn export_samples(
    trained: &Trained<I16F16>,
    test_set: &Dataset,
    path: &std::path::Path,
) -> Result<()> {
    let (inputs, _) = train::convert_features::<I16F16>(test_set, trained.spec.input_scale);
    let labels: Vec<u32> = test_set.labels.iter().map(|&label| label as u32).collect();
    let len = samples_encoded_len(labels.len(), test_set.feature_count, I16F16::FORMAT);
    let mut bytes = vec![0u8; len];
    write_samples(&inputs, &labels, test_set.feature_count, &mut bytes)?;
    write_file(path, &bytes)
}

fn last_accuracy<S>(trained: &Trained<S>) -> f64 {
    trained
        .epochs
        .last()
        .map_or(0.0, |epoch| epoch.test_accuracy)
}

/// Runs `pcsim demo`.
pub fn run(demo: &DemoArgs) -> Result<ExitCode> {
    let args = train_args(demo);
    let board_dir = demo
        .board_dir
        .clone()
        .unwrap_or_else(board::default_board_dir);
    let board_dir = board::check_prerequisites(&board_dir)?;
    if let Some(report) = &demo.report {
        crate::cli::check_output_dir("--report", report)?;
    }
    let (train_set, test_set) = args.data.load()?;

    let float = train_format::<f32>(&args, &train_set, &test_set)?;
    let fixed = train_format::<I16F16>(&args, &train_set, &test_set)?;
    let host = host_protocol(&fixed, &test_set)?;

    std::fs::create_dir_all(&demo.out_dir)
        .with_context(|| format!("cannot create {}", demo.out_dir.display()))?;
    let model_path = demo.out_dir.join("digits-i16f16.fpc");
    let samples_path = demo.out_dir.join("digits-test-i16f16.fps");
    write_file(&model_path, &encode(&fixed)?)?;
    export_samples(&fixed, &test_set, &samples_path)?;
    eprintln!(
        "exported {} and {}",
        model_path.display(),
        samples_path.display()
    );

    let board = board::run_qemu_m4(&board_dir, &model_path, &samples_path)?;
    let bit_exact = board.checksum == host.checksum && board.predictions == host.predictions;
    let board_accuracy = board.correct as f64 / test_set.len() as f64;

    print_table(
        last_accuracy(&float),
        &host,
        &board,
        board_accuracy,
        bit_exact,
    );
    if let Some(path) = &demo.report {
        let report = json!({
            "data": {"train_rows": train_set.len(), "test_rows": test_set.len()},
            "f32": {"test_accuracy": last_accuracy(&float), "epochs": float.epochs},
            "i16f16": {
                "test_accuracy": last_accuracy(&fixed),
                "protocol_checksum": format!("{:#010x}", host.checksum),
                "mean_inference_steps": host.mean_steps,
                "epochs": fixed.epochs,
            },
            "board": {
                "machine": board.machine,
                "test_accuracy": board_accuracy,
                "bit_exact": bit_exact,
                "protocol_checksum": format!("{:#010x}", board.checksum),
                "flash_bytes": board.flash_bytes,
                "ram_bytes": board.ram_bytes,
            },
            "network": fixed.spec,
        });
        write_file(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }

    if bit_exact {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: the board's results differ from the host's: checksum {:#010x} on the \
             board, {:#010x} on the host",
            board.checksum, host.checksum
        );
        Ok(ExitCode::FAILURE)
    }
}

fn print_table(
    f32_accuracy: f64,
    host: &ProtocolResult,
    board: &BoardRun,
    board_accuracy: f64,
    bit_exact: bool,
) {
    println!();
    println!("| run                          | test accuracy | checksum   |");
    println!("|------------------------------|---------------|------------|");
    println!("| host f32                     | {f32_accuracy:>13.4} |            |");
    println!(
        "| host i16f16                  | {:>13.4} | {:#010x} |",
        host.test_accuracy, host.checksum
    );
    println!(
        "| board i16f16 ({})    | {board_accuracy:>13.4} | {:#010x} |",
        board.machine, board.checksum
    );
    println!();
    println!(
        "bit-exact with the host: {}",
        if bit_exact { "yes" } else { "NO" }
    );
    println!(
        "firmware flash {} bytes, static RAM {} bytes",
        board.flash_bytes, board.ram_bytes
    );
}
