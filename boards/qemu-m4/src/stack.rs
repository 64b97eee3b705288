//! Stack high-water mark by painting: fill the free RAM below the stack with a pattern at
//! start-up, and later find the lowest word that no longer holds it.
//!
//! The stack grows down from `_stack_start` (the end of RAM) toward `__sheap`, the end of the
//! static data (cortex-m-rt 0.7 linker script); nothing else uses the memory between them,
//! because the firmware has no heap.
#![allow(unsafe_code)]

/// Pattern written into the unused stack; a word the firmware happens to write with this value
/// would be missed, which can only make the mark lower by the words above it.
const PAINT: u32 = 0xC0DE_57AC;
/// Bytes below the painting function's stack pointer that stay unpainted, for its own calls.
const MARGIN: usize = 256;

extern "C" {
    static __sheap: u32;
    static _stack_start: u32;
}

fn bottom() -> usize {
    core::ptr::addr_of!(__sheap) as usize
}

fn top() -> usize {
    core::ptr::addr_of!(_stack_start) as usize
}

/// Paints every word from the end of the static data up to `MARGIN` bytes below the current
/// stack pointer. Call it once, first thing in `main`.
#[inline(never)]
pub fn paint() {
    let stack_pointer = cortex_m::register::msp::read() as usize;
    let end = stack_pointer - MARGIN;
    let mut address = bottom();
    while address < end {
        // SAFETY: `address` is word-aligned (cortex-m-rt aligns `__sheap` to 4) and lies
        // between the static data and the live stack, which no code uses yet.
        unsafe { core::ptr::write_volatile(address as *mut u32, PAINT) };
        address += 4;
    }
}

/// Returns the most bytes of stack used since [`paint`], from the lowest overwritten word.
pub fn high_water_mark() -> usize {
    let mut address = bottom();
    // SAFETY: the same word-aligned region that `paint` wrote, inside RAM.
    while address < top() && unsafe { core::ptr::read_volatile(address as *const u32) } == PAINT {
        address += 4;
    }
    top() - address
}
