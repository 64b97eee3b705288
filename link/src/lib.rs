//! On-device learning for fixedpc: the serial protocol, and the learner that a board and the
//! host's simulation share.
//!
//! A host streams training samples to a board over a serial link in checksummed frames
//! ([`protocol`]). The board runs [`server::serve`], which hands each command to a
//! [`learner::Learner`] over static buffers: feedforward, inference, one local SGD step in
//! `I16F16`. The host runs the same learner on the same commands, so it predicts the
//! board's final weights to the bit.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod learner;
pub mod protocol;
pub mod server;

pub use learner::{init_weights, Hooks, LearnConfig, Learner, LearnerBuffers, NoHooks, Optimiser};
pub use protocol::{Command, ErrorCode, Response, Settings};
