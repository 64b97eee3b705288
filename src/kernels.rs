//! Exact integer dot products, the inner loops of the fixed-point matrix products.
//!
//! Every `thumbv7em` core (Cortex-M4 and Cortex-M7) has the DSP extension, so the crate's
//! `build.rs` sets `cfg(fixedpc_dsp)` for those targets, and the loops there are inline
//! assembly. `LDM` loads four words at a time, `SMLALD` multiplies two pairs of 16-bit values
//! and adds both products to a 64-bit accumulator, and `SMLAL` does the same for one pair of
//! 32-bit values. Every other target runs the portable loops. Both compute the
//! same integer sum, so results are bit-identical across targets; `tests/kernels.rs` and the
//! self-test of `boards/qemu-m4-bench` compare them.
//!
//! On the same targets, the submodule `products` computes whole matrix and transposed
//! products with scale one in one assembly routine each, rounding included. The `Scalar`
//! implementations try it first and fall back to the functions here.
//!
//! This is the only module of the crate with `unsafe` code: the `asm!` blocks here and in
//! `products`.
#![allow(unsafe_code)]

/// Returns `sum_k a[k] b[k]` exactly, over the shorter of the two slices.
///
/// Each product is at most `2^30` in magnitude, so the `i64` sum is exact for fewer than `2^33`
/// products.
pub fn dot_i16(a: &[i16], b: &[i16]) -> i64 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    #[cfg(fixedpc_dsp)]
    {
        dsp::dot_i16(a, b)
    }
    #[cfg(not(fixedpc_dsp))]
    {
        dot_i16_portable(a, b)
    }
}

/// Returns `sum_k a[k] b[k]` modulo `2^64` (as `i64`), over the shorter of the two slices.
///
/// The result is the exact sum whenever the exact sum fits an `i64`; callers check a bound
/// first (see `partial_sums_fit_i64` in the `scalar` module).
pub fn dot_i32_wrapping(a: &[i32], b: &[i32]) -> i64 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    #[cfg(fixedpc_dsp)]
    {
        dsp::dot_i32_wrapping(a, b)
    }
    #[cfg(not(fixedpc_dsp))]
    {
        dot_i32_wrapping_portable(a, b)
    }
}

/// Calls `sink(i, sum_k matrix[i][k] vector[k])` for every row `i` of the row-major `matrix`
/// with `vector.len()` columns, with each sum exact as in [`dot_i16`].
///
/// With the DSP extension, rows go through the assembly loop two at a time, so each load of
/// the vector serves two rows. That loop takes 16 instructions per 16 products.
/// `I4F12::matrix_product` uses this only for the shapes and scales that the whole-matrix
/// routine of the `products` module does not handle.
pub fn rows_dot_i16(matrix: &[i16], vector: &[i16], sink: impl FnMut(usize, i64)) {
    #[cfg(fixedpc_dsp)]
    {
        dsp::rows_dot_i16(matrix, vector, sink)
    }
    #[cfg(not(fixedpc_dsp))]
    {
        let mut sink = sink;
        for (i, row) in matrix.chunks_exact(vector.len().max(1)).enumerate() {
            sink(i, dot_i16_portable(row, vector));
        }
    }
}

/// Calls `sink(i, sum_k matrix[i][k] vector[k])` for every row `i` of the row-major `matrix`
/// with `vector.len()` columns, with each sum modulo `2^64` as in [`dot_i32_wrapping`].
pub fn rows_dot_i32_wrapping(matrix: &[i32], vector: &[i32], sink: impl FnMut(usize, i64)) {
    #[cfg(fixedpc_dsp)]
    {
        dsp::rows_dot_i32_wrapping(matrix, vector, sink)
    }
    #[cfg(not(fixedpc_dsp))]
    {
        let mut sink = sink;
        for (i, row) in matrix.chunks_exact(vector.len().max(1)).enumerate() {
            sink(i, dot_i32_wrapping_portable(row, vector));
        }
    }
}

/// Calls `sink(j, sum_i matrix[i][j] vector[i])` for every column `j < columns` of the
/// row-major `matrix` with `vector.len()` rows, with each sum exact as in [`dot_i16`].
///
/// Two columns share each pass down the rows. With the DSP extension, the assembly loop takes
/// two rows per iteration and packs the four weights into two `SMLALD` operands.
pub fn columns_dot_i16(
    matrix: &[i16],
    vector: &[i16],
    columns: usize,
    sink: impl FnMut(usize, i64),
) {
    #[cfg(fixedpc_dsp)]
    {
        dsp::columns_dot_i16(matrix, vector, columns, sink)
    }
    #[cfg(not(fixedpc_dsp))]
    {
        columns_dot_i16_portable(matrix, vector, columns, sink)
    }
}

/// Computes [`columns_dot_i16`] with plain loops.
pub fn columns_dot_i16_portable(
    matrix: &[i16],
    vector: &[i16],
    columns: usize,
    mut sink: impl FnMut(usize, i64),
) {
    if columns == 0 {
        return;
    }
    let rows = matrix.chunks_exact(columns).zip(vector);
    let mut j = 0;
    while j + 1 < columns {
        let (mut first, mut second) = (0i64, 0i64);
        for (row, &element) in rows.clone() {
            let pair = &row[j..j + 2];
            first += (pair[0] as i32 * element as i32) as i64;
            second += (pair[1] as i32 * element as i32) as i64;
        }
        sink(j, first);
        sink(j + 1, second);
        j += 2;
    }
    if j < columns {
        let sum = rows.fold(0i64, |sum, (row, &element)| {
            sum + (row[j] as i32 * element as i32) as i64
        });
        sink(j, sum);
    }
}

/// Calls `sink(j, sum_i matrix[i][j] vector[i])` for every column `j < columns` of the
/// row-major `matrix` with `vector.len()` rows, with each sum modulo `2^64` as in
/// [`dot_i32_wrapping`].
pub fn columns_dot_i32_wrapping(
    matrix: &[i32],
    vector: &[i32],
    columns: usize,
    sink: impl FnMut(usize, i64),
) {
    #[cfg(fixedpc_dsp)]
    {
        dsp::columns_dot_i32_wrapping(matrix, vector, columns, sink)
    }
    #[cfg(not(fixedpc_dsp))]
    {
        columns_dot_i32_wrapping_portable(matrix, vector, columns, sink)
    }
}

/// Computes [`columns_dot_i32_wrapping`] with plain loops.
pub fn columns_dot_i32_wrapping_portable(
    matrix: &[i32],
    vector: &[i32],
    columns: usize,
    mut sink: impl FnMut(usize, i64),
) {
    if columns == 0 {
        return;
    }
    let rows = matrix.chunks_exact(columns).zip(vector);
    let mut j = 0;
    while j + 1 < columns {
        let (mut first, mut second) = (0i64, 0i64);
        for (row, &element) in rows.clone() {
            let pair = &row[j..j + 2];
            first = first.wrapping_add(pair[0] as i64 * element as i64);
            second = second.wrapping_add(pair[1] as i64 * element as i64);
        }
        sink(j, first);
        sink(j + 1, second);
        j += 2;
    }
    if j < columns {
        let sum = rows.fold(0i64, |sum, (row, &element)| {
            sum.wrapping_add(row[j] as i64 * element as i64)
        });
        sink(j, sum);
    }
}

/// Computes [`dot_i16`] with a plain loop, for targets without the DSP extension and for tests.
pub fn dot_i16_portable(a: &[i16], b: &[i16]) -> i64 {
    a.iter()
        .zip(b)
        .fold(0i64, |sum, (&x, &y)| sum + (x as i32 * y as i32) as i64)
}

/// Computes [`dot_i32_wrapping`] with a plain loop, for targets without the DSP extension and
/// for tests.
pub fn dot_i32_wrapping_portable(a: &[i32], b: &[i32]) -> i64 {
    a.iter()
        .zip(b)
        .fold(0i64, |sum, (&x, &y)| sum.wrapping_add(x as i64 * y as i64))
}

#[cfg(fixedpc_dsp)]
mod products;
#[cfg(fixedpc_dsp)]
pub(crate) use products::{
    matrix_product_q12, matrix_product_q16, transposed_product_q12, transposed_product_q16,
    vector_bounded_q16,
};

#[cfg(fixedpc_dsp)]
mod dsp {
    use super::{dot_i16_portable, dot_i32_wrapping_portable};

    /// Values of 16 bits per iteration of the `SMLALD` loop: two `LDM`s of four words.
    const I16_BLOCK: usize = 16;
    /// Values of 32 bits per iteration of the `SMLAL` loop.
    const I32_BLOCK: usize = 8;

    /// Returns how many leading values bring both slices to the 4-byte alignment that `LDM`
    /// needs, or `None` when one slice is aligned and the other is not. The caller then falls
    /// back to the portable loop.
    fn aligned_start<T>(a: &[T], b: &[T]) -> Option<usize> {
        let size = core::mem::size_of::<T>();
        let misaligned_a = (a.as_ptr() as usize) & 3;
        let misaligned_b = (b.as_ptr() as usize) & 3;
        if misaligned_a != misaligned_b {
            return None;
        }
        let skip = ((4 - misaligned_a) & 3) / size;
        Some(skip.min(a.len()))
    }

    #[inline(always)]
    pub(super) fn dot_i16(a: &[i16], b: &[i16]) -> i64 {
        let Some(head) = aligned_start(a, b) else {
            return dot_i16_portable(a, b);
        };
        let blocks = (a.len() - head) / I16_BLOCK;
        let body = head + blocks * I16_BLOCK;
        let mut low = 0u32;
        let mut high = 0u32;
        if blocks > 0 {
            // SAFETY: `a[head..body]` and `b[head..body]` are in bounds, start 4-byte aligned
            // (checked above) and hold `blocks * 16` values, exactly the 32 bytes per block
            // that each pointer advances. The asm reads only those bytes, writes only the
            // declared registers, and leaves the stack untouched.
            unsafe {
                core::arch::asm!(
                    "2:",
                    "ldm r0!, {{r4, r5, r8, r9}}",
                    "ldm r1!, {{r10, r11}}",
                    "smlald r3, r12, r4, r10",
                    "smlald r3, r12, r5, r11",
                    "ldm r1!, {{r10, r11}}",
                    "smlald r3, r12, r8, r10",
                    "smlald r3, r12, r9, r11",
                    "ldm r0!, {{r4, r5, r8, r9}}",
                    "ldm r1!, {{r10, r11}}",
                    "smlald r3, r12, r4, r10",
                    "smlald r3, r12, r5, r11",
                    "ldm r1!, {{r10, r11}}",
                    "smlald r3, r12, r8, r10",
                    "smlald r3, r12, r9, r11",
                    "subs r2, r2, #1",
                    "bne 2b",
                    inout("r0") a[head..].as_ptr() => _,
                    inout("r1") b[head..].as_ptr() => _,
                    inout("r2") blocks => _,
                    inout("r3") low,
                    inout("r12") high,
                    out("r4") _,
                    out("r5") _,
                    out("r8") _,
                    out("r9") _,
                    out("r10") _,
                    out("r11") _,
                    options(nostack, readonly),
                );
            }
        }
        let sum = ((high as u64) << 32 | low as u64) as i64;
        sum + dot_i16_portable(&a[..head], &b[..head]) + dot_i16_portable(&a[body..], &b[body..])
    }

    /// Columns per iteration of the two-row `SMLALD` loop.
    const PAIR_BLOCK: usize = 8;

    fn is_word_aligned<T>(values: &[T]) -> bool {
        (values.as_ptr() as usize) & 3 == 0
    }

    pub(super) fn rows_dot_i16(matrix: &[i16], vector: &[i16], mut sink: impl FnMut(usize, i64)) {
        let columns = vector.len();
        if columns == 0 {
            return;
        }
        let rows = matrix.len() / columns;
        // Every row starts word-aligned when the matrix does and a row is a whole number of
        // words. Other shapes take the single-row path, which handles alignment.
        if !(is_word_aligned(matrix) && is_word_aligned(vector) && columns.is_multiple_of(2)) {
            for (i, row) in matrix.chunks_exact(columns).enumerate() {
                sink(i, dot_i16(row, vector));
            }
            return;
        }
        let blocks = columns / PAIR_BLOCK;
        let body = blocks * PAIR_BLOCK;
        let mut i = 0;
        while i + 1 < rows {
            let first = &matrix[i * columns..(i + 1) * columns];
            let second = &matrix[(i + 1) * columns..(i + 2) * columns];
            let (mut low0, mut high0, mut low1, mut high1) = (0u32, 0u32, 0u32, 0u32);
            if blocks > 0 {
                // SAFETY: `vector`, `first` and `second` are in bounds and word-aligned, as
                // checked above. Each holds at least `blocks * 8` values, which are the 16 bytes
                // per block that each pointer advances. The asm reads only those bytes, writes
                // only the declared registers, and leaves the stack untouched.
                unsafe {
                    core::arch::asm!(
                        "2:",
                        "ldm r0!, {{r10, r11}}",
                        "ldm r1!, {{r12, lr}}",
                        "smlald r4, r5, r12, r10",
                        "smlald r4, r5, lr, r11",
                        "ldm r2!, {{r12, lr}}",
                        "smlald r8, r9, r12, r10",
                        "smlald r8, r9, lr, r11",
                        "ldm r0!, {{r10, r11}}",
                        "ldm r1!, {{r12, lr}}",
                        "smlald r4, r5, r12, r10",
                        "smlald r4, r5, lr, r11",
                        "ldm r2!, {{r12, lr}}",
                        "smlald r8, r9, r12, r10",
                        "smlald r8, r9, lr, r11",
                        "subs r3, r3, #1",
                        "bne 2b",
                        inout("r0") vector.as_ptr() => _,
                        inout("r1") first.as_ptr() => _,
                        inout("r2") second.as_ptr() => _,
                        inout("r3") blocks => _,
                        inout("r4") low0,
                        inout("r5") high0,
                        inout("r8") low1,
                        inout("r9") high1,
                        out("r10") _,
                        out("r11") _,
                        out("r12") _,
                        out("lr") _,
                        options(nostack, readonly),
                    );
                }
            }
            let tail = &vector[body..];
            let sum0 = ((high0 as u64) << 32 | low0 as u64) as i64;
            let sum1 = ((high1 as u64) << 32 | low1 as u64) as i64;
            sink(i, sum0 + dot_i16_portable(&first[body..], tail));
            sink(i + 1, sum1 + dot_i16_portable(&second[body..], tail));
            i += 2;
        }
        if i < rows {
            sink(i, dot_i16(&matrix[i * columns..(i + 1) * columns], vector));
        }
    }

    pub(super) fn rows_dot_i32_wrapping(
        matrix: &[i32],
        vector: &[i32],
        mut sink: impl FnMut(usize, i64),
    ) {
        let columns = vector.len();
        if columns == 0 {
            return;
        }
        for (i, row) in matrix.chunks_exact(columns).enumerate() {
            sink(i, dot_i32_wrapping(row, vector));
        }
    }

    pub(super) fn columns_dot_i16(
        matrix: &[i16],
        vector: &[i16],
        columns: usize,
        mut sink: impl FnMut(usize, i64),
    ) {
        if columns == 0 {
            return;
        }
        let rows = vector.len().min(matrix.len() / columns);
        let pairs = rows / 2;
        let stride = columns * 2;
        let mut j = 0;
        while j + 1 < columns {
            let (mut low0, mut high0, mut low1, mut high1) = (0u32, 0u32, 0u32, 0u32);
            if pairs > 0 {
                // SAFETY: the loop reads the words at `matrix[i * columns + j]` (two values,
                // `j + 1 < columns`) for `i < 2 * pairs <= rows` and the words at `vector[i]`
                // for even `i < 2 * pairs`, all in bounds. Unaligned `LDR` is allowed on
                // Armv7-M unless the program sets `CCR.UNALIGN_TRP`, which fixedpc firmware
                // does not. The asm writes only the declared registers and leaves the stack
                // untouched.
                unsafe {
                    core::arch::asm!(
                        "2:",
                        "ldr r8, [r0]",
                        "ldr r9, [r0, r1]",
                        "add r0, r0, r1, lsl #1",
                        "ldr r10, [r2], #4",
                        // r11 = (w[i][j], w[i+1][j]) and r9 = (w[i][j+1], w[i+1][j+1]).
                        "pkhbt r11, r8, r9, lsl #16",
                        "pkhtb r9, r9, r8, asr #16",
                        "smlald r4, r5, r11, r10",
                        "smlald r12, lr, r9, r10",
                        "subs r3, r3, #1",
                        "bne 2b",
                        inout("r0") matrix[j..].as_ptr() => _,
                        in("r1") stride,
                        inout("r2") vector.as_ptr() => _,
                        inout("r3") pairs => _,
                        inout("r4") low0,
                        inout("r5") high0,
                        inout("r12") low1,
                        inout("lr") high1,
                        out("r8") _,
                        out("r9") _,
                        out("r10") _,
                        out("r11") _,
                        options(nostack, readonly),
                    );
                }
            }
            let mut first = ((high0 as u64) << 32 | low0 as u64) as i64;
            let mut second = ((high1 as u64) << 32 | low1 as u64) as i64;
            if rows % 2 == 1 {
                let last = rows - 1;
                let element = vector[last] as i32;
                first += (matrix[last * columns + j] as i32 * element) as i64;
                second += (matrix[last * columns + j + 1] as i32 * element) as i64;
            }
            sink(j, first);
            sink(j + 1, second);
            j += 2;
        }
        if j < columns {
            let sum = (0..rows).fold(0i64, |sum, i| {
                sum + (matrix[i * columns + j] as i32 * vector[i] as i32) as i64
            });
            sink(j, sum);
        }
    }

    pub(super) fn columns_dot_i32_wrapping(
        matrix: &[i32],
        vector: &[i32],
        columns: usize,
        mut sink: impl FnMut(usize, i64),
    ) {
        if columns == 0 {
            return;
        }
        let rows = vector.len().min(matrix.len() / columns);
        let pairs = rows / 2;
        let stride = columns * 4;
        let mut j = 0;
        while j + 1 < columns {
            let (mut low0, mut high0, mut low1, mut high1) = (0u32, 0u32, 0u32, 0u32);
            if pairs > 0 {
                // SAFETY: the loop reads `matrix[i * columns + j]` and the value after it
                // (`j + 1 < columns`) for `i < 2 * pairs <= rows`, and `vector[i]` for the same
                // `i`, all in bounds and word-aligned as every `i32` is, which `LDRD` needs.
                // The asm writes only the declared registers and leaves the stack untouched.
                unsafe {
                    core::arch::asm!(
                        "2:",
                        "ldrd r8, r9, [r0]",
                        "add r0, r0, r1",
                        "ldr r10, [r2], #4",
                        "smlal r4, r5, r8, r10",
                        "smlal r12, lr, r9, r10",
                        "ldrd r8, r9, [r0]",
                        "add r0, r0, r1",
                        "ldr r10, [r2], #4",
                        "smlal r4, r5, r8, r10",
                        "smlal r12, lr, r9, r10",
                        "subs r3, r3, #1",
                        "bne 2b",
                        inout("r0") matrix[j..].as_ptr() => _,
                        in("r1") stride,
                        inout("r2") vector.as_ptr() => _,
                        inout("r3") pairs => _,
                        inout("r4") low0,
                        inout("r5") high0,
                        inout("r12") low1,
                        inout("lr") high1,
                        out("r8") _,
                        out("r9") _,
                        out("r10") _,
                        options(nostack, readonly),
                    );
                }
            }
            let mut first = ((high0 as u64) << 32 | low0 as u64) as i64;
            let mut second = ((high1 as u64) << 32 | low1 as u64) as i64;
            if rows % 2 == 1 {
                let last = rows - 1;
                let element = vector[last] as i64;
                first = first.wrapping_add(matrix[last * columns + j] as i64 * element);
                second = second.wrapping_add(matrix[last * columns + j + 1] as i64 * element);
            }
            sink(j, first);
            sink(j + 1, second);
            j += 2;
        }
        if j < columns {
            let sum = (0..rows).fold(0i64, |sum, i| {
                sum.wrapping_add(matrix[i * columns + j] as i64 * vector[i] as i64)
            });
            sink(j, sum);
        }
    }

    #[inline(always)]
    pub(super) fn dot_i32_wrapping(a: &[i32], b: &[i32]) -> i64 {
        let Some(head) = aligned_start(a, b) else {
            return dot_i32_wrapping_portable(a, b);
        };
        let blocks = (a.len() - head) / I32_BLOCK;
        let body = head + blocks * I32_BLOCK;
        let mut low = 0u32;
        let mut high = 0u32;
        if blocks > 0 {
            // SAFETY: as in `dot_i16`, with 8 values of 4 bytes per block and pointer.
            unsafe {
                core::arch::asm!(
                    "2:",
                    "ldm r0!, {{r4, r5, r8, r9}}",
                    "ldm r1!, {{r10, r11}}",
                    "smlal r3, r12, r4, r10",
                    "smlal r3, r12, r5, r11",
                    "ldm r1!, {{r10, r11}}",
                    "smlal r3, r12, r8, r10",
                    "smlal r3, r12, r9, r11",
                    "ldm r0!, {{r4, r5, r8, r9}}",
                    "ldm r1!, {{r10, r11}}",
                    "smlal r3, r12, r4, r10",
                    "smlal r3, r12, r5, r11",
                    "ldm r1!, {{r10, r11}}",
                    "smlal r3, r12, r8, r10",
                    "smlal r3, r12, r9, r11",
                    "subs r2, r2, #1",
                    "bne 2b",
                    inout("r0") a[head..].as_ptr() => _,
                    inout("r1") b[head..].as_ptr() => _,
                    inout("r2") blocks => _,
                    inout("r3") low,
                    inout("r12") high,
                    out("r4") _,
                    out("r5") _,
                    out("r8") _,
                    out("r9") _,
                    out("r10") _,
                    out("r11") _,
                    options(nostack, readonly),
                );
            }
        }
        let sum = ((high as u64) << 32 | low as u64) as i64;
        sum.wrapping_add(dot_i32_wrapping_portable(&a[..head], &b[..head]))
            .wrapping_add(dot_i32_wrapping_portable(&a[body..], &b[body..]))
    }
}
