//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests for the relay's
//! parsers of what a peer chose: the command gate reads the target's terminal output and the
//! user's keys; the file-transfer readers read SFTP and legacy SCP both ways.

use crate::commands::Gate;
use crate::transfer::Transfer;

/// Terminal output and keystrokes, interleaved: reading the command line never panics, and a
/// line without a terminal is split at newlines with nothing lost.
///
/// The first byte picks the terminal size (or none); then each chunk of up to 64 bytes goes to
/// the target side or the user side by the low bit of its first byte.
pub fn gate(data: &[u8]) {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let pty = (size != 0).then(|| (u32::from(size % 200) + 1, u32::from(size / 4 % 60) + 1));
    let gate = Gate::new(pty);
    let mut fed_stdin = 0usize;
    let mut got_stdin = 0usize;
    for chunk in rest.chunks(64) {
        let Some((&sel, body)) = chunk.split_first() else {
            continue;
        };
        match sel % 4 {
            0 => gate.output(body),
            1 => {
                gate.typing();
                gate.output(body);
            }
            2 => {
                let _ = gate.screen_line();
                gate.line_done();
            }
            _ => {
                fed_stdin += body.len();
                got_stdin += gate
                    .stdin_lines(body)
                    .iter()
                    .map(|(l, _)| l.len())
                    .sum::<usize>();
                if sel & 0x10 != 0 {
                    gate.resize(u32::from(sel), u32::from(size));
                }
            }
        }
    }
    let _ = gate.screen_line();
    got_stdin += gate.stdin_rest().len();
    assert_eq!(fed_stdin, got_stdin, "input lines lose nothing");
}

/// SFTP bytes both ways, as the relay feeds them: the parser never panics, keeps its bounds,
/// hashes only what it does not call partial, and says nothing more once it gave up.
///
/// Each chunk starts with a byte: its low bit picks the side (0: the user, 1: the target), the
/// rest is the chunk's length (0 to 127).
pub fn sftp(data: &[u8]) {
    transfer(Transfer::sftp(), data);
}

/// Legacy SCP bytes both ways (chunks as in [`sftp`]); the first byte picks the command line
/// (upload or download, recursive, into a directory), or with its top bit set, the command
/// line is the data's first line: the channel's kind and the transfer reader agree on whether
/// it is scp.
pub fn scp(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick & 0x80 != 0 {
        let (line, rest) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let cmd = String::from_utf8_lossy(line);
        let kind = psm_control_api::ChannelKind::of_exec(&cmd);
        let t = Transfer::scp(&cmd);
        assert_eq!(
            kind == psm_control_api::ChannelKind::Scp,
            t.is_some(),
            "kind and reader agree on {cmd:?}"
        );
        if let Some(t) = t {
            transfer(t, rest);
        }
        return;
    }
    let cmd = [
        "scp -t /tmp/x",
        "scp -f /srv/f",
        "scp -r -t -- /tmp/dir",
        "scp -r -p -f '/srv/a b'",
        "scp -d -t /tmp/dst",
    ][usize::from(pick) % 5];
    if let Some(t) = Transfer::scp(cmd) {
        transfer(t, rest);
    }
}

fn transfer(mut t: Transfer, mut data: &[u8]) {
    let mut stopped = false;
    while let Some((&sel, rest)) = data.split_first() {
        let n = usize::from(sel >> 1).min(rest.len());
        let (chunk, rest) = rest.split_at(n);
        data = rest;
        let fed = if sel & 1 == 0 {
            t.up(chunk)
        } else {
            t.down(chunk)
        };
        if stopped {
            assert!(
                fed.events.is_empty() && fed.gave_up.is_none(),
                "nothing after giving up"
            );
        }
        stopped |= fed.gave_up.is_some();
        check(&fed.events);
    }
    check(&t.finish());
    assert!(t.finish().is_empty(), "finished once");
}

fn check(events: &[crate::transfer::Event]) {
    for e in events {
        assert!(
            !(e.partial && e.sha256.is_some()),
            "a partial transfer is not hashed"
        );
        assert!(
            e.path.len() <= crate::transfer::MAX_PATH + 64,
            "paths are cut"
        );
    }
}

/// RDP framing as the relay's RDP legs cut their streams: never panics, and every length it
/// gives covers at least a header and at most [`crate::rdp::frame::MAX_FRAME`].
pub fn rdp_frame(data: &[u8]) {
    use crate::rdp::frame::{next_frame, next_ts_request, MAX_FRAME};
    let mut rest = data;
    while let Ok(Some((_, len))) = next_frame(rest) {
        assert!((2..=MAX_FRAME).contains(&len), "frame length {len}");
        let Some(next) = rest.get(len..) else {
            break;
        };
        rest = next;
    }
    if let Ok(Some(len)) = next_ts_request(data) {
        assert!((2..=MAX_FRAME).contains(&len), "TsRequest length {len}");
    }
}

/// The grant's RDP channel rules picked by one byte (clipboard rule, device kinds, audio).
fn rdp_rules(pick: u8) -> psm_control_api::RdpChannels {
    use psm_control_api::ClipboardRule;
    psm_control_api::RdpChannels {
        clipboard: [
            ClipboardRule::None,
            ClipboardRule::ToTarget,
            ClipboardRule::FromTarget,
            ClipboardRule::Both,
        ][usize::from(pick % 4)],
        drive: pick & 0x04 != 0,
        printer: pick & 0x08 != 0,
        smartcard: pick & 0x10 != 0,
        audio: pick & 0x20 != 0,
        channels: Vec::new(),
    }
}

/// Frames from the client, after a real Connect Initial and Connect Response (and, unless the
/// first byte's top bit is set, the Client Info): the engine never panics, stops at its first
/// error, and never records the vaulted password.
///
/// The first byte picks the channel rules (see `rdp_rules`); the rest is the client's byte
/// stream, cut into frames the way the relay cuts it.
pub fn rdp_engine_client(data: &[u8]) {
    rdp_engine(data, true);
}

/// Frames from the target, after a real connection set-up: as [`rdp_engine_client`].
pub fn rdp_engine_target(data: &[u8]) {
    rdp_engine(data, false);
}

fn rdp_engine(data: &[u8], from_client: bool) {
    use crate::rdp::engine::{samples, Engine, Out};
    use crate::rdp::frame::{next_frame, FrameKind};
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    // 0x40: from the start of the MCS phase (the client's Connect Initial, or the target's
    // Connect Response, fuzzed); else 0x80 (client): before the Client Info; else connected
    let mut engine = if pick & 0x40 != 0 {
        let mut e = Engine::new(samples::config(rdp_rules(pick)));
        if !from_client {
            let ci = samples::connect_initial(&samples::CHANNELS, 0x409).expect("sample");
            e.client_frame(FrameKind::X224, &ci, &mut Vec::new())
                .expect("the sample Connect Initial");
        }
        e
    } else {
        let set_up = if from_client && pick & 0x80 != 0 {
            samples::before_client_info(rdp_rules(pick))
        } else {
            samples::connected(rdp_rules(pick))
        };
        set_up.expect("the samples set a connection up").0
    };
    let vault: Vec<u8> = samples::VAULT_PASSWORD
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let planted = data.windows(vault.len()).any(|w| w == vault);
    while let Ok(Some((kind, len))) = next_frame(rest) {
        let Some(frame) = rest.get(..len) else {
            break;
        };
        rest = &rest[len..];
        let mut out = Vec::new();
        let r = if from_client {
            engine.client_frame(kind, frame, &mut out)
        } else {
            engine.target_frame(kind, frame, &mut out)
        };
        for o in &out {
            if let Out::Record { pdu, .. } = o {
                assert!(
                    planted || !pdu.windows(vault.len()).any(|w| w == vault),
                    "vaulted password recorded"
                );
            }
        }
        if r.is_err() {
            break;
        }
    }
    let _ = engine.take_input_seen();
}

/// What an RDP client sends before it is authenticated, as psm reads it: the X.224 Connection
/// Request (the first byte even), or (odd) a CredSSP user name and domain, where a TOTP code
/// and a reason may ride: never panics, and a code psm finds is six digits.
pub fn rdp_accept(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick & 1 == 0 {
        let _ = crate::rdp::accept::negotiate(rest);
        return;
    }
    let text = String::from_utf8_lossy(rest);
    let (user, domain) = text.split_once('\n').unwrap_or((&text, ""));
    let name = if domain.is_empty() {
        user.to_string()
    } else {
        format!("{domain}\\{user}")
    };
    if let Ok(u) = sspi::Username::parse(&name) {
        let login = crate::rdp::credssp::NlaLogin::from_username(&u);
        if let Some(code) = &login.code {
            assert!(
                code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()),
                "code {:?}",
                code.as_str()
            );
        }
        let _ = login.reason(true);
    }
}

/// What an SSH client sends before the key exchange ends, as psm's russh (with psm's patches
/// to its packet reader) reads it: the data follows a client identification line, as packets
/// in the clear (the length probe, padding cut, KEXINIT and what may come before it). psm's
/// server configuration, one fixed host key; never panics, and ends on its own (the input
/// runs out: end of stream).
pub fn ssh_preauth(data: &[u8]) {
    use std::sync::{Arc, OnceLock};
    use tokio::io::AsyncWriteExt as _;
    struct Refuse;
    impl russh::server::Handler for Refuse {
        type Error = russh::Error;
    }
    static CONFIG: OnceLock<Arc<russh::server::Config>> = OnceLock::new();
    let config = CONFIG
        .get_or_init(|| {
            let key = russh::keys::PrivateKey::from(
                russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7u8; 32]),
            );
            Arc::new(russh::server::Config {
                keys: vec![key],
                auth_rejection_time: std::time::Duration::ZERO,
                auth_rejection_time_initial: Some(std::time::Duration::ZERO),
                inactivity_timeout: Some(std::time::Duration::from_secs(2)),
                window_size: crate::flow::WINDOW,
                maximum_packet_size: crate::flow::MAX_PACKET,
                preferred: russh::Preferred {
                    cipher: std::borrow::Cow::Borrowed(crate::CIPHERS),
                    ..Default::default()
                },
                ..Default::default()
            })
        })
        .clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let session = async {
            if let Ok(running) = russh::server::run_stream(config, server, Refuse).await {
                let _ = running.await;
            }
        };
        let feed = async {
            let _ = client.write_all(b"SSH-2.0-fuzz\r\n").await;
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            client
        };
        // the session ends at the end of the input; 10 s is a hang
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let (_, client) = tokio::join!(session, feed);
            drop(client);
        })
        .await;
        assert!(ended.is_ok(), "the session did not end with its input");
    });
}
