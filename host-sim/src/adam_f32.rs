//! The core's `f32` Adam update over a whole weight vector, in a loop that vectorises.
//!
//! `fixedpc::Adam::step` updates one weight at a time through `Scalar::adam_update`, which
//! converts the coefficients from Q2.30 for every weight and takes the square root with
//! `libm::sqrtf`. Here the coefficients are converted once per step and the loop uses
//! `f32::sqrt`. Both square roots are correctly rounded, and every other operation is the
//! same `f32` operation in the same order without fused multiply-adds, so the weights and
//! moments are the same bits as the core's. The test `adam_matches_core_bit_for_bit` checks
//! that.

use anyhow::{ensure, Result};
use fixedpc::scalar::{AdamCoefficients, COEF_FRAC_BITS};
use fixedpc::Adam;

/// Adam's rates of one step as `f32`, converted from Q2.30 as the core's `adam_update` does.
#[derive(Clone, Copy)]
struct Rates {
    beta1: f32,
    beta2: f32,
    step: f32,
    epsilon: f32,
}

impl Rates {
    fn new(coefficients: &AdamCoefficients) -> Self {
        let convert =
            |coefficient: i64| (coefficient as f64 / (1u64 << COEF_FRAC_BITS) as f64) as f32;
        Rates {
            beta1: convert(coefficients.beta1),
            beta2: convert(coefficients.beta2),
            step: convert(coefficients.step),
            epsilon: convert(coefficients.epsilon),
        }
    }
}

/// Applies one step of `adam` to `f32` weights, as `adam.step` does, and returns the number of
/// non-finite weights after the update.
///
/// # Errors
///
/// When `gradients`, `first` or `second` differ in length from `weights`. `adam` and the
/// slices are then unchanged.
pub fn adam_step(
    adam: &mut Adam,
    weights: &mut [f32],
    gradients: &[f32],
    first: &mut [f32],
    second: &mut [f32],
) -> Result<u32> {
    let length = weights.len();
    ensure!(
        gradients.len() == length && first.len() == length && second.len() == length,
        "Adam needs one gradient and two moments per weight: {length} weights, {} gradients, \
         {} and {} moments",
        gradients.len(),
        first.len(),
        second.len()
    );
    let rates = Rates::new(&adam.advance());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports AVX, checked at run time.
        return Ok(unsafe { update_avx(rates, weights, gradients, first, second) });
    }
    Ok(update_portable(rates, weights, gradients, first, second))
}

/// Updates every weight and its moments, and returns the number of non-finite weights.
#[inline(always)]
fn update_portable(
    rates: Rates,
    weights: &mut [f32],
    gradients: &[f32],
    first: &mut [f32],
    second: &mut [f32],
) -> u32 {
    let Rates {
        beta1,
        beta2,
        step,
        epsilon,
    } = rates;
    let mut non_finite = 0u32;
    let values = weights
        .iter_mut()
        .zip(gradients)
        .zip(first.iter_mut())
        .zip(second.iter_mut());
    for (((weight, &gradient), m), v) in values {
        *m = beta1 * *m + (1.0 - beta1) * gradient;
        *v = beta2 * *v + (1.0 - beta2) * gradient * gradient;
        let update = step * *m / (v.sqrt() + epsilon);
        *weight -= update;
        non_finite += u32::from(!weight.is_finite());
    }
    non_finite
}

/// Runs [`update_portable`] compiled with AVX, which processes 8 values per instruction where
/// the portable build has SSE2's 4. AVX has no fused multiply-add, so the bits are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn update_avx(
    rates: Rates,
    weights: &mut [f32],
    gradients: &[f32],
    first: &mut [f32],
    second: &mut [f32],
) -> u32 {
    update_portable(rates, weights, gradients, first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns `count` values spread over about `[-scale, scale]`, some of them zero.
    fn values(count: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..count)
            .map(|index| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if index % 11 == 0 {
                    0.0
                } else {
                    (state as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
                }
            })
            .collect()
    }

    #[test]
    fn adam_matches_core_bit_for_bit() {
        // 8 * 37 + 5 weights, so the loop has full vectors and a remainder.
        let count = 301;
        let mut core = Adam::new(0.001, 0.9, 0.999, 1e-8);
        let mut batched = core;
        let mut weights = values(count, 1, 0.5);
        let mut expected_weights = weights.clone();
        let (mut first, mut second) = (vec![0.0; count], vec![0.0; count]);
        let (mut expected_first, mut expected_second) = (first.clone(), second.clone());
        for step in 0..50 {
            // Gradients from 1e-6 to 10 in magnitude, so that the moments span a wide range.
            let scale = 10f32.powi(step % 8 - 6);
            let gradients = values(count, step as u32 + 2, scale);
            let overflows = adam_step(
                &mut batched,
                &mut weights,
                &gradients,
                &mut first,
                &mut second,
            )
            .unwrap();
            let expected_overflows = core
                .step(
                    &mut expected_weights,
                    &gradients,
                    &mut expected_first,
                    &mut expected_second,
                )
                .unwrap();
            assert_eq!(overflows, expected_overflows, "step {step}: overflows");
            for (label, actual, expected) in [
                ("weight", &weights, &expected_weights),
                ("first moment", &first, &expected_first),
                ("second moment", &second, &expected_second),
            ] {
                for (index, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        e.to_bits(),
                        "step {step}: {label} {index} is {a}, the core's is {e}"
                    );
                }
            }
        }
        assert_eq!(batched, core, "the optimisers' states differ");
    }

    #[test]
    fn adam_counts_non_finite_weights_like_core() {
        let mut core = Adam::new(0.001, 0.9, 0.999, 1e-8);
        let mut batched = core;
        let mut weights = vec![1.0, f32::MAX, f32::INFINITY, -2.0, f32::NAN];
        let mut expected_weights = weights.clone();
        let gradients = [f32::NAN, -1e30, 0.0, f32::INFINITY, 1.0];
        let (mut first, mut second) = (vec![0.0; 5], vec![0.0; 5]);
        let (mut expected_first, mut expected_second) = (first.clone(), second.clone());

        let overflows = adam_step(
            &mut batched,
            &mut weights,
            &gradients,
            &mut first,
            &mut second,
        )
        .unwrap();
        let expected = core
            .step(
                &mut expected_weights,
                &gradients,
                &mut expected_first,
                &mut expected_second,
            )
            .unwrap();

        assert!(expected > 0, "the core counted nothing");
        assert_eq!(overflows, expected, "non-finite weights");
        for (index, (a, e)) in weights.iter().zip(&expected_weights).enumerate() {
            assert_eq!(a.is_nan(), e.is_nan(), "weight {index}: {a} against {e}");
            if !e.is_nan() {
                assert_eq!(a.to_bits(), e.to_bits(), "weight {index}: {a} against {e}");
            }
        }
    }

    #[test]
    fn adam_rejects_mismatched_lengths() {
        let mut adam = Adam::new(0.001, 0.9, 0.999, 1e-8);
        let before = adam;
        let mut weights = vec![0.0; 4];
        let (mut first, mut second) = (vec![0.0; 4], vec![0.0; 3]);
        let error =
            adam_step(&mut adam, &mut weights, &[0.0; 4], &mut first, &mut second).unwrap_err();
        assert!(error.to_string().contains("3 moments"), "{error}");
        assert_eq!(adam, before, "a rejected step advanced the optimiser");
    }
}
