//! Predictive coding networks that infer and learn in fixed point on microcontrollers.
//!
//! A predictive coding network infers by letting its activities settle: each layer predicts
//! the next, and the activities take gradient steps on the energy (half the sum of squared
//! prediction errors). Weights then learn from the errors of their own layer only.
//!
//! The core is generic over [`Scalar`] (`f32`, `f64` and `fixed::types::I16F16`), never
//! allocates and never panics on data: every buffer is borrowed from the caller and sized by
//! the `const fn`s in [`network`], so firmware can declare them `static`.
//!
//! The steps, in order: wrap shapes in an [`Arch`], weights in a [`Network`] and state in a
//! [`Workspace`]; call [`Network::infer_supervised`] per sample, then
//! [`Network::weight_gradients`] and an optimiser ([`Sgd`], [`Adam`]). At test time the
//! prediction is [`Network::feedforward`].
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod activation;
pub mod error;
pub mod evaluate;
pub mod infer;
pub mod learn;
pub mod model;
pub mod network;
pub mod scalar;
mod tanh_table;

pub use activation::Activation;
pub use error::Error;
pub use fixed::types::I16F16;
pub use infer::{InferenceConfig, InferenceStats};
pub use learn::{Adam, Sgd};
pub use model::Model;
pub use network::{Arch, Network, Parameterisation, Workspace};
pub use scalar::{NumericFormat, Scalar};
