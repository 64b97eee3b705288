//! Property tests of the core over random shapes, activations, parameterisations, skips,
//! inputs and weights: the activity gradient against finite differences, energy descent below
//! a stability limit, fixed-point saturation, the model and sample files, determinism and
//! argument checks.

use std::ops::RangeInclusive;

use fixedpc::error::Buffer;
use fixedpc::evaluate::{samples_encoded_len, write_samples, SampleSet};
use fixedpc::model::{encoded_len, write_model};
use fixedpc::network::{activities_len, weights_len};
use fixedpc::{
    Activation, ActivityRounding, Adam, Arch, Error, InferenceConfig, InferenceStats, Model,
    Network, NumericFormat, Parameterisation, Scalar, Sgd, Workspace, I16F16, I4F12,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::FileFailurePersistence;

const MAX_DEPTH: usize = 5;
const MAX_WIDTH: usize = 12;

static ACTIVATIONS: [Activation; 5] = Activation::ALL;
static SMOOTH_ACTIVATIONS: [Activation; 2] = [Activation::Linear, Activation::Tanh];
static PIECEWISE_ACTIVATIONS: [Activation; 3] = [
    Activation::HardTanh,
    Activation::Relu,
    Activation::LeakyRelu,
];
static PARAMETERISATIONS: [Parameterisation; 2] = [Parameterisation::Sp, Parameterisation::MuPc];
static FORMATS: [NumericFormat; 4] = [
    NumericFormat::F32,
    NumericFormat::F64,
    NumericFormat::I16F16,
    NumericFormat::I4F12,
];

/// Configures a property with `cases` random cases and stores shrunk failures in
/// `proptest-regressions/properties.txt` (relative to the package root, where cargo runs
/// integration tests).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/properties.txt",
        ))),
        ..ProptestConfig::with_cases(cases)
    }
}

/// Architecture of a generated network, owned so that an `Arch` can borrow it.
#[derive(Clone, Debug)]
struct Shape {
    widths: Vec<usize>,
    activation: Activation,
    parameterisation: Parameterisation,
    skip: bool,
}

impl Shape {
    fn arch(&self) -> Arch<'_> {
        Arch::new(&self.widths, self.activation, self.skip).expect("generated shapes are valid")
    }

    fn depth(&self) -> usize {
        self.widths.len() - 1
    }

    /// Returns the scalings `a_1 .. a_L`: all 1 for SP, `Parameterisation::MuPc.scaling` for
    /// muPC.
    fn scalings(&self) -> Vec<f64> {
        (1..=self.depth())
            .map(|layer| {
                self.parameterisation
                    .scaling(&self.widths, self.skip, layer)
            })
            .collect()
    }
}

/// Generates shapes of depth in `depths` and widths `1..=MAX_WIDTH`. With skips on, every
/// hidden layer gets the same width, because layers `2 ..= L-1` add their input unchanged.
fn shapes(
    depths: RangeInclusive<usize>,
    activations: &'static [Activation],
) -> impl Strategy<Value = Shape> {
    (
        depths,
        1..=MAX_WIDTH,
        1..=MAX_WIDTH,
        vec(1..=MAX_WIDTH, MAX_DEPTH - 1),
        any::<bool>(),
        select(activations),
        select(&PARAMETERISATIONS[..]),
    )
        .prop_map(
            |(depth, input, output, hidden, skip, activation, parameterisation)| {
                let mut widths = vec![input];
                for layer in 1..depth {
                    widths.push(if skip { hidden[0] } else { hidden[layer - 1] });
                }
                widths.push(output);
                Shape {
                    widths,
                    activation,
                    parameterisation,
                    skip,
                }
            },
        )
}

/// A network with its weights and one sample's activities `z_0 .. z_L`, in `f64`.
#[derive(Clone, Debug)]
struct Case {
    shape: Shape,
    weights: Vec<f64>,
    activities: Vec<f64>,
}

impl Case {
    fn input(&self) -> &[f64] {
        &self.activities[..self.shape.widths[0]]
    }

    fn target(&self) -> &[f64] {
        let offset = self.shape.arch().activity_offset(self.shape.depth());
        &self.activities[offset..]
    }
}

/// Generates cases with weights uniform in `[-weight, weight]` and activities uniform in
/// `[-activity, activity]`.
fn cases(
    shapes: impl Strategy<Value = Shape>,
    weight: f64,
    activity: f64,
) -> impl Strategy<Value = Case> {
    shapes
        .prop_flat_map(move |shape| {
            let weights = vec(-weight..=weight, weights_len(&shape.widths));
            let activities = vec(-activity..=activity, activities_len(&shape.widths));
            (Just(shape), weights, activities)
        })
        .prop_map(|(shape, weights, activities)| Case {
            shape,
            weights,
            activities,
        })
}

/// Converts `f64` values to `S`, asserting that none saturates.
fn convert<S: Scalar>(values: &[f64]) -> Vec<S> {
    let mut overflows = 0;
    let converted = values
        .iter()
        .map(|&value| S::from_f64_rounded(value, &mut overflows))
        .collect();
    assert_eq!(overflows, 0, "test values must fit the numeric format");
    converted
}

/// Owned workspace buffers for `capacity` samples.
struct Buffers<S> {
    capacity: usize,
    activities: Vec<S>,
    errors: Vec<S>,
    scratch: Vec<S>,
    overflows: Vec<u32>,
}

impl<S: Scalar> Buffers<S> {
    fn new(arch: &Arch<'_>, capacity: usize) -> Self {
        Buffers {
            capacity,
            activities: vec![S::ZERO; capacity * arch.activities_len()],
            errors: vec![S::ZERO; capacity * arch.errors_len()],
            scratch: vec![S::ZERO; capacity * arch.max_width()],
            overflows: vec![0; arch.depth()],
        }
    }

    fn workspace(&mut self, arch: &Arch<'_>) -> Workspace<'_, S> {
        Workspace::new(
            arch,
            self.capacity,
            &mut self.activities,
            &mut self.errors,
            &mut self.scratch,
            &mut self.overflows,
        )
        .expect("buffers are sized for the architecture")
    }
}

/// Returns the energy of sample 0 at the activities currently in `buffers`.
fn energy(network: &Network<'_, f64>, buffers: &mut Buffers<f64>) -> f64 {
    let mut workspace = buffers.workspace(network.arch());
    network
        .compute_errors(&mut workspace, 0)
        .expect("workspace fits the network")
}

// --- Activity gradient against finite differences -------------------------------------------

/// Half-width of the finite differences.
const STEP: f64 = 1e-5;

/// Relative tolerance of a finite difference against `activity_gradient`:
/// `|numeric - analytic| <= FD_TOLERANCE * (1 + |analytic|)`. Where the energy is quadratic
/// in the perturbed activity (linear, and the piecewise-linear activations away from a kink)
/// the difference is exact up to rounding, about `1e-16 * E / STEP` with `E` at most about
/// 1e4 here. For tanh the central difference adds `STEP^2 / 6 * |E'''|`, at most about 1e-8.
/// The largest ratio observed was between 1e-9 and 1e-8 (2000 cases of each finite-difference
/// property), so 1e-6 leaves a margin of at least 100.
const FD_TOLERANCE: f64 = 1e-6;

/// Returns whether `z` lies within `2 * STEP` of a point where the activation has a kink, so
/// that a central difference would straddle it.
fn near_kink(activation: Activation, z: f64) -> bool {
    match activation {
        Activation::Linear | Activation::Tanh => false,
        Activation::Relu | Activation::LeakyRelu => z.abs() <= 2.0 * STEP,
        Activation::HardTanh => (z.abs() - 1.0).abs() <= 2.0 * STEP,
    }
}

/// Returns `dE/dz_layer` of sample 0 at the activities in `buffers`.
fn analytic_gradient(
    network: &Network<'_, f64>,
    buffers: &mut Buffers<f64>,
    layer: usize,
) -> Result<Vec<f64>, Error> {
    let mut workspace = buffers.workspace(network.arch());
    network.compute_errors(&mut workspace, 0)?;
    Ok(network
        .activity_gradient(&mut workspace, 0, layer)?
        .to_vec())
}

proptest! {
    #![proptest_config(config(128))]

    /// Every free activity's gradient matches a central difference of the energy, with
    /// coordinates within `2 * STEP` of a kink left to `activity_gradient_at_kink`.
    #[test]
    fn activity_gradient_matches_finite_difference(
        case in cases(shapes(2..=MAX_DEPTH, &ACTIVATIONS), 1.0, 2.0),
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let scalings = shape.scalings();
        let network = Network::new(arch, &case.weights, &scalings)?;
        let mut buffers = Buffers::<f64>::new(&arch, 1);
        buffers.activities.copy_from_slice(&case.activities);

        for layer in 1..arch.depth() {
            let analytic = analytic_gradient(&network, &mut buffers, layer)?;
            let offset = arch.activity_offset(layer);
            for (unit, &gradient) in analytic.iter().enumerate() {
                let index = offset + unit;
                let z = case.activities[index];
                if near_kink(shape.activation, z) {
                    continue;
                }
                buffers.activities[index] = z + STEP;
                let above = energy(&network, &mut buffers);
                buffers.activities[index] = z - STEP;
                let below = energy(&network, &mut buffers);
                buffers.activities[index] = z;
                let numeric = (above - below) / ((z + STEP) - (z - STEP));
                let tolerance = FD_TOLERANCE * (1.0 + gradient.abs());
                prop_assert!(
                    (numeric - gradient).abs() <= tolerance,
                    "layer {layer} unit {unit} at z = {z}: activity_gradient {gradient}, \
                     central difference {numeric}, tolerance {tolerance}"
                );
            }
        }
    }
}

/// Returns the one-sided derivative of the energy in activity `index`, from the side
/// `direction` (`1.0` right, `-1.0` left), by the second-order difference
/// `(-3 E(z) + 4 E(z + d STEP) - E(z + 2 d STEP)) / (2 STEP)`, which is exact for a quadratic.
fn one_sided_derivative(
    network: &Network<'_, f64>,
    buffers: &mut Buffers<f64>,
    index: usize,
    direction: f64,
) -> f64 {
    let z = buffers.activities[index];
    let at = energy(network, buffers);
    buffers.activities[index] = z + direction * STEP;
    let near = energy(network, buffers);
    buffers.activities[index] = z + 2.0 * direction * STEP;
    let far = energy(network, buffers);
    buffers.activities[index] = z;
    direction * (-3.0 * at + 4.0 * near - far) / (2.0 * STEP)
}

proptest! {
    #![proptest_config(config(128))]

    /// At a kink the gradient takes the side that the derivative convention documented in
    /// `fixedpc::activation` picks. Relu's derivative 0 at 0 is the left side, leaky_relu's
    /// 1 at 0 is the right side, and hard_tanh's 1 on `[-1, 1]` is the inner side of `±1`.
    /// On one side of a kink the energy is quadratic in that activity, so the one-sided
    /// difference is exact up to rounding.
    #[test]
    fn activity_gradient_at_kink(
        case in cases(shapes(2..=MAX_DEPTH, &PIECEWISE_ACTIVATIONS), 1.0, 2.0),
        layer_choice in any::<Index>(),
        unit_choice in any::<Index>(),
        upper_kink in any::<bool>(),
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let scalings = shape.scalings();
        let network = Network::new(arch, &case.weights, &scalings)?;
        let mut buffers = Buffers::<f64>::new(&arch, 1);
        buffers.activities.copy_from_slice(&case.activities);

        let layer = 1 + layer_choice.index(arch.depth() - 1);
        let unit = unit_choice.index(arch.width(layer));
        let index = arch.activity_offset(layer) + unit;
        let (kink, direction) = match shape.activation {
            Activation::Relu => (0.0, -1.0),
            Activation::LeakyRelu => (0.0, 1.0),
            Activation::HardTanh if upper_kink => (1.0, -1.0),
            Activation::HardTanh => (-1.0, 1.0),
            other => unreachable!("{other:?} has no kink"),
        };
        buffers.activities[index] = kink;

        let gradient = analytic_gradient(&network, &mut buffers, layer)?[unit];
        let numeric = one_sided_derivative(&network, &mut buffers, index, direction);
        let tolerance = FD_TOLERANCE * (1.0 + gradient.abs());
        prop_assert!(
            (numeric - gradient).abs() <= tolerance,
            "{} layer {layer} unit {unit} at kink {kink}: activity_gradient {gradient}, \
             one-sided difference from direction {direction}: {numeric}",
            shape.activation.name()
        );
    }
}

// --- Energy descent below the stability limit -----------------------------------------------

/// Bound on `|phi''|`: 0 for linear, `4 / (3 sqrt 3)` for tanh (its maximum, where
/// `tanh = 1/sqrt 3`). The piecewise-linear activations have no bound because their first
/// derivative jumps, so the energy is not smooth there.
fn max_second_derivative(activation: Activation) -> Option<f64> {
    match activation {
        Activation::Linear => Some(0.0),
        Activation::Tanh => Some(4.0 / (3.0 * 3f64.sqrt())),
        Activation::HardTanh | Activation::Relu | Activation::LeakyRelu => None,
    }
}

/// Returns the upper bound `sqrt(||W||_1 ||W||_inf)` on the spectral norm of the row-major
/// `rows x columns` matrix `weights`.
fn spectral_norm_bound(weights: &[f64], rows: usize, columns: usize) -> f64 {
    let max_row_sum = (0..rows)
        .map(|i| {
            weights[i * columns..(i + 1) * columns]
                .iter()
                .map(|w| w.abs())
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let max_column_sum = (0..columns)
        .map(|j| {
            (0..rows)
                .map(|i| weights[i * columns + j].abs())
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    (max_column_sum * max_row_sum).sqrt()
}

/// Returns the stability limit `2 / L_H` of inference started at energy `initial_energy`: a
/// per-sample step size below it never increases the energy, for linear and tanh only.
///
/// `L_H` bounds the Hessian of the energy in the free activities `z_1 .. z_(L-1)`:
///
/// `L_H = (1 + max_l c_l)^2 + kappa * sqrt(2 E_0) * max_l a_l ||W_l||_2`, over `l = 2 ..= L`,
///
/// with `c_l = a_l ||W_l||_2 + s_l`, `||W||_2 <= sqrt(||W||_1 ||W||_inf)`, `kappa` the bound
/// on `|phi''|` and `E_0 = initial_energy`.
///
/// The first term bounds `J^T J`, where `J` is the Jacobian of the errors. Its diagonal
/// blocks `de_l/dz_l` are identities (norm 1). Its off-diagonal blocks
/// `de_l/dz_(l-1) = -(a_l W_l diag(phi') + s_l I)` have norm at most `c_l` because
/// `|phi'| <= 1`, and they sit in distinct block rows and columns, so
/// `||J|| <= 1 + max_l c_l`. The second term bounds `sum e (.) d^2 e / dz^2`, which is
/// diagonal with entries `-a_l phi''(z_(l-1),j) (W_l^T e_l)_j`, using `||e|| <= sqrt(2 E)`.
///
/// Gradient descent with step below `2 / L_H` does not increase an `L_H`-smooth function.
/// It also keeps `E <= E_0` along every step's segment, because the descent lemma holds up to
/// the first point that would exceed the current energy, so no such point exists. That keeps
/// the second term valid. Returns `None` for piecewise-linear activations.
fn stability_limit(network: &Network<'_, f64>, initial_energy: f64) -> Option<f64> {
    let arch = network.arch();
    let kappa = max_second_derivative(arch.activation())?;
    let mut max_coupling: f64 = 0.0;
    let mut max_curvature: f64 = 0.0;
    for layer in 2..=arch.depth() {
        let norm = spectral_norm_bound(
            network.layer_weights(layer),
            arch.width(layer),
            arch.width(layer - 1),
        );
        let scaling = network.scaling(layer);
        let skip = if arch.has_skip(layer) { 1.0 } else { 0.0 };
        max_coupling = max_coupling.max(scaling * norm + skip);
        max_curvature = max_curvature.max(scaling * norm);
    }
    let smoothness =
        (1.0 + max_coupling).powi(2) + kappa * (2.0 * initial_energy).sqrt() * max_curvature;
    Some(2.0 / smoothness)
}

/// Inference steps each energy-descent case takes.
const DESCENT_STEPS: u32 = 25;

proptest! {
    #![proptest_config(config(128))]

    /// Below the stability limit every inference step keeps or lowers the energy, from a
    /// random start or from the feedforward start, and `infer` takes the same steps.
    /// Restricted to linear and tanh, because relu, leaky_relu and hard_tanh make the energy
    /// non-smooth: crossing a kink can raise it at any step size.
    #[test]
    fn energy_does_not_increase_along_inference(
        case in cases(shapes(2..=MAX_DEPTH, &SMOOTH_ACTIVATIONS), 1.0, 2.0),
        from_feedforward in any::<bool>(),
        fraction in 0.05..0.99f64,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let scalings = shape.scalings();
        let network = Network::new(arch, &case.weights, &scalings)?;
        let mut buffers = Buffers::<f64>::new(&arch, 1);
        buffers.activities.copy_from_slice(&case.activities);
        if from_feedforward {
            let no_steps = InferenceConfig { steps: 0, step_size: 0.0, tolerance: None, rounding: ActivityRounding::Nearest };
            let mut workspace = buffers.workspace(&arch);
            network.infer_supervised(
                &mut workspace, 0, case.input(), case.target(), &no_steps)?;
        }
        let start = buffers.activities.clone();

        let initial_energy = energy(&network, &mut buffers);
        let limit = stability_limit(&network, initial_energy)
            .expect("linear and tanh have a stability limit");
        let step_size = fraction * limit;
        // Rounding of one energy evaluation in f64, with a wide margin.
        let tolerance = 1e-12 * (1.0 + initial_energy);
        let mut previous = initial_energy;
        for step in 1..=DESCENT_STEPS {
            let mut workspace = buffers.workspace(&arch);
            network.inference_step(&mut workspace, 0, step_size)?;
            let next = network.compute_errors(&mut workspace, 0)?;
            prop_assert!(
                next <= previous + tolerance,
                "step {step} with step size {step_size} (limit {limit}) raised the energy \
                 from {previous} to {next}"
            );
            previous = next;
        }

        buffers.activities.copy_from_slice(&start);
        let config = InferenceConfig { steps: DESCENT_STEPS, step_size, tolerance: None, rounding: ActivityRounding::Nearest };
        let mut workspace = buffers.workspace(&arch);
        let stats = network.infer(&mut workspace, 0, &config)?;
        prop_assert_eq!(stats.steps_taken, DESCENT_STEPS);
        prop_assert_eq!(stats.initial_energy, initial_energy, "infer's initial energy");
        prop_assert_eq!(stats.final_energy, previous, "infer's final energy");
    }
}

// --- Fixed-point saturation -----------------------------------------------------------------

/// Clamps an exact raw value to the `I16F16` range, counting a clamp in `overflows`.
fn saturate_raw(raw: i128, overflows: &mut u32) -> i32 {
    if raw > i32::MAX as i128 {
        *overflows += 1;
        i32::MAX
    } else if raw < i32::MIN as i128 {
        *overflows += 1;
        i32::MIN
    } else {
        raw as i32
    }
}

/// Rounds `wide` to nearest with ties toward positive infinity after dropping `shift` bits.
fn round_shift(wide: i128, shift: u32) -> i128 {
    (wide + (1 << (shift - 1))) >> shift
}

/// Computes `mu_layer` from `input` in exact `i128` arithmetic, rounded once and saturated
/// in the core's order: the product term is rounded and clamped, then the skip is added and
/// the sum clamped again. Returns per row the expected value and its number of clamps.
fn exact_prediction(
    network: &Network<'_, I16F16>,
    layer: usize,
    input: &[I16F16],
) -> Vec<Option<(I16F16, u32)>> {
    let arch = network.arch();
    let activated: Vec<i128> = input
        .iter()
        .map(|&x| {
            let value = if layer == 1 {
                x
            } else {
                <I16F16 as Scalar>::activate(arch.activation(), x)
            };
            value.to_bits() as i128
        })
        .collect();
    let scaling = network.scaling(layer).to_bits() as i128;
    let weights = network.layer_weights(layer);
    let mut rows = Vec::new();
    for (i, row) in weights.chunks_exact(input.len()).enumerate() {
        let products: Vec<i128> = row
            .iter()
            .zip(&activated)
            .map(|(w, &x)| w.to_bits() as i128 * x)
            .collect();
        let sum: i128 = products.iter().sum();
        let mut clamps = 0;
        let mut mu = saturate_raw(round_shift(sum * scaling, 32), &mut clamps);
        if arch.has_skip(layer) {
            mu = saturate_raw(mu as i128 + input[i].to_bits() as i128, &mut clamps);
        }
        rows.push(Some((I16F16::from_bits(mu), clamps)));
    }
    rows
}

/// Generates `count` values with magnitudes in `[1e5, 1e9]` and random signs.
fn huge_values(count: usize) -> impl Strategy<Value = Vec<f64>> {
    vec((1e5..=1e9f64, any::<bool>()), count).prop_map(|values| {
        values
            .into_iter()
            .map(|(magnitude, negative)| if negative { -magnitude } else { magnitude })
            .collect()
    })
}

/// A network whose weights are near `±32767` and whose input and target lie far outside
/// the `I16F16` range. The input features share one sign and so does each row of layer 1,
/// so every true sum of layer 1 has a known sign.
#[derive(Clone, Debug)]
struct HugeCase {
    shape: Shape,
    /// Weight magnitudes in `[30000, 32767]`.
    magnitudes: Vec<f64>,
    /// Weight signs of layers 2 and above, one per weight (`true` is negative).
    signs: Vec<bool>,
    /// Weight sign of each row of layer 1 (`true` is negative).
    first_row_signs: Vec<bool>,
    /// Input magnitudes in `[1e5, 1e9]`.
    input_magnitudes: Vec<f64>,
    input_negative: bool,
    target: Vec<f64>,
}

impl HugeCase {
    fn weights(&self) -> Vec<f64> {
        let input_width = self.shape.widths[0];
        let first_len = input_width * self.shape.widths[1];
        self.magnitudes
            .iter()
            .enumerate()
            .map(|(index, &magnitude)| {
                let negative = if index < first_len {
                    self.first_row_signs[index / input_width]
                } else {
                    self.signs[index]
                };
                if negative {
                    -magnitude
                } else {
                    magnitude
                }
            })
            .collect()
    }

    fn input(&self) -> Vec<f64> {
        let sign = if self.input_negative { -1.0 } else { 1.0 };
        self.input_magnitudes.iter().map(|m| sign * m).collect()
    }
}

fn huge_cases() -> impl Strategy<Value = HugeCase> {
    shapes(1..=MAX_DEPTH, &ACTIVATIONS)
        .prop_flat_map(|shape| {
            let count = weights_len(&shape.widths);
            let magnitudes = vec(30000.0..=32767.0f64, count);
            let signs = vec(any::<bool>(), count);
            let first_row_signs = vec(any::<bool>(), shape.widths[1]);
            let input_magnitudes = vec(1e5..=1e9f64, shape.widths[0]);
            let target = huge_values(shape.widths[shape.depth()]);
            (
                Just(shape),
                magnitudes,
                signs,
                first_row_signs,
                input_magnitudes,
                any::<bool>(),
                target,
            )
        })
        .prop_map(
            |(
                shape,
                magnitudes,
                signs,
                first_row_signs,
                input_magnitudes,
                input_negative,
                target,
            )| {
                HugeCase {
                    shape,
                    magnitudes,
                    signs,
                    first_row_signs,
                    input_magnitudes,
                    input_negative,
                    target,
                }
            },
        )
}

/// Converts `values` to `I16F16` and returns them with the number of saturated conversions.
fn to_fixed(values: &[f64]) -> (Vec<I16F16>, u32) {
    let mut overflows = 0;
    let converted = values
        .iter()
        .map(|&value| I16F16::from_f64_rounded(value, &mut overflows))
        .collect();
    (converted, overflows)
}

/// Computes one SGD update `w - lr * g` in exact integer arithmetic, rounding the product
/// once and clamping each result, and returns the new weight and its number of clamps.
fn exact_sgd_update(weight: I16F16, learning_rate: I16F16, gradient: I16F16) -> (I16F16, u32) {
    let mut clamps = 0;
    let product = learning_rate.to_bits() as i128 * gradient.to_bits() as i128;
    let change = saturate_raw(round_shift(product, 16), &mut clamps);
    let updated = saturate_raw(weight.to_bits() as i128 - change as i128, &mut clamps);
    (I16F16::from_bits(updated), clamps)
}

proptest! {
    #![proptest_config(config(128))]

    /// Values outside `[-32768, 32768)` convert to `I16F16::MIN` or `MAX` by their sign and
    /// are counted once each. Values inside round to nearest and are not counted.
    #[test]
    fn fixed_conversion_saturates_by_sign(
        magnitude in prop_oneof![32768.0..=1e9f64, 1e9..=1e300f64],
        inside in -32768.0..32767.99f64,
        negative in any::<bool>(),
    ) {
        let value = if negative { -magnitude } else { magnitude };
        let mut overflows = 0;
        let converted = I16F16::from_f64_rounded(value, &mut overflows);
        let expected = if negative { I16F16::MIN } else { I16F16::MAX };
        prop_assert_eq!(converted, expected, "conversion of {}", value);
        prop_assert_eq!(overflows, 1, "overflow count for {}", value);

        let mut overflows = 0;
        let converted = I16F16::from_f64_rounded(inside, &mut overflows);
        prop_assert_eq!(overflows, 0, "overflow count for {}", inside);
        let error = (converted.to_f64() - inside).abs();
        prop_assert!(error <= 0.5 / 65536.0, "{inside} converted to {converted}, error {error}");
    }

    /// Conversion to `I16F16` keeps the order of its inputs, saturated or not.
    #[test]
    fn fixed_conversion_is_monotone(
        a in prop_oneof![-1e9..=1e9f64, -40000.0..=40000.0f64],
        b in prop_oneof![-1e9..=1e9f64, -40000.0..=40000.0f64],
    ) {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        let mut overflows = 0;
        let low_fixed = I16F16::from_f64_rounded(low, &mut overflows);
        let high_fixed = I16F16::from_f64_rounded(high, &mut overflows);
        prop_assert!(
            low_fixed <= high_fixed,
            "{low} <= {high} converted to {low_fixed} > {high_fixed}"
        );
    }

    /// With inputs far outside the `I16F16` range and weights near `±32767`, every kernel
    /// saturates instead of wrapping and counts what it clamps:
    /// - each feedforward prediction equals the exact one rounded once and clamped, and
    ///   layer 1 saturates to the sign of its row times the input sign;
    /// - inference and the weight gradients return `Ok`, and each gradient of the one-sample
    ///   batch equals `-a_l e phi(z)` rounded once and clamped;
    /// - SGD matches exact-then-saturate and returns the number of clamps;
    /// - Adam moves each weight against its gradient's sign or leaves it, so a weight at a
    ///   bound never wraps to the other sign.
    #[test]
    fn fixed_point_saturates_without_wrapping(
        case in huge_cases(),
        steps in 0..4u32,
        step_size in 0.01..1.0f64,
        learning_rate in 0.01..2.0f64,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let (mut weights, weight_overflows) = to_fixed(&case.weights());
        prop_assert_eq!(weight_overflows, 0, "weights near ±32767 fit I16F16");
        let (scalings, _) = to_fixed(&shape.scalings());
        let (input, input_overflows) = to_fixed(&case.input());
        let (target, target_overflows) = to_fixed(&case.target);
        prop_assert_eq!(input_overflows as usize, input.len(), "every input saturates");
        prop_assert_eq!(target_overflows as usize, target.len(), "every target saturates");

        let mut buffers = Buffers::<I16F16>::new(&arch, 1);
        let mut gradients = vec![I16F16::ZERO; weights.len()];
        {
            let network = Network::new(arch, &weights, &scalings)?;
            let mut workspace = buffers.workspace(&arch);
            network.feedforward(&mut workspace, 0, &input)?;
            let activities = workspace.activities(0).to_vec();
            let mut expected_clamps = vec![0; arch.depth()];
            for layer in 1..=arch.depth() {
                let previous =
                    &activities[arch.activity_offset(layer - 1)..][..arch.width(layer - 1)];
                let output = &activities[arch.activity_offset(layer)..][..arch.width(layer)];
                let expected = exact_prediction(&network, layer, previous);
                for (unit, (&actual, row)) in output.iter().zip(&expected).enumerate() {
                    let Some((value, clamps)) = *row else {
                        continue;
                    };
                    expected_clamps[layer - 1] += clamps;
                    prop_assert_eq!(
                        actual, value,
                        "layer {} unit {}: feedforward {} but exact-then-saturate {}",
                        layer, unit, actual, value
                    );
                }
            }
            for (unit, &negative_row) in case.first_row_signs.iter().enumerate() {
                let expected = if negative_row == case.input_negative {
                    I16F16::MAX
                } else {
                    I16F16::MIN
                };
                let actual = activities[arch.activity_offset(1) + unit];
                prop_assert_eq!(actual, expected, "layer 1 unit {} saturates by sign", unit);
            }
            for (layer, (&counted, &clamps)) in
                workspace.overflows().iter().zip(&expected_clamps).enumerate()
            {
                prop_assert!(
                    counted >= clamps,
                    "layer {} counted {counted} saturations, exact-then-saturate clamps {clamps}",
                    layer + 1
                );
            }
            prop_assert!(
                workspace.overflows()[0] as usize >= arch.width(1),
                "layer 1 counted {} saturations for {} saturated units",
                workspace.overflows()[0],
                arch.width(1)
            );

            let config = InferenceConfig {
                steps,
                step_size: I16F16::from_num(step_size),
                tolerance: None,
                rounding: ActivityRounding::Nearest,
            };
            network.infer_supervised(&mut workspace, 0, &input, &target, &config)?;
            network.weight_gradients(&mut workspace, 1, &mut gradients)?;
            let activities = workspace.activities(0);
            let errors = workspace.errors(0);
            for layer in 1..=arch.depth() {
                let input_width = arch.width(layer - 1);
                let previous = &activities[arch.activity_offset(layer - 1)..][..input_width];
                let error = &errors[arch.error_offset(layer)..][..arch.width(layer)];
                let layer_gradients = &gradients[arch.weight_offset(layer)..];
                let coefficient = -(network.scaling(layer).to_bits() as i128);
                for (i, &e) in error.iter().enumerate() {
                    for (j, &x) in previous.iter().enumerate() {
                        let activated = if layer == 1 {
                            x
                        } else {
                            <I16F16 as Scalar>::activate(arch.activation(), x)
                        };
                        let product = e.to_bits() as i128 * activated.to_bits() as i128;
                        let mut clamps = 0;
                        let expected = I16F16::from_bits(saturate_raw(
                            round_shift(product * coefficient, 32),
                            &mut clamps,
                        ));
                        let actual = layer_gradients[i * input_width + j];
                        prop_assert_eq!(
                            actual, expected,
                            "layer {} gradient ({}, {}): error {}, activity {}",
                            layer, i, j, e, activated
                        );
                    }
                }
            }
            prop_assert!(workspace.total_overflows() > 0, "no saturation counted");
        }

        let learning_rate = I16F16::from_num(learning_rate);
        let before = weights.clone();
        let sgd = Sgd { learning_rate };
        let saturated = sgd.step(&mut weights, &gradients)?;
        let mut expected_saturated = 0;
        for (index, ((&old, &gradient), &new)) in
            before.iter().zip(&gradients).zip(&weights).enumerate()
        {
            let (expected, clamps) = exact_sgd_update(old, learning_rate, gradient);
            expected_saturated += clamps;
            prop_assert_eq!(
                new, expected,
                "SGD weight {}: {} - {} * {}", index, old, learning_rate, gradient
            );
        }
        prop_assert_eq!(saturated, expected_saturated, "SGD saturation count");

        let mut adam = Adam::new(1000.0, 0.9, 0.999, 1e-8);
        let mut first = vec![0i64; weights.len()];
        let mut second = vec![0i64; weights.len()];
        let before = weights.clone();
        adam.step(&mut weights, &gradients, &mut first, &mut second)?;
        for (index, ((&old, &gradient), &new)) in
            before.iter().zip(&gradients).zip(&weights).enumerate()
        {
            if gradient > I16F16::ZERO {
                prop_assert!(
                    new <= old,
                    "Adam weight {index} rose from {old} to {new} with gradient {gradient}"
                );
            } else if gradient < I16F16::ZERO {
                prop_assert!(
                    new >= old,
                    "Adam weight {index} fell from {old} to {new} with gradient {gradient}"
                );
            } else {
                prop_assert_eq!(new, old, "Adam weight {} moved with gradient 0", index);
            }
        }
    }
}

/// A running sum of full-range products that passes the `i64` range and then cancels must
/// still give the exact result: here one product, about `2^30`, which saturates to
/// `I16F16::MAX` and is counted once.
#[test]
fn fixed_sum_cancelling_after_saturation() {
    let widths = [5, 1];
    let arch = Arch::new(&widths, Activation::Linear, false).expect("valid widths");
    let weights = [
        I16F16::MAX,
        I16F16::MAX,
        I16F16::MAX,
        -I16F16::MAX,
        -I16F16::MAX,
    ];
    let scalings = [I16F16::ONE];
    let network = Network::new(arch, &weights, &scalings).expect("valid network");
    let mut buffers = Buffers::<I16F16>::new(&arch, 1);
    let mut workspace = buffers.workspace(&arch);
    let output = network
        .feedforward(&mut workspace, 0, &[I16F16::MAX; 5])
        .expect("workspace fits");
    assert_eq!(output[0], I16F16::MAX, "saturated output");
    assert_eq!(workspace.overflows()[0], 1, "saturation count");
}

// --- Model and sample files -----------------------------------------------------------------

/// Builds a value of `S` from the low `S::FORMAT.bytes()` bytes of `bits`, so every bit
/// pattern (NaN payloads and negative zero included) can be tested.
fn from_bits<S: Scalar>(bits: u64) -> S {
    S::from_le_slice(&bits.to_le_bytes()[..S::FORMAT.bytes()])
}

/// Returns the stored bytes of `values`, which compare bit for bit where `==` would not.
fn bytes_of<S: Scalar>(values: &[S]) -> Vec<u8> {
    let size = S::FORMAT.bytes();
    let mut out = vec![0; values.len() * size];
    for (value, chunk) in values.iter().zip(out.chunks_exact_mut(size)) {
        value.write_le(chunk);
    }
    out
}

/// Random corruptions of a file: byte positions with a non-zero XOR mask, and lengths to
/// truncate to, each as an `Index` into the file.
#[derive(Clone, Debug)]
struct Damage {
    flips: Vec<(Index, u8)>,
    truncations: Vec<Index>,
}

fn damage() -> impl Strategy<Value = Damage> {
    (
        vec((any::<Index>(), 1..=255u8), 32),
        vec(any::<Index>(), 16),
    )
        .prop_map(|(flips, truncations)| Damage { flips, truncations })
}

/// A model file's contents: the raw bits of every stored value (step size, tolerance,
/// input scale, scalings, weights) and the inference settings.
#[derive(Clone, Debug)]
struct ModelCase {
    shape: Shape,
    format: NumericFormat,
    bits: Vec<u64>,
    steps: u32,
    has_tolerance: bool,
    damage: Damage,
}

fn model_cases() -> impl Strategy<Value = ModelCase> {
    shapes(1..=MAX_DEPTH, &ACTIVATIONS)
        .prop_flat_map(|shape| {
            let values = 3 + shape.depth() + weights_len(&shape.widths);
            (
                Just(shape),
                select(&FORMATS[..]),
                vec(any::<u64>(), values),
                any::<u32>(),
                any::<bool>(),
                damage(),
            )
        })
        .prop_map(
            |(shape, format, bits, steps, has_tolerance, damage)| ModelCase {
                shape,
                format,
                bits,
                steps,
                has_tolerance,
                damage,
            },
        )
}

/// Writes and parses a model file in format `S`, checks every decoded field, that format
/// `Other` is rejected, and that each flipped byte and each truncation is rejected.
fn check_model_file<S: Scalar, Other: Scalar>(case: &ModelCase) -> Result<(), TestCaseError> {
    let shape = &case.shape;
    let arch = shape.arch();
    let depth = shape.depth();
    let values: Vec<S> = case.bits.iter().map(|&bits| from_bits(bits)).collect();
    let (settings, parameters) = values.split_at(3);
    let (scalings, weights) = parameters.split_at(depth);
    let inference = InferenceConfig {
        steps: case.steps,
        step_size: settings[0],
        tolerance: case.has_tolerance.then_some(settings[1]),
        rounding: ActivityRounding::Nearest,
    };
    let input_scale = settings[2];

    let len = encoded_len(&shape.widths, S::FORMAT);
    let mut file = vec![0u8; len + 3];
    let written = write_model(
        &arch,
        shape.parameterisation,
        &inference,
        input_scale,
        scalings,
        weights,
        &mut file,
    )?;
    prop_assert_eq!(written, len, "bytes written");
    file.truncate(len);

    let mut short = vec![0u8; len - 1];
    let result = write_model(
        &arch,
        shape.parameterisation,
        &inference,
        input_scale,
        scalings,
        weights,
        &mut short,
    );
    prop_assert_eq!(
        result,
        Err(Error::OutputTooSmall {
            needed: len,
            available: len - 1
        })
    );

    let model = Model::parse(&file)?;
    let header = model.header();
    prop_assert_eq!(header.format, S::FORMAT);
    prop_assert_eq!(header.activation, shape.activation);
    prop_assert_eq!(header.parameterisation, shape.parameterisation);
    prop_assert_eq!(header.skip, shape.skip);
    prop_assert_eq!(header.depth, depth);
    prop_assert_eq!(header.inference_steps, case.steps);
    prop_assert_eq!(header.has_tolerance, case.has_tolerance);
    let mut widths = vec![0; depth + 1];
    prop_assert_eq!(model.widths_into(&mut widths)?, &shape.widths[..]);
    model.check_matches::<S>(&arch)?;
    prop_assert_eq!(model.weights_len(), weights.len());

    let mut decoded_weights = vec![S::ZERO; weights.len()];
    model.weights_into(&mut decoded_weights)?;
    prop_assert_eq!(bytes_of(&decoded_weights), bytes_of(weights), "weights");
    let mut decoded_scalings = vec![S::ZERO; depth];
    model.scalings_into(&mut decoded_scalings)?;
    prop_assert_eq!(bytes_of(&decoded_scalings), bytes_of(scalings), "scalings");
    let decoded = model.inference_config::<S>()?;
    prop_assert_eq!(decoded.steps, case.steps);
    prop_assert_eq!(
        bytes_of(&[decoded.step_size]),
        bytes_of(&[inference.step_size]),
        "step size"
    );
    prop_assert_eq!(
        decoded.tolerance.map(|tolerance| bytes_of(&[tolerance])),
        inference.tolerance.map(|tolerance| bytes_of(&[tolerance])),
        "tolerance"
    );
    prop_assert_eq!(
        bytes_of(&[model.input_scale::<S>()?]),
        bytes_of(&[input_scale]),
        "input scale"
    );

    let mismatch = Err(Error::FormatMismatch {
        file: S::FORMAT.code(),
        expected: Other::FORMAT.code(),
    });
    let mut other_weights = vec![Other::ZERO; weights.len()];
    prop_assert_eq!(model.weights_into(&mut other_weights), mismatch);
    let mut other_scalings = vec![Other::ZERO; depth];
    prop_assert_eq!(model.scalings_into(&mut other_scalings), mismatch);
    prop_assert_eq!(model.input_scale::<Other>().err(), mismatch.err());
    prop_assert_eq!(model.inference_config::<Other>().err(), mismatch.err());

    for &(position, mask) in &case.damage.flips {
        let index = position.index(len);
        let mut corrupt = file.clone();
        corrupt[index] ^= mask;
        let result = Model::parse(&corrupt);
        prop_assert!(
            result.is_err(),
            "byte {index} of {len} XOR {mask:#04x} was accepted"
        );
    }
    for &cut in &case.damage.truncations {
        let cut = cut.index(len);
        let result = Model::parse(&file[..cut]);
        prop_assert!(
            matches!(result, Err(Error::Truncated { actual, .. }) if actual == cut),
            "truncation to {cut} of {len} bytes gave {result:?}"
        );
    }
    let mut longer = file.clone();
    longer.push(0);
    prop_assert_eq!(
        Model::parse(&longer).err(),
        Some(Error::TrailingBytes {
            expected: len,
            actual: len + 1
        }),
        "one trailing byte"
    );
    Ok(())
}

/// A sample file's contents: labels and the raw bits of every feature.
#[derive(Clone, Debug)]
struct SampleCase {
    format: NumericFormat,
    features: usize,
    labels: Vec<u32>,
    bits: Vec<u64>,
    damage: Damage,
}

fn sample_cases() -> impl Strategy<Value = SampleCase> {
    (0..=6usize, 0..=MAX_WIDTH)
        .prop_flat_map(|(count, features)| {
            (
                select(&FORMATS[..]),
                Just(features),
                vec(any::<u32>(), count),
                vec(any::<u64>(), count * features),
                damage(),
            )
        })
        .prop_map(|(format, features, labels, bits, damage)| SampleCase {
            format,
            features,
            labels,
            bits,
            damage,
        })
}

/// Writes and parses a sample file in format `S`, checks every sample, that format `Other`
/// and out-of-range indices are rejected, and that each flipped byte and each truncation is
/// rejected.
fn check_sample_file<S: Scalar, Other: Scalar>(case: &SampleCase) -> Result<(), TestCaseError> {
    let count = case.labels.len();
    let values: Vec<S> = case.bits.iter().map(|&bits| from_bits(bits)).collect();
    let len = samples_encoded_len(count, case.features, S::FORMAT);
    let mut file = vec![0u8; len + 3];
    let written = write_samples(&values, &case.labels, case.features, &mut file)?;
    prop_assert_eq!(written, len, "bytes written");
    file.truncate(len);

    let mut short = vec![0u8; len - 1];
    let result = write_samples(&values, &case.labels, case.features, &mut short);
    prop_assert_eq!(
        result,
        Err(Error::OutputTooSmall {
            needed: len,
            available: len - 1
        })
    );

    let set = SampleSet::parse(&file)?;
    prop_assert_eq!(set.len(), count);
    prop_assert_eq!(set.is_empty(), count == 0);
    prop_assert_eq!(set.feature_count(), case.features);
    prop_assert_eq!(set.format(), S::FORMAT);
    let mut row = vec![S::ZERO; case.features];
    for (index, &label) in case.labels.iter().enumerate() {
        let decoded = set.sample_into(index, &mut row)?;
        prop_assert_eq!(decoded, label as usize, "label of sample {}", index);
        let expected = &values[index * case.features..(index + 1) * case.features];
        prop_assert_eq!(
            bytes_of(&row),
            bytes_of(expected),
            "features of sample {}",
            index
        );
    }
    let beyond = set.sample_into(count, &mut row);
    prop_assert!(
        matches!(
            beyond,
            Err(Error::BufferLength {
                buffer: Buffer::Input,
                ..
            })
        ),
        "sample {count} of {count} gave {beyond:?}"
    );
    let mut wrong_width = vec![S::ZERO; case.features + 1];
    let result = set.sample_into(0, &mut wrong_width);
    prop_assert_eq!(
        result,
        Err(Error::BufferLength {
            buffer: Buffer::Input,
            expected: case.features,
            actual: case.features + 1
        })
    );
    let mut other_row = vec![Other::ZERO; case.features];
    prop_assert_eq!(
        set.sample_into(0, &mut other_row),
        Err(Error::FormatMismatch {
            file: S::FORMAT.code(),
            expected: Other::FORMAT.code()
        })
    );

    for &(position, mask) in &case.damage.flips {
        let index = position.index(len);
        let mut corrupt = file.clone();
        corrupt[index] ^= mask;
        let result = SampleSet::parse(&corrupt);
        prop_assert!(
            result.is_err(),
            "byte {index} of {len} XOR {mask:#04x} was accepted"
        );
    }
    for &cut in &case.damage.truncations {
        let cut = cut.index(len);
        let result = SampleSet::parse(&file[..cut]);
        prop_assert!(
            matches!(result, Err(Error::Truncated { actual, .. }) if actual == cut),
            "truncation to {cut} of {len} bytes gave {result:?}"
        );
    }
    let mut longer = file.clone();
    longer.push(0);
    prop_assert_eq!(
        SampleSet::parse(&longer).err(),
        Some(Error::TrailingBytes {
            expected: len,
            actual: len + 1
        }),
        "one trailing byte"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(128))]

    /// A model file written in f32, f64, I16F16 or I4F12 parses back to the same header, widths
    /// and value bits, and rejects every tested flipped byte and truncation with an error.
    #[test]
    fn model_file_round_trip(case in model_cases()) {
        match case.format {
            NumericFormat::F32 => check_model_file::<f32, f64>(&case)?,
            NumericFormat::F64 => check_model_file::<f64, I16F16>(&case)?,
            NumericFormat::I16F16 => check_model_file::<I16F16, f32>(&case)?,
            NumericFormat::I4F12 => check_model_file::<I4F12, I16F16>(&case)?,
        }
    }

    /// A sample file written in f32, f64, I16F16 or I4F12 parses back to the same labels and
    /// feature bits, and rejects every tested flipped byte and truncation with an error.
    #[test]
    fn sample_file_round_trip(case in sample_cases()) {
        match case.format {
            NumericFormat::F32 => check_sample_file::<f32, f64>(&case)?,
            NumericFormat::F64 => check_sample_file::<f64, I16F16>(&case)?,
            NumericFormat::I16F16 => check_sample_file::<I16F16, f32>(&case)?,
            NumericFormat::I4F12 => check_sample_file::<I4F12, I16F16>(&case)?,
        }
    }
}

// --- Determinism, and f32 against f64 --------------------------------------------------------

/// Scales each layer's weights by `1 / sqrt(n_(l-1))`, the standard fan-in initialisation
/// range, so activities stay of order one through every layer.
fn fan_in_scaled(shape: &Shape, weights: &[f64]) -> Vec<f64> {
    let arch = shape.arch();
    let mut scaled = weights.to_vec();
    for layer in 1..=arch.depth() {
        let offset = arch.weight_offset(layer);
        let len = arch.width(layer) * arch.width(layer - 1);
        let factor = 1.0 / (arch.width(layer - 1) as f64).sqrt();
        for weight in &mut scaled[offset..offset + len] {
            *weight *= factor;
        }
    }
    scaled
}

/// Everything one supervised inference leaves behind for its sample.
#[derive(Debug, PartialEq)]
struct InferenceRun<S> {
    stats: InferenceStats<S>,
    activities: Vec<S>,
    errors: Vec<S>,
    overflows: Vec<u32>,
}

/// Runs supervised inference on sample `sample` of a fresh workspace with `capacity` slots.
fn run_inference<S: Scalar>(
    network: &Network<'_, S>,
    capacity: usize,
    sample: usize,
    input: &[S],
    target: &[S],
    config: &InferenceConfig<S>,
) -> Result<InferenceRun<S>, Error> {
    let arch = network.arch();
    let mut buffers = Buffers::<S>::new(arch, capacity);
    let mut workspace = buffers.workspace(arch);
    let stats = network.infer_supervised(&mut workspace, sample, input, target, config)?;
    Ok(InferenceRun {
        stats,
        activities: workspace.activities(sample).to_vec(),
        errors: workspace.errors(sample).to_vec(),
        overflows: workspace.overflows().to_vec(),
    })
}

/// Relative tolerance of the `f32` core against the `f64` core:
/// `|x32 - x64| <= F32_TOLERANCE * (1 + |x64|)`. Parameters are exactly representable in
/// both, so the difference is `f32` rounding alone: about `2^-24` per operation,
/// accumulated over dot products of at most 12 terms, 5 layers and 25 inference steps below
/// the stability limit. The largest ratio observed was between 1e-7 and 3e-7 (3000 cases of
/// this property), so 1e-5 leaves a margin of about 30.
const F32_TOLERANCE: f64 = 1e-5;

proptest! {
    #![proptest_config(config(128))]

    /// Repeated I16F16 inference gives bit-identical activities, errors, energies and
    /// overflow counts, in a fresh workspace, in the same workspace, and in another slot of
    /// a larger workspace.
    #[test]
    fn fixed_inference_is_deterministic(
        case in cases(shapes(1..=MAX_DEPTH, &ACTIVATIONS), 1.0, 2.0),
        steps in 0..30u32,
        step_size in 0.01..0.5f64,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let weights: Vec<I16F16> = convert(&case.weights);
        let scalings: Vec<I16F16> = convert(&shape.scalings());
        let input: Vec<I16F16> = convert(case.input());
        let target: Vec<I16F16> = convert(case.target());
        let network = Network::new(arch, &weights, &scalings)?;
        let config = InferenceConfig {
            steps,
            step_size: I16F16::from_num(step_size),
            tolerance: None,
            rounding: ActivityRounding::Nearest,
        };

        let first = run_inference(&network, 1, 0, &input, &target, &config)?;
        let second = run_inference(&network, 1, 0, &input, &target, &config)?;
        prop_assert_eq!(&first, &second, "two fresh workspaces");
        let other_slot = run_inference(&network, 3, 2, &input, &target, &config)?;
        prop_assert_eq!(&first, &other_slot, "slot 2 of a 3-sample workspace");

        let mut buffers = Buffers::<I16F16>::new(&arch, 1);
        let mut workspace = buffers.workspace(&arch);
        let stats = network.infer_supervised(&mut workspace, 0, &input, &target, &config)?;
        let activities = workspace.activities(0).to_vec();
        workspace.reset_overflows();
        let again = network.infer_supervised(&mut workspace, 0, &input, &target, &config)?;
        prop_assert_eq!(stats, again, "same workspace, statistics");
        prop_assert_eq!(&activities, workspace.activities(0), "same workspace, activities");
        prop_assert_eq!(&first.overflows[..], workspace.overflows(), "same workspace, overflows");
    }

    /// The f32 core follows the f64 core within `F32_TOLERANCE`: feedforward for all five
    /// activations, and inference for linear and tanh. Inference with relu, leaky_relu or
    /// hard_tanh is left out because a rounding difference can put an activity on the other
    /// side of a kink, where the derivative jumps and the trajectories part legitimately.
    #[test]
    fn f32_core_follows_f64_core(
        case in cases(shapes(1..=MAX_DEPTH, &ACTIVATIONS), 1.0, 1.0),
        fraction in 0.05..0.99f64,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let round_to_f32 = |values: &[f64]| -> Vec<f64> {
            values.iter().map(|&value| value as f32 as f64).collect()
        };
        let weights64 = round_to_f32(&fan_in_scaled(shape, &case.weights));
        let scalings64 = round_to_f32(&shape.scalings());
        let input64 = round_to_f32(case.input());
        let target64 = round_to_f32(case.target());
        let weights32: Vec<f32> = convert(&weights64);
        let scalings32: Vec<f32> = convert(&scalings64);
        let input32: Vec<f32> = convert(&input64);
        let target32: Vec<f32> = convert(&target64);
        let network64 = Network::new(arch, &weights64, &scalings64)?;
        let network32 = Network::new(arch, &weights32, &scalings32)?;

        let no_steps64 = InferenceConfig { steps: 0, step_size: 0.0, tolerance: None, rounding: ActivityRounding::Nearest };
        let no_steps32 = InferenceConfig { steps: 0, step_size: 0.0f32, tolerance: None, rounding: ActivityRounding::Nearest };
        let start64 = run_inference(&network64, 1, 0, &input64, &target64, &no_steps64)?;
        let start32 = run_inference(&network32, 1, 0, &input32, &target32, &no_steps32)?;
        let pairs = start32.activities.iter().zip(&start64.activities);
        for (index, (&a32, &a64)) in pairs.enumerate() {
            let difference = (a32 as f64 - a64).abs();
            prop_assert!(
                difference <= F32_TOLERANCE * (1.0 + a64.abs()),
                "feedforward activity {index}: f32 {a32}, f64 {a64}"
            );
        }

        let Some(limit) = stability_limit(&network64, start64.stats.initial_energy) else {
            return Ok(());
        };
        let step_size = (fraction * limit) as f32;
        let config64 = InferenceConfig {
            steps: DESCENT_STEPS,
            step_size: step_size as f64,
            tolerance: None,
            rounding: ActivityRounding::Nearest,
        };
        let config32 = InferenceConfig { steps: DESCENT_STEPS, step_size, tolerance: None, rounding: ActivityRounding::Nearest };
        let end64 = run_inference(&network64, 1, 0, &input64, &target64, &config64)?;
        let end32 = run_inference(&network32, 1, 0, &input32, &target32, &config32)?;
        let pairs = end32.activities.iter().zip(&end64.activities);
        for (index, (&a32, &a64)) in pairs.enumerate() {
            let difference = (a32 as f64 - a64).abs();
            prop_assert!(
                difference <= F32_TOLERANCE * (1.0 + a64.abs()),
                "activity {index} after inference: f32 {a32}, f64 {a64}"
            );
        }
        let energy64 = end64.stats.final_energy;
        let energy32 = end32.stats.final_energy as f64;
        prop_assert!(
            (energy32 - energy64).abs() <= F32_TOLERANCE * (1.0 + energy64),
            "final energy: f32 {energy32}, f64 {energy64}"
        );
    }
}

// --- Argument checks ------------------------------------------------------------------------

/// Returns `correct` moved by `offset` (never negative and never `correct` itself).
fn wrong_length(correct: usize, offset: usize, shorter: bool) -> usize {
    if shorter && correct >= offset {
        correct - offset
    } else {
        correct + offset
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// `Workspace::new` and `Network::new` return `Error::BufferLength` naming the one
    /// buffer of wrong length, with the expected and actual lengths. A capacity so large
    /// that the needed length overflows `usize` is rejected the same way.
    #[test]
    fn constructors_reject_wrong_lengths(
        shape in shapes(1..=MAX_DEPTH, &ACTIVATIONS),
        capacity in 0..=3usize,
        buffer_choice in 0..6usize,
        offset in 1..=3usize,
        shorter in any::<bool>(),
    ) {
        let arch = shape.arch();
        let mut lengths = [
            capacity * arch.activities_len(),
            capacity * arch.errors_len(),
            capacity * arch.max_width(),
            arch.depth(),
            arch.weights_len(),
            arch.depth(),
        ];
        let correct = lengths[buffer_choice];
        lengths[buffer_choice] = wrong_length(correct, offset, shorter);
        let buffer = [
            Buffer::Activities,
            Buffer::Errors,
            Buffer::Scratch,
            Buffer::Overflows,
            Buffer::Weights,
            Buffer::Scalings,
        ][buffer_choice];
        let expected: Result<(), Error> = Err(Error::BufferLength {
            buffer,
            expected: correct,
            actual: lengths[buffer_choice],
        });

        let mut activities = vec![0.0f64; lengths[0]];
        let mut errors = vec![0.0f64; lengths[1]];
        let mut scratch = vec![0.0f64; lengths[2]];
        let mut overflows = vec![0u32; lengths[3]];
        let weights = vec![0.0f64; lengths[4]];
        let scalings = vec![1.0f64; lengths[5]];
        let workspace = Workspace::new(
            &arch, capacity, &mut activities, &mut errors, &mut scratch, &mut overflows,
        );
        let network = Network::new(arch, &weights, &scalings);
        if buffer_choice < 4 {
            prop_assert_eq!(workspace.err(), expected.err());
            prop_assert!(network.is_ok(), "Network::new rejected correct lengths");
        } else {
            prop_assert_eq!(network.err(), expected.err());
            prop_assert!(workspace.is_ok(), "Workspace::new rejected correct lengths");
        }

        let mut empty_activities: [f64; 0] = [];
        let mut empty_errors: [f64; 0] = [];
        let mut empty_scratch: [f64; 0] = [];
        let mut counters = vec![0u32; arch.depth()];
        let huge = Workspace::new(
            &arch,
            usize::MAX,
            &mut empty_activities,
            &mut empty_errors,
            &mut empty_scratch,
            &mut counters,
        );
        prop_assert!(
            matches!(
                huge,
                Err(Error::BufferLength { buffer: Buffer::Activities, actual: 0, .. })
            ),
            "capacity usize::MAX gave {:?}",
            huge.err()
        );
    }

    /// Every per-sample call with a sample index at or beyond the workspace capacity, up to
    /// `usize::MAX`, returns `Error::BatchSize`, and so does `weight_gradients` with a batch
    /// of 0 or above the capacity. A layer that is not free returns `Error::NotFreeLayer`.
    /// Inputs, targets, gradients and optimiser slices of the wrong length return
    /// `Error::BufferLength` and leave the weights and the Adam step count unchanged.
    #[test]
    fn calls_reject_bad_indices_and_lengths(
        case in cases(shapes(1..=MAX_DEPTH, &ACTIVATIONS), 1.0, 2.0),
        capacity in 1..=3usize,
        beyond in prop_oneof![0..4usize, Just(usize::MAX - 3)],
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let depth = arch.depth();
        let scalings = shape.scalings();
        let network = Network::new(arch, &case.weights, &scalings)?;
        let mut buffers = Buffers::<f64>::new(&arch, capacity);
        let mut workspace = buffers.workspace(&arch);
        let input = case.input();
        let target = case.target();
        let config = InferenceConfig { steps: 3, step_size: 0.1, tolerance: None, rounding: ActivityRounding::Nearest };

        for sample in [capacity.saturating_add(beyond), usize::MAX - beyond] {
            let is_batch_error = |result: Result<(), Error>| {
                matches!(result, Err(Error::BatchSize { capacity: c, .. }) if c == capacity)
            };
            let result = network.feedforward(&mut workspace, sample, input).map(|_| ());
            prop_assert!(is_batch_error(result), "feedforward sample {sample}: {result:?}");
            let result = network
                .infer_supervised(&mut workspace, sample, input, target, &config)
                .map(|_| ());
            prop_assert!(is_batch_error(result), "infer_supervised sample {sample}: {result:?}");
            let result = network.infer(&mut workspace, sample, &config).map(|_| ());
            prop_assert!(is_batch_error(result), "infer sample {sample}: {result:?}");
            let result = network.compute_errors(&mut workspace, sample).map(|_| ());
            prop_assert!(is_batch_error(result), "compute_errors sample {sample}: {result:?}");
            let result = network.inference_step(&mut workspace, sample, 0.1);
            prop_assert!(is_batch_error(result), "inference_step sample {sample}: {result:?}");
            let result = network.activity_gradient(&mut workspace, sample, 1).map(|_| ());
            prop_assert!(is_batch_error(result), "activity_gradient sample {sample}: {result:?}");
        }

        let mut gradients = vec![0.0f64; arch.weights_len()];
        for batch in [0, (capacity + 1).saturating_add(beyond)] {
            let result = network.weight_gradients(&mut workspace, batch, &mut gradients);
            prop_assert!(
                matches!(result, Err(Error::BatchSize { requested, .. }) if requested == batch),
                "weight_gradients batch {batch} of capacity {capacity}: {result:?}"
            );
        }

        for layer in [0, depth, depth + 1 + beyond.min(10)] {
            let result = network.activity_gradient(&mut workspace, 0, layer).map(|_| ());
            prop_assert_eq!(result, Err(Error::NotFreeLayer { layer, depth }));
        }

        let long_input = vec![0.0; input.len() + 1];
        let result = network.feedforward(&mut workspace, 0, &long_input).map(|_| ());
        prop_assert_eq!(
            result,
            Err(Error::BufferLength {
                buffer: Buffer::Input,
                expected: input.len(),
                actual: input.len() + 1
            })
        );
        let long_target = vec![0.0; target.len() + 1];
        let result = network
            .infer_supervised(&mut workspace, 0, input, &long_target, &config)
            .map(|_| ());
        prop_assert_eq!(
            result,
            Err(Error::BufferLength {
                buffer: Buffer::Target,
                expected: target.len(),
                actual: target.len() + 1
            })
        );
        let mut long_gradients = vec![0.0f64; arch.weights_len() + 1];
        let result = network.weight_gradients(&mut workspace, 1, &mut long_gradients);
        prop_assert_eq!(
            result,
            Err(Error::BufferLength {
                buffer: Buffer::Gradients,
                expected: arch.weights_len(),
                actual: arch.weights_len() + 1
            })
        );

        let mut weights = case.weights.clone();
        let sgd = Sgd { learning_rate: 0.1 };
        prop_assert_eq!(
            sgd.step(&mut weights, &gradients[1..]),
            Err(Error::BufferLength {
                buffer: Buffer::Gradients,
                expected: weights.len(),
                actual: weights.len() - 1
            })
        );
        let mut adam = Adam::new(0.01, 0.9, 0.999, 1e-8);
        let mut first = vec![0.0f64; weights.len()];
        let mut second = vec![0.0f64; weights.len() + 1];
        prop_assert_eq!(
            adam.step(&mut weights, &gradients, &mut first, &mut second),
            Err(Error::BufferLength {
                buffer: Buffer::OptimizerState,
                expected: weights.len(),
                actual: weights.len() + 1
            })
        );
        prop_assert_eq!(adam.steps(), 0, "a rejected Adam step must not count");
        prop_assert_eq!(&weights, &case.weights, "rejected steps must not change weights");
    }
}

/// Raw `I16F16` vectors from tiny to full-range magnitudes, so that both the `i64` and the
/// `i128` sums of the fixed-point products are taken.
fn raw_vector(len: usize) -> impl Strategy<Value = Vec<i32>> {
    prop_oneof![
        vec(-(1 << 18)..(1 << 18), len),
        vec(-(1 << 25)..(1 << 25), len),
        vec(any::<i32>(), len),
    ]
}

fn matrix_and_vector() -> impl Strategy<Value = (Vec<i32>, Vec<i32>, usize, i32)> {
    (1..=80usize, 1..=80usize).prop_flat_map(|(rows, columns)| {
        (
            prop_oneof![
                vec(any::<i32>(), rows * columns),
                vec(-(1 << 20)..(1 << 20), rows * columns)
            ],
            raw_vector(columns),
            Just(rows),
            prop_oneof![Just(1 << 16), 1..(1 << 17), any::<i32>()],
        )
    })
}

fn fixed_from_raw(raw: &[i32]) -> Vec<I16F16> {
    raw.iter().map(|&bits| I16F16::from_bits(bits)).collect()
}

proptest! {
    #![proptest_config(config(256))]

    /// The fixed-point matrix-vector and transposed products equal exact `i128` sums rounded
    /// once, bit for bit, with the same overflow counts, for small and full-range values.
    #[test]
    fn fixed_products_match_exact_sums(case in matrix_and_vector()) {
        let (matrix, vector, rows, scale) = case;
        let columns = vector.len();
        let matrix = fixed_from_raw(&matrix);
        let vector = fixed_from_raw(&vector);
        let scale = I16F16::from_bits(scale);

        let mut expected_overflows = 0;
        let expected: Vec<I16F16> = matrix
            .chunks_exact(columns)
            .map(|row| {
                let sum = row
                    .iter()
                    .zip(&vector)
                    .fold(0i128, |sum, (&w, &x)| I16F16::acc_mul_add(sum, w, x));
                I16F16::acc_scale_round(sum, scale, &mut expected_overflows)
            })
            .collect();
        let mut overflows = 0;
        let mut product = vec![I16F16::ZERO; rows];
        I16F16::matrix_product(&matrix, &vector, scale, &mut product, &mut overflows);
        prop_assert_eq!(&product, &expected, "matrix-vector product");
        prop_assert_eq!(overflows, expected_overflows, "matrix-vector overflows");

        // The same matrix read as `columns` rows of `rows` values, times a vector of
        // `columns` values.
        let mut expected_overflows = 0;
        let expected: Vec<I16F16> = (0..rows)
            .map(|j| {
                let sum = (0..columns).fold(0i128, |sum, i| {
                    I16F16::acc_mul_add(sum, matrix[i * rows + j], vector[i])
                });
                I16F16::acc_scale_round(sum, scale, &mut expected_overflows)
            })
            .collect();
        let mut overflows = 0;
        let mut transposed = vec![I16F16::ZERO; rows];
        I16F16::transposed_product(&matrix, &vector, scale, &mut transposed, &mut overflows);
        prop_assert_eq!(&transposed, &expected, "transposed product");
        prop_assert_eq!(overflows, expected_overflows, "transposed overflows");
    }
}

/// Runs `steps` full inference steps (every free layer, every error recomputed) on sample 0
/// after a feedforward start with the output clamped, and returns the final energy.
fn full_steps_inference(
    network: &Network<'_, I16F16>,
    workspace: &mut Workspace<'_, I16F16>,
    input: &[I16F16],
    target: &[I16F16],
    steps: u32,
    step_size: I16F16,
) -> I16F16 {
    let no_steps = InferenceConfig {
        steps: 0,
        step_size,
        tolerance: None,
        rounding: ActivityRounding::Nearest,
    };
    let stats = network
        .infer_supervised(workspace, 0, input, target, &no_steps)
        .unwrap();
    let mut energy = stats.final_energy;
    for _ in 0..steps {
        network.inference_step(workspace, 0, step_size).unwrap();
        energy = network.compute_errors(workspace, 0).unwrap();
    }
    energy
}

proptest! {
    #![proptest_config(config(128))]

    /// Inference skips layers whose errors are zero and keeps the errors below the lowest
    /// changed layer. In I16F16 that gives the same activities, errors and energy as full
    /// steps, bit for bit.
    #[test]
    fn fixed_inference_matches_full_steps(
        case in cases(shapes(2..=MAX_DEPTH, &ACTIVATIONS), 1.5, 1.0),
        steps in 0..12u32,
        step_size in 0.001..0.3f64,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let weights = convert::<I16F16>(&case.weights);
        let scalings = convert::<I16F16>(&shape.scalings());
        let network = Network::new(arch, &weights, &scalings).unwrap();
        let input = convert::<I16F16>(case.input());
        let target = convert::<I16F16>(case.target());
        let step_size = convert::<I16F16>(&[step_size])[0];
        let config = InferenceConfig { steps, step_size, tolerance: None, rounding: ActivityRounding::Nearest };

        let mut fast = Buffers::<I16F16>::new(&arch, 1);
        let stats = network
            .infer_supervised(&mut fast.workspace(&arch), 0, &input, &target, &config)
            .unwrap();

        let mut full = Buffers::<I16F16>::new(&arch, 1);
        let energy = full_steps_inference(
            &network,
            &mut full.workspace(&arch),
            &input,
            &target,
            steps,
            step_size,
        );

        prop_assert_eq!(stats.final_energy, energy, "final energy");
        prop_assert_eq!(&fast.activities, &full.activities, "activities");
        prop_assert_eq!(&fast.errors, &full.errors, "errors");
    }

    /// The unscaled weight gradients are the weight gradients divided by `a_l`, in `f64`.
    #[test]
    fn unscaled_gradients_divide_by_scaling(
        case in cases(shapes(1..=MAX_DEPTH, &ACTIVATIONS), 1.5, 1.0),
        steps in 0..4u32,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let scalings = shape.scalings();
        let network = Network::new(arch, &case.weights, &scalings).unwrap();
        let config = InferenceConfig { steps, step_size: 0.1, tolerance: None, rounding: ActivityRounding::Nearest };
        let mut buffers = Buffers::<f64>::new(&arch, 1);
        let mut workspace = buffers.workspace(&arch);
        network
            .infer_supervised(&mut workspace, 0, case.input(), case.target(), &config)
            .unwrap();
        let mut gradients = vec![0.0; arch.weights_len()];
        let mut unscaled = vec![0.0; arch.weights_len()];
        network.weight_gradients(&mut workspace, 1, &mut gradients).unwrap();
        network.weight_gradients_unscaled(&mut workspace, 1, &mut unscaled).unwrap();
        for layer in 1..=arch.depth() {
            let offset = arch.weight_offset(layer);
            let len = arch.width(layer) * arch.width(layer - 1);
            for index in offset..offset + len {
                let expected = gradients[index] / scalings[layer - 1];
                let tolerance = 1e-12 * (1.0 + expected.abs());
                prop_assert!(
                    (unscaled[index] - expected).abs() <= tolerance,
                    "layer {layer} weight {index}: {} against {expected}",
                    unscaled[index]
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Stochastic rounding of the activity updates moves each activity of an `I16F16` step at
    /// most one LSB away from the nearest-rounded step, gives the same bits on a second run,
    /// and leaves float formats unchanged.
    #[test]
    fn stochastic_activity_rounding_stays_within_one_lsb(
        case in cases(shapes(2..=MAX_DEPTH, &ACTIVATIONS), 1.5, 1.0),
        step_size in 0.001..0.3f64,
    ) {
        let shape = &case.shape;
        let arch = shape.arch();
        let weights = convert::<I16F16>(&case.weights);
        let scalings = convert::<I16F16>(&shape.scalings());
        let network = Network::new(arch, &weights, &scalings).unwrap();
        let input = convert::<I16F16>(case.input());
        let target = convert::<I16F16>(case.target());
        let one_step = |rounding| InferenceConfig {
            steps: 1,
            step_size: convert::<I16F16>(&[step_size])[0],
            tolerance: None,
            rounding,
        };
        let run = |rounding| {
            let mut buffers = Buffers::<I16F16>::new(&arch, 1);
            network
                .infer_supervised(
                    &mut buffers.workspace(&arch),
                    0,
                    &input,
                    &target,
                    &one_step(rounding),
                )
                .unwrap();
            buffers.activities
        };
        let nearest = run(ActivityRounding::Nearest);
        let stochastic = run(ActivityRounding::Stochastic);
        prop_assert_eq!(&stochastic, &run(ActivityRounding::Stochastic), "second run");
        for (index, (a, b)) in nearest.iter().zip(&stochastic).enumerate() {
            let lsbs = (a.to_bits() - b.to_bits()).abs();
            prop_assert!(lsbs <= 1, "activity {index}: {a} and {b} differ by {lsbs} LSB");
        }

        let float_scalings = shape.scalings();
        let network = Network::new(arch, &case.weights, &float_scalings).unwrap();
        let float_run = |rounding| {
            let mut buffers = Buffers::<f64>::new(&arch, 1);
            let config = InferenceConfig { steps: 3, step_size, tolerance: None, rounding };
            network
                .infer_supervised(
                    &mut buffers.workspace(&arch),
                    0,
                    case.input(),
                    case.target(),
                    &config,
                )
                .unwrap();
            buffers.activities
        };
        prop_assert_eq!(
            float_run(ActivityRounding::Nearest),
            float_run(ActivityRounding::Stochastic),
            "f64 ignores the rounding"
        );
    }
}
