//! fixedpc on-device learning firmware for the QEMU mps2-an386 machine (Cortex-M4F).
//!
//! Serves the `fixedpc-link` protocol on UART0: the host configures the network, streams
//! training samples, tests samples and reads the weights back. The network learns in `I16F16`
//! in static memory. LED0 of the FPGA I/O block is the busy pin, high during each inference and
//! each weight update. SysTick counts core clock ticks; under `qemu-system-arm -icount
//! shift=0` one tick is 40 instructions (25 MHz clock, 1 ns per instruction).
//!
//! Logs go out as defmt frames over semihosting. The firmware never exits on its own: the host
//! stops QEMU when the session ends.

#![no_std]
#![no_main]
// Only the register access in `hw` and the HardFault handler may use `unsafe`.
#![deny(unsafe_code)]

mod hw;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use cortex_m_rt::{entry, exception, ExceptionFrame};
// Registers the defmt global logger.
use defmt_semihosting as _;
use fixedpc::network::{activities_len, errors_len, scratch_len, weights_len};
use fixedpc::I16F16;
use fixedpc_link::server::{serve, PinHooks, ServerBuffers};
use fixedpc_link::{Command, Learner, LearnerBuffers, Response};

/// Widths `n_0 .. n_L`: the 8x8 digits, two hidden layers of 64, ten classes.
const WIDTHS: [usize; 4] = [64, 64, 64, 10];
const DEPTH: usize = WIDTHS.len() - 1;
const WEIGHTS: usize = weights_len(&WIDTHS);
const ACTIVITIES: usize = activities_len(&WIDTHS);
const ERRORS: usize = errors_len(&WIDTHS);
const SCRATCH: usize = scratch_len(&WIDTHS, 1);

/// Every buffer of the learner, in one static.
struct Buffers {
    weights: [I16F16; WEIGHTS],
    gradients: [I16F16; WEIGHTS],
    scalings: [I16F16; DEPTH],
    activities: [I16F16; ACTIVITIES],
    errors: [I16F16; ERRORS],
    scratch: [I16F16; SCRATCH],
    overflows: [u32; DEPTH],
    input: [I16F16; WIDTHS[0]],
    target: [I16F16; WIDTHS[DEPTH]],
    server: ServerBuffers,
}

impl Buffers {
    const ZEROED: Buffers = Buffers {
        weights: [I16F16::ZERO; WEIGHTS],
        gradients: [I16F16::ZERO; WEIGHTS],
        scalings: [I16F16::ZERO; DEPTH],
        activities: [I16F16::ZERO; ACTIVITIES],
        errors: [I16F16::ZERO; ERRORS],
        scratch: [I16F16::ZERO; SCRATCH],
        overflows: [0; DEPTH],
        input: [I16F16::ZERO; WIDTHS[0]],
        target: [I16F16::ZERO; WIDTHS[DEPTH]],
        server: ServerBuffers::ZEROED,
    };
}

/// The learner's buffers could not be wrapped (a bug in the sizes above).
const EXIT_BAD_BUFFERS: i32 = 4;
/// A panic, with the same code as a panicking Rust process on a host.
const EXIT_PANIC: i32 = 101;
/// A HardFault.
const EXIT_HARD_FAULT: i32 = 102;

/// Trained samples between two progress lines in the log.
const LOG_EVERY: u32 = 500;

#[entry]
fn main() -> ! {
    let buffers = match cortex_m::singleton!(: Buffers = Buffers::ZEROED) {
        Some(buffers) => buffers,
        None => defmt::panic!("learner buffers taken twice"),
    };
    let Buffers {
        weights,
        gradients,
        scalings,
        activities,
        errors,
        scratch,
        overflows,
        input,
        target,
        server,
    } = buffers;
    let learner_buffers = LearnerBuffers {
        weights,
        gradients,
        scalings,
        activities,
        errors,
        scratch,
        overflows,
        input,
        target,
    };
    let mut learner = match Learner::new(&WIDTHS, learner_buffers) {
        Ok(learner) => learner,
        Err(error) => {
            defmt::error!("invalid learner buffers: {}", error);
            semihosting::process::exit(EXIT_BAD_BUFFERS)
        }
    };

    let peripherals = match cortex_m::Peripherals::take() {
        Some(peripherals) => peripherals,
        None => defmt::panic!("core peripherals taken twice"),
    };
    hw::start_tick_counter(peripherals.SYST);
    let mut uart = hw::Uart0::enable();
    let mut hooks = PinHooks {
        busy: hw::Led0,
        delay: hw::SpinDelay,
        clock: hw::ticks,
    };
    defmt::info!(
        "learner {=[?]}: {=usize} weights, {=usize} bytes of learner memory; serving on UART0",
        WIDTHS,
        WEIGHTS,
        core::mem::size_of::<Buffers>()
    );

    // The UART's error type is `Infallible`, so `serve` never returns.
    match serve(&mut uart, &mut learner, &mut hooks, server, log_response) {}
}

/// Logs rejected commands, configuration and sparse training progress.
fn log_response(command: Option<&Command<'_>>, response: &Response<'_>) {
    match (command, response) {
        (_, Response::Error(code)) => defmt::warn!("rejected a frame: {}", code),
        (Some(Command::Configure(settings)), _) => defmt::info!(
            "configured: {=u32} steps, learning rate {=i32} / 65536",
            settings.steps,
            settings.learning_rate
        ),
        (Some(Command::Reset { seed }), Response::Ack { weights_crc }) => defmt::info!(
            "weights reset from seed {=u32}; weights CRC {=u32:#010x}",
            seed,
            weights_crc
        ),
        (Some(Command::Stats), Response::Stats(stats))
            if stats.samples_trained > 0 && stats.samples_trained % LOG_EVERY == 0 =>
        {
            defmt::info!(
                "trained {=u32} samples; weights CRC {=u32:#010x}",
                stats.samples_trained,
                stats.weights_crc
            )
        }
        _ => {}
    }
}

/// Set by the first panic, so that a panic raised while logging does not recurse.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if !PANICKING.swap(true, Ordering::Relaxed) {
        defmt::error!("panic: {}", defmt::Display2Format(info));
    }
    semihosting::process::exit(EXIT_PANIC)
}

/// Ends a `defmt::panic!`, which has already logged its message, without a second log line.
#[defmt::panic_handler]
fn defmt_panic() -> ! {
    semihosting::process::exit(EXIT_PANIC)
}

#[allow(unsafe_code)]
#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    defmt::error!(
        "HardFault: pc={=u32:#010x} lr={=u32:#010x}",
        frame.pc(),
        frame.lr()
    );
    semihosting::process::exit(EXIT_HARD_FAULT)
}

#[exception]
fn SysTick() {
    hw::count_tick_wrap();
}
