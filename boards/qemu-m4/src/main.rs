//! fixedpc firmware for the QEMU mps2-an386 machine (Cortex-M4F).
//!
//! Runs the test protocol of `fixedpc::evaluate` on every embedded sample with the embedded
//! `I16F16` or `I4F12` model and logs each prediction, then the CRC-32 that `pcsim` compares
//! with its own run, and the stack high-water mark. Shapes and the numeric format come from the
//! model at build time, so every buffer is a static of known size.
//!
//! The weights stay in flash. The network borrows them in place from the model file, and a
//! transposed copy that `build.rs` writes in the memory layout of the format. Where the layer
//! width suits the matrix routine, the copy turns the `W^T e` of inference into a matrix
//! product, which runs faster than the transposed product.
//! RAM contains the scalings, activities, errors, scratch and the current sample.
//!
//! Logs go out as defmt frames over semihosting. The firmware ends through semihosting
//! `SYS_EXIT_EXTENDED`, so QEMU exits with one of the `EXIT_*` codes below.

#![no_std]
#![no_main]
// Only the HardFault handler may use `unsafe`, because cortex-m-rt requires it to be an
// `unsafe fn` and it reads fault state from memory.
#![deny(unsafe_code)]

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

// Linking `cortex_m` provides the single-core `critical-section` implementation that
// defmt-semihosting needs.
use cortex_m as _;
use cortex_m_rt::{entry, exception, ExceptionFrame};
// Registers the defmt global logger.
use defmt_semihosting as _;
use fixedpc::evaluate::{evaluate_sample, SampleSet, TestChecksum};
use fixedpc::network::{activities_len, errors_len, inference_ram_bytes, scratch_len, weights_len};
use fixedpc::{Activation, Arch, InferenceConfig, Model, Network, Workspace};

/// Shapes of the embedded model, written by `build.rs`.
mod shapes {
    include!(concat!(env!("OUT_DIR"), "/shapes.rs"));
}
use shapes::{Value, ACTIVATION_CODE, SKIP, WIDTHS};

mod stack;

const DEPTH: usize = WIDTHS.len() - 1;
const INPUTS: usize = WIDTHS[0];
const OUTPUTS: usize = WIDTHS[DEPTH];
const WEIGHTS: usize = weights_len(&WIDTHS);
const ACTIVITIES: usize = activities_len(&WIDTHS);
const ERRORS: usize = errors_len(&WIDTHS);
const SCRATCH: usize = scratch_len(&WIDTHS, 1);
/// Bytes of network memory in RAM the core needs for inference, from the shapes alone.
const NETWORK_RAM_BYTES: usize = inference_ram_bytes(&WIDTHS, core::mem::size_of::<Value>());
const ACTIVATION: Activation = match Activation::from_code(ACTIVATION_CODE) {
    Some(activation) => activation,
    None => panic!("build.rs wrote an invalid activation code"),
};

/// Every buffer in RAM that the network borrows, in one static.
struct Buffers {
    scalings: [Value; DEPTH],
    activities: [Value; ACTIVITIES],
    errors: [Value; ERRORS],
    scratch: [Value; SCRATCH],
    overflows: [u32; DEPTH],
    input: [Value; INPUTS],
    target: [Value; OUTPUTS],
}

impl Buffers {
    const ZEROED: Buffers = Buffers {
        scalings: [Value::ZERO; DEPTH],
        activities: [Value::ZERO; ACTIVITIES],
        errors: [Value::ZERO; ERRORS],
        scratch: [Value::ZERO; SCRATCH],
        overflows: [0; DEPTH],
        input: [Value::ZERO; INPUTS],
        target: [Value::ZERO; OUTPUTS],
    };
}

/// The run finished and its checks passed.
const EXIT_SUCCESS: i32 = 0;
/// The firmware was built without a model (`FIXEDPC_MODEL` unset or empty).
const EXIT_NO_MODEL: i32 = 3;
/// The embedded model is invalid or does not match the compiled shapes.
const EXIT_BAD_MODEL: i32 = 4;
/// The embedded samples are invalid or do not match the model.
const EXIT_BAD_SAMPLES: i32 = 5;
/// A panic, with the same code as a panicking Rust process on a host.
const EXIT_PANIC: i32 = 101;
/// A HardFault other than a `bkpt` instruction.
const EXIT_HARD_FAULT: i32 = 102;

/// End of the FLASH region in `memory.x`. The fault handler reads instructions only below it.
const FLASH_END: u32 = 0x0040_0000;
/// Thumb `BKPT #imm8` is `0xBExx`.
const BKPT_OPCODE: u16 = 0xBE00;
const BKPT_OPCODE_MASK: u16 = 0xFF00;

/// Byte string with 4-byte alignment, so that a parser may read `u32` fields in place.
#[repr(C, align(4))]
struct Aligned<Bytes: ?Sized> {
    bytes: Bytes,
}

/// Model file that `build.rs` copies from `FIXEDPC_MODEL`. It is empty when that variable is unset.
static MODEL: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/model.bin")),
};

/// Sample file that `build.rs` copies from `FIXEDPC_SAMPLES`. It is empty when that variable is
/// unset.
static SAMPLES: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/samples.bin")),
};

/// Weights of the model as raw little-endian `Value`s, written by `build.rs` only when those
/// in the model file are not 4-byte aligned. Else it is empty, and the firmware reads the
/// weights inside the model file.
static WEIGHTS_FILE: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/weights.bin")),
};

/// Transposed copy of the weights, in the layout of `fixedpc::transpose_weights`, written by
/// `build.rs`. It is empty when no model is embedded or when `FIXEDPC_TRANSPOSED=0` left it
/// out, and the network is then built without it.
static TRANSPOSED_FILE: &Aligned<[u8]> = &Aligned {
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/weights-transposed.bin")),
};

#[entry]
fn main() -> ! {
    let model = &MODEL.bytes;
    let samples = &SAMPLES.bytes;
    defmt::info!(
        "model: {=usize} bytes, samples: {=usize} bytes",
        model.len(),
        samples.len()
    );

    if model.is_empty() {
        defmt::error!("no model embedded; build through pcsim or set FIXEDPC_MODEL");
        semihosting::process::exit(EXIT_NO_MODEL);
    }

    stack::paint();
    let buffers = match cortex_m::singleton!(: Buffers = Buffers::ZEROED) {
        Some(buffers) => buffers,
        None => defmt::panic!("network buffers taken twice"),
    };
    let status = match run(model, samples, buffers) {
        Ok(()) => EXIT_SUCCESS,
        Err(code) => code,
    };
    semihosting::process::exit(status)
}

/// Loads the model and runs the test protocol on every sample.
fn run(
    model_bytes: &'static [u8],
    sample_bytes: &[u8],
    buffers: &'static mut Buffers,
) -> Result<(), i32> {
    let arch = Arch::new(&WIDTHS, ACTIVATION, SKIP).map_err(|error| {
        defmt::error!("invalid shapes: {}", defmt::Display2Format(&error));
        EXIT_BAD_MODEL
    })?;
    let (config, weights) = load_model(model_bytes, &arch, &mut buffers.scalings)?;
    let transposed = if TRANSPOSED_FILE.bytes.is_empty() {
        None
    } else {
        Some(flash_values("transposed weights", &TRANSPOSED_FILE.bytes)?)
    };
    if sample_bytes.is_empty() {
        defmt::error!("no samples embedded; build through pcsim or set FIXEDPC_SAMPLES");
        return Err(EXIT_BAD_SAMPLES);
    }
    let samples = SampleSet::parse(sample_bytes).map_err(|error| {
        defmt::error!("invalid sample file: {}", defmt::Display2Format(&error));
        EXIT_BAD_SAMPLES
    })?;
    if samples.feature_count() != INPUTS {
        defmt::error!(
            "samples have {=usize} features, the model takes {=usize}",
            samples.feature_count(),
            INPUTS
        );
        return Err(EXIT_BAD_SAMPLES);
    }
    defmt::info!(
        "network {=[?]}: {=usize} weights in flash, transposed copy: {=bool}, {=usize} bytes \
         of network memory in RAM; {=usize} samples",
        WIDTHS,
        WEIGHTS,
        transposed.is_some(),
        NETWORK_RAM_BYTES,
        samples.len()
    );

    let Buffers {
        scalings,
        activities,
        errors,
        scratch,
        overflows,
        input,
        target,
    } = buffers;
    let network = match transposed {
        Some(transposed) => Network::with_transposed(arch, weights, transposed, scalings),
        None => Network::new(arch, weights, scalings),
    }
    .map_err(|error| {
        defmt::error!("invalid network: {}", defmt::Display2Format(&error));
        EXIT_BAD_MODEL
    })?;
    let mut workspace =
        Workspace::new(&arch, 1, activities, errors, scratch, overflows).map_err(|error| {
            defmt::error!("invalid workspace: {}", defmt::Display2Format(&error));
            EXIT_BAD_MODEL
        })?;

    let mut checksum = TestChecksum::new();
    let mut correct = 0;
    let mut steps = 0u64;
    for index in 0..samples.len() {
        let label = samples.sample_into(index, input).map_err(|error| {
            defmt::error!("sample {=usize}: {}", index, defmt::Display2Format(&error));
            EXIT_BAD_SAMPLES
        })?;
        let result = evaluate_sample(
            &network,
            &mut workspace,
            input,
            label,
            target,
            &config,
            &mut checksum,
        )
        .map_err(|error| {
            defmt::error!("sample {=usize}: {}", index, defmt::Display2Format(&error));
            EXIT_BAD_SAMPLES
        })?;
        if result.predicted == label {
            correct += 1;
        }
        steps += result.steps_taken as u64;
        defmt::info!(
            "sample {=usize} label {=usize} predicted {=usize} energy {=i32} steps {=u32}",
            index,
            label,
            result.predicted,
            result.final_energy.to_bits() as i32,
            result.steps_taken
        );
    }

    defmt::info!(
        "done: samples {=usize} correct {=usize} steps {=u64} overflows {=u64} checksum {=u32:#010x} stack {=usize}",
        samples.len(),
        correct,
        steps,
        workspace.total_overflows(),
        checksum.finalize(),
        stack::high_water_mark()
    );
    Ok(())
}

/// Validates the model against the compiled shapes, decodes its scalings into `scalings`, and
/// returns its inference settings and its weights in flash: those inside the model file, or
/// the aligned copy of `weights.bin` after checking that it equals them.
fn load_model(
    bytes: &'static [u8],
    arch: &Arch<'_>,
    scalings: &mut [Value],
) -> Result<(InferenceConfig<Value>, &'static [Value]), i32> {
    let report = |error: fixedpc::Error| {
        defmt::error!("invalid model: {}", defmt::Display2Format(&error));
        EXIT_BAD_MODEL
    };
    let model = Model::parse(bytes).map_err(report)?;
    model.check_matches::<Value>(arch).map_err(report)?;
    let weights = if WEIGHTS_FILE.bytes.is_empty() {
        flash_values("model weights", model.weight_bytes())?
    } else {
        let weights = flash_values("weights", &WEIGHTS_FILE.bytes)?;
        check_weights_match_model(&model, weights)?;
        weights
    };
    model.scalings_into(scalings).map_err(report)?;
    let config = model.inference_config::<Value>().map_err(report)?;
    Ok((config, weights))
}

/// Views embedded weights as `Value`s in place, after checking that their length is a whole
/// number of values and their address is aligned. `Aligned` gives every embedded file a
/// 4-byte aligned start, and `build.rs` checked that the weights in the model file are too.
fn flash_values(name: &str, bytes: &'static [u8]) -> Result<&'static [Value], i32> {
    let size = core::mem::size_of::<Value>();
    if !bytes.len().is_multiple_of(size) {
        defmt::error!(
            "embedded {=str} have {=usize} bytes, not a whole number of {=usize}-byte values",
            name,
            bytes.len(),
            size
        );
        return Err(EXIT_BAD_MODEL);
    }
    bytemuck::try_cast_slice(bytes).map_err(|_| {
        defmt::error!(
            "embedded {=str} at {=usize:#010x} are not aligned to {=usize} bytes",
            name,
            bytes.as_ptr() as usize,
            core::mem::align_of::<Value>()
        );
        EXIT_BAD_MODEL
    })
}

/// Checks that the embedded weights are the model's weights, byte for byte: both are raw
/// little-endian values, so this also checks their number. `Network::with_transposed` then
/// checks that the transposed copy is their transpose.
fn check_weights_match_model(model: &Model<'_>, weights: &[Value]) -> Result<(), i32> {
    let stored = model.weight_bytes();
    let embedded: &[u8] = bytemuck::cast_slice(weights);
    if embedded.len() != stored.len() {
        defmt::error!(
            "embedded weights have {=usize} bytes, the model stores {=usize}; rebuild the \
             firmware so that build.rs writes them again",
            embedded.len(),
            stored.len()
        );
        return Err(EXIT_BAD_MODEL);
    }
    if let Some(index) = embedded.iter().zip(stored).position(|(a, b)| a != b) {
        defmt::error!(
            "embedded weights differ from the model's at byte {=usize}; rebuild the firmware \
             so that build.rs writes them again",
            index
        );
        return Err(EXIT_BAD_MODEL);
    }
    Ok(())
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

/// Exits with `EXIT_SUCCESS` when the fault is a `bkpt` instruction, and with
/// `EXIT_HARD_FAULT` otherwise.
///
/// Without a debugger attached, `bkpt` escalates to a HardFault. Firmware written for probe-rs
/// often ends a finished run with `cortex_m::asm::bkpt()`, so that case counts as success.
/// QEMU handles `bkpt 0xAB` itself as a semihosting call when semihosting is enabled.
#[allow(unsafe_code)]
#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    let pc = frame.pc();

    // Halfword reads below FLASH_END cannot fault, so a bad PC does not cause a lockup.
    if pc < FLASH_END && pc.is_multiple_of(2) {
        // Safety: `pc` is a halfword-aligned address inside the FLASH region of memory.x.
        let instruction = unsafe { core::ptr::read_volatile(pc as *const u16) };
        if instruction & BKPT_OPCODE_MASK == BKPT_OPCODE {
            defmt::info!(
                "bkpt {=u16:#04x} at {=u32:#010x}; exiting with status 0",
                instruction & 0xFF,
                pc
            );
            semihosting::process::exit(EXIT_SUCCESS);
        }
    }

    // Safety: SCB::PTR is the fixed address of the System Control Block on every Cortex-M
    // core, and reading HFSR and CFSR has no side effects.
    let (hfsr, cfsr) = unsafe {
        let scb = &*cortex_m::peripheral::SCB::PTR;
        (scb.hfsr.read(), scb.cfsr.read())
    };
    defmt::error!(
        "HardFault: pc={=u32:#010x} lr={=u32:#010x} hfsr={=u32:#010x} cfsr={=u32:#010x}",
        pc,
        frame.lr(),
        hfsr,
        cfsr
    );
    semihosting::process::exit(EXIT_HARD_FAULT)
}
