//! The integer kernels against plain exact sums: the `i64` fast path of `I16F16` must give the
//! bits of the `i128` path, and the 16-bit kernels the exact sums, for any shape and values.

use fixedpc::kernels::{
    columns_dot_i16, columns_dot_i32_wrapping, dot_i16, dot_i16_portable, dot_i32_wrapping,
    rows_dot_i16, rows_dot_i32_wrapping,
};
use fixedpc::scalar::outer_product_row_generic;
use fixedpc::{Scalar, I16F16, I4F12};
use proptest::collection::vec;
use proptest::prelude::*;

/// `scale * sum_k matrix[i][k] vector[k]` per row, through `dot` and `acc_scale_round`: the
/// per-row path every format had before the matrix kernels.
fn rows_reference<S: Scalar>(matrix: &[S], vector: &[S], scale: S, rows: usize) -> (Vec<S>, u32) {
    let mut overflows = 0;
    let out = matrix
        .chunks_exact(vector.len())
        .take(rows)
        .map(|row| {
            let sum = row
                .iter()
                .zip(vector)
                .fold(S::acc_zero(), |sum, (&w, &x)| S::acc_mul_add(sum, w, x));
            S::acc_scale_round(sum, scale, &mut overflows)
        })
        .collect();
    (out, overflows)
}

fn columns_reference<S: Scalar>(
    matrix: &[S],
    vector: &[S],
    scale: S,
    columns: usize,
) -> (Vec<S>, u32) {
    let mut overflows = 0;
    let out = (0..columns)
        .map(|j| {
            let sum = vector
                .iter()
                .enumerate()
                .fold(S::acc_zero(), |sum, (i, &x)| {
                    S::acc_mul_add(sum, matrix[i * columns + j], x)
                });
            S::acc_scale_round(sum, scale, &mut overflows)
        })
        .collect();
    (out, overflows)
}

/// Raw Q16.16 values: mostly small, sometimes anywhere in the `i32` range, so that both the
/// `i64` path and its `i128` fallback run.
fn raw_i32() -> impl Strategy<Value = i32> {
    prop_oneof![4 => -(1 << 20)..(1 << 20), 1 => any::<i32>()]
}

fn shape() -> impl Strategy<Value = (usize, usize)> {
    (1usize..24, 1usize..40)
}

fn check_format<S: Scalar>(
    matrix: &[S],
    vector: &[S],
    out_len: usize,
    scale: S,
) -> Result<(), TestCaseError> {
    let mut out = vec![S::ZERO; out_len];
    let mut overflows = 0;
    S::matrix_product(matrix, vector, scale, &mut out, &mut overflows);
    let (expected, expected_overflows) = rows_reference(matrix, vector, scale, out_len);
    prop_assert_eq!(&out, &expected);
    prop_assert_eq!(overflows, expected_overflows);
    Ok(())
}

fn check_transposed<S: Scalar>(
    matrix: &[S],
    vector: &[S],
    columns: usize,
    scale: S,
) -> Result<(), TestCaseError> {
    let mut out = vec![S::ZERO; columns];
    let mut overflows = 0;
    S::transposed_product(matrix, vector, scale, &mut out, &mut overflows);
    let (expected, expected_overflows) = columns_reference(matrix, vector, scale, columns);
    prop_assert_eq!(&out, &expected);
    prop_assert_eq!(overflows, expected_overflows);
    Ok(())
}

/// Values drawn per case: a matrix of up to 24x40 followed by a vector of up to 40.
const SEED_LEN: usize = 24 * 40 + 40;
const VECTOR_START: usize = 24 * 40;

fn check_outer_product_row<S: Scalar>(
    column: &[S],
    stride: usize,
    rows: &[S],
    batch: usize,
    width: usize,
    scale: S,
) -> Result<(), TestCaseError> {
    let mut out = vec![S::ZERO; width];
    let mut expected = vec![S::ZERO; width];
    let (mut overflows, mut expected_overflows) = (0, 0);
    S::outer_product_row(column, stride, rows, batch, scale, &mut out, &mut overflows);
    outer_product_row_generic(
        column,
        stride,
        rows,
        batch,
        scale,
        &mut expected,
        &mut expected_overflows,
    );
    prop_assert_eq!(&out, &expected);
    prop_assert_eq!(overflows, expected_overflows);
    Ok(())
}

fn q16(raw: &[i32]) -> Vec<I16F16> {
    raw.iter().map(|&bits| I16F16::from_bits(bits)).collect()
}

fn q12(raw: &[i16]) -> Vec<I4F12> {
    raw.iter().map(|&bits| I4F12::from_bits(bits)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `I16F16::matrix_product` sums in `i64` when the bound allows and must equal the `i128`
    /// path bit for bit, saturations included.
    #[test]
    fn i16f16_matrix_product_matches_i128(
        (rows, columns) in shape(),
        seed in vec(raw_i32(), SEED_LEN),
        scale in raw_i32(),
    ) {
        let matrix = q16(&seed[..rows * columns]);
        let vector = q16(&seed[VECTOR_START..VECTOR_START + columns]);
        check_format(&matrix, &vector, rows, I16F16::ONE)?;
        check_format(&matrix, &vector, rows, I16F16::from_bits(scale))?;
    }

    /// The same for `I16F16::transposed_product`.
    #[test]
    fn i16f16_transposed_product_matches_i128(
        (rows, columns) in shape(),
        seed in vec(raw_i32(), SEED_LEN),
        scale in raw_i32(),
    ) {
        let matrix = q16(&seed[..rows * columns]);
        let vector = q16(&seed[VECTOR_START..VECTOR_START + rows]);
        check_transposed(&matrix, &vector, columns, I16F16::ONE)?;
        check_transposed(&matrix, &vector, columns, I16F16::from_bits(scale))?;
    }

    /// `I4F12`'s products equal the exact per-output sums, over the whole `i16` range.
    #[test]
    fn i4f12_products_match_exact_sums(
        (rows, columns) in shape(),
        seed in vec(any::<i16>(), SEED_LEN),
        scale in any::<i16>(),
    ) {
        let matrix = q12(&seed[..rows * columns]);
        let vector = q12(&seed[VECTOR_START..VECTOR_START + columns]);
        check_format(&matrix, &vector, rows, I4F12::ONE)?;
        check_format(&matrix, &vector, rows, I4F12::from_bits(scale))?;
        let column_vector = q12(&seed[VECTOR_START..VECTOR_START + rows]);
        check_transposed(&matrix, &column_vector, columns, I4F12::from_bits(scale))?;
    }

    /// `acc_scale_round` of an `i64` sum, which both formats compute without `i128`, equals
    /// the rounding of the exact `i128` product.
    #[test]
    fn scale_round_matches_i128(
        // Mostly sums and scales whose rounded product is in range, sometimes any.
        sum in prop_oneof![1 => any::<i64>(), 4 => -(1i64 << 32)..(1i64 << 32)],
        wide_scale in prop_oneof![1 => any::<i32>(), 4 => -(1 << 17)..(1 << 17)],
        short_scale in prop_oneof![1 => any::<i16>(), 4 => -(1i16 << 6)..(1 << 6)],
    ) {
        let mut overflows = 0;
        let rounded = I16F16::acc_scale_round(sum as i128, I16F16::from_bits(wide_scale), &mut overflows);
        let exact = (sum as i128 * wide_scale as i128 + (1i128 << 31)) >> 32;
        let expected = exact.clamp(i32::MIN as i128, i32::MAX as i128);
        prop_assert_eq!(rounded.to_bits() as i128, expected);
        prop_assert_eq!(overflows, u32::from(expected != exact));

        let mut overflows = 0;
        let rounded = I4F12::acc_scale_round(sum, I4F12::from_bits(short_scale), &mut overflows);
        let exact = (sum as i128 * short_scale as i128 + (1i128 << 23)) >> 24;
        let expected = exact.clamp(i16::MIN as i128, i16::MAX as i128);
        prop_assert_eq!(rounded.to_bits() as i128, expected);
        prop_assert_eq!(overflows, u32::from(expected != exact));
    }

    /// `outer_product_row`, the weight-gradient row with its `i64` and batch-1 paths, equals
    /// the generic loop in the format's accumulator, outputs and overflow counts.
    #[test]
    fn outer_product_row_matches_generic(
        batch in 1usize..5,
        width in 1usize..12,
        stride in 1usize..4,
        seed in vec(raw_i32(), SEED_LEN),
        short_seed in vec(any::<i16>(), SEED_LEN),
        scale in raw_i32(),
        short_scale in any::<i16>(),
    ) {
        let column = q16(&seed[..batch * stride]);
        let rows = q16(&seed[batch * stride..][..batch * width]);
        check_outer_product_row(&column, stride, &rows, batch, width, I16F16::from_bits(scale))?;
        check_outer_product_row(&column, stride, &rows, batch, width, I16F16::ONE)?;
        let column = q12(&short_seed[..batch * stride]);
        let rows = q12(&short_seed[batch * stride..][..batch * width]);
        check_outer_product_row(&column, stride, &rows, batch, width, I4F12::from_bits(short_scale))?;
        check_outer_product_row(&column, stride, &rows, batch, width, I4F12::ONE)?;
    }

    /// The public kernels equal the portable loops and plain sums for any length.
    #[test]
    fn kernels_match_plain_sums(
        a in vec(any::<i16>(), 0..100),
        b in vec(any::<i16>(), 0..100),
        wide in vec(any::<i32>(), 0..100),
    ) {
        let exact: i64 = a.iter().zip(&b).map(|(&x, &y)| x as i64 * y as i64).sum();
        prop_assert_eq!(dot_i16(&a, &b), exact);
        prop_assert_eq!(dot_i16_portable(&a, &b), exact);
        let reversed: Vec<i32> = wide.iter().rev().copied().collect();
        let wrapped = wide
            .iter()
            .zip(&reversed)
            .fold(0i64, |sum, (&x, &y)| sum.wrapping_add(x as i64 * y as i64));
        prop_assert_eq!(dot_i32_wrapping(&wide, &reversed), wrapped);
    }

    /// Row and column kernels visit every output once with the exact sum.
    #[test]
    fn row_and_column_kernels_visit_every_output(
        (rows, columns) in shape(),
        seed in vec(any::<i16>(), SEED_LEN),
    ) {
        let matrix = &seed[..rows * columns];
        let vector = &seed[VECTOR_START..VECTOR_START + columns];
        let mut sums = vec![None; rows];
        rows_dot_i16(matrix, vector, |i, sum| sums[i] = Some(sum));
        for (i, sum) in sums.iter().enumerate() {
            let row = &matrix[i * columns..(i + 1) * columns];
            prop_assert_eq!(*sum, Some(dot_i16_portable(row, vector)));
        }
        let wide: Vec<i32> = matrix.iter().map(|&x| (x as i32).wrapping_mul(65_537)).collect();
        let wide_vector: Vec<i32> = vector.iter().map(|&x| x as i32 * 3).collect();
        let mut wide_sums = vec![None; rows];
        rows_dot_i32_wrapping(&wide, &wide_vector, |i, sum| wide_sums[i] = Some(sum));
        for (i, sum) in wide_sums.iter().enumerate() {
            let row = &wide[i * columns..(i + 1) * columns];
            prop_assert_eq!(*sum, Some(dot_i32_wrapping(row, &wide_vector)));
        }

        let column_vector = &seed[VECTOR_START..VECTOR_START + rows];
        let mut column_sums = vec![None; columns];
        columns_dot_i16(matrix, column_vector, columns, |j, sum| column_sums[j] = Some(sum));
        let wide_column_vector: Vec<i32> = column_vector.iter().map(|&x| x as i32 * 5).collect();
        let mut wide_columns = vec![None; columns];
        columns_dot_i32_wrapping(&wide, &wide_column_vector, columns, |j, sum| {
            wide_columns[j] = Some(sum)
        });
        for j in 0..columns {
            let exact: i64 = (0..rows)
                .map(|i| matrix[i * columns + j] as i64 * column_vector[i] as i64)
                .sum();
            prop_assert_eq!(column_sums[j], Some(exact));
            let wide_exact = (0..rows).fold(0i64, |sum, i| {
                sum.wrapping_add(wide[i * columns + j] as i64 * wide_column_vector[i] as i64)
            });
            prop_assert_eq!(wide_columns[j], Some(wide_exact));
        }
    }
}

#[test]
fn i16f16_fast_path_boundary() {
    // The i64 path needs `sum_k (x_k ^ (x_k >> 31)) + len < 2^32`. That sum is 2^32 - 1 for
    // the first vector and 2^32 for the second, so the first takes the i64 path and the second
    // the i128 one, and both must equal the exact sum of full-range products.
    for last in [i32::MIN + 2, i32::MIN + 1] {
        let vector = [
            I16F16::from_bits(i32::MAX),
            I16F16::ZERO,
            I16F16::from_bits(last),
        ];
        let matrix = [I16F16::from_bits(i32::MIN); 3];
        let mut out = [I16F16::ZERO; 1];
        let mut overflows = 0;
        I16F16::matrix_product(&matrix, &vector, I16F16::ONE, &mut out, &mut overflows);
        let (expected, expected_overflows) = rows_reference(&matrix, &vector, I16F16::ONE, 1);
        assert_eq!(out[0], expected[0]);
        assert_eq!(overflows, expected_overflows);
    }
}
