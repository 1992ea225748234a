//! The driver: runs the [`Machine`] of one peer pair over a signaling
//! [`Backend`] and an [`IceAgentFactory`], and hands established connections
//! to the user.
//!
//! One task (the driver) owns the machine, the current agent and every task it
//! starts (agent creation, dial/accept, closing, publishing). It stops when
//! [`Session::close`] is called or the [`Session`] is dropped: then it closes the
//! agent and unsubscribes, each within a time limit.

use std::{
    collections::HashMap,
    fmt, io,
    sync::Arc,
    time::{Duration, Instant},
};

use cunicu_signal::{
    Backend, BackendError, ChannelHandler, Delivery, Handler, Key, KeyPair, Role, SameKeyError,
    Sender,
    proto::{epdisc::Candidate, signaling::Message},
};
use tokio::{
    sync::{broadcast, mpsc, watch},
    task::{AbortHandle, JoinError, JoinHandle, JoinSet},
};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    agent::{
        AgentError, AgentEvent, AgentEvents, AgentParams, DatagramConn, IceAgent, IceAgentFactory,
    },
    backoff::BackoffOptions,
    candidate,
    machine::{Action, Machine, MachineConfig, MachineStats, State},
};

/// Settings of a [`Session`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Schedule of repeated credentials while idle (docs/PROTOCOL.md §8: 0.5 s, ×1.5,
    /// ±50 %, at most 1 min).
    pub backoff: BackoffOptions,
    /// How long a disconnect may last before the session restarts (5 s).
    pub disconnect_grace: Duration,
    /// Deadline of one publish on the backend (10 s).
    pub publish_timeout: Duration,
    /// Deadline of creating or closing an agent (10 s).
    pub agent_timeout: Duration,
    /// Deadline of unsubscribing when the session stops (5 s).
    pub unsubscribe_timeout: Duration,
    /// Messages from the peer queued for the driver (256); more are dropped
    /// and counted by the handler.
    pub inbound_capacity: usize,
    /// Messages queued for publishing (256); more are dropped and counted.
    pub outbound_capacity: usize,
    /// Events kept for slow observers (256); a receiver that falls further
    /// behind skips the oldest.
    pub event_capacity: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            backoff: BackoffOptions::default(),
            disconnect_grace: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
            agent_timeout: Duration::from_secs(10),
            unsubscribe_timeout: Duration::from_secs(5),
            inbound_capacity: 256,
            outbound_capacity: 256,
            event_capacity: 256,
        }
    }
}

impl SessionOptions {
    /// Sets the backoff of repeated credentials.
    pub fn with_backoff(mut self, backoff: BackoffOptions) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the grace period of a disconnect.
    pub fn with_disconnect_grace(mut self, grace: Duration) -> Self {
        self.disconnect_grace = grace;
        self
    }
}

/// Why a session could not start or stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Both peers have the same key.
    #[error(transparent)]
    SameKey(#[from] SameKeyError),
    /// The peer's key cannot be a peer (the zero key or another low-order point).
    #[error("peer key {0} is a low-order point, not a valid peer key")]
    InvalidPeer(Key),
    /// Subscribing to the peer's messages failed.
    #[error("cannot subscribe to the messages of peer {peer}: {source}")]
    Subscribe {
        /// The peer.
        peer: Key,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The driver did not stop in time.
    #[error("the session did not stop within {0:?}")]
    CloseTimeout(Duration),
    /// The driver task panicked.
    #[error("the session task failed: {0}")]
    Task(#[from] JoinError),
}

/// What a session reports. Observe with [`Session::events`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The session entered `state` (docs/PROTOCOL.md §8's moments).
    State {
        /// Number of the agent at that moment (1 for the first).
        agent: u64,
        /// The state entered.
        state: State,
        /// When it was entered: the time of what made the session enter it
        /// (a message, an agent's report, a timer). A receiver may see the
        /// event later.
        at: Instant,
    },
    /// The agent selected a candidate pair.
    SelectedPair {
        /// Number of the agent.
        agent: u64,
        /// Our candidate.
        local: Candidate,
        /// The peer's candidate.
        remote: Candidate,
    },
    /// A connection is established: dial or accept returned.
    Connected(Connection),
    /// The agent gathered no local candidate (no local address passed the
    /// interface and address limits): the peer cannot reach us.
    NoCandidates {
        /// Number of the agent.
        agent: u64,
    },
}

/// An established ICE connection: datagrams to and from the peer over the
/// selected candidate pair. It fails once its agent is closed (on a restart);
/// the next one comes with [`Session::connected`].
#[derive(Clone)]
pub struct Connection {
    agent: u64,
    role: Role,
    local_ufrag: String,
    remote_ufrag: String,
    conn: Arc<dyn DatagramConn>,
}

impl Connection {
    /// Number of the agent that made it.
    pub fn agent(&self) -> u64 {
        self.agent
    }

    /// Our role: the controlling side dialed, the controlled side accepted.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our ufrag of this agent.
    pub fn local_ufrag(&self) -> &str {
        &self.local_ufrag
    }

    /// The peer's ufrag of this agent.
    pub fn remote_ufrag(&self) -> &str {
        &self.remote_ufrag
    }

    /// Sends one datagram.
    pub async fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.conn.send(datagram).await
    }

    /// Receives one datagram.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.recv(buf).await
    }

    /// The datagram connection itself.
    pub fn conn(&self) -> &Arc<dyn DatagramConn> {
        &self.conn
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("agent", &self.agent)
            .field("role", &self.role)
            .field("local_ufrag", &self.local_ufrag)
            .field("remote_ufrag", &self.remote_ufrag)
            .finish_non_exhaustive()
    }
}

/// An ICE session with one peer over signaling (docs/PROTOCOL.md §8). It restarts by
/// itself as docs/PROTOCOL.md §8 says, until closed or dropped.
pub struct Session {
    role: Role,
    our_public: Key,
    theirs: Key,
    commands: mpsc::Sender<()>,
    events: broadcast::Sender<Event>,
    first_events: Option<broadcast::Receiver<Event>>,
    state: watch::Receiver<State>,
    connection: watch::Receiver<Option<Connection>>,
    stats: watch::Receiver<MachineStats>,
    driver: Option<JoinHandle<()>>,
    stop_limit: Duration,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("our_public", &self.our_public)
            .field("theirs", &self.theirs)
            .field("role", &self.role)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Subscribes to the messages of `pair.theirs` to `pair.ours` (our private
    /// key) on `backend`, then runs docs/PROTOCOL.md §8 with agents from `agents`. Returns once
    /// the subscription exists.
    pub async fn start(
        backend: Arc<dyn Backend>,
        pair: KeyPair,
        agents: Arc<dyn IceAgentFactory>,
        options: SessionOptions,
    ) -> Result<Session, SessionError> {
        let (our_public, theirs) = (pair.ours.public_key(), pair.theirs);
        if theirs.is_low_order() {
            return Err(SessionError::InvalidPeer(theirs));
        }
        let role = pair.role()?;
        let (handler, deliveries) = ChannelHandler::new(options.inbound_capacity);
        backend
            .subscribe(
                &pair.ours,
                Sender::Key(theirs),
                handler.clone() as Arc<dyn Handler>,
            )
            .await
            .map_err(|source| SessionError::Subscribe {
                peer: theirs,
                source,
            })?;

        let mut config = MachineConfig::new(role);
        config.backoff = options.backoff;
        config.disconnect_grace = options.disconnect_grace;
        let machine = Machine::new(config);

        let (commands_tx, commands) = mpsc::channel(1);
        let (events, first_events) = broadcast::channel(options.event_capacity.max(1));
        let (state_tx, state) = watch::channel(State::Creating);
        let (connection_tx, connection) = watch::channel(None);
        let (stats_tx, stats) = watch::channel(MachineStats::default());
        let (agent_tx, agent_rx) = mpsc::channel(256);
        let (publish_tx, publish_rx) = mpsc::channel(options.outbound_capacity.max(1));
        let (reached_tx, reached_rx) = mpsc::channel(options.outbound_capacity.max(1));
        let publisher = tokio::spawn(publisher(
            backend.clone(),
            pair.clone(),
            publish_rx,
            reached_tx,
            options.publish_timeout,
        ));
        let stop_limit = stop_limit(&options);
        let driver = Driver {
            machine,
            backend,
            pair,
            handler: handler.clone() as Arc<dyn Handler>,
            channel_handler: handler,
            deliveries,
            commands,
            agents,
            agent_tx,
            agent_rx,
            current: None,
            tasks: JoinSet::new(),
            pending: HashMap::new(),
            connect_task: None,
            publish_tx: Some(publish_tx),
            reached: reached_rx,
            publisher: Some(AbortOnDropHandle::new(publisher)),
            publish_dropped: 0,
            events: events.clone(),
            state_tx,
            connection_tx,
            stats_tx,
            options,
            now: Instant::now(),
        };
        let driver = tokio::spawn(driver.run());
        tracing::debug!(ours = %our_public, %theirs, ?role, "session started");
        Ok(Session {
            role,
            our_public,
            theirs,
            commands: commands_tx,
            events,
            first_events: Some(first_events),
            state,
            connection,
            stats,
            driver: Some(driver),
            stop_limit,
        })
    }

    /// Our role: the smaller public key controls (docs/PROTOCOL.md §3).
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our public key.
    pub fn public_key(&self) -> Key {
        self.our_public
    }

    /// The peer's public key.
    pub fn peer(&self) -> Key {
        self.theirs
    }

    /// The events of this session. The first call returns a receiver that
    /// holds every event since the start (up to the event capacity); later
    /// calls see the events from then on.
    pub fn events(&mut self) -> broadcast::Receiver<Event> {
        self.first_events
            .take()
            .unwrap_or_else(|| self.events.subscribe())
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// The state, to watch for changes (only the latest is kept: use
    /// [`Session::events`] to see every state).
    pub fn states(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// The counters of the state machine.
    pub fn stats(&self) -> MachineStats {
        *self.stats.borrow()
    }

    /// The current connection, if one is established.
    pub fn connection(&self) -> Option<Connection> {
        self.connection.borrow().clone()
    }

    /// The connections, to watch: `None` while none is established.
    pub fn connections(&self) -> watch::Receiver<Option<Connection>> {
        self.connection.clone()
    }

    /// Waits for an established connection: the current one, or the next.
    /// `None` once the session has stopped.
    pub async fn connected(&self) -> Option<Connection> {
        let mut connections = self.connection.clone();
        connections
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|c| c.clone())
    }

    /// Stops: closes the agent, unsubscribes, and waits for the driver. Each
    /// step has its time limit (see [`SessionOptions`]); together at most
    /// 3 × `agent_timeout` + `publish_timeout` + `unsubscribe_timeout`, plus
    /// a second (46 s by default). Should the driver still run after that (a
    /// runtime too busy to run it), it is aborted and this returns
    /// [`SessionError::CloseTimeout`].
    pub async fn close(mut self) -> Result<(), SessionError> {
        let _ = self.commands.try_send(());
        if let Some(mut driver) = self.driver.take() {
            match tokio::time::timeout(self.stop_limit, &mut driver).await {
                Ok(result) => result?,
                Err(_) => {
                    // Nobody would own it any more: stop it here. Its tasks
                    // (agent, publisher) are aborted with it.
                    driver.abort();
                    tracing::warn!(limit = ?self.stop_limit,
                        "the session did not stop in time: aborted");
                    return Err(SessionError::CloseTimeout(self.stop_limit));
                }
            }
        }
        Ok(())
    }
}

/// The longest the driver can take to stop once asked, every step at its
/// time limit: an agent being created when the close came (agent timeout),
/// then closed (agent timeout); the tasks still running after that, e.g. a
/// discarded agent's close (agent timeout); the queued messages going out
/// (publish timeout); unsubscribing (unsubscribe timeout). Plus a second for
/// the runtime to get round to it.
fn stop_limit(options: &SessionOptions) -> Duration {
    options.agent_timeout * 3
        + options.publish_timeout
        + options.unsubscribe_timeout
        + Duration::from_secs(1)
}

// Dropping the Session drops the command sender: the driver sees that, closes
// the agent and unsubscribes within its time limits, and ends.

/// What a task of the driver finished with.
enum Done {
    Created(Result<Arc<dyn IceAgent>, AgentError>),
    Connected(Result<Arc<dyn DatagramConn>, AgentError>),
    Closed,
    /// An agent that was not wanted any more was closed.
    Discarded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create,
    Connect,
    Close,
    Discard,
}

struct Driver {
    machine: Machine,
    backend: Arc<dyn Backend>,
    pair: KeyPair,
    handler: Arc<dyn Handler>,
    channel_handler: Arc<ChannelHandler>,
    deliveries: mpsc::Receiver<Delivery>,
    commands: mpsc::Receiver<()>,
    agents: Arc<dyn IceAgentFactory>,
    agent_tx: mpsc::Sender<(u64, AgentEvent)>,
    agent_rx: mpsc::Receiver<(u64, AgentEvent)>,
    current: Option<(u64, Arc<dyn IceAgent>)>,
    tasks: JoinSet<Done>,
    /// What each running task is for: (kind, agent number).
    pending: HashMap<tokio::task::Id, (Kind, u64)>,
    connect_task: Option<AbortHandle>,
    publish_tx: Option<mpsc::Sender<Message>>,
    /// How many subscription streams our credentials reached, by ufrag.
    reached: mpsc::Receiver<(String, Option<u32>)>,
    publisher: Option<AbortOnDropHandle<()>>,
    publish_dropped: u64,
    events: broadcast::Sender<Event>,
    state_tx: watch::Sender<State>,
    connection_tx: watch::Sender<Option<Connection>>,
    stats_tx: watch::Sender<MachineStats>,
    options: SessionOptions,
    /// When the machine's latest input happened: the time of the states it
    /// entered on it.
    now: Instant,
}

impl Driver {
    /// Reads the clock for an input to the machine.
    fn clock(&mut self) -> Instant {
        self.now = Instant::now();
        self.now
    }

    async fn run(mut self) {
        let mut stopping = false;
        loop {
            self.perform();
            if self.machine.is_finished() {
                break;
            }
            let deadline = self.machine.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.commands.recv(), if !stopping => {
                    // A close request, or the Session was dropped.
                    let _ = command;
                    stopping = true;
                    let now = self.clock();
                    self.machine.close(now);
                }
                Some(delivery) = self.deliveries.recv() => {
                    let now = self.clock();
                    self.machine.handle_message(now, &delivery.message);
                }
                Some((agent, event)) = self.agent_rx.recv() => self.on_agent_event(agent, event),
                Some((ufrag, recipients)) = self.reached.recv() => {
                    let now = self.clock();
                    self.machine.credentials_reached(now, &ufrag, recipients);
                }
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_task(done);
                }
                () = sleep => {
                    let now = self.clock();
                    self.machine.handle_timeout(now);
                }
            }
        }
        self.stop().await;
    }

    /// Carries out what the machine asks for.
    fn perform(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::CreateAgent { agent, credentials } => {
                    let params = AgentParams::new(
                        credentials,
                        self.machine.role(),
                        AgentEvents::new(agent, self.agent_tx.clone()),
                    );
                    let (factory, limit) = (self.agents.clone(), self.options.agent_timeout);
                    self.spawn(Kind::Create, agent, async move {
                        let result = match tokio::time::timeout(limit, factory.create(params)).await
                        {
                            Ok(result) => result,
                            Err(_) => Err(AgentError::Create(
                                format!("timed out after {limit:?}").into(),
                            )),
                        };
                        Done::Created(result)
                    });
                }
                Action::Publish(message) => self.publish(*message),
                Action::Gather { agent } => {
                    if let Some(current) = self.agent(agent)
                        && let Err(e) = current.gather()
                    {
                        tracing::warn!(agent, "{e}");
                        let now = self.clock();
                        self.machine.agent_failed(now, agent);
                    }
                }
                Action::AddRemoteCandidate { agent, candidate } => {
                    if let Some(current) = self.agent(agent) {
                        match current.add_remote_candidate(&candidate) {
                            Ok(()) => tracing::debug!(
                                agent,
                                candidate = %candidate::Display(&candidate),
                                "remote candidate added"
                            ),
                            Err(e) => tracing::warn!(
                                agent,
                                candidate = %candidate::Display(&candidate),
                                "{e}"
                            ),
                        }
                    }
                }
                Action::Connect {
                    agent,
                    role,
                    remote,
                } => {
                    if let Some(current) = self.agent(agent) {
                        let task = self.spawn(Kind::Connect, agent, async move {
                            Done::Connected(current.connect(role, &remote).await)
                        });
                        self.connect_task = Some(task);
                    }
                }
                Action::CloseAgent { agent } => {
                    if let Some(task) = self.connect_task.take() {
                        task.abort();
                    }
                    self.connection_tx.send_replace(None);
                    let current = match self.current.take() {
                        Some((number, current)) if number == agent => Some(current),
                        other => {
                            self.current = other;
                            None
                        }
                    };
                    let limit = self.options.agent_timeout;
                    self.spawn(Kind::Close, agent, async move {
                        if let Some(current) = current {
                            close_agent(agent, current, limit).await;
                        }
                        Done::Closed
                    });
                }
                Action::NoCandidates { agent } => {
                    tracing::warn!(agent, "gathering found no local candidate");
                    let _ = self.events.send(Event::NoCandidates { agent });
                }
                Action::State { agent, state } => {
                    tracing::debug!(agent, %state, "session state");
                    // The event first: whoever sees the new state sees its event too.
                    let _ = self.events.send(Event::State {
                        agent,
                        state,
                        at: self.now,
                    });
                    self.state_tx.send_replace(state);
                }
            }
        }
        self.stats_tx.send_replace(self.machine.stats());
    }

    fn spawn(
        &mut self,
        kind: Kind,
        agent: u64,
        task: impl Future<Output = Done> + Send + 'static,
    ) -> AbortHandle {
        let handle = self.tasks.spawn(task);
        self.pending.insert(handle.id(), (kind, agent));
        handle
    }

    fn agent(&self, agent: u64) -> Option<Arc<dyn IceAgent>> {
        match &self.current {
            Some((number, current)) if *number == agent => Some(current.clone()),
            _ => None,
        }
    }

    fn publish(&mut self, message: Message) {
        let Some(tx) = &self.publish_tx else { return };
        if tx.try_send(message).is_err() {
            self.publish_dropped += 1;
            tracing::warn!(
                dropped = self.publish_dropped,
                "signaling backend is too slow: message to the peer dropped"
            );
        }
    }

    fn on_agent_event(&mut self, agent: u64, event: AgentEvent) {
        match &event {
            AgentEvent::SelectedPair { local, remote } if agent == self.machine.agent() => {
                tracing::info!(
                    agent,
                    local = %candidate::Display(local),
                    remote = %candidate::Display(remote),
                    "selected candidate pair"
                );
                let _ = self.events.send(Event::SelectedPair {
                    agent,
                    local: local.clone(),
                    remote: remote.clone(),
                });
            }
            AgentEvent::Candidate(c) if agent == self.machine.agent() => {
                tracing::debug!(agent, candidate = %candidate::Display(c), "local candidate");
            }
            _ => {}
        }
        let now = self.clock();
        self.machine.handle_agent_event(now, agent, &event);
    }

    fn on_task(&mut self, done: Result<(tokio::task::Id, Done), JoinError>) {
        let now = self.clock();
        let (id, done) = match done {
            Ok((id, done)) => (id, Ok(done)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some((kind, agent)) = self.pending.remove(&id) else {
            return;
        };
        match (kind, done) {
            (_, Ok(Done::Created(Ok(created)))) => {
                if self.machine.agent_created(now, agent) {
                    self.current = Some((agent, created));
                } else {
                    let limit = self.options.agent_timeout;
                    self.spawn(Kind::Discard, agent, async move {
                        close_agent(agent, created, limit).await;
                        Done::Discarded
                    });
                }
            }
            (_, Ok(Done::Created(Err(e)))) => {
                tracing::warn!(agent, "{e}");
                self.machine.agent_create_failed(now, agent);
            }
            (Kind::Create, Err(e)) => {
                tracing::error!(agent, "agent creation task failed: {e}");
                self.machine.agent_create_failed(now, agent);
            }
            (_, Ok(Done::Connected(Ok(conn)))) => {
                if agent != self.machine.agent() || self.current.is_none() {
                    return;
                }
                let role = self.machine.role();
                let connection = Connection {
                    agent,
                    role,
                    local_ufrag: self.machine.local_credentials().ufrag.clone(),
                    remote_ufrag: self
                        .machine
                        .remote_credentials()
                        .map(|c| c.ufrag.clone())
                        .unwrap_or_default(),
                    conn,
                };
                tracing::info!(agent, ?role, "connection established");
                let _ = self.events.send(Event::Connected(connection.clone()));
                self.connection_tx.send_replace(Some(connection));
            }
            (_, Ok(Done::Connected(Err(e)))) => {
                if agent == self.machine.agent() {
                    tracing::warn!(agent, "{e}");
                    self.machine.agent_failed(now, agent);
                }
            }
            (Kind::Connect, Err(e)) => {
                if !e.is_cancelled() {
                    tracing::error!(agent, "dial/accept task failed: {e}");
                    self.machine.agent_failed(now, agent);
                }
            }
            (_, Ok(Done::Closed)) | (Kind::Close, Err(_)) => {
                self.machine.agent_closed(now, agent);
            }
            (_, Ok(Done::Discarded)) | (Kind::Discard, Err(_)) => {}
        }
    }

    /// After the machine finished: stop publishing, unsubscribe.
    async fn stop(mut self) {
        // Tasks still running (a discarded agent's close) get the agent time
        // limit, then are aborted.
        let tasks = &mut self.tasks;
        let _ = tokio::time::timeout(self.options.agent_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.shutdown().await;
        self.publish_tx = None;
        if let Some(publisher) = self.publisher.take() {
            // Let queued messages go out, within a limit (after it, dropping
            // the handle aborts the publisher).
            let _ = tokio::time::timeout(self.options.publish_timeout, publisher).await;
        }
        match tokio::time::timeout(
            self.options.unsubscribe_timeout,
            self.backend.unsubscribe(
                &self.pair.ours,
                Sender::Key(self.pair.theirs),
                &self.handler,
            ),
        )
        .await
        {
            Ok(Ok(_)) | Ok(Err(BackendError::Closed)) => {}
            Ok(Err(e)) => tracing::warn!("unsubscribing the session: {e}"),
            Err(_) => tracing::warn!("unsubscribing the session timed out"),
        }
        let dropped = self.channel_handler.dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "messages from the peer were dropped (driver too slow)"
            );
        }
        tracing::debug!(stats = ?self.machine.stats(), "session stopped");
    }
}

async fn close_agent(agent: u64, current: Arc<dyn IceAgent>, limit: Duration) {
    match tokio::time::timeout(limit, current.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(agent, "{e}"),
        Err(_) => tracing::warn!(agent, "closing the ICE agent timed out after {limit:?}"),
    }
}

/// Publishes the driver's messages in order, each within `limit`; tells the
/// driver how many subscription streams credentials reached.
async fn publisher(
    backend: Arc<dyn Backend>,
    pair: KeyPair,
    mut messages: mpsc::Receiver<Message>,
    reached: mpsc::Sender<(String, Option<u32>)>,
    limit: Duration,
) {
    while let Some(message) = messages.recv().await {
        match tokio::time::timeout(limit, backend.publish(&pair, &message)).await {
            Ok(Ok(published)) => {
                if let Some(credentials) = &message.credentials {
                    // Dropped when the driver is behind: the next one counts.
                    let _ = reached.try_send((credentials.ufrag.clone(), published.recipients));
                }
            }
            Ok(Err(e)) => tracing::warn!("publishing to the peer: {e}"),
            Err(_) => tracing::warn!("publishing to the peer timed out after {limit:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use cunicu_signal::{PrivateKey, proto::signaling::BackendType};

    use super::*;
    use crate::agent::IceCredentials;

    /// Agents that take `create_delay` to make and never finish closing.
    struct Stuck {
        create_delay: Duration,
    }

    struct StuckAgent;

    #[async_trait]
    impl IceAgentFactory for Stuck {
        async fn create(&self, _params: AgentParams) -> Result<Arc<dyn IceAgent>, AgentError> {
            tokio::time::sleep(self.create_delay).await;
            Ok(Arc::new(StuckAgent))
        }
    }

    #[async_trait]
    impl IceAgent for StuckAgent {
        fn gather(&self) -> Result<(), AgentError> {
            Ok(())
        }
        fn add_remote_candidate(&self, _: &Candidate) -> Result<(), AgentError> {
            Ok(())
        }
        async fn connect(
            &self,
            _: Role,
            _: &IceCredentials,
        ) -> Result<Arc<dyn DatagramConn>, AgentError> {
            std::future::pending().await
        }
        async fn close(&self) -> Result<(), AgentError> {
            std::future::pending().await
        }
    }

    /// A backend whose unsubscribe never returns.
    struct StuckUnsubscribe(Arc<dyn Backend>);

    #[async_trait]
    impl Backend for StuckUnsubscribe {
        async fn publish(
            &self,
            pair: &KeyPair,
            message: &Message,
        ) -> Result<cunicu_signal::Published, BackendError> {
            self.0.publish(pair, message).await
        }
        async fn subscribe(
            &self,
            ours: &PrivateKey,
            from: Sender,
            handler: Arc<dyn Handler>,
        ) -> Result<bool, BackendError> {
            self.0.subscribe(ours, from, handler).await
        }
        async fn unsubscribe(
            &self,
            _: &PrivateKey,
            _: Sender,
            _: &Arc<dyn Handler>,
        ) -> Result<bool, BackendError> {
            std::future::pending().await
        }
        fn backend_type(&self) -> BackendType {
            self.0.backend_type()
        }
        async fn close(&self) -> Result<(), BackendError> {
            self.0.close().await
        }
    }

    async fn inprocess() -> Arc<dyn Backend> {
        Arc::new(
            cunicu_signal::backend::connect(&["inprocess:"])
                .await
                .expect("inprocess backend"),
        )
    }

    #[tokio::test]
    async fn close_waits_out_the_slowest_stop() {
        // Closed while the agent is being made: creation takes nearly its
        // limit, closing the agent and unsubscribing take all of theirs.
        let options = SessionOptions {
            agent_timeout: Duration::from_millis(300),
            publish_timeout: Duration::from_millis(50),
            unsubscribe_timeout: Duration::from_millis(300),
            ..SessionOptions::default()
        };
        let backend = Arc::new(StuckUnsubscribe(inprocess().await));
        let agents = Arc::new(Stuck {
            create_delay: Duration::from_millis(270),
        });
        let pair = KeyPair::new(PrivateKey::generate(), PrivateKey::generate().public_key());
        let session = Session::start(backend, pair, agents, options)
            .await
            .unwrap();
        let start = Instant::now();
        session.close().await.expect("the driver stops in time");
        // 270 ms creation + 300 ms close + 300 ms unsubscribe: more than
        // agent + publish + unsubscribe timeouts (650 ms).
        assert!(
            start.elapsed() >= Duration::from_millis(850),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_driver_that_does_not_stop_in_time_is_aborted() {
        let options = SessionOptions {
            agent_timeout: Duration::from_secs(120),
            ..SessionOptions::default()
        };
        let agents = Arc::new(Stuck {
            create_delay: Duration::ZERO,
        });
        let pair = KeyPair::new(PrivateKey::generate(), PrivateKey::generate().public_key());
        let mut session = Session::start(inprocess().await, pair, agents, options)
            .await
            .unwrap();
        let mut states = session.states();
        states.wait_for(|s| *s == State::Idle).await.unwrap();
        // Closing the agent takes 2 minutes: more than this limit.
        session.stop_limit = Duration::from_millis(100);
        let err = session.close().await.expect_err("closing the agent hangs");
        assert!(matches!(err, SessionError::CloseTimeout(_)), "{err}");
        // The driver is gone (it held the state's sender), not left running.
        tokio::time::timeout(Duration::from_secs(5), async {
            while states.changed().await.is_ok() {}
        })
        .await
        .expect("the driver was aborted");
    }
}
