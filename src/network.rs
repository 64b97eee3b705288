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

/// A network's shapes with its borrowed weights and scalings.
#[derive(Clone, Copy, Debug)]
pub struct Network<'a, S> {
    pub(crate) arch: Arch<'a>,
    pub(crate) weights: &'a [S],
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
            scalings,
        })
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

    /// Scaling `a_layer` (1-based).
    ///
    /// # Panics
    ///
    /// When `layer` is 0 or above the depth.
    pub fn scaling(&self, layer: usize) -> S {
        self.scalings[layer - 1]
    }
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
    fn mupc_scalings_match_jpc() {
        let widths = [16, 32, 32, 32, 32, 32, 32, 32, 10];
        let mupc = Parameterisation::MuPc;
        assert_eq!(mupc.scaling(&widths, true, 1), 0.25);
        assert_eq!(mupc.scaling(&widths, true, 2), 0.0625);
        assert_eq!(mupc.scaling(&widths, true, 8), 0.03125);
    }
}
