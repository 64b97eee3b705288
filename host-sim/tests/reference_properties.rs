//! Property tests of the verification ladder over random small networks: the core in `f64`
//! equals the independent reference to rounding error, and the core in `I16F16` stays within
//! the derived error bound of the reference.
//!
//! Every activation, both parameterisations, skips, depths 1 to 4 and batches 1 to 3 are
//! drawn; 64 cases per property keep the suite fast on 2 cores.

use std::path::Path;

use fixedpc::{Parameterisation, I16F16};
use fixedpc_host_sim::check::check_case;
use fixedpc_host_sim::golden::{
    compare_outputs, reference_outputs, run_core, run_reference, synthesize, Case, CaseNetwork,
    QUANTITIES,
};
use fixedpc_host_sim::reference::Matrix;
use proptest::prelude::*;

/// Relative tolerance of the core in `f64` against the reference (with the floor of
/// `golden::compare`). Both sum in the same order, so they differ only by the last bits of
/// tanh and of the step (`eta/B * g` against `eta * g/B`), amplified over at most 8 steps.
const F64_TOLERANCE: f64 = 1e-10;

const ACTIVATIONS: [&str; 5] = ["linear", "tanh", "hard_tanh", "relu", "leaky_relu"];

#[derive(Clone, Debug)]
struct Shape {
    input: usize,
    width: usize,
    depth: usize,
    output: usize,
    activation: &'static str,
    mupc: bool,
    skip: bool,
    batch: usize,
    steps: usize,
    step_size: f64,
}

impl Shape {
    fn widths(&self) -> Vec<usize> {
        let mut widths = vec![self.input];
        widths.extend(std::iter::repeat_n(self.width, self.depth - 1));
        widths.push(self.output);
        widths
    }
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        1..=4usize,
        1..=5usize,
        1..=4usize,
        1..=3usize,
        prop::sample::select(ACTIVATIONS.to_vec()),
        any::<bool>(),
        any::<bool>(),
        1..=3usize,
        0..=8usize,
        0.02..0.4f64,
    )
        .prop_map(
            |(input, width, depth, output, activation, mupc, skip, batch, steps, step_size)| {
                Shape {
                    input,
                    width,
                    depth,
                    output,
                    activation,
                    mupc,
                    skip,
                    batch,
                    steps,
                    step_size,
                }
            },
        )
}

/// Builds a case from a shape and uniform draws in `[-1, 1)`: SP weights are scaled to
/// `+-1/sqrt(fan_in)`, muPC weights to unit variance, inputs to `[-2, 2)` so that hard_tanh
/// and tanh saturate sometimes.
fn build(shape: &Shape, weights: &[f64], inputs: &[f64], targets: &[f64]) -> Case {
    let widths = shape.widths();
    let depth = shape.depth;
    let parameterisation = if shape.mupc {
        Parameterisation::MuPc
    } else {
        Parameterisation::Sp
    };
    let skip = shape.skip && depth >= 3;
    let scalings: Vec<f64> = (1..=depth)
        .map(|layer| parameterisation.scaling(&widths, skip, layer))
        .collect();
    let mut draws = weights.iter();
    let matrices: Vec<Matrix> = (1..=depth)
        .map(|layer| {
            let scale = if shape.mupc {
                3f64.sqrt()
            } else {
                1.0 / (widths[layer - 1] as f64).sqrt()
            };
            (0..widths[layer])
                .map(|_| {
                    (0..widths[layer - 1])
                        .map(|_| scale * draws.next().unwrap())
                        .collect()
                })
                .collect()
        })
        .collect();
    let x: Matrix = inputs
        .chunks(shape.input)
        .map(|row| row.iter().map(|v| 2.0 * v).collect())
        .collect();
    let y: Matrix = targets.chunks(shape.output).map(<[f64]>::to_vec).collect();
    let network = CaseNetwork {
        input_dim: shape.input,
        width: shape.width,
        depth,
        output_dim: shape.output,
        activation: shape.activation.to_string(),
        param_type: parameterisation.name().to_string(),
        skip,
        skip_layers_0based: if skip {
            (1..depth - 1).collect()
        } else {
            Vec::new()
        },
        use_bias: false,
        prng_seed_jax: None,
    };
    synthesize(
        "generated",
        network,
        scalings,
        matrices,
        x,
        y,
        shape.step_size,
        shape.steps,
        0.1,
    )
}

fn case() -> impl Strategy<Value = Case> {
    shape()
        .prop_flat_map(|shape| {
            let widths = shape.widths();
            let weights: usize = widths.windows(2).map(|pair| pair[0] * pair[1]).sum();
            let inputs = shape.batch * shape.input;
            let targets = shape.batch * shape.output;
            (
                Just(shape),
                prop::collection::vec(-1.0..1.0f64, weights),
                prop::collection::vec(-1.0..1.0f64, inputs),
                prop::collection::vec(-1.0..1.0f64, targets),
            )
        })
        .prop_map(|(shape, weights, inputs, targets)| build(&shape, &weights, &inputs, &targets))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn core_f64_equals_reference(case in case()) {
        prop_assert_eq!(case.validate(), Ok(()));
        let reference = reference_outputs(&run_reference(&case));
        let core = run_core::<f64>(&case).unwrap();
        prop_assert_eq!(core.overflows, 0);
        let errors = compare_outputs(&core.outputs, &reference);
        for (name, error) in QUANTITIES.iter().zip(errors) {
            prop_assert!(
                error.max_rel <= F64_TOLERANCE,
                "{}: {:?}", name, error
            );
        }
    }

    #[test]
    fn core_i16f16_within_bound(case in case()) {
        let fixed = run_core::<I16F16>(&case).unwrap();
        // The bound assumes nothing saturates; these small networks stay far from 32768.
        prop_assume!(fixed.overflows == 0);
        let report = check_case(&case, Path::new("generated")).unwrap();
        for quantity in &report.quantities {
            prop_assert!(
                quantity.fixed_within_bound,
                "{}: error {:e}, bound {:e}",
                quantity.name,
                quantity.core_i16f16_vs_reference.max_abs,
                quantity.fixed_bound
            );
        }
    }
}
