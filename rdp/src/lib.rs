//! psm-rdp: RDP decoding shared by the relay and the replay tools.
//!
//! What it does: turns a session's input PDUs into the text that was typed (with the
//! session's keyboard layout), and renders a recorded session's server graphics offline.
//!
//! What it does not do: open sockets, or rewrite PDUs (the relay does that).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod keys;

pub use keys::Keyboard;
pub mod replay;
pub mod synth;

pub use replay::{Renderer, Sampler};
pub mod fuzz;
