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
    Blake3(Box<blake3::Hasher>),
}

impl ChunkHasher {
    /// A chunk's hasher chained on `chain` (the previous seal's hash; zeros before the first).
    pub(crate) fn new(alg: ChainHash, chain: &Hash) -> Self {
        let mut h = match alg {
            ChainHash::Sha256 => {
                ChunkHasher::Sha256(Box::new(digest::Context::new(&digest::SHA256)))
            }
            ChainHash::Blake3 => ChunkHasher::Blake3(Box::new(blake3::Hasher::new())),
        };
        h.update(chain);
        h
    }

    pub(crate) fn alg(&self) -> ChainHash {
        match self {
            ChunkHasher::Sha256(_) => ChainHash::Sha256,
            ChunkHasher::Blake3(_) => ChainHash::Blake3,
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            ChunkHasher::Sha256(c) => c.update(bytes),
            ChunkHasher::Blake3(h) => {
                h.update(bytes);
            }
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
            ChunkHasher::Blake3(h) => {
                out.copy_from_slice(h.finalize().as_bytes());
                h.reset();
            }
        }
        out
    }

    /// Starts the next chunk, chained on `chain`.
    pub(crate) fn restart(&mut self, chain: &Hash) {
        *self = ChunkHasher::new(self.alg(), chain);
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
        assert_eq!(h.alg(), ChainHash::Blake3);
        h.update(b"x");
        let mut next = vec![1u8; HASH_LEN];
        next.push(b'x');
        assert_eq!(h.finish(), *blake3::hash(&next).as_bytes());
    }
}
