//! The versioned binary model file, parsed and written without allocation.
//!
//! Layout, all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `FXPC` |
//! | 4 | 2 | format version, currently 1 |
//! | 6 | 1 | numeric format ([`NumericFormat::code`]) |
//! | 7 | 1 | activation ([`Activation::code`]) |
//! | 8 | 1 | parameterisation ([`Parameterisation::code`]) |
//! | 9 | 1 | flags: bit 0 identity skips, bit 1 inference tolerance present, bit 2 stochastic activity rounding |
//! | 10 | 2 | depth `L` (number of weight layers), at least 1 |
//! | 12 | 4 | inference steps `T` |
//! | 16 | 4 (L+1) | widths `n_0 .. n_L`, each at least 1 |
//! | | v | inference step size |
//! | | v | inference tolerance (0 when absent) |
//! | | v | input scale: raw features are multiplied by it before entering `z_0` |
//! | | v L | scalings `a_1 .. a_L` |
//! | | v W | weights, layer by layer, row-major `[n_l][n_(l-1)]` |
//! | | 4 | CRC-32 (ISO-HDLC, as zlib) of every preceding byte |
//!
//! `v` is the size of one value of the numeric format (4 bytes for `f32` and `I16F16`, 8 for
//! `f64`, 2 for `I4F12`) and `W` the number of weights. Fixed-point values are stored as their
//! raw two's-complement integers. Format code 4 (`I4F12`) was added without a version change:
//! files of the other formats keep their layout, and a reader without code 4 rejects such a
//! file as an invalid numeric format.

use crc::{Crc, CRC_32_ISO_HDLC};

use crate::activation::Activation;
use crate::error::{Buffer, Error, Field};
use crate::infer::{ActivityRounding, InferenceConfig};
use crate::network::{check_len, Arch, Parameterisation};
use crate::scalar::{NumericFormat, Scalar};

/// First four bytes of every model file.
pub const MAGIC: [u8; 4] = *b"FXPC";
/// Format version this build reads and writes.
pub const VERSION: u16 = 1;

const HEADER_LEN: usize = 16;
/// Values stored before the scalings: step size, tolerance, input scale.
const HEADER_VALUES: usize = 3;
const FLAG_SKIP: u8 = 1;
const FLAG_TOLERANCE: u8 = 2;
const FLAG_STOCHASTIC: u8 = 4;
const CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// Size in bytes of a model file for these widths and format.
pub const fn encoded_len(widths: &[usize], format: NumericFormat) -> usize {
    let depth = widths.len() - 1;
    let values = HEADER_VALUES + depth + crate::network::weights_len(widths);
    HEADER_LEN + 4 * widths.len() + values * format.bytes() + 4
}

/// Contents of a model file besides its numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ModelHeader {
    /// Numeric format of every stored value.
    pub format: NumericFormat,
    /// Activation of layers `2 ..= L`.
    pub activation: Activation,
    /// Parameterisation that chose the scalings.
    pub parameterisation: Parameterisation,
    /// Identity skips on layers `2 ..= L-1`.
    pub skip: bool,
    /// Number of weight layers `L`.
    pub depth: usize,
    /// Inference steps `T`.
    pub inference_steps: u32,
    /// Whether an early-stop tolerance is stored.
    pub has_tolerance: bool,
    /// Rounding of the activity updates during inference.
    pub rounding: ActivityRounding,
}

/// A validated model file borrowed from memory (flash on a board).
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    bytes: &'a [u8],
    header: ModelHeader,
}

fn read_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

/// Checks that a file of `bytes` is exactly `expected` bytes long (`usize::MAX` when its header
/// announces more than memory can hold) and ends with the CRC-32 of everything before it.
pub(crate) fn check_length_and_crc(bytes: &[u8], expected: usize) -> Result<(), Error> {
    if bytes.len() < expected {
        return Err(Error::Truncated {
            expected,
            actual: bytes.len(),
        });
    }
    if bytes.len() > expected {
        return Err(Error::TrailingBytes {
            expected,
            actual: bytes.len(),
        });
    }
    let stored = read_u32(bytes, expected - 4);
    let computed = CRC.checksum(&bytes[..expected - 4]);
    if stored != computed {
        return Err(Error::ChecksumMismatch { stored, computed });
    }
    Ok(())
}

/// Reads a little-endian `u32` at `offset`.
pub(crate) fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

impl<'a> Model<'a> {
    /// Validates a whole model file: magic, version, every header field, length and CRC.
    ///
    /// # Errors
    ///
    /// A specific [`Error`] for each way a file can be wrong; nothing is decoded from a file
    /// that fails any check.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.len() < HEADER_LEN {
            if bytes.len() >= 4 && bytes[..4] != MAGIC {
                return Err(Error::BadMagic);
            }
            return Err(Error::Truncated {
                expected: HEADER_LEN,
                actual: bytes.len(),
            });
        }
        if bytes[..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = read_u16(bytes, 4);
        if version != VERSION {
            return Err(Error::UnsupportedVersion { found: version });
        }
        let format = NumericFormat::from_code(bytes[6]).ok_or(Error::InvalidField {
            field: Field::NumericFormat,
            value: bytes[6] as u32,
        })?;
        let activation = Activation::from_code(bytes[7]).ok_or(Error::InvalidField {
            field: Field::Activation,
            value: bytes[7] as u32,
        })?;
        let parameterisation =
            Parameterisation::from_code(bytes[8]).ok_or(Error::InvalidField {
                field: Field::Parameterisation,
                value: bytes[8] as u32,
            })?;
        let flags = bytes[9];
        if flags & !(FLAG_SKIP | FLAG_TOLERANCE | FLAG_STOCHASTIC) != 0 {
            return Err(Error::InvalidField {
                field: Field::Flags,
                value: flags as u32,
            });
        }
        let depth = read_u16(bytes, 10) as usize;
        if depth == 0 {
            return Err(Error::InvalidField {
                field: Field::Depth,
                value: 0,
            });
        }
        let header = ModelHeader {
            format,
            activation,
            parameterisation,
            skip: flags & FLAG_SKIP != 0,
            depth,
            inference_steps: read_u32(bytes, 12),
            has_tolerance: flags & FLAG_TOLERANCE != 0,
            rounding: if flags & FLAG_STOCHASTIC != 0 {
                ActivityRounding::Stochastic
            } else {
                ActivityRounding::Nearest
            },
        };

        let widths_end = HEADER_LEN + 4 * (depth + 1);
        if bytes.len() < widths_end {
            return Err(Error::Truncated {
                expected: widths_end,
                actual: bytes.len(),
            });
        }
        let mut weights: usize = 0;
        let mut previous = 0usize;
        for layer in 0..=depth {
            let width = read_u32(bytes, HEADER_LEN + 4 * layer);
            if width == 0 {
                return Err(Error::InvalidField {
                    field: Field::Width,
                    value: 0,
                });
            }
            let width = width as usize;
            if layer > 0 {
                weights = width
                    .checked_mul(previous)
                    .and_then(|count| count.checked_add(weights))
                    .ok_or(Error::InvalidField {
                        field: Field::Width,
                        value: width as u32,
                    })?;
            }
            previous = width;
        }
        let expected = weights
            .checked_add(HEADER_VALUES + depth)
            .and_then(|values| values.checked_mul(format.bytes()))
            .and_then(|value_bytes| value_bytes.checked_add(widths_end + 4))
            .unwrap_or(usize::MAX);
        check_length_and_crc(bytes, expected)?;
        Ok(Model { bytes, header })
    }

    /// Header fields.
    pub fn header(&self) -> &ModelHeader {
        &self.header
    }

    /// Width `n_layer`.
    ///
    /// # Panics
    ///
    /// When `layer > header().depth`.
    pub fn width(&self, layer: usize) -> usize {
        read_u32(self.bytes, HEADER_LEN + 4 * layer) as usize
    }

    /// Copies the widths `n_0 .. n_L` into `out`, which must have `depth + 1` entries.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] when `out` has the wrong length.
    pub fn widths_into<'o>(&self, out: &'o mut [usize]) -> Result<&'o [usize], Error> {
        check_len(Buffer::Weights, self.header.depth + 1, out.len())?;
        for (layer, width) in out.iter_mut().enumerate() {
            *width = self.width(layer);
        }
        Ok(out)
    }

    /// Checks that the file describes exactly `arch` in numeric format `S`, for firmware whose
    /// shapes are compile-time constants.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMismatch`], [`Error::ShapeMismatch`] or [`Error::InvalidField`].
    pub fn check_matches<S: Scalar>(&self, arch: &Arch<'_>) -> Result<(), Error> {
        self.check_format::<S>()?;
        let widths = arch.widths();
        if widths.len() != self.header.depth + 1 {
            return Err(Error::InvalidField {
                field: Field::Depth,
                value: self.header.depth as u32,
            });
        }
        for (layer, &expected) in widths.iter().enumerate() {
            let file = self.width(layer);
            if file != expected {
                return Err(Error::ShapeMismatch {
                    layer,
                    file,
                    expected,
                });
            }
        }
        if arch.activation() != self.header.activation {
            let value = self.header.activation.code() as u32;
            return Err(Error::InvalidField {
                field: Field::Activation,
                value,
            });
        }
        if arch.skip() != self.header.skip {
            return Err(Error::InvalidField {
                field: Field::Flags,
                value: self.bytes[9] as u32,
            });
        }
        Ok(())
    }

    fn check_format<S: Scalar>(&self) -> Result<(), Error> {
        if self.header.format != S::FORMAT {
            return Err(Error::FormatMismatch {
                file: self.header.format.code(),
                expected: S::FORMAT.code(),
            });
        }
        Ok(())
    }

    fn values_offset(&self) -> usize {
        HEADER_LEN + 4 * (self.header.depth + 1)
    }

    fn value<S: Scalar>(&self, index: usize) -> S {
        let size = self.header.format.bytes();
        let offset = self.values_offset() + index * size;
        S::from_le_slice(&self.bytes[offset..offset + size])
    }

    /// Returns the stored inference settings.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMismatch`] when `S` is not the file's format.
    pub fn inference_config<S: Scalar>(&self) -> Result<InferenceConfig<S>, Error> {
        self.check_format::<S>()?;
        Ok(InferenceConfig {
            steps: self.header.inference_steps,
            step_size: self.value(0),
            tolerance: if self.header.has_tolerance {
                Some(self.value(1))
            } else {
                None
            },
            rounding: self.header.rounding,
        })
    }

    /// Returns the factor raw features are multiplied by before entering the network.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMismatch`] when `S` is not the file's format.
    pub fn input_scale<S: Scalar>(&self) -> Result<S, Error> {
        self.check_format::<S>()?;
        Ok(self.value(2))
    }

    /// Decodes the scalings `a_1 .. a_L` into `out`.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMismatch`] or [`Error::BufferLength`].
    pub fn scalings_into<S: Scalar>(&self, out: &mut [S]) -> Result<(), Error> {
        self.check_format::<S>()?;
        check_len(Buffer::Scalings, self.header.depth, out.len())?;
        for (index, value) in out.iter_mut().enumerate() {
            *value = self.value(HEADER_VALUES + index);
        }
        Ok(())
    }

    /// Number of stored weights.
    pub fn weights_len(&self) -> usize {
        let mut total = 0;
        for layer in 1..=self.header.depth {
            total += self.width(layer) * self.width(layer - 1);
        }
        total
    }

    /// Stored weights as raw little-endian values, layer by layer, row-major `[n_l][n_(l-1)]`.
    ///
    /// On a little-endian target these bytes have the memory layout of a `[S]` slice of the
    /// file's format, but the slice may not be aligned for `S`.
    pub fn weight_bytes(&self) -> &'a [u8] {
        let size = self.header.format.bytes();
        let start = self.values_offset() + (HEADER_VALUES + self.header.depth) * size;
        // `parse` checked that the file is exactly this long, the CRC-32 last.
        &self.bytes[start..self.bytes.len() - 4]
    }

    /// Decodes the weights into `out`.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMismatch`] or [`Error::BufferLength`].
    pub fn weights_into<S: Scalar>(&self, out: &mut [S]) -> Result<(), Error> {
        self.check_format::<S>()?;
        check_len(Buffer::Weights, self.weights_len(), out.len())?;
        let first = HEADER_VALUES + self.header.depth;
        for (index, value) in out.iter_mut().enumerate() {
            *value = self.value(first + index);
        }
        Ok(())
    }
}

/// Encodes a model into `out` and returns the number of bytes written.
///
/// # Errors
///
/// [`Error::BufferLength`] when the weights or scalings do not fit `arch`,
/// [`Error::OutputTooSmall`] when `out` is too short, and [`Error::InvalidField`] for a depth
/// above 65535 or a width above `u32::MAX`.
pub fn write_model<S: Scalar>(
    arch: &Arch<'_>,
    parameterisation: Parameterisation,
    inference: &InferenceConfig<S>,
    input_scale: S,
    scalings: &[S],
    weights: &[S],
    out: &mut [u8],
) -> Result<usize, Error> {
    check_len(Buffer::Weights, arch.weights_len(), weights.len())?;
    check_len(Buffer::Scalings, arch.depth(), scalings.len())?;
    let depth = u16::try_from(arch.depth()).map_err(|_| Error::InvalidField {
        field: Field::Depth,
        value: arch.depth() as u32,
    })?;
    let len = encoded_len(arch.widths(), S::FORMAT);
    if out.len() < len {
        return Err(Error::OutputTooSmall {
            needed: len,
            available: out.len(),
        });
    }

    out[..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out[6] = S::FORMAT.code();
    out[7] = arch.activation().code();
    out[8] = parameterisation.code();
    let mut flags = 0;
    if arch.skip() {
        flags |= FLAG_SKIP;
    }
    if inference.tolerance.is_some() {
        flags |= FLAG_TOLERANCE;
    }
    if inference.rounding == ActivityRounding::Stochastic {
        flags |= FLAG_STOCHASTIC;
    }
    out[9] = flags;
    out[10..12].copy_from_slice(&depth.to_le_bytes());
    out[12..16].copy_from_slice(&inference.steps.to_le_bytes());
    let mut offset = HEADER_LEN;
    for &width in arch.widths() {
        let width = u32::try_from(width).map_err(|_| Error::InvalidField {
            field: Field::Width,
            value: u32::MAX,
        })?;
        out[offset..offset + 4].copy_from_slice(&width.to_le_bytes());
        offset += 4;
    }

    let size = S::FORMAT.bytes();
    let tolerance = inference.tolerance.unwrap_or(S::ZERO);
    let header_values = [inference.step_size, tolerance, input_scale];
    for &value in header_values.iter().chain(scalings).chain(weights) {
        value.write_le(&mut out[offset..offset + size]);
        offset += size;
    }
    let crc = CRC.checksum(&out[..offset]);
    out[offset..offset + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(offset + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixed::types::{I16F16, I4F12};

    const WIDTHS: [usize; 3] = [3, 4, 2];
    const LEN: usize = encoded_len(&WIDTHS, NumericFormat::I16F16);

    fn sample_file() -> [u8; LEN] {
        let arch = Arch::new(&WIDTHS, Activation::Tanh, false).unwrap();
        let weights: [I16F16; 20] = core::array::from_fn(|i| I16F16::from_num(i as i32 - 7) / 8);
        let scalings = [I16F16::ONE, I16F16::ONE];
        let inference = InferenceConfig {
            steps: 20,
            step_size: I16F16::from_num(0.1),
            tolerance: None,
            rounding: ActivityRounding::Nearest,
        };
        let mut out = [0u8; LEN];
        let written = write_model(
            &arch,
            Parameterisation::Sp,
            &inference,
            I16F16::ONE,
            &scalings,
            &weights,
            &mut out,
        )
        .unwrap();
        assert_eq!(written, LEN);
        out
    }

    #[test]
    fn round_trip_keeps_every_value() {
        let file = sample_file();
        let model = Model::parse(&file).unwrap();
        assert_eq!(model.header().depth, 2);
        assert_eq!(model.header().activation, Activation::Tanh);
        let mut weights = [I16F16::ZERO; 20];
        model.weights_into(&mut weights).unwrap();
        assert_eq!(weights[0], I16F16::from_num(-7) / 8);
        assert_eq!(weights[19], I16F16::from_num(12) / 8);
        assert_eq!(model.inference_config::<I16F16>().unwrap().steps, 20);
    }

    #[test]
    fn weight_bytes_are_the_stored_values() {
        let file = sample_file();
        let model = Model::parse(&file).unwrap();
        let mut weights = [I16F16::ZERO; 20];
        model.weights_into(&mut weights).unwrap();
        let bytes = model.weight_bytes();
        assert_eq!(bytes.len(), 20 * 4);
        for (index, (weight, raw)) in weights.iter().zip(bytes.chunks_exact(4)).enumerate() {
            assert_eq!(weight.to_bits().to_le_bytes(), raw, "weight {index}");
        }
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let file = sample_file();
        for index in 0..file.len() {
            let mut corrupt = file;
            corrupt[index] ^= 0x5a;
            assert!(
                Model::parse(&corrupt).is_err(),
                "flipped byte {index} was accepted"
            );
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let file = sample_file();
        for len in 0..file.len() {
            assert!(
                Model::parse(&file[..len]).is_err(),
                "truncation to {len} was accepted"
            );
        }
    }

    /// Recomputes the CRC after a test edits a header byte, so that only the edit is wrong.
    fn fix_crc(file: &mut [u8]) {
        let end = file.len() - 4;
        let crc = CRC.checksum(&file[..end]);
        file[end..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn i16f16_file_bytes_are_stable() {
        // Files written before the 16-bit format existed must still load, so the layout of an
        // I16F16 file may not change: its CRC over the whole file is pinned here.
        let file = sample_file();
        assert_eq!(file[6], 3);
        assert_eq!(CRC.checksum(&file), 0x2144_df1c);
    }

    #[test]
    fn i4f12_round_trip_keeps_every_value() {
        const NARROW_LEN: usize = encoded_len(&WIDTHS, NumericFormat::I4F12);
        let arch = Arch::new(&WIDTHS, Activation::Relu, false).unwrap();
        // (i - 7) / 8 for i below 20, from raw bits, because I4F12 values stay below 8.
        let weights: [I4F12; 20] = core::array::from_fn(|i| I4F12::from_bits((i as i16 - 7) << 9));
        let inference = InferenceConfig {
            steps: 5,
            step_size: I4F12::from_num(0.125),
            tolerance: Some(I4F12::from_bits(3)),
            rounding: ActivityRounding::Stochastic,
        };
        let mut file = [0u8; NARROW_LEN];
        let written = write_model(
            &arch,
            Parameterisation::Sp,
            &inference,
            I4F12::ONE,
            &[I4F12::ONE, I4F12::ONE],
            &weights,
            &mut file,
        )
        .unwrap();

        assert_eq!(written, NARROW_LEN);
        // Header values, scalings and weights: 3 + 2 + 20 values of 2 bytes instead of 4.
        assert_eq!(NARROW_LEN, LEN - 25 * 2);
        let model = Model::parse(&file).unwrap();
        assert_eq!(model.header().format, NumericFormat::I4F12);
        let mut decoded = [I4F12::ZERO; 20];
        model.weights_into(&mut decoded).unwrap();
        assert_eq!(decoded, weights);
        assert_eq!(model.inference_config::<I4F12>().unwrap(), inference);

        let mut wide = [I16F16::ZERO; 20];
        assert_eq!(
            model.weights_into(&mut wide),
            Err(Error::FormatMismatch {
                file: 4,
                expected: 3
            })
        );
    }

    #[test]
    fn unknown_format_code_is_rejected() {
        let mut file = sample_file();
        file[6] = 9;
        fix_crc(&mut file);
        assert_eq!(
            Model::parse(&file).err(),
            Some(Error::InvalidField {
                field: Field::NumericFormat,
                value: 9
            })
        );
    }

    #[test]
    fn format_code_with_other_value_size_is_rejected() {
        // An I16F16 file relabelled as I4F12 has twice the bytes its header announces.
        let mut file = sample_file();
        file[6] = NumericFormat::I4F12.code();
        fix_crc(&mut file);
        assert!(matches!(
            Model::parse(&file),
            Err(Error::TrailingBytes { .. })
        ));
    }

    #[test]
    fn wrong_format_is_rejected() {
        let file = sample_file();
        let model = Model::parse(&file).unwrap();
        let mut weights = [0f32; 20];
        let result = model.weights_into(&mut weights);
        assert_eq!(
            result,
            Err(Error::FormatMismatch {
                file: 3,
                expected: 1
            })
        );
    }
}
