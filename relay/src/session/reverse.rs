//! Channels psm opens toward the user because the target opened them toward psm: connections
//! to a remote forward (`ssh -R`, `forwarded-tcpip`) and requests to the user's forwarded agent
//! (`ssh -A`, `auth-agent@openssh.com`).
//!
//! A target may open such a channel only over a connection where psm asked for it: the one
//! that holds the remote forward (and only for the address and port psm requested there), or a
//! session channel's connection whose agent request the target accepted ([`crate::upstream::Route`],
//! checked by the target connection's handler as the open arrives). Everything else is refused
//! as before ("unrequested channel"). Each open is decided again under the grant that
//! covers the session at that instant (`forward-remote`, `agent`), relayed by the same `pipe`
//! tasks as any channel, recorded, and audited as one `forward` event (kind `remote` or `agent`)
//! with its bytes each way.

use super::*;
use crate::upstream::Reverse;

/// Channels psm may have open toward the user at once on one connection.
pub const MAX_REVERSE_CHANNELS: usize = 32;
/// Remote forwards one connection may hold (each is a target connection).
pub const MAX_REMOTE_FORWARDS: usize = MAX_CHANNELS;

/// Where a reverse channel leads, for the open toward the user and the audit.
enum Toward {
    Agent,
    Forwarded {
        connected_address: String,
        connected_port: u32,
        originator_address: String,
        originator_port: u32,
    },
}

impl Toward {
    fn kind(&self) -> ChannelKind {
        match self {
            Toward::Agent => ChannelKind::Agent,
            Toward::Forwarded { .. } => ChannelKind::ForwardRemote,
        }
    }

    /// The channel type's wire name.
    fn wire(&self) -> &'static str {
        match self {
            Toward::Agent => "auth-agent",
            Toward::Forwarded { .. } => "forwarded-tcpip",
        }
    }

    /// The audit `destination`.
    fn destination(&self) -> String {
        match self {
            Toward::Agent => "auth-agent@openssh.com".into(),
            Toward::Forwarded {
                connected_address,
                connected_port,
                originator_address,
                originator_port,
            } => crate::escape_short(&format!(
                "{connected_address}:{connected_port} from {originator_address}:{originator_port}"
            )),
        }
    }

    fn forward_kind(&self) -> ForwardKind {
        match self {
            Toward::Agent => ForwardKind::Agent,
            Toward::Forwarded { .. } => ForwardKind::Remote,
        }
    }
}

/// Serves the reverse opens of one target connection until it closes.
pub(super) fn spawn_router(
    shared: Arc<Shared>,
    handle: russh::server::Handle,
    mut rx: mpsc::Receiver<Reverse>,
    loss: LossWatch,
) {
    tokio::spawn(async move {
        while let Some(open) = rx.recv().await {
            let (up, reply, toward) = match open {
                Reverse::Agent { channel, reply } => (channel, reply, Toward::Agent),
                Reverse::Forwarded {
                    channel,
                    connected_address,
                    connected_port,
                    originator_address,
                    originator_port,
                    reply,
                } => (
                    channel,
                    reply,
                    Toward::Forwarded {
                        connected_address,
                        connected_port,
                        originator_address,
                        originator_port,
                    },
                ),
            };
            let wire = toward.wire();
            // decided again now: a grant changed since the request no longer lets it through
            if !shared.allows_now(toward.kind()) {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                let destination = toward.destination();
                shared
                    .notices
                    .note("reverse channel refused by policy", wire, || {
                        format!(
                            "the target opened a {wire} channel ({destination}) that the grant no longer allows; refused"
                        )
                    });
                continue;
            }
            if shared.reverse_open.fetch_add(1, Ordering::AcqRel) >= MAX_REVERSE_CHANNELS {
                shared.reverse_open.fetch_sub(1, Ordering::AcqRel);
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
                shared.notices.note("reverse channel cap", wire, || {
                    format!("more than {MAX_REVERSE_CHANNELS} {wire} channels at once; refused")
                });
                continue;
            }
            tokio::spawn(open_toward_user(
                shared.clone(),
                handle.clone(),
                loss.clone(),
                up,
                reply,
                toward,
            ));
        }
    });
}

/// Opens the matching channel toward the user; once the user accepts, accepts the target's
/// open and relays the two.
async fn open_toward_user(
    shared: Arc<Shared>,
    handle: russh::server::Handle,
    loss: LossWatch,
    up: Channel<russh::client::Msg>,
    reply: russh::client::ChannelOpenHandle,
    toward: Toward,
) {
    let opening = async {
        match &toward {
            Toward::Agent => handle.channel_open_agent().await,
            Toward::Forwarded {
                connected_address,
                connected_port,
                originator_address,
                originator_port,
            } => {
                handle
                    .channel_open_forwarded_tcpip(
                        connected_address.clone(),
                        *connected_port,
                        originator_address.clone(),
                        *originator_port,
                    )
                    .await
            }
        }
    };
    let down = match tokio::time::timeout(REQUEST_TIMEOUT, opening).await {
        Ok(Ok(down)) => down,
        _ => {
            // the user's client refused it (or is gone): so is the target's open
            shared.reverse_open.fetch_sub(1, Ordering::AcqRel);
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    reply.accept().await;
    let channel = down.id();
    shared.windows(|w| w.mirror.opened(channel.into(), WINDOW));
    let destination = toward.destination();
    shared.audit_request(channel.into(), toward.wire(), destination.clone(), true);
    let (down_r, down_w) = down.split();
    relay::spawn(
        &shared,
        relay::Relaying {
            channel,
            handle,
            down_r,
            down_w,
            before: Vec::new(),
            up: relay::Up::Channel {
                up,
                early: Vec::new(),
                loss,
            },
            gate: None,
            forward: Some((toward.forward_kind(), destination)),
            dedicated: None,
            tap: None,
        },
    )
    .await;
}

impl Conn {
    /// `tcpip-forward` (`ssh -R`): allowed by the grant (`forward-remote`), it gets a target
    /// connection of its own that asks the target to listen; connections to that port come
    /// back through [`spawn_router`]. Returns whether the target listens; `port` becomes the
    /// port it chose when the user asked for 0.
    pub(super) async fn remote_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        handle: russh::server::Handle,
    ) -> bool {
        let at = crate::escape_short(&format!("{address}:{port}"));
        let Some(user) = self.user.clone() else {
            return false;
        };
        if !self.login.contains('@') {
            // a login without a target: nothing to forward from
            self.notice("remote port forwarding", &at, format!(" of {at}"));
            return false;
        }
        if self.remote_forwards.len() >= MAX_REMOTE_FORWARDS {
            self.notice(
                "remote port forwarding",
                &at,
                format!(" of {at} (too many)"),
            );
            return false;
        }
        let open = Open::RemoteForward {
            address: address.to_string(),
            port: *port,
        };
        let Ok(leg) = self.target_leg(&user, &open, handle).await else {
            return false;
        };
        let asked = tokio::time::timeout(
            REQUEST_TIMEOUT,
            leg.target.tcpip_forward(address.to_string(), *port),
        )
        .await;
        let bound = match asked {
            Ok(Ok(chosen)) if *port == 0 && chosen != 0 => chosen,
            Ok(Ok(_)) if *port != 0 => *port,
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer".into(),
                    Ok(Ok(_)) => "no port chosen".into(),
                };
                let (_, target, account) = self.shared.who().unwrap_or_default();
                self.deny(
                    &user,
                    Refusal::new(
                        Side::Target,
                        "remote_forward_failed",
                        format!(
                            "target '{target}' refused the remote forward of {at} for {account}: {why}"
                        ),
                        "psm: remote port forwarding failed on the target".into(),
                    ),
                );
                disconnect_target(&leg.target).await;
                return false;
            }
        };
        leg.route.listen(address, bound);
        let at = crate::escape_short(&format!("{address}:{bound}"));
        self.shared.audit_request(0, "tcpip-forward", at, true);
        self.remote_forwards
            .insert((address.to_string(), bound), leg.target);
        *port = bound;
        true
    }

    /// `cancel-tcpip-forward`: the target stops listening and its connection closes.
    pub(super) async fn cancel_remote_forward(&mut self, address: &str, port: u32) -> bool {
        let Some(target) = self.remote_forwards.remove(&(address.to_string(), port)) else {
            return false;
        };
        let _ = tokio::time::timeout(
            REQUEST_TIMEOUT,
            target.cancel_tcpip_forward(address.to_string(), port),
        )
        .await;
        disconnect_target(&target).await;
        true
    }

    /// `auth-agent-req@openssh.com` (`ssh -A`): passed to the target when the grant allows
    /// `agent`; the target's agent channels then come back through [`spawn_router`].
    pub(super) async fn forward_agent(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> bool {
        let pending = matches!(self.channels.get(&channel), Some(Chan::Pending { .. }));
        let allowed = pending && self.allows_now(ChannelKind::Agent);
        let accepted = allowed && self.forward_request(channel, Req::Agent).await == Some(true);
        if accepted {
            if let Some(Chan::Pending { route, .. }) = self.channels.get(&channel) {
                route.allow_agent();
            }
        }
        if pending {
            self.shared.audit_request(
                channel.into(),
                "auth-agent-req@openssh.com",
                String::new(),
                accepted,
            );
        }
        if !allowed {
            self.refuse_notice(channel, session, "agent forwarding");
        }
        accepted
    }
}
