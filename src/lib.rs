//! millrace: a per-node daemon that feeds tokenized pretraining data to GPU trainers.
//!
//! A token travels: [`corpus`] (shards mapped from disk) -> plan (which documents fill
//! each row of each global batch) -> serve (shared-memory rings to trainer ranks).
//! This crate is the library behind the `millrace` binary, whose commands (src/cli) are
//! thin layers over it; nothing here is command-only.

#![deny(missing_docs)]

pub mod client;
pub mod config;
pub mod control;
pub mod corpus;
pub mod eod;
pub mod plan;
pub mod plan_cache;
pub mod serve;
pub mod synth;
pub mod sys;
pub mod tokenize;
pub mod util;
pub mod wire;
