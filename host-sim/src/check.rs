//! `pcsim check`: runs a golden case through the reference and the core, compares them with
//! JPC, and checks the fixed-point core against its error bound.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use fixedpc::I16F16;
use serde::Serialize;

use crate::bounds::{self, KinkEvent};
use crate::data::input_error;
use crate::golden::{self, Case, ErrorStats, QUANTITIES};

/// Largest relative error allowed between the core in `f64` (or the reference) and JPC.
///
/// JPC runs in float64 and reproduces itself to about one ulp, and the golden cases agree with
/// the reference to about `1e-11`. The limit `1e-9` leaves room for longer trajectories. A
/// convention mismatch shows up at `1e-3` or more, so it still fails.
pub const F64_TOLERANCE: f64 = 1e-9;

/// Options of `pcsim check`.
#[derive(Args, Clone, Debug)]
pub struct CheckArgs {
    /// Golden case file (JSON) computed by JPC
    #[arg(value_name = "CASE.json")]
    pub case: PathBuf,
    /// Write a JSON report to this file
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
}

/// Errors of one quantity in the three comparisons.
#[derive(Clone, Debug, Serialize)]
pub struct QuantityReport {
    /// Quantity name, as in the case file.
    pub name: &'static str,
    /// `f64` reference against JPC.
    pub reference_vs_jpc: ErrorStats,
    /// Core in `f64` against JPC.
    pub core_f64_vs_jpc: ErrorStats,
    /// Core in `I16F16` against the reference.
    pub core_i16f16_vs_reference: ErrorStats,
    /// Largest elementwise bound on the `I16F16` error.
    pub fixed_bound: f64,
    /// Whether every entry's `I16F16` error is within its own bound.
    pub fixed_within_bound: bool,
    /// `fixed_bound / core_i16f16_vs_reference.max_abs`; `None` when the error is zero.
    pub tightness: Option<f64>,
}

/// Everything `pcsim check` measures on one case; written by `--report`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// Case name.
    pub case: String,
    /// Case file.
    pub file: String,
    /// Whether every check passed.
    pub passed: bool,
    /// Failure messages, one sentence each.
    pub failures: Vec<String>,
    /// Relative tolerance of the `f64` comparisons with JPC.
    pub f64_tolerance: f64,
    /// Largest relative error of the core in `f64` against JPC, over every quantity.
    pub f64_max_rel_error: f64,
    /// Largest relative error of the reference against JPC, over every quantity.
    pub reference_max_rel_error: f64,
    /// Entries smaller than this fraction of their quantity's largest magnitude have their
    /// relative error measured against that fraction.
    pub relative_floor_fraction: f64,
    /// Largest absolute error of the core in `I16F16` against the reference, over every
    /// quantity.
    pub fixed_max_abs_error: f64,
    /// Largest elementwise bound, over every quantity.
    pub fixed_bound: f64,
    /// Whether every `I16F16` entry is within its bound and nothing saturated.
    pub fixed_within_bound: bool,
    /// Saturated `I16F16` results; the bound assumes none.
    pub fixed_overflows: u64,
    /// States where an activity's error interval contains a kink of the activation.
    pub kink_events: usize,
    /// The first such state.
    pub first_kink: Option<KinkEvent>,
    /// Steps over which every local error keeps its own sensitivity in the bound.
    pub bound_window: usize,
    /// Inference steps of the case.
    pub steps: usize,
    /// Per-quantity detail, in the order of the case file.
    pub quantities: Vec<QuantityReport>,
}

/// Runs every comparison on a loaded case.
///
/// # Errors
///
/// A core error, which a validated case rules out.
pub fn check_case(case: &Case, file: &Path) -> Result<CheckReport> {
    let expected = golden::expected_outputs(case);
    let trajectory = golden::run_reference(case);
    let reference = golden::reference_outputs(&trajectory);
    let core_f64 = golden::run_core::<f64>(case)
        .with_context(|| format!("running {} through the core in f64", file.display()))?;
    let core_fixed = golden::run_core::<I16F16>(case)
        .with_context(|| format!("running {} through the core in i16f16", file.display()))?;
    let bound = bounds::fixed_point_bound(
        &case.reference_network(),
        &trajectory,
        &case.x,
        &case.y,
        case.inference.step_size,
        case.expected.lr,
        None,
    );

    let reference_errors = golden::compare_outputs(&reference, &expected);
    let f64_errors = golden::compare_outputs(&core_f64.outputs, &expected);
    let fixed_errors = golden::compare_outputs(&core_fixed.outputs, &reference);
    let fixed_values = core_fixed.outputs.quantities();
    let reference_values = reference.quantities();
    let bound_values = bound.bounds.quantities();

    let mut quantities = Vec::with_capacity(QUANTITIES.len());
    for (index, name) in QUANTITIES.iter().enumerate() {
        let within = fixed_values[index]
            .iter()
            .zip(reference_values[index])
            .zip(bound_values[index])
            .all(|((fixed, exact), limit)| (fixed - exact).abs() <= *limit);
        let largest_bound = bound_values[index].iter().fold(0.0f64, |m, &b| m.max(b));
        let observed = fixed_errors[index].max_abs;
        quantities.push(QuantityReport {
            name,
            reference_vs_jpc: reference_errors[index],
            core_f64_vs_jpc: f64_errors[index],
            core_i16f16_vs_reference: fixed_errors[index],
            fixed_bound: largest_bound,
            fixed_within_bound: within,
            tightness: (observed > 0.0).then(|| largest_bound / observed),
        });
    }

    let largest =
        |pick: &dyn Fn(&QuantityReport) -> f64| quantities.iter().map(pick).fold(0.0f64, f64::max);
    let f64_max_rel_error = largest(&|q| q.core_f64_vs_jpc.max_rel);
    let reference_max_rel_error = largest(&|q| q.reference_vs_jpc.max_rel);
    let fixed_max_abs_error = largest(&|q| q.core_i16f16_vs_reference.max_abs);
    let fixed_bound = largest(&|q| q.fixed_bound);
    let entries_within = quantities.iter().all(|q| q.fixed_within_bound);

    let mut failures = Vec::new();
    if reference_max_rel_error > F64_TOLERANCE {
        failures.push(format!(
            "the f64 reference differs from JPC by {reference_max_rel_error:.3e} relative, \
             above {F64_TOLERANCE:e}"
        ));
    }
    if f64_max_rel_error > F64_TOLERANCE {
        failures.push(format!(
            "the core in f64 differs from JPC by {f64_max_rel_error:.3e} relative, above \
             {F64_TOLERANCE:e}"
        ));
    }
    if core_fixed.overflows > 0 {
        failures.push(format!(
            "the core in i16f16 saturated {} results; the error bound assumes no saturation",
            core_fixed.overflows
        ));
    }
    for quantity in quantities.iter().filter(|q| !q.fixed_within_bound) {
        failures.push(format!(
            "the core in i16f16 exceeds the error bound on {}: error {:.3e}, bound {:.3e}",
            quantity.name, quantity.core_i16f16_vs_reference.max_abs, quantity.fixed_bound
        ));
    }

    Ok(CheckReport {
        case: case.name.clone(),
        file: file.display().to_string(),
        passed: failures.is_empty(),
        failures,
        f64_tolerance: F64_TOLERANCE,
        f64_max_rel_error,
        reference_max_rel_error,
        relative_floor_fraction: golden::RELATIVE_FLOOR_FRACTION,
        fixed_max_abs_error,
        fixed_bound,
        fixed_within_bound: entries_within && core_fixed.overflows == 0,
        fixed_overflows: core_fixed.overflows,
        kink_events: bound.kink_events,
        first_kink: bound.first_kink,
        bound_window: bound.window,
        steps: case.inference.steps,
        quantities,
    })
}

/// Describes the case's network in one line.
fn describe(case: &Case) -> String {
    let network = &case.network;
    let hidden = if network.depth > 1 {
        format!("-{}x{}", network.width, network.depth - 1)
    } else {
        String::new()
    };
    format!(
        "widths {}{hidden}-{}, {}, {}{}, batch {}, step {}, {} steps, lr {}",
        network.input_dim,
        network.output_dim,
        network.activation,
        network.param_type,
        if network.skip { ", skips" } else { "" },
        case.batch_size,
        case.inference.step_size,
        case.inference.steps,
        case.expected.lr
    )
}

/// Formats the report as the table `pcsim check` prints.
pub fn format_table(report: &CheckReport, case: &Case) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "case {} ({})", report.case, report.file);
    let _ = writeln!(out, "  {}", describe(case));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>21} {:>21} {:>32}",
        "", "reference vs JPC", "core f64 vs JPC", "core i16f16 vs reference"
    );
    let _ = writeln!(
        out,
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "quantity", "max abs", "max rel", "max abs", "max rel", "max abs", "bound", "bound/err"
    );
    for q in &report.quantities {
        let tightness = match q.tightness {
            Some(value) => format!("{value:.1}"),
            None => "-".to_string(),
        };
        let marker = if q.fixed_within_bound {
            ""
        } else {
            "  EXCEEDED"
        };
        let _ = writeln!(
            out,
            "{:<24} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10}{marker}",
            q.name,
            q.reference_vs_jpc.max_abs,
            q.reference_vs_jpc.max_rel,
            q.core_f64_vs_jpc.max_abs,
            q.core_f64_vs_jpc.max_rel,
            q.core_i16f16_vs_reference.max_abs,
            q.fixed_bound,
            tightness
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "relative error: |a - b| / max(|b|, {:e} * largest |b| of the quantity)",
        report.relative_floor_fraction
    );
    let _ = writeln!(
        out,
        "f64: max relative error {:.2e} against JPC (limit {:e}); reference {:.2e}",
        report.f64_max_rel_error, report.f64_tolerance, report.reference_max_rel_error
    );
    let window = if report.bound_window >= report.steps {
        "every local error kept separate".to_string()
    } else {
        format!(
            "local errors merged every {} steps, which loosens the bound",
            report.bound_window
        )
    };
    let _ = writeln!(
        out,
        "i16f16: max error {:.2e}, max bound {:.2e}, every entry within its bound: {} \
         ({window}; {} saturated results)",
        report.fixed_max_abs_error,
        report.fixed_bound,
        if report.fixed_within_bound {
            "yes"
        } else {
            "no"
        },
        report.fixed_overflows
    );
    match report.first_kink {
        None => {
            let _ = writeln!(
                out,
                "kinks: no activity came within its error bound of a kink of the activation"
            );
        }
        Some(kink) => {
            let _ = writeln!(
                out,
                "kinks: {} times an activity came within its error bound of a kink, first at \
                 step {}, sample {}, z_{}[{}] = {:.3e} with bound {:.2e}; there the fixed-point \
                 derivative may take the other side's value, and the bound includes the full \
                 jump, so it is valid but loose from then on",
                report.kink_events,
                kink.step,
                kink.sample,
                kink.layer,
                kink.unit,
                kink.activity,
                kink.bound
            );
        }
    }
    for failure in &report.failures {
        let _ = writeln!(out, "FAILED: {failure}");
    }
    let _ = writeln!(
        out,
        "result: {}",
        if report.passed { "pass" } else { "fail" }
    );
    out
}

/// Runs `pcsim check`: exit status 0 when every check passes, 1 when one fails; an invalid
/// case file is an input error (status 2).
///
/// # Errors
///
/// An input error for an unreadable or invalid case file or an unwritable report path.
pub fn run(args: &CheckArgs) -> Result<ExitCode> {
    let case = golden::load_case(&args.case)?;
    let report = check_case(&case, &args.case)?;
    print!("{}", format_table(&report, &case));
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").map_err(|error| {
            input_error(format!(
                "failed to write the report to {}: {error}",
                path.display()
            ))
        })?;
        println!("report written to {}", path.display());
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
