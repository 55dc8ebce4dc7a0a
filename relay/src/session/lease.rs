//! The SSH side of TCP pass-through: a session channel on a `tcp` target opens no target
//! connection. It starts the session (decision, recording, `session_start`, governor) and opens
//! a lease of the target for the user's source address (see `crate::passthrough`); the channel
//! says where the target is served and holds. The lease ends with the session (exit, Ctrl-C or
//! Ctrl-D in the channel, kill, policy) and cuts its connections.

use super::*;

impl Conn {
    /// Whether this connection's login names a `tcp` target in the policy in force.
    pub(super) fn login_is_tcp(&self) -> bool {
        let Ok(login) = Login::parse(&self.login) else {
            return false;
        };
        self.ctx
            .policy
            .get()
            .targets
            .iter()
            .any(|t| t.name == login.target && t.protocol == psm_control_api::Protocol::Tcp)
    }

    /// Starts the session and its lease (once per connection); returns the channel's state.
    pub(super) async fn lease(&mut self, user: &str) -> Chan {
        if self.shared.with(|s| s.closing) {
            // the session is ending: no lease may start after its own was dropped
            return Chan::Denied("psm: the session is ending".into());
        }
        let (target, account, opened) = match self.admit_open(user, &Open::Session).await {
            Ok(t) => t,
            Err(msg) => return Chan::Denied(msg),
        };
        // a lease is held by a session channel: the grant must allow a shell or a command (one
        // that allows only `forward-local` reaches the target through the forward, recorded)
        if !(self.allows_now(ChannelKind::Shell) || self.allows_now(ChannelKind::Exec)) {
            if let Some(rec) = opened {
                rec.discard().await;
            }
            let t = target.name.clone();
            self.notice("channel kind", "shell", format!(" (a lease of {t})"));
            return Chan::Denied(format!(
                "psm: shell sessions are not permitted by policy, and a lease of {t} is one"
            ));
        }
        self.begin(user, &target, &account, opened);
        let source = self.shared.peer.ip().to_canonical();
        let opened_now = self.shared.with(|s| s.lease.is_none() && !s.closing);
        if opened_now {
            let guard = self.ctx.leases.open(
                &target.name,
                source,
                &self.shared.session_id,
                user,
                self.shared.bytes.clone(),
            );
            self.shared.with(|s| s.lease = Some(guard));
            info!(session = %self.shared.session_id, %user, target = %target.name, %source, "pass-through lease opened");
        }
        let at = match target
            .listen
            .as_deref()
            .and_then(|l| l.parse::<SocketAddr>().ok())
        {
            Some(a) if a.ip().is_unspecified() => format!("port {} of this gateway", a.port()),
            Some(a) => a.to_string(),
            None => "its psm port".to_string(),
        };
        Chan::Lease(format!(
            "psm: {} is open to {source} on {at} while this session lasts (Ctrl-C ends it)\r\n",
            target.name
        ))
    }

    /// A shell, exec or subsystem request on a lease channel: the line, and the channel holds.
    pub(super) fn lease_started(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(Chan::Lease(line)) = self.channels.get(&channel) else {
            return Ok(());
        };
        if self.shared.with(|s| s.running.contains(&channel)) {
            // a channel starts once
            return session.channel_failure(channel);
        }
        let line = Bytes::from(line.clone());
        session.channel_success(channel)?;
        session.data(channel, line)?;
        self.shared.with(|s| s.running.push(channel));
        Ok(())
    }

    /// Input on a lease channel: Ctrl-C or Ctrl-D ends the lease and closes the channel.
    pub(super) fn lease_input(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if !matches!(self.channels.get(&channel), Some(Chan::Lease(_))) {
            return Ok(());
        }
        if data.iter().any(|b| matches!(b, 0x03 | 0x04)) {
            self.lease_closed(channel);
            session.data(channel, Bytes::from_static(b"\r\npsm: lease closed\r\n"))?;
            session.exit_status_request(channel, 0)?;
            session.eof(channel)?;
            session.close(channel)?;
        }
        Ok(())
    }

    /// A lease channel is done: the lease ends with the last one.
    pub(super) fn lease_closed(&mut self, channel: ChannelId) {
        // only a lease channel: any other stays for its own close handling
        if !matches!(self.channels.get(&channel), Some(Chan::Lease(_))) {
            return;
        }
        self.channels.insert(channel, Chan::Done);
        self.shared.with(|s| s.running.retain(|c| *c != channel));
        if !self.channels.values().any(|c| matches!(c, Chan::Lease(_))) {
            if let Some(lease) = self.shared.with(|s| s.lease.take()) {
                drop(lease);
                info!(session = %self.shared.session_id, "pass-through lease closed");
            }
        }
    }
}
