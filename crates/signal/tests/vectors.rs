//! The libsodium test vectors (`tests/vectors/envelopes.json`, a copy of
//! `shared/vectors/envelopes.json`): valid envelopes open to exactly their
//! message, invalid ones fail with the specific error.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use cunicu_signal::{
    EnvelopeError, Key, KeyPair, PrivateKey,
    envelope::SharedKey,
    json::message_from_json,
    proto::signaling::{Envelope, Message},
};
use prost::Message as _;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    valid: bool,
    sender_private: Option<String>,
    sender_public: Option<String>,
    recipient_private: String,
    recipient_public: String,
    message_json: Option<serde_json::Value>,
    message: Option<String>,
    envelope: String,
}

fn cases() -> Vec<Case> {
    let text = include_str!("vectors/envelopes.json");
    let vectors: Vectors = serde_json::from_str(text).expect("vectors parse");
    assert!(vectors.cases.len() >= 20, "vectors file is truncated");
    vectors.cases
}

fn key(s: &str) -> Key {
    s.parse().expect("vector key")
}

fn private(s: &str) -> PrivateKey {
    s.parse().expect("vector private key")
}

#[test]
fn valid_envelopes_open_to_exactly_their_message() {
    let mut valid = 0;
    for case in cases().into_iter().filter(|c| c.valid) {
        let name = &case.name;
        let recipient = private(&case.recipient_private);
        assert_eq!(
            recipient.public_key(),
            key(&case.recipient_public),
            "{name}"
        );
        let sender = private(case.sender_private.as_deref().expect("sender_private"));
        assert_eq!(
            sender.public_key(),
            key(case.sender_public.as_deref().expect("sender_public")),
            "{name}"
        );

        let bytes = STANDARD.decode(&case.envelope).expect("envelope base64");
        let envelope = Envelope::from_bytes(&bytes).expect("envelope decodes");
        let expected_bytes = STANDARD
            .decode(case.message.as_deref().expect("message"))
            .unwrap();
        let expected = Message::decode(expected_bytes.as_slice()).unwrap();

        let opened = envelope
            .open(&recipient)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(opened, expected, "{name}");
        assert_eq!(
            envelope.open_uncached(&recipient).unwrap(),
            expected,
            "{name}"
        );
        // The plaintext is byte for byte the vector's serialized message.
        assert_eq!(opened.encode_to_vec(), expected_bytes, "{name}");

        // Its JSON form parses to the same message.
        let json = case
            .message_json
            .as_ref()
            .expect("message_json")
            .to_string();
        assert_eq!(message_from_json(&json).unwrap(), expected, "{name}: JSON");

        // Sealing with the same nonce gives libsodium's bytes exactly.
        let nonce: [u8; 24] = envelope
            .contents
            .as_ref()
            .unwrap()
            .nonce
            .as_slice()
            .try_into()
            .unwrap();
        let shared = SharedKey::new(&sender, &recipient.public_key()).unwrap();
        let resealed = shared.seal_with_nonce(
            sender.public_key(),
            recipient.public_key(),
            &expected,
            nonce,
        );
        assert_eq!(resealed.encode_to_vec(), bytes, "{name}: sealed bytes");

        // And what we seal, the recipient opens.
        let ours = expected
            .seal(&KeyPair::new(sender.clone(), recipient.public_key()))
            .unwrap();
        assert_eq!(ours.open(&recipient).unwrap(), expected, "{name}");
        valid += 1;
    }
    assert_eq!(valid, 12);
}

#[test]
fn invalid_envelopes_fail_with_the_specific_error() {
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| !c.valid) {
        let name = case.name.as_str();
        let recipient = private(&case.recipient_private);
        let bytes = STANDARD.decode(&case.envelope).expect("envelope base64");
        let result = Envelope::from_bytes(&bytes).and_then(|env| env.open(&recipient));
        let err = match result {
            Ok(m) => panic!("{name}: opened to {m:?}"),
            Err(e) => e,
        };
        let ok = match name {
            "tampered-tag" | "tampered-body" | "forged-sender" | "truncated-body" => {
                matches!(err, EnvelopeError::Unauthentic { .. })
            }
            "short-nonce" => err == EnvelopeError::NonceLength(12),
            "wrong-recipient-key" => matches!(err, EnvelopeError::WrongRecipient { .. }),
            "short-sender-key" => {
                err == EnvelopeError::KeyLength {
                    field: "sender",
                    len: 31,
                }
            }
            "truncated-protobuf" => matches!(err, EnvelopeError::Decode(_)),
            "empty-envelope" => {
                err == EnvelopeError::KeyLength {
                    field: "recipient",
                    len: 0,
                }
            }
            "low-order-sender-zero" | "low-order-sender-order-8" => {
                matches!(err, EnvelopeError::LowOrderKey(k) if k.is_low_order())
            }
            other => panic!("{other}: a vector this test does not know; add its expected error"),
        };
        assert!(ok, "{name}: unexpected error {err:?}");
        checked += 1;
    }
    assert_eq!(checked, 11);
}

/// Our box is assembled from crypto_box's parts (one X25519, then HSalsa20 and
/// XSalsa20-Poly1305): for random keys, nonces and messages it seals exactly
/// the bytes of crypto_box's `SalsaBox`, and opens what `SalsaBox` seals.
#[test]
fn same_bytes_as_crypto_box() {
    use crypto_box::{
        SalsaBox,
        aead::{Aead, AeadCore, OsRng},
    };
    for i in 0..64 {
        let (sender, recipient) = (PrivateKey::generate(), PrivateKey::generate());
        let salsa = SalsaBox::new(
            &crypto_box::PublicKey::from(*recipient.public_key().as_bytes()),
            &crypto_box::SecretKey::from(*sender.secret_bytes()),
        );
        let nonce = SalsaBox::generate_nonce(&mut OsRng);
        let message = Message {
            credentials: Some(cunicu_signal::proto::epdisc::Credentials {
                ufrag: "u".repeat(i * 7),
                pwd: "p".repeat(i),
                need_creds: i % 2 == 0,
            }),
            ..Default::default()
        };
        let theirs = salsa
            .encrypt(&nonce, message.encode_to_vec().as_slice())
            .unwrap();
        let ours = SharedKey::new(&sender, &recipient.public_key())
            .unwrap()
            .seal_with_nonce(
                sender.public_key(),
                recipient.public_key(),
                &message,
                nonce.into(),
            );
        assert_eq!(ours.contents.as_ref().unwrap().body, theirs, "case {i}");

        let mut from_crypto_box = ours.clone();
        from_crypto_box.contents.as_mut().unwrap().body = theirs;
        assert_eq!(from_crypto_box.open_uncached(&recipient).unwrap(), message);
    }
}
