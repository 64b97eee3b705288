//! The `train` and `eval` subcommands: model files in and out.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use fixedpc::model::{encoded_len, write_model};
use fixedpc::{Arch, Model, Network, NumericFormat, Scalar, I16F16, I4F12};
use serde_json::json;

use crate::cli::{DataArgs, Numeric, TrainArgs};
use crate::data::{input_error, Dataset};
use crate::train::{self, EpochReport, Trained};

/// Prints one epoch's progress line to stderr.
pub fn print_epoch(label: &str, epochs: usize, report: &EpochReport) {
    eprintln!(
        "[{label}] epoch {:>3}/{epochs}  mean energy {:.4}  test accuracy {:.4}  \
         overflows {}  {:.2} s",
        report.epoch, report.mean_energy, report.test_accuracy, report.overflows, report.seconds
    );
    if let Some(summary) = report.saturation_summary() {
        eprintln!("[{label}]   {summary}");
    }
}

/// Encodes a trained network as a model file.
pub fn encode<S: Scalar>(trained: &Trained<S>) -> Result<Vec<u8>> {
    let spec = &trained.spec;
    let arch = spec.arch()?;
    let mut bytes = vec![0u8; encoded_len(&spec.widths, S::FORMAT)];
    let mut overflows = 0;
    let input_scale = S::from_f64_rounded(spec.input_scale, &mut overflows);
    write_model(
        &arch,
        spec.parameterisation,
        &spec.inference::<S>(),
        input_scale,
        &trained.scalings,
        &trained.weights,
        &mut bytes,
    )?;
    Ok(bytes)
}

/// Writes `bytes` to `path`, naming the path on failure.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn train_in<S: Scalar + Send + Sync>(
    args: &TrainArgs,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<ExitCode> {
    let (spec, config) = args.spec_and_config(train_set)?;
    let name = S::FORMAT.name();
    eprintln!(
        "training {name} network {:?} ({}, {}) on {} rows, testing on {}",
        spec.widths,
        spec.activation.name(),
        spec.parameterisation.name(),
        train_set.len(),
        test_set.len()
    );
    let trained = train::train::<S>(&spec, &config, train_set, test_set, |report| {
        print_epoch(name, config.epochs, report)
    })?;
    let bytes = encode(&trained)?;
    write_file(&args.out, &bytes)?;
    let accuracy = trained
        .epochs
        .last()
        .map_or(0.0, |epoch| epoch.test_accuracy);
    println!(
        "test accuracy {accuracy:.4}; model written to {}",
        args.out.display()
    );

    if let Some(path) = &args.report {
        let seconds: f64 = trained.epochs.iter().map(|epoch| epoch.seconds).sum();
        let report = json!({
            "numeric": name,
            "test_accuracy": accuracy,
            "train_rows": train_set.len(),
            "test_rows": test_set.len(),
            "train_seconds": seconds,
            "network": spec,
            "training": config,
            "epochs": trained.epochs,
            "model": args.out,
        });
        write_file(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `pcsim train`.
pub fn run_train(args: &TrainArgs) -> Result<ExitCode> {
    let (train_set, test_set) = args.data.load()?;
    match args.numeric {
        Numeric::F32 => train_in::<f32>(args, &train_set, &test_set),
        Numeric::F64 => train_in::<f64>(args, &train_set, &test_set),
        Numeric::I16f16 => train_in::<I16F16>(args, &train_set, &test_set),
        Numeric::I4f12 => train_in::<I4F12>(args, &train_set, &test_set),
    }
}

/// Reads and validates a model file.
pub fn read_model(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|error| {
        input_error(format!(
            "cannot read model file {}: {error}",
            path.display()
        ))
    })?;
    Model::parse(&bytes)
        .map_err(|error| input_error(format!("invalid model file {}: {error}", path.display())))?;
    Ok(bytes)
}

fn eval_in<S: Scalar>(model: &Model<'_>, test_set: &Dataset) -> Result<f64> {
    let depth = model.header().depth;
    let mut widths = vec![0; depth + 1];
    model.widths_into(&mut widths)?;
    if widths[0] != test_set.feature_count {
        return Err(input_error(format!(
            "the model takes {} features, the data has {}; evaluate it on data of the kind it \
             was trained on",
            widths[0], test_set.feature_count
        )));
    }
    if widths[depth] != test_set.classes {
        return Err(input_error(format!(
            "the model has {} classes, the data set {}; set --classes {}",
            widths[depth], test_set.classes, widths[depth]
        )));
    }
    let header = model.header();
    let arch = Arch::new(&widths, header.activation, header.skip)?;
    let mut weights = vec![S::ZERO; arch.weights_len()];
    let mut scalings = vec![S::ZERO; depth];
    model.weights_into(&mut weights)?;
    model.scalings_into(&mut scalings)?;
    let scale = model.input_scale::<S>()?.to_f64();
    let (inputs, saturated) = train::convert_features::<S>(test_set, scale);
    train::warn_saturated_inputs::<S>(saturated, scale);
    if weights
        .iter()
        .chain(&scalings)
        .any(|value| !value.to_f64().is_finite())
    {
        return Err(input_error(
            "the model has weights or scalings that are not finite (NaN or infinite); \
             train it again with a lower --lr",
        ));
    }
    let network = Network::new(arch, &weights, &scalings)?;
    train::accuracy(&network, &inputs, &test_set.labels)
}

/// Runs `pcsim eval`.
pub fn run_eval(model_path: &Path, data: &DataArgs, report: Option<&Path>) -> Result<ExitCode> {
    if let Some(path) = report {
        crate::cli::check_output_dir("--report", path)?;
    }
    let bytes = read_model(model_path)?;
    let model = Model::parse(&bytes)?;
    let (_, test_set) = data.load()?;
    let format = model.header().format;
    let accuracy = match format {
        NumericFormat::F32 => eval_in::<f32>(&model, &test_set)?,
        NumericFormat::F64 => eval_in::<f64>(&model, &test_set)?,
        NumericFormat::I16F16 => eval_in::<I16F16>(&model, &test_set)?,
        NumericFormat::I4F12 => eval_in::<I4F12>(&model, &test_set)?,
    };
    println!(
        "{}: {} model, test accuracy {accuracy:.4} on {} rows",
        model_path.display(),
        format.name(),
        test_set.len()
    );
    if let Some(path) = report {
        let summary = json!({
            "model": model_path,
            "numeric": format.name(),
            "test_accuracy": accuracy,
            "test_rows": test_set.len(),
        });
        write_file(path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}
