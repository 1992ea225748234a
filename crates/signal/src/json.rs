//! The canonical proto3 JSON mapping of [`Message`]: lowerCamelCase field names
//! (the original names are accepted too), bytes in base64, enums by name.

use std::sync::LazyLock;

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use crate::proto::{FILE_DESCRIPTOR_SET, signaling::Message};

/// Why JSON could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The text is not valid JSON for the message type.
    #[error("invalid {type_name} JSON: {reason}")]
    Invalid {
        /// The protobuf message type.
        type_name: &'static str,
        /// What the parser said.
        reason: String,
    },
}

const MESSAGE: &str = "cunicu.signaling.Message";

static POOL: LazyLock<Option<DescriptorPool>> =
    LazyLock::new(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).ok());

fn descriptor(name: &'static str) -> Result<MessageDescriptor, JsonError> {
    POOL.as_ref()
        .and_then(|pool| pool.get_message_by_name(name))
        .ok_or(JsonError::Invalid {
            type_name: name,
            reason: "descriptor missing from the build".into(),
        })
}

/// The proto3 JSON value of a message.
pub fn message_to_json(message: &Message) -> serde_json::Value {
    let Ok(desc) = descriptor(MESSAGE) else {
        return serde_json::Value::Null;
    };
    let Ok(dynamic) = DynamicMessage::decode(desc, message.encode_to_vec().as_slice()) else {
        return serde_json::Value::Null;
    };
    dynamic
        .serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().skip_default_fields(true),
        )
        .unwrap_or(serde_json::Value::Null)
}

/// Parses a message from proto3 JSON. Unknown fields are an error.
pub fn message_from_json(text: &str) -> Result<Message, JsonError> {
    let invalid = |reason: String| JsonError::Invalid {
        type_name: MESSAGE,
        reason,
    };
    let desc = descriptor(MESSAGE)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let dynamic = DynamicMessage::deserialize(desc, &mut de).map_err(|e| invalid(e.to_string()))?;
    de.end().map_err(|e| invalid(e.to_string()))?;
    dynamic
        .transcode_to::<Message>()
        .map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::epdisc::{Candidate, CandidateType, Credentials, NetworkType};

    #[test]
    fn round_trip_with_canonical_names() {
        let message = Message {
            candidate: Some(Candidate {
                r#type: CandidateType::Host as i32,
                network_type: NetworkType::Udp4 as i32,
                foundation: "1".into(),
                component: 1,
                priority: 2130706431,
                address: "10.0.0.1".into(),
                port: 51820,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = message_to_json(&message);
        assert_eq!(json["candidate"]["networkType"], "UDP4");
        assert_eq!(json["candidate"]["type"], "HOST");
        assert_eq!(message_from_json(&json.to_string()).unwrap(), message);
    }

    #[test]
    fn accepts_original_field_names() {
        let m = message_from_json(r#"{"credentials":{"ufrag":"u","pwd":"p","need_creds":true}}"#)
            .unwrap();
        assert_eq!(
            m.credentials,
            Some(Credentials {
                ufrag: "u".into(),
                pwd: "p".into(),
                need_creds: true
            })
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(message_from_json("{").is_err());
        assert!(message_from_json(r#"{"nope": 1}"#).is_err());
        assert!(message_from_json(r#"{"credentials":{}} trailing"#).is_err());
    }
}
