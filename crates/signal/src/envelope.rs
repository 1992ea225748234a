//! Sealing messages into envelopes and opening them (docs/PROTOCOL.md §4).
//!
//! An envelope carries a protobuf [`Message`] in a NaCl box (X25519, HSalsa20,
//! XSalsa20-Poly1305) from the sender's private key to the recipient's public key.
//! This module is the one place where envelopes are sealed and opened.
//!
//! The box is put together from the parts that `crypto_box` itself is made of:
//! X25519 from `x25519-dalek`, HSalsa20 from `salsa20` and XSalsa20-Poly1305
//! from `crypto_secretbox`. That way the X25519 result is computed once, checked
//! for a low-order peer key (as libsodium does) and then used, so that a forged
//! envelope from a made-up sender costs one scalar multiplication, not two;
//! `crypto_box` takes no precomputed secret. The bytes are libsodium's: the test
//! vectors and a comparison with `crypto_box` check it.

use std::{
    num::NonZeroUsize,
    sync::{Arc, LazyLock},
};

use crypto_secretbox::{
    XSalsa20Poly1305,
    aead::{Aead, AeadCore, KeyInit, OsRng, generic_array::GenericArray},
    consts::U10,
};
use lru::LruCache;
use parking_lot::Mutex;
use prost::Message as _;
use zeroize::Zeroizing;

use crate::{
    Key, KeyPair, PrivateKey,
    proto::signaling::{EncryptedMessage, Envelope, Message},
};

/// Length of the nonce of a box.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag in front of the ciphertext.
pub const TAG_LEN: usize = 16;

/// How many precomputed shared keys the process keeps (least recently used go first).
const SHARED_KEY_CACHE_SIZE: usize = 4096;

/// Why an envelope could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A key field does not hold 32 bytes.
    #[error("{field} key is {len} bytes, expected 32")]
    KeyLength {
        /// `sender` or `recipient`.
        field: &'static str,
        /// The length found.
        len: usize,
    },
    /// The envelope is addressed to another key than ours.
    #[error("envelope is addressed to {recipient}, not to our key {ours}")]
    WrongRecipient {
        /// The envelope's recipient.
        recipient: Key,
        /// Our public key.
        ours: Key,
    },
    /// The peer's key is a low-order point: the shared secret would be all zeros.
    #[error("peer key {0} is a low-order point: anyone could read or forge its boxes")]
    LowOrderKey(Key),
    /// The envelope has no `contents`.
    #[error("envelope has no contents")]
    NoContents,
    /// The nonce is not 24 bytes.
    #[error("nonce is {0} bytes, expected 24")]
    NonceLength(usize),
    /// The box is too short, was tampered with, or was not sealed for this key pair.
    #[error("box does not open: forged, corrupted, or not sealed from {sender} to our key")]
    Unauthentic {
        /// The claimed sender.
        sender: Key,
    },
    /// The box opened but its plaintext is not a `Message`.
    #[error("sealed message does not parse: {0}")]
    Malformed(#[source] prost::DecodeError),
    /// The envelope bytes themselves do not parse.
    #[error("envelope does not parse: {0}")]
    Decode(#[source] prost::DecodeError),
}

/// A precomputed shared key of (our private key, their public key): X25519 and
/// HSalsa20 done once, as libsodium's `crypto_box_beforenm`. Sealing and opening
/// with it gives exactly the bytes of an uncached box.
pub struct SharedKey {
    cipher: XSalsa20Poly1305,
    /// public(ours): the sender of what this key seals, the recipient of what it opens.
    our_public: Key,
}

impl SharedKey {
    /// Precomputes the shared key. Fails if their key is a low-order point (the
    /// X25519 result would be all zeros), as libsodium does.
    pub fn new(ours: &PrivateKey, theirs: &Key) -> Result<Self, EnvelopeError> {
        // The one X25519 of this key pair.
        let secret = x25519_dalek::StaticSecret::from(*ours.secret_bytes());
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*theirs.as_bytes()));
        if !shared.was_contributory() {
            return Err(EnvelopeError::LowOrderKey(*theirs));
        }
        // crypto_box_beforenm: HSalsa20 of the shared secret with a zero input,
        // as crypto_box's `SalsaBox::new` derives it.
        let key = Zeroizing::new(salsa20::hsalsa::<U10>(
            GenericArray::from_slice(shared.as_bytes()),
            &GenericArray::default(),
        ));
        Ok(SharedKey {
            cipher: XSalsa20Poly1305::new(&key),
            our_public: ours.public_key(),
        })
    }

    /// Our public key.
    pub fn our_public(&self) -> Key {
        self.our_public
    }

    /// Seals `message` with a fresh random nonce.
    pub fn seal(&self, sender: Key, recipient: Key, message: &Message) -> Envelope {
        let nonce = XSalsa20Poly1305::generate_nonce(&mut OsRng);
        self.seal_with_nonce(sender, recipient, message, nonce.into())
    }

    /// Seals `message` with the given nonce. A nonce must never be used twice
    /// with one key pair: use [`SharedKey::seal`] unless you reproduce test vectors.
    #[doc(hidden)]
    pub fn seal_with_nonce(
        &self,
        sender: Key,
        recipient: Key,
        message: &Message,
        nonce: [u8; NONCE_LEN],
    ) -> Envelope {
        let plain = message.encode_to_vec();
        let body = self
            .cipher
            .encrypt(GenericArray::from_slice(&nonce), plain.as_slice())
            // XSalsa20-Poly1305 fails only for inputs beyond 2^38 bytes.
            .unwrap_or_default();
        Envelope {
            sender: sender.as_bytes().to_vec(),
            recipient: recipient.as_bytes().to_vec(),
            contents: Some(EncryptedMessage {
                body,
                nonce: nonce.to_vec(),
            }),
        }
    }

    /// Seals `plain` into a bare box (tag, then ciphertext) with `nonce`: the
    /// NaCl box of docs/PROTOCOL.md §4 without an envelope around it (the proofs of docs/PROTOCOL.md §11).
    pub fn seal_box(&self, nonce: &[u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        self.cipher
            .encrypt(GenericArray::from_slice(nonce), plain)
            // XSalsa20-Poly1305 fails only for inputs beyond 2^38 bytes.
            .unwrap_or_default()
    }

    /// Opens a bare box made by [`SharedKey::seal_box`]; `None` if it does not open.
    pub fn open_box(&self, nonce: &[u8; NONCE_LEN], sealed: &[u8]) -> Option<Vec<u8>> {
        self.cipher
            .decrypt(GenericArray::from_slice(nonce), sealed)
            .ok()
    }

    /// Opens the box of `envelope`, whose keys the caller has checked.
    fn open_contents(&self, sender: Key, envelope: &Envelope) -> Result<Message, EnvelopeError> {
        let contents = envelope
            .contents
            .as_ref()
            .ok_or(EnvelopeError::NoContents)?;
        if contents.nonce.len() != NONCE_LEN {
            return Err(EnvelopeError::NonceLength(contents.nonce.len()));
        }
        let plain = self
            .cipher
            .decrypt(
                GenericArray::from_slice(&contents.nonce),
                contents.body.as_slice(),
            )
            .map_err(|_| EnvelopeError::Unauthentic { sender })?;
        Message::decode(plain.as_slice()).map_err(EnvelopeError::Malformed)
    }
}

/// A bounded cache of [`SharedKey`]s by (our public key, their public key).
///
/// Our public key stands for our private key: two private keys with one public
/// key are the same scalar to X25519, so they share every shared key.
pub struct SharedKeyCache {
    keys: Mutex<LruCache<(Key, Key), Arc<SharedKey>>>,
}

impl SharedKeyCache {
    /// A cache of at most `capacity` shared keys.
    pub fn new(capacity: NonZeroUsize) -> Self {
        SharedKeyCache {
            keys: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The process-wide cache that [`Message::seal`] and [`Envelope::open`] use.
    pub fn global() -> &'static SharedKeyCache {
        static GLOBAL: LazyLock<SharedKeyCache> = LazyLock::new(|| {
            SharedKeyCache::new(
                NonZeroUsize::new(SHARED_KEY_CACHE_SIZE).unwrap_or(NonZeroUsize::MIN),
            )
        });
        &GLOBAL
    }

    /// The shared key of (ours, theirs), computed on a miss.
    pub fn get(&self, ours: &PrivateKey, theirs: &Key) -> Result<Arc<SharedKey>, EnvelopeError> {
        let id = (ours.public_key(), *theirs);
        if let Some(key) = self.keys.lock().get(&id) {
            return Ok(key.clone());
        }
        // Compute outside the lock: X25519 is the slow part.
        let key = Arc::new(SharedKey::new(ours, theirs)?);
        self.keys.lock().put(id, key.clone());
        Ok(key)
    }

    /// The cached shared key of (ours, theirs), if any.
    pub fn lookup(&self, ours: &PrivateKey, theirs: &Key) -> Option<Arc<SharedKey>> {
        self.keys.lock().get(&(ours.public_key(), *theirs)).cloned()
    }

    /// Caches a shared key of (ours, theirs).
    pub fn insert(&self, ours: &PrivateKey, theirs: &Key, key: Arc<SharedKey>) {
        self.keys.lock().put((ours.public_key(), *theirs), key);
    }

    /// How many shared keys are cached.
    pub fn len(&self) -> usize {
        self.keys.lock().len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Message {
    /// Seals this message from `pair.ours` to `pair.theirs` (docs/PROTOCOL.md §4), with the
    /// shared key from the process-wide cache.
    pub fn seal(&self, pair: &KeyPair) -> Result<Envelope, EnvelopeError> {
        let shared = SharedKeyCache::global().get(&pair.ours, &pair.theirs)?;
        Ok(shared.seal(shared.our_public, pair.theirs, self))
    }
}

impl Envelope {
    /// Decodes an envelope from its protobuf bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        Envelope::decode(bytes).map_err(EnvelopeError::Decode)
    }

    /// The sender's key, checked to be 32 bytes.
    pub fn sender_key(&self) -> Result<Key, EnvelopeError> {
        Key::from_slice(&self.sender).map_err(|_| EnvelopeError::KeyLength {
            field: "sender",
            len: self.sender.len(),
        })
    }

    /// The recipient's key, checked to be 32 bytes.
    pub fn recipient_key(&self) -> Result<Key, EnvelopeError> {
        Key::from_slice(&self.recipient).map_err(|_| EnvelopeError::KeyLength {
            field: "recipient",
            len: self.recipient.len(),
        })
    }

    /// Opens this envelope with our private key (docs/PROTOCOL.md §4), with the shared key
    /// from the process-wide cache. Any failure yields no message at all.
    pub fn open(&self, ours: &PrivateKey) -> Result<Message, EnvelopeError> {
        self.open_with(ours, SharedKeyCache::global())
    }

    /// Opens this envelope with shared keys from `cache`.
    pub fn open_with(
        &self,
        ours: &PrivateKey,
        cache: &SharedKeyCache,
    ) -> Result<Message, EnvelopeError> {
        let sender = self.check_keys(ours.public_key())?;
        self.check_contents()?;
        if let Some(shared) = cache.lookup(ours, &sender) {
            return shared.open_contents(sender, self);
        }
        // A new sender: cache its key only once a box of its opened, so that
        // forgeries with made-up senders cannot push real peers out.
        let shared = Arc::new(SharedKey::new(ours, &sender)?);
        let message = shared.open_contents(sender, self)?;
        cache.insert(ours, &sender, shared);
        Ok(message)
    }

    /// Checks that there are contents with a 24-byte nonce, before any X25519.
    fn check_contents(&self) -> Result<(), EnvelopeError> {
        let contents = self.contents.as_ref().ok_or(EnvelopeError::NoContents)?;
        if contents.nonce.len() != NONCE_LEN {
            return Err(EnvelopeError::NonceLength(contents.nonce.len()));
        }
        Ok(())
    }

    /// Opens this envelope computing the shared key afresh (no cache).
    pub fn open_uncached(&self, ours: &PrivateKey) -> Result<Message, EnvelopeError> {
        let sender = self.check_keys(ours.public_key())?;
        self.check_contents()?;
        SharedKey::new(ours, &sender)?.open_contents(sender, self)
    }

    /// Checks both keys' lengths and that we are the recipient (before any
    /// X25519 for the sender's key is spent); returns the sender.
    fn check_keys(&self, our_public: Key) -> Result<Key, EnvelopeError> {
        let recipient = self.recipient_key()?;
        let sender = self.sender_key()?;
        if recipient != our_public {
            return Err(EnvelopeError::WrongRecipient {
                recipient,
                ours: our_public,
            });
        }
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::epdisc::Credentials;

    fn credentials() -> Message {
        Message {
            credentials: Some(Credentials {
                ufrag: "abcdefghijklmnop".into(),
                pwd: "abcdefghijklmnopqrstuvwxyzabcdef".into(),
                need_creds: true,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn seal_then_open() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let env = credentials()
            .seal(&KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        assert_eq!(env.sender_key().unwrap(), a.public_key());
        assert_eq!(env.recipient_key().unwrap(), b.public_key());
        assert_eq!(env.open(&b).unwrap(), credentials());
        assert_eq!(env.open_uncached(&b).unwrap(), credentials());
        let body = &env.contents.as_ref().unwrap().body;
        assert_eq!(body.len(), credentials().encoded_len() + TAG_LEN);
    }

    #[test]
    fn fresh_nonce_every_time() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let pair = KeyPair::new(a, b.public_key());
        let one = credentials().seal(&pair).unwrap();
        let two = credentials().seal(&pair).unwrap();
        assert_ne!(one.contents.unwrap().nonce, two.contents.unwrap().nonce);
    }

    #[test]
    fn cached_and_uncached_are_identical() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let nonce = [9u8; NONCE_LEN];
        let cached = SharedKeyCache::global().get(&a, &b.public_key()).unwrap();
        let fresh = SharedKey::new(&a, &b.public_key()).unwrap();
        let x = cached.seal_with_nonce(a.public_key(), b.public_key(), &credentials(), nonce);
        let y = fresh.seal_with_nonce(a.public_key(), b.public_key(), &credentials(), nonce);
        assert_eq!(x, y);
    }

    #[test]
    fn sealing_to_a_low_order_key_fails() {
        let zero = Key::from([0; 32]);
        let pair = KeyPair::new(PrivateKey::generate(), zero);
        assert_eq!(
            credentials().seal(&pair).unwrap_err(),
            EnvelopeError::LowOrderKey(zero)
        );
    }

    #[test]
    fn cache_is_bounded() {
        let cache = SharedKeyCache::new(NonZeroUsize::new(2).unwrap());
        let ours = PrivateKey::generate();
        for _ in 0..5 {
            cache
                .get(&ours, &PrivateKey::generate().public_key())
                .unwrap();
        }
        assert_eq!(cache.len(), 2);
    }
}
