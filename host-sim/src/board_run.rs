//! `pcsim board run`: any `I16F16` or `I4F12` model file on the emulated board, compared with
//! the host bit for bit on a test set.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use fixedpc::evaluate::{samples_encoded_len, write_samples};
use fixedpc::model::encoded_len;
use fixedpc::network::weights_len;
use fixedpc::{Arch, Model, Network, NumericFormat, Scalar, I16F16, I4F12};
use serde_json::json;

use crate::board;
use crate::cli::{check_output_dir, DataArgs};
use crate::data::input_error;
use crate::export::{read_model, write_file};
use crate::train;

/// Flash of the QEMU `mps2-an386` machine (`boards/qemu-m4/memory.x`).
const FLASH_BYTES: usize = 4 * 1024 * 1024;
/// Flash kept free for the firmware's code and constants.
// NOTE: an estimate with a margin. The firmware's code and constants took about 32 KB in a
// 4-layer run (241,992 bytes of flash, 210 KB of them model and samples).
const CODE_RESERVE_BYTES: usize = 128 * 1024;

/// Options of `pcsim board run`.
#[derive(Args)]
pub struct RunArgs {
    /// I16F16 or I4F12 model file written by `pcsim train --numeric i16f16` (or `i4f12`) or
    /// `pcsim sweep`
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Run only the first ROWS test rows [default: all that fit in the board's flash next to
    /// the model and the transposed copy of its weights, or next to the model alone when the
    /// copy leaves no room for them]
    #[arg(long, value_name = "ROWS")]
    pub test_rows: Option<usize>,
    /// Leave out the transposed copy of the weights, so that inference runs the transposed
    /// product, as the command does by itself when the copy leaves too little flash
    #[arg(long)]
    pub no_transposed_copy: bool,
    /// Seconds to wait for the firmware before stopping QEMU, at least 1
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Directory for the exported sample file
    #[arg(long, default_value = "target/pcsim-board-run", value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Board crate to build and run [default: boards/qemu-m4 of this repository]
    #[arg(long, value_name = "DIR")]
    pub board_dir: Option<PathBuf>,
    /// Write a JSON summary to this file
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
}

/// Runs `pcsim board run`.
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let board_dir = args
        .board_dir
        .clone()
        .unwrap_or_else(board::default_board_dir);
    let board_dir = board::check_prerequisites(&board_dir)?;
    if let Some(report) = &args.report {
        check_output_dir("--report", report)?;
    }
    if args.test_rows == Some(0) {
        return Err(input_error(
            "--test-rows 0 is invalid: it must be at least 1",
        ));
    }
    let bytes = read_model(&args.model)?;
    let model = Model::parse(&bytes)?;
    let header = model.header();
    match header.format {
        NumericFormat::I16F16 => run_format::<I16F16>(args, &model, &board_dir),
        NumericFormat::I4F12 => run_format::<I4F12>(args, &model, &board_dir),
        other => Err(input_error(format!(
            "{} is a {} model, and the board runs I16F16 and I4F12 models; train one with \
             --numeric i16f16 or --numeric i4f12",
            args.model.display(),
            other.name()
        ))),
    }
}

/// Runs `pcsim board run` for a model in format `S`.
fn run_format<S: Scalar>(args: &RunArgs, model: &Model<'_>, board_dir: &Path) -> Result<ExitCode> {
    let header = model.header();
    let format = S::FORMAT;
    let name = format.name();
    let mut widths = vec![0; header.depth + 1];
    model.widths_into(&mut widths)?;
    let (_, test_set) = args.data.load()?;
    if widths[0] != test_set.feature_count || widths[header.depth] != test_set.classes {
        return Err(input_error(format!(
            "the model takes {} features and has {} classes, the data set has {} and {}; pass \
             the --dataset the model was trained on",
            widths[0], widths[header.depth], test_set.feature_count, test_set.classes
        )));
    }

    let sample_bytes = samples_encoded_len(1, test_set.feature_count, format)
        - samples_encoded_len(0, test_set.feature_count, format);
    // The firmware embeds the model file, whose weights it reads in place, and next to it
    // their transposed copy as raw values, unless that copy leaves too little flash for the
    // test rows. `I4F12` weights of a model of even depth are not 4-byte aligned in the file,
    // so `build.rs` embeds them once more.
    let weights_bytes = weights_len(&widths) * format.bytes();
    let transposed_bytes = weights_bytes;
    let aligned_copy_bytes = if format == NumericFormat::I4F12 && header.depth % 2 == 0 {
        weights_bytes
    } else {
        0
    };
    let free = FLASH_BYTES
        .saturating_sub(CODE_RESERVE_BYTES)
        .saturating_sub(encoded_len(&widths, format))
        .saturating_sub(aligned_copy_bytes)
        .saturating_sub(samples_encoded_len(0, test_set.feature_count, format));
    let fit = free / sample_bytes;
    let fit_with_copy = free.saturating_sub(transposed_bytes) / sample_bytes;
    if let Some(requested) = args.test_rows {
        if requested > test_set.len() {
            eprintln!(
                "warning: --test-rows {requested} is more than the {} test rows; running all of \
                 them",
                test_set.len()
            );
        }
    }
    let requested_rows = args.test_rows.unwrap_or(test_set.len()).min(test_set.len());
    let transposed = !args.no_transposed_copy && fit_with_copy >= requested_rows.max(1);
    let rows = args
        .test_rows
        .unwrap_or(if transposed { fit_with_copy } else { fit })
        .min(test_set.len());
    if rows > fit {
        return Err(input_error(format!(
            "{rows} test rows of {sample_bytes} bytes and the model ({} bytes) do not fit in the \
             board's {FLASH_BYTES} bytes of flash; at most {fit} do, so pass --test-rows {fit} \
             or fewer",
            encoded_len(&widths, format)
        )));
    }
    if rows == 0 {
        return Err(input_error(format!(
            "{} ({} bytes) leaves no flash for test samples on this board: {FLASH_BYTES} bytes \
             of flash, of which {CODE_RESERVE_BYTES} are kept for code; train a smaller model",
            args.model.display(),
            encoded_len(&widths, format)
        )));
    }
    if !transposed && !args.no_transposed_copy {
        eprintln!(
            "leaving out the transposed copy of the weights ({transposed_bytes} bytes), so that \
             {rows} test rows fit in flash; inference runs the transposed product instead, with \
             the same results"
        );
    }
    if rows < test_set.len() && args.test_rows.is_none() {
        eprintln!(
            "running the first {rows} of {} test rows, the most that fit in flash next to the \
             model (--test-rows sets the count)",
            test_set.len()
        );
    }

    let arch = Arch::new(&widths, header.activation, header.skip)?;
    let mut weights = vec![S::ZERO; arch.weights_len()];
    let mut scalings = vec![S::ZERO; header.depth];
    model.weights_into(&mut weights)?;
    model.scalings_into(&mut scalings)?;
    let network = Network::new(arch, &weights, &scalings)?;
    let inference = model.inference_config::<S>()?;
    let scale = model.input_scale::<S>()?.to_f64();
    let (all_inputs, saturated) = train::convert_features::<S>(&test_set, scale);
    train::warn_saturated_inputs::<S>(saturated, scale);
    let inputs = &all_inputs[..rows * test_set.feature_count];
    let labels = &test_set.labels[..rows];

    eprintln!("running the test protocol on the host ({rows} samples)");
    let host = train::run_protocol(&network, &inference, inputs, labels)?;

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let samples_path = args.out_dir.join(format!("test-{name}.fps"));
    let label_codes: Vec<u32> = labels.iter().map(|&label| label as u32).collect();
    let mut sample_file = vec![0u8; samples_encoded_len(rows, test_set.feature_count, format)];
    write_samples(
        inputs,
        &label_codes,
        test_set.feature_count,
        &mut sample_file,
    )?;
    write_file(&samples_path, &sample_file)?;

    let board = board::run_qemu_m4_with_options(
        board_dir,
        &args.model,
        &samples_path,
        Some(args.timeout),
        transposed,
    )?;
    let bit_exact = board.checksum == host.checksum && board.predictions == host.predictions;
    let board_accuracy = board.correct as f64 / rows as f64;
    println!(
        "host {name}: test accuracy {:.4}, checksum {:#010x}",
        host.test_accuracy, host.checksum
    );
    println!(
        "board {name} ({}): test accuracy {board_accuracy:.4}, checksum {:#010x}",
        board.machine, board.checksum
    );
    println!(
        "bit-exact with the host: {}; {rows} samples, firmware flash {} bytes, static RAM {} \
         bytes",
        if bit_exact { "yes" } else { "NO" },
        board.flash_bytes,
        board.ram_bytes
    );
    if let Some(path) = &args.report {
        let report = json!({
            "model": args.model,
            "widths": widths,
            "test_rows": rows,
            "host": {
                "test_accuracy": host.test_accuracy,
                "protocol_checksum": format!("{:#010x}", host.checksum),
                "mean_inference_steps": host.mean_steps,
                "overflows": host.overflows,
            },
            "board": {
                "machine": board.machine,
                "test_accuracy": board_accuracy,
                "bit_exact": bit_exact,
                "protocol_checksum": format!("{:#010x}", board.checksum),
                "overflows": board.overflows,
                "flash_bytes": board.flash_bytes,
                "ram_bytes": board.ram_bytes,
            },
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
