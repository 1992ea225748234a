//! The metadata of calls: how many streams a publish reached, and the pushback of a refusal.

use std::time::Duration;

use tonic::Status;

use super::Published;

/// The recipient count in a Publish's response metadata, if the server gave one.
pub(super) fn recipients(metadata: &tonic::metadata::MetadataMap) -> Published {
    metadata
        .get(RECIPIENTS_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(Published::unknown(), Published::to)
}

/// How long a refused call must wait, if the server said so: a
/// RESOURCE_EXHAUSTED status with `grpc-retry-pushback-ms` (at most a minute
/// is believed).
pub fn pushback(status: &Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(PUSHBACK_METADATA)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.clamp(1, 60_000)))
}

/// The metadata of a Publish that asks how many subscription streams got its
/// envelope (value [`RECIPIENTS_ASK`]), and of the answer (the count, in the
/// response headers).
pub const RECIPIENTS_METADATA: &str = "cunicu-recipients";
/// The value of [`RECIPIENTS_METADATA`] that asks.
pub const RECIPIENTS_ASK: &str = "ask";
/// The metadata of a refusal by a rate: milliseconds until the server has
/// room again (gRPC's name for it).
pub const PUSHBACK_METADATA: &str = "grpc-retry-pushback-ms";
