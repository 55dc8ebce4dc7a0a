//! psmctl on `control.sock`: the connection, and the answer to every request that
//! [`Shared::handle_governance`] leaves.

use std::path::Path;
use std::sync::Arc;

use psm_control_api::{AuditKind, PasswordHash, Protocol, Secret};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{debug, error, info, warn};
use zeroize::Zeroize;

use super::{lock, read_line, Actor, Line, Shared};
use crate::protocol::{
    Changed, CredentialKind, Request, Response, SessionInfo, StatusInfo, MAX_REQUEST,
};
use crate::store::{Removed, Store, StoreError};
use crate::validate;

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(super) fn removed_suffix(r: &Removed) -> String {
    let mut parts = Vec::new();
    if r.accounts > 0 {
        parts.push(plural(r.accounts, "account", "accounts"));
    }
    if r.grants > 0 {
        parts.push(plural(r.grants, "grant", "grants"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (and {})", parts.join(", "))
    }
}

impl Shared {
    pub(super) fn read<T: serde::Serialize>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Response {
        match f(&lock(&self.store)) {
            Ok(v) => Response::ok(&v),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Runs one change: store transaction, snapshot push, audit event, in that order and all
    /// under the store lock so versions, pushes and audit lines stay in the same order. `f` may
    /// refine the audited `object` (with what it found in the store).
    pub(super) fn change(
        &self,
        actor: &Actor,
        action: &str,
        mut object: String,
        f: impl FnOnce(&mut Store, &mut String) -> Result<(u64, String), StoreError>,
    ) -> Response {
        let mut store = lock(&self.store);
        let (version, message) = match f(&mut store, &mut object) {
            Ok(x) => x,
            Err(e) => {
                debug!(action, ?object, error = %e, "change refused");
                return Response::error(e.to_string());
            }
        };
        // The change is saved: audit it whatever happens next.
        let published = self.publish(&mut store);
        let audited = lock(&self.audit).append_control(AuditKind::AdminChange {
            action: action.to_string(),
            object: object.clone(),
            actor_uid: Some(actor.uid),
            actor: actor.name.clone(),
        });
        drop(store);
        if let Err(e) = published {
            error!(action, ?object, error = %e, "change saved but snapshot not built");
            return Response::error(format!(
                "change saved (policy version {version}) but the snapshot could not be built: {e}"
            ));
        }
        if let Err(e) = audited {
            error!(action, ?object, error = %e, "change applied but not audited");
            return Response::error(format!(
                "change applied (policy version {version}) but not audited: {e}"
            ));
        }
        info!(action, ?object, version, actor_uid = actor.uid, actor = ?actor.name, "policy changed");
        Response::ok(&Changed { version, message })
    }

    /// Checks a psm user's new password against the minimum length and hashes it (PBKDF2:
    /// slow, so this runs on the blocking pool like every request).
    fn hash_password(&self, password: &Secret) -> Result<PasswordHash, String> {
        let min = self.options.min_password_length;
        if password.expose().chars().count() < min {
            return Err(format!(
                "password is too short: psm requires at least {min} characters"
            ));
        }
        PasswordHash::new(password.expose()).map_err(|e| format!("cannot hash the password: {e}"))
    }

    /// Answers one request from `actor`. Blocking (store, password hashing): run it on the
    /// blocking pool.
    fn handle(&self, req: Request, actor: &Actor) -> Response {
        let req = match self.handle_governance(req, actor) {
            Ok(resp) => return resp,
            Err(req) => req,
        };
        match req {
            Request::Status => {
                let version = self.snapshot.borrow().version;
                let (recordings, recordings_error) = match disk_space(&self.recordings_dir) {
                    Ok(d) => (Some(d), None),
                    Err(e) => (None, Some(e)),
                };
                let rdp_targets: Vec<String> = lock(&self.store)
                    .list_targets()
                    .map(|ts| {
                        ts.into_iter()
                            .filter(|t| t.protocol == Protocol::Rdp)
                            .map(|t| t.name)
                            .collect()
                    })
                    .unwrap_or_default();
                let (sessions, rdp_sessions) = {
                    let live = lock(&self.sessions);
                    let live: Vec<_> = live.values().filter(|s| s.lost.is_none()).collect();
                    let rdp = live
                        .iter()
                        .filter(|s| rdp_targets.contains(&s.info.session.target))
                        .count();
                    (live.len(), rdp)
                };
                Response::ok(&StatusInfo {
                    version,
                    relays: lock(&self.relays).values().cloned().collect(),
                    sessions,
                    rdp_sessions,
                    recordings,
                    recordings_error,
                    siem: self.siem.status(),
                })
            }
            Request::UserAdd {
                name,
                password,
                ssh_keys,
            } => {
                let hash = match password.as_ref().map(|p| self.hash_password(p)).transpose() {
                    Ok(h) => h,
                    Err(e) => return Response::error(e),
                };
                // RDP's NLA checks users by the NT hash of their password: kept sealed.
                let nt = password.as_ref().map(|p| crate::ntlm::nt_hash(p.expose()));
                drop(password);
                self.change(actor, "user add", name.clone(), |s, _| {
                    let v = s.add_user_with_nt_hash(
                        &self.vault,
                        &name,
                        hash.as_ref().zip(nt.as_ref()),
                        &ssh_keys,
                    )?;
                    let mut how = Vec::new();
                    if hash.is_some() {
                        how.push("password".to_string());
                    }
                    if !ssh_keys.is_empty() {
                        how.push(plural(ssh_keys.len(), "ssh key", "ssh keys"));
                    }
                    Ok((v, format!("added user {name} ({})", how.join(", "))))
                })
            }
            Request::UserPasswd { name, password } => {
                let hash = match self.hash_password(&password) {
                    Ok(h) => h,
                    Err(e) => return Response::error(e),
                };
                let nt = crate::ntlm::nt_hash(password.expose());
                drop(password);
                self.change(actor, "user passwd", name.clone(), |s, _| {
                    let v = s.set_password_with_nt_hash(&self.vault, &name, &hash, &nt)?;
                    Ok((v, format!("changed the password of user {name}")))
                })
            }
            Request::UserRemove { name } => {
                self.change(actor, "user remove", name.clone(), |s, _| {
                    let r = s.remove_user(&name)?;
                    Ok((
                        r.version,
                        format!("removed user {name}{}", removed_suffix(&r)),
                    ))
                })
            }
            Request::UserList => self.read(|s| s.list_users()),
            Request::TargetAdd {
                name,
                address,
                host_key,
                protocol,
                listen,
            } => {
                if let (Protocol::Tcp, Some(listen)) = (protocol, &listen) {
                    let object = format!("{name} (tcp, {}, listen {listen})", address.trim());
                    return self.change(actor, "target add", object, |s, _| {
                        let v = s.add_tcp_target(&name, &address, listen)?;
                        Ok((
                            v,
                            format!(
                                "added tcp target {name} ({}), served on {listen}; grant its '{}' account with --unrecorded-tcp",
                                address.trim(),
                                psm_control_api::TCP_ACCOUNT
                            ),
                        ))
                    });
                }
                let object = match protocol {
                    Protocol::Ssh => format!(
                        "{name} ({}, {})",
                        address.trim(),
                        validate::fingerprint(&host_key)
                    ),
                    Protocol::Rdp => format!(
                        "{name} (rdp, {}, certificate {})",
                        address.trim(),
                        validate::fingerprint(&host_key)
                    ),
                    Protocol::Tcp => format!("{name} (tcp, {}, no listen)", address.trim()),
                };
                self.change(actor, "target add", object, |s, _| {
                    let v = s.add_target_with(&name, &address, &host_key, protocol)?;
                    Ok(match protocol {
                        Protocol::Ssh | Protocol::Tcp => {
                            (v, format!("added target {name} ({})", address.trim()))
                        }
                        Protocol::Rdp => (
                            v,
                            format!(
                                "added RDP target {name} ({})",
                                validate::address_for(protocol, &address)?
                            ),
                        ),
                    })
                })
            }
            Request::TargetUpdate {
                name,
                address,
                host_key,
            } => self.change(actor, "target update", name.clone(), |s, object| {
                let (v, before) =
                    s.update_target(&name, address.as_deref(), host_key.as_deref())?;
                let mut what = Vec::new();
                let mut said = Vec::new();
                if let Some(a) = &address {
                    let a = a.trim();
                    what.push(format!("address {} -> {a}", before.address));
                    said.push(format!("address {a}"));
                }
                if let Some(k) = &host_key {
                    let fp = validate::fingerprint(k);
                    let pin = match before.protocol {
                        Protocol::Ssh => "host key",
                        Protocol::Rdp => "certificate",
                        Protocol::Tcp => "pin",
                    };
                    what.push(format!(
                        "{pin} {} -> {fp}",
                        validate::fingerprint(&before.host_key)
                    ));
                    said.push(format!("{pin} {fp}"));
                }
                *object = format!("{name} ({})", what.join(", "));
                Ok((v, format!("updated target {name} ({})", said.join(", "))))
            }),
            Request::TargetRemove { name } => {
                self.change(actor, "target remove", name.clone(), |s, _| {
                    let r = s.remove_target(&name)?;
                    Ok((
                        r.version,
                        format!("removed target {name}{}", removed_suffix(&r)),
                    ))
                })
            }
            Request::TargetList => self.read(|s| s.list_targets()),
            Request::AccountAdd {
                target,
                username,
                credential,
                domain,
            } => {
                let kind = CredentialKind::of(&credential).as_str();
                let what = match &domain {
                    Some(d) => format!("{kind}, domain {}", psm_control_api::escape(d)),
                    None => kind.to_string(),
                };
                let object = format!("{username}@{target} ({what})");
                self.change(actor, "account add", object, |s, _| {
                    let v = s.add_account_with(
                        &self.vault,
                        &target,
                        &username,
                        &credential,
                        domain.as_deref(),
                    )?;
                    Ok((v, format!("added account {username}@{target} ({what})")))
                })
            }
            Request::AccountRemove { target, username } => self.change(
                actor,
                "account remove",
                format!("{username}@{target}"),
                |s, _| {
                    let r = s.remove_account(&target, &username)?;
                    let r = Removed { accounts: 0, ..r };
                    Ok((
                        r.version,
                        format!("removed account {username}@{target}{}", removed_suffix(&r)),
                    ))
                },
            ),
            Request::AccountList => self.read(|s| s.list_accounts()),
            Request::GrantAdd {
                user,
                target,
                account,
                allow_env,
                mut conditions,
            } => {
                conditions.allow_env.extend(allow_env);
                if let Some(bad) = conditions
                    .allow_env
                    .iter()
                    .find(|n| !validate::env_pattern(n))
                {
                    return Response::error(format!(
                        "invalid environment variable name {}: use letters, digits and _, optionally ending in *",
                        psm_control_api::escape(bad)
                    ));
                }
                if let Err(e) = conditions.validate() {
                    return Response::error(e);
                }
                let mut object = format!("{user} -> {account}@{target}");
                let described = conditions.describe();
                if !described.is_empty() {
                    object.push_str(&format!(" ({})", described.join("; ")));
                }
                self.change(actor, "grant add", object.clone(), |s, _| {
                    let v = s.add_grant_with(&user, &target, &account, &conditions)?;
                    Ok((v, format!("added grant {object}")))
                })
            }
            Request::GrantRemove {
                user,
                target,
                account,
            } => {
                let object = format!("{user} -> {account}@{target}");
                self.change(actor, "grant remove", object.clone(), |s, _| {
                    let v = s.remove_grant(&user, &target, &account)?;
                    Ok((v, format!("removed grant {object}")))
                })
            }
            Request::GrantList => self.read(|s| s.list_grants()),
            Request::SessionsList => {
                // the protocol of each session's target, from the store (a sessions list is rare)
                let protocols = self.target_protocols();
                let mut list: Vec<SessionInfo> = lock(&self.sessions)
                    .values()
                    .filter(|s| s.lost.is_none())
                    .map(|s| SessionInfo {
                        bytes_up: s.bytes_up,
                        bytes_down: s.bytes_down,
                        protocol: protocols
                            .get(&s.info.session.target)
                            .copied()
                            .unwrap_or_default(),
                        ..s.info.clone()
                    })
                    .collect();
                list.sort_by(|a, b| {
                    (a.session.start_ms, &a.session.session_id)
                        .cmp(&(b.session.start_ms, &b.session.session_id))
                });
                Response::ok(&list)
            }
            // every other request is answered by `handle_governance`
            _ => Response::error("internal error: request not handled"),
        }
    }
}

pub(super) async fn serve_control(shared: Arc<Shared>, stream: UnixStream) {
    let peer = stream.peer_cred();
    let (r, mut w) = stream.into_split();
    let reply = |resp: Response| {
        let mut line = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        line
    };
    let uid = match peer {
        Ok(c) if c.uid() == shared.owner_uid => c.uid(),
        other => {
            let why = match other {
                Ok(c) => format!(
                    "permission denied: uid {} does not own the data directory (owner uid {})",
                    c.uid(),
                    shared.owner_uid
                ),
                Err(e) => format!("permission denied: cannot check peer credentials: {e}"),
            };
            warn!(reason = %why, "refused psmctl connection");
            let _ = w.write_all(&reply(Response::error(why))).await;
            return;
        }
    };
    let actor = match tokio::task::spawn_blocking(move || Actor::lookup(uid)).await {
        Ok(a) => a,
        Err(_) => Actor { uid, name: None },
    };
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.zeroize();
        match read_line(&mut reader, &mut buf, MAX_REQUEST).await {
            Ok(Line::Data) => {}
            Ok(Line::Eof) => break,
            Ok(Line::TooLong) => {
                let msg = format!("request longer than {MAX_REQUEST} bytes");
                let _ = w.write_all(&reply(Response::error(msg))).await;
                break;
            }
            Err(e) => {
                debug!(error = %e, "psmctl connection read failed");
                break;
            }
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let resp = match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => {
                let (shared, actor) = (shared.clone(), actor.clone());
                tokio::task::spawn_blocking(move || shared.handle(req, &actor))
                    .await
                    .unwrap_or_else(|e| Response::error(format!("request failed: {e}")))
            }
            Err(e) => Response::error(format!("malformed request: {e}")),
        };
        buf.zeroize();
        if let Err(e) = w.write_all(&reply(resp)).await {
            debug!(error = %e, "psmctl connection write failed");
            break;
        }
    }
    buf.zeroize();
}

/// Free space and inodes of the file system holding `dir`.
fn disk_space(dir: &Path) -> Result<crate::protocol::DiskSpace, String> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let frag = st.fragment_size() as u64;
    Ok(crate::protocol::DiskSpace {
        path: dir.display().to_string(),
        free_bytes: (st.blocks_available() as u64).saturating_mul(frag),
        total_bytes: (st.blocks() as u64).saturating_mul(frag),
        free_inodes: st.files_available() as u64,
    })
}
