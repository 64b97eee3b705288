//! Builds and runs the emulated Cortex-M4F board (QEMU `mps2-an386`) and reads its results.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSection, SectionFlags};
use serde::Serialize;

/// QEMU machine of the emulated board.
pub const MACHINE: &str = "mps2-an386";

/// Firmware report and image size.
#[derive(Clone, Debug, Serialize)]
pub struct BoardRun {
    /// QEMU machine name.
    pub machine: &'static str,
    /// Predicted class per sample, in sample order.
    pub predictions: Vec<usize>,
    /// Samples whose prediction equals the label.
    pub correct: usize,
    /// CRC-32 over the test protocol's outputs.
    pub checksum: u32,
    /// Total inference steps over every sample.
    pub steps: u64,
    /// Saturated results reported by the firmware.
    pub overflows: u64,
    /// Bytes of flash: vector table, code, read-only data and the initial values of `.data`.
    pub flash_bytes: u64,
    /// Bytes of static RAM: `.data`, `.bss` and `.uninit` (the stack is not included).
    pub ram_bytes: u64,
    /// Stack high-water mark in bytes, measured by the firmware with stack painting.
    pub stack_bytes: u64,
    /// Path of the firmware image.
    pub elf: PathBuf,
}

/// Directory of the QEMU board crate in this repository.
pub fn default_board_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/qemu-m4")
}

/// Fails with install instructions when a tool the board run needs is missing.
fn require_tool(program: &str, argument: &str, install: &str) -> Result<()> {
    match Command::new(program)
        .arg(argument)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("{program} not found; the emulated board needs it. Install it with: {install}")
        }
        Err(error) => Err(error).with_context(|| format!("cannot start {program}")),
    }
}

/// Checks that the board crate and the tools a board run needs are present, before any long
/// work, and returns the board crate's absolute path.
pub fn check_prerequisites(board_dir: &Path) -> Result<PathBuf> {
    require_tool(
        "qemu-system-arm",
        "--version",
        "sudo apt-get install qemu-system-arm",
    )?;
    require_tool(
        "defmt-print",
        "--version",
        "cargo install defmt-print --locked",
    )?;
    let manifest = board_dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(crate::data::input_error(format!(
            "board crate not found: {} does not exist; pass the boards/qemu-m4 directory of a \
             fixedpc checkout with --board-dir",
            manifest.display()
        )));
    }
    board_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", board_dir.display()))
}

/// Builds the firmware with the given model and sample files embedded, runs it under QEMU and
/// parses its log.
pub fn run_qemu_m4(board_dir: &Path, model: &Path, samples: &Path) -> Result<BoardRun> {
    run_qemu_m4_with_options(board_dir, model, samples, None, true)
}

/// As [`run_qemu_m4`], and stops QEMU after `timeout_secs` seconds [default: the
/// `QEMU_TIMEOUT_SECS` of the environment, else 120 s]. Without `transposed`, the firmware
/// leaves out the transposed copy of the weights (`FIXEDPC_TRANSPOSED=0`), which saves flash
/// for a large model, and inference runs the transposed product instead, with the same bits.
pub fn run_qemu_m4_with_options(
    board_dir: &Path,
    model: &Path,
    samples: &Path,
    timeout_secs: Option<u64>,
    transposed: bool,
) -> Result<BoardRun> {
    let board_dir = check_prerequisites(board_dir)?;
    let model = model
        .canonicalize()
        .with_context(|| format!("cannot find {}", model.display()))?;
    let samples = samples
        .canonicalize()
        .with_context(|| format!("cannot find {}", samples.display()))?;

    eprintln!("building the {MACHINE} firmware in {}", board_dir.display());
    let copy = Path::new(if transposed { "1" } else { "0" });
    let elf = build_firmware(
        &board_dir,
        &[
            ("FIXEDPC_MODEL", &model),
            ("FIXEDPC_SAMPLES", &samples),
            ("FIXEDPC_TRANSPOSED", copy),
        ],
    )?;
    let (flash_bytes, ram_bytes) = image_sizes(&elf)?;

    eprintln!("running the firmware under qemu-system-arm -machine {MACHINE}");
    let mut runner = Command::new(board_dir.join("qemu-run.sh"));
    if let Some(seconds) = timeout_secs {
        runner.env("QEMU_TIMEOUT_SECS", seconds.to_string());
    }
    let mut child = runner
        .arg(&elf)
        .current_dir(&board_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-run.sh")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from qemu-run.sh"))?;
    let mut parser = LogParser::default();
    for line in BufReader::new(stdout).lines() {
        parser.line(&line.context("cannot read the firmware log")?);
    }
    let status = child.wait().context("cannot wait for qemu-run.sh")?;
    if !status.success() {
        let tail = parser.tail.join("\n");
        bail!("the firmware run failed ({status}); its last log lines:\n{tail}");
    }
    let (checksum, steps, overflows, stack_bytes) = parser
        .done
        .ok_or_else(|| anyhow!("the firmware ended without its 'done' line"))?;
    Ok(BoardRun {
        machine: MACHINE,
        correct: parser.correct,
        predictions: parser.predictions,
        checksum,
        steps,
        overflows,
        flash_bytes,
        ram_bytes,
        stack_bytes,
        elf,
    })
}

/// Builds the firmware crate in `board_dir` in release mode with the environment variables
/// `envs` and returns the path of its executable.
pub fn build_firmware(board_dir: &Path, envs: &[(&str, &Path)]) -> Result<PathBuf> {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(board_dir)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start cargo to build the firmware")?;
    if !output.status.success() {
        bail!(
            "building the firmware failed ({}); if the target is missing, run: \
             rustup target add thumbv7em-none-eabihf",
            output.status
        );
    }
    let mut executable = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(path) = message.get("executable").and_then(|value| value.as_str()) {
            executable = Some(PathBuf::from(path));
        }
    }
    executable.ok_or_else(|| anyhow!("cargo did not report the firmware executable"))
}

/// Returns the flash and static RAM bytes of a firmware image, from its linked sections.
pub fn image_sizes(elf: &Path) -> Result<(u64, u64)> {
    let bytes = std::fs::read(elf).with_context(|| format!("cannot read {}", elf.display()))?;
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("{} is not an ELF file", elf.display()))?;
    let (mut flash, mut ram) = (0, 0);
    for section in file.sections() {
        let SectionFlags::Elf { sh_flags } = section.flags() else {
            continue;
        };
        let allocated = sh_flags & u64::from(object::elf::SHF_ALLOC) != 0;
        if !allocated || section.size() == 0 {
            continue;
        }
        let writable = sh_flags & u64::from(object::elf::SHF_WRITE) != 0;
        let has_contents = section.kind() != object::SectionKind::UninitializedData;
        if !writable || has_contents {
            // Code, constants, and the initial values of `.data`, which are copied from flash.
            flash += section.size();
        }
        if writable {
            ram += section.size();
        }
    }
    Ok((flash, ram))
}

/// Reads the firmware's decoded defmt lines.
#[derive(Default)]
struct LogParser {
    predictions: Vec<usize>,
    correct: usize,
    done: Option<(u32, u64, u64, u64)>,
    tail: Vec<String>,
}

/// Returns the word after `key` in a whitespace-separated line.
fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    let position = words.iter().position(|word| *word == key)?;
    words.get(position + 1).copied()
}

impl LogParser {
    fn line(&mut self, line: &str) {
        self.tail.push(line.to_string());
        if self.tail.len() > 20 {
            self.tail.remove(0);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.contains(&"done:") {
            let checksum = field(&words, "checksum")
                .and_then(|hex| u32::from_str_radix(hex.trim_start_matches("0x"), 16).ok());
            let steps = field(&words, "steps").and_then(|value| value.parse().ok());
            let overflows = field(&words, "overflows").and_then(|value| value.parse().ok());
            let stack = field(&words, "stack").and_then(|value| value.parse().ok());
            if let (Some(checksum), Some(steps), Some(overflows), Some(stack)) =
                (checksum, steps, overflows, stack)
            {
                self.done = Some((checksum, steps, overflows, stack));
            }
            return;
        }
        let label = field(&words, "label").and_then(|value| value.parse::<usize>().ok());
        let predicted = field(&words, "predicted").and_then(|value| value.parse::<usize>().ok());
        if let (Some(label), Some(predicted)) = (label, predicted) {
            if predicted == label {
                self.correct += 1;
            }
            self.predictions.push(predicted);
        } else {
            eprintln!("  board: {line}");
        }
    }
}
