//! The test protocol shared by the host and the firmware, so both compute the same bits.
//!
//! For each test sample: the feedforward prediction `mu_L` and its arg-max class, then
//! supervised inference with the output clamped to the one-hot label, which gives the final
//! energy. A CRC-32 over every output value, final energy and step count of every sample
//! (raw little-endian bytes, in sample order) lets two runs be compared with one number.

use crc::{Crc, Digest, CRC_32_ISO_HDLC};

use crate::error::{Buffer, Error, Field};
use crate::infer::InferenceConfig;
use crate::model::{check_length_and_crc, read_u32};
use crate::network::{check_len, Network, Workspace};
use crate::scalar::{NumericFormat, Scalar};

static CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// Result of the test protocol on one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SampleResult<S> {
    /// Arg-max class of the feedforward output (the lowest index on ties).
    pub predicted: usize,
    /// Energy after inference with the output clamped to the label.
    pub final_energy: S,
    /// Inference steps taken.
    pub steps_taken: u32,
}

/// Writes the one-hot encoding of `label` into `target`.
///
/// # Errors
///
/// [`Error::BufferLength`] when `label` is not below `target.len()`.
pub fn one_hot<S: Scalar>(label: usize, target: &mut [S]) -> Result<(), Error> {
    if label >= target.len() {
        return Err(Error::BufferLength {
            buffer: Buffer::Target,
            expected: label + 1,
            actual: target.len(),
        });
    }
    target.fill(S::ZERO);
    target[label] = S::ONE;
    Ok(())
}

/// Returns the index of the largest value, the lowest index on ties (0 for an empty slice).
pub fn arg_max<S: Scalar>(values: &[S]) -> usize {
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best
}

/// Running CRC-32 over the outputs, energies and step counts of the test protocol.
pub struct TestChecksum {
    digest: Digest<'static, u32>,
}

impl Default for TestChecksum {
    fn default() -> Self {
        TestChecksum {
            digest: CRC.digest(),
        }
    }
}

impl TestChecksum {
    /// Starts an empty checksum.
    pub fn new() -> Self {
        Self::default()
    }

    fn update_value<S: Scalar>(&mut self, value: S) {
        let mut bytes = [0u8; 8];
        let size = S::FORMAT.bytes();
        value.write_le(&mut bytes[..size]);
        self.digest.update(&bytes[..size]);
    }

    /// Returns the CRC-32 of everything added so far.
    pub fn finalize(self) -> u32 {
        self.digest.finalize()
    }
}

/// Runs the test protocol on one sample in workspace slot 0 and adds it to `checksum`.
///
/// `target` is scratch for the one-hot label, `n_L` values long.
///
/// # Errors
///
/// [`Error::BufferLength`] or [`Error::BatchSize`] when the buffers do not fit the network.
pub fn evaluate_sample<S: Scalar>(
    network: &Network<'_, S>,
    workspace: &mut Workspace<'_, S>,
    input: &[S],
    label: usize,
    target: &mut [S],
    config: &InferenceConfig<S>,
    checksum: &mut TestChecksum,
) -> Result<SampleResult<S>, Error> {
    let output_width = network.arch().width(network.arch().depth());
    check_len(Buffer::Target, output_width, target.len())?;
    one_hot(label, target)?;

    let output = network.feedforward(workspace, 0, input)?;
    let predicted = arg_max(output);
    for &value in output {
        checksum.update_value(value);
    }

    let stats = network.infer_supervised(workspace, 0, input, target, config)?;
    checksum.update_value(stats.final_energy);
    checksum.digest.update(&stats.steps_taken.to_le_bytes());
    Ok(SampleResult {
        predicted,
        final_energy: stats.final_energy,
        steps_taken: stats.steps_taken,
    })
}

/// First four bytes of a sample file.
pub const SAMPLES_MAGIC: [u8; 4] = *b"FXPS";
/// Sample file version this build reads and writes.
pub const SAMPLES_VERSION: u16 = 1;
const SAMPLES_HEADER_LEN: usize = 16;

/// Size in bytes of a sample file.
pub const fn samples_encoded_len(count: usize, features: usize, format: NumericFormat) -> usize {
    SAMPLES_HEADER_LEN + count * (4 + features * format.bytes()) + 4
}

/// Labelled samples already converted to the network's numeric format, borrowed from memory.
///
/// Layout, little-endian: magic `FXPS`, version `u16`, numeric format `u8`, a zero byte,
/// sample count `u32`, features per sample `u32`, then per sample its label `u32` and its
/// features, then a CRC-32 (ISO-HDLC) of every preceding byte.
#[derive(Clone, Copy, Debug)]
pub struct SampleSet<'a> {
    bytes: &'a [u8],
    format: NumericFormat,
    count: usize,
    features: usize,
}

impl<'a> SampleSet<'a> {
    /// Validates a whole sample file.
    ///
    /// # Errors
    ///
    /// [`Error::BadMagic`], [`Error::UnsupportedVersion`], [`Error::InvalidField`],
    /// [`Error::Truncated`], [`Error::TrailingBytes`] or [`Error::ChecksumMismatch`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.len() < SAMPLES_HEADER_LEN {
            return Err(Error::Truncated {
                expected: SAMPLES_HEADER_LEN,
                actual: bytes.len(),
            });
        }
        if bytes[..4] != SAMPLES_MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != SAMPLES_VERSION {
            return Err(Error::UnsupportedVersion { found: version });
        }
        let format = NumericFormat::from_code(bytes[6]).ok_or(Error::InvalidField {
            field: Field::NumericFormat,
            value: bytes[6] as u32,
        })?;
        if bytes[7] != 0 {
            return Err(Error::InvalidField {
                field: Field::Flags,
                value: bytes[7] as u32,
            });
        }
        let count = read_u32(bytes, 8) as usize;
        let features = read_u32(bytes, 12) as usize;
        let expected = features
            .checked_mul(format.bytes())
            .and_then(|row| row.checked_add(4))
            .and_then(|row| row.checked_mul(count))
            .and_then(|rows| rows.checked_add(SAMPLES_HEADER_LEN + 4))
            .unwrap_or(usize::MAX);
        check_length_and_crc(bytes, expected)?;
        Ok(SampleSet {
            bytes,
            format,
            count,
            features,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the set has no samples.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Features per sample.
    pub fn feature_count(&self) -> usize {
        self.features
    }

    /// Numeric format of the stored features.
    pub fn format(&self) -> NumericFormat {
        self.format
    }

    /// Decodes sample `index` into `features` and returns its label.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMismatch`] when `S` is not the file's format, [`Error::BufferLength`]
    /// when `features` has the wrong length or `index` is out of range.
    pub fn sample_into<S: Scalar>(&self, index: usize, features: &mut [S]) -> Result<usize, Error> {
        if S::FORMAT != self.format {
            return Err(Error::FormatMismatch {
                file: self.format.code(),
                expected: S::FORMAT.code(),
            });
        }
        check_len(Buffer::Input, self.features, features.len())?;
        if index >= self.count {
            return Err(Error::BufferLength {
                buffer: Buffer::Input,
                expected: index + 1,
                actual: self.count,
            });
        }
        let size = self.format.bytes();
        let row = SAMPLES_HEADER_LEN + index * (4 + self.features * size);
        let label = read_u32(self.bytes, row) as usize;
        for (k, value) in features.iter_mut().enumerate() {
            let offset = row + 4 + k * size;
            *value = S::from_le_slice(&self.bytes[offset..offset + size]);
        }
        Ok(label)
    }
}

/// Encodes labelled samples (row-major `features`, one label each) into `out` and returns the
/// number of bytes written.
///
/// # Errors
///
/// [`Error::BufferLength`] when `features` is not `labels.len() * feature_count` long, and
/// [`Error::OutputTooSmall`] when `out` is too short.
pub fn write_samples<S: Scalar>(
    features: &[S],
    labels: &[u32],
    feature_count: usize,
    out: &mut [u8],
) -> Result<usize, Error> {
    check_len(Buffer::Input, labels.len() * feature_count, features.len())?;
    let len = samples_encoded_len(labels.len(), feature_count, S::FORMAT);
    if out.len() < len {
        return Err(Error::OutputTooSmall {
            needed: len,
            available: out.len(),
        });
    }
    out[..4].copy_from_slice(&SAMPLES_MAGIC);
    out[4..6].copy_from_slice(&SAMPLES_VERSION.to_le_bytes());
    out[6] = S::FORMAT.code();
    out[7] = 0;
    out[8..12].copy_from_slice(&(labels.len() as u32).to_le_bytes());
    out[12..16].copy_from_slice(&(feature_count as u32).to_le_bytes());
    let size = S::FORMAT.bytes();
    let mut offset = SAMPLES_HEADER_LEN;
    for (row, &label) in labels.iter().enumerate() {
        out[offset..offset + 4].copy_from_slice(&label.to_le_bytes());
        offset += 4;
        for &value in &features[row * feature_count..(row + 1) * feature_count] {
            value.write_le(&mut out[offset..offset + size]);
            offset += size;
        }
    }
    let crc = CRC.checksum(&out[..offset]);
    out[offset..offset + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(offset + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixed::types::I16F16;

    #[test]
    fn samples_round_trip() {
        let features: [I16F16; 6] = core::array::from_fn(|i| I16F16::from_num(i) / 4);
        let labels = [7, 2];
        let mut out = [0u8; samples_encoded_len(2, 3, NumericFormat::I16F16)];
        write_samples(&features, &labels, 3, &mut out).unwrap();
        let set = SampleSet::parse(&out).unwrap();
        let mut row = [I16F16::ZERO; 3];
        assert_eq!(set.sample_into(1, &mut row).unwrap(), 2);
        assert_eq!(row[2], I16F16::from_num(5) / 4);
    }

    #[test]
    fn corrupt_samples_rejected() {
        let features = [0.5f32; 4];
        let mut out = [0u8; samples_encoded_len(2, 2, NumericFormat::F32)];
        write_samples(&features, &[1, 0], 2, &mut out).unwrap();
        for index in 0..out.len() {
            let mut corrupt = out;
            corrupt[index] ^= 0x21;
            assert!(
                SampleSet::parse(&corrupt).is_err(),
                "flipped byte {index} was accepted"
            );
        }
    }

    #[test]
    fn arg_max_prefers_lowest_index() {
        assert_eq!(arg_max(&[1.0f32, 3.0, 3.0, 2.0]), 1);
    }
}
