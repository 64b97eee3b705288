//! Host benchmarks: the matrix products of each numeric format, one inference step, one full
//! supervised inference and one training step (inference on a batch, gradients, SGD) of the
//! digits network. `scripts/bench` runs them with short measurement times and
//! `pcsim bench` copies the results into `docs/PERFORMANCE.md`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fixedpc::{
    Activation, ActivityRounding, Arch, InferenceConfig, Network, Scalar, Sgd, Workspace, I16F16,
    I4F12,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The digits network of `pcsim demo`.
const DIGITS: [usize; 4] = [64, 64, 64, 10];
/// Samples per training step, as in the maintainers' JPC timing.
const BATCH: usize = 32;

/// Weights uniform in `+-1/sqrt(fan_in)`, inputs in `[0, 1)` and one-hot targets.
struct Data<S> {
    weights: Vec<S>,
    scalings: Vec<S>,
    inputs: Vec<S>,
    targets: Vec<S>,
}

fn data<S: Scalar>(widths: &[usize]) -> Data<S> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut overflows = 0;
    let mut convert = |value: f64| S::from_f64_rounded(value, &mut overflows);
    let mut weights = Vec::new();
    for layer in 1..widths.len() {
        let bound = 1.0 / (widths[layer - 1] as f64).sqrt();
        for _ in 0..widths[layer] * widths[layer - 1] {
            weights.push(convert(rng.random_range(-bound..bound)));
        }
    }
    let inputs = (0..BATCH * widths[0])
        .map(|_| convert(rng.random_range(0.0..1.0)))
        .collect();
    let outputs = widths[widths.len() - 1];
    let targets = (0..BATCH * outputs)
        .map(|index| {
            if index % outputs == index / outputs % outputs {
                S::ONE
            } else {
                S::ZERO
            }
        })
        .collect();
    Data {
        weights,
        scalings: vec![S::ONE; widths.len() - 1],
        inputs,
        targets,
    }
}

fn bench_format<S: Scalar>(c: &mut Criterion) {
    let name = S::FORMAT.name();
    let arch = Arch::new(&DIGITS, Activation::Relu, false).unwrap();
    let data = data::<S>(&DIGITS);
    let network = Network::new(arch, &data.weights, &data.scalings).unwrap();
    let mut activities = vec![S::ZERO; BATCH * arch.activities_len()];
    let mut errors = vec![S::ZERO; BATCH * arch.errors_len()];
    let mut scratch = vec![S::ZERO; BATCH * arch.max_width()];
    let mut overflows = vec![0; arch.depth()];
    let mut workspace = Workspace::new(
        &arch,
        BATCH,
        &mut activities,
        &mut errors,
        &mut scratch,
        &mut overflows,
    )
    .unwrap();
    let mut spare = 0;
    let config = InferenceConfig {
        steps: 20,
        step_size: S::from_f64_rounded(0.1, &mut spare),
        tolerance: None,
        rounding: ActivityRounding::Nearest,
    };
    let input = &data.inputs[..DIGITS[0]];
    let target = &data.targets[..DIGITS[3]];
    let hidden = network.layer_weights(2);
    let vector = vec![S::from_f64_rounded(0.25, &mut spare); 64];
    let mut out = vec![S::ZERO; 64];

    let mut group = c.benchmark_group("kernels");
    group.throughput(Throughput::Elements(64 * 64));
    group.bench_function(BenchmarkId::new("matrix_product_64x64", name), |b| {
        b.iter(|| S::matrix_product(hidden, black_box(&vector), S::ONE, &mut out, &mut spare))
    });
    group.bench_function(BenchmarkId::new("transposed_product_64x64", name), |b| {
        b.iter(|| S::transposed_product(hidden, black_box(&vector), S::ONE, &mut out, &mut spare))
    });
    group.finish();

    let mut group = c.benchmark_group("digits");
    network
        .infer_supervised(&mut workspace, 0, input, target, &config)
        .unwrap();
    group.bench_function(BenchmarkId::new("inference_step", name), |b| {
        b.iter(|| {
            network
                .inference_step(&mut workspace, 0, config.step_size)
                .unwrap();
            network.compute_errors(&mut workspace, 0).unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("infer_supervised_t20", name), |b| {
        b.iter(|| {
            network
                .infer_supervised(&mut workspace, 0, black_box(input), target, &config)
                .unwrap()
        })
    });
    let mut weights = data.weights.clone();
    let mut gradients = vec![S::ZERO; weights.len()];
    let sgd = Sgd {
        learning_rate: S::from_f64_rounded(0.01, &mut spare),
    };
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(BenchmarkId::new("training_step_batch32", name), |b| {
        b.iter(|| {
            let network = Network::new(arch, &weights, &data.scalings).unwrap();
            for sample in 0..BATCH {
                let input = &data.inputs[sample * DIGITS[0]..(sample + 1) * DIGITS[0]];
                let target = &data.targets[sample * DIGITS[3]..(sample + 1) * DIGITS[3]];
                network
                    .infer_supervised(&mut workspace, sample, input, target, &config)
                    .unwrap();
            }
            network
                .weight_gradients(&mut workspace, BATCH, &mut gradients)
                .unwrap();
            sgd.step(&mut weights, &gradients).unwrap()
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_format::<f32>(c);
    bench_format::<f64>(c);
    bench_format::<I16F16>(c);
    bench_format::<I4F12>(c);
}

criterion_group!(kernel_benches, benches);
criterion_main!(kernel_benches);
