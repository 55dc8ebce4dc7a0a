//! RDP through psm (issue #8): framing and the sans-IO relay engine; the io side (listener, TLS,
//! CredSSP, sockets) comes beside them.

pub mod engine;
pub mod frame;
