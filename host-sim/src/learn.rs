//! `pcsim board learn`: on-device learning over a serial link, checked bit for bit against the
//! host's simulation of the same board.
//!
//! The host starts the emulated board (or opens a real board's serial port), configures it,
//! tests it on the digits test set, streams the training set for some epochs, tests it again
//! and reads its weights back. Each command also goes to a `fixedpc_link::Learner` on the host,
//! the same code the firmware runs, and every response is compared. Two further host runs with
//! the same schedule give the references: `f32`, and `I16F16` with round-to-nearest updates.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitCode, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use fixedpc::{Activation, Arch, Network, Scalar, I16F16};
use fixedpc_link::learner::{to_raw, LearnConfig, Learner, LearnerBuffers, NoHooks};
use fixedpc_link::protocol::{
    values_crc, Command, Info, Response, Rounding, Settings, Stats, PROTOCOL_VERSION,
    WEIGHTS_PER_FRAME,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::board::{image_sizes, MACHINE};
use crate::data::{self, input_error, Dataset};
use crate::link::Link;
use crate::train::{accuracy, convert_features};

/// Subcommands of `pcsim board`.
#[derive(Subcommand)]
pub enum BoardCommand {
    /// Train a board on the digits over its serial link and compare its weights with the
    /// host's simulation bit for bit.
    Learn(LearnArgs),
    /// Run an I16F16 model file on the emulated board (QEMU mps2-an386) over a test set and
    /// compare its outputs with the host's bit for bit.
    Run(crate::board_run::RunArgs),
}

/// Boards that `pcsim board learn` can start itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BoardKind {
    /// QEMU mps2-an386 (Cortex-M4F), built from boards/qemu-m4-learn, linked over its UART0
    /// and a TCP socket on 127.0.0.1.
    QemuM4,
}

/// Rounding of the weight updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoundingKind {
    /// Stochastic rounding with a seeded xorshift32 generator.
    Stochastic,
    /// Round to nearest: updates below half an LSB (2^-17) vanish.
    Nearest,
}

/// Options of `pcsim board learn`.
#[derive(Args)]
pub struct LearnArgs {
    /// Emulated board to build and start (ignored with --port)
    #[arg(long, value_enum, default_value_t = BoardKind::QemuM4)]
    pub board: BoardKind,
    /// Serial port of a board running the fixedpc learning firmware, such as /dev/ttyACM0, or
    /// tcp:127.0.0.1:PORT for an emulated board started with `cargo run` in
    /// boards/qemu-m4-learn; without it pcsim starts the emulated board itself
    #[arg(long, value_name = "PATH")]
    pub port: Option<String>,
    /// Baud rate of --port, in bits per second
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
    /// Passes over the training samples
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Training samples per epoch, the first of the 1000 digits [default: all 1000]
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
    /// Test samples, the first of the 797 test digits [default: all 797]
    #[arg(long, value_name = "N")]
    pub test_samples: Option<usize>,
    /// SGD learning rate, batch size 1
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Rounding of the weight updates
    #[arg(long, value_enum, default_value_t = RoundingKind::Stochastic)]
    pub rounding: RoundingKind,
    /// Inference steps T per sample
    #[arg(long, default_value_t = 20)]
    pub infer_steps: u32,
    /// Inference step size
    #[arg(long, default_value_t = 0.1)]
    pub infer_rate: f64,
    /// Stop a sample's inference once one step changes its energy by at most this much
    #[arg(long, default_value_t = 0.0005)]
    pub tolerance: f64,
    /// Run all --infer-steps steps on every sample, ignoring --tolerance
    #[arg(long)]
    pub no_early_stop: bool,
    /// Activation of the hidden layers
    #[arg(long, default_value = "relu", value_parser = parse_activation)]
    pub act: Activation,
    /// Pause between the board's inference and update busy pulses, in microseconds, so that a
    /// scope on the busy pin shows them apart
    #[arg(long, default_value_t = 0, value_name = "MICROSECONDS")]
    pub pulse_gap_us: u32,
    /// Seed of the initial weights, the sample order and the rounding generator
    #[arg(long, default_value_t = 1)]
    pub seed: u32,
    /// Seconds to wait for each response of the board
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Board crate to build [default: boards/qemu-m4-learn of this repository]
    #[arg(long, value_name = "DIR")]
    pub board_dir: Option<PathBuf>,
    /// Directory for the board's log
    #[arg(long, default_value = "target/pcsim-learn", value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Write a JSON summary to this file
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
}

fn parse_activation(name: &str) -> Result<Activation, String> {
    Activation::from_name(name).ok_or_else(|| {
        let names: Vec<_> = Activation::ALL.iter().map(|act| act.name()).collect();
        format!(
            "unknown activation '{name}'; expected one of {}",
            names.join(", ")
        )
    })
}

/// Clock ticks per instruction count on the emulated board: SysTick runs at 25 MHz and
/// `-icount shift=0` advances the clock 1 ns per instruction, so one tick is 40 instructions.
const QEMU_INSTRUCTIONS_PER_TICK: u64 = 40;

/// Trained samples between two progress lines (and two `Stats` requests).
const PROGRESS_EVERY: usize = 100;

/// Runs `pcsim board <subcommand>`.
pub fn run(command: &BoardCommand) -> Result<ExitCode> {
    match command {
        BoardCommand::Learn(args) => run_learn(args),
        BoardCommand::Run(args) => crate::board_run::run(args),
    }
}

/// Heap buffers of a learner, sized from the widths.
struct Memory<S> {
    weights: Vec<S>,
    gradients: Vec<S>,
    scalings: Vec<S>,
    activities: Vec<S>,
    errors: Vec<S>,
    scratch: Vec<S>,
    overflows: Vec<u32>,
    input: Vec<S>,
    target: Vec<S>,
}

impl<S: Scalar> Memory<S> {
    fn new(widths: &[usize]) -> Result<Self> {
        let arch = Arch::new(widths, Activation::Linear, false).map_err(anyhow::Error::msg)?;
        Ok(Memory {
            weights: vec![S::ZERO; arch.weights_len()],
            gradients: vec![S::ZERO; arch.weights_len()],
            scalings: vec![S::ZERO; arch.depth()],
            activities: vec![S::ZERO; arch.activities_len()],
            errors: vec![S::ZERO; arch.errors_len()],
            scratch: vec![S::ZERO; arch.max_width()],
            overflows: vec![0; arch.depth()],
            input: vec![S::ZERO; arch.width(0)],
            target: vec![S::ZERO; arch.width(arch.depth())],
        })
    }

    fn learner<'a>(&'a mut self, widths: &'a [usize]) -> Result<Learner<'a, S>> {
        let buffers = LearnerBuffers {
            weights: &mut self.weights,
            gradients: &mut self.gradients,
            scalings: &mut self.scalings,
            activities: &mut self.activities,
            errors: &mut self.errors,
            scratch: &mut self.scratch,
            overflows: &mut self.overflows,
            input: &mut self.input,
            target: &mut self.target,
        };
        Learner::new(widths, buffers).map_err(anyhow::Error::msg)
    }
}

fn to_fixed_raw(value: f64, name: &str) -> Result<i32> {
    let mut overflows = 0;
    let fixed = I16F16::from_f64_rounded(value, &mut overflows);
    if overflows > 0 || !value.is_finite() {
        return Err(input_error(format!(
            "{name} {value} is invalid: outside the I16F16 range of -32768 to 32768"
        )));
    }
    Ok(fixed.to_bits())
}

fn settings(args: &LearnArgs) -> Result<Settings> {
    for (name, value) in [("--lr", args.lr), ("--infer-rate", args.infer_rate)] {
        if !(value.is_finite() && value > 0.0) {
            return Err(input_error(format!(
                "{name} {value} is invalid: must be > 0"
            )));
        }
    }
    if args.epochs == 0 {
        return Err(input_error("--epochs 0 is invalid: must be at least 1"));
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(input_error(format!(
            "--timeout {} is invalid: must be a positive number of seconds",
            args.timeout
        )));
    }
    let rounding = match args.rounding {
        RoundingKind::Stochastic => Rounding::Stochastic { seed: args.seed },
        RoundingKind::Nearest => Rounding::Nearest,
    };
    Ok(Settings {
        activation: args.act.code(),
        skip: false,
        parameterisation: fixedpc::Parameterisation::Sp.code(),
        steps: args.infer_steps,
        step_size: to_fixed_raw(args.infer_rate, "--infer-rate")?,
        tolerance: if args.no_early_stop {
            None
        } else {
            Some(to_fixed_raw(args.tolerance, "--tolerance")?)
        },
        learning_rate: to_fixed_raw(args.lr, "--lr")?,
        rounding,
        pulse_gap_us: args.pulse_gap_us,
    })
}

/// The digits, raw `I16F16` features as little-endian bytes per row.
struct Samples {
    features: Vec<Vec<u8>>,
    labels: Vec<u8>,
}

impl Samples {
    fn new(set: &Dataset, scale: f64, limit: Option<usize>) -> Samples {
        let count = limit.unwrap_or(set.len()).min(set.len());
        let (values, _) = convert_features::<I16F16>(set, scale);
        let features = values
            .chunks_exact(set.feature_count)
            .take(count)
            .map(|row| row.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect())
            .collect();
        let labels = set.labels[..count].iter().map(|&l| l as u8).collect();
        Samples { features, labels }
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

/// A started board: the link and, for QEMU, the processes to stop.
struct Session {
    link: Link,
    qemu: Option<QemuProcess>,
    /// Number of instructions per tick of the board's clock, when known.
    instructions_per_tick: Option<u64>,
}

/// QEMU and the defmt-print process that decodes its log; both are stopped on drop.
struct QemuProcess {
    qemu: Child,
    printer: Child,
    log_thread: Option<JoinHandle<()>>,
    elf: PathBuf,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Child::kill signals this child's own PID only.
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.printer.kill();
        let _ = self.printer.wait();
        if let Some(thread) = self.log_thread.take() {
            let _ = thread.join();
        }
    }
}

fn build_firmware(board_dir: &Path) -> Result<PathBuf> {
    eprintln!("building the learning firmware in {}", board_dir.display());
    let output = Process::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
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
            "building the firmware in {} failed ({}); if the target is missing, run: \
             rustup target add thumbv7em-none-eabihf",
            board_dir.display(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|message| message.get("executable")?.as_str().map(PathBuf::from))
        .next_back();
    executable.ok_or_else(|| anyhow!("cargo did not report the firmware executable"))
}

/// Builds the firmware, listens on a free loopback port and starts QEMU with UART0 connected
/// to it.
fn start_qemu(args: &LearnArgs, log_path: &Path) -> Result<Session> {
    let board_dir = args
        .board_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/qemu-m4-learn"));
    let board_dir = board_dir
        .canonicalize()
        .with_context(|| format!("board crate not found at {}", board_dir.display()))?;
    let elf = build_firmware(&board_dir)?;

    let listener =
        TcpListener::bind("127.0.0.1:0").context("cannot listen on a loopback TCP port")?;
    let address = listener.local_addr()?;
    eprintln!(
        "starting qemu-system-arm -machine {MACHINE} with UART0 on tcp {address}, log in {}",
        log_path.display()
    );
    let mut qemu = Process::new("qemu-system-arm")
        .args([
            "-machine",
            MACHINE,
            "-cpu",
            "cortex-m4",
            "-nographic",
            "-monitor",
            "none",
        ])
        .args(["-icount", "shift=0"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=link,host=127.0.0.1,port={},server=off,nodelay=on",
            address.port()
        ))
        .args(["-serial", "chardev:link", "-kernel"])
        .arg(&elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|error| {
            anyhow!(
                "cannot start qemu-system-arm ({error}); install it with: \
                 sudo apt-get install qemu-system-arm"
            )
        })?;
    let qemu_stdout = qemu
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from QEMU"))?;
    let printer = Process::new("defmt-print")
        .arg("-e")
        .arg(&elf)
        .stdin(Stdio::from(qemu_stdout))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut printer = match printer {
        Ok(printer) => printer,
        Err(error) => {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!(
                "cannot start defmt-print ({error}); install it with: \
                 cargo install defmt-print --locked"
            );
        }
    };
    let log_thread = printer
        .stdout
        .take()
        .map(|stdout| spawn_log_thread(stdout, log_path));
    let mut process = QemuProcess {
        qemu,
        printer,
        log_thread,
        elf,
    };

    let stream = accept_within(&listener, &mut process.qemu, Duration::from_secs(20))?;
    let timeout = Duration::from_secs_f64(args.timeout);
    stream.set_read_timeout(Some(Duration::from_millis(200).min(timeout)))?;
    stream.set_nodelay(true)?;
    let link = Link::new(Box::new(stream), format!("tcp {address}"), timeout);
    Ok(Session {
        link,
        qemu: Some(process),
        instructions_per_tick: Some(QEMU_INSTRUCTIONS_PER_TICK),
    })
}

/// Copies the board's decoded log to a file and shows warnings and errors on stderr.
fn spawn_log_thread(stdout: std::process::ChildStdout, log_path: &Path) -> JoinHandle<()> {
    let mut file = File::create(log_path).ok();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(file) = file.as_mut() {
                let _ = writeln!(file, "{line}");
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  board: {line}");
            }
        }
    })
}

fn accept_within(listener: &TcpListener, qemu: &mut Child, limit: Duration) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error).context("accepting QEMU's UART connection failed"),
        }
        if let Some(status) = qemu.try_wait()? {
            bail!("QEMU exited ({status}) before connecting its UART; see its messages above");
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out: QEMU did not connect its UART within {} s",
                limit.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to an emulated board's UART on a loopback address (`tcp:127.0.0.1:PORT`).
fn connect_tcp(port: &str, args: &LearnArgs) -> Result<Session> {
    let address = port.trim_start_matches("tcp:");
    let address: std::net::SocketAddr =
        address
            .replace("localhost", "127.0.0.1")
            .parse()
            .map_err(|_| {
                input_error(format!(
                    "--port {port} is invalid: expected tcp:127.0.0.1:PORT or a serial port path"
                ))
            })?;
    if !address.ip().is_loopback() {
        return Err(input_error(format!(
            "--port {port} is invalid: only loopback addresses (127.0.0.1, ::1) are supported, \
             because the link carries no authentication"
        )));
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let stream = TcpStream::connect_timeout(&address, timeout).with_context(|| {
        format!(
            "cannot connect to {address}; start the emulated board first with \
             `cargo run --release` in boards/qemu-m4-learn"
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_millis(200).min(timeout)))?;
    stream.set_nodelay(true)?;
    eprintln!("talking to the board on tcp {address}");
    Ok(Session {
        link: Link::new(Box::new(stream), format!("tcp {address}"), timeout),
        qemu: None,
        instructions_per_tick: Some(QEMU_INSTRUCTIONS_PER_TICK),
    })
}

fn open_serial(path: &str, args: &LearnArgs) -> Result<Session> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let port = serialport::new(path, args.baud)
        .timeout(Duration::from_millis(200).min(timeout))
        .open()
        .with_context(|| {
            format!(
                "cannot open serial port {path} at {} baud; check the path (ls /dev/ttyACM* \
                 /dev/ttyUSB*) and that your user may access it",
                args.baud
            )
        })?;
    eprintln!("talking to the board on {path} at {} baud", args.baud);
    Ok(Session {
        link: Link::new(Box::new(port), path.to_string(), timeout),
        qemu: None,
        instructions_per_tick: None,
    })
}

/// The board and the host's simulation of it, driven in lockstep.
struct Lockstep<'a, 'l> {
    link: &'a mut Link,
    simulation: &'a mut Learner<'l, I16F16>,
    /// First command whose responses differed, with both responses.
    first_mismatch: Option<String>,
    commands: u64,
}

impl Lockstep<'_, '_> {
    /// Sends a command to the board and to the simulation and returns the board's response
    /// converted by `read`, recording the first difference.
    fn send<R>(
        &mut self,
        command: &Command<'_>,
        read: impl FnOnce(&Response<'_>) -> Result<R>,
    ) -> Result<R> {
        let mut out = vec![0u8; 4 * WEIGHTS_PER_FRAME];
        let expected = self.simulation.handle(command, &mut out, &mut NoHooks);
        let (result, same) = self.link.request(command, |response| {
            Ok((read(&response)?, same_response(&response, &expected)))
        })?;
        self.commands += 1;
        if !same && self.first_mismatch.is_none() {
            self.first_mismatch = Some(format!(
                "command {} ({}): the board answered differently from the host simulation, \
                 which expected {expected:?}",
                self.commands,
                crate::link::command_name(command)
            ));
        }
        Ok(result)
    }
}

/// Compares responses, ignoring the board's clock ticks and rejected-frame count.
fn same_response(board: &Response<'_>, host: &Response<'_>) -> bool {
    match (board, host) {
        (Response::Stats(board), Response::Stats(host)) => {
            let normalise = |stats: &Stats| Stats {
                last_train_ticks: 0,
                last_infer_ticks: 0,
                rejected_frames: 0,
                ..*stats
            };
            normalise(board) == normalise(host)
        }
        _ => board == host,
    }
}

/// Test predictions of the board, checked against the simulation; the clock ticks of every
/// 100th sample go to `ticks`.
fn test_board(
    lockstep: &mut Lockstep<'_, '_>,
    test: &Samples,
    stage: &str,
    ticks: &mut Vec<u32>,
) -> Result<f64> {
    let mut correct = 0;
    for (index, (features, &label)) in test.features.iter().zip(&test.labels).enumerate() {
        let command = Command::Infer { label, features };
        let class = lockstep.send(&command, |response| match response {
            Response::Prediction(prediction) => Ok(prediction.class),
            other => bail!("expected a Prediction, the board sent {other:?}"),
        })?;
        if class == label {
            correct += 1;
        }
        if (index + 1) % PROGRESS_EVERY == 0 {
            ticks.push(read_stats(lockstep)?.last_infer_ticks);
        }
        if (index + 1) % 200 == 0 {
            eprintln!(
                "[board] testing {stage}: {}/{} samples",
                index + 1,
                test.len()
            );
        }
    }
    Ok(correct as f64 / test.len().max(1) as f64)
}

fn read_stats(lockstep: &mut Lockstep<'_, '_>) -> Result<Stats> {
    lockstep.send(&Command::Stats, |response| match response {
        Response::Stats(stats) => Ok(*stats),
        other => bail!("expected Stats, the board sent {other:?}"),
    })
}

fn read_board_weights(link: &mut Link, count: usize) -> Result<Vec<i32>> {
    let mut weights = Vec::with_capacity(count);
    while weights.len() < count {
        let chunk = (count - weights.len()).min(WEIGHTS_PER_FRAME);
        let command = Command::ReadWeights {
            offset: weights.len() as u32,
            count: chunk as u16,
        };
        link.request(&command, |response| match response {
            Response::Weights { values, .. } if values.len() == 4 * chunk => {
                weights.extend(
                    values
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
                Ok(())
            }
            other => bail!("expected {chunk} weights, the board sent {other:?}"),
        })?;
    }
    Ok(weights)
}

/// Clock ticks of the board's Train and Infer commands, one per 100 samples.
#[derive(Default)]
struct TickStats {
    train: Vec<u32>,
    infer: Vec<u32>,
}

fn mean(values: &[u32]) -> f64 {
    values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64
}

/// Trains a host learner in format `S` on the same schedule and returns its test accuracy.
fn host_run<S: Scalar>(
    widths: &[usize],
    settings: &Settings,
    seed: u32,
    order: &[Vec<usize>],
    train: (&[S], &[u8]),
    test: (&[S], &[usize]),
) -> Result<(f64, Vec<S>)> {
    let mut memory = Memory::<S>::new(widths)?;
    let mut learner = memory.learner(widths)?;
    let config = LearnConfig::<S>::from_settings(settings)
        .map_err(|code| anyhow!("invalid settings: {code:?}"))?;
    learner
        .configure(config)
        .map_err(|code| anyhow!("invalid settings: {code:?}"))?;
    learner
        .reset(seed)
        .map_err(|code| anyhow!("reset failed: {code:?}"))?;
    let n_in = widths[0];
    let (inputs, labels) = train;
    for epoch in order {
        for &row in epoch {
            learner
                .input_mut()
                .copy_from_slice(&inputs[row * n_in..(row + 1) * n_in]);
            learner
                .train(usize::from(labels[row]), &mut NoHooks)
                .map_err(|code| anyhow!("training failed: {code:?}"))?;
        }
    }
    let weights = learner.weights().to_vec();
    let scalings = vec![S::ONE; widths.len() - 1];
    let config = learner
        .config()
        .ok_or_else(|| anyhow!("learner lost its settings"))?;
    let arch = Arch::new(widths, config.activation, config.skip).map_err(anyhow::Error::msg)?;
    let network = Network::new(arch, &weights, &scalings).map_err(anyhow::Error::msg)?;
    let (test_inputs, test_labels) = test;
    Ok((accuracy(&network, test_inputs, test_labels)?, weights))
}

/// Runs `pcsim board learn`.
pub fn run_learn(args: &LearnArgs) -> Result<ExitCode> {
    let settings = settings(args)?;
    let all = data::load_csv(&data::default_digits_path(), 10)?;
    let (train_set, test_set) = all.split(1000)?;
    let max = train_set.max_feature();
    let scale = if max > 0.0 { 1.0 / max } else { 1.0 };
    let train = Samples::new(&train_set, scale, args.samples);
    let test = Samples::new(&test_set, scale, args.test_samples);
    if train.len() == 0 || test.len() == 0 {
        return Err(input_error(
            "--samples and --test-samples must be at least 1",
        ));
    }

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let log_path = args.out_dir.join("board.log");
    let mut session = match &args.port {
        Some(port) if port.starts_with("tcp:") => connect_tcp(port, args)?,
        Some(path) => open_serial(path, args)?,
        None => start_qemu(args, &log_path)?,
    };

    let info = session
        .link
        .request(&Command::Hello, |response| match response {
            Response::Info(info) => Ok(info),
            other => bail!("expected Info, the board sent {other:?}"),
        })?;
    let widths = check_info(&info, &train_set)?;
    eprintln!(
        "board: protocol {}, network {:?}, {} weights",
        info.protocol_version, widths, info.weights_len
    );

    let mut memory = Memory::<I16F16>::new(&widths)?;
    let mut simulation = memory.learner(&widths)?;
    let mut lockstep = Lockstep {
        link: &mut session.link,
        simulation: &mut simulation,
        first_mismatch: None,
        commands: 0,
    };
    let ack = |response: &Response<'_>| match response {
        Response::Ack { weights_crc } => Ok(*weights_crc),
        other => bail!("expected Ack, the board sent {other:?}"),
    };
    lockstep.send(&Command::Configure(settings), ack)?;
    let initial_crc = lockstep.send(&Command::Reset { seed: args.seed }, ack)?;
    eprintln!(
        "weights drawn from seed {}, CRC {initial_crc:#010x}",
        args.seed
    );

    let started = Instant::now();
    let mut ticks = TickStats::default();
    let accuracy_before = test_board(&mut lockstep, &test, "before learning", &mut Vec::new())?;
    eprintln!("[board] test accuracy before learning: {accuracy_before:.4}");

    let mut shuffler = ChaCha8Rng::seed_from_u64(u64::from(args.seed) ^ 0x5eed_5eed);
    let mut order: Vec<Vec<usize>> = Vec::new();
    let total = args.epochs * train.len();
    let mut done = 0;
    for epoch in 1..=args.epochs {
        let mut rows: Vec<usize> = (0..train.len()).collect();
        rows.shuffle(&mut shuffler);
        let epoch_started = Instant::now();
        let mut energy = 0.0;
        for (position, &row) in rows.iter().enumerate() {
            let command = Command::Train {
                label: train.labels[row],
                features: &train.features[row],
            };
            let report = lockstep.send(&command, |response| match response {
                Response::Trained(report) => Ok(*report),
                other => bail!("expected Trained, the board sent {other:?}"),
            })?;
            energy += I16F16::from_bits(report.final_energy).to_f64();
            done += 1;
            if (position + 1) % PROGRESS_EVERY == 0 || position + 1 == rows.len() {
                let stats = read_stats(&mut lockstep)?;
                ticks.train.push(stats.last_train_ticks);
                let rate = (position + 1) as f64 / epoch_started.elapsed().as_secs_f64();
                eprintln!(
                    "[board] epoch {epoch}/{}  sample {:>4}/{}  mean energy {:.4}  \
                     saturations {}  {rate:.0} samples/s  ({done}/{total})",
                    args.epochs,
                    position + 1,
                    rows.len(),
                    energy / (position + 1) as f64,
                    stats.saturations,
                );
            }
        }
        order.push(rows);
    }

    let accuracy_after = test_board(&mut lockstep, &test, "after learning", &mut ticks.infer)?;
    let stats = read_stats(&mut lockstep)?;
    if ticks.infer.is_empty() {
        ticks.infer.push(stats.last_infer_ticks);
    }
    let first_mismatch = lockstep.first_mismatch.take();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("[board] test accuracy after learning: {accuracy_after:.4} ({seconds:.1} s)");

    let board_weights = read_board_weights(&mut session.link, info.weights_len as usize)?;
    let host_weights: Vec<i32> = simulation.weights().iter().map(|w| to_raw(*w)).collect();
    let differing = board_weights
        .iter()
        .zip(&host_weights)
        .filter(|(a, b)| a != b)
        .count();
    let board_crc = values_crc(board_weights.iter().copied());
    let host_crc = values_crc(host_weights.iter().copied());
    let bit_exact = first_mismatch.is_none()
        && differing == 0
        && board_weights.len() == host_weights.len()
        && board_crc == stats.weights_crc
        && board_crc == host_crc;

    eprintln!("running the same schedule on the host in f32 and in i16f16 with round to nearest");
    let train_rows = train.len();
    let (f32_train, _) = convert_features::<f32>(&train_set, scale);
    let (f32_test, _) = convert_features::<f32>(&test_set, scale);
    let (fixed_train, _) = convert_features::<I16F16>(&train_set, scale);
    let (fixed_test, _) = convert_features::<I16F16>(&test_set, scale);
    let test_rows = test.len();
    let n_in = widths[0];
    let labels = &train.labels[..train_rows];
    let test_labels = &test_set.labels[..test_rows];
    let (f32_accuracy, _) = host_run::<f32>(
        &widths,
        &settings,
        args.seed,
        &order,
        (&f32_train[..train_rows * n_in], labels),
        (&f32_test[..test_rows * n_in], test_labels),
    )?;
    let nearest_settings = Settings {
        rounding: Rounding::Nearest,
        ..settings
    };
    let (nearest_accuracy, nearest_weights) = host_run::<I16F16>(
        &widths,
        &nearest_settings,
        args.seed,
        &order,
        (&fixed_train[..train_rows * n_in], labels),
        (&fixed_test[..test_rows * n_in], test_labels),
    )?;
    let mut initial = vec![I16F16::ZERO; host_weights.len()];
    fixedpc_link::init_weights(&widths, args.seed, &mut initial);
    let nearest_unchanged = nearest_weights
        .iter()
        .zip(&initial)
        .filter(|(a, b)| a == b)
        .count();
    let stochastic_unchanged = host_weights
        .iter()
        .zip(&initial)
        .filter(|(a, b)| **a == b.to_bits())
        .count();

    let instructions = session.instructions_per_tick.map(|per_tick| {
        (
            mean(&ticks.train) * per_tick as f64,
            mean(&ticks.infer) * per_tick as f64,
        )
    });
    let ram = match &session.qemu {
        Some(process) => Some(image_sizes(&process.elf)?),
        None => None,
    };
    let learning_extra_bytes = 4 * info.weights_len as usize;
    drop(session);

    println!();
    println!("| run                                    | test accuracy |");
    println!("|----------------------------------------|---------------|");
    println!("| board i16f16 before learning           | {accuracy_before:>13.4} |");
    println!("| board i16f16 after learning            | {accuracy_after:>13.4} |");
    println!("| host f32, same schedule                | {f32_accuracy:>13.4} |");
    println!("| host i16f16, round-to-nearest updates  | {nearest_accuracy:>13.4} |");
    println!();
    println!(
        "{} samples trained ({} epochs of {train_rows}); weights unchanged since the start: \
         {stochastic_unchanged} with stochastic rounding, {nearest_unchanged} with round to \
         nearest, of {}",
        args.epochs * train_rows,
        args.epochs,
        host_weights.len()
    );
    if let Some((train_instructions, infer_instructions)) = instructions {
        println!(
            "per sample on the board (mean of every 100th): learning {train_instructions:.0} \
             instructions, test after learning {infer_instructions:.0} (QEMU -icount, \
             resolution 40)"
        );
    }
    if let Some((flash, ram)) = ram {
        println!(
            "firmware flash {flash} bytes, static RAM {ram} bytes, of which learning adds \
             {learning_extra_bytes} bytes of gradients to inference"
        );
    }
    println!(
        "bit-exact with the host: {} (weights CRC {board_crc:#010x} on the board, \
         {host_crc:#010x} on the host, {differing} weights differ)",
        if bit_exact { "yes" } else { "NO" }
    );
    if let Some(mismatch) = &first_mismatch {
        println!("first difference: {mismatch}");
    }

    if let Some(path) = &args.report {
        let report = json!({
            "bit_exact": bit_exact,
            "test_accuracy_before": accuracy_before,
            "test_accuracy_after": accuracy_after,
            "host_f32_accuracy": f32_accuracy,
            "host_i16f16_nearest_accuracy": nearest_accuracy,
            "samples": args.epochs * train_rows,
            "epochs": args.epochs,
            "train_rows": train_rows,
            "test_rows": test_rows,
            "weights": host_weights.len(),
            "weights_crc_board": format!("{board_crc:#010x}"),
            "weights_crc_host": format!("{host_crc:#010x}"),
            "weights_differing": differing,
            "weights_unchanged_stochastic": stochastic_unchanged,
            "weights_unchanged_nearest": nearest_unchanged,
            "first_mismatch": first_mismatch,
            "instructions_per_train_sample": instructions.map(|i| i.0),
            "instructions_per_test_sample": instructions.map(|i| i.1),
            "flash_bytes": ram.map(|r| r.0),
            "ram_bytes": ram.map(|r| r.1),
            "learning_extra_ram_bytes": learning_extra_bytes,
            "seconds": seconds,
            "settings": {
                "lr": args.lr,
                "rounding": format!("{:?}", args.rounding).to_lowercase(),
                "infer_steps": args.infer_steps,
                "infer_rate": args.infer_rate,
                "tolerance": (!args.no_early_stop).then_some(args.tolerance),
                "activation": args.act.name(),
                "seed": args.seed,
                "batch": 1,
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if bit_exact {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: the board's weights differ from the host simulation's");
        Ok(ExitCode::FAILURE)
    }
}

fn check_info(info: &Info, train_set: &Dataset) -> Result<Vec<usize>> {
    if info.protocol_version != PROTOCOL_VERSION {
        bail!(
            "the board speaks protocol version {}, this pcsim speaks {PROTOCOL_VERSION}; \
             flash the firmware from this checkout",
            info.protocol_version
        );
    }
    let widths: Vec<usize> = info.widths().iter().map(|&w| usize::from(w)).collect();
    if widths.len() < 2
        || widths[0] != train_set.feature_count
        || widths[widths.len() - 1] != train_set.classes
    {
        bail!(
            "the board's network {widths:?} does not fit the digits ({} features, {} classes)",
            train_set.feature_count,
            train_set.classes
        );
    }
    Ok(widths)
}
