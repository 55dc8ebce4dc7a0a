//! The writer: records compressed with zstd into chunks, each chunk sealed, the trailer signed.

use super::*;

/// zstd level for data that compresses (terminal text, most sessions). Level 1 rather than 3:
/// about 1.6 times the speed on terminal listings for the same size (4 % more on source code),
/// and the recorder's compression is on every recorded session's path (perf/BENCHMARKS.md).
pub(super) const ZSTD_LEVEL: i32 = 1;
/// zstd level once a chunk barely compressed (a transfer of compressed or encrypted files):
/// negative levels spend a fraction of the CPU and still emit raw blocks where nothing is won.
pub(super) const ZSTD_FAST_LEVEL: i32 = -7;
/// Chunks smaller than this do not change the level (too little to judge).
pub(super) const ADAPT_MIN_BYTES: u64 = 16 * 1024;
/// A chunk whose output is above this share of its input switches to the fast level …
pub(super) const ADAPT_POOR: f64 = 0.9;
/// … and one below this share switches back.
pub(super) const ADAPT_GOOD: f64 = 0.75;

/// The level for the next zstd frame, from how the last one compressed; readers need no
/// change (each frame says what it needs, whatever its level).
pub(super) fn next_level(level: i32, plain: u64, packed: u64) -> i32 {
    if plain < ADAPT_MIN_BYTES {
        return level;
    }
    let ratio = packed as f64 / plain as f64;
    if ratio > ADAPT_POOR {
        ZSTD_FAST_LEVEL
    } else if ratio < ADAPT_GOOD {
        ZSTD_LEVEL
    } else {
        level
    }
}

/// Writes a recording: the magic, the header, then records, compressed with zstd.
///
/// Call [`finish`](Self::finish) at the end: dropping the writer loses what was written since
/// the last [`flush`](Self::flush).
pub struct RecordingWriter<W: Write> {
    pub(super) inner: W,
    pub(super) cctx: zstd::stream::raw::Encoder<'static>,
    /// Compressed output, reused.
    pub(super) out: Vec<u8>,
    /// Record heads and small bodies, reused.
    pub(super) scratch: Vec<u8>,
    /// Whether a zstd frame is open (something was compressed since it last ended).
    pub(super) in_frame: bool,
    /// Uncompressed bytes written since the last flush.
    pub(super) pending: u64,
    /// The zstd level in use, whether it adapts, and the current frame's bytes in and out.
    pub(super) level: i32,
    pub(super) adaptive: bool,
    pub(super) frame_in: u64,
    pub(super) frame_out: u64,
    /// An earlier write failed half-way: the stream is unusable.
    pub(super) poisoned: bool,
    /// The running hash of the current chunk (starts with the previous seal's hash).
    pub(super) hasher: ChunkHasher,
    /// The last seal's hash (zeros before the first).
    pub(super) chain: Hash,
    /// Chunks sealed so far.
    pub(super) chunks: u64,
    /// Largest `ts_us` written.
    pub(super) last_ts_us: u64,
    /// Session and recording id, for the trailer.
    pub(super) session_id: String,
    pub(super) recording_id: String,
    /// Encrypted recordings (format versions 4 and 2): the chunk being compressed, the cipher.
    pub(super) enc: Option<Box<v2::Encrypting>>,
}

impl<W: Write> RecordingWriter<W> {
    /// Starts a recording on `w` (format version 5): writes the magic and the HEADER record.
    pub fn new(w: W, meta: &RecordingMeta) -> Result<Self, FormatError> {
        Self::with_hash(w, meta, None, ChainHash::Blake3)
    }

    /// Starts a recording in format version 3 (one zstd stream, seals over the decompressed
    /// bytes): read and verified, no longer written by psm-recorder; for tests of readers and
    /// verifiers, and `psm-perf record-bench`'s comparison.
    pub fn new_stream(w: W, meta: &RecordingMeta) -> Result<Self, FormatError> {
        Self::with_layout(w, meta, None, ChainHash::Blake3, Layout::Stream)
    }

    /// Starts an encrypted recording (format version 4) on `w`: writes the magic and the clear
    /// HEADER record, which names `key` by its id; every chunk is then encrypted with it.
    pub fn new_encrypted(
        w: W,
        meta: &RecordingMeta,
        key: &RecordingKey,
    ) -> Result<Self, FormatError> {
        Self::with_hash(w, meta, Some(key), ChainHash::Blake3)
    }

    /// Starts an encrypted recording when `key` is given, else an unencrypted one.
    pub fn with_key(
        w: W,
        meta: &RecordingMeta,
        key: Option<&RecordingKey>,
    ) -> Result<Self, FormatError> {
        Self::with_hash(w, meta, key, ChainHash::Blake3)
    }

    /// Like [`with_key`](Self::with_key), with the seals' hash chosen: [`ChainHash::Sha256`]
    /// writes the older format versions 1 and 2 (for tests of readers and verifiers, and
    /// `psm-perf record-bench`'s comparison).
    pub fn with_hash(
        w: W,
        meta: &RecordingMeta,
        key: Option<&RecordingKey>,
        hash: ChainHash,
    ) -> Result<Self, FormatError> {
        let layout = if key.is_some() {
            Layout::Encrypted
        } else {
            Layout::Chunks
        };
        Self::with_layout(w, meta, key, hash, layout)
    }

    pub(super) fn with_layout(
        mut w: W,
        meta: &RecordingMeta,
        key: Option<&RecordingKey>,
        hash: ChainHash,
        layout: Layout,
    ) -> Result<Self, FormatError> {
        let (magic, version, layout) = layout_for(layout, hash);
        w.write_all(magic)?;
        let mut writer = Self::start(w, meta, hash)?;
        match (layout, key) {
            (Layout::Encrypted, Some(key)) => {
                writer.begin_chunks(meta, Some(key), version)?;
                return Ok(writer);
            }
            (Layout::Chunks, _) => {
                writer.begin_chunks(meta, None, version)?;
                return Ok(writer);
            }
            _ => {}
        }
        let json = json_body(meta)?;
        let mut rec = Vec::with_capacity(RECORD_HEAD + 2 + json.len());
        put_head(&mut rec, KIND_HEADER, 2 + json.len());
        rec.push(version);
        rec.push(FLAG_SEALED);
        rec.extend_from_slice(&json);
        writer.compress(&rec)?;
        Ok(writer)
    }

    pub(super) fn start(w: W, meta: &RecordingMeta, hash: ChainHash) -> Result<Self, FormatError> {
        let mut cctx = zstd::stream::raw::Encoder::new(ZSTD_LEVEL)?;
        // No zstd content checksum (XXH64 over every recorded byte): the seals already cover
        // every byte (as written in versions 5, 4 and 2, decompressed in 3 and 1), and every
        // reader compares each seal with what it read (`RecordingReader::next_record`,
        // `verify`), so a damaged or modified chunk is caught, tampering included. It was a
        // third of the writer's CPU on zeros (`psm-perf record-bench`: 0.14 → 0.09 CPU-s/GiB;
        // perf/BENCHMARKS.md). Frames written with one still read.
        cctx.set_parameter(CParameter::ChecksumFlag(false))?;
        Ok(RecordingWriter {
            inner: w,
            cctx,
            out: Vec::with_capacity(zstd::zstd_safe::CCtx::out_size()),
            scratch: Vec::with_capacity(256),
            in_frame: false,
            pending: 0,
            level: ZSTD_LEVEL,
            adaptive: true,
            frame_in: 0,
            frame_out: 0,
            poisoned: false,
            hasher: ChunkHasher::new(hash, &[0u8; HASH_LEN]),
            chain: [0u8; HASH_LEN],
            chunks: 0,
            last_ts_us: 0,
            session_id: meta.session_id.clone(),
            recording_id: meta.recording_id.clone(),
            enc: None,
        })
    }

    /// Sets up the zstd context now, when the recording opens, rather than at its first record
    /// and first flush (the stream layout does so by compressing its header into chunk 1). It
    /// compresses `sample` (the header's JSON) into a frame that is thrown away: that allocates
    /// the context and touches the memory a frame uses (match tables, sequence and literal
    /// buffers, entropy tables, the output buffer), so the page faults come now. A session's set-up already takes milliseconds;
    /// its first output is a keystroke's echo, and when many sessions print at once (1000 idle
    /// sessions answering together) that set-up work would compete with the relay for the same
    /// cores (perf/BENCHMARKS.md: the slowest of 1000 echoes went from 0.7 to 4–7.5 ms without
    /// it).
    pub(super) fn prime(&mut self, sample: &[u8]) -> Result<(), FormatError> {
        self.guard(|w| {
            let mut input = InBuffer::around(sample);
            loop {
                w.out.clear();
                let mut output = OutBuffer::around(&mut w.out);
                w.cctx.run(&mut input, &mut output)?;
                if input.pos() == input.src.len() {
                    break;
                }
            }
            loop {
                w.out.clear();
                let remaining = {
                    let mut output = OutBuffer::around(&mut w.out);
                    w.cctx.finish(&mut output, false)?
                };
                if remaining == 0 {
                    break;
                }
            }
            w.out.clear();
            w.cctx.reinit()
        })
    }

    /// Appends one record. DATA longer than [`MAX_RECORD`] is cut into several records.
    pub fn write(&mut self, rec: &Record) -> Result<(), FormatError> {
        if let Record::Data {
            ts_us,
            channel,
            direction,
            data,
        } = rec
        {
            return self.write_data(*ts_us, *channel, *direction, data);
        }
        self.check()?;
        self.last_ts_us = self.last_ts_us.max(rec.ts_us());
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let result = self.write_with(rec, &mut scratch);
        self.scratch = scratch;
        result
    }

    /// Appends a DATA record of `data` (what [`write`](Self::write) does with
    /// [`Record::Data`], from a borrowed slice).
    pub fn write_data(
        &mut self,
        ts_us: u64,
        channel: u32,
        direction: Direction,
        data: &[u8],
    ) -> Result<(), FormatError> {
        self.check()?;
        self.last_ts_us = self.last_ts_us.max(ts_us);
        let max = MAX_RECORD - DATA_PREFIX;
        let mut rest = data;
        loop {
            let (piece, next) = rest.split_at(rest.len().min(max));
            self.room(RECORD_HEAD + DATA_PREFIX + piece.len())?;
            let head = super::pack::data_head(ts_us, channel, direction, piece.len());
            self.compress(&head)?;
            self.compress(piece)?;
            rest = next;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    /// Appends DATA records packed by the relay ([`super::pack`]), once checked
    /// ([`Unpacker::check`](super::pack::Unpacker::check)): one zstd frame that goes into the
    /// chunk as it is, after the writer's own frame (ended first), and counts towards the
    /// chunk's size like the records it holds. Only the chunked layouts (format versions 5 and
    /// 4) take it.
    pub fn append_packed(&mut self, packed: super::pack::Checked<'_>) -> Result<(), FormatError> {
        self.check()?;
        if self.enc.is_none() {
            return Err(FormatError::Malformed(
                "packed records need a chunked recording".into(),
            ));
        }
        self.last_ts_us = self.last_ts_us.max(packed.last_ts_us);
        self.room(packed.plain_len as usize)?;
        // the writer's open frame ends here, so that the packed one follows it whole
        self.close_frame()?;
        self.pending += u64::from(packed.plain_len);
        if let Some(enc) = &mut self.enc {
            enc.plain += packed.plain_len as usize;
            enc.frame.extend_from_slice(packed.frame);
        }
        Ok(())
    }

    pub(super) fn write_with(
        &mut self,
        rec: &Record,
        scratch: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        match rec {
            Record::Data {
                ts_us,
                channel,
                direction,
                data,
            } => self.write_data(*ts_us, *channel, *direction, data)?,
            Record::Resize {
                ts_us,
                channel,
                cols,
                rows,
            } => {
                self.room(RECORD_HEAD + 20)?;
                put_head(scratch, KIND_RESIZE, 20);
                scratch.extend_from_slice(&ts_us.to_be_bytes());
                scratch.extend_from_slice(&channel.to_be_bytes());
                scratch.extend_from_slice(&cols.to_be_bytes());
                scratch.extend_from_slice(&rows.to_be_bytes());
                self.compress(scratch)?;
            }
            Record::Close { ts_us, summary } => {
                let json = json_body(summary)?;
                put_head(scratch, KIND_CLOSE, 8 + json.len());
                scratch.extend_from_slice(&ts_us.to_be_bytes());
                scratch.extend_from_slice(&json);
                if self.enc.is_some() {
                    // in the clear, before the last seal: verify sees it without the key
                    self.close_clear(scratch);
                } else {
                    self.compress(scratch)?;
                }
            }
        }
        Ok(())
    }

    /// Ends the current zstd frame and flushes the underlying writer: everything written so far
    /// becomes readable from it. Cheap when nothing was written since the last flush.
    pub fn flush(&mut self) -> Result<(), FormatError> {
        self.check()?;
        self.end_frame()?;
        self.guard(|w| w.inner.flush())?;
        self.pending = 0;
        Ok(())
    }

    /// Ends the recording (flushes) and returns the underlying writer, without a trailer: the
    /// recording is sealed but not signed. Does not fsync.
    pub fn finish(mut self) -> Result<W, FormatError> {
        self.flush()?;
        Ok(self.inner)
    }

    /// Ends the recording (flushes), then writes the TRAILER signed with `key` in a frame of its
    /// own, and returns the underlying writer. `complete`: the last record written is the
    /// session's own CLOSE (not one made up because the relay link was lost). Does not fsync.
    pub fn finish_signed(mut self, key: &EvidenceKey, complete: bool) -> Result<W, FormatError> {
        self.flush()?;
        let signed = Trailer::encode_signed(
            complete,
            self.chunks,
            &self.chain,
            key.public().key_id(),
            &self.session_id,
            &self.recording_id,
        );
        let mut msg = Vec::with_capacity(TRAILER_DOMAIN.len() + signed.len());
        msg.extend_from_slice(TRAILER_DOMAIN);
        msg.extend_from_slice(&signed);
        let sig = key.sign(&msg);
        let mut rec = Vec::with_capacity(RECORD_HEAD + signed.len() + SIG_LEN);
        put_head(&mut rec, KIND_TRAILER, signed.len() + SIG_LEN);
        rec.extend_from_slice(&signed);
        rec.extend_from_slice(&sig);
        if self.enc.is_some() {
            // in the clear, like the seals
            self.guard(|w| w.inner.write_all(&rec))?;
        } else {
            self.compress_with(&rec, false)?;
            self.close_frame()?;
        }
        self.guard(|w| w.inner.flush())?;
        Ok(self.inner)
    }

    /// Chunks sealed so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Uncompressed bytes written since the last flush (to decide when to flush).
    pub fn pending_bytes(&self) -> u64 {
        self.pending
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub(super) fn check(&self) -> Result<(), FormatError> {
        if self.poisoned {
            Err(FormatError::Io(io::Error::other(
                "recording writer failed earlier",
            )))
        } else {
            Ok(())
        }
    }

    /// Runs `f`, poisoning the writer when it fails.
    pub(super) fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> io::Result<T>,
    ) -> Result<T, FormatError> {
        match f(self) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.poisoned = true;
                Err(e.into())
            }
        }
    }

    pub(super) fn compress(&mut self, data: &[u8]) -> Result<(), FormatError> {
        self.compress_with(data, true)
    }

    /// Compresses `data`, adding it to the chunk's hash when `hashed`.
    pub(super) fn compress_with(&mut self, data: &[u8], hashed: bool) -> Result<(), FormatError> {
        if data.is_empty() {
            return Ok(());
        }
        if hashed && self.enc.is_none() {
            self.hasher.update(data);
        }
        self.in_frame = true;
        if let Some(enc) = &mut self.enc {
            enc.plain += data.len();
        }
        self.pending += data.len() as u64;
        self.frame_in += data.len() as u64;
        self.guard(|w| {
            let mut rest = data;
            while !rest.is_empty() {
                let mut input = InBuffer::around(rest);
                w.out.clear();
                {
                    let mut output = OutBuffer::around(&mut w.out);
                    w.cctx.run(&mut input, &mut output)?;
                }
                rest = &rest[input.pos()..];
                w.emit_out()?;
            }
            Ok(())
        })
    }

    /// Where compressed bytes go: the file, or the chunk being built when encrypted.
    pub(super) fn emit_out(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.frame_out += self.out.len() as u64;
        match &mut self.enc {
            Some(enc) => {
                enc.frame.extend_from_slice(&self.out);
                Ok(())
            }
            None => self.inner.write_all(&self.out),
        }
    }

    /// Seals the current chunk and ends its zstd frame (nothing when no frame is open).
    pub(super) fn end_frame(&mut self) -> Result<(), FormatError> {
        if self.enc.is_some() {
            return self.end_chunk_encrypted();
        }
        if !self.in_frame {
            return Ok(());
        }
        let chunk = self.chunks + 1;
        let mut seal = [0u8; RECORD_HEAD + SEAL_PREFIX];
        seal[0] = KIND_SEAL;
        seal[1..5].copy_from_slice(&(SEAL_BODY as u32).to_be_bytes());
        seal[5..13].copy_from_slice(&chunk.to_be_bytes());
        seal[13..21].copy_from_slice(&self.last_ts_us.to_be_bytes());
        self.compress_with(&seal, true)?;
        let hash = self.hasher.finish();
        self.compress_with(&hash, false)?;
        self.close_frame()?;
        self.chunks = chunk;
        self.chain = hash;
        self.hasher.restart(&hash);
        Ok(())
    }

    /// Ends the zstd frame as it is.
    pub(super) fn close_frame(&mut self) -> Result<(), FormatError> {
        if !self.in_frame {
            return Ok(());
        }
        self.guard(|w| {
            loop {
                w.out.clear();
                let remaining = {
                    let mut output = OutBuffer::around(&mut w.out);
                    w.cctx.finish(&mut output, false)?
                };
                w.emit_out()?;
                if remaining == 0 {
                    break;
                }
            }
            w.cctx.reinit()?;
            w.in_frame = false;
            let level = if w.adaptive {
                next_level(w.level, w.frame_in, w.frame_out)
            } else {
                w.level
            };
            (w.frame_in, w.frame_out) = (0, 0);
            if level != w.level {
                w.cctx.set_parameter(CParameter::CompressionLevel(level))?;
                w.level = level;
            }
            Ok(())
        })
    }

    /// The zstd level the next chunk is compressed with.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Keeps the default level for every chunk (the baseline of `psm-perf record-bench`).
    pub fn fixed_level(&mut self) {
        self.adaptive = false;
    }

    /// Writes the zstd content checksum in the frames started from now on, as psm-recorder did
    /// before (tests of readers and verifiers).
    #[cfg(test)]
    pub(crate) fn with_zstd_checksum(&mut self) {
        self.cctx
            .set_parameter(CParameter::ChecksumFlag(true))
            .expect("checksum flag");
    }
}
