//! An independent `f64` reference of predictive coding, written directly from the equations.
//!
//! It shares no numeric code with the core: activations use `std` maths and matrices are
//! `Vec<Vec<f64>>`. Conventions are JPC's (version 1.0.0):
//!
//! - Layer `l = 1..L` predicts `mu_l = a_l W_l phi_l(z_(l-1)) + s_l z_(l-1)`, where `phi_1`
//!   is the identity and `phi_l` is the activation for `l >= 2`.
//! - The error is `e_l = z_l - mu_l` and the batch energy is
//!   `F = 1/(2B) sum_b sum_l |e_l|^2`.
//! - The activity gradient of a free layer `1 <= l < L` is
//!   `dF/dz_l = (1/B) (e_l - phi'(z_l) (a_(l+1) W_(l+1)^T e_(l+1)) - s_(l+1) e_(l+1))`.
//! - Inference starts from the feedforward pass, clamps `z_0 = x` and `z_L = y`, and takes
//!   explicit Euler steps `z_l <- z_l - eta dF/dz_l` on every free layer from the same state.
//! - The weight gradient is `dF/dW_l = -(a_l / B) sum_b e_l phi_l(z_(l-1))^T`.

/// A dense matrix, row-major: `matrix[row][column]`.
pub type Matrix = Vec<Vec<f64>>;

/// Activities `z_0 .. z_L` of one sample, one vector per layer.
pub type Activities = Vec<Vec<f64>>;

/// Slope of leaky_relu below zero, as in JPC.
pub const LEAKY_RELU_SLOPE: f64 = 0.01;

/// Activation function with JPC's derivative conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x`.
    Linear,
    /// `tanh(x)`.
    Tanh,
    /// `x` clamped to `[-1, 1]`; derivative 1 on the closed interval, 0 outside.
    HardTanh,
    /// `max(0, x)`; derivative 0 at 0.
    Relu,
    /// `x` for `x >= 0`, else `0.01 x`; derivative 1 at 0.
    LeakyRelu,
}

impl Activation {
    /// Parses JPC's snake-case name (`linear`, `tanh`, `hard_tanh`, `relu`, `leaky_relu`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "linear" => Some(Activation::Linear),
            "tanh" => Some(Activation::Tanh),
            "hard_tanh" => Some(Activation::HardTanh),
            "relu" => Some(Activation::Relu),
            "leaky_relu" => Some(Activation::LeakyRelu),
            _ => None,
        }
    }

    /// Applies the activation.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Linear => x,
            Activation::Tanh => x.tanh(),
            Activation::HardTanh => x.clamp(-1.0, 1.0),
            Activation::Relu => x.max(0.0),
            Activation::LeakyRelu => {
                if x >= 0.0 {
                    x
                } else {
                    LEAKY_RELU_SLOPE * x
                }
            }
        }
    }

    /// Returns the derivative at `x`.
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Activation::Linear => 1.0,
            Activation::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            Activation::HardTanh => {
                if (-1.0..=1.0).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu => {
                if x >= 0.0 {
                    1.0
                } else {
                    LEAKY_RELU_SLOPE
                }
            }
        }
    }
}

/// A fully connected predictive coding network in `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    /// Widths `n_0 .. n_L`.
    pub widths: Vec<usize>,
    /// Activation `phi_l` of layers `2..=L`.
    pub activation: Activation,
    /// Scalings `a_1 .. a_L`.
    pub scalings: Vec<f64>,
    /// Identity skips `s_1 .. s_L`.
    pub skips: Vec<bool>,
    /// Weights `W_1 .. W_L`, each `[n_l][n_(l-1)]`, unscaled.
    pub weights: Vec<Matrix>,
}

impl Network {
    /// Checks that every shape fits the widths and wraps the parts.
    ///
    /// # Errors
    ///
    /// A message naming the first part whose length or shape is wrong.
    pub fn new(
        widths: Vec<usize>,
        activation: Activation,
        scalings: Vec<f64>,
        skips: Vec<bool>,
        weights: Vec<Matrix>,
    ) -> Result<Self, String> {
        if widths.len() < 2 {
            return Err(format!(
                "need at least 2 widths (input and output), got {}",
                widths.len()
            ));
        }
        let depth = widths.len() - 1;
        if scalings.len() != depth || skips.len() != depth || weights.len() != depth {
            return Err(format!(
                "depth {depth} needs {depth} scalings, skips and weight matrices; got {}, {} \
                 and {}",
                scalings.len(),
                skips.len(),
                weights.len()
            ));
        }
        for layer in 1..=depth {
            let matrix = &weights[layer - 1];
            if matrix.len() != widths[layer]
                || matrix.iter().any(|row| row.len() != widths[layer - 1])
            {
                return Err(format!(
                    "weights of layer {layer} must be {} x {}",
                    widths[layer],
                    widths[layer - 1]
                ));
            }
            if skips[layer - 1] && widths[layer] != widths[layer - 1] {
                return Err(format!(
                    "layer {layer} has a skip but maps width {} to {}",
                    widths[layer - 1],
                    widths[layer]
                ));
            }
        }
        Ok(Network {
            widths,
            activation,
            scalings,
            skips,
            weights,
        })
    }

    /// Number of weight layers `L`.
    pub fn depth(&self) -> usize {
        self.widths.len() - 1
    }

    /// Returns `phi_l(z_(l-1))`, the input that layer `layer` multiplies by its weights.
    pub fn layer_input(&self, layer: usize, previous: &[f64]) -> Vec<f64> {
        if layer == 1 {
            previous.to_vec()
        } else {
            previous.iter().map(|&z| self.activation.apply(z)).collect()
        }
    }

    /// Returns the prediction `mu_layer` of layer `layer` from `z_(layer-1)`.
    pub fn prediction(&self, layer: usize, previous: &[f64]) -> Vec<f64> {
        let input = self.layer_input(layer, previous);
        let scaling = self.scalings[layer - 1];
        let skip = self.skips[layer - 1];
        self.weights[layer - 1]
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let dot: f64 = row.iter().zip(&input).map(|(w, u)| w * u).sum();
                let mut mu = scaling * dot;
                if skip {
                    mu += previous[i];
                }
                mu
            })
            .collect()
    }

    /// Returns the activities `z_0 = x`, `z_l = mu_l` of the feedforward pass (`z_L` is the
    /// output prediction).
    pub fn feedforward(&self, input: &[f64]) -> Activities {
        let mut activities = vec![input.to_vec()];
        for layer in 1..=self.depth() {
            let mu = self.prediction(layer, &activities[layer - 1]);
            activities.push(mu);
        }
        activities
    }

    /// Returns the errors `e_1 .. e_L` of one sample (index `l - 1` holds `e_l`).
    pub fn errors(&self, activities: &Activities) -> Vec<Vec<f64>> {
        (1..=self.depth())
            .map(|layer| {
                let mu = self.prediction(layer, &activities[layer - 1]);
                activities[layer]
                    .iter()
                    .zip(&mu)
                    .map(|(z, m)| z - m)
                    .collect()
            })
            .collect()
    }

    /// Returns one sample's energy `1/2 sum_l |e_l|^2`.
    pub fn sample_energy(&self, activities: &Activities) -> f64 {
        let errors = self.errors(activities);
        0.5 * errors
            .iter()
            .flat_map(|error| error.iter())
            .map(|e| e * e)
            .sum::<f64>()
    }

    /// Returns the batch energy `F = 1/(2B) sum_b sum_l |e_l|^2`.
    pub fn energy(&self, batch: &[Activities]) -> f64 {
        let total: f64 = batch.iter().map(|sample| self.sample_energy(sample)).sum();
        total / batch.len() as f64
    }

    /// Returns `dF/dz_l` of every sample for the free layers `l = 1 .. L-1`, including the
    /// batch factor `1/B`: `result[b][l - 1][i]`.
    pub fn activity_gradients(&self, batch: &[Activities]) -> Vec<Vec<Vec<f64>>> {
        let batch_size = batch.len() as f64;
        batch
            .iter()
            .map(|sample| {
                let errors = self.errors(sample);
                (1..self.depth())
                    .map(|layer| {
                        self.sample_activity_gradient(sample, &errors, layer)
                            .into_iter()
                            .map(|g| g / batch_size)
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Returns `e_l - phi'(z_l) (a_(l+1) W_(l+1)^T e_(l+1)) - s_(l+1) e_(l+1)` of one sample,
    /// without the batch factor.
    fn sample_activity_gradient(
        &self,
        activities: &Activities,
        errors: &[Vec<f64>],
        layer: usize,
    ) -> Vec<f64> {
        let own_error = &errors[layer - 1];
        let next_error = &errors[layer];
        let next_weights = &self.weights[layer];
        let next_scaling = self.scalings[layer];
        let next_skip = self.skips[layer];
        (0..self.widths[layer])
            .map(|j| {
                let column: f64 = next_weights
                    .iter()
                    .zip(next_error)
                    .map(|(row, e)| row[j] * e)
                    .sum();
                let feedback = next_scaling * column;
                let slope = self.activation.derivative(activities[layer][j]);
                let mut gradient = own_error[j] - slope * feedback;
                if next_skip {
                    gradient -= next_error[j];
                }
                gradient
            })
            .collect()
    }

    /// Takes one explicit Euler step `z_l <- z_l - step dF/dz_l` on every free layer of
    /// every sample, with all gradients computed from the state before the step.
    pub fn inference_step(&self, batch: &mut [Activities], step: f64) {
        let gradients = self.activity_gradients(batch);
        for (sample, sample_gradients) in batch.iter_mut().zip(&gradients) {
            for layer in 1..self.depth() {
                for (z, g) in sample[layer].iter_mut().zip(&sample_gradients[layer - 1]) {
                    *z -= step * g;
                }
            }
        }
    }

    /// Returns `dF/dW_l = -(a_l / B) sum_b e_l phi_l(z_(l-1))^T` for every layer.
    pub fn weight_gradients(&self, batch: &[Activities]) -> Vec<Matrix> {
        let batch_size = batch.len() as f64;
        let errors: Vec<_> = batch.iter().map(|sample| self.errors(sample)).collect();
        (1..=self.depth())
            .map(|layer| {
                let inputs: Vec<_> = batch
                    .iter()
                    .map(|sample| self.layer_input(layer, &sample[layer - 1]))
                    .collect();
                let coefficient = -self.scalings[layer - 1] / batch_size;
                (0..self.widths[layer])
                    .map(|i| {
                        (0..self.widths[layer - 1])
                            .map(|j| {
                                let sum: f64 = errors
                                    .iter()
                                    .zip(&inputs)
                                    .map(|(sample_errors, input)| {
                                        sample_errors[layer - 1][i] * input[j]
                                    })
                                    .sum();
                                coefficient * sum
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }
}

/// Returns `W - lr * grad` for every layer.
pub fn sgd(weights: &[Matrix], gradients: &[Matrix], learning_rate: f64) -> Vec<Matrix> {
    weights
        .iter()
        .zip(gradients)
        .map(|(matrix, gradient)| {
            matrix
                .iter()
                .zip(gradient)
                .map(|(row, gradient_row)| {
                    row.iter()
                        .zip(gradient_row)
                        .map(|(w, g)| w - learning_rate * g)
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Everything one supervised inference and learning step computes for a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Trajectory {
    /// Activities after each step: `states[t][b]` holds `z_0 .. z_L` of sample `b` after `t`
    /// steps (`t = 0` is the feedforward pass with `z_L` clamped to the target).
    pub states: Vec<Vec<Activities>>,
    /// Feedforward output `mu_L` of each sample.
    pub output_predictions: Vec<Vec<f64>>,
    /// `dF/dz_l` at the start, `[b][l - 1][i]`, with the factor `1/B`.
    pub initial_activity_gradients: Vec<Vec<Vec<f64>>>,
    /// Batch energy after `0 ..= T` steps.
    pub energy_trace: Vec<f64>,
    /// `dF/dW_l` at the final activities.
    pub weight_gradients: Vec<Matrix>,
    /// Weights after one SGD step.
    pub weights_after_sgd: Vec<Matrix>,
}

/// Runs the feedforward pass on `inputs`, clamps the outputs to `targets`, takes `steps`
/// inference steps of size `step` (JPC's batch-averaged step) and one SGD step of rate
/// `learning_rate`.
pub fn run(
    network: &Network,
    inputs: &[Vec<f64>],
    targets: &[Vec<f64>],
    step: f64,
    steps: usize,
    learning_rate: f64,
) -> Trajectory {
    let depth = network.depth();
    let mut batch: Vec<Activities> = inputs
        .iter()
        .map(|input| network.feedforward(input))
        .collect();
    let output_predictions = batch.iter().map(|sample| sample[depth].clone()).collect();
    for (sample, target) in batch.iter_mut().zip(targets) {
        sample[depth] = target.clone();
    }

    let initial_activity_gradients = network.activity_gradients(&batch);
    let mut energy_trace = vec![network.energy(&batch)];
    let mut states = vec![batch.clone()];
    for _ in 0..steps {
        network.inference_step(&mut batch, step);
        energy_trace.push(network.energy(&batch));
        states.push(batch.clone());
    }

    let weight_gradients = network.weight_gradients(&batch);
    let weights_after_sgd = sgd(&network.weights, &weight_gradients, learning_rate);
    Trajectory {
        states,
        output_predictions,
        initial_activity_gradients,
        energy_trace,
        weight_gradients,
        weights_after_sgd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(activation: Activation) -> Network {
        Network::new(
            vec![2, 2, 1],
            activation,
            vec![1.0, 0.5],
            vec![false, false],
            vec![
                vec![vec![1.0, -0.5], vec![0.25, 2.0]],
                vec![vec![-1.0, 3.0]],
            ],
        )
        .unwrap()
    }

    #[test]
    fn derivative_conventions_at_kinks() {
        assert_eq!(Activation::Relu.derivative(0.0), 0.0);
        assert_eq!(Activation::LeakyRelu.derivative(0.0), 1.0);
        assert_eq!(Activation::LeakyRelu.derivative(-1.0), LEAKY_RELU_SLOPE);
        assert_eq!(Activation::HardTanh.derivative(1.0), 1.0);
        assert_eq!(Activation::HardTanh.derivative(-1.0), 1.0);
        assert_eq!(Activation::HardTanh.derivative(1.0 + 1e-12), 0.0);
    }

    #[test]
    fn feedforward_errors_are_zero() {
        let network = tiny(Activation::Tanh);
        let activities = network.feedforward(&[0.3, -0.7]);
        for error in network.errors(&activities) {
            assert!(error.iter().all(|&e| e == 0.0));
        }
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let network = tiny(Activation::Tanh);
        let mut sample = network.feedforward(&[0.3, -0.7]);
        sample[2] = vec![0.9];
        sample[1][0] += 0.2;
        let batch = vec![sample.clone()];
        let gradients = network.activity_gradients(&batch);
        for j in 0..2 {
            let h = 1e-6;
            let mut plus = sample.clone();
            plus[1][j] += h;
            let mut minus = sample.clone();
            minus[1][j] -= h;
            let numeric = (network.energy(&[plus]) - network.energy(&[minus])) / (2.0 * h);
            assert!((numeric - gradients[0][0][j]).abs() < 1e-8, "unit {j}");
        }
    }

    #[test]
    fn weight_gradient_matches_finite_difference() {
        let network = tiny(Activation::Tanh);
        let mut sample = network.feedforward(&[0.3, -0.7]);
        sample[2] = vec![0.9];
        sample[1][1] -= 0.1;
        let batch = vec![sample];
        let gradients = network.weight_gradients(&batch);
        for (layer, gradient) in gradients.iter().enumerate() {
            let h = 1e-6;
            let mut plus = network.clone();
            plus.weights[layer][0][1] += h;
            let mut minus = network.clone();
            minus.weights[layer][0][1] -= h;
            let numeric = (plus.energy(&batch) - minus.energy(&batch)) / (2.0 * h);
            assert!(
                (numeric - gradient[0][1]).abs() < 1e-8,
                "layer {}",
                layer + 1
            );
        }
    }
}
