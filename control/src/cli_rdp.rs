//! psmctl's RDP commands and the RDP parts of the target, account and user commands: pinning an
//! RDP target's TLS certificate (given or scanned), the listings with their RDP columns, and
//! `psmctl rdp-file`, which writes a ready `.rdp` file for a user and an account.
//!
//! The `.rdp` file ([`render_rdp_file`], sans-IO) connects to the relay's RDP listener with
//! `username:s:USER@ACCOUNT@TARGET`, NLA on, the client prompting for the password, and the
//! redirections (clipboard, drives, printers, smart cards, audio) the user's grant allows, so that
//! the client does not offer what psm would refuse anyway.
//!
//! What it does not do: talk RDP beyond the certificate scan ([`crate::scan_rdp`]), or print a
//! credential.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use psm_control_api::{ClipboardRule, Conditions, Protocol};

use crate::cli::CliError;
use crate::client::{Client, ClientError};
use crate::protocol::{AccountInfo, Changed, GrantInfo, Reach, Request, TargetInfo, UserInfo};
use crate::scan_rdp;
use crate::table::write_table;
use crate::validate;

/// The port the relay's RDP listener uses when nothing says otherwise.
pub const DEFAULT_RDP_PORT: u16 = 3389;

fn refused(msg: String) -> CliError {
    CliError::Client(ClientError::Refused(msg))
}

fn change(out: &mut dyn Write, client: &mut Client, req: &Request) -> Result<(), CliError> {
    let c: Changed = client.call_as(req)?;
    writeln!(out, "{} (policy version {})", c.message, c.version)?;
    Ok(())
}

/// Scans `address` and prints what it found; returns the pin.
fn scan(out: &mut dyn Write, name: &str, address: &str) -> Result<String, CliError> {
    let s = scan_rdp::scan_certificate(address, scan_rdp::SCAN_TIMEOUT)?;
    writeln!(
        out,
        "scanned {name} ({address}): {} ({}{})",
        s.fingerprint,
        s.security(),
        if s.subject.is_empty() {
            String::new()
        } else {
            format!(", certificate {}", psm_control_api::escape(&s.subject))
        }
    )?;
    Ok(s.fingerprint)
}

/// `psmctl target add` for an RDP target (or with `--cert-fingerprint`): pins the certificate
/// given or scanned.
#[allow(clippy::too_many_arguments)]
pub fn target_add(
    data_dir: &Path,
    name: String,
    address: String,
    protocol: Protocol,
    host_key: Option<String>,
    cert_fingerprint: Option<String>,
    scan_it: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if protocol != Protocol::Rdp {
        return Err(CliError::Usage(
            "--cert-fingerprint pins an RDP target's certificate: add --protocol rdp (SSH targets pin --host-key)".into(),
        ));
    }
    let mut client = Client::connect(data_dir)?;
    let host_key = match (cert_fingerprint.or(host_key), scan_it) {
        (Some(fp), false) => validate::cert_fingerprint(&fp)?,
        (None, true) => {
            // say "already exists" before scanning a host for nothing
            let list: Vec<TargetInfo> = client.call_as(&Request::TargetList)?;
            if list.iter().any(|t| t.name == name) {
                return Err(refused(format!("target '{name}' already exists")));
            }
            scan(out, &name, &address)?
        }
        _ => {
            return Err(CliError::Usage(
                "give exactly one of --cert-fingerprint and --scan".into(),
            ))
        }
    };
    change(
        out,
        &mut client,
        &Request::TargetAdd {
            name,
            address,
            host_key,
            protocol,
            listen: None,
        },
    )
}

/// `psmctl target update` of an RDP target: a new address and/or a certificate given or
/// scanned (at the new address, if given).
pub fn update_rdp(
    client: &mut Client,
    current: &TargetInfo,
    address: Option<String>,
    pin: Option<String>,
    scan_it: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let address = address
        .as_deref()
        .map(|a| validate::address_for(Protocol::Rdp, a))
        .transpose()?;
    let host_key = match (pin, scan_it) {
        (Some(fp), false) => Some(validate::cert_fingerprint(&fp)?),
        (None, true) => {
            let at = address.clone().unwrap_or_else(|| current.address.clone());
            Some(scan(out, &current.name, &at)?)
        }
        (None, false) => None,
        (Some(_), true) => {
            return Err(CliError::Usage(
                "give either --cert-fingerprint or --scan".into(),
            ))
        }
    };
    change(
        out,
        client,
        &Request::TargetUpdate {
            name: current.name.clone(),
            address,
            host_key,
        },
    )
}

/// `target list` once an RDP or tcp target exists: with a PROTOCOL column (SSH-only lists keep
/// their three columns).
pub fn print_targets(out: &mut dyn Write, list: &[TargetInfo]) -> Result<(), CliError> {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.protocol.to_string(),
                t.address.clone(),
                match &t.listen {
                    // nothing to pin on plain TCP: its column says where psm serves it
                    Some(l) => format!("none (unpinned; psm port {l})"),
                    None => t.fingerprint.clone(),
                },
            ]
        })
        .collect();
    write_table(
        out,
        &["NAME", "PROTOCOL", "ADDRESS", "HOST KEY / CERTIFICATE"],
        &rows,
    )?;
    Ok(())
}

/// `account list` once an account has a domain: with a DOMAIN column.
pub fn print_accounts(out: &mut dyn Write, list: &[AccountInfo]) -> Result<(), CliError> {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.target.clone(),
                a.username.clone(),
                a.kind.as_str().to_string(),
                a.domain.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    write_table(out, &["TARGET", "USERNAME", "CREDENTIAL", "DOMAIN"], &rows)?;
    Ok(())
}

/// The RDP column of `user list`: `yes` (can log in over RDP), `no (set password again)`
/// (a password set before psm kept its NT hash), `-` (no password).
pub fn user_rdp_column(u: &UserInfo) -> &'static str {
    match (u.has_password, u.rdp) {
        (false, _) => "-",
        (true, true) => "yes",
        (true, false) => "no (set password again)",
    }
}

/// `psmctl rdp-file`.
#[derive(Debug, Args)]
pub struct RdpFileArgs {
    /// The psm user the file is for.
    pub user: String,
    /// ACCOUNT@TARGET (an RDP target the user has a grant for).
    pub account: String,
    /// Where clients reach psm's RDP listener, HOST or HOST:PORT (default: `[relay]
    /// rdp_public_address` in psm.toml, else this machine's host name and the port of
    /// `[relay] rdp_listen`, 3389 by default).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub host: Option<String>,
    /// The config file psm runs with (default: `<data-dir>/psm.toml` when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// What goes into an `.rdp` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdpFile {
    /// `host:port` of psm's RDP listener.
    pub address: String,
    /// `USER@ACCOUNT@TARGET`.
    pub username: String,
    /// The grant's channel rules.
    pub channels: psm_control_api::RdpChannels,
}

/// The `.rdp` file's text: `key:type:value` lines, CRLF, no comments.
pub fn render_rdp_file(f: &RdpFile) -> String {
    let c = &f.channels;
    let flag = |b: bool| if b { 1 } else { 0 };
    let mut lines = vec![
        format!("full address:s:{}", f.address),
        format!("username:s:{}", f.username),
        "enablecredsspsupport:i:1".to_string(),
        "authentication level:i:2".to_string(),
        "prompt for credentials:i:1".to_string(),
        format!(
            "redirectclipboard:i:{}",
            flag(c.clipboard != ClipboardRule::None)
        ),
        format!("redirectdrives:i:{}", flag(c.drive)),
    ];
    if c.drive {
        lines.push("drivestoredirect:s:*".to_string());
    }
    lines.extend([
        format!("redirectprinters:i:{}", flag(c.printer)),
        format!("redirectsmartcards:i:{}", flag(c.smartcard)),
        // 0: play on this computer, 2: do not play
        format!("audiomode:i:{}", if c.audio { 0 } else { 2 }),
    ]);
    let mut text = lines.join("\r\n");
    text.push_str("\r\n");
    text
}

/// The host part of psm's RDP address as the config says it, or why it cannot say.
/// `config` is psm.toml's text, if there is one.
pub fn address_from_config(config: Option<&str>, hostname: &str) -> Result<String, String> {
    let doc: toml::Value = match config {
        Some(text) => toml::from_str(text).map_err(|e| format!("psm.toml: {}", e.message()))?,
        None => toml::Value::Table(Default::default()),
    };
    let relay = doc.get("relay");
    let get = |k: &str| relay.and_then(|r| r.get(k)).and_then(|v| v.as_str());
    if let Some(public) = get("rdp_public_address") {
        return with_port(public, DEFAULT_RDP_PORT);
    }
    let listen = get("rdp_listen").unwrap_or("0.0.0.0:3389");
    if listen == "off" {
        return Err(
            "psm's RDP listener is off ([relay] rdp_listen = \"off\"): give --host".to_string(),
        );
    }
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| format!("psm.toml: [relay] rdp_listen {listen:?} is not host:port"))?;
    if addr.ip().is_unspecified() {
        Ok(format!("{hostname}:{}", addr.port()))
    } else {
        Ok(addr.to_string())
    }
}

/// `host` with `port` added when it has none.
fn with_port(host: &str, port: u16) -> Result<String, String> {
    let h = host.trim();
    let has_port = if h.starts_with('[') {
        h.contains("]:")
    } else {
        h.contains(':')
    };
    let full = if has_port {
        h.to_string()
    } else {
        format!("{h}:{port}")
    };
    validate::address(&full).map_err(|e| e.to_string())
}

/// `psmctl rdp-file USER ACCOUNT@TARGET`: checks that the user has a grant for the account and
/// that the target is an RDP target, then writes the file to `out`.
pub fn rdp_file(data_dir: &Path, args: RdpFileArgs, out: &mut dyn Write) -> Result<(), CliError> {
    validate::user_name(&args.user)?;
    let (account, target) = validate::split_account(&args.account)?;
    let address = match &args.host {
        Some(h) => with_port(h, DEFAULT_RDP_PORT).map_err(CliError::Usage)?,
        None => {
            let path = args
                .config
                .clone()
                .unwrap_or_else(|| data_dir.join("psm.toml"));
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.config.is_none() => None,
                Err(e) => {
                    return Err(CliError::File {
                        path,
                        reason: e.to_string(),
                    })
                }
            };
            let hostname = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into());
            address_from_config(text.as_deref(), &hostname).map_err(CliError::Usage)?
        }
    };
    let mut client = Client::connect(data_dir)?;
    let targets: Vec<TargetInfo> = client.call_as(&Request::TargetList)?;
    let Some(t) = targets.iter().find(|t| t.name == target) else {
        return Err(refused(format!("unknown target '{target}'")));
    };
    if t.protocol != Protocol::Rdp {
        return Err(CliError::Usage(format!(
            "target '{target}' is an SSH target: connect with ssh {}@{account}@{target}@<gateway>",
            args.user
        )));
    }
    let reach: Vec<Reach> = client.call_as(&Request::WhoCanReach {
        account: account.clone(),
        target: target.clone(),
    })?;
    let Some(r) = reach.iter().find(|r| r.user == args.user) else {
        return Err(refused(format!(
            "user '{}' has no grant for {account}@{target}",
            args.user
        )));
    };
    let grants: Vec<GrantInfo> = client.call_as(&Request::GrantList)?;
    let conditions: Conditions = grants
        .into_iter()
        .find(|g| format!("{} -> {}@{}", g.user, g.account, g.target) == r.grant)
        .map(|g| g.conditions)
        .unwrap_or_default();
    let users: Vec<UserInfo> = client.call_as(&Request::UserList)?;
    if let Some(u) = users.iter().find(|u| u.name == args.user) {
        if !u.rdp {
            eprintln!(
                "psmctl: note: user '{}' cannot log in over RDP yet: set their password again (psmctl user passwd) so that psm keeps its NT hash",
                args.user
            );
        }
    }
    if conditions.mfa {
        eprintln!(
            "psmctl: note: this grant needs a TOTP code: type it as the domain when the client asks (CODE\\{}@{account}@{target})",
            args.user
        );
    }
    let file = RdpFile {
        address,
        username: format!("{}@{account}@{target}", args.user),
        channels: conditions.rdp,
    };
    out.write_all(render_rdp_file(&file).as_bytes())?;
    Ok(())
}

#[cfg(test)]
#[path = "cli_rdp_tests.rs"]
mod e2e;

#[cfg(test)]
mod tests {
    use super::*;
    use psm_control_api::RdpChannels;

    #[test]
    fn the_file_follows_the_grant() {
        let f = RdpFile {
            address: "gw.example.com:3389".into(),
            username: "alice@Administrator@win01".into(),
            channels: RdpChannels::default(),
        };
        assert_eq!(
            render_rdp_file(&f),
            "full address:s:gw.example.com:3389\r\n\
             username:s:alice@Administrator@win01\r\n\
             enablecredsspsupport:i:1\r\n\
             authentication level:i:2\r\n\
             prompt for credentials:i:1\r\n\
             redirectclipboard:i:0\r\n\
             redirectdrives:i:0\r\n\
             redirectprinters:i:0\r\n\
             redirectsmartcards:i:0\r\n\
             audiomode:i:0\r\n"
        );
        let open = RdpFile {
            channels: RdpChannels {
                clipboard: ClipboardRule::ToTarget,
                drive: true,
                printer: true,
                smartcard: true,
                audio: false,
                channels: vec![],
            },
            ..f
        };
        let text = render_rdp_file(&open);
        for line in [
            "redirectclipboard:i:1",
            "redirectdrives:i:1",
            "drivestoredirect:s:*",
            "redirectprinters:i:1",
            "redirectsmartcards:i:1",
            "audiomode:i:2",
        ] {
            assert!(text.contains(&format!("{line}\r\n")), "{line}: {text}");
        }
        // CRLF only, no comment lines
        assert!(!text.replace("\r\n", "").contains('\n'));
        assert!(text.lines().all(|l| !l.starts_with('#') && l.contains(':')));
    }

    #[test]
    fn the_address_comes_from_the_config() {
        let a = |cfg: Option<&str>| address_from_config(cfg, "psm01");
        assert_eq!(a(None).expect("default"), "psm01:3389");
        assert_eq!(
            a(Some("[relay]\nrdp_listen = \"0.0.0.0:13389\"\n")).expect("port"),
            "psm01:13389"
        );
        assert_eq!(
            a(Some("[relay]\nrdp_listen = \"10.1.2.3:3390\"\n")).expect("specific"),
            "10.1.2.3:3390"
        );
        assert_eq!(
            a(Some(
                "[relay]\nrdp_listen = \"0.0.0.0:3389\"\nrdp_public_address = \"gw.example.com\"\n"
            ))
            .expect("public"),
            "gw.example.com:3389"
        );
        assert_eq!(
            a(Some(
                "[relay]\nrdp_public_address = \"gw.example.com:443\"\n"
            ))
            .expect("public"),
            "gw.example.com:443"
        );
        let e = a(Some("[relay]\nrdp_listen = \"off\"\n")).expect_err("off");
        assert!(e.contains("give --host"), "{e}");
        assert!(a(Some("[relay]\nrdp_listen = \"nowhere\"\n")).is_err());
        assert_eq!(with_port("[::1]", 3389).expect("v6"), "[::1]:3389");
        assert!(with_port("bad host", 3389).is_err());
    }

    #[test]
    fn the_rdp_column_says_who_can_log_in() {
        let u = |has_password, rdp| UserInfo {
            name: "a".into(),
            has_password,
            ssh_keys: vec![],
            groups: vec![],
            disabled: false,
            locked_until_ms: None,
            mfa: false,
            rdp,
        };
        assert_eq!(user_rdp_column(&u(true, true)), "yes");
        assert_eq!(user_rdp_column(&u(true, false)), "no (set password again)");
        assert_eq!(user_rdp_column(&u(false, false)), "-");
    }
}
