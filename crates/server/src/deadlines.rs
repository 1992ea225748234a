//! When a call has waited too long for its request, and when a subscriber
//! takes too little of what it is offered: the judgements alone, without
//! I/O and without reading a clock. The connection task ([`crate::conn`])
//! and the hub ([`crate::hub`]) feed them the time and the bytes, and act
//! on what they answer.
//!
//! - A call's request: its first message bytes must come within the
//!   first-bytes timeout of its headers (a second by default), and the whole
//!   message within the request timeout. A stream opened with headers alone
//!   holds its slots for a second, not for the request timeout.
//! - A connection ([`ConnectionDeadlines`]): its first request must come
//!   within the handshake timeout; without a stream for the idle timeout
//!   it is sent away (GOAWAY); a keepalive ping goes every interval and
//!   must be answered within the keepalive timeout; one the server ended
//!   has a grace to let its last answers out; while envelopes wait for its
//!   subscribers, they are judged a few times per stall cut-off.
//! - A subscriber is judged by its drain rate: over each stall cut-off
//!   during which envelopes waited for it, the bytes its connection took
//!   are set against the bytes it owed (what waited at the start of that
//!   span and what was queued during it). One that took less than
//!   1/[`SLOW`] of what it owed is too slow. Opening a window of a few bytes
//!   now and then does not keep a backlog: what a subscriber can hold is
//!   bounded by what it drains.

use std::time::Duration;

use tokio::time::Instant;

use crate::bounds::SLOW;

/// Which deadline of a request passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Late {
    /// No message bytes came within the first-bytes timeout.
    FirstBytes,
    /// The message was not whole within the request timeout.
    Whole,
}

/// The deadlines of one call's request message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestDeadline {
    opened: Instant,
    first_bytes: Duration,
    whole: Duration,
}

impl RequestDeadline {
    /// A call whose headers came at `opened`.
    pub(crate) fn new(opened: Instant, first_bytes: Duration, whole: Duration) -> Self {
        RequestDeadline {
            opened,
            first_bytes: first_bytes.min(whole),
            whole,
        }
    }

    /// When the next deadline passes, given whether message bytes came.
    pub(crate) fn due(&self, got_bytes: bool) -> Instant {
        if got_bytes {
            self.opened + self.whole
        } else {
            self.opened + self.first_bytes
        }
    }

    /// Which deadline has passed at `now`, if one has.
    pub(crate) fn late(&self, now: Instant, got_bytes: bool) -> Option<Late> {
        if now >= self.opened + self.whole {
            Some(Late::Whole)
        } else if !got_bytes && now >= self.opened + self.first_bytes {
            Some(Late::FirstBytes)
        } else {
            None
        }
    }
}

/// One span of a stall cut-off during which envelopes waited.
#[derive(Debug, Clone, Copy)]
struct Span {
    since: Instant,
    /// Bytes waiting when the span began.
    backlog: usize,
    /// Bytes queued during the span.
    offered: usize,
    /// Bytes taken (written to the connection) during the span.
    taken: usize,
}

/// What [`DrainMeter::judge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing waits, or the span is not over yet.
    Waiting,
    /// The span that ended kept up; a new one begins.
    KeptUp,
    /// Too slow: it took `taken` of the `owed` bytes.
    TooSlow { taken: usize, owed: usize },
}

/// How fast a subscriber takes what it is offered.
#[derive(Debug, Default, Clone)]
pub(crate) struct DrainMeter {
    span: Option<Span>,
}

impl DrainMeter {
    /// `bytes` were queued at `now`, with `backlog` bytes waiting before
    /// them. Returns whether envelopes wait from now on (they did not).
    pub(crate) fn offered(&mut self, now: Instant, bytes: usize, backlog: usize) -> bool {
        match &mut self.span {
            Some(span) => {
                span.offered = span.offered.saturating_add(bytes);
                false
            }
            None => {
                self.span = Some(Span {
                    since: now,
                    backlog,
                    offered: bytes,
                    taken: 0,
                });
                true
            }
        }
    }

    /// `bytes` were taken (written to the subscriber's connection).
    pub(crate) fn took(&mut self, bytes: usize) {
        if let Some(span) = &mut self.span {
            span.taken = span.taken.saturating_add(bytes);
        }
    }

    /// Nothing waits any more. Returns whether something waited.
    pub(crate) fn caught_up(&mut self) -> bool {
        self.span.take().is_some()
    }

    /// Since when envelopes have waited without the subscriber catching up.
    #[cfg(test)]
    pub(crate) fn waiting_since(&self) -> Option<Instant> {
        self.span.map(|span| span.since)
    }

    /// Judges the span that began a `cutoff` or more before `now`, with
    /// `backlog` bytes waiting now; a subscriber that kept up starts a new
    /// span with that backlog.
    pub(crate) fn judge(&mut self, now: Instant, cutoff: Duration, backlog: usize) -> Verdict {
        let Some(span) = &mut self.span else {
            return Verdict::Waiting;
        };
        if now.saturating_duration_since(span.since) < cutoff {
            return Verdict::Waiting;
        }
        let owed = span.backlog.saturating_add(span.offered);
        if span.taken.saturating_mul(SLOW) < owed {
            return Verdict::TooSlow {
                taken: span.taken,
                owed,
            };
        }
        *span = Span {
            since: now,
            backlog,
            offered: 0,
            taken: 0,
        };
        Verdict::KeptUp
    }
}

/// What a connection's deadlines call for, in the order they are looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Send a keepalive ping (then say [`ConnectionDeadlines::ping_failed`]
    /// if it could not go).
    Ping,
    /// The ping went unanswered within the keepalive timeout: drop it.
    PongLate,
    /// No first request within the handshake timeout: close it.
    FirstRequest,
    /// The grace of a connection the server ended is over: close it.
    CloseBy,
    /// No stream for the idle timeout: send it away.
    Idle,
    /// Judge the subscribers that envelopes wait for.
    StallCheck,
}

/// The keepalive's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keepalive {
    /// The next ping goes at this time.
    Next(Instant),
    /// A ping is out; without its answer by this time the connection goes.
    Waiting(Instant),
}

/// The timeouts a connection's deadlines are made of.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionTimeouts {
    pub(crate) idle: Duration,
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
    /// The span over which a subscriber's drain rate is judged.
    pub(crate) stall: Duration,
}

/// The deadlines of one connection. The connection tells it what happened
/// and asks [`ConnectionDeadlines::take_due`] what is due; each due is
/// answered once.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionDeadlines {
    timeouts: ConnectionTimeouts,
    keepalive: Keepalive,
    first_request: Option<Instant>,
    idle: Option<Instant>,
    close_by: Option<Instant>,
    stall_check: Option<Instant>,
}

impl ConnectionDeadlines {
    /// A connection set up at `now` whose first request must come by
    /// `first_request`.
    pub(crate) fn new(now: Instant, first_request: Instant, timeouts: ConnectionTimeouts) -> Self {
        ConnectionDeadlines {
            timeouts,
            keepalive: Keepalive::Next(now + timeouts.keepalive_interval),
            first_request: Some(first_request),
            idle: None,
            close_by: None,
            stall_check: None,
        }
    }

    /// A request came: the connection is no longer new.
    pub(crate) fn request_came(&mut self) {
        self.first_request = None;
    }

    /// A stream was let in: the connection is not idle.
    pub(crate) fn stream_opened(&mut self) {
        self.idle = None;
    }

    /// Its last stream ended at `now`: idle from now on.
    pub(crate) fn streams_ended(&mut self, now: Instant) {
        self.idle = Some(now + self.timeouts.idle);
    }

    /// It is going away (GOAWAY sent): it ends with its last stream, so
    /// neither a first request nor idleness matters any more.
    pub(crate) fn going_away(&mut self) {
        self.first_request = None;
        self.idle = None;
    }

    /// The server ended it at `now`: it goes away, and within `grace` in
    /// any case.
    pub(crate) fn close_within(&mut self, now: Instant, grace: Duration) {
        self.going_away();
        self.close_by = Some(now + grace);
    }

    /// Whether the server ended it and it is only letting its last answers out.
    pub(crate) fn is_closing(&self) -> bool {
        self.close_by.is_some()
    }

    /// Whether a ping is out and its answer awaited.
    pub(crate) fn awaits_pong(&self) -> bool {
        matches!(self.keepalive, Keepalive::Waiting(_))
    }

    /// The answer to the ping came at `now` (or the ping is lost to an
    /// error, which the connection's end reports): the next goes after an
    /// interval.
    pub(crate) fn pong_came(&mut self, now: Instant) {
        self.keepalive = Keepalive::Next(now + self.timeouts.keepalive_interval);
    }

    /// The ping that was due could not go: try again after an interval.
    pub(crate) fn ping_failed(&mut self, now: Instant) {
        self.pong_came(now);
    }

    /// Whether envelopes wait for its subscribers at `now`: while they do,
    /// they are judged every quarter of the stall cut-off (between 10 ms and
    /// a second).
    pub(crate) fn watch_stalls(&mut self, now: Instant, waiting: bool) {
        if !waiting {
            self.stall_check = None;
        } else if self.stall_check.is_none() {
            let every =
                (self.timeouts.stall / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            self.stall_check = Some(now + every);
        }
    }

    /// What is due at `now`, if anything; each is answered once.
    pub(crate) fn take_due(&mut self, now: Instant) -> Option<Due> {
        match self.keepalive {
            Keepalive::Next(at) if now >= at => {
                self.keepalive = Keepalive::Waiting(now + self.timeouts.keepalive_timeout);
                return Some(Due::Ping);
            }
            Keepalive::Waiting(at) if now >= at => {
                self.pong_came(now);
                return Some(Due::PongLate);
            }
            _ => {}
        }
        let due = |at: &mut Option<Instant>| at.take_if(|at| now >= *at).is_some();
        if due(&mut self.first_request) {
            Some(Due::FirstRequest)
        } else if due(&mut self.close_by) {
            Some(Due::CloseBy)
        } else if due(&mut self.idle) {
            Some(Due::Idle)
        } else if due(&mut self.stall_check) {
            Some(Due::StallCheck)
        } else {
            None
        }
    }

    /// When the next deadline is.
    pub(crate) fn next(&self) -> Instant {
        let (Keepalive::Next(keepalive) | Keepalive::Waiting(keepalive)) = self.keepalive;
        [
            self.first_request,
            self.close_by,
            self.idle,
            self.stall_check,
        ]
        .into_iter()
        .flatten()
        .fold(keepalive, Instant::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn headers_alone_hold_a_call_for_the_first_bytes_timeout_only() {
        let t0 = Instant::now();
        let deadline = RequestDeadline::new(t0, SECOND, 10 * SECOND);
        assert_eq!(deadline.due(false), t0 + SECOND);
        assert_eq!(deadline.late(t0 + SECOND / 2, false), None);
        assert_eq!(deadline.late(t0 + SECOND, false), Some(Late::FirstBytes));
        // Bytes came: the whole message has the request timeout.
        assert_eq!(deadline.due(true), t0 + 10 * SECOND);
        assert_eq!(deadline.late(t0 + 9 * SECOND, true), None);
        assert_eq!(deadline.late(t0 + 10 * SECOND, true), Some(Late::Whole));
        assert_eq!(deadline.late(t0 + 10 * SECOND, false), Some(Late::Whole));
        // A first-bytes timeout longer than the request's is the request's.
        let short = RequestDeadline::new(t0, 20 * SECOND, 10 * SECOND);
        assert_eq!(short.due(false), t0 + 10 * SECOND);
    }

    #[test]
    fn a_subscriber_that_takes_nothing_is_too_slow_after_the_cutoff() {
        let t0 = Instant::now();
        let cutoff = 30 * SECOND;
        let mut meter = DrainMeter::default();
        assert_eq!(meter.judge(t0, cutoff, 0), Verdict::Waiting);
        assert!(meter.offered(t0, 100, 0), "waiting starts");
        assert!(!meter.offered(t0 + SECOND, 100, 100));
        assert_eq!(meter.waiting_since(), Some(t0));
        assert_eq!(meter.judge(t0 + 29 * SECOND, cutoff, 200), Verdict::Waiting);
        assert_eq!(
            meter.judge(t0 + cutoff, cutoff, 200),
            Verdict::TooSlow {
                taken: 0,
                owed: 200
            }
        );
    }

    #[test]
    fn a_trickle_of_window_does_not_keep_a_backlog() {
        // The feed queues 1 000 bytes a second; the subscriber opens a
        // window of 121 bytes every 10 s, so that one envelope goes.
        let t0 = Instant::now();
        let cutoff = 30 * SECOND;
        let mut meter = DrainMeter::default();
        let mut backlog = 0;
        let mut verdict = Verdict::Waiting;
        for s in 0..=30u32 {
            let now = t0 + s * SECOND;
            meter.offered(now, 1000, backlog);
            backlog += 1000;
            if s % 10 == 9 {
                meter.took(121);
                backlog -= 121;
            }
            verdict = meter.judge(now, cutoff, backlog);
        }
        assert_eq!(
            verdict,
            Verdict::TooSlow {
                taken: 363,
                owed: 31_000
            }
        );
    }

    #[test]
    fn a_subscriber_that_keeps_up_with_a_steady_feed_stays() {
        let t0 = Instant::now();
        let cutoff = 30 * SECOND;
        let mut meter = DrainMeter::default();
        // 100 envelopes of 1 000 bytes a second; one always waits (the
        // window is a little behind), the rest is taken.
        meter.offered(t0, 1000, 0);
        let mut verdicts = Vec::new();
        for s in 1..=95u32 {
            let now = t0 + s * SECOND;
            meter.offered(now, 100_000, 1000);
            meter.took(100_000);
            let verdict = meter.judge(now, cutoff, 1000);
            if verdict != Verdict::Waiting {
                verdicts.push((s, verdict));
            }
        }
        assert_eq!(
            verdicts,
            vec![
                (30, Verdict::KeptUp),
                (60, Verdict::KeptUp),
                (90, Verdict::KeptUp)
            ]
        );
        assert_eq!(meter.waiting_since(), Some(t0 + 90 * SECOND));
    }

    #[test]
    fn a_link_a_few_times_slower_than_its_feed_stays_and_a_much_slower_one_goes() {
        let cutoff = 30 * SECOND;
        let run = |takes_per_second: usize| {
            let t0 = Instant::now();
            let mut meter = DrainMeter::default();
            let mut backlog = 0usize;
            for s in 0..=30u32 {
                let now = t0 + s * SECOND;
                meter.offered(now, 10_000, backlog);
                backlog += 10_000;
                let took = takes_per_second.min(backlog);
                meter.took(took);
                backlog -= took;
                let verdict = meter.judge(now, cutoff, backlog);
                if verdict != Verdict::Waiting {
                    return verdict;
                }
            }
            Verdict::Waiting
        };
        assert_eq!(run(3_000), Verdict::KeptUp, "takes 30 % of its feed");
        assert!(
            matches!(run(2_000), Verdict::TooSlow { .. }),
            "takes 20 % of its feed"
        );
    }

    #[test]
    fn catching_up_ends_the_span() {
        let t0 = Instant::now();
        let cutoff = 30 * SECOND;
        let mut meter = DrainMeter::default();
        meter.offered(t0, 100, 0);
        meter.took(100);
        assert!(meter.caught_up());
        assert!(!meter.caught_up());
        assert_eq!(meter.waiting_since(), None);
        // A backlog that comes later is judged from then.
        assert!(meter.offered(t0 + 40 * SECOND, 100, 0));
        assert_eq!(meter.judge(t0 + 41 * SECOND, cutoff, 100), Verdict::Waiting);
    }

    const TIMEOUTS: ConnectionTimeouts = ConnectionTimeouts {
        idle: Duration::from_secs(300),
        keepalive_interval: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(20),
        stall: Duration::from_secs(30),
    };

    fn all_due(deadlines: &mut ConnectionDeadlines, now: Instant) -> Vec<Due> {
        std::iter::from_fn(|| deadlines.take_due(now)).collect()
    }

    #[test]
    fn a_connection_without_a_first_request_goes_at_the_handshake_deadline() {
        let t0 = Instant::now();
        let mut deadlines = ConnectionDeadlines::new(t0, t0 + 10 * SECOND, TIMEOUTS);
        assert_eq!(deadlines.next(), t0 + 10 * SECOND);
        assert_eq!(all_due(&mut deadlines, t0 + 9 * SECOND), vec![]);
        assert_eq!(
            all_due(&mut deadlines, t0 + 10 * SECOND),
            vec![Due::FirstRequest]
        );
        // A request in time: nothing is due until the keepalive.
        let mut deadlines = ConnectionDeadlines::new(t0, t0 + 10 * SECOND, TIMEOUTS);
        deadlines.request_came();
        assert_eq!(deadlines.next(), t0 + 60 * SECOND);
        assert_eq!(all_due(&mut deadlines, t0 + 59 * SECOND), vec![]);
    }

    #[test]
    fn an_idle_connection_is_sent_away_unless_a_request_comes_or_it_goes_already() {
        let t0 = Instant::now();
        let mut deadlines = ConnectionDeadlines::new(t0, t0, TIMEOUTS);
        deadlines.request_came();
        deadlines.streams_ended(t0 + SECOND);
        assert_eq!(all_due(&mut deadlines, t0 + 300 * SECOND), vec![Due::Ping]);
        deadlines.pong_came(t0 + 300 * SECOND);
        assert_eq!(all_due(&mut deadlines, t0 + 301 * SECOND), vec![Due::Idle]);
        assert_eq!(all_due(&mut deadlines, t0 + 302 * SECOND), vec![]);
        // A stream puts it off; going away ends it.
        deadlines.streams_ended(t0);
        deadlines.stream_opened();
        deadlines.streams_ended(t0 + 10 * SECOND);
        deadlines.going_away();
        assert!(!all_due(&mut deadlines, t0 + 1000 * SECOND).contains(&Due::Idle));
    }

    #[test]
    fn an_unanswered_ping_drops_the_connection_and_an_answered_one_schedules_the_next() {
        let t0 = Instant::now();
        let mut deadlines = ConnectionDeadlines::new(t0, t0 + SECOND, TIMEOUTS);
        deadlines.request_came();
        let ping = t0 + 60 * SECOND;
        assert_eq!(all_due(&mut deadlines, ping), vec![Due::Ping]);
        assert!(deadlines.awaits_pong());
        assert_eq!(deadlines.next(), ping + 20 * SECOND);
        // Answered: the next ping an interval later.
        deadlines.pong_came(ping + SECOND);
        assert!(!deadlines.awaits_pong());
        assert_eq!(deadlines.next(), ping + 61 * SECOND);
        // Not answered: dropped at the keepalive timeout.
        let ping = ping + 61 * SECOND;
        assert_eq!(all_due(&mut deadlines, ping), vec![Due::Ping]);
        assert_eq!(all_due(&mut deadlines, ping + 19 * SECOND), vec![]);
        assert_eq!(
            all_due(&mut deadlines, ping + 20 * SECOND),
            vec![Due::PongLate]
        );
        // A ping that could not go is tried again an interval later.
        let mut deadlines = ConnectionDeadlines::new(t0, t0 + SECOND, TIMEOUTS);
        deadlines.request_came();
        assert_eq!(all_due(&mut deadlines, t0 + 60 * SECOND), vec![Due::Ping]);
        deadlines.ping_failed(t0 + 60 * SECOND);
        assert_eq!(deadlines.next(), t0 + 120 * SECOND);
    }

    #[test]
    fn a_connection_the_server_ended_goes_after_its_grace() {
        let t0 = Instant::now();
        let mut deadlines = ConnectionDeadlines::new(t0, t0 + 10 * SECOND, TIMEOUTS);
        deadlines.close_within(t0, SECOND);
        assert!(deadlines.is_closing());
        assert_eq!(deadlines.next(), t0 + SECOND);
        // Neither the first request's deadline nor idleness applies now.
        assert_eq!(all_due(&mut deadlines, t0 + SECOND), vec![Due::CloseBy]);
        assert_eq!(all_due(&mut deadlines, t0 + 10 * SECOND), vec![]);
    }

    #[test]
    fn stalls_are_judged_a_few_times_per_cutoff_while_envelopes_wait() {
        let t0 = Instant::now();
        let mut deadlines = ConnectionDeadlines::new(t0, t0, TIMEOUTS);
        deadlines.request_came();
        deadlines.watch_stalls(t0, true);
        // A quarter of 30 s, at most a second.
        assert_eq!(deadlines.next(), t0 + SECOND);
        // Still waiting: the check is not put off.
        deadlines.watch_stalls(t0 + SECOND / 2, true);
        assert_eq!(all_due(&mut deadlines, t0 + SECOND), vec![Due::StallCheck]);
        deadlines.watch_stalls(t0 + SECOND, true);
        assert_eq!(deadlines.next(), t0 + 2 * SECOND);
        // Nothing waits: no check.
        deadlines.watch_stalls(t0 + SECOND, false);
        assert_eq!(all_due(&mut deadlines, t0 + 2 * SECOND), vec![]);
        // A short cut-off is checked every 10 ms at least.
        let short = ConnectionTimeouts {
            stall: Duration::from_millis(20),
            ..TIMEOUTS
        };
        let mut deadlines = ConnectionDeadlines::new(t0, t0, short);
        deadlines.request_came();
        deadlines.watch_stalls(t0, true);
        assert_eq!(deadlines.next(), t0 + Duration::from_millis(10));
    }
}
