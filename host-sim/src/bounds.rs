//! A bound on the error of the `I16F16` core against exact arithmetic, evaluated per case.
//!
//! The derivation is in `docs/NUMERICS.md`. Every fixed-point result differs from the exact
//! one by a propagated part and a local part. The propagated part is the error already in its
//! inputs, carried through the Jacobian of the exact computation at the reference trajectory.
//! The local part comes from the roundings of that operation, the integer activations, and
//! the quantisation of weights, scalings, inputs, targets, step size and learning rate. The local
//! errors of the feedforward layers and of every inference step are kept as separate sources
//! with their own sensitivity matrices, so that cancellation inside the products of Jacobians
//! is not lost: the bound on an activity is `sum_s |P_s| R_s`, where `P_s` is the exact
//! product of step Jacobians since source `s` and `R_s` bounds that source elementwise.
//! Second-order terms of the Taylor expansions are bounded with the activations' derivative
//! bounds and added to the local errors, so the result is a bound, not an estimate.
//!
//! The bound assumes no result saturates. Near a kink of relu, leaky_relu or hard_tanh the
//! derivative of the activation may differ between the fixed-point and the exact activity;
//! the bound then includes the full jump of the derivative (it stays valid but loose), and
//! [`FixedBound::kink_events`] counts where that happened.

use fixedpc::{Scalar, I16F16};
use serde::Serialize;

use crate::golden::Outputs;
use crate::reference::{Activation, Activities, Matrix, Network, Trajectory};

/// One least significant bit of Q16.16, `2^-16`.
pub const LSB: f64 = 1.0 / 65536.0;
/// Maximum error of one round-to-nearest to Q16.16, `2^-17`.
pub const HALF_LSB: f64 = LSB / 2.0;
/// Maximum error of the core's Q16.16 tanh, 1.17 LSB, as measured over every input in
/// `[-9, 9]` by the core's unit test `tanh_error_over_every_input` (beyond 8 it returns
/// exactly 1, within `2.3e-7` of tanh).
pub const TANH_ERROR: f64 = 1.17 * LSB;
/// Maximum error of the core's Q16.16 tanh derivative `1 - t^2`, 2.41 LSB, as measured by
/// the core's unit test `tanh_derivative_error`.
pub const TANH_DERIVATIVE_ERROR: f64 = 2.41 * LSB;
/// leaky_relu's slope as the core stores it in Q16.16: `655 / 2^16`.
pub const LEAKY_SLOPE_Q16: f64 = 655.0 / 65536.0;
/// `max |tanh''| = 4 / (3 sqrt 3)`, at `x = +-0.658`.
const TANH_SECOND_DERIVATIVE_MAX: f64 = 0.769_800_358_919_501_2;
/// `max |tanh'''| = 2`, at `x = 0`.
const TANH_THIRD_DERIVATIVE_MAX: f64 = 2.0;
/// Added to every bound for the rounding of the `f64` reference that the error is measured
/// against. On the golden cases the reference is within `1e-15` of JPC.
pub const REFERENCE_SLACK: f64 = 1e-12;
/// Number of multiply-adds above which older step sources are merged (see
/// [`FixedBound::window`]). Case d needs about `1e10` and takes 1.2 s in a release build.
const WORK_BUDGET: f64 = 2e10;

/// Returns `value` rounded to Q16.16 as the core converts it.
pub fn quantise(value: f64) -> f64 {
    let mut overflows = 0;
    I16F16::from_f64_rounded(value, &mut overflows).to_f64()
}

/// A place where an activity's error interval contains a kink of the activation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct KinkEvent {
    /// Inference step the state belongs to (0 is the feedforward initialisation).
    pub step: usize,
    /// Sample in the batch.
    pub sample: usize,
    /// Layer `l` of the activity `z_l`.
    pub layer: usize,
    /// Unit within the layer.
    pub unit: usize,
    /// Reference activity.
    pub activity: f64,
    /// Error bound of the activity at that point.
    pub bound: f64,
}

/// The evaluated bound of one case.
#[derive(Clone, Debug, Serialize)]
pub struct FixedBound {
    /// Elementwise bounds on `|I16F16 core - exact|`, in the layout of the compared outputs.
    pub bounds: Outputs,
    /// States where an activity's error interval contains a kink, so the activation's
    /// derivative may differ between fixed point and exact arithmetic.
    pub kink_events: usize,
    /// The first such state.
    pub first_kink: Option<KinkEvent>,
    /// Step sources are kept separate for this many steps, then merged elementwise (looser).
    /// Equal to the number of steps when nothing was merged.
    pub window: usize,
}

/// Quantisation of one parameter set to Q16.16: the absolute change of each value.
struct Quantisation {
    weights: Vec<Matrix>,
    scalings: Vec<f64>,
    step: f64,
    learning_rate: f64,
}

/// Returns the activation applied to layer `layer`'s input, the identity for layer 1.
fn input_activation(network: &Network, layer: usize) -> Activation {
    if layer == 1 {
        Activation::Linear
    } else {
        network.activation
    }
}

fn kinks(activation: Activation) -> &'static [f64] {
    match activation {
        Activation::Relu | Activation::LeakyRelu => &[0.0],
        Activation::HardTanh => &[-1.0, 1.0],
        Activation::Linear | Activation::Tanh => &[],
    }
}

/// Change of the derivative across a kink.
fn derivative_jump(activation: Activation) -> f64 {
    match activation {
        Activation::Relu | Activation::HardTanh => 1.0,
        Activation::LeakyRelu => 1.0 - crate::reference::LEAKY_RELU_SLOPE,
        Activation::Linear | Activation::Tanh => 0.0,
    }
}

/// Whether `[z - radius, z + radius]` contains a kink.
fn near_kink(activation: Activation, z: f64, radius: f64) -> bool {
    kinks(activation)
        .iter()
        .any(|kink| (z - kink).abs() <= radius)
}

/// Largest `|phi'|` on `[z - radius, z + radius]`.
fn max_slope(activation: Activation, z: f64, radius: f64) -> f64 {
    match activation {
        Activation::Linear => 1.0,
        Activation::Tanh => {
            let t = (z.abs() - radius).max(0.0).tanh();
            1.0 - t * t
        }
        Activation::Relu => {
            if z + radius >= 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::HardTanh => {
            if z - radius <= 1.0 && z + radius >= -1.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::LeakyRelu => {
            if z + radius >= 0.0 {
                1.0
            } else {
                crate::reference::LEAKY_RELU_SLOPE
            }
        }
    }
}

fn second_derivative(activation: Activation, z: f64) -> f64 {
    match activation {
        Activation::Tanh => {
            let t = z.tanh();
            -2.0 * t * (1.0 - t * t)
        }
        _ => 0.0,
    }
}

/// Bound on `|phi(z + d) - phi(z) - phi'(z) d|` for `|d| <= radius`.
fn value_remainder(activation: Activation, z: f64, radius: f64) -> f64 {
    match activation {
        Activation::Tanh => 0.5 * TANH_SECOND_DERIVATIVE_MAX * radius * radius,
        _ if near_kink(activation, z, radius) => derivative_jump(activation) * radius,
        _ => 0.0,
    }
}

/// Bound on `|phi'(z + d) - phi'(z) - phi''(z) d|` for `|d| <= radius`.
fn slope_remainder(activation: Activation, z: f64, radius: f64) -> f64 {
    match activation {
        Activation::Tanh => 0.5 * TANH_THIRD_DERIVATIVE_MAX * radius * radius,
        _ if near_kink(activation, z, radius) => derivative_jump(activation),
        _ => 0.0,
    }
}

/// Bound on `|phi_q(x) - phi(x)|`, the core's integer activation against the exact one, for
/// `x` within `radius` of `z`.
fn value_error(activation: Activation, z: f64, radius: f64) -> f64 {
    match activation {
        Activation::Tanh => TANH_ERROR,
        Activation::LeakyRelu if z - radius < 0.0 => {
            let slope_error = crate::reference::LEAKY_RELU_SLOPE - LEAKY_SLOPE_Q16;
            HALF_LSB + slope_error * (z.abs() + radius)
        }
        _ => 0.0,
    }
}

/// Bound on `|phi'_q(x) - phi'(x)|` for `x` within `radius` of `z`.
fn slope_error(activation: Activation, z: f64, radius: f64) -> f64 {
    match activation {
        Activation::Tanh => TANH_DERIVATIVE_ERROR,
        Activation::LeakyRelu if z - radius < 0.0 => {
            crate::reference::LEAKY_RELU_SLOPE - LEAKY_SLOPE_Q16
        }
        _ => 0.0,
    }
}

/// Exact quantities of one sample at one state, per layer (index `l`; unused indices empty).
struct Terms {
    /// `phi_l(z_(l-1))` for `l = 1..=L`.
    inputs: Vec<Vec<f64>>,
    /// `e_l` for `l = 1..=L`.
    errors: Vec<Vec<f64>>,
    /// `a_(l+1) W_(l+1)^T e_(l+1)` for free `l`.
    feedback: Vec<Vec<f64>>,
    /// Unscaled activity gradient `e_l - phi'(z_l) feedback_l - s_(l+1) e_(l+1)` for free `l`.
    gradients: Vec<Vec<f64>>,
    /// `K_l = a_l W_l diag(phi_l'(z_(l-1))) + s_l I`, row-major `n_l x n_(l-1)`, for
    /// `l = 1..=L`: the Jacobian of `mu_l` with respect to `z_(l-1)`.
    jacobians: Vec<Vec<f64>>,
}

fn terms(network: &Network, z: &Activities) -> Terms {
    let depth = network.depth();
    let widths = &network.widths;
    let mut inputs = vec![Vec::new()];
    let mut jacobians = vec![Vec::new()];
    for layer in 1..=depth {
        let activation = input_activation(network, layer);
        inputs.push(network.layer_input(layer, &z[layer - 1]));
        let slopes: Vec<f64> = z[layer - 1]
            .iter()
            .map(|&x| activation.derivative(x))
            .collect();
        let scaling = network.scalings[layer - 1];
        let mut jacobian = Vec::with_capacity(widths[layer] * widths[layer - 1]);
        for (i, row) in network.weights[layer - 1].iter().enumerate() {
            for (j, (&w, &slope)) in row.iter().zip(&slopes).enumerate() {
                let skip = if network.skips[layer - 1] && i == j {
                    1.0
                } else {
                    0.0
                };
                jacobian.push(scaling * w * slope + skip);
            }
        }
        jacobians.push(jacobian);
    }
    let mut errors = vec![Vec::new()];
    errors.extend(network.errors(z));
    let mut feedback = vec![Vec::new(); depth];
    let mut gradients = vec![Vec::new(); depth];
    for layer in 1..depth {
        let next = &errors[layer + 1];
        let scaling = network.scalings[layer];
        let weights = &network.weights[layer];
        let skip = network.skips[layer];
        let layer_feedback: Vec<f64> = (0..widths[layer])
            .map(|j| {
                scaling
                    * weights
                        .iter()
                        .zip(next)
                        .map(|(row, e)| row[j] * e)
                        .sum::<f64>()
            })
            .collect();
        gradients[layer] = (0..widths[layer])
            .map(|j| {
                let slope = network.activation.derivative(z[layer][j]);
                let skip_term = if skip { next[j] } else { 0.0 };
                errors[layer][j] - slope * layer_feedback[j] - skip_term
            })
            .collect();
        feedback[layer] = layer_feedback;
    }
    Terms {
        inputs,
        errors,
        feedback,
        gradients,
        jacobians,
    }
}

/// An independent source of error: a local error vector bounded elementwise by `radius`,
/// and its sensitivity matrix, the derivative of every activity with respect to it.
struct Source {
    /// Per layer `0..=L`, row-major `n_l x columns`; `None` is a zero block.
    blocks: Vec<Option<Vec<f64>>>,
    columns: usize,
    radius: Vec<f64>,
    /// Input and target quantisation stay separate for the whole run.
    permanent: bool,
}

impl Source {
    /// A source living in layer `layer`'s coordinates, with the identity as sensitivity.
    fn identity(widths: &[usize], layer: usize, radius: Vec<f64>, permanent: bool) -> Self {
        let n = widths[layer];
        let mut blocks = vec![None; widths.len()];
        let mut identity = vec![0.0; n * n];
        for i in 0..n {
            identity[i * n + i] = 1.0;
        }
        blocks[layer] = Some(identity);
        Source {
            blocks,
            columns: n,
            radius,
            permanent,
        }
    }

    /// A source acting on every free layer at once (one column per free activity).
    fn free_identity(widths: &[usize], radius: Vec<f64>) -> Self {
        let depth = widths.len() - 1;
        let columns: usize = widths[1..depth].iter().sum();
        let mut blocks = vec![None; widths.len()];
        let mut offset = 0;
        for layer in 1..depth {
            let n = widths[layer];
            let mut block = vec![0.0; n * columns];
            for i in 0..n {
                block[i * columns + offset + i] = 1.0;
            }
            blocks[layer] = Some(block);
            offset += n;
        }
        Source {
            blocks,
            columns,
            radius,
            permanent: false,
        }
    }

    /// Adds `|block| radius` row by row into `out`.
    fn add_abs(&self, block: &[f64], out: &mut [f64]) {
        for (row, value) in block.chunks_exact(self.columns).zip(out.iter_mut()) {
            *value += row
                .iter()
                .zip(&self.radius)
                .map(|(p, r)| p.abs() * r)
                .sum::<f64>();
        }
    }
}

/// Returns `matrix (rows x inner) * block (inner x columns)`.
fn multiply(matrix: &[f64], rows: usize, block: &[f64], inner: usize, columns: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * columns];
    for i in 0..rows {
        let out_row = &mut out[i * columns..(i + 1) * columns];
        for k in 0..inner {
            let factor = matrix[i * inner + k];
            if factor == 0.0 {
                continue;
            }
            let block_row = &block[k * columns..(k + 1) * columns];
            for (o, b) in out_row.iter_mut().zip(block_row) {
                *o += factor * b;
            }
        }
    }
    out
}

/// Returns `matrix^T (inner x rows)^T * block (inner x columns)`, a `rows x columns` result.
fn multiply_transposed(
    matrix: &[f64],
    rows: usize,
    block: &[f64],
    inner: usize,
    columns: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; rows * columns];
    for k in 0..inner {
        let block_row = &block[k * columns..(k + 1) * columns];
        for i in 0..rows {
            let factor = matrix[k * rows + i];
            if factor == 0.0 {
                continue;
            }
            let out_row = &mut out[i * columns..(i + 1) * columns];
            for (o, b) in out_row.iter_mut().zip(block_row) {
                *o += factor * b;
            }
        }
    }
    out
}

/// Returns `(C G)_l = G_l - K_l G_(l-1)` for `l = 1..=L` (index `l`), the sensitivity of
/// the errors `e_l` to the source; `None` where it is zero.
fn error_sensitivity(source: &Source, widths: &[usize], terms: &Terms) -> Vec<Option<Vec<f64>>> {
    let depth = widths.len() - 1;
    let columns = source.columns;
    let mut result = vec![None];
    for layer in 1..=depth {
        let mut block = source.blocks[layer].clone();
        if let Some(previous) = &source.blocks[layer - 1] {
            let product = multiply(
                &terms.jacobians[layer],
                widths[layer],
                previous,
                widths[layer - 1],
                columns,
            );
            let own = block.get_or_insert_with(|| vec![0.0; widths[layer] * columns]);
            for (value, p) in own.iter_mut().zip(&product) {
                *value -= p;
            }
        }
        result.push(block);
    }
    result
}

/// Applies the step Jacobian `I - step * dg/dz` to a source, given its error sensitivity:
/// `G_l <- G_l - step ((CG)_l - phi''(z_l) feedback_l G_l - K_(l+1)^T (CG)_(l+1))` on free
/// layers; clamped layers keep their block.
fn apply_step(
    source: &mut Source,
    sensitivity: &[Option<Vec<f64>>],
    widths: &[usize],
    terms: &Terms,
    curvature: &[Vec<f64>],
    step: f64,
) {
    let depth = widths.len() - 1;
    let columns = source.columns;
    let mut updated = Vec::with_capacity(depth.saturating_sub(1));
    for layer in 1..depth {
        let n = widths[layer];
        let mut change = sensitivity[layer]
            .clone()
            .unwrap_or_else(|| vec![0.0; n * columns]);
        if let Some(own) = &source.blocks[layer] {
            for (i, row) in own.chunks_exact(columns).enumerate() {
                let factor = curvature[layer][i];
                if factor != 0.0 {
                    for (c, value) in change[i * columns..(i + 1) * columns].iter_mut().zip(row) {
                        *c -= factor * value;
                    }
                }
            }
        }
        if let Some(next) = &sensitivity[layer + 1] {
            let product = multiply_transposed(
                &terms.jacobians[layer + 1],
                n,
                next,
                widths[layer + 1],
                columns,
            );
            for (c, p) in change.iter_mut().zip(&product) {
                *c -= p;
            }
        }
        let is_zero = source.blocks[layer].is_none() && change.iter().all(|&c| c == 0.0);
        if is_zero {
            updated.push(None);
        } else {
            let mut block = source.blocks[layer]
                .clone()
                .unwrap_or_else(|| vec![0.0; n * columns]);
            for (value, c) in block.iter_mut().zip(&change) {
                *value -= step * c;
            }
            updated.push(Some(block));
        }
    }
    for (layer, block) in (1..depth).zip(updated) {
        source.blocks[layer] = block;
    }
}

/// Bounds of one sample after the analysis.
struct SampleBound {
    activities_init: Vec<Vec<f64>>,
    output_prediction: Vec<f64>,
    gradients_init: Vec<Vec<f64>>,
    energy: Vec<f64>,
    activities_final: Vec<Vec<f64>>,
    final_inputs: Vec<Vec<f64>>,
    final_errors: Vec<Vec<f64>>,
    kink_events: usize,
    first_kink: Option<KinkEvent>,
}

/// Context shared by the steps of one sample's analysis.
struct Analysis<'a> {
    network: &'a Network,
    quantisation: &'a Quantisation,
    step: f64,
}

/// Local error of `mu_l` computed in fixed point at the fixed-point state, against the exact
/// `mu_l` at that state (`rounding`), and the Taylor remainder of `mu_l` around the exact
/// state (`remainder`).
struct LocalPrediction {
    rounding: Vec<f64>,
    remainder: Vec<f64>,
}

impl Analysis<'_> {
    /// Bounds the local error of `mu_layer` given the bound `radius` on `z_(layer-1)`.
    fn local_prediction(
        &self,
        layer: usize,
        previous: &[f64],
        input: &[f64],
        radius: &[f64],
    ) -> LocalPrediction {
        let network = self.network;
        let activation = input_activation(network, layer);
        let scaling = network.scalings[layer - 1].abs();
        let scaling_change = self.quantisation.scalings[layer - 1];
        let weights = &network.weights[layer - 1];
        let weight_changes = &self.quantisation.weights[layer - 1];
        let errors: Vec<f64> = previous
            .iter()
            .zip(radius)
            .map(|(&z, &d)| value_error(activation, z, d))
            .collect();
        // Largest magnitude of the fixed-point layer input.
        let magnitudes: Vec<f64> = previous
            .iter()
            .zip(radius)
            .zip(input)
            .zip(&errors)
            .map(|(((&z, &d), &u), &error)| u.abs() + max_slope(activation, z, d) * d + error)
            .collect();
        let remainders: Vec<f64> = previous
            .iter()
            .zip(radius)
            .map(|(&z, &d)| value_remainder(activation, z, d))
            .collect();
        let mut rounding = Vec::with_capacity(weights.len());
        let mut remainder = Vec::with_capacity(weights.len());
        for (row, change_row) in weights.iter().zip(weight_changes) {
            let mut quantised_part = 0.0;
            let mut weight_part = 0.0;
            let mut activation_part = 0.0;
            let mut remainder_part = 0.0;
            for j in 0..row.len() {
                let w = row[j].abs();
                quantised_part += (w + change_row[j]) * magnitudes[j];
                weight_part += change_row[j] * magnitudes[j];
                activation_part += w * errors[j];
                remainder_part += w * remainders[j];
            }
            rounding.push(
                HALF_LSB
                    + scaling_change * quantised_part
                    + scaling * (weight_part + activation_part),
            );
            remainder.push(scaling * remainder_part);
        }
        LocalPrediction {
            rounding,
            remainder,
        }
    }

    /// Runs the feedforward analysis and returns the initial sources with the bounds of the
    /// feedforward activities and output prediction.
    fn feedforward(
        &self,
        z: &Activities,
        terms: &Terms,
        input_change: &[f64],
        target_change: &[f64],
    ) -> (Vec<Source>, Vec<Vec<f64>>, Vec<f64>) {
        let network = self.network;
        let widths = &network.widths;
        let depth = network.depth();
        let mut sources = vec![Source::identity(widths, 0, input_change.to_vec(), true)];
        let mut radius = vec![input_change.to_vec()];
        let mut output_prediction = Vec::new();
        for layer in 1..=depth {
            // Carry every source one layer further: P_l = K_l P_(l-1).
            for source in &mut sources {
                if let Some(previous) = &source.blocks[layer - 1] {
                    source.blocks[layer] = Some(multiply(
                        &terms.jacobians[layer],
                        widths[layer],
                        previous,
                        widths[layer - 1],
                        source.columns,
                    ));
                }
            }
            let local = self.local_prediction(
                layer,
                &z[layer - 1],
                &terms.inputs[layer],
                &radius[layer - 1],
            );
            let local_radius: Vec<f64> = local
                .rounding
                .iter()
                .zip(&local.remainder)
                .map(|(r, q)| r + q)
                .collect();
            let mut bound = local_radius.clone();
            for source in &sources {
                if let Some(block) = &source.blocks[layer] {
                    source.add_abs(block, &mut bound);
                }
            }
            if layer == depth {
                output_prediction = bound;
                for source in &mut sources {
                    source.blocks[depth] = None;
                }
            } else {
                sources.push(Source::identity(widths, layer, local_radius, false));
                radius.push(bound);
            }
        }
        sources.push(Source::identity(
            widths,
            depth,
            target_change.to_vec(),
            true,
        ));
        radius.push(target_change.to_vec());
        (sources, radius, output_prediction)
    }
}

/// Bounds the error of one sample's energy `E = 1/2 sum_l |e_l|^2`.
///
/// With `e_hat - e = (CG) rho + local`, the change is
/// `sum_i e_i (e_hat_i - e_i) + 1/2 sum_i (e_hat_i - e_i)^2`; the first-order part of each
/// source is bounded through the signed row `e^T (CG)_s`, which keeps the cancellation between
/// units, and the core rounds the energy once.
// Layer indices address several per-layer arrays at once.
#[allow(clippy::needless_range_loop)]
fn energy_radius(
    sources: &[Source],
    sensitivities: &[Vec<Option<Vec<f64>>>],
    terms: &Terms,
    locals: &[LocalPrediction],
    error_radius: &[Vec<f64>],
    initial: bool,
) -> f64 {
    let depth = error_radius.len() - 1;
    let mut energy = HALF_LSB;
    for (source, sensitivity) in sources.iter().zip(sensitivities) {
        let mut row = vec![0.0; source.columns];
        for layer in 1..=depth {
            if let Some(block) = &sensitivity[layer] {
                for (&e, block_row) in terms.errors[layer]
                    .iter()
                    .zip(block.chunks_exact(source.columns))
                {
                    if e != 0.0 {
                        for (r, g) in row.iter_mut().zip(block_row) {
                            *r += e * g;
                        }
                    }
                }
            }
        }
        energy += row
            .iter()
            .zip(&source.radius)
            .map(|(r, radius)| r.abs() * radius)
            .sum::<f64>();
    }
    for layer in 1..=depth {
        // After the feedforward pass the hidden errors are exactly zero in both computations.
        if initial && layer < depth {
            continue;
        }
        let local = &locals[layer];
        for (i, e) in terms.errors[layer].iter().enumerate() {
            energy += e.abs() * (local.rounding[i] + local.remainder[i]);
        }
    }
    for radius in &error_radius[1..] {
        energy += radius.iter().map(|d| 0.5 * d * d).sum::<f64>();
    }
    energy
}

/// Returns `sum_s |G_s| R_s` for every layer `0..=L`.
fn activity_radius(sources: &[Source], widths: &[usize]) -> Vec<Vec<f64>> {
    let mut radius: Vec<Vec<f64>> = widths.iter().map(|&n| vec![0.0; n]).collect();
    for source in sources {
        for (layer, block) in source.blocks.iter().enumerate() {
            if let Some(block) = block {
                source.add_abs(block, &mut radius[layer]);
            }
        }
    }
    radius
}

/// Merges every non-permanent source into one with the identity as sensitivity and its
/// current bound as radius.
fn merge_sources(sources: &mut Vec<Source>, widths: &[usize]) {
    let (permanent, merged): (Vec<Source>, Vec<Source>) =
        sources.drain(..).partition(|source| source.permanent);
    let radius = activity_radius(&merged, widths);
    let depth = widths.len() - 1;
    let free_radius: Vec<f64> = radius[1..depth].concat();
    *sources = permanent;
    sources.push(Source::free_identity(widths, free_radius));
}

/// Returns `|matrix|^T vector`: column sums of `|matrix|` weighted by `vector`.
fn abs_transposed_matrix_vector(matrix: &Matrix, vector: &[f64], columns: usize) -> Vec<f64> {
    let mut out = vec![0.0; columns];
    for (row, v) in matrix.iter().zip(vector) {
        for (o, w) in out.iter_mut().zip(row) {
            *o += w.abs() * v;
        }
    }
    out
}

impl Analysis<'_> {
    /// Analyses one sample: `states[t]` are its exact activities after `t` steps.
    // Layer and unit indices address several per-layer arrays at once.
    #[allow(clippy::needless_range_loop)]
    fn sample(
        &self,
        sample: usize,
        states: &[&Activities],
        input_change: &[f64],
        target_change: &[f64],
        window: usize,
    ) -> SampleBound {
        let network = self.network;
        let widths = &network.widths;
        let depth = network.depth();
        let activation = network.activation;
        let steps = states.len() - 1;
        let step = self.step;
        let step_change = self.quantisation.step;

        let initial_terms = terms(network, states[0]);
        let (mut sources, initial_radius, output_prediction) =
            self.feedforward(states[0], &initial_terms, input_change, target_change);
        let activities_init = initial_radius[1..depth].to_vec();

        let mut result = SampleBound {
            activities_init,
            output_prediction,
            gradients_init: Vec::new(),
            energy: Vec::with_capacity(steps + 1),
            activities_final: Vec::new(),
            final_inputs: Vec::new(),
            final_errors: Vec::new(),
            kink_events: 0,
            first_kink: None,
        };
        let mut step_sources = 0;

        for (t, z) in states.iter().enumerate() {
            let terms = terms(network, z);
            let radius = activity_radius(&sources, widths);
            let sensitivities: Vec<_> = sources
                .iter()
                .map(|source| error_sensitivity(source, widths, &terms))
                .collect();

            // Error bounds: linear part, local rounding and Taylor remainder of mu_l.
            let mut locals = vec![LocalPrediction {
                rounding: Vec::new(),
                remainder: Vec::new(),
            }];
            let mut error_radius = vec![Vec::new()];
            for layer in 1..=depth {
                let local = self.local_prediction(
                    layer,
                    &z[layer - 1],
                    &terms.inputs[layer],
                    &radius[layer - 1],
                );
                let bound: Vec<f64> = if t == 0 && layer < depth {
                    // After the feedforward pass every hidden error is exactly zero in both
                    // computations, because the core recomputes mu_l bit for bit.
                    vec![0.0; widths[layer]]
                } else {
                    let mut bound: Vec<f64> = local
                        .rounding
                        .iter()
                        .zip(&local.remainder)
                        .map(|(r, q)| r + q)
                        .collect();
                    for (source, sensitivity) in sources.iter().zip(&sensitivities) {
                        if let Some(block) = &sensitivity[layer] {
                            source.add_abs(block, &mut bound);
                        }
                    }
                    bound
                };
                error_radius.push(bound);
                locals.push(local);
            }

            result.energy.push(energy_radius(
                &sources,
                &sensitivities,
                &terms,
                &locals,
                &error_radius,
                t == 0,
            ));

            if t == 0 {
                result.gradients_init = self.initial_gradients(&terms, z, &radius, &error_radius);
            }
            if t == steps {
                result.activities_final = radius[1..depth].to_vec();
                result.final_inputs = (1..=depth)
                    .map(|layer| {
                        let act = input_activation(network, layer);
                        z[layer - 1]
                            .iter()
                            .zip(&radius[layer - 1])
                            .map(|(&x, &d)| value_error(act, x, d) + max_slope(act, x, d) * d)
                            .collect()
                    })
                    .collect();
                result.final_errors = error_radius;
                break;
            }

            // Local error of the gradient and of the step, and the step's Taylor remainder.
            let mut step_radius = Vec::new();
            let mut curvature = vec![Vec::new(); depth];
            for layer in 1..depth {
                let next = layer + 1;
                let scaling = network.scalings[next - 1].abs();
                let scaling_change = self.quantisation.scalings[next - 1];
                let weights = &network.weights[next - 1];
                let weight_changes = &self.quantisation.weights[next - 1];
                let skip = network.skips[next - 1];
                let next_error = &terms.errors[next];
                let next_radius = &error_radius[next];
                let next_local = &locals[next];
                let own_local = &locals[layer];
                let error_magnitude: Vec<f64> = next_error
                    .iter()
                    .zip(next_radius)
                    .map(|(e, d)| e.abs() + d)
                    .collect();
                let local_total: Vec<f64> = next_local
                    .rounding
                    .iter()
                    .zip(&next_local.remainder)
                    .map(|(r, q)| r + q)
                    .collect();
                let changed_weights: Vec<Vec<f64>> = weights
                    .iter()
                    .zip(weight_changes)
                    .map(|(row, changes)| {
                        row.iter().zip(changes).map(|(w, c)| w.abs() + c).collect()
                    })
                    .collect();
                let n = widths[layer];
                let quantised_sum =
                    abs_transposed_matrix_vector(&changed_weights, &error_magnitude, n);
                let change_sum = abs_transposed_matrix_vector(weight_changes, &error_magnitude, n);
                let rounding_sum = abs_transposed_matrix_vector(weights, &next_local.rounding, n);
                let spread_sum = abs_transposed_matrix_vector(
                    weights,
                    &next_radius
                        .iter()
                        .zip(&local_total)
                        .map(|(d, l)| d + l)
                        .collect::<Vec<_>>(),
                    n,
                );
                let remainder_sum = abs_transposed_matrix_vector(weights, &next_local.remainder, n);
                let mut layer_step = Vec::with_capacity(n);
                let mut layer_curvature = Vec::with_capacity(n);
                for j in 0..n {
                    let zj = z[layer][j];
                    let dj = radius[layer][j];
                    if near_kink(activation, zj, dj) {
                        result.kink_events += 1;
                        result.first_kink.get_or_insert(KinkEvent {
                            step: t,
                            sample,
                            layer,
                            unit: j,
                            activity: zj,
                            bound: dj,
                        });
                    }
                    let f = terms.feedback[layer][j];
                    let slope = activation.derivative(zj);
                    let slope_max = max_slope(activation, zj, dj);
                    let curve = second_derivative(activation, zj);
                    layer_curvature.push(curve * f);
                    // Fixed-point feedback against the exact feedback at the fixed state.
                    let feedback_rounding = HALF_LSB
                        + scaling_change * quantised_sum[j]
                        + scaling * (change_sum[j] + rounding_sum[j]);
                    let feedback_magnitude = f.abs() + scaling * spread_sum[j] + feedback_rounding;
                    let gradient_rounding = HALF_LSB
                        + own_local.rounding[j]
                        + slope_error(activation, zj, dj) * feedback_magnitude
                        + slope_max * feedback_rounding
                        + if skip { next_local.rounding[j] } else { 0.0 };
                    // Taylor remainder of the gradient around the exact state.
                    let slope_rest = slope_remainder(activation, zj, dj);
                    let gradient_remainder = own_local.remainder[j]
                        + slope_rest * f.abs()
                        + (curve.abs() * dj + slope_rest) * scaling * spread_sum[j]
                        + slope.abs() * scaling * remainder_sum[j]
                        + if skip { next_local.remainder[j] } else { 0.0 };
                    let gradient_magnitude = terms.gradients[layer][j].abs()
                        + error_radius[layer][j]
                        + own_local.rounding[j]
                        + slope_max * scaling * spread_sum[j]
                        + (curve.abs() * dj + slope_rest) * f.abs()
                        + if skip {
                            next_radius[j] + local_total[j]
                        } else {
                            0.0
                        };
                    layer_step.push(
                        HALF_LSB
                            + (step + step_change) * gradient_rounding
                            + step_change * gradient_magnitude
                            + step * gradient_remainder,
                    );
                }
                step_radius.extend(layer_step);
                curvature[layer] = layer_curvature;
            }

            for (source, sensitivity) in sources.iter_mut().zip(&sensitivities) {
                apply_step(source, sensitivity, widths, &terms, &curvature, step);
            }
            if depth >= 2 {
                sources.push(Source::free_identity(widths, step_radius));
                step_sources += 1;
            }
            if step_sources >= window {
                merge_sources(&mut sources, widths);
                step_sources = 0;
            }
        }
        result
    }

    /// Bounds the activity gradients after the feedforward pass. Every hidden error is zero
    /// there, so only layer `L-1` has a gradient: `-phi'(z_(L-1)) a_L W_L^T e_L`.
    fn initial_gradients(
        &self,
        terms: &Terms,
        z: &Activities,
        radius: &[Vec<f64>],
        error_radius: &[Vec<f64>],
    ) -> Vec<Vec<f64>> {
        let network = self.network;
        let widths = &network.widths;
        let depth = network.depth();
        let activation = network.activation;
        let mut result: Vec<Vec<f64>> = (1..depth).map(|layer| vec![0.0; widths[layer]]).collect();
        if depth < 2 {
            return result;
        }
        let layer = depth - 1;
        let scaling = network.scalings[depth - 1].abs();
        let scaling_change = self.quantisation.scalings[depth - 1];
        let weights = &network.weights[depth - 1];
        let weight_changes = &self.quantisation.weights[depth - 1];
        let n = widths[layer];
        let output_error = &terms.errors[depth];
        let output_radius = &error_radius[depth];
        let magnitude: Vec<f64> = output_error
            .iter()
            .zip(output_radius)
            .map(|(e, d)| e.abs() + d)
            .collect();
        let changed: Vec<Vec<f64>> = weights
            .iter()
            .zip(weight_changes)
            .map(|(row, changes)| row.iter().zip(changes).map(|(w, c)| w.abs() + c).collect())
            .collect();
        let quantised_sum = abs_transposed_matrix_vector(&changed, &magnitude, n);
        let change_sum = abs_transposed_matrix_vector(weight_changes, &magnitude, n);
        let spread_sum = abs_transposed_matrix_vector(weights, output_radius, n);
        for j in 0..n {
            let zj = z[layer][j];
            let dj = radius[layer][j];
            let f = terms.feedback[layer][j];
            // |f_hat - f| with f_hat = round(a_hat W_hat^T e_hat).
            let feedback_error = HALF_LSB
                + scaling_change * quantised_sum[j]
                + scaling * (change_sum[j] + spread_sum[j]);
            let slope_difference = slope_error(activation, zj, dj)
                + second_derivative(activation, zj).abs() * dj
                + slope_remainder(activation, zj, dj);
            let slope = activation.derivative(zj).abs();
            result[layer - 1][j] =
                HALF_LSB + slope_difference * (f.abs() + feedback_error) + slope * feedback_error;
        }
        result
    }
}

/// Evaluates the bound for a batch.
///
/// `trajectory` is the reference run of `network` on `inputs` and `targets` with JPC's step
/// `jpc_step` (the core's per-sample step is `jpc_step / B`, rounded to Q16.16) and SGD rate
/// `learning_rate`. `window` caps how many steps a local error keeps its own sensitivity
/// matrix; `None` picks the largest window within a fixed amount of work.
pub fn fixed_point_bound(
    network: &Network,
    trajectory: &Trajectory,
    inputs: &[Vec<f64>],
    targets: &[Vec<f64>],
    jpc_step: f64,
    learning_rate: f64,
    window: Option<usize>,
) -> FixedBound {
    let batch = inputs.len();
    let widths = &network.widths;
    let steps = trajectory.states.len() - 1;
    let step = jpc_step / batch as f64;
    let quantisation = Quantisation {
        weights: network
            .weights
            .iter()
            .map(|m| {
                m.iter()
                    .map(|row| row.iter().map(|&w| (quantise(w) - w).abs()).collect())
                    .collect()
            })
            .collect(),
        scalings: network
            .scalings
            .iter()
            .map(|&a| (quantise(a) - a).abs())
            .collect(),
        step: (quantise(step) - step).abs(),
        learning_rate: (quantise(learning_rate) - learning_rate).abs(),
    };
    let window = window
        .unwrap_or_else(|| default_window(widths, steps, batch))
        .max(1);
    let analysis = Analysis {
        network,
        quantisation: &quantisation,
        step,
    };

    let mut samples = Vec::with_capacity(batch);
    for b in 0..batch {
        let states: Vec<&Activities> = trajectory.states.iter().map(|s| &s[b]).collect();
        let input_change: Vec<f64> = inputs[b].iter().map(|&x| (quantise(x) - x).abs()).collect();
        let target_change: Vec<f64> = targets[b]
            .iter()
            .map(|&y| (quantise(y) - y).abs())
            .collect();
        samples.push(analysis.sample(b, &states, &input_change, &target_change, window));
    }

    let bounds = combine(network, trajectory, &quantisation, &samples, learning_rate);
    let kink_events = samples.iter().map(|s| s.kink_events).sum();
    let first_kink = samples.iter().find_map(|s| s.first_kink);
    FixedBound {
        bounds,
        kink_events,
        first_kink,
        window: window.min(steps.max(1)),
    }
}

/// The largest window whose estimated multiply-adds stay within [`WORK_BUDGET`].
fn default_window(widths: &[usize], steps: usize, batch: usize) -> usize {
    let depth = widths.len() - 1;
    let free: usize = widths[1..depth].iter().sum();
    let per_column: usize = (1..=depth).map(|l| 2 * widths[l] * widths[l - 1]).sum();
    let per_window_step = (per_column * free * batch.max(1) * steps.max(1)) as f64;
    let window = (WORK_BUDGET / per_window_step.max(1.0)).floor() as usize;
    window.clamp(4, steps.max(4))
}

/// Builds the bounds in the compared layout: per-sample bounds, batch energy, weight
/// gradients and weights after SGD.
// Layer and unit indices address several per-layer arrays at once.
#[allow(clippy::needless_range_loop)]
fn combine(
    network: &Network,
    trajectory: &Trajectory,
    quantisation: &Quantisation,
    samples: &[SampleBound],
    learning_rate: f64,
) -> Outputs {
    let batch = samples.len();
    let depth = network.depth();
    let widths = &network.widths;
    // A trajectory that grows without limit overflows the bound to infinity, and `0 * inf`
    // terms then make NaN. Such an entry is unbounded, so it is reported as infinity.
    let slack = |values: Vec<f64>| -> Vec<f64> {
        values
            .into_iter()
            .map(|v| {
                if v.is_nan() {
                    f64::INFINITY
                } else {
                    v + REFERENCE_SLACK
                }
            })
            .collect()
    };
    let by_layer = |pick: &dyn Fn(&SampleBound) -> &Vec<Vec<f64>>, scale: f64| -> Vec<f64> {
        let mut flat = Vec::new();
        for layer in 0..depth.saturating_sub(1) {
            for sample in samples {
                flat.extend(pick(sample)[layer].iter().map(|v| v * scale));
            }
        }
        flat
    };
    let energy_trace: Vec<f64> = (0..samples[0].energy.len())
        .map(|t| samples.iter().map(|s| s.energy[t]).sum::<f64>() / batch as f64)
        .collect();

    // Weight gradients at the final state: g = c S with c = -a/B and S = sum_b e u^T.
    let last = &trajectory.states[trajectory.states.len() - 1];
    let mut weight_grads = Vec::new();
    let mut weights_after_sgd = Vec::new();
    let rate_change = quantisation.learning_rate;
    for layer in 1..=depth {
        let scaling = network.scalings[layer - 1];
        let coefficient = scaling.abs() / batch as f64;
        let division_rounding = if batch > 1 { HALF_LSB } else { 0.0 };
        let coefficient_change =
            quantisation.scalings[layer - 1] / batch as f64 + division_rounding;
        let sample_inputs: Vec<Vec<f64>> = last
            .iter()
            .map(|sample| network.layer_input(layer, &sample[layer - 1]))
            .collect();
        let sample_errors: Vec<Vec<f64>> = last
            .iter()
            .map(|sample| network.errors(sample)[layer - 1].clone())
            .collect();
        for i in 0..widths[layer] {
            for j in 0..widths[layer - 1] {
                let mut sum = 0.0;
                let mut sum_bound = 0.0;
                for (b, sample) in samples.iter().enumerate() {
                    let e = sample_errors[b][i];
                    let u = sample_inputs[b][j];
                    let de = sample.final_errors[layer][i];
                    let du = sample.final_inputs[layer - 1][j];
                    sum += e * u;
                    sum_bound += e.abs() * du + u.abs() * de + de * du;
                }
                let gradient = -scaling / batch as f64 * sum;
                let gradient_bound = HALF_LSB
                    + (coefficient + coefficient_change) * sum_bound
                    + coefficient_change * sum.abs();
                weight_grads.push(gradient_bound);
                weights_after_sgd.push(
                    quantisation.weights[layer - 1][i][j]
                        + HALF_LSB
                        + (learning_rate.abs() + rate_change) * gradient_bound
                        + rate_change * gradient.abs(),
                );
            }
        }
    }

    Outputs {
        activities_init: slack(by_layer(&|s| &s.activities_init, 1.0)),
        output_prediction_init: slack(
            samples
                .iter()
                .flat_map(|s| s.output_prediction.iter().copied())
                .collect(),
        ),
        activity_grads_init: slack(by_layer(&|s| &s.gradients_init, 1.0 / batch as f64)),
        energy_init: slack(vec![energy_trace[0]]),
        energy_trace: slack(energy_trace),
        activities_final: slack(by_layer(&|s| &s.activities_final, 1.0)),
        weight_grads: slack(weight_grads),
        weights_after_sgd: slack(weights_after_sgd),
    }
}
