//! Predictive coding networks that infer and learn in fixed point on microcontrollers.
//!
//! A predictive coding network infers by letting its activities settle: each layer predicts
//! the next, and the activities take gradient steps on the energy (half the sum of squared
//! prediction errors). Weights then learn from the errors of their own layer only.
//!
//! The core is generic over [`Scalar`] (`f32`, `f64`, `fixed::types::I16F16` and the 16-bit
//! `fixed::types::I4F12`), never allocates and never panics on data: every buffer is borrowed
//! from the caller and sized by the `const fn`s in [`network`], so firmware can declare them
//! `static`.
//!
//! The steps, in order: wrap shapes in an [`Arch`], weights in a [`Network`] and state in a
//! [`Workspace`]; call [`Network::infer_supervised`] per sample, then
//! [`Network::weight_gradients`] and an optimiser ([`Sgd`], [`Adam`]). At test time the
//! prediction is [`Network::feedforward`].
//!
//! ```
//! use fixedpc::network::{activities_len, errors_len, scratch_len, weights_len};
//! use fixedpc::{ActivityRounding, Activation, Arch, InferenceConfig, Network, Sgd, Workspace, I16F16};
//!
//! const WIDTHS: [usize; 3] = [2, 3, 1];
//! let arch = Arch::new(&WIDTHS, Activation::Tanh, false)?;
//!
//! // Every buffer has a size known at compile time.
//! let mut weights = [I16F16::from_num(0.25); weights_len(&WIDTHS)];
//! let scalings = [I16F16::ONE; 2];
//! let mut gradients = [I16F16::ZERO; weights_len(&WIDTHS)];
//! let mut activities = [I16F16::ZERO; activities_len(&WIDTHS)];
//! let mut errors = [I16F16::ZERO; errors_len(&WIDTHS)];
//! let mut scratch = [I16F16::ZERO; scratch_len(&WIDTHS, 1)];
//! let mut overflows = [0u32; 2];
//! let mut workspace =
//!     Workspace::new(&arch, 1, &mut activities, &mut errors, &mut scratch, &mut overflows)?;
//!
//! let input = [I16F16::from_num(0.5), I16F16::from_num(-1)];
//! let target = [I16F16::from_num(0.75)];
//! let config = InferenceConfig {
//!     steps: 20,
//!     step_size: I16F16::from_num(0.1),
//!     tolerance: None,
//!     rounding: ActivityRounding::Nearest,
//! };
//!
//! let network = Network::new(arch, &weights, &scalings)?;
//! let stats = network.infer_supervised(&mut workspace, 0, &input, &target, &config)?;
//! assert!(stats.final_energy <= stats.initial_energy);
//! network.weight_gradients(&mut workspace, 1, &mut gradients)?;
//!
//! let sgd = Sgd { learning_rate: I16F16::from_num(0.1) };
//! let saturated = sgd.step(&mut weights, &gradients)?;
//! assert_eq!(saturated, 0);
//! # Ok::<(), fixedpc::Error>(())
//! ```
#![no_std]
// `unsafe` is denied everywhere except the inline-assembly kernels in `kernels`, which allow it
// explicitly; `forbid` would not let that one module opt in.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod activation;
pub mod error;
pub mod evaluate;
mod i4f12;
pub mod infer;
pub mod kernels;
pub mod learn;
pub mod model;
pub mod network;
pub mod scalar;
mod tanh_table;

pub use activation::Activation;
pub use error::Error;
pub use fixed::types::{I16F16, I4F12};
pub use infer::{ActivityRounding, InferenceConfig, InferenceStats};
pub use learn::{Adam, Sgd, StochasticSgd, XorShift32};
pub use model::Model;
pub use network::{transpose_weights, Arch, Network, Parameterisation, Workspace};
pub use scalar::{NumericFormat, Scalar};
