//! Curve25519 keys as WireGuard prints them, and the ICE role rule.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use x25519_dalek::{PublicKey, StaticSecret};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;

/// A Curve25519 key: a private key or a public key, 32 bytes.
///
/// In text a key is standard base64 with padding (44 characters), exactly as
/// `wg genkey` and `wg pubkey` print it. Keys compare as big-endian unsigned
/// integers, which is lexicographic byte order.
///
/// The type does not know whether it holds a private or a public key; code that
/// holds private keys keeps them out of logs (see [`KeyPair`]'s `Debug`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Key([u8; KEY_LEN]);

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
    /// The all-zero key. As the peer of a subscription it means "any sender".
    pub const ZERO: Key = Key([0; KEY_LEN]);

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

    /// A fresh private key from the operating system's random number generator.
    pub fn generate() -> Self {
        Key(StaticSecret::random_from_rng(crypto_secretbox::aead::OsRng).to_bytes())
    }

    /// The public key of this private key: X25519(self, 9). The private key need
    /// not be clamped; X25519 clamps.
    pub fn public_key(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// True for the all-zero key.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
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

/// The keys of one side of a peer relation: our private key and the other
/// peer's public key. As the `theirs` of a subscription, [`Key::ZERO`] means
/// "any sender".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyPair {
    /// Our private key.
    pub ours: Key,
    /// The other peer's public key.
    pub theirs: Key,
}

impl KeyPair {
    /// Pairs our private key with their public key.
    pub const fn new(ours: Key, theirs: Key) -> Self {
        KeyPair { ours, theirs }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key; its public key identifies it.
        f.debug_struct("KeyPair")
            .field("ours_public", &self.ours.public_key())
            .field("theirs", &self.theirs)
            .finish()
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
pub fn ice_role(our_public: &Key, their_public: &Key) -> Result<Role, SameKeyError> {
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
        let text = "jObKlT3bqJGC1T3MdbdPgKo9HJ9e+nkRPe5FwLjnv0I=";
        let key: Key = text.parse().unwrap();
        assert_eq!(key.to_string(), text);
        assert_eq!(
            key.public_key().to_string(),
            "3+zmlyn1r9Eimmw9jlLBlHUt75KzTf+LF17+M9nT8F4="
        );
        // A trailing newline, as `wg genkey > file` leaves it, is fine.
        assert_eq!(format!("{text}\n").parse::<Key>().unwrap(), key);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            "AAAA".parse::<Key>().unwrap_err(),
            KeyError::Length(3),
            "3 bytes"
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
    fn zero_key_and_low_order_points() {
        assert!(Key::ZERO.is_zero());
        assert!(Key::ZERO.is_low_order());
        // An order-8 point from libsodium's blacklist.
        let order8: Key = "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA="
            .parse()
            .unwrap();
        assert!(order8.is_low_order());
        // u = 1 has order 4 (on the twist).
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(Key::from(one).is_low_order());
        assert!(!Key::generate().public_key().is_low_order());
    }

    #[test]
    fn smaller_key_controls() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[0] = 1;
        b[0] = 2;
        a[31] = 0xff; // the first byte decides: big-endian order
        let (a, b) = (Key::from(a), Key::from(b));
        assert_eq!(ice_role(&a, &b), Ok(Role::Controlling));
        assert_eq!(ice_role(&b, &a), Ok(Role::Controlled));
        assert_eq!(ice_role(&a, &a), Err(SameKeyError(a)));
    }

    #[test]
    fn base32_is_lowercase_unpadded_rfc4648() {
        let key = Key::from([0xff; 32]);
        let s = key.to_base32();
        assert_eq!(s.len(), 52);
        assert_eq!(&s[..51], "7".repeat(51));
        assert_eq!(&s[51..], "q");
        assert_eq!(&Key::ZERO.to_base32(), &"a".repeat(52));
    }

    #[test]
    fn key_pair_debug_hides_the_private_key() {
        let ours = Key::generate();
        let shown = format!("{:?}", KeyPair::new(ours, Key::ZERO));
        assert!(!shown.contains(&ours.to_string()));
        assert!(shown.contains(&ours.public_key().to_string()));
    }
}
