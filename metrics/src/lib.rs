//! psm's counters in the Prometheus text exposition format (version 0.0.4).
//!
//! Every psm process that serves counters builds a list of [`Family`] values on each scrape and
//! [`render`]s it; [`serve`] answers `GET /metrics` on a local address with whatever the
//! closure renders (one blocking thread, one connection at a time: a scrape every few seconds
//! needs nothing more, and no HTTP crate rides along). [`parse`] reads the text back, for
//! `psm-perf stats`. No process serves counters unless its operator gives it an address.

#![warn(missing_docs)]

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// Whether a family only grows (`counter`) or goes up and down (`gauge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic (its name ends in `_total`).
    Counter,
    /// A level.
    Gauge,
}

/// One metric family: a name, its help line and its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// The metric name (`psm_relay_connections_total`).
    pub name: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Label pairs and value of each sample.
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    /// A family with no samples yet.
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample with these labels.
    pub fn sample(mut self, labels: Vec<(&'static str, String)>, value: f64) -> Family {
        self.samples.push((labels, value));
        self
    }
}

/// The text exposition of `families`.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (labels, value) in &f.samples {
            out.push_str(f.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {value}");
        }
    }
    out
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// One sample read back: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Label pairs, in order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the samples of a text exposition; comment lines are skipped, and so is a line that
/// does not parse (`Err` lists none: one bad line loses only itself).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head.to_string(), Vec::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            (name.to_string(), parse_labels(body)?)
        }
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_labels(body: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), v));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some(out)
}

/// Serves `GET /metrics` (any path, in fact) on `addr` from a thread of its own, answering each
/// request with `render()`. Returns the bound address (port 0 picks one).
pub fn serve<F>(addr: SocketAddr, render: F) -> std::io::Result<SocketAddr>
where
    F: Fn() -> String + Send + 'static,
{
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("psm-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                // the request itself does not matter; read its head (bounded) and answer
                let mut buf = [0u8; 2048];
                let mut seen = 0;
                while seen < buf.len() {
                    match conn.read(&mut buf[seen..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen += n;
                            if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n")
                                || buf[..seen].windows(2).any(|w| w == b"\n\n")
                            {
                                break;
                            }
                        }
                    }
                }
                let body = render();
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(body.as_bytes());
            }
        })?;
    Ok(bound)
}

/// What an operator is told when counters are served on `addr` beyond this host (any address
/// but a loopback one): the endpoint has no authentication. None for a loopback address.
pub fn exposure(addr: SocketAddr) -> Option<&'static str> {
    (!addr.ip().to_canonical().is_loopback()).then_some(
        "counters are served beyond this host, without authentication, to whoever reaches the address: firewall it or serve them on a loopback address",
    )
}

/// Fetches a text exposition from `addr` (`GET /metrics`), for `psm-perf stats` and tests.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut c = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: psm\r\n\r\n")?;
    let mut raw = Vec::new();
    c.take(16 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a metrics answer",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_address_is_quiet() {
        for quiet in [
            "127.0.0.1:9464",
            "127.0.0.2:1",
            "[::1]:9464",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(exposure(quiet.parse().expect("addr")), None, "{quiet}");
        }
        for loud in ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"] {
            assert!(exposure(loud.parse().expect("addr")).is_some(), "{loud}");
        }
    }

    fn families() -> Vec<Family> {
        vec![
            Family::new(
                "psm_relay_connections_total",
                Kind::Counter,
                "Connections accepted.",
            )
            .sample(vec![("worker", "0".into())], 3.0)
            .sample(vec![("worker", "1".into())], 4.0),
            Family::new("psm_up", Kind::Gauge, "Always 1.").sample(vec![], 1.0),
            Family::new("psm_odd", Kind::Gauge, "Escapes.")
                .sample(vec![("a", "q\"\\\n".into()), ("b", "x".into())], 2.5),
        ]
    }

    #[test]
    fn renders_the_text_format_and_reads_it_back() {
        let text = render(&families());
        assert!(text.contains("# TYPE psm_relay_connections_total counter\n"));
        assert!(text.contains("psm_relay_connections_total{worker=\"1\"} 4\n"));
        assert!(text.contains("psm_up 1\n"));
        assert!(
            text.contains("psm_odd{a=\"q\\\"\\\\\\n\",b=\"x\"} 2.5\n"),
            "{text}"
        );
        let s = parse(&text);
        assert_eq!(s.len(), 4);
        assert_eq!(s[1].label("worker"), Some("1"));
        assert_eq!(s[1].value, 4.0);
        assert_eq!(s[3].label("a"), Some("q\"\\\n"));
        assert_eq!(s[3].label("b"), Some("x"));
        assert_eq!(parse("garbage\nx{ 1\ny 2\n").len(), 1);
    }

    #[test]
    fn serves_over_http_on_a_local_port() {
        let addr =
            serve("127.0.0.1:0".parse().expect("addr"), || render(&families())).expect("serves");
        let body = fetch(addr, Duration::from_secs(5)).expect("fetched");
        assert_eq!(body, render(&families()));
        assert_eq!(parse(&body).len(), 4);
    }
}
