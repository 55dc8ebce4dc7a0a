//! A local forward on a `tcp` target's login (`ssh -L 5432:db01:5432 alice@tcp@db01@gateway`):
//! decided like any local forward (the grant allows `forward-local`, the destination matches
//! its `--forward-to` patterns) and the destination must be the target itself, by its name or
//! its address, at its port. psm dials the target's address and relays the channel to that
//! connection: the session starts with it as with a lease, the forward is one `forward` event
//! when it ends, and the session's end (kill, policy, its limits) cuts it.
//!
//! Unlike a lease's connections, the payload crosses psm inside the SSH channel, decrypted
//! there, so it is recorded like every channel of a recorded session, and copied rather than
//! spliced (splice(2) needs a plain socket on both sides: the target's psm port is that route).

use super::*;

/// Whether a local forward to `host:port` names `target`: its name or its address's host,
/// and its address's port.
pub(super) fn names_target(target: &psm_control_api::Target, host: &str, port: u32) -> bool {
    let Some((addr_host, addr_port)) = target.address.rsplit_once(':') else {
        return false;
    };
    let addr_host = addr_host.trim_start_matches('[').trim_end_matches(']');
    let host = host.trim_start_matches('[').trim_end_matches(']');
    addr_port.parse::<u32>().is_ok_and(|p| p == port)
        && (host.eq_ignore_ascii_case(&target.name) || host.eq_ignore_ascii_case(addr_host))
}

impl Conn {
    /// `direct-tcpip` on a `tcp` target's login: decided, the target dialled, the channel
    /// relayed to it; refused with the user's line otherwise.
    pub(super) async fn tcp_forward(
        &mut self,
        user: &str,
        channel: Channel<Msg>,
        open: &Open,
        destination: String,
        reply: ChannelOpenHandle,
        handle: russh::server::Handle,
    ) {
        let ending = || "psm: the session is ending".to_string();
        let admitted = if self.shared.with(|s| s.closing) {
            Err(ending())
        } else {
            self.admit_open(user, open).await
        };
        let (target, account, opened) = match admitted {
            Ok(t) => t,
            Err(msg) => return refuse(reply, msg).await,
        };
        let leg = match self.dial_tcp_target(user, &target).await {
            // the session may have ended while the target was dialled: the connection goes
            Ok(_) if self.shared.with(|s| s.closing) => Err(ending()),
            dialled => dialled,
        };
        let leg = match leg {
            Ok(leg) => leg,
            Err(msg) => {
                if let Some(rec) = opened {
                    rec.discard().await;
                }
                return refuse(reply, msg).await;
            }
        };
        self.begin(user, &target, &account, opened);
        let id = channel.id();
        self.channels.insert(id, Chan::Forwarding);
        self.opened(id);
        reply.accept().await;
        self.shared
            .audit_request(id.into(), "direct-tcpip", destination.clone(), true);
        info!(session = %self.shared.session_id, target = %target.name, address = %target.address, channel = u32::from(id), "local forward to a tcp target opened");
        let (down_r, down_w) = channel.split();
        relay::spawn(
            &self.shared,
            relay::Relaying {
                channel: id,
                handle,
                down_r,
                down_w,
                before: Vec::new(),
                up: relay::Up::Tcp(leg),
                gate: None,
                forward: Some((ForwardKind::Local, destination)),
                dedicated: None,
                tap: None,
            },
        )
        .await;
    }

    /// The connection to `target` (a `tcp` target still, in the decision's own snapshot),
    /// on the worker's back end; a refusal, audited, with the user's line otherwise.
    async fn dial_tcp_target(
        &self,
        user: &str,
        target: &psm_control_api::Target,
    ) -> Result<crate::uring::Leg, String> {
        let t = &target.name;
        if target.protocol != psm_control_api::Protocol::Tcp {
            // the policy changed between the login's routing and this decision: the forward
            // is not dialled toward whatever the target is now
            return Err(self.deny(
                user,
                Refusal::new(
                    Side::Policy,
                    "forward_not_allowed",
                    format!("{t} is no longer a tcp target: its login's forward is not relayed"),
                    format!("psm: {t} is no longer a tcp target: connect again"),
                ),
            ));
        }
        // onto the worker's back end (its ring, where it runs one)
        let leg = crate::passthrough::dial(&target.address)
            .await
            .and_then(|s| {
                let _ = s.set_nodelay(true);
                crate::uring::Leg::new(s).map_err(|e| e.to_string())
            });
        leg.map_err(|reason| {
            let err = upstream::UpstreamError::Unreachable {
                target: t.clone(),
                address: target.address.clone(),
                reason,
            };
            self.deny(user, Refusal::target(&err))
        })
    }
}

/// Refuses a forward's channel with the user's line.
async fn refuse(reply: ChannelOpenHandle, reason: String) {
    reply
        .reject(ChannelOpenFailure::Other {
            code: 1, // SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
            reason,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::names_target;

    fn target(name: &str, address: &str) -> psm_control_api::Target {
        psm_control_api::Target {
            name: name.into(),
            address: address.into(),
            host_key: String::new(),
            groups: Vec::new(),
            protocol: psm_control_api::Protocol::Tcp,
            listen: None,
        }
    }

    #[test]
    fn a_forward_names_the_target_by_its_name_or_its_address_at_its_port() {
        let db = target("db01", "10.0.0.9:5432");
        assert!(names_target(&db, "db01", 5432));
        assert!(names_target(&db, "DB01", 5432));
        assert!(names_target(&db, "10.0.0.9", 5432));
        assert!(!names_target(&db, "db01", 5433), "another port");
        assert!(!names_target(&db, "10.0.0.8", 5432), "another host");
        assert!(!names_target(&db, "localhost", 5432));
        let v6 = target("hsm", "[2001:db8::7]:1792");
        assert!(names_target(&v6, "2001:db8::7", 1792));
        assert!(names_target(&v6, "[2001:db8::7]", 1792));
        assert!(names_target(&v6, "hsm", 1792));
        assert!(!names_target(&v6, "hsm", 1793));
        let named = target("mgmt", "appliance.corp:8443");
        assert!(names_target(&named, "appliance.corp", 8443));
        assert!(!names_target(&target("bad", "no-port"), "bad", 0));
    }
}
