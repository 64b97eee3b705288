//! The `bench` subcommand: instruction counts on the emulated Cortex-M4F, firmware memory per
//! network size, host training throughput per numeric format, the effect of early stop, and
//! the criterion results, written as `docs/PERFORMANCE.md` and a JSON report.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Args, Parser};
use fixedpc::network::{activities_len, errors_len, inference_ram_bytes, weights_len};
use fixedpc::{NumericFormat, Scalar, I16F16, I4F12};
use serde::Serialize;
use serde_json::json;

use crate::board;
use crate::board_bench;
use crate::cli::TrainArgs;
use crate::data::Dataset;
use crate::demo::{compare_on_board, quantise, BoardComparison};
use crate::export::write_file;
use crate::train::{self, Trained};

/// Options of `pcsim bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Training epochs per numeric format for the host throughput (the first epoch is left
    /// out of the median when there are several)
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Directory for the counting plugin, models and sample files
    #[arg(long, default_value = "target/pcsim-bench", value_name = "DIR")]
    out_dir: PathBuf,
    /// Markdown page to write
    #[arg(long, default_value = "docs/PERFORMANCE.md", value_name = "PATH")]
    markdown: PathBuf,
    /// Write every figure as JSON to this file
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Criterion output directory to copy host kernel timings from (skipped when absent)
    #[arg(long, default_value = "target/criterion", value_name = "DIR")]
    criterion_dir: PathBuf,
    /// Test samples the wide network runs on the emulated board (it needs about 10 times the
    /// instructions of the digits network per sample)
    #[arg(long, default_value_t = 100)]
    wide_test_samples: usize,
}

/// Parses `pcsim train` options, so the benchmarks use its defaults plus `extra`.
#[derive(Parser)]
struct TrainDefaults {
    #[command(flatten)]
    args: TrainArgs,
}

fn train_args(extra: &[&str]) -> TrainArgs {
    let mut argv = vec!["bench"];
    argv.extend_from_slice(extra);
    TrainDefaults::parse_from(argv).args
}

/// Host training throughput of one numeric format and training path.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Throughput {
    pub(crate) format: &'static str,
    /// `batched` (matrix-matrix products, `f32` only) or `per sample` (the core's path).
    pub(crate) path: &'static str,
    pub(crate) seconds_per_epoch: f64,
    pub(crate) samples_per_second: f64,
    pub(crate) test_accuracy: f64,
    pub(crate) epochs: usize,
}

/// Early stop against a fixed number of steps.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct EarlyStop {
    pub(crate) tolerance: Option<f64>,
    pub(crate) test_accuracy: f64,
    pub(crate) last_five_accuracy: f64,
    pub(crate) mean_training_steps: f64,
    pub(crate) mean_test_steps: f64,
    pub(crate) training_seconds: f64,
}

/// Firmware memory of one network and format.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Memory {
    pub(crate) network: String,
    pub(crate) format: &'static str,
    pub(crate) flash_bytes: u64,
    /// Bytes of the weights and their transposed copy, which the firmware keeps in flash.
    pub(crate) flash_weights_bytes: usize,
    pub(crate) static_ram_bytes: u64,
    /// `fixedpc::network::inference_ram_bytes`: the network's buffers in RAM.
    pub(crate) network_bytes: usize,
    /// Activities and errors, the state the firmware keeps in RAM.
    pub(crate) state_bytes: usize,
    pub(crate) stack_bytes: u64,
    pub(crate) test_samples: usize,
    pub(crate) bit_exact: bool,
    pub(crate) host_checksum: String,
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |count| count.get());
    let version = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .ok()
            .and_then(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("{program} not found"))
    };
    // Host timings depend on what else runs, so the page records the load at the start.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{cpu}, {cores} cores available to the process, 1-minute load average {load} at the \
         start; {}; {}",
        version("rustc"),
        version("qemu-system-arm")
    )
}

fn throughput<S: Scalar + Send + Sync>(
    epochs: usize,
    per_sample: bool,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<Throughput> {
    // The settings of the maintainers' JPC timing: tanh 64-64-64-10, batch 32, 20 inference
    // steps, Adam. Its learning rate is not recorded, and the timing does not depend on it.
    let epochs_arg = epochs.to_string();
    let mut extra = vec![
        "--act",
        "tanh",
        "--batch",
        "32",
        "--infer-steps",
        "20",
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--epochs",
        &epochs_arg,
    ];
    if per_sample {
        extra.push("--per-sample");
    }
    let args = train_args(&extra);
    let (spec, config) = args.spec_and_config(train_set)?;
    let path = if S::FORMAT == NumericFormat::F32 && !per_sample {
        "batched"
    } else {
        "per sample"
    };
    eprintln!("timing {} training ({path})", S::FORMAT.name());
    let trained = train::train::<S>(&spec, &config, train_set, test_set, |_| {})?;
    let timed = if trained.epochs.len() > 1 {
        &trained.epochs[1..]
    } else {
        &trained.epochs[..]
    };
    // The median, because a short epoch (0.02 s) that another process interrupts is an outlier.
    let mut times: Vec<f64> = timed.iter().map(|epoch| epoch.seconds).collect();
    times.sort_by(f64::total_cmp);
    let middle = times.len() / 2;
    let seconds = if times.len() % 2 == 1 {
        times[middle]
    } else {
        (times[middle - 1] + times[middle]) / 2.0
    };
    Ok(Throughput {
        format: S::FORMAT.name(),
        path,
        seconds_per_epoch: seconds,
        samples_per_second: train_set.len() as f64 / seconds,
        test_accuracy: trained
            .epochs
            .last()
            .map_or(0.0, |epoch| epoch.test_accuracy),
        epochs: trained.epochs.len(),
    })
}

fn early_stop(
    tolerance: Option<f64>,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<(EarlyStop, Trained<I16F16>)> {
    let tolerance_arg = tolerance.map(|t| t.to_string());
    let mut extra = Vec::new();
    if let Some(value) = &tolerance_arg {
        extra.extend(["--tolerance", value.as_str()]);
    }
    let args = train_args(&extra);
    let (spec, config) = args.spec_and_config(train_set)?;
    eprintln!("training i16f16 digits with tolerance {tolerance:?}");
    let trained = train::train::<I16F16>(&spec, &config, train_set, test_set, |_| {})?;
    let last = trained.epochs.last().context("training ran no epoch")?;
    let network = fixedpc::Network::new(spec.arch()?, &trained.weights, &trained.scalings)?;
    let (inputs, _) = train::convert_features::<I16F16>(test_set, spec.input_scale);
    let protocol = train::run_protocol(&network, &spec.inference(), &inputs, &test_set.labels)?;
    let last_five = &trained.epochs[trained.epochs.len().saturating_sub(5)..];
    let result = EarlyStop {
        tolerance,
        test_accuracy: last.test_accuracy,
        last_five_accuracy: last_five
            .iter()
            .map(|epoch| epoch.test_accuracy)
            .sum::<f64>()
            / last_five.len() as f64,
        mean_training_steps: last.mean_inference_steps,
        mean_test_steps: protocol.mean_steps,
        training_seconds: trained.epochs.iter().map(|epoch| epoch.seconds).sum(),
    };
    Ok((result, trained))
}

fn memory<S: Scalar>(
    network: &str,
    trained: &Trained<S>,
    test_set: &Dataset,
    out_dir: &Path,
) -> Result<Memory> {
    let comparison: BoardComparison = compare_on_board(
        network,
        trained,
        test_set,
        out_dir,
        &board::default_board_dir(),
    )?;
    let widths = &trained.spec.widths;
    let bytes = S::FORMAT.bytes();
    let state = (activities_len(widths) + errors_len(widths)) * bytes;
    Ok(Memory {
        network: network.to_string(),
        format: S::FORMAT.name(),
        flash_bytes: comparison.board.flash_bytes,
        flash_weights_bytes: 2 * weights_len(widths) * bytes,
        static_ram_bytes: comparison.board.ram_bytes,
        network_bytes: inference_ram_bytes(widths, bytes),
        state_bytes: state,
        stack_bytes: comparison.board.stack_bytes,
        test_samples: test_set.len(),
        bit_exact: comparison.bit_exact,
        host_checksum: format!("{:#010x}", comparison.host.checksum),
    })
}

/// Criterion's mean time per iteration of every benchmark under `dir`, in nanoseconds.
fn criterion_results(dir: &Path) -> Vec<(String, f64)> {
    let mut results = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && path.file_name().is_some_and(|name| name != "report") {
                pending.push(path);
            } else if path.ends_with("new/estimates.json") {
                let mean = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                    .and_then(|value| value["mean"]["point_estimate"].as_f64());
                let name = path
                    .parent()
                    .and_then(Path::parent)
                    .and_then(|bench| bench.strip_prefix(dir).ok())
                    .map(|relative| relative.display().to_string());
                if let (Some(name), Some(mean)) = (name, mean) {
                    results.push((name, mean));
                }
            }
        }
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    results
}

/// Runs `pcsim bench`.
pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    crate::cli::check_output_dir("--markdown", &args.markdown)?;
    if let Some(report) = &args.report {
        crate::cli::check_output_dir("--report", report)?;
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    board::check_prerequisites(&board::default_board_dir())?;
    let (train_set, test_set) = train_args(&[]).data.load()?;

    let counts = board_bench::measure(&board_bench::default_bench_dir(), &args.out_dir)?;

    let (fixed_steps, digits) = early_stop(None, &train_set, &test_set)?;
    let (early, _) = early_stop(Some(0.0005), &train_set, &test_set)?;
    let wide_args = train_args(&["--arch", "256,256", "--epochs", "1"]);
    let (wide_spec, wide_config) = wide_args.spec_and_config(&train_set)?;
    eprintln!("training the wide network for its memory figures");
    let wide = train::train::<I16F16>(&wide_spec, &wide_config, &train_set, &test_set, |_| {})?;
    let wide_test = test_set.head(args.wide_test_samples);
    let digits_dir = args.out_dir.join("digits");
    let wide_dir = args.out_dir.join("wide");
    std::fs::create_dir_all(&digits_dir)?;
    std::fs::create_dir_all(&wide_dir)?;
    let memories = vec![
        memory("digits", &digits, &test_set, &digits_dir)?,
        memory(
            "digits",
            &quantise::<I16F16, I4F12>(&digits).0,
            &test_set,
            &digits_dir,
        )?,
        memory("wide", &wide, &wide_test, &wide_dir)?,
        memory(
            "wide",
            &quantise::<I16F16, I4F12>(&wide).0,
            &wide_test,
            &wide_dir,
        )?,
    ];

    let throughputs = vec![
        throughput::<f32>(args.epochs, false, &train_set, &test_set)?,
        throughput::<f32>(args.epochs, true, &train_set, &test_set)?,
        throughput::<f64>(args.epochs, true, &train_set, &test_set)?,
        throughput::<I16F16>(args.epochs, true, &train_set, &test_set)?,
        throughput::<I4F12>(args.epochs, true, &train_set, &test_set)?,
    ];
    let criterion = criterion_results(&args.criterion_dir);
    let machine = machine_description();

    let page = crate::bench_page::render(&crate::bench_page::Figures {
        machine: &machine,
        counts: &counts,
        memories: &memories,
        throughputs: &throughputs,
        early: &[fixed_steps, early],
        criterion: &criterion,
    });
    write_file(&args.markdown, page.as_bytes())?;
    eprintln!("wrote {}", args.markdown.display());
    if let Some(path) = &args.report {
        let report = json!({
            "machine": machine,
            "board": counts,
            "memory": memories,
            "host_training": throughputs,
            "criterion_ns": criterion,
        });
        write_file(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    let exact = memories.iter().all(|memory| memory.bit_exact);
    Ok(if exact && counts.repeatable {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: a board run differed from the host, or two counting runs differed");
        ExitCode::FAILURE
    })
}
