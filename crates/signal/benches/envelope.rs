//! Seal and open of a typical candidate message, with cached and uncached
//! shared keys; what a forged envelope from a new sender costs; protobuf
//! encode and decode. Run: `cargo bench -p cunicu-signal`.

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cunicu_signal::{
    KeyPair, PrivateKey,
    envelope::SharedKey,
    proto::{
        epdisc::{Candidate, CandidateType, NetworkType, RelatedAddress},
        signaling::{Envelope, Message},
    },
};
use prost::Message as _;

fn candidate() -> Message {
    Message {
        candidate: Some(Candidate {
            r#type: CandidateType::ServerReflexive as i32,
            network_type: NetworkType::Udp4 as i32,
            foundation: "3521561327".into(),
            component: 1,
            priority: 1694498815,
            address: "203.0.113.17".into(),
            port: 51820,
            related_address: Some(RelatedAddress {
                address: "192.168.1.20".into(),
                port: 51820,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn envelopes(c: &mut Criterion) {
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let pair = KeyPair::new(alice.clone(), bob.public_key());
    let message = candidate();
    let envelope = message.seal(&pair).expect("seal");

    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("seal_cached", |b| {
        b.iter(|| black_box(&message).seal(black_box(&pair)).expect("seal"))
    });
    group.bench_function("open_cached", |b| {
        b.iter(|| black_box(&envelope).open(black_box(&bob)).expect("open"))
    });
    group.bench_function("seal_open_cached", |b| {
        b.iter(|| {
            let env = black_box(&message).seal(&pair).expect("seal");
            env.open(&bob).expect("open")
        })
    });
    // What a forgery costs a receiver: a made-up sender is never cached, so
    // every such envelope pays for the shared key (X25519) and one failed
    // Poly1305 check. The envelope is built once; its sender is fresh to the
    // cache every time because forgeries are never cached.
    let mut forged = candidate()
        .seal(&KeyPair::new(PrivateKey::generate(), bob.public_key()))
        .expect("seal");
    forged.contents.as_mut().expect("contents").body[20] ^= 1;
    group.bench_function("open_forged_new_sender", |b| {
        b.iter(|| {
            black_box(&forged)
                .open(black_box(&bob))
                .expect_err("forged")
        })
    });
    // One X25519 (variable base), the unit the figures above are counted in.
    let their_public = x25519_dalek::PublicKey::from(*alice.public_key().as_bytes());
    let our_secret = x25519_dalek::StaticSecret::from(*bob.secret_bytes());
    group.bench_function("x25519", |b| {
        b.iter(|| black_box(&our_secret).diffie_hellman(black_box(&their_public)))
    });
    group.bench_function("seal_open_uncached", |b| {
        b.iter(|| {
            let shared = SharedKey::new(&alice, &bob.public_key()).expect("key");
            let env = shared.seal(alice.public_key(), bob.public_key(), black_box(&message));
            env.open_uncached(&bob).expect("open")
        })
    });
    group.finish();
}

fn protobuf(c: &mut Criterion) {
    let message = candidate();
    let envelope = message
        .seal(&KeyPair::new(
            PrivateKey::generate(),
            PrivateKey::generate().public_key(),
        ))
        .expect("seal");
    let message_bytes = message.encode_to_vec();
    let envelope_bytes = envelope.encode_to_vec();

    let mut group = c.benchmark_group("protobuf");
    group.throughput(Throughput::Elements(1));
    group.bench_function("message_encode", |b| {
        b.iter(|| black_box(&message).encode_to_vec())
    });
    group.bench_function("message_decode", |b| {
        b.iter(|| Message::decode(black_box(message_bytes.as_slice())).expect("decode"))
    });
    group.bench_function("envelope_encode", |b| {
        b.iter(|| black_box(&envelope).encode_to_vec())
    });
    group.bench_function("envelope_decode", |b| {
        b.iter(|| Envelope::decode(black_box(envelope_bytes.as_slice())).expect("decode"))
    });
    group.finish();
}

/// What the server pays for a proof of key possession (docs/PROTOCOL.md §11): taking it
/// apart and opening it with the cached shared key of (server, client) is one
/// XSalsa20-Poly1305; the first proof of a key adds one X25519. (The server
/// then compares the method and the time and remembers the nonce: a few
/// hundred nanoseconds, in the server benchmark.)
fn proofs(c: &mut Criterion) {
    use cunicu_signal::{
        auth::{Proof, prove},
        envelope::SharedKeyCache,
    };
    let (client, server) = (PrivateKey::generate(), PrivateKey::generate());
    let method = cunicu_signal::proto::method::PUBLISH;
    let cache = SharedKeyCache::new(std::num::NonZeroUsize::new(1024).expect("1024"));
    let proof = prove(&client, &server.public_key(), method, 1_800_000_000).expect("prove");
    Proof::parse(&proof)
        .expect("parse")
        .open(&server, &cache)
        .expect("open");
    let mut group = c.benchmark_group("proof");
    group.throughput(Throughput::Elements(1));
    let server_public = server.public_key();
    group.bench_function("make", |b| {
        b.iter(|| prove(&client, black_box(&server_public), method, 1_800_000_000).expect("prove"))
    });
    group.bench_function("check_cached", |b| {
        b.iter(|| {
            Proof::parse(black_box(&proof))
                .expect("parse")
                .open(&server, &cache)
                .expect("open")
        })
    });
    group.bench_function("check_new_key", |b| {
        b.iter(|| {
            let fresh = SharedKeyCache::new(std::num::NonZeroUsize::MIN);
            Proof::parse(black_box(&proof))
                .expect("parse")
                .open(&server, &fresh)
                .expect("open")
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = envelopes, protobuf, proofs
}
criterion_main!(benches);
