//! CredSSP (NLA) toward the user: psm is the server, NTLM checks the user's NT hash, and the
//! NTLM user name carries the PSMP login (`alice@Administrator@win01`).
//!
//! Sans-IO: [`FrontNla::step`] takes one TsRequest from the client and says what to do. The
//! reply that proves the server's key (the last one before the client delegates its
//! credentials) is held back ([`Step::Verified`]): the relay decides, opens the recording and
//! logs in to the target first, so that every refusal reaches the client as a logon failure.
//!
//! What clients send: xfreerdp `/u:alice@Administrator@win01` keeps the whole string as the
//! NTLM user with an empty domain (sspi sees a UPN: account `alice@Administrator`, suffix
//! `win01`); `/d:123456` or mstsc's `123456\alice@Administrator@win01` puts the TOTP code in
//! the NTLM domain (a down-level name), and a reason may follow it there (`/d:"123456 CHG-42"`,
//! or the reason alone where no code is asked for). [`NlaLogin::from_username`] rebuilds the
//! login from either. The NTLMv2 response covers the domain, so the code cannot be changed in transit.

use std::sync::{Arc, Mutex};

use sspi::credssp::{
    CredSspServer, CredentialsProxy, NStatusCode, ServerError, ServerMode, ServerState, TsRequest,
};
use sspi::{AuthIdentity, Username};
use zeroize::Zeroizing;

/// The login a user gave in NLA, rebuilt from the NTLM user and domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlaLogin {
    /// The PSMP login string (`user@account@target`, or whatever the client sent).
    pub login: String,
    /// The TOTP code: the domain field's first six characters, when they are digits followed
    /// by nothing or a space.
    pub code: Option<Zeroizing<String>>,
    /// What follows the code in the domain field (`/d:"123456 CHG-42"`), trimmed: the reason
    /// where the grant asks for one and also for the code.
    pub after_code: Option<String>,
    /// The whole domain field, trimmed: the reason where the grant asks for one but not for a
    /// code.
    pub domain: Option<String>,
}

impl NlaLogin {
    /// Rebuilds the login from what NTLM authenticated.
    pub fn from_username(u: &Username) -> NlaLogin {
        match u.parts() {
            sspi::UsernameParts::UserPrincipalName(p) => NlaLogin {
                login: p.upn().to_string(),
                code: None,
                after_code: None,
                domain: None,
            },
            sspi::UsernameParts::DownLevelLogonName(p) => {
                let d = p.netbios_domain().unwrap_or_default();
                let (code, after_code) = split_code(d);
                NlaLogin {
                    login: p.account_name().to_string(),
                    code,
                    after_code,
                    domain: non_empty(d),
                }
            }
        }
    }

    /// The reason the user gave, for a grant that asks for one: what follows the code when a
    /// code was asked for too, else the whole domain field.
    pub fn reason(&self, code_asked: bool) -> Option<&str> {
        if code_asked {
            self.after_code.as_deref()
        } else {
            self.domain.as_deref()
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Splits a domain field into the TOTP code it starts with and what follows.
fn split_code(d: &str) -> (Option<Zeroizing<String>>, Option<String>) {
    match d.get(..6) {
        Some(head) if is_code(head) && d[6..].chars().next().is_none_or(char::is_whitespace) => {
            (Some(Zeroizing::new(head.to_string())), non_empty(&d[6..]))
        }
        _ => (None, None),
    }
}

/// Whether a domain field is a TOTP code (six ASCII digits).
fn is_code(d: &str) -> bool {
    d.len() == 6 && d.bytes().all(|b| b.is_ascii_digit())
}

/// Finds the NT hash (32 hex digits) of the psm user a login names; `Err` is the audit
/// reason of a refusal (unknown user, no NT hash, disabled, locked, rate limited).
pub type Lookup = Box<dyn FnMut(&NlaLogin) -> Result<psm_control_api::Secret, String> + Send>;

/// What the credentials proxy saw (the user is known only once NTLM's AUTHENTICATE arrives).
#[derive(Default)]
struct Seen {
    login: Option<NlaLogin>,
    refused: Option<String>,
}

struct Proxy {
    lookup: Lookup,
    seen: Arc<Mutex<Seen>>,
}

impl Proxy {
    fn seen<R>(&self, f: impl FnOnce(&mut Seen) -> R) -> R {
        match self.seen.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proxy")
    }
}

impl CredentialsProxy for Proxy {
    type AuthenticationData = AuthIdentity;

    fn auth_data_by_user(&mut self, username: &Username) -> std::io::Result<AuthIdentity> {
        let login = NlaLogin::from_username(username);
        let found = (self.lookup)(&login);
        self.seen(|s| s.login = Some(login));
        match found {
            Ok(hash) => {
                let password =
                    Zeroizing::new(format!("{}{}", sspi::NTLM_HASH_PREFIX, hash.expose()));
                Ok(AuthIdentity {
                    // the client's own spelling: NTLMv2 hashes UPPER(user) + domain as it sent them
                    username: username.clone(),
                    password: password.to_string().into(),
                })
            }
            Err(why) => {
                self.seen(|s| s.refused = Some(why.clone()));
                Err(std::io::Error::other(why))
            }
        }
    }

    fn auth_data(&mut self) -> std::io::Result<Vec<AuthIdentity>> {
        // only asked by protocols psm does not offer (Kerberos)
        Err(std::io::Error::other("psm checks NLA users by name only"))
    }
}

/// What to do after one client TsRequest.
pub enum Step {
    /// Send this to the client and read its next TsRequest.
    Reply(Vec<u8>),
    /// NTLM proved the user's password: `login` is who it is. Hold `reply` (the server's
    /// public key proof) until the session may go ahead, then send it with [`encode`], or
    /// refuse with [`logon_failure`].
    Verified {
        /// The login the client authenticated.
        login: NlaLogin,
        /// The held reply.
        reply: Box<TsRequest>,
    },
    /// The client delegated its credentials: CredSSP is over (they were dropped and wiped).
    Done,
    /// The login failed: send `reply` (a logon failure), if any, and close.
    Failed {
        /// What to send the client.
        reply: Option<Vec<u8>>,
        /// The login, when the client got as far as naming it.
        login: Option<NlaLogin>,
        /// Why, for the audit log.
        reason: String,
        /// Whether this counts as a wrong secret (the rate limit and lockout count it).
        wrong_secret: bool,
    },
}

/// The server side of CredSSP toward one user.
pub struct FrontNla {
    server: CredSspServer<Proxy>,
    seen: Arc<Mutex<Seen>>,
    verified: bool,
}

/// Encodes a TsRequest for the wire.
pub fn encode(ts: &TsRequest) -> Result<Vec<u8>, String> {
    let len = usize::from(ts.buffer_len().map_err(|e| e.to_string())?);
    let mut out = Vec::with_capacity(len);
    ts.encode_ts_request(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The held reply turned into a logon failure (no key proof; error STATUS_LOGON_FAILURE):
/// the client shows a failed logon.
pub fn logon_failure(mut reply: TsRequest) -> Option<Vec<u8>> {
    reply.nego_tokens = None;
    reply.auth_info = None;
    reply.pub_key_auth = None;
    reply.error_code = Some(NStatusCode::LOGON_FAILURE);
    encode(&reply).ok()
}

impl FrontNla {
    /// A CredSSP server binding to `public_key` (psm's certificate) for a client at `peer`.
    pub fn new(public_key: Vec<u8>, peer: &str, lookup: Lookup) -> Result<FrontNla, String> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let proxy = Proxy {
            lookup,
            seen: seen.clone(),
        };
        let server = CredSspServer::new(
            public_key,
            proxy,
            ServerMode::Ntlm(sspi::ntlm::NtlmConfig::new(peer.to_string())),
        )
        .map_err(|e| e.to_string())?;
        Ok(FrontNla {
            server,
            seen,
            verified: false,
        })
    }

    fn take_seen(&self) -> (Option<NlaLogin>, Option<String>) {
        match self.seen.lock() {
            Ok(mut g) => (g.login.take(), g.refused.take()),
            Err(p) => {
                let mut g = p.into_inner();
                (g.login.take(), g.refused.take())
            }
        }
    }

    /// Processes one TsRequest from the client.
    pub fn step(&mut self, bytes: &[u8]) -> Step {
        let req = match TsRequest::from_buffer(bytes) {
            Ok(r) => r,
            Err(e) => {
                return Step::Failed {
                    reply: None,
                    login: self.take_seen().0,
                    reason: format!("malformed CredSSP message: {e}"),
                    wrong_secret: false,
                }
            }
        };
        let result = self.server.process(req).resolve_to_result();
        match result {
            Ok(ServerState::ReplyNeeded(ts)) if ts.pub_key_auth.is_some() && !self.verified => {
                self.verified = true;
                match self.take_seen().0 {
                    Some(login) => Step::Verified {
                        login,
                        reply: Box::new(ts),
                    },
                    None => Step::Failed {
                        reply: logon_failure(ts),
                        login: None,
                        reason: "NTLM finished without naming a user".into(),
                        wrong_secret: false,
                    },
                }
            }
            Ok(ServerState::ReplyNeeded(ts)) => match encode(&ts) {
                Ok(b) => Step::Reply(b),
                Err(e) => Step::Failed {
                    reply: None,
                    login: None,
                    reason: format!("cannot encode CredSSP reply: {e}"),
                    wrong_secret: false,
                },
            },
            Ok(ServerState::Finished(delegated)) => {
                // the user's own password, which psm never uses: wiped as it drops
                drop(delegated);
                if self.verified {
                    Step::Done
                } else {
                    Step::Failed {
                        reply: None,
                        login: None,
                        reason: "CredSSP finished before the user was verified".into(),
                        wrong_secret: false,
                    }
                }
            }
            Err(ServerError { ts_request, error }) => {
                let (login, refused) = self.take_seen();
                let logon_denied = error.error_type == sspi::ErrorKind::LogonDenied;
                let reply = ts_request.and_then(|ts| {
                    let mut ts = *ts;
                    if logon_denied || login.is_some() {
                        ts.error_code = Some(NStatusCode::LOGON_FAILURE);
                    }
                    encode(&ts).ok()
                });
                let (reason, wrong_secret) = match refused {
                    Some(r) => (r, true),
                    None if login.is_some() && logon_denied => ("wrong password".to_string(), true),
                    None if login.is_some() => (format!("NLA failed: {error}"), true),
                    None => (format!("NLA failed: {error}"), false),
                };
                Step::Failed {
                    reply,
                    login,
                    reason,
                    wrong_secret,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironrdp_connector::credssp::CredsspSequence;
    use ironrdp_core::WriteBuf;

    // winpr-hash -u psmshadow -p 'Shad0w-Pass'
    const HASH: &str = "58ade4f200760fa5454e8ab24bdedc5f";
    const KEY: &[u8] = b"not really a public key, but CredSSP only hashes it";

    /// Runs a whole CredSSP exchange in memory; returns the server's verdict on the login.
    fn run(
        user: &str,
        domain: Option<&str>,
        password: &str,
        known: &str,
    ) -> Result<NlaLogin, String> {
        let known = known.to_string();
        let mut server = FrontNla::new(
            KEY.to_vec(),
            "client",
            Box::new(move |l: &NlaLogin| {
                if psm_control_api::Login::user_part(&l.login) == known {
                    Ok(psm_control_api::Secret::new(HASH.into()))
                } else {
                    Err("unknown user".into())
                }
            }),
        )
        .expect("server");
        let (mut client, mut req) = CredsspSequence::init(
            ironrdp_connector::Credentials::UsernamePassword {
                username: user.into(),
                password: password.into(),
            },
            domain,
            ironrdp_pdu::nego::SecurityProtocol::HYBRID,
            ironrdp_connector::ServerName::new("psm"),
            KEY.to_vec(),
            None,
        )
        .expect("client");
        let mut verified = None;
        for _ in 0..6 {
            let st = client
                .process_ts_request(req)
                .resolve_to_result()
                .map_err(|e| format!("client: {e}"))?;
            let mut wb = WriteBuf::new();
            let n = client
                .handle_process_result(st, &mut wb)
                .map_err(|e| e.to_string())?
                .size()
                .unwrap_or(0);
            let sent = wb.filled()[..n].to_vec();
            let answer = match server.step(&sent) {
                Step::Reply(b) => b,
                Step::Verified { login, reply } => {
                    verified = Some(login);
                    encode(&reply).expect("encodes")
                }
                Step::Done => return verified.ok_or_else(|| "done unverified".to_string()),
                Step::Failed { reason, reply, .. } => {
                    if let Some(r) = reply {
                        let ts = TsRequest::from_buffer(&r).expect("reply decodes");
                        assert_eq!(ts.error_code, Some(NStatusCode::LOGON_FAILURE));
                    }
                    return Err(reason);
                }
            };
            if client.next_pdu_hint().is_none() {
                return verified.ok_or_else(|| "client finished unverified".to_string());
            }
            req = match client.decode_server_message(&answer) {
                Ok(Some(r)) => r,
                other => return Err(format!("client decode: {other:?}")),
            };
        }
        Err("no end".into())
    }

    #[test]
    fn nt_hash_login_rebuilds_the_psmp_login_and_takes_the_code_from_the_domain() {
        let l = run(
            "psmshadow@Administrator@win01",
            None,
            "Shad0w-Pass",
            "psmshadow",
        )
        .expect("verified");
        assert_eq!(l.login, "psmshadow@Administrator@win01");
        assert_eq!(l.code, None);
        let l = run(
            "psmshadow@Administrator@win01",
            Some("123456"),
            "Shad0w-Pass",
            "psmshadow",
        )
        .expect("verified with code");
        assert_eq!(l.login, "psmshadow@Administrator@win01");
        assert_eq!(l.code.as_deref().map(|s| s.as_str()), Some("123456"));
        let l = run(
            "psmshadow@a@t",
            Some("WORKGROUP"),
            "Shad0w-Pass",
            "psmshadow",
        )
        .expect("verified with a domain");
        assert_eq!(l.code, None);
        assert_eq!(l.domain.as_deref(), Some("WORKGROUP"));
        let l = run(
            "psmshadow@a@t",
            Some("123456 CHG-42 disk full"),
            "Shad0w-Pass",
            "psmshadow",
        )
        .expect("verified with a code and a reason");
        assert_eq!(l.code.as_deref().map(|s| s.as_str()), Some("123456"));
        assert_eq!(l.reason(true), Some("CHG-42 disk full"));
        assert_eq!(l.reason(false), Some("123456 CHG-42 disk full"));
    }

    #[test]
    fn wrong_password_and_unknown_user_are_logon_failures() {
        let e = run("psmshadow@Administrator@win01", None, "wrong", "psmshadow")
            .expect_err("wrong password");
        assert!(e.contains("wrong password"), "{e}");
        let e = run(
            "nobody@Administrator@win01",
            None,
            "Shad0w-Pass",
            "psmshadow",
        )
        .expect_err("unknown");
        assert_eq!(e, "unknown user");
    }

    #[test]
    fn usernames_map_to_logins() {
        let u = Username::parse("alice@Administrator@win01").expect("upn");
        assert_eq!(
            NlaLogin::from_username(&u).login,
            "alice@Administrator@win01"
        );
        let u = Username::new("alice@Administrator@win01", Some("654321")).expect("dl");
        let l = NlaLogin::from_username(&u);
        assert_eq!(l.login, "alice@Administrator@win01");
        assert_eq!(l.code.as_deref().map(|s| s.as_str()), Some("654321"));
        let u = Username::parse("alice").expect("plain");
        assert_eq!(NlaLogin::from_username(&u).login, "alice");
        assert!(!is_code("12345") && !is_code("12345a") && is_code("000000"));
        let (code, rest) = split_code("1234567 ticket");
        assert!(code.is_none() && rest.is_none(), "seven digits are no code");
        let (code, rest) = split_code("654321");
        assert_eq!(code.as_deref().map(|s| s.as_str()), Some("654321"));
        assert_eq!(rest, None);
        assert!(split_code("CHG-42").0.is_none());
        assert!(split_code("ü").0.is_none(), "short multi-byte input");
    }
}
