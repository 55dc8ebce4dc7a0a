//! What a user's channel asks of the target leg: what it opens ([`Open`]), what a forwarded
//! channel carries ([`ForwardKind`]), and the channel requests psm forwards and waits on
//! ([`Req`]).

use psm_control_api::ChannelKind;
use russh::{Channel, Pty};

use crate::upstream::TargetHandle;

/// What the target leg of a new user channel opens.
pub(crate) enum Open {
    /// A session channel (shell, exec, subsystem follow).
    Session,
    /// A local forward (`direct-tcpip`).
    DirectTcpip {
        host: String,
        port: u32,
        orig_addr: String,
        orig_port: u32,
    },
    /// A remote forward (`tcpip-forward`, `ssh -R`): the target listens for psm.
    RemoteForward { address: String, port: u32 },
}

/// What a forwarded channel carries, for its `forward` audit event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ForwardKind {
    /// `ssh -L` / `-W`: from the user toward a destination the target reaches.
    Local,
    /// `ssh -R`: from a port the target listens on toward the user's side.
    Remote,
    /// `ssh -A`: a program on the target asking the user's agent.
    Agent,
}

impl ForwardKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ForwardKind::Local => "local",
            ForwardKind::Remote => "remote",
            ForwardKind::Agent => "agent",
        }
    }
}

/// A channel request forwarded to the target, answered before the relay goes on.
pub(super) enum Req {
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: Vec<(Pty, u32)>,
    },
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
    /// `auth-agent-req@openssh.com`.
    Agent,
}

impl Req {
    /// The channel kind a start request opens (None: a subsystem psm does not know).
    pub(super) fn kind(&self) -> Option<ChannelKind> {
        match self {
            Req::Pty { .. } | Req::Shell => Some(ChannelKind::Shell),
            Req::Exec(cmd) => Some(ChannelKind::of_exec(&String::from_utf8_lossy(cmd))),
            Req::Subsystem(name) if name == "sftp" => Some(ChannelKind::Sftp),
            Req::Subsystem(_) => None,
            Req::Agent => Some(ChannelKind::Agent),
        }
    }

    /// The request's name and its command line / subsystem name, for the audit log.
    pub(super) fn describe(&self) -> (&'static str, String) {
        match self {
            Req::Pty { .. } => ("pty-req", String::new()),
            Req::Shell => ("shell", String::new()),
            Req::Exec(cmd) => ("exec", String::from_utf8_lossy(cmd).into_owned()),
            Req::Subsystem(name) => ("subsystem", name.clone()),
            Req::Agent => ("auth-agent-req@openssh.com", String::new()),
        }
    }

    pub(super) async fn send(self, up: &Channel<russh::client::Msg>) -> Result<(), russh::Error> {
        match self {
            Req::Pty {
                term,
                cols,
                rows,
                pix_width,
                pix_height,
                modes,
            } => {
                up.request_pty(true, &term, cols, rows, pix_width, pix_height, &modes)
                    .await
            }
            Req::Shell => up.request_shell(true).await,
            Req::Exec(cmd) => up.exec(true, cmd).await,
            Req::Subsystem(name) => up.request_subsystem(true, name).await,
            Req::Agent => up.agent_forward(true).await,
        }
    }
}

pub(super) async fn disconnect_target(t: &TargetHandle) {
    t.close().await;
}
