//! Signaling for peer-to-peer ICE sessions between peers known by Curve25519 keys.
//!
//! Two peers that want an ICE session exchange credentials and candidates through
//! untrusted couriers, the *signaling backends*. Every [`Message`](proto::signaling::Message)
//! travels in an [`Envelope`](proto::signaling::Envelope) sealed end to end to the
//! recipient's key. The wire format is cunīcu's, so Rust and Go peers interoperate.
//!
//! The layers, bottom up:
//! - [`Key`], [`KeyPair`], [`ice_role`]: keys as WireGuard prints them (`key`).
//! - [`proto`]: the protobuf types, generated at build time; [`json`] their proto3 JSON mapping.
//! - [`Message::seal`](proto::signaling::Message::seal) and
//!   [`Envelope::open`](proto::signaling::Envelope::open): the one place envelopes are
//!   sealed and opened (`envelope`).
//! - [`Backend`]: the API every backend offers; [`Registry`]: the subscription registry
//!   every backend shares (queue what a medium received, then, on its worker task, open
//!   the envelope, drop copies, find the handlers, call them);
//!   [`Transport`]: what a medium (gRPC, in-process, ...) must provide underneath.
//! - [`backend::connect`]: builds a backend from URLs, one per medium.
//! - [`ice_url`]: the one parser of STUN/TURN URLs (`stun:`, `turn:USER:PASS@HOST?transport=udp`).
//! - [`log_limit`]: at most one log line per interval for what outside input can cause.
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod auth;
pub mod backend;
#[cfg(feature = "grpc")]
#[doc(hidden)]
pub mod codec;
#[cfg(feature = "test-util")]
pub mod conformance;
pub mod envelope;
pub mod ice_url;
pub mod json;
mod key;
pub mod log_limit;
pub mod registry;
mod task;

/// The README's Rust example, compiled by `cargo test --doc` (not run: it
/// needs a server).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

pub use backend::{Backend, BackendError, Published, Transport};
pub use envelope::EnvelopeError;
pub use key::{KEY_LEN, Key, KeyError, KeyPair, PrivateKey, Role, SameKeyError, Sender, ice_role};
pub use registry::{ChannelHandler, Delivery, Handler, Registry, StreamEvent};

/// The protobuf types of docs/PROTOCOL.md §5, generated from `proto/` at build time.
///
/// The module tree mirrors the protobuf packages (`cunicu`, `cunicu.core`, ...).
#[allow(missing_docs, clippy::doc_lazy_continuation)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/cunicu.rs"));
    /// `cunicu.core`
    pub mod core {
        include!(concat!(env!("OUT_DIR"), "/cunicu.core.rs"));
    }
    /// `cunicu.epdisc`: ICE credentials and candidates.
    pub mod epdisc {
        include!(concat!(env!("OUT_DIR"), "/cunicu.epdisc.rs"));
    }
    /// `cunicu.pdisc`: peer descriptions.
    pub mod pdisc {
        include!(concat!(env!("OUT_DIR"), "/cunicu.pdisc.rs"));
    }
    /// `cunicu.pske`: pre-shared key establishment.
    pub mod pske {
        include!(concat!(env!("OUT_DIR"), "/cunicu.pske.rs"));
    }
    /// `cunicu.signaling`: envelopes, messages and the gRPC services.
    pub mod signaling {
        include!(concat!(env!("OUT_DIR"), "/cunicu.signaling.rs"));
    }

    /// The paths of the gRPC methods, as a call's HTTP/2 `:path` and a proof of
    /// key possession name them. Defined here once for the client, the server
    /// and the tests.
    pub mod method {
        /// `Signaling.GetBuildInfo`.
        pub const GET_BUILD_INFO: &str = "/cunicu.signaling.Signaling/GetBuildInfo";
        /// `Signaling.Subscribe`.
        pub const SUBSCRIBE: &str = "/cunicu.signaling.Signaling/Subscribe";
        /// `Signaling.Publish`.
        pub const PUBLISH: &str = "/cunicu.signaling.Signaling/Publish";
        /// `RelayRegistry.GetRelays`.
        pub const GET_RELAYS: &str = "/cunicu.signaling.RelayRegistry/GetRelays";
    }

    /// The encoded `FileDescriptorSet` of all the protobuf files, for gRPC
    /// reflection and the JSON mapping.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
}
