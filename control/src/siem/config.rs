//! The `[[siem.sink]]` tables of `psm.toml`: read with their places in the file, validated once
//! into [`SinkConfig`]s. `psm up` validates them before it starts anything (so a bad sink stops it
//! with the field's name, line and column) and hands psm-control the file with `--config`;
//! psm-control reads only the `[siem]` table of that file ([`load`]).
//!
//! What it does not do: open sockets. TLS files are read and checked by [`super::tls`].

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Default bound of a sink's disk queue, in events.
pub const DEFAULT_QUEUE_MAX_EVENTS: u64 = 100_000;
/// Default bound of a sink's disk queue, in bytes (64 MiB).
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default syslog APP-NAME.
pub const DEFAULT_APP_NAME: &str = "psm";

/// The `[siem]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiemTable {
    /// `[[siem.sink]]`: where the audit stream goes, in any number.
    #[serde(default)]
    pub sink: Vec<SinkTable>,
}

/// One `[[siem.sink]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkTable {
    /// Unique name (letters, digits, `-`, `_`, `.`; 1 to 64): the queue's directory
    /// `siem/<name>/` and the sink's name in `psmctl status`.
    pub name: Option<Spanned<String>>,
    /// `udp` (RFC 5426), `tcp` (RFC 6587 octet counting) or `tls` (RFC 5425).
    pub transport: Option<Spanned<String>>,
    /// The receiver, `host:port` (a name is resolved at each connection).
    pub address: Option<Spanned<String>>,
    /// `json` (default), `cef` or `ocsf`.
    pub format: Option<Spanned<String>>,
    /// TLS: PEM file of the CA certificate(s) the receiver's certificate must chain to.
    pub ca: Option<Spanned<String>>,
    /// TLS: PEM file of psm's client certificate chain, for receivers that ask for one.
    pub client_cert: Option<Spanned<String>>,
    /// TLS: PEM file of the client certificate's private key.
    pub client_key: Option<Spanned<String>>,
    /// TLS: the name the receiver's certificate must carry (default: the host of `address`).
    pub server_name: Option<Spanned<String>>,
    /// Most undelivered events kept on disk (default 100000; 1 to 100000000).
    pub queue_max_events: Option<Spanned<i64>>,
    /// Most undelivered bytes kept on disk (default 64 MiB; 4096 to 1 TiB).
    pub queue_max_bytes: Option<Spanned<i64>>,
    /// Syslog APP-NAME (default `psm`; 1 to 48 printable ASCII characters).
    pub app_name: Option<Spanned<String>>,
    /// Syslog HOSTNAME (default: this machine's host name; 1 to 255 printable ASCII).
    pub hostname: Option<Spanned<String>>,
    /// Syslog facility: `auth`, `authpriv` (default), `daemon`, `user`, `audit` or
    /// `local0` to `local7`.
    pub facility: Option<Spanned<String>>,
}

/// How a sink reaches its receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// One message per datagram; fire and forget.
    Udp,
    /// Octet-counted frames over TCP.
    Tcp,
    /// Octet-counted frames over TLS.
    Tls(TlsFiles),
}

impl Transport {
    /// `udp`, `tcp` or `tls`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
        }
    }
}

/// A TLS sink's files and the name it verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates (PEM).
    pub ca: PathBuf,
    /// Client certificate chain and key (PEM), when the receiver asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
    /// The name the receiver's certificate must carry (a DNS name or an IP address).
    pub server_name: String,
}

/// What a sink sends in each syslog message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The audit event as in `audit.jsonl`.
    Json,
    /// ArcSight Common Event Format (docs/siem.md has the mapping).
    Cef,
    /// Open Cybersecurity Schema Framework JSON (docs/siem.md has the mapping).
    Ocsf,
}

impl Format {
    /// `json`, `cef` or `ocsf`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cef => "cef",
            Format::Ocsf => "ocsf",
        }
    }
}

/// A validated sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkConfig {
    /// Its name.
    pub name: String,
    /// How it is reached.
    pub transport: Transport,
    /// `host:port`.
    pub address: String,
    /// The message format.
    pub format: Format,
    /// Queue bound in events.
    pub queue_max_events: u64,
    /// Queue bound in bytes.
    pub queue_max_bytes: u64,
    /// Syslog APP-NAME.
    pub app_name: String,
    /// Syslog HOSTNAME (`None`: the machine's host name, read at start).
    pub hostname: Option<String>,
    /// Syslog facility number (0 to 23).
    pub facility: u8,
}

/// A bad `[[siem.sink]]` value: which field, where in the file, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SiemConfigError {
    /// `siem.sink[N].FIELD`.
    pub field: String,
    /// Byte range of the value in the file, when known.
    pub span: Option<Range<usize>>,
    /// What is wrong.
    pub message: String,
}

const FACILITIES: [(&str, u8); 13] = [
    ("user", 1),
    ("daemon", 3),
    ("auth", 4),
    ("authpriv", 10),
    ("audit", 13),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// Whether `s` is 1 to `max` printable US-ASCII characters (RFC 5424's PRINTUSASCII).
fn printusascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (33..=126).contains(&b))
}

/// The host part of `host:port` (`[v6]:port` too) and whether a port is there.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host, port))
}

/// Validates every sink: required fields, known values, ranges, unique names.
pub fn validate(table: &SiemTable) -> Result<Vec<SinkConfig>, SiemConfigError> {
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(table.sink.len());
    for (i, s) in table.sink.iter().enumerate() {
        let err = |field: &str, span: Option<Range<usize>>, message: String| SiemConfigError {
            field: format!("siem.sink[{i}].{field}"),
            span,
            message,
        };
        let required = |field: &str, v: &Option<Spanned<String>>| {
            v.as_ref()
                .map(|v| (v.get_ref().trim().to_string(), v.span()))
                .ok_or_else(|| err(field, None, "missing (required)".into()))
        };
        let (name, name_span) = required("name", &s.name)?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || name.starts_with('.')
        {
            return Err(err(
                "name",
                Some(name_span),
                format!(
                    "{:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                    name.escape_debug().to_string()
                ),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                "name",
                Some(name_span),
                format!("{name:?} names another sink already"),
            ));
        }
        let (address, address_span) = required("address", &s.address)?;
        let Some((host, _)) = split_host_port(&address) else {
            return Err(err(
                "address",
                Some(address_span),
                format!("{address:?} is not host:port"),
            ));
        };
        let (transport_name, transport_span) = required("transport", &s.transport)?;
        let tls_only = [
            ("ca", &s.ca),
            ("client_cert", &s.client_cert),
            ("client_key", &s.client_key),
            ("server_name", &s.server_name),
        ];
        let transport = match transport_name.as_str() {
            "udp" | "tcp" => {
                if let Some((field, Some(v))) = tls_only.iter().find(|(_, v)| v.is_some()) {
                    return Err(err(
                        field,
                        Some(v.span()),
                        format!("only a tls sink takes {field}"),
                    ));
                }
                if transport_name == "udp" {
                    Transport::Udp
                } else {
                    Transport::Tcp
                }
            }
            "tls" => {
                let (ca, _) = required("ca", &s.ca)?;
                let client = match (&s.client_cert, &s.client_key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((
                        PathBuf::from(c.get_ref().trim()),
                        PathBuf::from(k.get_ref().trim()),
                    )),
                    (Some(c), None) => {
                        return Err(err(
                            "client_key",
                            Some(c.span()),
                            "missing: client_cert needs client_key".into(),
                        ))
                    }
                    (None, Some(k)) => {
                        return Err(err(
                            "client_cert",
                            Some(k.span()),
                            "missing: client_key needs client_cert".into(),
                        ))
                    }
                };
                let server_name = match &s.server_name {
                    Some(v) => {
                        let n = v.get_ref().trim().to_string();
                        if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
                            return Err(err(
                                "server_name",
                                Some(v.span()),
                                format!("{n:?} is not a DNS name or an IP address"),
                            ));
                        }
                        n
                    }
                    None => {
                        if rustls_pki_types::ServerName::try_from(host).is_err() {
                            return Err(err(
                                "address",
                                Some(address_span),
                                format!("{host:?} is not a DNS name or an IP address to verify the receiver's certificate against (set server_name)"),
                            ));
                        }
                        host.to_string()
                    }
                };
                Transport::Tls(TlsFiles {
                    ca: PathBuf::from(ca),
                    client,
                    server_name,
                })
            }
            other => {
                return Err(err(
                    "transport",
                    Some(transport_span),
                    format!(
                        "{:?}: expected \"udp\", \"tcp\" or \"tls\"",
                        other.escape_debug().to_string()
                    ),
                ))
            }
        };
        let format = match &s.format {
            None => Format::Json,
            Some(v) => match v.get_ref().trim() {
                "json" => Format::Json,
                "cef" => Format::Cef,
                "ocsf" => Format::Ocsf,
                other => {
                    return Err(err(
                        "format",
                        Some(v.span()),
                        format!(
                            "{:?}: expected \"json\", \"cef\" or \"ocsf\"",
                            other.escape_debug().to_string()
                        ),
                    ))
                }
            },
        };
        let ranged = |field: &str,
                      v: &Option<Spanned<i64>>,
                      range: std::ops::RangeInclusive<i64>,
                      default: u64|
         -> Result<u64, SiemConfigError> {
            match v {
                None => Ok(default),
                Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref() as u64),
                Some(v) => Err(err(
                    field,
                    Some(v.span()),
                    format!(
                        "must be between {} and {}, not {}",
                        range.start(),
                        range.end(),
                        v.get_ref()
                    ),
                )),
            }
        };
        let queue_max_events = ranged(
            "queue_max_events",
            &s.queue_max_events,
            1..=100_000_000,
            DEFAULT_QUEUE_MAX_EVENTS,
        )?;
        let queue_max_bytes = ranged(
            "queue_max_bytes",
            &s.queue_max_bytes,
            4096..=(1 << 40),
            DEFAULT_QUEUE_MAX_BYTES,
        )?;
        let app_name = match &s.app_name {
            None => DEFAULT_APP_NAME.to_string(),
            Some(v) if printusascii(v.get_ref(), 48) => v.get_ref().clone(),
            Some(v) => {
                return Err(err(
                    "app_name",
                    Some(v.span()),
                    "use 1 to 48 printable ASCII characters, no spaces".into(),
                ))
            }
        };
        let hostname = match &s.hostname {
            None => None,
            Some(v) if printusascii(v.get_ref(), 255) => Some(v.get_ref().clone()),
            Some(v) => {
                return Err(err(
                    "hostname",
                    Some(v.span()),
                    "use 1 to 255 printable ASCII characters, no spaces".into(),
                ))
            }
        };
        let facility = match &s.facility {
            None => 10,
            Some(v) => match FACILITIES.iter().find(|(n, _)| *n == v.get_ref().trim()) {
                Some((_, f)) => *f,
                None => {
                    return Err(err(
                        "facility",
                        Some(v.span()),
                        format!(
                            "{:?}: expected one of {}",
                            v.get_ref().escape_debug().to_string(),
                            FACILITIES.map(|(n, _)| n).join(", ")
                        ),
                    ))
                }
            },
        };
        out.push(SinkConfig {
            name,
            transport,
            address,
            format,
            queue_max_events,
            queue_max_bytes,
            app_name,
            hostname,
            facility,
        });
    }
    Ok(out)
}

/// The part of `psm.toml` psm-control reads: `[siem]` only; other tables are `psm up`'s to
/// check.
#[derive(Debug, Default, Deserialize)]
struct OnlySiem {
    #[serde(default)]
    siem: SiemTable,
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Parses the `[siem]` table of a config file's text and validates it (TLS files included);
/// errors read `config PATH: line L, column C: siem.sink[N].FIELD: what is wrong`.
pub fn parse(path: &Path, text: &str) -> Result<Vec<SinkConfig>, String> {
    let place = |span: Option<Range<usize>>| match span {
        Some(s) => {
            let (l, c) = line_col(text, s.start);
            format!("config {}: line {l}, column {c}: ", path.display())
        }
        None => format!("config {}: ", path.display()),
    };
    let only: OnlySiem =
        toml::from_str(text).map_err(|e| format!("{}{}", place(e.span()), e.message().trim()))?;
    let sinks = validate(&only.siem).map_err(|e| format!("{}{e}", place(e.span.clone())))?;
    for (i, s) in sinks.iter().enumerate() {
        if let Transport::Tls(files) = &s.transport {
            super::tls::client_config(files).map_err(|e| {
                let field = format!("siem.sink[{i}].{}", e.field);
                let span = only.siem.sink[i].span_of(e.field);
                format!("{}{field}: {}", place(span), e.message)
            })?;
        }
    }
    Ok(sinks)
}

/// Reads `path` and [`parse`]s its `[siem]` table.
pub fn load(path: &Path) -> Result<Vec<SinkConfig>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    parse(path, &text)
}

impl SinkTable {
    /// Where a TLS file field's value is in the file.
    pub fn span_of(&self, field: &str) -> Option<Range<usize>> {
        match field {
            "ca" => self.ca.as_ref(),
            "client_cert" => self.client_cert.as_ref(),
            "client_key" => self.client_key.as_ref(),
            _ => None,
        }
        .map(|v| v.span())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sinks(text: &str) -> Result<Vec<SinkConfig>, String> {
        parse(Path::new("/etc/psm/psm.toml"), text)
    }

    #[test]
    fn a_full_sink_and_the_defaults() {
        let s = sinks(
            "[relay]\nworkers = 2\n\n[[siem.sink]]\nname = \"soc\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:6514\"\nformat = \"cef\"\nqueue_max_events = 10\nqueue_max_bytes = 8192\napp_name = \"gw\"\nhostname = \"psm1\"\nfacility = \"local3\"\n\n[[siem.sink]]\nname = \"u\"\ntransport = \"udp\"\naddress = \"[::1]:514\"\n",
        )
        .expect("valid");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "soc");
        assert_eq!(s[0].transport, Transport::Tcp);
        assert_eq!(s[0].format, Format::Cef);
        assert_eq!((s[0].queue_max_events, s[0].queue_max_bytes), (10, 8192));
        assert_eq!(
            (
                s[0].app_name.as_str(),
                s[0].hostname.as_deref(),
                s[0].facility
            ),
            ("gw", Some("psm1"), 19)
        );
        assert_eq!(s[1].format, Format::Json);
        assert_eq!(s[1].facility, 10);
        assert_eq!(s[1].app_name, "psm");
        assert_eq!(s[1].queue_max_events, DEFAULT_QUEUE_MAX_EVENTS);
        assert!(sinks("").expect("empty").is_empty());
    }

    #[test]
    fn bad_values_name_the_field_and_the_place() {
        let base = "[[siem.sink]]\nname = \"a\"\naddress = \"127.0.0.1:514\"\n";
        for (extra, needle) in [
            ("transport = \"smtp\"\n", "line 4, column 13: siem.sink[0].transport: \"smtp\": expected \"udp\", \"tcp\" or \"tls\""),
            ("transport = \"udp\"\nformat = \"xml\"\n", "line 5, column 10: siem.sink[0].format"),
            ("transport = \"udp\"\nqueue_max_events = 0\n", "siem.sink[0].queue_max_events: must be between 1 and"),
            ("transport = \"udp\"\nqueue_max_bytes = 10\n", "siem.sink[0].queue_max_bytes: must be between 4096"),
            ("transport = \"udp\"\nca = \"/x\"\n", "siem.sink[0].ca: only a tls sink takes ca"),
            ("transport = \"tls\"\n", "siem.sink[0].ca: missing (required)"),
            ("transport = \"tls\"\nca = \"/nonexistent/ca.pem\"\n", "line 5, column 6: siem.sink[0].ca: cannot read /nonexistent/ca.pem"),
            ("transport = \"tls\"\nca = \"/x\"\nclient_cert = \"/y\"\n", "siem.sink[0].client_key: missing"),
            ("transport = \"udp\"\napp_name = \"two words\"\n", "siem.sink[0].app_name"),
            ("transport = \"udp\"\nfacility = \"kern\"\n", "siem.sink[0].facility: \"kern\": expected one of user,"),
            ("transport = \"udp\"\nport = 5\n", "unknown field `port`"),
        ] {
            let e = sinks(&format!("{base}{extra}")).expect_err(extra);
            assert!(e.contains(needle), "{extra}: {e}");
            assert!(e.starts_with("config /etc/psm/psm.toml: "), "{e}");
        }
        let e = sinks("[[siem.sink]]\nname = \"a\"\ntransport = \"udp\"\n").expect_err("address");
        assert!(
            e.ends_with("siem.sink[0].address: missing (required)"),
            "{e}"
        );
        let e = sinks("[[siem.sink]]\nname = \"a\"\ntransport = \"udp\"\naddress = \"nowhere\"\n")
            .expect_err("address");
        assert!(
            e.contains("siem.sink[0].address: \"nowhere\" is not host:port"),
            "{e}"
        );
        let e = sinks("[[siem.sink]]\nname = \"../x\"\ntransport = \"udp\"\naddress = \"h:1\"\n")
            .expect_err("name");
        assert!(e.contains("siem.sink[0].name"), "{e}");
        let two = "[[siem.sink]]\nname = \"a\"\ntransport = \"udp\"\naddress = \"h:1\"\n";
        let e = sinks(&format!("{two}{two}")).expect_err("dup");
        assert!(
            e.contains("siem.sink[1].name: \"a\" names another sink already"),
            "{e}"
        );
    }

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("a.b:514"), Some(("a.b", 514)));
        assert_eq!(split_host_port("[::1]:6514"), Some(("::1", 6514)));
        assert_eq!(split_host_port("a.b"), None);
        assert_eq!(split_host_port("a.b:0"), None);
        assert_eq!(split_host_port(":1"), None);
    }
}
