//! `cunicu-signal connect`: an ICE session with one peer over signaling
//! (SPEC §8), as a tiny netcat: each stdin line goes to the peer as one
//! datagram, each datagram from the peer goes to stdout as it is. State
//! changes and the selected candidate pair are printed on stderr.

use std::{net::IpAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use cunicu_signal::{Backend, Role};
use cunicu_signal_session::{
    Connection, Event, IceOptions, IceServer, Session, SessionOptions, WebrtcIce, candidate,
    relays_from_server,
};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::broadcast,
    task::JoinHandle,
};

use crate::{PeerArgs, public_key_arg, read_key_file, shutdown_signal};

/// The longest datagram sent: longer lines go out in pieces of this size.
/// webrtc-ice reads datagrams into 8 KiB buffers.
const MAX_DATAGRAM: usize = 8000;

/// How long to wait for a signaling server's RelayRegistry.
const RELAYS_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Also use the STUN/TURN relays that the grpc:// signaling servers hand out.
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
}

/// A task that is aborted when this is dropped.
struct Owned(JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `turn:USER:PASS@HOST:PORT?...` → URL without credentials, user, password.
fn ice_server(text: &str) -> Result<IceServer> {
    let Some((scheme, rest)) = text.split_once(':') else {
        bail!("--stun {text:?}: expected stun:HOST:PORT or turn:USER:PASS@HOST:PORT");
    };
    Ok(match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let Some((user, pass)) = credentials.split_once(':') else {
                bail!("--stun {text:?}: credentials must be USER:PASS");
            };
            IceServer::with_credentials(format!("{scheme}:{host}"), user, pass)
        }
        None => IceServer::new(text),
    })
}

/// Runs `connect` until stdin closes (or SIGINT/SIGTERM).
pub async fn run(args: ConnectArgs) -> Result<()> {
    let theirs = public_key_arg("peer", &args.peer)?;
    let ours = read_key_file(&args.signaling.key_file)?;
    let mut servers = args
        .servers
        .iter()
        .map(|s| ice_server(s))
        .collect::<Result<Vec<_>>>()?;
    if args.relays_from_server {
        let grpc: Vec<&String> = args
            .signaling
            .backends
            .iter()
            .filter(|url| url.starts_with("grpc://"))
            .collect();
        if grpc.is_empty() {
            bail!("--relays-from-server needs a grpc:// backend");
        }
        for url in grpc {
            let relays = relays_from_server(url, &ours.public_key(), RELAYS_TIMEOUT).await?;
            eprintln!("cunicu-signal: {} relay(s) from {url}", relays.len());
            servers.extend(relays);
        }
    }
    let ice = WebrtcIce::new(
        IceOptions::default()
            .with_servers(servers)
            .only_interfaces(args.interfaces.iter().cloned())
            .only_addresses(args.addresses.iter().copied()),
    )?;
    let backend: Arc<dyn Backend> =
        Arc::new(cunicu_signal::backend::connect(&args.signaling.backends).await?);
    let options = SessionOptions::default().with_disconnect_grace(args.disconnect_grace);
    let mut session =
        match Session::start(backend.clone(), ours, theirs, Arc::new(ice), options).await {
            Ok(session) => session,
            Err(e) => {
                let _ = backend.close().await;
                return Err(e.into());
            }
        };
    eprintln!(
        "cunicu-signal: session as {} with {theirs}: {}",
        ours.public_key(),
        match session.role() {
            Role::Controlling => "controlling (dials)",
            Role::Controlled => "controlled (accepts)",
        }
    );
    let printer = Owned(tokio::spawn(print_events(session.events())));
    let result = tokio::select! {
        result = pump(&session) => result,
        signal = shutdown_signal() => signal.map(|name| eprintln!("cunicu-signal: {name}: stopping")),
    };
    let closed = session.close().await;
    drop(printer);
    let _ = backend.close().await;
    result?;
    closed.context("closing the session")
}

/// Stdin lines to the current connection, its datagrams to stdout.
async fn pump(session: &Session) -> Result<()> {
    let mut connections = session.connections();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut current: Option<Connection> = None;
    let mut receiver: Option<Owned> = None;
    loop {
        let next = connections.borrow_and_update().clone();
        if next.as_ref().map(Connection::agent) != current.as_ref().map(Connection::agent) {
            // The old connection's reader stops before the new one writes.
            receiver = None;
            if let Some(c) = &next {
                receiver = Some(Owned(tokio::spawn(receive(c.clone()))));
            }
            current = next;
        }
        tokio::select! {
            changed = connections.changed() => {
                if changed.is_err() {
                    bail!("the session stopped");
                }
            }
            more = next_datagram(&mut stdin, &mut line), if current.is_some() => {
                if !more.context("reading stdin")? {
                    drop(receiver);
                    return Ok(());
                }
                if let Some(c) = &current
                    && let Err(e) = c.send(&line).await
                {
                    eprintln!("cunicu-signal: datagram of {} bytes not sent: {e}", line.len());
                }
                line.clear();
            }
        }
    }
}

/// Reads the next line (with its newline) into `line`, at most
/// [`MAX_DATAGRAM`] bytes of it. False at the end of input with nothing read.
/// Cancel safe: what was read stays in `line`, and the next call goes on.
async fn next_datagram(
    input: &mut (impl AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let room = MAX_DATAGRAM - line.len();
        let take = buf.iter().take(room).position(|&b| b == b'\n');
        let (n, done) = match take {
            Some(i) => (i + 1, true),
            None => {
                let n = buf.len().min(room);
                (n, line.len() + n == MAX_DATAGRAM)
            }
        };
        line.extend_from_slice(&buf[..n]);
        input.consume(n);
        if done {
            return Ok(true);
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

/// Prints states, selected pairs and connections on stderr.
async fn print_events(mut events: broadcast::Receiver<Event>) {
    loop {
        match events.recv().await {
            Ok(Event::State { agent, state }) => {
                eprintln!("cunicu-signal: state {state} (agent {agent})");
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

    #[tokio::test]
    async fn lines_become_datagrams_of_bounded_size() {
        let long = "x".repeat(MAX_DATAGRAM + 10);
        let input = format!("one\n\ntwo\n{long}\nlast");
        let mut reader = BufReader::with_capacity(7, input.as_bytes());
        let mut line = Vec::new();
        let mut got = Vec::new();
        while next_datagram(&mut reader, &mut line).await.unwrap() {
            got.push(String::from_utf8(std::mem::take(&mut line)).unwrap());
        }
        assert_eq!(
            got,
            [
                "one\n".to_string(),
                "\n".into(),
                "two\n".into(),
                "x".repeat(MAX_DATAGRAM),
                "xxxxxxxxxx\n".into(),
                "last".into()
            ]
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
    }
}
