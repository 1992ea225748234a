//! `cunicu-signal connect`: an ICE session with one peer over signaling
//! (docs/PROTOCOL.md §8), as a datagram netcat: each stdin line goes
//! to the peer as one UDP datagram, each datagram from the peer goes to
//! stdout as it is. Datagrams are not a stream: like UDP, one may be lost, and
//! a line longer than one datagram ([`MAX_DATAGRAM`]) ends `connect` with an
//! error instead of going out in pieces. State changes (with the time and
//! what the session waits for) and the selected candidate pair are printed on
//! stderr.
//!
//! stdin is read on a thread of its own (a blocking read cannot be
//! cancelled; on the runtime it would hold the exit) into a bounded channel,
//! which is read whether or not a connection exists: stdin closing (or
//! SIGINT/SIGTERM) ends `connect` with exit status 0 at any time. Lines read
//! while no connection exists are kept, at most [`PENDING_LINES`] (the oldest
//! are dropped beyond that, with a warning), and sent once one is
//! established; those still kept when stdin closes are not sent (a warning
//! says how many).

use std::{
    collections::VecDeque,
    io::{self, BufRead},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use cunicu_signal::{Backend, Key, KeyPair, Role, ice_url::IceUrl};
use cunicu_signal_session::{
    Connection, Event, IceAgentFactory, IceOptions, IceServer, ServerRelayIce, Session,
    SessionOptions, State, WebrtcIce, candidate,
};
use tokio::{
    io::AsyncWriteExt,
    sync::{broadcast, mpsc},
};

use tokio_util::task::AbortOnDropHandle;

use crate::{PeerArgs, Signals, public_key_arg, read_key_file};

/// The longest line sent (its newline included), as one datagram: webrtc-ice
/// reads datagrams into 8 KiB buffers. A longer line is refused.
pub const MAX_DATAGRAM: usize = 8000;

/// How long to wait for a signaling server's RelayRegistry at the start.
const RELAYS_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines kept while no connection exists; beyond that the oldest are dropped.
const PENDING_LINES: usize = 64;

/// Lines on their way from the stdin thread (it waits when this is full).
const STDIN_QUEUE: usize = 64;

/// How long closing the session may take once stdin closed or a signal came.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// How long the last session events may take to print once it closed.
const PRINT_LIMIT: Duration = Duration::from_secs(1);

/// Options of `connect`.
#[derive(Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    signaling: PeerArgs,
    /// The peer's base64 public key.
    #[arg(long)]
    peer: String,
    /// A STUN or TURN server (repeatable): stun:HOST:PORT or
    /// turn:USER:PASS@HOST:PORT?transport=udp. None by default.
    #[arg(long = "stun", value_name = "URL")]
    servers: Vec<String>,
    /// Also use the STUN/TURN relays that the grpc:// signaling servers hand
    /// out (fetched again for a new ICE agent when their credentials expire
    /// within a minute).
    #[arg(long)]
    relays_from_server: bool,
    /// Gather candidates only on this network interface (repeatable).
    #[arg(long = "interface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Gather candidates only on this local IP address (repeatable).
    #[arg(long = "address", value_name = "IP")]
    addresses: Vec<IpAddr>,
    /// How long a disconnect may last before the session restarts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    disconnect_grace: Duration,
    /// Give up (exit status 1) when no connection exists for this long: at the
    /// start, or after a connection was lost. Waits forever by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

/// The network interfaces of this host, by name (Linux: /sys/class/net).
fn interfaces_here() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Refuses --interface names this host does not have and --address IPs it
/// cannot bind: gathering would find nothing and wait forever.
fn check_limits(interfaces: &[String], addresses: &[IpAddr]) -> Result<()> {
    if !interfaces.is_empty() {
        let here = interfaces_here();
        // Without /sys/class/net there is nothing to compare with.
        if !here.is_empty() {
            for name in interfaces {
                if !here.contains(name) {
                    bail!(
                        "--interface {name}: no such interface here (interfaces: {})",
                        here.join(", ")
                    );
                }
            }
        }
    }
    for ip in addresses {
        // Binding a UDP socket sends nothing; it fails for an address this
        // host does not have.
        if let Err(e) = std::net::UdpSocket::bind((*ip, 0)) {
            bail!("--address {ip}: not an address of this host ({e})");
        }
    }
    Ok(())
}

/// What gathering was limited to, for the "no candidate" error.
fn limits_text(interfaces: &[String], addresses: &[IpAddr]) -> String {
    let mut parts = Vec::new();
    if !interfaces.is_empty() {
        parts.push(format!("--interface {}", interfaces.join(", ")));
    }
    if !addresses.is_empty() {
        let ips: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
        parts.push(format!("--address {}", ips.join(", ")));
    }
    if parts.is_empty() {
        "every interface but loopback".to_string()
    } else {
        parts.join(" and ")
    }
}

/// `turn:USER:PASS@HOST:PORT?transport=udp` → URL without credentials, user,
/// password. The rules of `serve --relay` (`IceUrl::parse_plain`), without
/// its `secret=` and `ttl=`.
fn ice_server(text: &str) -> Result<IceServer> {
    let url = IceUrl::parse_plain(text).context("--stun")?;
    Ok(match &url.credentials {
        Some(user) => IceServer::with_credentials(url.to_string(), &user.username, &user.password),
        None => IceServer::new(url.to_string()),
    })
}

/// What happened before the session could start.
enum Start {
    Started(Arc<dyn Backend>, Box<Session>),
    /// stdin closed or a signal came: stop without a session.
    Stop,
}

/// Runs `connect` until stdin closes (or SIGINT/SIGTERM).
pub async fn run(args: ConnectArgs) -> Result<()> {
    let mut signals = Signals::install()?;
    let theirs = public_key_arg("peer", &args.peer)?;
    let ours = read_key_file(&args.signaling.key_file)?;
    let servers = args
        .servers
        .iter()
        .map(|s| ice_server(s))
        .collect::<Result<Vec<_>>>()?;
    let grpc: Vec<String> = args
        .signaling
        .backends
        .iter()
        .filter(|url| url.starts_with("grpc://"))
        .cloned()
        .collect();
    if args.relays_from_server && grpc.is_empty() {
        bail!("--relays-from-server needs a grpc:// backend");
    }
    check_limits(&args.interfaces, &args.addresses)?;
    let limits = limits_text(&args.interfaces, &args.addresses);
    let options = IceOptions::default()
        .with_servers(servers)
        .only_interfaces(args.interfaces.iter().cloned())
        .only_addresses(args.addresses.iter().copied());
    // Without relays from a server, bad --stun URLs fail here, before anything
    // is contacted.
    let ice = if args.relays_from_server {
        None
    } else {
        Some(WebrtcIce::new(options.clone())?)
    };
    let mut input = Input::spawn()?;

    let start = async {
        let ice: Arc<dyn IceAgentFactory> = match ice {
            Some(ice) => Arc::new(ice),
            None => {
                let ice =
                    ServerRelayIce::fetch(options, grpc, ours.clone(), RELAYS_TIMEOUT).await?;
                for (url, relays) in ice.relays().await {
                    eprintln!(
                        "cunicu-signal: {} relay(s) from {url}",
                        relays.servers.len()
                    );
                }
                Arc::new(ice)
            }
        };
        let backend: Arc<dyn Backend> =
            Arc::new(cunicu_signal::backend::connect(&args.signaling.backends).await?);
        let options = SessionOptions::default().with_disconnect_grace(args.disconnect_grace);
        match Session::start(backend.clone(), KeyPair::new(ours, theirs), ice, options).await {
            Ok(session) => anyhow::Ok((backend, session)),
            Err(e) => {
                let _ = backend.close().await;
                Err(e.into())
            }
        }
    };
    tokio::pin!(start);
    let give_up = async {
        match args.timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(give_up);
    let start = loop {
        tokio::select! {
            () = &mut give_up => {
                input.finish();
                bail!(
                    "no connection within --timeout {}: the session did not start",
                    humantime::format_duration(args.timeout.unwrap_or_default())
                );
            }
            started = &mut start => {
                let (backend, session) = started?;
                break Start::Started(backend, Box::new(session));
            }
            name = signals.recv() => {
                eprintln!("cunicu-signal: {name}: stopping");
                break Start::Stop;
            }
            more = input.read() => if !more? {
                break Start::Stop;
            },
        }
    };
    let Start::Started(backend, session) = start else {
        input.finish();
        return Ok(());
    };
    let mut session = *session;
    eprintln!(
        "cunicu-signal: session as {} with {theirs}: {}",
        session.public_key(),
        match session.role() {
            Role::Controlling => "controlling (dials)",
            Role::Controlled => "controlled (accepts)",
        }
    );
    let (fatal_tx, mut fatal) = mpsc::channel(1);
    let printer = print_events(session.events(), fatal_tx, limits, session.public_key());
    let mut printer = AbortOnDropHandle::new(tokio::spawn(printer));
    let result = tokio::select! {
        result = pump(&session, &mut input) => result,
        name = signals.recv() => {
            eprintln!("cunicu-signal: {name}: stopping");
            Ok(())
        }
        Some(why) = fatal.recv() => Err(anyhow::anyhow!(why)),
        () = not_connected_for(session.connections(), args.timeout) => Err(anyhow::anyhow!(
            "no connection for --timeout {}",
            humantime::format_duration(args.timeout.unwrap_or_default())
        )),
    };
    input.finish();
    // Closing is quick (the agent, the subscription); should it hang, a
    // second signal or CLOSE_LIMIT ends the wait.
    let (closed, driver_ended) = tokio::select! {
        closed = tokio::time::timeout(CLOSE_LIMIT, session.close()) => match closed {
            Ok(closed) => (closed.context("closing the session"), true),
            Err(_) => {
                eprintln!("cunicu-signal: the session did not close within {CLOSE_LIMIT:?}");
                (Ok(()), false)
            }
        },
        name = signals.recv() => {
            eprintln!("cunicu-signal: {name}: exiting without closing the session");
            (Ok(()), false)
        }
    };
    if driver_ended {
        // The session and its driver are gone, so the events channel is
        // closed: the printer shows what is left in it (the last states,
        // down to Closed) and ends. Not waiting here lost those lines.
        let _ = tokio::time::timeout(PRINT_LIMIT, &mut printer).await;
    }
    drop(printer);
    let _ = tokio::time::timeout(CLOSE_LIMIT, backend.close()).await;
    result?;
    closed
}

/// stdin, read on a thread of its own: datagrams (lines of at most
/// [`MAX_DATAGRAM`] bytes) in a bounded channel, then those kept while no
/// connection exists.
struct Input {
    /// Closed at the end of stdin (after an error, if one came).
    lines: mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Read while no connection existed, oldest first.
    pending: VecDeque<Vec<u8>>,
    /// Lines dropped from `pending` so far.
    dropped: u64,
}

impl Input {
    /// Starts the thread that reads stdin. It ends at the end of stdin, on a
    /// read error, or when the receiver is gone (at its next line); the
    /// process does not wait for it.
    fn spawn() -> Result<Input> {
        let (tx, lines) = mpsc::channel(STDIN_QUEUE);
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || read_lines(&mut io::stdin().lock(), &tx))
            .context("starting the stdin thread")?;
        Ok(Input {
            lines,
            pending: VecDeque::new(),
            dropped: 0,
        })
    }

    /// Waits for the next line and keeps it for a connection to come. False
    /// at the end of stdin. Cancel safe.
    async fn read(&mut self) -> Result<bool> {
        match self.lines.recv().await {
            None => Ok(false),
            Some(Err(e)) => Err(e).context("reading stdin"),
            Some(Ok(line)) => {
                self.keep(line);
                Ok(true)
            }
        }
    }

    /// Keeps `line` until a connection exists, dropping the oldest beyond
    /// [`PENDING_LINES`].
    fn keep(&mut self, line: Vec<u8>) {
        if self.pending.len() == PENDING_LINES {
            self.pending.pop_front();
            self.dropped += 1;
            // The first, then every PENDING_LINES-th: not a line per line.
            if self.dropped % PENDING_LINES as u64 == 1 {
                eprintln!(
                    "cunicu-signal: not connected: oldest stdin line dropped \
                     ({} so far; the last {PENDING_LINES} are kept)",
                    self.dropped
                );
            }
        }
        self.pending.push_back(line);
    }

    /// Says what was never sent.
    fn finish(&mut self) {
        if !self.pending.is_empty() {
            eprintln!(
                "cunicu-signal: {} stdin line(s) read while not connected were not sent",
                self.pending.len()
            );
        }
    }
}

/// The stdin thread: each datagram of `input` into `tx`; a read error too,
/// then stops. Dropping `tx` at the end tells the end of input.
fn read_lines(input: &mut impl BufRead, tx: &mpsc::Sender<io::Result<Vec<u8>>>) {
    let mut line = Vec::new();
    loop {
        match next_datagram(input, &mut line) {
            Ok(false) => return,
            Ok(true) => {
                if tx.blocking_send(Ok(std::mem::take(&mut line))).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// Stdin lines to the current connection, its datagrams to stdout. Returns
/// at the end of stdin.
async fn pump(session: &Session, input: &mut Input) -> Result<()> {
    let mut connections = session.connections();
    let mut current: Option<Connection> = None;
    let mut receiver: Option<AbortOnDropHandle<()>> = None;
    loop {
        let next = connections.borrow_and_update().clone();
        if next.as_ref().map(Connection::agent) != current.as_ref().map(Connection::agent) {
            // The old connection's reader stops before the new one writes.
            receiver = None;
            if let Some(c) = &next {
                receiver = Some(AbortOnDropHandle::new(tokio::spawn(receive(c.clone()))));
            }
            current = next;
        }
        // What was kept (or just read) goes out while a connection exists.
        if let Some(c) = &current {
            while let Some(line) = input.pending.pop_front() {
                if let Err(e) = c.send(&line).await {
                    eprintln!(
                        "cunicu-signal: datagram of {} bytes not sent: {e}",
                        line.len()
                    );
                }
            }
        }
        tokio::select! {
            changed = connections.changed() => {
                if changed.is_err() {
                    bail!("the session stopped");
                }
            }
            more = input.read() => {
                if !more? {
                    drop(receiver);
                    return Ok(());
                }
            }
        }
    }
}

/// Reads the next line (with its newline) into `line`. False at the end of
/// input with nothing read. A line longer than [`MAX_DATAGRAM`] bytes is an
/// error (InvalidData), found without reading more of it than that.
fn next_datagram(input: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let room = MAX_DATAGRAM - line.len();
        match buf.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..=i]);
                input.consume(i + 1);
                return Ok(true);
            }
            None if buf.len() < room => {
                let n = buf.len();
                line.extend_from_slice(buf);
                input.consume(n);
            }
            None => {
                // Full: fine if the input ends right here, too long otherwise.
                line.extend_from_slice(&buf[..room]);
                input.consume(room);
                if input.fill_buf()?.is_empty() {
                    return Ok(true);
                }
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a stdin line is longer than one datagram ({MAX_DATAGRAM} bytes with its \
                         newline): connect sends each line as one datagram; nothing of it was sent"
                    ),
                ));
            }
        }
    }
}

/// Completes once no connection has existed for `limit` (never without one).
async fn not_connected_for(
    mut connections: tokio::sync::watch::Receiver<Option<Connection>>,
    limit: Option<Duration>,
) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        if connections.borrow_and_update().is_some() {
            if connections.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(limit) => return,
            changed = connections.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
        }
    }
}

/// Writes each datagram of `connection` to stdout as it is.
async fn receive(connection: Connection) {
    let mut buf = vec![0u8; 65536];
    let mut stdout = tokio::io::stdout();
    loop {
        match connection.recv(&mut buf).await {
            Ok(n) => {
                if stdout.write_all(&buf[..n]).await.is_err() || stdout.flush().await.is_err() {
                    return;
                }
            }
            // The agent was closed: a new connection follows.
            Err(_) => return,
        }
    }
}

/// What the session waits for in `state`, for the user.
fn waiting_for(state: State, ours: &Key) -> Option<String> {
    Some(match state {
        State::Creating => "making an ICE agent".into(),
        State::Idle => format!(
            "our credentials are sent; waiting for the peer's (it must run `connect --peer \
             {ours}` on the same signaling)"
        ),
        State::Gathering => "gathering local candidates; waiting for the peer's".into(),
        State::Connecting | State::Checking => "checking candidate pairs with the peer".into(),
        State::Disconnected => {
            "the peer stopped answering; waiting for it until --disconnect-grace ends".into()
        }
        State::Failed => "no candidate pair works; starting again".into(),
        _ => return None,
    })
}

/// A session moment as UTC wall-clock time, to the millisecond.
fn timestamp(at: std::time::Instant) -> String {
    let ago = std::time::Instant::now().saturating_duration_since(at);
    let when = std::time::SystemTime::now()
        .checked_sub(ago)
        .unwrap_or_else(std::time::SystemTime::now);
    humantime::format_rfc3339_millis(when).to_string()
}

/// Prints states (with their time and what they wait for), selected pairs and
/// connections on stderr. A session that can never connect (no candidate
/// gathered) is reported through `fatal`.
async fn print_events(
    mut events: broadcast::Receiver<Event>,
    fatal: mpsc::Sender<String>,
    limits: String,
    ours: Key,
) {
    loop {
        match events.recv().await {
            Ok(Event::State { agent, state, at }) => {
                let time = timestamp(at);
                match waiting_for(state, &ours) {
                    Some(what) => {
                        eprintln!("cunicu-signal: {time} state {state} (agent {agent}): {what}");
                    }
                    None => eprintln!("cunicu-signal: {time} state {state} (agent {agent})"),
                }
            }
            Ok(Event::NoCandidates { agent }) => {
                let here = interfaces_here();
                let _ = fatal
                    .send(format!(
                        "no local candidate gathered (agent {agent}): no address passed {limits} \
                         (interfaces here: {}); the peer cannot reach us",
                        if here.is_empty() {
                            "unknown".to_string()
                        } else {
                            here.join(", ")
                        }
                    ))
                    .await;
            }
            Ok(Event::SelectedPair {
                agent,
                local,
                remote,
            }) => eprintln!(
                "cunicu-signal: selected candidate pair {} <-> {} (agent {agent})",
                candidate::Display(&local),
                candidate::Display(&remote)
            ),
            Ok(Event::Connected(c)) => eprintln!(
                "cunicu-signal: connected, {} (agent {}, local ufrag {}, remote ufrag {})",
                match c.role() {
                    Role::Controlling => "dialed",
                    Role::Controlled => "accepted",
                },
                c.agent(),
                c.local_ufrag(),
                c.remote_ufrag()
            ),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("cunicu-signal: {n} session events not shown");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `input` as the stdin thread does: the lines, then the error
    /// that ended it (if one did).
    fn datagrams(input: &str) -> (Vec<String>, Option<io::Error>) {
        let mut reader = io::BufReader::with_capacity(7, input.as_bytes());
        let (tx, mut rx) = mpsc::channel(16);
        read_lines(&mut reader, &tx);
        drop(tx);
        let (mut got, mut error) = (Vec::new(), None);
        while let Some(line) = rx.blocking_recv() {
            match line {
                Ok(line) => got.push(String::from_utf8(line).unwrap()),
                Err(e) => error = Some(e),
            }
        }
        (got, error)
    }

    #[test]
    fn lines_become_datagrams_and_longer_ones_are_refused() {
        let (got, error) = datagrams("one\n\ntwo\nlast");
        assert_eq!(got, ["one\n", "\n", "two\n", "last"]);
        assert!(error.is_none());
        // The longest line that fits, with and without its newline.
        let fits = "x".repeat(MAX_DATAGRAM - 1);
        let (got, error) = datagrams(&format!("{fits}\n{fits}y"));
        assert_eq!(got, [format!("{fits}\n"), format!("{fits}y")]);
        assert!(error.is_none());
        // One byte more: the lines before it go, then the error; nothing of it.
        let long = "x".repeat(MAX_DATAGRAM);
        let (got, error) = datagrams(&format!("one\n{long}\nafter\n"));
        assert_eq!(got, ["one\n"]);
        let error = error.expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            error.to_string().contains("longer than one datagram"),
            "{error}"
        );
    }

    #[test]
    fn lines_kept_while_not_connected_are_bounded() {
        let (_tx, lines) = mpsc::channel(1);
        let mut input = Input {
            lines,
            pending: VecDeque::new(),
            dropped: 0,
        };
        for i in 0..PENDING_LINES + 3 {
            input.keep(format!("{i}\n").into_bytes());
        }
        assert_eq!(input.pending.len(), PENDING_LINES);
        assert_eq!(input.dropped, 3);
        assert_eq!(input.pending.front().unwrap(), b"3\n");
        assert_eq!(
            input.pending.back().unwrap(),
            format!("{}\n", PENDING_LINES + 2).as_bytes()
        );
    }

    #[test]
    fn turn_credentials_come_out_of_the_url() {
        let s = ice_server("turn:alice:s3cret@127.0.0.1:3478?transport=udp").unwrap();
        assert_eq!(s.url, "turn:127.0.0.1:3478?transport=udp");
        assert_eq!(
            (s.username.as_str(), s.password.as_str()),
            ("alice", "s3cret")
        );
        let s = ice_server("stun:127.0.0.1:3478").unwrap();
        assert_eq!(
            (s.url.as_str(), s.username.as_str()),
            ("stun:127.0.0.1:3478", "")
        );
        assert!(ice_server("nothing").is_err());
        assert!(ice_server("turn:alice@h:1").is_err());
        // What `serve --relay` refuses, `--stun` refuses too.
        for bad in [
            "http://x:1",
            "turn:h:99999",
            "turn:h:1?transport=sctp",
            "stun:u:p@h:1",
            "stun:h:1?transport=udp",
            // The server's secret= is not for peers.
            "turn:h:1?secret=x",
        ] {
            assert!(ice_server(bad).is_err(), "{bad} accepted");
        }
    }
}
