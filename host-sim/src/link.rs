//! The host end of the `fixedpc-link` serial protocol, over a TCP socket (QEMU's emulated
//! UART) or a serial port (a real board).

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fixedpc_link::protocol::{
    decode_frame, encode_frame, Command, ErrorCode, Response, MAX_FRAME, MAX_PAYLOAD,
    RESPONSE_VARIANTS,
};

/// A byte stream to a board.
pub trait Port: Read + Write + Send {}

impl<T: Read + Write + Send> Port for T {}

/// A request-response connection to a board.
pub struct Link {
    port: Box<dyn Port>,
    /// Name of the link's far end, for error messages (`tcp 127.0.0.1:PORT`, `/dev/ttyACM0`).
    name: String,
    timeout: Duration,
    received: Vec<u8>,
    frame: Vec<u8>,
}

/// Names a command for messages.
pub fn command_name(command: &Command<'_>) -> &'static str {
    match command {
        Command::Hello => "Hello",
        Command::Configure(_) => "Configure",
        Command::Reset { .. } => "Reset",
        Command::WriteWeights { .. } => "WriteWeights",
        Command::Train { .. } => "Train",
        Command::Infer { .. } => "Infer",
        Command::Stats => "Stats",
        Command::ReadWeights { .. } => "ReadWeights",
    }
}

impl Link {
    /// Wraps a port. Its reads must time out on their own, well within `timeout`, because
    /// `request` checks its deadline only between reads.
    pub fn new(port: Box<dyn Port>, name: String, timeout: Duration) -> Self {
        Link {
            port,
            name,
            timeout,
            received: Vec::new(),
            frame: Vec::new(),
        }
    }

    /// Sends one command, waits for its response and hands it to `read`.
    ///
    /// # Errors
    ///
    /// When the board sends no response within the timeout, closes the link, sends a frame
    /// that fails its CRC, or responds with [`Response::Error`].
    pub fn request<R>(
        &mut self,
        command: &Command<'_>,
        read: impl FnOnce(Response<'_>) -> Result<R>,
    ) -> Result<R> {
        let name = command_name(command);
        let mut scratch = vec![0u8; MAX_PAYLOAD + 4];
        let mut out = vec![0u8; MAX_FRAME];
        let len = encode_frame(command, &mut scratch, &mut out)
            .map_err(|_| anyhow!("the {name} command is larger than {MAX_PAYLOAD} bytes"))?;
        self.port
            .write_all(&out[..len])
            .and_then(|()| self.port.flush())
            .with_context(|| format!("sending {name} to the board on {} failed", self.name))?;
        self.receive_frame(name)?;
        let response = match decode_frame::<Response>(&mut self.frame, RESPONSE_VARIANTS) {
            Ok(response) => response,
            Err(ErrorCode::Checksum) => bail!(
                "the board's answer to {name} failed its CRC-32 check: the link on {} \
                 corrupts data; check the wiring and the baud rate",
                self.name
            ),
            Err(code) => bail!(
                "the board's answer to {name} on {} is not a valid frame ({code:?}); is the \
                 fixedpc learning firmware running on it?",
                self.name
            ),
        };
        if let Response::Error(code) = response {
            bail!("the board rejected {name}: {code:?}");
        }
        read(response)
    }

    /// Reads bytes until a complete frame is in `self.frame`.
    fn receive_frame(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.received.iter().position(|&byte| byte == 0) {
                self.frame = self.received.drain(..=end).collect();
                self.frame.pop();
                if self.frame.is_empty() {
                    continue;
                }
                return Ok(());
            }
            if self.received.len() > MAX_FRAME {
                bail!(
                    "the board sent more than {MAX_FRAME} bytes without a frame end in answer \
                     to {name}; is the fixedpc learning firmware running on {}?",
                    self.name
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out: the board on {} did not answer {name} within {} s; check that \
                     it runs the fixedpc learning firmware, or raise --timeout",
                    self.name,
                    self.timeout.as_secs_f64()
                );
            }
            match self.port.read(&mut chunk) {
                Ok(0) => bail!(
                    "the board on {} closed the link while the host waited for the answer to \
                     {name}; it stopped or crashed (see its log)",
                    self.name
                ),
                Ok(count) => self.received.extend_from_slice(&chunk[..count]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "reading the answer to {name} from {} failed; the board may have \
                             stopped or been unplugged",
                            self.name
                        )
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use fixedpc_link::protocol::Info;

    use super::*;

    /// A port that returns the bytes of `reply` once, then times out or reports end of file.
    struct ScriptedPort {
        reply: Vec<u8>,
        closed: bool,
    }

    impl Read for ScriptedPort {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.reply.is_empty() {
                if self.closed {
                    return Ok(0);
                }
                return Err(io::Error::new(ErrorKind::TimedOut, "no data"));
            }
            let count = buf.len().min(self.reply.len());
            buf[..count].copy_from_slice(&self.reply[..count]);
            self.reply.drain(..count);
            Ok(count)
        }
    }

    impl Write for ScriptedPort {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn link(reply: Vec<u8>, closed: bool) -> Link {
        let port = ScriptedPort { reply, closed };
        Link::new(
            Box::new(port),
            "test port".into(),
            Duration::from_millis(50),
        )
    }

    fn frame(response: &Response<'_>) -> Vec<u8> {
        let mut scratch = vec![0u8; MAX_PAYLOAD + 4];
        let mut out = vec![0u8; MAX_FRAME];
        let len = encode_frame(response, &mut scratch, &mut out).unwrap();
        out.truncate(len);
        out
    }

    fn hello(link: &mut Link) -> Result<Info> {
        link.request(&Command::Hello, |response| match response {
            Response::Info(info) => Ok(info),
            other => bail!("unexpected {other:?}"),
        })
    }

    #[test]
    fn request_returns_board_answer() {
        let info = Info {
            protocol_version: 1,
            layers: 2,
            widths: [3, 2, 0, 0, 0, 0, 0, 0],
            weights_len: 6,
        };
        let mut link = link(frame(&Response::Info(info)), false);
        assert_eq!(hello(&mut link).unwrap(), info);
    }

    #[test]
    fn silent_board_times_out() {
        let mut link = link(Vec::new(), false);
        let error = hello(&mut link).unwrap_err().to_string();
        assert!(error.contains("timed out"), "{error}");
        assert!(error.contains("Hello"), "{error}");
    }

    #[test]
    fn closed_link_is_reported() {
        let mut link = link(Vec::new(), true);
        let error = hello(&mut link).unwrap_err().to_string();
        assert!(error.contains("closed the link"), "{error}");
    }

    #[test]
    fn corrupted_answer_fails_crc() {
        let mut reply = frame(&Response::Ack {
            weights_crc: 0x1234_5678,
        });
        // Flip a bit of the CRC's last byte, leaving the COBS structure intact.
        let last = reply.len() - 2;
        reply[last] ^= 0x01;
        let mut link = link(reply, false);
        let error = hello(&mut link).unwrap_err().to_string();
        assert!(error.contains("CRC-32"), "{error}");
    }

    #[test]
    fn error_reply_names_command_and_code() {
        let reply = frame(&Response::Error(ErrorCode::NotConfigured));
        let mut link = link(reply, false);
        let error = hello(&mut link).unwrap_err().to_string();
        assert!(error.contains("rejected Hello"), "{error}");
        assert!(error.contains("NotConfigured"), "{error}");
    }
}
