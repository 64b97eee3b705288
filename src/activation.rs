//! Activation functions and their derivatives, in floating point and integer-only Q16.16.
//!
//! Conventions follow JPC: relu has derivative 0 at 0, leaky_relu has slope 0.01 and
//! derivative 1 at 0, hard_tanh has derivative 1 on the closed interval `[-1, 1]`.

use crate::tanh_table::{TANH_Q16, TANH_STEP_SHIFT};

/// Activation applied to each layer's input (never to the network input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Activation {
    /// `x`.
    Linear,
    /// Hyperbolic tangent.
    Tanh,
    /// `x` clamped to `[-1, 1]`.
    HardTanh,
    /// `max(0, x)`.
    Relu,
    /// `x` for `x >= 0`, else `0.01 x`.
    LeakyRelu,
}

impl Activation {
    /// Every activation, in model-file code order.
    pub const ALL: [Activation; 5] = [
        Activation::Linear,
        Activation::Tanh,
        Activation::HardTanh,
        Activation::Relu,
        Activation::LeakyRelu,
    ];

    /// Returns the tag used in the model file.
    pub const fn code(self) -> u8 {
        match self {
            Activation::Linear => 0,
            Activation::Tanh => 1,
            Activation::HardTanh => 2,
            Activation::Relu => 3,
            Activation::LeakyRelu => 4,
        }
    }

    /// Parses a model-file tag.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Activation::Linear),
            1 => Some(Activation::Tanh),
            2 => Some(Activation::HardTanh),
            3 => Some(Activation::Relu),
            4 => Some(Activation::LeakyRelu),
            _ => None,
        }
    }

    /// Returns the snake-case name used on command lines and in JPC (`hard_tanh`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Tanh => "tanh",
            Activation::HardTanh => "hard_tanh",
            Activation::Relu => "relu",
            Activation::LeakyRelu => "leaky_relu",
        }
    }

    /// Parses a snake-case name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|act| act.name() == name)
    }
}

/// Slope of leaky_relu below zero.
pub const LEAKY_SLOPE: f64 = 0.01;

/// leaky_relu's slope in `T`, rounded once: `0.01 as f32` would carry the `f32` rounding
/// error (2.2e-8 relative) into `f64`.
fn leaky_slope<T: From<f32> + core::ops::Div<Output = T>>() -> T {
    T::from(1.0) / T::from(100.0)
}

pub(crate) fn float_activate<T>(act: Activation, x: T, tanh: fn(T) -> T) -> T
where
    T: Copy + PartialOrd + From<f32> + core::ops::Mul<Output = T> + core::ops::Div<Output = T>,
{
    let zero = T::from(0.0);
    let one = T::from(1.0);
    match act {
        Activation::Linear => x,
        Activation::Tanh => tanh(x),
        Activation::HardTanh => {
            if x > one {
                one
            } else if x < T::from(-1.0) {
                T::from(-1.0)
            } else {
                x
            }
        }
        Activation::Relu => {
            if x > zero {
                x
            } else {
                zero
            }
        }
        Activation::LeakyRelu => {
            if x >= zero {
                x
            } else {
                leaky_slope::<T>() * x
            }
        }
    }
}

pub(crate) fn float_derivative<T>(act: Activation, x: T, tanh: fn(T) -> T) -> T
where
    T: Copy
        + PartialOrd
        + From<f32>
        + core::ops::Mul<Output = T>
        + core::ops::Sub<Output = T>
        + core::ops::Div<Output = T>,
{
    let zero = T::from(0.0);
    let one = T::from(1.0);
    match act {
        Activation::Linear => one,
        Activation::Tanh => {
            let t = tanh(x);
            one - t * t
        }
        Activation::HardTanh => {
            if x >= T::from(-1.0) && x <= one {
                one
            } else {
                zero
            }
        }
        Activation::Relu => {
            if x > zero {
                one
            } else {
                zero
            }
        }
        Activation::LeakyRelu => {
            if x >= zero {
                one
            } else {
                leaky_slope::<T>()
            }
        }
    }
}

/// Computes tanh of an `f32` with maximum absolute error 4e-7 against `f64` tanh.
///
/// An odd rational approximation (degree 13 over degree 6) with the input clamped to
/// `+-7.905311`, and tanh(x) = x below 0.0004. Large inputs give `+-(1 - 2^-24)`, one ulp
/// short of `+-1`. It needs no
/// exponential, which makes it cheaper than `libm::tanhf`. The unit test `fast_tanh_f32_error`
/// measures the error on a grid of 2 million points over `[-10, 10]`.
#[inline]
pub(crate) fn fast_tanh_f32(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const TINY: f32 = 0.0004;
    if x.abs() < TINY {
        return x;
    }
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut numerator = -2.760_768_5e-16_f32;
    for coefficient in [
        2.000_188e-13,
        -8.604_672e-11,
        5.122_297e-8,
        1.485_722_4e-5,
        6.372_619e-4,
        4.893_524_6e-3,
    ] {
        numerator = numerator * x2 + coefficient;
    }
    let mut denominator = 1.198_258_4e-6_f32;
    for coefficient in [1.185_347e-4, 2.268_434_6e-3, 4.893_525e-3] {
        denominator = denominator * x2 + coefficient;
    }
    x * numerator / denominator
}

/// One in Q16.16.
const Q16_ONE: i32 = 1 << 16;

/// leaky_relu's slope 0.01 in Q16.16, rounded to nearest (655 / 65536 = 0.0099945).
const Q16_LEAKY_SLOPE: i32 = 655;

/// Computes tanh of a Q16.16 value with maximum error 1.17 LSB (1.8e-5) against `f64` tanh.
///
/// Linear interpolation in [`TANH_Q16`]. The unit test `tanh_error_over_every_input` measures
/// the error at every input in `[-9, 9]` and on a grid over the rest of the range, where the
/// output is exactly +-1 and `1 - tanh(8)` is 2.3e-7.
pub(crate) fn q16_tanh(x: i32) -> i32 {
    let magnitude = x.unsigned_abs();
    let last = (TANH_Q16.len() - 1) as u32;
    let index = magnitude >> TANH_STEP_SHIFT;
    let t = if index >= last {
        Q16_ONE
    } else {
        let fraction = magnitude & ((1 << TANH_STEP_SHIFT) - 1);
        let low = TANH_Q16[index as usize];
        let high = TANH_Q16[index as usize + 1];
        let half = 1 << (TANH_STEP_SHIFT - 1);
        (low + (((high - low) * fraction + half) >> TANH_STEP_SHIFT)) as i32
    };
    if x < 0 {
        -t
    } else {
        t
    }
}

/// Multiplies two Q16.16 values, rounding to nearest with ties toward positive infinity.
fn q16_mul(a: i32, b: i32) -> i32 {
    let product = a as i64 * b as i64;
    ((product + (1 << 15)) >> 16) as i32
}

/// Applies the activation to a Q16.16 value with maximum error 1.17 LSB for tanh, 0.5 LSB
/// plus 5.5e-6 |x| for leaky_relu (its slope is 655/2^16) and 0 for the others.
///
/// The unit tests `tanh_error_over_every_input` and
/// `piecewise_linear_error_over_every_input` measure the errors.
pub(crate) fn q16_activate(act: Activation, x: i32) -> i32 {
    match act {
        Activation::Linear => x,
        Activation::Tanh => q16_tanh(x),
        Activation::HardTanh => x.clamp(-Q16_ONE, Q16_ONE),
        Activation::Relu => x.max(0),
        Activation::LeakyRelu => {
            if x >= 0 {
                x
            } else {
                q16_mul(x, Q16_LEAKY_SLOPE)
            }
        }
    }
}

/// Computes the activation's derivative at a Q16.16 value with maximum error 2.41 LSB (3.7e-5)
/// for tanh, 5.5e-6 for leaky_relu and 0 for the others.
///
/// tanh's derivative is `1 - t^2` from the table's `t`; the unit tests
/// `tanh_derivative_error` and `piecewise_linear_error_over_every_input` measure the errors.
pub(crate) fn q16_derivative(act: Activation, x: i32) -> i32 {
    match act {
        Activation::Linear => Q16_ONE,
        Activation::Tanh => {
            let t = q16_tanh(x);
            Q16_ONE - q16_mul(t, t)
        }
        Activation::HardTanh => {
            if (-Q16_ONE..=Q16_ONE).contains(&x) {
                Q16_ONE
            } else {
                0
            }
        }
        Activation::Relu => {
            if x > 0 {
                Q16_ONE
            } else {
                0
            }
        }
        Activation::LeakyRelu => {
            if x >= 0 {
                Q16_ONE
            } else {
                Q16_LEAKY_SLOPE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSB: f64 = 1.0 / 65536.0;

    fn q16_to_f64(raw: i32) -> f64 {
        raw as f64 * LSB
    }

    /// Visits every Q16.16 input in the interesting range `[-9, 9]` and a sparse grid outside.
    fn for_each_input(mut visit: impl FnMut(i32)) {
        let limit = 9 * Q16_ONE;
        for raw in -limit..=limit {
            visit(raw);
        }
        let mut raw = i32::MIN as i64;
        while raw <= i32::MAX as i64 {
            visit(raw as i32);
            raw += 4099 * 257;
        }
        visit(i32::MAX);
    }

    #[test]
    fn tanh_table_matches_f64() {
        for (k, &entry) in TANH_Q16.iter().enumerate() {
            let exact = libm::tanh(k as f64 / 128.0) * 65536.0;
            assert!(
                (entry as f64 - exact).abs() <= 0.5 + 1e-9,
                "knot {k}: table {entry}, exact {exact}"
            );
        }
    }

    #[test]
    fn tanh_error_over_every_input() {
        let mut max_error: f64 = 0.0;
        for_each_input(|raw| {
            let exact = libm::tanh(q16_to_f64(raw));
            max_error = max_error.max((q16_to_f64(q16_tanh(raw)) - exact).abs());
        });
        assert!(
            max_error <= 1.17 * LSB,
            "max tanh error {} LSB",
            max_error / LSB
        );
    }

    #[test]
    fn tanh_derivative_error() {
        let mut max_error: f64 = 0.0;
        for_each_input(|raw| {
            let t = libm::tanh(q16_to_f64(raw));
            let exact = 1.0 - t * t;
            let approx = q16_to_f64(q16_derivative(Activation::Tanh, raw));
            max_error = max_error.max((approx - exact).abs());
        });
        assert!(
            max_error <= 2.41 * LSB,
            "max tanh' error {} LSB",
            max_error / LSB
        );
    }

    #[test]
    fn piecewise_linear_error_over_every_input() {
        for act in [
            Activation::Linear,
            Activation::HardTanh,
            Activation::Relu,
            Activation::LeakyRelu,
        ] {
            let mut max_error: f64 = 0.0;
            let mut max_derivative_error: f64 = 0.0;
            for_each_input(|raw| {
                let x = q16_to_f64(raw);
                let exact = float_activate(act, x, libm::tanh);
                let exact_derivative = float_derivative(act, x, libm::tanh);
                max_error = max_error.max((q16_to_f64(q16_activate(act, raw)) - exact).abs());
                let derivative = q16_to_f64(q16_derivative(act, raw));
                max_derivative_error =
                    max_derivative_error.max((derivative - exact_derivative).abs());
            });
            // leaky_relu's rounded slope costs 5.5e-6 per unit of |x|; the rest are exact.
            let bound = if act == Activation::LeakyRelu {
                0.5 * LSB + 5.5e-6 * 32768.0
            } else {
                0.0
            };
            assert!(max_error <= bound, "{}: max error {max_error}", act.name());
            let derivative_bound = if act == Activation::LeakyRelu {
                5.5e-6
            } else {
                0.0
            };
            assert!(
                max_derivative_error <= derivative_bound,
                "{}: derivative error",
                act.name()
            );
        }
    }

    #[test]
    fn fast_tanh_f32_error() {
        let mut max_error: f64 = 0.0;
        for step in -1_000_000..=1_000_000 {
            let x = step as f32 * 1e-5;
            let error = (fast_tanh_f32(x) as f64 - libm::tanh(x as f64)).abs();
            max_error = max_error.max(error);
        }
        // Large inputs stay within one ulp below 1 in magnitude, and no output exceeds 1.
        for x in [f32::MAX, f32::MIN, 1e30, -1e30, 8.0, -8.0] {
            let magnitude = fast_tanh_f32(x).abs();
            assert!(1.0 - magnitude <= f32::EPSILON, "tanh({x}) = {magnitude}");
            assert!(magnitude <= 1.0, "tanh({x}) = {magnitude}");
        }
        assert!(max_error <= 4e-7, "max f32 tanh error {max_error}");
    }

    #[test]
    fn names_round_trip() {
        for act in Activation::ALL {
            assert_eq!(Activation::from_name(act.name()), Some(act));
            assert_eq!(Activation::from_code(act.code()), Some(act));
        }
    }
}
