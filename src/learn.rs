//! Learning: local weight gradients at the end of inference and the optimisers that apply them.
//!
//! For a batch of `B` samples, `dF/dW_l = -(a_l / B) sum_b e_l phi(z_(l-1))^T`, with `phi` the
//! identity for `l = 1`. Each gradient entry sums its `B` exact products in the wide
//! accumulator and is rounded once.

use crate::error::{Buffer, Error};
use crate::network::{check_len, Network, Workspace};
use crate::scalar::{AdamCoefficients, Scalar, COEF_FRAC_BITS};

impl<S: Scalar> Network<'_, S> {
    /// Writes the weight gradients of the first `batch` samples of the workspace into
    /// `gradients` (same layout as the weights).
    ///
    /// Each sample must have been through inference, so that its errors match its activities.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] or [`Error::BatchSize`] when the buffers do not fit.
    pub fn weight_gradients(
        &self,
        workspace: &mut Workspace<'_, S>,
        batch: usize,
        gradients: &mut [S],
    ) -> Result<(), Error> {
        self.scaled_outer_sums(workspace, batch, gradients, |network, layer| {
            network
                .scaling(layer)
                .div_int(batch as u32)
                .saturating_neg()
        })
    }

    /// Writes `-(1 / B) sum_b e_l phi(z_(l-1))^T`, the weight gradients divided by their
    /// scaling `a_l`, of the first `batch` samples into `gradients`.
    ///
    /// An optimiser that is invariant to a constant factor per layer, such as Adam (up to its
    /// epsilon), can step on these. In fixed point they keep `log2(1 / a_l)` more bits than
    /// [`Network::weight_gradients`]: with muPC at width 64 and depth 128 a hidden layer's
    /// `a_l` is about `2^-6.5`, and its true gradients are mostly below one LSB.
    ///
    /// # Errors
    ///
    /// As [`Network::weight_gradients`].
    pub fn weight_gradients_unscaled(
        &self,
        workspace: &mut Workspace<'_, S>,
        batch: usize,
        gradients: &mut [S],
    ) -> Result<(), Error> {
        self.scaled_outer_sums(workspace, batch, gradients, |_, _| {
            S::ONE.div_int(batch as u32).saturating_neg()
        })
    }

    /// Writes `coefficient(layer) * sum_b e_l phi(z_(l-1))^T` for every layer.
    fn scaled_outer_sums(
        &self,
        workspace: &mut Workspace<'_, S>,
        batch: usize,
        gradients: &mut [S],
        coefficient: impl Fn(&Self, usize) -> S,
    ) -> Result<(), Error> {
        workspace.check(&self.arch, batch)?;
        check_len(Buffer::Gradients, self.arch.weights_len(), gradients.len())?;
        let z_len = workspace.activities_per_sample;
        let e_len = workspace.errors_per_sample;
        let activation = self.arch.activation();

        for layer in 1..=self.arch.depth() {
            let input_width = self.arch.width(layer - 1);
            let width = self.arch.width(layer);
            let z_offset = self.arch.activity_offset(layer - 1);
            let e_offset = self.arch.error_offset(layer);

            // phi(z_(l-1)) of every sample, side by side in the scratch.
            let activated = &mut workspace.scratch[..batch * input_width];
            for (sample, out) in activated.chunks_exact_mut(input_width).enumerate() {
                let input = &workspace.activities[sample * z_len + z_offset..][..input_width];
                for (value, &x) in out.iter_mut().zip(input) {
                    *value = if layer == 1 {
                        x
                    } else {
                        S::activate(activation, x)
                    };
                }
            }

            let coefficient = coefficient(self, layer);
            let overflows = &mut workspace.overflows[layer - 1];
            let layer_gradients = &mut gradients[self.arch.weight_offset(layer)..];
            for i in 0..width {
                let row = &mut layer_gradients[i * input_width..(i + 1) * input_width];
                // Sample b's error of neuron i is at `errors[b * e_len + e_offset + i]`.
                S::outer_product_row(
                    &workspace.errors[e_offset + i..],
                    e_len,
                    activated,
                    batch,
                    coefficient,
                    row,
                    overflows,
                );
            }
        }
        Ok(())
    }
}

/// Plain stochastic gradient descent, `w <- w - lr * g`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd<S> {
    /// Learning rate.
    pub learning_rate: S,
}

impl<S: Scalar> Sgd<S> {
    /// Applies one step and returns the number of saturated updates.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when the slices differ in length.
    pub fn step(&self, weights: &mut [S], gradients: &[S]) -> Result<u32, Error> {
        check_len(Buffer::Gradients, weights.len(), gradients.len())?;
        let mut overflows = 0;
        for (weight, &gradient) in weights.iter_mut().zip(gradients) {
            let change = self.learning_rate.saturating_mul(gradient, &mut overflows);
            *weight = weight.saturating_sub(change, &mut overflows);
        }
        Ok(overflows)
    }
}

/// Marsaglia's xorshift32 generator (shifts 13, 17, 5): small, fast on any core, and the same
/// sequence on every target for a given seed. Not for cryptography.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XorShift32 {
    state: u32,
}

impl XorShift32 {
    /// Seed used in place of 0, which is the one state xorshift never leaves.
    pub const ZERO_SEED_REPLACEMENT: u32 = 0x9E37_79B9;

    /// Creates a generator; seed 0 is replaced by [`XorShift32::ZERO_SEED_REPLACEMENT`].
    pub const fn new(seed: u32) -> Self {
        let state = if seed == 0 {
            Self::ZERO_SEED_REPLACEMENT
        } else {
            seed
        };
        XorShift32 { state }
    }

    /// Advances the generator and returns its new state, never 0.
    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        x
    }

    /// Current state, from which [`XorShift32::new`] resumes the same sequence.
    pub fn state(&self) -> u32 {
        self.state
    }
}

/// Stochastic gradient descent with stochastically rounded updates, `w <- w - round(lr * g)`.
///
/// In fixed point, round to nearest drops every update below half an LSB, so small learning
/// rates or small gradients stall training. Here each product `lr * g` rounds up with a
/// probability equal to its dropped fraction (see [`Scalar::saturating_mul_stochastic`]), so
/// the expected update is the exact one. The random bits come from a seeded [`XorShift32`],
/// one draw per weight in weight order, so a host and a board with the same seed and the same
/// gradients produce the same weights. Float formats ignore the random bits and match
/// [`Sgd`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StochasticSgd<S> {
    /// Learning rate.
    pub learning_rate: S,
    /// Source of the rounding offsets; it advances by one draw per weight and step.
    pub rng: XorShift32,
}

impl<S: Scalar> StochasticSgd<S> {
    /// Creates the optimiser with its generator seeded by `seed`.
    pub fn new(learning_rate: S, seed: u32) -> Self {
        StochasticSgd {
            learning_rate,
            rng: XorShift32::new(seed),
        }
    }

    /// Applies one step and returns the number of saturated updates.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when the slices differ in length; the weights and the
    /// generator are then unchanged.
    pub fn step(&mut self, weights: &mut [S], gradients: &[S]) -> Result<u32, Error> {
        check_len(Buffer::Gradients, weights.len(), gradients.len())?;
        let mut overflows = 0;
        for (weight, &gradient) in weights.iter_mut().zip(gradients) {
            let random = self.rng.next_u32();
            let change =
                self.learning_rate
                    .saturating_mul_stochastic(gradient, random, &mut overflows);
            *weight = weight.saturating_sub(change, &mut overflows);
        }
        Ok(overflows)
    }
}

/// Adam with bias correction, computed identically on every target.
///
/// Hyperparameters are Q2.30 integers (see [`AdamCoefficients`]), so the bias corrections
/// come from integer arithmetic and a fixed-point network trains the same on a host and a
/// board. The fixed-point update divides with truncation toward zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adam {
    learning_rate: i64,
    beta1: i64,
    beta2: i64,
    epsilon: i64,
    beta1_power: i64,
    beta2_power: i64,
    steps: u32,
}

const COEF_ONE: i64 = 1 << COEF_FRAC_BITS;

fn to_coefficient(value: f64) -> i64 {
    libm::round(value * COEF_ONE as f64) as i64
}

fn mul_coefficients(a: i64, b: i64) -> i64 {
    ((a as i128 * b as i128 + (1 << (COEF_FRAC_BITS - 1))) >> COEF_FRAC_BITS) as i64
}

impl Adam {
    /// Creates Adam with the usual hyperparameters, each rounded to a multiple of `2^-30`
    /// (`epsilon` to at least `2^-30`).
    pub fn new(learning_rate: f64, beta1: f64, beta2: f64, epsilon: f64) -> Self {
        Adam {
            learning_rate: to_coefficient(learning_rate),
            beta1: to_coefficient(beta1),
            beta2: to_coefficient(beta2),
            epsilon: to_coefficient(epsilon).max(1),
            beta1_power: COEF_ONE,
            beta2_power: COEF_ONE,
            steps: 0,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Counts one more step and returns its coefficients, with the bias corrections of that
    /// step. [`Adam::step`] calls this once and then updates every weight with
    /// [`Scalar::adam_update`], so a caller that updates the weights itself gets the same
    /// coefficients.
    pub fn advance(&mut self) -> AdamCoefficients {
        self.steps += 1;
        self.beta1_power = mul_coefficients(self.beta1_power, self.beta1);
        self.beta2_power = mul_coefficients(self.beta2_power, self.beta2);
        let correction1 = (COEF_ONE - self.beta1_power).max(1);
        let correction2 = (COEF_ONE - self.beta2_power).max(0);
        let root2 = (((correction2 as u128) << COEF_FRAC_BITS).isqrt()) as i128;
        let step = (self.learning_rate as i128 * root2 / correction1 as i128) as i64;
        AdamCoefficients {
            beta1: self.beta1,
            beta2: self.beta2,
            step,
            epsilon: self.epsilon,
        }
    }

    /// Applies one step; `first` and `second` are the moments, one per weight, zero at the
    /// start. Returns the number of saturated updates.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when the slices differ in length.
    pub fn step<S: Scalar>(
        &mut self,
        weights: &mut [S],
        gradients: &[S],
        first: &mut [S::Moment],
        second: &mut [S::Moment],
    ) -> Result<u32, Error> {
        check_len(Buffer::Gradients, weights.len(), gradients.len())?;
        check_len(Buffer::OptimizerState, weights.len(), first.len())?;
        check_len(Buffer::OptimizerState, weights.len(), second.len())?;

        let coefs = self.advance();
        let mut overflows = 0;
        for (((weight, &gradient), m), v) in weights
            .iter_mut()
            .zip(gradients)
            .zip(first.iter_mut())
            .zip(second.iter_mut())
        {
            S::adam_update(weight, m, v, gradient, &coefs, &mut overflows);
        }
        Ok(overflows)
    }
}

#[cfg(test)]
mod tests {
    use fixed::types::I16F16;

    use super::*;

    /// Minimises `1/2 (w - target)^2` from `w = 0` with gradient `w - target`.
    fn fit_scalar(steps: usize, stochastic: bool) -> I16F16 {
        let target = I16F16::from_num(0.005);
        // lr * (w - target) is about 0.33 LSB at the start, so round to nearest drops it.
        let learning_rate = I16F16::from_num(0.001);
        let mut weights = [I16F16::ZERO];
        let mut sgd = StochasticSgd::new(learning_rate, 7);
        let nearest = Sgd { learning_rate };
        for _ in 0..steps {
            let gradients = [weights[0] - target];
            if stochastic {
                sgd.step(&mut weights, &gradients).unwrap();
            } else {
                nearest.step(&mut weights, &gradients).unwrap();
            }
        }
        weights[0]
    }

    #[test]
    fn nearest_rounding_stalls_below_one_lsb() {
        assert_eq!(fit_scalar(20_000, false), I16F16::ZERO);
    }

    #[test]
    fn stochastic_rounding_converges_below_one_lsb() {
        let weight = fit_scalar(20_000, true);
        let error = (weight - I16F16::from_num(0.005)).abs();
        assert!(
            error < I16F16::from_num(0.0005),
            "weight {weight} after 20000 steps"
        );
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // 0.25 LSB per step: about a quarter of 4096 draws round up.
        let lsb = I16F16::from_bits(1);
        let quarter = I16F16::from_num(0.25);
        let mut rng = XorShift32::new(1);
        let mut overflows = 0;
        let mut ups = 0;
        for _ in 0..4096 {
            let product = lsb.saturating_mul_stochastic(quarter, rng.next_u32(), &mut overflows);
            ups += product.to_bits();
        }
        assert!((900..1150).contains(&ups), "{ups} of 4096 rounded up");
        assert_eq!(overflows, 0);
    }

    #[test]
    fn stochastic_rounding_is_exact_on_representable_products() {
        let mut overflows = 0;
        for random in [0, 1, 0xFFFF, u32::MAX] {
            let product = I16F16::from_num(1.5).saturating_mul_stochastic(
                I16F16::from_num(-2),
                random,
                &mut overflows,
            );
            assert_eq!(product, I16F16::from_num(-3));
        }
        assert_eq!(overflows, 0);
    }

    #[test]
    fn xorshift_matches_reference_sequence() {
        // First outputs of Marsaglia's xorshift32 (13, 17, 5) from seed 1.
        let mut rng = XorShift32::new(1);
        assert_eq!(rng.next_u32(), 270_369);
        assert_eq!(rng.next_u32(), 67_634_689);
        assert_eq!(rng.next_u32(), 2_647_435_461);
    }

    #[test]
    fn xorshift_replaces_zero_seed() {
        let mut rng = XorShift32::new(0);
        assert_eq!(rng.state(), XorShift32::ZERO_SEED_REPLACEMENT);
        assert_ne!(rng.next_u32(), 0);
    }

    #[test]
    fn stochastic_sgd_rejects_length_mismatch() {
        let mut sgd = StochasticSgd::new(I16F16::ONE, 3);
        let before = sgd.rng;
        let mut weights = [I16F16::ZERO; 2];
        assert!(sgd.step(&mut weights, &[I16F16::ONE]).is_err());
        assert_eq!(sgd.rng, before);
    }
}
