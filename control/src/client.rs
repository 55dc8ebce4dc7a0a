//! A blocking client for `control.sock` (what psmctl uses; other tools may too).
//!
//! When nothing answers, the error names the absolute socket path it tried and how to point
//! psmctl at another data directory (`--data-dir`, `PSM_DATA_DIR`): psm-control may well run,
//! just elsewhere.
//!
//! What it does not do: retry, or start the daemon.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use zeroize::Zeroize;

use crate::datadir::DataDir;
use crate::protocol::{Request, Response};

/// How long the client waits for one response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "psm-control is not running on the data directory {} (no socket at {}); if it runs \
         with another data directory, give --data-dir DIR or set PSM_DATA_DIR",
        .dir.display(),
        .path.display()
    )]
    NotRunning {
        /// The socket path (absolute).
        path: PathBuf,
        /// The data directory it is in (absolute).
        dir: PathBuf,
    },
    /// The data directory does not exist.
    #[error(
        "no data directory at {} (so psm-control is not running there); give --data-dir DIR \
         or set PSM_DATA_DIR to the directory psm runs with",
        .dir.display()
    )]
    NoDataDir {
        /// The data directory (absolute).
        dir: PathBuf,
    },
    /// The socket could not be used.
    #[error("control socket {}: {source}", .path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The daemon closed the connection without answering.
    #[error("psm-control closed the connection without an answer")]
    Closed,
    /// The answer was not a valid response.
    #[error("malformed response from psm-control: {0}")]
    Malformed(String),
    /// The daemon refused the request; the message is its reason.
    #[error("{0}")]
    Refused(String),
}

/// A connection to `control.sock`.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Client {
    /// Connects to the daemon serving `data_dir`.
    pub fn connect(data_dir: &Path) -> Result<Client, ClientError> {
        Self::connect_socket(&DataDir::new(data_dir).control_socket())
    }

    /// Connects to a control socket by path.
    pub fn connect_socket(path: &Path) -> Result<Client, ClientError> {
        let io_err = |source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                return Err(if dir.is_dir() {
                    ClientError::NotRunning { path, dir }
                } else {
                    ClientError::NoDataDir { dir }
                });
            }
            Err(e) => return Err(io_err(e)),
        };
        stream
            .set_read_timeout(Some(RESPONSE_TIMEOUT))
            .map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            path: path.to_path_buf(),
        })
    }

    /// Sends one request and returns the `result` of a successful response.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push(b'\n');
        let sent = self.writer.write_all(&line);
        line.zeroize();
        if let Err(e) = sent {
            // The daemon may have refused us and closed already: prefer its answer.
            if let Ok(resp) = self.read_response() {
                return Self::result(resp);
            }
            return Err(ClientError::Io {
                path: self.path.clone(),
                source: e,
            });
        }
        let resp = self.read_response()?;
        Self::result(resp)
    }

    /// Sends one request and decodes its result as `T`.
    pub fn call_as<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        let v = self.call(req)?;
        serde_json::from_value(v).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut buf = String::new();
        let n = self
            .reader
            .read_line(&mut buf)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(buf.trim_end()).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    fn result(resp: Response) -> Result<serde_json::Value, ClientError> {
        if resp.ok {
            Ok(resp.result)
        } else {
            Err(ClientError::Refused(
                resp.error.unwrap_or_else(|| "request failed".into()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_running_names_the_socket_and_how_to_point_elsewhere() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = Client::connect(tmp.path()).expect_err("no daemon");
        let sock = tmp.path().join("control.sock");
        assert_eq!(
            e.to_string(),
            format!(
                "psm-control is not running on the data directory {} (no socket at {}); if it \
                 runs with another data directory, give --data-dir DIR or set PSM_DATA_DIR",
                tmp.path().display(),
                sock.display()
            )
        );
        // a missing data directory is named as such
        let e = Client::connect(&tmp.path().join("nope")).expect_err("no dir");
        assert!(matches!(e, ClientError::NoDataDir { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "no data directory at {} (so psm-control is not running there); give \
                 --data-dir DIR or set PSM_DATA_DIR to the directory psm runs with",
                tmp.path().join("nope").display()
            )
        );
        // a relative path (the default ./psm-data) is shown absolute
        let e = Client::connect(Path::new("./no-such-psm-data-dir")).expect_err("relative");
        let cwd = std::env::current_dir().expect("cwd");
        assert!(
            e.to_string()
                .contains(&cwd.join("no-such-psm-data-dir").display().to_string()),
            "{e}"
        );
        // a stale socket file with no listener reads the same
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        let e = Client::connect(tmp.path()).expect_err("stale");
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e}");
    }
}
