//! A psm with RDP targets: user `alice` (password [`ALICE_PASSWORD`]), and a target pinned by
//! `psmctl target add --protocol rdp --scan` with its vaulted account and alice's grant.

#[allow(unused_imports)]
use super::*;

/// Which RDP target a [`RdpWorld`] has.
pub enum RdpTarget {
    /// xrdp: TLS security, the Client Info carries the vaulted password.
    Xrdp(Xrdp),
    /// freerdp-shadow: NLA, the vaulted account goes through CredSSP.
    Shadow(Shadow),
}

/// psm (`psm up`) in front of one RDP target.
pub struct RdpWorld {
    /// The psm under test (dropped first).
    pub psm: Psm,
    /// The target.
    pub target: RdpTarget,
}

impl RdpWorld {
    /// psm + xrdp (`alice@psmrdp@xrdp01`).
    pub fn xrdp() -> RdpWorld {
        RdpWorld::build(RdpTarget::Xrdp(Xrdp::start()))
    }

    /// psm + freerdp-shadow (`alice@psmshadow@shadow01`).
    pub fn shadow() -> RdpWorld {
        RdpWorld::build(RdpTarget::Shadow(Shadow::start()))
    }

    fn build(target: RdpTarget) -> RdpWorld {
        let psm = Psm::up();
        let world = RdpWorld { psm, target };
        world.psm.psmctl_ok(
            &["user", "add", "alice", "--password-stdin"],
            Some(&format!("{ALICE_PASSWORD}\n")),
        );
        let (name, address, user, password) = world.target_facts();
        world.psm.psmctl_ok(
            &[
                "target",
                "add",
                name,
                "--protocol",
                "rdp",
                "--address",
                &address,
                "--scan",
            ],
            None,
        );
        world.psm.psmctl_ok(
            &[
                "account",
                "add",
                &format!("{user}@{name}"),
                "--password-stdin",
            ],
            Some(&format!("{password}\n")),
        );
        world
            .psm
            .psmctl_ok(&["grant", "add", "alice", &world.account()], None);
        world.psm.wait_policy_applied();
        world
    }

    /// Target name, address, vaulted user and password.
    pub fn target_facts(&self) -> (&'static str, String, &'static str, &'static str) {
        match &self.target {
            RdpTarget::Xrdp(x) => ("xrdp01", x.address(), XRDP_USER, XRDP_PASSWORD),
            RdpTarget::Shadow(s) => ("shadow01", s.address(), SHADOW_USER, SHADOW_PASSWORD),
        }
    }

    /// `USER@TARGET` of the vaulted account.
    pub fn account(&self) -> String {
        let (name, _, user, _) = self.target_facts();
        format!("{user}@{name}")
    }

    /// alice's login string for the target.
    pub fn login(&self) -> String {
        format!("alice@{}", self.account())
    }

    /// Replaces alice's grant with one carrying `flags`.
    pub fn regrant(&self, flags: &[&str]) {
        let acct = self.account();
        self.psm
            .psmctl_ok(&["grant", "remove", "alice", &acct], None);
        let mut args = vec!["grant", "add", "alice", &acct];
        args.extend_from_slice(flags);
        self.psm.psmctl_ok(&args, None);
        self.psm.wait_policy_applied();
    }

    /// xfreerdp as alice through psm (NLA toward psm), plus `extra` flags.
    pub fn client(&self, extra: &[&str]) -> FreeRdp {
        self.client_as(&self.login(), ALICE_PASSWORD, extra)
    }

    /// xfreerdp through psm with any login and password.
    pub fn client_as(&self, login: &str, password: &str, extra: &[&str]) -> FreeRdp {
        let mut flags = vec!["/sec:nla"];
        flags.extend_from_slice(extra);
        FreeRdp::start(&self.psm.rdp_address(), login, password, &flags)
    }

    /// Waits for the `session_start` of a session of `account@target` and returns it.
    pub fn wait_start(&self, mark: usize) -> serde_json::Value {
        let (name, _, user, _) = self.target_facts();
        self.psm
            .wait_audit_after(mark, "session_start", Duration::from_secs(30), |e| {
                jstr(e, "event") == "session_start"
                    && jstr(e, "target") == name
                    && jstr(e, "account") == user
            })
    }
}
