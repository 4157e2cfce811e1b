//! The only source of the protocol's bytes (docs/PROTOCOL.md): the frame codec with fd
//! passing ([`frame`]), the messages frames carry, with the protocol version
//! ([`protocol`]), and the headers of the shared-memory ring ([`ring`]). The daemon, the Rust client, `millrace ctl` and the tests all encode
//! and decode through here, so a change to the wire is made once and both sides move
//! together.

pub mod frame;
pub mod protocol;
pub mod ring;

pub use frame::{kind, MAX_FRAME};
pub use protocol::{decode_hex, to_hex, FieldSpec, Hello, Reason, Refusal, Welcome, VERSION};
