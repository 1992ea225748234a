//! docs/PROTOCOL.md §8 without I/O: the session's state machine.
//!
//! Like quinn-proto, the [`Machine`] does no I/O and reads no clock: the driver
//! ([`Session`](crate::Session)) feeds it what happened (a message from the
//! peer, an agent event, the time) and carries out the [`Action`]s it asks for
//! (publish a message, create, connect or close an agent, report a state). So
//! the protocol is tested without sockets, and another driver could run it.
//!
//! Agents are numbered; everything an agent reports carries its number, and
//! whatever comes from an agent that is no longer the current one is ignored.

use std::{
    collections::VecDeque,
    fmt,
    time::{Duration, Instant},
};

use cunicu_signal::{
    Role,
    proto::{
        epdisc::{Candidate, Credentials},
        signaling::Message,
    },
};
use rand::{SeedableRng, rngs::StdRng};

use crate::{
    agent::{AgentEvent, IceCredentials, IceState},
    backoff::{Backoff, BackoffOptions},
    candidate,
};

/// The state of a session, under cunīcu's names, in docs/PROTOCOL.md §8's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// A new agent is being made (step 1).
    Creating,
    /// The agent exists; our credentials are being sent (step 2).
    Idle,
    /// Remote credentials arrived; local candidates are being gathered (step 3).
    Gathering,
    /// The first local and the first remote candidate exist; dial or accept runs (step 5).
    Connecting,
    /// Connectivity checks run (reported by the agent).
    Checking,
    /// A candidate pair works (reported by the agent).
    Connected,
    /// Checks are done (reported by the agent).
    Completed,
    /// The selected pair stopped answering (reported by the agent).
    Disconnected,
    /// No pair works (reported by the agent); a restart follows at once.
    Failed,
    /// The agent is being closed.
    Closing,
    /// The agent is closed; a restart goes on with [`State::Creating`].
    Closed,
}

impl State {
    /// The name as cunīcu prints it.
    pub fn name(self) -> &'static str {
        match self {
            State::Creating => "Creating",
            State::Idle => "Idle",
            State::Gathering => "Gathering",
            State::Connecting => "Connecting",
            State::Checking => "Checking",
            State::Connected => "Connected",
            State::Completed => "Completed",
            State::Disconnected => "Disconnected",
            State::Failed => "Failed",
            State::Closing => "Closing",
            State::Closed => "Closed",
        }
    }

    /// True while a working candidate pair exists (Connected or Completed).
    pub fn is_connected(self) -> bool {
        matches!(self, State::Connected | State::Completed)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the driver must do. Agents are named by their number. `Debug`
/// hides ICE passwords.
#[derive(Clone, PartialEq)]
pub enum Action {
    /// Create agent `agent` with our `credentials`; then call
    /// [`Machine::agent_created`] or [`Machine::agent_create_failed`].
    CreateAgent {
        /// The agent's number.
        agent: u64,
        /// Our fresh credentials.
        credentials: IceCredentials,
    },
    /// Publish this message to the peer.
    Publish(Box<Message>),
    /// Start gathering local candidates.
    Gather {
        /// The agent's number.
        agent: u64,
    },
    /// Add a (checked) candidate of the peer.
    AddRemoteCandidate {
        /// The agent's number.
        agent: u64,
        /// The candidate.
        candidate: Candidate,
    },
    /// Dial (controlling) or accept (controlled) with the peer's credentials;
    /// when it fails, call [`Machine::agent_failed`].
    Connect {
        /// The agent's number.
        agent: u64,
        /// Our role: controlling dials, controlled accepts.
        role: Role,
        /// The peer's credentials.
        remote: IceCredentials,
    },
    /// Close the agent; then call [`Machine::agent_closed`].
    CloseAgent {
        /// The agent's number.
        agent: u64,
    },
    /// Gathering on agent `agent` completed without a single local
    /// candidate: no local address passed the limits (interfaces, addresses),
    /// so the peer can never reach us. Report it; the session waits on.
    NoCandidates {
        /// The agent's number.
        agent: u64,
    },
    /// The session entered `state` (report it).
    State {
        /// The current agent's number.
        agent: u64,
        /// The state entered.
        state: State,
    },
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateAgent { agent, credentials } => f
                .debug_struct("CreateAgent")
                .field("agent", agent)
                .field("credentials", credentials)
                .finish(),
            Action::Publish(message) => f
                .debug_tuple("Publish")
                .field(&RedactedMessage(message))
                .finish(),
            Action::Gather { agent } => f.debug_struct("Gather").field("agent", agent).finish(),
            Action::AddRemoteCandidate { agent, candidate } => f
                .debug_struct("AddRemoteCandidate")
                .field("agent", agent)
                .field("candidate", candidate)
                .finish(),
            Action::Connect {
                agent,
                role,
                remote,
            } => f
                .debug_struct("Connect")
                .field("agent", agent)
                .field("role", role)
                .field("remote", remote)
                .finish(),
            Action::CloseAgent { agent } => {
                f.debug_struct("CloseAgent").field("agent", agent).finish()
            }
            Action::NoCandidates { agent } => f
                .debug_struct("NoCandidates")
                .field("agent", agent)
                .finish(),
            Action::State { agent, state } => f
                .debug_struct("State")
                .field("agent", agent)
                .field("state", state)
                .finish(),
        }
    }
}

/// A [`Message`] whose `Debug` shows the credentials without the password.
struct RedactedMessage<'a>(&'a Message);

/// [`Credentials`] whose `Debug` hides the password.
struct RedactedCredentials<'a>(&'a Credentials);

impl fmt::Debug for RedactedCredentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("ufrag", &self.0.ufrag)
            .field("pwd", &"***")
            .field("need_creds", &self.0.need_creds)
            .finish()
    }
}

impl fmt::Debug for RedactedMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.0;
        let mut s = f.debug_struct("Message");
        s.field(
            "credentials",
            &message.credentials.as_ref().map(RedactedCredentials),
        )
        .field("candidate", &message.candidate);
        // The machine never sends these; only say whether they are there.
        if message.peer.is_some() {
            s.field("peer", &"..");
        }
        if message.pske.is_some() {
            s.field("pske", &"..");
        }
        s.finish()
    }
}

/// Settings of the state machine.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct MachineConfig {
    /// Our ICE role towards the peer.
    pub role: Role,
    /// Schedule of repeated credentials while idle (and of retries after an
    /// agent could not be created).
    pub backoff: BackoffOptions,
    /// How long a disconnect may last before the session restarts.
    pub disconnect_grace: Duration,
    /// Most remote candidates handed to one agent; more are dropped and
    /// counted ([`MachineStats::excess_candidates`]).
    pub max_remote_candidates: u64,
}

/// Default of [`MachineConfig::max_remote_candidates`]: far more than a peer
/// has (a host candidate per address, a server-reflexive and a relay
/// candidate per STUN/TURN server), few enough that a peer (or a replaying
/// signaling server) cannot make the agent check pairs without end.
pub const MAX_REMOTE_CANDIDATES: u64 = 64;

/// How many superseded credentials of the peer are remembered: credentials
/// equal to one of them are a replay and are ignored.
pub const SUPERSEDED_CREDENTIALS: usize = 16;

impl MachineConfig {
    /// docs/PROTOCOL.md §8's defaults for `role`: the standard backoff, 5 s grace, at most
    /// [`MAX_REMOTE_CANDIDATES`] remote candidates per agent.
    pub fn new(role: Role) -> Self {
        MachineConfig {
            role,
            backoff: BackoffOptions::default(),
            disconnect_grace: Duration::from_secs(5),
            max_remote_candidates: MAX_REMOTE_CANDIDATES,
        }
    }
}

/// Counters of a [`Machine`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineStats {
    /// Agents created (including the first).
    pub agents: u64,
    /// Restarts (an agent closed to make a new one).
    pub restarts: u64,
    /// Credential messages published (requests and answers).
    pub credentials_sent: u64,
    /// Local candidates published.
    pub candidates_sent: u64,
    /// Remote candidates handed to the agent.
    pub candidates_added: u64,
    /// Remote candidates refused because a field is invalid.
    pub invalid_candidates: u64,
    /// Remote candidates dropped because the agent already has
    /// [`MachineConfig::max_remote_candidates`].
    pub excess_candidates: u64,
    /// Remote credentials refused: longer than 256 characters, or characters
    /// other than RFC 8445's ice-chars (letters, digits, `+`, `/`).
    pub invalid_credentials: u64,
    /// Remote credentials ignored because the peer had replaced them before
    /// (a replay of an old message, by the signaling server or on the LAN).
    pub replayed_credentials: u64,
    /// Messages ignored because no agent was ready for them.
    pub ignored: u64,
    /// Times our credentials reached nobody (the signaling server counted
    /// no subscriber of the peer's key): the peer is away, and credentials
    /// went out less often until it came back.
    pub peer_absent: u64,
}

/// The schedule of credential repeats while the peer is away: doubling, up
/// to a minute.
const ABSENT_BACKOFF: BackoffOptions = BackoffOptions {
    initial: Duration::from_secs(1),
    multiplier: 2.0,
    jitter: 0.2,
    max: Duration::from_secs(60),
};

/// Why the current agent is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Restart,
    Shutdown,
}

/// The docs/PROTOCOL.md §8 state machine of one peer pair. See the module docs.
pub struct Machine {
    config: MachineConfig,
    rng: StdRng,
    /// Credential repeats while idle; starts again with every agent.
    backoff: Backoff,
    /// Retries after failed agent creation; reset when an agent works.
    create_backoff: Backoff,
    /// Credential repeats while the peer is away.
    absent_backoff: Backoff,
    /// Our latest credentials reached nobody: the peer is away.
    peer_absent: bool,
    state: State,
    agent: u64,
    local: IceCredentials,
    remote: Option<IceCredentials>,
    /// The peer's latest credentials, kept across agents.
    peer_latest: Option<IceCredentials>,
    /// Credentials the peer replaced (newest last), at most
    /// [`SUPERSEDED_CREDENTIALS`].
    superseded: VecDeque<IceCredentials>,
    local_candidates: u64,
    remote_candidates: u64,
    /// Remote candidates of the current agent dropped beyond the limit.
    excess_candidates: u64,
    next_credentials: Option<Instant>,
    disconnect_deadline: Option<Instant>,
    recreate_at: Option<Instant>,
    closing: Option<Closing>,
    shutdown: bool,
    actions: VecDeque<Action>,
    stats: MachineStats,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("state", &self.state)
            .field("agent", &self.agent)
            .field("role", &self.config.role)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine that starts at once with agent 1 ([`State::Creating`]),
    /// drawing credentials and jitter from the operating system's RNG.
    pub fn new(config: MachineConfig) -> Self {
        Self::with_rng(config, StdRng::from_os_rng())
    }

    /// Like [`Machine::new`], with the given random number generator.
    pub fn with_rng(config: MachineConfig, rng: StdRng) -> Self {
        let mut machine = Machine {
            config,
            rng,
            backoff: Backoff::new(config.backoff),
            create_backoff: Backoff::new(config.backoff),
            absent_backoff: Backoff::new(ABSENT_BACKOFF),
            peer_absent: false,
            state: State::Closed,
            agent: 0,
            local: IceCredentials::default(),
            remote: None,
            peer_latest: None,
            superseded: VecDeque::new(),
            local_candidates: 0,
            remote_candidates: 0,
            excess_candidates: 0,
            next_credentials: None,
            disconnect_deadline: None,
            recreate_at: None,
            closing: None,
            shutdown: false,
            actions: VecDeque::new(),
            stats: MachineStats::default(),
        };
        machine.create_agent();
        machine
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The number of the current agent (1 for the first).
    pub fn agent(&self) -> u64 {
        self.agent
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.config.role
    }

    /// Our credentials of the current agent.
    pub fn local_credentials(&self) -> &IceCredentials {
        &self.local
    }

    /// The peer's credentials, once they arrived for the current agent.
    pub fn remote_credentials(&self) -> Option<&IceCredentials> {
        self.remote.as_ref()
    }

    /// The counters.
    pub fn stats(&self) -> MachineStats {
        self.stats
    }

    /// True once [`Machine::close`] was called and the agent is closed.
    pub fn is_finished(&self) -> bool {
        self.shutdown && self.state == State::Closed
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => self.next_credentials,
            State::Disconnected => self.disconnect_deadline,
            State::Closed if !self.shutdown => self.recreate_at,
            _ => None,
        }
    }

    /// The time has come: repeat our credentials, give up on a disconnect,
    /// or try again to create an agent.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        match self.state {
            State::Idle if due(self.next_credentials) => {
                self.send_credentials(true);
                self.schedule_credentials(now);
            }
            State::Disconnected if due(self.disconnect_deadline) => {
                tracing::info!(agent = self.agent, grace = ?self.config.disconnect_grace,
                    "disconnected longer than the grace period: restarting");
                self.restart();
            }
            State::Closed if !self.shutdown && due(self.recreate_at) => self.create_agent(),
            _ => {}
        }
    }

    /// Agent `agent` exists now. Returns false if it is not wanted (not the
    /// current one): the driver closes it and forgets it.
    pub fn agent_created(&mut self, now: Instant, agent: u64) -> bool {
        if agent != self.agent || self.state != State::Creating {
            return false;
        }
        if self.shutdown {
            self.close_agent(Closing::Shutdown);
            return true;
        }
        self.enter(State::Idle);
        self.backoff.reset();
        self.send_credentials(true);
        self.schedule_credentials(now);
        true
    }

    /// Agent `agent` could not be created: try again after a backoff delay.
    pub fn agent_create_failed(&mut self, now: Instant, agent: u64) {
        if agent != self.agent || self.state != State::Creating {
            return;
        }
        self.enter(State::Closed);
        if !self.shutdown {
            let delay = self.create_backoff.next_delay(&mut self.rng);
            self.recreate_at = Some(now + delay);
        }
    }

    /// Agent `agent` is closed.
    pub fn agent_closed(&mut self, _now: Instant, agent: u64) {
        if agent != self.agent || self.state != State::Closing {
            return;
        }
        let closing = self.closing.take();
        self.enter(State::Closed);
        if closing == Some(Closing::Restart) && !self.shutdown {
            self.create_agent();
        }
    }

    /// Agent `agent` failed outside its state reports (gathering could not
    /// start, dial or accept failed): restart at once, as on [`IceState::Failed`].
    pub fn agent_failed(&mut self, _now: Instant, agent: u64) {
        if agent != self.agent || !self.live() {
            return;
        }
        self.enter(State::Failed);
        self.restart();
    }

    /// Stops: closes the agent (after its creation, if it is being created).
    /// [`Machine::is_finished`] tells when it is done.
    pub fn close(&mut self, _now: Instant) {
        if self.shutdown {
            return;
        }
        self.shutdown = true;
        match self.state {
            // The agent is closed as soon as it exists.
            State::Creating => {}
            State::Closing => self.closing = Some(Closing::Shutdown),
            State::Closed => self.recreate_at = None,
            _ => self.close_agent(Closing::Shutdown),
        }
    }

    /// A message from the peer (credentials and/or a candidate). A peer that
    /// was away is back: if it did not start the exchange itself, our
    /// credentials go to it at once.
    pub fn handle_message(&mut self, now: Instant, message: &Message) {
        let was_absent = std::mem::take(&mut self.peer_absent);
        if was_absent {
            self.absent_backoff.reset();
        }
        if let Some(credentials) = &message.credentials {
            self.on_credentials(now, credentials);
        }
        if let Some(candidate) = &message.candidate {
            self.on_remote_candidate(candidate);
        }
        if was_absent && self.state == State::Idle {
            tracing::debug!(
                agent = self.agent,
                "the peer is back: sending our credentials now"
            );
            self.backoff.reset();
            self.send_credentials(true);
            self.schedule_credentials(now);
        }
    }

    /// How many subscription streams our credentials with `ufrag` reached,
    /// as the backend said (`None`: it cannot tell). While nobody gets them
    /// (the peer is away), they are repeated less and less often (from 1 s,
    /// doubling, up to a minute) instead of at the usual pace; the peer's own
    /// first message brings the usual pace back at once.
    pub fn credentials_reached(&mut self, now: Instant, ufrag: &str, recipients: Option<u32>) {
        if self.state != State::Idle || ufrag != self.local.ufrag {
            return;
        }
        if recipients == Some(0) {
            if !self.peer_absent {
                self.stats.peer_absent += 1;
                tracing::debug!(
                    agent = self.agent,
                    "our credentials reached nobody: the peer is away; repeating them less often"
                );
            }
            self.peer_absent = true;
            let delay = self.absent_backoff.next_delay(&mut self.rng);
            self.next_credentials = Some(now + delay);
        } else if std::mem::take(&mut self.peer_absent) {
            self.absent_backoff.reset();
        }
    }

    /// Something agent `agent` reported.
    pub fn handle_agent_event(&mut self, now: Instant, agent: u64, event: &AgentEvent) {
        if agent != self.agent {
            return;
        }
        match event {
            AgentEvent::Candidate(candidate) => self.on_local_candidate(candidate),
            AgentEvent::State(state) => self.on_ice_state(now, *state),
            AgentEvent::GatheringComplete => {
                if self.state == State::Gathering && self.local_candidates == 0 {
                    self.actions
                        .push_back(Action::NoCandidates { agent: self.agent });
                }
            }
            AgentEvent::SelectedPair { .. } => {}
        }
    }

    // ------------------------------------------------------------ internals --

    /// True while the current agent takes messages: from Idle to Disconnected.
    fn live(&self) -> bool {
        matches!(
            self.state,
            State::Idle
                | State::Gathering
                | State::Connecting
                | State::Checking
                | State::Connected
                | State::Completed
                | State::Disconnected
        )
    }

    fn connecting_or_later(&self) -> bool {
        matches!(
            self.state,
            State::Connecting
                | State::Checking
                | State::Connected
                | State::Completed
                | State::Disconnected
        )
    }

    fn enter(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.actions.push_back(Action::State {
                agent: self.agent,
                state,
            });
        }
    }

    fn create_agent(&mut self) {
        self.agent += 1;
        self.stats.agents += 1;
        self.local = IceCredentials::generate(&mut self.rng);
        self.remote = None;
        self.local_candidates = 0;
        self.remote_candidates = 0;
        self.excess_candidates = 0;
        self.next_credentials = None;
        self.disconnect_deadline = None;
        self.recreate_at = None;
        self.enter(State::Creating);
        self.actions.push_back(Action::CreateAgent {
            agent: self.agent,
            credentials: self.local.clone(),
        });
    }

    fn close_agent(&mut self, why: Closing) {
        self.closing = Some(why);
        self.remote = None;
        self.next_credentials = None;
        self.disconnect_deadline = None;
        self.enter(State::Closing);
        self.actions
            .push_back(Action::CloseAgent { agent: self.agent });
    }

    fn restart(&mut self) {
        if self.shutdown {
            return;
        }
        self.stats.restarts += 1;
        self.create_backoff.reset();
        self.close_agent(Closing::Restart);
    }

    fn send_credentials(&mut self, need_creds: bool) {
        self.stats.credentials_sent += 1;
        self.actions.push_back(Action::Publish(Box::new(Message {
            credentials: Some(Credentials {
                ufrag: self.local.ufrag.clone(),
                pwd: self.local.pwd.clone(),
                need_creds,
            }),
            ..Default::default()
        })));
    }

    fn schedule_credentials(&mut self, now: Instant) {
        let delay = self.backoff.next_delay(&mut self.rng);
        self.next_credentials = Some(now + delay);
    }

    fn on_credentials(&mut self, _now: Instant, credentials: &Credentials) {
        if !self.live() {
            self.stats.ignored += 1;
            tracing::debug!(state = %self.state, "credentials ignored: no agent ready");
            return;
        }
        if !ice_chars(&credentials.ufrag) || !ice_chars(&credentials.pwd) {
            self.stats.invalid_credentials += 1;
            tracing::warn!(
                total = self.stats.invalid_credentials,
                ufrag_len = credentials.ufrag.len(),
                pwd_len = credentials.pwd.len(),
                "remote credentials dropped: not 0 to 256 ice-chars"
            );
            return;
        }
        let new = IceCredentials {
            ufrag: credentials.ufrag.clone(),
            pwd: credentials.pwd.clone(),
        };
        if !new.is_empty() {
            if self.superseded.contains(&new) {
                // Credentials are fresh with every agent of the peer: ones it
                // replaced come from a replay (the signaling server or a LAN
                // host can resend a genuine old envelope), not from the peer.
                self.stats.replayed_credentials += 1;
                tracing::debug!(agent = self.agent, ufrag = %new.ufrag,
                    total = self.stats.replayed_credentials,
                    "superseded credentials of the peer ignored (a replay)");
                return;
            }
            self.note_peer_credentials(&new);
        }
        if let Some(old) = &self.remote
            && !old.is_empty()
            && !new.is_empty()
            && *old != new
        {
            tracing::info!(agent = self.agent, old = %old.ufrag, new = %new.ufrag,
                "the peer has new credentials: restarting");
            self.restart();
            return;
        }
        if credentials.need_creds {
            self.send_credentials(false);
        }
        if self.state == State::Idle && !new.is_empty() {
            self.remote = Some(new);
            self.enter(State::Gathering);
            self.actions.push_back(Action::Gather { agent: self.agent });
            self.maybe_connect();
        }
    }

    /// `new` (valid, not empty, not superseded) is now the peer's latest:
    /// the previous latest, if different, is superseded.
    fn note_peer_credentials(&mut self, new: &IceCredentials) {
        match &self.peer_latest {
            Some(latest) if latest == new => return,
            Some(_) => {
                if self.superseded.len() == SUPERSEDED_CREDENTIALS {
                    self.superseded.pop_front();
                }
                self.superseded.extend(self.peer_latest.take());
            }
            None => {}
        }
        self.peer_latest = Some(new.clone());
    }

    fn on_remote_candidate(&mut self, candidate: &Candidate) {
        if !self.live() {
            self.stats.ignored += 1;
            return;
        }
        if let Err(e) = candidate::parse(candidate) {
            self.stats.invalid_candidates += 1;
            tracing::warn!(
                total = self.stats.invalid_candidates,
                "remote candidate dropped: {e}"
            );
            return;
        }
        if self.remote_candidates >= self.config.max_remote_candidates {
            self.stats.excess_candidates += 1;
            self.excess_candidates += 1;
            // Once per agent as a warning, the rest at debug.
            if self.excess_candidates == 1 {
                tracing::warn!(
                    agent = self.agent,
                    limit = self.config.max_remote_candidates,
                    "remote candidates beyond the limit of one agent are dropped"
                );
            } else {
                tracing::debug!(
                    agent = self.agent,
                    dropped = self.excess_candidates,
                    "remote candidate beyond the limit dropped"
                );
            }
            return;
        }
        self.stats.candidates_added += 1;
        self.remote_candidates += 1;
        self.actions.push_back(Action::AddRemoteCandidate {
            agent: self.agent,
            candidate: candidate.clone(),
        });
        self.maybe_connect();
    }

    fn on_local_candidate(&mut self, candidate: &Candidate) {
        if !self.live() || self.state == State::Idle {
            return;
        }
        self.stats.candidates_sent += 1;
        self.local_candidates += 1;
        self.actions.push_back(Action::Publish(Box::new(Message {
            candidate: Some(candidate.clone()),
            ..Default::default()
        })));
        self.maybe_connect();
    }

    fn maybe_connect(&mut self) {
        if self.state != State::Gathering
            || self.local_candidates == 0
            || self.remote_candidates == 0
        {
            return;
        }
        let Some(remote) = self.remote.clone() else {
            return;
        };
        self.enter(State::Connecting);
        self.actions.push_back(Action::Connect {
            agent: self.agent,
            role: self.config.role,
            remote,
        });
    }

    fn on_ice_state(&mut self, now: Instant, state: IceState) {
        if !self.connecting_or_later() {
            return;
        }
        // An agent is never restarted here (a restart makes a new one), so it
        // does not go back to checking once connected. webrtc-ice 0.17 may
        // report Checking after Connected (two of its tasks race to report):
        // such a late Checking is ignored, and a Connected that overtook it
        // implies it.
        let checked = matches!(
            self.state,
            State::Checking | State::Connected | State::Completed | State::Disconnected
        );
        match state {
            IceState::New => {}
            IceState::Checking => {
                if !checked {
                    self.enter(State::Checking);
                }
            }
            IceState::Connected | IceState::Completed => {
                self.disconnect_deadline = None;
                self.create_backoff.reset();
                if !checked {
                    self.enter(State::Checking);
                }
                self.enter(if state == IceState::Connected {
                    State::Connected
                } else {
                    State::Completed
                });
            }
            IceState::Disconnected => {
                if self.state != State::Disconnected {
                    self.disconnect_deadline = Some(now + self.config.disconnect_grace);
                    self.enter(State::Disconnected);
                }
                if self.config.disconnect_grace.is_zero() {
                    self.restart();
                }
            }
            IceState::Failed => {
                self.enter(State::Failed);
                self.restart();
            }
            IceState::Closed => {
                tracing::warn!(
                    agent = self.agent,
                    "the ICE agent closed by itself: restarting"
                );
                self.restart();
            }
        }
    }
}

/// At most 256 of RFC 8445's ice-chars (ALPHA / DIGIT / "+" / "/"), the
/// limit for both ufrag and password.
fn ice_chars(text: &str) -> bool {
    text.len() <= 256
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}
