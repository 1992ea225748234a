//! The ICE agent as the session sees it: a small trait, so that webrtc-ice can
//! be replaced (by a sans-IO agent, or a fake in tests).
//!
//! Candidates cross this boundary as the protobuf
//! [`Candidate`](cunicu_signal::proto::epdisc::Candidate) that travels between
//! peers; an implementation maps them to and from its own type.

use std::{
    fmt, io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
pub use cunicu_signal::backend::BoxError;
use cunicu_signal::{Role, proto::epdisc::Candidate};
use rand::{Rng, distr::Alphabetic};
use tokio::sync::mpsc;

/// Length of a generated ufrag (docs/PROTOCOL.md §8: 16 random letters).
pub const UFRAG_LEN: usize = 16;
/// Length of a generated password (docs/PROTOCOL.md §8: 32 random letters).
pub const PWD_LEN: usize = 32;

/// ICE credentials: username fragment and password. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct IceCredentials {
    /// The username fragment.
    pub ufrag: String,
    /// The password.
    pub pwd: String,
}

impl IceCredentials {
    /// Fresh credentials: a ufrag of 16 and a password of 32 random letters
    /// (ASCII `A-Z` and `a-z`), from `rng`.
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut letters = |n: usize| -> String {
            (&mut *rng)
                .sample_iter(Alphabetic)
                .take(n)
                .map(char::from)
                .collect()
        };
        let ufrag = letters(UFRAG_LEN);
        let pwd = letters(PWD_LEN);
        IceCredentials { ufrag, pwd }
    }

    /// True if the ufrag or the password is empty.
    pub fn is_empty(&self) -> bool {
        self.ufrag.is_empty() || self.pwd.is_empty()
    }
}

impl fmt::Debug for IceCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceCredentials")
            .field("ufrag", &self.ufrag)
            .field("pwd", &"***")
            .finish()
    }
}

/// The connection state an ICE agent reports (RFC 8445 / pion's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IceState {
    /// Created, no checks yet.
    New,
    /// Connectivity checks are running.
    Checking,
    /// A pair works; checks may go on.
    Connected,
    /// Checks are done.
    Completed,
    /// The selected pair stopped answering for a while.
    Disconnected,
    /// No pair works.
    Failed,
    /// The agent is closed.
    Closed,
}

/// What an agent reports while it runs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// A local candidate was gathered.
    Candidate(Candidate),
    /// Gathering is complete.
    GatheringComplete,
    /// The connection state changed.
    State(IceState),
    /// The agent selected (another) candidate pair.
    SelectedPair {
        /// Our candidate.
        local: Candidate,
        /// The peer's candidate.
        remote: Candidate,
    },
}

/// How long [`AgentEvents::emit_state`] waits for room in the channel.
const STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where an agent sends its [`AgentEvent`]s: a bounded channel to the session,
/// tagged with the agent's number so that events of an old agent are ignored.
/// [`AgentEvents::emit`] never blocks: when the channel is full, the event is
/// dropped and counted. State changes go through [`AgentEvents::emit_state`],
/// which waits for room: a lost `Failed` would leave the session waiting.

#[derive(Clone)]
pub struct AgentEvents {
    agent: u64,
    tx: mpsc::Sender<(u64, AgentEvent)>,
    dropped: Arc<AtomicU64>,
}

impl AgentEvents {
    /// A sink for agent number `agent` into `tx`.
    pub fn new(agent: u64, tx: mpsc::Sender<(u64, AgentEvent)>) -> Self {
        AgentEvents {
            agent,
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Hands `event` to the session.
    pub fn emit(&self, event: AgentEvent) {
        // When closed, the session is gone: nothing to tell.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send((self.agent, event)) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                agent = self.agent,
                dropped,
                "session is not reading agent events: event dropped"
            );
        }
    }

    /// Hands a state change to the session, waiting (up to 5 s) for room
    /// if the channel is full; only then is it dropped and counted.
    pub async fn emit_state(&self, state: IceState) {
        let sent = self.tx.send((self.agent, AgentEvent::State(state)));
        // An Err inside: the session is gone, nothing to tell.
        if tokio::time::timeout(STATE_WAIT, sent).await.is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                agent = self.agent,
                dropped,
                ?state,
                "session is not reading agent events: state change dropped"
            );
        }
    }

    /// How many events were dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for AgentEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentEvents")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What an agent is created with.
#[derive(Debug)]
#[non_exhaustive]
pub struct AgentParams {
    /// Our credentials for this agent.
    pub credentials: IceCredentials,
    /// Our role towards the peer.
    pub role: Role,
    /// Where the agent reports candidates and states.
    pub events: AgentEvents,
}

impl AgentParams {
    /// Parameters of a new agent.
    pub fn new(credentials: IceCredentials, role: Role, events: AgentEvents) -> Self {
        AgentParams {
            credentials,
            role,
            events,
        }
    }
}

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent could not be created.
    #[error("cannot create the ICE agent: {0}")]
    Create(#[source] BoxError),
    /// Gathering could not start.
    #[error("cannot gather candidates: {0}")]
    Gather(#[source] BoxError),
    /// A remote candidate was refused.
    #[error("remote candidate refused: {0}")]
    Candidate(#[source] BoxError),
    /// Dialing or accepting failed.
    #[error("ICE connect failed: {0}")]
    Connect(#[source] BoxError),
    /// Closing failed.
    #[error("cannot close the ICE agent: {0}")]
    Close(#[source] BoxError),
    /// A setting is invalid (a STUN/TURN URL, a filter).
    #[error("invalid ICE option: {0}")]
    Option(String),
}

/// A datagram connection over the selected candidate pair. Each `send` is one
/// datagram; each `recv` returns one.
#[async_trait]
pub trait DatagramConn: Send + Sync + 'static {
    /// Sends one datagram.
    async fn send(&self, datagram: &[u8]) -> io::Result<usize>;
    /// Receives one datagram into `buf`; fails once the agent is closed.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
}

/// One ICE agent, for one set of local credentials (a restart makes a new one).
#[async_trait]
pub trait IceAgent: Send + Sync + 'static {
    /// Starts gathering local candidates; they arrive as
    /// [`AgentEvent::Candidate`].
    fn gather(&self) -> Result<(), AgentError>;

    /// Adds a candidate of the peer. It comes from the network: an
    /// implementation checks it and refuses what it cannot use.
    fn add_remote_candidate(&self, candidate: &Candidate) -> Result<(), AgentError>;

    /// Dials (controlling) or accepts (controlled) with the peer's credentials;
    /// returns once a candidate pair works. Dropping the future cancels.
    async fn connect(
        &self,
        role: Role,
        remote: &IceCredentials,
    ) -> Result<Arc<dyn DatagramConn>, AgentError>;

    /// Closes the agent and its sockets.
    async fn close(&self) -> Result<(), AgentError>;
}

/// Makes agents: one per (re)start of a session.
#[async_trait]
pub trait IceAgentFactory: Send + Sync + 'static {
    /// A new agent with `params`.
    async fn create(&self, params: AgentParams) -> Result<Arc<dyn IceAgent>, AgentError>;
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn credentials_are_16_and_32_letters_and_fresh() {
        let mut rng = StdRng::from_os_rng();
        let a = IceCredentials::generate(&mut rng);
        let b = IceCredentials::generate(&mut rng);
        assert_eq!((a.ufrag.len(), a.pwd.len()), (16, 32));
        assert!(
            a.ufrag
                .chars()
                .chain(a.pwd.chars())
                .all(|c| c.is_ascii_alphabetic())
        );
        assert_ne!(a, b);
        assert!(!format!("{a:?}").contains(&a.pwd));
    }

    #[tokio::test]
    async fn a_full_event_channel_drops_and_counts() {
        let (tx, mut rx) = mpsc::channel(1);
        let events = AgentEvents::new(3, tx);
        events.emit(AgentEvent::GatheringComplete);
        events.emit(AgentEvent::State(IceState::Checking));
        assert_eq!(events.dropped(), 1);
        assert_eq!(rx.recv().await, Some((3, AgentEvent::GatheringComplete)));
    }

    #[tokio::test]
    async fn a_state_change_waits_for_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let events = AgentEvents::new(3, tx);
        events.emit(AgentEvent::GatheringComplete);
        let waiting = tokio::spawn({
            let events = events.clone();
            async move { events.emit_state(IceState::Failed).await }
        });
        assert_eq!(rx.recv().await, Some((3, AgentEvent::GatheringComplete)));
        assert_eq!(
            rx.recv().await,
            Some((3, AgentEvent::State(IceState::Failed)))
        );
        waiting.await.unwrap();
        assert_eq!(events.dropped(), 0);
    }
}
