//! Property tests of the transposed copy of the weights. Supervised inference through
//! `Network::with_transposed` gives the same bits as through `Network::new` in the fixed-point
//! formats, saturation included. The float formats give the same bits on the shapes where
//! both products sum in the same order.

use fixedpc::network::{activities_len, weights_len};
use fixedpc::{
    transpose_weights, Activation, ActivityRounding, Arch, Error, InferenceConfig, Network,
    Parameterisation, Scalar, Workspace, I16F16, I4F12,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;

const MAX_DEPTH: usize = 5;
/// Widths below 8, where the float matrix product sums in row order as the float transposed
/// product does.
const MAX_FLOAT_WIDTH: usize = 7;

static ACTIVATIONS: [Activation; 2] = [Activation::Relu, Activation::Tanh];
static PARAMETERISATIONS: [Parameterisation; 2] = [Parameterisation::Sp, Parameterisation::MuPc];
static ROUNDINGS: [ActivityRounding; 2] = [ActivityRounding::Nearest, ActivityRounding::Stochastic];

/// Configures a property with `cases` random cases and stores shrunk failures in
/// `proptest-regressions/transposed.txt`.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/transposed.txt",
        ))),
        ..ProptestConfig::with_cases(cases)
    }
}

/// A generated network with one sample, in `f64` before conversion to a format.
#[derive(Clone, Debug)]
struct Case {
    widths: Vec<usize>,
    activation: Activation,
    parameterisation: Parameterisation,
    skip: bool,
    rounding: ActivityRounding,
    /// Weights uniform in `[-1, 1]`, multiplied by `weight_scale` on conversion.
    weights: Vec<f64>,
    weight_scale: f64,
    /// Activities `z_0 .. z_L`; the test uses `z_0` as input and `z_L` as target.
    activities: Vec<f64>,
    steps: u32,
    step_size: f64,
}

impl Case {
    fn arch(&self) -> Arch<'_> {
        Arch::new(&self.widths, self.activation, self.skip).expect("generated shapes are valid")
    }

    fn scalings(&self) -> Vec<f64> {
        (1..self.widths.len())
            .map(|layer| {
                self.parameterisation
                    .scaling(&self.widths, self.skip, layer)
            })
            .collect()
    }
}

/// Generates widths for the fixed-point cases: `1..=12`, and often 8 or 16, because inference
/// takes the transposed copy only for layers whose width is a multiple of 8 (`I4F12`) or 4
/// (`I16F16`).
fn fixed_widths() -> BoxedStrategy<usize> {
    prop_oneof![2 => 1..=12usize, 1 => Just(8usize), 1 => Just(16usize)].boxed()
}

/// Generates widths `1..=MAX_FLOAT_WIDTH` for the float cases.
fn float_widths() -> BoxedStrategy<usize> {
    (1..=MAX_FLOAT_WIDTH).boxed()
}

/// Generates cases of depth `1..=MAX_DEPTH` with widths from `widths` and one of
/// `weight_scales`. With skips on, every hidden layer gets the same width.
fn cases(
    widths: fn() -> BoxedStrategy<usize>,
    weight_scales: &'static [f64],
) -> impl Strategy<Value = Case> {
    (
        1..=MAX_DEPTH,
        widths(),
        widths(),
        vec(widths(), MAX_DEPTH - 1),
        any::<bool>(),
        select(&ACTIVATIONS[..]),
        select(&PARAMETERISATIONS[..]),
        select(&ROUNDINGS[..]),
        select(weight_scales),
        (0..25u32, 0.01..0.5f64),
    )
        .prop_flat_map(
            |(
                depth,
                input,
                output,
                hidden,
                skip,
                activation,
                parameterisation,
                rounding,
                weight_scale,
                (steps, step_size),
            )| {
                let mut widths = vec![input];
                for layer in 1..depth {
                    widths.push(if skip { hidden[0] } else { hidden[layer - 1] });
                }
                widths.push(output);
                let weights = vec(-1.0..=1.0f64, weights_len(&widths));
                let activities = vec(-2.0..=2.0f64, activities_len(&widths));
                (weights, activities).prop_map(move |(weights, activities)| Case {
                    widths: widths.clone(),
                    activation,
                    parameterisation,
                    skip,
                    rounding,
                    weights,
                    weight_scale,
                    activities,
                    steps,
                    step_size,
                })
            },
        )
}

/// Converts `f64` values to `S`, saturating where they do not fit.
fn convert<S: Scalar>(values: &[f64], scale: f64) -> Vec<S> {
    let mut saturated = 0;
    values
        .iter()
        .map(|&value| S::from_f64_rounded(value * scale, &mut saturated))
        .collect()
}

/// Returns the little-endian bytes of values, so that a comparison also checks the sign of a
/// float zero.
fn bytes_of<S: Scalar>(values: &[S]) -> Vec<u8> {
    let size = S::FORMAT.bytes();
    let mut bytes = vec![0u8; values.len() * size];
    for (value, out) in values.iter().zip(bytes.chunks_exact_mut(size)) {
        value.write_le(out);
    }
    bytes
}

/// What one supervised inference leaves behind, as raw bytes.
#[derive(Debug, PartialEq)]
struct Outcome {
    steps_taken: u32,
    initial_energy: Vec<u8>,
    final_energy: Vec<u8>,
    activities: Vec<u8>,
    errors: Vec<u8>,
    overflows: Vec<u32>,
}

/// Runs `infer_supervised` on a fresh one-sample workspace.
fn infer<S: Scalar>(
    network: &Network<'_, S>,
    input: &[S],
    target: &[S],
    config: &InferenceConfig<S>,
) -> Result<Outcome, Error> {
    let arch = network.arch();
    let mut activities = vec![S::ZERO; arch.activities_len()];
    let mut errors = vec![S::ZERO; arch.errors_len()];
    let mut scratch = vec![S::ZERO; arch.max_width()];
    let mut overflows = vec![0; arch.depth()];
    let mut workspace = Workspace::new(
        arch,
        1,
        &mut activities,
        &mut errors,
        &mut scratch,
        &mut overflows,
    )?;
    let stats = network.infer_supervised(&mut workspace, 0, input, target, config)?;
    Ok(Outcome {
        steps_taken: stats.steps_taken,
        initial_energy: bytes_of(&[stats.initial_energy]),
        final_energy: bytes_of(&[stats.final_energy]),
        activities: bytes_of(workspace.activities(0)),
        errors: bytes_of(workspace.errors(0)),
        overflows: workspace.overflows().to_vec(),
    })
}

/// Runs a case in format `S` through `Network::new` and `Network::with_transposed` and returns
/// both outcomes, plain first.
fn both_ways<S: Scalar>(case: &Case) -> Result<(Outcome, Outcome), Error> {
    let arch = case.arch();
    let weights: Vec<S> = convert(&case.weights, case.weight_scale);
    let scalings: Vec<S> = convert(&case.scalings(), 1.0);
    let mut transposed = vec![S::ZERO; weights.len()];
    transpose_weights(&arch, &weights, &mut transposed)?;
    let activities: Vec<S> = convert(&case.activities, 1.0);
    let input = &activities[..case.widths[0]];
    let target = &activities[arch.activity_offset(arch.depth())..];
    let mut spare = 0;
    let config = InferenceConfig {
        steps: case.steps,
        step_size: S::from_f64_rounded(case.step_size, &mut spare),
        tolerance: None,
        rounding: case.rounding,
    };

    let plain = Network::new(arch, &weights, &scalings)?;
    let copied = Network::with_transposed(arch, &weights, &transposed, &scalings)?;
    Ok((
        infer(&plain, input, target, &config)?,
        infer(&copied, input, target, &config)?,
    ))
}

/// Weight scales of the `I16F16` cases: small, and large enough to saturate sums.
static I16F16_SCALES: [f64; 3] = [0.5, 4.0, 300.0];
/// Weight scales of the `I4F12` cases, whose values stay below 8 in magnitude.
static I4F12_SCALES: [f64; 3] = [0.25, 1.0, 6.0];
static FLOAT_SCALES: [f64; 2] = [0.5, 4.0];

proptest! {
    #![proptest_config(config(256))]

    /// `I16F16` inference through the transposed copy gives the same activities, errors,
    /// energies, steps and overflow counts as through the weights.
    #[test]
    fn i16f16_copy_matches_weights(case in cases(fixed_widths, &I16F16_SCALES)) {
        let (plain, copied) = both_ways::<I16F16>(&case)?;
        prop_assert_eq!(plain, copied);
    }

    /// The same for `I4F12`.
    #[test]
    fn i4f12_copy_matches_weights(case in cases(fixed_widths, &I4F12_SCALES)) {
        let (plain, copied) = both_ways::<I4F12>(&case)?;
        prop_assert_eq!(plain, copied);
    }

    /// `f32` inference through the copy gives the same bits when every width is below 8, where
    /// both products add the products of a sum in row order.
    #[test]
    fn f32_copy_matches_weights_below_width_8(case in cases(float_widths, &FLOAT_SCALES)) {
        let (plain, copied) = both_ways::<f32>(&case)?;
        prop_assert_eq!(plain, copied);
    }

    /// The same for `f64`.
    #[test]
    fn f64_copy_matches_weights_below_width_8(case in cases(float_widths, &FLOAT_SCALES)) {
        let (plain, copied) = both_ways::<f64>(&case)?;
        prop_assert_eq!(plain, copied);
    }
}

/// Returns a case whose sums saturate in both fixed-point formats, so that the tests compare
/// non-zero overflow counts at least once. Its widths after the input are multiples of 8, so
/// every feedback goes through the transposed copy.
fn saturating_case() -> Case {
    let widths = vec![4, 16, 16, 16, 8];
    let weights = (0..weights_len(&widths))
        .map(|index| if index % 3 == 0 { -0.9 } else { 0.95 })
        .collect();
    let activities = (0..activities_len(&widths))
        .map(|index| 1.5 - (index % 4) as f64)
        .collect();
    Case {
        widths,
        activation: Activation::Tanh,
        parameterisation: Parameterisation::MuPc,
        skip: true,
        rounding: ActivityRounding::Nearest,
        weights,
        weight_scale: 6.0,
        activities,
        steps: 10,
        step_size: 0.3,
    }
}

#[test]
fn saturating_i4f12_counts_match() {
    let (plain, copied) = both_ways::<I4F12>(&saturating_case()).unwrap();
    assert!(
        plain.overflows.iter().any(|&count| count > 0),
        "the case must saturate: {:?}",
        plain.overflows
    );
    assert_eq!(plain, copied);
}

#[test]
fn saturating_i16f16_counts_match() {
    let mut case = saturating_case();
    case.weight_scale = 3000.0;
    let (plain, copied) = both_ways::<I16F16>(&case).unwrap();
    assert!(
        plain.overflows.iter().any(|&count| count > 0),
        "the case must saturate: {:?}",
        plain.overflows
    );
    assert_eq!(plain, copied);
}
