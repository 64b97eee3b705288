//! Training and evaluation on the host, generic over the core's numeric formats.

use std::time::Instant;

use anyhow::{Context, Result};
use fixedpc::evaluate::{arg_max, evaluate_sample, one_hot, TestChecksum};
use fixedpc::{
    Activation, Adam, Arch, InferenceConfig, Network, Parameterisation, Scalar, Sgd, Workspace,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::data::Dataset;

/// Weight optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent.
    Sgd,
    /// Adam with bias correction (beta1 0.9, beta2 0.999, epsilon 1e-8).
    Adam,
}

/// Shapes and inference settings of a network, independent of the numeric format.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetworkSpec {
    /// Widths `n_0 .. n_L`.
    pub widths: Vec<usize>,
    /// Activation of layers `2 ..= L`.
    #[serde(serialize_with = "serialize_activation")]
    pub activation: Activation,
    /// Parameterisation of scalings and initial weights.
    #[serde(serialize_with = "serialize_parameterisation")]
    pub parameterisation: Parameterisation,
    /// Identity skips on layers `2 ..= L-1`.
    pub skip: bool,
    /// Factor applied to raw features.
    pub input_scale: f64,
    /// Inference steps `T`.
    pub infer_steps: u32,
    /// Per-sample inference step size.
    pub infer_rate: f64,
    /// Early-stop tolerance on the per-sample energy change.
    pub tolerance: Option<f64>,
}

fn serialize_activation<S: serde::Serializer>(act: &Activation, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(act.name())
}

fn serialize_parameterisation<S: serde::Serializer>(
    param: &Parameterisation,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(param.name())
}

impl NetworkSpec {
    /// Returns the core's view of the shapes.
    pub fn arch(&self) -> Result<Arch<'_>> {
        Arch::new(&self.widths, self.activation, self.skip).map_err(anyhow::Error::msg)
    }

    /// Returns the inference settings in format `S`.
    pub fn inference<S: Scalar>(&self) -> InferenceConfig<S> {
        let mut overflows = 0;
        InferenceConfig {
            steps: self.infer_steps,
            step_size: S::from_f64_rounded(self.infer_rate, &mut overflows),
            tolerance: self
                .tolerance
                .map(|t| S::from_f64_rounded(t, &mut overflows)),
        }
    }

    /// Returns the scalings `a_1 .. a_L` in format `S`.
    pub fn scalings<S: Scalar>(&self) -> Vec<S> {
        let mut overflows = 0;
        (1..self.widths.len())
            .map(|layer| {
                let value = self
                    .parameterisation
                    .scaling(&self.widths, self.skip, layer);
                S::from_f64_rounded(value, &mut overflows)
            })
            .collect()
    }

    /// Draws initial weights: uniform in `+-1/sqrt(fan_in)` for SP, standard normal for muPC.
    pub fn initial_weights(&self, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut weights = Vec::new();
        for layer in 1..self.widths.len() {
            let fan_in = self.widths[layer - 1];
            let bound = 1.0 / (fan_in as f64).sqrt();
            for _ in 0..self.widths[layer] * fan_in {
                let weight = match self.parameterisation {
                    Parameterisation::Sp => rng.random_range(-bound..bound),
                    Parameterisation::MuPc => rng.sample(StandardNormal),
                };
                weights.push(weight);
            }
        }
        weights
    }
}

/// Training hyperparameters.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per weight update.
    pub batch: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Weight optimiser.
    pub optimizer: OptimizerKind,
    /// Seed of the initial weights and the shuffling.
    pub seed: u64,
}

/// Figures of one epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean final energy of the training samples.
    pub mean_energy: f64,
    /// Test accuracy after the epoch, as a fraction.
    pub test_accuracy: f64,
    /// Saturated (fixed point) or non-finite (float) results during the epoch.
    pub overflows: u64,
    /// Mean inference steps per training sample (below `T` when early stop applies).
    pub mean_inference_steps: f64,
    /// Wall-clock seconds of the epoch's training.
    pub seconds: f64,
}

/// A trained network in format `S`.
pub struct Trained<S> {
    /// Shapes and inference settings.
    pub spec: NetworkSpec,
    /// Weights, layer by layer.
    pub weights: Vec<S>,
    /// Scalings `a_1 .. a_L`.
    pub scalings: Vec<S>,
    /// Per-epoch figures.
    pub epochs: Vec<EpochReport>,
}

/// Prints a warning when converting the inputs to format `S` saturated some of them.
pub fn warn_saturated_inputs<S: Scalar>(saturated: u32, scale: f64) {
    if saturated > 0 {
        eprintln!(
            "warning: {saturated} input values times the input scale {scale} are outside the \
             range of {} and saturated; lower the input scale",
            S::FORMAT.name()
        );
    }
}

/// Converts features (times `scale`) to format `S`, returning them with the number of values
/// that saturated.
pub fn convert_features<S: Scalar>(data: &Dataset, scale: f64) -> (Vec<S>, u32) {
    let mut overflows = 0;
    let values = data
        .features
        .iter()
        .map(|&x| S::from_f64_rounded(x * scale, &mut overflows));
    (values.collect(), overflows)
}

/// Buffers for a workspace of `capacity` samples.
pub struct Buffers<S> {
    activities: Vec<S>,
    errors: Vec<S>,
    scratch: Vec<S>,
    overflows: Vec<u32>,
    capacity: usize,
}

impl<S: Scalar> Buffers<S> {
    /// Allocates buffers sized for `arch` and `capacity` samples.
    pub fn new(arch: &Arch<'_>, capacity: usize) -> Self {
        Buffers {
            activities: vec![S::ZERO; capacity * arch.activities_len()],
            errors: vec![S::ZERO; capacity * arch.errors_len()],
            scratch: vec![S::ZERO; capacity * arch.max_width()],
            overflows: vec![0; arch.depth()],
            capacity,
        }
    }

    /// Borrows the buffers as a workspace.
    pub fn workspace(&mut self, arch: &Arch<'_>) -> Result<Workspace<'_, S>> {
        Workspace::new(
            arch,
            self.capacity,
            &mut self.activities,
            &mut self.errors,
            &mut self.scratch,
            &mut self.overflows,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// Trains a network in format `S` and reports each epoch through `progress`.
// NOTE: each sample runs its own matrix-vector products, so f32 training of the 64-64-64-10
// digits network takes about 0.13 s per epoch on 2 shared cores (docs/PERFORMANCE.md), slower
// than the 0.07 to 0.11 s the maintainers measured for JPC. A batched (matrix-matrix) f32
// path would be needed to go faster.
pub fn train<S: Scalar + Send + Sync>(
    spec: &NetworkSpec,
    config: &TrainConfig,
    train_set: &Dataset,
    test_set: &Dataset,
    mut progress: impl FnMut(&EpochReport),
) -> Result<Trained<S>> {
    let arch = spec.arch()?;
    let inference = spec.inference::<S>();
    let scalings = spec.scalings::<S>();
    let mut overflows = 0;
    let mut weights: Vec<S> = spec
        .initial_weights(config.seed)
        .into_iter()
        .map(|w| S::from_f64_rounded(w, &mut overflows))
        .collect();
    let (inputs, train_saturated) = convert_features::<S>(train_set, spec.input_scale);
    let targets = one_hot_targets::<S>(train_set);
    let (test_inputs, test_saturated) = convert_features::<S>(test_set, spec.input_scale);
    warn_saturated_inputs::<S>(train_saturated + test_saturated, spec.input_scale);

    let batch = config.batch.max(1);
    let mut buffers = Buffers::<S>::new(&arch, batch);
    let mut gradients = vec![S::ZERO; weights.len()];
    let mut first = vec![S::Moment::default(); weights.len()];
    let mut second = vec![S::Moment::default(); weights.len()];
    let sgd = Sgd {
        learning_rate: S::from_f64_rounded(config.learning_rate, &mut overflows),
    };
    let mut adam = Adam::new(config.learning_rate, 0.9, 0.999, 1e-8);
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    let mut shuffler = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_5eed);
    let n_in = train_set.feature_count;
    let n_out = train_set.classes;
    let mut epochs = Vec::new();
    let threads = std::thread::available_parallelism().map_or(1, |count| count.get());

    for epoch in 1..=config.epochs {
        let started = Instant::now();
        order.shuffle(&mut shuffler);
        let mut energy_sum = 0.0;
        let mut epoch_overflows = 0u64;
        let mut epoch_steps = 0u64;

        for chunk in order.chunks(batch) {
            let network = Network::new(arch, &weights, &scalings).map_err(anyhow::Error::msg)?;
            let batch_inputs = BatchInputs {
                inputs: &inputs,
                targets: &targets,
                n_in,
                n_out,
            };
            let (energy, overflows, steps) = infer_batch(
                &network,
                &mut buffers,
                chunk,
                &batch_inputs,
                &inference,
                threads,
            )?;
            energy_sum += energy;
            epoch_overflows += overflows;
            epoch_steps += steps;
            let mut workspace = buffers.workspace(&arch)?;
            workspace.reset_overflows();
            network
                .weight_gradients(&mut workspace, chunk.len(), &mut gradients)
                .map_err(anyhow::Error::msg)?;
            epoch_overflows += workspace.total_overflows();
            let update_overflows = match config.optimizer {
                OptimizerKind::Sgd => sgd.step(&mut weights, &gradients),
                OptimizerKind::Adam => adam.step(&mut weights, &gradients, &mut first, &mut second),
            }
            .map_err(anyhow::Error::msg)?;
            epoch_overflows += update_overflows as u64;
        }

        let seconds = started.elapsed().as_secs_f64();
        let network = Network::new(arch, &weights, &scalings).map_err(anyhow::Error::msg)?;
        let test_accuracy = accuracy(&network, &test_inputs, &test_set.labels)?;
        let report = EpochReport {
            epoch,
            mean_energy: energy_sum / train_set.len() as f64,
            test_accuracy,
            overflows: epoch_overflows,
            mean_inference_steps: epoch_steps as f64 / train_set.len() as f64,
            seconds,
        };
        progress(&report);
        let diverged = !report.mean_energy.is_finite();
        epochs.push(report);
        if diverged || weights.iter().any(|w| !w.to_f64().is_finite()) {
            anyhow::bail!(
                "training diverged in epoch {epoch}: the energy or the weights are not finite \
                 (NaN or infinite); lower --lr or --infer-rate"
            );
        }
    }

    let last_overflows = epochs.last().map_or(0, |epoch| epoch.overflows);
    if last_overflows > 0 {
        eprintln!(
            "warning: {last_overflows} results saturated or were not finite in the last epoch; \
             {} is too narrow for these settings, so lower --input-scale, --lr or --infer-rate",
            S::FORMAT.name()
        );
    }

    Ok(Trained {
        spec: spec.clone(),
        weights,
        scalings,
        epochs,
    })
}

/// Features and one-hot targets of every training row, row-major.
struct BatchInputs<'a, S> {
    inputs: &'a [S],
    targets: &'a [S],
    n_in: usize,
    n_out: usize,
}

/// Runs supervised inference on `rows`, row `k` in workspace slot `k`, and returns the sum of
/// final energies, the number of overflows and the number of inference steps taken.
///
/// Samples infer independently, so the batch is split across up to `threads` threads and the
/// activities and errors are the same bits for any split.
fn infer_batch<S: Scalar + Send + Sync>(
    network: &Network<'_, S>,
    buffers: &mut Buffers<S>,
    rows: &[usize],
    data: &BatchInputs<'_, S>,
    inference: &InferenceConfig<S>,
    threads: usize,
) -> Result<(f64, u64, u64)> {
    let arch = *network.arch();
    let per_thread = rows.len().div_ceil(threads.max(1));
    let activities = buffers
        .activities
        .chunks_mut(per_thread * arch.activities_len());
    let errors = buffers.errors.chunks_mut(per_thread * arch.errors_len());
    let scratch = buffers.scratch.chunks_mut(per_thread * arch.max_width());
    let parts = rows
        .chunks(per_thread)
        .zip(activities)
        .zip(errors)
        .zip(scratch);

    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .map(|(((rows, activities), errors), scratch)| {
                scope.spawn(move || -> Result<(f64, u64, u64)> {
                    let capacity = rows.len();
                    let activities = &mut activities[..capacity * arch.activities_len()];
                    let errors = &mut errors[..capacity * arch.errors_len()];
                    let scratch = &mut scratch[..capacity * arch.max_width()];
                    let mut overflows = vec![0; arch.depth()];
                    let mut workspace = Workspace::new(
                        &arch,
                        capacity,
                        activities,
                        errors,
                        scratch,
                        &mut overflows,
                    )?;
                    let mut energy = 0.0;
                    let mut steps = 0u64;
                    for (slot, &row) in rows.iter().enumerate() {
                        let input = &data.inputs[row * data.n_in..(row + 1) * data.n_in];
                        let target = &data.targets[row * data.n_out..(row + 1) * data.n_out];
                        let stats = network.infer_supervised(
                            &mut workspace,
                            slot,
                            input,
                            target,
                            inference,
                        )?;
                        energy += stats.final_energy.to_f64();
                        steps += stats.steps_taken as u64;
                    }
                    Ok((energy, workspace.total_overflows(), steps))
                })
            })
            .collect();
        let mut total = (0.0, 0, 0);
        for handle in handles {
            let (energy, overflows, steps) = handle
                .join()
                .map_err(|_| anyhow::anyhow!("an inference thread panicked"))??;
            total.0 += energy;
            total.1 += overflows;
            total.2 += steps;
        }
        Ok(total)
    })
}

/// One-hot targets of every row, row-major.
pub fn one_hot_targets<S: Scalar>(data: &Dataset) -> Vec<S> {
    let mut targets = vec![S::ZERO; data.len() * data.classes];
    for (row, &label) in data.labels.iter().enumerate() {
        let target = &mut targets[row * data.classes..(row + 1) * data.classes];
        // Labels were checked against `classes` when the data set was loaded.
        one_hot(label, target).expect("label below the class count");
    }
    targets
}

/// Fraction of samples whose feedforward arg-max equals the label.
pub fn accuracy<S: Scalar>(
    network: &Network<'_, S>,
    inputs: &[S],
    labels: &[usize],
) -> Result<f64> {
    let arch = *network.arch();
    let mut buffers = Buffers::<S>::new(&arch, 1);
    let mut workspace = buffers.workspace(&arch)?;
    let n_in = arch.width(0);
    let mut correct = 0;
    for (row, &label) in labels.iter().enumerate() {
        let input = &inputs[row * n_in..(row + 1) * n_in];
        let output = network
            .feedforward(&mut workspace, 0, input)
            .map_err(anyhow::Error::msg)?;
        if arg_max(output) == label {
            correct += 1;
        }
    }
    Ok(correct as f64 / labels.len().max(1) as f64)
}

/// Results of the test protocol that the firmware also runs.
#[derive(Clone, Debug, Serialize)]
pub struct ProtocolResult {
    /// Fraction of correct predictions.
    pub test_accuracy: f64,
    /// CRC-32 over every output, final energy and step count.
    pub checksum: u32,
    /// Predicted class per sample.
    pub predictions: Vec<usize>,
    /// Mean inference steps taken with the label clamped.
    pub mean_steps: f64,
    /// Saturated results over the whole run.
    pub overflows: u64,
}

/// Runs the firmware's test protocol on the host.
pub fn run_protocol<S: Scalar>(
    network: &Network<'_, S>,
    inference: &InferenceConfig<S>,
    inputs: &[S],
    labels: &[usize],
) -> Result<ProtocolResult> {
    let arch = *network.arch();
    let mut buffers = Buffers::<S>::new(&arch, 1);
    let mut workspace = buffers.workspace(&arch)?;
    let n_in = arch.width(0);
    let mut target = vec![S::ZERO; arch.width(arch.depth())];
    let mut checksum = TestChecksum::new();
    let mut predictions = Vec::with_capacity(labels.len());
    let mut steps = 0u64;
    for (row, &label) in labels.iter().enumerate() {
        let input = &inputs[row * n_in..(row + 1) * n_in];
        let result = evaluate_sample(
            network,
            &mut workspace,
            input,
            label,
            &mut target,
            inference,
            &mut checksum,
        )
        .with_context(|| format!("test protocol failed on sample {row}"))
        .map_err(|error| anyhow::anyhow!("{error:#}"))?;
        predictions.push(result.predicted);
        steps += result.steps_taken as u64;
    }
    let correct = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(ProtocolResult {
        test_accuracy: correct as f64 / labels.len().max(1) as f64,
        checksum: checksum.finalize(),
        predictions,
        mean_steps: steps as f64 / labels.len().max(1) as f64,
        overflows: workspace.total_overflows(),
    })
}
