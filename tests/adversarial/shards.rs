//! Adversarial tests: shards (see main.rs).
