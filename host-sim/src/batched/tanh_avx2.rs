//! The tanh of the core's `f32` format written with AVX2 intrinsics.
//!
//! The compiler vectorises the portable loop one vector at a time, and the long chain of
//! dependent multiplies and adds in each vector leaves most of the floating-point units idle.
//! Here several vectors go through the chain side by side. Every arithmetic operation is the
//! `f32` operation of the core's `fast_tanh_f32`, in the same order and without fused
//! multiply-adds, so the results are the same bits. The test `tanh_matches_core_bit_for_bit`
//! checks that.

use std::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_andnot_ps, _mm256_blendv_ps, _mm256_cmp_ps, _mm256_div_ps,
    _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_storeu_ps,
    _CMP_LT_OQ,
};

use super::Activation;

/// `f32` lanes of a 256-bit register.
const LANES: usize = 8;

/// Inputs of smaller magnitude are their own tanh.
const TINY: f32 = 0.0004;
/// Inputs are clamped to `+-CLAMP`.
const CLAMP: f32 = 7.905_311;
/// Numerator coefficients in `x^2`, highest power first.
const NUMERATOR: [f32; 7] = [
    -2.760_768_5e-16,
    2.000_188e-13,
    -8.604_672e-11,
    5.122_297e-8,
    1.485_722_4e-5,
    6.372_619e-4,
    4.893_524_6e-3,
];
/// Denominator coefficients in `x^2`, highest power first.
const DENOMINATOR: [f32; 4] = [1.198_258_4e-6, 1.185_347e-4, 2.268_434_6e-3, 4.893_525e-3];

/// Vectors that [`tanh`] evaluates side by side.
const INTERLEAVED: usize = 4;

/// Returns the tanh of each lane of `N` vectors, the same bits as `<f32 as Scalar>::activate`
/// for tanh.
///
/// Each step of the polynomials is written for all `N` vectors before the next step, so that
/// the processor has `N` independent chains of multiplies and adds to overlap where one chain
/// would wait for the previous result.
#[inline]
#[target_feature(enable = "avx2")]
fn tanh<const N: usize>(x: [__m256; N]) -> [__m256; N] {
    // `max` and `min` return their second operand when one is NaN, so NaN stays NaN as in
    // `f32::clamp`.
    let clamped = x.map(|x| {
        _mm256_min_ps(
            _mm256_set1_ps(CLAMP),
            _mm256_max_ps(_mm256_set1_ps(-CLAMP), x),
        )
    });
    let square = clamped.map(|clamped| _mm256_mul_ps(clamped, clamped));
    let mut numerator = [_mm256_set1_ps(NUMERATOR[0]); N];
    for &coefficient in &NUMERATOR[1..] {
        for (numerator, &square) in numerator.iter_mut().zip(&square) {
            *numerator = _mm256_add_ps(
                _mm256_mul_ps(*numerator, square),
                _mm256_set1_ps(coefficient),
            );
        }
    }
    let mut denominator = [_mm256_set1_ps(DENOMINATOR[0]); N];
    for &coefficient in &DENOMINATOR[1..] {
        for (denominator, &square) in denominator.iter_mut().zip(&square) {
            *denominator = _mm256_add_ps(
                _mm256_mul_ps(*denominator, square),
                _mm256_set1_ps(coefficient),
            );
        }
    }
    let mut result = x;
    for (index, result) in result.iter_mut().enumerate() {
        let ratio = _mm256_div_ps(
            _mm256_mul_ps(clamped[index], numerator[index]),
            denominator[index],
        );
        let magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x[index]);
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(magnitude, _mm256_set1_ps(TINY));
        *result = _mm256_blendv_ps(ratio, x[index], tiny);
    }
    result
}

/// Writes the tanh of every value of `input` into `out`, the same bits as the core's.
///
/// # Safety
///
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn activate_row(input: &[f32], out: &mut [f32]) {
    let width = input.len().min(out.len());
    let mut index = 0;
    while index + INTERLEAVED * LANES <= width {
        let x: [__m256; INTERLEAVED] = std::array::from_fn(|vector| {
            _mm256_loadu_ps(input.as_ptr().add(index + vector * LANES))
        });
        for (vector, value) in tanh(x).into_iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(index + vector * LANES), value);
        }
        index += INTERLEAVED * LANES;
    }
    while index + LANES <= width {
        let [value] = tanh([_mm256_loadu_ps(input.as_ptr().add(index))]);
        _mm256_storeu_ps(out.as_mut_ptr().add(index), value);
        index += LANES;
    }
    super::activate_row_portable(
        Activation::Tanh,
        &input[index..width],
        &mut out[index..width],
    );
}

#[cfg(test)]
mod tests {
    use fixedpc::Scalar;

    use super::*;

    /// Inputs around every branch of the tanh: zeros, the `TINY` and `CLAMP` bounds, a grid
    /// over `[-10, 10]`, huge values, infinities and NaN.
    fn tanh_inputs() -> Vec<f32> {
        let mut inputs = vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-30,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for bound in [TINY, CLAMP] {
            for offset in -4i32..=4 {
                let bits = (bound.to_bits() as i32 + offset) as u32;
                inputs.push(f32::from_bits(bits));
                inputs.push(-f32::from_bits(bits));
            }
        }
        inputs.extend((-1_000_000..=1_000_000).map(|step| step as f32 * 1e-5));
        inputs
    }

    #[test]
    fn tanh_matches_core_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let inputs = tanh_inputs();
        let mut out = vec![0.0; inputs.len()];
        // SAFETY: the CPU supports AVX2, checked above.
        unsafe { activate_row(&inputs, &mut out) };
        for (&x, &actual) in inputs.iter().zip(&out) {
            let expected = f32::activate(Activation::Tanh, x);
            if expected.is_nan() {
                assert!(actual.is_nan(), "tanh({x}) is {actual}, the core's is NaN");
            } else {
                assert_eq!(
                    actual.to_bits(),
                    expected.to_bits(),
                    "tanh({x}) is {actual}, the core's is {expected}"
                );
            }
        }
    }
}
