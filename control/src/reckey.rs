//! The recording key as psmctl finds it: `[recorder] encryption_key_file` in
//! `<data-dir>/psm.toml`, the file `psm up` reads by default (a relative path is taken from
//! the data directory). It is read only when a recording needs it, so a replay of an
//! unencrypted recording never depends on it; verification never needs it.
//!
//! What it does not do: check the rest of `psm.toml` (`psm up` does), or create keys (see
//! `psm_recorder_format::crypt::RecordingKey::create`, behind `psmctl recordings keygen`).

use std::io::Read;
use std::path::{Path, PathBuf};

use psm_evidence::KeyId;
use psm_recorder_format::crypt::RecordingKey;
use psm_recorder_format::file::RecordingReader;
use serde::Deserialize;

use crate::recordings::RecordingError;

/// The name of the config file in the data directory.
const CONFIG_FILE: &str = "psm.toml";

/// The `[recorder]` settings psmctl uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecorderSettings {
    /// Where the recording key is, when recordings are encrypted.
    pub key_file: Option<PathBuf>,
    /// Whether encrypted recordings go into the search index.
    pub index_encrypted: bool,
}

/// Only what psmctl needs of `psm.toml`; `psm up` checks the whole file.
#[derive(Deserialize)]
struct Partial {
    #[serde(default)]
    recorder: Option<RecorderTable>,
}

#[derive(Deserialize)]
struct RecorderTable {
    encryption_key_file: Option<String>,
    #[serde(default)]
    index_encrypted: bool,
}

/// Reads the `[recorder]` table of `<data_dir>/psm.toml`; no file: defaults.
pub fn settings(data_dir: &Path) -> Result<RecorderSettings, RecordingError> {
    let path = data_dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(RecorderSettings::default())
        }
        Err(e) => {
            return Err(RecordingError::Config {
                path,
                message: e.to_string(),
            })
        }
    };
    let partial: Partial = toml::from_str(&text).map_err(|e| RecordingError::Config {
        path: path.clone(),
        message: e.message().to_string(),
    })?;
    let Some(r) = partial.recorder else {
        return Ok(RecorderSettings::default());
    };
    Ok(RecorderSettings {
        key_file: r.encryption_key_file.map(|f| {
            let joined = data_dir.join(f);
            std::path::absolute(&joined).unwrap_or(joined)
        }),
        index_encrypted: r.index_encrypted,
    })
}

/// The key that recording `recording` (encrypted with `key_id`) needs: an error that says so
/// when none is configured, or when the configured one is another.
pub fn key_for(
    data_dir: &Path,
    recording: &str,
    key_id: KeyId,
) -> Result<RecordingKey, RecordingError> {
    let Some(path) = settings(data_dir)?.key_file else {
        return Err(RecordingError::KeyNeeded {
            recording: recording.to_string(),
            key_id,
        });
    };
    Ok(RecordingKey::read(&path)?)
}

/// The key recording `r` needs: `None` when it is not encrypted (only its header is read).
pub fn key_if_encrypted<R: Read>(
    data_dir: &Path,
    r: R,
) -> Result<Option<RecordingKey>, RecordingError> {
    let reader = RecordingReader::open(r)?;
    match reader.encrypted_with() {
        Some(key_id) => Ok(Some(key_for(
            data_dir,
            &reader.meta().recording_id,
            key_id,
        )?)),
        None => Ok(None),
    }
}

/// Opens a recording for replay, decrypting it when it is encrypted. `open` gives the
/// recording's bytes from the start (it is called twice: the header says whether a key is
/// needed).
pub fn open_for_replay<R: Read>(
    data_dir: &Path,
    mut open: impl FnMut() -> Result<R, RecordingError>,
) -> Result<RecordingReader<R>, RecordingError> {
    let key = key_if_encrypted(data_dir, open()?)?;
    Ok(RecordingReader::open_with_key(open()?, key.as_ref())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_recorder_table_only() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(
            settings(dir.path()).expect("none"),
            RecorderSettings::default()
        );
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "[relay]\nworkers = 2\n[recorder]\nencryption_key_file = \"keys/rec.key\"\n",
        )
        .expect("write");
        let s = settings(dir.path()).expect("settings");
        assert_eq!(s.key_file, Some(dir.path().join("keys/rec.key")));
        assert!(!s.index_encrypted);
        let e = key_for(dir.path(), "r1", KeyId([1; 8])).expect_err("no such file");
        assert!(e.to_string().contains("keys/rec.key"), "{e}");
        std::fs::write(dir.path().join(CONFIG_FILE), "[recorder]\n").expect("write");
        let e = key_for(dir.path(), "r1", KeyId([1; 8])).expect_err("none configured");
        assert_eq!(
            e.to_string(),
            "recording r1 is encrypted with key 0101010101010101; configure [recorder] encryption_key_file in psm.toml"
        );
    }
}
