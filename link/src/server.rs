//! The board side of the link: reads frames, runs commands, writes responses.

use embedded_hal::delay::DelayNs;
use embedded_hal::digital::OutputPin;
use embedded_io::{Read, Write};
use fixedpc::I16F16;

use crate::learner::{Hooks, Learner, Phase};
use crate::protocol::{
    decode_frame, encode_frame, Command, ErrorCode, FrameEvent, FrameReader, Response,
    COMMAND_VARIANTS, MAX_FRAME, MAX_PAYLOAD, WEIGHTS_PER_FRAME,
};

/// Board hooks from embedded-hal parts: a pin that is high while the board infers or updates,
/// a delay for the gap between the two pulses, and a tick counter.
pub struct PinHooks<P, D, C> {
    /// Busy pin, high during inference and during the weight update.
    pub busy: P,
    /// Delay for [`crate::protocol::Settings::pulse_gap_us`].
    pub delay: D,
    /// Free-running, wrapping tick counter in the board's unit.
    pub clock: C,
}

impl<P: OutputPin, D: DelayNs, C: FnMut() -> u32> Hooks for PinHooks<P, D, C> {
    fn phase(&mut self, phase: Phase, pulse_gap_us: u32) {
        // A pin error cannot be reported over the link without breaking the response, and
        // the pin only serves measurement, so learning goes on without it.
        let _ = match phase {
            Phase::InferenceStart | Phase::UpdateStart => self.busy.set_high(),
            Phase::InferenceEnd | Phase::UpdateEnd => self.busy.set_low(),
        };
        if phase == Phase::InferenceEnd && pulse_gap_us > 0 {
            self.delay.delay_us(pulse_gap_us);
        }
    }

    fn ticks(&mut self) -> u32 {
        (self.clock)()
    }
}

/// Buffers of [`serve`]: about 3.1 KiB, static on a board.
pub struct ServerBuffers {
    reader: FrameReader<MAX_FRAME>,
    values: [u8; 4 * WEIGHTS_PER_FRAME],
    payload: [u8; MAX_PAYLOAD + 4],
    frame: [u8; MAX_FRAME],
}

impl ServerBuffers {
    /// Zeroed buffers, usable in a `static`.
    pub const ZEROED: ServerBuffers = ServerBuffers {
        reader: FrameReader::new(),
        values: [0; 4 * WEIGHTS_PER_FRAME],
        payload: [0; MAX_PAYLOAD + 4],
        frame: [0; MAX_FRAME],
    };
}

/// Serves commands on `link` until reading or writing fails, and returns that error.
///
/// `on_response` receives every command (`None` for a frame that did not decode) with its
/// response, for logging.
pub fn serve<L: Read + Write>(
    link: &mut L,
    learner: &mut Learner<'_, I16F16>,
    hooks: &mut impl Hooks,
    buffers: &mut ServerBuffers,
    mut on_response: impl FnMut(Option<&Command<'_>>, &Response<'_>),
) -> L::Error {
    let mut incoming = [0u8; 64];
    loop {
        let count = match link.read(&mut incoming) {
            Ok(count) => count,
            Err(error) => return error,
        };
        for &byte in &incoming[..count] {
            let ServerBuffers {
                reader,
                values,
                payload,
                frame,
            } = buffers;
            let response = match reader.push(byte) {
                FrameEvent::Pending => continue,
                FrameEvent::TooLong => Err(ErrorCode::FrameTooLong),
                FrameEvent::Frame(len) => {
                    decode_frame::<Command>(reader.frame(len), COMMAND_VARIANTS)
                }
            };
            let len = match response {
                Ok(command) => {
                    let response = learner.handle(&command, values, hooks);
                    on_response(Some(&command), &response);
                    encode_frame(&response, payload, frame)
                }
                Err(code) => {
                    learner.count_rejected();
                    let response = Response::Error(code);
                    on_response(None, &response);
                    encode_frame(&response, payload, frame)
                }
            };
            // Every response fits, because the largest is a full Weights frame and the
            // protocol test `largest_weight_frame_fits` checks it. Skipping is the fallback.
            let Ok(len) = len else { continue };
            if let Err(error) = link.write_all(&frame[..len]).and_then(|()| link.flush()) {
                return error;
            }
        }
    }
}
