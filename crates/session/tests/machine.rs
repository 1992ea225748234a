//! docs/PROTOCOL.md §8's state machine without sockets, agents or clocks: inputs in,
//! actions out (quinn-proto style).

use std::time::{Duration, Instant};

use cunicu_signal::{
    Role,
    proto::{
        epdisc::{Candidate, CandidateType, Credentials, NetworkType},
        signaling::Message,
    },
};
use cunicu_signal_session::{
    Action, AgentEvent, BackoffOptions, IceCredentials, IceState, Machine, MachineConfig, State,
};
use rand::{SeedableRng, rngs::StdRng};

const GRACE: Duration = Duration::from_secs(5);

fn machine(role: Role) -> Machine {
    let mut config = MachineConfig::new(role);
    config.backoff = BackoffOptions::default();
    config.disconnect_grace = GRACE;
    Machine::with_rng(config, StdRng::seed_from_u64(42))
}

fn drain(m: &mut Machine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

fn states(actions: &[Action]) -> Vec<State> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::State { state, .. } => Some(*state),
            _ => None,
        })
        .collect()
}

fn credentials(ufrag: &str, pwd: &str, need_creds: bool) -> Message {
    Message {
        credentials: Some(Credentials {
            ufrag: ufrag.into(),
            pwd: pwd.into(),
            need_creds,
        }),
        ..Default::default()
    }
}

fn host(port: i32) -> Candidate {
    Candidate {
        r#type: CandidateType::Host as i32,
        network_type: NetworkType::Udp4 as i32,
        foundation: "1".into(),
        component: 1,
        priority: 2130706431,
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

fn candidate_message(c: Candidate) -> Message {
    Message {
        candidate: Some(c),
        ..Default::default()
    }
}

/// The credentials a Publish action carries.
fn published_credentials(action: &Action) -> Option<&Credentials> {
    match action {
        Action::Publish(message) => message.credentials.as_ref(),
        _ => None,
    }
}

/// Runs a new machine up to Idle with agent 1; returns our credentials.
fn to_idle(m: &mut Machine, now: Instant) -> IceCredentials {
    let actions = drain(m);
    let [
        Action::State {
            agent: 1,
            state: State::Creating,
        },
        Action::CreateAgent {
            agent: 1,
            credentials,
        },
    ] = actions.as_slice()
    else {
        panic!("unexpected start: {actions:?}");
    };
    let credentials = credentials.clone();
    assert!(m.agent_created(now, 1));
    let actions = drain(m);
    assert_eq!(states(&actions), [State::Idle]);
    let sent: Vec<_> = actions.iter().filter_map(published_credentials).collect();
    assert_eq!(
        sent,
        [&Credentials {
            ufrag: credentials.ufrag.clone(),
            pwd: credentials.pwd.clone(),
            need_creds: true
        }]
    );
    credentials
}

/// From Idle to Connected with the peer's credentials ("R", ...).
fn to_connected(m: &mut Machine, now: Instant) {
    m.handle_message(now, &credentials("Rufrag", "Rpassword0123456789", false));
    m.handle_agent_event(now, m.agent(), &AgentEvent::Candidate(host(1000)));
    m.handle_message(now, &candidate_message(host(2000)));
    m.handle_agent_event(now, m.agent(), &AgentEvent::State(IceState::Checking));
    m.handle_agent_event(now, m.agent(), &AgentEvent::State(IceState::Connected));
    let actions = drain(m);
    assert_eq!(
        states(&actions),
        [
            State::Gathering,
            State::Connecting,
            State::Checking,
            State::Connected
        ]
    );
}

#[test]
fn one_session_in_spec_order() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    assert_eq!(m.state(), State::Creating);
    let ours = to_idle(&mut m, t0);
    assert_eq!((ours.ufrag.len(), ours.pwd.len()), (16, 32));
    assert!(
        ours.ufrag
            .chars()
            .chain(ours.pwd.chars())
            .all(|c| c.is_ascii_alphabetic())
    );

    // Credentials are repeated with backoff while idle: 0.5 s ±50 %, ×1.5.
    let mut at = t0;
    let mut interval = 0.5;
    for _ in 0..6 {
        let next = m.poll_timeout().expect("a credentials timer while idle");
        let delay = (next - at).as_secs_f64();
        assert!(
            delay >= interval * 0.5 - 1e-6 && delay <= interval * 1.5 + 1e-6,
            "delay {delay} for interval {interval}"
        );
        m.handle_timeout(next - Duration::from_millis(1));
        assert!(drain(&mut m).is_empty(), "nothing before the deadline");
        m.handle_timeout(next);
        let actions = drain(&mut m);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(published_credentials(&actions[0]).is_some_and(|c| c.need_creds));
        at = next;
        interval *= 1.5;
    }
    assert_eq!(m.stats().credentials_sent, 7);

    // A candidate of the peer may come before its credentials.
    m.handle_message(at, &candidate_message(host(2000)));
    assert_eq!(
        drain(&mut m),
        [Action::AddRemoteCandidate {
            agent: 1,
            candidate: host(2000)
        }]
    );

    // The peer's credentials, asking for ours: answer, store, gather.
    m.handle_message(at, &credentials("Rufrag", "Rpassword0123456789", true));
    let actions = drain(&mut m);
    assert_eq!(
        actions,
        [
            Action::Publish(Box::new(credentials(&ours.ufrag, &ours.pwd, false))),
            Action::State {
                agent: 1,
                state: State::Gathering
            },
            Action::Gather { agent: 1 },
        ]
    );
    assert_eq!(m.poll_timeout(), None, "no more credentials once gathering");
    assert_eq!(
        m.remote_credentials().map(|c| c.ufrag.as_str()),
        Some("Rufrag")
    );

    // The first local candidate: trickled, and with the remote one, connect.
    m.handle_agent_event(at, 1, &AgentEvent::Candidate(host(1000)));
    let actions = drain(&mut m);
    assert_eq!(
        actions,
        [
            Action::Publish(Box::new(candidate_message(host(1000)))),
            Action::State {
                agent: 1,
                state: State::Connecting
            },
            Action::Connect {
                agent: 1,
                role: Role::Controlling,
                remote: IceCredentials {
                    ufrag: "Rufrag".into(),
                    pwd: "Rpassword0123456789".into()
                },
            },
        ]
    );
    // More candidates are trickled and added; no second connect.
    m.handle_agent_event(at, 1, &AgentEvent::Candidate(host(1001)));
    m.handle_message(at, &candidate_message(host(2001)));
    assert_eq!(
        drain(&mut m),
        [
            Action::Publish(Box::new(candidate_message(host(1001)))),
            Action::AddRemoteCandidate {
                agent: 1,
                candidate: host(2001)
            },
        ]
    );
    for state in [IceState::Checking, IceState::Connected, IceState::Completed] {
        m.handle_agent_event(at, 1, &AgentEvent::State(state));
    }
    assert_eq!(
        states(&drain(&mut m)),
        [State::Checking, State::Connected, State::Completed]
    );
    // Asked again (the answer got lost): answer again, nothing else.
    m.handle_message(at, &credentials("Rufrag", "Rpassword0123456789", true));
    assert_eq!(
        drain(&mut m),
        [Action::Publish(Box::new(credentials(
            &ours.ufrag,
            &ours.pwd,
            false
        )))]
    );
    let stats = m.stats();
    assert_eq!((stats.candidates_sent, stats.candidates_added), (2, 2));
    assert_eq!(stats.restarts, 0);
}

#[test]
fn controlled_side_accepts_when_the_remote_candidate_comes_last() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlled);
    to_idle(&mut m, t0);
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", false));
    m.handle_agent_event(t0, 1, &AgentEvent::Candidate(host(1000)));
    let actions = drain(&mut m);
    assert_eq!(
        states(&actions),
        [State::Gathering],
        "no remote candidate yet"
    );
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Publish(m) if m.credentials.is_some())),
        "not asked: no answer"
    );
    m.handle_message(t0, &candidate_message(host(2000)));
    let actions = drain(&mut m);
    assert!(matches!(
        actions.last(),
        Some(Action::Connect {
            role: Role::Controlled,
            agent: 1,
            ..
        })
    ));
}

#[test]
fn changed_peer_credentials_restart_with_new_credentials() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    let first = to_idle(&mut m, t0);
    to_connected(&mut m, t0);

    // The same credentials again, and empty ones: no restart.
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", false));
    m.handle_message(t0, &credentials("", "", false));
    assert!(drain(&mut m).is_empty());

    // New credentials: the peer restarted. Close, and make a new agent.
    m.handle_message(t0, &credentials("Nufrag", "Npassword0123456789", true));
    assert_eq!(
        drain(&mut m),
        [
            Action::State {
                agent: 1,
                state: State::Closing
            },
            Action::CloseAgent { agent: 1 },
        ],
        "no answer with the old credentials"
    );
    // While closing, the peer's messages are not for anyone.
    m.handle_message(t0, &credentials("Nufrag", "Npassword0123456789", true));
    m.handle_message(t0, &candidate_message(host(3000)));
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().ignored, 2);

    m.agent_closed(t0, 1);
    let actions = drain(&mut m);
    assert_eq!(states(&actions), [State::Closed, State::Creating]);
    let Some(Action::CreateAgent {
        agent: 2,
        credentials: second,
    }) = actions.last()
    else {
        panic!("no new agent: {actions:?}");
    };
    assert_ne!(second.ufrag, first.ufrag);
    assert_ne!(second.pwd, first.pwd);
    assert!(m.agent_created(t0, 2));
    let actions = drain(&mut m);
    assert_eq!(
        actions.iter().filter_map(published_credentials).next(),
        Some(&Credentials {
            ufrag: second.ufrag.clone(),
            pwd: second.pwd.clone(),
            need_creds: true
        })
    );
    // The peer's new credentials are taken now, without another restart.
    m.handle_message(t0, &credentials("Nufrag", "Npassword0123456789", true));
    let actions = drain(&mut m);
    assert_eq!(states(&actions), [State::Gathering]);
    assert_eq!(m.stats().restarts, 1);
    assert_eq!(m.stats().agents, 2);
}

#[test]
fn failure_restarts_at_once_and_a_disconnect_after_its_grace() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlled);
    to_idle(&mut m, t0);
    to_connected(&mut m, t0);

    // A short disconnect: the agent recovers, no restart.
    m.handle_agent_event(t0, 1, &AgentEvent::State(IceState::Disconnected));
    assert_eq!(states(&drain(&mut m)), [State::Disconnected]);
    assert_eq!(m.poll_timeout(), Some(t0 + GRACE));
    m.handle_timeout(t0 + GRACE - Duration::from_millis(1));
    assert!(drain(&mut m).is_empty());
    m.handle_agent_event(t0, 1, &AgentEvent::State(IceState::Connected));
    assert_eq!(states(&drain(&mut m)), [State::Connected]);
    assert_eq!(m.poll_timeout(), None);

    // A long one: restart once the grace period is over.
    let t1 = t0 + Duration::from_secs(60);
    m.handle_agent_event(t1, 1, &AgentEvent::State(IceState::Disconnected));
    // Repeated reports do not move the deadline.
    m.handle_agent_event(
        t1 + GRACE / 2,
        1,
        &AgentEvent::State(IceState::Disconnected),
    );
    assert_eq!(states(&drain(&mut m)), [State::Disconnected]);
    m.handle_timeout(t1 + GRACE);
    assert_eq!(
        drain(&mut m),
        [
            Action::State {
                agent: 1,
                state: State::Closing
            },
            Action::CloseAgent { agent: 1 }
        ]
    );
    m.agent_closed(t1, 1);
    drain(&mut m);
    assert!(m.agent_created(t1, 2));
    drain(&mut m);
    to_connected(&mut m, t1);

    // Failed: at once.
    m.handle_agent_event(t1, 2, &AgentEvent::State(IceState::Failed));
    assert_eq!(
        drain(&mut m),
        [
            Action::State {
                agent: 2,
                state: State::Failed
            },
            Action::State {
                agent: 2,
                state: State::Closing
            },
            Action::CloseAgent { agent: 2 }
        ]
    );
    m.agent_closed(t1, 2);
    assert_eq!(states(&drain(&mut m)), [State::Closed, State::Creating]);
    assert_eq!(m.agent(), 3);
    assert_eq!(m.stats().restarts, 2);

    // A dial that fails is a failure too.
    assert!(m.agent_created(t1, 3));
    drain(&mut m);
    to_connected(&mut m, t1);
    m.agent_failed(t1, 3);
    assert_eq!(states(&drain(&mut m)), [State::Failed, State::Closing]);
}

#[test]
fn what_an_old_agent_says_is_ignored() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    to_idle(&mut m, t0);
    to_connected(&mut m, t0);
    m.handle_agent_event(t0, 1, &AgentEvent::State(IceState::Failed));
    m.agent_closed(t0, 1);
    drain(&mut m);
    assert_eq!(m.agent(), 2);
    // Agent 1 again: a late candidate, a state, a creation, a close.
    m.handle_agent_event(t0, 1, &AgentEvent::Candidate(host(5)));
    m.handle_agent_event(t0, 1, &AgentEvent::State(IceState::Connected));
    assert!(!m.agent_created(t0, 1), "an old agent is not wanted");
    m.agent_closed(t0, 1);
    m.agent_failed(t0, 1);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.state(), State::Creating);
    // Agent states before connecting are not the session's.
    assert!(m.agent_created(t0, 2));
    m.handle_agent_event(t0, 2, &AgentEvent::State(IceState::Checking));
    assert_eq!(states(&drain(&mut m)), [State::Idle]);
}

#[test]
fn messages_without_an_agent_and_bad_candidates_are_dropped() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    drain(&mut m);
    // Creating: no agent to answer with or to add candidates to.
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", true));
    m.handle_message(t0, &candidate_message(host(1)));
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().ignored, 2);
    assert!(m.agent_created(t0, 1));
    drain(&mut m);
    for bad in [
        Candidate {
            address: "peer.local".into(),
            ..host(1)
        },
        Candidate { port: 0, ..host(1) },
        Candidate {
            r#type: 77,
            ..host(1)
        },
    ] {
        m.handle_message(t0, &candidate_message(bad));
    }
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().invalid_candidates, 3);
    // Credentials that no ICE agent could use: dropped, not answered.
    m.handle_message(
        t0,
        &credentials(&"u".repeat(257), "Rpassword0123456789", true),
    );
    m.handle_message(t0, &credentials("R ufrag", "Rpassword0123456789", true));
    m.handle_message(t0, &credentials("Rufrag", "pass\nword0123456789", true));
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().invalid_credentials, 3);
    assert_eq!(m.state(), State::Idle);
    assert_eq!(m.stats().candidates_added, 0);
}

#[test]
fn a_failed_creation_is_tried_again_after_a_backoff_delay() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    drain(&mut m);
    m.agent_create_failed(t0, 1);
    assert_eq!(states(&drain(&mut m)), [State::Closed]);
    let at = m.poll_timeout().expect("a retry");
    assert!(at >= t0 + Duration::from_millis(250) && at <= t0 + Duration::from_millis(750));
    m.handle_timeout(at);
    let actions = drain(&mut m);
    assert_eq!(states(&actions), [State::Creating]);
    assert!(matches!(
        actions.last(),
        Some(Action::CreateAgent { agent: 2, .. })
    ));
}

#[test]
fn close_finishes_from_every_phase() {
    let t0 = Instant::now();
    // While idle.
    let mut m = machine(Role::Controlling);
    to_idle(&mut m, t0);
    m.close(t0);
    assert_eq!(
        drain(&mut m),
        [
            Action::State {
                agent: 1,
                state: State::Closing
            },
            Action::CloseAgent { agent: 1 }
        ]
    );
    assert!(!m.is_finished());
    m.agent_closed(t0, 1);
    assert_eq!(states(&drain(&mut m)), [State::Closed]);
    assert!(m.is_finished());
    assert_eq!(m.poll_timeout(), None);

    // While the agent is being created: closed as soon as it exists.
    let mut m = machine(Role::Controlling);
    drain(&mut m);
    m.close(t0);
    assert!(drain(&mut m).is_empty());
    assert!(m.agent_created(t0, 1));
    assert_eq!(
        drain(&mut m),
        [
            Action::State {
                agent: 1,
                state: State::Closing
            },
            Action::CloseAgent { agent: 1 }
        ]
    );
    m.agent_closed(t0, 1);
    drain(&mut m);
    assert!(m.is_finished());

    // While closing for a restart: no new agent.
    let mut m = machine(Role::Controlling);
    to_idle(&mut m, t0);
    to_connected(&mut m, t0);
    m.handle_agent_event(t0, 1, &AgentEvent::State(IceState::Failed));
    drain(&mut m);
    m.close(t0);
    m.agent_closed(t0, 1);
    assert_eq!(states(&drain(&mut m)), [State::Closed]);
    assert!(m.is_finished());

    // After a failed creation.
    let mut m = machine(Role::Controlling);
    drain(&mut m);
    m.agent_create_failed(t0, 1);
    m.close(t0);
    drain(&mut m);
    assert!(m.is_finished());
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn a_late_checking_report_does_not_go_back() {
    // webrtc-ice may report Connected before Checking: two tasks race.
    let t0 = Instant::now();
    let mut m = machine(Role::Controlled);
    to_idle(&mut m, t0);
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", false));
    m.handle_agent_event(t0, 1, &AgentEvent::Candidate(host(1000)));
    m.handle_message(t0, &candidate_message(host(2000)));
    drain(&mut m);
    for state in [
        IceState::Connected,
        IceState::Checking,
        IceState::Connected,
        IceState::Completed,
        IceState::Checking,
    ] {
        m.handle_agent_event(t0, 1, &AgentEvent::State(state));
    }
    assert_eq!(
        states(&drain(&mut m)),
        [State::Checking, State::Connected, State::Completed]
    );
    assert_eq!(m.state(), State::Completed);
}

#[test]
fn replayed_old_credentials_of_the_peer_are_ignored() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    to_idle(&mut m, t0);
    to_connected(&mut m, t0);
    // The peer restarts with new credentials: so do we.
    m.handle_message(t0, &credentials("Nufrag", "Npassword0123456789", true));
    m.agent_closed(t0, 1);
    assert!(m.agent_created(t0, 2));
    drain(&mut m);
    m.handle_message(t0, &credentials("Nufrag", "Npassword0123456789", false));
    m.handle_agent_event(t0, 2, &AgentEvent::Candidate(host(1000)));
    m.handle_message(t0, &candidate_message(host(2000)));
    m.handle_agent_event(t0, 2, &AgentEvent::State(IceState::Connected));
    drain(&mut m);
    assert_eq!(m.state(), State::Connected);

    // A genuine old envelope of the peer, replayed (by the signaling server
    // or a LAN host), asking for an answer: no restart, no answer.
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", true));
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", false));
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.state(), State::Connected);
    assert_eq!(m.stats().replayed_credentials, 2);
    assert_eq!(m.stats().restarts, 1);
    // The current ones are still answered; new ones still restart.
    m.handle_message(t0, &credentials("Nufrag", "Npassword0123456789", true));
    assert_eq!(
        drain(&mut m)
            .iter()
            .filter_map(published_credentials)
            .count(),
        1
    );
    m.handle_message(t0, &credentials("Xufrag", "Xpassword0123456789", false));
    assert_eq!(states(&drain(&mut m)), [State::Closing]);
    m.agent_closed(t0, 2);
    assert!(m.agent_created(t0, 3));
    drain(&mut m);
    // A replay on a new agent, before the peer's current credentials came:
    // not taken either (both old ones are remembered).
    for (u, p) in [
        ("Rufrag", "Rpassword0123456789"),
        ("Nufrag", "Npassword0123456789"),
    ] {
        m.handle_message(t0, &credentials(u, p, true));
    }
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.state(), State::Idle);
    assert_eq!(m.stats().replayed_credentials, 4);
    m.handle_message(t0, &credentials("Xufrag", "Xpassword0123456789", false));
    assert_eq!(states(&drain(&mut m)), [State::Gathering]);
}

#[test]
fn only_the_last_superseded_credentials_are_remembered() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlled);
    to_idle(&mut m, t0);
    let creds = |i: usize| (format!("ufrag{i}"), format!("password{i}x0123456789"));
    // The peer goes through 1 + SUPERSEDED_CREDENTIALS + 1 credentials; each
    // change restarts us.
    let n = cunicu_signal_session::SUPERSEDED_CREDENTIALS + 2;
    for i in 0..n {
        let (u, p) = creds(i);
        m.handle_message(t0, &credentials(&u, &p, false));
        let agent = m.agent();
        if m.state() == State::Closing {
            m.agent_closed(t0, agent);
            assert!(m.agent_created(t0, agent + 1));
            m.handle_message(t0, &credentials(&u, &p, false));
        }
        assert_eq!(m.state(), State::Gathering, "credentials {i}");
        drain(&mut m);
    }
    assert_eq!(m.stats().restarts, n as u64 - 1);
    // The oldest one is forgotten (a restart); the one after is remembered.
    let (u, p) = creds(1);
    m.handle_message(t0, &credentials(&u, &p, false));
    assert_eq!(m.stats().replayed_credentials, 1);
    assert_eq!(m.state(), State::Gathering);
    let (u, p) = creds(0);
    m.handle_message(t0, &credentials(&u, &p, false));
    assert_eq!(m.state(), State::Closing);
}

#[test]
fn remote_candidates_beyond_the_limit_are_dropped() {
    let t0 = Instant::now();
    let mut m = machine(Role::Controlling);
    to_idle(&mut m, t0);
    let limit = cunicu_signal_session::MAX_REMOTE_CANDIDATES;
    assert_eq!(
        MachineConfig::new(Role::Controlling).max_remote_candidates,
        limit
    );
    for port in 0..limit + 10 {
        m.handle_message(t0, &candidate_message(host(1000 + port as i32)));
    }
    let added = drain(&mut m)
        .into_iter()
        .filter(|a| matches!(a, Action::AddRemoteCandidate { .. }))
        .count();
    assert_eq!(added as u64, limit);
    assert_eq!(m.stats().candidates_added, limit);
    assert_eq!(m.stats().excess_candidates, 10);
    // The limit is per agent: a new one takes candidates again.
    m.handle_message(t0, &credentials("Rufrag", "Rpassword0123456789", false));
    m.handle_agent_event(t0, 1, &AgentEvent::State(IceState::Failed));
    m.agent_failed(t0, 1);
    m.agent_closed(t0, 1);
    assert!(m.agent_created(t0, 2));
    drain(&mut m);
    m.handle_message(t0, &candidate_message(host(9)));
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::AddRemoteCandidate { agent: 2, .. }]
    ));
}

#[test]
fn debug_of_actions_hides_passwords() {
    let mut m = machine(Role::Controlling);
    let ours = to_idle(&mut m, Instant::now());
    let publish = Action::Publish(Box::new(credentials(&ours.ufrag, &ours.pwd, true)));
    let connect = Action::Connect {
        agent: 1,
        role: Role::Controlling,
        remote: IceCredentials {
            ufrag: "Rufrag".into(),
            pwd: "Rpassword0123456789".into(),
        },
    };
    let create = Action::CreateAgent {
        agent: 1,
        credentials: ours.clone(),
    };
    for action in [publish, connect, create] {
        let shown = format!("{action:?} {action:#?}");
        assert!(
            !shown.contains(&ours.pwd) && !shown.contains("Rpassword"),
            "{shown}"
        );
        assert!(
            shown.contains(&ours.ufrag) || shown.contains("Rufrag"),
            "{shown}"
        );
    }
    let candidate = Action::Publish(Box::new(candidate_message(host(7))));
    assert!(format!("{candidate:?}").contains("127.0.0.1"));
}

#[test]
fn credentials_that_reach_nobody_go_out_less_often_until_the_peer_speaks() {
    let mut m = machine(Role::Controlling);
    let t0 = Instant::now();
    let ours = to_idle(&mut m, t0);
    // The usual pace: about 0.5 s.
    let usual = m.poll_timeout().expect("a repeat is due") - t0;
    assert!(usual <= Duration::from_millis(750), "{usual:?}");

    // The server counted nobody: the next repeat is 1 s away (±20 %), then
    // doubles each time nobody gets them, up to a minute.
    let mut now = t0;
    let mut delays = Vec::new();
    for _ in 0..8 {
        m.credentials_reached(now, &ours.ufrag, Some(0));
        let at = m.poll_timeout().expect("a repeat is due");
        delays.push(at - now);
        now = at;
        m.handle_timeout(now);
        assert_eq!(
            drain(&mut m)
                .iter()
                .filter_map(published_credentials)
                .count(),
            1
        );
    }
    assert_eq!(m.stats().peer_absent, 1, "counted once per absence");
    assert!(
        (Duration::from_millis(800)..=Duration::from_millis(1200)).contains(&delays[0]),
        "{delays:?}"
    );
    for pair in delays.windows(2).take(4) {
        assert!(pair[1] > pair[0] * 3 / 2, "doubling: {delays:?}");
    }
    assert!(
        delays.iter().all(|d| *d <= Duration::from_secs(60)),
        "{delays:?}"
    );
    assert!(delays[7] >= Duration::from_secs(48), "{delays:?}");

    // The last repeat reached nobody either; a count for other credentials
    // (an old agent's) changes nothing.
    m.credentials_reached(now, &ours.ufrag, Some(0));
    let next = m.poll_timeout().expect("due");
    assert!(next - now >= Duration::from_secs(48), "{:?}", next - now);
    m.credentials_reached(now, "someone-else", Some(5));
    assert_eq!(m.poll_timeout(), Some(next));

    // The peer's first message, even one that is not credentials, brings
    // our credentials at once.
    m.handle_message(now, &candidate_message(host(4000)));
    let actions = drain(&mut m);
    let sent: Vec<_> = actions.iter().filter_map(published_credentials).collect();
    assert_eq!(sent.len(), 1, "{actions:?}");
    assert!(sent[0].need_creds);
    assert!(m.poll_timeout().expect("due") - now <= Duration::from_millis(750));
}

#[test]
fn credentials_that_reach_someone_keep_the_usual_pace() {
    let mut m = machine(Role::Controlled);
    let t0 = Instant::now();
    let ours = to_idle(&mut m, t0);
    let before = m.poll_timeout();
    m.credentials_reached(t0, &ours.ufrag, Some(1));
    m.credentials_reached(t0, &ours.ufrag, None);
    assert_eq!(m.poll_timeout(), before);
    assert_eq!(m.stats().peer_absent, 0);
}

/// Gathering that ends without a single local candidate is reported: the
/// peer could never reach us. Gathering that found one is not.
#[test]
fn gathering_nothing_is_reported() {
    let now = Instant::now();
    let mut m = machine(Role::Controlled);
    to_idle(&mut m, now);
    m.handle_message(now, &credentials("Rufrag", "Rpassword0123456789", false));
    assert_eq!(states(&drain(&mut m)), [State::Gathering]);
    m.handle_agent_event(now, m.agent(), &AgentEvent::GatheringComplete);
    let actions = drain(&mut m);
    assert_eq!(actions, [Action::NoCandidates { agent: 1 }]);

    let mut m = machine(Role::Controlled);
    to_idle(&mut m, now);
    m.handle_message(now, &credentials("Rufrag", "Rpassword0123456789", false));
    m.handle_agent_event(now, m.agent(), &AgentEvent::Candidate(host(1000)));
    drain(&mut m);
    m.handle_agent_event(now, m.agent(), &AgentEvent::GatheringComplete);
    assert!(
        !drain(&mut m)
            .iter()
            .any(|a| matches!(a, Action::NoCandidates { .. })),
        "reported although a candidate was gathered"
    );
}
