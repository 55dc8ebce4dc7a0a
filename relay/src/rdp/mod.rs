//! RDP through psm (issue #8).
//!
//! Toward the user psm is an RDP server that requires NLA: it answers the X.224 negotiation
//! itself ([`accept`]), terminates TLS with its own certificate ([`tls`]) and runs the CredSSP
//! server ([`credssp`]), where NTLM checks the psm user's NT hash and the NTLM user name carries
//! the PSMP login `user@account@target` (a TOTP code, when the grant wants one, in the domain).
//! The access decision, the recording and the target login ([`target`]: X.224, TLS pinned to
//! the target's certificate, CredSSP with the vaulted credential when the target wants NLA)
//! all happen before the client gets its last CredSSP answer, so every refusal is a logon
//! failure on the client. After that, every frame goes through the sans-IO [`engine`]
//! (channel rules, Client Info rewrite, recording, typed text), framed by [`frame`]; the
//! session's life (governor, kill, recorder, shutdown) is in [`session`].

pub mod accept;
mod admit;
pub mod credssp;
pub mod engine;
pub mod frame;
mod live;
pub mod session;
pub mod target;
pub mod tls;
pub mod wire;

pub use session::handle_rdp_connection;
