//! Matrix and transposed products, each in one assembly routine that also rounds to the output
//! format, for targets with the DSP extension.
//!
//! Each routine computes `saturate((sum + 2^(f-1)) >> f)` per output, with `f` the fraction
//! bits of the format (12 for `I4F12`, 16 for `I16F16`) and `sum` the exact sum of raw
//! products. The accumulators start at the rounding bias. Most are 64 bits wide. Under the
//! bound that each caller checks, the shifted value fits an `i32`, so one shift and one `ORR`
//! combine the two words of the accumulator into the result. `SSAT` then saturates to `i16`
//! (`I4F12`), or tests that the result fits an `i32` (`I16F16`). The `I4F12` transposed
//! product sums eight columns at a time in 32-bit accumulators, where one `SSAT` with a shift
//! rounds and saturates. Two events set the sticky Q flag: `SSAT` clamping, and `SMLA<x><y>`
//! overflowing a 32-bit accumulator. So each routine clears Q first and returns `false` when Q
//! is set at the end, and the caller then recomputes the product on its general path, which
//! counts every saturated output. That path is also taken for shapes the routines do not
//! handle, for which they return `false` without writing.
//!
//! LLVM reserves `r6` and `r7` on Thumb, so they cannot be `asm!` operands. The routines save
//! both on the stack and use them as scratch, which leaves 14 registers for the loops. Values
//! that a loop does not need in registers live on the stack, where one `LDM` from `sp` reloads
//! them at the start of each row or group of columns.

// NOTE: on Cortex-M4 (QEMU mps2-an386, `scripts/bench`), the `I4F12` transposed product
// measured 1.53 (64x64) and 1.47 (256x256) instructions per multiply-accumulate, against a
// target of 1.0. A weight word contains two columns of one row, so each 16-bit product needs
// its own `SMLA<x><y>`, and row-major weights cannot reach 1.0. Inference firmware avoids
// this product with a transposed copy of the weights (`Network::with_transposed`).
use core::arch::asm;

/// The sticky saturation bit (Q) of the APSR.
const Q_FLAG: u32 = 1 << 27;

fn is_word_aligned<T>(values: &[T]) -> bool {
    (values.as_ptr() as usize) & 3 == 0
}

/// Eight columns of one row of the `I4F12` matrix product: `r0` walks the vector, `r1` the
/// matrix and `r12`, `lr` hold the 64-bit accumulator.
macro_rules! q12_row_block {
    () => {
        concat!(
            "ldm r0!, {{r4, r5, r6, r7}}\n",
            "ldm r1!, {{r8, r9, r10, r11}}\n",
            "smlald r12, lr, r4, r8\n",
            "smlald r12, lr, r5, r9\n",
            "smlald r12, lr, r6, r10\n",
            "smlald r12, lr, r7, r11\n",
        )
    };
}

/// Four columns of one row of the `I16F16` matrix product, with the registers of
/// [`q12_row_block`].
macro_rules! q16_row_block {
    () => {
        concat!(
            "ldm r0!, {{r4, r5, r6, r7}}\n",
            "ldm r1!, {{r8, r9, r10, r11}}\n",
            "smlal r12, lr, r4, r8\n",
            "smlal r12, lr, r5, r9\n",
            "smlal r12, lr, r6, r10\n",
            "smlal r12, lr, r7, r11\n",
        )
    };
}

/// Runs a matrix product routine: for each output row, `$iterations` passes of `$block` along
/// the row, then `$finish`, which rounds the accumulator `r12`, `lr` and stores the result
/// through `r2`. Evaluates to the APSR at the end.
///
/// Stack frame after the prologue: the vector pointer, the iteration count, the end of the
/// output, and the accumulator's start value (the bias, then 0). At the start of each row,
/// one `LDM` reloads them into `r0`, `r3`, `r4`, `r12` and `lr`. The matrix pointer `r1` runs
/// on from one row to the next, because the rows are contiguous.
macro_rules! rows_routine {
    (
        bias: $bias:expr,
        block: $block:expr,
        finish: $finish:expr,
        vector: $vector:expr,
        matrix: $matrix:expr,
        out: $out:expr,
        out_end: $out_end:expr,
        iterations: $iterations:expr $(,)?
    ) => {{
        let status: u32;
        asm!(
            "push {{r6, r7}}",
            "movs r6, #0",
            "msr APSR_nzcvq, r6",
            "mov r5, #{bias}",
            "push {{r0, r3, r4, r5, r6}}",
            "1:",
            "ldm sp, {{r0, r3, r4, r12, lr}}",
            "cmp r2, r4",
            "beq 3f",
            "2:",
            $block,
            "subs r3, r3, #1",
            "bne 2b",
            $finish,
            "b 1b",
            "3:",
            "mrs r5, APSR",
            "add sp, sp, #20",
            "pop {{r6, r7}}",
            bias = const $bias,
            inout("r0") $vector => _,
            inout("r1") $matrix => _,
            inout("r2") $out => _,
            inout("r3") $iterations => _,
            inout("r4") $out_end => _,
            out("r5") status,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            out("r12") _,
            out("lr") _,
        );
        status
    }};
}

/// Rounds the `I4F12` accumulator `r12`, `lr` (bias included) and stores it through `r2`.
macro_rules! q12_row_finish {
    () => {
        concat!(
            "lsr r12, r12, #12\n",
            "orr r12, r12, lr, lsl #20\n",
            "ssat r12, #16, r12\n",
            "strh r12, [r2], #2\n",
        )
    };
}

/// Rounds the `I16F16` accumulator `r12`, `lr` (bias included) and stores it through `r2`.
/// The result fits an `i32` exactly when the high word fits 16 bits, which `SSAT` tests.
macro_rules! q16_row_finish {
    () => {
        concat!(
            "lsr r12, r12, #16\n",
            "orr r12, r12, lr, lsl #16\n",
            "ssat lr, #16, lr\n",
            "str r12, [r2], #4\n",
        )
    };
}

/// Writes `out[i] = saturate((sum_k matrix[i][k] vector[k] + 2^11) >> 12)` for the raw
/// `I4F12` values of a row-major `matrix` with `vector.len()` columns, which is
/// `I4F12::matrix_product` with scale one.
///
/// Returns `false` when it wrote nothing because the shape is not handled, or when an output
/// saturated; the caller then recomputes every output. Handled: columns a multiple of 8 and
/// below `2^13`, at least `out.len()` rows, and `matrix` and `vector` word-aligned.
pub(crate) fn matrix_product_q12(matrix: &[i16], vector: &[i16], out: &mut [i16]) -> bool {
    const BLOCK: usize = 8;
    const UNROLL: usize = 4;
    let columns = vector.len();
    let rows = out.len();
    // Fewer than 2^13 products of magnitude at most 2^30 keep the biased sum below 2^43, so
    // the sum shifted right by 12 fits an i32.
    let handled = columns > 0
        && columns.is_multiple_of(BLOCK)
        && columns < 1 << 13
        && rows > 0
        && matrix.len() / columns >= rows
        && is_word_aligned(matrix)
        && is_word_aligned(vector);
    if !handled {
        return false;
    }

    let out_range = out.as_mut_ptr_range();
    // SAFETY: each row pass reads `columns` values of `vector` and of the current row, from
    // word-aligned addresses because both slices start aligned (checked above) and a row is a
    // whole number of words. The rows read are the first `out.len()` rows of `matrix`, all in
    // bounds. Each row writes one value of `out`, from its start to its end. The routine
    // restores `sp`, `r6` and `r7`, and writes only the declared registers, the flags, and
    // its own stack frame.
    let status = unsafe {
        if columns.is_multiple_of(BLOCK * UNROLL) {
            rows_routine!(
                bias: 1 << 11,
                block: concat!(
                    q12_row_block!(),
                    q12_row_block!(),
                    q12_row_block!(),
                    q12_row_block!()
                ),
                finish: q12_row_finish!(),
                vector: vector.as_ptr(),
                matrix: matrix.as_ptr(),
                out: out_range.start,
                out_end: out_range.end,
                iterations: columns / (BLOCK * UNROLL),
            )
        } else {
            rows_routine!(
                bias: 1 << 11,
                block: q12_row_block!(),
                finish: q12_row_finish!(),
                vector: vector.as_ptr(),
                matrix: matrix.as_ptr(),
                out: out_range.start,
                out_end: out_range.end,
                iterations: columns / BLOCK,
            )
        }
    };

    status & Q_FLAG == 0
}

/// Writes `out[i] = saturate((sum_k matrix[i][k] vector[k] + 2^15) >> 16)` for the raw
/// `I16F16` values of a row-major `matrix` with `vector.len()` columns, which is
/// `I16F16::matrix_product` with scale one.
///
/// The caller must have checked that every partial sum fits an `i64`
/// (`partial_sums_fit_i64`), so that the 64-bit accumulator is the exact sum. Returns
/// `false` as [`matrix_product_q12`] does. Handled: columns a multiple of 4 and at least
/// `out.len()` rows.
pub(crate) fn matrix_product_q16(matrix: &[i32], vector: &[i32], out: &mut [i32]) -> bool {
    const BLOCK: usize = 4;
    const UNROLL: usize = 4;
    let columns = vector.len();
    let rows = out.len();
    let handled =
        columns > 0 && columns.is_multiple_of(BLOCK) && rows > 0 && matrix.len() / columns >= rows;
    if !handled {
        return false;
    }

    let out_range = out.as_mut_ptr_range();
    // SAFETY: as in `matrix_product_q12`; `i32` values are always word-aligned.
    let status = unsafe {
        if columns.is_multiple_of(BLOCK * UNROLL) {
            rows_routine!(
                bias: 1 << 15,
                block: concat!(
                    q16_row_block!(),
                    q16_row_block!(),
                    q16_row_block!(),
                    q16_row_block!()
                ),
                finish: q16_row_finish!(),
                vector: vector.as_ptr(),
                matrix: matrix.as_ptr(),
                out: out_range.start,
                out_end: out_range.end,
                iterations: columns / (BLOCK * UNROLL),
            )
        } else {
            rows_routine!(
                bias: 1 << 15,
                block: q16_row_block!(),
                finish: q16_row_finish!(),
                vector: vector.as_ptr(),
                matrix: matrix.as_ptr(),
                out: out_range.start,
                out_end: out_range.end,
                iterations: columns / BLOCK,
            )
        }
    };

    status & Q_FLAG == 0
}

/// Returns `true` when every value of `vector` lies in `[-2^b, 2^b)`, where `b` is 25, 23,
/// 21, 19 or 15 for lengths up to 64, 256, 1024, 4096 or 65,536, so that `len * 2^b` is at
/// most `2^31`. Then `sum_k |x_k| < 2^32`, the
/// bound under which the `I16F16` products sum exactly in 64 bits (see the `scalar` module).
/// `false` proves nothing: the caller then runs the exact test.
///
/// One `SSAT` per value saturates it to `b + 1` bits, and a value out of range sets the sticky
/// Q flag, so a vector costs about 1.4 instructions per value against about 4 for the exact
/// sum of magnitudes.
#[inline(always)]
pub(crate) fn vector_bounded_q16(vector: &[i32]) -> bool {
    match vector.len() {
        0..=64 => bounded::<26>(vector),
        65..=256 => bounded::<24>(vector),
        257..=1024 => bounded::<22>(vector),
        1025..=4096 => bounded::<20>(vector),
        4097..=65536 => bounded::<16>(vector),
        _ => false,
    }
}

/// `SSAT` of the eight registers that [`bounded`] loads, to the `bits` operand of its `asm!`.
macro_rules! ssat_eight {
    () => {
        concat!(
            "ssat r2, #{bits}, r2\n",
            "ssat r3, #{bits}, r3\n",
            "ssat r4, #{bits}, r4\n",
            "ssat r5, #{bits}, r5\n",
            "ssat r8, #{bits}, r8\n",
            "ssat r9, #{bits}, r9\n",
            "ssat r10, #{bits}, r10\n",
            "ssat r11, #{bits}, r11\n",
        )
    };
}

/// [`vector_bounded_q16`] for values of `BITS` bits: `SSAT` on sixteen values per iteration,
/// loaded by two `LDM`s, then a comparison in Rust for the last `len % 16`.
#[inline(always)]
fn bounded<const BITS: u32>(vector: &[i32]) -> bool {
    const BLOCK: usize = 16;
    let limit = 1i32 << (BITS - 1);
    let (blocks, rest) = vector.split_at(vector.len() - vector.len() % BLOCK);
    if !rest.iter().all(|x| (-limit..limit).contains(x)) {
        return false;
    }
    if blocks.is_empty() {
        return true;
    }

    let range = blocks.as_ptr_range();
    let status: u32;
    // SAFETY: the loop reads eight words per `LDM` from `range.start` up to `range.end`. Both
    // lie in `vector` and differ by a non-zero multiple of 64 bytes, and `i32` values are
    // word-aligned. The loop writes only the declared registers and the flags.
    unsafe {
        asm!(
            "movs r2, #0",
            "msr APSR_nzcvq, r2",
            "1:",
            // Two loads of eight values, each value saturated to `BITS` bits.
            "ldm r0!, {{r2, r3, r4, r5, r8, r9, r10, r11}}",
            ssat_eight!(),
            "ldm r0!, {{r2, r3, r4, r5, r8, r9, r10, r11}}",
            ssat_eight!(),
            "cmp r0, r1",
            "bne 1b",
            "mrs r2, APSR",
            bits = const BITS,
            inout("r0") range.start => _,
            in("r1") range.end,
            out("r2") status,
            out("r3") _,
            out("r4") _,
            out("r5") _,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            options(nostack, readonly),
        );
    }
    status & Q_FLAG == 0
}

/// Two rows of four columns of the `I4F12` transposed product. `r1` walks the vector two
/// values at a time, and `r0` walks down the columns by the row stride in the low half of
/// `r2`. `r4` to `r11` are four 64-bit accumulators. `SMLAL<x><y>` multiplies one half of a
/// weight word by one half of the vector word, so the weights need no repacking.
macro_rules! q12_column_block {
    () => {
        concat!(
            "ldr r3, [r1], #4\n",
            "ldrd r12, lr, [r0]\n",
            "uxtah r0, r0, r2\n",
            "smlalbb r4, r5, r12, r3\n",
            "smlaltb r6, r7, r12, r3\n",
            "smlalbb r8, r9, lr, r3\n",
            "smlaltb r10, r11, lr, r3\n",
            "ldrd r12, lr, [r0]\n",
            "uxtah r0, r0, r2\n",
            "smlalbt r4, r5, r12, r3\n",
            "smlaltt r6, r7, r12, r3\n",
            "smlalbt r8, r9, lr, r3\n",
            "smlaltt r10, r11, lr, r3\n",
        )
    };
}

/// One row of four columns of the `I16F16` transposed product, with the registers of
/// [`q12_column_block`]. `q16_column_block!(checked)` also saturates the vector value to 26
/// bits, which sets the Q flag when it lies outside `[-2^25, 2^25)`. For at most 64 rows that
/// proves the bound of [`vector_bounded_q16`] on the way.
macro_rules! q16_column_block {
    () => {
        q16_column_block!("")
    };
    (checked) => {
        q16_column_block!("ssat r3, #26, r3\n")
    };
    ($check:expr) => {
        concat!(
            "ldr r3, [r1], #4\n",
            $check,
            "ldrd r12, lr, [r0]\n",
            "smlal r4, r5, r12, r3\n",
            "smlal r6, r7, lr, r3\n",
            "ldrd r12, lr, [r0, #8]\n",
            "smlal r8, r9, r12, r3\n",
            "smlal r10, r11, lr, r3\n",
            "uxtah r0, r0, r2\n",
        )
    };
}

/// Sixteen rows of [`q16_column_block`], with the same argument.
macro_rules! q16_column_block_x16 {
    ($($check:tt)?) => {
        concat!(
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?),
            q16_column_block!($($check)?)
        )
    };
}

/// Runs a transposed product routine: for each group of four columns, passes of `$block` down
/// the rows, then `$finish`, which rounds the four accumulators into `r4`, `r6`, `r8` and
/// `r10` and stores them through `r12`. Evaluates to the APSR at the end.
///
/// `$counter` packs the row stride in bytes (low 16 bits) with the number of passes minus one
/// (high 16 bits). `UXTAH` adds the stride to the matrix pointer and `SUBS` counts the passes
/// down in the high half, so one register serves both. Stack frame after the prologue: the
/// matrix pointer of the current group of columns, the vector pointer, the counter, the
/// accumulators' start values (the bias, then 0, four times), the output pointer and the end
/// of the output. One `LDM` reloads the first eleven into `r0`, `r1`, `r2` and `r4` to `r11`.
macro_rules! columns_routine {
    (
        bias: $bias:expr,
        block: $block:expr,
        finish: $finish:expr,
        group_bytes: $group_bytes:expr,
        matrix: $matrix:expr,
        vector: $vector:expr,
        counter: $counter:expr,
        out: $out:expr,
        out_end: $out_end:expr $(,)?
    ) => {{
        let status: u32;
        asm!(
            "push {{r6, r7}}",
            "movs r6, #0",
            "msr APSR_nzcvq, r6",
            "mov r5, #{bias}",
            "push {{r3, r4}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r0, r1, r2}}",
            "1:",
            "ldm sp, {{r0, r1, r2, r4, r5, r6, r7, r8, r9, r10, r11}}",
            "2:",
            $block,
            "subs r2, r2, #0x10000",
            "bcs 2b",
            "ldr r12, [sp, #44]",
            $finish,
            "ldr lr, [sp, #48]",
            "str r12, [sp, #44]",
            "ldr r0, [sp]",
            "add r0, r0, #{group_bytes}",
            "str r0, [sp]",
            "cmp r12, lr",
            "bne 1b",
            "mrs r5, APSR",
            "add sp, sp, #52",
            "pop {{r6, r7}}",
            bias = const $bias,
            group_bytes = const $group_bytes,
            inout("r0") $matrix => _,
            inout("r1") $vector => _,
            inout("r2") $counter => _,
            inout("r3") $out => _,
            inout("r4") $out_end => _,
            out("r5") status,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            out("r12") _,
            out("lr") _,
        );
        status
    }};
}

/// Rounds the four `I4F12` accumulators and stores them through `r12`.
macro_rules! q12_column_finish {
    () => {
        concat!(
            "lsr r4, r4, #12\n",
            "orr r4, r4, r5, lsl #20\n",
            "ssat r4, #16, r4\n",
            "lsr r6, r6, #12\n",
            "orr r6, r6, r7, lsl #20\n",
            "ssat r6, #16, r6\n",
            "lsr r8, r8, #12\n",
            "orr r8, r8, r9, lsl #20\n",
            "ssat r8, #16, r8\n",
            "lsr r10, r10, #12\n",
            "orr r10, r10, r11, lsl #20\n",
            "ssat r10, #16, r10\n",
            "strh r4, [r12], #2\n",
            "strh r6, [r12], #2\n",
            "strh r8, [r12], #2\n",
            "strh r10, [r12], #2\n",
        )
    };
}

/// Rounds the four `I16F16` accumulators, tests that each fits an `i32` as
/// [`q16_row_finish`] does, and stores them through `r12`.
macro_rules! q16_column_finish {
    () => {
        concat!(
            "lsr r4, r4, #16\n",
            "orr r4, r4, r5, lsl #16\n",
            "ssat r5, #16, r5\n",
            "lsr r6, r6, #16\n",
            "orr r6, r6, r7, lsl #16\n",
            "ssat r7, #16, r7\n",
            "lsr r8, r8, #16\n",
            "orr r8, r8, r9, lsl #16\n",
            "ssat r9, #16, r9\n",
            "lsr r10, r10, #16\n",
            "orr r10, r10, r11, lsl #16\n",
            "ssat r11, #16, r11\n",
            "stm r12!, {{r4, r6, r8, r10}}\n",
        )
    };
}

/// Returns the `counter` operand of [`columns_routine`], or `None` when the stride or the
/// number of passes does not fit its 16-bit half.
fn column_counter(stride_bytes: usize, passes: usize) -> Option<usize> {
    if stride_bytes < 1 << 16 && (1..=1 << 16).contains(&passes) {
        Some((passes - 1) << 16 | stride_bytes)
    } else {
        None
    }
}

/// Two rows of eight columns of the `I4F12` transposed product, with the registers of
/// [`q12_column_block`] except that `r4` to `r11` are eight 32-bit accumulators. `SMLA<x><y>`
/// sets Q when an accumulation overflows, so the routine then returns `false` as it does for
/// a saturated output.
macro_rules! q12_column8_block {
    () => {
        concat!(
            "ldr r3, [r1], #4\n",
            "ldrd r12, lr, [r0]\n",
            "smlabb r4, r12, r3, r4\n",
            "smlatb r5, r12, r3, r5\n",
            "smlabb r6, lr, r3, r6\n",
            "smlatb r7, lr, r3, r7\n",
            "ldrd r12, lr, [r0, #8]\n",
            "uxtah r0, r0, r2\n",
            "smlabb r8, r12, r3, r8\n",
            "smlatb r9, r12, r3, r9\n",
            "smlabb r10, lr, r3, r10\n",
            "smlatb r11, lr, r3, r11\n",
            "ldrd r12, lr, [r0]\n",
            "smlabt r4, r12, r3, r4\n",
            "smlatt r5, r12, r3, r5\n",
            "smlabt r6, lr, r3, r6\n",
            "smlatt r7, lr, r3, r7\n",
            "ldrd r12, lr, [r0, #8]\n",
            "uxtah r0, r0, r2\n",
            "smlabt r8, r12, r3, r8\n",
            "smlatt r9, r12, r3, r9\n",
            "smlabt r10, lr, r3, r10\n",
            "smlatt r11, lr, r3, r11\n",
        )
    };
}

/// Runs the `I4F12` transposed product on groups of eight columns with 32-bit accumulators,
/// laid out as [`columns_routine`] is but with eight accumulators that each start at the
/// bias. After the passes of `$block` down the rows, one `SSAT` per output shifts the sum
/// right by 12 and saturates it to `i16`. Evaluates to the APSR at the end.
macro_rules! q12_columns8_routine {
    (
        block: $block:expr,
        matrix: $matrix:expr,
        vector: $vector:expr,
        counter: $counter:expr,
        out: $out:expr,
        out_end: $out_end:expr $(,)?
    ) => {{
        let status: u32;
        asm!(
            "push {{r6, r7}}",
            "movs r6, #0",
            "msr APSR_nzcvq, r6",
            "mov r5, #0x800",
            "mov r6, r5",
            "push {{r3, r4}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r0, r1, r2}}",
            "1:",
            "ldm sp, {{r0, r1, r2, r4, r5, r6, r7, r8, r9, r10, r11}}",
            "2:",
            $block,
            "subs r2, r2, #0x10000",
            "bcs 2b",
            "ldr r12, [sp, #44]",
            "ssat r4, #16, r4, asr #12",
            "ssat r5, #16, r5, asr #12",
            "ssat r6, #16, r6, asr #12",
            "ssat r7, #16, r7, asr #12",
            "ssat r8, #16, r8, asr #12",
            "ssat r9, #16, r9, asr #12",
            "ssat r10, #16, r10, asr #12",
            "ssat r11, #16, r11, asr #12",
            "strh r4, [r12], #2",
            "strh r5, [r12], #2",
            "strh r6, [r12], #2",
            "strh r7, [r12], #2",
            "strh r8, [r12], #2",
            "strh r9, [r12], #2",
            "strh r10, [r12], #2",
            "strh r11, [r12], #2",
            "ldr lr, [sp, #48]",
            "str r12, [sp, #44]",
            "ldr r0, [sp]",
            "add r0, r0, #16",
            "str r0, [sp]",
            "cmp r12, lr",
            "bne 1b",
            "mrs r5, APSR",
            "add sp, sp, #52",
            "pop {{r6, r7}}",
            inout("r0") $matrix => _,
            inout("r1") $vector => _,
            inout("r2") $counter => _,
            inout("r3") $out => _,
            inout("r4") $out_end => _,
            out("r5") status,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            out("r12") _,
            out("lr") _,
        );
        status
    }};
}

/// Writes `out[j] = saturate((sum_i matrix[i][j] vector[i] + 2^11) >> 12)` for the raw
/// `I4F12` values of a row-major `matrix` with `vector.len()` rows and `out.len()` columns,
/// which is `I4F12::transposed_product` with scale one.
///
/// Returns `false` as [`matrix_product_q12`] does, and also when a partial sum of the first
/// `8 * (columns / 8)` columns, which use 32-bit accumulators, leaves the `i32` range.
/// Handled: columns a multiple of 4, an even number of rows below `2^13`, at least
/// `vector.len()` rows in `matrix`, and `matrix` word-aligned.
pub(crate) fn transposed_product_q12(matrix: &[i16], vector: &[i16], out: &mut [i16]) -> bool {
    let rows = vector.len();
    let columns = out.len();
    // Below 2^13 rows the biased sum shifted right by 12 fits an i32, as in
    // `matrix_product_q12`, which the 64-bit accumulators of the last group of four columns
    // need.
    let shape = columns > 0
        && columns.is_multiple_of(4)
        && rows > 0
        && rows.is_multiple_of(2)
        && rows < 1 << 13
        && matrix.len() / columns >= rows
        && is_word_aligned(matrix);
    if !shape {
        return false;
    }

    let stride = columns * 2;
    let wide_columns = columns - columns % 8;
    let (wide_out, narrow_out) = out.split_at_mut(wide_columns);
    if wide_columns > 0 {
        let Some(status) = columns8_q12(matrix, vector, stride, wide_out) else {
            return false;
        };
        if status & Q_FLAG != 0 {
            return false;
        }
    }
    if !narrow_out.is_empty() {
        let Some(status) = columns4_q12(&matrix[wide_columns..], vector, stride, narrow_out) else {
            return false;
        };
        if status & Q_FLAG != 0 {
            return false;
        }
    }
    true
}

/// Runs [`q12_columns8_routine`] on the first `out.len()` columns, a non-zero multiple of 8,
/// of a word-aligned matrix with `vector.len()` rows, an even number, and `stride` bytes per
/// row. Returns the APSR at the end, or `None` when the counter does not fit.
fn columns8_q12(matrix: &[i16], vector: &[i16], stride: usize, out: &mut [i16]) -> Option<u32> {
    let rows = vector.len();
    let unroll = if rows.is_multiple_of(16) { 8 } else { 1 };
    let counter = column_counter(stride, rows / (2 * unroll))?;
    let out_range = out.as_mut_ptr_range();

    // SAFETY: for each group of eight columns `j`, the routine reads the four words at
    // `matrix[i * columns + j]` for every row `i < rows`, which are in bounds. They are
    // word-aligned, as `LDRD` needs, because `matrix` is and `j` and `columns` are multiples of
    // 8 and 4. It reads the words at `vector[i]` for even `i < rows`. Unaligned `LDR` is
    // allowed on Armv7-M unless the program sets `CCR.UNALIGN_TRP`, which fixedpc firmware
    // does not. It writes eight values of `out` per group with `STRH`, from its start to its
    // end. The routine restores `sp`, `r6` and `r7`, and writes only the declared registers,
    // the flags, and its own stack frame.
    let status = unsafe {
        if unroll == 8 {
            q12_columns8_routine!(
                block: concat!(
                    q12_column8_block!(),
                    q12_column8_block!(),
                    q12_column8_block!(),
                    q12_column8_block!(),
                    q12_column8_block!(),
                    q12_column8_block!(),
                    q12_column8_block!(),
                    q12_column8_block!()
                ),
                matrix: matrix.as_ptr(),
                vector: vector.as_ptr(),
                counter: counter,
                out: out_range.start,
                out_end: out_range.end,
            )
        } else {
            q12_columns8_routine!(
                block: q12_column8_block!(),
                matrix: matrix.as_ptr(),
                vector: vector.as_ptr(),
                counter: counter,
                out: out_range.start,
                out_end: out_range.end,
            )
        }
    };
    Some(status)
}

/// Runs [`columns_routine`] with [`q12_column_block`] on the first `out.len()` columns, a
/// non-zero multiple of 4, of a word-aligned matrix with `vector.len()` rows, an even number
/// below `2^13`, and `stride` bytes per row. Returns the APSR at the end, or `None` when the
/// counter does not fit.
fn columns4_q12(matrix: &[i16], vector: &[i16], stride: usize, out: &mut [i16]) -> Option<u32> {
    const COLUMNS: usize = 4;
    const UNROLL: usize = 4;
    let rows = vector.len();
    let unrolled = rows.is_multiple_of(2 * UNROLL);
    let passes = if unrolled {
        rows / (2 * UNROLL)
    } else {
        rows / 2
    };
    let counter = column_counter(stride, passes)?;
    let out_range = out.as_mut_ptr_range();
    // SAFETY: as in `columns8_q12`, with two words per row and group of four columns, which
    // are word-aligned because `matrix` is and `j` and `columns` are multiples of 4.
    let status = unsafe {
        if unrolled {
            columns_routine!(
                bias: 1 << 11,
                block: concat!(
                    q12_column_block!(),
                    q12_column_block!(),
                    q12_column_block!(),
                    q12_column_block!()
                ),
                finish: q12_column_finish!(),
                group_bytes: 2 * COLUMNS,
                matrix: matrix.as_ptr(),
                vector: vector.as_ptr(),
                counter: counter,
                out: out_range.start,
                out_end: out_range.end,
            )
        } else {
            columns_routine!(
                bias: 1 << 11,
                block: q12_column_block!(),
                finish: q12_column_finish!(),
                group_bytes: 2 * COLUMNS,
                matrix: matrix.as_ptr(),
                vector: vector.as_ptr(),
                counter: counter,
                out: out_range.start,
                out_end: out_range.end,
            )
        }
    };
    Some(status)
}

/// Two rows of three columns of the `I16F16` transposed product. `r1` walks the vector two
/// values at a time, and `r0` walks down the columns by the row stride in the low half of
/// `r2`. `r4` to `r9` are three 64-bit accumulators. One `LDM` loads the three weights of a
/// row, so a row costs two instructions besides its multiplies, against four for
/// [`q16_column_block`].
macro_rules! q16_column3_block {
    () => {
        concat!(
            "ldrd r3, r12, [r1], #8\n",
            "ldm r0, {{r10, r11, lr}}\n",
            "uxtah r0, r0, r2\n",
            "smlal r4, r5, r10, r3\n",
            "smlal r6, r7, r11, r3\n",
            "smlal r8, r9, lr, r3\n",
            "ldm r0, {{r10, r11, lr}}\n",
            "uxtah r0, r0, r2\n",
            "smlal r4, r5, r10, r12\n",
            "smlal r6, r7, r11, r12\n",
            "smlal r8, r9, lr, r12\n",
        )
    };
}

/// Four passes of [`q16_column3_block`].
macro_rules! q16_column3_block_x4 {
    () => {
        concat!(
            q16_column3_block!(),
            q16_column3_block!(),
            q16_column3_block!(),
            q16_column3_block!()
        )
    };
}

/// Thirty-two passes of [`q16_column3_block`], 64 rows.
macro_rules! q16_column3_block_x32 {
    () => {
        concat!(
            q16_column3_block_x4!(),
            q16_column3_block_x4!(),
            q16_column3_block_x4!(),
            q16_column3_block_x4!(),
            q16_column3_block_x4!(),
            q16_column3_block_x4!(),
            q16_column3_block_x4!(),
            q16_column3_block_x4!()
        )
    };
}

/// Runs the `I16F16` transposed product on groups of three columns: for each group, passes of
/// `$block` down the rows, then rounding as [`q16_column_finish`] does and a store through the
/// output pointer. Evaluates to the APSR at the end.
///
/// `$counter` is as in [`columns_routine`], and `$next_pass` counts the passes down and
/// branches back. It is empty when one pass takes all the rows. After a group, `r0` points
/// `rows * stride` bytes past the group's first weight, and subtracting `$rewind`
/// (`rows * stride - 12`) moves it to the next group's first weight. Stack frame after the
/// prologue: the vector pointer, the counter, the accumulators' start values (the bias, then
/// 0, three times), the output pointer, the end of the output and `$rewind`. One `LDM`
/// reloads the first eight into `r1`, `r2` and `r4` to `r9`.
macro_rules! q16_columns3_routine {
    (
        block: $block:expr,
        next_pass: $next_pass:expr,
        matrix: $matrix:expr,
        vector: $vector:expr,
        counter: $counter:expr,
        rewind: $rewind:expr,
        out: $out:expr,
        out_end: $out_end:expr $(,)?
    ) => {{
        let status: u32;
        asm!(
            "push {{r6, r7}}",
            "movs r6, #0",
            "msr APSR_nzcvq, r6",
            "mov r5, #0x8000",
            "push {{r3, r4, r12}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r5, r6}}",
            "push {{r1, r2}}",
            "1:",
            "ldm sp, {{r1, r2, r4, r5, r6, r7, r8, r9}}",
            "2:",
            $block,
            $next_pass,
            "lsr r4, r4, #16",
            "orr r4, r4, r5, lsl #16",
            "ssat r5, #16, r5",
            "lsr r6, r6, #16",
            "orr r6, r6, r7, lsl #16",
            "ssat r7, #16, r7",
            "lsr r8, r8, #16",
            "orr r8, r8, r9, lsl #16",
            "ssat r9, #16, r9",
            "ldrd r12, lr, [sp, #32]",
            "ldr r10, [sp, #40]",
            "stm r12!, {{r4, r6, r8}}",
            "str r12, [sp, #32]",
            "sub r0, r0, r10",
            "cmp r12, lr",
            "bne 1b",
            "mrs r5, APSR",
            "add sp, sp, #44",
            "pop {{r6, r7}}",
            inout("r0") $matrix => _,
            inout("r1") $vector => _,
            inout("r2") $counter => _,
            inout("r3") $out => _,
            inout("r4") $out_end => _,
            out("r5") status,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
            inout("r12") $rewind => _,
            out("lr") _,
        );
        status
    }};
}

/// Writes `out[j] = saturate((sum_i matrix[i][j] vector[i] + 2^15) >> 16)` for the raw
/// `I16F16` values of a row-major `matrix` with `vector.len()` rows and `out.len()` columns,
/// which is `I16F16::transposed_product` with scale one.
///
/// The routine proves the bound of [`vector_bounded_q16`], which makes the 64-bit sums exact,
/// and returns `false` when it cannot. With at most 64 rows and one group of four columns, the
/// group's pass checks each value as it loads it, which saves a separate pass over the vector.
/// Returns `false` also as [`matrix_product_q12`] does. Handled: at least `vector.len()` rows
/// in `matrix`, and either an even number of rows and at least `4 * (columns % 3)` columns, or
/// columns a multiple of 4.
#[inline]
pub(crate) fn transposed_product_q16(matrix: &[i32], vector: &[i32], out: &mut [i32]) -> bool {
    let rows = vector.len();
    let columns = out.len();
    if columns == 0 || rows == 0 || matrix.len() / columns < rows {
        return false;
    }
    let stride = columns * 4;

    // With an even number of rows, groups of three take all but the last `4 * (columns % 3)`
    // columns, which go in groups of four. Because `4 * r` leaves the remainder `r` after
    // division by 3, the columns in groups of three are a multiple of 3.
    let wide_columns = if rows.is_multiple_of(2) && columns >= 4 * (columns % 3) {
        4 * (columns % 3)
    } else if columns.is_multiple_of(4) {
        columns
    } else {
        return false;
    };
    let checked = wide_columns == 4 && rows <= 64 && rows.is_multiple_of(16);
    if !checked && !vector_bounded_q16(vector) {
        return false;
    }

    // The columns in groups of four go first, so that a failed check stops before the rest.
    let narrow_columns = columns - wide_columns;
    let (narrow_out, wide_out) = out.split_at_mut(narrow_columns);
    if wide_columns > 0 {
        let wide_matrix = &matrix[narrow_columns..];
        let Some(status) = columns4_q16(wide_matrix, vector, stride, wide_out, checked) else {
            return false;
        };
        if status & Q_FLAG != 0 {
            return false;
        }
    }
    if narrow_columns > 0 {
        let Some(status) = columns3_q16(matrix, vector, stride, narrow_out) else {
            return false;
        };
        if status & Q_FLAG != 0 {
            return false;
        }
    }
    true
}

/// Runs [`q16_columns3_routine`] on the first `out.len()` columns, a non-zero multiple of 3,
/// of a matrix with `vector.len()` rows, an even number, and `stride` bytes per row. Returns
/// the APSR at the end, or `None` when the counter does not fit.
fn columns3_q16(matrix: &[i32], vector: &[i32], stride: usize, out: &mut [i32]) -> Option<u32> {
    let rows = vector.len();
    // Each pass runs 16 blocks of two rows when the rows allow, else 4 or 1. With 64 rows, one
    // pass of 32 blocks takes them all, and the routine leaves out the pass counter.
    let blocks = if rows == 64 {
        32
    } else if rows.is_multiple_of(32) {
        16
    } else if rows.is_multiple_of(8) {
        4
    } else {
        1
    };
    let passes = rows / (2 * blocks);
    let counter = column_counter(stride, passes)?;
    let rewind = rows * stride - 12;
    let out_range = out.as_mut_ptr_range();

    macro_rules! run {
        ($block:expr) => {
            run!($block, concat!("subs r2, r2, #0x10000\n", "bcs 2b\n"))
        };
        ($block:expr, $next_pass:expr) => {
            q16_columns3_routine!(
                block: $block,
                next_pass: $next_pass,
                matrix: matrix.as_ptr(),
                vector: vector.as_ptr(),
                counter: counter,
                rewind: rewind,
                out: out_range.start,
                out_end: out_range.end,
            )
        };
    }

    // SAFETY: for each group of three columns `j`, the routine reads the three words at
    // `matrix[i * columns + j]` for every row `i < rows`, which are in bounds because the
    // caller checked that `matrix` has `rows` rows and `j + 3 <= out.len() <= columns`. It
    // reads `vector` two values at a time with `LDRD`, which needs the word alignment that
    // `i32` values have, and `rows` is even. It writes three values of `out` per group, from
    // its start to its end. The routine restores `sp`, `r6` and `r7`, and writes only the
    // declared registers, the flags, and its own stack frame.
    let status = unsafe {
        match blocks {
            32 => run!(q16_column3_block_x32!(), ""),
            16 => run!(concat!(
                q16_column3_block_x4!(),
                q16_column3_block_x4!(),
                q16_column3_block_x4!(),
                q16_column3_block_x4!()
            )),
            4 => run!(q16_column3_block_x4!()),
            _ => run!(q16_column3_block!()),
        }
    };
    Some(status)
}

/// Runs [`columns_routine`] with [`q16_column_block`] on the first `out.len()` columns, a
/// non-zero multiple of 4, of a matrix with `vector.len()` rows and `stride` bytes per row.
/// With `checked`, for a number of rows that is a multiple of 16, it runs
/// `q16_column_block!(checked)` instead. Returns the APSR at the end, or `None` when the
/// counter does not fit.
fn columns4_q16(
    matrix: &[i32],
    vector: &[i32],
    stride: usize,
    out: &mut [i32],
    checked: bool,
) -> Option<u32> {
    const COLUMNS: usize = 4;
    const UNROLL: usize = 16;
    let rows = vector.len();
    let unrolled = rows.is_multiple_of(UNROLL);
    let passes = if unrolled { rows / UNROLL } else { rows };
    let counter = column_counter(stride, passes)?;
    let out_range = out.as_mut_ptr_range();
    macro_rules! run {
        ($block:expr) => {
            columns_routine!(
                bias: 1 << 15,
                block: $block,
                finish: q16_column_finish!(),
                group_bytes: 4 * COLUMNS,
                matrix: matrix.as_ptr(),
                vector: vector.as_ptr(),
                counter: counter,
                out: out_range.start,
                out_end: out_range.end,
            )
        };
    }
    // SAFETY: as in `columns4_q12`, with one `i32` vector value per row and four `i32`
    // weights per row and group, read by two `LDRD`s from word-aligned addresses.
    let status = unsafe {
        if checked && unrolled {
            run!(q16_column_block_x16!(checked))
        } else if unrolled {
            run!(q16_column_block_x16!())
        } else {
            run!(q16_column_block!())
        }
    };
    Some(status)
}
