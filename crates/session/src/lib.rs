//! ICE sessions between two peers known by Curve25519 keys, established over
//! [`cunicu_signal`] backends: docs/PROTOCOL.md §8, as cunīcu does it.
//!
//! Per peer pair, a [`Session`] subscribes to the peer's messages, sends fresh
//! ICE credentials with `need_creds` (repeating with backoff until the peer's
//! arrive), trickles candidates both ways, dials (the controlling side, the
//! smaller public key) or accepts, and restarts with new credentials when the
//! agent fails, the peer restarts, or a disconnect outlasts its grace period.
//! Every established [`Connection`] (datagrams over the selected pair) is
//! handed to the user; its states and candidate pairs are [`Event`]s.
//!
//! The layers:
//! - [`Machine`] (`machine`): docs/PROTOCOL.md §8 as a state machine without I/O or clock,
//!   tested without sockets.
//! - [`IceAgent`] / [`IceAgentFactory`] (`agent`): the small trait the session
//!   needs from an ICE agent; [`WebrtcIce`] (`webrtc`) implements it on
//!   webrtc-ice 0.17, with candidates limited to given interfaces or addresses.
//! - [`candidate`]: checking the protobuf candidates that arrive from the peer.
//! - [`Session`] (`session`): the driver that owns the tasks.
//! - [`relays_from_server`]: STUN/TURN servers from the signaling server;
//!   [`ServerRelayIce`]: [`WebrtcIce`] agents with them, fetched again
//!   before their credentials expire.
//!
//! ```no_run
//! # async fn run(backend: std::sync::Arc<dyn cunicu_signal::Backend>,
//! #              ours: cunicu_signal::PrivateKey, theirs: cunicu_signal::Key) -> anyhow::Result<()> {
//! use cunicu_signal::KeyPair;
//! use cunicu_signal_session::{IceOptions, Session, SessionOptions, WebrtcIce};
//! let ice = WebrtcIce::new(IceOptions::default().only_addresses(["127.0.0.1".parse()?]))?;
//! let session = Session::start(backend, KeyPair { ours, theirs }, std::sync::Arc::new(ice),
//!     SessionOptions::default()).await?;
//! let connection = session.connected().await.expect("session runs");
//! connection.send(b"hello").await?;
//! session.close().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod agent;
mod backoff;
pub mod candidate;
mod machine;
#[cfg(feature = "grpc")]
mod relays;
mod session;
mod webrtc;

pub use agent::{
    AgentError, AgentEvent, AgentEvents, AgentParams, BoxError, DatagramConn, IceAgent,
    IceAgentFactory, IceCredentials, IceState, PWD_LEN, UFRAG_LEN,
};
pub use backoff::{Backoff, BackoffOptions};
pub use machine::{
    Action, MAX_REMOTE_CANDIDATES, Machine, MachineConfig, MachineStats, SUPERSEDED_CREDENTIALS,
    State,
};
#[cfg(feature = "grpc")]
pub use relays::{
    RELAY_REFRESH_MARGIN, RELAY_REFRESH_TIMEOUT, RelayError, Relays, ServerRelayIce, fetch_relays,
    ice_server, relays_from_server,
};
pub use session::{Connection, Event, Session, SessionError, SessionOptions};
pub use webrtc::{IceOptions, IceServer, WebrtcIce};
