//! The `demo` subcommand: digits in f32 and i16f16, then the i16f16 model and its 16-bit
//! `I4F12` quantisation on the emulated board, each compared with the host bit for bit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser};
use fixedpc::evaluate::{samples_encoded_len, write_samples};
use fixedpc::{Network, Scalar, I16F16, I4F12};
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

fn host_protocol<S: Scalar>(trained: &Trained<S>, test_set: &Dataset) -> Result<ProtocolResult> {
    let arch = trained.spec.arch()?;
    let network = Network::new(arch, &trained.weights, &trained.scalings)?;
    let (inputs, _) = train::convert_features::<S>(test_set, trained.spec.input_scale);
    train::run_protocol(
        &network,
        &trained.spec.inference(),
        &inputs,
        &test_set.labels,
    )
}

fn export_samples<S: Scalar>(
    trained: &Trained<S>,
    test_set: &Dataset,
    path: &std::path::Path,
) -> Result<()> {
    let (inputs, _) = train::convert_features::<S>(test_set, trained.spec.input_scale);
    let labels: Vec<u32> = test_set.labels.iter().map(|&label| label as u32).collect();
    let len = samples_encoded_len(labels.len(), test_set.feature_count, S::FORMAT);
    let mut bytes = vec![0u8; len];
    write_samples(&inputs, &labels, test_set.feature_count, &mut bytes)?;
    write_file(path, &bytes)
}

/// Host and board results of one model.
pub(crate) struct BoardComparison {
    pub(crate) host: ProtocolResult,
    pub(crate) board: BoardRun,
    pub(crate) board_accuracy: f64,
    pub(crate) bit_exact: bool,
}

/// Exports a model and the test set in its format into `out_dir` (as `NETWORK-FORMAT.fpc` and
/// `NETWORK-test-FORMAT.fps`), runs the test protocol on the host and on the emulated board,
/// and compares the two.
pub(crate) fn compare_on_board<S: Scalar>(
    network: &str,
    trained: &Trained<S>,
    test_set: &Dataset,
    out_dir: &std::path::Path,
    board_dir: &std::path::Path,
) -> Result<BoardComparison> {
    let host = host_protocol(trained, test_set)?;
    let name = S::FORMAT.name();
    let model_path = out_dir.join(format!("{network}-{name}.fpc"));
    let samples_path = out_dir.join(format!("{network}-test-{name}.fps"));
    write_file(&model_path, &encode(trained)?)?;
    export_samples(trained, test_set, &samples_path)?;
    eprintln!(
        "exported {} and {}",
        model_path.display(),
        samples_path.display()
    );
    let board = board::run_qemu_m4(board_dir, &model_path, &samples_path)?;
    let bit_exact = board.checksum == host.checksum && board.predictions == host.predictions;
    let board_accuracy = board.correct as f64 / test_set.len() as f64;
    Ok(BoardComparison {
        host,
        board,
        board_accuracy,
        bit_exact,
    })
}

/// Rounds every weight and scaling of a trained network to format `T`.
pub(crate) fn quantise<S: Scalar, T: Scalar>(trained: &Trained<S>) -> (Trained<T>, u32) {
    let mut overflows = 0;
    let mut convert = |values: &[S]| -> Vec<T> {
        values
            .iter()
            .map(|value| T::from_f64_rounded(value.to_f64(), &mut overflows))
            .collect()
    };
    let weights = convert(&trained.weights);
    let scalings = convert(&trained.scalings);
    let quantised = Trained {
        spec: trained.spec.clone(),
        weights,
        scalings,
        epochs: Vec::new(),
    };
    (quantised, overflows)
}

fn comparison_json(comparison: &BoardComparison) -> serde_json::Value {
    json!({
        "host_test_accuracy": comparison.host.test_accuracy,
        "host_protocol_checksum": format!("{:#010x}", comparison.host.checksum),
        "mean_inference_steps": comparison.host.mean_steps,
        "board": {
            "machine": comparison.board.machine,
            "test_accuracy": comparison.board_accuracy,
            "bit_exact": comparison.bit_exact,
            "protocol_checksum": format!("{:#010x}", comparison.board.checksum),
            "flash_bytes": comparison.board.flash_bytes,
            "ram_bytes": comparison.board.ram_bytes,
            "stack_bytes": comparison.board.stack_bytes,
        },
    })
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
    std::fs::create_dir_all(&demo.out_dir)
        .with_context(|| format!("cannot create {}", demo.out_dir.display()))?;
    let wide = compare_on_board("digits", &fixed, &test_set, &demo.out_dir, &board_dir)?;
    let (narrow_model, saturated) = quantise::<I16F16, I4F12>(&fixed);
    if saturated > 0 {
        eprintln!("warning: {saturated} weights or scalings saturated when rounded to i4f12");
    }
    let narrow = compare_on_board(
        "digits",
        &narrow_model,
        &test_set,
        &demo.out_dir,
        &board_dir,
    )?;

    print_table(last_accuracy(&float), &wide, &narrow);
    if let Some(path) = &demo.report {
        let mut i16f16 = comparison_json(&wide);
        i16f16["test_accuracy"] = json!(last_accuracy(&fixed));
        i16f16["epochs"] = json!(fixed.epochs);
        let report = json!({
            "data": {"train_rows": train_set.len(), "test_rows": test_set.len()},
            "f32": {"test_accuracy": last_accuracy(&float), "epochs": float.epochs},
            "i16f16": i16f16,
            "i4f12_quantised": comparison_json(&narrow),
            "network": fixed.spec,
        });
        write_file(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }

    let mut success = true;
    for comparison in [&wide, &narrow] {
        if !comparison.bit_exact {
            eprintln!(
                "error: the board's results differ from the host's: checksum {:#010x} on the \
                 board, {:#010x} on the host",
                comparison.board.checksum, comparison.host.checksum
            );
            success = false;
        }
    }
    Ok(if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(f32_accuracy: f64, wide: &BoardComparison, narrow: &BoardComparison) {
    let machine = wide.board.machine;
    println!();
    println!("| run                          | test accuracy | checksum   |");
    println!("|------------------------------|---------------|------------|");
    println!("| host f32                     | {f32_accuracy:>13.4} |            |");
    for (name, comparison) in [("i16f16", wide), ("i4f12 ", narrow)] {
        println!(
            "| host {name}                  | {:>13.4} | {:#010x} |",
            comparison.host.test_accuracy, comparison.host.checksum
        );
        println!(
            "| board {name} ({machine})    | {:>13.4} | {:#010x} |",
            comparison.board_accuracy, comparison.board.checksum
        );
    }
    println!();
    for (name, comparison) in [("i16f16", wide), ("i4f12", narrow)] {
        println!(
            "{name}: bit-exact with the host: {}; firmware flash {} bytes, static RAM {} bytes, \
             stack {} bytes",
            if comparison.bit_exact { "yes" } else { "NO" },
            comparison.board.flash_bytes,
            comparison.board.ram_bytes,
            comparison.board.stack_bytes
        );
    }
}
