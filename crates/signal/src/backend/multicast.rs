//! `multicast://GROUP:PORT?interface=NAME&loopback=BOOL`: peers on one LAN
//! signal through UDP multicast, without a server (docs/PROTOCOL.md §6).
//!
//! Every transport has a socket of its own, bound to the group and port with
//! `SO_REUSEADDR` and `SO_REUSEPORT`, so several processes (and several
//! backends of one process) on a host share the group; the kernel hands every
//! datagram to each of them. One envelope is one datagram of at most
//! [`MAX_DATAGRAM`] bytes: cunīcu's peers read into a buffer of that size, so a
//! larger envelope is refused before it is sent.
//!
//! Multicast hears everyone's traffic: the receive task hands the [`Registry`]
//! only the envelopes addressed to a key this transport listens on and ignores
//! the others quietly. Datagrams that are not envelopes are dropped and counted
//! ([`Multicast::stats`]).
//!
//! Any host on the link can send datagrams, and a forged envelope from a
//! made-up sender costs its recipient one X25519 (tens of microseconds). So
//! every source address has a token bucket ([`SOURCE_BURST`] datagrams at once,
//! [`SOURCE_RATE`] a second in the long run), checked first for every datagram,
//! before it is decoded: what is over the limit is dropped and counted
//! ([`MulticastStats::rate_limited`]), and one flooding host takes nothing from
//! the others. The bucket counts all of a source's datagrams, those to other
//! peers too. Sources are told apart by their whole address (on one link every
//! host shares the IPv6 /64). At most [`MAX_SOURCES`] are tracked; a new source
//! takes the place of the least recently heard one if that one's bucket has
//! filled up again (it then has nothing to remember), and otherwise shares one
//! bucket with every other source in that situation
//! ([`MulticastStats::sources_full`]). A host that forges many source
//! addresses gets a bucket for each; the registry's bounded queue is what
//! limits it then.
//!
//! Parameters:
//! - `interface`: the network interface to join the group on and send through
//!   (default: the one the routing table picks for the group). IPv6 groups of
//!   interface-local or link-local scope (`ff01::/16`, `ff02::/16`) need it. On
//!   Linux the socket is bound to that interface (`SO_BINDTODEVICE`, allowed
//!   without privileges since Linux 5.7), so it hears nothing from the others.
//! - `loopback`: whether our own datagrams are looped back to the sockets of
//!   this host (`IP_MULTICAST_LOOP`, `IPV6_MULTICAST_LOOP`). It defaults to
//!   false as in cunīcu, so that processes on one host do not hear each other.
//!   The loopback interface `lo` is different: it delivers every datagram sent
//!   through it to the sockets of the host whatever this flag says.
//!
//! Datagrams go out with a TTL (hop limit) of 1: signaling stays on the link.
//!
//! Where this differs from cunīcu: cunīcu sets the loopback flag only for IPv4
//! groups and never closes its socket; here the flag applies to both families
//! and [`Transport::close`] stops the receive task and releases the socket.

use std::{
    collections::HashSet,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use lru::LruCache;
use parking_lot::Mutex;
use prost::Message as _;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use super::{BackendError, Transport, bool_param, check_params};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    Key, Registry,
    log_limit::LogLimiter,
    proto::signaling::{BackendType, Envelope},
    task,
};

/// The largest envelope that travels as one datagram, in bytes: cunīcu's peers
/// read datagrams into a buffer of this size (docs/PROTOCOL.md §6).
pub const MAX_DATAGRAM: usize = 4096;

/// How long the receive task waits after a failed read before it reads again,
/// so that a persistent socket error does not spin.
const READ_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Datagrams one source address may send at once (its bucket's size): room for
/// the credentials and candidates of a few sessions that start together.
pub const SOURCE_BURST: u32 = 256;
/// Datagrams per second one source address may send in the long run. Forged
/// envelopes at this rate cost a receiver about 64 X25519 a second, well under
/// one percent of a core.
pub const SOURCE_RATE: u32 = 64;
/// Source addresses whose buckets are kept at most.
pub const MAX_SOURCES: usize = 1024;

/// Why the multicast medium failed: the source of a
/// [`BackendError::Transport`] from this backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MulticastError {
    /// The envelope does not fit into one datagram; nothing was sent.
    #[error(
        "envelope is {size} bytes, more than the {limit} bytes one multicast datagram may carry: not sent"
    )]
    TooLarge {
        /// The encoded size of the envelope.
        size: usize,
        /// The limit, [`MAX_DATAGRAM`].
        limit: usize,
    },
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Socket {
        /// What was being done, with its addresses.
        what: String,
        /// The error of the operating system.
        #[source]
        source: io::Error,
    },
}

impl MulticastError {
    /// True if sending again may succeed (a socket error: no route yet, a
    /// full buffer); false for an envelope too large for a datagram.
    pub fn is_transient(&self) -> bool {
        matches!(self, MulticastError::Socket { .. })
    }
}

/// Counters of a [`Multicast`] transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MulticastStats {
    /// Datagrams sent (one per envelope).
    pub sent: u64,
    /// Datagrams received: every peer's traffic on the group, and our own when
    /// it is looped back.
    pub received: u64,
    /// Datagrams dropped because they are not envelopes: they do not parse,
    /// have no 32-byte recipient, or are larger than [`MAX_DATAGRAM`].
    pub not_envelopes: u64,
    /// Envelopes ignored because they are addressed to a key this transport
    /// does not listen on (other peers' traffic).
    pub not_ours: u64,
    /// Envelopes handed to the registry, which queues them for its worker
    /// (that opens them and drops copies).
    pub handed_over: u64,
    /// Reads from the socket that failed (each followed by a short pause).
    pub read_errors: u64,
    /// Datagrams dropped unread because their source address sent more than
    /// its share ([`SOURCE_BURST`], [`SOURCE_RATE`]).
    pub rate_limited: u64,
    /// Datagrams from a source that found the table of sources full, with no
    /// idle source to replace: such sources share one bucket ([`MAX_SOURCES`]).
    pub sources_full: u64,
}

/// A token bucket of [`SOURCE_BURST`] datagrams that refills at [`SOURCE_RATE`].
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Bucket {
            tokens: f64::from(SOURCE_BURST),
            at: now,
        }
    }

    /// The tokens at `now`.
    fn tokens_at(&self, now: Instant) -> f64 {
        let refilled =
            now.saturating_duration_since(self.at).as_secs_f64() * f64::from(SOURCE_RATE);
        (self.tokens + refilled).min(f64::from(SOURCE_BURST))
    }

    /// Takes a token; false if there is none.
    fn take(&mut self, now: Instant) -> bool {
        self.tokens = self.tokens_at(now);
        self.at = self.at.max(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// True if the bucket has filled up again: forgetting it changes nothing.
    fn is_full_at(&self, now: Instant) -> bool {
        self.tokens_at(now) >= f64::from(SOURCE_BURST)
    }
}

/// What [`Sources::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Admission {
    /// The datagram may be read.
    pass: bool,
    /// It was charged to the bucket that sources share when the table is full.
    shared: bool,
}

/// The buckets of the sources heard recently, least recently heard first out.
struct Sources {
    buckets: LruCache<IpAddr, Bucket>,
    /// For sources that find the table full.
    overflow: Bucket,
}

impl Sources {
    fn new(capacity: usize, now: Instant) -> Self {
        Sources {
            buckets: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            overflow: Bucket::full(now),
        }
    }

    /// Charges one datagram from `source`.
    fn admit(&mut self, source: IpAddr, now: Instant) -> Admission {
        if let Some(bucket) = self.buckets.get_mut(&source) {
            return Admission {
                pass: bucket.take(now),
                shared: false,
            };
        }
        let room = self.buckets.len() < self.buckets.cap().get()
            || self
                .buckets
                .peek_lru()
                .is_some_and(|(_, oldest)| oldest.is_full_at(now));
        if !room {
            return Admission {
                pass: self.overflow.take(now),
                shared: true,
            };
        }
        let mut bucket = Bucket::full(now);
        let pass = bucket.take(now);
        // Full: pushes out the least recently heard source, idle as checked.
        self.buckets.push(source, bucket);
        Admission {
            pass,
            shared: false,
        }
    }
}

/// The parsed URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    group: SocketAddr,
    interface: Option<String>,
    loopback: bool,
}

impl Config {
    fn parse(url: &url::Url) -> Result<Self, BackendError> {
        check_params(url, &["interface", "loopback"])?;
        let group: IpAddr = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.into(),
            Some(url::Host::Ipv6(ip)) => ip.into(),
            // `multicast:` is not a special scheme: its IPv4 hosts stay text.
            Some(url::Host::Domain(text)) => IpAddr::V4(text.parse().map_err(|_| {
                BackendError::url(
                    url,
                    format!("group {text:?} is not an IP address (IPv6 goes in brackets)"),
                )
            })?),
            None => {
                return Err(BackendError::url(
                    url,
                    "no multicast group (expected multicast://GROUP:PORT)",
                ));
            }
        };
        if !group.is_multicast() {
            return Err(BackendError::url(
                url,
                format!("{group} is not a multicast group (IPv4 224.0.0.0/4, IPv6 ff00::/8)"),
            ));
        }
        let port = match url.port() {
            None => {
                return Err(BackendError::url(
                    url,
                    "no port (expected multicast://GROUP:PORT)",
                ));
            }
            Some(0) => return Err(BackendError::url(url, "port 0 is not a port to meet on")),
            Some(port) => port,
        };
        if !matches!(url.path(), "" | "/") {
            return Err(BackendError::url(
                url,
                format!("unexpected path {:?}", url.path()),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(BackendError::url(url, "a multicast URL has no user"));
        }
        let interface = match url.query_pairs().find(|(name, _)| name == "interface") {
            Some((_, name)) if name.is_empty() => {
                return Err(BackendError::url(url, "parameter interface is empty"));
            }
            Some((_, name)) => Some(name.into_owned()),
            None => None,
        };
        if let IpAddr::V6(ip) = group
            && needs_interface(&ip)
            && interface.is_none()
        {
            return Err(BackendError::url(
                url,
                format!("group {ip} is link-local: name the interface with ?interface=NAME"),
            ));
        }
        Ok(Config {
            group: SocketAddr::new(group, port),
            interface,
            loopback: bool_param(url, "loopback")?.unwrap_or(false),
        })
    }
}

/// True for IPv6 groups of interface-local or link-local scope: they exist once
/// per interface, so the socket must say which.
fn needs_interface(group: &Ipv6Addr) -> bool {
    matches!(group.octets()[1] & 0x0f, 1 | 2)
}

fn socket_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> MulticastError {
    let what = what.into();
    move |source| MulticastError::Socket { what, source }
}

/// Binds `socket` to the interface `name` and returns the interface's index.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn bind_interface(socket: &Socket, name: &str, url: &url::Url) -> Result<u32, BackendError> {
    socket.bind_device(Some(name.as_bytes())).map_err(|e| {
        if e.raw_os_error() == Some(19) {
            // ENODEV
            BackendError::url(url, format!("there is no network interface {name:?}"))
        } else {
            BackendError::transport(url, socket_error(format!("bind to interface {name:?}"))(e))
        }
    })?;
    // The kernel resolved the name: ask it for the index.
    match socket.device_index_v4() {
        Ok(Some(index)) => Ok(index.get()),
        Ok(None) => Err(BackendError::url(
            url,
            format!("there is no network interface {name:?}"),
        )),
        Err(e) => Err(BackendError::transport(
            url,
            socket_error(format!("index of interface {name:?}"))(e),
        )),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn bind_interface(_socket: &Socket, _name: &str, url: &url::Url) -> Result<u32, BackendError> {
    Err(BackendError::url(
        url,
        "parameter interface is supported on Linux only",
    ))
}

/// Makes the socket of `config`: bound to the group and port, member of the
/// group, with the loopback flag and a TTL of 1, non-blocking.
fn open_socket(config: &Config, url: &url::Url) -> Result<std::net::UdpSocket, BackendError> {
    let fail = |e: MulticastError| BackendError::transport(url, e);
    let group = config.group;
    let socket = Socket::new(Domain::for_address(group), Type::DGRAM, Some(Protocol::UDP))
        .map_err(socket_error("create a UDP socket"))
        .map_err(fail)?;
    socket
        .set_reuse_address(true)
        .map_err(socket_error("set SO_REUSEADDR"))
        .map_err(fail)?;
    #[cfg(unix)]
    socket
        .set_reuse_port(true)
        .map_err(socket_error("set SO_REUSEPORT"))
        .map_err(fail)?;
    let index = match &config.interface {
        Some(name) => Some(bind_interface(&socket, name, url)?),
        None => None,
    };
    match group.ip() {
        IpAddr::V4(ip) => {
            // Bound to the group, the socket receives nothing else on this port.
            socket
                .bind(&group.into())
                .map_err(socket_error(format!("bind to {group}")))
                .map_err(fail)?;
            let interface = match index {
                Some(index) => socket2::InterfaceIndexOrAddress::Index(index),
                None => socket2::InterfaceIndexOrAddress::Address(Ipv4Addr::UNSPECIFIED),
            };
            socket
                .join_multicast_v4_n(&ip, &interface)
                .map_err(socket_error(format!("join group {ip}")))
                .map_err(fail)?;
            socket
                .set_multicast_loop_v4(config.loopback)
                .map_err(socket_error("set IP_MULTICAST_LOOP"))
                .map_err(fail)?;
            socket
                .set_multicast_ttl_v4(1)
                .map_err(socket_error("set IP_MULTICAST_TTL"))
                .map_err(fail)?;
        }
        IpAddr::V6(ip) => {
            let index = index.unwrap_or(0);
            socket
                .set_only_v6(true)
                .map_err(socket_error("set IPV6_V6ONLY"))
                .map_err(fail)?;
            let bind = SocketAddrV6::new(ip, group.port(), 0, index);
            socket
                .bind(&bind.into())
                .map_err(socket_error(format!("bind to {bind}")))
                .map_err(fail)?;
            socket
                .join_multicast_v6(&ip, index)
                .map_err(socket_error(format!("join group {ip}")))
                .map_err(fail)?;
            if index != 0 {
                socket
                    .set_multicast_if_v6(index)
                    .map_err(socket_error("set IPV6_MULTICAST_IF"))
                    .map_err(fail)?;
            }
            socket
                .set_multicast_loop_v6(config.loopback)
                .map_err(socket_error("set IPV6_MULTICAST_LOOP"))
                .map_err(fail)?;
            socket
                .set_multicast_hops_v6(1)
                .map_err(socket_error("set IPV6_MULTICAST_HOPS"))
                .map_err(fail)?;
        }
    }
    socket
        .set_nonblocking(true)
        .map_err(socket_error("make the socket non-blocking"))
        .map_err(fail)?;
    Ok(socket.into())
}

/// What the transport shares with its receive task.
struct Shared {
    name: String,
    registry: Arc<Registry>,
    keys: Mutex<HashSet<Key>>,
    sent: AtomicU64,
    received: AtomicU64,
    not_envelopes: AtomicU64,
    not_ours: AtomicU64,
    handed_over: AtomicU64,
    read_errors: AtomicU64,
    rate_limited: AtomicU64,
    sources_full: AtomicU64,
    sources: Mutex<Sources>,
    not_envelope_log: LogLimiter,
    read_error_log: LogLimiter,
    rate_limit_log: LogLimiter,
}

impl Shared {
    fn on_datagram(&self, datagram: &[u8], from: SocketAddr) {
        self.received.fetch_add(1, Relaxed);
        // First, before decoding: a flood from one host costs the others nothing.
        let admission = self.sources.lock().admit(from.ip(), Instant::now());
        if admission.shared {
            self.sources_full.fetch_add(1, Relaxed);
        }
        if !admission.pass {
            let total = self.rate_limited.fetch_add(1, Relaxed) + 1;
            // The flood itself would repeat this line: log some, count all.
            if self.rate_limit_log.allow() {
                tracing::warn!(
                    backend = %self.name,
                    %from,
                    total,
                    shared = admission.shared,
                    "source sends more than {SOURCE_RATE} datagrams a second (burst {SOURCE_BURST}): dropped"
                );
            }
            return;
        }
        if datagram.len() > MAX_DATAGRAM {
            self.not_envelope(from, &format!("more than {MAX_DATAGRAM} bytes"));
            return;
        }
        let envelope = match Envelope::from_bytes(datagram) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.not_envelope(from, &e.to_string());
                return;
            }
        };
        let recipient = match envelope.recipient_key() {
            Ok(recipient) => recipient,
            Err(e) => {
                self.not_envelope(from, &e.to_string());
                return;
            }
        };
        if !self.keys.lock().contains(&recipient) {
            self.not_ours.fetch_add(1, Relaxed);
            tracing::trace!(backend = %self.name, %recipient, %from, "envelope for another peer ignored");
            return;
        }
        self.registry.deliver(&envelope);
        self.handed_over.fetch_add(1, Relaxed);
    }

    fn not_envelope(&self, from: SocketAddr, why: &str) {
        let total = self.not_envelopes.fetch_add(1, Relaxed) + 1;
        // Any host on the LAN can send these: log some, count all.
        if !self.not_envelope_log.allow() {
            return;
        }
        tracing::warn!(backend = %self.name, %from, total, "datagram is not an envelope, dropped: {why}");
    }
}

/// Reads datagrams until the task is aborted.
async fn receive(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    // One byte more than the limit tells a datagram beyond it (which cunīcu's
    // peers would truncate) from one that just fits.
    let mut buffer = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        match socket.recv_from(&mut buffer).await {
            Ok((len, from)) => shared.on_datagram(&buffer[..len], from),
            Err(e) => {
                let total = shared.read_errors.fetch_add(1, Relaxed) + 1;
                // A lasting error would repeat every pause: log some, count all.
                if shared.read_error_log.allow() {
                    tracing::warn!(backend = %shared.name, total, "receiving a datagram failed: {e}");
                }
                tokio::time::sleep(READ_ERROR_BACKOFF).await;
            }
        }
    }
}

/// The UDP multicast transport: one socket on the group, one receive task.
///
/// Dropping it aborts the receive task, which releases the socket.
pub struct Multicast {
    group: SocketAddr,
    shared: Arc<Shared>,
    /// `None` once closed.
    socket: Mutex<Option<Arc<UdpSocket>>>,
    receiver: Mutex<Option<AbortOnDropHandle<()>>>,
}

impl Multicast {
    /// Joins the group of `url` (`multicast://GROUP:PORT?interface=NAME&loopback=BOOL`)
    /// and starts the receive task, which delivers into `registry`. Must be
    /// called within a tokio runtime.
    pub async fn connect(url: &url::Url, registry: Arc<Registry>) -> Result<Self, BackendError> {
        let config = Config::parse(url)?;
        let socket = open_socket(&config, url)?;
        let socket = Arc::new(UdpSocket::from_std(socket).map_err(|e| {
            BackendError::transport(url, socket_error("register the socket with tokio")(e))
        })?);
        let shared = Arc::new(Shared {
            name: url.to_string(),
            registry,
            keys: Mutex::new(HashSet::new()),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            not_envelopes: AtomicU64::new(0),
            not_ours: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            sources_full: AtomicU64::new(0),
            sources: Mutex::new(Sources::new(MAX_SOURCES, Instant::now())),
            not_envelope_log: LogLimiter::default(),
            read_error_log: LogLimiter::default(),
            rate_limit_log: LogLimiter::default(),
        });
        let receiver = tokio::spawn(receive(socket.clone(), shared.clone()));
        tracing::debug!(backend = %shared.name, group = %config.group, "joined multicast group");
        Ok(Multicast {
            group: config.group,
            shared,
            socket: Mutex::new(Some(socket)),
            receiver: Mutex::new(Some(AbortOnDropHandle::new(receiver))),
        })
    }

    /// The group and port datagrams are sent to.
    pub fn group(&self) -> SocketAddr {
        self.group
    }

    /// The counters.
    pub fn stats(&self) -> MulticastStats {
        let s = &self.shared;
        MulticastStats {
            sent: s.sent.load(Relaxed),
            received: s.received.load(Relaxed),
            not_envelopes: s.not_envelopes.load(Relaxed),
            not_ours: s.not_ours.load(Relaxed),
            handed_over: s.handed_over.load(Relaxed),
            read_errors: s.read_errors.load(Relaxed),
            rate_limited: s.rate_limited.load(Relaxed),
            sources_full: s.sources_full.load(Relaxed),
        }
    }

    fn socket(&self) -> Result<Arc<UdpSocket>, BackendError> {
        self.socket.lock().clone().ok_or(BackendError::Closed)
    }
}

#[async_trait]
impl Transport for Multicast {
    async fn send(&self, envelope: &Envelope) -> Result<super::Published, BackendError> {
        let size = envelope.encoded_len();
        if size > MAX_DATAGRAM {
            return Err(BackendError::transport(
                &self.shared.name,
                MulticastError::TooLarge {
                    size,
                    limit: MAX_DATAGRAM,
                },
            ));
        }
        let socket = self.socket()?;
        let datagram = envelope.encode_to_vec();
        let sent = socket
            .send_to(&datagram, self.group)
            .await
            .map_err(socket_error(format!("send to {}", self.group)))
            .map_err(|e| BackendError::transport(&self.shared.name, e))?;
        if sent != datagram.len() {
            return Err(BackendError::transport(
                &self.shared.name,
                format!("sent {sent} of {} bytes to {}", datagram.len(), self.group),
            ));
        }
        self.shared.sent.fetch_add(1, Relaxed);
        // Who on the LAN heard it, the medium cannot tell.
        Ok(super::Published::unknown())
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        // The socket hears the group from the start: listening is bookkeeping.
        self.socket()?;
        self.shared.keys.lock().insert(key);
        Ok(())
    }

    async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
        self.shared.keys.lock().remove(&key);
        Ok(())
    }

    fn backend_type(&self) -> BackendType {
        BackendType::Mcast
    }

    async fn close(&self) -> Result<(), BackendError> {
        let socket = self.socket.lock().take();
        let receiver = self.receiver.lock().take();
        if let Some(receiver) = receiver {
            task::stop(receiver).await;
        }
        drop(socket);
        self.shared.keys.lock().clear();
        Ok(())
    }

    fn name(&self) -> &str {
        &self.shared.name
    }
}

impl fmt::Debug for Multicast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Multicast")
            .field("name", &self.shared.name)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Config, BackendError> {
        Config::parse(&url::Url::parse(url).map_err(|e| BackendError::url(url, e))?)
    }

    #[test]
    fn parses_groups_and_parameters() {
        assert_eq!(
            parse("multicast://239.1.2.3:7000").unwrap(),
            Config {
                group: "239.1.2.3:7000".parse().unwrap(),
                interface: None,
                loopback: false,
            }
        );
        assert_eq!(
            parse("multicast://[ff02::1:2]:7000?interface=eth0&loopback=true").unwrap(),
            Config {
                group: "[ff02::1:2]:7000".parse().unwrap(),
                interface: Some("eth0".into()),
                loopback: true,
            }
        );
        assert!(parse("multicast://[ff15::7]:7000/").is_ok());
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    /// Admits datagrams from `source` at `now` until one is refused; how many passed.
    fn drain(sources: &mut Sources, source: IpAddr, now: Instant) -> u32 {
        let mut passed = 0;
        while sources.admit(source, now).pass {
            passed += 1;
            assert!(passed <= SOURCE_BURST, "the bucket does not run dry");
        }
        passed
    }

    #[test]
    fn each_source_has_its_own_bucket() {
        let t0 = Instant::now();
        let mut sources = Sources::new(8, t0);
        assert_eq!(drain(&mut sources, ip(1), t0), SOURCE_BURST);
        // Another source is not affected.
        assert_eq!(
            sources.admit(ip(2), t0),
            Admission {
                pass: true,
                shared: false
            }
        );
        // The rate refills: one second gives SOURCE_RATE more, no more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(drain(&mut sources, ip(1), t1), SOURCE_RATE);
        // Never beyond the burst, however long it was quiet.
        let later = t1 + Duration::from_secs(3600);
        assert_eq!(drain(&mut sources, ip(1), later), SOURCE_BURST);
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let t0 = Instant::now();
        let mut sources = Sources::new(2, t0);
        assert!(sources.admit(ip(1), t0).pass);
        assert!(sources.admit(ip(2), t0).pass);
        // Full, and neither bucket has filled up again: a third source shares
        // the overflow bucket, as does a fourth.
        let third = sources.admit(ip(3), t0);
        assert_eq!(
            third,
            Admission {
                pass: true,
                shared: true
            }
        );
        assert_eq!(drain(&mut sources, ip(4), t0), SOURCE_BURST - 1);
        assert!(!sources.admit(ip(3), t0).pass);
        assert_eq!(sources.buckets.len(), 2);
        // Once the least recently heard source (1) is idle long enough for its
        // bucket to be full, a new source takes its place.
        let refill = Duration::from_secs_f64(1.0 / f64::from(SOURCE_RATE));
        let t1 = t0 + refill;
        assert!(sources.admit(ip(2), t1).pass);
        let t2 = t1 + refill;
        assert_eq!(
            sources.admit(ip(3), t2),
            Admission {
                pass: true,
                shared: false
            }
        );
        assert!(sources.buckets.contains(&ip(3)));
        assert!(!sources.buckets.contains(&ip(1)));
        assert!(sources.buckets.contains(&ip(2)));
    }

    #[test]
    fn rejects_what_is_not_a_group() {
        for (url, reason) in [
            (
                "multicast://10.0.0.1:7000",
                "10.0.0.1 is not a multicast group",
            ),
            (
                "multicast://[fe80::1]:7000",
                "fe80::1 is not a multicast group",
            ),
            ("multicast://lan.example:7000", "is not an IP address"),
            ("multicast://239.1.2.3", "no port"),
            ("multicast://239.1.2.3:0", "port 0"),
            ("multicast://239.1.2.3:7000/x", "unexpected path"),
            (
                "multicast://239.1.2.3:7000?ttl=3",
                "unknown parameter \"ttl\"",
            ),
            ("multicast://239.1.2.3:7000?loopback=maybe", "not a boolean"),
            (
                "multicast://239.1.2.3:7000?interface=",
                "interface is empty",
            ),
            ("multicast://[ff02::1]:7000", "name the interface"),
        ] {
            let err = parse(url).unwrap_err();
            assert!(
                matches!(err, BackendError::Url { .. }) && err.to_string().contains(reason),
                "{url}: {err}"
            );
        }
    }
}
