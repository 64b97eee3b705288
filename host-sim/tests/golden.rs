//! Every golden case computed by JPC: the reference and the core in `f64` reproduce it, the
//! core in `I16F16` stays within its error bound, and `pcsim check` reports bad files.

use std::path::{Path, PathBuf};
use std::process::Command;

use fixedpc_host_sim::check::{check_case, CheckReport, F64_TOLERANCE};
use fixedpc_host_sim::golden::{load_case, synthesize, Case};

const CASES: [&str; 5] = [
    "case_a_tiny_linear.json",
    "case_b_tanh_sp.json",
    "case_c_relu_sp.json",
    "case_d_mupc_tanh_skip.json",
    "case_f_hard_tanh_sp.json",
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn check(file: &str) -> CheckReport {
    let path = golden_dir().join(file);
    let case = load_case(&path).unwrap_or_else(|error| panic!("{error:#}"));
    check_case(&case, &path).unwrap_or_else(|error| panic!("{error:#}"))
}

/// Asserts each comparison separately, so a failure names the quantity and the comparison.
fn assert_case(file: &str) {
    let report = check(file);
    for quantity in &report.quantities {
        assert!(
            quantity.reference_vs_jpc.max_rel <= F64_TOLERANCE,
            "{file}: reference differs from JPC on {}: {:?}",
            quantity.name,
            quantity.reference_vs_jpc
        );
        assert!(
            quantity.core_f64_vs_jpc.max_rel <= F64_TOLERANCE,
            "{file}: core f64 differs from JPC on {}: {:?}",
            quantity.name,
            quantity.core_f64_vs_jpc
        );
        assert!(
            quantity.fixed_within_bound,
            "{file}: core i16f16 exceeds the bound on {}: error {:e}, bound {:e}",
            quantity.name, quantity.core_i16f16_vs_reference.max_abs, quantity.fixed_bound
        );
    }
    assert_eq!(report.fixed_overflows, 0, "{file}: i16f16 saturated");
    assert!(report.passed, "{file}: {:?}", report.failures);
}

#[test]
fn case_a_tiny_linear() {
    assert_case(CASES[0]);
}

#[test]
fn case_b_tanh_sp() {
    assert_case(CASES[1]);
}

#[test]
fn case_c_relu_sp() {
    assert_case(CASES[2]);
}

#[test]
fn case_d_mupc_tanh_skip() {
    assert_case(CASES[3]);
}

#[test]
fn case_f_hard_tanh_sp() {
    assert_case(CASES[4]);
}

#[test]
fn every_case_file_has_a_test() {
    let mut files: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("tests/golden is readable")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    files.sort();
    assert_eq!(files, CASES);
}

#[test]
fn hard_tanh_case_clear_of_kinks() {
    // hard_tanh's fixed-point trajectory stays farther from its kinks than its error bound,
    // so no derivative jump enters the bound.
    let report = check("case_f_hard_tanh_sp.json");
    assert_eq!(report.kink_events, 0);
}

/// Returns a golden case's network and batch with a different step, and the reference's
/// results as the expected values.
fn with_step(file: &str, step_size: f64, steps: usize) -> Case {
    let case = load_case(&golden_dir().join(file)).unwrap();
    synthesize(
        "growing",
        case.network.clone(),
        case.scalings.clone(),
        case.weights.clone(),
        case.x.clone(),
        case.y.clone(),
        step_size,
        steps,
        case.expected.lr,
    )
}

#[test]
fn growing_energy_within_bound() {
    // Step 5 on hard_tanh makes the energy grow about 440-fold without saturating Q16.16.
    let case = with_step("case_f_hard_tanh_sp.json", 5.0, 12);
    let trace = &case.expected.energy_trace;
    assert!(trace[trace.len() - 1] > 100.0 * trace[0], "{trace:?}");
    let report = check_case(&case, Path::new("growing")).unwrap();
    assert!(report.f64_max_rel_error <= F64_TOLERANCE);
    assert_eq!(report.fixed_overflows, 0);
    assert!(report.fixed_within_bound, "{:?}", report.failures);
    assert!(report.kink_events > 0);
}

#[test]
fn saturating_energy_fails_check() {
    // Step 12 on tanh drives activities beyond the Q16.16 range of 32768.
    let case = with_step("case_b_tanh_sp.json", 12.0, 15);
    let trace = &case.expected.energy_trace;
    assert!(trace[trace.len() - 1] > 1e6 * trace[0], "{trace:?}");
    let report = check_case(&case, Path::new("saturating")).unwrap();
    assert!(report.f64_max_rel_error <= F64_TOLERANCE);
    assert!(report.fixed_overflows > 0);
    assert!(!report.fixed_within_bound);
    assert!(!report.passed);
    assert!(
        report.failures[0].contains("saturated"),
        "{:?}",
        report.failures
    );
    for quantity in &report.quantities {
        assert!(!quantity.fixed_bound.is_nan(), "{}", quantity.name);
    }
}

fn pcsim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pcsim"))
        .args(args)
        .output()
        .expect("pcsim runs")
}

#[test]
fn check_command_passes_and_writes_report() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let case = golden_dir().join(CASES[0]);
    let output = pcsim(&[
        "check",
        case.to_str().unwrap(),
        "--report",
        report_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("activities_final"), "{stdout}");
    assert!(stdout.contains("result: pass"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert!(report["f64_max_rel_error"].as_f64().unwrap() <= F64_TOLERANCE);
    assert!(report["fixed_max_abs_error"].as_f64().unwrap() > 0.0);
    assert!(report["fixed_bound"].as_f64().unwrap() > 0.0);
    assert_eq!(report["fixed_within_bound"], serde_json::Value::Bool(true));
    assert_eq!(report["quantities"].as_array().unwrap().len(), 8);
}

#[test]
fn check_command_fails_on_wrong_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let mut case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join(CASES[0])).unwrap())
            .unwrap();
    let gradient = &mut case["expected"]["weight_grads"][0][0][0];
    *gradient = serde_json::json!(gradient.as_f64().unwrap() + 1e-6);
    let path = dir.path().join("wrong.json");
    std::fs::write(&path, case.to_string()).unwrap();

    let output = pcsim(&["check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("core in f64 differs from JPC"), "{stdout}");
}

#[test]
fn check_command_rejects_missing_file() {
    let output = pcsim(&["check", "no/such/case.json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("failed to read golden case"), "{stderr}");
    assert!(stderr.contains("no/such/case.json"), "{stderr}");
}

#[test]
fn check_command_rejects_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(golden_dir().join(CASES[0])).unwrap();
    let path = dir.path().join("truncated.json");
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();

    let output = pcsim(&["check", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("truncated.json"), "{stderr}");
    assert!(stderr.contains("invalid JSON"), "{stderr}");
}

#[test]
fn check_command_rejects_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join(CASES[0])).unwrap())
            .unwrap();
    case["weights"][1].as_array_mut().unwrap().pop();
    let path = dir.path().join("shape.json");
    std::fs::write(&path, case.to_string()).unwrap();

    let output = pcsim(&["check", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("weights[1] has 3 rows, expected 4"),
        "{stderr}"
    );
}
