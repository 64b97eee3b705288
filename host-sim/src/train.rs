//! Training and evaluation on the host, generic over the core's numeric formats.

use std::time::Instant;

use anyhow::{Context, Result};
use fixedpc::evaluate::{arg_max, evaluate_sample, one_hot, TestChecksum};
use fixedpc::{
    Activation, ActivityRounding, Adam, Arch, InferenceConfig, Network, Parameterisation, Scalar,
    Sgd, Workspace,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::adam_f32;
use crate::batched::BatchedF32;
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
    /// Rounding of activity updates in fixed point.
    #[serde(serialize_with = "serialize_rounding")]
    pub rounding: ActivityRounding,
}

fn serialize_rounding<S: serde::Serializer>(
    rounding: &ActivityRounding,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(rounding.name())
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
            rounding: self.rounding,
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
    /// Threads that infer the samples of a batch; the results are the same bits for any
    /// count.
    #[serde(skip)]
    pub threads: usize,
    /// Whether `f32` training runs the core one sample at a time with matrix-vector
    /// products, as a board does, instead of the batched matrix-matrix products of
    /// [`crate::batched`]. Other formats always run per sample.
    pub per_sample: bool,
}

/// Number of threads [`train`] uses by default: one per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |count| count.get())
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
    /// Of `overflows`, those in the inference and weight gradients of each layer `1 ..= L`
    /// (index `l - 1`).
    pub layer_overflows: Vec<u64>,
    /// Of `overflows`, those in the optimiser's weight updates.
    pub update_overflows: u64,
    /// Largest `|z_l|` of each layer `0 ..= L` over the training samples' final activities.
    pub max_abs_activity: Vec<f64>,
    /// Largest difference between two test samples' feedforward outputs, over every output
    /// unit; 0 means the output does not depend on the input.
    pub output_spread: f64,
    /// Mean over the training samples of how many layers, counted from the output, have a
    /// non-zero error at the end of inference. Inference starts with only the output error
    /// non-zero, and each step can carry it one layer further down.
    pub mean_error_reach: f64,
    /// Wall-clock seconds of the epoch's training.
    pub seconds: f64,
}

impl EpochReport {
    /// Describes saturation per layer, or returns `None` when nothing saturated.
    pub fn saturation_summary(&self) -> Option<String> {
        if self.overflows == 0 {
            return None;
        }
        let layers: Vec<String> = self
            .layer_overflows
            .iter()
            .enumerate()
            .filter(|(_, &count)| count > 0)
            .map(|(index, count)| format!("layer {}: {count}", index + 1))
            .collect();
        let mut summary = format!("{} saturated or non-finite results", self.overflows);
        if !layers.is_empty() {
            let shown = layers.len().min(8);
            summary += &format!(" ({}", layers[..shown].join(", "));
            if layers.len() > shown {
                summary += &format!(", and {} more layers", layers.len() - shown);
            }
            summary += ")";
        }
        if self.update_overflows > 0 {
            summary += &format!(", {} in weight updates", self.update_overflows);
        }
        Some(summary)
    }

    /// Returns whether the feedforward output hardly depends on the input: every output unit
    /// varies by less than [`COLLAPSED_OUTPUT_SPREAD`] over the test samples.
    pub fn output_collapsed(&self) -> bool {
        self.output_spread < COLLAPSED_OUTPUT_SPREAD
    }
}

/// Output spread below which a network counts as collapsed: far below the differences
/// between class scores of a trained network (about 0.1 to 1 for one-hot targets).
pub const COLLAPSED_OUTPUT_SPREAD: f64 = 1e-4;

/// Training stopped because the energy or the weights stopped being finite numbers.
#[derive(Debug)]
pub struct Diverged {
    /// Epoch (from 1) in which it happened.
    pub epoch: usize,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training diverged in epoch {}: the energy or the weights are not finite (NaN or \
             infinite); lower --lr or --infer-rate, or use --param mupc for deep networks",
            self.epoch
        )
    }
}

impl std::error::Error for Diverged {}

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
///
/// `f32` runs the batched products of [`crate::batched`] unless `config.per_sample` is set.
/// Every other format, and `f32` with `per_sample`, runs the core one sample at a time.
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
    let mut engine = gradient_engine::<S>(&arch, spec, config);
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

    for epoch in 1..=config.epochs {
        let started = Instant::now();
        order.shuffle(&mut shuffler);
        let mut energy_sum = 0.0;
        let mut stats = BatchStats::new(&arch);
        let mut update_overflows = 0u64;

        for chunk in order.chunks(batch) {
            let network = Network::new(arch, &weights, &scalings).map_err(anyhow::Error::msg)?;
            let batch_inputs = BatchInputs {
                inputs: &inputs,
                targets: &targets,
                n_in,
                n_out,
            };
            // Adam is invariant to a constant factor per layer, so it steps on the gradients
            // divided by a_l, which keeps small muPC gradients from rounding to zero.
            let unscaled = config.optimizer == OptimizerKind::Adam;
            let batch_stats = engine.gradients(
                &network,
                chunk,
                &batch_inputs,
                &inference,
                unscaled,
                &mut gradients,
            )?;
            energy_sum += batch_stats.energy;
            stats.merge(&batch_stats);
            let step_overflows = match config.optimizer {
                OptimizerKind::Sgd => sgd
                    .step(&mut weights, &gradients)
                    .map_err(anyhow::Error::msg)?,
                OptimizerKind::Adam => engine.adam_step(
                    &mut adam,
                    &mut weights,
                    &gradients,
                    &mut first,
                    &mut second,
                )?,
            };
            update_overflows += step_overflows as u64;
        }

        let seconds = started.elapsed().as_secs_f64();
        let network = Network::new(arch, &weights, &scalings).map_err(anyhow::Error::msg)?;
        let test = test_outputs(&network, &test_inputs, &test_set.labels)?;
        let layer_overflows = stats.overflows;
        let report = EpochReport {
            epoch,
            mean_energy: energy_sum / train_set.len() as f64,
            test_accuracy: test.accuracy,
            overflows: layer_overflows.iter().sum::<u64>() + update_overflows,
            layer_overflows,
            update_overflows,
            max_abs_activity: stats.max_abs_activity,
            output_spread: test.output_spread,
            mean_inference_steps: stats.steps as f64 / train_set.len().max(1) as f64,
            mean_error_reach: stats.error_reach_sum as f64 / train_set.len().max(1) as f64,
            seconds,
        };
        progress(&report);
        let diverged = !report.mean_energy.is_finite();
        epochs.push(report);
        if diverged || weights.iter().any(|w| !w.to_f64().is_finite()) {
            return Err(Diverged { epoch }.into());
        }
    }

    if let Some(last) = epochs.last() {
        warn_collapse::<S>(last);
    }

    Ok(Trained {
        spec: spec.clone(),
        weights,
        scalings,
        epochs,
    })
}

/// Prints what went wrong in the last epoch: saturation per layer, and an output that does
/// not depend on the input.
fn warn_collapse<S: Scalar>(last: &EpochReport) {
    if let Some(summary) = last.saturation_summary() {
        let layer_max = last.max_abs_activity.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "warning: {summary} in the last epoch, and the largest |activity| was {layer_max}; \
             {} is too narrow for these activities, so the results are not reliable. Lower \
             --input-scale, --lr or --infer-rate, or use --param mupc for deep networks",
            S::FORMAT.name()
        );
    }
    if last.output_collapsed() {
        eprintln!(
            "warning: the network's output varies by at most {:.1e} over the test samples, so it \
             predicts (nearly) one class for every input: the signal vanished or saturated on \
             its way through the layers. Use --skip or --param mupc for deep networks",
            last.output_spread
        );
    }
}

/// Overflow counts and activity ranges of the samples of one or more batches.
struct BatchStats {
    energy: f64,
    overflows: Vec<u64>,
    max_abs_activity: Vec<f64>,
    error_reach_sum: u64,
    /// Inference steps taken, summed over the samples.
    steps: u64,
}

impl BatchStats {
    fn new(arch: &Arch<'_>) -> Self {
        BatchStats {
            energy: 0.0,
            overflows: vec![0; arch.depth()],
            max_abs_activity: vec![0.0; arch.depth() + 1],
            error_reach_sum: 0,
            steps: 0,
        }
    }

    /// Adds how many layers, counted from the output, the errors `e_1 .. e_L` of one sample
    /// reach: `L + 1 - l` for the lowest layer `l` with a non-zero error.
    fn add_error_reach<S: Scalar>(&mut self, arch: &Arch<'_>, errors: &[S]) {
        self.add_error_reach_by_layer(arch.depth(), |layer| {
            let offset = arch.error_offset(layer);
            &errors[offset..offset + arch.width(layer)]
        });
    }

    /// As [`BatchStats::add_error_reach`], with `errors(l)` returning `e_l`.
    fn add_error_reach_by_layer<'e, S: Scalar>(
        &mut self,
        depth: usize,
        errors: impl Fn(usize) -> &'e [S],
    ) {
        let lowest = (1..=depth).find(|&layer| errors(layer).iter().any(|&error| error != S::ZERO));
        if let Some(layer) = lowest {
            self.error_reach_sum += (depth + 1 - layer) as u64;
        }
    }

    fn add_overflows(&mut self, counts: &[u32]) {
        for (total, &count) in self.overflows.iter_mut().zip(counts) {
            *total += count as u64;
        }
    }

    /// Raises the per-layer maxima to the activities `z_0 .. z_L` of one sample.
    fn add_activities<S: Scalar>(&mut self, arch: &Arch<'_>, activities: &[S]) {
        self.add_activities_by_layer(|layer| {
            let offset = arch.activity_offset(layer);
            &activities[offset..offset + arch.width(layer)]
        });
    }

    /// As [`BatchStats::add_activities`], with `activities(l)` returning `z_l`.
    fn add_activities_by_layer<'z, S: Scalar>(&mut self, activities: impl Fn(usize) -> &'z [S]) {
        for (layer, max) in self.max_abs_activity.iter_mut().enumerate() {
            for value in activities(layer) {
                // A NaN activity counts as infinite.
                let magnitude = value.to_f64().abs();
                let magnitude = if magnitude.is_nan() {
                    f64::INFINITY
                } else {
                    magnitude
                };
                *max = f64::max(*max, magnitude);
            }
        }
    }

    fn merge(&mut self, other: &BatchStats) {
        for (total, &count) in self.overflows.iter_mut().zip(&other.overflows) {
            *total += count;
        }
        for (max, &value) in self
            .max_abs_activity
            .iter_mut()
            .zip(&other.max_abs_activity)
        {
            *max = f64::max(*max, value);
        }
        self.error_reach_sum += other.error_reach_sum;
        self.steps += other.steps;
    }
}

/// Features and one-hot targets of every training row, row-major.
struct BatchInputs<'a, S> {
    inputs: &'a [S],
    targets: &'a [S],
    n_in: usize,
    n_out: usize,
}

/// Source of a batch's weight gradients, and the Adam update that follows: the core one
/// sample at a time, or batched `f32` products.
trait GradientEngine<S: Scalar> {
    /// Runs supervised inference on the samples `rows` and writes their weight gradients
    /// into `gradients`, divided by `a_l` when `unscaled`. Returns the sum of final
    /// energies, the overflows per layer (inference and gradients), the activity ranges and
    /// the inference steps taken.
    fn gradients(
        &mut self,
        network: &Network<'_, S>,
        rows: &[usize],
        data: &BatchInputs<'_, S>,
        inference: &InferenceConfig<S>,
        unscaled: bool,
        gradients: &mut [S],
    ) -> Result<BatchStats>;

    /// Applies one step of `adam` to `weights` and returns the number of overflowed updates
    /// (non-finite in a float format, saturated in fixed point), as `adam.step` does.
    fn adam_step(
        &mut self,
        adam: &mut Adam,
        weights: &mut [S],
        gradients: &[S],
        first: &mut [S::Moment],
        second: &mut [S::Moment],
    ) -> Result<u32> {
        adam.step(weights, gradients, first, second)
            .map_err(anyhow::Error::msg)
    }
}

/// Picks batched products for `f32` unless `config.per_sample` is set, else the core.
fn gradient_engine<S: Scalar + Send + Sync>(
    arch: &Arch<'_>,
    spec: &NetworkSpec,
    config: &TrainConfig,
) -> Box<dyn GradientEngine<S>> {
    let batch = config.batch.max(1);
    if !config.per_sample {
        let batched: Box<dyn GradientEngine<f32>> = Box::new(BatchedEngine {
            batched: BatchedF32::new(arch, batch),
            inputs: Vec::with_capacity(batch * spec.widths[0]),
            targets: Vec::with_capacity(batch * spec.widths[spec.widths.len() - 1]),
            threads: config.threads.max(1),
        });
        // The downcast succeeds exactly when `S` is `f32`.
        let any: Box<dyn std::any::Any> = Box::new(batched);
        if let Ok(engine) = any.downcast::<Box<dyn GradientEngine<S>>>() {
            return *engine;
        }
    }
    Box::new(PerSampleEngine {
        buffers: Buffers::new(arch, batch),
        threads: config.threads.max(1),
    })
}

/// The core's per-sample inference and gradients, the path a board runs.
struct PerSampleEngine<S> {
    buffers: Buffers<S>,
    threads: usize,
}

impl<S: Scalar + Send + Sync> GradientEngine<S> for PerSampleEngine<S> {
    fn gradients(
        &mut self,
        network: &Network<'_, S>,
        rows: &[usize],
        data: &BatchInputs<'_, S>,
        inference: &InferenceConfig<S>,
        unscaled: bool,
        gradients: &mut [S],
    ) -> Result<BatchStats> {
        let mut stats = infer_batch(
            network,
            &mut self.buffers,
            rows,
            data,
            inference,
            self.threads,
        )?;
        let mut workspace = self.buffers.workspace(network.arch())?;
        workspace.reset_overflows();
        if unscaled {
            network.weight_gradients_unscaled(&mut workspace, rows.len(), gradients)
        } else {
            network.weight_gradients(&mut workspace, rows.len(), gradients)
        }
        .map_err(anyhow::Error::msg)?;
        stats.add_overflows(workspace.overflows());
        Ok(stats)
    }
}

/// Batched `f32` inference and gradients with matrix-matrix products.
struct BatchedEngine {
    batched: BatchedF32,
    /// Inputs and targets of the batch's samples, one row per sample.
    inputs: Vec<f32>,
    targets: Vec<f32>,
    threads: usize,
}

impl GradientEngine<f32> for BatchedEngine {
    fn gradients(
        &mut self,
        network: &Network<'_, f32>,
        rows: &[usize],
        data: &BatchInputs<'_, f32>,
        inference: &InferenceConfig<f32>,
        unscaled: bool,
        gradients: &mut [f32],
    ) -> Result<BatchStats> {
        self.inputs.clear();
        self.targets.clear();
        for &row in rows {
            self.inputs
                .extend_from_slice(&data.inputs[row * data.n_in..(row + 1) * data.n_in]);
            self.targets
                .extend_from_slice(&data.targets[row * data.n_out..(row + 1) * data.n_out]);
        }
        let threads = self
            .threads
            .min(useful_threads(network.arch(), rows.len(), inference.steps));
        let batched = &mut self.batched;
        batched.reset_overflows();
        batched.infer(network, &self.inputs, &self.targets, inference, threads)?;
        batched.weight_gradients(network, unscaled, gradients)?;

        let arch = network.arch();
        let mut stats = BatchStats::new(arch);
        for sample in 0..rows.len() {
            let result = batched.sample_stats(sample);
            stats.energy += result.final_energy.to_f64();
            stats.steps += u64::from(result.steps_taken);
            stats.add_error_reach_by_layer(arch.depth(), |layer| batched.errors(layer, sample));
        }
        for (layer, max) in stats.max_abs_activity.iter_mut().enumerate() {
            *max = f64::max(*max, max_magnitude(batched.layer_activities(layer)));
        }
        stats.add_overflows(batched.overflows());
        Ok(stats)
    }

    /// Runs the core's `f32` Adam update in a loop that vectorises, with the same bits.
    fn adam_step(
        &mut self,
        adam: &mut Adam,
        weights: &mut [f32],
        gradients: &[f32],
        first: &mut [f32],
        second: &mut [f32],
    ) -> Result<u32> {
        adam_f32::adam_step(adam, weights, gradients, first, second)
    }
}

/// Returns the largest `|x|` of `values` as [`BatchStats::add_activities_by_layer`] takes it: 0
/// for no values, and infinity when one is NaN.
///
/// The magnitudes are compared as integers, which order non-negative floats as their values
/// do and put NaN above infinity, so the loop vectorises.
fn max_magnitude(values: &[f32]) -> f64 {
    let largest = values
        .iter()
        .map(|value| value.to_bits() & !(1 << 31))
        .max()
        .unwrap_or(0);
    if largest > f32::INFINITY.to_bits() {
        f64::INFINITY
    } else {
        f64::from(f32::from_bits(largest))
    }
}

/// Multiply-accumulates of batched inference that one thread should have to do before the
/// batch is split: about a millisecond of products on one core, so that starting a thread
/// (tens of microseconds) costs a few percent of that.
const MIN_PRODUCTS_PER_THREAD: usize = 1 << 24;

/// Returns how many threads the products of one batch keep busy: at most one per
/// [`MIN_PRODUCTS_PER_THREAD`], counting a prediction and a feedback product per layer and
/// step (an upper bound, because layers that errors have not reached are skipped).
fn useful_threads(arch: &Arch<'_>, samples: usize, steps: u32) -> usize {
    let per_step: usize = (1..=arch.depth())
        .map(|layer| 2 * arch.width(layer) * arch.width(layer - 1))
        .sum();
    let products = per_step * samples * steps.max(1) as usize;
    (products / MIN_PRODUCTS_PER_THREAD).max(1)
}

/// Runs supervised inference on `rows`, row `k` in workspace slot `k`, and returns the sum of
/// final energies, the overflows per layer, the activity ranges and the inference steps taken.
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
) -> Result<BatchStats> {
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
                scope.spawn(move || -> Result<BatchStats> {
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
                    let mut stats = BatchStats::new(&arch);
                    for (slot, &row) in rows.iter().enumerate() {
                        let input = &data.inputs[row * data.n_in..(row + 1) * data.n_in];
                        let target = &data.targets[row * data.n_out..(row + 1) * data.n_out];
                        let result = network.infer_supervised(
                            &mut workspace,
                            slot,
                            input,
                            target,
                            inference,
                        )?;
                        stats.energy += result.final_energy.to_f64();
                        stats.steps += u64::from(result.steps_taken);
                        stats.add_activities(&arch, workspace.activities(slot));
                        stats.add_error_reach(&arch, workspace.errors(slot));
                    }
                    stats.add_overflows(workspace.overflows());
                    Ok(stats)
                })
            })
            .collect();
        let mut total = BatchStats::new(&arch);
        for handle in handles {
            let stats = handle
                .join()
                .map_err(|_| anyhow::anyhow!("an inference thread panicked"))??;
            total.energy += stats.energy;
            total.merge(&stats);
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
    Ok(test_outputs(network, inputs, labels)?.accuracy)
}

/// Accuracy and output spread of the feedforward pass on a test set.
pub struct TestOutputs {
    /// Fraction of samples whose arg-max equals the label.
    pub accuracy: f64,
    /// Largest difference between two samples' outputs, over every output unit.
    pub output_spread: f64,
}

/// Runs the feedforward pass on every test sample.
pub fn test_outputs<S: Scalar>(
    network: &Network<'_, S>,
    inputs: &[S],
    labels: &[usize],
) -> Result<TestOutputs> {
    let arch = *network.arch();
    let mut buffers = Buffers::<S>::new(&arch, 1);
    let mut workspace = buffers.workspace(&arch)?;
    let n_in = arch.width(0);
    let n_out = arch.width(arch.depth());
    let mut lowest = vec![f64::INFINITY; n_out];
    let mut highest = vec![f64::NEG_INFINITY; n_out];
    let mut correct = 0;
    for (row, &label) in labels.iter().enumerate() {
        let input = &inputs[row * n_in..(row + 1) * n_in];
        let output = network
            .feedforward(&mut workspace, 0, input)
            .map_err(anyhow::Error::msg)?;
        if arg_max(output) == label {
            correct += 1;
        }
        for (unit, value) in output.iter().enumerate() {
            lowest[unit] = f64::min(lowest[unit], value.to_f64());
            highest[unit] = f64::max(highest[unit], value.to_f64());
        }
    }
    let output_spread = lowest
        .iter()
        .zip(&highest)
        .map(|(low, high)| high - low)
        .filter(|spread| spread.is_finite())
        .fold(0.0, f64::max);
    Ok(TestOutputs {
        accuracy: correct as f64 / labels.len().max(1) as f64,
        output_spread,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_magnitude_matches_batch_stats() {
        let cases: [&[f32]; 7] = [
            &[],
            &[-0.0, 0.0],
            &[1.5, -2.5, 0.25],
            &[f32::MIN_POSITIVE / 4.0, -f32::MIN_POSITIVE / 2.0],
            &[3.0, f32::NEG_INFINITY, 1.0],
            &[1.0, f32::NAN, f32::INFINITY],
            &[-f32::NAN, 2.0],
        ];
        for values in cases {
            let mut stats = BatchStats {
                energy: 0.0,
                overflows: Vec::new(),
                max_abs_activity: vec![0.0],
                error_reach_sum: 0,
                steps: 0,
            };
            stats.add_activities_by_layer(|_| values);
            let expected = stats.max_abs_activity[0];
            let actual = max_magnitude(values);
            assert_eq!(actual.to_bits(), expected.to_bits(), "{values:?}");
        }
    }
}
