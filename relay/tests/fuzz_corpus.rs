//! Replays the committed fuzz corpora of the relay's parsers of peer bytes (see `fuzz/`): the
//! command gate, the sftp and legacy scp readers, and the RDP framing and engine.

use std::path::PathBuf;

fn replay(name: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(e.expect("entry").path()).expect("read");
        f(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn command_gate_corpus() {
    replay("command_gate", psm_relay::fuzz::gate);
}

#[test]
fn sftp_transfer_corpus() {
    replay("sftp_transfer", psm_relay::fuzz::sftp);
}

#[test]
fn scp_transfer_corpus() {
    replay("scp_transfer", psm_relay::fuzz::scp);
}

#[test]
fn rdp_frame_corpus() {
    replay("rdp_frame", psm_relay::fuzz::rdp_frame);
}

#[test]
fn rdp_engine_client_corpus() {
    replay("rdp_engine_client", psm_relay::fuzz::rdp_engine_client);
}

#[test]
fn rdp_engine_target_corpus() {
    replay("rdp_engine_target", psm_relay::fuzz::rdp_engine_target);
}

#[test]
fn rdp_accept_corpus() {
    replay("rdp_accept", psm_relay::fuzz::rdp_accept);
}

#[test]
fn ssh_preauth_corpus() {
    replay("ssh_preauth", psm_relay::fuzz::ssh_preauth);
}
