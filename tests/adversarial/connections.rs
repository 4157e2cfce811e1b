//! Adversarial tests: connections (see main.rs).
