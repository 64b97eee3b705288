//! The 16-bit fixed-point instance of [`Scalar`]: `I4F12`, signed Q4.12 (range -8 to
//! 8 - 2^-12, resolution 2^-12).
//!
//! Values take half the memory of `I16F16`, and on a Cortex-M4 one DSP instruction multiplies
//! two pairs of them. Sums of products are exact in an `i64` (24 fraction bits): a product of
//! two raw values is at most `2^30` in magnitude, so fewer than `2^33` of them cannot overflow.
//! An `i32` sum would overflow after two full-range products, and on a Cortex-M4 `SMLALD`
//! accumulates in 64 bits at the same instruction count as `SMLAD` in 32.
//! Rounding is to nearest with ties toward positive infinity and overflow saturates, as for
//! `I16F16`. Activations go through the integer-only Q16.16 functions: the input widens
//! exactly and the result rounds once to Q4.12.

use fixed::types::{I16F16, I4F12};

use crate::activation::{self, Activation};
use crate::kernels;
use crate::scalar::{outer_product_row_generic, AdamCoefficients, NumericFormat, Scalar};

/// Fraction bits of `I4F12`.
const FRAC: u32 = 12;
/// Bits between Q4.12 and Q16.16.
const WIDEN: u32 = 16 - FRAC;

/// Rounds `wide` to nearest (ties toward positive infinity) after dropping `shift` bits, then
/// saturates to the `i16` range, counting an overflow when it clamps.
fn round_shift(wide: i64, shift: u32, overflows: &mut u32) -> i16 {
    match wide.checked_add(1 << (shift - 1)) {
        Some(biased) => saturate(biased >> shift, overflows),
        // Only values within 2^(shift-1) of i64::MAX get here, far above the i16 range.
        None => saturate(i64::MAX >> shift, overflows),
    }
}

/// Saturates to the `i16` range, counting an overflow when it clamps.
fn saturate(wide: i64, overflows: &mut u32) -> i16 {
    // One test for the common in-range case, which compiles to a sign-extension compare.
    match i16::try_from(wide) {
        Ok(value) => value,
        Err(_) => {
            *overflows += 1;
            if wide > 0 {
                i16::MAX
            } else {
                i16::MIN
            }
        }
    }
}

/// Saturates an `i32` to the `i16` range as [`saturate`] does, in 32-bit arithmetic.
fn saturate_i32(value: i32, overflows: &mut u32) -> i16 {
    match i16::try_from(value) {
        Ok(narrow) => narrow,
        Err(_) => {
            *overflows += 1;
            if value > 0 {
                i16::MAX
            } else {
                i16::MIN
            }
        }
    }
}

/// Converts a Q16.16 raw value to Q4.12, rounding once. It saturates without counting, because
/// the activations and derivatives it converts stay within the Q4.12 range.
fn from_q16(raw: i32) -> I4F12 {
    let mut ignored = 0;
    I4F12::from_bits(round_shift(raw as i64, WIDEN, &mut ignored))
}

fn to_q16(x: I4F12) -> i32 {
    (x.to_bits() as i32) << WIDEN
}

/// Exact dot product of raw Q4.12 values, with 24 fraction bits.
fn dot_raw(a: &[I4F12], b: &[I4F12]) -> i64 {
    kernels::dot_i16(bytemuck::cast_slice(a), bytemuck::cast_slice(b))
}

impl Scalar for I4F12 {
    /// Exact sum of raw products with 24 fraction bits.
    type Acc = i64;
    /// Adam moments as for `I16F16`: 32 fraction bits for the first, 48 for the second.
    type Moment = i64;

    const ZERO: Self = I4F12::ZERO;
    const ONE: Self = I4F12::ONE;
    const FORMAT: NumericFormat = NumericFormat::I4F12;

    fn from_f64_rounded(value: f64, overflows: &mut u32) -> Self {
        if value.is_nan() {
            *overflows += 1;
            return I4F12::ZERO;
        }
        let rounded = libm::floor(value * (1u32 << FRAC) as f64 + 0.5);
        if rounded > i16::MAX as f64 {
            *overflows += 1;
            I4F12::MAX
        } else if rounded < i16::MIN as f64 {
            *overflows += 1;
            I4F12::MIN
        } else {
            I4F12::from_bits(rounded as i16)
        }
    }

    fn to_f64(self) -> f64 {
        self.to_bits() as f64 / (1u32 << FRAC) as f64
    }

    fn from_le_slice(bytes: &[u8]) -> Self {
        I4F12::from_bits(i16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn write_le(self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_bits().to_le_bytes());
    }

    fn acc_zero() -> i64 {
        0
    }

    fn acc_mul_add(acc: i64, a: Self, b: Self) -> i64 {
        acc + (a.to_bits() as i32 * b.to_bits() as i32) as i64
    }

    fn acc_add(acc: i64, x: Self) -> i64 {
        acc + ((x.to_bits() as i64) << FRAC)
    }

    fn acc_sub(acc: i64, x: Self) -> i64 {
        acc - ((x.to_bits() as i64) << FRAC)
    }

    fn acc_round(acc: i64, overflows: &mut u32) -> Self {
        I4F12::from_bits(round_shift(acc, FRAC, overflows))
    }

    fn acc_scale_round(acc: i64, scale: Self, overflows: &mut u32) -> Self {
        if scale == I4F12::ONE {
            // (acc 2^12 + 2^23) >> 24 equals (acc + 2^11) >> 12.
            return I4F12::from_bits(round_shift(acc, FRAC, overflows));
        }
        if acc.unsigned_abs() < 1 << 47 {
            // |scale| <= 2^15 keeps the product and its bias below 2^63, so `i64` arithmetic
            // gives the bits of the `i128` path below.
            let wide = acc * scale.to_bits() as i64;
            return I4F12::from_bits(saturate(
                (wide + (1 << (2 * FRAC - 1))) >> (2 * FRAC),
                overflows,
            ));
        }
        let wide = acc as i128 * scale.to_bits() as i128;
        let rounded = (wide + (1i128 << (2 * FRAC - 1))) >> (2 * FRAC);
        let clamped = rounded.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        I4F12::from_bits(saturate(clamped, overflows))
    }

    fn saturating_add(self, other: Self, overflows: &mut u32) -> Self {
        let sum = self.to_bits() as i32 + other.to_bits() as i32;
        I4F12::from_bits(saturate_i32(sum, overflows))
    }

    fn saturating_sub(self, other: Self, overflows: &mut u32) -> Self {
        let difference = self.to_bits() as i32 - other.to_bits() as i32;
        I4F12::from_bits(saturate_i32(difference, overflows))
    }

    fn saturating_mul(self, other: Self, overflows: &mut u32) -> Self {
        // The product of two raw values is at most 2^30 in magnitude, so with the rounding
        // bias it fits an `i32`, and this equals `round_shift` on the `i64` product.
        let product = self.to_bits() as i32 * other.to_bits() as i32;
        let rounded = (product + (1 << (FRAC - 1))) >> FRAC;
        I4F12::from_bits(saturate_i32(rounded, overflows))
    }

    fn saturating_mul_stochastic(self, other: Self, random: u32, overflows: &mut u32) -> Self {
        let product = self.to_bits() as i64 * other.to_bits() as i64;
        // Only the 12 dropped bits take part, so the offset is below one LSB of the result.
        let offset = (random & ((1 << FRAC) - 1)) as i64;
        I4F12::from_bits(saturate((product + offset) >> FRAC, overflows))
    }

    fn saturating_neg(self) -> Self {
        self.saturating_neg()
    }

    fn div_int(self, n: u32) -> Self {
        let n = n.max(1) as i64;
        let raw = self.to_bits() as i64;
        // Round to nearest with ties toward positive infinity, like every other rounding.
        I4F12::from_bits((2 * raw + n).div_euclid(2 * n) as i16)
    }

    fn activate(act: Activation, x: Self) -> Self {
        from_q16(activation::q16_activate(act, to_q16(x)))
    }

    fn activate_derivative(act: Activation, x: Self) -> Self {
        from_q16(activation::q16_derivative(act, to_q16(x)))
    }

    fn dot(a: &[Self], b: &[Self]) -> i64 {
        dot_raw(a, b)
    }

    fn matrix_product(
        matrix: &[Self],
        vector: &[Self],
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        let rows = out.len();
        let matrix = &matrix[..(rows * vector.len()).min(matrix.len())];
        #[cfg(fixedpc_dsp)]
        if scale == I4F12::ONE
            && kernels::matrix_product_q12(
                bytemuck::cast_slice(matrix),
                bytemuck::cast_slice(vector),
                bytemuck::cast_slice_mut(out),
            )
        {
            return;
        }
        kernels::rows_dot_i16(
            bytemuck::cast_slice(matrix),
            bytemuck::cast_slice(vector),
            |i, sum| out[i] = Self::acc_scale_round(sum, scale, overflows),
        );
    }

    fn transposed_product(
        matrix: &[Self],
        vector: &[Self],
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        #[cfg(fixedpc_dsp)]
        if scale == I4F12::ONE
            && kernels::transposed_product_q12(
                bytemuck::cast_slice(matrix),
                bytemuck::cast_slice(vector),
                bytemuck::cast_slice_mut(out),
            )
        {
            return;
        }
        let columns = out.len();
        kernels::columns_dot_i16(
            bytemuck::cast_slice(matrix),
            bytemuck::cast_slice(vector),
            columns,
            |j, sum| out[j] = Self::acc_scale_round(sum, scale, overflows),
        );
    }

    fn outer_product_row(
        column: &[Self],
        stride: usize,
        rows: &[Self],
        batch: usize,
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        if batch == 1 {
            // `acc_scale_round(e x, scale)` is `saturate((e x scale + 2^23) >> 24)` for every
            // scale, scale one included. `e scale` is at most 2^30 in magnitude, so it is
            // computed once per row, the product with `x` stays below 2^45, and the rounded
            // value below 2^21 fits an `i32`.
            let factor = column[0].to_bits() as i32 * scale.to_bits() as i32;
            for (value, &x) in out.iter_mut().zip(rows) {
                let wide = factor as i64 * x.to_bits() as i64;
                let rounded = ((wide + (1 << (2 * FRAC - 1))) >> (2 * FRAC)) as i32;
                *value = I4F12::from_bits(saturate_i32(rounded, overflows));
            }
            return;
        }
        outer_product_row_generic(column, stride, rows, batch, scale, out, overflows);
    }

    fn adam_update(
        weight: &mut Self,
        first: &mut i64,
        second: &mut i64,
        grad: Self,
        coefs: &AdamCoefficients,
        overflows: &mut u32,
    ) {
        // The Q16.16 update on the widened values, rounded once back to Q4.12.
        let mut wide = I16F16::from_bits(to_q16(*weight));
        let grad = I16F16::from_bits(to_q16(grad));
        I16F16::adam_update(&mut wide, first, second, grad, coefs, overflows);
        *weight = I4F12::from_bits(round_shift(wide.to_bits() as i64, WIDEN, overflows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_rounds_and_saturates() {
        let mut overflows = 0;
        assert_eq!(I4F12::from_f64_rounded(1.0, &mut overflows), I4F12::ONE);
        let half_lsb = 0.5 / 4096.0;
        assert_eq!(
            I4F12::from_f64_rounded(half_lsb, &mut overflows).to_bits(),
            1
        );
        assert_eq!(
            I4F12::from_f64_rounded(-half_lsb, &mut overflows).to_bits(),
            0
        );
        assert_eq!(overflows, 0);
        assert_eq!(I4F12::from_f64_rounded(9.0, &mut overflows), I4F12::MAX);
        assert_eq!(I4F12::from_f64_rounded(-9.0, &mut overflows), I4F12::MIN);
        assert_eq!(overflows, 2);
    }

    #[test]
    fn dot_is_exact_at_full_range() {
        let a = [I4F12::MIN; 300];
        let b = [I4F12::MIN; 300];
        assert_eq!(dot_raw(&a, &b), 300 * (1i64 << 30));
    }

    #[test]
    fn scale_round_matches_exact_product() {
        let mut overflows = 0;
        let acc = 3 * (1i64 << 24) + (1 << 11);
        let scale = I4F12::from_f64_rounded(0.5, &mut overflows);
        // (3 + 2^-13) * 0.5 rounds to 1.5.
        assert_eq!(
            I4F12::acc_scale_round(acc, scale, &mut overflows),
            I4F12::from_num(1.5)
        );
        // With scale one, 3 + 2^-13 is a tie and rounds up by one LSB.
        assert_eq!(
            I4F12::acc_scale_round(acc, I4F12::ONE, &mut overflows).to_bits(),
            3 * 4096 + 1
        );
        assert_eq!(overflows, 0);
    }

    #[test]
    fn saturation_is_counted() {
        let mut overflows = 0;
        let big = I4F12::from_num(7);
        assert_eq!(Scalar::saturating_add(big, big, &mut overflows), I4F12::MAX);
        assert_eq!(Scalar::saturating_mul(big, big, &mut overflows), I4F12::MAX);
        assert_eq!(overflows, 2);
    }

    #[test]
    fn tanh_error_over_every_input() {
        for raw in i16::MIN..=i16::MAX {
            let x = I4F12::from_bits(raw);
            let exact = libm::tanh(x.to_f64());
            let error = (I4F12::activate(Activation::Tanh, x).to_f64() - exact).abs();
            // 0.5 LSB of Q4.12 for the final rounding plus 1.17 LSB of Q16.16.
            assert!(
                error <= 0.5 / 4096.0 + 1.17 / 65536.0,
                "tanh({x}) error {error}"
            );
        }
    }
}
