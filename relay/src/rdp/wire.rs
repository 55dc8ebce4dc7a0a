//! Reading whole PDUs from a byte stream with a bounded buffer, during the connection phase
//! (X.224 TPKTs and CredSSP TsRequests). What is read past the last PDU stays in the buffer
//! for the relay loop.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest PDU accepted during the connection phase (X.224, MCS Connect, TsRequest).
pub const MAX_CONNECT_PDU: usize = 32 * 1024;

/// Why a PDU could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Eof,
    /// The stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are no PDU of the expected kind, or too large.
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

/// A stream with the bytes read from it but not consumed yet.
pub struct Framed<S> {
    /// The stream.
    pub io: S,
    /// Bytes read, not yet consumed.
    pub buf: Vec<u8>,
}

/// Length of the TPKT or fast-path PDU at the start of `bytes`; None: more bytes needed.
pub fn pdu_len(bytes: &[u8]) -> Result<Option<usize>, String> {
    super::frame::next_frame(bytes)
        .map(|f| f.map(|(_, n)| n))
        .map_err(|e| e.0)
}

/// Length of the DER TsRequest at the start of `bytes`; None: more bytes needed.
pub fn ts_request_len(bytes: &[u8]) -> Result<Option<usize>, String> {
    super::frame::next_ts_request(bytes).map_err(|e| e.0)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Wraps a stream.
    pub fn new(io: S) -> Framed<S> {
        Framed {
            io,
            buf: Vec::new(),
        }
    }

    /// Reads one whole PDU whose length `len` finds, at most [`MAX_CONNECT_PDU`] bytes.
    pub async fn read_with(
        &mut self,
        len: impl Fn(&[u8]) -> Result<Option<usize>, String>,
    ) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(n) = len(&self.buf).map_err(ReadError::Malformed)? {
                if n > MAX_CONNECT_PDU {
                    return Err(ReadError::Malformed(format!(
                        "PDU of {n} bytes during the connection phase (at most {MAX_CONNECT_PDU})"
                    )));
                }
                if self.buf.len() >= n {
                    let rest = self.buf.split_off(n);
                    return Ok(std::mem::replace(&mut self.buf, rest));
                }
            } else if self.buf.len() >= MAX_CONNECT_PDU {
                return Err(ReadError::Malformed("PDU header never completes".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one X.224 (TPKT) or fast-path PDU.
    pub async fn read_pdu(&mut self) -> Result<Vec<u8>, ReadError> {
        self.read_with(pdu_len).await
    }

    /// Reads one CredSSP TsRequest.
    pub async fn read_ts_request(&mut self) -> Result<Vec<u8>, ReadError> {
        self.read_with(ts_request_len).await
    }

    /// Writes `bytes` and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Changes the stream (a TLS upgrade); the buffer must be empty.
    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> Framed<T> {
        Framed {
            io: f(self.io),
            buf: self.buf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pdus_are_cut_at_their_length_and_bounded() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut f = Framed::new(b);
        // two TPKTs in one write, the second cut
        a.write_all(&[3, 0, 0, 7, 2, 0xf0, 0x80, 3, 0, 0, 8])
            .await
            .expect("write");
        assert_eq!(
            f.read_pdu().await.expect("first"),
            vec![3, 0, 0, 7, 2, 0xf0, 0x80]
        );
        a.write_all(&[2, 0xf0, 0x80, 9]).await.expect("write");
        assert_eq!(
            f.read_pdu().await.expect("second"),
            vec![3, 0, 0, 8, 2, 0xf0, 0x80, 9]
        );
        // garbage is refused, not waited on
        a.write_all(&[0x55; 8]).await.expect("write");
        assert!(matches!(
            f.read_ts_request().await,
            Err(ReadError::Malformed(_))
        ));
        // an oversized TPKT is refused before it is read
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut f = Framed::new(b);
        a.write_all(&[3, 0, 0xff, 0xff]).await.expect("write");
        assert!(matches!(f.read_pdu().await, Err(ReadError::Malformed(_))));
        drop(a);
        // a closed stream is EOF
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        assert!(matches!(
            Framed::new(b).read_pdu().await,
            Err(ReadError::Eof)
        ));
    }
}
