//! Proof of key possession (docs/PROTOCOL.md §11): which calls need one, what a proof
//! must say, the nonces seen, and the list of allowed keys.
//!
//! The format is the library's ([`cunicu_signal::auth`]); here the server
//! decides: the proof must be of the call's key, for the call's method, within
//! the time skew, with a nonce not seen before, and (with `--allow-keys`) of a
//! listed key.
//!
//! What proofs cost the server is bounded per client: proofs of keys it has
//! not seen cost an X25519 each, and a client may make only so many a
//! second (the shared keys of those that did not open are kept in a small
//! cache of their own, so a repeat costs no X25519 and pushes no proven key
//! out); and each key and each client may hold only a share of the nonce
//! cache, so that nobody can fill it for the others. A proof may be dated at
//! most `future_skew` ahead (a few seconds: clocks are close, and a proof
//! dated far ahead would hold its nonce for long), and `skew` behind.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    num::{NonZeroU32, NonZeroUsize},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use cunicu_signal::{
    EnvelopeError, Key, PrivateKey,
    auth::{PROOF_METADATA, Proof, ProofError},
    envelope::{NONCE_LEN, SharedKey, SharedKeyCache},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use tonic::Status;

use crate::{
    bounds::{
        MAX_NONCES, NONCES_PER_CLIENT, NONCES_PER_KEY, SHARED_KEYS, UNKNOWN_KEY_CLIENTS,
        UNKNOWN_KEYS_BURST, UNKNOWN_KEYS_PER_SECOND, UNPROVEN_KEYS, WATCH_EVERY,
    },
    client::Client,
    metrics::Metrics,
    refusal::{AuthResult, Cut},
};

/// Whether calls need a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Proofs are not needed; one that comes is checked and counted, and an
    /// invalid one is otherwise ignored (cunīcu's clients send none).
    #[default]
    Off,
    /// Subscribe, Publish and GetRelays need a proof of their key.
    Required,
}

impl std::str::FromStr for AuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(AuthMode::Off),
            "required" => Ok(AuthMode::Required),
            other => Err(format!("{other:?}: off or required")),
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::Off => "off",
            AuthMode::Required => "required",
        })
    }
}

/// What one remembered nonce costs (its entry, and its share of the counts
/// per key and per client).
pub(crate) const NONCE_BYTES: usize = 160;
/// What the caches of unproven keys and the rates of unknown keys hold at
/// most: a shared key and its entry (256 bytes) each, a client's bucket (64).
pub(crate) const UNKNOWN_KEY_BYTES: usize = UNPROVEN_KEYS * 256 + UNKNOWN_KEY_CLIENTS * 64;

/// The server's key pair.
#[derive(Clone)]
pub(crate) struct ServerKey {
    pub(crate) private: PrivateKey,
    pub(crate) public: Key,
}

/// Why a call was refused, as the metric counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Missing,
    Malformed,
    BadBox,
    WrongKey,
    Expired,
    Replayed,
    LowOrder,
    NotAllowed,
    CacheFull,
    /// The key holds all the nonces it may.
    KeyQuota,
    /// The client holds all the nonces it may.
    ClientQuota,
    /// The client sends proofs of unknown keys faster than it may.
    /// Proofs of unseen keys too fast; the wait until the client's bucket has room.
    UnknownKeyRate(Duration),
}

impl Outcome {
    /// What its counter shows.
    fn result(self) -> AuthResult {
        match self {
            Outcome::Ok => AuthResult::Ok,
            Outcome::Missing => AuthResult::Missing,
            Outcome::Malformed => AuthResult::Malformed,
            Outcome::BadBox => AuthResult::BadBox,
            Outcome::WrongKey => AuthResult::WrongKey,
            Outcome::Expired => AuthResult::Expired,
            Outcome::Replayed => AuthResult::Replayed,
            Outcome::LowOrder => AuthResult::LowOrder,
            Outcome::NotAllowed => AuthResult::NotAllowed,
            Outcome::CacheFull => AuthResult::CacheFull,
            Outcome::KeyQuota => AuthResult::KeyQuota,
            Outcome::ClientQuota => AuthResult::ClientQuota,
            Outcome::UnknownKeyRate(_) => AuthResult::UnknownKeyRate,
        }
    }

    fn status(self, key: &Key, skew: Duration, future_skew: Duration) -> Status {
        let message = match self {
            Outcome::Ok => return Status::ok(""),
            Outcome::Missing => format!(
                "this server requires proof of possession of key {key}: metadata {PROOF_METADATA} \
                 (a cunicu-signal client sends it; cunīcu's own peers do not)"
            ),
            Outcome::Malformed => format!("the proof in {PROOF_METADATA} is malformed"),
            Outcome::BadBox => {
                "the proof does not open for this server's key and this method".to_string()
            }
            Outcome::WrongKey => format!("the proof is not of key {key}"),
            Outcome::Expired => format!(
                "the proof's time is more than {skew:?} behind or {future_skew:?} ahead of the server's clock"
            ),
            Outcome::Replayed => "the proof was used before".to_string(),
            Outcome::LowOrder => "the proof is of a low-order key".to_string(),
            Outcome::NotAllowed => {
                return Status::permission_denied(format!("key {key} is not allowed here"));
            }
            Outcome::CacheFull => {
                "the server remembers all the proofs it may: try again shortly".to_string()
            }
            Outcome::KeyQuota => format!(
                "key {key} has {NONCES_PER_KEY} proofs remembered, all it may: try again shortly"
            ),
            Outcome::ClientQuota => format!(
                "this client has {NONCES_PER_CLIENT} proofs remembered, all it may: try again shortly"
            ),
            Outcome::UnknownKeyRate(wait) => {
                let mut status = Status::resource_exhausted(format!(
                    "this client sends proofs of keys the server has not seen faster than \
                     {UNKNOWN_KEYS_PER_SECOND} per second"
                ));
                status.metadata_mut().insert(
                    cunicu_signal::backend::grpc::PUSHBACK_METADATA,
                    crate::client::pushback_ms(wait).into(),
                );
                return status;
            }
        };
        Status::unauthenticated(message)
    }
}

/// The nonces of accepted proofs, each until its proof would be out of the
/// skew window anyway.
struct Nonces {
    /// Until when (UNIX seconds), and whose.
    seen: HashMap<(Key, [u8; NONCE_LEN]), (u64, Client)>,
    /// Entries in `seen` by key and by client.
    per_key: HashMap<Key, usize>,
    per_client: HashMap<Client, usize>,
    /// When expired entries were last swept (UNIX seconds).
    swept: u64,
}

impl Nonces {
    /// Forgets the nonces out of their window, at most once a second (a
    /// full cache or quota is not swept per call).
    fn sweep(&mut self, now: u64) {
        if self.swept == now {
            return;
        }
        self.swept = now;
        let Nonces {
            seen,
            per_key,
            per_client,
            ..
        } = self;
        seen.retain(|(key, _), &mut (until, client)| {
            if until >= now {
                return true;
            }
            for count in [per_key.get_mut(key), per_client.get_mut(&client)]
                .into_iter()
                .flatten()
            {
                *count -= 1;
            }
            false
        });
        per_key.retain(|_, n| *n > 0);
        per_client.retain(|_, n| *n > 0);
    }
}

/// The checks of docs/PROTOCOL.md §11.
pub(crate) struct Auth {
    mode: AuthMode,
    key: Option<ServerKey>,
    skew: Duration,
    future_skew: Duration,
    shared: SharedKeyCache,
    /// Shared keys of claimed keys whose proof did not open: a repeat costs
    /// no X25519, and no proven key is pushed out of `shared`.
    unproven: Mutex<LruCache<Key, Arc<SharedKey>>>,
    /// Proofs of keys in neither cache, per client.
    unknown_keys: DefaultKeyedRateLimiter<Client>,
    nonces: Mutex<Nonces>,
    /// `None`: every key may.
    allowed: RwLock<Option<Arc<HashSet<Key>>>>,
    metrics: Arc<Metrics>,
}

/// Binary metadata is base64, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Auth {
    pub(crate) fn new(
        mode: AuthMode,
        key: Option<ServerKey>,
        (skew, future_skew): (Duration, Duration),
        allowed: Option<HashSet<Key>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let per_second = NonZeroU32::new(UNKNOWN_KEYS_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(UNKNOWN_KEYS_BURST).unwrap_or(NonZeroU32::MIN);
        Auth {
            mode,
            key,
            skew,
            future_skew,
            shared: SharedKeyCache::new(
                NonZeroUsize::new(SHARED_KEYS).unwrap_or(NonZeroUsize::MIN),
            ),
            unproven: Mutex::new(LruCache::new(
                NonZeroUsize::new(UNPROVEN_KEYS).unwrap_or(NonZeroUsize::MIN),
            )),
            unknown_keys: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            nonces: Mutex::new(Nonces {
                seen: HashMap::new(),
                per_key: HashMap::new(),
                per_client: HashMap::new(),
                swept: 0,
            }),
            allowed: RwLock::new(allowed.map(Arc::new)),
            metrics,
        }
    }

    /// The server's public key, if it has one.
    pub(crate) fn server_key(&self) -> Option<Key> {
        self.key.as_ref().map(|k| k.public)
    }

    /// Checks the proof in `headers` for a call of `method` on `key` by
    /// `client`, as the mode asks: Ok, or the status that refuses the call.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        method: &str,
        key: &Key,
        client: Client,
    ) -> Result<(), Status> {
        let present = headers.get(PROOF_METADATA);
        let outcome = match (present, &self.key) {
            (None, _) => Outcome::Missing,
            // No key, no proofs: a client that sends one anyway is ignored.
            (Some(_), None) => return self.off_or(Outcome::Missing, key),
            (Some(value), Some(server)) => {
                self.verify(value.as_bytes(), server, method, key, client)
            }
        };
        let outcome = match outcome {
            Outcome::Ok if self.mode == AuthMode::Required && !self.is_allowed(key) => {
                Outcome::NotAllowed
            }
            other => other,
        };
        // A missing proof counts only where one is needed.
        if present.is_some() || self.mode == AuthMode::Required {
            self.metrics.count_auth(outcome.result());
        }
        self.off_or(outcome, key)
    }

    fn off_or(&self, outcome: Outcome, key: &Key) -> Result<(), Status> {
        match (self.mode, outcome) {
            (_, Outcome::Ok) | (AuthMode::Off, _) => Ok(()),
            (AuthMode::Required, refused) => Err(refused.status(key, self.skew, self.future_skew)),
        }
    }

    /// The key that the proof in `headers` proves for a call of `method`,
    /// without remembering its nonce (the call's own [`Auth::check`] does)
    /// or counting it: whom the call is charged to. None without a valid
    /// proof (or, with `--allow-keys`, of a key not listed).
    pub(crate) fn identify(
        &self,
        headers: &HeaderMap,
        method: &str,
        client: Client,
    ) -> Option<Key> {
        let server = self.key.as_ref()?;
        let value = headers.get(PROOF_METADATA)?;
        let (key, _, _) = self
            .open(value.as_bytes(), server, method, None, client)
            .ok()?;
        if self.mode == AuthMode::Required && !self.is_allowed(&key) {
            return None;
        }
        Some(key)
    }

    fn verify(
        &self,
        value: &[u8],
        server: &ServerKey,
        method: &str,
        key: &Key,
        client: Client,
    ) -> Outcome {
        let (key, nonce, time) = match self.open(value, server, method, Some(key), client) {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        // Remembered while the proof would still be accepted.
        self.remember(
            key,
            nonce,
            time.saturating_add(self.skew.as_secs()),
            now(),
            client,
        )
    }

    /// Opens a proof of `key` (or of any key) for `method`, within the time
    /// allowed: its key, nonce and time.
    fn open(
        &self,
        value: &[u8],
        server: &ServerKey,
        method: &str,
        key: Option<&Key>,
        client: Client,
    ) -> Result<(Key, [u8; NONCE_LEN], u64), Outcome> {
        let Ok(bytes) = BASE64.decode(value) else {
            return Err(Outcome::Malformed);
        };
        let proof = match Proof::parse(&bytes) {
            Ok(proof) => proof,
            Err(_) => return Err(Outcome::Malformed),
        };
        if proof.key.as_bytes() == &[0; 32] {
            return Err(Outcome::LowOrder);
        }
        // Cheap before costly: the key must be the call's before any X25519.
        if key.is_some_and(|key| proof.key != *key) {
            return Err(Outcome::WrongKey);
        }
        let (shared, proven_before) = self.shared_key(&server.private, &proof.key, client)?;
        let opened = proof.open_with(&shared);
        if !proven_before {
            match &opened {
                Ok(_) => {
                    self.unproven.lock().pop(&proof.key);
                    self.shared.insert(&server.private, &proof.key, shared);
                }
                Err(_) => {
                    self.unproven.lock().put(proof.key, shared);
                }
            }
        }
        let proven = match opened {
            Ok(proven) => proven,
            Err(ProofError::LowOrder) => return Err(Outcome::LowOrder),
            Err(ProofError::BadBox) => return Err(Outcome::BadBox),
            Err(_) => return Err(Outcome::Malformed),
        };
        // A proof for another method does not prove this call.
        if proven.method != method.as_bytes() {
            return Err(Outcome::BadBox);
        }
        let now = now();
        if proven.time > now.saturating_add(self.future_skew.as_secs())
            || now > proven.time.saturating_add(self.skew.as_secs())
        {
            return Err(Outcome::Expired);
        }
        Ok((proof.key, proof.nonce, proven.time))
    }

    /// The shared key of (server, `key`), and whether a proof of `key` opened
    /// with it before; a new one (an X25519) within `client`'s rate.
    fn shared_key(
        &self,
        server: &PrivateKey,
        key: &Key,
        client: Client,
    ) -> Result<(Arc<SharedKey>, bool), Outcome> {
        if let Some(shared) = self.shared.lookup(server, key) {
            return Ok((shared, true));
        }
        if let Some(shared) = self.unproven.lock().get(key) {
            return Ok((shared.clone(), false));
        }
        if let Err(not_until) = self.unknown_keys.check_key(&client) {
            use governor::clock::Clock as _;
            let wait = not_until.wait_time_from(self.unknown_keys.clock().now());
            return Err(Outcome::UnknownKeyRate(wait));
        }
        if self.unknown_keys.len() > UNKNOWN_KEY_CLIENTS {
            self.unknown_keys.retain_recent();
        }
        match SharedKey::new(server, key) {
            Ok(shared) => Ok((Arc::new(shared), false)),
            Err(EnvelopeError::LowOrderKey(_)) => Err(Outcome::LowOrder),
            Err(_) => Err(Outcome::BadBox),
        }
    }

    /// Remembers a proof's nonce until `until`: each is accepted once.
    /// Within the cache's bound and the quotas of its key and its client.
    fn remember(
        &self,
        key: Key,
        nonce: [u8; NONCE_LEN],
        until: u64,
        now: u64,
        client: Client,
    ) -> Outcome {
        let mut nonces = self.nonces.lock();
        if nonces
            .seen
            .get(&(key, nonce))
            .is_some_and(|&(t, _)| t >= now)
        {
            return Outcome::Replayed;
        }
        let full = |n: &Nonces| {
            if n.seen.len() >= MAX_NONCES {
                Some(Outcome::CacheFull)
            } else if n.per_key.get(&key).copied().unwrap_or(0) >= NONCES_PER_KEY {
                Some(Outcome::KeyQuota)
            } else if n.per_client.get(&client).copied().unwrap_or(0) >= NONCES_PER_CLIENT {
                Some(Outcome::ClientQuota)
            } else {
                None
            }
        };
        if full(&nonces).is_some() {
            nonces.sweep(now);
            if let Some(outcome) = full(&nonces) {
                return outcome;
            }
        }
        // An expired entry of the same nonce is replaced: its counts go.
        if let Some((_, old)) = nonces.seen.insert((key, nonce), (until, client)) {
            if let Some(count) = nonces.per_key.get_mut(&key) {
                *count -= 1;
            }
            if let Some(count) = nonces.per_client.get_mut(&old) {
                *count -= 1;
            }
        }
        *nonces.per_key.entry(key).or_default() += 1;
        *nonces.per_client.entry(client).or_default() += 1;
        Outcome::Ok
    }

    fn is_allowed(&self, key: &Key) -> bool {
        match &*self.allowed.read() {
            None => true,
            Some(keys) => keys.contains(key),
        }
    }

    /// How many keys are listed (0 without a list).
    fn allowed_count(&self) -> usize {
        self.allowed.read().as_ref().map_or(0, |keys| keys.len())
    }

    /// Puts a new list of allowed keys in place; returns the keys it removed.
    pub(crate) fn set_allowed(&self, keys: HashSet<Key>) -> Vec<Key> {
        let mut allowed = self.allowed.write();
        let removed = match &*allowed {
            Some(old) => old.difference(&keys).copied().collect(),
            None => Vec::new(),
        };
        *allowed = Some(Arc::new(keys));
        removed
    }
}

/// Why an allow-keys file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AllowKeysError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not a key.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Reads an allow-keys file: one base64 key a line, `#` starts a comment
/// (also after a key), blank lines ignored.
pub(crate) fn read_allowed(path: &Path) -> Result<HashSet<Key>, AllowKeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| AllowKeysError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut keys = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let key: Key =
            line.parse()
                .map_err(|e: cunicu_signal::KeyError| AllowKeysError::Parse {
                    path: path.to_path_buf(),
                    line: n + 1,
                    reason: e.to_string(),
                })?;
        keys.insert(key);
    }
    Ok(keys)
}

/// Keeps the allowed keys in step with the file at `path` (looked at every
/// half second, by path, so that a replacement by rename counts; and on
/// SIGHUP) until `shutdown`. The streams of a removed key end.
///
/// A file edited in place is read while it is being written: a new list is
/// put in place only once two reads half a second apart agree (or at once on
/// SIGHUP), and an empty file where a list was is taken as one being written
/// (the list stays, with a warning): a file that admits no key says so with
/// a comment.
pub(crate) async fn watch_allowed(
    path: PathBuf,
    auth: Arc<Auth>,
    hub: crate::hub::Hub,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!("no reload on SIGHUP: {e}");
            None
        }
    };
    let mut seen = version(&path);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    // A list read once, put in place when the next read agrees.
    let mut settling: Option<HashSet<Key>> = None;
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = version(&path);
        if !forced && now == seen && settling.is_none() {
            continue;
        }
        seen = now.clone();
        let keys = match read_allowed(&path) {
            Ok(keys) => keys,
            Err(e) => {
                settling = None;
                // One line per failure, not per look.
                let text = e.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    tracing::error!("allowed keys not reloaded, the previous list stays: {text}");
                    failing = Some(text);
                }
                continue;
            }
        };
        let listed = auth.allowed_count();
        if keys.is_empty() && now.as_ref().is_some_and(|v| v.len == 0) && listed > 0 {
            settling = None;
            let text = format!(
                "{} is empty: taken as a file being written, the previous {listed} keys stay \
                 (a file that admits no key says so with a comment)",
                path.display()
            );
            if failing.as_deref() != Some(text.as_str()) {
                tracing::warn!("{text}");
                failing = Some(text);
            }
            continue;
        }
        failing = None;
        if !forced && settling.as_ref() != Some(&keys) {
            settling = Some(keys);
            continue;
        }
        settling = None;
        let count = keys.len();
        let removed = auth.set_allowed(keys);
        let topics: Vec<[u8; 32]> = removed.iter().map(|k| *k.as_bytes()).collect();
        let ended = hub.cut(&topics, Cut::NotAllowed);
        tracing::info!(
            path = %path.display(),
            keys = count,
            removed = removed.len(),
            streams_ended = ended,
            "allowed keys reloaded"
        );
    }
}

/// What identifies a file's version: a replacement by rename changes the
/// inode, an edit the time or length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

pub(crate) fn version(path: &Path) -> Option<Version> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some(Version {
        inode: meta.ino(),
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

#[cfg(test)]
mod tests {
    use cunicu_signal::auth::prove;

    use super::*;

    use cunicu_signal::proto::method::{PUBLISH, SUBSCRIBE};
    const CLIENT: Client = Client::of_const([192, 0, 2, 99]);

    /// The `i`th made-up key.
    fn key_of(i: u64) -> Key {
        Key::from_slice(&(i + 1).to_be_bytes().repeat(4)).unwrap()
    }

    fn auth(mode: AuthMode) -> (Auth, Key) {
        let server = PrivateKey::generate();
        let auth = Auth::new(
            mode,
            Some(ServerKey {
                public: server.public_key(),
                private: server.clone(),
            }),
            (Duration::from_secs(60), Duration::from_secs(5)),
            None,
            Metrics::new(),
        );
        (auth, server.public_key())
    }

    fn headers(proof: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD_NO_PAD.encode(proof);
        headers.insert(PROOF_METADATA, value.parse().unwrap());
        headers
    }

    fn outcome(auth: &Auth, headers: &HeaderMap, method: &str, key: &Key) -> Outcome {
        let server = auth.key.clone().unwrap();
        match headers.get(PROOF_METADATA) {
            None => Outcome::Missing,
            Some(v) => auth.verify(v.as_bytes(), &server, method, key, CLIENT),
        }
    }

    #[test]
    fn each_way_a_proof_can_be_wrong() {
        let (auth, server) = auth(AuthMode::Required);
        let client = PrivateKey::generate();
        let key = client.public_key();
        let fresh =
            |method: &str, time: u64| headers(&prove(&client, &server, method, time).unwrap());
        let good = fresh(SUBSCRIBE, now());
        assert_eq!(outcome(&auth, &good, SUBSCRIBE, &key), Outcome::Ok);
        assert_eq!(outcome(&auth, &good, SUBSCRIBE, &key), Outcome::Replayed);
        let other = PrivateKey::generate().public_key();
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now()), SUBSCRIBE, &other),
            Outcome::WrongKey
        );
        assert_eq!(
            outcome(&auth, &fresh(PUBLISH, now()), SUBSCRIBE, &key),
            Outcome::BadBox
        );
        // 60 s behind and 5 s ahead, inclusive.
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() - 60), SUBSCRIBE, &key),
            Outcome::Ok
        );
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() + 5), SUBSCRIBE, &key),
            Outcome::Ok
        );
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() + 7), SUBSCRIBE, &key),
            Outcome::Expired
        );
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() - 62), SUBSCRIBE, &key),
            Outcome::Expired
        );
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() + 62), SUBSCRIBE, &key),
            Outcome::Expired
        );
        let to_another_server = headers(
            &prove(
                &client,
                &PrivateKey::generate().public_key(),
                SUBSCRIBE,
                now(),
            )
            .unwrap(),
        );
        assert_eq!(
            outcome(&auth, &to_another_server, SUBSCRIBE, &key),
            Outcome::BadBox
        );
        let mut junk = HeaderMap::new();
        junk.insert(PROOF_METADATA, "not base64!".parse().unwrap());
        assert_eq!(outcome(&auth, &junk, SUBSCRIBE, &key), Outcome::Malformed);
        let mut low = prove(&client, &server, SUBSCRIBE, now()).unwrap();
        low[..32].fill(0);
        assert_eq!(
            outcome(&auth, &headers(&low), SUBSCRIBE, &Key::from([0; 32])),
            Outcome::LowOrder
        );
    }

    #[test]
    fn modes_and_the_allow_list() {
        let (off, server) = auth(AuthMode::Off);
        let client = PrivateKey::generate();
        assert!(
            off.check(&HeaderMap::new(), SUBSCRIBE, &client.public_key(), CLIENT)
                .is_ok()
        );
        let mut bad = prove(&client, &server, SUBSCRIBE, now()).unwrap();
        *bad.last_mut().unwrap() ^= 1;
        assert!(
            off.check(&headers(&bad), SUBSCRIBE, &client.public_key(), CLIENT)
                .is_ok()
        );

        let (required, server) = auth(AuthMode::Required);
        let status = required
            .check(&HeaderMap::new(), SUBSCRIBE, &client.public_key(), CLIENT)
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains(PROOF_METADATA),
            "{}",
            status.message()
        );
        let removed = required.set_allowed(HashSet::from([PrivateKey::generate().public_key()]));
        assert!(removed.is_empty());
        let proof = headers(&prove(&client, &server, SUBSCRIBE, now()).unwrap());
        let status = required
            .check(&proof, SUBSCRIBE, &client.public_key(), CLIENT)
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let removed = required.set_allowed(HashSet::from([client.public_key()]));
        assert_eq!(removed.len(), 1);
        let proof = headers(&prove(&client, &server, SUBSCRIBE, now()).unwrap());
        assert!(
            required
                .check(&proof, SUBSCRIBE, &client.public_key(), CLIENT)
                .is_ok()
        );
    }

    /// The nonce numbered `n`.
    fn nonce(n: u64) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&n.to_be_bytes());
        nonce
    }

    #[test]
    fn a_full_nonce_cache_refuses_rather_than_forgets() {
        let (auth, _) = auth(AuthMode::Required);
        let now = now();
        let client = |n: u64| Client::of(std::net::IpAddr::from((n as u32 + 1).to_be_bytes()));
        // Many keys of many clients fill it.
        let per_client = NONCES_PER_CLIENT as u64;
        for n in 0..MAX_NONCES as u64 {
            let key = key_of(n / 1000);
            assert_eq!(
                auth.remember(key, nonce(n), now + 60, now, client(n / per_client)),
                Outcome::Ok,
                "{n}"
            );
        }
        let key = PrivateKey::generate().public_key();
        assert_eq!(
            auth.remember(key, nonce(0), now + 60, now, client(1000)),
            Outcome::CacheFull
        );
        // Once they are out of their window, they make room.
        assert_eq!(
            auth.remember(key, nonce(0), now + 200, now + 61, client(1000)),
            Outcome::Ok
        );
    }

    #[test]
    fn a_key_or_a_client_holds_only_its_share_of_the_nonces() {
        let (auth, _) = auth(AuthMode::Required);
        let now = now();
        let (one, other) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let attacker = Client::of([192, 0, 2, 1].into());
        assert_ne!(attacker, CLIENT);
        for n in 0..NONCES_PER_KEY as u64 {
            assert_eq!(
                auth.remember(one, nonce(n), now + 60, now, attacker),
                Outcome::Ok
            );
        }
        assert_eq!(
            auth.remember(one, nonce(u64::MAX), now + 60, now, attacker),
            Outcome::KeyQuota
        );
        // Self-made keys from one client: its quota.
        let mut n = NONCES_PER_KEY as u64;
        while n < NONCES_PER_CLIENT as u64 {
            let key = key_of(1_000_000 + n / 1000);
            assert_eq!(
                auth.remember(key, nonce(n), now + 60, now, attacker),
                Outcome::Ok
            );
            n += 1;
        }
        assert_eq!(
            auth.remember(other, nonce(0), now + 60, now, attacker),
            Outcome::ClientQuota
        );
        // Everyone else is served.
        let peer = Client::of([192, 0, 2, 2].into());
        assert_eq!(
            auth.remember(other, nonce(0), now + 60, now, peer),
            Outcome::Ok
        );
        // Out of their window, they are forgotten and their counts with them.
        assert_eq!(
            auth.remember(one, nonce(u64::MAX), now + 200, now + 61, attacker),
            Outcome::Ok
        );
        assert_eq!(auth.nonces.lock().per_client.get(&attacker), Some(&1));
    }

    #[test]
    fn allow_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowed");
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        std::fs::write(&path, format!("# peers\n{a}  # alice\n\n  {b}\n")).unwrap();
        assert_eq!(read_allowed(&path).unwrap(), HashSet::from([a, b]));
        std::fs::write(&path, format!("{a}\nnot a key\n")).unwrap();
        let e = read_allowed(&path).unwrap_err().to_string();
        assert!(e.contains(":2: "), "{e}");
        assert!(read_allowed(&dir.path().join("missing")).is_err());
    }
}
