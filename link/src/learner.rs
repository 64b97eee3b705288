//! The learner: one network's weights and buffers, trained one sample at a time.
//!
//! The board and the host's simulation run this same code on the same commands, so a board
//! that learned from a stream of samples ends with the weights the host predicts, bit for bit.

use fixedpc::evaluate::{evaluate_sample, one_hot, SampleResult, TestChecksum};
use fixedpc::network::weights_len;
use fixedpc::{
    Activation, ActivityRounding, Arch, InferenceConfig, Network, Parameterisation, Scalar, Sgd,
    StochasticSgd, Workspace, XorShift32, I16F16,
};

use crate::protocol::{
    raw_values, values_crc, Command, ErrorCode, Info, Prediction, Response, Rounding, Settings,
    Stats, TrainReport, MAX_WIDTHS, PROTOCOL_VERSION, WEIGHTS_PER_FRAME,
};

/// Buffers a learner borrows; lengths as `fixedpc::Workspace::new` describes for one sample,
/// plus `gradients` (one per weight), `input` (`n_0`) and `target` (`n_L`).
pub struct LearnerBuffers<'a, S> {
    /// Weights, layer by layer.
    pub weights: &'a mut [S],
    /// Weight gradients, same layout as the weights: the memory learning adds to inference.
    pub gradients: &'a mut [S],
    /// Scalings `a_1 .. a_L`.
    pub scalings: &'a mut [S],
    /// Activities of one sample.
    pub activities: &'a mut [S],
    /// Errors of one sample.
    pub errors: &'a mut [S],
    /// Scratch of one sample.
    pub scratch: &'a mut [S],
    /// Saturation counters, one per layer.
    pub overflows: &'a mut [u32],
    /// Features of the current sample.
    pub input: &'a mut [S],
    /// One-hot target of the current sample.
    pub target: &'a mut [S],
}

/// Weight optimiser of a learner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimiser<S> {
    /// SGD with round-to-nearest updates.
    Nearest(Sgd<S>),
    /// SGD with stochastically rounded updates.
    Stochastic(StochasticSgd<S>),
}

/// Learning settings in the learner's numeric format.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearnConfig<S> {
    /// Activation of layers `2 ..= L`.
    pub activation: Activation,
    /// Identity skips on hidden-to-hidden layers.
    pub skip: bool,
    /// Inference settings.
    pub inference: InferenceConfig<S>,
    /// Weight optimiser, batch size 1.
    pub optimiser: Optimiser<S>,
    /// Pause between the inference and update busy pulses, in microseconds.
    pub pulse_gap_us: u32,
}

impl<S: Scalar> LearnConfig<S> {
    /// Converts protocol settings, validating them.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::InvalidSettings`] for an unknown activation, a parameterisation other than
    /// SP, or a non-positive learning rate or step size.
    pub fn from_settings(settings: &Settings) -> Result<Self, ErrorCode> {
        let activation =
            Activation::from_code(settings.activation).ok_or(ErrorCode::InvalidSettings)?;
        if Parameterisation::from_code(settings.parameterisation) != Some(Parameterisation::Sp) {
            return Err(ErrorCode::InvalidSettings);
        }
        if settings.learning_rate <= 0 || settings.step_size <= 0 {
            return Err(ErrorCode::InvalidSettings);
        }
        let learning_rate = from_raw::<S>(settings.learning_rate);
        let optimiser = match settings.rounding {
            Rounding::Nearest => Optimiser::Nearest(Sgd { learning_rate }),
            Rounding::Stochastic { seed } => {
                Optimiser::Stochastic(StochasticSgd::new(learning_rate, seed))
            }
        };
        Ok(LearnConfig {
            activation,
            skip: settings.skip,
            inference: InferenceConfig {
                steps: settings.steps,
                step_size: from_raw(settings.step_size),
                tolerance: settings.tolerance.map(from_raw),
                rounding: ActivityRounding::Nearest,
            },
            optimiser,
            pulse_gap_us: settings.pulse_gap_us,
        })
    }
}

/// Converts a raw `I16F16` value to `S` (exact for `I16F16` and `f64`, rounded for `f32`).
pub fn from_raw<S: Scalar>(raw: i32) -> S {
    let mut overflows = 0;
    S::from_f64_rounded(I16F16::from_bits(raw).to_f64(), &mut overflows)
}

/// Stage of a training step, for a busy pin or a clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Feedforward and inference start.
    InferenceStart,
    /// Inference ended.
    InferenceEnd,
    /// Gradients and the weight update start.
    UpdateStart,
    /// The weight update ended.
    UpdateEnd,
}

/// Board hooks around the learner's work.
pub trait Hooks {
    /// Called at each [`Phase`] of training and around [`Command::Infer`] (as inference).
    fn phase(&mut self, phase: Phase, pulse_gap_us: u32) {
        let _ = (phase, pulse_gap_us);
    }

    /// Returns a free-running, wrapping tick counter, or 0 when the board has none.
    fn ticks(&mut self) -> u32 {
        0
    }
}

/// Hooks that do nothing, for the host simulation.
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Draws SP initial weights from `seed`: uniform integers in `+-round(2^16 / sqrt(fan_in))`
/// raw `I16F16` units, from one xorshift32 stream in weight order, integer arithmetic only.
///
/// The host's f32 runs use the same values converted exactly, so every format starts from
/// the same network.
pub fn init_weights<S: Scalar>(widths: &[usize], seed: u32, weights: &mut [S]) {
    let mut rng = XorShift32::new(seed);
    let mut offset = 0;
    for layer in 1..widths.len() {
        let fan_in = widths[layer - 1] as u64;
        // root = sqrt(fan_in) * 2^16, so 2^16 / sqrt(fan_in) = 2^32 / root, rounded to nearest.
        let root = (fan_in << 32).isqrt().max(1);
        let bound = ((1u64 << 32) + root / 2) / root;
        let span = 2 * bound + 1;
        let count = widths[layer] * widths[layer - 1];
        for weight in weights.iter_mut().skip(offset).take(count) {
            let raw = (u64::from(rng.next_u32()) % span) as i64 - bound as i64;
            *weight = from_raw(raw as i32);
        }
        offset += count;
    }
}

/// Result of one training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainOutcome<S> {
    /// Inference of the sample with its label clamped.
    pub stats: fixedpc::InferenceStats<S>,
    /// Saturated results during inference, gradients and update.
    pub saturations: u64,
}

/// A network that learns one sample at a time in borrowed memory.
pub struct Learner<'a, S> {
    widths: &'a [usize],
    buffers: LearnerBuffers<'a, S>,
    config: Option<LearnConfig<S>>,
    stats: Stats,
}

impl<'a, S: Scalar> Learner<'a, S> {
    /// Wraps buffers for a network of `widths`.
    ///
    /// # Errors
    ///
    /// The core's error when the widths are invalid or a buffer has the wrong length.
    pub fn new(
        widths: &'a [usize],
        buffers: LearnerBuffers<'a, S>,
    ) -> Result<Self, fixedpc::Error> {
        let arch = Arch::new(widths, Activation::Linear, false)?;
        let mut learner = Learner {
            widths,
            buffers,
            config: None,
            stats: Stats::default(),
        };
        let depth = arch.depth();
        let check = |buffer, expected, actual| {
            if expected == actual {
                Ok(())
            } else {
                Err(fixedpc::Error::BufferLength {
                    buffer,
                    expected,
                    actual,
                })
            }
        };
        use fixedpc::error::Buffer;
        let buffers = &mut learner.buffers;
        check(Buffer::Weights, arch.weights_len(), buffers.weights.len())?;
        check(
            Buffer::Gradients,
            arch.weights_len(),
            buffers.gradients.len(),
        )?;
        check(Buffer::Scalings, depth, buffers.scalings.len())?;
        check(Buffer::Input, arch.width(0), buffers.input.len())?;
        check(Buffer::Target, arch.width(depth), buffers.target.len())?;
        Workspace::new(
            &arch,
            1,
            buffers.activities,
            buffers.errors,
            buffers.scratch,
            buffers.overflows,
        )?;
        Ok(learner)
    }

    /// Widths `n_0 .. n_L`.
    pub fn widths(&self) -> &'a [usize] {
        self.widths
    }

    /// Current weights.
    pub fn weights(&self) -> &[S] {
        self.buffers.weights
    }

    /// Counters since the last configuration or reset, with the CRC of the current weights.
    pub fn stats(&self) -> Stats {
        Stats {
            weights_crc: self.weights_crc(),
            ..self.stats
        }
    }

    /// Current settings, if configured.
    pub fn config(&self) -> Option<&LearnConfig<S>> {
        self.config.as_ref()
    }

    /// Sets the learning settings and clears the statistics.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::InvalidSettings`] when the shapes reject the activation or skips.
    pub fn configure(&mut self, config: LearnConfig<S>) -> Result<(), ErrorCode> {
        let arch = Arch::new(self.widths, config.activation, config.skip)
            .map_err(|_| ErrorCode::InvalidSettings)?;
        let mut overflows = 0;
        for (layer, scaling) in self.buffers.scalings.iter_mut().enumerate() {
            let value = Parameterisation::Sp.scaling(arch.widths(), config.skip, layer + 1);
            *scaling = S::from_f64_rounded(value, &mut overflows);
        }
        self.config = Some(config);
        self.clear_stats();
        Ok(())
    }

    /// Draws fresh weights with [`init_weights`] and clears the statistics.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::NotConfigured`] before [`Learner::configure`].
    pub fn reset(&mut self, seed: u32) -> Result<(), ErrorCode> {
        if self.config.is_none() {
            return Err(ErrorCode::NotConfigured);
        }
        init_weights(self.widths, seed, self.buffers.weights);
        self.clear_stats();
        Ok(())
    }

    /// Overwrites weights `offset ..` with `values`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::WeightRange`] when the range leaves the weights. Nothing is written then.
    pub fn write_weights(&mut self, offset: usize, values: &[S]) -> Result<(), ErrorCode> {
        let end = offset
            .checked_add(values.len())
            .filter(|&end| end <= self.buffers.weights.len())
            .ok_or(ErrorCode::WeightRange)?;
        self.buffers.weights[offset..end].copy_from_slice(values);
        Ok(())
    }

    /// Features of the next sample, to fill before [`Learner::train`] or [`Learner::infer`].
    pub fn input_mut(&mut self) -> &mut [S] {
        self.buffers.input
    }

    /// Trains on the sample in [`Learner::input_mut`]: feedforward, inference with the output
    /// clamped to `label`, weight gradients and one optimiser step (batch 1).
    ///
    /// # Errors
    ///
    /// [`ErrorCode::NotConfigured`] or [`ErrorCode::LabelOutOfRange`]. The weights are then
    /// unchanged.
    pub fn train(
        &mut self,
        label: usize,
        hooks: &mut impl Hooks,
    ) -> Result<TrainOutcome<S>, ErrorCode> {
        let config = self.config.as_mut().ok_or(ErrorCode::NotConfigured)?;
        let arch = Arch::new(self.widths, config.activation, config.skip)
            .map_err(|_| ErrorCode::InvalidSettings)?;
        let buffers = &mut self.buffers;
        one_hot(label, buffers.target).map_err(|_| ErrorCode::LabelOutOfRange)?;

        hooks.phase(Phase::InferenceStart, config.pulse_gap_us);
        let mut workspace = Workspace::new(
            &arch,
            1,
            buffers.activities,
            buffers.errors,
            buffers.scratch,
            buffers.overflows,
        )
        .map_err(|_| ErrorCode::BadLength)?;
        workspace.reset_overflows();
        let network = Network::new(arch, buffers.weights, buffers.scalings)
            .map_err(|_| ErrorCode::BadLength)?;
        let stats = network
            .infer_supervised(
                &mut workspace,
                0,
                buffers.input,
                buffers.target,
                &config.inference,
            )
            .map_err(|_| ErrorCode::BadLength)?;
        hooks.phase(Phase::InferenceEnd, config.pulse_gap_us);

        hooks.phase(Phase::UpdateStart, config.pulse_gap_us);
        network
            .weight_gradients(&mut workspace, 1, buffers.gradients)
            .map_err(|_| ErrorCode::BadLength)?;
        let mut saturations = workspace.total_overflows();
        let update = match &mut config.optimiser {
            Optimiser::Nearest(sgd) => sgd.step(buffers.weights, buffers.gradients),
            Optimiser::Stochastic(sgd) => sgd.step(buffers.weights, buffers.gradients),
        };
        saturations += u64::from(update.map_err(|_| ErrorCode::BadLength)?);
        hooks.phase(Phase::UpdateEnd, config.pulse_gap_us);

        self.stats.samples_trained = self.stats.samples_trained.wrapping_add(1);
        self.stats.train_steps += u64::from(stats.steps_taken);
        self.stats.train_energy_sum += i64::from(to_raw(stats.final_energy));
        self.stats.saturations += saturations;
        Ok(TrainOutcome { stats, saturations })
    }

    /// Tests the sample in [`Learner::input_mut`] without learning: the feedforward class,
    /// then the energy with the output clamped to `label`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::NotConfigured`] or [`ErrorCode::LabelOutOfRange`].
    pub fn infer(
        &mut self,
        label: usize,
        hooks: &mut impl Hooks,
    ) -> Result<SampleResult<S>, ErrorCode> {
        let config = self.config.as_ref().ok_or(ErrorCode::NotConfigured)?;
        let arch = Arch::new(self.widths, config.activation, config.skip)
            .map_err(|_| ErrorCode::InvalidSettings)?;
        let buffers = &mut self.buffers;
        if label >= buffers.target.len() {
            return Err(ErrorCode::LabelOutOfRange);
        }
        hooks.phase(Phase::InferenceStart, config.pulse_gap_us);
        let mut workspace = Workspace::new(
            &arch,
            1,
            buffers.activities,
            buffers.errors,
            buffers.scratch,
            buffers.overflows,
        )
        .map_err(|_| ErrorCode::BadLength)?;
        workspace.reset_overflows();
        let network = Network::new(arch, buffers.weights, buffers.scalings)
            .map_err(|_| ErrorCode::BadLength)?;
        let mut checksum = TestChecksum::new();
        let result = evaluate_sample(
            &network,
            &mut workspace,
            buffers.input,
            label,
            buffers.target,
            &config.inference,
            &mut checksum,
        )
        .map_err(|_| ErrorCode::BadLength)?;
        hooks.phase(Phase::InferenceEnd, config.pulse_gap_us);
        self.stats.samples_inferred = self.stats.samples_inferred.wrapping_add(1);
        self.stats.saturations += workspace.total_overflows();
        Ok(result)
    }

    fn clear_stats(&mut self) {
        let rejected_frames = self.stats.rejected_frames;
        self.stats = Stats {
            rejected_frames,
            ..Stats::default()
        };
    }

    fn weights_crc(&self) -> u32 {
        values_crc(self.buffers.weights.iter().map(|&w| to_raw(w)))
    }

    /// Counts a frame rejected before it reached [`Learner::handle`].
    pub fn count_rejected(&mut self) {
        self.stats.rejected_frames = self.stats.rejected_frames.wrapping_add(1);
    }
}

/// Returns the raw `I16F16` bits of `value`, rounded to nearest for float formats.
pub fn to_raw<S: Scalar>(value: S) -> i32 {
    let mut overflows = 0;
    I16F16::from_f64_rounded(value.to_f64(), &mut overflows).to_bits()
}

impl Learner<'_, I16F16> {
    /// Runs one command and returns its response. Raw weights for [`Response::Weights`] are
    /// written to `out`, which needs `4 * WEIGHTS_PER_FRAME` bytes.
    ///
    /// A failing command returns [`Response::Error`] and leaves the weights, settings and
    /// counters (except `rejected_frames`) as they were.
    pub fn handle<'b>(
        &mut self,
        command: &Command<'_>,
        out: &'b mut [u8],
        hooks: &mut impl Hooks,
    ) -> Response<'b> {
        match self.dispatch(command, out, hooks) {
            Ok(response) => response,
            Err(code) => {
                self.count_rejected();
                Response::Error(code)
            }
        }
    }

    fn dispatch<'b>(
        &mut self,
        command: &Command<'_>,
        out: &'b mut [u8],
        hooks: &mut impl Hooks,
    ) -> Result<Response<'b>, ErrorCode> {
        match *command {
            Command::Hello => Ok(Response::Info(self.info())),
            Command::Configure(settings) => {
                self.configure(LearnConfig::from_settings(&settings)?)?;
                Ok(self.ack())
            }
            Command::Reset { seed } => {
                self.reset(seed)?;
                Ok(self.ack())
            }
            Command::WriteWeights { offset, values } => {
                let count = values.len() / 4;
                let raw = raw_values(values).ok_or(ErrorCode::BadLength)?;
                if count > WEIGHTS_PER_FRAME {
                    return Err(ErrorCode::BadLength);
                }
                let mut decoded = [I16F16::ZERO; WEIGHTS_PER_FRAME];
                for (slot, value) in decoded.iter_mut().zip(raw) {
                    *slot = I16F16::from_bits(value);
                }
                self.write_weights(offset as usize, &decoded[..count])?;
                Ok(self.ack())
            }
            Command::Train { label, features } => {
                self.load_input(features)?;
                let start = hooks.ticks();
                let outcome = self.train(usize::from(label), hooks)?;
                self.stats.last_train_ticks = hooks.ticks().wrapping_sub(start);
                Ok(Response::Trained(TrainReport {
                    steps_taken: outcome.stats.steps_taken,
                    initial_energy: outcome.stats.initial_energy.to_bits(),
                    final_energy: outcome.stats.final_energy.to_bits(),
                    saturations: outcome.saturations.min(u64::from(u32::MAX)) as u32,
                }))
            }
            Command::Infer { label, features } => {
                self.load_input(features)?;
                let start = hooks.ticks();
                let result = self.infer(usize::from(label), hooks)?;
                self.stats.last_infer_ticks = hooks.ticks().wrapping_sub(start);
                Ok(Response::Prediction(Prediction {
                    class: result.predicted as u8,
                    final_energy: result.final_energy.to_bits(),
                    steps_taken: result.steps_taken,
                }))
            }
            Command::Stats => Ok(Response::Stats(self.stats())),
            Command::ReadWeights { offset, count } => {
                let offset = offset as usize;
                let count = usize::from(count);
                if count > WEIGHTS_PER_FRAME || out.len() < 4 * count {
                    return Err(ErrorCode::BadLength);
                }
                let end = offset
                    .checked_add(count)
                    .filter(|&end| end <= self.buffers.weights.len())
                    .ok_or(ErrorCode::WeightRange)?;
                let values = &mut out[..4 * count];
                for (chunk, weight) in values
                    .chunks_exact_mut(4)
                    .zip(&self.buffers.weights[offset..end])
                {
                    chunk.copy_from_slice(&weight.to_bits().to_le_bytes());
                }
                Ok(Response::Weights {
                    offset: offset as u32,
                    values,
                })
            }
        }
    }

    /// Validates and copies raw features into the input buffer. Nothing changes on error.
    fn load_input(&mut self, features: &[u8]) -> Result<(), ErrorCode> {
        let raw = raw_values(features).ok_or(ErrorCode::BadLength)?;
        if features.len() / 4 != self.buffers.input.len() {
            return Err(ErrorCode::BadLength);
        }
        if self.config.is_none() {
            return Err(ErrorCode::NotConfigured);
        }
        for (slot, value) in self.buffers.input.iter_mut().zip(raw) {
            *slot = I16F16::from_bits(value);
        }
        Ok(())
    }

    fn ack(&self) -> Response<'static> {
        Response::Ack {
            weights_crc: self.weights_crc(),
        }
    }

    /// Shapes and protocol version of this learner.
    ///
    /// NOTE: a network with more than [`MAX_WIDTHS`] widths reports only the first ones, so a
    /// host sees shapes that do not match its data and stops.
    pub fn info(&self) -> Info {
        let mut widths = [0u16; MAX_WIDTHS];
        for (slot, &width) in widths.iter_mut().zip(self.widths) {
            *slot = width.min(usize::from(u16::MAX)) as u16;
        }
        Info {
            protocol_version: PROTOCOL_VERSION,
            layers: self.widths.len().min(MAX_WIDTHS) as u8,
            widths,
            weights_len: weights_len(self.widths) as u32,
        }
    }
}
