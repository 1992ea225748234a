//! Proof of key possession (docs/PROTOCOL.md §11): which calls need one, what a proof
//! must say, the nonces seen, and the list of allowed keys.
//!
//! The format is the library's ([`cunicu_signal::auth`]); here the server
//! decides: the proof must be of the call's key, for the call's method, within
//! the time skew, with a nonce not seen before, and (with `--allow-keys`) of a
//! listed key.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use cunicu_signal::{
    Key, NONCE_LEN, SharedKeyCache,
    auth::{PROOF_METADATA, Proof, ProofError},
};
use http::HeaderMap;
use parking_lot::{Mutex, RwLock};
use tonic::Status;

use crate::metrics::Metrics;

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

/// Proofs remembered at most (each for the skew window): beyond, proofs are
/// refused rather than a replay let in.
pub(crate) const MAX_NONCES: usize = 131_072;
/// Shared keys of (server, client key) kept.
const SHARED_KEYS: usize = 16_384;
/// What one remembered nonce costs.
pub(crate) const NONCE_BYTES: usize = 128;

/// The server's key pair.
#[derive(Clone)]
pub(crate) struct ServerKey {
    pub(crate) private: Key,
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
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Malformed => "malformed",
            Outcome::BadBox => "bad_box",
            Outcome::WrongKey => "wrong_key",
            Outcome::Expired => "expired",
            Outcome::Replayed => "replayed",
            Outcome::LowOrder => "low_order",
            Outcome::NotAllowed => "not_allowed",
            Outcome::CacheFull => "cache_full",
        }
    }

    fn status(self, key: &Key, skew: Duration) -> Status {
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
            Outcome::Expired => {
                format!("the proof's time is more than {skew:?} away from the server's clock")
            }
            Outcome::Replayed => "the proof was used before".to_string(),
            Outcome::LowOrder => "the proof is of a low-order key".to_string(),
            Outcome::NotAllowed => {
                return Status::permission_denied(format!("key {key} is not allowed here"));
            }
            Outcome::CacheFull => {
                "the server remembers all the proofs it may: try again shortly".to_string()
            }
        };
        Status::unauthenticated(message)
    }
}

/// The nonces of accepted proofs, each until its proof would be out of the
/// skew window anyway.
struct Nonces {
    seen: HashMap<(Key, [u8; NONCE_LEN]), u64>,
    /// When expired entries were last swept (UNIX seconds).
    swept: u64,
}

/// The checks of docs/PROTOCOL.md §11.
pub(crate) struct Auth {
    mode: AuthMode,
    key: Option<ServerKey>,
    skew: Duration,
    shared: SharedKeyCache,
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
        skew: Duration,
        allowed: Option<HashSet<Key>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Auth {
            mode,
            key,
            skew,
            shared: SharedKeyCache::new(
                NonZeroUsize::new(SHARED_KEYS).unwrap_or(NonZeroUsize::MIN),
            ),
            nonces: Mutex::new(Nonces {
                seen: HashMap::new(),
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

    /// Checks the proof in `headers` for a call of `method` on `key`, as the
    /// mode asks: Ok, or the status that refuses the call.
    pub(crate) fn check(&self, headers: &HeaderMap, method: &str, key: &Key) -> Result<(), Status> {
        let present = headers.get(PROOF_METADATA);
        let outcome = match (present, &self.key) {
            (None, _) => Outcome::Missing,
            // No key, no proofs: a client that sends one anyway is ignored.
            (Some(_), None) => return self.off_or(Outcome::Missing, key),
            (Some(value), Some(server)) => self.verify(value.as_bytes(), server, method, key),
        };
        let outcome = match outcome {
            Outcome::Ok if self.mode == AuthMode::Required && !self.is_allowed(key) => {
                Outcome::NotAllowed
            }
            other => other,
        };
        // A missing proof counts only where one is needed.
        if present.is_some() || self.mode == AuthMode::Required {
            self.metrics.auth_for(outcome.label());
        }
        self.off_or(outcome, key)
    }

    fn off_or(&self, outcome: Outcome, key: &Key) -> Result<(), Status> {
        match (self.mode, outcome) {
            (_, Outcome::Ok) | (AuthMode::Off, _) => Ok(()),
            (AuthMode::Required, refused) => Err(refused.status(key, self.skew)),
        }
    }

    fn verify(&self, value: &[u8], server: &ServerKey, method: &str, key: &Key) -> Outcome {
        let Ok(bytes) = BASE64.decode(value) else {
            return Outcome::Malformed;
        };
        let proof = match Proof::parse(&bytes) {
            Ok(proof) => proof,
            Err(_) => return Outcome::Malformed,
        };
        // Cheap before costly: the key must be the call's before any X25519.
        if proof.key != *key {
            return if proof.key.as_bytes() == &[0; 32] {
                Outcome::LowOrder
            } else {
                Outcome::WrongKey
            };
        }
        let proven = match proof.open(&server.private, &self.shared) {
            Ok(proven) => proven,
            Err(ProofError::LowOrder) => return Outcome::LowOrder,
            Err(ProofError::BadBox) => return Outcome::BadBox,
            Err(_) => return Outcome::Malformed,
        };
        // A proof for another method does not prove this call.
        if proven.method != method.as_bytes() {
            return Outcome::BadBox;
        }
        let now = now();
        let skew = self.skew.as_secs();
        if proven.time.abs_diff(now) > skew {
            return Outcome::Expired;
        }
        self.remember(
            proof.key,
            proof.nonce,
            proven.time.saturating_add(skew),
            now,
        )
    }

    /// Remembers a proof's nonce until `until`: each is accepted once.
    fn remember(&self, key: Key, nonce: [u8; NONCE_LEN], until: u64, now: u64) -> Outcome {
        let mut nonces = self.nonces.lock();
        if nonces.seen.get(&(key, nonce)).is_some_and(|&t| t >= now) {
            return Outcome::Replayed;
        }
        if nonces.seen.len() >= MAX_NONCES && nonces.swept != now {
            // At most once a second: a full cache is not swept per call.
            nonces.swept = now;
            nonces.seen.retain(|_, &mut t| t >= now);
        }
        if nonces.seen.len() >= MAX_NONCES {
            return Outcome::CacheFull;
        }
        nonces.seen.insert((key, nonce), until);
        Outcome::Ok
    }

    fn is_allowed(&self, key: &Key) -> bool {
        match &*self.allowed.read() {
            None => true,
            Some(keys) => keys.contains(key),
        }
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

/// How often the allow-keys file is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Keeps the allowed keys in step with the file at `path` (looked at every
/// half second, by path, so that a replacement by rename counts; and on
/// SIGHUP) until `shutdown`. The streams of a removed key end.
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
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match read_allowed(&path) {
            Ok(keys) => {
                failing = None;
                let count = keys.len();
                let removed = auth.set_allowed(keys);
                let topics: Vec<[u8; 32]> = removed.iter().map(|k| *k.as_bytes()).collect();
                let ended = hub.cut(&topics, crate::hub::Cut::NotAllowed);
                tracing::info!(
                    path = %path.display(),
                    keys = count,
                    removed = removed.len(),
                    streams_ended = ended,
                    "allowed keys reloaded"
                );
            }
            Err(e) => {
                // One line per failure, not per look.
                let text = e.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    tracing::error!("allowed keys not reloaded, the previous list stays: {text}");
                    failing = Some(text);
                }
            }
        }
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

    const SUBSCRIBE: &str = "/cunicu.signaling.Signaling/Subscribe";

    fn auth(mode: AuthMode) -> (Auth, Key) {
        let server = Key::generate();
        let auth = Auth::new(
            mode,
            Some(ServerKey {
                private: server,
                public: server.public_key(),
            }),
            Duration::from_secs(60),
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
            Some(v) => auth.verify(v.as_bytes(), &server, method, key),
        }
    }

    #[test]
    fn each_way_a_proof_can_be_wrong() {
        let (auth, server) = auth(AuthMode::Required);
        let client = Key::generate();
        let key = client.public_key();
        let fresh =
            |method: &str, time: u64| headers(&prove(&client, &server, method, time).unwrap());
        let good = fresh(SUBSCRIBE, now());
        assert_eq!(outcome(&auth, &good, SUBSCRIBE, &key), Outcome::Ok);
        assert_eq!(outcome(&auth, &good, SUBSCRIBE, &key), Outcome::Replayed);
        let other = Key::generate().public_key();
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now()), SUBSCRIBE, &other),
            Outcome::WrongKey
        );
        assert_eq!(
            outcome(
                &auth,
                &fresh("/cunicu.signaling.Signaling/Publish", now()),
                SUBSCRIBE,
                &key
            ),
            Outcome::BadBox
        );
        // ±60 s inclusive.
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() - 60), SUBSCRIBE, &key),
            Outcome::Ok
        );
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() - 62), SUBSCRIBE, &key),
            Outcome::Expired
        );
        assert_eq!(
            outcome(&auth, &fresh(SUBSCRIBE, now() + 62), SUBSCRIBE, &key),
            Outcome::Expired
        );
        let to_another_server =
            headers(&prove(&client, &Key::generate().public_key(), SUBSCRIBE, now()).unwrap());
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
            outcome(&auth, &headers(&low), SUBSCRIBE, &Key::ZERO),
            Outcome::LowOrder
        );
    }

    #[test]
    fn modes_and_the_allow_list() {
        let (off, server) = auth(AuthMode::Off);
        let client = Key::generate();
        assert!(
            off.check(&HeaderMap::new(), SUBSCRIBE, &client.public_key())
                .is_ok()
        );
        let mut bad = prove(&client, &server, SUBSCRIBE, now()).unwrap();
        *bad.last_mut().unwrap() ^= 1;
        assert!(
            off.check(&headers(&bad), SUBSCRIBE, &client.public_key())
                .is_ok()
        );

        let (required, server) = auth(AuthMode::Required);
        let status = required
            .check(&HeaderMap::new(), SUBSCRIBE, &client.public_key())
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains(PROOF_METADATA),
            "{}",
            status.message()
        );
        let removed = required.set_allowed(HashSet::from([Key::generate().public_key()]));
        assert!(removed.is_empty());
        let proof = headers(&prove(&client, &server, SUBSCRIBE, now()).unwrap());
        let status = required
            .check(&proof, SUBSCRIBE, &client.public_key())
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let removed = required.set_allowed(HashSet::from([client.public_key()]));
        assert_eq!(removed.len(), 1);
        let proof = headers(&prove(&client, &server, SUBSCRIBE, now()).unwrap());
        assert!(
            required
                .check(&proof, SUBSCRIBE, &client.public_key())
                .is_ok()
        );
    }

    #[test]
    fn a_full_nonce_cache_refuses_rather_than_forgets() {
        let (auth, _) = auth(AuthMode::Required);
        let key = Key::generate().public_key();
        let now = now();
        for n in 0..MAX_NONCES as u64 {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&n.to_be_bytes());
            assert_eq!(auth.remember(key, nonce, now + 60, now), Outcome::Ok);
        }
        assert_eq!(
            auth.remember(key, [0xff; NONCE_LEN], now + 60, now),
            Outcome::CacheFull
        );
        // Once they are out of their window, they make room.
        assert_eq!(
            auth.remember(key, [0xff; NONCE_LEN], now + 200, now + 61),
            Outcome::Ok
        );
    }

    #[test]
    fn allow_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowed");
        let (a, b) = (Key::generate().public_key(), Key::generate().public_key());
        std::fs::write(&path, format!("# peers\n{a}  # alice\n\n  {b}\n")).unwrap();
        assert_eq!(read_allowed(&path).unwrap(), HashSet::from([a, b]));
        std::fs::write(&path, format!("{a}\nnot a key\n")).unwrap();
        let e = read_allowed(&path).unwrap_err().to_string();
        assert!(e.contains(":2: "), "{e}");
        assert!(read_allowed(&dir.path().join("missing")).is_err());
    }
}
