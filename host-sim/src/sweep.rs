//! The `sweep` subcommand: test accuracy against depth for muPC and SP networks, in floating
//! and fixed point, written as a markdown table, a JSON file and a PNG plot.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use fixedpc::{Activation, ActivityRounding, Parameterisation, Scalar, I16F16, I4F12};
use serde::Serialize;

use crate::cli::{check_output_dir, parse_rounding, DataArgs, Numeric};
use crate::data::{input_error, Dataset};
use crate::export::{encode, write_file};
use crate::plot;
use crate::train::{self, Diverged, EpochReport, NetworkSpec, OptimizerKind, TrainConfig};

/// Begins the block of a markdown file that `--doc` replaces.
pub const DOC_BEGIN: &str = "<!-- pcsim sweep: begin -->";
/// Ends the block of a markdown file that `--doc` replaces.
pub const DOC_END: &str = "<!-- pcsim sweep: end -->";

/// A parameterisation with or without identity skips.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Family {
    /// muPC with identity skips on the hidden-to-hidden layers.
    #[value(name = "mupc-skip")]
    #[serde(rename = "mupc-skip")]
    MupcSkip,
    /// Standard parameterisation with identity skips.
    #[value(name = "sp-skip")]
    #[serde(rename = "sp-skip")]
    SpSkip,
    /// Standard parameterisation without skips.
    #[value(name = "sp")]
    #[serde(rename = "sp")]
    Sp,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::MupcSkip => "muPC + skips",
            Family::SpSkip => "SP + skips",
            Family::Sp => "SP, no skips",
        }
    }

    fn parameterisation(self) -> Parameterisation {
        match self {
            Family::MupcSkip => Parameterisation::MuPc,
            Family::SpSkip | Family::Sp => Parameterisation::Sp,
        }
    }

    fn skip(self) -> bool {
        self != Family::Sp
    }
}

/// Options of `pcsim sweep`.
#[derive(Args, Clone, Debug)]
pub struct SweepArgs {
    /// Data set, as for `pcsim train`
    #[arg(long, default_value = "mnist", value_name = "NAME|PATH")]
    dataset: String,
    /// Numbers of weight layers to train, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8,16,32,64,128",
        value_name = "LIST"
    )]
    depths: Vec<usize>,
    /// Neurons in every hidden layer
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Parameterisations, comma-separated: mupc-skip, sp-skip, sp
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "mupc-skip,sp-skip,sp"
    )]
    families: Vec<Family>,
    /// Numeric formats, comma-separated
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,i16f16")]
    numerics: Vec<Numeric>,
    /// Activations, comma-separated: relu, tanh and the others of `pcsim train --act`
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "relu",
        value_parser = parse_activation,
        value_name = "LIST"
    )]
    acts: Vec<Activation>,
    /// Passes over the training rows of each run
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Samples per Adam step
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Adam learning rate of the muPC networks
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Adam learning rate of the SP networks; at 0.1 even 2-layer SP networks collapse
    #[arg(long, default_value_t = 0.01)]
    sp_lr: f64,
    /// Batch-averaged inference step (JPC's convention); each sample takes this divided by
    /// --batch [default: 0.5 for relu and other activations, 1.0 for tanh]
    #[arg(long, value_name = "STEP")]
    batch_infer_rate: Option<f64>,
    /// Rounding of activity updates in fixed point, as for `pcsim train`
    #[arg(long, default_value = "stochastic", value_parser = parse_rounding)]
    activity_rounding: ActivityRounding,
    /// Factor applied to every raw feature [default: 0.012728 for mnist, which gives its pixels
    /// a root mean square of about 1.09; 1 / the largest absolute training feature otherwise]
    #[arg(long)]
    input_scale: Option<f64>,
    /// Use only the first ROWS training rows [default: all]
    #[arg(long, value_name = "ROWS")]
    train_rows: Option<usize>,
    /// Use only the first ROWS test rows [default: all]
    #[arg(long, value_name = "ROWS")]
    test_rows: Option<usize>,
    /// Runs trained at the same time; each gets the machine's cores divided by JOBS as
    /// threads, at least one
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Seeds of the initial weights and of the shuffling, comma-separated non-negative
    /// integers. Each muPC network is trained once per seed, and the accuracy table gives the
    /// mean. SP networks use the first seed only. Model files of the other seeds end in
    /// -seedN
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3",
        value_parser = parse_seed,
        allow_hyphen_values = true,
        value_name = "LIST"
    )]
    seeds: Vec<u64>,
    /// Directory for the models, the JSON results, the table and the plot
    #[arg(long, default_value = "target/deep-sweep", value_name = "DIR")]
    out_dir: PathBuf,
    /// PNG plot of test accuracy against depth [default: OUT_DIR/deep-sweep.png]
    #[arg(long, value_name = "PATH")]
    plot: Option<PathBuf>,
    /// Markdown file whose block between the `pcsim sweep: begin` and `end` comments is
    /// replaced by the result tables
    #[arg(long, value_name = "PATH")]
    doc: Option<PathBuf>,
    /// TrueType font for the plot's text [default: DejaVu Sans from the usual system paths;
    /// without a font the plot has no text]
    #[arg(long, value_name = "PATH")]
    font: Option<PathBuf>,
    /// A sweep of seconds for CI: depths 2,3,4, width 16, 300 training and 200 test rows, one
    /// epoch; it cannot be combined with --depths, --width, --epochs, --train-rows or
    /// --test-rows
    #[arg(
        long,
        conflicts_with_all = ["depths", "width", "epochs", "train_rows", "test_rows"]
    )]
    quick: bool,
}

fn parse_seed(text: &str) -> Result<u64, String> {
    text.parse().map_err(|_| {
        format!(
            "'{text}' is invalid: expected non-negative integers, comma-separated, such as 1,2,3"
        )
    })
}

fn parse_activation(name: &str) -> Result<Activation, String> {
    Activation::from_name(name).ok_or_else(|| {
        let names: Vec<_> = Activation::ALL.iter().map(|act| act.name()).collect();
        format!(
            "unknown activation '{name}'; expected one of {}",
            names.join(", ")
        )
    })
}

/// One network of the sweep.
#[derive(Clone, Copy, Debug, Serialize)]
struct RunSpec {
    family: Family,
    depth: usize,
    seed: u64,
    #[serde(serialize_with = "serialize_numeric")]
    numeric: Numeric,
    #[serde(serialize_with = "serialize_activation")]
    act: Activation,
}

fn serialize_numeric<S: serde::Serializer>(numeric: &Numeric, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(numeric_name(*numeric))
}

fn serialize_activation<S: serde::Serializer>(act: &Activation, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(act.name())
}

fn numeric_name(numeric: Numeric) -> &'static str {
    match numeric {
        Numeric::F32 => "f32",
        Numeric::F64 => "f64",
        Numeric::I16f16 => "i16f16",
        Numeric::I4f12 => "i4f12",
    }
}

impl RunSpec {
    fn label(&self) -> String {
        format!(
            "{} {} depth {} {} seed {}",
            self.family.name(),
            self.act.name(),
            self.depth,
            numeric_name(self.numeric),
            self.seed
        )
    }

    /// Returns the name of the model file. Runs with the first seed get no seed suffix, so
    /// scripts find them whatever `--seeds` was.
    fn file_stem(&self, first_seed: u64) -> String {
        let family = match self.family {
            Family::MupcSkip => "mupc-skip",
            Family::SpSkip => "sp-skip",
            Family::Sp => "sp",
        };
        let stem = format!(
            "{family}-{}-d{}-{}",
            self.act.name(),
            self.depth,
            numeric_name(self.numeric)
        );
        if self.seed == first_seed {
            stem
        } else {
            format!("{stem}-seed{}", self.seed)
        }
    }

    /// Returns whether `other` is the same network and format, perhaps with another seed.
    fn same_cell(&self, other: &RunSpec) -> bool {
        self.family == other.family
            && self.depth == other.depth
            && self.numeric == other.numeric
            && self.act == other.act
    }
}

/// Outcome of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
enum Status {
    /// Trained without saturation and with an output that depends on the input.
    Trained,
    /// Fixed-point results saturated in the last epoch (count of saturated results).
    Saturated { count: u64 },
    /// The output hardly depends on the input.
    Collapsed,
    /// A floating-point run whose activities grew beyond the `I16F16` range.
    Exploded { max_abs_activity: f64 },
    /// The energy or the weights became NaN or infinite in this epoch.
    Diverged { epoch: usize },
    /// The run failed for another reason.
    Failed { message: String },
}

/// Result of one run.
#[derive(Clone, Debug, Serialize)]
struct RunResult {
    #[serde(flatten)]
    spec: RunSpec,
    status: Status,
    /// Test accuracy after the last finished epoch.
    test_accuracy: Option<f64>,
    /// Mean wall-clock seconds per epoch of training.
    seconds_per_epoch: Option<f64>,
    /// Per-epoch figures, with per-layer saturation counts and activity ranges.
    epochs: Vec<EpochReport>,
}

impl RunResult {
    fn last_epoch(&self) -> Option<&EpochReport> {
        self.epochs.last()
    }

    /// Table cell: accuracy with the status when it is not a clean run.
    fn cell(&self) -> String {
        let accuracy = self
            .test_accuracy
            .map_or("-".to_string(), |value| format!("{value:.4}"));
        match &self.status {
            Status::Trained => accuracy,
            Status::Saturated { count } => format!("{accuracy} (saturated: {count})"),
            Status::Collapsed => format!("{accuracy} (collapsed)"),
            Status::Exploded { max_abs_activity } => {
                format!("{accuracy} (exploded: max abs z {max_abs_activity:.1e})")
            }
            Status::Diverged { epoch } => format!("diverged (epoch {epoch})"),
            Status::Failed { .. } => "failed".to_string(),
        }
    }
}

/// Settings shared by every run of a sweep.
struct Plan {
    width: usize,
    epochs: usize,
    batch: usize,
    lr: f64,
    sp_lr: f64,
    batch_infer_rate: Option<f64>,
    input_scale: f64,
    rounding: ActivityRounding,
    seeds: Vec<u64>,
    threads_per_run: usize,
    out_dir: PathBuf,
}

impl Plan {
    fn infer_rate(&self, act: Activation) -> f64 {
        let batch_rate = self.batch_infer_rate.unwrap_or(match act {
            Activation::Tanh => 1.0,
            _ => 0.5,
        });
        batch_rate / self.batch as f64
    }

    fn spec(&self, run: &RunSpec, train_set: &Dataset) -> NetworkSpec {
        let mut widths = vec![train_set.feature_count];
        widths.extend(std::iter::repeat_n(self.width, run.depth - 1));
        widths.push(train_set.classes);
        NetworkSpec {
            widths,
            activation: run.act,
            parameterisation: run.family.parameterisation(),
            skip: run.family.skip(),
            input_scale: self.input_scale,
            infer_steps: (run.depth - 1) as u32,
            infer_rate: self.infer_rate(run.act),
            tolerance: None,
            rounding: self.rounding,
        }
    }

    fn config(&self, run: &RunSpec) -> TrainConfig {
        let learning_rate = match run.family.parameterisation() {
            Parameterisation::MuPc => self.lr,
            Parameterisation::Sp => self.sp_lr,
        };
        TrainConfig {
            epochs: self.epochs,
            batch: self.batch,
            learning_rate,
            optimizer: OptimizerKind::Adam,
            seed: run.seed,
            threads: self.threads_per_run,
            // The same code path for every format, so the sweep compares formats, not paths.
            per_sample: true,
        }
    }
}

/// Input scale `1 / (255 * 0.3081)` for MNIST pixels (0 to 255): it divides them by 255 times
/// the MNIST pixel standard deviation. On the 8000 bundled training images the pixel mean is
/// 0.131 and the standard deviation 0.309 (0-to-1 scale), so the scaled pixels have a root
/// mean square of 1.09.
pub const MNIST_UNIT_RMS_SCALE: f64 = 0.012728;

fn validate(args: &SweepArgs) -> Result<()> {
    if let Some(depth) = args.depths.iter().find(|&&depth| depth < 2) {
        return Err(input_error(format!(
            "--depths: {depth} is invalid: a sweep network needs at least 2 weight layers"
        )));
    }
    for (name, value) in [
        ("--width", args.width),
        ("--epochs", args.epochs),
        ("--batch", args.batch),
        ("--jobs", args.jobs),
    ] {
        if value == 0 {
            return Err(input_error(format!(
                "{name} 0 is invalid: it must be at least 1"
            )));
        }
    }
    let rates = [
        ("--lr", Some(args.lr)),
        ("--sp-lr", Some(args.sp_lr)),
        ("--batch-infer-rate", args.batch_infer_rate),
    ];
    for (name, value) in rates {
        if let Some(value) = value {
            if !(value.is_finite() && value > 0.0) {
                return Err(input_error(format!(
                    "{name} {value} is invalid: it must be a finite number above 0"
                )));
            }
        }
    }
    reject_repeats("--seeds", "seed", &args.seeds, u64::to_string)?;
    reject_repeats("--depths", "depth", &args.depths, usize::to_string)?;
    reject_repeats("--families", "family", &args.families, value_name)?;
    reject_repeats("--numerics", "format", &args.numerics, value_name)?;
    reject_repeats("--acts", "activation", &args.acts, |act| {
        act.name().to_string()
    })?;
    if let Some(scale) = args.input_scale {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(input_error(format!(
                "--input-scale {scale} is invalid: it must be a finite number above 0"
            )));
        }
    }
    for (name, rows) in [
        ("--train-rows", args.train_rows),
        ("--test-rows", args.test_rows),
    ] {
        if rows == Some(0) {
            return Err(input_error(format!(
                "{name} 0 is invalid: it must be at least 1"
            )));
        }
    }
    Ok(())
}

/// Rejects a list option that names a value twice, which would train the same runs twice.
fn reject_repeats<T: PartialEq>(
    option: &str,
    noun: &str,
    values: &[T],
    name: impl Fn(&T) -> String,
) -> Result<()> {
    let repeat = values
        .iter()
        .enumerate()
        .find(|&(index, value)| values[..index].contains(value));
    match repeat {
        Some((index, value)) => Err(input_error(format!(
            "{option}: {} appears twice (position {}); give each {noun} once",
            name(value),
            index + 1
        ))),
        None => Ok(()),
    }
}

/// Returns the command-line name of an option value.
fn value_name<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |value| value.get_name().to_string())
}

/// Applies `--quick`.
fn effective_args(args: &SweepArgs) -> SweepArgs {
    let mut args = args.clone();
    if args.quick {
        args.depths = vec![2, 3, 4];
        args.width = 16;
        args.epochs = 1;
        args.train_rows = Some(300);
        args.test_rows = Some(200);
    }
    args
}

/// Keeps the first `rows` rows of a data set.
fn first_rows(data: Dataset, rows: Option<usize>) -> Dataset {
    match rows {
        Some(rows) if rows < data.len() => {
            let width = data.feature_count;
            Dataset {
                features: data.features[..rows * width].to_vec(),
                labels: data.labels[..rows].to_vec(),
                feature_count: width,
                classes: data.classes,
            }
        }
        _ => data,
    }
}

/// Lists every run of the sweep: each muPC network once per seed, each SP network once.
fn run_specs(args: &SweepArgs) -> Vec<RunSpec> {
    let mut runs = Vec::new();
    for &act in &args.acts {
        for &depth in &args.depths {
            for &family in &args.families {
                let seeds = match family.parameterisation() {
                    Parameterisation::MuPc => &args.seeds[..],
                    Parameterisation::Sp => &args.seeds[..1],
                };
                for &numeric in &args.numerics {
                    for &seed in seeds {
                        runs.push(RunSpec {
                            family,
                            depth,
                            seed,
                            numeric,
                            act,
                        });
                    }
                }
            }
        }
    }
    runs
}

/// Runs `pcsim sweep`.
pub fn run(args: &SweepArgs) -> Result<ExitCode> {
    let args = effective_args(args);
    validate(&args)?;
    if let Some(doc) = &args.doc {
        // Check the markers before hours of training, not after.
        doc_block(doc)?;
    }
    let font = plot::load_font(args.font.as_deref())?;
    let data = DataArgs {
        dataset: args.dataset.clone(),
        split: None,
        classes: 10,
    };
    let (train_set, test_set) = data.load()?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let plot_path = args
        .plot
        .clone()
        .unwrap_or_else(|| args.out_dir.join("deep-sweep.png"));
    check_output_dir("--plot", &plot_path)?;
    let train_set = first_rows(train_set, args.train_rows);
    let test_set = first_rows(test_set, args.test_rows);
    let input_scale = args.input_scale.unwrap_or(if args.dataset == "mnist" {
        MNIST_UNIT_RMS_SCALE
    } else {
        1.0 / train_set.max_feature().max(f64::MIN_POSITIVE)
    });
    let cores = train::default_threads();
    let plan = Plan {
        width: args.width,
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        sp_lr: args.sp_lr,
        batch_infer_rate: args.batch_infer_rate,
        input_scale,
        rounding: args.activity_rounding,
        seeds: args.seeds.clone(),
        threads_per_run: (cores / args.jobs).max(1),
        out_dir: args.out_dir.clone(),
    };

    let mut runs = run_specs(&args);
    // Deepest first, so the long runs start early and the short ones fill the gaps.
    runs.sort_by_key(|run| std::cmp::Reverse(run.depth));
    eprintln!(
        "sweep: {} runs on {} training and {} test rows, {} epoch(s) each, {} at a time with {} \
         thread(s) each; results in {}",
        runs.len(),
        train_set.len(),
        test_set.len(),
        plan.epochs,
        args.jobs,
        plan.threads_per_run,
        args.out_dir.display()
    );

    let started = Instant::now();
    let results = run_all(&plan, &runs, args.jobs, &train_set, &test_set);
    eprintln!(
        "sweep: {} runs finished in {:.0} s",
        results.len(),
        started.elapsed().as_secs_f64()
    );

    let tables = markdown_tables(&args, &plan, &results, &train_set, &test_set);
    println!("{tables}");
    write_file(&args.out_dir.join("deep-sweep.md"), tables.as_bytes())?;
    let json = serde_json::to_string_pretty(&results)?;
    write_file(&args.out_dir.join("deep-sweep.json"), json.as_bytes())?;
    let points: Vec<plot::Point> = cells(&results).iter().map(plot_point).collect();
    plot::accuracy_against_depth(&plot_path, &points, font)?;
    eprintln!("wrote {}", plot_path.display());
    if let Some(doc) = &args.doc {
        replace_doc_block(doc, &tables)?;
        eprintln!("updated the sweep block of {}", doc.display());
    }

    let failed = results
        .iter()
        .filter(|result| matches!(result.status, Status::Failed { .. }))
        .count();
    if failed > 0 {
        eprintln!("error: {failed} run(s) failed; their messages are above and in the JSON file");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The runs of one network and format, one per seed.
struct Cell<'a> {
    runs: Vec<&'a RunResult>,
}

impl Cell<'_> {
    fn spec(&self) -> &RunSpec {
        &self.runs[0].spec
    }

    /// Returns the mean test accuracy over the seeds, or `None` when a run has no accuracy.
    fn mean_accuracy(&self) -> Option<f64> {
        let accuracies: Option<Vec<f64>> = self.runs.iter().map(|run| run.test_accuracy).collect();
        accuracies.map(|values| values.iter().sum::<f64>() / values.len() as f64)
    }

    fn failed(&self) -> bool {
        self.runs
            .iter()
            .any(|run| !matches!(run.status, Status::Trained))
    }

    /// Formats the table cell: the single run's cell, or the mean over seeds with any failure.
    fn text(&self) -> String {
        if let [run] = self.runs[..] {
            return run.cell();
        }
        let mean = self
            .mean_accuracy()
            .map_or("-".to_string(), |value| format!("{value:.4}"));
        let failures: Vec<String> = self
            .runs
            .iter()
            .filter(|run| !matches!(run.status, Status::Trained))
            .map(|run| format!("seed {}: {}", run.spec.seed, run.cell()))
            .collect();
        if failures.is_empty() {
            mean
        } else {
            format!("{mean} ({})", failures.join("; "))
        }
    }
}

/// Groups the results by network and format, in the order of their first run.
fn cells(results: &[RunResult]) -> Vec<Cell<'_>> {
    let mut cells: Vec<Cell> = Vec::new();
    for result in results {
        match cells
            .iter_mut()
            .find(|cell| cell.spec().same_cell(&result.spec))
        {
            Some(cell) => cell.runs.push(result),
            None => cells.push(Cell { runs: vec![result] }),
        }
    }
    cells
}

fn plot_point(cell: &Cell) -> plot::Point {
    let spec = cell.spec();
    let series = format!(
        "{} {} {}",
        spec.family.name(),
        spec.act.name(),
        numeric_name(spec.numeric)
    );
    plot::Point {
        series,
        family: spec.family as usize,
        fixed_point: spec.numeric == Numeric::I16f16,
        depth: spec.depth,
        accuracy: cell.mean_accuracy(),
        failed: cell.failed(),
    }
}

/// Trains every run, `jobs` at a time, and returns the results in the order of `runs`.
fn run_all(
    plan: &Plan,
    runs: &[RunSpec],
    jobs: usize,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Vec<RunResult> {
    let queue = Mutex::new(runs.iter().enumerate().collect::<VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    let total = runs.len();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(total) {
            scope.spawn(|| loop {
                let next = queue.lock().map(|mut queue| queue.pop_front());
                let Ok(Some((index, run))) = next else {
                    break;
                };
                eprintln!("[{}/{total}] start {}", index + 1, run.label());
                let result = train_one(plan, run, train_set, test_set);
                eprintln!(
                    "[{}/{total}] {}: {} (mean {:.1} s per epoch)",
                    index + 1,
                    run.label(),
                    result.cell(),
                    result.seconds_per_epoch.unwrap_or(0.0)
                );
                if let Status::Failed { message } = &result.status {
                    eprintln!("[{}/{total}] error: {message}", index + 1);
                }
                if let Ok(mut results) = results.lock() {
                    results.push((index, result));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, result)| result).collect()
}

fn train_one(plan: &Plan, run: &RunSpec, train_set: &Dataset, test_set: &Dataset) -> RunResult {
    match run.numeric {
        Numeric::F32 => train_one_in::<f32>(plan, run, train_set, test_set),
        Numeric::F64 => train_one_in::<f64>(plan, run, train_set, test_set),
        Numeric::I16f16 => train_one_in::<I16F16>(plan, run, train_set, test_set),
        Numeric::I4f12 => train_one_in::<I4F12>(plan, run, train_set, test_set),
    }
}

fn train_one_in<S: Scalar + Send + Sync>(
    plan: &Plan,
    run: &RunSpec,
    train_set: &Dataset,
    test_set: &Dataset,
) -> RunResult {
    let spec = plan.spec(run, train_set);
    let config = plan.config(run);
    let label = run.label();
    let mut epochs = Vec::new();
    let outcome = train::train::<S>(&spec, &config, train_set, test_set, |report| {
        eprintln!(
            "  [{label}] epoch {}/{}: test accuracy {:.4}, {} saturated, {:.1} s",
            report.epoch, config.epochs, report.test_accuracy, report.overflows, report.seconds
        );
        epochs.push(report.clone());
    });
    let status = match &outcome {
        Ok(trained) => {
            let model = plan
                .out_dir
                .join(format!("{}.fpc", run.file_stem(plan.seeds[0])));
            let written = encode(trained).and_then(|bytes| write_file(&model, &bytes));
            match (written, trained.epochs.last()) {
                (Err(error), _) => Status::Failed {
                    message: format!("{error:#}"),
                },
                (Ok(()), Some(last)) if last.overflows > 0 => Status::Saturated {
                    count: last.overflows,
                },
                (Ok(()), Some(last)) if last.output_collapsed() => Status::Collapsed,
                (Ok(()), Some(last)) if max_activity(last) > I16F16_LIMIT => Status::Exploded {
                    max_abs_activity: max_activity(last),
                },
                (Ok(()), _) => Status::Trained,
            }
        }
        Err(error) => match error.downcast_ref::<Diverged>() {
            Some(diverged) => Status::Diverged {
                epoch: diverged.epoch,
            },
            None => Status::Failed {
                message: format!("{error:#}"),
            },
        },
    };
    let finished: Vec<&EpochReport> = epochs
        .iter()
        .filter(|epoch| epoch.mean_energy.is_finite())
        .collect();
    let test_accuracy = match status {
        Status::Diverged { .. } | Status::Failed { .. } => None,
        _ => finished.last().map(|epoch| epoch.test_accuracy),
    };
    let seconds_per_epoch = if epochs.is_empty() {
        None
    } else {
        Some(epochs.iter().map(|epoch| epoch.seconds).sum::<f64>() / epochs.len() as f64)
    };
    RunResult {
        spec: *run,
        status,
        test_accuracy,
        seconds_per_epoch,
        epochs,
    }
}

/// Largest `|z|` that `I16F16` represents.
const I16F16_LIMIT: f64 = 32768.0;

/// Largest `|z_l|` of any layer in an epoch.
fn max_activity(epoch: &EpochReport) -> f64 {
    epoch.max_abs_activity.iter().copied().fold(0.0, f64::max)
}

/// Formats a magnitude for the activity table.
fn magnitude(value: f64) -> String {
    if !value.is_finite() {
        "NaN/inf".to_string()
    } else if value == 0.0 {
        "0".to_string()
    } else if (0.01..10_000.0).contains(&value) {
        format!("{value:.3}")
    } else {
        format!("{value:.2e}")
    }
}

fn markdown_tables(
    args: &SweepArgs,
    plan: &Plan,
    results: &[RunResult],
    train_set: &Dataset,
    test_set: &Dataset,
) -> String {
    let mut out = String::new();
    let cells = cells(results);
    let columns: Vec<(Family, Numeric)> = args
        .families
        .iter()
        .flat_map(|&family| args.numerics.iter().map(move |&numeric| (family, numeric)))
        .collect();
    let seeds: Vec<String> = plan.seeds.iter().map(u64::to_string).collect();
    let has_mupc = args.families.contains(&Family::MupcSkip);
    let has_sp = args
        .families
        .iter()
        .any(|family| family.parameterisation() == Parameterisation::Sp);
    let seed_text = match (seeds.len(), has_mupc, has_sp) {
        (1, _, _) | (_, false, _) => format!("seed {}", seeds[0]),
        (_, true, false) => format!(
            "seeds {} (the cells give the mean, and the table of seeds follows)",
            seeds.join(", ")
        ),
        (_, true, true) => format!(
            "seeds {} for muPC (the cells give the mean, and the table of seeds follows) and \
             seed {} for SP",
            seeds.join(", "),
            seeds[0]
        ),
    };
    let learning_rates = match (has_mupc, has_sp) {
        (true, true) => format!(
            "learning rate {} for muPC and {} for SP",
            plan.lr, plan.sp_lr
        ),
        (true, false) => format!("learning rate {}", plan.lr),
        _ => format!("learning rate {}", plan.sp_lr),
    };
    let _ = writeln!(
        out,
        "Width {}, {} epoch(s) of Adam ({learning_rates}, batch {}), \
         T = depth - 1 inference steps, {} training and {} test rows, input scale {}. Runs \
         with {}. Fixed-point activity updates rounded {}.",
        plan.width,
        plan.epochs,
        plan.batch,
        train_set.len(),
        test_set.len(),
        plan.input_scale,
        seed_text,
        match plan.rounding {
            ActivityRounding::Nearest => "to nearest",
            ActivityRounding::Stochastic => "stochastically",
        }
    );
    let find = |act: Activation, depth: usize, family: Family, numeric: Numeric| {
        cells.iter().find(|cell| {
            let spec = cell.spec();
            spec.act == act
                && spec.depth == depth
                && spec.family == family
                && spec.numeric == numeric
        })
    };
    for &act in &args.acts {
        let _ = writeln!(
            out,
            "\nTest accuracy, {} (per-sample inference step {}):\n",
            act.name(),
            plan.infer_rate(act)
        );
        let header: Vec<String> = columns
            .iter()
            .map(|(family, numeric)| format!("{} {}", family.name(), numeric_name(*numeric)))
            .collect();
        let _ = writeln!(out, "| depth | {} |", header.join(" | "));
        let _ = writeln!(out, "|---:|{}", "---:|".repeat(columns.len()));
        for &depth in &args.depths {
            let texts: Vec<String> = columns
                .iter()
                .map(|&(family, numeric)| {
                    find(act, depth, family, numeric).map_or("-".to_string(), Cell::text)
                })
                .collect();
            let _ = writeln!(out, "| {depth} | {} |", texts.join(" | "));
        }
        if seeds.len() > 1 && has_mupc {
            let _ = writeln!(
                out,
                "\nmuPC + skips, {}, test accuracy per seed:\n",
                act.name()
            );
            let _ = writeln!(
                out,
                "| depth | format | seed {} | mean | lowest |",
                seeds.join(" | seed ")
            );
            let _ = writeln!(out, "|---:|---|{}---:|---:|", "---:|".repeat(seeds.len()));
            for &depth in &args.depths {
                for &numeric in &args.numerics {
                    let Some(cell) = find(act, depth, Family::MupcSkip, numeric) else {
                        continue;
                    };
                    let accuracy = |value: Option<f64>| {
                        value.map_or("-".to_string(), |value| format!("{value:.4}"))
                    };
                    let per_seed: Vec<String> = cell
                        .runs
                        .iter()
                        .map(|run| accuracy(run.test_accuracy))
                        .collect();
                    let lowest = cell
                        .runs
                        .iter()
                        .map(|run| run.test_accuracy)
                        .try_fold(f64::INFINITY, |low, value| {
                            value.map(|value| low.min(value))
                        });
                    let _ = writeln!(
                        out,
                        "| {depth} | {} | {} | {} | {} |",
                        numeric_name(numeric),
                        per_seed.join(" | "),
                        accuracy(cell.mean_accuracy()),
                        accuracy(lowest)
                    );
                }
            }
        }
    }

    let _ = writeln!(
        out,
        "\nActivity ranges in the last epoch{}: the largest |z_l| over the training samples' \
         final activities at hidden layers 1, L/4, L/2, 3L/4 and L-1, saturated results \
         (I16F16 saturates at |z| = 32768), the spread of the test outputs, how many layers \
         from the output the errors reached by the end of inference (mean over the training \
         samples) and the mean seconds per epoch:\n",
        if seeds.len() > 1 {
            format!(", runs with seed {}", seeds[0])
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "| run | z_1 | z_L/4 | z_L/2 | z_3L/4 | z_L-1 | saturated | output spread | error reach \
         | s/epoch |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for result in results
        .iter()
        .filter(|result| result.spec.seed == plan.seeds[0])
    {
        let Some(last) = result.last_epoch() else {
            continue;
        };
        let depth = result.spec.depth;
        let layers = [1, depth / 4, depth / 2, 3 * depth / 4, depth - 1];
        let ranges: Vec<String> = layers
            .iter()
            .map(|&layer| {
                last.max_abs_activity
                    .get(layer.max(1))
                    .map_or("-".to_string(), |&value| magnitude(value))
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} of {depth} | {:.1} |",
            result.spec.label(),
            ranges.join(" | "),
            last.overflows,
            magnitude(last.output_spread),
            last.mean_error_reach,
            result.seconds_per_epoch.unwrap_or(0.0)
        );
    }
    out
}

/// Reads `path` and returns its text with the byte offsets of [`DOC_BEGIN`] and [`DOC_END`].
fn doc_block(path: &Path) -> Result<(String, usize, usize)> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| input_error(format!("cannot read --doc {}: {error}", path.display())))?;
    let (Some(begin), Some(end)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        return Err(input_error(format!(
            "--doc {} has no block to replace: add the lines {DOC_BEGIN} and {DOC_END}",
            path.display()
        )));
    };
    if end < begin {
        return Err(input_error(format!(
            "--doc {}: {DOC_END} comes before {DOC_BEGIN}; put the end line after the begin \
             line",
            path.display()
        )));
    }
    Ok((text, begin, end))
}

/// Replaces the text between [`DOC_BEGIN`] and [`DOC_END`] in `path` with `tables`.
fn replace_doc_block(path: &Path, tables: &str) -> Result<()> {
    let (text, begin, end) = doc_block(path)?;
    let updated = format!("{}{DOC_BEGIN}\n{tables}{}", &text[..begin], &text[end..]);
    write_file(path, updated.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_block_replaced_between_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.md");
        let text = format!("# Title\n\n{DOC_BEGIN}\nold table\n{DOC_END}\n\nAfter.\n");
        std::fs::write(&path, text).unwrap();
        replace_doc_block(&path, "| new |\n").unwrap();
        let updated = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            updated,
            format!("# Title\n\n{DOC_BEGIN}\n| new |\n{DOC_END}\n\nAfter.\n")
        );
    }

    #[test]
    fn doc_without_markers_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.md");
        std::fs::write(&path, "# Title\n").unwrap();
        let error = replace_doc_block(&path, "| new |\n").unwrap_err();
        assert!(
            error.to_string().contains("has no block to replace"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# Title\n");
    }

    #[test]
    fn depth_below_two_rejected() {
        let args = SweepArgs {
            depths: vec![8, 1],
            ..quick_args()
        };
        let error = validate(&args).unwrap_err();
        assert!(
            error.to_string().contains("--depths: 1 is invalid"),
            "{error}"
        );
    }

    #[test]
    fn quick_replaces_sizes() {
        let args = effective_args(&quick_args());
        assert_eq!(args.depths, vec![2, 3, 4]);
        assert_eq!(args.width, 16);
        assert_eq!(args.epochs, 1);
        assert_eq!(args.train_rows, Some(300));
        assert_eq!(args.test_rows, Some(200));
    }

    #[test]
    fn repeated_seed_rejected() {
        let args = SweepArgs {
            seeds: vec![1, 2, 1],
            ..quick_args()
        };
        let error = validate(&args).unwrap_err();
        assert!(
            error.to_string().contains("--seeds: 1 appears twice"),
            "{error}"
        );
    }

    #[test]
    fn repeated_family_rejected() {
        let args = SweepArgs {
            families: vec![Family::MupcSkip, Family::Sp, Family::MupcSkip],
            ..quick_args()
        };
        let error = validate(&args).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--families: mupc-skip appears twice (position 3)"),
            "{error}"
        );
    }

    #[test]
    fn repeated_depth_rejected() {
        let args = SweepArgs {
            depths: vec![8, 8],
            ..quick_args()
        };
        let error = validate(&args).unwrap_err();
        assert!(
            error.to_string().contains("--depths: 8 appears twice"),
            "{error}"
        );
    }

    #[test]
    fn quick_conflicts_with_depths() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SweepArgs,
        }
        let parsed = <Cli as clap::Parser>::try_parse_from(["sweep", "--quick", "--depths", "8"]);
        assert!(parsed.is_err());
    }

    #[test]
    fn negative_seed_rejected() {
        let error = parse_seed("-1").unwrap_err();
        assert!(error.contains("expected non-negative integers"), "{error}");
    }

    #[test]
    fn mupc_runs_every_seed() {
        let args = SweepArgs {
            depths: vec![8],
            seeds: vec![4, 5],
            numerics: vec![Numeric::I16f16],
            ..quick_args()
        };
        let seeds: Vec<(Family, u64)> = run_specs(&args)
            .iter()
            .map(|run| (run.family, run.seed))
            .collect();
        assert_eq!(
            seeds,
            vec![
                (Family::MupcSkip, 4),
                (Family::MupcSkip, 5),
                (Family::SpSkip, 4),
                (Family::Sp, 4)
            ]
        );
    }

    #[test]
    fn cell_averages_seeds() {
        let run = |seed, accuracy, status| RunResult {
            spec: RunSpec {
                family: Family::MupcSkip,
                depth: 8,
                seed,
                numeric: Numeric::I16f16,
                act: Activation::Relu,
            },
            status,
            test_accuracy: Some(accuracy),
            seconds_per_epoch: None,
            epochs: Vec::new(),
        };
        let results = [
            run(1, 0.85, Status::Trained),
            run(2, 0.87, Status::Trained),
            run(3, 0.10, Status::Collapsed),
        ];
        let cells = cells(&results);
        assert_eq!(cells.len(), 1);
        assert!((cells[0].mean_accuracy().unwrap() - 0.6066667).abs() < 1e-6);
        assert_eq!(cells[0].text(), "0.6067 (seed 3: 0.1000 (collapsed))");
        assert!(cells[0].failed());
        assert_eq!(
            results[1].spec.file_stem(1),
            "mupc-skip-relu-d8-i16f16-seed2"
        );
        assert_eq!(results[0].spec.file_stem(1), "mupc-skip-relu-d8-i16f16");
    }

    fn quick_args() -> SweepArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SweepArgs,
        }
        <Cli as clap::Parser>::parse_from(["sweep", "--quick"]).args
    }
}
