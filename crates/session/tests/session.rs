//! Sessions on real sockets: webrtc-ice agents whose candidates are limited to
//! 127.0.0.1 (no connectivity check ever leaves loopback), signaling through
//! the gRPC server in this process (port 0) or `inprocess:`.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use cunicu_signal::{
    Backend, Key, KeyPair, PrivateKey, Role,
    backend::connect,
    proto::epdisc::{Candidate, CandidateType},
};
use cunicu_signal_server::{Config, Relay, Server};
use cunicu_signal_session::{
    AgentError, AgentEvents, AgentParams, BackoffOptions, Connection, DatagramConn, Event,
    IceAgent, IceAgentFactory, IceCredentials, IceOptions, ServerRelayIce, Session, SessionError,
    SessionOptions, State, WebrtcIce, relays_from_server,
};
use parking_lot::Mutex;
use tokio::{sync::broadcast, time::timeout};

/// Limit of one step (connect, receive, close).
const STEP: Duration = Duration::from_secs(30);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

fn options() -> SessionOptions {
    SessionOptions::default()
        .with_backoff(
            BackoffOptions::default()
                .with_initial(Duration::from_millis(50))
                .with_max(Duration::from_secs(1)),
        )
        .with_disconnect_grace(Duration::from_secs(1))
}

/// Who dialed (controlling) and who accepted, by public key.
type ConnectLog = Arc<Mutex<Vec<(Key, Role)>>>;

/// webrtc-ice agents on 127.0.0.1 only, recording each dial and accept.
struct Recording {
    ice: WebrtcIce,
    side: Key,
    log: ConnectLog,
}

struct RecordingAgent {
    inner: Arc<dyn IceAgent>,
    side: Key,
    log: ConnectLog,
}

#[async_trait]
impl IceAgentFactory for Recording {
    async fn create(&self, params: AgentParams) -> Result<Arc<dyn IceAgent>, AgentError> {
        Ok(Arc::new(RecordingAgent {
            inner: self.ice.create(params).await?,
            side: self.side,
            log: self.log.clone(),
        }))
    }
}

#[async_trait]
impl IceAgent for RecordingAgent {
    fn gather(&self) -> Result<(), AgentError> {
        self.inner.gather()
    }
    fn add_remote_candidate(&self, candidate: &Candidate) -> Result<(), AgentError> {
        self.inner.add_remote_candidate(candidate)
    }
    async fn connect(
        &self,
        role: Role,
        remote: &IceCredentials,
    ) -> Result<Arc<dyn DatagramConn>, AgentError> {
        self.log.lock().push((self.side, role));
        self.inner.connect(role, remote).await
    }
    async fn close(&self) -> Result<(), AgentError> {
        self.inner.close().await
    }
}

fn loopback_ice() -> WebrtcIce {
    WebrtcIce::new(
        IceOptions::default()
            .only_addresses([LOOPBACK])
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(5)),
    )
    .expect("options are valid")
}

/// One peer: its key, backend and session, with the events since its start.
struct Peer {
    key: PrivateKey,
    backend: Arc<dyn Backend>,
    session: Session,
    events: broadcast::Receiver<Event>,
}

async fn peer(url: &str, key: &PrivateKey, theirs: Key, log: &ConnectLog) -> Result<Peer> {
    let backend: Arc<dyn Backend> = Arc::new(timeout(STEP, connect(&[url])).await??);
    let agents = Arc::new(Recording {
        ice: loopback_ice(),
        side: key.public_key(),
        log: log.clone(),
    });
    let mut session = timeout(
        STEP,
        Session::start(
            backend.clone(),
            KeyPair::new(key.clone(), theirs),
            agents,
            options(),
        ),
    )
    .await??;
    let events = session.events();
    Ok(Peer {
        key: key.clone(),
        backend,
        session,
        events,
    })
}

/// Waits for a connection of an agent after `after`.
async fn connection_after(session: &Session, after: u64) -> Result<Connection> {
    let mut connections = session.connections();
    let found = timeout(
        STEP,
        connections.wait_for(|c| c.as_ref().is_some_and(|c| c.agent() > after)),
    )
    .await
    .with_context(|| format!("no connection after agent {after} within {STEP:?}"))??;
    Ok(found.clone().expect("checked above"))
}

/// Sends three datagrams each way and checks that exactly those arrive.
async fn exchange(a: &Connection, b: &Connection, tag: &str) -> Result<()> {
    for (from, to, name) in [(a, b, "a->b"), (b, a, "b->a")] {
        let sent: Vec<String> = (0..3).map(|i| format!("{tag} {name} {i}")).collect();
        for datagram in &sent {
            let n = timeout(STEP, from.send(datagram.as_bytes())).await??;
            assert_eq!(n, datagram.len());
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        for _ in 0..3 {
            let n = timeout(STEP, to.recv(&mut buf))
                .await
                .with_context(|| format!("{name}: only {got:?} arrived"))??;
            got.push(String::from_utf8(buf[..n].to_vec())?);
        }
        got.sort();
        assert_eq!(got, sent, "{name}");
    }
    Ok(())
}

/// Takes the events seen so far (without waiting).
fn seen(events: &mut broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        match events.try_recv() {
            Ok(event) => out.push(event),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => {
                return out;
            }
            Err(e) => panic!("events lost: {e}"),
        }
    }
}

fn states_of(events: &[Event], agent: u64) -> Vec<State> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::State {
                agent: a, state, ..
            } if *a == agent => Some(*state),
            _ => None,
        })
        .collect()
}

fn is_loopback_host(c: &Candidate) -> bool {
    c.r#type == CandidateType::Host as i32 && c.address == "127.0.0.1"
}

/// The peer's end of a selected pair: its host candidate, or the same
/// address learned as peer-reflexive when its check arrived before its
/// candidate did.
fn is_loopback_peer(c: &Candidate) -> bool {
    (c.r#type == CandidateType::Host as i32 || c.r#type == CandidateType::PeerReflexive as i32)
        && c.address == "127.0.0.1"
}

/// Waits for the next event that enters `want`; returns its agent and when
/// the state was entered (stamped by the session, not on receipt here).
async fn next_state(events: &mut broadcast::Receiver<Event>, want: State) -> (u64, Instant) {
    loop {
        match timeout(STEP, events.recv()).await {
            Ok(Ok(Event::State { agent, state, at })) if state == want => {
                return (agent, at);
            }
            Ok(Ok(_)) => {}
            other => panic!("no {want} state: {other:?}"),
        }
    }
}

/// Two peers connect over `url`, and the right one dials.
async fn two_peers_connect(url: &str) -> Result<()> {
    init_logs();
    let log = ConnectLog::default();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = peer(url, &ka, kb.public_key(), &log).await?;
    let mut b = peer(url, &kb, ka.public_key(), &log).await?;
    let (ca, cb) = (
        connection_after(&a.session, 0).await?,
        connection_after(&b.session, 0).await?,
    );

    // The smaller public key controls and dialed; the other accepted.
    let (small, large) = if ka.public_key() < kb.public_key() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(small.session.role(), Role::Controlling);
    assert_eq!(large.session.role(), Role::Controlled);
    let mut calls = log.lock().clone();
    calls.sort_by_key(|(_, role)| *role == Role::Controlled);
    assert_eq!(
        calls,
        [
            (small.key.public_key(), Role::Controlling),
            (large.key.public_key(), Role::Controlled)
        ],
        "one dial by the smaller key, one accept by the larger"
    );
    assert_eq!(ca.role(), a.session.role());
    assert_eq!(cb.role(), b.session.role());
    // Each side uses the other's credentials.
    assert_eq!(ca.remote_ufrag(), cb.local_ufrag());
    assert_eq!(cb.remote_ufrag(), ca.local_ufrag());
    assert_eq!(ca.local_ufrag().len(), 16);

    exchange(&ca, &cb, "first").await?;
    // The agents report Connected on their own path, maybe after dial/accept returned.
    for p in [&a, &b] {
        let mut states = p.session.states();
        timeout(STEP, states.wait_for(|s| s.is_connected()))
            .await
            .context("state Connected")??;
    }

    for p in [&mut a, &mut b] {
        let mut events = seen(&mut p.events);
        // The selected pair is reported on its own path: maybe not yet.
        while !events
            .iter()
            .any(|e| matches!(e, Event::SelectedPair { .. }))
        {
            match timeout(STEP, p.events.recv()).await {
                Ok(Ok(event)) => events.push(event),
                other => bail!("no selected pair reported: {other:?}"),
            }
        }
        // docs/PROTOCOL.md §8's moments, in order, for the one agent there was.
        let states = states_of(&events, 1);
        assert_eq!(
            states.get(..6).unwrap_or(&states),
            [
                State::Creating,
                State::Idle,
                State::Gathering,
                State::Connecting,
                State::Checking,
                State::Connected
            ],
            "{states:?}"
        );
        assert!(
            states[6..].iter().all(|s| *s == State::Completed),
            "{states:?}"
        );
        assert_eq!(p.session.stats().restarts, 0);
        // The selected pair is on loopback, both ends.
        let pairs: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::SelectedPair { local, remote, .. } => Some((local, remote)),
                _ => None,
            })
            .collect();
        assert!(!pairs.is_empty(), "no selected pair reported");
        for (local, remote) in pairs {
            assert!(
                is_loopback_host(local) && is_loopback_peer(remote),
                "{local:?} <-> {remote:?}"
            );
        }
        let connected: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, Event::Connected(_)))
            .collect();
        assert_eq!(connected.len(), 1);
    }
    // The counters agree with one agent each and candidates both ways.
    for p in [&a, &b] {
        let stats = p.session.stats();
        assert_eq!(stats.agents, 1);
        assert!(stats.candidates_sent >= 1 && stats.candidates_added >= 1);
        assert_eq!(stats.invalid_candidates, 0);
    }

    for p in [a, b] {
        let mut states = p.session.states();
        let mut events = p.events;
        timeout(STEP, p.session.close()).await??;
        assert_eq!(*states.borrow_and_update(), State::Closed);
        let tail = states_of(&seen(&mut events), 1);
        assert_eq!(tail, [State::Closing, State::Closed]);
        p.backend.close().await?;
    }
    // The connections are gone with their agents.
    let mut buf = [0u8; 16];
    for c in [&ca, &cb] {
        assert!(timeout(STEP, c.recv(&mut buf)).await?.is_err());
    }
    Ok(())
}

async fn server() -> Server {
    let mut config = Config::default();
    config.listen = (Ipv4Addr::LOCALHOST, 0).into();
    config.relays = vec![
        "stun:127.0.0.1:3478".parse::<Relay>().unwrap(),
        "turn:user:pass@127.0.0.1:3478?transport=udp"
            .parse::<Relay>()
            .unwrap(),
    ];
    Server::spawn(config).await.expect("server starts")
}

fn grpc_url(server: &Server) -> String {
    format!(
        "grpc://127.0.0.1:{}?insecure=true",
        server.local_addr().port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_through_the_grpc_server() -> Result<()> {
    let server = server().await;
    two_peers_connect(&grpc_url(&server)).await?;
    // The sessions unsubscribed: the server holds no stream.
    timeout(STEP, async {
        while server.metrics().subscriptions.get() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("subscriptions left on the server")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_in_process() -> Result<()> {
    two_peers_connect("inprocess:").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_and_started_again_comes_back_with_new_credentials() -> Result<()> {
    init_logs();
    let server = server().await;
    let url = grpc_url(&server);
    let log = ConnectLog::default();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = peer(&url, &ka, kb.public_key(), &log).await?;
    let b = peer(&url, &kb, ka.public_key(), &log).await?;
    let a1 = connection_after(&a.session, 0).await?;
    let b1 = connection_after(&b.session, 0).await?;
    exchange(&a1, &b1, "before").await?;

    // Kill b: its backend goes away at once, then its session and agent.
    b.backend.close().await?;
    drop(b);

    // b again, with the same key and fresh everything.
    let b = peer(&url, &kb, ka.public_key(), &log).await?;
    let a2 = connection_after(&a.session, a1.agent()).await?;
    let b2 = connection_after(&b.session, 0).await?;
    assert_ne!(
        a2.remote_ufrag(),
        a1.remote_ufrag(),
        "b has new credentials"
    );
    assert_ne!(a2.local_ufrag(), a1.local_ufrag(), "a restarted too");
    assert_eq!(a2.remote_ufrag(), b2.local_ufrag());
    assert_eq!(b2.remote_ufrag(), a2.local_ufrag());
    exchange(&a2, &b2, "after").await?;

    // a went through Closing and Closed to a new agent that connected (the
    // agent may report Connected after dial/accept returned).
    let mut states = a.session.states();
    timeout(STEP, states.wait_for(|s| s.is_connected())).await??;
    let events = seen(&mut a.events);
    let first = states_of(&events, 1);
    assert!(
        first.ends_with(&[State::Closing, State::Closed]),
        "{first:?}"
    );
    let last = states_of(&events, a2.agent());
    assert_eq!(&last[..2], [State::Creating, State::Idle], "{last:?}");
    assert!(last.contains(&State::Connected), "{last:?}");
    assert!(a.session.stats().restarts >= 1);
    // The old connection is closed with its agent.
    let mut buf = [0u8; 64];
    assert!(timeout(STEP, a1.recv(&mut buf)).await?.is_err());

    timeout(STEP, a.session.close()).await??;
    timeout(STEP, b.session.close()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_means_a_restart_after_the_grace_period() -> Result<()> {
    init_logs();
    let log = ConnectLog::default();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = peer("inprocess:", &ka, kb.public_key(), &log).await?;
    let b = peer("inprocess:", &kb, ka.public_key(), &log).await?;
    connection_after(&a.session, 0).await?;
    connection_after(&b.session, 0).await?;
    seen(&mut a.events);

    // b goes away without a word; a's agent notices (2 s without answers),
    // waits out the grace period (1 s), and starts again.
    b.backend.close().await?;
    drop(b);
    let (agent, disconnected) = next_state(&mut a.events, State::Disconnected).await;
    assert_eq!(agent, 1);
    let (agent, closing) = next_state(&mut a.events, State::Closing).await;
    assert_eq!(agent, 1);
    // Both instants are stamped by the session: when the agent's report came
    // (which set the deadline) and when its timer fired (not before the
    // deadline). A late reader here changes neither; a busy machine can only
    // make the gap longer.
    let waited = closing - disconnected;
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "restarted {waited:?} after the disconnect, with a grace period of 1 s"
    );
    let (agent, _) = next_state(&mut a.events, State::Idle).await;
    assert_eq!(agent, 2);
    // The new agent asks for the peer's credentials again, and again.
    let sent = a.session.stats().credentials_sent;
    timeout(STEP, async {
        while a.session.stats().credentials_sent < sent + 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("credentials are not repeated")?;
    assert_eq!(a.session.stats().restarts, 1);
    timeout(STEP, a.session.close()).await??;
    Ok(())
}

#[tokio::test]
async fn relays_come_from_the_server() -> Result<()> {
    let server = server().await;
    let key = PrivateKey::generate();
    let relays = relays_from_server(&grpc_url(&server), &key, STEP).await?;
    assert_eq!(relays.len(), 2, "{relays:?}");
    assert_eq!(relays[0].url, "stun:127.0.0.1:3478");
    assert_eq!(
        (relays[0].username.as_str(), relays[0].password.as_str()),
        ("", "")
    );
    assert_eq!(relays[1].url, "turn:127.0.0.1:3478?transport=udp");
    assert_eq!(
        (relays[1].username.as_str(), relays[1].password.as_str()),
        ("user", "pass")
    );
    // The agent takes them.
    WebrtcIce::new(IceOptions::default().with_servers(relays))?;

    // No server there: an error that names it, within the limit.
    let err = relays_from_server("grpc://127.0.0.1:1?insecure=true", &key, STEP)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.to_string().contains("grpc://127.0.0.1:1"), "{err}");
    let err = relays_from_server("nats://x:1", &key, STEP)
        .await
        .expect_err("not grpc");
    assert!(err.to_string().contains("nats://x:1"), "{err}");
    Ok(())
}

#[tokio::test]
async fn expiring_relay_credentials_are_fetched_again_for_a_new_agent() -> Result<()> {
    init_logs();
    // TURN REST API credentials that expire within the refresh margin: every
    // new agent fetches them again. Nothing listens at port 9, and nothing
    // is sent there: agents are made and closed without gathering.
    let mut config = Config::default();
    config.listen = (Ipv4Addr::LOCALHOST, 0).into();
    config.relays = vec![
        "stun:127.0.0.1:9".parse::<Relay>().unwrap(),
        "turn:127.0.0.1:9?transport=udp&secret=s3cret&ttl=30s"
            .parse::<Relay>()
            .unwrap(),
    ];
    let server = Server::spawn(config).await?;
    let url = grpc_url(&server);
    let key = PrivateKey::generate();
    let options = IceOptions::default().only_addresses([LOOPBACK]);
    let ice = ServerRelayIce::fetch(options, [url.clone()], key.clone(), STEP).await?;
    assert_eq!(ice.fetches().await, 1);
    let relays = ice.relays().await;
    assert_eq!(relays.len(), 1);
    assert_eq!(relays[0].0, url);
    let first = relays[0].1.clone();
    assert_eq!(first.servers.len(), 2);
    assert!(
        first.servers[1]
            .username
            .ends_with(&key.public_key().to_string()),
        "{first:?}"
    );
    let expires = first.expires.expect("secret credentials expire");
    assert!(expires <= SystemTime::now() + Duration::from_secs(31));

    let (events, _rx) = tokio::sync::mpsc::channel(16);
    let params = |agent| {
        AgentParams::new(
            IceCredentials::generate(&mut rand::rng()),
            Role::Controlling,
            AgentEvents::new(agent, events.clone()),
        )
    };
    let agent = ice.create(params(1)).await?;
    agent.close().await?;
    assert_eq!(ice.fetches().await, 2, "fetched again for the new agent");

    // The server is gone: the next agent gets the relays fetched before.
    server.shutdown(Duration::from_secs(1)).await?;
    let before = ice.relays().await;
    let start = Instant::now();
    let agent = ice.create(params(2)).await?;
    agent.close().await?;
    assert!(start.elapsed() < STEP);
    assert_eq!(ice.fetches().await, 2);
    assert_eq!(ice.relays().await, before);
    Ok(())
}

#[tokio::test]
async fn relays_without_expiry_are_fetched_once() -> Result<()> {
    let server = server().await;
    let key = PrivateKey::generate();
    let options = IceOptions::default().only_addresses([LOOPBACK]);
    let ice = ServerRelayIce::fetch(options, [grpc_url(&server)], key, STEP).await?;
    let (events, _rx) = tokio::sync::mpsc::channel(16);
    for agent in 1..=2 {
        let params = AgentParams::new(
            IceCredentials::generate(&mut rand::rng()),
            Role::Controlled,
            AgentEvents::new(agent, events.clone()),
        );
        ice.create(params).await?.close().await?;
    }
    assert_eq!(ice.fetches().await, 1);
    assert_eq!(ice.relays().await[0].1.expires, None);
    Ok(())
}

#[tokio::test]
async fn bad_peer_keys_are_refused() -> Result<()> {
    let backend: Arc<dyn Backend> = Arc::new(connect(&["inprocess:"]).await?);
    let key = PrivateKey::generate();
    let agents = Arc::new(loopback_ice());
    let same = Session::start(
        backend.clone(),
        KeyPair::new(key.clone(), key.public_key()),
        agents.clone(),
        options(),
    )
    .await;
    assert!(matches!(same, Err(SessionError::SameKey(_))), "{same:?}");
    let zero = Session::start(
        backend.clone(),
        KeyPair::new(key, Key::from([0; 32])),
        agents,
        options(),
    )
    .await;
    let Err(SessionError::InvalidPeer(k)) = zero else {
        bail!("the zero key was taken: {zero:?}");
    };
    assert_eq!(k, Key::from([0; 32]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_away_is_asked_less_often_and_connects_at_once_when_it_comes() -> Result<()>
{
    init_logs();
    let server = server().await;
    let url = grpc_url(&server);
    let log = ConnectLog::default();
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let a = peer(&url, &ka, kb.public_key(), &log).await?;
    // B is away: the server counts no subscriber of its key, so A's
    // credentials reach nobody.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stats = a.session.stats();
    assert!(stats.peer_absent >= 1, "{stats:?}");
    // At the usual pace of these options (50 ms, growing to at most 1 s)
    // that would be 8 or more in 6 s; while B is away, 1 s, 2 s, 4 s apart.
    assert!(stats.credentials_sent <= 4, "{stats:?}");
    assert_eq!(a.session.state(), State::Idle);

    let came = Instant::now();
    let b = peer(&url, &kb, ka.public_key(), &log).await?;
    let (ca, cb) = (
        connection_after(&a.session, 0).await?,
        connection_after(&b.session, 0).await?,
    );
    // Not at A's next repeat (up to 8 s away): at once.
    assert!(
        came.elapsed() < Duration::from_secs(4),
        "connected {:?} after B came",
        came.elapsed()
    );
    exchange(&ca, &cb, "back").await?;
    for p in [a, b] {
        timeout(STEP, p.session.close()).await??;
        p.backend.close().await?;
    }
    Ok(())
}
