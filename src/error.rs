//! The one error type of the core.

use core::fmt;

/// What went wrong; each variant carries the values needed to fix the call or the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// A network needs at least an input and an output layer.
    TooFewLayers {
        /// Number of widths given.
        widths: usize,
    },
    /// A layer width is zero.
    ZeroWidth {
        /// Layer index, 0 for the input.
        layer: usize,
    },
    /// An identity skip needs equal input and output widths.
    SkipWidthMismatch {
        /// Layer index (1-based) of the skip.
        layer: usize,
        /// Width of the layer's input.
        input: usize,
        /// Width of the layer's output.
        output: usize,
    },
    /// A buffer has the wrong length for the network.
    BufferLength {
        /// Which buffer.
        buffer: Buffer,
        /// Length the network needs.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// A transposed copy of the weights differs from the transpose of the weights.
    TransposedMismatch {
        /// Layer index (1-based).
        layer: usize,
        /// Row of the first differing weight in `W_layer`, an output unit.
        row: usize,
        /// Column of the first differing weight in `W_layer`, an input unit.
        column: usize,
    },
    /// The batch size is zero or larger than the workspace holds.
    BatchSize {
        /// Batch size requested.
        requested: usize,
        /// Samples the workspace holds.
        capacity: usize,
    },
    /// The layer is not a free (hidden) layer `1 ..= L-1`.
    NotFreeLayer {
        /// Layer requested.
        layer: usize,
        /// Number of weight layers `L`.
        depth: usize,
    },
    /// The model file does not start with the magic bytes `FXPC`.
    BadMagic,
    /// The model file's format version is not supported.
    UnsupportedVersion {
        /// Version found in the file.
        found: u16,
    },
    /// The model file ends before the data its header announces.
    Truncated {
        /// Bytes the header announces.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The model file is longer than its header announces.
    TrailingBytes {
        /// Bytes the header announces.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The model file's CRC-32 does not match its contents.
    ChecksumMismatch {
        /// CRC stored in the file.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// A header field contains a value this version does not define.
    InvalidField {
        /// Which field.
        field: Field,
        /// Value found.
        value: u32,
    },
    /// The model's numeric format differs from the one the caller computes in.
    FormatMismatch {
        /// Format tag in the file.
        file: u8,
        /// Format tag the caller expected.
        expected: u8,
    },
    /// The model's shapes differ from the ones the caller compiled in.
    ShapeMismatch {
        /// Layer index where the widths first differ.
        layer: usize,
        /// Width in the file.
        file: usize,
        /// Width the caller expected.
        expected: usize,
    },
    /// An output buffer is too small to hold the encoded model.
    OutputTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
}

/// Buffers a network borrows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Buffer {
    /// Weights of every layer.
    Weights,
    /// Per-layer scalings `a_l`.
    Scalings,
    /// Activities `z_0 .. z_L`.
    Activities,
    /// Prediction errors `e_1 .. e_L`.
    Errors,
    /// Scratch space.
    Scratch,
    /// Per-layer overflow counters.
    Overflows,
    /// Transposed copy of the weights.
    TransposedWeights,
    /// Weight gradients.
    Gradients,
    /// Optimiser state.
    OptimizerState,
    /// Network input.
    Input,
    /// Network target.
    Target,
}

/// Header fields of a model file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Field {
    /// Numeric format tag.
    NumericFormat,
    /// Activation tag.
    Activation,
    /// Parameterisation tag.
    Parameterisation,
    /// Flag bits.
    Flags,
    /// Number of weight layers.
    Depth,
    /// A layer width.
    Width,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::TooFewLayers { widths } => {
                write!(
                    f,
                    "a network needs at least 2 widths (input and output), got {widths}"
                )
            }
            Error::ZeroWidth { layer } => write!(f, "layer {layer} has width 0"),
            Error::SkipWidthMismatch {
                layer,
                input,
                output,
            } => write!(
                f,
                "layer {layer} has a skip connection but maps width {input} to {output}; \
                 skips need equal widths"
            ),
            Error::BufferLength {
                buffer,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "{buffer:?} buffer has length {actual}, the network needs {expected}"
                )
            }
            Error::TransposedMismatch { layer, row, column } => write!(
                f,
                "transposed weights of layer {layer} differ from the weights at row {row}, \
                 column {column}; write the copy with transpose_weights"
            ),
            Error::BatchSize {
                requested,
                capacity,
            } => write!(
                f,
                "batch size {requested} is invalid: it must be between 1 and the workspace \
                 capacity {capacity}"
            ),
            Error::NotFreeLayer { layer, depth } => write!(
                f,
                "layer {layer} is not a free layer; free layers are 1 to {} for depth {depth}",
                depth.saturating_sub(1)
            ),
            Error::BadMagic => write!(f, "not a fixedpc model file (magic bytes FXPC missing)"),
            Error::UnsupportedVersion { found } => {
                write!(
                    f,
                    "model file version {found} is not supported by this build"
                )
            }
            Error::Truncated { expected, actual } => {
                write!(
                    f,
                    "file is truncated: {actual} bytes, the header announces {expected}"
                )
            }
            Error::TrailingBytes { expected, actual } => write!(
                f,
                "file has {actual} bytes, the header announces {expected}: trailing data"
            ),
            Error::ChecksumMismatch { stored, computed } => write!(
                f,
                "file is corrupt: stored CRC-32 {stored:#010x}, computed {computed:#010x}; \
                 write or copy it again"
            ),
            Error::InvalidField { field, value } => {
                write!(f, "model file has invalid {field:?} value {value}")
            }
            Error::FormatMismatch { file, expected } => write!(
                f,
                "model file uses numeric format tag {file}, this code computes in tag {expected}"
            ),
            Error::ShapeMismatch {
                layer,
                file,
                expected,
            } => write!(
                f,
                "model file has width {file} at layer {layer}, this build expects {expected}"
            ),
            Error::OutputTooSmall { needed, available } => {
                write!(
                    f,
                    "output buffer has {available} bytes, the model needs {needed}"
                )
            }
        }
    }
}

impl core::error::Error for Error {}
