//! Helpers of the server's integration tests.

// Each test binary uses a part of it.
#![allow(dead_code)]

pub mod nats;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use cunicu_signal::{
    Backend, BackendError, ChannelHandler, KeyPair, PrivateKey, Sender, backend::connect,
    conformance::message_for,
};
use cunicu_signal_server::Server;
use tokio::time::timeout;

/// Limit of one step of a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// A port that nothing listens on, to be listened on later by the test: below
/// the ephemeral range (32768 and up here), where `bind(0)` (the servers of
/// other tests running at the same time) and outgoing connections take
/// theirs, so that none of them takes it meanwhile; random, and free when
/// picked.
pub fn unused_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The grpc:// URL of `server` (plaintext).
pub fn url(server: &Server) -> String {
    format!(
        "grpc://127.0.0.1:{}?insecure=true",
        server.local_addr().port()
    )
}

/// Our grpc:// backend (several servers at once if `urls` names several).
pub async fn backend(urls: Vec<String>) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(connect(&urls).await?))
}

/// One message from a new key to another through the backend of `url`,
/// subscribed and published with it: it arrives, unchanged, within [`WAIT`].
pub async fn exchange(url: &str) -> anyhow::Result<()> {
    let (alice, bob) = (PrivateKey::generate(), PrivateKey::generate());
    let backend = connect(&[url]).await?;
    let (handler, mut rx) = ChannelHandler::new(4);
    backend
        .subscribe(&bob, Sender::Key(alice.public_key()), handler)
        .await?;
    let message = message_for(1, &alice.public_key(), &bob.public_key());
    backend
        .publish(&KeyPair::new(alice.clone(), bob.public_key()), &message)
        .await?;
    let got = timeout(WAIT, rx.recv()).await?.context("no message")?;
    assert_eq!(got.message, message);
    backend.close().await?;
    Ok(())
}
