//! Clients and what each may hold (docs/PROTOCOL.md §10, §13).
//!
//! A client is a proven key (a call with a valid proof of key possession is
//! charged to its key; so are the later calls of a connection once one of
//! its calls proved a key), or else the remote IP address, an IPv6 address
//! by its /64. Everything a client makes the server hold is counted against
//! it: its connections, subscriptions and calls in progress (counts), the
//! bytes queued for its subscriptions and handed to HTTP/2 and not yet
//! written (its byte [`Budget`]), and its rates (new connections, requests,
//! publishes and published bytes per second, token buckets).
//!
//! Everything from one address, proven or not, is counted besides against
//! that address's outer bound ([`AddressLimits`], large enough for a fleet
//! behind one NAT), and an IPv6 address also against its /48, whose bound is
//! [`SITE_FACTOR`] times an address's. A connection from an address beyond
//! its per-client limit (count or rate) is admitted provisionally under the
//! outer bound: its first call must prove a key, or it is closed.
//!
//! The server's own limits apply besides, so that many clients together stay
//! bounded too. At each of the server's caps (connections, subscriptions,
//! calls, and the pools of the services served through tonic and of health
//! checks and watches), a client holding less than its fair share (the cap
//! divided by the clients holding any, itself included) is still served: the
//! client holding the most loses its most recently opened one.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        Arc, Weak,
        atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use cunicu_signal::{Key, backend::grpc::PUSHBACK_METADATA};
use governor::{
    DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter,
    clock::{Clock as _, QuantaInstant},
};
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::bounds::{
    BRIDGED_CALLS, BRIDGED_CALLS_PER_CLIENT, CALL_EVICTIONS_IN_FLIGHT, EVICTIONS_IN_FLIGHT,
    HEALTH_CHECKS, HEALTH_CHECKS_PER_CLIENT, HEALTH_WATCHES, HEALTH_WATCHES_PER_CLIENT,
    RATE_ENTRIES, SITE_FACTOR,
};

/// Who a connection, subscription or call belongs to: a proven key, or the
/// remote IP address (an IPv6 address by its /64, as a host usually holds a
/// whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// Calls without a proof, by where they come from.
    Address(IpAddr),
    /// Calls with a valid proof of this key.
    Key(Key),
}

impl Client {
    /// The client at an IPv4 address, in a constant.
    #[cfg(test)]
    pub(crate) const fn of_const(v4: [u8; 4]) -> Client {
        Client::Address(IpAddr::V4(std::net::Ipv4Addr::new(
            v4[0], v4[1], v4[2], v4[3],
        )))
    }

    /// The (unproven) client at `addr`.
    #[cfg(test)]
    pub(crate) fn of(addr: IpAddr) -> Client {
        Client::Address(address_of(addr))
    }
}

/// `addr` as a client address: IPv4 as is (also when mapped into IPv6),
/// IPv6 by its /64.
fn address_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Address(IpAddr::V4(v4)) => v4.fmt(f),
            Client::Address(IpAddr::V6(v6)) => write!(f, "{v6}/64"),
            Client::Key(key) => write!(f, "key {key}"),
        }
    }
}

/// What the outer bounds count: an address (IPv4, or an IPv6 /64), or an
/// IPv6 /48 (a site: a home or office is given a /48 or a /56).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Prefix {
    Address(IpAddr),
    Site(Ipv6Addr),
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prefix::Address(IpAddr::V4(v4)) => write!(f, "address {v4}"),
            Prefix::Address(IpAddr::V6(v6)) => write!(f, "address {v6}/64"),
            Prefix::Site(v6) => write!(f, "network {v6}/48"),
        }
    }
}

/// Where a connection comes from: its address, and for IPv6 its /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    address: IpAddr,
}

impl Origin {
    /// The origin of a connection from `addr`.
    pub(crate) fn of(addr: IpAddr) -> Origin {
        Origin {
            address: address_of(addr),
        }
    }

    /// The unproven client of this origin.
    pub(crate) fn client(self) -> Client {
        Client::Address(self.address)
    }

    /// The prefixes it is counted in.
    fn prefixes(self) -> impl Iterator<Item = Prefix> {
        let site = match self.address {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => Some(Prefix::Site(Ipv6Addr::from_bits(
                v6.to_bits() & !((1u128 << 80) - 1),
            ))),
        };
        std::iter::once(Prefix::Address(self.address)).chain(site)
    }
}

/// A bound on bytes held, shared by everything that holds them.
#[derive(Debug)]
pub(crate) struct Budget {
    used: Used,
    limit: usize,
}

/// The counter of a budget: its own, or a metrics gauge's, so that the gauge
/// is the counter and costs nothing more.
#[derive(Debug)]
enum Used {
    Own(AtomicUsize),
    Gauge(Gauge),
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Budget {
            used: Used::Own(AtomicUsize::new(0)),
            limit,
        }
    }

    /// A budget counted in `gauge` (which nothing else may change).
    pub(crate) fn in_gauge(limit: usize, gauge: Gauge) -> Self {
        Budget {
            used: Used::Gauge(gauge),
            limit,
        }
    }

    /// Takes `n` bytes if they fit.
    pub(crate) fn try_reserve(&self, n: usize) -> bool {
        let limit = self.limit;
        match &self.used {
            Used::Own(used) => used
                .fetch_update(Relaxed, Relaxed, |u| {
                    (u.checked_add(n)? <= limit).then_some(u + n)
                })
                .is_ok(),
            Used::Gauge(gauge) => {
                let inner: &AtomicI64 = gauge.inner();
                inner
                    .fetch_update(Relaxed, Relaxed, |u| {
                        let next = u.checked_add(i64::try_from(n).ok()?)?;
                        (usize::try_from(next).ok()? <= limit).then_some(next)
                    })
                    .is_ok()
            }
        }
    }

    /// Gives `n` bytes back.
    pub(crate) fn release(&self, n: usize) {
        match &self.used {
            Used::Own(used) => {
                used.fetch_sub(n, Relaxed);
            }
            Used::Gauge(gauge) => {
                gauge.dec_by(n as i64);
            }
        }
    }

    /// The bound.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        match &self.used {
            Used::Own(used) => used.load(Relaxed),
            Used::Gauge(gauge) => usize::try_from(gauge.get()).unwrap_or(0),
        }
    }
}

/// Which budget was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exhausted {
    /// The client's own.
    Client,
    /// The server's, for all clients together.
    Server,
}

/// Takes `n` bytes from both budgets, or from neither.
pub(crate) fn reserve(client: &Budget, server: &Budget, n: usize) -> Result<(), Exhausted> {
    if !client.try_reserve(n) {
        return Err(Exhausted::Client);
    }
    if !server.try_reserve(n) {
        client.release(n);
        return Err(Exhausted::Server);
    }
    Ok(())
}

/// Bytes reserved in the server's budget alone (what the server holds on
/// behalf of all, such as envelopes on their way to the other replicas),
/// given back on drop.
pub(crate) struct Reserved {
    server: Arc<Budget>,
    bytes: usize,
}

impl Reserved {
    /// Reserves `bytes` of `server`.
    pub(crate) fn new(server: &Arc<Budget>, bytes: usize) -> Result<Self, Exhausted> {
        if !server.try_reserve(bytes) {
            return Err(Exhausted::Server);
        }
        Ok(Reserved {
            server: server.clone(),
            bytes,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.server.release(self.bytes);
    }
}

/// Bytes of a request being read: charged to its client and to the server
/// as they arrive (not as the message's prefix declares them, which costs a
/// client nothing to claim), and given back on drop.
pub(crate) struct Charged {
    client: Arc<ClientState>,
    server: Arc<Budget>,
    bytes: AtomicUsize,
}

impl Charged {
    /// Nothing charged yet, to `client` and `server`.
    pub(crate) fn new(client: &Arc<ClientState>, server: &Arc<Budget>) -> Self {
        Charged {
            client: client.clone(),
            server: server.clone(),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Charges `n` more bytes, if both budgets have room.
    pub(crate) fn add(&self, n: usize) -> Result<(), Exhausted> {
        reserve(&self.client.budget, &self.server, n)?;
        self.bytes.fetch_add(n, Relaxed);
        Ok(())
    }

    /// The client charged.
    pub(crate) fn client(&self) -> &ClientState {
        &self.client
    }

    /// Bytes charged so far.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Relaxed)
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        self.client.budget.release(n);
        self.server.release(n);
    }
}

/// One client's state that outlives a single connection.
#[derive(Debug)]
pub(crate) struct ClientState {
    /// Who.
    pub(crate) client: Client,
    /// Bytes this client makes the server hold.
    pub(crate) budget: Budget,
}

/// The limits of one client (a proven key, or an address without proof).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientLimits {
    pub(crate) connections: usize,
    pub(crate) subscriptions: usize,
    pub(crate) calls: usize,
    pub(crate) queued_bytes: usize,
    pub(crate) connection_rate: Rate,
    pub(crate) request_rate: Rate,
    pub(crate) publish_rate: Rate,
    pub(crate) publish_bytes_rate: Rate,
    /// The outer bounds of everything from one address.
    pub(crate) address: AddressLimits,
}

/// The outer bounds of everything from one address (IPv4, or an IPv6 /64),
/// proven or not; an IPv6 /48 has [`SITE_FACTOR`] times these.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddressLimits {
    pub(crate) connections: usize,
    pub(crate) subscriptions: usize,
    pub(crate) calls: usize,
    pub(crate) connection_rate: Rate,
    pub(crate) publish_rate: Rate,
    pub(crate) publish_bytes_rate: Rate,
}

impl AddressLimits {
    /// The bounds of a /48.
    fn site(self) -> AddressLimits {
        let factor = SITE_FACTOR as usize;
        AddressLimits {
            connections: self.connections.saturating_mul(factor),
            subscriptions: self.subscriptions.saturating_mul(factor),
            calls: self.calls.saturating_mul(factor),
            connection_rate: self.connection_rate.times(SITE_FACTOR),
            publish_rate: self.publish_rate.times(SITE_FACTOR),
            publish_bytes_rate: self.publish_bytes_rate.times(SITE_FACTOR),
        }
    }

    fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Connection => self.connections,
            Kind::Subscription => self.subscriptions,
            Kind::Call => self.calls,
            Kind::Bridged | Kind::HealthCheck | Kind::HealthWatch => usize::MAX,
        }
    }
}

/// A token bucket: so many per second, with a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: NonZeroU32,
    /// Tokens the bucket holds at most.
    pub burst: NonZeroU32,
}

impl Rate {
    pub(crate) fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }

    fn times(self, factor: u32) -> Rate {
        Rate {
            per_second: self
                .per_second
                .saturating_mul(NonZeroU32::MIN.saturating_add(factor - 1)),
            burst: self
                .burst
                .saturating_mul(NonZeroU32::MIN.saturating_add(factor - 1)),
        }
    }
}

/// What a client holds: connections, subscriptions, calls in progress, and,
/// besides their call slots, calls of the services served through tonic and
/// health checks and watches (pools of their own, so that a health check
/// never waits behind the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connection,
    Subscription,
    Call,
    Bridged,
    HealthCheck,
    HealthWatch,
}

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    /// Whether an address's and a /48's outer bounds count it (the pools of
    /// the services served through tonic are counted as calls already).
    fn bounded_by_prefix(self) -> bool {
        matches!(self, Kind::Connection | Kind::Subscription | Kind::Call)
    }

    /// How many of it may be being evicted at once.
    fn evictions_in_flight(self) -> usize {
        match self {
            Kind::Connection | Kind::Subscription => EVICTIONS_IN_FLIGHT,
            _ => CALL_EVICTIONS_IN_FLIGHT,
        }
    }

    /// Whether its slot ends through a token the guard carries (calls), not
    /// through an owner that registers itself (connections, subscriptions).
    fn ends_by_token(self) -> bool {
        !matches!(self, Kind::Connection | Kind::Subscription)
    }

    /// Refused: `client` holds `limit` of this kind.
    fn refused_client(self, client: Client, limit: usize) -> Refused {
        match self {
            Kind::Connection => Refused::ClientConnections(client, limit),
            Kind::Subscription => Refused::ClientSubscriptions(client, limit),
            Kind::Call => Refused::ClientCalls(client, limit),
            Kind::Bridged => Refused::ClientBridged(client, limit),
            Kind::HealthCheck => Refused::ClientHealthChecks(client, limit),
            Kind::HealthWatch => Refused::ClientHealthWatches(client, limit),
        }
    }

    /// Refused: the server holds `max` of this kind.
    fn refused_server(self, max: usize) -> Refused {
        match self {
            Kind::Connection => Refused::Connections(max),
            Kind::Subscription => Refused::Subscriptions(max),
            Kind::Call => Refused::Calls(max),
            Kind::Bridged => Refused::Bridged(max),
            Kind::HealthCheck => Refused::HealthChecks(max),
            Kind::HealthWatch => Refused::HealthWatches(max),
        }
    }

    /// Refused: `prefix` holds `limit` of this kind.
    fn refused_prefix(self, prefix: Prefix, limit: usize) -> Refused {
        match self {
            Kind::Connection => Refused::AddressConnections(prefix, limit),
            Kind::Subscription => Refused::AddressSubscriptions(prefix, limit),
            Kind::Call | Kind::Bridged | Kind::HealthCheck | Kind::HealthWatch => {
                Refused::AddressCalls(prefix, limit)
            }
        }
    }
}

const KINDS: usize = 6;

/// Something the server can end to make room for a client below its fair
/// share: a subscription stream, a connection.
pub(crate) trait Evict: Send + Sync {
    /// Ends it (its task sends RESOURCE_EXHAUSTED and counts it); its slot
    /// is given back when its guard drops.
    fn evict(&self);
}

/// A connection's or a call's end on demand.
impl Evict for CancellationToken {
    fn evict(&self) {
        self.cancel();
    }
}

/// How a slot that may be taken back ends.
enum Victim {
    /// Through its owner, which registered itself (a subscription, a
    /// connection) and may be gone already.
    Owner(Weak<dyn Evict>),
    /// Through the token its guard carries (a call).
    Token(CancellationToken),
}

impl Victim {
    /// What to end, unless it is gone already.
    fn upgrade(&self) -> Option<Arc<dyn Evict>> {
        match self {
            Victim::Owner(owner) => owner.upgrade(),
            Victim::Token(token) => Some(Arc::new(token.clone())),
        }
    }
}

struct Entry {
    state: Arc<ClientState>,
    held: [usize; KINDS],
    /// Connections admitted beyond the client's limit, waiting for a proof.
    provisional: usize,
    /// Of `held`, those being evicted.
    doomed: [usize; KINDS],
    /// What may be evicted, by age.
    victims: [BTreeMap<u64, Victim>; KINDS],
}

impl Entry {
    fn new(client: Client, queued_bytes: usize) -> Entry {
        Entry {
            state: Arc::new(ClientState {
                client,
                budget: Budget::new(queued_bytes),
            }),
            held: [0; KINDS],
            provisional: 0,
            doomed: [0; KINDS],
            victims: Default::default(),
        }
    }

    /// What it holds of `kind` and will keep.
    fn keeps(&self, kind: Kind) -> usize {
        self.held[kind.index()] - self.doomed[kind.index()]
    }

    fn is_empty(&self) -> bool {
        self.held.iter().all(|&n| n == 0)
    }
}

#[derive(Default)]
struct Table {
    clients: HashMap<Client, Entry>,
    /// Connections, subscriptions and calls by address and /48.
    prefixes: HashMap<Prefix, [usize; KINDS]>,
    totals: [usize; KINDS],
    /// Guards being evicted, and how many of each kind.
    doomed: HashSet<u64>,
    doomed_count: [usize; KINDS],
    next_id: u64,
}

/// A limit of a client, of an address or of the server was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("{0} has reached the limit of {1} connections per client")]
    ClientConnections(Client, usize),
    #[error(
        "the server has reached its limit of {0} connections and this client holds its fair share"
    )]
    Connections(usize),
    #[error("{0} has reached its limit of {1} connections")]
    AddressConnections(Prefix, usize),
    #[error("{0} opens connections faster than {1} per second")]
    AddressConnectionRate(Prefix, u32, Duration),
    #[error(
        "{0} holds the {1} connections a client may without a proof of key possession: the first call of another must prove a key"
    )]
    Unproven(Client, usize),
    #[error("{0} has reached the limit of {1} subscriptions per client")]
    ClientSubscriptions(Client, usize),
    #[error(
        "the server has reached its limit of {0} subscriptions and this client holds its fair share"
    )]
    Subscriptions(usize),
    #[error("{0} has reached its limit of {1} subscriptions")]
    AddressSubscriptions(Prefix, usize),
    #[error("{0} has reached the limit of {1} calls in progress per client")]
    ClientCalls(Client, usize),
    #[error(
        "the server has reached its limit of {0} calls in progress and this client holds its fair share"
    )]
    Calls(usize),
    #[error("{0} has reached its limit of {1} calls in progress")]
    AddressCalls(Prefix, usize),
    #[error(
        "{0} has reached the limit of {1} calls of GetBuildInfo, GetRelays, health or reflection at once"
    )]
    ClientBridged(Client, usize),
    #[error(
        "the server has reached its limit of {0} calls of GetBuildInfo, GetRelays, health or reflection at once"
    )]
    Bridged(usize),
    #[error("{0} has reached the limit of {1} health checks at once")]
    ClientHealthChecks(Client, usize),
    #[error("the server has reached its limit of {0} health checks at once")]
    HealthChecks(usize),
    #[error("{0} has reached the limit of {1} health watch streams")]
    ClientHealthWatches(Client, usize),
    #[error("the server has reached its limit of {0} health watch streams")]
    HealthWatches(usize),
    #[error("{0} sends requests faster than {1} per second")]
    RequestRate(Client, u32, Duration),
    #[error("{0} publishes faster than {1} envelopes per second")]
    PublishRate(Client, u32, Duration),
    #[error("{0} publishes faster than {1} envelopes per second")]
    AddressPublishRate(Prefix, u32, Duration),
    #[error("{0} publishes faster than {1} bytes per second")]
    PublishBytesRate(Client, u32, Duration),
    #[error("{0} publishes faster than {1} bytes per second")]
    AddressPublishBytesRate(Prefix, u32, Duration),
}

impl Refused {
    /// For a refusal by a rate: how long until the client's bucket has room
    /// again (at least 1 ms). `None` for a limit that only time held by
    /// others frees.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Refused::AddressConnectionRate(.., wait)
            | Refused::RequestRate(.., wait)
            | Refused::PublishRate(.., wait)
            | Refused::AddressPublishRate(.., wait)
            | Refused::PublishBytesRate(.., wait)
            | Refused::AddressPublishBytesRate(.., wait) => Some(*wait),
            _ => None,
        }
    }

    /// The gRPC status that answers it: RESOURCE_EXHAUSTED, with
    /// `grpc-retry-pushback-ms` when a rate refused.
    pub(crate) fn status(&self) -> Status {
        let mut status = Status::resource_exhausted(self.to_string());
        if let Some(wait) = self.retry_after() {
            status
                .metadata_mut()
                .insert(PUSHBACK_METADATA, pushback_ms(wait).into());
        }
        status
    }
}

/// The rates of one tier of prefixes (addresses, or /48s).
struct PrefixRates {
    limits: AddressLimits,
    connection: DefaultKeyedRateLimiter<Prefix>,
    publish: DefaultKeyedRateLimiter<Prefix>,
    publish_bytes: DefaultKeyedRateLimiter<Prefix>,
}

impl PrefixRates {
    fn new(limits: AddressLimits) -> Self {
        PrefixRates {
            limits,
            connection: RateLimiter::keyed(limits.connection_rate.quota()),
            publish: RateLimiter::keyed(limits.publish_rate.quota()),
            publish_bytes: RateLimiter::keyed(limits.publish_bytes_rate.quota()),
        }
    }

    fn limiters(&self) -> [&DefaultKeyedRateLimiter<Prefix>; 3] {
        [&self.connection, &self.publish, &self.publish_bytes]
    }
}

/// Every client with something open, and the rate limiters of all.
pub(crate) struct Clients {
    table: Mutex<Table>,
    limits: ClientLimits,
    /// The server's caps, by kind.
    max: [usize; KINDS],
    /// When rate-limiter entries were last forgotten, in ms since `created`.
    forgotten_at: std::sync::atomic::AtomicU64,
    created: std::time::Instant,
    connection_rate: DefaultKeyedRateLimiter<Client>,
    request_rate: DefaultKeyedRateLimiter<Client>,
    publish_rate: DefaultKeyedRateLimiter<Client>,
    publish_bytes_rate: DefaultKeyedRateLimiter<Client>,
    addresses: PrefixRates,
    sites: PrefixRates,
    /// Clients in the table.
    gauge: Gauge,
    /// The end signal of the guards that end through their owner
    /// (connections, subscriptions): one, never cancelled, shared, since a
    /// token each would cost memory per subscription for nothing.
    never_ended: CancellationToken,
}

impl Clients {
    /// Clients with these limits, and the server's caps, counted in `gauge`.
    pub(crate) fn new(
        limits: ClientLimits,
        max_connections: usize,
        max_subscriptions: usize,
        max_calls: usize,
        gauge: Gauge,
    ) -> Self {
        Clients {
            table: Mutex::new(Table::default()),
            limits,
            max: [
                max_connections,
                max_subscriptions,
                max_calls,
                BRIDGED_CALLS,
                HEALTH_CHECKS,
                HEALTH_WATCHES,
            ],
            forgotten_at: std::sync::atomic::AtomicU64::new(0),
            created: std::time::Instant::now(),
            connection_rate: RateLimiter::keyed(limits.connection_rate.quota()),
            request_rate: RateLimiter::keyed(limits.request_rate.quota()),
            publish_rate: RateLimiter::keyed(limits.publish_rate.quota()),
            publish_bytes_rate: RateLimiter::keyed(limits.publish_bytes_rate.quota()),
            addresses: PrefixRates::new(limits.address),
            sites: PrefixRates::new(limits.address.site()),
            gauge,
            never_ended: CancellationToken::new(),
        }
    }

    fn rates_of(&self, prefix: Prefix) -> &PrefixRates {
        match prefix {
            Prefix::Address(_) => &self.addresses,
            Prefix::Site(_) => &self.sites,
        }
    }

    /// Admits a new connection from `addr`: within the rate and the bound of
    /// its address (and /48), and within its client's rate and limit, or
    /// else provisionally (its first call must prove a key); at the server's
    /// cap, if its client holds less than its fair share.
    pub(crate) fn connect(self: &Arc<Self>, addr: IpAddr) -> Result<ConnectionGuard, Refused> {
        if self.connection_rate.len() > RATE_ENTRIES
            || self.addresses.connection.len() > RATE_ENTRIES
        {
            self.forget_idle_rates_soon();
        }
        let origin = Origin::of(addr);
        for prefix in origin.prefixes() {
            let rates = self.rates_of(prefix);
            if let Err(not_until) = rates.connection.check_key(&prefix) {
                return Err(Refused::AddressConnectionRate(
                    prefix,
                    rates.limits.connection_rate.per_second.get(),
                    not_until.wait_time_from(rates.connection.clock().now()),
                ));
            }
        }
        let client = origin.client();
        let over_rate = self.connection_rate.check_key(&client).is_err();
        self.take(client, origin, Kind::Connection, over_rate)
    }

    /// Takes a subscription slot of `client`, from `origin`, and of the server.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        client: Client,
        origin: Origin,
    ) -> Result<SlotGuard, Refused> {
        self.take(client, origin, Kind::Subscription, false)
    }

    /// Takes a slot for a call in progress (anything but an established
    /// subscription) of `client`, from `origin`, and of the server.
    pub(crate) fn call(
        self: &Arc<Self>,
        client: Client,
        origin: Origin,
    ) -> Result<SlotGuard, Refused> {
        self.take(client, origin, Kind::Call, false)
    }

    /// Takes a slot for a call of a service served through tonic, besides its
    /// call slot.
    pub(crate) fn bridged(
        self: &Arc<Self>,
        client: Client,
        origin: Origin,
    ) -> Result<SlotGuard, Refused> {
        self.take(client, origin, Kind::Bridged, false)
    }

    /// Takes a slot for a health check, besides its call slot (and instead
    /// of a slot of the other services served through tonic).
    pub(crate) fn health_check(
        self: &Arc<Self>,
        client: Client,
        origin: Origin,
    ) -> Result<SlotGuard, Refused> {
        self.take(client, origin, Kind::HealthCheck, false)
    }

    /// Takes a slot for a health watch stream, besides its call slot.
    pub(crate) fn health_watch(
        self: &Arc<Self>,
        client: Client,
        origin: Origin,
    ) -> Result<SlotGuard, Refused> {
        self.take(client, origin, Kind::HealthWatch, false)
    }

    fn per_client(&self, kind: Kind) -> usize {
        match kind {
            Kind::Connection => self.limits.connections,
            Kind::Subscription => self.limits.subscriptions,
            Kind::Call => self.limits.calls,
            Kind::Bridged => BRIDGED_CALLS_PER_CLIENT,
            Kind::HealthCheck => HEALTH_CHECKS_PER_CLIENT,
            Kind::HealthWatch => HEALTH_WATCHES_PER_CLIENT,
        }
    }

    /// Takes one of `kind` for `client` from `origin`: within the outer
    /// bounds of the origin's prefixes, the client's limit (a connection
    /// beyond it, or `provisional` from the start, is provisional), and the
    /// server's cap (at which a client below its fair share makes room).
    fn take(
        self: &Arc<Self>,
        client: Client,
        origin: Origin,
        kind: Kind,
        mut provisional: bool,
    ) -> Result<SlotGuard, Refused> {
        let k = kind.index();
        let (guard, evicted) = {
            let mut table = self.table.lock();
            let table = &mut *table;
            if kind.bounded_by_prefix() {
                for prefix in origin.prefixes() {
                    let limit = self.rates_of(prefix).limits.count(kind);
                    if table.prefixes.get(&prefix).map_or(0, |h| h[k]) >= limit {
                        return Err(kind.refused_prefix(prefix, limit));
                    }
                }
            }
            let per_client = self.per_client(kind);
            let (held, provisional_held) = table
                .clients
                .get(&client)
                .map_or((0, 0), |e| (e.held[k], e.provisional));
            let own = if kind == Kind::Connection {
                held - provisional_held
            } else {
                held
            };
            if own >= per_client {
                if kind != Kind::Connection {
                    return Err(kind.refused_client(client, per_client));
                }
                provisional = true;
            }
            let max = self.max[k];
            let evicted = if table.totals[k] < max.saturating_add(table.doomed_count[k]) {
                None
            } else {
                Some(make_room(table, client, kind, max)?)
            };
            let id = table.next_id;
            table.next_id += 1;
            let entry = table.clients.entry(client).or_insert_with(|| {
                self.gauge.inc();
                Entry::new(client, self.limits.queued_bytes)
            });
            entry.held[k] += 1;
            if provisional {
                entry.provisional += 1;
            }
            let state = entry.state.clone();
            let ended = if kind.ends_by_token() {
                let ended = CancellationToken::new();
                entry.victims[k].insert(id, Victim::Token(ended.clone()));
                ended
            } else {
                self.never_ended.clone()
            };
            table.totals[k] += 1;
            if kind.bounded_by_prefix() {
                for prefix in origin.prefixes() {
                    table.prefixes.entry(prefix).or_default()[k] += 1;
                }
            }
            let guard = SlotGuard {
                clients: self.clone(),
                state,
                origin,
                kind,
                id,
                provisional,
                ended,
            };
            (guard, evicted)
        };
        if let Some(evicted) = evicted {
            evicted.evict();
        }
        Ok(guard)
    }

    /// One new request (an HTTP/2 stream) of `client`, within its rate.
    pub(crate) fn check_request(&self, client: Client) -> Result<(), Refused> {
        self.request_rate.check_key(&client).map_err(|not_until| {
            Refused::RequestRate(
                client,
                self.limits.request_rate.per_second.get(),
                self.wait(&self.request_rate, &not_until),
            )
        })
    }

    /// How long from now until `limiter` has room, as its refusal says.
    fn wait<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        not_until: &NotUntil<QuantaInstant>,
    ) -> Duration {
        not_until.wait_time_from(limiter.clock().now())
    }

    /// One publish of `bytes` bytes by `client` from `origin`, within the
    /// client's rates and its origin's.
    pub(crate) fn check_publish(
        &self,
        client: Client,
        origin: Origin,
        bytes: usize,
    ) -> Result<(), Refused> {
        let n =
            NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        if let Err(not_until) = self.publish_rate.check_key(&client) {
            return Err(Refused::PublishRate(
                client,
                self.limits.publish_rate.per_second.get(),
                self.wait(&self.publish_rate, &not_until),
            ));
        }
        let per_second = self.limits.publish_bytes_rate.per_second.get();
        match self.publish_bytes_rate.check_key_n(&client, n) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                return Err(Refused::PublishBytesRate(
                    client,
                    per_second,
                    self.wait(&self.publish_bytes_rate, &not_until),
                ));
            }
            // More than a whole burst: the configuration keeps the burst at
            // least one largest envelope, so this is not reached; waiting a
            // burst's worth of time is what comes closest.
            Err(_) => {
                return Err(Refused::PublishBytesRate(
                    client,
                    per_second,
                    Duration::from_secs(1),
                ));
            }
        }
        for prefix in origin.prefixes() {
            let rates = self.rates_of(prefix);
            if let Err(not_until) = rates.publish.check_key(&prefix) {
                return Err(Refused::AddressPublishRate(
                    prefix,
                    rates.limits.publish_rate.per_second.get(),
                    self.wait(&rates.publish, &not_until),
                ));
            }
            let per_second = rates.limits.publish_bytes_rate.per_second.get();
            match rates.publish_bytes.check_key_n(&prefix, n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(Refused::AddressPublishBytesRate(
                        prefix,
                        per_second,
                        self.wait(&rates.publish_bytes, &not_until),
                    ));
                }
                Err(_) => {
                    return Err(Refused::AddressPublishBytesRate(
                        prefix,
                        per_second,
                        Duration::from_secs(1),
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`Clients::forget_idle_rates`], at most once a second.
    fn forget_idle_rates_soon(&self) {
        let now = self.created.elapsed().as_millis() as u64;
        let last = self.forgotten_at.load(Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .forgotten_at
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.forget_idle_rates();
        }
    }

    /// Forgets the rate state of clients that would start afresh anyway.
    pub(crate) fn forget_idle_rates(&self) {
        for limiter in [
            &self.connection_rate,
            &self.request_rate,
            &self.publish_rate,
            &self.publish_bytes_rate,
        ] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        for limiter in self
            .addresses
            .limiters()
            .into_iter()
            .chain(self.sites.limiters())
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// `(connections, subscriptions, calls)` of `client`, for tests.
    #[cfg(test)]
    pub(crate) fn counts(&self, client: Client) -> Option<(usize, usize, usize)> {
        self.table.lock().clients.get(&client).map(|e| {
            (
                e.held[Kind::Connection.index()],
                e.held[Kind::Subscription.index()],
                e.held[Kind::Call.index()],
            )
        })
    }

    /// Remembers `victim` as what ends to make room for the guard `id` of
    /// `client`.
    fn set_victim(&self, client: Client, kind: Kind, id: u64, victim: Weak<dyn Evict>) {
        let mut table = self.table.lock();
        if table.doomed.contains(&id) {
            return;
        }
        if let Some(entry) = table.clients.get_mut(&client) {
            entry.victims[kind.index()].insert(id, Victim::Owner(victim));
        }
    }

    /// Charges the connection of `guard` to the proven `key` from now on.
    fn prove(&self, guard: &mut SlotGuard, key: Key) -> Result<(), Refused> {
        let to = Client::Key(key);
        let from = guard.state.client;
        if from == to {
            return Ok(());
        }
        let k = Kind::Connection.index();
        let mut table = self.table.lock();
        let table = &mut *table;
        if table.doomed.contains(&guard.id) {
            // Being evicted: it goes anyway.
            return Ok(());
        }
        let held = table
            .clients
            .get(&to)
            .map_or(0, |e| e.held[k] - e.provisional);
        if held >= self.limits.connections {
            return Err(Refused::ClientConnections(to, self.limits.connections));
        }
        let mut victim = None;
        if let Some(old) = table.clients.get_mut(&from) {
            old.held[k] -= 1;
            if guard.provisional {
                old.provisional -= 1;
            }
            victim = old.victims[k].remove(&guard.id);
            if old.is_empty() {
                table.clients.remove(&from);
                self.gauge.dec();
            }
        }
        let entry = table.clients.entry(to).or_insert_with(|| {
            self.gauge.inc();
            Entry::new(to, self.limits.queued_bytes)
        });
        entry.held[k] += 1;
        if let Some(victim) = victim {
            entry.victims[k].insert(guard.id, victim);
        }
        guard.state = entry.state.clone();
        guard.provisional = false;
        Ok(())
    }

    fn release(&self, guard: &SlotGuard) {
        let k = guard.kind.index();
        let client = guard.state.client;
        let mut table = self.table.lock();
        let table = &mut *table;
        table.totals[k] -= 1;
        let doomed = table.doomed.remove(&guard.id);
        if doomed {
            table.doomed_count[k] -= 1;
        }
        if guard.kind.bounded_by_prefix() {
            for prefix in guard.origin.prefixes() {
                if let Some(held) = table.prefixes.get_mut(&prefix) {
                    held[k] -= 1;
                    if held.iter().all(|&n| n == 0) {
                        table.prefixes.remove(&prefix);
                    }
                }
            }
        }
        let Some(entry) = table.clients.get_mut(&client) else {
            return;
        };
        entry.held[k] -= 1;
        if guard.provisional {
            entry.provisional -= 1;
        }
        if doomed {
            entry.doomed[k] -= 1;
        }
        entry.victims[k].remove(&guard.id);
        if entry.is_empty() {
            table.clients.remove(&client);
            self.gauge.dec();
        }
    }
}

/// At the server's cap of `kind`: if `client` holds less than its fair
/// share (`max` divided by the clients holding any, itself included), marks
/// the most recent of the client holding the most to be ended and returns
/// it; else refuses. O(clients): only at the cap.
fn make_room(
    table: &mut Table,
    client: Client,
    kind: Kind,
    max: usize,
) -> Result<Arc<dyn Evict>, Refused> {
    let k = kind.index();
    let refused = kind.refused_server(max);
    if table.doomed_count[k] >= kind.evictions_in_flight() {
        return Err(refused);
    }
    let mine = table.clients.get(&client).map_or(0, |e| e.keeps(kind));
    let holders =
        table.clients.values().filter(|e| e.keeps(kind) > 0).count() + usize::from(mine == 0);
    // mine < max / holders, without fractions.
    if mine.saturating_mul(holders) >= max {
        return Err(refused);
    }
    loop {
        let Some((&heaviest, entry)) = table
            .clients
            .iter_mut()
            .filter(|(_, e)| !e.victims[k].is_empty())
            .max_by_key(|(_, e)| e.keeps(kind))
        else {
            return Err(refused);
        };
        if heaviest == client || entry.keeps(kind) <= mine + 1 {
            return Err(refused);
        }
        let Some((id, victim)) = entry.victims[k].pop_last() else {
            return Err(refused);
        };
        // Gone already (its guard drops soon): try the next.
        let Some(victim) = victim.upgrade() else {
            continue;
        };
        entry.doomed[k] += 1;
        table.doomed.insert(id);
        table.doomed_count[k] += 1;
        return Ok(victim);
    }
}

/// `wait` in whole milliseconds, rounded up, at least 1: a client that waits
/// that long finds room.
pub(crate) fn pushback_ms(wait: Duration) -> u64 {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// A connection of a client; released on drop.
pub(crate) type ConnectionGuard = SlotGuard;

/// A connection, subscription or call of a client; released on drop.
pub(crate) struct SlotGuard {
    clients: Arc<Clients>,
    state: Arc<ClientState>,
    origin: Origin,
    kind: Kind,
    id: u64,
    provisional: bool,
    ended: CancellationToken,
}

impl SlotGuard {
    /// The client it is charged to.
    pub(crate) fn state(&self) -> &Arc<ClientState> {
        &self.state
    }

    pub(crate) fn clients(&self) -> &Arc<Clients> {
        &self.clients
    }

    /// Where it comes from.
    pub(crate) fn origin(&self) -> Origin {
        self.origin
    }

    /// Cancelled when the server took a call's slot back for a client below
    /// its fair share: the call ends (RESOURCE_EXHAUSTED). (Connections and
    /// subscriptions end through what they registered with
    /// [`SlotGuard::set_victim`]; theirs is never cancelled.)
    pub(crate) fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// A connection admitted beyond its client's limit: its first call must
    /// prove a key.
    pub(crate) fn is_provisional(&self) -> bool {
        self.provisional
    }

    /// What ends it when another client needs its fair share.
    pub(crate) fn set_victim(&self, victim: Weak<dyn Evict>) {
        self.clients
            .set_victim(self.state.client, self.kind, self.id, victim);
    }

    /// A connection whose call proved `key`: charged to that key from now on
    /// (refused when the key holds all the connections a client may).
    pub(crate) fn prove(&mut self, key: Key) -> Result<(), Refused> {
        let clients = self.clients.clone();
        clients.prove(self, key)
    }

    /// The refusal that closes a provisional connection whose first call
    /// proved no key.
    pub(crate) fn unproven(&self) -> Refused {
        Refused::Unproven(self.state.client, self.clients.limits.connections)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.clients.release(self);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn rate(n: u32) -> Rate {
        let n = NonZeroU32::new(n).unwrap();
        Rate {
            per_second: n,
            burst: n,
        }
    }

    /// Outer bounds that do not bind.
    pub(crate) const UNBOUNDED: AddressLimits = AddressLimits {
        connections: usize::MAX / 8,
        subscriptions: usize::MAX / 8,
        calls: usize::MAX / 8,
        connection_rate: Rate {
            per_second: NonZeroU32::MAX,
            burst: NonZeroU32::MAX,
        },
        publish_rate: Rate {
            per_second: NonZeroU32::MAX,
            burst: NonZeroU32::MAX,
        },
        publish_bytes_rate: Rate {
            per_second: NonZeroU32::MAX,
            burst: NonZeroU32::MAX,
        },
    };

    fn limits(connections: usize, subscriptions: usize, calls: usize) -> ClientLimits {
        ClientLimits {
            connections,
            subscriptions,
            calls,
            queued_bytes: 1000,
            connection_rate: rate(100),
            request_rate: rate(100),
            publish_rate: rate(3),
            publish_bytes_rate: rate(1000),
            address: UNBOUNDED,
        }
    }

    fn clients(connections: usize, subscriptions: usize, calls: usize) -> Arc<Clients> {
        Arc::new(Clients::new(
            limits(connections, subscriptions, calls),
            100,
            5,
            4,
            Gauge::default(),
        ))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn origin(text: &str) -> Origin {
        Origin::of(ip(text))
    }

    /// Something evicted: it says so.
    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl Evict for Flag {
        fn evict(&self) {
            self.0.store(true, Relaxed);
        }
    }

    impl Flag {
        fn evicted(&self) -> bool {
            self.0.load(Relaxed)
        }
    }

    fn victim(guard: &SlotGuard) -> Arc<Flag> {
        let flag = Arc::new(Flag::default());
        let weak: Weak<dyn Evict> = Arc::downgrade(&flag) as _;
        guard.set_victim(weak);
        flag
    }

    fn client(text: &str) -> Client {
        Client::of(text.parse().unwrap())
    }

    #[test]
    fn ipv6_clients_are_their_64_and_mapped_v4_is_v4() {
        assert_eq!(client("2001:db8:1:2::1"), client("2001:db8:1:2:ffff::9"));
        assert_ne!(client("2001:db8:1:2::1"), client("2001:db8:1:3::1"));
        assert_eq!(client("::ffff:192.0.2.1"), client("192.0.2.1"));
        assert_eq!(client("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn limits_per_client_and_in_all_and_no_leftover_entries() {
        let clients = clients(2, 2, 1);
        let (a, b) = (client("192.0.2.1"), client("192.0.2.2"));
        let (oa, ob) = (origin("192.0.2.1"), origin("192.0.2.2"));
        let a1 = clients.connect(ip("192.0.2.1")).unwrap();
        let _a2 = clients.connect(ip("192.0.2.1")).unwrap();
        assert!(!a1.is_provisional());
        // Beyond the client's limit: provisional, to be closed unless its
        // first call proves a key.
        let a3 = clients.connect(ip("192.0.2.1")).unwrap();
        assert!(a3.is_provisional());
        assert_eq!(a3.unproven(), Refused::Unproven(a, 2));
        drop(a3);
        let _b1 = clients.connect(ip("192.0.2.2")).unwrap();
        let s1 = clients.subscribe(a, oa).unwrap();
        let _s2 = clients.subscribe(a, oa).unwrap();
        assert_eq!(
            clients
                .subscribe(a, oa)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("192.0.2.1 has reached the limit of 2 subscriptions per client")
        );
        let _s3 = clients.subscribe(b, ob).unwrap();
        let _s4 = clients.subscribe(b, ob).unwrap();
        drop(s1);
        let _s5 = clients.subscribe(a, oa).unwrap();
        // The server's limit (5) holds for all, and a client holding its
        // fair share (5 / 3 clients: 1) gets no more.
        let (c, oc) = (client("192.0.2.3"), origin("192.0.2.3"));
        let _c1 = clients.connect(ip("192.0.2.3")).unwrap();
        let _c2 = clients.subscribe(c, oc).unwrap();
        assert_eq!(
            clients.subscribe(c, oc).err(),
            Some(Refused::Subscriptions(5))
        );
        let call = clients.call(a, oa).unwrap();
        assert_eq!(clients.call(a, oa).err(), Some(Refused::ClientCalls(a, 1)));
        drop(call);
        drop(a1);
        assert_eq!(clients.counts(a), Some((1, 2, 0)));
        drop((_a2, _s2, _s5));
        assert_eq!(clients.counts(a), None, "an idle client leaves no entry");
    }

    #[test]
    fn a_full_call_cap_serves_a_client_below_its_share_at_the_heaviest_cost() {
        // 4 calls in all; up to 4 per client.
        let clients = clients(2, 2, 4);
        let (a, b) = (client("192.0.2.1"), client("192.0.2.2"));
        let (oa, ob) = (origin("192.0.2.1"), origin("192.0.2.2"));
        let _conns = (
            clients.connect(ip("192.0.2.1")).unwrap(),
            clients.connect(ip("192.0.2.2")).unwrap(),
        );
        let calls_of_a: Vec<SlotGuard> = (0..4).map(|_| clients.call(a, oa).unwrap()).collect();
        assert_eq!(clients.call(a, oa).err(), Some(Refused::ClientCalls(a, 4)));
        // B holds none: it is served, and A's newest call is ended.
        let b1 = clients.call(b, ob).unwrap();
        let ended: Vec<bool> = calls_of_a
            .iter()
            .map(|c| c.ended().is_cancelled())
            .collect();
        assert_eq!(ended, vec![false, false, false, true]);
        // The ended call holds its slot until its guard drops.
        assert_eq!(clients.counts(a), Some((1, 0, 4)));
        // B (1 of 4, two holders: below its share of 2) gets one more.
        let b2 = clients.call(b, ob).unwrap();
        assert!(calls_of_a[2].ended().is_cancelled());
        // Both hold their share: neither gets more.
        assert_eq!(clients.call(b, ob).err(), Some(Refused::Calls(4)));
        assert_eq!(clients.call(a, oa).err(), Some(Refused::ClientCalls(a, 4)));
        assert!(!calls_of_a[1].ended().is_cancelled());
        drop(calls_of_a);
        assert_eq!(clients.counts(a), Some((1, 0, 0)));
        assert_eq!(clients.counts(b), Some((1, 0, 2)));
        let _a1 = clients.call(a, oa).unwrap();
        let _a2 = clients.call(a, oa).unwrap();
        assert_eq!(clients.call(a, oa).err(), Some(Refused::Calls(4)));
        drop((b1, b2));
        assert_eq!(clients.counts(b), Some((1, 0, 0)));
    }

    #[test]
    fn health_watches_have_their_own_pool() {
        let clients = clients(2, 2, 64);
        let (a, oa) = (client("192.0.2.1"), origin("192.0.2.1"));
        let _conn = clients.connect(ip("192.0.2.1")).unwrap();
        let watches: Vec<SlotGuard> = (0..HEALTH_WATCHES_PER_CLIENT)
            .map(|_| clients.health_watch(a, oa).unwrap())
            .collect();
        assert_eq!(
            clients.health_watch(a, oa).err(),
            Some(Refused::ClientHealthWatches(a, HEALTH_WATCHES_PER_CLIENT))
        );
        // Checks and the other services' calls are apart.
        let _check = clients.health_check(a, oa).unwrap();
        let _bridged = clients.bridged(a, oa).unwrap();
        drop(watches);
        let _watch = clients.health_watch(a, oa).unwrap();
    }

    #[test]
    fn publish_rates() {
        let clients = clients(1, 1, 1);
        let a = client("192.0.2.1");
        let oa = origin("192.0.2.1");
        for _ in 0..3 {
            clients.check_publish(a, oa, 10).unwrap();
        }
        // 3 a second: the next token comes within a third of a second.
        let refused = clients.check_publish(a, oa, 10).unwrap_err();
        assert!(
            matches!(refused, Refused::PublishRate(c, 3, wait)
                if c == a && wait > Duration::ZERO && wait <= Duration::from_millis(334)),
            "{refused:?}"
        );
        let status = refused.status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let pushback: u64 = status
            .metadata()
            .get(PUSHBACK_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("a pushback");
        assert!((1..=334).contains(&pushback), "{pushback}");
        // Another client has its own buckets; bytes beyond a burst are refused.
        let b = client("192.0.2.2");
        assert!(matches!(
            clients.check_publish(b, origin("192.0.2.2"), 1001).err(),
            Some(Refused::PublishBytesRate(c, 1000, _)) if c == b
        ));
    }

    #[test]
    fn a_client_below_its_fair_share_takes_the_newest_of_the_largest_holder() {
        // A cap of 6 subscriptions, 4 per client.
        let clients = Arc::new(Clients::new(limits(8, 4, 8), 100, 6, 8, Gauge::default()));
        let (a, b, c) = (
            client("192.0.2.1"),
            client("192.0.2.2"),
            client("192.0.2.3"),
        );
        let (oa, ob, oc) = (
            origin("192.0.2.1"),
            origin("192.0.2.2"),
            origin("192.0.2.3"),
        );
        let mut held_a = Vec::new();
        for _ in 0..4 {
            let guard = clients.subscribe(a, oa).unwrap();
            let flag = victim(&guard);
            held_a.push((guard, flag));
        }
        let b1 = clients.subscribe(b, ob).unwrap();
        let b1_flag = victim(&b1);
        let _b2 = clients.subscribe(b, ob).unwrap();
        // Full. c holds none, less than 6 / 3: a (the most) loses its newest.
        let c1 = clients.subscribe(c, oc).unwrap();
        let evicted: Vec<bool> = held_a.iter().map(|(_, f)| f.evicted()).collect();
        assert_eq!(evicted, [false, false, false, true]);
        assert!(!b1_flag.evicted());
        // Until it is gone, a counts 3; c holds 1 < 6 / 3 = 2: a again.
        let _c2 = clients.subscribe(c, oc).unwrap();
        let evicted: Vec<bool> = held_a.iter().map(|(_, f)| f.evicted()).collect();
        assert_eq!(evicted, [false, false, true, true]);
        // c has its share now; and no more may be evicted than the cap
        // lets in: refused.
        assert_eq!(
            clients.subscribe(c, oc).err(),
            Some(Refused::Subscriptions(6))
        );
        // The evicted end: their slots go, and the total is the cap.
        held_a.truncate(2);
        assert_eq!(clients.table.lock().totals[Kind::Subscription.index()], 6);
        assert_eq!(
            clients.table.lock().doomed_count[Kind::Subscription.index()],
            0
        );
        drop(c1);
        assert_eq!(clients.counts(c), Some((0, 1, 0)));
    }

    #[test]
    fn connections_are_shared_fairly_at_the_cap_and_move_to_their_key() {
        let clients = Arc::new(Clients::new(limits(3, 4, 8), 4, 100, 8, Gauge::default()));
        let mut held = Vec::new();
        for _ in 0..4 {
            let guard = clients.connect(ip("192.0.2.1")).unwrap();
            let flag = victim(&guard);
            held.push((guard, flag));
        }
        assert!(held[3].0.is_provisional());
        // The fourth proves a key: the address holds 3 again, the key 1.
        let key = Key::from([7; 32]);
        held[3].0.prove(key).unwrap();
        assert!(!held[3].0.is_provisional());
        assert_eq!(clients.counts(client("192.0.2.1")), Some((3, 0, 0)));
        assert_eq!(clients.counts(Client::Key(key)), Some((1, 0, 0)));
        // Full; a newcomer takes the newest of the address.
        let _new = clients.connect(ip("192.0.2.9")).unwrap();
        let evicted: Vec<bool> = held.iter().map(|(_, f)| f.evicted()).collect();
        assert_eq!(evicted, [false, false, true, false]);
    }

    #[test]
    fn an_ipv6_48_is_bounded_as_a_few_addresses() {
        let mut limits = limits(100, 100, 100);
        limits.address.connections = 2;
        let clients = Arc::new(Clients::new(limits, 1000, 100, 100, Gauge::default()));
        let mut held = Vec::new();
        // A /64 holds 2; the /48 holds 4 x 2: 4 /64s' worth, not 65 536.
        assert_eq!(SITE_FACTOR, 4);
        for n in 0..4 {
            for _ in 0..2 {
                held.push(clients.connect(ip(&format!("2001:db8:1:{n}::1"))).unwrap());
            }
            assert!(matches!(
                clients.connect(ip(&format!("2001:db8:1:{n}::2"))).err(),
                Some(Refused::AddressConnections(Prefix::Address(_), 2))
            ));
        }
        let refused = clients.connect(ip("2001:db8:1:99::1")).err().unwrap();
        assert_eq!(
            refused.to_string(),
            "network 2001:db8:1::/48 has reached its limit of 8 connections"
        );
        // Another /48 is another network.
        held.push(clients.connect(ip("2001:db8:2::1")).unwrap());
    }

    #[test]
    fn pushback_rounds_up_to_whole_milliseconds() {
        assert_eq!(pushback_ms(Duration::ZERO), 1);
        assert_eq!(pushback_ms(Duration::from_nanos(1)), 1);
        assert_eq!(pushback_ms(Duration::from_micros(1001)), 2);
        assert_eq!(pushback_ms(Duration::from_millis(250)), 250);
        // Slot limits carry none: only time held by others frees them.
        assert!(
            Refused::Calls(4)
                .status()
                .metadata()
                .get(PUSHBACK_METADATA)
                .is_none()
        );
    }

    #[test]
    fn budgets_reserve_both_or_neither() {
        let (client, server) = (Budget::new(10), Budget::new(15));
        reserve(&client, &server, 8).unwrap();
        assert_eq!(reserve(&client, &server, 3), Err(Exhausted::Client));
        let other = Budget::new(10);
        assert_eq!(reserve(&other, &server, 8), Err(Exhausted::Server));
        assert_eq!((client.used(), other.used(), server.used()), (8, 0, 8));
        client.release(8);
        server.release(8);
        assert_eq!(server.used(), 0);
    }
}
