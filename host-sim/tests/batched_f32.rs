//! The batched `f32` path against the core's per-sample `f32` path: the same inference,
//! gradients and training, up to the order of float additions inside the matrix products.

use fixedpc::{
    Activation, ActivityRounding, Arch, InferenceConfig, Network, Parameterisation, Scalar,
};
use fixedpc_host_sim::batched::BatchedF32;
use fixedpc_host_sim::data;
use fixedpc_host_sim::train::{self, Buffers, NetworkSpec, OptimizerKind, TrainConfig, Trained};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Relative difference allowed between the two paths. f32 rounds by up to 6e-8 per operation,
/// and the products sum their terms in a different order. 20 inference steps and a few weight
/// updates amplify that, but stay far below this.
const RELATIVE: f64 = 2e-4;

/// Returns the largest magnitude in `values`.
fn max_abs(values: &[f32]) -> f64 {
    values
        .iter()
        .fold(0.0f64, |max, &value| max.max(f64::from(value).abs()))
}

/// Asserts that `actual` and `expected` agree within `RELATIVE` of the largest magnitude in
/// `expected` (so values near zero compare on the scale of their neighbours).
fn assert_close(actual: &[f32], expected: &[f32], label: &str) {
    assert_close_on_scale(actual, expected, max_abs(expected), label);
}

/// Asserts that `actual` and `expected` agree within `RELATIVE` of `scale`, or of the largest
/// magnitude in `expected` if that is larger.
fn assert_close_on_scale(actual: &[f32], expected: &[f32], scale: f64, label: &str) {
    assert_eq!(actual.len(), expected.len(), "{label}: lengths differ");
    let scale = scale.max(max_abs(expected)).max(1e-6);
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let difference = (f64::from(a) - f64::from(e)).abs();
        assert!(
            difference <= RELATIVE * scale,
            "{label}[{index}]: batched {a} against per-sample {e} (scale {scale})"
        );
    }
}

fn assert_close_f64(actual: f64, expected: f64, label: &str) {
    let scale = expected.abs().max(1e-6);
    assert!(
        (actual - expected).abs() <= RELATIVE * scale,
        "{label}: batched {actual} against per-sample {expected}"
    );
}

/// Returns a small network of `depth` weight layers: 6 inputs, hidden width 5, 3 outputs.
fn spec(
    depth: usize,
    activation: Activation,
    parameterisation: Parameterisation,
    skip: bool,
    tolerance: Option<f64>,
) -> NetworkSpec {
    let mut widths = vec![6];
    widths.extend(std::iter::repeat_n(5, depth - 1));
    widths.push(3);
    NetworkSpec {
        widths,
        activation,
        parameterisation,
        skip,
        input_scale: 1.0,
        infer_steps: 20,
        infer_rate: 0.1,
        tolerance,
        rounding: ActivityRounding::Nearest,
    }
}

/// Returns every combination of activation, parameterisation and skips that the tests cover.
fn variants() -> Vec<(Activation, Parameterisation, bool)> {
    let mut variants = Vec::new();
    for activation in [Activation::Tanh, Activation::Relu] {
        for parameterisation in [Parameterisation::Sp, Parameterisation::MuPc] {
            for skip in [false, true] {
                variants.push((activation, parameterisation, skip));
            }
        }
    }
    variants
}

fn describe(activation: Activation, parameterisation: Parameterisation, skip: bool) -> String {
    format!(
        "{} {}{}",
        activation.name(),
        parameterisation.name(),
        if skip { " skip" } else { "" }
    )
}

/// Runs one batch through the core sample by sample and through the batched path, and
/// compares activities, errors, energies, steps and both kinds of weight gradient.
fn compare_one_batch(spec: &NetworkSpec, batch: usize, seed: u64) {
    let arch = spec.arch().expect("valid shapes");
    let weights: Vec<f32> = spec
        .initial_weights(seed)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let scalings = spec.scalings::<f32>();
    let network = Network::new(arch, &weights, &scalings).expect("network");
    let config: InferenceConfig<f32> = spec.inference();
    let depth = arch.depth();
    let (n_in, n_out) = (arch.width(0), arch.width(depth));

    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xba7c);
    let inputs: Vec<f32> = (0..batch * n_in)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut targets = vec![0.0f32; batch * n_out];
    for sample in 0..batch {
        targets[sample * n_out + rng.random_range(0..n_out)] = 1.0;
    }

    let mut buffers = Buffers::<f32>::new(&arch, batch);
    let mut workspace = buffers.workspace(&arch).expect("workspace");
    let mut batched = BatchedF32::new(&arch, batch);
    batched
        .infer(&network, &inputs, &targets, &config, 2)
        .expect("batched inference");

    for sample in 0..batch {
        let expected = network
            .infer_supervised(
                &mut workspace,
                sample,
                &inputs[sample * n_in..(sample + 1) * n_in],
                &targets[sample * n_out..(sample + 1) * n_out],
                &config,
            )
            .expect("core inference");
        let actual = batched.sample_stats(sample);
        assert_eq!(
            actual.steps_taken, expected.steps_taken,
            "sample {sample}: steps"
        );
        assert_close(
            &[actual.initial_energy],
            &[expected.initial_energy],
            &format!("sample {sample} initial energy"),
        );
        assert_close(
            &[actual.final_energy],
            &[expected.final_energy],
            &format!("sample {sample} final energy"),
        );
        let activities = workspace.activities(sample);
        let errors = workspace.errors(sample);
        for layer in 0..=depth {
            let offset = arch.activity_offset(layer);
            assert_close(
                batched.activities(layer, sample),
                &activities[offset..offset + arch.width(layer)],
                &format!("sample {sample} z_{layer}"),
            );
        }
        for layer in 1..=depth {
            // An error is the difference of an activity and its prediction, so its rounding
            // is on the scale of the activities.
            let offset = arch.error_offset(layer);
            let activity_offset = arch.activity_offset(layer);
            let scale = max_abs(&activities[activity_offset..activity_offset + arch.width(layer)]);
            assert_close_on_scale(
                batched.errors(layer, sample),
                &errors[offset..offset + arch.width(layer)],
                scale,
                &format!("sample {sample} e_{layer}"),
            );
        }
    }
    assert_eq!(
        batched.overflows(),
        workspace.overflows(),
        "non-finite counts"
    );

    for unscaled in [false, true] {
        let mut expected = vec![0.0f32; weights.len()];
        let mut actual = vec![0.0f32; weights.len()];
        if unscaled {
            network.weight_gradients_unscaled(&mut workspace, batch, &mut expected)
        } else {
            network.weight_gradients(&mut workspace, batch, &mut expected)
        }
        .expect("core gradients");
        batched
            .weight_gradients(&network, unscaled, &mut actual)
            .expect("batched gradients");
        for layer in 1..=depth {
            // A gradient sums e_l phi(z_(l-1)) over the batch, and the rounding of e_l is on
            // the scale of z_l (see above), so the gradients compare on the scale of
            // a_l B max|z_l| max|phi(z_(l-1))| / B.
            let scaling = if unscaled {
                1.0
            } else {
                f64::from(network.scaling(layer))
            };
            let scale = scaling
                * max_abs_over_batch(&workspace, &arch, batch, layer, false)
                * max_abs_over_batch(&workspace, &arch, batch, layer - 1, layer > 1);
            let offset = arch.weight_offset(layer);
            let len = arch.width(layer) * arch.width(layer - 1);
            assert_close_on_scale(
                &actual[offset..offset + len],
                &expected[offset..offset + len],
                scale,
                &format!("unscaled {unscaled}: gradients of layer {layer}"),
            );
        }
    }
}

/// Returns the largest `|z_layer|` of the first `batch` samples, or of `phi(z_layer)` when
/// `activated`.
fn max_abs_over_batch(
    workspace: &fixedpc::Workspace<'_, f32>,
    arch: &Arch<'_>,
    batch: usize,
    layer: usize,
    activated: bool,
) -> f64 {
    let offset = arch.activity_offset(layer);
    (0..batch)
        .flat_map(|sample| &workspace.activities(sample)[offset..offset + arch.width(layer)])
        .map(|&z| {
            let value = if activated {
                f32::activate(arch.activation(), z)
            } else {
                z
            };
            f64::from(value).abs()
        })
        .fold(0.0, f64::max)
}

#[test]
fn batch_inference_matches_core() {
    for (activation, parameterisation, skip) in variants() {
        eprintln!("{}", describe(activation, parameterisation, skip));
        compare_one_batch(&spec(4, activation, parameterisation, skip, None), 7, 3);
    }
}

#[test]
fn batch_early_stop_matches_core() {
    for (activation, parameterisation, skip) in variants() {
        eprintln!("{}", describe(activation, parameterisation, skip));
        compare_one_batch(
            &spec(4, activation, parameterisation, skip, Some(1e-3)),
            9,
            5,
        );
    }
}

#[test]
fn deep_batch_inference_matches_core() {
    // With 12 layers and 20 steps, the errors reach only part of the network, so the skipping
    // of layers with zero errors decides which activities move.
    let spec = spec(12, Activation::Relu, Parameterisation::MuPc, true, None);
    compare_one_batch(&spec, 5, 11);
}

#[test]
fn single_layer_batch_matches_core() {
    // One weight layer has no free activities, so inference only computes the energy.
    compare_one_batch(
        &spec(1, Activation::Tanh, Parameterisation::Sp, false, None),
        4,
        2,
    );
}

/// Weight updates of [`train_both`]: 2 epochs of 2 batches.
const TRAINING_UPDATES: usize = 4;

/// Trains on the first 64 digits (2 batches of 32, 2 epochs) in both paths.
fn train_both(
    spec: &NetworkSpec,
    optimizer: OptimizerKind,
    learning_rate: f64,
) -> (Trained<f32>, Trained<f32>) {
    let all = data::load_csv(&data::default_digits_path(), 10).expect("bundled digits load");
    let (train_set, rest) = all.split(64).expect("split at 64");
    let (test_set, _) = rest.split(20).expect("split at 20");
    let train_with = |per_sample: bool| {
        let config = TrainConfig {
            epochs: 2,
            batch: 32,
            learning_rate,
            optimizer,
            seed: 4,
            threads: 2,
            per_sample,
        };
        train::train::<f32>(spec, &config, &train_set, &test_set, |_| {}).expect("training")
    };
    (train_with(false), train_with(true))
}

/// Compares two trainings. Each weight may differ by `weight_tolerance`, and the root mean
/// square of the differences must stay below `rms_tolerance` of that of the training's
/// weight changes.
fn compare_training(
    batched: &Trained<f32>,
    per_sample: &Trained<f32>,
    weight_tolerance: f64,
    rms_tolerance: f64,
    label: &str,
) {
    let initial = per_sample.spec.initial_weights(4);
    let mut moved_squares = 0.0;
    let mut difference_squares = 0.0;
    for (index, ((&a, &e), &w0)) in batched
        .weights
        .iter()
        .zip(&per_sample.weights)
        .zip(&initial)
        .enumerate()
    {
        let difference = (f64::from(a) - f64::from(e)).abs();
        assert!(
            difference <= weight_tolerance,
            "{label}: weight {index} is {a} batched and {e} per sample (tolerance \
             {weight_tolerance})"
        );
        difference_squares += difference * difference;
        moved_squares += (f64::from(e) - w0).powi(2);
    }
    assert!(
        moved_squares > 0.0,
        "{label}: training did not move the weights"
    );
    let ratio = (difference_squares / moved_squares).sqrt();
    assert!(
        ratio <= rms_tolerance,
        "{label}: the weights differ by {ratio} of how far training moved them (root mean square)"
    );
    for (actual, expected) in batched.epochs.iter().zip(&per_sample.epochs) {
        let epoch = expected.epoch;
        assert_close_f64(
            actual.mean_energy,
            expected.mean_energy,
            &format!("{label}: epoch {epoch} mean energy"),
        );
        assert_eq!(
            actual.mean_inference_steps, expected.mean_inference_steps,
            "{label}: epoch {epoch} mean steps"
        );
        assert_eq!(
            actual.mean_error_reach, expected.mean_error_reach,
            "{label}: epoch {epoch} error reach"
        );
        assert_eq!(
            actual.overflows, expected.overflows,
            "{label}: epoch {epoch} overflows"
        );
        for (layer, (&a, &e)) in actual
            .max_abs_activity
            .iter()
            .zip(&expected.max_abs_activity)
            .enumerate()
        {
            assert_close_f64(a, e, &format!("{label}: epoch {epoch} max |z_{layer}|"));
        }
    }
}

/// Returns a 64-16-16-16-10 digits network, whose hidden layers have equal widths for the
/// skips.
fn digits_spec(
    activation: Activation,
    parameterisation: Parameterisation,
    skip: bool,
    tolerance: Option<f64>,
) -> NetworkSpec {
    NetworkSpec {
        widths: vec![64, 16, 16, 16, 10],
        activation,
        parameterisation,
        skip,
        input_scale: 1.0 / 16.0,
        infer_steps: 20,
        infer_rate: 0.1,
        tolerance,
        rounding: ActivityRounding::Nearest,
    }
}

/// Trains every parameterisation, with and without skips, in both paths.
///
/// SGD weights may differ by 1e-3 of the learning rate, and 1e-3 of the training's changes
/// in root mean square. Adam divides each gradient by its running magnitude, so a gradient
/// that nearly cancels over the batch, whose last digits are rounding noise in either path,
/// still moves its weight by a good part of the learning rate. In a measured run, the
/// gradients of each batch agreed to 1e-5 relative except such near-cancelling ones (below
/// 1e-6, up to 2% apart). After 4 relu updates, one row of 16 weights differed by up to 0.13
/// of the learning rate (1.8e-3 of the changes in root mean square). So Adam weights may differ by
/// 0.1 of the learning rate per update, and 1e-2 in root mean square.
fn compare_training_variants(activation: Activation, optimizer: OptimizerKind, learning_rate: f64) {
    let (weight_tolerance, rms_tolerance) = match optimizer {
        OptimizerKind::Sgd => (1e-3 * learning_rate, 1e-3),
        OptimizerKind::Adam => (0.1 * learning_rate * TRAINING_UPDATES as f64, 1e-2),
    };
    for parameterisation in [Parameterisation::Sp, Parameterisation::MuPc] {
        for skip in [false, true] {
            let label = format!(
                "{optimizer:?} {}",
                describe(activation, parameterisation, skip)
            );
            let spec = digits_spec(activation, parameterisation, skip, None);
            let (batched, per_sample) = train_both(&spec, optimizer, learning_rate);
            compare_training(
                &batched,
                &per_sample,
                weight_tolerance,
                rms_tolerance,
                &label,
            );
        }
    }
}

#[test]
fn tanh_training_with_sgd_matches_core() {
    compare_training_variants(Activation::Tanh, OptimizerKind::Sgd, 0.1);
}

#[test]
fn relu_training_with_sgd_matches_core() {
    compare_training_variants(Activation::Relu, OptimizerKind::Sgd, 0.1);
}

#[test]
fn tanh_training_with_adam_matches_core() {
    compare_training_variants(Activation::Tanh, OptimizerKind::Adam, 0.01);
}

#[test]
fn relu_training_with_adam_matches_core() {
    compare_training_variants(Activation::Relu, OptimizerKind::Adam, 0.01);
}

#[test]
fn training_with_early_stop_matches_core() {
    let spec = digits_spec(Activation::Relu, Parameterisation::Sp, false, Some(5e-4));
    let (batched, per_sample) = train_both(&spec, OptimizerKind::Sgd, 0.1);
    compare_training(&batched, &per_sample, 1e-4, 1e-3, "early stop");
    let steps = per_sample.epochs[1].mean_inference_steps;
    assert!(
        steps < 20.0,
        "early stop never triggered: {steps} mean steps"
    );
}

#[test]
fn thread_count_keeps_results() {
    let spec = spec(
        5,
        Activation::Tanh,
        Parameterisation::MuPc,
        true,
        Some(1e-3),
    );
    let arch = spec.arch().expect("valid shapes");
    let weights: Vec<f32> = spec
        .initial_weights(8)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let scalings = spec.scalings::<f32>();
    let network = Network::new(arch, &weights, &scalings).expect("network");
    let config: InferenceConfig<f32> = spec.inference();
    let batch = 11;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let inputs: Vec<f32> = (0..batch * 6)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let targets: Vec<f32> = (0..batch * 3).map(|_| rng.random_range(0.0..1.0)).collect();
    let results_with = |threads: usize| {
        let mut batched = BatchedF32::new(&arch, batch);
        batched
            .infer(&network, &inputs, &targets, &config, threads)
            .expect("batched inference");
        let mut gradients = vec![0.0f32; weights.len()];
        batched
            .weight_gradients(&network, false, &mut gradients)
            .expect("batched gradients");
        let mut bits: Vec<u32> = gradients.iter().map(|g| g.to_bits()).collect();
        for sample in 0..batch {
            let stats = batched.sample_stats(sample);
            bits.push(stats.steps_taken);
            bits.push(stats.final_energy.to_bits());
            for layer in 0..=arch.depth() {
                bits.extend(
                    batched
                        .activities(layer, sample)
                        .iter()
                        .map(|z| z.to_bits()),
                );
            }
        }
        bits
    };
    let single_thread = results_with(1);
    for threads in [2, 3, 4, 11, 20] {
        assert!(
            results_with(threads) == single_thread,
            "{threads} threads changed the results"
        );
    }
}

#[test]
fn batched_rejects_mismatched_shapes() {
    let spec = spec(2, Activation::Tanh, Parameterisation::Sp, false, None);
    let arch = spec.arch().expect("valid shapes");
    let weights = vec![0.1f32; arch.weights_len()];
    let scalings = spec.scalings::<f32>();
    let network = Network::new(arch, &weights, &scalings).expect("network");
    let config: InferenceConfig<f32> = spec.inference();
    let other_widths = [6, 4, 3];
    let other = Arch::new(&other_widths, Activation::Tanh, false).expect("valid shapes");
    let mut batched = BatchedF32::new(&other, 2);
    let error = batched
        .infer(&network, &[0.0; 12], &[0.0; 6], &config, 1)
        .expect_err("shapes differ");
    assert!(error.to_string().contains("shapes differ"), "{error}");

    let mut batched = BatchedF32::new(&arch, 2);
    let error = batched
        .infer(&network, &[0.0; 18], &[0.0; 9], &config, 1)
        .expect_err("three samples exceed the capacity of two");
    assert!(error.to_string().contains("1 to 2 samples"), "{error}");
}

#[test]
fn batched_counts_non_finite_results_like_core() {
    let spec = spec(3, Activation::Tanh, Parameterisation::Sp, true, None);
    let arch = spec.arch().expect("valid shapes");
    let mut weights = vec![0.2f32; arch.weights_len()];
    // An infinite weight in layer 2 makes its predictions, and then everything above, non-finite.
    weights[arch.weight_offset(2)] = f32::INFINITY;
    let scalings = spec.scalings::<f32>();
    let network = Network::new(arch, &weights, &scalings).expect("network");
    let config: InferenceConfig<f32> = spec.inference();
    let inputs = [0.5f32; 12];
    let targets = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];

    let mut buffers = Buffers::<f32>::new(&arch, 2);
    let mut workspace = buffers.workspace(&arch).expect("workspace");
    for sample in 0..2 {
        network
            .infer_supervised(
                &mut workspace,
                sample,
                &inputs[sample * 6..(sample + 1) * 6],
                &targets[sample * 3..(sample + 1) * 3],
                &config,
            )
            .expect("core inference");
    }
    let mut batched = BatchedF32::new(&arch, 2);
    batched
        .infer(&network, &inputs, &targets, &config, 1)
        .expect("batched inference");
    assert!(workspace.total_overflows() > 0, "the core counted nothing");
    assert_eq!(batched.overflows(), workspace.overflows());
}
