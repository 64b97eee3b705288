//! Batched `f32` supervised inference and weight gradients, with matrix-matrix products.
//!
//! The core computes one sample at a time with matrix-vector products, as a board does. Here
//! each layer of a batch of `B` samples is a row-major `B x n_l` matrix, one row per sample,
//! so the predictions `a_l phi(Z_(l-1)) W_l^T`, the feedback `a_(l+1) E_(l+1) W_(l+1)` and the
//! weight gradients `E_l^T phi(Z_(l-1))` are each one `matrixmultiply::sgemm` call.
//!
//! Everything else follows the core's `f32` path sample by sample. That covers the
//! feedforward start with the target clamped, the per-sample step size and early stop, and the
//! activation of `<f32 as Scalar>`. It also covers the skipping of a free layer whose own and
//! next errors are all zero, and the count of non-finite results per layer. The results
//! differ from the core's only in the order of the additions inside the products and the
//! energy sums, and in the products' fused multiply-adds. A sample's rows never mix with
//! another sample's, so splitting the batch across threads gives the same bits.

use std::cell::Cell;
use std::ops::Range;

use anyhow::{anyhow, ensure, Result};
use fixedpc::{Activation, Arch, InferenceConfig, InferenceStats, Network, Scalar};

/// Strided view of a matrix of `f32`.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    columns: usize,
    row_stride: usize,
    column_stride: usize,
}

impl<'a> Matrix<'a> {
    fn row_major(data: &'a [f32], rows: usize, columns: usize) -> Self {
        Matrix {
            data,
            rows,
            columns,
            row_stride: columns,
            column_stride: 1,
        }
    }

    fn transposed(self) -> Self {
        Matrix {
            rows: self.columns,
            columns: self.rows,
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }

    /// Panics unless every element of the view lies inside `data`.
    fn check_bounds(&self) {
        if self.rows > 0 && self.columns > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.columns - 1) * self.column_stride;
            assert!(
                last < self.data.len(),
                "a {}x{} matrix view needs {} values but its buffer has {}",
                self.rows,
                self.columns,
                last + 1,
                self.data.len()
            );
        }
    }
}

/// Writes `alpha * a * b` into `out`, a row-major `a.rows x b.columns` matrix.
///
/// # Panics
///
/// When the inner dimensions differ or a view does not fit its buffer.
fn matrix_product(alpha: f32, a: Matrix<'_>, b: Matrix<'_>, out: &mut [f32]) {
    assert_eq!(a.columns, b.rows, "inner dimensions of a matrix product");
    a.check_bounds();
    b.check_bounds();
    let (m, k, n) = (a.rows, a.columns, b.columns);
    assert!(out.len() >= m * n, "product output too short");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if b.column_stride == 1 && has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA, checked at run time. The checks above keep
        // every element that the product reads inside `a.data` and `b.data`, and the `m x n`
        // row-major output inside `out`.
        unsafe {
            fma_product::product(
                m,
                k,
                n,
                alpha,
                a.data.as_ptr(),
                (a.row_stride, a.column_stride),
                b.data.as_ptr(),
                b.row_stride,
                out.as_mut_ptr(),
            );
        }
        return;
    }
    // SAFETY: the checks above keep every element that sgemm reads inside `a.data` and
    // `b.data`, and every element it writes inside `out`, whose row-major strides (n, 1) give
    // each element its own address. `out` is a unique borrow, so it overlaps neither input.
    // With beta 0, sgemm writes `out` without reading it.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.column_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.column_stride as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Returns whether [`fma_product::product`] can run on this CPU.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// A matrix product with AVX2 and FMA for the small shapes of a batch, where a layer is at
/// most a few hundred wide and a batch a few dozen samples.
///
/// `matrixmultiply::sgemm` copies (packs) both operands into blocks on every call, which for
/// a `32 x 64` times `64 x 64` product costs about a third as many instructions as the
/// multiply-adds. Here the right-hand operand is read in place, a row at a time, and each
/// left-hand element is broadcast from memory, so nothing is copied. Each output tile stays
/// in 8 registers (4 rows of 16 columns, or 8 rows of 8 columns) while the inner dimension
/// runs in order, one fused multiply-add per element, and is scaled by `alpha` at the end.
#[cfg(target_arch = "x86_64")]
mod fma_product {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_broadcast_ss, _mm256_cmpgt_epi32, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_mul_ps, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_setr_epi32, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    /// `f32` lanes of a 256-bit register.
    const LANES: usize = 8;

    /// Writes `alpha * A B` into `out`, row-major `m x n` with row stride `n`. `A` is
    /// `m x k` with `(row, column)` strides `a_strides`, and `B` is `k x n` with row stride
    /// `b_row_stride` and column stride 1.
    ///
    /// # Safety
    ///
    /// The CPU supports AVX2 and FMA. Every element of `A`, `B` and the output lies inside
    /// the allocation its pointer points into, and the output overlaps neither input.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        a_strides: (usize, usize),
        b: *const f32,
        b_row_stride: usize,
        out: *mut f32,
    ) {
        let operands = Operands {
            m,
            k,
            alpha,
            a,
            a_strides,
            b,
            b_row_stride,
            out,
            out_row_stride: n,
        };
        let all = _mm256_set1_epi32(-1);
        let mut column = 0;
        while column + 2 * LANES <= n {
            column_block::<4, 2, false>(&operands, column, all);
            column += 2 * LANES;
        }
        if column + LANES < n {
            // 9 to 15 columns remain: tiles of 16 columns whose second vector is masked, so
            // that each broadcast of `A` feeds both vectors.
            let remaining = (n - column - LANES) as i32;
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining), lanes);
            column_block::<4, 2, true>(&operands, column, mask);
            return;
        }
        if column + LANES <= n {
            column_block::<8, 1, false>(&operands, column, all);
            column += LANES;
        }
        if column < n {
            let remaining = (n - column) as i32;
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            // A lane takes part when its index is below `remaining` (sign bit set).
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining), lanes);
            column_block::<8, 1, true>(&operands, column, mask);
        }
    }

    /// Pointers and strides of a product.
    struct Operands {
        m: usize,
        k: usize,
        alpha: f32,
        a: *const f32,
        a_strides: (usize, usize),
        b: *const f32,
        b_row_stride: usize,
        out: *mut f32,
        out_row_stride: usize,
    }

    /// Computes the `8 V` output columns from `column` on (fewer with `MASKED`), in tiles of
    /// `R` rows and then of 1 row.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn column_block<const R: usize, const V: usize, const MASKED: bool>(
        operands: &Operands,
        column: usize,
        mask: __m256i,
    ) {
        let mut row = 0;
        while row + R <= operands.m {
            tile::<R, V, MASKED>(operands, row, column, mask);
            row += R;
        }
        while row < operands.m {
            tile::<1, V, MASKED>(operands, row, column, mask);
            row += 1;
        }
    }

    /// Computes the `R x (8 V)` output tile at `(row, column)`. With `MASKED`, the last 8
    /// columns read from `B` and write to the output only the lanes of `mask`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const V: usize, const MASKED: bool>(
        operands: &Operands,
        row: usize,
        column: usize,
        mask: __m256i,
    ) {
        let (a_row_stride, a_column_stride) = operands.a_strides;
        let a = operands.a.add(row * a_row_stride);
        let b = operands.b.add(column);
        let mut sums = [[_mm256_setzero_ps(); V]; R];
        // Adds the products of inner index `inner` to `sums`.
        let accumulate = |sums: &mut [[__m256; V]; R], inner: usize| {
            let b_row = b.add(inner * operands.b_row_stride);
            let mut b_values = [_mm256_setzero_ps(); V];
            for (vector, value) in b_values.iter_mut().enumerate() {
                *value = if MASKED && vector == V - 1 {
                    _mm256_maskload_ps(b_row.add(vector * LANES), mask)
                } else {
                    _mm256_loadu_ps(b_row.add(vector * LANES))
                };
            }
            let a_column = a.add(inner * a_column_stride);
            for (tile_row, row_sums) in sums.iter_mut().enumerate() {
                let a_value = _mm256_broadcast_ss(&*a_column.add(tile_row * a_row_stride));
                for (sum, &b_value) in row_sums.iter_mut().zip(&b_values) {
                    *sum = _mm256_fmadd_ps(a_value, b_value, *sum);
                }
            }
        };
        for inner in 0..operands.k {
            accumulate(&mut sums, inner);
        }
        let alpha = _mm256_set1_ps(operands.alpha);
        for (tile_row, row_sums) in sums.iter().enumerate() {
            let out_row = operands
                .out
                .add((row + tile_row) * operands.out_row_stride + column);
            for (vector, &sum) in row_sums.iter().enumerate() {
                let value = _mm256_mul_ps(sum, alpha);
                if MASKED && vector == V - 1 {
                    _mm256_maskstore_ps(out_row.add(vector * LANES), mask, value);
                } else {
                    _mm256_storeu_ps(out_row.add(vector * LANES), value);
                }
            }
        }
    }
}

/// Marks "no layer changed in this step" in [`SampleState::lowest_changed`].
const NO_LAYER: usize = usize::MAX;

/// Progress of one sample's inference.
#[derive(Clone, Copy, Debug)]
struct SampleState {
    /// Whether the sample still takes steps (its early stop has not triggered).
    active: bool,
    steps: u32,
    initial_energy: f32,
    energy: f32,
    /// Energy after the errors were last recomputed.
    next_energy: f32,
    /// Lowest layer whose activities changed in the current step, or [`NO_LAYER`].
    lowest_changed: usize,
}

impl Default for SampleState {
    fn default() -> Self {
        SampleState {
            active: true,
            steps: 0,
            initial_energy: 0.0,
            energy: 0.0,
            next_energy: 0.0,
            lowest_changed: NO_LAYER,
        }
    }
}

/// Counts a non-finite value, as the core's `f32` arithmetic does.
fn count_non_finite(value: f32, overflows: &mut u32) -> f32 {
    if !value.is_finite() {
        *overflows += 1;
    }
    value
}

/// Returns how many values are not finite.
fn non_finite_count(values: &[f32]) -> u32 {
    values
        .iter()
        .map(|value| u32::from(!value.is_finite()))
        .sum()
}

/// Runs `body` with `$act` bound to a constant equal to `activation`, once per activation, so
/// that the loops in `body` compile without a match per element and can vectorise.
macro_rules! with_constant_activation {
    ($activation:expr, $act:ident => $body:expr) => {
        match $activation {
            Activation::Linear => {
                const $act: Activation = Activation::Linear;
                $body
            }
            Activation::Tanh => {
                const $act: Activation = Activation::Tanh;
                $body
            }
            Activation::HardTanh => {
                const $act: Activation = Activation::HardTanh;
                $body
            }
            Activation::Relu => {
                const $act: Activation = Activation::Relu;
                $body
            }
            Activation::LeakyRelu => {
                const $act: Activation = Activation::LeakyRelu;
                $body
            }
        }
    };
}

/// Writes `phi(x)` for every `x` of `input`, with the core's `f32` activation.
#[inline(always)]
fn activate_row_portable(activation: Activation, input: &[f32], out: &mut [f32]) {
    with_constant_activation!(activation, ACT => {
        for (value, &x) in out.iter_mut().zip(input) {
            *value = f32::activate(ACT, x);
        }
    })
}

/// Returns `phi'(x)` given `x` and `activated = phi(x)`.
///
/// The core's tanh derivative is `1 - tanh(x)^2` with the same tanh as `phi`, so the cached
/// `phi(x)` gives the same bits without a second tanh. The test
/// `derivative_from_cache_matches_core` checks that.
#[inline(always)]
fn derivative(activation: Activation, x: f32, activated: f32) -> f32 {
    match activation {
        Activation::Tanh => 1.0 - activated * activated,
        _ => f32::activate_derivative(activation, x),
    }
}

/// One free layer's rows of one sample during an inference step.
struct LayerRow<'r> {
    /// `z_l`, updated in place.
    activities: &'r mut [f32],
    /// `phi(z_l)` before the step.
    activated: &'r [f32],
    /// `e_l`.
    own_error: &'r [f32],
    /// `e_(l+1)`, read only when layer `l + 1` has a skip (and so the same width).
    next_error: &'r [f32],
    /// `a_(l+1) W_(l+1)^T e_(l+1)`.
    feedback: &'r [f32],
}

/// Takes the step `z <- z - step_size * dE/dz` on one row, with
/// `dE/dz = e_l - phi'(z) feedback - s_(l+1) e_(l+1)` computed in the core's order. Returns
/// whether any activity changed and the number of non-finite results (feedback, gradient,
/// change and new activity, as the core counts them). The caller recomputes `phi(z)`.
#[inline(always)]
fn step_row_portable<const SKIP: bool>(
    activation: Activation,
    step_size: f32,
    row: LayerRow<'_>,
) -> (bool, u32) {
    with_constant_activation!(activation, ACT => {
        let mut changed = false;
        let mut non_finite = 0u32;
        let width = row.activities.len();
        let values = row
            .activities
            .iter_mut()
            .zip(&row.activated[..width])
            .zip(&row.own_error[..width])
            .zip(&row.feedback[..width]);
        for (index, (((z, &activated), &own_error), &feedback)) in values.enumerate() {
            let slope = derivative(ACT, *z, activated);
            let mut gradient = 0.0 + own_error;
            gradient += -slope * feedback;
            if SKIP {
                gradient -= row.next_error[index];
            }
            let change = step_size * gradient;
            let updated = *z - change;
            non_finite += u32::from(!feedback.is_finite())
                + u32::from(!gradient.is_finite())
                + u32::from(!change.is_finite())
                + u32::from(!updated.is_finite());
            changed |= updated != *z;
            *z = updated;
        }
        (changed, non_finite)
    })
}

/// Result of [`error_row`] for one row.
#[derive(Clone, Copy)]
struct RowErrors {
    all_zero: bool,
    /// Non-finite results: prediction, sum with the skip, and error, as the core counts them.
    non_finite: u32,
    /// `|e|^2`, summed as [`sum_of_squares`] does.
    squares: f32,
}

/// Returns `sum_i values_i^2`, summed in 8 interleaved partial sums that are then added in
/// lane order, so that the loop vectorises. The core adds the squares one after the other,
/// so the result differs from the core's by float reassociation.
#[inline(always)]
fn sum_of_squares(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += value * value;
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for &value in chunks.remainder() {
        sum += value * value;
    }
    sum
}

/// Writes `e = z - (prediction + s input)` into `error` for one row.
#[inline(always)]
fn error_row_portable<const SKIP: bool>(
    prediction: &[f32],
    input: &[f32],
    activities: &[f32],
    error: &mut [f32],
) -> RowErrors {
    let mut all_zero = true;
    let mut non_finite = 0u32;
    let width = error.len();
    let values = error
        .iter_mut()
        .zip(&prediction[..width])
        .zip(&activities[..width]);
    for (index, ((error, &prediction), &z)) in values.enumerate() {
        let mut mu = prediction;
        non_finite += u32::from(!mu.is_finite());
        if SKIP {
            mu += input[index];
            non_finite += u32::from(!mu.is_finite());
        }
        let difference = z - mu;
        non_finite += u32::from(!difference.is_finite());
        *error = difference;
        all_zero &= difference == 0.0;
    }
    RowErrors {
        all_zero,
        non_finite,
        squares: sum_of_squares(error),
    }
}

/// One layer's rows of the samples of a part during an inference step, row-major.
struct LayerRows<'r> {
    width: usize,
    /// Width of layer `l + 1`.
    next_width: usize,
    activities: &'r mut [f32],
    activated: &'r [f32],
    own_error: &'r [f32],
    next_error: &'r [f32],
    feedback: &'r [f32],
}

/// Runs [`step_row_portable`] on each row `sample` for which `selected(sample)` is true, and
/// passes its results to `results`. One call covers the layer, so the row loop compiles into
/// the AVX2 copy.
#[inline(always)]
fn step_rows_portable<const SKIP: bool>(
    activation: Activation,
    step_size: f32,
    rows: LayerRows<'_>,
    selected: impl Fn(usize) -> bool,
    mut results: impl FnMut(usize, bool, u32),
) {
    let (width, next_width) = (rows.width, rows.next_width);
    for (sample, activities) in rows.activities.chunks_exact_mut(width).enumerate() {
        if !selected(sample) {
            continue;
        }
        let span = sample * width..(sample + 1) * width;
        let row = LayerRow {
            activities,
            activated: &rows.activated[span.clone()],
            own_error: &rows.own_error[span.clone()],
            next_error: &rows.next_error[sample * next_width..(sample + 1) * next_width],
            feedback: &rows.feedback[span],
        };
        let (changed, non_finite) = step_row_portable::<SKIP>(activation, step_size, row);
        results(sample, changed, non_finite);
    }
}

/// One layer's rows of the samples of a part while its errors are recomputed, row-major.
struct ErrorRows<'r> {
    width: usize,
    /// Width of layer `l - 1`.
    input_width: usize,
    /// `mu_l` without the skip input.
    prediction: &'r [f32],
    /// `z_(l-1)`, read only when layer `l` has a skip (and so the same width).
    input: &'r [f32],
    activities: &'r [f32],
    errors: &'r mut [f32],
}

/// Runs [`error_row_portable`] on each row `sample` for which `selected(sample)` is true, and
/// passes its results to `results`. One call covers the layer, so the row loop compiles into
/// the AVX2 copy.
#[inline(always)]
fn error_rows_portable<const SKIP: bool>(
    rows: ErrorRows<'_>,
    selected: impl Fn(usize) -> bool,
    mut results: impl FnMut(usize, RowErrors),
) {
    let (width, input_width) = (rows.width, rows.input_width);
    for (sample, error) in rows.errors.chunks_exact_mut(width).enumerate() {
        if !selected(sample) {
            continue;
        }
        let span = sample * width..(sample + 1) * width;
        let result = error_row_portable::<SKIP>(
            &rows.prediction[span.clone()],
            &rows.input[sample * input_width..],
            &rows.activities[span],
            error,
        );
        results(sample, result);
    }
}

/// Copies of the row functions compiled with AVX2, which process 8 values per instruction
/// where the portable build has SSE2's 4. Without fused multiply-adds the results are the
/// same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Activation, ErrorRows, LayerRows, RowErrors};

    #[target_feature(enable = "avx2")]
    pub(super) fn activate_row(activation: Activation, input: &[f32], out: &mut [f32]) {
        super::activate_row_portable(activation, input, out)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn step_rows<const SKIP: bool>(
        activation: Activation,
        step_size: f32,
        rows: LayerRows<'_>,
        selected: impl Fn(usize) -> bool,
        results: impl FnMut(usize, bool, u32),
    ) {
        super::step_rows_portable::<SKIP>(activation, step_size, rows, selected, results)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn error_rows<const SKIP: bool>(
        rows: ErrorRows<'_>,
        selected: impl Fn(usize) -> bool,
        results: impl FnMut(usize, RowErrors),
    ) {
        super::error_rows_portable::<SKIP>(rows, selected, results)
    }
}

#[cfg(target_arch = "x86_64")]
mod tanh_avx2;

/// Returns whether the row functions can run their AVX2 copies on this CPU.
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Writes `phi(x)` for every `x` of `input`, with the core's `f32` activation.
fn activate_row(activation: Activation, input: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && activation == Activation::Tanh {
        // SAFETY: the CPU supports AVX2, checked at run time.
        return unsafe { tanh_avx2::activate_row(input, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, checked at run time.
        return unsafe { avx2::activate_row(activation, input, out) };
    }
    activate_row_portable(activation, input, out)
}

/// See [`step_rows_portable`].
fn step_rows<const SKIP: bool>(
    activation: Activation,
    step_size: f32,
    rows: LayerRows<'_>,
    selected: impl Fn(usize) -> bool,
    results: impl FnMut(usize, bool, u32),
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, checked at run time.
        return unsafe { avx2::step_rows::<SKIP>(activation, step_size, rows, selected, results) };
    }
    step_rows_portable::<SKIP>(activation, step_size, rows, selected, results)
}

/// See [`error_rows_portable`].
fn error_rows<const SKIP: bool>(
    rows: ErrorRows<'_>,
    selected: impl Fn(usize) -> bool,
    results: impl FnMut(usize, RowErrors),
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, checked at run time.
        return unsafe { avx2::error_rows::<SKIP>(rows, selected, results) };
    }
    error_rows_portable::<SKIP>(rows, selected, results)
}

/// Layer sizes and inference settings shared by the threads of one batch.
struct Shapes<'a> {
    network: &'a Network<'a, f32>,
    /// `W_l^T` of every layer, row-major `[n_(l-1)][n_l]`, one layer after the other.
    transposed_weights: &'a [f32],
    widths: &'a [usize],
    /// Whether layer `l` (index `l`) adds its input unchanged to its prediction.
    skips: &'a [bool],
    activation: Activation,
    config: &'a InferenceConfig<f32>,
}

impl Shapes<'_> {
    fn depth(&self) -> usize {
        self.widths.len() - 1
    }

    /// `W_layer^T` as an `n_(layer-1) x n_layer` matrix, from a transposed copy. The AVX2
    /// product reads only right-hand operands whose rows are contiguous, and a transposed view
    /// of row-major `W` has strided rows.
    fn transposed_weights(&self, layer: usize) -> Matrix<'_> {
        let offset = self.network.arch().weight_offset(layer);
        let (rows, columns) = (self.widths[layer - 1], self.widths[layer]);
        Matrix::row_major(
            &self.transposed_weights[offset..offset + rows * columns],
            rows,
            columns,
        )
    }
}

/// The rows of some samples of the batch, in every layer buffer.
struct Part<'a> {
    rows: usize,
    /// `z_l` for `l = 0 ..= L`.
    activities: Vec<&'a mut [f32]>,
    /// `phi(z_l)`, kept equal to the activation of `activities`, for `l = 0 ..= L - 1` (the
    /// identity for `l = 0`).
    activated: Vec<&'a mut [f32]>,
    /// `e_l` at index `l`, for `l = 1 ..= L`; index 0 is empty.
    errors: Vec<&'a mut [f32]>,
    /// `mu_1`, fixed during inference because `z_0` is clamped.
    first_prediction: &'a mut [f32],
    /// Product outputs, `rows x max width`.
    scratch: &'a mut [f32],
    /// Whether `e_l` of a sample is all zero, at `sample * (L + 1) + l`.
    zero_errors: &'a mut [bool],
    /// `|e_l|^2` of a sample, at `sample * (L + 1) + l`.
    squared_errors: &'a mut [f32],
    samples: &'a mut [SampleState],
    /// Non-finite results per layer `1 ..= L` (index `l - 1`).
    overflows: Vec<u32>,
}

impl Part<'_> {
    /// Sets `z_0` to the inputs and every other layer to its prediction, then clamps `z_L` to
    /// the targets (the core's `feedforward` and `infer_supervised`).
    fn feedforward(&mut self, shapes: &Shapes<'_>, inputs: &[f32], targets: &[f32]) {
        let depth = shapes.depth();
        let rows = self.rows;
        self.activities[0].copy_from_slice(inputs);
        self.activated[0].copy_from_slice(inputs);
        for layer in 1..=depth {
            let input_width = shapes.widths[layer - 1];
            let (below, above) = self.activities.split_at_mut(layer);
            let input = &*below[layer - 1];
            let out: &mut [f32] = if layer == 1 {
                &mut *self.first_prediction
            } else {
                &mut *above[0]
            };
            matrix_product(
                shapes.network.scaling(layer),
                Matrix::row_major(self.activated[layer - 1], rows, input_width),
                shapes.transposed_weights(layer),
                out,
            );
            let overflows = &mut self.overflows[layer - 1];
            *overflows += non_finite_count(out);
            if shapes.skips[layer] {
                for (mu, &x) in out.iter_mut().zip(input.iter()) {
                    *mu = count_non_finite(*mu + x, overflows);
                }
            }
            if layer == 1 {
                above[0].copy_from_slice(self.first_prediction);
            }
            if layer < depth {
                activate_row(shapes.activation, above[0], &mut *self.activated[layer]);
            }
        }
        self.activities[depth].copy_from_slice(targets);
    }

    /// Runs the inference loop of the core's `infer` on every sample of the part.
    fn infer(&mut self, shapes: &Shapes<'_>) {
        let depth = shapes.depth();
        self.squared_errors.fill(0.0);
        for sample in self.samples.iter_mut() {
            *sample = SampleState {
                lowest_changed: 1,
                ..SampleState::default()
            };
        }
        self.recompute_errors(shapes);
        for sample in self.samples.iter_mut() {
            sample.initial_energy = sample.next_energy;
            sample.energy = sample.next_energy;
        }

        for _ in 0..shapes.config.steps {
            if !self.samples.iter().any(|sample| sample.active) {
                break;
            }
            self.step_free_layers(shapes);
            self.recompute_errors(shapes);
            for sample in self.samples.iter_mut().filter(|sample| sample.active) {
                let next = if sample.lowest_changed <= depth {
                    sample.next_energy
                } else {
                    sample.energy
                };
                sample.steps += 1;
                let change = next - sample.energy;
                sample.energy = next;
                if let Some(tolerance) = shapes.config.tolerance {
                    let magnitude = if change < 0.0 { -change } else { change };
                    if magnitude <= tolerance {
                        sample.active = false;
                    }
                }
            }
        }
    }

    /// Takes one gradient step on every free layer of every active sample, and records in
    /// `lowest_changed` the lowest layer whose activities changed.
    fn step_free_layers(&mut self, shapes: &Shapes<'_>) {
        let depth = shapes.depth();
        let rows = self.rows;
        let step_size = shapes.config.step_size;
        for sample in self.samples.iter_mut() {
            sample.lowest_changed = NO_LAYER;
        }
        let zero_errors = &*self.zero_errors;
        for layer in 1..depth {
            // A layer whose own and next errors are all zero has a zero gradient. The core
            // skips it, so a sample's activities there keep their bits.
            let stepped = |state: SampleState, sample: usize| {
                let base = sample * (depth + 1);
                state.active && !(zero_errors[base + layer] && zero_errors[base + layer + 1])
            };
            if !(0..rows).any(|sample| stepped(self.samples[sample], sample)) {
                continue;
            }
            let width = shapes.widths[layer];
            let next_width = shapes.widths[layer + 1];
            let feedback = &mut self.scratch[..rows * width];
            matrix_product(
                shapes.network.scaling(layer + 1),
                Matrix::row_major(self.errors[layer + 1], rows, next_width),
                Matrix::row_major(shapes.network.layer_weights(layer + 1), next_width, width),
                feedback,
            );
            let layer_rows = LayerRows {
                width,
                next_width,
                activities: &mut self.activities[layer][..rows * width],
                activated: &self.activated[layer][..rows * width],
                own_error: &self.errors[layer][..rows * width],
                next_error: &self.errors[layer + 1][..rows * next_width],
                feedback,
            };
            // Cells, so that the selection reads the states that the results write.
            let states = Cell::from_mut(&mut *self.samples).as_slice_of_cells();
            let overflows = &mut self.overflows[layer - 1];
            let selected = |sample: usize| stepped(states[sample].get(), sample);
            let results = |sample: usize, changed: bool, non_finite: u32| {
                *overflows += non_finite;
                let mut state = states[sample].get();
                if changed && state.lowest_changed == NO_LAYER {
                    state.lowest_changed = layer;
                    states[sample].set(state);
                }
            };
            if shapes.skips[layer + 1] {
                step_rows::<true>(shapes.activation, step_size, layer_rows, selected, results);
            } else {
                step_rows::<false>(shapes.activation, step_size, layer_rows, selected, results);
            }

            // phi(z) of each run of consecutive stepped rows in one call, so that the loop
            // runs long. A row whose activities did not change gets the same bits again.
            let mut sample = 0;
            while sample < rows {
                let start = sample;
                while sample < rows && stepped(states[sample].get(), sample) {
                    sample += 1;
                }
                if sample > start {
                    let span = start * width..sample * width;
                    activate_row(
                        shapes.activation,
                        &self.activities[layer][span.clone()],
                        &mut self.activated[layer][span],
                    );
                } else {
                    sample += 1;
                }
            }
        }
    }

    /// Recomputes the errors of each active sample from its lowest changed layer up and
    /// stores its energy in `next_energy`. The errors of lower layers keep their values.
    fn recompute_errors(&mut self, shapes: &Shapes<'_>) {
        let depth = shapes.depth();
        let rows = self.rows;
        let recomputed = |state: &SampleState| state.active && state.lowest_changed <= depth;
        let Some(first) = self
            .samples
            .iter()
            .filter(|state| recomputed(state))
            .map(|state| state.lowest_changed)
            .min()
        else {
            return;
        };

        for layer in first..=depth {
            let width = shapes.widths[layer];
            let input_width = shapes.widths[layer - 1];
            let prediction: &[f32] = if layer == 1 {
                &*self.first_prediction
            } else {
                let out = &mut self.scratch[..rows * width];
                matrix_product(
                    shapes.network.scaling(layer),
                    Matrix::row_major(self.activated[layer - 1], rows, input_width),
                    shapes.transposed_weights(layer),
                    out,
                );
                out
            };
            let layer_rows = ErrorRows {
                width,
                input_width,
                prediction: &prediction[..rows * width],
                input: &self.activities[layer - 1][..rows * input_width],
                activities: &self.activities[layer][..rows * width],
                errors: &mut self.errors[layer][..rows * width],
            };
            let samples = &*self.samples;
            let selected = |sample: usize| {
                let state = &samples[sample];
                recomputed(state) && state.lowest_changed <= layer
            };
            let overflows = &mut self.overflows[layer - 1];
            let zero_errors = &mut *self.zero_errors;
            let squared_errors = &mut *self.squared_errors;
            let results = |sample: usize, result: RowErrors| {
                *overflows += result.non_finite;
                zero_errors[sample * (depth + 1) + layer] = result.all_zero;
                squared_errors[sample * (depth + 1) + layer] = result.squares;
            };
            if shapes.skips[layer] {
                error_rows::<true>(layer_rows, selected, results);
            } else {
                error_rows::<false>(layer_rows, selected, results);
            }
        }
        self.sum_energies(shapes);
    }

    /// Stores `1/2 sum_l |e_l|^2`, added in layer order, in `next_energy` of each sample whose
    /// errors were recomputed. Layers below a sample's lowest changed layer keep their stored
    /// `|e_l|^2`.
    fn sum_energies(&mut self, shapes: &Shapes<'_>) {
        let depth = shapes.depth();
        let stride = depth + 1;
        let squared_errors = self.squared_errors.chunks_exact(stride);
        for (state, squares) in self.samples.iter_mut().zip(squared_errors) {
            if state.active && state.lowest_changed <= depth {
                let sum: f32 = squares[1..].iter().sum();
                state.next_energy = count_non_finite(sum * 0.5, &mut self.overflows[0]);
            }
        }
    }
}

/// Buffers and results of batched `f32` inference for batches of up to `capacity` samples.
pub struct BatchedF32 {
    widths: Vec<usize>,
    activation: Activation,
    skips: Vec<bool>,
    capacity: usize,
    /// Samples in the last batch.
    batch: usize,
    activities: Vec<Vec<f32>>,
    activated: Vec<Vec<f32>>,
    errors: Vec<Vec<f32>>,
    first_prediction: Vec<f32>,
    transposed_weights: Vec<f32>,
    scratch: Vec<f32>,
    zero_errors: Vec<bool>,
    squared_errors: Vec<f32>,
    samples: Vec<SampleState>,
    overflows: Vec<u32>,
}

/// Splits the first `rows` rows of a row-major buffer of width `width` into parts of
/// `per_part` rows.
fn split_rows<T>(buffer: &mut [T], width: usize, rows: usize, per_part: usize) -> Vec<&mut [T]> {
    let parts = rows.div_ceil(per_part);
    if width == 0 {
        return (0..parts).map(|_| <&mut [T]>::default()).collect();
    }
    buffer[..rows * width]
        .chunks_mut(per_part * width)
        .collect()
}

/// Splits each buffer of a list into parts and deals part `i` of every buffer to entry `i`.
fn split_layers(
    buffers: &mut [Vec<f32>],
    widths: impl Fn(usize) -> usize,
    rows: usize,
    per_part: usize,
) -> Vec<Vec<&mut [f32]>> {
    let mut parts: Vec<Vec<&mut [f32]>> =
        (0..rows.div_ceil(per_part)).map(|_| Vec::new()).collect();
    for (layer, buffer) in buffers.iter_mut().enumerate() {
        for (part, rows) in parts
            .iter_mut()
            .zip(split_rows(buffer, widths(layer), rows, per_part))
        {
            part.push(rows);
        }
    }
    parts
}

impl BatchedF32 {
    /// Allocates buffers for batches of up to `capacity` samples of `arch`.
    pub fn new(arch: &Arch<'_>, capacity: usize) -> Self {
        let widths = arch.widths().to_vec();
        let depth = arch.depth();
        let capacity = capacity.max(1);
        let layer_buffers = |first: usize| -> Vec<Vec<f32>> {
            (0..=depth)
                .map(|layer| {
                    let width = if layer < first { 0 } else { widths[layer] };
                    vec![0.0; capacity * width]
                })
                .collect()
        };
        BatchedF32 {
            activation: arch.activation(),
            skips: (0..=depth).map(|layer| arch.has_skip(layer)).collect(),
            capacity,
            batch: 0,
            activities: layer_buffers(0),
            activated: layer_buffers(0),
            errors: layer_buffers(1),
            first_prediction: vec![0.0; capacity * widths[1]],
            transposed_weights: vec![0.0; arch.weights_len()],
            scratch: vec![0.0; capacity * arch.max_width()],
            zero_errors: vec![false; capacity * (depth + 1)],
            squared_errors: vec![0.0; capacity * (depth + 1)],
            samples: vec![SampleState::default(); capacity],
            overflows: vec![0; depth],
            widths,
        }
    }

    fn depth(&self) -> usize {
        self.widths.len() - 1
    }

    /// Runs the feedforward pass and supervised inference on a batch: row `k` of `inputs`
    /// (`n_0` values per sample) and of `targets` (`n_L` values per sample) is sample `k`.
    ///
    /// The samples are split across up to `threads` threads. The overflow counters add up
    /// from one call to the next until [`BatchedF32::reset_overflows`].
    ///
    /// # Errors
    ///
    /// When the network's shapes differ from those of [`BatchedF32::new`], or the inputs and
    /// targets do not hold the same number of samples, from 1 to the capacity.
    pub fn infer(
        &mut self,
        network: &Network<'_, f32>,
        inputs: &[f32],
        targets: &[f32],
        config: &InferenceConfig<f32>,
        threads: usize,
    ) -> Result<()> {
        let arch = network.arch();
        ensure!(
            arch.widths() == self.widths.as_slice()
                && arch.activation() == self.activation
                && (0..=self.depth()).all(|layer| arch.has_skip(layer) == self.skips[layer]),
            "the network's shapes differ from those the batch buffers were sized for"
        );
        let depth = self.depth();
        let input_width = self.widths[0];
        let output_width = self.widths[depth];
        let batch = inputs.len() / input_width;
        ensure!(
            batch >= 1
                && batch <= self.capacity
                && inputs.len() == batch * input_width
                && targets.len() == batch * output_width,
            "a batch needs 1 to {} samples of {input_width} inputs and {output_width} targets, \
             got {} inputs and {} targets",
            self.capacity,
            inputs.len(),
            targets.len()
        );
        self.batch = batch;
        for layer in 1..=depth {
            let offset = arch.weight_offset(layer);
            let (rows, columns) = (self.widths[layer], self.widths[layer - 1]);
            let transposed = &mut self.transposed_weights[offset..offset + rows * columns];
            for (i, row) in network
                .layer_weights(layer)
                .chunks_exact(columns)
                .enumerate()
            {
                for (j, &weight) in row.iter().enumerate() {
                    transposed[j * rows + i] = weight;
                }
            }
        }
        let per_part = batch.div_ceil(threads.clamp(1, batch));
        let shapes = Shapes {
            network,
            transposed_weights: &self.transposed_weights,
            widths: &self.widths,
            skips: &self.skips,
            activation: self.activation,
            config,
        };
        let widths = &self.widths;
        let mut activities =
            split_layers(&mut self.activities, |layer| widths[layer], batch, per_part).into_iter();
        let mut activated =
            split_layers(&mut self.activated, |layer| widths[layer], batch, per_part).into_iter();
        let mut errors = split_layers(
            &mut self.errors,
            |layer| if layer == 0 { 0 } else { widths[layer] },
            batch,
            per_part,
        )
        .into_iter();
        let mut first_prediction =
            split_rows(&mut self.first_prediction, widths[1], batch, per_part).into_iter();
        let mut scratch =
            split_rows(&mut self.scratch, max_width(widths), batch, per_part).into_iter();
        let mut zero_errors =
            split_rows(&mut self.zero_errors, depth + 1, batch, per_part).into_iter();
        let mut squared_errors =
            split_rows(&mut self.squared_errors, depth + 1, batch, per_part).into_iter();
        let mut samples = split_rows(&mut self.samples, 1, batch, per_part).into_iter();
        let ranges: Vec<Range<usize>> = (0..batch.div_ceil(per_part))
            .map(|part| part * per_part..((part + 1) * per_part).min(batch))
            .collect();
        let mut parts = Vec::with_capacity(ranges.len());
        for range in &ranges {
            parts.push(Part {
                rows: range.len(),
                activities: activities.next().expect("one part per range"),
                activated: activated.next().expect("one part per range"),
                errors: errors.next().expect("one part per range"),
                first_prediction: first_prediction.next().expect("one part per range"),
                scratch: scratch.next().expect("one part per range"),
                zero_errors: zero_errors.next().expect("one part per range"),
                squared_errors: squared_errors.next().expect("one part per range"),
                samples: samples.next().expect("one part per range"),
                overflows: vec![0; depth],
            });
        }

        let run = &|part: &mut Part<'_>, range: &Range<usize>| {
            let inputs = &inputs[range.start * input_width..range.end * input_width];
            let targets = &targets[range.start * output_width..range.end * output_width];
            part.feedforward(&shapes, inputs, targets);
            part.infer(&shapes);
        };
        // The calling thread runs the first part, so one thread fewer is spawned.
        let (first, others) = parts
            .split_first_mut()
            .expect("a batch has one part or more");
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = others
                .iter_mut()
                .zip(&ranges[1..])
                .map(|(part, range)| scope.spawn(move || run(part, range)))
                .collect();
            run(first, &ranges[0]);
            for handle in handles {
                handle
                    .join()
                    .map_err(|_| anyhow!("an inference thread panicked"))?;
            }
            Ok(())
        })?;
        for part in &parts {
            for (total, &count) in self.overflows.iter_mut().zip(&part.overflows) {
                *total += count;
            }
        }
        Ok(())
    }

    /// Writes the weight gradients of the last batch into `gradients` (the layout of the
    /// weights): `-(a_l / B) sum_b e_l phi(z_(l-1))^T` as the core's `weight_gradients`, or
    /// with `unscaled` the same divided by `a_l`, as its `weight_gradients_unscaled`.
    ///
    /// # Errors
    ///
    /// When `gradients` does not have one value per weight, or no batch was inferred.
    pub fn weight_gradients(
        &mut self,
        network: &Network<'_, f32>,
        unscaled: bool,
        gradients: &mut [f32],
    ) -> Result<()> {
        let arch = network.arch();
        ensure!(
            gradients.len() == arch.weights_len() && arch.widths() == self.widths.as_slice(),
            "the gradients need {} values for this network, got {}",
            arch.weights_len(),
            gradients.len()
        );
        ensure!(self.batch > 0, "no batch was inferred");
        let batch = self.batch;
        for layer in 1..=self.depth() {
            let width = self.widths[layer];
            let input_width = self.widths[layer - 1];
            let scaling = if unscaled {
                1.0
            } else {
                network.scaling(layer)
            };
            let coefficient = scaling.div_int(batch as u32).saturating_neg();
            let out = &mut gradients[arch.weight_offset(layer)..][..width * input_width];
            matrix_product(
                coefficient,
                Matrix::row_major(&self.errors[layer], batch, width).transposed(),
                Matrix::row_major(&self.activated[layer - 1], batch, input_width),
                out,
            );
            let overflows = &mut self.overflows[layer - 1];
            for &gradient in out.iter() {
                count_non_finite(gradient, overflows);
            }
        }
        Ok(())
    }

    /// Samples in the last batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Activities `z_layer` of sample `sample` of the last batch.
    ///
    /// # Panics
    ///
    /// When `layer` is above the depth or `sample` is outside the last batch.
    pub fn activities(&self, layer: usize, sample: usize) -> &[f32] {
        assert!(sample < self.batch, "sample {sample} is outside the batch");
        let width = self.widths[layer];
        &self.activities[layer][sample * width..(sample + 1) * width]
    }

    /// Activities `z_layer` of every sample of the last batch, one row per sample.
    ///
    /// # Panics
    ///
    /// When `layer` is above the depth.
    pub fn layer_activities(&self, layer: usize) -> &[f32] {
        &self.activities[layer][..self.batch * self.widths[layer]]
    }

    /// Errors `e_layer` (`layer` from 1) of sample `sample` of the last batch.
    ///
    /// # Panics
    ///
    /// When `layer` is 0 or above the depth, or `sample` is outside the last batch.
    pub fn errors(&self, layer: usize, sample: usize) -> &[f32] {
        assert!(layer >= 1, "errors start at layer 1");
        assert!(sample < self.batch, "sample {sample} is outside the batch");
        let width = self.widths[layer];
        &self.errors[layer][sample * width..(sample + 1) * width]
    }

    /// Steps and energies of sample `sample` of the last batch, as the core's
    /// `infer_supervised` returns them.
    ///
    /// # Panics
    ///
    /// When `sample` is outside the last batch.
    pub fn sample_stats(&self, sample: usize) -> InferenceStats<f32> {
        assert!(sample < self.batch, "sample {sample} is outside the batch");
        let state = &self.samples[sample];
        InferenceStats {
            steps_taken: state.steps,
            initial_energy: state.initial_energy,
            final_energy: state.energy,
        }
    }

    /// Non-finite results per layer `1 ..= L` (index `l - 1`) since the last reset.
    pub fn overflows(&self) -> &[u32] {
        &self.overflows
    }

    /// Sets every overflow counter to zero.
    pub fn reset_overflows(&mut self) {
        self.overflows.fill(0);
    }
}

fn max_width(widths: &[usize]) -> usize {
    widths.iter().copied().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivative_from_cache_matches_core() {
        for activation in Activation::ALL {
            for step in -4000..=4000 {
                let x = step as f32 * 0.0025;
                let activated = f32::activate(activation, x);
                let expected = f32::activate_derivative(activation, x);
                let actual = derivative(activation, x, activated);
                assert_eq!(
                    actual.to_bits(),
                    expected.to_bits(),
                    "{} at {x}",
                    activation.name()
                );
            }
        }
    }

    #[test]
    fn matrix_product_matches_loops() {
        let a: Vec<f32> = (0..6).map(|i| i as f32 - 2.0).collect();
        let b: Vec<f32> = (0..12).map(|i| 0.5 * i as f32).collect();
        // a is 2x3, b is 3x4.
        let mut out = vec![0.0; 8];
        matrix_product(
            2.0,
            Matrix::row_major(&a, 2, 3),
            Matrix::row_major(&b, 3, 4),
            &mut out,
        );
        for i in 0..2 {
            for j in 0..4 {
                let expected: f32 = 2.0 * (0..3).map(|k| a[i * 3 + k] * b[k * 4 + j]).sum::<f32>();
                assert_eq!(out[i * 4 + j], expected, "element ({i}, {j})");
            }
        }
    }

    #[test]
    fn matrix_product_of_transposed_view() {
        // a is 3x2 stored row-major; its transpose is 2x3.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut out = vec![0.0; 4];
        matrix_product(
            1.0,
            Matrix::row_major(&a, 3, 2).transposed(),
            Matrix::row_major(&b, 3, 2),
            &mut out,
        );
        assert_eq!(out, [1.0 + 5.0, 3.0 + 5.0, 2.0 + 6.0, 4.0 + 6.0]);
    }

    /// Returns `alpha * a * b` computed with loops in `f64`.
    fn product_by_loops(alpha: f32, a: Matrix<'_>, b: Matrix<'_>) -> Vec<f64> {
        let element = |m: &Matrix<'_>, row: usize, column: usize| {
            f64::from(m.data[row * m.row_stride + column * m.column_stride])
        };
        let mut out = Vec::new();
        for row in 0..a.rows {
            for column in 0..b.columns {
                let sum: f64 = (0..a.columns)
                    .map(|inner| element(&a, row, inner) * element(&b, inner, column))
                    .sum();
                out.push(f64::from(alpha) * sum);
            }
        }
        out
    }

    #[test]
    fn matrix_product_matches_loops_on_odd_shapes() {
        // Row counts around the 4-row tiles, and column counts around the 8- and 16-column
        // tiles, with and without a transposed left-hand operand.
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 7),
            (5, 9, 8),
            (7, 4, 16),
            (9, 33, 26),
            (32, 10, 10),
            (6, 7, 15),
            (4, 12, 31),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
                .collect();
            let transposed: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            for (label, left) in [
                ("row-major", Matrix::row_major(&a, m, k)),
                (
                    "transposed",
                    Matrix::row_major(&transposed, k, m).transposed(),
                ),
            ] {
                let right = Matrix::row_major(&b, k, n);
                // One more value than needed, which the product must leave alone.
                let mut out = vec![f32::NAN; m * n + 1];
                matrix_product(-0.5, left, right, &mut out);
                let expected = product_by_loops(-0.5, left, right);
                for (index, (&actual, &expected)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(actual) - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                        "{m}x{k}x{n} {label}: element {index} is {actual}, expected {expected}"
                    );
                }
                assert!(
                    out[m * n].is_nan(),
                    "{m}x{k}x{n} {label}: wrote past the output"
                );
            }
        }
    }

    #[test]
    fn matrix_product_of_strided_right_operand() {
        // A right-hand operand without unit column stride takes matrixmultiply's path.
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let left = Matrix::row_major(&a, 2, 2);
        let right = Matrix::row_major(&b, 3, 2).transposed();
        let mut out = vec![0.0; 6];
        matrix_product(1.0, left, right, &mut out);
        assert_eq!(out, [5.0, 11.0, 17.0, 11.0, 25.0, 39.0]);
    }

    #[test]
    #[should_panic(expected = "matrix view needs")]
    fn matrix_product_rejects_short_buffer() {
        let a = [1.0; 5];
        let b = [1.0; 6];
        let mut out = vec![0.0; 4];
        matrix_product(
            1.0,
            Matrix::row_major(&a, 2, 3),
            Matrix::row_major(&b, 3, 2),
            &mut out,
        );
    }
}
