//! Network shapes, the memory they need, and the borrowed buffers the kernels work on.
//!
//! Layers are `l = 1..=L`; activities `z_0 .. z_L` have widths `n_0 .. n_L`. Weights of layer
//! `l` are stored unscaled, row-major `[n_l][n_(l-1)]`, one layer after the other. Per sample,
//! activities are stored `z_0, z_1, .., z_L` back to back and errors `e_1, .., e_L`.

use crate::activation::Activation;
use crate::error::{Buffer, Error};
use crate::scalar::Scalar;

/// Number of weights of a fully connected network with these widths.
pub const fn weights_len(widths: &[usize]) -> usize {
    let mut total = 0;
    let mut layer = 1;
    while layer < widths.len() {
        total += widths[layer] * widths[layer - 1];
        layer += 1;
    }
    total
}

/// Number of activities `z_0 .. z_L` of one sample.
pub const fn activities_len(widths: &[usize]) -> usize {
    let mut total = 0;
    let mut layer = 0;
    while layer < widths.len() {
        total += widths[layer];
        layer += 1;
    }
    total
}

/// Number of prediction errors `e_1 .. e_L` of one sample.
pub const fn errors_len(widths: &[usize]) -> usize {
    if widths.is_empty() {
        0
    } else {
        activities_len(widths) - widths[0]
    }
}

/// Largest layer width.
pub const fn max_width(widths: &[usize]) -> usize {
    let mut max = 0;
    let mut layer = 0;
    while layer < widths.len() {
        if widths[layer] > max {
            max = widths[layer];
        }
        layer += 1;
    }
    max
}

/// Scratch values a workspace for `batch` samples needs.
pub const fn scratch_len(widths: &[usize], batch: usize) -> usize {
    batch * max_width(widths)
}

/// Bytes of network memory for inference and learning on `batch` samples with values of
/// `value_bytes` bytes: weights, gradients, activities, errors, scratch and the per-layer
/// overflow counters (optimiser state not included).
pub const fn learning_memory_bytes(widths: &[usize], batch: usize, value_bytes: usize) -> usize {
    let values = 2 * weights_len(widths)
        + batch * (activities_len(widths) + errors_len(widths))
        + scratch_len(widths, batch)
        + widths.len();
    values * value_bytes + widths.len() * 4
}

/// Bytes of network memory for inference on one sample: weights, scalings, activities,
/// errors, scratch and the per-layer overflow counters.
pub const fn inference_memory_bytes(widths: &[usize], value_bytes: usize) -> usize {
    let values = weights_len(widths)
        + widths.len()
        + activities_len(widths)
        + errors_len(widths)
        + scratch_len(widths, 1);
    values * value_bytes + widths.len() * 4
}

/// Bytes of network memory in RAM for inference on one sample when the weights and their
/// transposed copy stay in flash: [`inference_memory_bytes`] without the weights.
pub const fn inference_ram_bytes(widths: &[usize], value_bytes: usize) -> usize {
    inference_memory_bytes(widths, value_bytes) - weights_len(widths) * value_bytes
}

/// Rule that chooses the layer scalings `a_l` and the initial weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Parameterisation {
    /// Standard: `a_l = 1`, weights from a uniform fan-in initialisation.
    Sp,
    /// muPC: standard-normal weights, `a_1 = 1/sqrt(n_0)`, hidden layers `1/sqrt(N L)` with
    /// skips (`1/sqrt(N)` without), output `1/N`, where `N` is the hidden width.
    MuPc,
}

impl Parameterisation {
    /// Returns the tag used in the model file.
    pub const fn code(self) -> u8 {
        match self {
            Parameterisation::Sp => 0,
            Parameterisation::MuPc => 1,
        }
    }

    /// Parses a model-file tag.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Parameterisation::Sp),
            1 => Some(Parameterisation::MuPc),
            _ => None,
        }
    }

    /// Returns the name used on command lines (`sp`, `mupc`).
    pub const fn name(self) -> &'static str {
        match self {
            Parameterisation::Sp => "sp",
            Parameterisation::MuPc => "mupc",
        }
    }

    /// Returns `a_l` for layer `layer` (1-based) of a network with these widths.
    pub fn scaling(self, widths: &[usize], skip: bool, layer: usize) -> f64 {
        let depth = widths.len().saturating_sub(1);
        match self {
            Parameterisation::Sp => 1.0,
            Parameterisation::MuPc => {
                let hidden = widths.get(1).copied().unwrap_or(1) as f64;
                if layer <= 1 {
                    1.0 / libm::sqrt(widths[0] as f64)
                } else if layer == depth {
                    1.0 / hidden
                } else if skip {
                    1.0 / libm::sqrt(hidden * depth as f64)
                } else {
                    1.0 / libm::sqrt(hidden)
                }
            }
        }
    }
}

/// Shapes of a fully connected predictive coding network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch<'a> {
    widths: &'a [usize],
    activation: Activation,
    skip: bool,
}

impl<'a> Arch<'a> {
    /// Validates and wraps the widths `n_0 .. n_L`.
    ///
    /// With `skip`, layers `2 ..= L-1` add their input unchanged (`s_l = 1`), so those layers
    /// need equal input and output widths.
    ///
    /// # Errors
    ///
    /// [`Error::TooFewLayers`], [`Error::ZeroWidth`] or [`Error::SkipWidthMismatch`].
    pub fn new(widths: &'a [usize], activation: Activation, skip: bool) -> Result<Self, Error> {
        if widths.len() < 2 {
            return Err(Error::TooFewLayers {
                widths: widths.len(),
            });
        }
        if let Some(layer) = widths.iter().position(|&width| width == 0) {
            return Err(Error::ZeroWidth { layer });
        }
        let arch = Arch {
            widths,
            activation,
            skip,
        };
        for layer in 1..=arch.depth() {
            if arch.has_skip(layer) && widths[layer] != widths[layer - 1] {
                return Err(Error::SkipWidthMismatch {
                    layer,
                    input: widths[layer - 1],
                    output: widths[layer],
                });
            }
        }
        Ok(arch)
    }

    /// Widths `n_0 .. n_L`.
    pub fn widths(&self) -> &'a [usize] {
        self.widths
    }

    /// Number of weight layers `L`.
    pub fn depth(&self) -> usize {
        self.widths.len() - 1
    }

    /// Activation applied to the input of layers `2 ..= L`.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Whether the network was built with identity skips.
    pub fn skip(&self) -> bool {
        self.skip
    }

    /// Whether layer `layer` (1-based) adds its input unchanged to its prediction.
    pub fn has_skip(&self, layer: usize) -> bool {
        self.skip && layer >= 2 && layer < self.depth()
    }

    /// Width `n_layer`.
    ///
    /// # Panics
    ///
    /// When `layer > depth()`.
    pub fn width(&self, layer: usize) -> usize {
        self.widths[layer]
    }

    /// Offset of layer `layer`'s weights in the weight buffer.
    ///
    /// # Panics
    ///
    /// When `layer > depth()`.
    pub fn weight_offset(&self, layer: usize) -> usize {
        weights_len(&self.widths[..layer])
    }

    /// Offset of `z_layer` in one sample's activities.
    ///
    /// # Panics
    ///
    /// When `layer > depth()`.
    pub fn activity_offset(&self, layer: usize) -> usize {
        activities_len(&self.widths[..layer])
    }

    /// Offset of `e_layer` (1-based) in one sample's errors.
    ///
    /// # Panics
    ///
    /// When `layer > depth()`.
    pub fn error_offset(&self, layer: usize) -> usize {
        activities_len(&self.widths[1..layer])
    }

    /// Number of weights.
    pub fn weights_len(&self) -> usize {
        weights_len(self.widths)
    }

    /// Activities per sample.
    pub fn activities_len(&self) -> usize {
        activities_len(self.widths)
    }

    /// Errors per sample.
    pub fn errors_len(&self) -> usize {
        errors_len(self.widths)
    }

    /// Largest width.
    pub fn max_width(&self) -> usize {
        max_width(self.widths)
    }
}

/// A network's shapes with its borrowed weights, scalings and optional transposed weights.
#[derive(Clone, Copy, Debug)]
pub struct Network<'a, S> {
    pub(crate) arch: Arch<'a>,
    pub(crate) weights: &'a [S],
    pub(crate) transposed: Option<&'a [S]>,
    pub(crate) scalings: &'a [S],
}

impl<'a, S: Scalar> Network<'a, S> {
    /// Wraps weights (`arch.weights_len()` values) and scalings (`arch.depth()` values).
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when a slice has the wrong length.
    pub fn new(arch: Arch<'a>, weights: &'a [S], scalings: &'a [S]) -> Result<Self, Error> {
        check_len(Buffer::Weights, arch.weights_len(), weights.len())?;
        check_len(Buffer::Scalings, arch.depth(), scalings.len())?;
        Ok(Network {
            arch,
            weights,
            transposed: None,
            scalings,
        })
    }

    /// Wraps weights and scalings as [`Network::new`] does, together with a transposed copy
    /// of the weights, such as [`transpose_weights`] writes.
    ///
    /// `transposed` has `arch.weights_len()` values. At `arch.weight_offset(l)` it contains
    /// layer `l`'s `W_l^T`, row-major `[n_(l-1)][n_l]`. Inference then computes the feedback
    /// `W_(l+1)^T e_(l+1)` as a matrix product over the copy, which runs faster on the
    /// Cortex-M4 than the transposed product over `W_(l+1)`. In fixed point it does so only
    /// where the Cortex-M4 matrix routine takes the rows of `W_(l+1)^T`: `n_(l+1)` a multiple
    /// of 8 (`I4F12`) or 4 (`I16F16`). Inference firmware can keep both copies in flash,
    /// because its weights do not change.
    ///
    /// In `I16F16` and `I4F12`, both products sum exactly and round once, so results and
    /// overflow counts are bit-identical to those of [`Network::new`]. In `f32` and `f64` the
    /// matrix product sums in 8 interleaved partial sums while the transposed product sums in
    /// row order. Results then can differ in the last bits when a layer after the first has 8
    /// or more units.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when a slice has the wrong length, and
    /// [`Error::TransposedMismatch`] at the first value of `transposed` that differs from the
    /// transpose of `weights`.
    pub fn with_transposed(
        arch: Arch<'a>,
        weights: &'a [S],
        transposed: &'a [S],
        scalings: &'a [S],
    ) -> Result<Self, Error> {
        let mut network = Network::new(arch, weights, scalings)?;
        check_len(
            Buffer::TransposedWeights,
            arch.weights_len(),
            transposed.len(),
        )?;
        check_transposed(&arch, weights, transposed)?;
        network.transposed = Some(transposed);
        Ok(network)
    }

    /// Shapes of the network.
    pub fn arch(&self) -> &Arch<'a> {
        &self.arch
    }

    /// Weights of layer `layer` (1-based), row-major `[n_layer][n_(layer-1)]`.
    ///
    /// # Panics
    ///
    /// When `layer` is 0 or above the depth.
    pub fn layer_weights(&self, layer: usize) -> &'a [S] {
        let offset = self.arch.weight_offset(layer);
        let len = self.arch.width(layer) * self.arch.width(layer - 1);
        &self.weights[offset..offset + len]
    }

    /// Transposed weights of layer `layer` (1-based), row-major `[n_(layer-1)][n_layer]`, or
    /// `None` for a network built without the transposed copy.
    ///
    /// # Panics
    ///
    /// When `layer` is 0 or above the depth.
    pub fn transposed_layer_weights(&self, layer: usize) -> Option<&'a [S]> {
        let offset = self.arch.weight_offset(layer);
        let len = self.arch.width(layer) * self.arch.width(layer - 1);
        self.transposed
            .map(|transposed| &transposed[offset..offset + len])
    }

    /// Scaling `a_layer` (1-based).
    ///
    /// # Panics
    ///
    /// When `layer` is 0 or above the depth.
    pub fn scaling(&self, layer: usize) -> S {
        self.scalings[layer - 1]
    }
}

/// Writes the transposed copy of `weights` into `out`: for each layer `l`, `W_l^T` row-major
/// `[n_(l-1)][n_l]` at `arch.weight_offset(l)`, the layout [`Network::with_transposed`] takes.
///
/// # Errors
///
/// [`Error::BufferLength`] when `weights` or `out` does not have `arch.weights_len()` values.
pub fn transpose_weights<S: Copy>(
    arch: &Arch<'_>,
    weights: &[S],
    out: &mut [S],
) -> Result<(), Error> {
    check_len(Buffer::Weights, arch.weights_len(), weights.len())?;
    check_len(Buffer::TransposedWeights, arch.weights_len(), out.len())?;
    for layer in 1..=arch.depth() {
        let offset = arch.weight_offset(layer);
        let rows = arch.width(layer);
        let columns = arch.width(layer - 1);
        let block = &weights[offset..offset + rows * columns];
        let transposed = &mut out[offset..offset + rows * columns];
        for (i, row) in block.chunks_exact(columns).enumerate() {
            for (j, &weight) in row.iter().enumerate() {
                transposed[j * rows + i] = weight;
            }
        }
    }
    Ok(())
}

/// Checks that `transposed` is the transpose of `weights`, both of `arch.weights_len()` values.
/// Two NaNs count as equal, so that a float network with NaN weights still builds.
fn check_transposed<S: Scalar>(
    arch: &Arch<'_>,
    weights: &[S],
    transposed: &[S],
) -> Result<(), Error> {
    for layer in 1..=arch.depth() {
        let offset = arch.weight_offset(layer);
        let rows = arch.width(layer);
        let columns = arch.width(layer - 1);
        let block = &weights[offset..offset + rows * columns];
        let copy = &transposed[offset..offset + rows * columns];
        for (row, values) in block.chunks_exact(columns).enumerate() {
            for (column, &weight) in values.iter().enumerate() {
                let copied = copy[column * rows + row];
                #[allow(clippy::eq_op)]
                let both_nan = weight != weight && copied != copied;
                if copied != weight && !both_nan {
                    return Err(Error::TransposedMismatch { layer, row, column });
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn check_len(buffer: Buffer, expected: usize, actual: usize) -> Result<(), Error> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::BufferLength {
            buffer,
            expected,
            actual,
        })
    }
}

/// Borrowed state of up to `capacity` samples: activities, errors, scratch and counters.
#[derive(Debug)]
pub struct Workspace<'w, S> {
    pub(crate) activities: &'w mut [S],
    pub(crate) errors: &'w mut [S],
    pub(crate) scratch: &'w mut [S],
    pub(crate) overflows: &'w mut [u32],
    pub(crate) capacity: usize,
    pub(crate) activities_per_sample: usize,
    pub(crate) errors_per_sample: usize,
}

impl<'w, S: Scalar> Workspace<'w, S> {
    /// Wraps buffers for `capacity` samples of `arch`.
    ///
    /// Lengths: activities `capacity * arch.activities_len()`, errors
    /// `capacity * arch.errors_len()`, scratch `capacity * arch.max_width()`, overflows
    /// `arch.depth()` (one counter per layer).
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when a slice has the wrong length.
    pub fn new(
        arch: &Arch<'_>,
        capacity: usize,
        activities: &'w mut [S],
        errors: &'w mut [S],
        scratch: &'w mut [S],
        overflows: &'w mut [u32],
    ) -> Result<Self, Error> {
        check_len(
            Buffer::Activities,
            capacity.saturating_mul(arch.activities_len()),
            activities.len(),
        )?;
        check_len(
            Buffer::Errors,
            capacity.saturating_mul(arch.errors_len()),
            errors.len(),
        )?;
        check_len(
            Buffer::Scratch,
            capacity.saturating_mul(arch.max_width()),
            scratch.len(),
        )?;
        check_len(Buffer::Overflows, arch.depth(), overflows.len())?;
        Ok(Workspace {
            activities,
            errors,
            scratch,
            overflows,
            capacity,
            activities_per_sample: arch.activities_len(),
            errors_per_sample: arch.errors_len(),
        })
    }

    /// Number of samples the workspace holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Activities `z_0 .. z_L` of sample `sample`, back to back.
    ///
    /// # Panics
    ///
    /// When `sample >= capacity()`.
    pub fn activities(&self, sample: usize) -> &[S] {
        let len = self.activities_per_sample;
        &self.activities[sample * len..(sample + 1) * len]
    }

    /// Errors `e_1 .. e_L` of sample `sample`, back to back.
    ///
    /// # Panics
    ///
    /// When `sample >= capacity()`.
    pub fn errors(&self, sample: usize) -> &[S] {
        let len = self.errors_per_sample;
        &self.errors[sample * len..(sample + 1) * len]
    }

    /// Saturated (fixed point) or non-finite (float) results per layer since the last reset;
    /// index `l - 1` counts layer `l`.
    pub fn overflows(&self) -> &[u32] {
        self.overflows
    }

    /// Total of [`Workspace::overflows`].
    pub fn total_overflows(&self) -> u64 {
        self.overflows.iter().map(|&count| count as u64).sum()
    }

    /// Sets every overflow counter to zero.
    pub fn reset_overflows(&mut self) {
        self.overflows.fill(0);
    }

    pub(crate) fn check(&self, arch: &Arch<'_>, batch: usize) -> Result<(), Error> {
        check_len(
            Buffer::Activities,
            arch.activities_len(),
            self.activities_per_sample,
        )?;
        check_len(Buffer::Errors, arch.errors_len(), self.errors_per_sample)?;
        check_len(Buffer::Overflows, arch.depth(), self.overflows.len())?;
        if self.scratch.len() < self.capacity * arch.max_width() {
            return Err(Error::BufferLength {
                buffer: Buffer::Scratch,
                expected: self.capacity * arch.max_width(),
                actual: self.scratch.len(),
            });
        }
        if batch == 0 || batch > self.capacity {
            return Err(Error::BatchSize {
                requested: batch,
                capacity: self.capacity,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_lengths() {
        let widths = [64, 64, 64, 10];
        assert_eq!(weights_len(&widths), 64 * 64 * 2 + 640);
        assert_eq!(activities_len(&widths), 202);
        assert_eq!(errors_len(&widths), 138);
        assert_eq!(max_width(&widths), 64);
    }

    #[test]
    fn offsets_follow_layers() {
        let widths = [3, 4, 5, 2];
        let arch = Arch::new(&widths, Activation::Tanh, false).unwrap();
        assert_eq!(arch.weight_offset(1), 0);
        assert_eq!(arch.weight_offset(2), 12);
        assert_eq!(arch.weight_offset(3), 32);
        assert_eq!(arch.activity_offset(2), 7);
        assert_eq!(arch.error_offset(1), 0);
        assert_eq!(arch.error_offset(3), 9);
    }

    #[test]
    fn skip_needs_equal_widths() {
        let widths = [3, 4, 5, 2];
        let result = Arch::new(&widths, Activation::Tanh, true);
        assert_eq!(
            result,
            Err(Error::SkipWidthMismatch {
                layer: 2,
                input: 4,
                output: 5
            })
        );
    }

    #[test]
    fn transpose_weights_writes_each_layer() {
        let widths = [2, 3, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        // Layer 1 is 3x2 and layer 2 is 1x3, both row-major.
        let weights = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut transposed = [0; 9];
        transpose_weights(&arch, &weights, &mut transposed).unwrap();
        assert_eq!(transposed[..6], [1, 3, 5, 2, 4, 6], "layer 1 as 2x3");
        assert_eq!(transposed[6..], [7, 8, 9], "layer 2 as 3x1");
    }

    #[test]
    fn transpose_weights_matches_layer_blocks() {
        let widths = [3, 4, 5, 2];
        let arch = Arch::new(&widths, Activation::Tanh, false).unwrap();
        let weights: [i32; 42] = core::array::from_fn(|index| index as i32);
        let mut transposed = [0; 42];
        transpose_weights(&arch, &weights, &mut transposed).unwrap();
        for layer in 1..=arch.depth() {
            let offset = arch.weight_offset(layer);
            let (rows, columns) = (arch.width(layer), arch.width(layer - 1));
            for i in 0..rows {
                for j in 0..columns {
                    assert_eq!(
                        transposed[offset + j * rows + i],
                        weights[offset + i * columns + j],
                        "layer {layer}, row {i}, column {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn transpose_weights_rejects_wrong_lengths() {
        let widths = [2, 3, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        let mut out = [0u8; 9];
        assert_eq!(
            transpose_weights(&arch, &[0u8; 8], &mut out),
            Err(Error::BufferLength {
                buffer: Buffer::Weights,
                expected: 9,
                actual: 8
            })
        );
        assert_eq!(
            transpose_weights(&arch, &[0u8; 9], &mut [0u8; 10]),
            Err(Error::BufferLength {
                buffer: Buffer::TransposedWeights,
                expected: 9,
                actual: 10
            })
        );
    }

    #[test]
    fn with_transposed_rejects_wrong_length() {
        let widths = [2, 3, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        let weights = [0.5f32; 9];
        let scalings = [1.0f32; 2];
        for length in [0, 8, 10, 18] {
            let transposed = [0.5f32; 18];
            let result = Network::with_transposed(arch, &weights, &transposed[..length], &scalings);
            assert_eq!(
                result.err(),
                Some(Error::BufferLength {
                    buffer: Buffer::TransposedWeights,
                    expected: 9,
                    actual: length
                }),
                "length {length}"
            );
        }
    }

    #[test]
    fn with_transposed_checks_weights_first() {
        let widths = [2, 3, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        let result = Network::with_transposed(arch, &[0.5f32; 8], &[0.5; 9], &[1.0; 2]);
        assert_eq!(
            result.err(),
            Some(Error::BufferLength {
                buffer: Buffer::Weights,
                expected: 9,
                actual: 8
            })
        );
    }

    #[test]
    fn with_transposed_rejects_stale_copy() {
        let widths = [2, 3, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        let weights: [f32; 9] = core::array::from_fn(|index| index as f32);
        let mut transposed = [0.0f32; 9];
        transpose_weights(&arch, &weights, &mut transposed).unwrap();
        // Layer 1's transposed block is 2x3, so index 4 is row 1, column 1 of W_1^T.
        transposed[4] = -1.0;
        let result = Network::with_transposed(arch, &weights, &transposed, &[1.0; 2]);
        assert_eq!(
            result.err(),
            Some(Error::TransposedMismatch {
                layer: 1,
                row: 1,
                column: 1
            })
        );
    }

    #[test]
    fn with_transposed_accepts_nan_in_both_copies() {
        let widths = [2, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        let weights = [f32::NAN, 1.0];
        let network = Network::with_transposed(arch, &weights, &weights, &[1.0]).unwrap();
        assert!(network.transposed_layer_weights(1).is_some());
    }

    #[test]
    fn transposed_layer_weights_returns_blocks() {
        let widths = [2, 3, 1];
        let arch = Arch::new(&widths, Activation::Relu, false).unwrap();
        let weights: [f32; 9] = core::array::from_fn(|index| index as f32);
        let mut transposed = [0.0f32; 9];
        transpose_weights(&arch, &weights, &mut transposed).unwrap();
        let scalings = [1.0f32; 2];

        let plain = Network::new(arch, &weights, &scalings).unwrap();
        assert_eq!(plain.transposed_layer_weights(1), None);
        let network = Network::with_transposed(arch, &weights, &transposed, &scalings).unwrap();
        assert_eq!(
            network.transposed_layer_weights(1),
            Some(&[0.0, 2.0, 4.0, 1.0, 3.0, 5.0][..])
        );
        assert_eq!(
            network.transposed_layer_weights(2),
            Some(&[6.0, 7.0, 8.0][..])
        );
        assert_eq!(network.layer_weights(2), &[6.0, 7.0, 8.0]);
    }

    #[test]
    fn inference_ram_leaves_out_weights() {
        let widths = [64, 64, 64, 10];
        let with_weights = inference_memory_bytes(&widths, 2);
        assert_eq!(
            inference_ram_bytes(&widths, 2),
            with_weights - 2 * weights_len(&widths)
        );
    }

    #[test]
    fn mupc_scalings_match_jpc() {
        let widths = [16, 32, 32, 32, 32, 32, 32, 32, 10];
        let mupc = Parameterisation::MuPc;
        assert_eq!(mupc.scaling(&widths, true, 1), 0.25);
        assert_eq!(mupc.scaling(&widths, true, 2), 0.0625);
        assert_eq!(mupc.scaling(&widths, true, 8), 0.03125);
    }
}
