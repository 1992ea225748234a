//! docs/PROTOCOL.md §9's delivery rules without I/O: which objects the watch hands to the
//! registry.
//!
//! Like the session's state machine, [`Rules`] does no I/O and reads no clock:
//! the watch tells it when `listen` was called for a key and when a list of
//! keys is complete, and asks it, with the time, about every object it sees.
//! [`Verdict`] is the answer:
//! - [`Verdict::Seen`]: its UID is remembered, it was decided on before (after
//!   a relist or a restart of the watch): skipped. UIDs are remembered for two
//!   ttls from when they were first seen, at most [`MAX_KNOWN`] of them; when
//!   more arrive within that time, the oldest are forgotten early
//!   ([`Rules::forgotten_early`]).
//! - [`Verdict::Invalid`]: not an envelope (no recipient key).
//! - [`Verdict::Stale`]: the watch has not listed the recipient's key yet
//!   (this is the key's first list) and the object was created before
//!   `listen` was called, less [`CLOCK_SKEW`], or has no creation time: it
//!   existed before the subscription and is not replayed.
//! - [`Verdict::TooOld`]: older than the ttl: expired.
//! - [`Verdict::CaughtUp`]: found by the first list of its key but created
//!   after `listen` was called: delivered.
//! - [`Verdict::Deliver`]: everything else.
//!
//! [`Ttl::expiry`] is the rule of the expiry sweep (docs/PROTOCOL.md §9, §10): an object
//! sent by or addressed to one of our keys is deleted once it is older than
//! the ttl ([`Expiry::Expired`]); anyone's, once it is older than twice the
//! ttl ([`Expiry::Abandoned`]), so that objects of peers that are gone do not
//! stay.
//!
//! Ages are the wall clock `now` less the object's `creationTimestamp`; the
//! memory of UIDs runs on the same clock, so a clock that jumps ahead forgets
//! UIDs early, but then also finds their objects too old.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use crate::Key;

/// How much earlier than the call of `listen` an object found by the key's
/// first list may have been created and still be delivered: the
/// `creationTimestamp` has a resolution of one second, and the clocks of peer
/// and API server may differ a little.
pub const CLOCK_SKEW: Duration = Duration::from_secs(2);

/// How many object UIDs are remembered at most; the oldest go first.
pub(super) const MAX_KNOWN: usize = 65_536;

/// How long an envelope object lives, and the ages that follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ttl(pub Duration);

impl Ttl {
    /// The age at `now` of an object created at `created`; `None` without a
    /// creation time, zero for one in the future.
    pub(super) fn age(created: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
        Some(now.duration_since(created?).unwrap_or_default())
    }

    /// Older than the ttl: not delivered any more, and deleted by an instance
    /// of its sender or recipient.
    pub(super) fn expired(self, created: Option<SystemTime>, now: SystemTime) -> bool {
        Self::age(created, now).is_some_and(|age| age > self.0)
    }

    /// What the expiry sweep does at `now` with an object created at
    /// `created`; `ours` if it was sent by or is addressed to one of our keys.
    /// Without a creation time an object is kept.
    pub(super) fn expiry(self, created: Option<SystemTime>, ours: bool, now: SystemTime) -> Expiry {
        let Some(age) = Self::age(created, now) else {
            return Expiry::Keep;
        };
        if ours && age > self.0 {
            Expiry::Expired
        } else if age > self.0 * 2 {
            Expiry::Abandoned
        } else {
            Expiry::Keep
        }
    }
}

/// What the expiry sweep does with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// Leave it.
    Keep,
    /// Ours (sent by or addressed to one of our keys) and older than the
    /// ttl: delete it.
    Expired,
    /// Whoever's, older than twice the ttl: delete it.
    Abandoned,
}

/// What the watch knows about an object.
#[derive(Debug, Clone, Copy)]
pub(super) struct Object<'a> {
    /// Its UID.
    pub uid: &'a str,
    /// Its `creationTimestamp`.
    pub created: Option<SystemTime>,
    /// Its recipient, if its fields are an envelope.
    pub recipient: Option<Key>,
}

/// What becomes of an object (see the module's docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Hand it to the registry.
    Deliver,
    /// Hand it to the registry: its key's first list found it, but it was
    /// created after `listen` was called.
    CaughtUp,
    /// Decided on before: skip it.
    Seen,
    /// Not an envelope: drop it.
    Invalid,
    /// It existed before its key was listened on: do not replay it.
    Stale,
    /// Older than the ttl: drop it.
    TooOld,
}

impl Verdict {
    /// True if the object goes to the registry.
    pub(super) fn delivers(self) -> bool {
        matches!(self, Verdict::Deliver | Verdict::CaughtUp)
    }
}

/// UIDs of objects seen, each remembered until a time.
#[derive(Debug, Default)]
struct Known {
    until: HashMap<String, SystemTime>,
    order: VecDeque<(SystemTime, String)>,
}

impl Known {
    /// Remembers `uid` until `until`; false if it is remembered already.
    /// Forgets what is due at `now` first, and the oldest if full; returns
    /// also how many were forgotten before their time.
    fn insert(&mut self, uid: &str, until: SystemTime, now: SystemTime) -> (bool, u64) {
        let mut early = 0;
        while let Some((t, _)) = self.order.front() {
            if *t > now && self.order.len() < MAX_KNOWN {
                break;
            }
            if let Some((t, old)) = self.order.pop_front() {
                if t > now {
                    early += 1;
                }
                if self.until.get(&old) == Some(&t) {
                    self.until.remove(&old);
                }
            }
        }
        if self.until.get(uid).is_some_and(|t| *t > now) {
            return (false, early);
        }
        self.until.insert(uid.to_string(), until);
        self.order.push_back((until, uid.to_string()));
        (true, early)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

/// The delivery rules, and what they remember: the UIDs seen and the keys
/// whose first list is still to come.
#[derive(Debug)]
pub(super) struct Rules {
    ttl: Ttl,
    known: Known,
    /// Keys listened on that no watch has listed yet, with the time `listen`
    /// was first called for them.
    pending: HashMap<Key, SystemTime>,
    forgotten_early: u64,
}

impl Rules {
    /// Rules for objects that live `ttl`.
    pub(super) fn new(ttl: Duration) -> Self {
        Rules {
            ttl: Ttl(ttl),
            known: Known::default(),
            pending: HashMap::new(),
            forgotten_early: 0,
        }
    }

    /// `listen` was called for `key` at `at`. Until the watch has listed the
    /// key, objects of it created before then are stale. A key whose first
    /// list is still to come keeps the time of its first `listen`.
    pub(super) fn listening(&mut self, key: Key, at: SystemTime) {
        self.pending.entry(key).or_insert(at);
    }

    /// The watch has listed `keys`: from now on no object of theirs is stale.
    pub(super) fn listed<'a>(&mut self, keys: impl IntoIterator<Item = &'a Key>) {
        for key in keys {
            self.pending.remove(key);
        }
    }

    /// `key` is not listened on any more.
    pub(super) fn forget(&mut self, key: &Key) {
        self.pending.remove(key);
    }

    /// Forgets every key (the UIDs stay).
    pub(super) fn forget_all(&mut self) {
        self.pending.clear();
    }

    /// True if `key`'s first list is still to come.
    pub(super) fn is_pending(&self, key: &Key) -> bool {
        self.pending.contains_key(key)
    }

    /// Decides on `object` at `now`, and remembers its UID.
    pub(super) fn decide(&mut self, object: &Object<'_>, now: SystemTime) -> Verdict {
        let (new, early) = self.known.insert(object.uid, now + self.ttl.0 * 2, now);
        self.forgotten_early += early;
        if !new {
            return Verdict::Seen;
        }
        let Some(recipient) = object.recipient else {
            return Verdict::Invalid;
        };
        let since = self.pending.get(&recipient).copied();
        if let Some(since) = since {
            let threshold = since.checked_sub(CLOCK_SKEW).unwrap_or(since);
            if object.created.is_none_or(|created| created < threshold) {
                return Verdict::Stale;
            }
        }
        if self.ttl.expired(object.created, now) {
            return Verdict::TooOld;
        }
        if since.is_some() {
            Verdict::CaughtUp
        } else {
            Verdict::Deliver
        }
    }

    /// How many UIDs were forgotten before their time because the memory
    /// was full.
    pub(super) fn forgotten_early(&self) -> u64 {
        self.forgotten_early
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrivateKey;

    const TTL: Duration = Duration::from_secs(60);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn object(uid: &str, created: Option<SystemTime>, recipient: Key) -> Object<'_> {
        Object {
            uid,
            created,
            recipient: Some(recipient),
        }
    }

    #[test]
    fn a_new_object_of_a_listed_key_is_delivered_once() {
        let mut rules = Rules::new(TTL);
        let b = PrivateKey::generate().public_key();
        let now = t0();
        let o = object("1", Some(now - secs(5)), b);
        assert_eq!(rules.decide(&o, now), Verdict::Deliver);
        assert_eq!(rules.decide(&o, now + secs(1)), Verdict::Seen);
        // Seen also by another route (a relist) with the same UID.
        assert_eq!(rules.decide(&o, now + secs(90)), Verdict::Seen);
        assert!(Verdict::Deliver.delivers() && Verdict::CaughtUp.delivers());
        for v in [
            Verdict::Seen,
            Verdict::Invalid,
            Verdict::Stale,
            Verdict::TooOld,
        ] {
            assert!(!v.delivers(), "{v:?}");
        }
    }

    #[test]
    fn the_first_list_does_not_replay_what_existed_before_listen() {
        let mut rules = Rules::new(TTL);
        let b = PrivateKey::generate().public_key();
        let called = t0();
        rules.listening(b, called);
        // A second listen before the first list keeps the first time.
        rules.listening(b, called + secs(20));
        assert!(rules.is_pending(&b));
        let now = called + secs(10);
        // Before the call, beyond the allowance: stale.
        let old = object("old", Some(called - CLOCK_SKEW - secs(1)), b);
        assert_eq!(rules.decide(&old, now), Verdict::Stale);
        // Without a creation time: stale as well.
        assert_eq!(rules.decide(&object("none", None, b), now), Verdict::Stale);
        // Within the allowance, and after the call: caught up.
        let skewed = object("skewed", Some(called - CLOCK_SKEW), b);
        assert_eq!(rules.decide(&skewed, now), Verdict::CaughtUp);
        let new = object("new", Some(called + secs(5)), b);
        assert_eq!(rules.decide(&new, now), Verdict::CaughtUp);
        assert_eq!(rules.decide(&new, now), Verdict::Seen);
        // Once listed, the key is live: what was not seen is delivered,
        // whenever it was created (within the ttl).
        rules.listed(&[b]);
        assert!(!rules.is_pending(&b));
        let relisted = object("relisted", Some(called - secs(30)), b);
        assert_eq!(rules.decide(&relisted, now), Verdict::Deliver);
        // The stale one stays decided on.
        assert_eq!(rules.decide(&old, now), Verdict::Seen);
        // Without a creation time, on a live key: its age is unknown, delivered.
        assert_eq!(
            rules.decide(&object("none2", None, b), now),
            Verdict::Deliver
        );
    }

    #[test]
    fn pending_keys_are_each_their_own() {
        let mut rules = Rules::new(TTL);
        let (b, c) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let now = t0();
        rules.listening(b, now);
        rules.listening(c, now);
        rules.listed(&[b]);
        let before = Some(now - secs(10));
        assert_eq!(rules.decide(&object("b", before, b), now), Verdict::Deliver);
        assert_eq!(rules.decide(&object("c", before, c), now), Verdict::Stale);
        rules.forget(&c);
        assert!(!rules.is_pending(&c));
        rules.listening(c, now);
        rules.forget_all();
        assert!(!rules.is_pending(&c));
    }

    #[test]
    fn objects_older_than_the_ttl_are_too_old() {
        let mut rules = Rules::new(TTL);
        let b = PrivateKey::generate().public_key();
        let now = t0();
        let at_ttl = object("at", Some(now - TTL), b);
        assert_eq!(rules.decide(&at_ttl, now), Verdict::Deliver);
        let beyond = object("beyond", Some(now - TTL - secs(1)), b);
        assert_eq!(rules.decide(&beyond, now), Verdict::TooOld);
        // Stale comes first: a pending key's old object is stale, not too old.
        let c = PrivateKey::generate().public_key();
        rules.listening(c, now);
        let old = object("old", Some(now - TTL - secs(1)), c);
        assert_eq!(rules.decide(&old, now), Verdict::Stale);
        // A creation time ahead of our clock: age zero.
        let ahead = object("ahead", Some(now + secs(3)), b);
        assert_eq!(rules.decide(&ahead, now), Verdict::Deliver);
    }

    #[test]
    fn what_is_not_an_envelope_is_invalid_once() {
        let mut rules = Rules::new(TTL);
        let junk = Object {
            uid: "junk",
            created: Some(t0()),
            recipient: None,
        };
        assert_eq!(rules.decide(&junk, t0()), Verdict::Invalid);
        assert_eq!(rules.decide(&junk, t0()), Verdict::Seen);
    }

    #[test]
    fn uids_are_remembered_for_two_ttls() {
        let mut rules = Rules::new(TTL);
        let b = PrivateKey::generate().public_key();
        let now = t0();
        // No creation time: its age never makes it too old, so the memory
        // alone decides.
        let o = object("1", None, b);
        assert_eq!(rules.decide(&o, now), Verdict::Deliver);
        assert_eq!(rules.decide(&o, now + TTL * 2 - secs(1)), Verdict::Seen);
        assert_eq!(rules.decide(&o, now + TTL * 2), Verdict::Deliver);
        assert_eq!(rules.forgotten_early(), 0);
    }

    #[test]
    fn the_memory_of_uids_is_bounded() {
        let mut rules = Rules::new(TTL);
        let b = PrivateKey::generate().public_key();
        let now = t0();
        for i in 0..MAX_KNOWN + 10 {
            let uid = i.to_string();
            let verdict = rules.decide(&object(&uid, Some(now), b), now);
            assert_eq!(verdict, Verdict::Deliver, "{uid}");
        }
        assert!(rules.known.len() <= MAX_KNOWN, "{}", rules.known.len());
        assert_eq!(rules.forgotten_early(), 10);
        // The oldest were forgotten: seen again, they are delivered again.
        assert_eq!(
            rules.decide(&object("0", Some(now), b), now),
            Verdict::Deliver
        );
        // The newest are remembered.
        let last = (MAX_KNOWN + 9).to_string();
        assert_eq!(
            rules.decide(&object(&last, Some(now), b), now),
            Verdict::Seen
        );
    }

    #[test]
    fn ttl_ages() {
        let ttl = Ttl(TTL);
        let now = t0();
        assert_eq!(Ttl::age(None, now), None);
        assert_eq!(Ttl::age(Some(now + secs(1)), now), Some(Duration::ZERO));
        assert!(!ttl.expired(None, now));
        assert!(!ttl.expired(Some(now - TTL), now));
        assert!(ttl.expired(Some(now - TTL - secs(1)), now));
    }

    #[test]
    fn expiry_deletes_ours_after_one_ttl_and_anyones_after_two() {
        let ttl = Ttl(TTL);
        let now = t0();
        let ago = |d: Duration| Some(now - d);
        for (ours, age, expected) in [
            (true, TTL, Expiry::Keep),
            (true, TTL + secs(1), Expiry::Expired),
            (true, TTL * 2 + secs(1), Expiry::Expired),
            (false, TTL + secs(1), Expiry::Keep),
            (false, TTL * 2, Expiry::Keep),
            (false, TTL * 2 + secs(1), Expiry::Abandoned),
        ] {
            assert_eq!(
                ttl.expiry(ago(age), ours, now),
                expected,
                "ours {ours}, age {age:?}"
            );
        }
        // No creation time: nothing to go by.
        assert_eq!(ttl.expiry(None, true, now), Expiry::Keep);
        assert_eq!(ttl.expiry(None, false, now), Expiry::Keep);
        // Created ahead of our clock: age zero.
        assert_eq!(ttl.expiry(Some(now + TTL * 3), false, now), Expiry::Keep);
    }
}
