//! Exact instruction counts on the emulated Cortex-M4F: builds `boards/qemu-m4-bench` and the
//! TCG plugin `plugin/insn_count.c`, runs the firmware under QEMU with the plugin, and pairs
//! each region the firmware logs with the count the plugin prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSymbol};
use serde::Serialize;

use crate::board::{self, MACHINE};

/// One measured region of the bench firmware.
#[derive(Clone, Debug, Serialize)]
pub struct RegionCount {
    /// `digits` or `wide`.
    pub network: String,
    /// Numeric format name.
    pub format: String,
    /// Region name, such as `matrix_product`.
    pub region: String,
    /// Multiply-accumulates in the region (1 for regions without a MAC count).
    pub work: u64,
    /// Instructions executed in the region, with the marker overhead subtracted.
    pub instructions: u64,
}

/// Stack high-water mark of one network and format in the bench firmware.
#[derive(Clone, Debug, Serialize)]
pub struct StackMark {
    /// `digits` or `wide`.
    pub network: String,
    /// Numeric format name.
    pub format: String,
    /// Bytes of stack used, from stack painting.
    pub bytes: u64,
}

/// Results of the bench firmware.
#[derive(Clone, Debug, Serialize)]
pub struct BoardCounts {
    /// Every region, in firmware order, calibration regions left out.
    pub regions: Vec<RegionCount>,
    /// Stack high-water marks.
    pub stacks: Vec<StackMark>,
    /// Marker overhead subtracted from every count.
    pub overhead: u64,
    /// Whether a second run printed the same counts.
    pub repeatable: bool,
}

/// Directory of the bench firmware crate in this repository.
pub fn default_bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/qemu-m4-bench")
}

/// Builds the firmware and the plugin, runs the firmware twice and returns its counts.
pub fn measure(bench_dir: &Path, out_dir: &Path) -> Result<BoardCounts> {
    let bench_dir = bench_dir
        .canonicalize()
        .with_context(|| format!("bench firmware not found at {}", bench_dir.display()))?;
    eprintln!("building the bench firmware in {}", bench_dir.display());
    let elf = board::build_firmware(&bench_dir, &[])?;
    let plugin = build_plugin(&bench_dir.join("plugin/insn_count.c"), out_dir)?;
    let (start, stop) = marker_addresses(&elf)?;

    let first = run_once(&elf, &plugin, start, stop)?;
    let second = run_once(&elf, &plugin, start, stop)?;
    let repeatable = first.counts == second.counts;
    if !repeatable {
        eprintln!("warning: two runs of the bench firmware printed different counts");
    }
    first.pair().map(|(regions, overhead)| BoardCounts {
        regions,
        stacks: first.stacks.clone(),
        overhead,
        repeatable,
    })
}

/// Compiles the counting plugin with the system C compiler.
fn build_plugin(source: &Path, out_dir: &Path) -> Result<PathBuf> {
    let library = out_dir.join("insn_count.so");
    let compiler = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&library)
        .arg(source)
        .status()
        .with_context(|| {
            format!(
                "cannot start the C compiler {}; install one (apt-get install gcc) or set CC",
                compiler.to_string_lossy()
            )
        })?;
    if !status.success() {
        bail!("compiling {} failed ({status})", source.display());
    }
    Ok(library)
}

/// Returns the addresses of `bench_start` and `bench_stop`, without the Thumb bit.
fn marker_addresses(elf: &Path) -> Result<(u64, u64)> {
    let bytes = std::fs::read(elf).with_context(|| format!("cannot read {}", elf.display()))?;
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("{} is not an ELF file", elf.display()))?;
    let find = |marker: &str| {
        file.symbols()
            .find(|symbol| symbol.name().is_ok_and(|name| name.contains(marker)))
            .map(|symbol| symbol.address() & !1)
            .with_context(|| format!("symbol {marker} not found in {}", elf.display()))
    };
    // Legacy mangling prefixes each path segment with its length.
    Ok((find("11bench_start")?, find("10bench_stop")?))
}

/// Log lines and plugin counts of one run.
struct Run {
    regions: Vec<(String, String, String, u64)>,
    stacks: Vec<StackMark>,
    counts: Vec<u64>,
}

impl Run {
    /// Pairs regions with counts, and subtracts from each count the overhead that the last
    /// calibration region before it measured.
    fn pair(&self) -> Result<(Vec<RegionCount>, u64)> {
        if self.regions.len() != self.counts.len() {
            bail!(
                "the firmware logged {} regions but the plugin printed {} counts",
                self.regions.len(),
                self.counts.len()
            );
        }
        let mut overhead = 0;
        let mut regions = Vec::new();
        for ((network, format, region, work), &count) in self.regions.iter().zip(&self.counts) {
            if region == "calibration" {
                overhead = count;
                continue;
            }
            regions.push(RegionCount {
                network: network.clone(),
                format: format.clone(),
                region: region.clone(),
                work: *work,
                instructions: count.saturating_sub(overhead),
            });
        }
        Ok((regions, overhead))
    }
}

fn run_once(elf: &Path, plugin: &Path, start: u64, stop: u64) -> Result<Run> {
    eprintln!(
        "running the bench firmware under qemu-system-arm -machine {MACHINE} with the plugin"
    );
    let plugin_arg = format!("{},start={start:#x},stop={stop:#x}", plugin.display());
    let qemu = Command::new("qemu-system-arm")
        .args(["-machine", MACHINE, "-cpu", "cortex-m4", "-nographic"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .args(["-plugin", &plugin_arg, "-kernel"])
        .arg(elf)
        .stdin(Stdio::null())
        .output()
        .context("cannot start qemu-system-arm")?;
    if !qemu.status.success() {
        bail!(
            "the bench firmware failed ({}): {}",
            qemu.status,
            String::from_utf8_lossy(&qemu.stderr)
        );
    }

    let log = decode_defmt(elf, &qemu.stdout)?;
    let mut run = parse_log(&log)?;
    for line in String::from_utf8_lossy(&qemu.stderr).lines() {
        if let Some(count) = line.strip_prefix("insns ") {
            let count = count
                .trim()
                .parse()
                .context("invalid count from the plugin")?;
            run.counts.push(count);
        }
    }
    Ok(run)
}

/// Decodes the firmware's defmt frames with `defmt-print`.
fn decode_defmt(elf: &Path, frames: &[u8]) -> Result<String> {
    let mut print = Command::new("defmt-print")
        .arg("-e")
        .arg(elf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start defmt-print")?;
    {
        use std::io::Write;
        let mut stdin = print.stdin.take().context("no stdin for defmt-print")?;
        stdin
            .write_all(frames)
            .context("cannot pass the firmware output to defmt-print")?;
    }
    let decoded = print.wait_with_output().context("defmt-print failed")?;
    Ok(String::from_utf8_lossy(&decoded.stdout).into_owned())
}

/// Reads the `region` and `stack` lines of a decoded log; the counts come later.
fn parse_log(log: &str) -> Result<Run> {
    let mut run = Run {
        regions: Vec::new(),
        stacks: Vec::new(),
        counts: Vec::new(),
    };
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [_, "region", network, format, region, "work", work] => run.regions.push((
                network.to_string(),
                format.to_string(),
                region.to_string(),
                work.parse()
                    .context("invalid work count in the firmware log")?,
            )),
            [_, "stack", network, format, "bytes", bytes] => run.stacks.push(StackMark {
                network: network.to_string(),
                format: format.to_string(),
                bytes: bytes
                    .parse()
                    .context("invalid stack size in the firmware log")?,
            }),
            [_, "panic:", ..] => bail!("the bench firmware panicked: {line}"),
            _ => {}
        }
    }
    Ok(run)
}
