//! The hash of a recording's seal chain, chosen by the file's format version: SHA-256 in
//! versions 1 and 2, BLAKE3 (256-bit output) from version 3 on.
//!
//! BLAKE3 because the seal covers every byte of every session: with SHA-256 it was the largest
//! single cost of recording a bulk transfer (about 0.55 CPU-s per GiB on the 2-core machine,
//! against 0.12 for BLAKE3; see perf/BENCHMARKS.md). Both are 256-bit collision-resistant
//! hashes; a verifier takes the algorithm from the magic, before it hashes anything.

use psm_evidence::{Hash, HASH_LEN};
use ring::digest;

/// Which hash a recording's seals use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainHash {
    /// Format versions 1 and 2 (written before BLAKE3 was adopted; still read and verified).
    Sha256,
    /// Format versions 3 and 4 (what psm writes).
    Blake3,
}

/// The running hash of one chunk: starts with the previous seal's hash.
pub(crate) enum ChunkHasher {
    Sha256(Box<digest::Context>),
    Blake3(Box<Staged>),
}

/// BLAKE3 fed in whole pieces of [`PIECE`] bytes.
///
/// BLAKE3 hashes 1 KiB chunks side by side (16 at once with AVX-512), but only in subtrees
/// aligned on the count hashed so far: after a record head of 5 or 21 bytes, the bytes that
/// follow are hashed one 64-byte block after another. Fed a recording's heads and bodies as
/// they come it spent 0.35 CPU-s per GiB with 32 KiB bodies and 1.6 with 2 KiB ones (more than
/// SHA-256's 0.56); fed through this stage, 0.14 to 0.16 whatever the body size (measured on
/// the 2-core machine, perf/BENCHMARKS.md). The hash is the same either way.
pub(crate) struct Staged {
    hasher: blake3::Hasher,
    /// Bytes not yet hashed: fewer than [`PIECE`].
    stage: Vec<u8>,
    /// Bytes hashed in this chunk so far (to let an idle recording's stage go at each seal).
    fed: usize,
}

/// What the stage hands to BLAKE3 at once (16 of its chunks).
const PIECE: usize = 16 * 1024;

impl Staged {
    fn update(&mut self, mut bytes: &[u8]) {
        self.fed += bytes.len();
        if !self.stage.is_empty() {
            let n = (PIECE - self.stage.len()).min(bytes.len());
            self.stage.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.stage.len() < PIECE {
                return;
            }
            self.hasher.update(&self.stage);
            self.stage.clear();
        }
        let whole = bytes.len() - bytes.len() % PIECE;
        for piece in bytes[..whole].chunks_exact(PIECE) {
            self.hasher.update(piece);
        }
        self.stage.extend_from_slice(&bytes[whole..]);
    }

    fn finish(&mut self) -> Hash {
        self.hasher.update(&self.stage);
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(self.hasher.finalize().as_bytes());
        self.hasher.reset();
        self.stage.clear();
        if self.fed < PIECE {
            // a chunk of a quiet session: keep no buffer while it stays quiet
            self.stage = Vec::new();
        }
        self.fed = 0;
        out
    }
}

impl ChunkHasher {
    /// A chunk's hasher chained on `chain` (the previous seal's hash; zeros before the first).
    pub(crate) fn new(alg: ChainHash, chain: &Hash) -> Self {
        let mut h = match alg {
            ChainHash::Sha256 => {
                ChunkHasher::Sha256(Box::new(digest::Context::new(&digest::SHA256)))
            }
            ChainHash::Blake3 => ChunkHasher::Blake3(Box::new(Staged {
                hasher: blake3::Hasher::new(),
                stage: Vec::new(),
                fed: 0,
            })),
        };
        h.update(chain);
        h
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            ChunkHasher::Sha256(c) => c.update(bytes),
            ChunkHasher::Blake3(h) => h.update(bytes),
        }
    }

    /// The chunk's hash; the hasher then starts the next chunk, chained on `next` (the hash
    /// the next chunk follows: the one just computed for a writer, the stored one for a
    /// reader, which the caller passes once it has read it: see [`restart`](Self::restart)).
    pub(crate) fn finish(&mut self) -> Hash {
        let mut out = [0u8; HASH_LEN];
        match self {
            ChunkHasher::Sha256(c) => {
                let done = std::mem::replace(&mut **c, digest::Context::new(&digest::SHA256));
                out.copy_from_slice(done.finish().as_ref());
            }
            ChunkHasher::Blake3(h) => out = h.finish(),
        }
        out
    }

    /// Starts the next chunk, chained on `chain` (after [`finish`](Self::finish)).
    pub(crate) fn restart(&mut self, chain: &Hash) {
        match self {
            ChunkHasher::Sha256(_) => *self = ChunkHasher::new(ChainHash::Sha256, chain),
            // keeps the stage's buffer
            ChunkHasher::Blake3(h) => h.update(chain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_algorithm_hashes_the_chain_then_the_bytes() {
        let chain = [7u8; HASH_LEN];
        let mut h = ChunkHasher::new(ChainHash::Blake3, &chain);
        h.update(b"chunk");
        let mut joined = chain.to_vec();
        joined.extend_from_slice(b"chunk");
        assert_eq!(h.finish(), *blake3::hash(&joined).as_bytes());
        let mut s = ChunkHasher::new(ChainHash::Sha256, &chain);
        s.update(b"chunk");
        assert_eq!(
            s.finish().as_slice(),
            digest::digest(&digest::SHA256, &joined).as_ref()
        );
        // after finish, a restart chains on what it is given, with the same algorithm
        h.restart(&[1u8; HASH_LEN]);
        h.update(b"x");
        let mut next = vec![1u8; HASH_LEN];
        next.push(b'x');
        assert_eq!(h.finish(), *blake3::hash(&next).as_bytes());
    }

    #[test]
    fn the_stage_hashes_what_plain_blake3_does_however_the_bytes_come() {
        let bytes: Vec<u8> = (0..200_000u64)
            .map(|i| ((i * 2_654_435_761) >> 7) as u8)
            .collect();
        let chain = [3u8; HASH_LEN];
        let mut whole = chain.to_vec();
        whole.extend_from_slice(&bytes);
        let expected = *blake3::hash(&whole).as_bytes();
        for cut in [
            1usize,
            5,
            21,
            1000,
            PIECE - 1,
            PIECE,
            PIECE + 7,
            3 * PIECE,
            70_000,
        ] {
            let mut h = ChunkHasher::new(ChainHash::Blake3, &chain);
            for piece in bytes.chunks(cut) {
                h.update(piece);
            }
            assert_eq!(h.finish(), expected, "pieces of {cut}");
            // and the next chunk starts clean, chained on what it is given
            h.restart(&chain);
            h.update(&bytes[..10]);
            let mut next = chain.to_vec();
            next.extend_from_slice(&bytes[..10]);
            assert_eq!(h.finish(), *blake3::hash(&next).as_bytes(), "after {cut}");
        }
    }
}
