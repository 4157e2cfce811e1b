//! Adversarial tests: admission (see main.rs).
