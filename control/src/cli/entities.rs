//! The policy's objects: `psmctl user …`, `target …`, `account …` and `grant …`, and
//! reading the passwords, keys and key files they take.

use std::fs;
use std::io::{BufRead, Write};
use std::path::Path;

use psm_control_api::{Credential, Secret};
use zeroize::Zeroizing;

use super::{change, print_json, AccountCmd, CliError, GrantCmd, TargetCmd, UserCmd};
use crate::cli_policy;
use crate::client::{Client, ClientError};
use crate::protocol::{AccountInfo, GrantInfo, Request, TargetInfo, UserInfo};
use crate::scan;
use crate::table::write_table;
use crate::validate;

/// Reads one line (the password) from `stdin`, without its line ending.
fn read_password(stdin: &mut dyn BufRead) -> Result<Zeroizing<String>, CliError> {
    let mut line = Zeroizing::new(String::new());
    stdin
        .read_line(&mut line)
        .map_err(|e| CliError::Stdin(format!("cannot read the password from stdin: {e}")))?;
    let len = line.trim_end_matches(['\n', '\r']).len();
    line.truncate(len);
    if line.is_empty() {
        return Err(CliError::Stdin(
            "no password on stdin (expected one line)".into(),
        ));
    }
    Ok(line)
}

fn read_file(path: &Path) -> Result<Zeroizing<String>, CliError> {
    fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| CliError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The public keys in a `.pub` / authorized-keys-like file: one per non-empty, non-comment line.
fn read_public_keys(path: &Path) -> Result<Vec<String>, CliError> {
    let text = read_file(path)?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (full, _) = validate::user_key(line).map_err(|e| CliError::File {
            path: path.to_path_buf(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        keys.push(full);
    }
    if keys.is_empty() {
        return Err(CliError::File {
            path: path.to_path_buf(),
            reason: "no public key in file".into(),
        });
    }
    Ok(keys)
}

pub(super) fn user(
    data_dir: &Path,
    cmd: UserCmd,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        UserCmd::Add {
            name,
            password_stdin,
            ssh_key,
        } => {
            validate::user_name(&name)?;
            if !password_stdin && ssh_key.is_empty() {
                return Err(CliError::Usage(
                    "give --password-stdin or at least one --ssh-key".into(),
                ));
            }
            let mut ssh_keys = Vec::new();
            for path in &ssh_key {
                ssh_keys.extend(read_public_keys(path)?);
            }
            let mut client = Client::connect(data_dir)?;
            let password = if password_stdin {
                Some(Secret::new(read_password(stdin)?.to_string()))
            } else {
                None
            };
            change(
                out,
                &mut client,
                &Request::UserAdd {
                    name,
                    password,
                    ssh_keys,
                },
            )
        }
        UserCmd::Remove { name } => change(
            out,
            &mut Client::connect(data_dir)?,
            &Request::UserRemove { name },
        ),
        UserCmd::Passwd {
            name,
            password_stdin,
        } => {
            validate::user_name(&name)?;
            if !password_stdin {
                return Err(CliError::Usage("give --password-stdin".into()));
            }
            let mut client = Client::connect(data_dir)?;
            let password = Secret::new(read_password(stdin)?.to_string());
            change(out, &mut client, &Request::UserPasswd { name, password })
        }
        UserCmd::List(f) => {
            let list: Vec<UserInfo> = Client::connect(data_dir)?.call_as(&Request::UserList)?;
            if f.json {
                return print_json(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        if u.has_password { "yes" } else { "no" }.to_string(),
                        if u.mfa { "totp" } else { "-" }.to_string(),
                        u.groups
                            .iter()
                            .map(|g| format!("@{g}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        if u.disabled {
                            "disabled".to_string()
                        } else if u
                            .locked_until_ms
                            .is_some_and(|t| t > psm_control_api::now_ms())
                        {
                            "locked".to_string()
                        } else {
                            "active".to_string()
                        },
                        u.ssh_keys
                            .iter()
                            .map(|k| validate::fingerprint(k))
                            .collect::<Vec<_>>()
                            .join(", "),
                        crate::cli_rdp::user_rdp_column(u).to_string(),
                    ]
                })
                .collect();
            write_table(
                out,
                &[
                    "NAME", "PASSWORD", "MFA", "GROUPS", "STATE", "SSH KEYS", "RDP",
                ],
                &rows,
            )?;
            Ok(())
        }
        UserCmd::Disable { name } => cli_policy::user_state(
            data_dir,
            Request::UserDisable {
                name,
                disabled: true,
            },
            out,
        ),
        UserCmd::Enable { name } => cli_policy::user_state(
            data_dir,
            Request::UserDisable {
                name,
                disabled: false,
            },
            out,
        ),
        UserCmd::Unlock { name } => {
            cli_policy::user_state(data_dir, Request::UserUnlock { name }, out)
        }
        UserCmd::Mfa { cmd } => cli_policy::mfa(data_dir, cmd, out),
    }
}

pub(super) fn target(data_dir: &Path, cmd: TargetCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        TargetCmd::Add {
            name,
            address,
            protocol,
            host_key,
            cert_fingerprint,
            scan,
            listen,
        } => {
            validate::target_name(&name)?;
            let address = validate::address_for(protocol, &address)?;
            match (protocol, listen) {
                (psm_control_api::Protocol::Tcp, Some(listen)) => {
                    let listen = validate::listen_address(&listen)?;
                    let mut client = Client::connect(data_dir)?;
                    return change(
                        out,
                        &mut client,
                        &Request::TargetAdd {
                            name,
                            address,
                            host_key: String::new(),
                            protocol,
                            listen: Some(listen),
                        },
                    );
                }
                (psm_control_api::Protocol::Tcp, None) => {
                    return Err(CliError::Usage(
                        "a tcp target needs --listen IP:PORT (the psm port users connect to)"
                            .into(),
                    ))
                }
                (_, Some(_)) => {
                    return Err(CliError::Usage(
                        "--listen is for tcp targets (--protocol tcp)".into(),
                    ))
                }
                (_, None) => {}
            }
            if protocol == psm_control_api::Protocol::Rdp || cert_fingerprint.is_some() {
                return crate::cli_rdp::target_add(
                    data_dir,
                    name,
                    address,
                    protocol,
                    host_key,
                    cert_fingerprint,
                    scan,
                    out,
                );
            }
            let mut client = Client::connect(data_dir)?;
            let host_key = match (host_key, scan) {
                (Some(k), false) => validate::host_key(&k)?,
                (None, true) => {
                    // say "already exists" before scanning a host for nothing
                    if find_target(&mut client, &name)?.is_some() {
                        return Err(CliError::Client(ClientError::Refused(format!(
                            "target '{name}' already exists"
                        ))));
                    }
                    let key = scan::scan_host_key_blocking(&address, scan::SCAN_TIMEOUT)?;
                    writeln!(
                        out,
                        "scanned {name} ({address}): {}",
                        validate::key_fingerprint(&key)
                    )?;
                    validate::key_material(&key)?
                }
                _ => {
                    return Err(CliError::Usage(
                        "give exactly one of --host-key and --scan".into(),
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
        TargetCmd::Update {
            name,
            address,
            host_key,
            cert_fingerprint,
            scan,
        } => {
            validate::target_name(&name)?;
            let mut client = Client::connect(data_dir)?;
            // an RDP target pins its certificate: see cli_rdp
            let current = find_target(&mut client, &name)?;
            if let Some(t) = current
                .as_ref()
                .filter(|t| t.protocol == psm_control_api::Protocol::Rdp)
            {
                let pin = cert_fingerprint.or(host_key);
                return crate::cli_rdp::update_rdp(&mut client, t, address, pin, scan, out);
            }
            if cert_fingerprint.is_some() {
                return Err(match current {
                    Some(_) => CliError::Usage(format!(
                        "target '{name}' is an SSH target: pin its host key with --host-key or --scan"
                    )),
                    None => CliError::Client(ClientError::Refused(format!(
                        "unknown target '{name}'"
                    ))),
                });
            }
            let address = address.as_deref().map(validate::address).transpose()?;
            let host_key = host_key.as_deref().map(validate::host_key).transpose()?;
            let host_key = if scan {
                let Some(current) = find_target(&mut client, &name)? else {
                    return Err(CliError::Client(ClientError::Refused(format!(
                        "unknown target '{name}'"
                    ))));
                };
                let at = address.clone().unwrap_or(current.address);
                let key = scan::scan_host_key_blocking(&at, scan::SCAN_TIMEOUT)?;
                writeln!(
                    out,
                    "scanned {name} ({at}): {}",
                    validate::key_fingerprint(&key)
                )?;
                Some(validate::key_material(&key)?)
            } else {
                host_key
            };
            change(
                out,
                &mut client,
                &Request::TargetUpdate {
                    name,
                    address,
                    host_key,
                },
            )
        }
        TargetCmd::Remove { name } => change(
            out,
            &mut Client::connect(data_dir)?,
            &Request::TargetRemove { name },
        ),
        TargetCmd::List(f) => {
            let list: Vec<TargetInfo> = Client::connect(data_dir)?.call_as(&Request::TargetList)?;
            if f.json {
                return print_json(out, &list);
            }
            if list.iter().any(|t| !t.protocol.is_ssh()) {
                return crate::cli_rdp::print_targets(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| vec![t.name.clone(), t.address.clone(), t.fingerprint.clone()])
                .collect();
            write_table(out, &["NAME", "ADDRESS", "HOST KEY"], &rows)?;
            Ok(())
        }
    }
}

/// The target called `name`, if psm-control knows one.
fn find_target(client: &mut Client, name: &str) -> Result<Option<TargetInfo>, CliError> {
    let list: Vec<TargetInfo> = client.call_as(&Request::TargetList)?;
    Ok(list.into_iter().find(|t| t.name == name))
}

pub(super) fn account(
    data_dir: &Path,
    cmd: AccountCmd,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        AccountCmd::Add {
            account,
            password_stdin,
            private_key,
            domain,
        } => {
            let (username, target) = validate::split_account(&account)?;
            if let Some(d) = &domain {
                validate::domain(d)?;
            }
            let credential = match (password_stdin, private_key) {
                (true, None) => None,
                (false, Some(path)) => {
                    let pem = read_file(&path)?;
                    validate::private_key(&pem).map_err(|e| CliError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    Some(Credential::PrivateKey(Secret::new(pem.to_string())))
                }
                _ => {
                    return Err(CliError::Usage(
                        "give exactly one of --password-stdin and --private-key".into(),
                    ))
                }
            };
            let mut client = Client::connect(data_dir)?;
            let credential = match credential {
                Some(c) => c,
                None => Credential::Password(Secret::new(read_password(stdin)?.to_string())),
            };
            change(
                out,
                &mut client,
                &Request::AccountAdd {
                    target,
                    username,
                    credential,
                    domain,
                },
            )
        }
        AccountCmd::Remove { account } => {
            let (username, target) = validate::split_account(&account)?;
            change(
                out,
                &mut Client::connect(data_dir)?,
                &Request::AccountRemove { target, username },
            )
        }
        AccountCmd::List(f) => {
            let list: Vec<AccountInfo> =
                Client::connect(data_dir)?.call_as(&Request::AccountList)?;
            if f.json {
                return print_json(out, &list);
            }
            if list.iter().any(|a| a.domain.is_some()) {
                return crate::cli_rdp::print_accounts(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|a| {
                    vec![
                        a.target.clone(),
                        a.username.clone(),
                        a.kind.as_str().to_string(),
                    ]
                })
                .collect();
            write_table(out, &["TARGET", "USERNAME", "CREDENTIAL"], &rows)?;
            Ok(())
        }
    }
}

pub(super) fn grant(data_dir: &Path, cmd: GrantCmd, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        GrantCmd::Add {
            user,
            account,
            allow_env,
            cond,
        } => {
            let (account, target) = cli_policy::split_grant_target(&account)?;
            let conditions = cond.conditions(Vec::new())?;
            change(
                out,
                &mut Client::connect(data_dir)?,
                &Request::GrantAdd {
                    user,
                    target,
                    account,
                    allow_env,
                    conditions,
                },
            )
        }
        GrantCmd::Remove { user, account } => {
            let (account, target) = cli_policy::split_grant_target(&account)?;
            change(
                out,
                &mut Client::connect(data_dir)?,
                &Request::GrantRemove {
                    user,
                    target,
                    account,
                },
            )
        }
        GrantCmd::List(f) => {
            let list: Vec<GrantInfo> = Client::connect(data_dir)?.call_as(&Request::GrantList)?;
            if f.json {
                return print_json(out, &list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|g| {
                    vec![
                        g.user.clone(),
                        g.account.clone(),
                        g.target.clone(),
                        g.conditions.describe().join("; "),
                    ]
                })
                .collect();
            write_table(out, &["USER", "ACCOUNT", "TARGET", "CONDITIONS"], &rows)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn password_from_stdin() {
        let mut input = io::Cursor::new(b"s3cret pass\r\nignored\n".to_vec());
        assert_eq!(&*read_password(&mut input).expect("pw"), "s3cret pass");
        let mut empty = io::Cursor::new(b"\n".to_vec());
        assert!(read_password(&mut empty).is_err());
    }
}
