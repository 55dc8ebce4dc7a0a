//! `psm.toml` and the settings `psm up` runs with: file values, command-line overrides on top,
//! validated once ([`resolve`]).
//!
//! What it does not do: create the data directory or look at any other file in it.

use std::io;
use std::path::PathBuf;

mod file;
mod settings;
pub use file::{
    line_col, load, parse, ControlConfig, FileConfig, LoadedConfig, PolicyConfig, RecorderConfig,
    RelayConfig,
};
pub use settings::{default_workers, key_file_path, resolve, Overrides, Settings};

/// File name of the optional config file inside the data directory.
pub const CONFIG_FILE: &str = "psm.toml";
/// Where the relay listens when neither the file nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2222";
/// Where the relay accepts RDP when neither the file nor `--rdp-listen` says.
pub const DEFAULT_RDP_LISTEN: &str = "0.0.0.0:3389";
/// The most relay workers `psm up` accepts.
pub const MAX_WORKERS: i64 = 1024;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config {}: {source}", .path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The config file is not valid TOML or does not fit [`FileConfig`].
    #[error("config {}: {where_}{message}", .path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// `line L, column C: ` when toml knows the place, else empty.
        where_: String,
        /// What toml says is wrong.
        message: String,
    },
    /// A `[[siem.sink]]` is unusable (the message names the file, place and field).
    #[error("{0}")]
    Siem(String),
    /// A value is out of range or malformed.
    #[error("{origin}: {message}")]
    Invalid {
        /// `config <path>: line L, column C` or the command-line flag.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(text: &str) -> Result<LoadedConfig, ConfigError> {
        let path = PathBuf::from("/etc/psm/psm.toml");
        parse(&path, text).map(|config| LoadedConfig {
            path,
            text: text.to_string(),
            config,
        })
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_and_no_file_give_defaults() {
        let f = loaded("").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 6).expect("resolve");
        assert_eq!(s.listen, "0.0.0.0:2222".parse().expect("addr"));
        assert_eq!(s.workers, 6);
        assert_eq!(resolve(None, &Overrides::default(), 6).expect("resolve"), s);
        assert_eq!(
            resolve(None, &Overrides::default(), 5000)
                .expect("resolve")
                .workers,
            1024
        );
    }

    #[test]
    fn the_policy_table_reaches_psm_control() {
        let f = loaded(
            "[policy]\nmfa = \"required\"\nlockout_failures = 3\nlockout_window = \"30m\"\n",
        )
        .expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        for flag in [
            "--mfa-required",
            "--lockout-failures",
            "3",
            "--lockout-window",
            "30m",
        ] {
            assert!(
                s.control_args.iter().any(|a| a == flag),
                "{flag}: {:?}",
                s.control_args
            );
        }
        let per_grant = loaded("[policy]\nmfa = \"per-grant\"\n").expect("parse");
        let s = resolve(Some(&per_grant), &Overrides::default(), 2).expect("resolve");
        assert!(!s.control_args.iter().any(|a| a == "--mfa-required"));
        for (bad, needle) in [
            (
                "[policy]\nmfa = \"sometimes\"\n",
                "expected \"required\" or \"per-grant\"",
            ),
            ("[policy]\nlockout_window = \"soon\"\n", "lockout_window"),
            (
                "[policy]\nlockout_failures = 0\n",
                "lockout_failures must be between 1 and 1000",
            ),
            ("[policy]\nmfa_required = true\n", "unknown field"),
        ] {
            let e = match loaded(bad) {
                Ok(f) => err_text(resolve(Some(&f), &Overrides::default(), 2)),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn the_audit_checkpoint_interval_reaches_psm_control() {
        let f = loaded("[control]\naudit_checkpoint_every = 50\n").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        assert!(
            s.control_args
                .windows(2)
                .any(|w| w == ["--audit-checkpoint-every", "50"]),
            "{:?}",
            s.control_args
        );
        let f = loaded("[control]\naudit_checkpoint_every = 0\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.contains("audit_checkpoint_every must be between 1 and 1000000"),
            "{e}"
        );
    }

    #[test]
    fn audit_rotation_and_retention_reach_psm_control() {
        let f = loaded(
            "[control]\naudit_rotate_bytes = 4096\naudit_rotate_interval = \"12h\"\naudit_retention_max_age = \"400d\"\naudit_retention_max_bytes = 1000000\n",
        )
        .expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        for pair in [
            ["--audit-rotate-bytes", "4096"],
            ["--audit-rotate-interval", "12h"],
            ["--audit-retention-max-age", "400d"],
            ["--audit-retention-max-bytes", "1000000"],
        ] {
            assert!(
                s.control_args.windows(2).any(|w| w == pair),
                "{pair:?} in {:?}",
                s.control_args
            );
        }
        for (bad, needle) in [
            (
                "[control]\naudit_rotate_bytes = 10\n",
                "audit_rotate_bytes must be between 1024 and",
            ),
            (
                "[control]\naudit_rotate_interval = \"often\"\n",
                "audit_rotate_interval",
            ),
            (
                "[control]\naudit_retention_max_age = \"x\"\n",
                "audit_retention_max_age",
            ),
            (
                "[control]\naudit_retention_max_bytes = 0\n",
                "audit_retention_max_bytes must be between 1 and",
            ),
        ] {
            let f = loaded(bad).expect("parse");
            let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn siem_sinks_are_checked_and_reach_psm_control() {
        let f = loaded(
            "[[siem.sink]]\nname = \"soc\"\ntransport = \"udp\"\naddress = \"127.0.0.1:514\"\nformat = \"ocsf\"\n",
        )
        .expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        assert_eq!(
            s.control_args[s.control_args.len() - 2..],
            ["--config".to_string(), "/etc/psm/psm.toml".to_string()]
        );
        let none =
            resolve(Some(&loaded("").expect("parse")), &Overrides::default(), 2).expect("resolve");
        assert!(!none.control_args.iter().any(|a| a == "--config"));
        let bad = loaded("[[siem.sink]]\nname = \"soc\"\ntransport = \"tls\"\naddress = \"127.0.0.1:6514\"\nca = \"/nonexistent/ca.pem\"\n")
            .expect("parse");
        let e = err_text(resolve(Some(&bad), &Overrides::default(), 2));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 5, column 6: siem.sink[0].ca: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let e = err_text(loaded("[[siem.sink]]\nname = \"soc\"\nport = 1\n"));
        assert!(
            e.contains("line 3, column 1") && e.contains("unknown field `port`"),
            "{e}"
        );
    }

    #[test]
    fn the_recording_key_reaches_psm_recorder_once_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let cfg = dir.path().join("psm.toml");
        let load = |text: &str| LoadedConfig {
            path: cfg.clone(),
            text: text.to_string(),
            config: parse(&cfg, text).expect("parse"),
        };
        let text = "[recorder]\nencryption_key_file = \"rec.key\"\nindex_encrypted = true\n";
        let e = err_text(resolve(Some(&load(text)), &Overrides::default(), 2));
        assert!(
            e.contains("line 2, column 23") && e.contains("encryption_key_file: recording key"),
            "{e}"
        );
        let key = dir.path().join("rec.key");
        psm_recorder_format::crypt::RecordingKey::create(&key).expect("key");
        let s = resolve(Some(&load(text)), &Overrides::default(), 2).expect("resolve");
        assert_eq!(
            s.recorder_args,
            [
                "--encryption-key-file".to_string(),
                key.display().to_string(),
                "--index-encrypted".to_string()
            ]
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = err_text(resolve(Some(&load(text)), &Overrides::default(), 2));
        assert!(e.contains("mode 0644 lets others read it"), "{e}");
        let e = err_text(
            loaded("[recorder]\nindex_encrypted = true\n")
                .and_then(|f| resolve(Some(&f), &Overrides::default(), 2)),
        );
        assert!(
            e.contains("index_encrypted needs encryption_key_file"),
            "{e}"
        );
    }

    #[test]
    fn file_values_are_used() {
        let f = loaded("[relay]\nlisten = \"127.0.0.1:2022\"\nworkers = 3\n").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 8).expect("resolve");
        assert_eq!(s.listen, "127.0.0.1:2022".parse().expect("addr"));
        assert_eq!(s.workers, 3);
    }

    #[test]
    fn command_line_overrides_file() {
        let f = loaded("[relay]\nlisten = \"127.0.0.1:2022\"\nworkers = 3\n").expect("parse");
        let cli = Overrides {
            listen: Some("[::1]:2200".into()),
            workers: None,
            rdp_listen: None,
        };
        let s = resolve(Some(&f), &cli, 8).expect("resolve");
        assert_eq!(s.listen, "[::1]:2200".parse().expect("addr"));
        assert_eq!(s.workers, 3, "file value kept where no flag is given");
        let cli = Overrides {
            listen: None,
            workers: Some(16),
            rdp_listen: None,
        };
        let s = resolve(Some(&f), &cli, 8).expect("resolve");
        assert_eq!(s.listen, "127.0.0.1:2022".parse().expect("addr"));
        assert_eq!(s.workers, 16);
        // A flag overrides even a broken file value: only the value in use is validated.
        let bad = loaded("[relay]\nlisten = \"nowhere\"\n").expect("parse");
        let cli = Overrides {
            listen: Some("0.0.0.0:22".into()),
            workers: None,
            rdp_listen: None,
        };
        assert!(resolve(Some(&bad), &cli, 1).is_ok());
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name_and_place() {
        let e = err_text(loaded("[relay]\nlisten = \"0.0.0.0:2222\"\nthreads = 4\n"));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 3, column 1: "),
            "{e}"
        );
        assert!(e.contains("unknown field `threads`"), "{e}");
        let e = err_text(loaded("[recordings]\n"));
        assert!(e.contains("unknown field `recordings`"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn syntax_and_type_errors_have_line_and_column() {
        let e = err_text(loaded("[relay]\nlisten = \n"));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 2, column "),
            "{e}"
        );
        let e = err_text(loaded("[relay]\nworkers = \"four\"\n"));
        assert!(e.contains("line 2, column 11"), "{e}");
    }

    #[test]
    fn bad_listen_address_is_rejected() {
        let f = loaded("[relay]\n  listen = \"localhost\"\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.starts_with(
                "config /etc/psm/psm.toml: line 2, column 12: listen address \"localhost\""
            ),
            "{e}"
        );
        let cli = Overrides {
            listen: Some("1.2.3.4".into()),
            workers: None,
            rdp_listen: None,
        };
        let e = err_text(resolve(None, &cli, 2));
        assert!(
            e.starts_with("--listen: listen address \"1.2.3.4\" is not a socket address"),
            "{e}"
        );
    }

    #[test]
    fn workers_out_of_range_are_rejected() {
        let f = loaded("[relay]\nworkers = 0\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.contains("line 2, column 11: workers must be between 1 and 1024, not 0"),
            "{e}"
        );
        let cli = Overrides {
            listen: None,
            workers: Some(1025),
            rdp_listen: None,
        };
        let e = err_text(resolve(None, &cli, 2));
        assert_eq!(e, "--workers: workers must be between 1 and 1024, not 1025");
        let cli = Overrides {
            listen: None,
            workers: Some(1024),
            rdp_listen: None,
        };
        assert_eq!(resolve(None, &cli, 2).expect("max").workers, 1024);
    }

    #[test]
    fn load_reads_default_file_only_when_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(None, dir.path()).expect("absent").is_none());
        assert!(load(None, &dir.path().join("missing/dir"))
            .expect("absent")
            .is_none());
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").expect("write");
        assert!(load(None, &file).expect("data dir is a file").is_none());
        std::fs::write(dir.path().join(CONFIG_FILE), "[relay]\nworkers = 2\n").expect("write");
        let c = load(None, dir.path()).expect("load").expect("present");
        assert_eq!(c.config.relay.workers.map(|w| *w.get_ref()), Some(2));
        let missing = dir.path().join("other.toml");
        let e = err_text(load(Some(&missing), dir.path()));
        assert!(
            e.starts_with(&format!("config {}: ", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn rdp_listen_defaults_overrides_and_off() {
        let s = resolve(None, &Overrides::default(), 2).expect("resolve");
        assert_eq!(s.rdp_listen, Some("0.0.0.0:3389".parse().expect("addr")));
        let f = loaded("[relay]\nrdp_listen = \"127.0.0.1:13389\"\n").expect("parse");
        let s = resolve(Some(&f), &Overrides::default(), 2).expect("resolve");
        assert_eq!(s.rdp_listen, Some("127.0.0.1:13389".parse().expect("addr")));
        let off = Overrides {
            rdp_listen: Some("off".into()),
            ..Overrides::default()
        };
        assert_eq!(resolve(Some(&f), &off, 2).expect("off").rdp_listen, None);
        let f = loaded("[relay]\nrdp_listen = \"off\"\n").expect("parse");
        assert_eq!(
            resolve(Some(&f), &Overrides::default(), 2)
                .expect("off")
                .rdp_listen,
            None
        );
        let f = loaded("[relay]\nrdp_listen = \"3389\"\n").expect("parse");
        let e = err_text(resolve(Some(&f), &Overrides::default(), 2));
        assert!(
            e.starts_with("config /etc/psm/psm.toml: line 2, column 14: rdp listen address \"3389\" is not a socket address"),
            "{e}"
        );
        let bad = Overrides {
            rdp_listen: Some("nowhere".into()),
            ..Overrides::default()
        };
        let e = err_text(resolve(None, &bad, 2));
        assert!(e.starts_with("--rdp-listen: rdp listen address"), "{e}");
        // not on the SSH listener's port
        let same = Overrides {
            listen: Some("0.0.0.0:3389".into()),
            ..Overrides::default()
        };
        let e = err_text(resolve(None, &same, 2));
        assert!(e.contains("cannot share the SSH listener's address"), "{e}");
        let apart = Overrides {
            listen: Some("127.0.0.1:2222".into()),
            rdp_listen: Some("127.0.0.2:2222".into()),
            ..Overrides::default()
        };
        assert!(resolve(None, &apart, 2).is_ok());
    }

    #[test]
    fn rdp_certificate_files_are_checked_and_passed() {
        let dir = tempfile::tempdir().expect("dir");
        let cfg = dir.path().join("psm.toml");
        let load = |text: &str| LoadedConfig {
            path: cfg.clone(),
            text: text.to_string(),
            config: parse(&cfg, text).expect("parse"),
        };
        let e = err_text(resolve(
            Some(&load("[relay]\nrdp_cert = \"c.pem\"\n")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("give rdp_cert and rdp_key together"), "{e}");
        let both = "[relay]\nrdp_cert = \"c.pem\"\nrdp_key = \"k.pem\"\n";
        let e = err_text(resolve(Some(&load(both)), &Overrides::default(), 2));
        assert!(
            e.contains("line 2, column 12") && e.contains("rdp_cert: cannot read"),
            "{e}"
        );
        std::fs::write(dir.path().join("c.pem"), "-----BEGIN CERTIFICATE-----\n").expect("c");
        std::fs::write(dir.path().join("k.pem"), "not pem").expect("k");
        let e = err_text(resolve(Some(&load(both)), &Overrides::default(), 2));
        assert!(
            e.contains("rdp_key:") && e.contains("is not a PEM file"),
            "{e}"
        );
        std::fs::write(dir.path().join("k.pem"), "-----BEGIN PRIVATE KEY-----\n").expect("k");
        let s = resolve(Some(&load(both)), &Overrides::default(), 2).expect("resolve");
        let c = dir.path().join("c.pem").display().to_string();
        let k = dir.path().join("k.pem").display().to_string();
        assert!(
            s.relay_args
                .windows(4)
                .any(|w| w == ["--rdp-cert", c.as_str(), "--rdp-key", k.as_str()]),
            "{:?}",
            s.relay_args
        );
        let e = err_text(resolve(
            Some(&load("[relay]\nrdp_public_address = \"gw example\"\n")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("rdp_public_address"), "{e}");
        assert!(resolve(
            Some(&load(
                "[relay]\nrdp_public_address = \"gw.example.com:443\"\n"
            )),
            &Overrides::default(),
            2
        )
        .is_ok());
    }

    #[test]
    fn metrics_listen_and_pinning_reach_the_relay() {
        let s = resolve(
            Some(
                &loaded("[relay]\nmetrics_listen = \"127.0.0.1:9464\"\npin_workers = false\nio = \"epoll\"\n")
                    .expect("parse"),
            ),
            &Overrides::default(),
            2,
        )
        .expect("resolve");
        assert!(
            s.relay_args
                .windows(2)
                .any(|w| w == ["--metrics-listen", "127.0.0.1:9464"]),
            "{:?}",
            s.relay_args
        );
        assert!(
            s.relay_args
                .windows(2)
                .any(|w| w == ["--pin-workers", "false"]),
            "{:?}",
            s.relay_args
        );
        assert!(
            s.relay_args.windows(2).any(|w| w == ["--io", "epoll"]),
            "{:?}",
            s.relay_args
        );
        let e = err_text(resolve(
            Some(&loaded("[relay]\nio = \"kqueue\"\n").expect("parse")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("io \"kqueue\""), "{e}");
        let e = err_text(resolve(
            Some(&loaded("[relay]\nmetrics_listen = \"localhost\"\n").expect("parse")),
            &Overrides::default(),
            2,
        ));
        assert!(e.contains("metrics_listen") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nx", 2), (1, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
