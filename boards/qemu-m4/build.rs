//! Puts `memory.x` on the linker search path, copies the model and sample files named by
//! `FIXEDPC_MODEL` and `FIXEDPC_SAMPLES` into `OUT_DIR` for `include_bytes!`, and writes the
//! model's shapes as constants to `OUT_DIR/shapes.rs`, so the firmware sizes its static
//! buffers at compile time. It also writes the transposed copy of the model's weights as raw
//! little-endian values of the model's format (`weights-transposed.bin`), which the firmware
//! reads in place from flash, as it reads the weights inside the model file. Only when those
//! are not 4-byte aligned in the file does it write them again, aligned, to `weights.bin`.
//! `FIXEDPC_TRANSPOSED=0` leaves the transposed copy out, which saves flash for a large model;
//! inference then runs the transposed product, with the same results.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let out_dir = PathBuf::from(
        env::var_os("OUT_DIR").expect("OUT_DIR is not set; run this build script through cargo"),
    );

    fs::write(out_dir.join("memory.x"), include_bytes!("memory.x"))
        .expect("failed to write memory.x to OUT_DIR");
    println!("cargo::rustc-link-search={}", out_dir.display());
    println!("cargo::rerun-if-changed=memory.x");
    println!("cargo::rerun-if-changed=build.rs");

    copy_input("FIXEDPC_MODEL", &out_dir.join("model.bin"));
    copy_input("FIXEDPC_SAMPLES", &out_dir.join("samples.bin"));
    write_shapes(&out_dir.join("model.bin"), &out_dir.join("shapes.rs"));
    println!("cargo::rerun-if-env-changed=FIXEDPC_TRANSPOSED");
    let transposed = match env::var("FIXEDPC_TRANSPOSED").as_deref() {
        Ok("0") => false,
        Ok("1") | Err(env::VarError::NotPresent) => true,
        Ok(other) => panic!("FIXEDPC_TRANSPOSED={other:?} is invalid; set it to 0 or 1"),
        Err(error) => panic!("FIXEDPC_TRANSPOSED is invalid: {error}; set it to 0 or 1"),
    };
    write_weights(&out_dir.join("model.bin"), &out_dir, transposed);
}

/// Writes `weights-transposed.bin`, for each layer `W_l^T` row-major at the layer's offset,
/// the layout `fixedpc::transpose_weights` writes, and `weights.bin`: the weights of the model
/// when they are not 4-byte aligned in the file, else nothing. Both are empty when no model is
/// embedded, and the copy is empty without `transposed`.
fn write_weights(model_path: &Path, out_dir: &Path, transposed: bool) {
    let bytes = fs::read(model_path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", model_path.display()));
    let (weights, transposed) = if bytes.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        // `write_shapes` has validated the file and its format.
        let model = fixedpc::Model::parse(&bytes)
            .unwrap_or_else(|error| panic!("FIXEDPC_MODEL is not a valid model file: {error}"));
        let (weights, copy) = match model.header().format {
            fixedpc::NumericFormat::I16F16 => encode_weights::<fixedpc::I16F16>(&model),
            fixedpc::NumericFormat::I4F12 => encode_weights::<fixedpc::I4F12>(&model),
            other => panic!(
                "FIXEDPC_MODEL is a {} model; this firmware runs i16f16 and i4f12 models",
                other.name()
            ),
        };
        // The firmware embeds the model file at a 4-byte aligned address, so the weights in it
        // are aligned when their offset in the file is.
        let offset = model.weight_bytes().as_ptr() as usize - bytes.as_ptr() as usize;
        let copy = if transposed { copy } else { Vec::new() };
        if offset.is_multiple_of(4) {
            (Vec::new(), copy)
        } else {
            (weights, copy)
        }
    };
    for (name, contents) in [
        ("weights.bin", weights),
        ("weights-transposed.bin", transposed),
    ] {
        let destination = out_dir.join(name);
        fs::write(&destination, contents)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", destination.display()));
    }
}

/// Returns the little-endian bytes of the model's weights and of their transposed copy.
fn encode_weights<S: fixedpc::Scalar>(model: &fixedpc::Model<'_>) -> (Vec<u8>, Vec<u8>) {
    let header = model.header();
    let widths: Vec<usize> = (0..=header.depth).map(|layer| model.width(layer)).collect();
    let arch = fixedpc::Arch::new(&widths, header.activation, header.skip)
        .unwrap_or_else(|error| panic!("FIXEDPC_MODEL has invalid shapes: {error}"));
    let mut weights = vec![S::ZERO; model.weights_len()];
    model
        .weights_into(&mut weights)
        .unwrap_or_else(|error| panic!("failed to decode the weights of FIXEDPC_MODEL: {error}"));
    let mut transposed = vec![S::ZERO; weights.len()];
    fixedpc::transpose_weights(&arch, &weights, &mut transposed)
        .unwrap_or_else(|error| panic!("failed to transpose the weights: {error}"));
    (encode(&weights), encode(&transposed))
}

/// Returns the values as consecutive little-endian raw values, their layout in memory on the
/// little-endian Cortex-M4.
fn encode<S: fixedpc::Scalar>(values: &[S]) -> Vec<u8> {
    let size = S::FORMAT.bytes();
    let mut bytes = vec![0u8; values.len() * size];
    for (value, out) in values.iter().zip(bytes.chunks_exact_mut(size)) {
        value.write_le(out);
    }
    bytes
}

/// Writes `WIDTHS`, `ACTIVATION_CODE`, `SKIP` and the value type `Value` of the model; an absent
/// model gets a 1-1 `I16F16` placeholder network, and the firmware reports that no model is
/// embedded.
fn write_shapes(model_path: &Path, destination: &Path) {
    let bytes = fs::read(model_path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", model_path.display()));
    let (widths, activation, skip, format) = if bytes.is_empty() {
        (vec![1, 1], 0, false, fixedpc::NumericFormat::I16F16)
    } else {
        let model = fixedpc::Model::parse(&bytes).unwrap_or_else(|error| {
            panic!(
                "FIXEDPC_MODEL={} is not a valid model file: {error}. Export one with pcsim.",
                model_path.display()
            )
        });
        let header = model.header();
        let widths: Vec<usize> = (0..=header.depth).map(|layer| model.width(layer)).collect();
        (widths, header.activation.code(), header.skip, header.format)
    };
    let value_type = match format {
        fixedpc::NumericFormat::I16F16 => "fixedpc::I16F16",
        fixedpc::NumericFormat::I4F12 => "fixedpc::I4F12",
        other => panic!(
            "FIXEDPC_MODEL={} stores {} values; this firmware runs i16f16 and i4f12 models, so \
             train one with --numeric i16f16 or --numeric i4f12",
            model_path.display(),
            other.name()
        ),
    };
    let list: Vec<String> = widths.iter().map(usize::to_string).collect();
    let source = format!(
        "/// Widths `n_0 .. n_L` of the embedded model.\n\
         pub const WIDTHS: [usize; {}] = [{}];\n\
         /// Activation tag of the embedded model.\n\
         pub const ACTIVATION_CODE: u8 = {activation};\n\
         /// Whether the embedded model has identity skips.\n\
         pub const SKIP: bool = {skip};\n\
         /// Numeric format of the embedded model.\n\
         pub type Value = {value_type};\n",
        widths.len(),
        list.join(", ")
    );
    fs::write(destination, source)
        .unwrap_or_else(|error| panic!("failed to write {}: {error}", destination.display()));
}

/// Copies the file named by the environment variable `var` to `destination`, or writes an
/// empty file when `var` is unset or empty.
///
/// A relative path is resolved against this crate's directory, because cargo runs build
/// scripts there and does not pass on the directory it was started in.
fn copy_input(var: &str, destination: &Path) {
    println!("cargo::rerun-if-env-changed={var}");

    let source = env::var_os(var).filter(|value| !value.is_empty());
    let Some(source) = source else {
        fs::write(destination, b"")
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", destination.display()));
        return;
    };

    let source = PathBuf::from(source);
    println!("cargo::rerun-if-changed={}", source.display());
    fs::copy(&source, destination).unwrap_or_else(|error| {
        panic!(
            "failed to copy {var}={} to {}: {error}. Set {var} to an existing file \
             or unset it.",
            source.display(),
            destination.display()
        )
    });
}
