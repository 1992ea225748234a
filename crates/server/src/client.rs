//! Clients and what each may hold (docs/PROTOCOL.md §10).
//!
//! A client is a remote IP address, an IPv6 address by its /64. Everything a
//! client makes the server hold is counted against it: its connections,
//! subscriptions and calls in progress (counts), the bytes queued for its
//! subscriptions and handed to HTTP/2 and not yet written (its byte
//! [`Budget`]), and its rates (new
//! connections, publishes and published bytes per second, token buckets).
//! The server's own limits apply besides, so that many clients together stay
//! bounded too.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use cunicu_signal::backend::grpc::PUSHBACK_METADATA;
use governor::{
    DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter,
    clock::{Clock as _, QuantaInstant},
};
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Who a connection, subscription or call belongs to: the remote IP address;
/// an IPv6 address by its /64, as a host usually holds a whole /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(IpAddr);

impl Client {
    /// The client at an IPv4 address, in a constant.
    #[cfg(test)]
    pub(crate) const fn of_const(v4: [u8; 4]) -> Client {
        Client(IpAddr::V4(std::net::Ipv4Addr::new(
            v4[0], v4[1], v4[2], v4[3],
        )))
    }

    /// The client at `addr`.
    pub fn of(addr: IpAddr) -> Client {
        match addr {
            IpAddr::V4(_) => Client(addr),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(IpAddr::V4(v4)),
                None => Client(IpAddr::V6(Ipv6Addr::from_bits(
                    v6.to_bits() & !u128::from(u64::MAX),
                ))),
            },
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
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

/// The limits of one client.
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
}

#[derive(Debug)]
struct Entry {
    state: Arc<ClientState>,
    connections: usize,
    subscriptions: usize,
    calls: usize,
    bridged: usize,
    health_checks: usize,
    health_watches: usize,
    /// The slots of the kinds that a fair share frees (all but
    /// subscriptions), oldest first: how to end each.
    held: Vec<Held>,
}

/// A slot that the server can take back for a client below its fair share.
#[derive(Debug)]
struct Held {
    id: u64,
    kind: Slot,
    ended: CancellationToken,
}

impl Entry {
    /// How many slots of kind `slot` the client holds.
    fn count(&mut self, slot: Slot) -> &mut usize {
        match slot {
            Slot::Subscription => &mut self.subscriptions,
            Slot::Call => &mut self.calls,
            Slot::Bridged => &mut self.bridged,
            Slot::HealthCheck => &mut self.health_checks,
            Slot::HealthWatch => &mut self.health_watches,
        }
    }

    fn is_empty(&self) -> bool {
        self.connections == 0
            && self.subscriptions == 0
            && self.calls == 0
            && self.bridged == 0
            && self.health_checks == 0
            && self.health_watches == 0
    }
}

/// Calls of the services served through tonic (GetBuildInfo, GetRelays,
/// health, reflection) in progress at once, in all and per client: each may
/// buffer a response (a reflection answer is tens of KiB), and peers make
/// them rarely.
pub(crate) const BRIDGED_CALLS: usize = 256;
/// The same per client.
pub(crate) const BRIDGED_CALLS_PER_CLIENT: usize = 16;
/// `grpc.health.v1.Health/Check` calls in progress at once, in all: apart
/// from the other services' calls, so that a health check never waits
/// behind them (its request and answer are a few bytes).
pub(crate) const HEALTH_CHECKS: usize = 256;
/// The same per client.
pub(crate) const HEALTH_CHECKS_PER_CLIENT: usize = 16;
/// `grpc.health.v1.Health/Watch` streams open at once, in all: a watch
/// lasts (until `--health-watch-lifetime`), so they have a small pool of
/// their own.
pub(crate) const HEALTH_WATCHES: usize = 64;
/// The same per client.
pub(crate) const HEALTH_WATCHES_PER_CLIENT: usize = 4;

/// Rate-limiter entries (clients seen lately) above which the entries of
/// clients back to a full bucket are forgotten at once, not at the next
/// periodic sweep: many addresses each connecting once must not grow them.
const RATE_ENTRIES: usize = 16 * 1024;

/// A limit of a client or of the server was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("{0} has reached the limit of {1} connections per client")]
    ClientConnections(Client, usize),
    #[error("{0} opens connections faster than {1} per second")]
    ConnectionRate(Client, u32, Duration),
    #[error("{0} has reached the limit of {1} subscriptions per client")]
    ClientSubscriptions(Client, usize),
    #[error("the server has reached its limit of {0} subscriptions")]
    Subscriptions(usize),
    #[error("{0} has reached the limit of {1} calls in progress per client")]
    ClientCalls(Client, usize),
    #[error("the server has reached its limit of {0} calls in progress")]
    Calls(usize),
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
    #[error("{0} publishes faster than {1} bytes per second")]
    PublishBytesRate(Client, u32, Duration),
}

impl Refused {
    /// For a refusal by a rate: how long until the client's bucket has room
    /// again (at least 1 ms). `None` for a limit that only time held by
    /// others frees.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Refused::ConnectionRate(.., wait)
            | Refused::RequestRate(.., wait)
            | Refused::PublishRate(.., wait)
            | Refused::PublishBytesRate(.., wait) => Some(*wait),
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

    /// The `reason` label of the metric that counts it.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refused::ClientConnections(..) => "too_many_client_connections",
            Refused::ConnectionRate(..) => "connection_rate",
            Refused::ClientSubscriptions(..) => "too_many_client_subscriptions",
            Refused::Subscriptions(..) => "too_many_subscriptions",
            Refused::ClientCalls(..) => "too_many_client_calls",
            Refused::Calls(..) => "too_many_calls",
            Refused::ClientBridged(..) => "too_many_client_service_calls",
            Refused::Bridged(..) => "too_many_service_calls",
            Refused::ClientHealthChecks(..) => "too_many_client_health_checks",
            Refused::HealthChecks(..) => "too_many_health_checks",
            Refused::ClientHealthWatches(..) => "too_many_client_health_watches",
            Refused::HealthWatches(..) => "too_many_health_watches",
            Refused::RequestRate(..) => "request_rate",
            Refused::PublishRate(..) => "publish_rate",
            Refused::PublishBytesRate(..) => "publish_bytes_rate",
        }
    }
}

/// Every client with something open, and the rate limiters of all.
pub(crate) struct Clients {
    table: Mutex<HashMap<Client, Entry>>,
    limits: ClientLimits,
    subscriptions: AtomicUsize,
    max_subscriptions: usize,
    calls: AtomicUsize,
    max_calls: usize,
    bridged: AtomicUsize,
    health_checks: AtomicUsize,
    health_watches: AtomicUsize,
    /// Numbers the slots that a fair share can take back.
    next_held: std::sync::atomic::AtomicU64,
    /// The end signal of the slots no fair share takes back here
    /// (subscriptions): one, never cancelled, shared, since a subscription
    /// holds its slot as long as it lives and a token each would cost
    /// memory per subscription for nothing.
    never_ended: CancellationToken,
    /// When rate-limiter entries were last forgotten, in ms since `created`.
    forgotten_at: std::sync::atomic::AtomicU64,
    created: std::time::Instant,
    connection_rate: DefaultKeyedRateLimiter<Client>,
    request_rate: DefaultKeyedRateLimiter<Client>,
    publish_rate: DefaultKeyedRateLimiter<Client>,
    publish_bytes_rate: DefaultKeyedRateLimiter<Client>,
    /// Clients in the table.
    gauge: Gauge,
}

impl Clients {
    /// Clients with these limits, counted in `gauge`.
    pub(crate) fn new(
        limits: ClientLimits,
        max_subscriptions: usize,
        max_calls: usize,
        gauge: Gauge,
    ) -> Self {
        Clients {
            table: Mutex::new(HashMap::new()),
            limits,
            subscriptions: AtomicUsize::new(0),
            max_subscriptions,
            calls: AtomicUsize::new(0),
            max_calls,
            bridged: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            health_watches: AtomicUsize::new(0),
            next_held: std::sync::atomic::AtomicU64::new(0),
            never_ended: CancellationToken::new(),
            forgotten_at: std::sync::atomic::AtomicU64::new(0),
            created: std::time::Instant::now(),
            connection_rate: RateLimiter::keyed(limits.connection_rate.quota()),
            request_rate: RateLimiter::keyed(limits.request_rate.quota()),
            publish_rate: RateLimiter::keyed(limits.publish_rate.quota()),
            publish_bytes_rate: RateLimiter::keyed(limits.publish_bytes_rate.quota()),
            gauge,
        }
    }

    /// Admits a new connection of `client`: within its rate and its limit.
    pub(crate) fn connect(self: &Arc<Self>, client: Client) -> Result<ConnectionGuard, Refused> {
        if self.connection_rate.len() > RATE_ENTRIES {
            self.forget_idle_rates_soon();
        }
        if let Err(not_until) = self.connection_rate.check_key(&client) {
            return Err(Refused::ConnectionRate(
                client,
                self.limits.connection_rate.per_second.get(),
                self.wait(&self.connection_rate, &not_until),
            ));
        }
        let mut table = self.table.lock();
        let entry = table.entry(client).or_insert_with(|| {
            self.gauge.inc();
            Entry {
                state: Arc::new(ClientState {
                    client,
                    budget: Budget::new(self.limits.queued_bytes),
                }),
                connections: 0,
                subscriptions: 0,
                calls: 0,
                bridged: 0,
                health_checks: 0,
                health_watches: 0,
                held: Vec::new(),
            }
        });
        if entry.connections >= self.limits.connections {
            return Err(Refused::ClientConnections(client, self.limits.connections));
        }
        entry.connections += 1;
        Ok(ConnectionGuard {
            clients: self.clone(),
            state: entry.state.clone(),
        })
    }

    /// Takes a subscription slot of `client` and of the server.
    pub(crate) fn subscribe(self: &Arc<Self>, client: Client) -> Result<SlotGuard, Refused> {
        self.take(client, Slot::Subscription)
    }

    /// Takes a slot for a call in progress (anything but an established
    /// subscription) of `client` and of the server.
    pub(crate) fn call(self: &Arc<Self>, client: Client) -> Result<SlotGuard, Refused> {
        self.take(client, Slot::Call)
    }

    /// Takes a slot for a call of a service served through tonic, besides its
    /// call slot.
    pub(crate) fn bridged(self: &Arc<Self>, client: Client) -> Result<SlotGuard, Refused> {
        self.take(client, Slot::Bridged)
    }

    /// Takes a slot for a health check, besides its call slot (and instead
    /// of a slot of the other services served through tonic).
    pub(crate) fn health_check(self: &Arc<Self>, client: Client) -> Result<SlotGuard, Refused> {
        self.take(client, Slot::HealthCheck)
    }

    /// Takes a slot for a health watch stream, besides its call slot.
    pub(crate) fn health_watch(self: &Arc<Self>, client: Client) -> Result<SlotGuard, Refused> {
        self.take(client, Slot::HealthWatch)
    }

    /// Takes a `slot` of `client` (within its limit per client) and of the
    /// server (within the server's). When the server's are all taken, a
    /// client that holds less than its fair share (the limit divided by the
    /// clients holding any, itself included) still gets one: the client
    /// holding the most gives up its newest, whose call ends (the owner of
    /// its guard sees [`SlotGuard::ended`]). Subscriptions are not taken
    /// back here.
    fn take(self: &Arc<Self>, client: Client, slot: Slot) -> Result<SlotGuard, Refused> {
        let (total, max) = self.total(slot);
        let per_client = match slot {
            Slot::Subscription => self.limits.subscriptions,
            Slot::Call => self.limits.calls,
            Slot::Bridged => BRIDGED_CALLS_PER_CLIENT,
            Slot::HealthCheck => HEALTH_CHECKS_PER_CLIENT,
            Slot::HealthWatch => HEALTH_WATCHES_PER_CLIENT,
        };
        let mut table = self.table.lock();
        let entry = table
            .get_mut(&client)
            // A client with a slot has a connection, so an entry.
            .ok_or(slot.refused_client(client, 0))?;
        let mine = *entry.count(slot);
        if mine >= per_client {
            return Err(slot.refused_client(client, per_client));
        }
        if total
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_err()
        {
            // The server's slots are all taken: the heaviest holder's newest
            // becomes this client's, if this client is below its share.
            if slot == Slot::Subscription || !self.take_back(&mut table, client, slot, mine, max) {
                return Err(slot.refused_server(max));
            }
        }
        let Some(entry) = table.get_mut(&client) else {
            // Not reached: the entry is there, and taking back a slot of
            // another client leaves it.
            total.fetch_sub(1, Relaxed);
            return Err(slot.refused_client(client, 0));
        };
        *entry.count(slot) += 1;
        let id = self.next_held.fetch_add(1, Relaxed);
        let ended = if slot == Slot::Subscription {
            self.never_ended.clone()
        } else {
            let ended = CancellationToken::new();
            entry.held.push(Held {
                id,
                kind: slot,
                ended: ended.clone(),
            });
            ended
        };
        Ok(SlotGuard {
            clients: self.clone(),
            client,
            kind: slot,
            id,
            ended,
        })
    }

    /// The server's count of `slot`s taken, and its limit.
    fn total(&self, slot: Slot) -> (&AtomicUsize, usize) {
        match slot {
            Slot::Subscription => (&self.subscriptions, self.max_subscriptions),
            Slot::Call => (&self.calls, self.max_calls),
            Slot::Bridged => (&self.bridged, BRIDGED_CALLS),
            Slot::HealthCheck => (&self.health_checks, HEALTH_CHECKS),
            Slot::HealthWatch => (&self.health_watches, HEALTH_WATCHES),
        }
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
    fn wait(
        &self,
        limiter: &DefaultKeyedRateLimiter<Client>,
        not_until: &NotUntil<QuantaInstant>,
    ) -> Duration {
        not_until.wait_time_from(limiter.clock().now())
    }

    /// One publish of `bytes` bytes by `client`, within its rates.
    pub(crate) fn check_publish(&self, client: Client, bytes: usize) -> Result<(), Refused> {
        if let Err(not_until) = self.publish_rate.check_key(&client) {
            return Err(Refused::PublishRate(
                client,
                self.limits.publish_rate.per_second.get(),
                self.wait(&self.publish_rate, &not_until),
            ));
        }
        let per_second = self.limits.publish_bytes_rate.per_second.get();
        let n =
            NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match self.publish_bytes_rate.check_key_n(&client, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refused::PublishBytesRate(
                client,
                per_second,
                self.wait(&self.publish_bytes_rate, &not_until),
            )),
            // More than a whole burst: the configuration keeps the burst at
            // least one largest envelope, so this is not reached; waiting a
            // burst's worth of time is what comes closest.
            Err(_) => Err(Refused::PublishBytesRate(
                client,
                per_second,
                Duration::from_secs(1),
            )),
        }
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
    }

    /// `(connections, subscriptions, calls)` of `client`, for tests.
    #[cfg(test)]
    pub(crate) fn counts(&self, client: Client) -> Option<(usize, usize, usize)> {
        self.table
            .lock()
            .get(&client)
            .map(|e| (e.connections, e.subscriptions, e.calls))
    }

    fn release(&self, client: Client, kind: Option<(Slot, u64)>) {
        let mut table = self.table.lock();
        let Some(entry) = table.get_mut(&client) else {
            return;
        };
        match kind {
            None => entry.connections -= 1,
            Some((Slot::Subscription, _)) => {
                entry.subscriptions -= 1;
                self.subscriptions.fetch_sub(1, Relaxed);
            }
            Some((slot, id)) => {
                // A slot taken back for another client was given up then.
                let Some(at) = entry.held.iter().position(|h| h.id == id) else {
                    return;
                };
                entry.held.remove(at);
                *entry.count(slot) -= 1;
                self.total(slot).0.fetch_sub(1, Relaxed);
            }
        }
        if entry.is_empty() {
            table.remove(&client);
            self.gauge.dec();
        }
    }

    /// The server's `slot`s are all taken and `client` holds `mine` of them:
    /// if that is below its fair share of `max`, the client holding the most
    /// gives up its newest (ended, and no longer counted: it is `client`'s
    /// now). O(clients): only at a full cap.
    fn take_back(
        &self,
        table: &mut HashMap<Client, Entry>,
        client: Client,
        slot: Slot,
        mine: usize,
        max: usize,
    ) -> bool {
        let mut holders = usize::from(mine == 0);
        let mut heaviest: Option<(Client, usize)> = None;
        for (&other, entry) in table.iter_mut() {
            let n = *entry.count(slot);
            if n == 0 {
                continue;
            }
            holders += 1;
            if heaviest.is_none_or(|(_, most)| n > most) {
                heaviest = Some((other, n));
            }
        }
        // mine < max / holders, without fractions.
        let Some((heaviest, most)) = heaviest else {
            return false;
        };
        if mine * holders >= max || heaviest == client || most <= mine + 1 {
            return false;
        }
        let Some(entry) = table.get_mut(&heaviest) else {
            return false;
        };
        let Some(at) = entry.held.iter().rposition(|h| h.kind == slot) else {
            return false;
        };
        let held = entry.held.remove(at);
        *entry.count(slot) -= 1;
        held.ended.cancel();
        if entry.is_empty() {
            table.remove(&heaviest);
            self.gauge.dec();
        }
        true
    }
}

/// `wait` in whole milliseconds, rounded up, at least 1: a client that waits
/// that long finds room.
pub(crate) fn pushback_ms(wait: Duration) -> u64 {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// A connection of a client; released on drop.
pub(crate) struct ConnectionGuard {
    clients: Arc<Clients>,
    state: Arc<ClientState>,
}

impl ConnectionGuard {
    pub(crate) fn state(&self) -> &Arc<ClientState> {
        &self.state
    }

    pub(crate) fn clients(&self) -> &Arc<Clients> {
        &self.clients
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.clients.release(self.state.client, None);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Subscription,
    Call,
    Bridged,
    HealthCheck,
    HealthWatch,
}

impl Slot {
    /// Refused: `client` holds `limit` slots of this kind.
    fn refused_client(self, client: Client, limit: usize) -> Refused {
        match self {
            Slot::Subscription => Refused::ClientSubscriptions(client, limit),
            Slot::Call => Refused::ClientCalls(client, limit),
            Slot::Bridged => Refused::ClientBridged(client, limit),
            Slot::HealthCheck => Refused::ClientHealthChecks(client, limit),
            Slot::HealthWatch => Refused::ClientHealthWatches(client, limit),
        }
    }

    /// Refused: the server holds `max` slots of this kind.
    fn refused_server(self, max: usize) -> Refused {
        match self {
            Slot::Subscription => Refused::Subscriptions(max),
            Slot::Call => Refused::Calls(max),
            Slot::Bridged => Refused::Bridged(max),
            Slot::HealthCheck => Refused::HealthChecks(max),
            Slot::HealthWatch => Refused::HealthWatches(max),
        }
    }
}

/// A subscription or call slot of a client; released on drop.
pub(crate) struct SlotGuard {
    clients: Arc<Clients>,
    client: Client,
    kind: Slot,
    id: u64,
    ended: CancellationToken,
}

impl SlotGuard {
    /// Cancelled when the server took the slot back for a client below its
    /// fair share: the call ends (RESOURCE_EXHAUSTED).
    pub(crate) fn ended(&self) -> &CancellationToken {
        &self.ended
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.clients
            .release(self.client, Some((self.kind, self.id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(n: u32) -> Rate {
        let n = NonZeroU32::new(n).unwrap();
        Rate {
            per_second: n,
            burst: n,
        }
    }

    fn clients(connections: usize, subscriptions: usize, calls: usize) -> Arc<Clients> {
        Arc::new(Clients::new(
            ClientLimits {
                connections,
                subscriptions,
                calls,
                queued_bytes: 1000,
                connection_rate: rate(100),
                request_rate: rate(100),
                publish_rate: rate(3),
                publish_bytes_rate: rate(1000),
            },
            5,
            4,
            Gauge::default(),
        ))
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
        let a1 = clients.connect(a).unwrap();
        let _a2 = clients.connect(a).unwrap();
        assert_eq!(
            clients.connect(a).err(),
            Some(Refused::ClientConnections(a, 2))
        );
        let _b1 = clients.connect(b).unwrap();
        let s1 = clients.subscribe(a).unwrap();
        let _s2 = clients.subscribe(a).unwrap();
        assert_eq!(
            clients.subscribe(a).err().map(|e| e.to_string()).as_deref(),
            Some("192.0.2.1 has reached the limit of 2 subscriptions per client")
        );
        let _s3 = clients.subscribe(b).unwrap();
        let _s4 = clients.subscribe(b).unwrap();
        drop(s1);
        let _s5 = clients.subscribe(a).unwrap();
        // The server's limit (5) holds for all.
        let c = client("192.0.2.3");
        let _c1 = clients.connect(c).unwrap();
        let _c2 = clients.subscribe(c).unwrap();
        assert_eq!(clients.subscribe(c).err(), Some(Refused::Subscriptions(5)));
        let call = clients.call(a).unwrap();
        assert_eq!(clients.call(a).err(), Some(Refused::ClientCalls(a, 1)));
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
        let _conns = (clients.connect(a).unwrap(), clients.connect(b).unwrap());
        let calls_of_a: Vec<SlotGuard> = (0..4).map(|_| clients.call(a).unwrap()).collect();
        assert_eq!(clients.call(a).err(), Some(Refused::ClientCalls(a, 4)));
        // B holds none: it is served, and A's newest call is ended.
        let b1 = clients.call(b).unwrap();
        let ended: Vec<bool> = calls_of_a
            .iter()
            .map(|c| c.ended().is_cancelled())
            .collect();
        assert_eq!(ended, vec![false, false, false, true]);
        assert_eq!(clients.counts(a), Some((1, 0, 3)));
        // B (1 of 4, two holders: below its share of 2) gets one more.
        let b2 = clients.call(b).unwrap();
        assert!(calls_of_a[2].ended().is_cancelled());
        // Both hold their share: neither gets more.
        assert_eq!(clients.call(b).err(), Some(Refused::Calls(4)));
        assert_eq!(clients.call(a).err(), Some(Refused::Calls(4)));
        assert!(!calls_of_a[1].ended().is_cancelled());
        // Ended calls give nothing back twice when their guards go.
        drop(calls_of_a);
        assert_eq!(clients.counts(a), Some((1, 0, 0)));
        assert_eq!(clients.counts(b), Some((1, 0, 2)));
        let _a1 = clients.call(a).unwrap();
        let _a2 = clients.call(a).unwrap();
        assert_eq!(clients.call(a).err(), Some(Refused::Calls(4)));
        drop((b1, b2));
        assert_eq!(clients.counts(b), Some((1, 0, 0)));
    }

    #[test]
    fn health_watches_have_their_own_pool() {
        let clients = clients(2, 2, 64);
        let a = client("192.0.2.1");
        let _conn = clients.connect(a).unwrap();
        let watches: Vec<SlotGuard> = (0..HEALTH_WATCHES_PER_CLIENT)
            .map(|_| clients.health_watch(a).unwrap())
            .collect();
        assert_eq!(
            clients.health_watch(a).err(),
            Some(Refused::ClientHealthWatches(a, HEALTH_WATCHES_PER_CLIENT))
        );
        // Checks and the other services' calls are apart.
        let _check = clients.health_check(a).unwrap();
        let _bridged = clients.bridged(a).unwrap();
        drop(watches);
        let _watch = clients.health_watch(a).unwrap();
    }

    #[test]
    fn publish_rates() {
        let clients = clients(1, 1, 1);
        let a = client("192.0.2.1");
        for _ in 0..3 {
            clients.check_publish(a, 10).unwrap();
        }
        // 3 a second: the next token comes within a third of a second.
        let refused = clients.check_publish(a, 10).unwrap_err();
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
            clients.check_publish(b, 1001).err(),
            Some(Refused::PublishBytesRate(c, 1000, _)) if c == b
        ));
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
