//! Inference: the feedforward pass, prediction errors, energy and activity updates.
//!
//! For layer `l` the prediction is `mu_l = a_l W_l phi(z_(l-1)) + s_l z_(l-1)`, with `phi` the
//! identity for `l = 1`. The error is `e_l = z_l - mu_l` and a sample's energy is
//! `E = 1/2 sum_l |e_l|^2`. A free layer's activity gradient is
//! `dE/dz_l = e_l - phi'(z_l) (a_(l+1) W_(l+1)^T e_(l+1)) - s_(l+1) e_(l+1)`,
//! and an inference step is `z_l <- z_l - step * dE/dz_l` for every free layer at once.
//!
//! Samples infer independently, so `step` is per sample. A batch-averaged energy
//! `F = (1/B) sum_b E_b` (JPC's convention) with step `eta` is the same as per-sample step
//! `eta / B`.

use crate::error::{Buffer, Error};
use crate::network::{check_len, Network, Workspace};
use crate::scalar::{NumericFormat, Scalar};

/// Settings of the inference loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InferenceConfig<S> {
    /// Maximum number of steps `T`.
    pub steps: u32,
    /// Per-sample step size of the activity gradient descent.
    pub step_size: S,
    /// Stop early once one step changes the sample's energy by at most this much.
    pub tolerance: Option<S>,
    /// Rounding of each activity update to the format (fixed point only).
    pub rounding: ActivityRounding,
}

/// Rounding of an activity update `step * dE/dz` in fixed point.
///
/// Float formats ignore it and round as their arithmetic does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ActivityRounding {
    /// Round to nearest: an update below half an LSB is lost.
    #[default]
    Nearest,
    /// Round up with probability equal to the dropped fraction, so small updates survive on
    /// average. The random bits are a hash of the activity, its gradient, its layer and unit,
    /// and the step number, so a run is deterministic and the same on every target and for
    /// any split of a batch across threads.
    Stochastic,
}

impl ActivityRounding {
    /// Returns the lower-case name used on command lines (`nearest`, `stochastic`).
    pub const fn name(self) -> &'static str {
        match self {
            ActivityRounding::Nearest => "nearest",
            ActivityRounding::Stochastic => "stochastic",
        }
    }
}

/// Returns 32 random bits for the stochastic rounding of one activity update.
///
/// The inputs are the raw little-endian bytes of the activity and of its gradient, the unit's
/// position in the sample's activities and the step number, mixed by the SplitMix64 finaliser.
fn update_random_bits<S: Scalar>(activity: S, gradient: S, position: usize, step: u32) -> u32 {
    let mut x = raw_bits(activity)
        ^ raw_bits(gradient).rotate_left(32)
        ^ (position as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(step).wrapping_mul(0xd1b5_4a32_d192_ed03);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 32) as u32
}

/// Returns the stored bytes of a value (up to 8) as an integer.
fn raw_bits<S: Scalar>(value: S) -> u64 {
    let mut bytes = [0u8; 8];
    value.write_le(&mut bytes[..S::FORMAT.bytes()]);
    u64::from_le_bytes(bytes)
}

/// Returns whether the feedback `W^T e` of a layer of width `width` runs faster as a matrix
/// product over the transposed copy of the weights, where the rows of `W^T` have `width`
/// values. Both products give the same bits in fixed point, so only the speed depends on this.
///
/// On `thumbv7em` the assembly matrix-product routines take rows of a multiple of 8 values
/// (`I4F12`) or 4 (`I16F16`). Other rows, such as those of a 10-unit output layer, go through
/// per-row loops that take more instructions than the transposed product. With the copy on
/// every layer, full `I4F12` inference of a 64-64-64-10 network took 4.5% more instructions
/// than without it, counted on QEMU `mps2-an386` by the `boards/qemu-m4-bench` plugin. Float
/// formats always take the copy.
fn copy_is_faster<S: Scalar>(width: usize) -> bool {
    match S::FORMAT {
        NumericFormat::I4F12 => width.is_multiple_of(8),
        NumericFormat::I16F16 => width.is_multiple_of(4),
        _ => true,
    }
}

/// Outcome of one sample's inference.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InferenceStats<S> {
    /// Steps taken (at most `steps`).
    pub steps_taken: u32,
    /// Energy at the feedforward initialisation.
    pub initial_energy: S,
    /// Energy after the last step.
    pub final_energy: S,
}

impl<S: Scalar> Network<'_, S> {
    /// Sets `z_0 = input` and every other layer to its prediction, `z_l = mu_l`.
    ///
    /// Returns the prediction of the output layer, `mu_L`.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] or [`Error::BatchSize`] when the workspace or the input does
    /// not fit the network.
    pub fn feedforward<'w>(
        &self,
        workspace: &'w mut Workspace<'_, S>,
        sample: usize,
        input: &[S],
    ) -> Result<&'w [S], Error> {
        workspace.check(&self.arch, sample.saturating_add(1))?;
        check_len(Buffer::Input, self.arch.width(0), input.len())?;
        let per_sample = workspace.activities_per_sample;
        let z = &mut workspace.activities[sample * per_sample..(sample + 1) * per_sample];
        z[..input.len()].copy_from_slice(input);

        for layer in 1..=self.arch.depth() {
            let (before, after) = z.split_at_mut(self.arch.activity_offset(layer));
            let input = &before[self.arch.activity_offset(layer - 1)..];
            let output = &mut after[..self.arch.width(layer)];
            let overflows = &mut workspace.overflows[layer - 1];
            self.predict_layer(layer, input, workspace.scratch, output, overflows);
        }

        let output_offset = self.arch.activity_offset(self.arch.depth());
        Ok(&z[output_offset..])
    }

    /// Runs the feedforward pass, clamps `z_L = target` and runs inference on the hidden
    /// layers (the supervised training setting).
    ///
    /// # Errors
    ///
    /// As [`Network::feedforward`], and [`Error::BufferLength`] for a target of the wrong
    /// width.
    pub fn infer_supervised(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
        input: &[S],
        target: &[S],
        config: &InferenceConfig<S>,
    ) -> Result<InferenceStats<S>, Error> {
        let depth = self.arch.depth();
        check_len(Buffer::Target, self.arch.width(depth), target.len())?;
        self.feedforward(workspace, sample, input)?;
        let offset = sample * workspace.activities_per_sample + self.arch.activity_offset(depth);
        workspace.activities[offset..offset + target.len()].copy_from_slice(target);
        self.infer(workspace, sample, config)
    }

    /// Runs up to `config.steps` inference steps on the free layers `z_1 .. z_(L-1)` of a
    /// sample whose activities are already set, leaving its errors consistent with the final
    /// activities.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] or [`Error::BatchSize`] when the workspace does not fit.
    pub fn infer(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
        config: &InferenceConfig<S>,
    ) -> Result<InferenceStats<S>, Error> {
        let initial_energy = self.compute_errors(workspace, sample)?;
        let mut energy = initial_energy;
        let mut steps_taken = 0;
        let mut spare = 0u32;

        while steps_taken < config.steps {
            // A step changes only layers with a non-zero error next to them, so after a
            // feedforward start the changes spread down from the output one layer per step.
            // Errors below the lowest changed layer keep their values and are not recomputed;
            // in fixed point that gives the same bits as recomputing them.
            let lowest_changed = self.step_free_layers(
                workspace,
                sample,
                config.step_size,
                config.rounding,
                steps_taken,
            )?;
            let next = match lowest_changed {
                Some(layer) => self.errors_from_layer(workspace, sample, layer)?,
                None => energy,
            };
            steps_taken += 1;
            let change = next.saturating_sub(energy, &mut spare);
            energy = next;
            if let Some(tolerance) = config.tolerance {
                let magnitude = if change < S::ZERO {
                    change.saturating_neg()
                } else {
                    change
                };
                if magnitude <= tolerance {
                    break;
                }
            }
        }

        Ok(InferenceStats {
            steps_taken,
            initial_energy,
            final_energy: energy,
        })
    }

    /// Recomputes every error `e_l = z_l - mu_l` of a sample and returns its energy
    /// `1/2 sum_l |e_l|^2`.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] or [`Error::BatchSize`] when the workspace does not fit.
    pub fn compute_errors(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
    ) -> Result<S, Error> {
        self.errors_from_layer(workspace, sample, 1)
    }

    /// Recomputes the errors `e_first ..= e_L` of a sample, keeps the stored errors of the
    /// layers below `first`, and returns the energy of all layers, summed in layer order as
    /// [`Network::compute_errors`] does.
    fn errors_from_layer(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
        first: usize,
    ) -> Result<S, Error> {
        workspace.check(&self.arch, sample.saturating_add(1))?;
        let z_len = workspace.activities_per_sample;
        let e_len = workspace.errors_per_sample;
        let z = &workspace.activities[sample * z_len..(sample + 1) * z_len];
        let e = &mut workspace.errors[sample * e_len..(sample + 1) * e_len];
        let mut energy = S::acc_zero();

        for layer in 1..=self.arch.depth() {
            if layer < first {
                let kept = &e[self.arch.error_offset(layer)..][..self.arch.width(layer)];
                for &difference in kept {
                    energy = S::acc_mul_add(energy, difference, difference);
                }
                continue;
            }
            let input = &z[self.arch.activity_offset(layer - 1)..];
            let activity = &z[self.arch.activity_offset(layer)..];
            let error = &mut e[self.arch.error_offset(layer)..];
            let error = &mut error[..self.arch.width(layer)];
            let overflows = &mut workspace.overflows[layer - 1];
            // The prediction goes into the error slice first, then becomes z - mu in place.
            self.predict_layer(layer, input, workspace.scratch, error, overflows);
            for (value, &z) in error.iter_mut().zip(activity) {
                let difference = z.saturating_sub(*value, overflows);
                *value = difference;
                energy = S::acc_mul_add(energy, difference, difference);
            }
        }

        let half = S::ONE.div_int(2);
        Ok(S::acc_scale_round(
            energy,
            half,
            &mut workspace.overflows[0],
        ))
    }

    /// Takes one gradient step on every free layer of a sample, using the errors left by the
    /// last [`Network::compute_errors`], rounding each update to nearest.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] or [`Error::BatchSize`] when the workspace does not fit.
    pub fn inference_step(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
        step_size: S,
    ) -> Result<(), Error> {
        self.step_free_layers(workspace, sample, step_size, ActivityRounding::Nearest, 0)
            .map(|_| ())
    }

    /// Takes one inference step and returns the lowest layer whose activities changed.
    ///
    /// A layer whose own error and the next layer's error are all zero has a zero gradient,
    /// so it is skipped. In fixed point that gives the same bits as the full step. In floating
    /// point it may differ in the sign of a zero, and with non-finite weights, where the full
    /// step would turn `inf * 0` into NaN.
    fn step_free_layers(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
        step_size: S,
        rounding: ActivityRounding,
        step: u32,
    ) -> Result<Option<usize>, Error> {
        workspace.check(&self.arch, sample.saturating_add(1))?;
        let mut lowest_changed = None;
        for layer in 1..self.arch.depth() {
            if self.errors_are_zero(workspace, sample, layer) {
                continue;
            }
            let width = self.arch.width(layer);
            self.activity_gradient_into(workspace, sample, layer)?;
            let z_offset =
                sample * workspace.activities_per_sample + self.arch.activity_offset(layer);
            let z = &mut workspace.activities[z_offset..z_offset + width];
            let overflows = &mut workspace.overflows[layer - 1];
            let stochastic = rounding == ActivityRounding::Stochastic && S::FORMAT.is_fixed_point();
            let position = self.arch.activity_offset(layer);
            let mut changed = false;
            for (j, (activity, &gradient)) in z
                .iter_mut()
                .zip(workspace.scratch[..width].iter())
                .enumerate()
            {
                let change = if stochastic {
                    let random = update_random_bits(*activity, gradient, position + j, step);
                    step_size.saturating_mul_stochastic(gradient, random, overflows)
                } else {
                    step_size.saturating_mul(gradient, overflows)
                };
                let updated = activity.saturating_sub(change, overflows);
                changed |= updated != *activity;
                *activity = updated;
            }
            if changed && lowest_changed.is_none() {
                lowest_changed = Some(layer);
            }
        }
        Ok(lowest_changed)
    }

    /// Returns whether `e_layer` and `e_(layer+1)` of a sample are all zero.
    fn errors_are_zero(&self, workspace: &Workspace<'_, S>, sample: usize, layer: usize) -> bool {
        let e_len = workspace.errors_per_sample;
        let start = sample * e_len + self.arch.error_offset(layer);
        let len = self.arch.width(layer) + self.arch.width(layer + 1);
        workspace.errors[start..start + len]
            .iter()
            .all(|&error| error == S::ZERO)
    }

    /// Writes `dE/dz_layer` of a sample (a free layer, `1 <= layer < L`) into the first
    /// `n_layer` values of the workspace scratch and returns them.
    ///
    /// # Errors
    ///
    /// [`Error::BufferLength`] or [`Error::BatchSize`] when the workspace does not fit.
    pub fn activity_gradient<'w>(
        &self,
        workspace: &'w mut Workspace<'_, S>,
        sample: usize,
        layer: usize,
    ) -> Result<&'w [S], Error> {
        workspace.check(&self.arch, sample.saturating_add(1))?;
        self.activity_gradient_into(workspace, sample, layer)?;
        Ok(&workspace.scratch[..self.arch.width(layer)])
    }

    fn activity_gradient_into(
        &self,
        workspace: &mut Workspace<'_, S>,
        sample: usize,
        layer: usize,
    ) -> Result<(), Error> {
        let depth = self.arch.depth();
        if layer == 0 || layer >= depth {
            return Err(Error::NotFreeLayer { layer, depth });
        }
        let width = self.arch.width(layer);
        let next_width = self.arch.width(layer + 1);
        let z_len = workspace.activities_per_sample;
        let e_len = workspace.errors_per_sample;
        let z = &workspace.activities[sample * z_len + self.arch.activity_offset(layer)..];
        let e = &workspace.errors[sample * e_len..(sample + 1) * e_len];
        let own_error = &e[self.arch.error_offset(layer)..];
        let next_error = &e[self.arch.error_offset(layer + 1)..][..next_width];
        let skip = self.arch.has_skip(layer + 1);
        let overflows = &mut workspace.overflows[layer - 1];
        let activation = self.arch.activation();

        // Feedback a_(l+1) W_(l+1)^T e_(l+1), rounded once per value, then the gradient in place.
        let gradients = &mut workspace.scratch[..width];
        let scale = self.scaling(layer + 1);
        let copy = self
            .transposed_layer_weights(layer + 1)
            .filter(|_| copy_is_faster::<S>(next_width));
        match copy {
            Some(transposed) => {
                S::matrix_product(transposed, next_error, scale, gradients, overflows)
            }
            None => S::transposed_product(
                self.layer_weights(layer + 1),
                next_error,
                scale,
                gradients,
                overflows,
            ),
        }
        for (j, gradient) in gradients.iter_mut().enumerate() {
            let feedback = *gradient;
            let slope = S::activate_derivative(activation, z[j]);
            let mut sum = S::acc_add(S::acc_zero(), own_error[j]);
            sum = S::acc_mul_add(sum, slope.saturating_neg(), feedback);
            if skip {
                sum = S::acc_sub(sum, next_error[j]);
            }
            *gradient = S::acc_round(sum, overflows);
        }
        Ok(())
    }

    /// Writes `mu_layer`, computed from `z_(layer-1)` (the start of `input`), into `out`, which
    /// has `n_layer` values; `scratch` receives `phi(z_(layer-1))`.
    fn predict_layer(
        &self,
        layer: usize,
        input: &[S],
        scratch: &mut [S],
        out: &mut [S],
        overflows: &mut u32,
    ) {
        let input_width = self.arch.width(layer - 1);
        let input = &input[..input_width];
        let activated = &mut scratch[..input_width];
        if layer == 1 {
            activated.copy_from_slice(input);
        } else {
            let activation = self.arch.activation();
            for (out, &x) in activated.iter_mut().zip(input) {
                *out = S::activate(activation, x);
            }
        }

        let weights = self.layer_weights(layer);
        S::matrix_product(weights, activated, self.scaling(layer), out, overflows);
        if self.arch.has_skip(layer) {
            for (mu, &x) in out.iter_mut().zip(input) {
                *mu = mu.saturating_add(x, overflows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixed::types::I16F16;

    /// The 16 bits that round an `I16F16` product are close to uniform over nearby states, so
    /// an update rounds up with the probability of its dropped fraction.
    #[test]
    fn update_bits_are_uniform_over_the_dropped_fraction() {
        const SAMPLES: u32 = 1 << 16;
        const BUCKETS: usize = 16;
        let mut counts = [0u32; BUCKETS];
        let mut sum = 0u64;
        for n in 0..SAMPLES {
            // Neighbouring activities, gradients, units and steps, as in one inference.
            let activity = I16F16::from_bits(1000 + (n % 7) as i32);
            let gradient = I16F16::from_bits(-300 + (n / 7 % 11) as i32);
            let position = (n / 77 % 64) as usize;
            let step = n / (77 * 64);
            let bits = update_random_bits(activity, gradient, position, step) & 0xffff;
            sum += u64::from(bits);
            counts[(bits >> 12) as usize] += 1;
        }
        let mean = sum as f64 / f64::from(SAMPLES);
        assert!((mean / 32767.5 - 1.0).abs() < 0.01, "mean {mean}");
        let expected = f64::from(SAMPLES) / BUCKETS as f64;
        for (bucket, &count) in counts.iter().enumerate() {
            let ratio = f64::from(count) / expected;
            assert!((ratio - 1.0).abs() < 0.05, "bucket {bucket}: {count}");
        }
    }
}
