//! Messages between a host and a learning board, and their frames on the serial link.
//!
//! A frame is `COBS(postcard(message) ++ CRC-32(postcard(message)))` followed by one `0x00`.
//! COBS removes every zero byte from the body, so `0x00` only ever ends a frame and a receiver
//! resynchronises at the next `0x00` after garbage. The CRC is CRC-32/ISO-HDLC of the
//! postcard bytes, stored little-endian. Fixed-point values travel as raw `I16F16` bits
//! (`i32`, value times 2^16); arrays of them travel as their little-endian bytes.
//!
//! Every command gets exactly one response. A command that fails gets
//! [`Response::Error`] and changes nothing on the board.

use crc::{Crc, CRC_32_ISO_HDLC};
use serde::{Deserialize, Serialize};

/// Version of this protocol, sent in [`Info`]; a host must reject a board with another one.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest postcard payload of a frame, CRC excluded, in bytes.
pub const MAX_PAYLOAD: usize = 1024;

/// Largest encoded frame: COBS adds one byte per 254, plus the CRC and the final `0x00`.
pub const MAX_FRAME: usize = cobs::max_encoding_length(MAX_PAYLOAD + CRC_BYTES) + 1;

/// Weights per [`Command::ReadWeights`] or [`Command::WriteWeights`] frame, at most.
pub const WEIGHTS_PER_FRAME: usize = 128;

/// Layers (widths `n_0 .. n_L`) that [`Info`] can describe.
pub const MAX_WIDTHS: usize = 8;

const CRC_BYTES: usize = 4;

static CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// Rounding mode of the weight updates to `I16F16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rounding {
    /// Round to nearest: updates below half an LSB vanish.
    Nearest,
    /// Stochastic rounding with an xorshift32 generator started from `seed`.
    Stochastic {
        /// Seed of the generator.
        seed: u32,
    },
}

/// Learning settings of a board, sent with [`Command::Configure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Activation tag as in the model file (`fixedpc::Activation::code`).
    pub activation: u8,
    /// Identity skips on hidden-to-hidden layers.
    pub skip: bool,
    /// Parameterisation tag as in the model file; only SP (0) is supported by
    /// [`Command::Reset`]'s initialisation, so the board rejects others.
    pub parameterisation: u8,
    /// Maximum inference steps `T` per sample.
    pub steps: u32,
    /// Per-sample inference step size, raw `I16F16`.
    pub step_size: i32,
    /// Early-stop tolerance on the energy change of one step, raw `I16F16`; `None` runs all
    /// steps.
    pub tolerance: Option<i32>,
    /// SGD learning rate, raw `I16F16`.
    pub learning_rate: i32,
    /// Rounding of the weight updates.
    pub rounding: Rounding,
    /// Pause in microseconds between the busy pulse of inference and that of the update, so
    /// that a scope shows two separate pulses; 0 for none.
    pub pulse_gap_us: u32,
}

/// Commands from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command<'a> {
    /// Requests [`Response::Info`].
    Hello,
    /// Sets the learning settings and clears the statistics; weights are unchanged.
    Configure(Settings),
    /// Draws fresh weights (see `crate::init_weights`) from `seed` and clears the
    /// statistics. Needs [`Command::Configure`] first.
    Reset {
        /// Seed of the weight generator.
        seed: u32,
    },
    /// Overwrites weights `offset ..` with `values` (raw `I16F16`, little-endian `i32`).
    WriteWeights {
        /// Index of the first weight.
        offset: u32,
        /// Raw weights, 4 bytes each, at most [`WEIGHTS_PER_FRAME`].
        #[serde(borrow)]
        values: &'a [u8],
    },
    /// Trains on one sample: feedforward, inference with the label clamped, one SGD step.
    Train {
        /// Class label, below the output width.
        label: u8,
        /// Raw `I16F16` features, little-endian `i32`, `n_0` of them.
        #[serde(borrow)]
        features: &'a [u8],
    },
    /// Tests one sample without learning, as `fixedpc::evaluate::evaluate_sample` does.
    Infer {
        /// Class label, clamped for the energy.
        label: u8,
        /// Raw `I16F16` features, little-endian `i32`, `n_0` of them.
        #[serde(borrow)]
        features: &'a [u8],
    },
    /// Requests [`Response::Stats`].
    Stats,
    /// Requests weights `offset .. offset + count`.
    ReadWeights {
        /// Index of the first weight.
        offset: u32,
        /// Number of weights, at most [`WEIGHTS_PER_FRAME`].
        count: u16,
    },
}

/// Number of [`Command`] variants; a postcard discriminant at or above it is an unknown
/// command.
pub const COMMAND_VARIANTS: u8 = 8;

/// Shapes and limits of a board.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// [`PROTOCOL_VERSION`] of the board's firmware.
    pub protocol_version: u16,
    /// Number of valid entries in `widths`.
    pub layers: u8,
    /// Widths `n_0 .. n_L`, compiled into the firmware.
    pub widths: [u16; MAX_WIDTHS],
    /// Number of weights.
    pub weights_len: u32,
}

impl Info {
    /// Widths `n_0 .. n_L`.
    pub fn widths(&self) -> &[u16] {
        &self.widths[..usize::from(self.layers).min(MAX_WIDTHS)]
    }
}

/// Result of [`Command::Train`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Inference steps taken.
    pub steps_taken: u32,
    /// Energy at the feedforward initialisation, raw `I16F16`.
    pub initial_energy: i32,
    /// Energy after inference, raw `I16F16`.
    pub final_energy: i32,
    /// Saturated results during inference, gradients and update.
    pub saturations: u32,
}

/// Result of [`Command::Infer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    /// Arg-max class of the feedforward output.
    pub class: u8,
    /// Energy after inference with the label clamped, raw `I16F16`.
    pub final_energy: i32,
    /// Inference steps taken with the label clamped.
    pub steps_taken: u32,
}

/// Counters since the last [`Command::Configure`] or [`Command::Reset`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Samples trained.
    pub samples_trained: u32,
    /// Samples tested with [`Command::Infer`].
    pub samples_inferred: u32,
    /// Inference steps over every trained sample.
    pub train_steps: u64,
    /// Sum of the final energies of every trained sample, raw `I16F16`.
    pub train_energy_sum: i64,
    /// Saturated results over every command.
    pub saturations: u64,
    /// Clock ticks of the last [`Command::Train`]; the unit is the board's (see its docs), 0
    /// when the board has no clock.
    pub last_train_ticks: u32,
    /// Clock ticks of the last [`Command::Infer`].
    pub last_infer_ticks: u32,
    /// Frames rejected with [`Response::Error`] since the board started.
    pub rejected_frames: u32,
    /// CRC-32/ISO-HDLC of every weight as little-endian raw `I16F16`, in weight order,
    /// computed when the statistics are requested.
    pub weights_crc: u32,
}

/// Reason a command failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ErrorCode {
    /// The frame is not valid COBS or its payload is not a valid command.
    Malformed,
    /// The frame's CRC-32 does not match its payload.
    Checksum,
    /// The frame is longer than [`MAX_FRAME`] bytes.
    FrameTooLong,
    /// The command's discriminant is not a known command.
    UnknownCommand,
    /// The command needs [`Command::Configure`] first.
    NotConfigured,
    /// The settings are invalid for this board's shapes.
    InvalidSettings,
    /// The feature or weight array has the wrong length.
    BadLength,
    /// The label is not below the output width.
    LabelOutOfRange,
    /// The weight range is outside the network's weights.
    WeightRange,
}

/// Responses from the board.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response<'a> {
    /// Response to [`Command::Hello`].
    Info(Info),
    /// The command succeeded; carries the CRC of the weights after it.
    Ack {
        /// As [`Stats::weights_crc`].
        weights_crc: u32,
    },
    /// Response to [`Command::Train`].
    Trained(TrainReport),
    /// Response to [`Command::Infer`].
    Prediction(Prediction),
    /// Response to [`Command::Stats`].
    Stats(Stats),
    /// Response to [`Command::ReadWeights`].
    Weights {
        /// Index of the first weight.
        offset: u32,
        /// Raw weights, little-endian `i32`.
        #[serde(borrow)]
        values: &'a [u8],
    },
    /// The command failed and changed nothing.
    Error(ErrorCode),
}

/// Failure to build a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The message needs more than [`MAX_PAYLOAD`] bytes or the output is too small.
    TooLong,
}

/// Encodes `message` as a frame into `out` (at least [`MAX_FRAME`] bytes for any message) and
/// returns the frame's length, final `0x00` included. `scratch` receives the payload and
/// needs `MAX_PAYLOAD + 4` bytes.
///
/// # Errors
///
/// [`EncodeError::TooLong`] when the message or the frame does not fit.
pub fn encode_frame<T: Serialize>(
    message: &T,
    scratch: &mut [u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let limit = scratch.len().min(MAX_PAYLOAD + CRC_BYTES);
    let scratch = &mut scratch[..limit];
    if scratch.len() < CRC_BYTES {
        return Err(EncodeError::TooLong);
    }
    let payload_room = scratch.len() - CRC_BYTES;
    let payload_len = postcard::to_slice(message, &mut scratch[..payload_room])
        .map_err(|_| EncodeError::TooLong)?
        .len();
    let crc = CRC.checksum(&scratch[..payload_len]);
    scratch[payload_len..payload_len + CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
    let body = &scratch[..payload_len + CRC_BYTES];
    let encoded = cobs::try_encode(body, out).map_err(|_| EncodeError::TooLong)?;
    let end = out.get_mut(encoded).ok_or(EncodeError::TooLong)?;
    *end = 0;
    Ok(encoded + 1)
}

/// Decodes a frame received without its final `0x00`, in place, into a message that may
/// borrow from it.
///
/// `variants` is the number of variants of the message enum, so that an unknown
/// discriminant is reported as [`ErrorCode::UnknownCommand`] rather than
/// [`ErrorCode::Malformed`].
///
/// # Errors
///
/// [`ErrorCode::Malformed`], [`ErrorCode::Checksum`] or [`ErrorCode::UnknownCommand`].
pub fn decode_frame<'a, T: Deserialize<'a>>(
    frame: &'a mut [u8],
    variants: u8,
) -> Result<T, ErrorCode> {
    let len = cobs::decode_in_place(frame).map_err(|_| ErrorCode::Malformed)?;
    if len <= CRC_BYTES {
        return Err(ErrorCode::Malformed);
    }
    let (payload, crc) = frame[..len].split_at(len - CRC_BYTES);
    let mut crc_bytes = [0u8; CRC_BYTES];
    crc_bytes.copy_from_slice(crc);
    if CRC.checksum(payload) != u32::from_le_bytes(crc_bytes) {
        return Err(ErrorCode::Checksum);
    }
    // A discriminant below 128 is one varint byte; anything larger is unknown as well.
    if payload[0] >= variants {
        return Err(ErrorCode::UnknownCommand);
    }
    match postcard::take_from_bytes(payload) {
        Ok((message, [])) => Ok(message),
        _ => Err(ErrorCode::Malformed),
    }
}

/// CRC-32/ISO-HDLC of raw values, as little-endian `i32`, in order.
pub fn values_crc(values: impl IntoIterator<Item = i32>) -> u32 {
    let mut digest = CRC.digest();
    for value in values {
        digest.update(&value.to_le_bytes());
    }
    digest.finalize()
}

/// Splits little-endian `i32` bytes into values; `None` when the length is not a multiple of 4.
pub fn raw_values(bytes: &[u8]) -> Option<impl Iterator<Item = i32> + '_> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|chunk| i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
    )
}

/// Number of [`Response`] variants, for [`decode_frame`] on the host.
pub const RESPONSE_VARIANTS: u8 = 7;

/// Collects bytes from the link into frames.
///
/// Bytes after an overlong frame are dropped up to the next `0x00`, which then yields
/// [`FrameEvent::TooLong`].
pub struct FrameReader<const N: usize> {
    buffer: [u8; N],
    len: usize,
    overflowed: bool,
}

/// Outcome of pushing one byte.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameEvent {
    /// The byte did not end a frame.
    Pending,
    /// A frame of this many bytes (without the final `0x00`) is in [`FrameReader::frame`].
    Frame(usize),
    /// A frame longer than the buffer ended.
    TooLong,
}

impl<const N: usize> Default for FrameReader<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameReader<N> {
    /// Creates an empty reader.
    pub const fn new() -> Self {
        FrameReader {
            buffer: [0; N],
            len: 0,
            overflowed: false,
        }
    }

    /// Adds one byte. After [`FrameEvent::Frame`], read the frame with
    /// [`FrameReader::frame`] before the next push.
    pub fn push(&mut self, byte: u8) -> FrameEvent {
        if byte == 0 {
            let event = if self.overflowed {
                FrameEvent::TooLong
            } else if self.len == 0 {
                // Back-to-back zeros: an empty frame, which a sender uses to resynchronise.
                FrameEvent::Pending
            } else {
                FrameEvent::Frame(self.len)
            };
            self.len = 0;
            self.overflowed = false;
            return event;
        }
        if self.len < N {
            self.buffer[self.len] = byte;
            self.len += 1;
        } else {
            self.overflowed = true;
        }
        FrameEvent::Pending
    }

    /// Returns the bytes of the last completed frame, `len` from [`FrameEvent::Frame`].
    pub fn frame(&mut self, len: usize) -> &mut [u8] {
        &mut self.buffer[..len.min(N)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of<T: Serialize>(message: &T) -> ([u8; MAX_FRAME], usize) {
        let mut scratch = [0u8; MAX_PAYLOAD + 4];
        let mut out = [0u8; MAX_FRAME];
        let len = encode_frame(message, &mut scratch, &mut out).unwrap();
        (out, len)
    }

    #[test]
    fn command_round_trips() {
        let features = [1u8, 0, 0, 0, 0, 0, 1, 0];
        let command = Command::Train {
            label: 3,
            features: &features,
        };
        let (mut frame, len) = frame_of(&command);
        assert_eq!(frame[len - 1], 0);
        assert!(!frame[..len - 1].contains(&0));
        let decoded: Command = decode_frame(&mut frame[..len - 1], COMMAND_VARIANTS).unwrap();
        assert_eq!(decoded, command);
    }

    #[test]
    fn corrupted_byte_fails_checksum() {
        let (mut frame, len) = frame_of(&Command::Reset { seed: 42 });
        frame[2] ^= 0x01;
        let result: Result<Command, _> = decode_frame(&mut frame[..len - 1], COMMAND_VARIANTS);
        assert!(matches!(
            result,
            Err(ErrorCode::Checksum | ErrorCode::Malformed)
        ));
    }

    #[test]
    fn truncated_frame_is_rejected() {
        let (mut frame, len) = frame_of(&Command::ReadWeights {
            offset: 7,
            count: 9,
        });
        let result: Result<Command, _> = decode_frame(&mut frame[..len - 3], COMMAND_VARIANTS);
        assert!(result.is_err());
    }

    #[test]
    fn unknown_discriminant_is_reported() {
        // A well-formed frame whose payload is discriminant 200 (varint 0xC8 0x01).
        let payload = [0xC8u8, 0x01];
        let crc = CRC.checksum(&payload);
        let mut body = [0u8; 6];
        body[..2].copy_from_slice(&payload);
        body[2..].copy_from_slice(&crc.to_le_bytes());
        let mut frame = [0u8; 16];
        let len = cobs::encode(&body, &mut frame);
        let result: Result<Command, _> = decode_frame(&mut frame[..len], COMMAND_VARIANTS);
        assert_eq!(result, Err(ErrorCode::UnknownCommand));
    }

    #[test]
    fn variant_counts_match_enums() {
        let last_command = Command::ReadWeights {
            offset: 0,
            count: 0,
        };
        let (mut frame, len) = frame_of(&last_command);
        let len = cobs::decode_in_place(&mut frame[..len - 1]).unwrap();
        assert_eq!(frame[0] + 1, COMMAND_VARIANTS);
        assert!(len > 0);
        let last_response = Response::Error(ErrorCode::Malformed);
        let (mut frame, len) = frame_of(&last_response);
        cobs::decode_in_place(&mut frame[..len - 1]).unwrap();
        assert_eq!(frame[0] + 1, RESPONSE_VARIANTS);
    }

    #[test]
    fn largest_weight_frame_fits() {
        let values = [0xFFu8; WEIGHTS_PER_FRAME * 4];
        let response = Response::Weights {
            offset: u32::MAX,
            values: &values,
        };
        let (_, len) = frame_of(&response);
        assert!(len <= MAX_FRAME);
    }

    #[test]
    fn reader_drops_overlong_frame() {
        let mut reader = FrameReader::<4>::new();
        for byte in [1, 2, 3, 4, 5, 6] {
            assert_eq!(reader.push(byte), FrameEvent::Pending);
        }
        assert_eq!(reader.push(0), FrameEvent::TooLong);
        assert_eq!(reader.push(9), FrameEvent::Pending);
        assert_eq!(reader.push(0), FrameEvent::Frame(1));
        assert_eq!(reader.frame(1), &[9]);
    }
}
