//! The reader of recordings: one zstd stream (format versions 3 and 1) here, clear records
//! around chunks (version 5, and the encrypted versions 4 and 2) in [`super::v2`], one record
//! at a time in bounded memory.

use super::*;

/// The underlying reader, remembering whether it failed itself (as opposed to zstd failing on
/// what it returned).
pub(super) struct Source<R> {
    inner: R,
    failed: bool,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                self.failed = true;
                Err(e)
            }
            other => other,
        }
    }
}

pub(super) type Decompressed<R> =
    BufReader<zstd::stream::read::Decoder<'static, BufReader<Source<R>>>>;

/// Where the records come from.
pub(super) enum Src<R> {
    /// Unencrypted (format versions 3 and 1): one zstd stream over the whole file.
    Zstd(Decompressed<R>),
    /// Format version 5, and the encrypted versions 4 and 2: clear records around chunks.
    Sealed(Box<v2::Envelope<R>>),
}

/// Reads a recording written by [`RecordingWriter`], including one cut short by a crash.
///
/// Memory is bounded whatever the recording holds: the zstd decoder (a window of at most
/// 8 MiB, and its input buffer), 128 KiB of decompressed bytes, and the record being read (a
/// body is at most [`MAX_RECORD`] bytes; the reader refuses a longer one before allocating
/// it). A DATA record's bytes are handed out without copy.
pub struct RecordingReader<R: Read> {
    pub(super) src: Src<R>,
    pub(super) meta: RecordingMeta,
    pub(super) version: u8,
    /// Reused body buffer for records whose bytes are not handed out.
    pub(super) scratch: Vec<u8>,
    pub(super) seen_close: bool,
    pub(super) ended: bool,
    pub(super) cut: bool,
    pub(super) damage: Option<String>,
    /// The stream ended inside a zstd frame (a file cut short), as opposed to damaged bytes.
    pub(super) damage_is_cut: bool,
    /// HEADER flag [`FLAG_SEALED`].
    pub(super) sealed: bool,
    /// Whether decompressed bytes go into `hasher`.
    pub(super) hashing: bool,
    /// The running hash of the current chunk (starts with the previous seal's stored hash).
    pub(super) hasher: ChunkHasher,
}

/// How much of a requested read could be served.
pub(super) enum Fill {
    Full,
    /// Clean end of the stream before the first byte.
    Empty,
    /// The stream ended (or became undecodable) part-way.
    Partial,
}

impl Fill {
    /// What `got` bytes of the `wanted` are.
    pub(super) fn of(got: usize, wanted: usize) -> Fill {
        if got == wanted {
            Fill::Full
        } else if got == 0 {
            Fill::Empty
        } else {
            Fill::Partial
        }
    }
}

impl<R: Read> RecordingReader<R> {
    /// Checks the magic and reads the header. Fails when the file is not a recording or ends
    /// before its header is complete.
    ///
    /// An encrypted recording opened this way shows its header, CLOSE, seals and trailer (all
    /// that [`crate::verify`] needs), not its records: [`next_record`](Self::next_record)
    /// fails with [`FormatError::Encrypted`] at its first chunk. Use
    /// [`open_with_key`](Self::open_with_key) to replay it.
    pub fn open(r: R) -> Result<Self, FormatError> {
        Self::open_inner(r, None, false)
    }

    /// Like [`open`](Self::open), decrypting an encrypted recording with `key`. Fails with
    /// [`FormatError::Encrypted`] when the recording is encrypted and no key is given, and with
    /// [`FormatError::WrongKey`] when it is encrypted with another key. An unencrypted
    /// recording reads as with `open`, whatever the key.
    pub fn open_with_key(r: R, key: Option<&RecordingKey>) -> Result<Self, FormatError> {
        Self::open_inner(r, key, true)
    }

    fn open_inner(
        mut r: R,
        key: Option<&RecordingKey>,
        need_key: bool,
    ) -> Result<Self, FormatError> {
        let mut magic = [0u8; MAGIC.len()];
        let mut got = 0;
        while got < magic.len() {
            match r.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some((expected, layout, hash)) = layout_of(&magic[..got]) else {
            return Err(FormatError::Malformed(
                "not a psm recording (bad magic)".into(),
            ));
        };
        match layout {
            Layout::Encrypted => return Self::open_chunks(r, key, need_key, expected, hash),
            Layout::Chunks => return Self::open_chunks(r, None, false, expected, hash),
            Layout::Stream => {}
        }
        let source = BufReader::with_capacity(
            zstd::zstd_safe::DCtx::in_size(),
            Source {
                inner: r,
                failed: false,
            },
        );
        let mut decoder = zstd::stream::read::Decoder::with_buffer(source)?;
        decoder.window_log_max(WINDOW_LOG_MAX)?;
        let mut reader = RecordingReader {
            src: Src::Zstd(BufReader::with_capacity(READ_BUFFER, decoder)),
            meta: RecordingMeta::default(),
            version: 0,
            scratch: Vec::new(),
            seen_close: false,
            ended: false,
            cut: false,
            damage: None,
            damage_is_cut: false,
            sealed: false,
            hashing: true,
            hasher: ChunkHasher::new(hash, &[0u8; HASH_LEN]),
        };
        let (kind, len) = match reader.read_head()? {
            Some(head) => head,
            None => return Err(reader.header_missing()),
        };
        if kind != KIND_HEADER {
            return Err(FormatError::Malformed(format!(
                "first record has kind {kind:#04x}, not a header"
            )));
        }
        let mut body = vec![0u8; len];
        if !matches!(reader.fill(&mut body)?, Fill::Full) || len < 2 {
            return Err(reader.header_missing());
        }
        reader.version = body[0];
        if reader.version != expected {
            return Err(FormatError::Malformed(format!(
                "unsupported recording version {}",
                reader.version
            )));
        }
        // body[1]: flags; unknown ones are hints, so they are ignored.
        reader.sealed = body[1] & FLAG_SEALED != 0;
        reader.hashing = reader.sealed;
        reader.meta = serde_json::from_slice(&body[2..])
            .map_err(|e| FormatError::Malformed(format!("recording header: {e}")))?;
        Ok(reader)
    }

    pub(super) fn header_missing(&self) -> FormatError {
        let why = self.damage.as_deref().unwrap_or("end of file");
        FormatError::Malformed(format!("recording header missing or truncated ({why})"))
    }

    /// What the recording is of.
    pub fn meta(&self) -> &RecordingMeta {
        &self.meta
    }

    /// Format version from the header.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The next record, or `None` at the end of the recording.
    ///
    /// A file that ends part-way through a record or a zstd frame is not an error: reading stops
    /// after the last complete record and [`truncated`](Self::truncated) turns true. Errors are
    /// I/O errors of the underlying reader and records that decode but make no sense.
    pub fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        self.next_inner(true)
    }

    /// Whether the recording ended without a CLOSE record or part-way through a record (the
    /// recorder died). Meaningful once [`next_record`](Self::next_record) returned `None`.
    pub fn truncated(&self) -> bool {
        self.ended && (self.cut || !self.seen_close)
    }

    /// Why reading stopped early when the compressed stream itself was cut or damaged (the
    /// decoder's message), if it was.
    pub fn damage(&self) -> Option<&str> {
        self.damage.as_deref()
    }

    /// Whether the damage (see [`damage`](Self::damage)) is only the file ending inside a zstd
    /// frame, as when the writer died, rather than bytes that do not decode.
    pub fn damage_is_cut(&self) -> bool {
        self.damage_is_cut
    }

    /// Whether the header announces seals ([`FLAG_SEALED`]).
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    /// The id of the key an encrypted recording needs; `None` when it is not encrypted.
    pub fn encrypted_with(&self) -> Option<psm_evidence::KeyId> {
        match &self.src {
            Src::Sealed(env) => env.key_id(),
            Src::Zstd(_) => None,
        }
    }

    /// The next record, seal or trailer, or `None` at the end of the recording (see
    /// [`next_record`](Self::next_record) for how the end is found).
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        self.next_any(true)
    }

    /// Like `next_record`; with `want_data == false`, DATA bytes are not handed out (empty).
    ///
    /// Each seal is compared with what was read since the one before it: a chunk that does not
    /// match its seal (damaged or modified bytes) ends reading with an error when its seal is
    /// reached. Its records were handed out already (a chunk is read as it decompresses); the
    /// error says they cannot be trusted, and `psmctl recordings verify` says more.
    pub(super) fn next_inner(&mut self, want_data: bool) -> Result<Option<Record>, FormatError> {
        loop {
            match self.next_any(want_data)? {
                None => return Ok(None),
                Some(Item::Record(rec)) => return Ok(Some(rec)),
                Some(Item::Encrypted(_)) => return Err(self.key_needed()),
                Some(Item::Seal(seal)) if seal.computed != seal.stored => {
                    let e = FormatError::Malformed(format!(
                        "chunk {} does not match its seal: the recording was damaged or modified",
                        seal.chunk
                    ));
                    return Err(self.fail(e));
                }
                Some(_) => continue,
            }
        }
    }

    pub(super) fn next_any(&mut self, want_data: bool) -> Result<Option<Item>, FormatError> {
        if matches!(self.src, Src::Sealed(_)) {
            return self.next_sealed(want_data);
        }
        loop {
            if self.ended {
                return Ok(None);
            }
            let (kind, len) = match self.read_head() {
                Ok(Some(head)) => head,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e)),
            };
            let item = if kind == KIND_SEAL && self.sealed {
                self.read_seal(len)
            } else if kind == KIND_TRAILER {
                self.read_trailer(len)
            } else {
                self.read_record(kind, len, want_data)
                    .map(|r| r.map(Item::Record))
            };
            match item {
                Ok(Some(item)) => {
                    if matches!(item, Item::Record(Record::Close { .. })) {
                        self.seen_close = true;
                    }
                    return Ok(Some(item));
                }
                Ok(None) => continue,
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Reads a SEAL body: its number and time go into the chunk's hash, its hash does not.
    pub(super) fn read_seal(&mut self, len: usize) -> Result<Option<Item>, FormatError> {
        if len != SEAL_BODY {
            let mut body = std::mem::take(&mut self.scratch);
            let complete = self.read_body(&mut body, len);
            self.scratch = body;
            return Ok(complete?.then(|| Item::Bad(KIND_SEAL, format!("seal of {len} bytes"))));
        }
        let mut prefix = [0u8; SEAL_PREFIX];
        if !matches!(self.fill(&mut prefix)?, Fill::Full) {
            self.ended = true;
            self.cut = true;
            return Ok(None);
        }
        let computed = self.hasher.finish();
        let mut stored = [0u8; HASH_LEN];
        self.hashing = false;
        let got = self.fill(&mut stored);
        self.hashing = true;
        if !matches!(got?, Fill::Full) {
            self.ended = true;
            self.cut = true;
            return Ok(None);
        }
        self.hasher.restart(&stored);
        Ok(Some(Item::Seal(Seal {
            chunk: be_u64(&prefix[0..8]),
            ts_us: be_u64(&prefix[8..16]),
            stored,
            computed,
        })))
    }

    pub(super) fn read_trailer(&mut self, len: usize) -> Result<Option<Item>, FormatError> {
        let mut body = std::mem::take(&mut self.scratch);
        let complete = self.read_body(&mut body, len);
        let item = complete.map(|c| {
            c.then(|| match Trailer::decode(&body) {
                Ok(t) => Item::Trailer(t),
                Err(why) => Item::Bad(KIND_TRAILER, why),
            })
        });
        self.scratch = body;
        item
    }

    pub(super) fn fail(&mut self, e: FormatError) -> FormatError {
        self.ended = true;
        self.cut = true;
        e
    }

    /// Reads a record head; `None` when the stream ended (and marks the reader ended).
    pub(super) fn read_head(&mut self) -> Result<Option<(u8, usize)>, FormatError> {
        let mut head = [0u8; RECORD_HEAD];
        match self.fill(&mut head)? {
            Fill::Full => {}
            Fill::Empty => {
                self.ended = true;
                return Ok(None);
            }
            Fill::Partial => {
                self.ended = true;
                self.cut = true;
                return Ok(None);
            }
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_RECORD {
            return Err(FormatError::Malformed(format!(
                "record of {len} bytes exceeds limit"
            )));
        }
        Ok(Some((head[0], len)))
    }

    /// Reads a body of `len` bytes into `buf` (resized). False when the stream ended first.
    pub(super) fn read_body(&mut self, buf: &mut Vec<u8>, len: usize) -> Result<bool, FormatError> {
        buf.clear();
        buf.resize(len, 0);
        match self.fill(buf)? {
            Fill::Full => Ok(true),
            Fill::Empty | Fill::Partial => {
                self.ended = true;
                self.cut = true;
                Ok(false)
            }
        }
    }

    /// Reads the body of a record; `None` when it was skipped or the stream ended inside it.
    pub(super) fn read_record(
        &mut self,
        kind: u8,
        len: usize,
        want_data: bool,
    ) -> Result<Option<Record>, FormatError> {
        let short = || FormatError::Malformed(format!("record of kind {kind:#04x} too short"));
        if kind == KIND_DATA && want_data {
            let mut body = Vec::new();
            if !self.read_body(&mut body, len)? {
                return Ok(None);
            }
            if len < DATA_PREFIX {
                return Err(short());
            }
            let (ts_us, channel, direction) = data_prefix(&body)?;
            let data = Bytes::from(body).slice(DATA_PREFIX..);
            return Ok(Some(Record::Data {
                ts_us,
                channel,
                direction,
                data,
            }));
        }
        let mut body = std::mem::take(&mut self.scratch);
        let complete = self.read_body(&mut body, len);
        let parsed = match complete {
            Err(e) => Err(e),
            Ok(false) => Ok(None),
            Ok(true) => parse_record(kind, &body),
        };
        self.scratch = body;
        parsed
    }

    /// Fills `buf` from the decompressed stream. An error of the underlying reader is returned;
    /// zstd failing (a cut or damaged frame) ends the stream as truncated instead.
    pub(super) fn fill(&mut self, buf: &mut [u8]) -> Result<Fill, FormatError> {
        let src = match &mut self.src {
            Src::Zstd(src) => src,
            Src::Sealed(_) => return self.fill_chunk(buf),
        };
        let mut got = 0;
        while got < buf.len() {
            match src.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    if self.hashing {
                        self.hasher.update(&buf[got..got + n]);
                    }
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if src.get_ref().get_ref().get_ref().failed {
                        return Err(e.into());
                    }
                    // zstd could not go on: a file cut inside a frame, or damaged bytes.
                    self.damage_is_cut = e.kind() == io::ErrorKind::UnexpectedEof;
                    self.damage = Some(e.to_string());
                    self.ended = true;
                    self.cut = true;
                    return Ok(Fill::Partial);
                }
            }
        }
        Ok(Fill::of(got, buf.len()))
    }
}
