//! millrace: a per-node daemon that feeds tokenized pretraining data to GPU trainers.
//!
//! A token travels: [`corpus`] (shards mapped from disk) -> plan (which documents fill
//! each row of each global batch) -> serve (shared-memory rings to trainer ranks).
//! This crate is the library behind the `millrace` binary; `main.rs` only parses flags.

#![deny(missing_docs)]

pub mod bench;
pub mod client;
pub mod config;
pub mod corpus;
pub mod ctl;
pub mod demo;
pub mod eod;
pub mod inspect;
pub mod plan;
pub mod serve;
pub mod synth;
pub mod sys;
pub mod tokenize;
pub mod util;
pub mod wire;
