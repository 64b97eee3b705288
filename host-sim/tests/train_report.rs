//! Epoch reports of `pcsim train` on a slice of the bundled digits.

use fixedpc::{Activation, ActivityRounding, Parameterisation, I16F16};
use fixedpc_host_sim::data;
use fixedpc_host_sim::train::{self, NetworkSpec, OptimizerKind, TrainConfig};

fn spec(tolerance: Option<f64>) -> NetworkSpec {
    NetworkSpec {
        widths: vec![64, 16, 10],
        activation: Activation::Relu,
        parameterisation: Parameterisation::Sp,
        skip: false,
        input_scale: 1.0 / 16.0,
        infer_steps: 20,
        infer_rate: 0.1,
        tolerance,
        rounding: ActivityRounding::Nearest,
    }
}

fn mean_steps(tolerance: Option<f64>) -> f64 {
    let all = data::load_csv(&data::default_digits_path(), 10).expect("bundled digits load");
    let (train_set, test_set) = all.split(200).expect("split at 200");
    let config = TrainConfig {
        epochs: 1,
        batch: 8,
        learning_rate: 0.1,
        optimizer: OptimizerKind::Sgd,
        seed: 1,
        threads: 2,
        per_sample: false,
    };
    let trained = train::train::<I16F16>(&spec(tolerance), &config, &train_set, &test_set, |_| {})
        .expect("training succeeds");
    trained.epochs[0].mean_inference_steps
}

#[test]
fn mean_steps_without_tolerance_is_t() {
    assert_eq!(mean_steps(None), 20.0);
}

#[test]
fn mean_steps_with_tolerance_below_t() {
    let steps = mean_steps(Some(0.0005));
    assert!(steps > 0.0, "mean steps {steps}");
    assert!(steps < 20.0, "mean steps {steps}");
}
