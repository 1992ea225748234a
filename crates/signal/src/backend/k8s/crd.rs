//! The envelope object: the custom resource `signalingenvelopes.cunicu.li`
//! (docs/PROTOCOL.md §9), its labels, and the conversion from and to [`Envelope`].

use std::{collections::BTreeMap, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    Key,
    backend::BackendError,
    proto::signaling::{EncryptedMessage, Envelope},
};

/// The API group of the envelope objects.
pub const GROUP: &str = "cunicu.li";
/// The name of the CustomResourceDefinition (`<plural>.<group>`).
pub const CRD_NAME: &str = "signalingenvelopes.cunicu.li";
/// The label holding the recipient's key in lowercase unpadded base32 ([`Key::to_base32`]).
pub const LABEL_RECIPIENT: &str = "cunicu.li/recipient";
/// The label holding the sender's key in lowercase unpadded base32 ([`Key::to_base32`]).
pub const LABEL_SENDER: &str = "cunicu.li/sender";
/// The `generateName` prefix of envelope objects.
const NAME_PREFIX: &str = "env-";
/// The resource name in RBAC rules and errors.
pub(super) const RESOURCE: &str = "signalingenvelopes";
/// The largest body (tag and ciphertext) an envelope object carries, in
/// bytes: the signaling server's default envelope limit
/// (`--max-envelope-size`), which the body of an envelope it passes never
/// exceeds. The CRD refuses longer ones (docs/PROTOCOL.md §10).
pub const MAX_BODY_LEN: usize = 65_536;
/// The longest `contents.body` field: [`MAX_BODY_LEN`] bytes in base64.
pub const MAX_BODY_FIELD_LEN: usize = MAX_BODY_LEN.div_ceil(3) * 4;
/// The length of a key field: 32 bytes in base64 (with one `=`).
const KEY_FIELD_LEN: usize = 44;
/// The length of the nonce field: 24 bytes in base64 (no padding).
const NONCE_FIELD_LEN: usize = 32;
/// The shortest body field: the 16-byte tag of an empty message in base64.
const MIN_BODY_FIELD_LEN: usize = 24;
/// A key field: 43 base64 characters and the padding.
const KEY_PATTERN: &str = "^[A-Za-z0-9+/]{43}=$";
/// The nonce field.
const NONCE_PATTERN: &str = "^[A-Za-z0-9+/]{32}$";
/// The body field: standard base64 with padding.
const BODY_PATTERN: &str = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$";

/// The fields of a [`SignalingEnvelope`] object: cunīcu's layout, at the top
/// level of the object (there is no `spec`). Keys and contents are standard
/// base64, so that `kubectl get env -o yaml` shows them readably. The schema
/// bounds each field (32-byte keys, a 24-byte nonce, a body of at most
/// [`MAX_BODY_LEN`] bytes), so the API server refuses objects beyond them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "cunicu.li",
    version = "v1",
    kind = "SignalingEnvelope",
    shortname = "env",
    namespaced,
    no_spec,
    derive = "PartialEq",
    doc = "A sealed signaling envelope on its way from sender to recipient (cunicu-signal)."
)]
pub struct SignalingEnvelopeFields {
    /// The sender's public key, base64.
    #[schemars(length(equal = KEY_FIELD_LEN), pattern(KEY_PATTERN))]
    pub sender: String,
    /// The recipient's public key, base64.
    #[schemars(length(equal = KEY_FIELD_LEN), pattern(KEY_PATTERN))]
    pub recipient: String,
    /// The sealed message.
    pub contents: EnvelopeContents,
}

/// The sealed message of a [`SignalingEnvelope`]: `EncryptedMessage` of docs/PROTOCOL.md §5.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EnvelopeContents {
    /// The 24-byte nonce, base64.
    #[schemars(length(equal = NONCE_FIELD_LEN), pattern(NONCE_PATTERN))]
    pub nonce: String,
    /// The NaCl box (tag, then ciphertext), base64.
    #[schemars(length(min = MIN_BODY_FIELD_LEN, max = MAX_BODY_FIELD_LEN), pattern(BODY_PATTERN))]
    pub body: String,
}

impl SignalingEnvelope {
    /// The object that carries `envelope`, with both labels and a generated name.
    pub fn from_envelope(envelope: &Envelope) -> Result<Self, BackendError> {
        let sender = envelope.sender_key()?;
        let recipient = envelope.recipient_key()?;
        let contents = envelope
            .contents
            .as_ref()
            .ok_or(crate::EnvelopeError::NoContents)?;
        Ok(SignalingEnvelope {
            metadata: ObjectMeta {
                generate_name: Some(NAME_PREFIX.into()),
                labels: Some(BTreeMap::from([
                    (LABEL_RECIPIENT.to_string(), recipient.to_base32()),
                    (LABEL_SENDER.to_string(), sender.to_base32()),
                ])),
                ..ObjectMeta::default()
            },
            spec: SignalingEnvelopeFields {
                sender: STANDARD.encode(&envelope.sender),
                recipient: STANDARD.encode(&envelope.recipient),
                contents: EnvelopeContents {
                    nonce: STANDARD.encode(&contents.nonce),
                    body: STANDARD.encode(&contents.body),
                },
            },
        })
    }

    /// The envelope this object carries. Fails, naming the field, if one is not
    /// base64; whether the envelope opens is the registry's business.
    pub fn to_envelope(&self) -> Result<Envelope, String> {
        let decode = |field: &str, text: &str| {
            STANDARD
                .decode(text)
                .map_err(|e| format!("field {field} is not base64: {e}"))
        };
        Ok(Envelope {
            sender: decode("sender", &self.spec.sender)?,
            recipient: decode("recipient", &self.spec.recipient)?,
            contents: Some(EncryptedMessage {
                body: decode("contents.body", &self.spec.contents.body)?,
                nonce: decode("contents.nonce", &self.spec.contents.nonce)?,
            }),
        })
    }
}

/// The CustomResourceDefinition of [`SignalingEnvelope`]: what `deploy/crd.yaml`
/// holds as YAML (`cargo run -p cunicu-signal --example crd > deploy/crd.yaml`).
pub fn crd() -> CustomResourceDefinition {
    SignalingEnvelope::crd()
}

/// The `creationTimestamp` of an object; `None` without one.
pub(super) fn created(meta: &ObjectMeta) -> Option<SystemTime> {
    Some(meta.creation_timestamp.as_ref()?.0.into())
}

/// The label selector `label in (keys...)`.
pub(super) fn selector<'a>(label: &str, keys: impl IntoIterator<Item = &'a Key>) -> String {
    let values: Vec<String> = keys.into_iter().map(Key::to_base32).collect();
    format!("{label} in ({})", values.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrivateKey;

    #[test]
    fn objects_carry_the_envelope_and_both_labels() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let envelope = crate::proto::signaling::Message::default()
            .seal(&crate::KeyPair::new(a.clone(), b.public_key()))
            .unwrap();
        let object = SignalingEnvelope::from_envelope(&envelope).unwrap();
        assert_eq!(object.to_envelope().unwrap(), envelope);
        let labels = object.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_SENDER], a.public_key().to_base32());
        assert_eq!(labels[LABEL_RECIPIENT], b.public_key().to_base32());
        assert_eq!(object.spec.sender, a.public_key().to_string());
        let json = serde_json::to_value(&object).unwrap();
        assert_eq!(json["apiVersion"], "cunicu.li/v1");
        assert_eq!(json["kind"], "SignalingEnvelope");
        assert_eq!(json["recipient"], b.public_key().to_string());
        assert!(json["contents"]["nonce"].is_string());
        assert!(json.get("spec").is_none(), "{json}");
        let mut broken = object.clone();
        broken.spec.contents.body = "not base64!".into();
        assert!(broken.to_envelope().unwrap_err().contains("contents.body"));
    }

    #[test]
    fn the_crd_has_no_spec() {
        let crd = serde_json::to_value(crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], CRD_NAME);
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "env");
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        for field in ["sender", "recipient", "contents"] {
            assert!(props.get(field).is_some(), "{field} missing: {props}");
        }
        assert!(props.get("spec").is_none(), "{props}");
    }

    #[test]
    fn the_crd_bounds_every_field() {
        let crd = serde_json::to_value(crd()).unwrap();
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let contents = &props["contents"]["properties"];
        for (field, schema, min, max) in [
            ("sender", &props["sender"], 44, 44),
            ("recipient", &props["recipient"], 44, 44),
            ("nonce", &contents["nonce"], 32, 32),
            ("body", &contents["body"], 24, 87_384),
        ] {
            assert_eq!(schema["minLength"], min, "{field}: {schema}");
            assert_eq!(schema["maxLength"], max, "{field}: {schema}");
            assert!(schema["pattern"].is_string(), "{field}: {schema}");
        }
        // What we send fits: the largest body, and the shortest.
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        for len in [0, MAX_BODY_LEN - crate::envelope::TAG_LEN] {
            let mut envelope = crate::proto::signaling::Message::default()
                .seal(&crate::KeyPair::new(a.clone(), b.public_key()))
                .unwrap();
            envelope.contents.as_mut().unwrap().body = vec![0xfb; len + crate::envelope::TAG_LEN];
            let object = SignalingEnvelope::from_envelope(&envelope).unwrap();
            let body = &object.spec.contents.body;
            assert!(
                (MIN_BODY_FIELD_LEN..=MAX_BODY_FIELD_LEN).contains(&body.len()),
                "{}",
                body.len()
            );
            assert_eq!(object.spec.sender.len(), KEY_FIELD_LEN);
            assert_eq!(object.spec.contents.nonce.len(), NONCE_FIELD_LEN);
        }
    }
}
