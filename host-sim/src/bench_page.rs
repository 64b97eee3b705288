//! Renders the figures of `pcsim bench` as the Markdown page `docs/PERFORMANCE.md`.

use std::fmt::Write as _;

use crate::bench::{EarlyStop, Memory, Throughput};
use crate::board_bench::{BoardCounts, RegionCount};

/// Everything the page shows.
pub(crate) struct Figures<'a> {
    pub(crate) machine: &'a str,
    pub(crate) counts: &'a BoardCounts,
    pub(crate) memories: &'a [Memory],
    pub(crate) throughputs: &'a [Throughput],
    pub(crate) early: &'a [EarlyStop],
    pub(crate) criterion: &'a [(String, f64)],
}

/// Formats a count with thousands separators.
fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn row(out: &mut String, cells: &[String]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn find<'a>(
    counts: &'a BoardCounts,
    network: &str,
    format: &str,
    region: &str,
) -> Option<&'a RegionCount> {
    counts
        .regions
        .iter()
        .find(|count| count.network == network && count.format == format && count.region == region)
}

fn per_mac(count: Option<&RegionCount>) -> String {
    count.map_or("-".into(), |count| {
        format!(
            "{:.2}",
            count.instructions as f64 / count.work.max(1) as f64
        )
    })
}

fn total(counts: &[Option<&RegionCount>]) -> String {
    if counts.iter().any(Option::is_none) {
        return "-".into();
    }
    grouped(
        counts
            .iter()
            .flatten()
            .map(|count| count.instructions)
            .sum(),
    )
}

/// Network and format pairs in firmware order.
fn combinations(counts: &BoardCounts) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for count in &counts.regions {
        let pair = (count.network.clone(), count.format.clone());
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    pairs
}

fn board_section(out: &mut String, counts: &BoardCounts) {
    out.push_str(
        "## Instructions on the emulated Cortex-M4F\n\n\
         `boards/qemu-m4-bench` runs each kernel once on QEMU `mps2-an386` (Cortex-M4F) with the \
         TCG plugin `boards/qemu-m4-bench/plugin/insn_count.c`, which counts the instructions \
         executed between the firmware's `bench_start` and `bench_stop` markers. The marker \
         overhead, measured by an empty region, is subtracted",
    );
    let _ = write!(
        out,
        " ({} instructions). Two runs printed {} counts. The networks are `digits` \
         (64-64-64-10) and `wide` (64-256-256-10), relu, with SP weights drawn uniformly in \
         `+-1/sqrt(fan_in)` and inputs in `[0, 1)` from a fixed seed; the product kernels use \
         layer 2 (64x64 or 256x256). Instructions are not cycles: a real core also pays for \
         flash wait states and multi-cycle instructions.\n\n",
        counts.overhead,
        if counts.repeatable {
            "identical"
        } else {
            "DIFFERENT"
        }
    );
    out.push_str(
        "Instructions per multiply-accumulate (MAC), whole kernel including per-row rounding:\n\n",
    );
    out.push_str(
        "| network | format | matrix product | `dot` per row (the path before the matrix \
         kernels) | transposed product | transposed product through the transposed copy | \
         feedforward |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for (network, format) in combinations(counts) {
        let get = |region| find(counts, &network, &format, region);
        row(
            out,
            &[
                network.clone(),
                format.clone(),
                per_mac(get("matrix_product")),
                per_mac(get("dot_per_row")),
                per_mac(get("transposed_product")),
                per_mac(get("transposed_copy_product")),
                per_mac(get("feedforward")),
            ],
        );
    }
    out.push_str(
        "\nOn `thumbv7em` the fixed-point matrix and transposed products with scale one run \
         one inline-assembly routine per product (`src/kernels/products.rs`), which also \
         rounds and saturates every output. Counted from the assembly, per \
         multiply-accumulate, the inner loop of the `I4F12` matrix product takes 0.81 \
         instructions: `LDM` of four words of the vector and of the row, then four `SMLALD`s, \
         32 columns per iteration. That of the `I16F16` one takes 1.63 (`LDM` and `SMLAL`, 16 \
         columns per iteration). The transposed products walk \
         down several columns at a time. `I4F12` takes 1.45 for eight columns in 32-bit \
         accumulators (`LDRD`, `UXTAH` to step to the next row, and `SMLA<x><y>`, 16 rows per \
         iteration). A sum that leaves the `i32` range sends the product to the general path, \
         as a saturated output does. `I16F16` takes 1.85 for three columns (`LDM` of a row's \
         three weights, `UXTAH` and `SMLAL`, 32 rows per iteration). With exactly 64 rows it \
         takes 1.83, because one unrolled pass then takes them all and the routine leaves out \
         the loop. Columns left over go four at a time, at 1.69 and 2.03. The rest of each \
         figure above is per-row or per-column work for the loop state, the rounding and the stores. A matrix product spends 8 \
         instructions per row. A transposed product spends 17 per three columns (`I16F16`), \
         25 per eight columns (`I4F12`) or 22 to 25 per four columns. `I16F16` also proves \
         that the `i64` sums are exact, with one `SSAT` per vector value: in a pass of its \
         own, or, with at most 64 rows and four leftover columns, in the pass of those \
         columns.\n",
    );
    out.push_str(
        "\nInstructions per call. An inference step is one activity update plus the errors that \
         follow it, which is one iteration of the inference loop. Full inference is \
         `infer_supervised` with the feedforward pass and 20 steps. A learning update is the \
         weight gradients of one sample plus one SGD step.\n\n",
    );
    out.push_str(
        "| network | format | prediction (feedforward) | inference step | full inference \
         (T = 20) | learning update |\n",
    );
    out.push_str("|---|---|---|---|---|---|\n");
    for (network, format) in combinations(counts) {
        let get = |region| find(counts, &network, &format, region);
        row(
            out,
            &[
                network.clone(),
                format.clone(),
                total(&[get("feedforward")]),
                total(&[get("inference_step"), get("compute_errors")]),
                total(&[get("infer_supervised")]),
                total(&[get("weight_gradients"), get("sgd_step")]),
            ],
        );
    }
    out.push('\n');
}

fn memory_section(out: &mut String, memories: &[Memory]) {
    out.push_str(
        "## Firmware memory\n\n\
         `boards/qemu-m4` (the inference firmware of `pcsim demo`) built with each model; flash \
         and \
         static RAM come from the linked sections, the stack from stack painting \
         (`boards/qemu-m4/src/stack.rs`) over a run of the test protocol. The firmware reads \
         the weights in place from the model file in flash and keeps a transposed copy next to \
         them, so RAM holds no weights. \"Weights in flash\" counts both. Flash also includes \
         the embedded test samples. `build.rs` embeds a third, aligned copy when the weights \
         in the model file are not 4-byte aligned, as in an `I4F12` model of even depth. \
         \"State in RAM\" is activities + errors at the format's size. \"Network buffers in \
         RAM\" is `fixedpc::network::inference_ram_bytes`, which adds the scratch, scalings \
         and overflow counters. The RAM target divides static RAM by weights + activities + \
         errors. The last ratio divides it by the state in RAM alone.\n\n",
    );
    out.push_str(
        "| network | format | flash | weights in flash | static RAM | network buffers in RAM | \
         state in RAM | RAM / (weights + state) | RAM / state in RAM | stack | test samples | \
         bit-exact with host |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for memory in memories {
        row(
            out,
            &[
                memory.network.clone(),
                memory.format.to_string(),
                grouped(memory.flash_bytes),
                grouped(memory.flash_weights_bytes as u64),
                grouped(memory.static_ram_bytes),
                grouped(memory.network_bytes as u64),
                grouped(memory.state_bytes as u64),
                format!("{:.3}", ram_over_network(memory)),
                format!(
                    "{:.3}",
                    memory.static_ram_bytes as f64 / memory.state_bytes.max(1) as f64
                ),
                grouped(memory.stack_bytes),
                memory.test_samples.to_string(),
                format!(
                    "{} ({})",
                    if memory.bit_exact { "yes" } else { "NO" },
                    memory.host_checksum
                ),
            ],
        );
    }
    out.push('\n');
}

/// Returns static RAM over weights + activities + errors, the ratio of the RAM target. The
/// firmware keeps two copies of the weights in flash, and the ratio counts one.
fn ram_over_network(memory: &Memory) -> f64 {
    let network = memory.flash_weights_bytes / 2 + memory.state_bytes;
    memory.static_ram_bytes as f64 / network.max(1) as f64
}

/// A measured region's name and its description in the targets table.
type Product = (&'static str, &'static str);

/// Region names and descriptions of the matrix and transposed products.
const PRODUCTS: [Product; 2] = [
    ("matrix_product", "matrix product"),
    (
        "transposed_product",
        "transposed product over row-major weights",
    ),
];

/// The transposed product as inference firmware runs it, a matrix product over the transposed
/// copy of the weights.
const PRODUCTS_WITH_COPY: [Product; 3] = [
    PRODUCTS[0],
    PRODUCTS[1],
    (
        "transposed_copy_product",
        "transposed product through the transposed copy in flash (inference firmware)",
    ),
];

/// Maximum instructions per multiply-accumulate of the products on the Cortex-M4, per format,
/// with the products each target covers. The 16-bit target is the one for inference.
const MAC_TARGETS: [(&str, &str, f64, &[Product]); 2] = [
    ("i4f12", "16-bit `I4F12`", 1.0, &PRODUCTS_WITH_COPY),
    ("i16f16", "`I16F16`", 2.0, &PRODUCTS),
];

/// Maximum static RAM per byte of the state the firmware keeps in RAM.
const RAM_TARGET: f64 = 1.05;

/// Returns "yes" when every value is at most `limit`, else "no".
fn verdict(values: &[Option<f64>], limit: f64) -> &'static str {
    if !values.is_empty()
        && values
            .iter()
            .all(|value| value.is_some_and(|value| value <= limit))
    {
        "yes"
    } else {
        "no"
    }
}

fn targets_section(out: &mut String, figures: &Figures<'_>) {
    out.push_str(
        "## Targets\n\n\
         Each figure comes from the sections below. For the products, the `digits` (64x64) \
         figure comes first and the `wide` (256x256) one second.\n\n\
         | target | limit | measured | met |\n|---|---|---|---|\n",
    );
    let mac = |format: &str, region: &str| -> Vec<Option<f64>> {
        ["digits", "wide"]
            .iter()
            .map(|network| {
                find(figures.counts, network, format, region)
                    .map(|count| count.instructions as f64 / count.work.max(1) as f64)
            })
            .collect()
    };
    let listed = |values: &[Option<f64>], digits: usize| -> String {
        let texts: Vec<String> = values
            .iter()
            .map(|value| value.map_or("-".into(), |value| format!("{value:.digits$}")))
            .collect();
        texts.join(", ")
    };

    for (format, name, limit, products) in MAC_TARGETS {
        for &(region, product) in products {
            let values = mac(format, region);
            row(
                out,
                &[
                    format!("{name} {product} on the Cortex-M4, instructions per MAC"),
                    format!("{limit:.1}"),
                    listed(&values, 3),
                    verdict(&values, limit).into(),
                ],
            );
        }
    }

    let ratios: Vec<Option<f64>> = figures
        .memories
        .iter()
        .map(|memory| Some(ram_over_network(memory)))
        .collect();
    let largest = ratios
        .iter()
        .flatten()
        .copied()
        .fold(None, |most: Option<f64>, ratio| {
            Some(most.map_or(ratio, |most| most.max(ratio)))
        });
    row(
        out,
        &[
            "static RAM over weights + activities + errors, largest over the firmware builds \
             (the weights are in flash)"
                .into(),
            format!("{RAM_TARGET:.2}"),
            listed(&[largest], 3),
            verdict(&ratios, RAM_TARGET).into(),
        ],
    );

    let (jpc_low, _) = JPC_SECONDS_PER_EPOCH;
    let batched = figures
        .throughputs
        .iter()
        .find(|throughput| throughput.path == "batched")
        .map(|throughput| throughput.seconds_per_epoch);
    let epoch_limit = jpc_low / JPC_SPEEDUP_TARGET;
    row(
        out,
        &[
            format!(
                "host `f32` training, seconds per epoch on JPC's settings ({JPC_SPEEDUP_TARGET} \
                 times JPC's fastest)"
            ),
            format!("{epoch_limit:.3}"),
            listed(&[batched], 3),
            verdict(&[batched], epoch_limit).into(),
        ],
    );

    out.push_str(
        "\nThe 16-bit transposed product cannot reach 1.0 with row-major weights. A weight word \
         holds two columns of one row, and every dual multiply (`SMLAD` and its variants) adds \
         both halves of a word into one accumulator, while the transposed product needs them in \
         two different outputs. So each product takes its own `SMLA<x><y>`, or half of a \
         `PKHBT`/`PKHTB` repack plus half an `SMLAD`: one instruction before any load, row step \
         or loop. The inference firmware therefore keeps the weights and a second, transposed \
         copy in flash (`Network::with_transposed`). It computes `W^T e` as a matrix product \
         over the copy, with the same bits, for every layer whose width suits the matrix \
         routine (a multiple of 8 for `I4F12`, of 4 for `I16F16`). The bench firmware keeps \
         its copy in RAM, which QEMU runs with the same instructions, but a real core may add \
         flash wait states. Learning firmware changes its weights, so it keeps one copy in \
         RAM and runs the transposed product.\n\n\
         With the weights in flash, static RAM is a few percent of weights + activities + \
         errors. Over activities + errors alone it is larger than one, as the last ratio of the \
         memory table shows. RAM also contains buffers that do not grow with the weights: \
         the scratch of one layer, the input and target, the scalings, the overflow counters and \
         the logger.\n\n",
    );
}

/// Seconds per epoch of JPC with the settings of [`host_section`], as the maintainers
/// measured them (lowest and highest).
const JPC_SECONDS_PER_EPOCH: (f64, f64) = (0.07, 0.11);

/// Throughput over JPC's that the batched `f32` path is meant to reach.
const JPC_SPEEDUP_TARGET: f64 = 5.0;

fn host_section(out: &mut String, figures: &Figures<'_>) {
    let (jpc_low, jpc_high) = JPC_SECONDS_PER_EPOCH;
    let _ = write!(
        out,
        "## Host training throughput\n\n\
         `pcsim train` with the settings of the maintainers' JPC timing: tanh 64-64-64-10, \
         batch 32, 20 inference steps, Adam (learning rate 0.001 here), 1000 training rows, \
         so 32 batches per epoch. Seconds per epoch are the median over the epochs after \
         the first, so that an epoch another process interrupts does not count. For comparison, the maintainers measured {jpc_low} to {jpc_high} s per epoch \
         for JPC with these settings; that script is not in this repository. The batched \
         path (the default for f32) holds a batch's activities as matrices and computes each \
         layer's products for the whole batch, with an AVX2 and FMA kernel where the CPU \
         has both and `matrixmultiply` elsewhere. The per-sample path \
         (`--per-sample`, and every other format) runs the core one sample at a time, as a \
         board does.\n\n"
    );
    out.push_str(
        "| format | path | seconds per epoch | samples per second | epochs | test accuracy |\n",
    );
    out.push_str("|---|---|---|---|---|---|\n");
    for throughput in figures.throughputs {
        row(
            out,
            &[
                throughput.format.to_string(),
                throughput.path.to_string(),
                format!("{:.3}", throughput.seconds_per_epoch),
                format!("{:.0}", throughput.samples_per_second),
                throughput.epochs.to_string(),
                format!("{:.4}", throughput.test_accuracy),
            ],
        );
    }
    let batched = figures
        .throughputs
        .iter()
        .find(|throughput| throughput.path == "batched");
    if let Some(batched) = batched {
        let seconds = batched.seconds_per_epoch;
        let target = jpc_low / JPC_SPEEDUP_TARGET;
        let _ = write!(
            out,
            "\nThe target for the batched f32 path is {JPC_SPEEDUP_TARGET} times JPC's \
             throughput: at most {target:.3} s per epoch against JPC's fastest {jpc_low} s \
             ({:.3} s against its slowest). At {seconds:.3} s per epoch it is {:.1} to {:.1} \
             times as fast as JPC, so the target is {}.\n",
            jpc_high / JPC_SPEEDUP_TARGET,
            jpc_low / seconds,
            jpc_high / seconds,
            if seconds <= target { "met" } else { "not met" }
        );
    }
    out.push_str(
        "\n## Early stop\n\n\
         `pcsim train --numeric i16f16` with its defaults (relu 64-64-64-10, SGD, learning rate \
         0.2, batch 8, 30 epochs, at most 20 steps of 0.1), without and with an early-stop \
         tolerance on the per-sample energy change. Training steps are the mean over the \
         last epoch's samples; test steps are the mean of the test protocol (inference with \
         the label clamped) on the 797 test digits. Test accuracy is that of the feedforward \
         prediction, which early stop changes only through the weights it trains; it moves by \
         about 0.005 from one epoch to the next, so the mean over the last 5 epochs is shown \
         too.\n\n",
    );
    out.push_str(
        "| tolerance | steps per training sample | steps per test sample | test accuracy | \
         mean of last 5 epochs | training seconds |\n",
    );
    out.push_str("|---|---|---|---|---|---|\n");
    for early in figures.early {
        row(
            out,
            &[
                early
                    .tolerance
                    .map_or("none (T = 20)".into(), |tolerance| tolerance.to_string()),
                format!("{:.2}", early.mean_training_steps),
                format!("{:.2}", early.mean_test_steps),
                format!("{:.4}", early.test_accuracy),
                format!("{:.4}", early.last_five_accuracy),
                format!("{:.1}", early.training_seconds),
            ],
        );
    }
    out.push('\n');
}

fn criterion_section(out: &mut String, criterion: &[(String, f64)]) {
    out.push_str(
        "## Host kernels (criterion)\n\n\
         `cargo bench -p fixedpc-host-sim --bench kernels` with short measurement times \
         (`host-sim/benches/kernels.rs`): mean time per iteration. The training step is 32 \
         supervised inferences of 20 steps, the gradients and one SGD step, on one thread.\n\n",
    );
    if criterion.is_empty() {
        out.push_str("No criterion results were found; run `scripts/bench`.\n");
        return;
    }
    out.push_str("| benchmark | mean time |\n|---|---|\n");
    for (name, nanoseconds) in criterion {
        let time = if *nanoseconds >= 1e6 {
            format!("{:.3} ms", nanoseconds / 1e6)
        } else {
            format!("{:.2} us", nanoseconds / 1e3)
        };
        row(out, &[format!("`{name}`"), time]);
    }
}

/// Returns the whole page.
pub(crate) fn render(figures: &Figures<'_>) -> String {
    let mut out = String::new();
    out.push_str(
        "# Performance\n\n\
         Generated by `scripts/bench` (about 7 minutes on 2 cores after the first build), \
         which runs the criterion benchmarks and then `pcsim bench`. Benchmarks report and \
         never fail on timing: `pcsim bench` fails only when a board run differs from the host \
         or two counting runs differ.\n\n",
    );
    let _ = writeln!(out, "Machine: {}.\n", figures.machine);
    targets_section(&mut out, figures);
    board_section(&mut out, figures.counts);
    memory_section(&mut out, figures.memories);
    host_section(&mut out, figures);
    criterion_section(&mut out, figures.criterion);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throughput(path: &'static str, seconds_per_epoch: f64) -> Throughput {
        Throughput {
            format: "f32",
            path,
            seconds_per_epoch,
            samples_per_second: 1000.0 / seconds_per_epoch,
            test_accuracy: 0.9,
            epochs: 4,
        }
    }

    fn host_page(throughputs: &[Throughput]) -> String {
        let counts = BoardCounts {
            regions: Vec::new(),
            stacks: Vec::new(),
            overhead: 0,
            repeatable: true,
        };
        let figures = Figures {
            machine: "test machine",
            counts: &counts,
            memories: &[],
            throughputs,
            early: &[],
            criterion: &[],
        };
        let mut out = String::new();
        host_section(&mut out, &figures);
        out
    }

    #[test]
    fn verdict_needs_every_value_within_limit() {
        assert_eq!(verdict(&[Some(0.9), Some(1.0)], 1.0), "yes");
        assert_eq!(verdict(&[Some(0.9), Some(1.1)], 1.0), "no");
        assert_eq!(verdict(&[Some(0.9), None], 1.0), "no");
        assert_eq!(verdict(&[], 1.0), "no");
    }

    #[test]
    fn targets_section_reports_transposed_miss() {
        let region = |format: &str, region: &str, instructions| RegionCount {
            network: "digits".into(),
            format: format.into(),
            region: region.into(),
            work: 100,
            instructions,
        };
        let counts = BoardCounts {
            regions: vec![
                region("i4f12", "matrix_product", 90),
                region("i4f12", "transposed_product", 150),
                region("i4f12", "transposed_copy_product", 95),
            ],
            stacks: Vec::new(),
            overhead: 0,
            repeatable: true,
        };
        let figures = Figures {
            machine: "test machine",
            counts: &counts,
            memories: &[],
            throughputs: &[throughput("batched", 0.010)],
            early: &[],
            criterion: &[],
        };
        let mut page = String::new();
        targets_section(&mut page, &figures);
        assert!(
            page.contains("| 16-bit `I4F12` transposed product over row-major weights on the Cortex-M4, instructions per MAC | 1.0 | 1.500, - | no |"),
            "{page}"
        );
        assert!(
            page.contains(
                "| 16-bit `I4F12` transposed product through the transposed copy in flash \
                 (inference firmware) on the Cortex-M4, instructions per MAC | 1.0 | 0.950, - | no |"
            ),
            "{page}"
        );
        assert!(
            !page.contains("`I16F16` transposed product through"),
            "the copy row is for the 16-bit target only: {page}"
        );
        assert!(page.contains("| 0.014 | 0.010 | yes |"), "{page}");
    }

    #[test]
    fn board_section_shows_copy_column() {
        let region = |region: &str, work, instructions| RegionCount {
            network: "digits".into(),
            format: "i4f12".into(),
            region: region.into(),
            work,
            instructions,
        };
        let counts = BoardCounts {
            regions: vec![
                region("matrix_product", 100, 96),
                region("transposed_product", 100, 153),
                region("transposed_copy_product", 100, 95),
            ],
            stacks: Vec::new(),
            overhead: 5,
            repeatable: true,
        };
        let mut page = String::new();
        board_section(&mut page, &counts);
        assert!(
            page.contains("| digits | i4f12 | 0.96 | - | 1.53 | 0.95 | - |"),
            "{page}"
        );
    }

    #[test]
    fn memory_section_shows_weights_in_flash() {
        let memory = Memory {
            network: "digits".into(),
            format: "i4f12",
            flash_bytes: 200_000,
            flash_weights_bytes: 35_328,
            static_ram_bytes: 1_000,
            network_bytes: 832,
            state_bytes: 680,
            stack_bytes: 560,
            test_samples: 797,
            bit_exact: true,
            host_checksum: "0x8fac003d".into(),
        };
        let mut page = String::new();
        memory_section(&mut page, &[memory]);
        assert!(
            page.contains(
                "| digits | i4f12 | 200,000 | 35,328 | 1,000 | 832 | 680 | 0.055 | 1.471 | 560 | 797 | \
                 yes (0x8fac003d) |"
            ),
            "{page}"
        );
    }

    #[test]
    fn host_section_states_jpc_target_met() {
        let page = host_page(&[throughput("batched", 0.010), throughput("per sample", 0.09)]);
        assert!(page.contains("| f32 | batched | 0.010 |"), "{page}");
        assert!(page.contains("| f32 | per sample | 0.090 |"), "{page}");
        assert!(page.contains("at most 0.014 s per epoch"), "{page}");
        assert!(page.contains("7.0 to 11.0 times as fast as JPC"), "{page}");
        assert!(page.contains("the target is met."), "{page}");
    }

    #[test]
    fn host_section_states_jpc_target_missed() {
        let page = host_page(&[throughput("batched", 0.02)]);
        assert!(page.contains("the target is not met."), "{page}");
    }

    #[test]
    fn host_section_without_batched_row_omits_target() {
        let page = host_page(&[throughput("per sample", 0.09)]);
        assert!(!page.contains("The target"), "{page}");
    }
}
