//! The server's fixed bounds: the caps, batch sizes, cache sizes and
//! timers that no setting changes. Each says what it bounds and why it has
//! its value. What an operator sets is in [`crate::config`]; what a thing
//! costs in memory (a measured figure, not a bound) stays by what it
//! measures.

use std::time::Duration;

// Connections and HTTP/2.

/// HTTP/2 receive window of one stream: one largest request fits, so a
/// Publish needs no window update, and a client can make a stream hold no
/// more.
pub(crate) const STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 receive window of a connection: four streams' worth, so that a
/// few calls in progress on one connection are not held up by each other,
/// while a connection that never finishes its requests holds no more.
pub(crate) const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Largest header block a client may send: a call's headers are its path,
/// a few gRPC headers and at most one proof (well under 1 KiB); 16 KiB
/// leaves room for proxies' headers and bounds what one block costs.
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;
/// What h2 may buffer per stream for the responses of bridged calls: one
/// large answer (a reflection answer is tens of KiB) fits, so tonic hands
/// it over at once, and no stream makes h2 hold more.
pub(crate) const SEND_BUFFER: usize = 64 * 1024;
/// Loop turns of a connection's task before it lets other tasks run: a
/// busy connection (a publisher that never pauses) cannot keep a worker
/// thread from the others for more than this many turns.
pub(crate) const MAX_TURNS: usize = 64;
/// Requests a connection's task takes in one turn at most: enough for what
/// one read brings from busy publishers, and few enough that the calls taken
/// run before more come in (a burst of Subscribes from one client is taken in
/// steps, not all at once against its limit of calls in progress).
pub(crate) const MAX_ACCEPTS: usize = 4;
/// Streams refused on one connection for the client's request rate before
/// the connection is closed (GOAWAY `ENHANCE_YOUR_CALM`): a client that
/// ignored a thousand answers telling it when to come back will not heed
/// the next, and each refusal costs the server a HEADERS frame; h2 gives up
/// on a connection after as many protocol errors, too.
pub(crate) const REFUSED_BEFORE_CLOSE: u32 = 1024;
/// How long a connection ended to make room for another client's fair
/// share, or for want of a proof, has to let its last answers out: a
/// round trip on any link, and short enough that the slot it frees is soon
/// free.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Pause after an accept error (e.g. out of file descriptors) before trying
/// again: the error would come back at once, so accepting without a pause
/// would spin; a tenth of a second is not felt by a client once it clears.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

// Request messages.

/// The request message of a Subscribe is a key, of GetBuildInfo nothing: a
/// few dozen bytes; 1 KiB is ample, and bounds what such a call makes the
/// server read.
pub(crate) const MAX_SMALL_REQUEST: usize = 1024;
/// Request bytes a bridged call may send: these services take small
/// requests (a key, a service's name); a reflection request names a
/// symbol or a file.
pub(crate) const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Request bytes a health check or watch may send: the name of a service.
pub(crate) const MAX_HEALTH_REQUEST_BYTES: usize = 1024;

// Pools of calls, fair shares and rates.

/// Evictions in progress at once, of connections and of subscriptions
/// each: the server admits that many beyond its cap while the evicted end
/// (each within a turn of its connection's task), so a burst of newcomers
/// below their fair share is served without the cap growing much.
pub(crate) const EVICTIONS_IN_FLIGHT: usize = 64;
/// The same for each pool of calls, whose ended calls go sooner still.
pub(crate) const CALL_EVICTIONS_IN_FLIGHT: usize = 16;
/// Calls of the services served through tonic (GetRelays, reflection;
/// health has pools of its own) in progress at once, in all: each may
/// buffer a response (a reflection answer is tens of KiB), and peers make
/// them rarely (GetRelays when their TURN credentials run out).
pub(crate) const BRIDGED_CALLS: usize = 256;
/// The same per client: a sixteenth, so that a few clients cannot take
/// the pool.
pub(crate) const BRIDGED_CALLS_PER_CLIENT: usize = 16;
/// `grpc.health.v1.Health/Check` calls in progress at once, in all: apart
/// from the other services' calls, so that a health check never waits
/// behind them (its request and answer are a few bytes). A few probes per
/// replica use it.
pub(crate) const HEALTH_CHECKS: usize = 256;
/// The same per client: a sixteenth, as for the other services.
pub(crate) const HEALTH_CHECKS_PER_CLIENT: usize = 16;
/// `grpc.health.v1.Health/Watch` streams open at once, in all: a watch
/// lasts (until `--health-watch-lifetime`), so they have a small pool of
/// their own.
pub(crate) const HEALTH_WATCHES: usize = 64;
/// The same per client: a watcher watches a service or two.
pub(crate) const HEALTH_WATCHES_PER_CLIENT: usize = 4;
/// How many times an address's outer bounds an IPv6 /48 has: a few hosts'
/// worth, not the 65 536 /64s it holds.
pub(crate) const SITE_FACTOR: u32 = 4;
/// Rate-limiter entries (clients seen lately) above which the entries of
/// clients back to a full bucket are forgotten at once, not at the next
/// periodic sweep: many addresses each connecting once must not grow them.
pub(crate) const RATE_ENTRIES: usize = 16 * 1024;
/// How often the rate limiters forget clients that are back to a full
/// bucket (which costs them nothing: a new entry starts full): a sweep
/// every half minute is rare, and [`RATE_ENTRIES`] bounds the entries
/// between sweeps.
pub(crate) const FORGET_RATES_EVERY: Duration = Duration::from_secs(30);

// Subscription queues.

/// At most this many bytes of one subscription are handed to HTTP/2 and not
/// yet written: more waits in the subscription's queue, where it is dropped
/// oldest first if the subscriber does not keep up. One envelope larger than
/// this goes alone. 16 KiB is many envelopes of a few hundred bytes, what
/// peers send; a client that opens huge windows and never reads holds no
/// more in HTTP/2's buffers.
pub(crate) const IN_FLIGHT_PER_STREAM: usize = 16 * 1024;
/// The window a peer must have opened before a frame larger than it is
/// handed to HTTP/2 (which sends the rest as the window grows): a largest
/// envelope exceeds a default window (64 KiB), so it must go before the
/// window holds it, but only to a peer that reads, not to one that opens a
/// few bytes at a time; a quarter of a default window shows that.
pub(crate) const LARGE_FRAME_WINDOW: usize = 16 * 1024;
/// A queue that empties keeps at most this many slots of the capacity it
/// grew to: an idle subscriber holds a handful of slots, not a burst's.
pub(crate) const IDLE_QUEUE_SLOTS: usize = 8;
/// Subscriptions (of the client holding the most) ended at most to make
/// room in the server's full budget for one envelope or request of a
/// client below its fair share: one envelope is at most
/// `--max-envelope-size`, which a few queues free, and one publish never
/// ends many streams.
pub(crate) const MAX_EVICTED_FOR_ROOM: usize = 4;
/// A subscriber that took less than 1/`SLOW` of what it owed over a stall
/// cut-off is too slow: one that keeps up takes about all, one whose link
/// is a few times slower than its feed still takes a good part.
pub(crate) const SLOW: usize = 4;

// Proofs of key possession.

/// Proofs remembered at most (each for the skew window): beyond, proofs are
/// refused rather than a replay let in. With the default skews (65 s),
/// about 2 000 proven calls a second; 160 bytes each, 20 MiB in all.
pub(crate) const MAX_NONCES: usize = 131_072;
/// Nonces one key may hold at once: a peer proves a few calls a second,
/// so a thousand over the skew window is ample, and one key cannot fill the
/// cache for the others.
pub(crate) const NONCES_PER_KEY: usize = 1024;
/// Nonces one client (an address, an IPv6 /64) may hold at once: an eighth,
/// so that one client cannot fill the cache for the others.
pub(crate) const NONCES_PER_CLIENT: usize = MAX_NONCES / 8;
/// Shared keys of (server, client key) kept, least recently used out: a
/// kept key's proofs cost no X25519; 256 bytes each, 4 MiB in all.
pub(crate) const SHARED_KEYS: usize = 16_384;
/// Shared keys of claimed keys whose proof did not open, kept apart: a
/// repeat costs no X25519 and pushes no proven key out.
pub(crate) const UNPROVEN_KEYS: usize = 4096;
/// Proofs of keys not seen before (an X25519 each) one client may send a
/// second: a client is one peer, or a few behind a NAT, which prove a
/// handful of keys; this caps the X25519s one client makes the server do.
pub(crate) const UNKNOWN_KEYS_PER_SECOND: u32 = 32;
/// The same at once: the peers behind a NAT starting together.
pub(crate) const UNKNOWN_KEYS_BURST: u32 = 256;
/// Clients whose rate of unknown keys is tracked, beyond which those back
/// to a full bucket are forgotten: as [`RATE_ENTRIES`].
pub(crate) const UNKNOWN_KEY_CLIENTS: usize = 16 * 1024;
/// How often the allow-keys file is looked at: an edited list takes effect
/// within a second (two reads that agree), and a look is one `stat`.
pub(crate) const WATCH_EVERY: Duration = Duration::from_millis(500);

// Several replicas (NATS).

/// Envelopes waiting for the NATS publisher at most: each holds its bytes
/// (and its entry) in the server's budget besides, so the bytes are bounded
/// there; this bounds the entries while NATS is slow, and what does not fit
/// is dropped and counted rather than making a Publish wait.
pub(crate) const NATS_OUTBOUND: usize = 4096;
/// Commands the NATS client buffers (while disconnected, too): as many as
/// the queue to the publisher, which feeds it.
pub(crate) const NATS_CLIENT_CAPACITY: usize = 4096;
/// Messages one key's NATS subscription holds before dropping: its task
/// hands each to the hub at once, so a few suffice.
pub(crate) const NATS_SUBSCRIPTION_CAPACITY: usize = 64;
/// Bytes handed to the NATS client and not confirmed written at most: with
/// NATS away or hung, no more than this waits in the client's buffers; a
/// flush every 4 MiB costs a busy replica nothing.
pub(crate) const NATS_UNFLUSHED_BYTES: usize = 4 << 20;
/// Recipient counts being collected at once at most; more asking publishes
/// get the local count only. Each waits at most `--recipients-wait`, so
/// with the default (100 ms) this is some 40 000 asking publishes a second.
pub(crate) const MAX_COUNTING: usize = 4096;
/// How long a Subscribe waits for its key's NATS subscription to reach the
/// server, and the publisher for the NATS client to write what it holds:
/// a round trip to NATS, with room for a loaded server; beyond, NATS is
/// taken to be away and the call goes on without it.
pub(crate) const NATS_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between two attempts to reach NATS: the waits double from
/// a tenth of a second, so a NATS that restarts is not hammered, up to
/// this, so a replica is back in the cluster within two seconds of NATS.
pub(crate) const NATS_MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

// Stopping.

/// How long the connections still open after the drain window may take to
/// close (calls in progress being answered) before they are cut: most
/// calls end within a round trip, and a stop must end in bounded time, so
/// what is still open then (a request still being read) is cut.
pub(crate) const AFTER_DRAIN_WINDOW: Duration = Duration::from_secs(5);
