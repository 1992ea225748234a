//! Clients by proven key with outer bounds per address and per IPv6 /48,
//! and fair shares at the server's caps (docs/PROTOCOL.md §13), tried as an
//! attacker and as a fleet behind one NAT would, from many source addresses
//! on loopback. The server's caps are made small (the ratios kept) so that
//! filling them is quick.

mod fixture;

use std::{collections::HashMap, net::Ipv6Addr, num::NonZeroU32, time::Duration};

use anyhow::{Context as _, Result, ensure};
use cunicu_signal::PrivateKey;
use cunicu_signal_server::{Config, Server};
use fixture::{Ended, Peer, RESOURCE_EXHAUSTED, Subscription, metric, start, v4};
use futures::future::join_all;
use tokio::time::{Instant, sleep, timeout};

/// Waits until the metric `name` is `want`.
async fn metric_becomes(server: &Server, name: &str, want: f64) -> Result<()> {
    let deadline = Instant::now() + fixture::STEP;
    loop {
        let got = metric(server, name);
        if got == want {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{name} is {got}, not {want}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A well-behaved client from `from`: subscribes, publishes to itself and
/// gets it, within a few seconds. Its connection, still open.
async fn well_behaved(server: &Server, from: std::net::IpAddr) -> Result<Peer> {
    timeout(Duration::from_secs(5), async {
        let mut peer = Peer::connect(server.local_addr(), from).await?;
        let key = PrivateKey::generate();
        let mut subscription = peer
            .subscribe(&key)
            .await?
            .map_err(|e| anyhow::anyhow!("subscribe refused: {e:?}"))?;
        peer.publish(&PrivateKey::generate(), &key.public_key(), b"hello")
            .await?
            .map_err(|e| anyhow::anyhow!("publish refused: {e:?}"))?;
        let envelope = subscription.envelope().await?;
        ensure!(
            envelope.contents.map(|c| c.body) == Some(b"hello".to_vec()),
            "another envelope came"
        );
        Ok(peer)
    })
    .await
    .context("the well-behaved client was not served within 5 s")?
}

/// How many of `subscriptions` end with RESOURCE_EXHAUSTED within `wait`
/// (looked at all at once), and how many otherwise.
async fn ended_exhausted(subscriptions: &mut [Subscription], wait: Duration) -> (usize, usize) {
    let ended: Vec<Option<Ended>> =
        join_all(subscriptions.iter_mut().map(|s| s.ended_within(wait))).await;
    let exhausted = ended
        .iter()
        .filter(|e| e.as_ref().is_some_and(|e| e.code == RESOURCE_EXHAUSTED))
        .count();
    let other = ended.iter().flatten().count() - exhausted;
    (exhausted, other)
}

/// 157 addresses x 64 connections with an idle subscription each held all
/// 10 000 connections, and a new client was never served (accepting
/// waited). Here 8 x 8 hold all 64: a newcomer from another address is
/// served at once, and the newest connection of a largest holder goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_by_many_addresses_leave_room_for_a_newcomer() -> Result<()> {
    let mut config = Config::default();
    config.max_connections = 64;
    config.max_connections_per_client = 8;
    config.address_connections = 8;
    let server = start(config, v4(0, 1)).await;
    let mut held = Vec::new();
    let mut subscriptions = Vec::new();
    for a in 1..=8 {
        for _ in 0..8 {
            let mut peer = Peer::connect(server.local_addr(), v4(10, a)).await?;
            let subscription = peer
                .subscribe(&PrivateKey::generate())
                .await?
                .map_err(|e| anyhow::anyhow!("attacker refused early: {e:?}"))?;
            held.push(peer);
            subscriptions.push(subscription);
        }
    }
    metric_becomes(&server, "signaling_connections", 64.0).await?;

    let first = well_behaved(&server, v4(11, 1)).await?;
    metric_becomes(
        &server,
        "signaling_connections_closed_total{reason=\"fair_share\"}",
        1.0,
    )
    .await?;
    let (exhausted, other) = ended_exhausted(&mut subscriptions, Duration::from_millis(500)).await;
    assert_eq!(
        (exhausted, other),
        (1, 0),
        "one attacker stream ended, as RESOURCE_EXHAUSTED"
    );
    // Again, the first newcomer still connected: another attacker's goes.
    let second = well_behaved(&server, v4(11, 2)).await?;
    metric_becomes(
        &server,
        "signaling_connections_closed_total{reason=\"fair_share\"}",
        2.0,
    )
    .await?;
    metric_becomes(&server, "signaling_connections", 64.0).await?;
    assert_eq!(
        metric(
            &server,
            "signaling_connections_refused_total{reason=\"too_many_connections\"}"
        ),
        0.0
    );
    drop((held, first, second));
    Ok(())
}

/// 100 addresses took all 100 000 subscription slots and a new client was
/// refused. Here 100 x 10 take all 1 000: a newcomer is served, a largest
/// holder loses its newest subscription (RESOURCE_EXHAUSTED, counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_held_by_many_addresses_leave_room_for_a_newcomer() -> Result<()> {
    let mut config = Config::default();
    config.max_subscriptions = 1_000;
    config.max_subscriptions_per_client = 10;
    let server = start(config, v4(0, 1)).await;
    let mut held = Vec::new();
    let mut subscriptions = Vec::new();
    for a in 1..=100 {
        let mut peer = Peer::connect(server.local_addr(), v4(20, a)).await?;
        for _ in 0..10 {
            let subscription = peer
                .subscribe(&PrivateKey::generate())
                .await?
                .map_err(|e| anyhow::anyhow!("attacker refused early: {e:?}"))?;
            subscriptions.push(subscription);
        }
        held.push(peer);
    }
    metric_becomes(&server, "signaling_subscriptions", 1_000.0).await?;

    well_behaved(&server, v4(21, 1)).await?;
    assert_eq!(
        metric(
            &server,
            "signaling_subscribers_cut_total{reason=\"fair_share\"}"
        ),
        1.0
    );
    let (exhausted, other) = ended_exhausted(&mut subscriptions, Duration::from_millis(500)).await;
    assert_eq!(
        (exhausted, other),
        (1, 0),
        "one attacker stream ended, as RESOURCE_EXHAUSTED"
    );
    // The newcomer's went with it; 999 are left.
    metric_becomes(&server, "signaling_subscriptions", 999.0).await?;
    assert_eq!(
        metric(
            &server,
            "signaling_requests_rejected_total{reason=\"too_many_subscriptions\"}"
        ),
        0.0
    );
    drop(held);
    Ok(())
}

/// The /64s of one IPv6 /48 are not each a stranger: the /48 holds four
/// addresses' worth. Another /48 is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_48_holds_four_addresses_worth() -> Result<()> {
    let addresses: Vec<Ipv6Addr> = (0..5u16)
        .map(|n| Ipv6Addr::new(0xfd00, 0xf001, 0, n, 0, 0, 0, 1))
        .chain([Ipv6Addr::new(0xfd00, 0xf002, 0, 0, 0, 0, 0, 1)])
        .collect();
    for &addr in &addresses {
        fixture::local_v6(addr)?;
    }
    let result = async {
        let mut config = Config::default();
        config.max_connections_per_client = 4;
        config.address_connections = 4;
        let server = start(config, Ipv6Addr::LOCALHOST.into()).await;
        let mut held = Vec::new();
        for &addr in &addresses[..4] {
            for _ in 0..4 {
                let mut peer = Peer::connect(server.local_addr(), addr.into()).await?;
                let subscription = peer
                    .subscribe(&PrivateKey::generate())
                    .await?
                    .map_err(|e| anyhow::anyhow!("{addr} refused: {e:?}"))?;
                held.push((peer, subscription));
            }
        }
        // A fifth /64 of the same /48: refused at accept.
        let refused = match Peer::connect(server.local_addr(), addresses[4].into()).await {
            Err(_) => true,
            Ok(mut peer) => !matches!(peer.subscribe(&PrivateKey::generate()).await, Ok(Ok(_))),
        };
        assert!(refused, "a fifth /64 of a full /48 was served");
        assert_eq!(
            metric(
                &server,
                "signaling_connections_refused_total{reason=\"too_many_address_connections\"}"
            ),
            1.0
        );
        well_behaved(&server, addresses[5].into()).await?;
        drop(held);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    for &addr in &addresses {
        fixture::remove_v6(addr);
    }
    result
}

/// A fleet's publishes in a row from one address were refused after the
/// per-client burst. Proven, each peer is its own client: 8 peers publish
/// 250 each in a row, every one accepted and delivered. One unproven client
/// from the same address is still held to the per-client rate. (The
/// per-client rate is lowered to 10 a second with a burst of 300, so that
/// the unproven client meets it however slowly the machine runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proven_peers_behind_one_address_publish_2000_in_a_row() -> Result<()> {
    let server_key = PrivateKey::generate();
    let mut config = Config::default();
    config.publish_rate = cunicu_signal_server::Rate {
        per_second: NonZeroU32::new(10).context("10")?,
        burst: NonZeroU32::new(300).context("300")?,
    };
    let server_public = server_key.public_key();
    config.key = Some(server_key);
    let server = start(config, v4(0, 1)).await;
    let addr = server.local_addr();

    let receiver = PrivateKey::generate();
    let mut listener = Peer::connect(addr, v4(30, 2))
        .await?
        .proving_to(server_public);
    let mut subscription = listener
        .subscribe(&receiver)
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < 2000 {
            subscription.envelope().await?;
            got += 1;
        }
        Ok::<_, anyhow::Error>(got)
    });
    let publishers = (0..8).map(|_| async {
        let sender = PrivateKey::generate();
        let mut peer = Peer::connect(addr, v4(30, 1))
            .await?
            .proving_to(server_public);
        let mut refused = Vec::new();
        for n in 0..250u32 {
            if let Err(ended) = peer
                .publish(&sender, &receiver.public_key(), &n.to_be_bytes())
                .await?
            {
                refused.push(ended);
            }
        }
        Ok::<_, anyhow::Error>(refused)
    });
    for refused in join_all(publishers).await {
        let refused = refused?;
        assert!(refused.is_empty(), "refused: {:?}", refused.first());
    }
    assert_eq!(timeout(fixture::STEP, reader).await???, 2000);

    // Unproven, from the same address: its own bucket (a burst of 300).
    let mut plain = Peer::connect(addr, v4(30, 1)).await?;
    let (sender, mut refused) = (PrivateKey::generate(), None);
    let started = std::time::Instant::now();
    for n in 0..400u32 {
        if let Err(ended) = plain
            .publish(&sender, &receiver.public_key(), &n.to_be_bytes())
            .await?
        {
            refused = Some((n, ended));
            break;
        }
    }
    let (n, ended) = refused.with_context(|| {
        format!(
            "400 unproven publishes in a row over {:?}, none refused",
            started.elapsed()
        )
    })?;
    assert!(n >= 300, "refused after {n}");
    assert_eq!(ended.code, RESOURCE_EXHAUSTED);
    assert!(ended.message.contains("publishes faster"), "{ended:?}");
    Ok(())
}

/// 250 proven peers behind one address (a NAT, a cluster's egress), with
/// the defaults: each subscribes on its own connection and publishes to
/// every other; every pair's envelope is delivered, exactly once, and
/// nothing is refused. One unproven client from that address still gets no
/// more than the per-client connections: beyond them, a connection whose
/// first call proves no key is closed, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_250_proven_peers_behind_one_address_meshes() -> Result<()> {
    const PEERS: usize = 250;
    let server_key = PrivateKey::generate();
    let mut config = Config::default();
    let server_public = server_key.public_key();
    config.key = Some(server_key);
    let server = start(config, v4(0, 1)).await;
    let addr = server.local_addr();
    let nat = v4(40, 1);

    let keys: Vec<PrivateKey> = (0..PEERS).map(|_| PrivateKey::generate()).collect();
    let mut peers = Vec::new();
    let mut readers = Vec::new();
    for key in &keys {
        let mut peer = Peer::connect(addr, nat).await?.proving_to(server_public);
        let mut subscription = peer
            .subscribe(key)
            .await?
            .map_err(|e| anyhow::anyhow!("subscribe refused: {e:?}"))?;
        peers.push(peer);
        readers.push(tokio::spawn(async move {
            let mut from: HashMap<Vec<u8>, usize> = HashMap::new();
            for _ in 0..PEERS - 1 {
                let envelope = subscription.envelope().await?;
                *from.entry(envelope.sender).or_default() += 1;
            }
            Ok::<_, anyhow::Error>(from)
        }));
    }
    let publishing = peers
        .iter_mut()
        .zip(&keys)
        .enumerate()
        .map(|(i, (peer, sender))| {
            let keys = &keys;
            async move {
                let mut refused = Vec::new();
                // Each starts with its next peer: every peer hears from some at once.
                let others = keys.iter().cycle().skip(i + 1).take(PEERS - 1);
                for recipient in others {
                    if let Err(ended) = peer
                        .publish(sender, &recipient.public_key(), b"candidate")
                        .await?
                    {
                        refused.push(ended);
                    }
                }
                Ok::<_, anyhow::Error>(refused)
            }
        });
    for refused in join_all(publishing).await {
        let refused = refused?;
        assert!(
            refused.is_empty(),
            "{} refused: {:?}",
            refused.len(),
            refused.first()
        );
    }
    for (reader, key) in readers.into_iter().zip(&keys) {
        let from = timeout(fixture::STEP, reader).await??.with_context(|| {
            let text = server.metrics().encode();
            let dropped: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("signaling_envelopes") || l.starts_with("signaling_subscri")
                })
                .collect();
            format!("{dropped:?}")
        })?;
        assert_eq!(from.len(), PEERS - 1, "senders seen by one peer");
        assert!(from.values().all(|&n| n == 1), "each exactly once");
        assert!(!from.contains_key(key.public_key().as_bytes().as_slice()));
    }
    let refusals = server
        .metrics()
        .encode()
        .lines()
        .filter(|l| {
            l.starts_with("signaling_requests_rejected_total")
                || l.starts_with("signaling_connections_refused_total")
                || l.starts_with("signaling_connections_closed_total")
        })
        .filter(|l| !l.ends_with(" 0"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(refusals.is_empty(), "{refusals:?}");

    // An unproven client from the NAT: at most the per-client connections.
    let mut served = Vec::new();
    let mut closed = 0;
    for _ in 0..70 {
        let mut peer = Peer::connect(addr, nat).await?;
        match peer.subscribe(&PrivateKey::generate()).await? {
            Ok(subscription) => served.push((peer, subscription)),
            Err(ended) => {
                assert_eq!(ended.code, RESOURCE_EXHAUSTED, "{ended:?}");
                assert!(ended.message.contains("prove a key"), "{ended:?}");
                closed += 1;
            }
        }
    }
    assert!(served.len() <= 64, "{} served", served.len());
    assert_eq!(served.len() + closed, 70);
    metric_becomes(
        &server,
        "signaling_connections_closed_total{reason=\"unproven\"}",
        closed as f64,
    )
    .await?;
    drop(peers);
    Ok(())
}
