//! Host side of fixedpc: data loading, training, evaluation, model export and board runs.
//!
//! The `pcsim` binary is a thin command line over these modules.

pub mod adam_f32;
pub mod batched;
pub mod bench;
mod bench_page;
pub mod board;
pub mod board_bench;
pub mod board_run;
pub mod bounds;
pub mod check;
pub mod cli;
pub mod data;
pub mod demo;
pub mod export;
pub mod golden;
pub mod learn;
pub mod link;
pub mod mnist;
pub mod plot;
pub mod reference;
pub mod sweep;
pub mod train;
