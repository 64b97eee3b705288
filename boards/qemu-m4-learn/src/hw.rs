//! The mps2-an386 peripherals the learner uses: UART0 as an `embedded-io` serial port, LED0 as
//! an `embedded-hal` output pin, a busy-wait delay and a SysTick tick counter.
//!
//! Register layouts are from Arm's "Cortex-M System Design Kit Technical Reference Manual"
//! (APB UART) and the MPS2 FPGA I/O block as QEMU 7.2 models them (`cmsdk-apb-uart`,
//! `mps2-fpgaio`).
#![allow(unsafe_code)]

use core::convert::Infallible;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::SYST;

/// Base address of UART0 on mps2-an386.
const UART0_BASE: usize = 0x4000_4000;
/// Received byte on read, byte to send on write.
const UART_DATA: usize = 0x00;
/// Bit 0: transmit buffer full; bit 1: receive buffer full.
const UART_STATE: usize = 0x04;
/// Bit 0: transmitter enable; bit 1: receiver enable.
const UART_CTRL: usize = 0x08;
/// Baud-rate divider; the UART requires at least 16.
const UART_BAUDDIV: usize = 0x10;
const STATE_TX_FULL: u32 = 1 << 0;
const STATE_RX_FULL: u32 = 1 << 1;
const CTRL_TX_RX_ENABLE: u32 = 0b11;
/// 25 MHz / 217 is about 115200 baud; QEMU ignores the rate, real MPS2 boards do not.
const BAUD_DIVIDER: u32 = 217;

/// LED register of the FPGA I/O block on mps2-an386; bit 0 is LED0.
const FPGAIO_LED0: usize = 0x4002_8000;

/// Core clock of the mps2 machines, in hertz.
const CORE_CLOCK_HZ: u32 = 25_000_000;

fn read_register(address: usize) -> u32 {
    // Safety: every address passed here is one of the 32-bit aligned registers of UART0 or
    // the FPGA I/O block listed above, which exist on mps2-an386. Only reading UART DATA has a
    // side effect: it empties the receive buffer, as the UART driver intends.
    unsafe { read_volatile(address as *const u32) }
}

fn write_register(address: usize, value: u32) {
    // Safety: as in `read_register`; the firmware is single-threaded and these registers are
    // owned by this module alone.
    unsafe { write_volatile(address as *mut u32, value) }
}

/// UART0, blocking, with no interrupts.
pub struct Uart0;

impl Uart0 {
    /// Enables the transmitter and the receiver.
    pub fn enable() -> Self {
        write_register(UART0_BASE + UART_BAUDDIV, BAUD_DIVIDER);
        write_register(UART0_BASE + UART_CTRL, CTRL_TX_RX_ENABLE);
        Uart0
    }

    fn state(&self) -> u32 {
        read_register(UART0_BASE + UART_STATE)
    }
}

impl embedded_io::ErrorType for Uart0 {
    type Error = Infallible;
}

impl embedded_io::Read for Uart0 {
    /// Blocks until one byte arrives, then returns every byte already received, up to
    /// `buf.len()`.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.state() & STATE_RX_FULL == 0 {}
        let mut count = 0;
        while count < buf.len() && self.state() & STATE_RX_FULL != 0 {
            buf[count] = read_register(UART0_BASE + UART_DATA) as u8;
            count += 1;
        }
        Ok(count)
    }
}

impl embedded_io::Write for Uart0 {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        for &byte in buf {
            while self.state() & STATE_TX_FULL != 0 {}
            write_register(UART0_BASE + UART_DATA, u32::from(byte));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        while self.state() & STATE_TX_FULL != 0 {}
        Ok(())
    }
}

/// LED0 of the FPGA I/O block, the busy pin.
pub struct Led0;

impl embedded_hal::digital::ErrorType for Led0 {
    type Error = Infallible;
}

impl embedded_hal::digital::OutputPin for Led0 {
    fn set_low(&mut self) -> Result<(), Infallible> {
        let leds = read_register(FPGAIO_LED0);
        write_register(FPGAIO_LED0, leds & !1);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        let leds = read_register(FPGAIO_LED0);
        write_register(FPGAIO_LED0, leds | 1);
        Ok(())
    }
}

/// Busy-wait delay at the core clock.
pub struct SpinDelay;

impl embedded_hal::delay::DelayNs for SpinDelay {
    fn delay_ns(&mut self, ns: u32) {
        let cycles = (u64::from(ns) * u64::from(CORE_CLOCK_HZ)).div_ceil(1_000_000_000);
        cortex_m::asm::delay(cycles.min(u64::from(u32::MAX)) as u32);
    }
}

/// Reload value of SysTick: its full 24-bit range.
const SYST_RELOAD: u32 = 0x00FF_FFFF;

/// SysTick wraps so far, counted by its exception.
static TICK_WRAPS: AtomicU32 = AtomicU32::new(0);

/// Starts SysTick on the core clock over its full range, with its wrap exception enabled.
pub fn start_tick_counter(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(SYST_RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

/// Counts one SysTick wrap; called from the SysTick exception.
pub fn count_tick_wrap() {
    TICK_WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Core clock ticks since `start_tick_counter`, wrapping at 2^32.
pub fn ticks() -> u32 {
    loop {
        let wraps = TICK_WRAPS.load(Ordering::Relaxed);
        let current = SYST::get_current();
        // A wrap between the two loads would pair an old wrap count with a new value.
        if TICK_WRAPS.load(Ordering::Relaxed) == wraps {
            let elapsed = SYST_RELOAD - current;
            return wraps.wrapping_mul(SYST_RELOAD + 1).wrapping_add(elapsed);
        }
    }
}
