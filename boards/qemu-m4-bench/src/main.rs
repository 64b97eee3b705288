//! Instruction-count benchmarks of the fixedpc kernels on the QEMU mps2-an386 machine
//! (Cortex-M4F).
//!
//! For each network and numeric format the firmware fills the weights and the input with
//! deterministic pseudo-random values, then runs each measured region once between calls to
//! [`bench_start`] and [`bench_stop`]. Before a region it logs one `region` line with the
//! network, the format, the region's name and its work (multiply-accumulates, or 1). A TCG
//! plugin (`plugin/insn_count.c`, loaded by `pcsim bench`) counts the instructions from the
//! entry of `bench_start` to the entry of `bench_stop` and prints one count per region, in
//! the same order. The first region, `calibration`, is empty: its count is the overhead that
//! `pcsim bench` subtracts from the others.
//!
//! Without the plugin (`cargo run --release`) the firmware runs the same regions and only logs.

#![no_std]
#![no_main]
// Only the arena, the stack painting and the HardFault handler use `unsafe`, each with an
// `allow` and a safety comment.
#![deny(unsafe_code)]

use core::panic::PanicInfo;

use bytemuck::Pod;
use cortex_m as _;
use cortex_m_rt::{entry, exception, ExceptionFrame};
use defmt_semihosting as _;
use fixedpc::network::{activities_len, errors_len, scratch_len, weights_len};
use fixedpc::{
    kernels, transpose_weights, Activation, ActivityRounding, Arch, InferenceConfig, Network,
    Scalar, Sgd, Workspace, XorShift32, I16F16, I4F12,
};

#[path = "../../qemu-m4/src/stack.rs"]
mod stack;

/// The digits network of `pcsim demo`.
const DIGITS: [usize; 4] = [64, 64, 64, 10];
/// A wider network with the same input and output.
const WIDE: [usize; 4] = [64, 256, 256, 10];
/// Inference steps of the full-inference region, the `pcsim train` default.
const STEPS: u32 = 20;

/// 64-bit words of the arena, enough for every buffer of [`WIDE`] in `f64`.
const ARENA_WORDS: usize = arena_words(&WIDE);

const fn arena_words(widths: &[usize]) -> usize {
    // Weights, their transposed copy and gradients, activities, errors, scratch, scalings,
    // input, target, two product outputs, overflow counters, and one spare word per buffer for
    // rounding up.
    let values = 3 * weights_len(widths)
        + activities_len(widths)
        + errors_len(widths)
        + scratch_len(widths, 1)
        + 4 * widths.len()
        + 2 * fixedpc::network::max_width(widths)
        + widths[0]
        + widths[widths.len() - 1];
    values + 16
}

/// Marks the start of a measured region; its body differs from [`bench_stop`]'s, so the linker
/// cannot merge the two. `pcsim bench` finds both by their symbol names.
#[inline(never)]
fn bench_start() {
    cortex_m::asm::nop();
}

/// Marks the end of a measured region.
#[inline(never)]
fn bench_stop() {
    cortex_m::asm::nop();
    cortex_m::asm::nop();
}

/// Logs a region and runs `work` between the two markers.
#[inline(always)]
fn measure<R>(network: &str, format: &str, region: &str, amount: usize, work: impl FnOnce() -> R) {
    defmt::info!(
        "region {=str} {=str} {=str} work {=usize}",
        network,
        format,
        region,
        amount
    );
    bench_start();
    let result = work();
    bench_stop();
    core::hint::black_box(result);
}

/// Splits the first `count` values of type `S` off the front of `arena`.
fn carve<'a, S: Pod>(arena: &mut &'a mut [u64], count: usize) -> &'a mut [S] {
    let words = (count * core::mem::size_of::<S>()).div_ceil(8);
    let (head, tail) = core::mem::take(arena).split_at_mut(words);
    *arena = tail;
    &mut bytemuck::cast_slice_mut::<u64, S>(head)[..count]
}

/// Returns a value uniform in `[0, 1)` from the generator.
fn unit(rng: &mut XorShift32) -> f64 {
    rng.next_u32() as f64 / 4_294_967_296.0
}

/// Returns a value uniform in `[-bound, bound)` from the generator.
fn uniform<S: Scalar>(rng: &mut XorShift32, bound: f64) -> S {
    let mut overflows = 0;
    S::from_f64_rounded((2.0 * unit(rng) - 1.0) * bound, &mut overflows)
}

/// Runs every region for one network in format `S`.
fn bench_format<S: Scalar + Pod>(name: &str, widths: &[usize], mut arena: &mut [u64]) {
    let format = S::FORMAT.name();
    let depth = widths.len() - 1;
    let weights_count = weights_len(widths);
    let weights: &mut [S] = carve(&mut arena, weights_count);
    let transposed_weights: &mut [S] = carve(&mut arena, weights_count);
    let gradients: &mut [S] = carve(&mut arena, weights_count);
    let scalings: &mut [S] = carve(&mut arena, depth);
    let activities: &mut [S] = carve(&mut arena, activities_len(widths));
    let errors: &mut [S] = carve(&mut arena, errors_len(widths));
    let scratch: &mut [S] = carve(&mut arena, scratch_len(widths, 1));
    let input: &mut [S] = carve(&mut arena, widths[0]);
    let target: &mut [S] = carve(&mut arena, widths[depth]);
    let product: &mut [S] = carve(&mut arena, widths[2]);
    let transposed: &mut [S] = carve(&mut arena, widths[1]);
    let overflows: &mut [u32] = carve(&mut arena, depth);

    // SP initial weights, inputs in [0, 1) as the scaled digits, label 3.
    let mut rng = XorShift32::new(1);
    let mut spare = 0;
    for layer in 1..=depth {
        let offset = weights_len(&widths[..layer]);
        let count = widths[layer] * widths[layer - 1];
        let bound = 1.0 / libm::sqrt(widths[layer - 1] as f64);
        for weight in &mut weights[offset..offset + count] {
            *weight = uniform(&mut rng, bound);
        }
    }
    scalings.fill(S::ONE);
    for value in input.iter_mut() {
        *value = S::from_f64_rounded(unit(&mut rng), &mut spare);
    }
    target.fill(S::ZERO);
    target[3] = S::ONE;

    let config = InferenceConfig {
        steps: STEPS,
        step_size: S::from_f64_rounded(0.1, &mut spare),
        tolerance: None,
        rounding: ActivityRounding::Nearest,
    };
    let sgd = Sgd {
        learning_rate: S::from_f64_rounded(0.1, &mut spare),
    };
    let Ok(arch) = Arch::new(widths, Activation::Relu, false) else {
        defmt::panic!("invalid widths");
    };
    if transpose_weights(&arch, weights, transposed_weights).is_err() {
        defmt::panic!("transposed copy does not fit");
    }
    let Ok(mut workspace) = Workspace::new(&arch, 1, activities, errors, scratch, overflows) else {
        defmt::panic!("workspace does not fit");
    };
    let hidden = widths[1] * widths[2];
    let feedback: usize = (2..=depth).map(|l| widths[l] * widths[l - 1]).sum();

    stack::paint();
    {
        let Ok(network) = Network::new(arch, weights, scalings) else {
            defmt::panic!("network does not fit");
        };
        // The layout of the inference firmware, which keeps both copies in flash. Here they are
        // in RAM, which QEMU runs with the same instructions.
        let Ok(copied) = Network::with_transposed(arch, weights, transposed_weights, scalings)
        else {
            defmt::panic!("network with the transposed copy does not fit");
        };
        let Some(transposed_layer) = copied.transposed_layer_weights(2) else {
            defmt::panic!("network has no transposed copy");
        };
        measure(name, format, "calibration", 1, || ());

        let _ = network.feedforward(&mut workspace, 0, input);
        let hidden_activity = &workspace.activities(0)[widths[0]..widths[0] + widths[1]];
        let mut sink = 0;
        measure(name, format, "matrix_product", hidden, || {
            S::matrix_product(
                network.layer_weights(2),
                hidden_activity,
                S::ONE,
                product,
                &mut sink,
            )
        });
        // The path every format took before the matrix kernels: `dot` per row, then one
        // rounding. For I16F16 that sums in i128.
        measure(name, format, "dot_per_row", hidden, || {
            let rows = network.layer_weights(2).chunks_exact(widths[1]);
            for (row, value) in rows.zip(product.iter_mut()) {
                *value = S::acc_scale_round(S::dot(row, hidden_activity), S::ONE, &mut sink);
            }
        });
        measure(name, format, "transposed_product", hidden, || {
            S::transposed_product(
                network.layer_weights(2),
                product,
                S::ONE,
                transposed,
                &mut sink,
            )
        });
        // The same W^T e as a matrix product over layer 2's block of the transposed copy, as
        // inference runs it with `Network::with_transposed`.
        measure(name, format, "transposed_copy_product", hidden, || {
            S::matrix_product(transposed_layer, product, S::ONE, transposed, &mut sink)
        });
        measure(name, format, "feedforward", weights_count, || {
            network.feedforward(&mut workspace, 0, input).is_ok()
        });
        measure(name, format, "infer_supervised", weights_count, || {
            network.infer_supervised(&mut workspace, 0, input, target, &config)
        });
        measure(name, format, "inference_step", feedback, || {
            network.inference_step(&mut workspace, 0, config.step_size)
        });
        measure(name, format, "compute_errors", weights_count, || {
            network.compute_errors(&mut workspace, 0)
        });
        measure(name, format, "weight_gradients", weights_count, || {
            network.weight_gradients(&mut workspace, 1, gradients)
        });
    }
    measure(name, format, "sgd_step", weights_count, || {
        sgd.step(weights, gradients)
    });
    defmt::info!(
        "stack {=str} {=str} bytes {=usize}",
        name,
        format,
        stack::high_water_mark()
    );
}

fn bench_network(name: &str, widths: &[usize], arena: &mut [u64]) {
    bench_format::<f32>(name, widths, arena);
    bench_format::<f64>(name, widths, arena);
    bench_format::<I16F16>(name, widths, arena);
    bench_format::<I4F12>(name, widths, arena);
}

/// Returns the arena that every benchmark carves its buffers from.
#[allow(unsafe_code)]
fn arena() -> &'static mut [u64] {
    static mut ARENA: [u64; ARENA_WORDS] = [0; ARENA_WORDS];
    // SAFETY: `main` calls this once and never returns, and no interrupt handler touches the
    // arena, so this is the only reference to it.
    unsafe { &mut *core::ptr::addr_of_mut!(ARENA) }
}

/// Compares the assembly kernels with the portable loops on every length up to 40 and every
/// relative alignment, and the column kernels on every shape up to 9x9, with full-range
/// values. Panics on the first difference.
fn check_kernels() {
    let mut rng = XorShift32::new(7);
    let mut short_a = [0i16; 81];
    let mut short_b = [0i16; 48];
    let mut wide_a = [0i32; 81];
    let mut wide_b = [0i32; 48];
    for (index, value) in short_a.iter_mut().chain(short_b.iter_mut()).enumerate() {
        // Every seventh value is i16::MIN, the largest magnitude.
        *value = if index % 7 == 0 {
            i16::MIN
        } else {
            rng.next_u32() as i16
        };
    }
    for value in wide_a.iter_mut().chain(wide_b.iter_mut()) {
        *value = rng.next_u32() as i32;
    }
    let mut cases = 0u32;
    for len in 0..=40 {
        for offset_a in 0..2 {
            for offset_b in 0..2 {
                let a = &short_a[offset_a..offset_a + len];
                let b = &short_b[offset_b..offset_b + len];
                if kernels::dot_i16(a, b) != kernels::dot_i16_portable(a, b) {
                    defmt::panic!("dot_i16 differs: len {=usize}", len);
                }
                let a = &wide_a[offset_a..offset_a + len];
                let b = &wide_b[offset_b..offset_b + len];
                if kernels::dot_i32_wrapping(a, b) != kernels::dot_i32_wrapping_portable(a, b) {
                    defmt::panic!("dot_i32_wrapping differs: len {=usize}", len);
                }
                cases += 2;
            }
        }
    }
    for rows in 0..=9 {
        for columns in 1..=9 {
            let count = rows * columns;
            let (matrix, vector) = (&short_a[..count], &short_b[..rows]);
            let (wide_matrix, wide_vector) = (&wide_a[..count], &wide_b[..rows]);
            let mut sums = [0i64; 9];
            let mut expected = [0i64; 9];
            kernels::columns_dot_i16(matrix, vector, columns, |j, sum| sums[j] = sum);
            kernels::columns_dot_i16_portable(matrix, vector, columns, |j, sum| expected[j] = sum);
            if sums != expected {
                defmt::panic!("columns_dot_i16 differs: {=usize}x{=usize}", rows, columns);
            }
            kernels::columns_dot_i32_wrapping(wide_matrix, wide_vector, columns, |j, sum| {
                sums[j] = sum
            });
            kernels::columns_dot_i32_wrapping_portable(
                wide_matrix,
                wide_vector,
                columns,
                |j, sum| expected[j] = sum,
            );
            if sums != expected {
                defmt::panic!(
                    "columns_dot_i32_wrapping differs: {=usize}x{=usize}",
                    rows,
                    columns
                );
            }
            cases += 2;
        }
    }
    cases += check_products_per_range::<i16, I4F12>(&mut rng, &[1 << 9, 1 << 12, 1 << 15]);
    cases +=
        check_products_per_range::<i32, I16F16>(&mut rng, &[1 << 17, 1 << 24, 1 << 26, 1 << 31]);
    // `i16::MIN` squared is 2^30, so every fourth row brings a column sum to a multiple of
    // 2^32, which a 32-bit accumulator wraps back near the bias. Only the overflow flag of
    // `SMLA<x><y>` then distinguishes the sum from a small one.
    let minimum = [I4F12::from_bits(i16::MIN); PRODUCT_VALUES];
    cases += check_products(&minimum, &minimum);
    let minimum = [I16F16::from_bits(i32::MIN); PRODUCT_VALUES];
    cases += check_products(&minimum, &minimum);
    defmt::info!("kernel self-test passed: {=u32} cases", cases);
}

/// Values and shapes of the product self-test: up to 128 rows of up to 64 columns. Rows 8 to
/// 128 run the unrolled loops of the transposed routines, which take 8, 16, 32 or 64 rows per
/// pass, with one pass and with several.
const PRODUCT_VALUES: usize = 128 * 64 + 1;
const PRODUCT_ROWS: [usize; 15] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 24, 32, 64, 128];
const PRODUCT_COLUMNS: [usize; 17] = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64];

/// Runs [`check_products`] on raw values drawn uniformly below each bound in magnitude:
/// small bounds exercise the assembly routines, and large ones saturate outputs, which sends
/// the products to their general path.
fn check_products_per_range<R, S>(rng: &mut XorShift32, bounds: &[u64]) -> u32
where
    R: Pod + TryFrom<i64>,
    S: Scalar + Pod,
{
    let mut cases = 0;
    for &bound in bounds {
        let mut matrix = [R::zeroed(); PRODUCT_VALUES];
        let mut vector = [R::zeroed(); 130];
        for value in matrix.iter_mut().chain(vector.iter_mut()) {
            let raw = (rng.next_u32() as u64 % (2 * bound)) as i64 - bound as i64;
            let Ok(raw) = R::try_from(raw) else {
                defmt::panic!("raw value out of range");
            };
            *value = raw;
        }
        let matrix: &[S] = bytemuck::cast_slice(&matrix);
        let vector: &[S] = bytemuck::cast_slice(&vector);
        // Offset 1 misaligns 16-bit slices, which the assembly routines hand back.
        for (matrix_offset, vector_offset) in [(0, 0), (0, 1), (1, 0)] {
            cases += check_products(&matrix[matrix_offset..], &vector[vector_offset..]);
        }
    }
    cases
}

/// Compares `S::matrix_product` and `S::transposed_product` with scale one against the sum of
/// `Scalar::acc_mul_add` and one `Scalar::acc_scale_round` per output, outputs and overflow
/// counts, on every shape of [`PRODUCT_ROWS`] and [`PRODUCT_COLUMNS`]. Panics on the first
/// difference.
fn check_products<S: Scalar>(matrix: &[S], vector: &[S]) -> u32 {
    let mut out = [S::ZERO; 128];
    let mut expected = [S::ZERO; 128];
    let mut cases = 0;
    for rows in PRODUCT_ROWS {
        for columns in PRODUCT_COLUMNS {
            let matrix = &matrix[..rows * columns];
            let (mut overflows, mut expected_overflows) = (0, 0);
            S::matrix_product(
                matrix,
                &vector[..columns],
                S::ONE,
                &mut out[..rows],
                &mut overflows,
            );
            for (i, value) in expected[..rows].iter_mut().enumerate() {
                let row = &matrix[i * columns..(i + 1) * columns];
                let sum = row
                    .iter()
                    .zip(vector)
                    .fold(S::acc_zero(), |sum, (&w, &x)| S::acc_mul_add(sum, w, x));
                *value = S::acc_scale_round(sum, S::ONE, &mut expected_overflows);
            }
            if out[..rows] != expected[..rows] || overflows != expected_overflows {
                defmt::panic!(
                    "{=str} matrix_product differs: {=usize}x{=usize}",
                    S::FORMAT.name(),
                    rows,
                    columns
                );
            }

            let (mut overflows, mut expected_overflows) = (0, 0);
            S::transposed_product(
                matrix,
                &vector[..rows],
                S::ONE,
                &mut out[..columns],
                &mut overflows,
            );
            for (j, value) in expected[..columns].iter_mut().enumerate() {
                let sum = (0..rows).fold(S::acc_zero(), |sum, i| {
                    S::acc_mul_add(sum, matrix[i * columns + j], vector[i])
                });
                *value = S::acc_scale_round(sum, S::ONE, &mut expected_overflows);
            }
            if out[..columns] != expected[..columns] || overflows != expected_overflows {
                defmt::panic!(
                    "{=str} transposed_product differs: {=usize}x{=usize}",
                    S::FORMAT.name(),
                    rows,
                    columns
                );
            }
            cases += 2;
        }
    }
    cases
}

#[entry]
fn main() -> ! {
    check_kernels();
    let arena = arena();
    bench_network("digits", &DIGITS, arena);
    bench_network("wide", &WIDE, arena);
    defmt::info!("done");
    semihosting::process::exit(0)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    defmt::error!("panic: {}", defmt::Display2Format(info));
    semihosting::process::exit(101)
}

#[defmt::panic_handler]
fn defmt_panic() -> ! {
    semihosting::process::exit(101)
}

/// Exits with status 102 on any HardFault, after logging where it happened.
#[allow(unsafe_code)]
#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    defmt::error!("HardFault: pc={=u32:#010x}", frame.pc());
    semihosting::process::exit(102)
}
