//! The numeric trait the core is generic over, with its `f32`, `f64`, `I16F16` and `I4F12`
//! instances.
//!
//! Every kernel accumulates exact products in the wide accumulator [`Scalar::Acc`] and rounds
//! once per output. Fixed-point rounding is to nearest with ties toward positive infinity
//! (add half an LSB, then shift right arithmetically), on every target, so the host and a
//! board agree to the bit. Fixed-point overflow saturates and increments the caller's counter;
//! for floats the counter counts non-finite results instead.

use core::fmt::Debug;

use fixed::types::I16F16;

use crate::activation::{self, Activation};
use crate::kernels;

/// Numeric format tag stored in model files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NumericFormat {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// Signed Q16.16 fixed point (`fixed::types::I16F16`).
    I16F16,
    /// Signed Q4.12 fixed point in 16 bits (`fixed::types::I4F12`).
    I4F12,
}

impl NumericFormat {
    /// Returns the tag used in the model file.
    pub const fn code(self) -> u8 {
        match self {
            NumericFormat::F32 => 1,
            NumericFormat::F64 => 2,
            NumericFormat::I16F16 => 3,
            NumericFormat::I4F12 => 4,
        }
    }

    /// Parses a model-file tag.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(NumericFormat::F32),
            2 => Some(NumericFormat::F64),
            3 => Some(NumericFormat::I16F16),
            4 => Some(NumericFormat::I4F12),
            _ => None,
        }
    }

    /// Returns whether values are fixed-point integers (`I16F16`, `I4F12`).
    pub const fn is_fixed_point(self) -> bool {
        matches!(self, NumericFormat::I16F16 | NumericFormat::I4F12)
    }

    /// Returns the size of one stored value in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            NumericFormat::F32 | NumericFormat::I16F16 => 4,
            NumericFormat::F64 => 8,
            NumericFormat::I4F12 => 2,
        }
    }

    /// Returns the lower-case name used on command lines (`f32`, `f64`, `i16f16`, `i4f12`).
    pub const fn name(self) -> &'static str {
        match self {
            NumericFormat::F32 => "f32",
            NumericFormat::F64 => "f64",
            NumericFormat::I16F16 => "i16f16",
            NumericFormat::I4F12 => "i4f12",
        }
    }
}

/// Numbers the predictive coding core computes with.
///
/// Arithmetic that can overflow takes `overflows: &mut u32` and increments it once per
/// saturated (fixed point) or non-finite (float) result, so a caller can see that a format is
/// too narrow instead of getting silent garbage.
pub trait Scalar: Copy + Default + PartialEq + PartialOrd + Debug + 'static {
    /// Wide accumulator: exact sums of products for fixed point.
    type Acc: Copy + Debug;

    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Tag written into model files.
    const FORMAT: NumericFormat;

    /// Converts from `f64`, rounding to nearest and saturating (host-side conversion only).
    fn from_f64_rounded(value: f64, overflows: &mut u32) -> Self;
    /// Converts to `f64` exactly (every value of the supported formats is an `f64`).
    fn to_f64(self) -> f64;
    /// Reads a value from its little-endian bytes; `bytes` has `FORMAT.bytes()` bytes.
    fn from_le_slice(bytes: &[u8]) -> Self;
    /// Writes the value as little-endian bytes into `out`, which has `FORMAT.bytes()` bytes.
    fn write_le(self, out: &mut [u8]);

    /// Returns an accumulator holding zero.
    fn acc_zero() -> Self::Acc;
    /// Returns `acc + a * b`, with the product exact in fixed point.
    fn acc_mul_add(acc: Self::Acc, a: Self, b: Self) -> Self::Acc;
    /// Returns `acc + x`.
    fn acc_add(acc: Self::Acc, x: Self) -> Self::Acc;
    /// Returns `acc - x`.
    fn acc_sub(acc: Self::Acc, x: Self) -> Self::Acc;
    /// Rounds the accumulator to `Self` (the one rounding of a kernel output).
    fn acc_round(acc: Self::Acc, overflows: &mut u32) -> Self;
    /// Returns `acc * scale` rounded once to `Self`.
    fn acc_scale_round(acc: Self::Acc, scale: Self, overflows: &mut u32) -> Self;

    /// Returns `self + other`, saturating.
    fn saturating_add(self, other: Self, overflows: &mut u32) -> Self;
    /// Returns `self - other`, saturating.
    fn saturating_sub(self, other: Self, overflows: &mut u32) -> Self;
    /// Returns `self * other` rounded once, saturating.
    fn saturating_mul(self, other: Self, overflows: &mut u32) -> Self;
    /// Returns `self * other` rounded stochastically, saturating.
    ///
    /// Fixed point adds the low 16 bits of `random` to the dropped bits, then rounds down. So
    /// a product `k / 2^16` of an LSB above a representable value rounds up with probability
    /// `k / 2^16`, and an update smaller than one LSB survives on average. The
    /// default, used by the float formats, ignores `random` and rounds as
    /// [`Scalar::saturating_mul`].
    fn saturating_mul_stochastic(self, other: Self, random: u32, overflows: &mut u32) -> Self {
        let _ = random;
        self.saturating_mul(other, overflows)
    }
    /// Returns `-self`, saturating.
    fn saturating_neg(self) -> Self;
    /// Returns `self / n` rounded once; `n` is at least 1.
    fn div_int(self, n: u32) -> Self;

    /// Applies the activation function.
    fn activate(act: Activation, x: Self) -> Self;
    /// Returns the derivative of the activation function at `x`.
    fn activate_derivative(act: Activation, x: Self) -> Self;

    /// Returns the accumulated dot product `sum_k a[k] b[k]` of two equally long slices.
    ///
    /// Fixed point sums exact products in order; floats may reorder the sum for speed.
    fn dot(a: &[Self], b: &[Self]) -> Self::Acc {
        a.iter().zip(b).fold(Self::acc_zero(), |sum, (&x, &y)| {
            Self::acc_mul_add(sum, x, y)
        })
    }

    /// Writes `out[i] = scale * sum_k matrix[i][k] vector[k]`, rounded once per output, for a
    /// row-major `matrix` with `out.len()` rows and `vector.len()` columns.
    fn matrix_product(
        matrix: &[Self],
        vector: &[Self],
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        for (row, value) in matrix.chunks_exact(vector.len()).zip(out.iter_mut()) {
            *value = Self::acc_scale_round(Self::dot(row, vector), scale, overflows);
        }
    }

    /// Writes `out[j] = scale * sum_i matrix[i][j] vector[i]`, rounded once per output, for a
    /// row-major `matrix` with `vector.len()` rows and `out.len()` columns.
    fn transposed_product(
        matrix: &[Self],
        vector: &[Self],
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        let columns = out.len();
        for (j, value) in out.iter_mut().enumerate() {
            let mut sum = Self::acc_zero();
            for (i, &element) in vector.iter().enumerate() {
                sum = Self::acc_mul_add(sum, matrix[i * columns + j], element);
            }
            *value = Self::acc_scale_round(sum, scale, overflows);
        }
    }

    /// Writes `out[j] = scale * sum_b column[b * stride] rows[b * out.len() + j]` for
    /// `b < batch`, rounded once per output: one row of a scaled sum of `batch` outer products,
    /// such as the weight gradients of a batch.
    ///
    /// Fixed point sums exact products in sample order, as [`outer_product_row_generic`] does.
    fn outer_product_row(
        column: &[Self],
        stride: usize,
        rows: &[Self],
        batch: usize,
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        outer_product_row_generic(column, stride, rows, batch, scale, out, overflows);
    }

    /// Adam state per weight (first and second moments), kept wide enough in fixed point that
    /// squared gradients below one LSB of `Self` do not vanish.
    type Moment: Copy + Default + Debug;
    /// Applies one Adam update to `weight` with gradient `grad`; `coefs` holds this step's
    /// bias-corrected rates.
    fn adam_update(
        weight: &mut Self,
        first: &mut Self::Moment,
        second: &mut Self::Moment,
        grad: Self,
        coefs: &AdamCoefficients,
        overflows: &mut u32,
    );
}

/// Computes [`Scalar::outer_product_row`] in the format's accumulator [`Scalar::Acc`].
pub fn outer_product_row_generic<S: Scalar>(
    column: &[S],
    stride: usize,
    rows: &[S],
    batch: usize,
    scale: S,
    out: &mut [S],
    overflows: &mut u32,
) {
    if batch == 1 {
        let factor = column[0];
        for (value, &x) in out.iter_mut().zip(rows) {
            let sum = S::acc_mul_add(S::acc_zero(), factor, x);
            *value = S::acc_scale_round(sum, scale, overflows);
        }
        return;
    }
    let width = out.len();
    for (j, value) in out.iter_mut().enumerate() {
        let mut sum = S::acc_zero();
        for sample in 0..batch {
            sum = S::acc_mul_add(sum, column[sample * stride], rows[sample * width + j]);
        }
        *value = S::acc_scale_round(sum, scale, overflows);
    }
}

/// Adam's rates for one step, with the bias corrections folded in.
///
/// The update is `w -= step * m / (sqrt(v) + epsilon)` with
/// `step = lr * sqrt(1 - beta2^t) / (1 - beta1^t)`. Every factor is a Q2.30 integer
/// (`value * 2^30`), computed by integer arithmetic, so fixed-point instances use no float.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdamCoefficients {
    /// `beta1` in Q2.30.
    pub beta1: i64,
    /// `beta2` in Q2.30.
    pub beta2: i64,
    /// Bias-corrected learning rate in Q2.30.
    pub step: i64,
    /// `epsilon` in Q2.30 (at least one unit).
    pub epsilon: i64,
}

/// Fraction bits of the [`AdamCoefficients`] integers.
pub const COEF_FRAC_BITS: u32 = 30;

fn coef_to_f64(coef: i64) -> f64 {
    coef as f64 / (1u64 << COEF_FRAC_BITS) as f64
}

macro_rules! float_scalar {
    ($t:ty, $format:expr, $bytes:expr, $tanh:path, $sqrt:path) => {
        impl Scalar for $t {
            type Acc = $t;
            type Moment = $t;

            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const FORMAT: NumericFormat = $format;

            fn from_f64_rounded(value: f64, overflows: &mut u32) -> Self {
                let converted = value as $t;
                if !converted.is_finite() {
                    *overflows += 1;
                }
                converted
            }

            fn to_f64(self) -> f64 {
                self as f64
            }

            fn from_le_slice(bytes: &[u8]) -> Self {
                let mut raw = [0u8; $bytes];
                raw.copy_from_slice(&bytes[..$bytes]);
                <$t>::from_le_bytes(raw)
            }

            fn write_le(self, out: &mut [u8]) {
                out[..$bytes].copy_from_slice(&self.to_le_bytes());
            }

            fn acc_zero() -> Self {
                0.0
            }

            fn acc_mul_add(acc: Self, a: Self, b: Self) -> Self {
                acc + a * b
            }

            fn acc_add(acc: Self, x: Self) -> Self {
                acc + x
            }

            fn acc_sub(acc: Self, x: Self) -> Self {
                acc - x
            }

            fn acc_round(acc: Self, overflows: &mut u32) -> Self {
                count_non_finite(acc, overflows)
            }

            fn acc_scale_round(acc: Self, scale: Self, overflows: &mut u32) -> Self {
                count_non_finite(acc * scale, overflows)
            }

            fn saturating_add(self, other: Self, overflows: &mut u32) -> Self {
                count_non_finite(self + other, overflows)
            }

            fn saturating_sub(self, other: Self, overflows: &mut u32) -> Self {
                count_non_finite(self - other, overflows)
            }

            fn saturating_mul(self, other: Self, overflows: &mut u32) -> Self {
                count_non_finite(self * other, overflows)
            }

            fn saturating_neg(self) -> Self {
                -self
            }

            fn div_int(self, n: u32) -> Self {
                self / n as $t
            }

            // Inlined so that a caller's loop over many values can vectorise the activation.
            #[inline]
            fn activate(act: Activation, x: Self) -> Self {
                activation::float_activate(act, x, $tanh)
            }

            #[inline]
            fn activate_derivative(act: Activation, x: Self) -> Self {
                activation::float_derivative(act, x, $tanh)
            }

            fn dot(a: &[Self], b: &[Self]) -> Self {
                // Independent partial sums let the compiler vectorise the loop.
                const LANES: usize = 8;
                let mut partial = [0.0; LANES];
                let a_chunks = a.chunks_exact(LANES);
                let b_chunks = b.chunks_exact(LANES);
                let tail: Self = a_chunks
                    .remainder()
                    .iter()
                    .zip(b_chunks.remainder())
                    .map(|(x, y)| x * y)
                    .sum();
                for (x, y) in a_chunks.zip(b_chunks) {
                    for lane in 0..LANES {
                        partial[lane] += x[lane] * y[lane];
                    }
                }
                partial.iter().sum::<Self>() + tail
            }

            fn transposed_product(
                matrix: &[Self],
                vector: &[Self],
                scale: Self,
                out: &mut [Self],
                overflows: &mut u32,
            ) {
                // Row by row, so the inner loop runs over contiguous weights.
                out.fill(0.0);
                for (row, &element) in matrix.chunks_exact(out.len()).zip(vector) {
                    for (value, &weight) in out.iter_mut().zip(row) {
                        *value += weight * element;
                    }
                }
                for value in out.iter_mut() {
                    *value = count_non_finite(*value * scale, overflows);
                }
            }

            fn adam_update(
                weight: &mut Self,
                first: &mut Self,
                second: &mut Self,
                grad: Self,
                coefs: &AdamCoefficients,
                overflows: &mut u32,
            ) {
                let beta1 = coef_to_f64(coefs.beta1) as $t;
                let beta2 = coef_to_f64(coefs.beta2) as $t;
                *first = beta1 * *first + (1.0 - beta1) * grad;
                *second = beta2 * *second + (1.0 - beta2) * grad * grad;
                let step = coef_to_f64(coefs.step) as $t;
                let epsilon = coef_to_f64(coefs.epsilon) as $t;
                let update = step * *first / ($sqrt(*second) + epsilon);
                *weight = count_non_finite(*weight - update, overflows);
            }
        }
    };
}

fn count_non_finite<T: Into<f64> + Copy>(x: T, overflows: &mut u32) -> T {
    if !x.into().is_finite() {
        *overflows += 1;
    }
    x
}

// tanh dominates the host's f32 training time with `libm::tanhf`, so f32 uses the rational
// approximation (maximum error 4e-7); f64 keeps `libm::tanh` for the golden comparisons.
float_scalar!(
    f32,
    NumericFormat::F32,
    4,
    activation::fast_tanh_f32,
    libm::sqrtf
);
float_scalar!(f64, NumericFormat::F64, 8, libm::tanh, libm::sqrt);

/// Fraction bits of `I16F16`.
const FRAC: u32 = 16;
/// Extra fraction bits of the fixed-point Adam second moment (48 in all).
const SECOND_MOMENT_SHIFT: u32 = 16;

/// Rounds `wide` to nearest (ties toward positive infinity) after dropping `shift` bits, then
/// saturates to an `I16F16` raw value.
fn round_shift_i128(wide: i128, shift: u32, overflows: &mut u32) -> i32 {
    saturate_i128((wide + (1i128 << (shift - 1))) >> shift, overflows)
}

fn round_shift_i64(wide: i64, shift: u32, overflows: &mut u32) -> i32 {
    match wide.checked_add(1 << (shift - 1)) {
        Some(biased) => saturate_i64(biased >> shift, overflows),
        // Only sums within 2^(shift-1) of i64::MAX get here, far above the i32 range.
        None => saturate_i128(i32::MAX as i128 + 1, overflows),
    }
}

fn saturate_i64(wide: i64, overflows: &mut u32) -> i32 {
    // One test for the common in-range case, which compiles to a sign-extension compare.
    match i32::try_from(wide) {
        Ok(value) => value,
        Err(_) => {
            *overflows += 1;
            if wide > 0 {
                i32::MAX
            } else {
                i32::MIN
            }
        }
    }
}

impl Scalar for I16F16 {
    /// Exact sum of raw products with 32 fraction bits. An `i64` overflows after a few
    /// full-range products and can only clamp the running sum, losing products that cancel
    /// later; an `i128` holds any sum of fewer than 2^64 products exactly.
    type Acc = i128;
    /// Adam moments in an `i64`: 32 fraction bits for the first, 48 for the second.
    type Moment = i64;

    const ZERO: Self = I16F16::ZERO;
    const ONE: Self = I16F16::ONE;
    const FORMAT: NumericFormat = NumericFormat::I16F16;

    fn from_f64_rounded(value: f64, overflows: &mut u32) -> Self {
        if value.is_nan() {
            *overflows += 1;
            return I16F16::ZERO;
        }
        let scaled = value * (1u64 << FRAC) as f64;
        // Round half toward positive infinity, as every fixed-point kernel does.
        let rounded = libm::floor(scaled + 0.5);
        if rounded > i32::MAX as f64 {
            *overflows += 1;
            I16F16::MAX
        } else if rounded < i32::MIN as f64 {
            *overflows += 1;
            I16F16::MIN
        } else {
            I16F16::from_bits(rounded as i32)
        }
    }

    fn to_f64(self) -> f64 {
        self.to_bits() as f64 / (1u64 << FRAC) as f64
    }

    fn from_le_slice(bytes: &[u8]) -> Self {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&bytes[..4]);
        I16F16::from_bits(i32::from_le_bytes(raw))
    }

    fn write_le(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_bits().to_le_bytes());
    }

    fn acc_zero() -> i128 {
        0
    }

    fn acc_mul_add(acc: i128, a: Self, b: Self) -> i128 {
        acc + (a.to_bits() as i64 * b.to_bits() as i64) as i128
    }

    fn acc_add(acc: i128, x: Self) -> i128 {
        acc + ((x.to_bits() as i128) << FRAC)
    }

    fn acc_sub(acc: i128, x: Self) -> i128 {
        acc - ((x.to_bits() as i128) << FRAC)
    }

    fn acc_round(acc: i128, overflows: &mut u32) -> Self {
        I16F16::from_bits(round_shift_i128(acc, FRAC, overflows))
    }

    fn acc_scale_round(acc: i128, scale: Self, overflows: &mut u32) -> Self {
        if let Ok(sum) = i64::try_from(acc) {
            return I16F16::from_bits(scale_round_split(sum, scale.to_bits(), overflows));
        }
        match acc.checked_mul(scale.to_bits() as i128) {
            Some(wide) => I16F16::from_bits(round_shift_i128(wide, 2 * FRAC, overflows)),
            None => {
                // Only sums of more than 2^32 full-range products get here.
                *overflows += 1;
                let negative = (acc < 0) != (scale.to_bits() < 0);
                if negative {
                    I16F16::MIN
                } else {
                    I16F16::MAX
                }
            }
        }
    }

    fn matrix_product(
        matrix: &[Self],
        vector: &[Self],
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        if !sums_fit_i64(vector) {
            for (row, value) in matrix.chunks_exact(vector.len()).zip(out.iter_mut()) {
                *value = Self::acc_scale_round(Self::dot(row, vector), scale, overflows);
            }
            return;
        }
        let rows = out.len();
        let matrix = &matrix[..(rows * vector.len()).min(matrix.len())];
        #[cfg(fixedpc_dsp)]
        if scale == I16F16::ONE
            && kernels::matrix_product_q16(
                bytemuck::cast_slice(matrix),
                bytemuck::cast_slice(vector),
                bytemuck::cast_slice_mut(out),
            )
        {
            return;
        }
        kernels::rows_dot_i32_wrapping(
            bytemuck::cast_slice(matrix),
            bytemuck::cast_slice(vector),
            |i, sum| out[i] = scale_round_i64(sum, scale, overflows),
        );
    }

    fn transposed_product(
        matrix: &[Self],
        vector: &[Self],
        scale: Self,
        out: &mut [Self],
        overflows: &mut u32,
    ) {
        let columns = out.len();
        // The assembly routine proves a bound on the vector itself, faster than
        // `sums_fit_i64`. When it cannot, or an output saturates, the paths below decide.
        #[cfg(fixedpc_dsp)]
        if scale == I16F16::ONE
            && kernels::transposed_product_q16(
                bytemuck::cast_slice(matrix),
                bytemuck::cast_slice(vector),
                bytemuck::cast_slice_mut(out),
            )
        {
            return;
        }
        if sums_fit_i64(vector) {
            kernels::columns_dot_i32_wrapping(
                bytemuck::cast_slice(matrix),
                bytemuck::cast_slice(vector),
                columns,
                |j, sum| out[j] = scale_round_i64(sum, scale, overflows),
            );
            return;
        }
        for (j, value) in out.iter_mut().enumerate() {
            let mut sum = 0i128;
            for (row, &element) in matrix.chunks_exact(columns).zip(vector) {
                sum = Self::acc_mul_add(sum, row[j], element);
            }
            *value = Self::acc_scale_round(sum, scale, overflows);
        }
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
        // The bound of `partial_sums_fit_i64`, on the `batch` values of `column`.
        let magnitude = (0..batch).fold(0u64, |sum, sample| {
            sum.saturating_add(column[sample * stride].to_bits().unsigned_abs() as u64)
        });
        if magnitude >= 1 << 32 {
            outer_product_row_generic(column, stride, rows, batch, scale, out, overflows);
            return;
        }
        let scale = scale.to_bits();
        if batch == 1 {
            let factor = column[0].to_bits() as i64;
            for (value, &x) in out.iter_mut().zip(rows) {
                let sum = factor * x.to_bits() as i64;
                *value = I16F16::from_bits(scale_round_split(sum, scale, overflows));
            }
            return;
        }
        let width = out.len();
        for (j, value) in out.iter_mut().enumerate() {
            let mut sum = 0i64;
            for sample in 0..batch {
                let factor = column[sample * stride].to_bits() as i64;
                sum += factor * rows[sample * width + j].to_bits() as i64;
            }
            *value = I16F16::from_bits(scale_round_split(sum, scale, overflows));
        }
    }

    fn saturating_add(self, other: Self, overflows: &mut u32) -> Self {
        let sum = self.to_bits() as i64 + other.to_bits() as i64;
        I16F16::from_bits(saturate_i128(sum as i128, overflows))
    }

    fn saturating_sub(self, other: Self, overflows: &mut u32) -> Self {
        let difference = self.to_bits() as i64 - other.to_bits() as i64;
        I16F16::from_bits(saturate_i128(difference as i128, overflows))
    }

    fn saturating_mul(self, other: Self, overflows: &mut u32) -> Self {
        let product = self.to_bits() as i64 * other.to_bits() as i64;
        I16F16::from_bits(round_shift_i64(product, FRAC, overflows))
    }

    fn saturating_mul_stochastic(self, other: Self, random: u32, overflows: &mut u32) -> Self {
        let product = self.to_bits() as i64 * other.to_bits() as i64;
        // Only the 16 dropped bits take part, so the offset is below one LSB of the result.
        let offset = (random & ((1 << FRAC) - 1)) as i64;
        let rounded = (product + offset) >> FRAC;
        I16F16::from_bits(saturate_i128(rounded as i128, overflows))
    }

    fn saturating_neg(self) -> Self {
        self.saturating_neg()
    }

    fn div_int(self, n: u32) -> Self {
        let n = n.max(1) as i64;
        let raw = self.to_bits() as i64;
        // Round to nearest with ties toward positive infinity, like every other rounding.
        let quotient = (2 * raw + n).div_euclid(2 * n);
        I16F16::from_bits(quotient as i32)
    }

    fn activate(act: Activation, x: Self) -> Self {
        I16F16::from_bits(activation::q16_activate(act, x.to_bits()))
    }

    fn activate_derivative(act: Activation, x: Self) -> Self {
        I16F16::from_bits(activation::q16_derivative(act, x.to_bits()))
    }

    fn adam_update(
        weight: &mut Self,
        first: &mut i64,
        second: &mut i64,
        grad: Self,
        coefs: &AdamCoefficients,
        overflows: &mut u32,
    ) {
        // The first moment carries 32 fraction bits and the second 48, so that the square of a
        // one-LSB gradient times (1 - beta2) does not round to zero; coefficients carry 30.
        let one = 1i128 << COEF_FRAC_BITS;
        let g = (grad.to_bits() as i128) << FRAC;
        let m = (*first as i128 * coefs.beta1 as i128 + g * (one - coefs.beta1 as i128))
            >> COEF_FRAC_BITS;
        let g_squared = (grad.to_bits() as i128 * grad.to_bits() as i128) << SECOND_MOMENT_SHIFT;
        let v = (*second as i128 * coefs.beta2 as i128 + g_squared * (one - coefs.beta2 as i128))
            >> COEF_FRAC_BITS;
        // The second moment stores values up to 2^15, so gradients above about 181 saturate it.
        // Count that like any other saturation.
        if m < i64::MIN as i128 || m > i64::MAX as i128 || v > i64::MAX as i128 {
            *overflows += 1;
        }
        *first = m.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        *second = v.clamp(0, i64::MAX as i128) as i64;

        // sqrt(v) with 32 fraction bits: isqrt(v_raw * 2^16) for 48-bit v.
        let root = ((*second as u128) << (2 * FRAC - SECOND_MOMENT_SHIFT)).isqrt() as i128;
        let denominator = root + ((coefs.epsilon as i128) << 2);
        // update = step * m / denominator, with 16 fraction bits for the weight.
        let numerator = (coefs.step as i128 * *first as i128) >> (COEF_FRAC_BITS - FRAC);
        let update = if denominator > 0 {
            numerator / denominator
        } else {
            0
        };
        let updated = weight.to_bits() as i128 - update;
        *weight = I16F16::from_bits(saturate_i128(updated, overflows));
    }
}

/// [`partial_sums_fit_i64`], with a faster test on `thumbv7em` that may return `false` for a
/// vector that fits, in which case the exact test decides.
#[inline(always)]
fn sums_fit_i64(vector: &[I16F16]) -> bool {
    #[cfg(fixedpc_dsp)]
    if kernels::vector_bounded_q16(bytemuck::cast_slice(vector)) {
        return true;
    }
    partial_sums_fit_i64(vector)
}

/// Returns whether every partial sum of `sum_k w_k x_k` over raw Q16.16 values fits an `i64`,
/// for any `i32` weights `w_k` and this `vector` of `x_k`.
///
/// Each raw product is at most `2^31 |x_k|` in magnitude, so every partial sum stays below
/// `2^31 sum_k |x_k|`, which is below `2^63` when `sum_k |x_k| < 2^32`. An `i64` sum is then
/// exact and equals the `i128` sum bit for bit. The bound admits, for example, 65,535 values
/// of magnitude 1, so the slower `i128` sum is the exception.
fn partial_sums_fit_i64(vector: &[I16F16]) -> bool {
    // `x ^ (x >> 31)` is `|x|` for `x >= 0` and `|x| - 1` below, one instruction on Arm, so
    // the test uses the upper bound `sum_k (x_k ^ (x_k >> 31)) + len >= sum_k |x_k|`. Each term
    // is below 2^31, so for fewer than 2^32 values the `u64` sum cannot overflow, and the sum
    // of two terms fits a `u32`, which saves a 64-bit addition per pair.
    let len = vector.len() as u64;
    if len >= 1 << 32 {
        return false;
    }
    let term = |x: &I16F16| {
        let raw = x.to_bits();
        (raw ^ (raw >> 31)) as u32
    };
    let pairs = vector.chunks_exact(2);
    let rest: u64 = pairs.remainder().iter().map(|x| term(x) as u64).sum();
    let magnitude: u64 = pairs
        .map(|pair| (term(&pair[0]) + term(&pair[1])) as u64)
        .sum();
    magnitude + rest + len < 1 << 32
}

/// Rounds an exact `i64` sum of raw products times `scale` to `I16F16`, with the same result as
/// [`Scalar::acc_scale_round`] on the `i128` sum.
fn scale_round_i64(sum: i64, scale: I16F16, overflows: &mut u32) -> I16F16 {
    if scale == I16F16::ONE {
        // (sum 2^16 + 2^31) >> 32 equals (sum + 2^15) >> 16, so the product can be skipped.
        I16F16::from_bits(round_shift_i64(sum, FRAC, overflows))
    } else {
        <I16F16 as Scalar>::acc_scale_round(sum as i128, scale, overflows)
    }
}

/// Returns `saturate((sum scale + 2^31) >> 32)`, the [`Scalar::acc_scale_round`] of an `i64`
/// sum of raw products, without `i128` arithmetic.
///
/// With `sum = high 2^32 + low` and `low` unsigned, the result is
/// `high scale + ((low scale + 2^31) >> 32)`: the arithmetic shift rounds down, and
/// `high scale 2^32` is a whole multiple of `2^32`. Both products are below `2^63` in
/// magnitude, and so are the biased low product and the final sum.
fn scale_round_split(sum: i64, scale: i32, overflows: &mut u32) -> i32 {
    let high = (sum >> 32) * scale as i64;
    let low = ((sum as u32 as i64) * scale as i64 + (1 << 31)) >> 32;
    saturate_i64(high + low, overflows)
}

/// Saturates to the `i32` range, counting an overflow when it clamps.
fn saturate_i128(wide: i128, overflows: &mut u32) -> i32 {
    if wide > i32::MAX as i128 {
        *overflows += 1;
        i32::MAX
    } else if wide < i32::MIN as i128 {
        *overflows += 1;
        i32::MIN
    } else {
        wide as i32
    }
}
