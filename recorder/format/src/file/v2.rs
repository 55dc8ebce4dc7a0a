//! Format version 5, and the encrypted versions 4 and 2: clear records around chunks (the
//! layout is in the parent module's docs).
//!
//! The writer compresses a chunk's records into a zstd frame in memory (followed by any frame
//! the relay packed, [`super::pack`]), encrypts the chunk when the recording is encrypted ([`crate::crypt`]) and writes it as a clear CHUNK record, then the
//! CLOSE record (when the session ended in it) and the SEAL, whose hash covers those bytes as
//! written. The reader hashes the same bytes, so the seal chain and the trailer check without
//! decompressing anything, and without the key; with the key it also decrypts each chunk (the
//! nonce is the number after the last seal read) and reads its records.

use super::tail::Tail;
use super::*;
use crate::crypt::{ChunkCipher, SALT_LEN};
use psm_evidence::KeyId;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Record bytes a chunk holds before the writer ends it and starts another (a single longer
/// record gets a chunk of its own).
const CHUNK_TARGET: usize = 1 << 20;
/// Largest clear record: a CHUNK of one [`MAX_RECORD`] record that did not compress (zstd adds
/// less than 1/256), and its tag.
const MAX_OUTER: usize = MAX_RECORD + (MAX_RECORD >> 6) + (1 << 16);
/// Largest chunk buffer kept for the next chunk.
const REUSE_FRAME: usize = 64 * 1024;
/// `u8 version, u8 flags, [8] key id, [32] salt` before the header's JSON.
const HEADER_PREFIX: usize = 2 + 8 + SALT_LEN;

/// The writer's state for a chunked recording (format version 5, or encrypted).
pub(super) struct Encrypting {
    /// `None`: format version 5, chunks in the clear.
    cipher: Option<ChunkCipher>,
    /// The compressed bytes of the chunk being written.
    pub(super) frame: Vec<u8>,
    /// Record bytes in it.
    pub(super) plain: usize,
    /// The CLOSE record, written in the clear before the next seal.
    close: Option<Vec<u8>>,
}

fn sha256(bytes: &[u8]) -> Hash {
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    h
}

impl<W: Write> RecordingWriter<W> {
    /// Writes the clear HEADER record (after the magic), with `key` sets up the chunks' cipher,
    /// and primes the zstd context with the header's JSON ([`RecordingWriter::prime`]).
    pub(super) fn begin_chunks(
        &mut self,
        meta: &RecordingMeta,
        key: Option<&RecordingKey>,
        version: u8,
    ) -> Result<(), FormatError> {
        let json = json_body(meta)?;
        let mut salt = [0u8; SALT_LEN];
        let prefix = if key.is_some() {
            SystemRandom::new().fill(&mut salt).map_err(|_| {
                FormatError::Io(io::Error::other("the system random source failed"))
            })?;
            HEADER_PREFIX
        } else {
            2
        };
        let body_len = prefix + json.len();
        let mut rec = Vec::with_capacity(RECORD_HEAD + body_len);
        put_head(&mut rec, KIND_HEADER, body_len);
        rec.push(version);
        if let Some(key) = key {
            rec.push(FLAG_SEALED | FLAG_ENCRYPTED);
            rec.extend_from_slice(&key.id().0);
            rec.extend_from_slice(&salt);
        } else {
            rec.push(FLAG_SEALED);
        }
        rec.extend_from_slice(&json);
        self.hasher.update(&rec);
        self.guard(|w| w.inner.write_all(&rec))?;
        self.enc = Some(Box::new(Encrypting {
            cipher: key.map(|k| k.chunk_cipher(&salt, sha256(&rec))),
            frame: Vec::new(),
            plain: 0,
            close: None,
        }));
        self.prime(&json)
    }

    /// Chunked recordings: ends the chunk before a record of `len` bytes that would take it
    /// past [`CHUNK_TARGET`], so that a reader holds one chunk of bounded size at a time.
    pub(super) fn room(&mut self, len: usize) -> Result<(), FormatError> {
        match &self.enc {
            Some(enc) if enc.plain > 0 && enc.plain + len > CHUNK_TARGET => {
                self.end_chunk_encrypted()
            }
            _ => Ok(()),
        }
    }

    /// Keeps the CLOSE record to write in the clear at the end of the chunk.
    pub(super) fn close_clear(&mut self, rec: &[u8]) {
        if let Some(enc) = &mut self.enc {
            enc.close = Some(rec.to_vec());
            self.pending += rec.len() as u64;
        }
    }

    /// Writes the chunk (encrypted when the recording is), the CLOSE when there is one, and
    /// their SEAL; nothing when neither was written since the last seal. The first call seals
    /// the header even when nothing else was written (chunk 1 is then the header's seal
    /// alone), so that a recording's meta is sealed from its first flush, as in the stream
    /// layout, where the header is in chunk 1's frame.
    pub(super) fn end_chunk_encrypted(&mut self) -> Result<(), FormatError> {
        let has_close = self.enc.as_ref().is_some_and(|e| e.close.is_some());
        // records in the chunk: a frame of the writer's still open, or frames ended in it
        // (the writer's before a packed frame, packed frames: `append_packed`)
        let has_body = self.in_frame || self.enc.as_ref().is_some_and(|e| !e.frame.is_empty());
        if !has_body && !has_close && self.chunks > 0 {
            return Ok(());
        }
        let chunk = self.chunks + 1;
        if has_body {
            self.close_frame()?;
            let Some(enc) = self.enc.as_mut() else {
                return Ok(());
            };
            let mut body = std::mem::take(&mut enc.frame);
            enc.plain = 0;
            if let Some(cipher) = &enc.cipher {
                if cipher.seal(chunk, &mut body).is_err() {
                    self.poisoned = true;
                    return Err(FormatError::Malformed(format!(
                        "chunk {chunk} too large to encrypt"
                    )));
                }
            }
            let mut head = Vec::with_capacity(RECORD_HEAD);
            put_head(&mut head, KIND_CHUNK, body.len());
            self.hasher.update(&head);
            self.hasher.update(&body);
            self.guard(|w| {
                w.inner.write_all(&head)?;
                w.inner.write_all(&body)
            })?;
            // a small frame's buffer serves the next chunk; a large one is let go, so that a
            // recording that turns quiet after a transfer does not keep it
            if body.capacity() <= REUSE_FRAME {
                body.clear();
                if let Some(enc) = self.enc.as_mut() {
                    enc.frame = body;
                }
            }
        }
        let mut out = Vec::with_capacity(RECORD_HEAD + SEAL_BODY);
        if let Some(close) = self.enc.as_mut().and_then(|e| e.close.take()) {
            out.extend_from_slice(&close);
        }
        put_head(&mut out, KIND_SEAL, SEAL_BODY);
        out.extend_from_slice(&chunk.to_be_bytes());
        out.extend_from_slice(&self.last_ts_us.to_be_bytes());
        self.hasher.update(&out);
        let hash = self.hasher.finish();
        out.extend_from_slice(&hash);
        self.guard(|w| w.inner.write_all(&out))?;
        self.chunks = chunk;
        self.chain = hash;
        self.hasher.restart(&hash);
        Ok(())
    }
}

/// The reader's state for a chunked recording (format version 5, or encrypted).
pub(super) struct Envelope<R> {
    file: BufReader<R>,
    /// `None`: format version 5, chunks in the clear.
    key_id: Option<KeyId>,
    /// Present when the reader has the key.
    cipher: Option<ChunkCipher>,
    /// The records of the chunk being read, decrypted and decompressed as they are read.
    chunk: Option<BufReader<zstd::stream::read::Decoder<'static, io::Cursor<Vec<u8>>>>>,
    /// The number of the next chunk: one more than the last seal's.
    next_chunk: u64,
    /// Bytes were read since the last seal.
    unsealed: bool,
    /// Chunks are hashed but not opened ([`RecordingReader::seals_only`]).
    skip_chunks: bool,
    /// The last bytes read from the file, to look in when it reads as cut.
    tail: Tail,
    /// The trailer the file still ends with where it read as cut ([`super::tail`]).
    after_cut: Option<Trailer>,
}

impl<R> Envelope<R> {
    pub(super) fn key_id(&self) -> Option<KeyId> {
        self.key_id
    }
}

impl<R: Read> RecordingReader<R> {
    /// Reads the clear header of a chunked recording (the magic is read; it named the
    /// `expected` HEADER version and the seals' `hash`). The recording is encrypted unless
    /// `expected` is [`FORMAT_VERSION_CHUNKED`].
    pub(super) fn open_chunks(
        r: R,
        key: Option<&RecordingKey>,
        need_key: bool,
        expected: u8,
        hash: ChainHash,
    ) -> Result<Self, FormatError> {
        let mut reader = RecordingReader {
            src: Src::Sealed(Box::new(Envelope {
                file: BufReader::with_capacity(READ_BUFFER, r),
                key_id: None,
                cipher: None,
                chunk: None,
                next_chunk: 1,
                unsealed: false,
                skip_chunks: false,
                tail: Tail::default(),
                after_cut: None,
            })),
            meta: RecordingMeta::default(),
            version: 0,
            scratch: Vec::new(),
            seen_close: false,
            ended: false,
            cut: false,
            damage: None,
            damage_is_cut: false,
            sealed: true,
            hashing: true,
            hasher: ChunkHasher::new(hash, &[0u8; HASH_LEN]),
        };
        let mut head = [0u8; RECORD_HEAD];
        if !matches!(reader.fill_raw(&mut head)?, Fill::Full) {
            return Err(reader.header_missing());
        }
        let encrypted = expected != FORMAT_VERSION_CHUNKED;
        let prefix = if encrypted { HEADER_PREFIX } else { 2 };
        let len = be_u32(&head[1..5]) as usize;
        if head[0] != KIND_HEADER || !(prefix..=MAX_RECORD).contains(&len) {
            return Err(FormatError::Malformed(
                "chunked recording without a valid header".into(),
            ));
        }
        let mut body = vec![0u8; len];
        if !matches!(reader.fill_raw(&mut body)?, Fill::Full) {
            return Err(reader.header_missing());
        }
        reader.version = body[0];
        if reader.version != expected {
            return Err(FormatError::Malformed(format!(
                "unsupported chunked recording version {}",
                reader.version
            )));
        }
        if !encrypted {
            reader.meta = serde_json::from_slice(&body[prefix..])
                .map_err(|e| FormatError::Malformed(format!("recording header: {e}")))?;
            return Ok(reader);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&body[2..10]);
        let key_id = KeyId(id);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&body[10..HEADER_PREFIX]);
        reader.meta = serde_json::from_slice(&body[HEADER_PREFIX..])
            .map_err(|e| FormatError::Malformed(format!("recording header: {e}")))?;
        let mut whole = head.to_vec();
        whole.extend_from_slice(&body);
        let cipher = match key {
            Some(k) if k.id() != key_id => {
                return Err(FormatError::WrongKey {
                    recording: reader.meta.recording_id.clone(),
                    key_id,
                    given: k.id(),
                })
            }
            Some(k) => Some(k.chunk_cipher(&salt, sha256(&whole))),
            None if need_key => {
                return Err(FormatError::Encrypted {
                    recording: reader.meta.recording_id.clone(),
                    key_id,
                })
            }
            None => None,
        };
        if let Src::Sealed(env) = &mut reader.src {
            env.key_id = Some(key_id);
            env.cipher = cipher;
        }
        Ok(reader)
    }

    /// The error of a record read from an encrypted recording opened without its key, or from
    /// a chunked one told to check seals only.
    pub(super) fn key_needed(&self) -> FormatError {
        match self.encrypted_with() {
            Some(key_id) => FormatError::Encrypted {
                recording: self.meta.recording_id.clone(),
                key_id,
            },
            None => FormatError::Malformed(
                "this reader checks seals only: it opens no chunk (seals_only)".into(),
            ),
        }
    }

    /// Makes a chunked recording (format version 5, or encrypted) yield each chunk as
    /// [`Item::Encrypted`] without decrypting or decompressing it: its seals cover the bytes
    /// as written, so a verifier checks them without opening a chunk. No effect on format
    /// versions 3 and 1, whose seals cover the decompressed bytes.
    pub fn seals_only(&mut self) {
        if let Some(env) = self.envelope() {
            env.skip_chunks = true;
        }
    }

    fn envelope(&mut self) -> Option<&mut Envelope<R>> {
        match &mut self.src {
            Src::Sealed(env) => Some(env),
            Src::Zstd(_) => None,
        }
    }

    /// Fills `buf` from the file itself, hashing what it reads while `hashing`.
    fn fill_raw(&mut self, buf: &mut [u8]) -> Result<Fill, FormatError> {
        let got = self.read_raw(buf)?;
        Ok(Fill::of(got, buf.len()))
    }

    /// Reads into `buf` from the file until it is full or the file ends; how much was read.
    fn read_raw(&mut self, buf: &mut [u8]) -> Result<usize, FormatError> {
        let Src::Sealed(env) = &mut self.src else {
            return Ok(0);
        };
        let mut got = 0;
        while got < buf.len() {
            match env.file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        env.tail.push(&buf[..got]);
        if self.hashing {
            self.hasher.update(&buf[..got]);
        }
        Ok(got)
    }

    /// The trailer a chunked recording still ends with although it read as cut short (a
    /// length changed so that what follows reads as one record's body): `None` when it did not
    /// read as cut, or when nothing like a trailer ends the file. Its ids and signature are
    /// not checked here: [`crate::verify`] checks them against the header and the key.
    pub fn trailer_after_cut(&self) -> Option<&Trailer> {
        match &self.src {
            Src::Sealed(env) => env.after_cut.as_ref(),
            Src::Zstd(_) => None,
        }
    }

    /// Fills `buf` from the records of the chunk being read (`Empty` at its end).
    pub(super) fn fill_chunk(&mut self, buf: &mut [u8]) -> Result<Fill, FormatError> {
        let Some(chunk) = self.envelope().and_then(|e| e.chunk.as_mut()) else {
            return Ok(Fill::Empty);
        };
        let mut got = 0;
        while got < buf.len() {
            match chunk.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(FormatError::Malformed(format!(
                        "a chunk does not decompress: {e}"
                    )))
                }
            }
        }
        Ok(Fill::of(got, buf.len()))
    }

    /// The file ends part-way: what a crash leaves (unless it still ends with a trailer:
    /// [`trailer_after_cut`](Self::trailer_after_cut)).
    fn cut_short(&mut self, why: String) -> Result<Option<Item>, FormatError> {
        if let Src::Sealed(env) = &mut self.src {
            env.after_cut = env.tail.trailer(&self.meta);
        }
        self.ended = true;
        self.cut = true;
        self.damage = Some(why);
        self.damage_is_cut = true;
        Ok(None)
    }

    /// Reads the body of a clear record of `len` bytes; `None` when the file ends inside it.
    fn raw_body(&mut self, len: usize) -> Result<Option<Vec<u8>>, FormatError> {
        let mut body = vec![0u8; len];
        Ok(match self.fill_raw(&mut body)? {
            Fill::Full => Some(body),
            _ => None,
        })
    }

    /// `next_any` for encrypted recordings.
    pub(super) fn next_sealed(&mut self, want_data: bool) -> Result<Option<Item>, FormatError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            if self.envelope().is_some_and(|e| e.chunk.is_some()) {
                let mut head = [0u8; RECORD_HEAD];
                match self.fill(&mut head) {
                    Err(e) => return Err(self.fail(e)),
                    Ok(Fill::Full) => {}
                    Ok(Fill::Empty) => {
                        if let Some(env) = self.envelope() {
                            env.chunk = None;
                        }
                        continue;
                    }
                    Ok(Fill::Partial) => {
                        let e = FormatError::Malformed(
                            "a record is cut at the end of its chunk".into(),
                        );
                        return Err(self.fail(e));
                    }
                }
                let len = be_u32(&head[1..5]) as usize;
                if len > MAX_RECORD {
                    let e = FormatError::Malformed(format!("record of {len} bytes exceeds limit"));
                    return Err(self.fail(e));
                }
                match self.read_record(head[0], len, want_data) {
                    Ok(Some(rec)) => return Ok(Some(Item::Record(rec))),
                    Ok(None) => continue,
                    Err(e) => return Err(self.fail(e)),
                }
            }
            let mut head = [0u8; RECORD_HEAD];
            let (unsealed, n) = match self.envelope() {
                Some(env) => (env.unsealed, env.next_chunk),
                None => return Ok(None),
            };
            match self.fill_raw(&mut head)? {
                Fill::Full => {}
                Fill::Empty if unsealed => {
                    return self.cut_short(format!("the file ends before the seal of chunk {n}"))
                }
                Fill::Empty => {
                    self.ended = true;
                    return Ok(None);
                }
                Fill::Partial => return self.cut_short("the file ends inside a record".into()),
            }
            let (kind, len) = (head[0], be_u32(&head[1..5]) as usize);
            if len > MAX_OUTER {
                let e = FormatError::Malformed(format!("record of {len} bytes exceeds limit"));
                return Err(self.fail(e));
            }
            if kind == KIND_SEAL {
                return self.read_seal_raw(len);
            }
            if kind == KIND_TRAILER {
                self.hashing = false;
                let body = self.raw_body(len);
                self.hashing = true;
                return match body? {
                    None => self.cut_short("the file ends inside the trailer".into()),
                    Some(body) => Ok(Some(match Trailer::decode(&body) {
                        Ok(t) => Item::Trailer(t),
                        Err(why) => Item::Bad(KIND_TRAILER, why),
                    })),
                };
            }
            let Some(mut body) = self.raw_body(len)? else {
                return self.cut_short("the file ends inside a record".into());
            };
            if let Some(env) = self.envelope() {
                env.unsealed = true;
            }
            match kind {
                KIND_CHUNK => {
                    let Some(env) = self.envelope() else {
                        return Ok(None);
                    };
                    if env.skip_chunks {
                        return Ok(Some(Item::Encrypted(n)));
                    }
                    if let Some(key_id) = env.key_id {
                        let Some(cipher) = &env.cipher else {
                            return Ok(Some(Item::Encrypted(n)));
                        };
                        let Ok(plain) = cipher.open(n, &mut body) else {
                            let e = FormatError::Decrypt { chunk: n, key_id };
                            return Err(self.fail(e));
                        };
                        body.truncate(plain);
                    }
                    let mut decoder =
                        zstd::stream::read::Decoder::with_buffer(io::Cursor::new(body))?;
                    decoder.window_log_max(WINDOW_LOG_MAX)?;
                    env.chunk = Some(BufReader::with_capacity(READ_BUFFER, decoder));
                }
                KIND_CLOSE => match parse_record(kind, &body) {
                    Ok(Some(rec)) => {
                        self.seen_close = true;
                        return Ok(Some(Item::Record(rec)));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(self.fail(e)),
                },
                k if k >= FIRST_OPTIONAL_KIND => {}
                k => {
                    let e = FormatError::Malformed(format!("unexpected record kind {k:#04x}"));
                    return Err(self.fail(e));
                }
            }
        }
    }

    /// Reads a clear SEAL: its head, number and time are in the chunk's hash, its hash is not.
    fn read_seal_raw(&mut self, len: usize) -> Result<Option<Item>, FormatError> {
        if len != SEAL_BODY {
            return Ok(match self.raw_body(len)? {
                Some(_) => Some(Item::Bad(KIND_SEAL, format!("seal of {len} bytes"))),
                None => return self.cut_short("the file ends inside a seal".into()),
            });
        }
        let mut prefix = [0u8; SEAL_PREFIX];
        if !matches!(self.fill_raw(&mut prefix)?, Fill::Full) {
            return self.cut_short("the file ends inside a seal".into());
        }
        let computed = self.hasher.finish();
        let mut stored = [0u8; HASH_LEN];
        self.hashing = false;
        let got = self.fill_raw(&mut stored);
        self.hashing = true;
        if !matches!(got?, Fill::Full) {
            return self.cut_short("the file ends inside a seal".into());
        }
        self.hasher.restart(&stored);
        let chunk = be_u64(&prefix[0..8]);
        if let Some(env) = self.envelope() {
            env.next_chunk = chunk.saturating_add(1);
            env.unsealed = false;
        }
        Ok(Some(Item::Seal(Seal {
            chunk,
            ts_us: be_u64(&prefix[8..16]),
            stored,
            computed,
        })))
    }
}

/// [`frame_spans`] of a chunked recording: the header, each chunk up to the end of its seal,
/// the trailer.
pub(super) fn unit_spans(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = MAGIC_ENCRYPTED.len();
    let mut start = at;
    while at + RECORD_HEAD <= bytes.len() {
        let kind = bytes[at];
        let end = at + RECORD_HEAD + be_u32(&bytes[at + 1..at + 5]) as usize;
        if end > bytes.len() {
            break;
        }
        at = end;
        if matches!(kind, KIND_HEADER | KIND_SEAL | KIND_TRAILER) {
            out.push(start..end);
            start = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{verify, Status};
    use psm_evidence::EvidenceKey;

    const MARKER: &[u8] = b"SECRET-MARKER-4711";

    fn meta() -> RecordingMeta {
        RecordingMeta {
            protocol: String::new(),
            recording_id: "rec-1".into(),
            session_id: "s1".into(),
            user: "alice".into(),
            target: "db1".into(),
            account: "root".into(),
            source: "10.0.0.1:5555".into(),
            start_ms: 1_796_256_000_000,
        }
    }

    fn data(ts_us: u64, bytes: Vec<u8>) -> Record {
        Record::Data {
            ts_us,
            channel: 0,
            direction: Direction::Output,
            data: Bytes::from(bytes),
        }
    }

    fn records() -> Vec<Record> {
        let mut recs = vec![Record::Resize {
            ts_us: 1,
            channel: 0,
            cols: 80,
            rows: 24,
        }];
        for i in 1..=5u64 {
            let mut line = format!("line {i} ").into_bytes();
            line.extend_from_slice(MARKER);
            recs.push(data(i * 1_000_000, line.repeat(40)));
        }
        recs.push(Record::Close {
            ts_us: 6_000_000,
            summary: CloseSummary {
                end_ms: 1_796_256_006_000,
                exit_status: Some(0),
                exit_signal: None,
                reason: "client closed".into(),
            },
        });
        recs
    }

    /// Header, one chunk per record (the resize's, five data, one with CLOSE), trailer.
    fn recording(key: &RecordingKey, evidence: &EvidenceKey) -> Vec<u8> {
        let mut w = RecordingWriter::new_encrypted(Vec::new(), &meta(), key).expect("new");
        for r in records() {
            w.write(&r).expect("write");
            if !matches!(r, Record::Close { .. }) {
                w.flush().expect("flush");
            }
        }
        w.finish_signed(evidence, true).expect("finish")
    }

    fn read_all(bytes: &[u8], key: &RecordingKey) -> Result<Vec<Record>, FormatError> {
        let mut r = RecordingReader::open_with_key(bytes, Some(key))?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    fn has(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn round_trip_with_the_key_and_nothing_in_the_clear() {
        let key = RecordingKey::generate().expect("key");
        let (ev, _) = EvidenceKey::generate().expect("evidence");
        let bytes = recording(&key, &ev);
        assert!(bytes.starts_with(MAGIC_ENCRYPTED_BLAKE3));
        assert_eq!(read_all(&bytes, &key).expect("read"), records());
        // neither the file nor any zstd frame found in it shows the marker
        assert!(!has(&bytes, MARKER));
        for at in 0..bytes.len() {
            if let Ok(plain) = zstd::decode_all(&bytes[at..]) {
                assert!(!has(&plain, MARKER), "a clear zstd frame at {at}");
            }
        }
        let r = RecordingReader::open(&bytes[..]).expect("open");
        assert_eq!(r.meta(), &meta());
        assert_eq!(r.encrypted_with(), Some(key.id()));
        let listed = frame_spans(&bytes);
        assert_eq!(listed.len(), 1 + 7 + 1, "header, 7 chunks, trailer");
    }

    #[test]
    fn sha256_encrypted_recordings_of_format_version_2_still_read_and_verify() {
        let key = RecordingKey::generate().expect("key");
        let (ev, _) = EvidenceKey::generate().expect("evidence");
        let mut w = RecordingWriter::with_hash(Vec::new(), &meta(), Some(&key), ChainHash::Sha256)
            .expect("new");
        for r in records() {
            w.write(&r).expect("write");
            if !matches!(r, Record::Close { .. }) {
                w.flush().expect("flush");
            }
        }
        let bytes = w.finish_signed(&ev, true).expect("finish");
        assert!(bytes.starts_with(MAGIC_ENCRYPTED));
        assert_eq!(read_all(&bytes, &key).expect("read"), records());
        let rep = crate::verify::verify(&bytes[..], "rec-1", Some(ev.public()));
        assert!(rep.ok(), "{rep}");
        let mut b = bytes.clone();
        let last = b.len() - 100;
        b[last] ^= 0x01;
        let rep = crate::verify::verify(&b[..], "rec-1", Some(ev.public()));
        assert!(!rep.ok(), "{rep}");
    }

    #[test]
    fn without_or_with_a_wrong_key_replay_fails_clearly() {
        let key = RecordingKey::generate().expect("key");
        let (ev, _) = EvidenceKey::generate().expect("evidence");
        let bytes = recording(&key, &ev);
        let e = RecordingReader::open_with_key(&bytes[..], None)
            .err()
            .expect("no key");
        assert_eq!(
            e.to_string(),
            format!("recording rec-1 is encrypted with key {}", key.id())
        );
        let other = RecordingKey::generate().expect("key");
        let e = RecordingReader::open_with_key(&bytes[..], Some(&other))
            .err()
            .expect("wrong");
        assert!(matches!(e, FormatError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains(&other.id().to_string()), "{e}");
        // opened for its evidence only, the records stay out of reach
        let mut r = RecordingReader::open(&bytes[..]).expect("open");
        assert!(matches!(
            r.next_record(),
            Err(FormatError::Encrypted { .. })
        ));
        // a forged key id in the header does not make another key decrypt
        let mut forged = bytes.clone();
        let at = MAGIC_ENCRYPTED.len() + RECORD_HEAD + 2;
        forged[at..at + 8].copy_from_slice(&other.id().0);
        let e = read_all(&forged, &other).expect_err("forged id");
        assert!(matches!(e, FormatError::Decrypt { chunk: 1, .. }), "{e}");
    }

    #[test]
    fn verify_needs_no_key_and_catches_tampering() {
        let key = RecordingKey::generate().expect("key");
        let (ev, _) = EvidenceKey::generate().expect("evidence");
        let bytes = recording(&key, &ev);
        let check = |b: &[u8]| verify(b, "rec-1", Some(ev.public()));
        let rep = check(&bytes);
        assert!(rep.ok(), "{rep}");
        assert!(rep.summary.contains("client closed"), "{rep}");
        assert!(
            rep.summary
                .contains(&format!("encrypted with recording key {}", key.id())),
            "{rep}"
        );
        let spans = frame_spans(&bytes);
        let splice = |order: &[usize]| {
            let mut out = bytes[..spans[0].start].to_vec();
            for &i in order {
                out.extend_from_slice(&bytes[spans[i].clone()]);
            }
            out
        };
        // every flipped byte: never OK, and what decrypts is what was written (the clear
        // CLOSE is the seals' to guard)
        let written = records();
        for at in MAGIC_ENCRYPTED.len()..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x20;
            let rep = check(&b);
            // not truncated either: a length changed so that the file reads as cut still
            // ends with the trailer
            assert_eq!(rep.status, Status::Failed, "byte {at}: {rep}");
            if let Ok(recs) = read_all(&b, &key) {
                for (i, r) in recs.iter().enumerate() {
                    if !matches!(r, Record::Close { .. }) {
                        assert_eq!(r, &written[i], "byte {at}");
                    }
                }
            }
        }
        // a flipped byte in chunk 4 is named
        let mut b = bytes.clone();
        b[(spans[4].start + spans[4].end) / 2] ^= 1;
        let text = check(&b).to_string();
        assert!(text.contains("chunk 4"), "{text}");
        // dropped, swapped
        let text = check(&splice(&[0, 1, 2, 3, 5, 6, 7, 8])).to_string();
        assert!(text.contains("chunk 4 is missing"), "{text}");
        let swapped = splice(&[0, 1, 2, 4, 3, 5, 6, 7, 8]);
        let text = check(&swapped).to_string();
        assert!(text.contains("chunk 3 is out of order"), "{text}");
        assert!(matches!(
            read_all(&swapped, &key),
            Err(FormatError::Decrypt { chunk: 3, .. })
        ));
        // a length changed so that the file reads as cut, yet still ends with its trailer
        let mut b = bytes.clone();
        assert_eq!(b[spans[4].start], KIND_CHUNK);
        b[spans[4].start + 1..spans[4].start + 5].copy_from_slice(&(1u32 << 20).to_be_bytes());
        let rep = check(&b);
        assert_eq!(rep.status, Status::Failed, "{rep}");
        assert!(
            rep.to_string().contains("length or kind was changed"),
            "{rep}"
        );
        // the trailer removed; cut inside a chunk
        let text = check(&bytes[..spans[7].end]).to_string();
        assert!(text.contains("trailer missing"), "{text}");
        for cut in (spans[2].start + 1..spans[6].end).step_by(13) {
            let rep = check(&bytes[..cut]);
            assert_eq!(rep.status, Status::Truncated, "cut {cut}: {rep}");
            let recs = read_all(&bytes[..cut], &key).expect("replays to the cut");
            assert_eq!(&recs[..], &records()[..recs.len()]);
        }
    }

    #[test]
    fn nonces_never_repeat() {
        let key = RecordingKey::generate().expect("key");
        let (ev, _) = EvidenceKey::generate().expect("evidence");
        // the same session twice: every chunk differs, and each recording has its own salt
        let a = recording(&key, &ev);
        let b = recording(&key, &ev);
        let (sa, sb) = (frame_spans(&a), frame_spans(&b));
        let salt = |bytes: &[u8], span: &std::ops::Range<usize>| {
            bytes[span.start + RECORD_HEAD + 10..span.start + RECORD_HEAD + HEADER_PREFIX].to_vec()
        };
        assert_ne!(salt(&a, &sa[0]), salt(&b, &sb[0]));
        for (x, y) in sa[1..7].iter().zip(&sb[1..7]) {
            assert_ne!(&a[x.start..x.start + 64], &b[y.start..y.start + 64]);
        }
        // within a recording, the chunk number is the nonce: the same records in two chunks
        // encrypt differently
        let mut w = RecordingWriter::new_encrypted(Vec::new(), &meta(), &key).expect("new");
        for _ in 0..2 {
            w.write(&data(1, b"same".to_vec())).expect("write");
            w.flush().expect("flush");
        }
        let c = w.finish().expect("finish");
        let s = frame_spans(&c);
        let body = |r: &std::ops::Range<usize>| {
            c[r.start + RECORD_HEAD..r.end - RECORD_HEAD - SEAL_BODY].to_vec()
        };
        assert_ne!(body(&s[1]), body(&s[2]));
    }

    #[test]
    #[ignore = "writes the fuzz corpus seeds: cargo test -p psm-recorder-format -- --ignored write_encrypted_corpus_seeds"]
    fn write_encrypted_corpus_seeds() {
        let key = RecordingKey::generate().expect("key");
        let (ev, _) = EvidenceKey::generate().expect("evidence");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/recording_read");
        let bytes = recording(&key, &ev);
        // not `.psmrec`: the corpus test replays those, and these need their key; `.psmrec4`:
        // format version 4 (the `.psmrec2` seeds are version 2, SHA-256 seals)
        std::fs::write(dir.join("encrypted-signed.psmrec4"), &bytes).expect("write");
        let spans = frame_spans(&bytes);
        let cut = &bytes[..(spans[3].start + spans[3].end) / 2];
        std::fs::write(dir.join("encrypted-cut.psmrec4"), cut).expect("write");
    }

    #[test]
    fn large_records_make_chunks_of_bounded_size() {
        let key = RecordingKey::generate().expect("key");
        let mut w = RecordingWriter::new_encrypted(Vec::new(), &meta(), &key).expect("new");
        let big: Vec<u8> = (0..3 * CHUNK_TARGET as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let recs: Vec<Record> = big
            .chunks(CHUNK_TARGET / 3)
            .enumerate()
            .map(|(i, c)| data(i as u64, c.to_vec()))
            .collect();
        for r in &recs {
            w.write(r).expect("write");
        }
        let bytes = w.finish().expect("finish");
        let spans = frame_spans(&bytes);
        assert!(spans.len() >= 4, "{} units", spans.len());
        assert!(spans.iter().all(|s| s.len() < CHUNK_TARGET + 4096));
        assert_eq!(read_all(&bytes, &key).expect("read"), recs);
    }
}
