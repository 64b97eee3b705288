//! Command-line options of `pcsim`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fixedpc::{Activation, ActivityRounding, Parameterisation};

use crate::data::input_error;
use crate::train::{NetworkSpec, OptimizerKind, TrainConfig};
use crate::{bench, check, data, demo, learn, mnist, sweep};

/// Train and run predictive coding networks in floating and fixed point.
#[derive(Parser)]
#[command(name = "pcsim", version)]
pub struct Cli {
    #[command(subcommand)]
    /// Subcommand to run.
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a network on a CSV data set and write a model file.
    #[command(allow_negative_numbers = true)]
    Train(TrainArgs),
    /// Evaluate a model file on a CSV data set.
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// Train on the bundled digits in f32 and i16f16, then run the i16f16 model and its i4f12
    /// rounding on the emulated Cortex-M4 board and compare them with the host bit for bit.
    Demo(demo::DemoArgs),
    /// Check a golden case computed by JPC: the f64 reference and the core in f64 against
    /// JPC, and the core in i16f16 against its error bound.
    Check(check::CheckArgs),
    /// Run a board: `pcsim board run` runs a model file on the emulated board, and `pcsim
    /// board learn` trains a board over its serial link.
    #[command(subcommand)]
    Board(learn::BoardCommand),
    /// Measure instruction counts on the emulated Cortex-M4, firmware memory, host training
    /// throughput and early stop, and write docs/PERFORMANCE.md (`scripts/bench` runs it).
    Bench(bench::BenchArgs),
    /// Train muPC and SP networks of several depths in f32 and i16f16 and write a table and a
    /// plot of test accuracy against depth.
    Sweep(sweep::SweepArgs),
}

/// Numeric format a network computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Numeric {
    /// IEEE binary32 floating point.
    F32,
    /// IEEE binary64 floating point.
    F64,
    /// Signed Q16.16 fixed point (resolution 2^-16, range -32768 to 32768).
    I16f16,
    /// Signed Q4.12 fixed point in 16 bits (resolution 2^-12, range -8 to 8).
    I4f12,
}

/// Data set options shared by the subcommands.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// Data set: `digits` (bundled 8x8 digits), `mnist` (bundled 10,000 MNIST images), a CSV
    /// file (feature columns, then an integer class label), or an MNIST IDX image file
    /// (`*images-idx3-ubyte`, plain or `.gz`, with the labels in the matching
    /// `*labels-idx1-ubyte` file)
    #[arg(
        long,
        alias = "data",
        default_value = "digits",
        value_name = "NAME|PATH"
    )]
    pub dataset: String,
    /// Rows before this row train, rows from it on test, counted from 0; `eval` with
    /// --split 0 tests on every row [default: 1000 for digits, 8000 for mnist, 80% of the rows
    /// otherwise]
    #[arg(long, value_name = "ROW")]
    pub split: Option<usize>,
    /// Number of classes of a CSV data set; labels must be integers from 0 to CLASSES-1
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
}

impl DataArgs {
    /// Loads the data set and splits it into training and test rows.
    pub fn load(&self) -> Result<(data::Dataset, data::Dataset)> {
        if self.classes < 2 {
            return Err(input_error(format!(
                "--classes {} is invalid: need at least 2",
                self.classes
            )));
        }
        let (all, default_split) = match self.dataset.as_str() {
            "digits" => (
                data::load_csv(&data::default_digits_path(), self.classes)?,
                1000,
            ),
            "mnist" => {
                let (images, labels) = data::default_mnist_paths();
                (mnist::load_idx(&images, &labels)?, 8000)
            }
            name => {
                let path = std::path::Path::new(name);
                if !path.exists() {
                    return Err(input_error(format!(
                        "--dataset {name}: not a bundled data set (digits, mnist) and no such \
                         file; give one of those names, or the path of a CSV file or of an MNIST \
                         IDX images file"
                    )));
                }
                let all = match mnist::labels_path_for(path) {
                    Some(labels) => mnist::load_idx(path, &labels)?,
                    None => data::load_csv(path, self.classes)?,
                };
                let default_split = all.len() * 4 / 5;
                (all, default_split)
            }
        };
        all.split(self.split.unwrap_or(default_split))
    }
}

/// Network and training options.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Numeric format of training and of the written model
    #[arg(long, value_enum, default_value_t = Numeric::F32)]
    pub numeric: Numeric,
    /// Hidden-layer widths, comma-separated; input and output widths come from the data
    #[arg(long, default_value = "64,64", value_name = "W1,W2,..")]
    pub arch: String,
    /// Hidden width of a network of --depth layers; replaces --arch
    #[arg(long, requires = "depth")]
    pub width: Option<usize>,
    /// Number of weight layers (hidden layers + 1) of width --width; replaces --arch
    #[arg(long, requires = "width")]
    pub depth: Option<usize>,
    /// Activation applied to each hidden layer's output before the next layer: linear,
    /// tanh, hard_tanh, relu or leaky_relu (slope 0.01 below zero)
    #[arg(long, default_value = "relu", value_parser = parse_activation)]
    pub act: Activation,
    /// Parameterisation of layer scalings and initial weights: sp (standard: scalings 1,
    /// uniform fan-in weights) or mupc (standard-normal weights, width- and depth-scaled layers)
    #[arg(long, default_value = "sp", value_parser = parse_parameterisation)]
    pub param: Parameterisation,
    /// Add identity skip connections to hidden-to-hidden layers (needs equal widths)
    #[arg(long)]
    pub skip: bool,
    /// Passes over the training rows
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Samples per weight update
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Inference steps T per sample
    #[arg(long, default_value_t = 20)]
    pub infer_steps: u32,
    /// Per-sample inference step size (JPC's batch-averaged step divided by the batch size)
    #[arg(long, default_value_t = 0.1)]
    pub infer_rate: f64,
    /// Stop a sample's inference once one step changes its energy (half the sum of squared
    /// prediction errors, in squared activity units) by at most this much [default: run all
    /// steps]
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Rounding of each activity update (step size times gradient) in fixed point: nearest,
    /// or stochastic. Stochastic rounds up with probability equal to the dropped fraction of
    /// an LSB, so updates below half an LSB survive on average. It is deterministic because
    /// its random bits are hashed from the network state. Float formats ignore it
    #[arg(long, default_value = "nearest", value_parser = parse_rounding)]
    pub activity_rounding: ActivityRounding,
    /// Learning rate of the weight optimiser
    #[arg(long, default_value_t = 0.2)]
    pub lr: f64,
    /// Weight optimiser
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// Seed of the initial weights and of the shuffling
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Threads that share the samples of each batch; any count gives the same results. The
    /// batched f32 path uses fewer when a batch has too little work to pay for starting them
    /// [default: the number of available cores]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Train f32 one sample at a time with the core's matrix-vector products, the path a
    /// board runs, instead of batched matrix-matrix products. It is slower and computes the
    /// same mathematics. Other formats always train one sample at a time
    #[arg(long)]
    pub per_sample: bool,
    /// Factor applied to every raw feature [default: 1 / the largest absolute training
    /// feature]
    #[arg(long)]
    pub input_scale: Option<f64>,
    /// Model file to write
    #[arg(long, default_value = "model.fpc", value_name = "PATH")]
    pub out: PathBuf,
    /// Write a JSON summary to this file
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model file written by `pcsim train`
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Write a JSON summary to this file
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
}

/// Creates the directory of an output file before a long run starts, so that the run does
/// not end in a write error, and fails with the reason when it cannot.
pub fn check_output_dir(option: &str, path: &std::path::Path) -> Result<()> {
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    match parent {
        Some(parent) if !parent.is_dir() => std::fs::create_dir_all(parent).map_err(|err| {
            input_error(format!(
                "{option} {} is invalid: cannot create directory {}: {err}",
                path.display(),
                parent.display()
            ))
        }),
        _ => Ok(()),
    }
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

/// Parses `nearest` or `stochastic`.
pub fn parse_rounding(name: &str) -> Result<ActivityRounding, String> {
    match name {
        "nearest" => Ok(ActivityRounding::Nearest),
        "stochastic" => Ok(ActivityRounding::Stochastic),
        _ => Err(format!(
            "unknown rounding '{name}'; expected nearest or stochastic"
        )),
    }
}

fn parse_parameterisation(name: &str) -> Result<Parameterisation, String> {
    match name {
        "sp" => Ok(Parameterisation::Sp),
        "mupc" => Ok(Parameterisation::MuPc),
        _ => Err(format!(
            "unknown parameterisation '{name}'; expected sp or mupc"
        )),
    }
}

fn parse_hidden(arch: &str) -> Result<Vec<usize>> {
    if arch.trim().is_empty() {
        return Ok(Vec::new());
    }
    arch.split(',')
        .map(|part| match part.trim().parse::<usize>() {
            Ok(width) if width > 0 => Ok(width),
            _ => Err(input_error(format!(
                "--arch '{arch}' is invalid: '{part}' is not a positive width; \
                 expected comma-separated hidden widths such as 64,64"
            ))),
        })
        .collect()
}

impl TrainArgs {
    /// Builds the network spec and training settings for data with these dimensions.
    pub fn spec_and_config(&self, train_set: &data::Dataset) -> Result<(NetworkSpec, TrainConfig)> {
        if train_set.is_empty() {
            return Err(input_error(
                "--split 0 leaves no training rows; pick a split above 0",
            ));
        }
        let mut widths = vec![train_set.feature_count];
        match (self.width, self.depth) {
            (Some(width), Some(depth)) if width > 0 && depth > 0 => {
                widths.extend(std::iter::repeat_n(width, depth - 1));
            }
            (Some(width), Some(depth)) => {
                return Err(input_error(format!(
                    "--width {width} --depth {depth} is invalid: both must be at least 1"
                )));
            }
            _ => widths.extend(parse_hidden(&self.arch)?),
        }
        widths.push(train_set.classes);
        let input_scale = match self.input_scale {
            Some(scale) if scale.is_finite() && scale > 0.0 => scale,
            Some(scale) => {
                return Err(input_error(format!(
                    "--input-scale {scale} is invalid: it must be a finite number above 0"
                )))
            }
            None => {
                let max = train_set.max_feature();
                if max > 0.0 {
                    1.0 / max
                } else {
                    1.0
                }
            }
        };
        for (name, value) in [("--infer-rate", self.infer_rate), ("--lr", self.lr)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(input_error(format!(
                    "{name} {value} is invalid: it must be a finite number above 0"
                )));
            }
        }
        let counts = [
            ("--batch", self.batch),
            ("--epochs", self.epochs),
            ("--threads", self.threads.unwrap_or(1)),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(input_error(format!(
                    "{name} 0 is invalid: it must be at least 1"
                )));
            }
        }
        if let Some(tolerance) = self.tolerance {
            if !(tolerance.is_finite() && tolerance >= 0.0) {
                return Err(input_error(format!(
                    "--tolerance {tolerance} is invalid: it must be a finite energy of 0 or more"
                )));
            }
        }
        check_output_dir("--out", &self.out)?;
        if let Some(report) = &self.report {
            check_output_dir("--report", report)?;
        }
        let spec = NetworkSpec {
            widths,
            activation: self.act,
            parameterisation: self.param,
            skip: self.skip,
            input_scale,
            infer_steps: self.infer_steps,
            infer_rate: self.infer_rate,
            tolerance: self.tolerance,
            rounding: self.activity_rounding,
        };
        spec.arch()
            .map_err(|error| input_error(format!("--arch/--skip: {error}")))?;
        let config = TrainConfig {
            epochs: self.epochs,
            batch: self.batch,
            learning_rate: self.lr,
            optimizer: self.optimizer,
            seed: self.seed,
            threads: self.threads.unwrap_or_else(crate::train::default_threads),
            per_sample: self.per_sample,
        };
        Ok((spec, config))
    }
}
