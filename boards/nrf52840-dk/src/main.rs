//! fixedpc on-device learning firmware for the Nordic nRF52840-DK (PCA10056).
//!
//! Serves the `fixedpc-link` protocol on UARTE0 at 115200 baud over the board's virtual COM
//! port: the on-board J-Link routes P0.06 (TX) and P0.08 (RX) to a USB serial port on the
//! host (`/dev/ttyACM0` on Linux), so one USB cable flashes, logs and carries the link.
//! P0.13 (LED1, lit when low) is the busy pin, high during each inference and each weight
//! update. The DWT cycle counter times commands in 64 MHz core cycles.
//!
//! Logs go out as defmt frames over RTT; `cargo run --release` flashes with probe-rs and
//! prints them.

#![no_std]
#![no_main]
// `cortex_m::singleton!` allows `unsafe` inside its own expansion; no other code uses it.
#![deny(unsafe_code)]

use cortex_m_rt::entry;
use defmt_rtt as _;
use fixedpc::network::{activities_len, errors_len, scratch_len, weights_len};
use fixedpc::I16F16;
use fixedpc_link::server::{serve, PinHooks, ServerBuffers};
use fixedpc_link::{Command, Learner, LearnerBuffers, Response};
use nrf52840_hal::clocks::Clocks;
use nrf52840_hal::delay::Delay;
use nrf52840_hal::gpio::{p0, Level};
use nrf52840_hal::pac;
use nrf52840_hal::uarte::{self, Baudrate, Parity, Uarte, UarteRx, UarteTx};
use panic_probe as _;

/// Widths `n_0 .. n_L`: the 8x8 digits, two hidden layers of 64, ten classes, as on the
/// emulated board, so `pcsim board learn --port` streams the same data.
const WIDTHS: [usize; 4] = [64, 64, 64, 10];
const DEPTH: usize = WIDTHS.len() - 1;
const WEIGHTS: usize = weights_len(&WIDTHS);
const ACTIVITIES: usize = activities_len(&WIDTHS);
const ERRORS: usize = errors_len(&WIDTHS);
const SCRATCH: usize = scratch_len(&WIDTHS, 1);
/// Bytes per UARTE transmit DMA transfer.
const TX_CHUNK: usize = 64;

/// Every buffer of the learner and the link, in one static.
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
    tx: [u8; TX_CHUNK],
    rx: [u8; 1],
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
        tx: [0; TX_CHUNK],
        rx: [0; 1],
    };
}

/// The two UARTE halves as one `embedded-io` port for the server.
struct SerialPort {
    tx: UarteTx<pac::UARTE0>,
    rx: UarteRx<pac::UARTE0>,
}

impl embedded_io::ErrorType for SerialPort {
    type Error = uarte::Error;
}

impl embedded_io::Read for SerialPort {
    // NOTE: the HAL receives one byte per DMA transfer. Bytes that arrive while the next
    // transfer starts must fit in the UARTE's small receive FIFO. This is untested on
    // hardware, though at 115200 baud the server needs far less than one byte time per byte.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, uarte::Error> {
        self.rx.read(buf)
    }
}

impl embedded_io::Write for SerialPort {
    fn write(&mut self, buf: &[u8]) -> Result<usize, uarte::Error> {
        self.tx.write(buf)
    }

    fn flush(&mut self) -> Result<(), uarte::Error> {
        self.tx.flush()
    }
}

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
        tx,
        rx,
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
        Err(error) => defmt::panic!("invalid learner buffers: {}", error),
    };

    let (Some(mut core), Some(peripherals)) =
        (cortex_m::Peripherals::take(), pac::Peripherals::take())
    else {
        defmt::panic!("peripherals taken twice")
    };
    // The external crystal keeps the baud rate within the UART's tolerance.
    let _clocks = Clocks::new(peripherals.CLOCK).enable_ext_hfosc();
    core.DCB.enable_trace();
    core.DWT.enable_cycle_counter();

    let port0 = p0::Parts::new(peripherals.P0);
    let pins = uarte::Pins {
        txd: port0.p0_06.into_push_pull_output(Level::High).degrade(),
        rxd: port0.p0_08.into_floating_input().degrade(),
        cts: None,
        rts: None,
    };
    let uarte = Uarte::new(
        peripherals.UARTE0,
        pins,
        Parity::EXCLUDED,
        Baudrate::BAUD115200,
    );
    let (tx, rx) = match uarte.split(tx, rx) {
        Ok(halves) => halves,
        Err(error) => defmt::panic!("UARTE0 split failed: {}", defmt::Debug2Format(&error)),
    };
    let mut port = SerialPort { tx, rx };
    let mut hooks = PinHooks {
        busy: port0.p0_13.into_push_pull_output(Level::Low),
        delay: Delay::new(core.SYST),
        clock: cortex_m::peripheral::DWT::cycle_count,
    };
    defmt::info!(
        "learner {=[?]}: {=usize} weights, {=usize} bytes of learner memory; serving on UARTE0",
        WIDTHS,
        WEIGHTS,
        core::mem::size_of::<Buffers>()
    );

    loop {
        let error = serve(&mut port, &mut learner, &mut hooks, server, log_response);
        // A framing or overrun error loses bytes of one frame. The host then gets a timeout
        // or a CRC error, and the next frame starts clean.
        defmt::warn!(
            "UARTE0 error, serving again: {}",
            defmt::Debug2Format(&error)
        );
    }
}

/// Logs rejected commands and configuration.
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
        _ => {}
    }
}
