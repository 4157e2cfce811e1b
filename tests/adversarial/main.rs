//! The adversarial suite (issue 14): a real `millrace serve` on real unix sockets, fed
//! hostile input by one module per attack surface, while a well-behaved consumer checks
//! that the daemon keeps serving it. Each module owns one surface:
//!
//! - `admission`: bounded HELLOs, the replicas intrusion, the ring-memory budget,
//!   names and live-change bounds;
//! - `shards`: a shard truncated or overwritten under a live daemon, token ids out of
//!   range;
//! - `connections`: control-connection floods, refused peers, fd limits, the socket
//!   path, fair filling of free-running rings;
//! - `pressure`: a cache directory that cannot take the daemon's writes, a daemon that
//!   can start no more threads.

#[path = "../common/mod.rs"]
mod common;

mod admission;
mod connections;
mod pressure;
mod shards;
