//! Golden cases computed by JPC: the file schema, a validating loader, and runs of a case
//! through the `f64` reference and through the core in any numeric format.
//!
//! Conventions of the cases (JPC 1.0.0, float64): the energy is averaged over the batch,
//! `F = 1/(2B) sum_b sum_l |e_l|^2`, so JPC's activity gradients carry a factor `1/B` and its
//! step `eta` is the core's per-sample step `eta / B`. Every quantity is flattened in the
//! order of the file, for example `activities_init[layer][sample][unit]`.

use std::path::Path;

use anyhow::Result;
use fixedpc::{
    Activation, ActivityRounding, Arch, InferenceConfig, Network, Scalar, Sgd, Workspace,
};
use serde::{Deserialize, Serialize};

use crate::data::input_error;
use crate::reference::{self, Matrix};

/// Network description of a case.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CaseNetwork {
    /// Width `n_0` of the input.
    pub input_dim: usize,
    /// Width of every hidden layer.
    pub width: usize,
    /// Number of weight layers `L`.
    pub depth: usize,
    /// Width `n_L` of the output.
    pub output_dim: usize,
    /// JPC's activation name.
    pub activation: String,
    /// `sp` or `mupc`.
    pub param_type: String,
    /// Whether layers `2 ..= L-1` have identity skips.
    pub skip: bool,
    /// Layers with a skip, counted from 0 (layer `l` is `l - 1` here).
    pub skip_layers_0based: Vec<usize>,
    /// Whether the layers have biases (the cases carry none, so this must be false).
    pub use_bias: bool,
    /// Seed JPC drew the weights with (informational).
    #[serde(default)]
    pub prng_seed_jax: Option<u64>,
}

/// Inference settings of a case.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CaseInference {
    /// Description of the update rule (informational).
    #[serde(default)]
    pub rule: Option<String>,
    /// JPC's step size `eta` on the batch-averaged energy.
    pub step_size: f64,
    /// Number of steps `T`.
    pub steps: usize,
    /// JPC's run settings, for information only.
    #[serde(default)]
    pub implementation: Option<String>,
    /// Free layers, for information only.
    #[serde(default)]
    pub free_layers: Option<String>,
}

/// JPC's results.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CaseExpected {
    /// Free layers after the feedforward pass, `[layer][sample][unit]`.
    pub activities_init: Vec<Matrix>,
    /// Feedforward output, `[sample][unit]`.
    pub output_prediction_init: Matrix,
    /// `dF/dz_l` at the start, `[layer][sample][unit]`.
    pub activity_grads_init: Vec<Matrix>,
    /// Batch energy at the start.
    pub energy_init: f64,
    /// Batch energy after `0 ..= T` steps.
    pub energy_trace: Vec<f64>,
    /// Free layers after `T` steps, `[layer][sample][unit]`.
    pub activities_final: Vec<Matrix>,
    /// `dF/dW_l` at the final activities, `[layer][out][in]`.
    pub weight_grads: Vec<Matrix>,
    /// `W - lr * dF/dW`, `[layer][out][in]`.
    pub weights_after_sgd: Vec<Matrix>,
    /// SGD learning rate.
    pub lr: f64,
}

/// One golden case: a network, a batch and JPC's results.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Case {
    /// Short name of the case.
    pub name: String,
    /// Shapes, activation and parameterisation.
    pub network: CaseNetwork,
    /// Scalings `a_1 .. a_L` JPC used.
    pub scalings: Vec<f64>,
    /// Weights `W_1 .. W_L`, unscaled, `[out][in]`.
    pub weights: Vec<Matrix>,
    /// Inputs, `[sample][unit]`.
    pub x: Matrix,
    /// Targets, `[sample][unit]`.
    pub y: Matrix,
    /// Batch size `B`.
    pub batch_size: usize,
    /// Inference settings.
    pub inference: CaseInference,
    /// JPC's results.
    pub expected: CaseExpected,
}

/// Names of the compared quantities, in report order.
pub const QUANTITIES: [&str; 8] = [
    "activities_init",
    "output_prediction_init",
    "activity_grads_init",
    "energy_init",
    "energy_trace",
    "activities_final",
    "weight_grads",
    "weights_after_sgd",
];

/// Loads and validates a case file.
///
/// # Errors
///
/// An input error (exit status 2 in `pcsim`) naming the file and what is wrong: unreadable,
/// invalid JSON, a missing field, or shapes that do not fit the network.
pub fn load_case(path: &Path) -> Result<Case> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        input_error(format!(
            "failed to read golden case {}: {error}",
            path.display()
        ))
    })?;
    let case: Case = serde_json::from_str(&text).map_err(|error| {
        input_error(format!(
            "golden case {} is invalid JSON or does not follow the case schema: {error}",
            path.display()
        ))
    })?;
    case.validate().map_err(|problem| {
        input_error(format!(
            "golden case {} is invalid: {problem}",
            path.display()
        ))
    })?;
    Ok(case)
}

fn check_matrix(name: &str, matrix: &Matrix, rows: usize, columns: usize) -> Result<(), String> {
    if matrix.len() != rows {
        return Err(format!("{name} has {} rows, expected {rows}", matrix.len()));
    }
    for (row, values) in matrix.iter().enumerate() {
        if values.len() != columns {
            return Err(format!(
                "{name}[{row}] has {} values, expected {columns}",
                values.len()
            ));
        }
        if let Some(column) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("{name}[{row}][{column}] is not a finite number"));
        }
    }
    Ok(())
}

fn check_finite(name: &str, value: f64) -> Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{name} is {value}, expected a finite number"))
    }
}

impl Case {
    /// Widths `n_0 .. n_L`.
    pub fn widths(&self) -> Vec<usize> {
        let network = &self.network;
        let mut widths = vec![network.input_dim];
        widths.extend(std::iter::repeat_n(
            network.width,
            network.depth.saturating_sub(1),
        ));
        widths.push(network.output_dim);
        widths
    }

    /// Whether layer `layer` (1-based) has an identity skip.
    pub fn has_skip(&self, layer: usize) -> bool {
        self.network.skip_layers_0based.contains(&(layer - 1))
    }

    /// JPC's step divided by the batch size: the core's per-sample step.
    pub fn sample_step(&self) -> f64 {
        self.inference.step_size / self.batch_size as f64
    }

    /// The core's activation of this case.
    pub fn core_activation(&self) -> Activation {
        // `validate` accepted the name.
        Activation::from_name(&self.network.activation).unwrap_or(Activation::Linear)
    }

    /// Checks every shape and convention the runs rely on.
    ///
    /// # Errors
    ///
    /// A message naming the first field that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let network = &self.network;
        let depth = network.depth;
        if depth == 0 {
            return Err("network.depth is 0, expected at least 1".into());
        }
        if network.input_dim == 0 || network.output_dim == 0 || (depth > 1 && network.width == 0) {
            return Err("network widths (input_dim, width, output_dim) must be positive".into());
        }
        if reference::Activation::from_name(&network.activation).is_none()
            || Activation::from_name(&network.activation).is_none()
        {
            return Err(format!(
                "network.activation '{}' is unknown; expected linear, tanh, hard_tanh, relu or \
                 leaky_relu",
                network.activation
            ));
        }
        if network.param_type != "sp" && network.param_type != "mupc" {
            return Err(format!(
                "network.param_type '{}' is unknown; expected sp or mupc",
                network.param_type
            ));
        }
        if network.use_bias {
            return Err(
                "network.use_bias is true, but the case schema has no biases; expected false"
                    .into(),
            );
        }
        let expected_skips: Vec<usize> = if network.skip && depth >= 3 {
            (1..depth - 1).collect()
        } else {
            Vec::new()
        };
        let mut skips = network.skip_layers_0based.clone();
        skips.sort_unstable();
        if skips != expected_skips {
            return Err(format!(
                "network.skip_layers_0based is {:?} with skip = {}; skips sit on layers 2..L-1, \
                 so expected {expected_skips:?}",
                network.skip_layers_0based, network.skip
            ));
        }

        let widths = self.widths();
        if self.scalings.len() != depth {
            return Err(format!(
                "scalings has {} values, expected depth = {depth}",
                self.scalings.len()
            ));
        }
        for (index, &scaling) in self.scalings.iter().enumerate() {
            check_finite(&format!("scalings[{index}]"), scaling)?;
        }
        if self.weights.len() != depth {
            return Err(format!(
                "weights has {} matrices, expected depth = {depth}",
                self.weights.len()
            ));
        }
        for layer in 1..=depth {
            check_matrix(
                &format!("weights[{}]", layer - 1),
                &self.weights[layer - 1],
                widths[layer],
                widths[layer - 1],
            )?;
        }
        let batch = self.batch_size;
        if batch == 0 {
            return Err("batch_size is 0, expected at least 1".into());
        }
        check_matrix("x", &self.x, batch, widths[0])?;
        check_matrix("y", &self.y, batch, widths[depth])?;

        let inference = &self.inference;
        check_finite("inference.step_size", inference.step_size)?;
        if inference.steps > MAX_STEPS {
            return Err(format!(
                "inference.steps is {}, above the supported {MAX_STEPS}",
                inference.steps
            ));
        }
        self.validate_expected(&widths)
    }

    fn validate_expected(&self, widths: &[usize]) -> Result<(), String> {
        let expected = &self.expected;
        let depth = widths.len() - 1;
        let batch = self.batch_size;
        for (name, layers) in [
            ("expected.activities_init", &expected.activities_init),
            (
                "expected.activity_grads_init",
                &expected.activity_grads_init,
            ),
            ("expected.activities_final", &expected.activities_final),
        ] {
            if layers.len() != depth - 1 {
                return Err(format!(
                    "{name} has {} layers, expected depth - 1 = {}",
                    layers.len(),
                    depth - 1
                ));
            }
            for (index, matrix) in layers.iter().enumerate() {
                check_matrix(
                    &format!("{name}[{index}]"),
                    matrix,
                    batch,
                    widths[index + 1],
                )?;
            }
        }
        check_matrix(
            "expected.output_prediction_init",
            &expected.output_prediction_init,
            batch,
            widths[depth],
        )?;
        check_finite("expected.energy_init", expected.energy_init)?;
        if expected.energy_trace.len() != self.inference.steps + 1 {
            return Err(format!(
                "expected.energy_trace has {} values, expected steps + 1 = {}",
                expected.energy_trace.len(),
                self.inference.steps + 1
            ));
        }
        for (index, &energy) in expected.energy_trace.iter().enumerate() {
            check_finite(&format!("expected.energy_trace[{index}]"), energy)?;
        }
        for (name, matrices) in [
            ("expected.weight_grads", &expected.weight_grads),
            ("expected.weights_after_sgd", &expected.weights_after_sgd),
        ] {
            if matrices.len() != depth {
                return Err(format!(
                    "{name} has {} matrices, expected depth = {depth}",
                    matrices.len()
                ));
            }
            for layer in 1..=depth {
                check_matrix(
                    &format!("{name}[{}]", layer - 1),
                    &matrices[layer - 1],
                    widths[layer],
                    widths[layer - 1],
                )?;
            }
        }
        check_finite("expected.lr", expected.lr)
    }

    /// Builds the `f64` reference network of the case.
    pub fn reference_network(&self) -> reference::Network {
        let depth = self.network.depth;
        // `validate` checked the shapes, so construction cannot fail on a loaded case.
        reference::Network::new(
            self.widths(),
            reference::Activation::from_name(&self.network.activation)
                .unwrap_or(reference::Activation::Linear),
            self.scalings.clone(),
            (1..=depth).map(|layer| self.has_skip(layer)).collect(),
            self.weights.clone(),
        )
        .expect("validated case has consistent shapes")
    }
}

/// Largest number of inference steps a case may ask for; the bound analysis costs
/// `O(T * window)` products per sample, so this keeps `pcsim check` to seconds.
pub const MAX_STEPS: usize = 10_000;

/// The eight compared quantities of one run, each flattened in the file's order.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Outputs {
    /// Free layers after the feedforward pass.
    pub activities_init: Vec<f64>,
    /// Feedforward output.
    pub output_prediction_init: Vec<f64>,
    /// `dF/dz_l` at the start, with the factor `1/B`.
    pub activity_grads_init: Vec<f64>,
    /// Batch energy at the start.
    pub energy_init: Vec<f64>,
    /// Batch energy after `0 ..= T` steps.
    pub energy_trace: Vec<f64>,
    /// Free layers after `T` steps.
    pub activities_final: Vec<f64>,
    /// `dF/dW_l` at the final activities.
    pub weight_grads: Vec<f64>,
    /// Weights after one SGD step.
    pub weights_after_sgd: Vec<f64>,
}

impl Outputs {
    /// Returns the quantities in [`QUANTITIES`] order.
    pub fn quantities(&self) -> [&[f64]; 8] {
        [
            &self.activities_init,
            &self.output_prediction_init,
            &self.activity_grads_init,
            &self.energy_init,
            &self.energy_trace,
            &self.activities_final,
            &self.weight_grads,
            &self.weights_after_sgd,
        ]
    }
}

fn flatten_layers(layers: &[Matrix]) -> Vec<f64> {
    layers.iter().flatten().flatten().copied().collect()
}

/// Flattens per-sample free layers `[sample][layer][unit]` into the file's
/// `[layer][sample][unit]` order.
fn flatten_free_layers(per_sample: &[Vec<Vec<f64>>]) -> Vec<f64> {
    let layers = per_sample.first().map_or(0, |sample| sample.len());
    let mut flat = Vec::new();
    for layer in 0..layers {
        for sample in per_sample {
            flat.extend_from_slice(&sample[layer]);
        }
    }
    flat
}

/// JPC's results of a case, flattened.
pub fn expected_outputs(case: &Case) -> Outputs {
    let expected = &case.expected;
    Outputs {
        activities_init: flatten_layers(&expected.activities_init),
        output_prediction_init: expected.output_prediction_init.concat(),
        activity_grads_init: flatten_layers(&expected.activity_grads_init),
        energy_init: vec![expected.energy_init],
        energy_trace: expected.energy_trace.clone(),
        activities_final: flatten_layers(&expected.activities_final),
        weight_grads: flatten_layers(&expected.weight_grads),
        weights_after_sgd: flatten_layers(&expected.weights_after_sgd),
    }
}

/// Runs a case through the `f64` reference and returns its trajectory.
pub fn run_reference(case: &Case) -> reference::Trajectory {
    reference::run(
        &case.reference_network(),
        &case.x,
        &case.y,
        case.inference.step_size,
        case.inference.steps,
        case.expected.lr,
    )
}

/// Flattens a reference trajectory into the compared quantities.
pub fn reference_outputs(trajectory: &reference::Trajectory) -> Outputs {
    let free = |states: &[reference::Activities]| -> Vec<Vec<Vec<f64>>> {
        states
            .iter()
            .map(|sample| sample[1..sample.len() - 1].to_vec())
            .collect()
    };
    let initial = &trajectory.states[0];
    let last = &trajectory.states[trajectory.states.len() - 1];
    Outputs {
        activities_init: flatten_free_layers(&free(initial)),
        output_prediction_init: trajectory.output_predictions.concat(),
        activity_grads_init: flatten_free_layers(&trajectory.initial_activity_gradients),
        energy_init: vec![trajectory.energy_trace[0]],
        energy_trace: trajectory.energy_trace.clone(),
        activities_final: flatten_free_layers(&free(last)),
        weight_grads: flatten_layers(&trajectory.weight_gradients),
        weights_after_sgd: flatten_layers(&trajectory.weights_after_sgd),
    }
}

/// Result of running a case through the core.
#[derive(Clone, Debug)]
pub struct CoreRun {
    /// The compared quantities, converted to `f64` and in JPC's batch-averaged convention.
    pub outputs: Outputs,
    /// Saturated (fixed point) or non-finite (float) results: conversions of the case's
    /// numbers, inference, weight gradients and the SGD step.
    pub overflows: u64,
}

/// Runs a case through the core in format `S`.
///
/// Per sample: [`Network::feedforward`] for the output prediction, then
/// [`Network::infer_supervised`] with zero steps (feedforward, clamp the target, compute the
/// errors), [`Network::activity_gradient`] for every free layer, and `T` rounds of
/// [`Network::inference_step`] followed by [`Network::compute_errors`], which keeps the errors
/// current for the next step and returns the energy. Then [`Network::weight_gradients`] over
/// the batch and one [`Sgd`] step. The per-sample step is JPC's step divided by `B`; energies
/// are averaged and activity gradients divided by `B` in `f64` to match JPC.
///
/// # Errors
///
/// A core error (wrapped) if the shapes do not fit, which a validated case rules out.
pub fn run_core<S: Scalar>(case: &Case) -> Result<CoreRun> {
    let widths = case.widths();
    let depth = widths.len() - 1;
    let batch = case.batch_size;
    let arch = Arch::new(&widths, case.core_activation(), case.network.skip)
        .map_err(|error| anyhow::anyhow!("core rejected the case's shapes: {error}"))?;
    let mut conversions = 0u32;
    let mut convert = |value: f64| S::from_f64_rounded(value, &mut conversions);
    let mut weights: Vec<S> = flatten_layers(&case.weights)
        .into_iter()
        .map(&mut convert)
        .collect();
    let scalings: Vec<S> = case.scalings.iter().map(|&a| convert(a)).collect();
    let inputs: Vec<Vec<S>> = case
        .x
        .iter()
        .map(|row| row.iter().map(|&v| convert(v)).collect())
        .collect();
    let targets: Vec<Vec<S>> = case
        .y
        .iter()
        .map(|row| row.iter().map(|&v| convert(v)).collect())
        .collect();
    let step_size = convert(case.sample_step());
    let learning_rate = convert(case.expected.lr);

    let mut activities = vec![S::ZERO; batch * arch.activities_len()];
    let mut errors = vec![S::ZERO; batch * arch.errors_len()];
    let mut scratch = vec![S::ZERO; batch * arch.max_width()];
    let mut layer_overflows = vec![0u32; depth];
    let mut workspace = Workspace::new(
        &arch,
        batch,
        &mut activities,
        &mut errors,
        &mut scratch,
        &mut layer_overflows,
    )
    .map_err(|error| anyhow::anyhow!("core workspace: {error}"))?;
    let core = |error: fixedpc::Error| anyhow::anyhow!("core error: {error}");

    let mut gradients = vec![S::ZERO; weights.len()];
    let mut per_sample_predictions = Vec::with_capacity(batch);
    let mut per_sample_initial = Vec::with_capacity(batch);
    let mut per_sample_gradients = Vec::with_capacity(batch);
    let mut per_sample_final = Vec::with_capacity(batch);
    let mut energy_trace = vec![0.0; case.inference.steps + 1];
    let free_layers = |workspace: &Workspace<'_, S>, sample: usize| -> Vec<Vec<f64>> {
        let z = workspace.activities(sample);
        (1..depth)
            .map(|layer| {
                let offset = arch.activity_offset(layer);
                z[offset..offset + widths[layer]]
                    .iter()
                    .map(|v| v.to_f64())
                    .collect()
            })
            .collect()
    };
    let network = Network::new(arch, &weights, &scalings).map_err(core)?;
    let start = InferenceConfig {
        steps: 0,
        step_size,
        tolerance: None,
        rounding: ActivityRounding::Nearest,
    };

    for sample in 0..batch {
        let prediction = network
            .feedforward(&mut workspace, sample, &inputs[sample])
            .map_err(core)?;
        per_sample_predictions.push(prediction.iter().map(|v| v.to_f64()).collect::<Vec<_>>());
        let stats = network
            .infer_supervised(
                &mut workspace,
                sample,
                &inputs[sample],
                &targets[sample],
                &start,
            )
            .map_err(core)?;
        energy_trace[0] += stats.initial_energy.to_f64();
        per_sample_initial.push(free_layers(&workspace, sample));
        let mut sample_gradients = Vec::with_capacity(depth.saturating_sub(1));
        for layer in 1..depth {
            let gradient = network
                .activity_gradient(&mut workspace, sample, layer)
                .map_err(core)?;
            sample_gradients.push(
                gradient
                    .iter()
                    .map(|g| g.to_f64() / batch as f64)
                    .collect::<Vec<_>>(),
            );
        }
        per_sample_gradients.push(sample_gradients);
        for energy in energy_trace.iter_mut().skip(1) {
            network
                .inference_step(&mut workspace, sample, step_size)
                .map_err(core)?;
            *energy += network
                .compute_errors(&mut workspace, sample)
                .map_err(core)?
                .to_f64();
        }
        per_sample_final.push(free_layers(&workspace, sample));
    }
    network
        .weight_gradients(&mut workspace, batch, &mut gradients)
        .map_err(core)?;
    let mut overflows = u64::from(conversions) + workspace.total_overflows();
    let sgd = Sgd { learning_rate };
    overflows += u64::from(sgd.step(&mut weights, &gradients).map_err(core)?);

    for energy in &mut energy_trace {
        *energy /= batch as f64;
    }
    Ok(CoreRun {
        outputs: Outputs {
            activities_init: flatten_free_layers(&per_sample_initial),
            output_prediction_init: per_sample_predictions.concat(),
            activity_grads_init: flatten_free_layers(&per_sample_gradients),
            energy_init: vec![energy_trace[0]],
            energy_trace,
            activities_final: flatten_free_layers(&per_sample_final),
            weight_grads: gradients.iter().map(|g| g.to_f64()).collect(),
            weights_after_sgd: weights.iter().map(|w| w.to_f64()).collect(),
        },
        overflows,
    })
}

/// Largest absolute and relative difference between two runs of one quantity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ErrorStats {
    /// `max_i |a_i - b_i|`.
    pub max_abs: f64,
    /// `max_i |a_i - b_i| / max(|b_i|, floor)`, see [`relative_floor`].
    pub max_rel: f64,
}

/// Fraction of a quantity's largest magnitude below which an entry's relative error is
/// measured against that fraction instead of the entry itself.
///
/// Small entries come from cancellation, so their rounding error follows the size of the
/// terms, not of the result. For example JPC's hidden activity gradients after the
/// feedforward pass are rounding noise of about `1e-16` rather than exact zeros, and weight
/// gradients of one case span four orders of magnitude.
pub const RELATIVE_FLOOR_FRACTION: f64 = 1e-3;

/// Returns the floor of the relative error of a quantity: [`RELATIVE_FLOOR_FRACTION`] times
/// its largest magnitude, and at least the smallest positive normal `f64`.
pub fn relative_floor(expected: &[f64]) -> f64 {
    let largest = expected.iter().fold(0.0f64, |max, v| max.max(v.abs()));
    (RELATIVE_FLOOR_FRACTION * largest).max(f64::MIN_POSITIVE)
}

/// Compares `actual` with `expected` entry by entry.
///
/// # Panics
///
/// If the lengths differ, which means two runs of one case disagree on shapes (a bug).
pub fn compare(actual: &[f64], expected: &[f64]) -> ErrorStats {
    assert_eq!(
        actual.len(),
        expected.len(),
        "compared quantities differ in length"
    );
    let floor = relative_floor(expected);
    let mut stats = ErrorStats::default();
    for (&a, &b) in actual.iter().zip(expected) {
        let difference = (a - b).abs();
        stats.max_abs = stats.max_abs.max(difference);
        stats.max_rel = stats.max_rel.max(difference / b.abs().max(floor));
    }
    stats
}

/// Compares every quantity of two runs, in [`QUANTITIES`] order.
pub fn compare_outputs(actual: &Outputs, expected: &Outputs) -> [ErrorStats; 8] {
    let actual = actual.quantities();
    let expected = expected.quantities();
    std::array::from_fn(|index| compare(actual[index], expected[index]))
}

/// Builds a case whose expected results are the `f64` reference's, for property tests and
/// for cases JPC has not computed.
#[allow(clippy::too_many_arguments)]
pub fn synthesize(
    name: &str,
    network: CaseNetwork,
    scalings: Vec<f64>,
    weights: Vec<Matrix>,
    x: Matrix,
    y: Matrix,
    step_size: f64,
    steps: usize,
    lr: f64,
) -> Case {
    let batch_size = x.len();
    let mut case = Case {
        name: name.to_string(),
        network,
        scalings,
        weights,
        x,
        y,
        batch_size,
        inference: CaseInference {
            rule: None,
            step_size,
            steps,
            implementation: None,
            free_layers: None,
        },
        expected: CaseExpected {
            activities_init: Vec::new(),
            output_prediction_init: Vec::new(),
            activity_grads_init: Vec::new(),
            energy_init: 0.0,
            energy_trace: Vec::new(),
            activities_final: Vec::new(),
            weight_grads: Vec::new(),
            weights_after_sgd: Vec::new(),
            lr,
        },
    };
    let trajectory = run_reference(&case);
    let depth = case.network.depth;
    let free_layers = |states: &[reference::Activities]| -> Vec<Matrix> {
        (1..depth)
            .map(|layer| states.iter().map(|sample| sample[layer].clone()).collect())
            .collect()
    };
    let last = &trajectory.states[trajectory.states.len() - 1];
    case.expected = CaseExpected {
        activities_init: free_layers(&trajectory.states[0]),
        output_prediction_init: trajectory.output_predictions.clone(),
        activity_grads_init: (0..depth.saturating_sub(1))
            .map(|layer| {
                trajectory
                    .initial_activity_gradients
                    .iter()
                    .map(|sample| sample[layer].clone())
                    .collect()
            })
            .collect(),
        energy_init: trajectory.energy_trace[0],
        energy_trace: trajectory.energy_trace.clone(),
        activities_final: free_layers(last),
        weight_grads: trajectory.weight_gradients.clone(),
        weights_after_sgd: trajectory.weights_after_sgd.clone(),
        lr,
    };
    case
}
