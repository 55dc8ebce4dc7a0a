//! The first factor: which methods psm offers, a public key registered to the user, a password
//! checked against its stored hash off the worker's event loop.

use psm_control_api::{PolicySnapshot, RelayToControl};
use russh::keys::PublicKey;
use russh::server::Auth;
use russh::{MethodKind, MethodSet};

use super::WorkerCtx;

fn methods() -> MethodSet {
    MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..])
}

pub(super) fn second_factor() -> MethodSet {
    MethodSet::from(&[MethodKind::KeyboardInteractive][..])
}

pub(super) fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(methods()),
        partial_success: false,
    }
}

pub(super) fn key_registered(
    snap: &PolicySnapshot,
    user: &str,
    key: &PublicKey,
) -> Result<(), &'static str> {
    let u = snap.user(user).ok_or("unknown user")?;
    let found = u.ssh_keys.iter().any(|line| {
        PublicKey::from_openssh(line)
            .map(|k| k.key_data() == key.key_data())
            .unwrap_or(false)
    });
    if found {
        Ok(())
    } else {
        Err("public key not registered for this user")
    }
}

/// Whether `password` is `user`'s (its reason when not). argon2id and PBKDF2 take tens of
/// milliseconds: they run off the worker's event loop. A legacy PBKDF2 verifier is replaced by an
/// argon2id one.
pub(super) async fn check_password(
    ctx: &WorkerCtx,
    user: &str,
    password: &str,
) -> Result<(), &'static str> {
    let snap = ctx.policy.get();
    match snap.user(user).map(|u| u.password.clone()) {
        None => Err("unknown user"),
        Some(None) => Err("password login not enabled for this user"),
        Some(Some(hash)) => {
            let pw = zeroize::Zeroizing::new(password.to_string());
            let audit = ctx.audit.clone();
            let name = user.to_string();
            let ok = tokio::task::spawn_blocking(move || {
                let ok = hash.verify(&pw);
                if ok && hash.needs_rehash() {
                    if let Ok(new) = psm_control_api::PasswordHash::new(&pw) {
                        audit.report(RelayToControl::Rehash {
                            user: name,
                            old: hash,
                            new,
                        });
                    }
                }
                ok
            })
            .await
            .unwrap_or(false);
            if ok {
                Ok(())
            } else {
                Err("wrong password")
            }
        }
    }
}
