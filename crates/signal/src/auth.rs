//! Proofs of key possession for the gRPC signaling server (docs/PROTOCOL.md §11): the
//! format, made and opened here; the server decides what to accept.
//!
//! A client proves that it holds the private key of `K` on one call with the
//! binary metadata [`PROOF_METADATA`]: `K` (32 bytes) ‖ nonce (24) ‖ a NaCl
//! box from `K`'s private key to the server's key over
//! `"cunicu-signal auth v1" ‖ 0x00 ‖ method path ‖ 0x00 ‖ UNIX time (8 bytes,
//! big-endian)`. The server names its key in the response metadata
//! [`SERVER_KEY_METADATA`] (base64) of every call.

use std::sync::Arc;

use crypto_secretbox::aead::{AeadCore, OsRng};

use crate::{
    EnvelopeError, KEY_LEN, Key, PrivateKey,
    envelope::{NONCE_LEN, SharedKey, SharedKeyCache, TAG_LEN},
};

/// The request metadata that carries a proof (binary: `-bin`).
pub const PROOF_METADATA: &str = "cunicu-auth-bin";
/// The response metadata that names the server's public key (base64).
pub const SERVER_KEY_METADATA: &str = "cunicu-server-key";

/// What a proof's plaintext starts with.
const CONTEXT: &[u8] = b"cunicu-signal auth v1";

/// Why a proof is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// Too short, or its plaintext is not a proof's.
    #[error("the proof is malformed")]
    Malformed,
    /// The key it claims is a low-order point: anyone could make it.
    #[error("the proof is for a low-order key")]
    LowOrder,
    /// The box does not open with the claimed key and the server's.
    #[error("the proof's box does not open: not made with the claimed key for this server")]
    BadBox,
}

/// A proof taken apart, not yet opened.
#[derive(Debug, Clone, Copy)]
pub struct Proof<'a> {
    /// The key it claims to prove.
    pub key: Key,
    /// Its nonce: a proof is accepted once.
    pub nonce: [u8; NONCE_LEN],
    sealed: &'a [u8],
}

/// What an opened proof says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    /// The gRPC method path it was made for.
    pub method: Vec<u8>,
    /// When, in UNIX seconds.
    pub time: u64,
}

fn plaintext(method: &str, time: u64) -> Vec<u8> {
    let mut plain = Vec::with_capacity(CONTEXT.len() + method.len() + 10);
    plain.extend_from_slice(CONTEXT);
    plain.push(0);
    plain.extend_from_slice(method.as_bytes());
    plain.push(0);
    plain.extend_from_slice(&time.to_be_bytes());
    plain
}

/// Makes a proof that we hold `ours` (a private key) for a call of `method`
/// (e.g. `/cunicu.signaling.Signaling/Subscribe`) to the server whose public
/// key is `server`, at `time` (UNIX seconds). Shared keys come from the
/// process-wide cache.
pub fn prove(
    ours: &PrivateKey,
    server: &Key,
    method: &str,
    time: u64,
) -> Result<Vec<u8>, EnvelopeError> {
    let shared = SharedKeyCache::global().get(ours, server)?;
    let nonce: [u8; NONCE_LEN] =
        crypto_secretbox::XSalsa20Poly1305::generate_nonce(&mut OsRng).into();
    let sealed = shared.seal_box(&nonce, &plaintext(method, time));
    let mut proof = Vec::with_capacity(KEY_LEN + NONCE_LEN + sealed.len());
    proof.extend_from_slice(shared.our_public().as_bytes());
    proof.extend_from_slice(&nonce);
    proof.extend_from_slice(&sealed);
    Ok(proof)
}

impl<'a> Proof<'a> {
    /// Takes a proof apart (no cryptography).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ProofError> {
        let min = KEY_LEN + NONCE_LEN + TAG_LEN + CONTEXT.len() + 2 + 8;
        if bytes.len() < min {
            return Err(ProofError::Malformed);
        }
        let (key, rest) = bytes.split_at(KEY_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        Ok(Proof {
            key: Key::from_slice(key).map_err(|_| ProofError::Malformed)?,
            nonce: nonce.try_into().map_err(|_| ProofError::Malformed)?,
            sealed,
        })
    }

    /// Opens the proof with the server's private key `server`. The shared key
    /// of (server, claimed key) comes from `cache`, and is put there once a
    /// proof opened with it: a proof then costs one XSalsa20-Poly1305, and
    /// forgeries with made-up keys push no real key out.
    pub fn open(&self, server: &PrivateKey, cache: &SharedKeyCache) -> Result<Proven, ProofError> {
        let (shared, cached) = match cache.lookup(server, &self.key) {
            Some(shared) => (shared, true),
            None => match SharedKey::new(server, &self.key) {
                Ok(shared) => (Arc::new(shared), false),
                Err(EnvelopeError::LowOrderKey(_)) => return Err(ProofError::LowOrder),
                Err(_) => return Err(ProofError::BadBox),
            },
        };
        let proven = self.open_with(&shared)?;
        if !cached {
            cache.insert(server, &self.key, shared);
        }
        Ok(proven)
    }

    /// Opens the proof with the shared key of (server, claimed key), which
    /// the caller computed or looked up itself.
    pub fn open_with(&self, shared: &SharedKey) -> Result<Proven, ProofError> {
        let plain = shared
            .open_box(&self.nonce, self.sealed)
            .ok_or(ProofError::BadBox)?;
        let rest = plain
            .strip_prefix(CONTEXT)
            .and_then(|r| r.strip_prefix(&[0]))
            .ok_or(ProofError::Malformed)?;
        let (method, time) = rest.split_at(rest.len().checked_sub(9).ok_or(ProofError::Malformed)?);
        let time = time.strip_prefix(&[0]).ok_or(ProofError::Malformed)?;
        Ok(Proven {
            method: method.to_vec(),
            time: u64::from_be_bytes(time.try_into().map_err(|_| ProofError::Malformed)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;

    const METHOD: &str = crate::proto::method::SUBSCRIBE;

    #[test]
    fn a_proof_opens_with_the_server_key_only() {
        let (client, server, other) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let bytes = prove(&client, &server.public_key(), METHOD, 1_700_000_000).unwrap();
        assert_eq!(
            bytes.len(),
            32 + 24 + 16 + CONTEXT.len() + 1 + METHOD.len() + 1 + 8
        );
        let proof = Proof::parse(&bytes).unwrap();
        assert_eq!(proof.key, client.public_key());
        let cache = SharedKeyCache::new(NonZeroUsize::new(8).unwrap());
        assert_eq!(
            proof.open(&server, &cache).unwrap(),
            Proven {
                method: METHOD.as_bytes().to_vec(),
                time: 1_700_000_000
            }
        );
        assert_eq!(cache.len(), 1, "cached once it opened");
        assert_eq!(proof.open(&other, &cache), Err(ProofError::BadBox));
        assert_eq!(cache.len(), 1, "a failure is not cached");
    }

    #[test]
    fn tampering_and_low_order_keys_are_refused() {
        let (client, server) = (PrivateKey::generate(), PrivateKey::generate());
        let cache = SharedKeyCache::new(NonZeroUsize::new(8).unwrap());
        let mut bytes = prove(&client, &server.public_key(), METHOD, 5).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        assert_eq!(
            Proof::parse(&bytes).unwrap().open(&server, &cache),
            Err(ProofError::BadBox)
        );
        assert_eq!(
            Proof::parse(&bytes[..60]).err(),
            Some(ProofError::Malformed)
        );
        // Another key claimed for the same box.
        let mut claimed = prove(&client, &server.public_key(), METHOD, 5).unwrap();
        claimed[..32].copy_from_slice(PrivateKey::generate().public_key().as_bytes());
        assert_eq!(
            Proof::parse(&claimed).unwrap().open(&server, &cache),
            Err(ProofError::BadBox)
        );
        let mut low = prove(&client, &server.public_key(), METHOD, 5).unwrap();
        low[..32].copy_from_slice(&[0; 32]);
        assert_eq!(
            Proof::parse(&low).unwrap().open(&server, &cache),
            Err(ProofError::LowOrder)
        );
    }
}
