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

/// An RDP leg: the connection on its worker's back end, cut when its peer stops taking bytes.
pub type RdpLeg = crate::cut::Cuttable<crate::uring::Leg>;

/// How long a write to an RDP peer may wait on a peer that takes nothing before its leg is cut
/// (the time psm gives an SSH client, whose keepalives would have noticed by then).
const RDP_WRITE_STALL: std::time::Duration = crate::USER_WRITE_STALL;

/// `tcp` as an RDP leg: on the worker's back end, with TCP keepalives (RDP has none of its
/// own that psm sees, so a peer that vanished while the screen was still is noticed), and
/// watched for writes its peer never takes ([`crate::cut::Cutter::watch_writes`]):
/// either would otherwise hold the session, its user's slot and its recording for good.
pub(crate) fn leg(tcp: crate::uring::Incoming) -> std::io::Result<RdpLeg> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6);
    let sock = socket2::SockRef::from(&tcp);
    let _ = sock.set_tcp_keepalive(&keepalive);
    // keepalives do not run while sent bytes wait for their acknowledgement: a peer that
    // vanished with bytes in flight is given up after this, not after the kernel's 15 minutes
    let _ = sock.set_tcp_user_timeout(Some(RDP_WRITE_STALL));
    let (mut leg, cutter) = crate::cut::Cuttable::socket(crate::uring::Leg::accepted(tcp)?);
    let progress = leg.progress();
    leg.get_mut().report_progress(progress);
    cutter.watch_writes(RDP_WRITE_STALL);
    Ok(leg)
}
