//! Curve25519 keys as WireGuard prints them, and the ICE role rule.
//!
//! A [`PrivateKey`] and a public [`Key`] are different types, so neither can
//! stand in for the other: only a private key has a public key, only a public
//! key prints as text, and a private key never shows in a log.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;

/// A Curve25519 public key, 32 bytes.
///
/// In text a key is standard base64 with padding (44 characters), exactly as
/// `wg pubkey` prints it. Keys compare as big-endian unsigned integers, which is
/// lexicographic byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Key([u8; KEY_LEN]);

/// A Curve25519 private key, 32 bytes, with its public key.
///
/// Unlike [`Key`] it is not `Copy`, has no `Display`, shows only its public key
/// in `Debug`, and its bytes are overwritten with zeros when it is dropped. In
/// text (what [`FromStr`] reads) it is base64 as `wg genkey` prints it. Two
/// private keys are equal when they have the same public key: X25519 then gives
/// the same result with either.
#[derive(Clone)]
pub struct PrivateKey {
    secret: [u8; KEY_LEN],
    public: Key,
}

/// Why a key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not standard base64.
    #[error("key is not base64: {0}")]
    NotBase64(String),
    /// The decoded bytes are not 32.
    #[error("key is {0} bytes, expected 32")]
    Length(usize),
}

impl Key {
    /// Wraps 32 bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key(bytes)
    }

    /// Takes a key from a byte slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        <[u8; KEY_LEN]>::try_from(bytes)
            .map(Key)
            .map_err(|_| KeyError::Length(bytes.len()))
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// True if this public key is a low-order point: X25519 with it gives all
    /// zeros for every private key, so a box from or to it can be made or read by
    /// anyone. Such a key is never a valid peer key.
    pub fn is_low_order(&self) -> bool {
        // Any clamped scalar is a multiple of the cofactor 8, so it maps exactly
        // the points of small order to zero.
        !StaticSecret::from([1; KEY_LEN])
            .diffie_hellman(&PublicKey::from(self.0))
            .was_contributory()
    }

    /// Lowercase unpadded base32 (RFC 4648 alphabet), 52 characters: a form that
    /// fits in a Kubernetes label value.
    pub fn to_base32(&self) -> String {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut out = String::with_capacity(52);
        let (mut buffer, mut bits) = (0u32, 0u32);
        for &byte in &self.0 {
            buffer = (buffer << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
        }
        out
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::NotBase64(e.to_string()))?;
        Key::from_slice(&bytes)
    }
}

impl From<[u8; KEY_LEN]> for Key {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        Key(bytes)
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl PrivateKey {
    /// A fresh private key from the operating system's random number generator.
    pub fn generate() -> Self {
        let secret = StaticSecret::random_from_rng(crypto_secretbox::aead::OsRng);
        PrivateKey::from_bytes(secret.to_bytes())
    }

    /// Takes 32 bytes as a private key and computes its public key. The bytes
    /// need not be clamped; X25519 clamps.
    pub fn from_bytes(mut secret: [u8; KEY_LEN]) -> Self {
        let public = Key(PublicKey::from(&StaticSecret::from(secret)).to_bytes());
        let key = PrivateKey { secret, public };
        secret.zeroize();
        key
    }

    /// Takes a private key from a byte slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        <[u8; KEY_LEN]>::try_from(bytes)
            .map(PrivateKey::from_bytes)
            .map_err(|_| KeyError::Length(bytes.len()))
    }

    /// The public key of this private key: X25519(self, 9), computed once when
    /// the private key was made.
    pub fn public_key(&self) -> Key {
        self.public
    }

    /// The secret 32 bytes, for code that must hand them to a cipher or write a
    /// key file. Nothing else should look at them.
    pub fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    /// The secret in text, as `wg genkey` prints it, for writing a key file.
    /// The string is overwritten with zeros when dropped.
    pub fn secret_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.secret))
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.public == other.public
    }
}

impl Eq for PrivateKey {}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret; the public key identifies it.
        write!(f, "PrivateKey(public {})", self.public)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = Zeroizing::new(
            STANDARD
                .decode(s.trim())
                .map_err(|e| KeyError::NotBase64(e.to_string()))?,
        );
        PrivateKey::from_slice(&bytes)
    }
}

/// Whose messages a subscription takes: anyone's, or one peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    /// Any sender.
    Any,
    /// Only the peer with this public key.
    Key(Key),
}

impl Sender {
    /// True if a message from `sender` is taken.
    pub fn admits(&self, sender: &Key) -> bool {
        match self {
            Sender::Any => true,
            Sender::Key(key) => key == sender,
        }
    }
}

impl From<Key> for Sender {
    fn from(key: Key) -> Self {
        Sender::Key(key)
    }
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sender::Any => f.write_str("any sender"),
            Sender::Key(key) => key.fmt(f),
        }
    }
}

/// The keys of one side of a peer relation: our private key and the other
/// peer's public key. `Debug` shows our public key, never the private one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// Our private key.
    pub ours: PrivateKey,
    /// The other peer's public key.
    pub theirs: Key,
}

impl KeyPair {
    /// Pairs our private key with their public key.
    pub const fn new(ours: PrivateKey, theirs: Key) -> Self {
        KeyPair { ours, theirs }
    }

    /// Our ICE role towards them (see [`ice_role`]).
    pub fn role(&self) -> Result<Role, SameKeyError> {
        ice_role(&self.ours, &self.theirs)
    }
}

/// The ICE role of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The peer with the smaller public key: it nominates and dials.
    Controlling,
    /// The peer with the larger public key: it accepts.
    Controlled,
}

/// Both peers have the same public key: a peer does not talk to itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("both peers have the public key {0}: a peer does not talk to itself")]
pub struct SameKeyError(pub Key);

/// Our ICE role towards a peer: the smaller public key (as a big-endian
/// unsigned integer) controls.
pub fn ice_role(ours: &PrivateKey, theirs: &Key) -> Result<Role, SameKeyError> {
    role_of(&ours.public_key(), theirs)
}

/// [`ice_role`] by public keys.
fn role_of(our_public: &Key, their_public: &Key) -> Result<Role, SameKeyError> {
    match our_public.cmp(their_public) {
        std::cmp::Ordering::Less => Ok(Role::Controlling),
        std::cmp::Ordering::Greater => Ok(Role::Controlled),
        std::cmp::Ordering::Equal => Err(SameKeyError(*our_public)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_wireguard() {
        let private = "jObKlT3bqJGC1T3MdbdPgKo9HJ9e+nkRPe5FwLjnv0I=";
        let public = "3+zmlyn1r9Eimmw9jlLBlHUt75KzTf+LF17+M9nT8F4=";
        let key: PrivateKey = private.parse().unwrap();
        assert_eq!(key.public_key().to_string(), public);
        assert_eq!(key.secret_base64().as_str(), private);
        assert_eq!(public.parse::<Key>().unwrap(), key.public_key());
        assert_eq!(public.parse::<Key>().unwrap().to_string(), public);
        // A trailing newline, as `wg genkey > file` leaves it, is fine.
        assert_eq!(format!("{private}\n").parse::<PrivateKey>().unwrap(), key);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            "AAAA".parse::<Key>().unwrap_err(),
            KeyError::Length(3),
            "3 bytes"
        );
        assert_eq!(
            "AAAA".parse::<PrivateKey>().unwrap_err(),
            KeyError::Length(3)
        );
        assert_eq!(
            "not base64!"
                .parse::<Key>()
                .unwrap_err()
                .to_string()
                .split(':')
                .next(),
            Some("key is not base64")
        );
        let short = STANDARD.encode([7u8; 31]);
        assert_eq!(
            short.parse::<Key>().unwrap_err().to_string(),
            "key is 31 bytes, expected 32"
        );
    }

    #[test]
    fn low_order_points() {
        assert!(Key::from([0; KEY_LEN]).is_low_order());
        // An order-8 point from libsodium's blacklist.
        let order8: Key = "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA="
            .parse()
            .unwrap();
        assert!(order8.is_low_order());
        // u = 1 has order 4 (on the twist).
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(Key::from(one).is_low_order());
        assert!(!PrivateKey::generate().public_key().is_low_order());
    }

    #[test]
    fn smaller_key_controls() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[0] = 1;
        b[0] = 2;
        a[31] = 0xff; // the first byte decides: big-endian order
        let (a, b) = (Key::from(a), Key::from(b));
        assert_eq!(role_of(&a, &b), Ok(Role::Controlling));
        assert_eq!(role_of(&b, &a), Ok(Role::Controlled));
        assert_eq!(role_of(&a, &a), Err(SameKeyError(a)));

        let (x, y) = (PrivateKey::generate(), PrivateKey::generate());
        let expected = role_of(&x.public_key(), &y.public_key());
        assert_eq!(ice_role(&x, &y.public_key()), expected);
        assert_eq!(KeyPair::new(x.clone(), y.public_key()).role(), expected);
        assert_ne!(ice_role(&y, &x.public_key()), expected);
        assert_eq!(
            ice_role(&x, &x.public_key()),
            Err(SameKeyError(x.public_key()))
        );
    }

    #[test]
    fn base32_is_lowercase_unpadded_rfc4648() {
        let key = Key::from([0xff; 32]);
        let s = key.to_base32();
        assert_eq!(s.len(), 52);
        assert_eq!(&s[..51], "7".repeat(51));
        assert_eq!(&s[51..], "q");
        assert_eq!(&Key::from([0; KEY_LEN]).to_base32(), &"a".repeat(52));
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let ours = PrivateKey::generate();
        let secret = ours.secret_base64();
        let shown = format!("{ours:?} {ours:#?}");
        assert!(!shown.contains(secret.as_str()), "{shown}");
        assert!(shown.contains(&ours.public_key().to_string()), "{shown}");

        let pair = KeyPair::new(ours.clone(), PrivateKey::generate().public_key());
        let shown = format!("{pair:?} {pair:#?}");
        assert!(!shown.contains(secret.as_str()), "{shown}");
        assert!(shown.contains(&ours.public_key().to_string()), "{shown}");
        assert!(shown.contains(&pair.theirs.to_string()), "{shown}");
    }

    #[test]
    fn sender_any_admits_everyone_and_a_key_only_itself() {
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        assert!(Sender::Any.admits(&a));
        assert!(Sender::from(a).admits(&a));
        assert!(!Sender::Key(a).admits(&b));
        assert_eq!(Sender::Any.to_string(), "any sender");
        assert_eq!(Sender::Key(a).to_string(), a.to_string());
    }
}
