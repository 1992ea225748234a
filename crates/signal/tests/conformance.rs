//! The conformance suite on the in-process backend, alone and doubled in a
//! multi backend, and the subscribe race on both.
//!
//! The whole runs of the suite use paused time: no sockets, so the suite's
//! `settle` (listening on after everything expected arrived, for duplicates
//! and strays) ends only once every task is idle, with nothing left in
//! flight that could still deliver, and costs no real time.

use std::{sync::Arc, time::Duration};

use cunicu_signal::{
    Backend, BackendError, Registry,
    backend::{InProcess, Multi, SignalingBackend, connect},
    conformance::{Options, gated, run, subscribe_race},
    proto::signaling::BackendType,
};

async fn backend_of(urls: &[&str]) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(connect(urls).await?))
}

#[tokio::test(start_paused = true)]
async fn inprocess() {
    run(Options::default(), |_| backend_of(&["inprocess:"])).await;
}

#[tokio::test(start_paused = true)]
async fn multi_of_two_inprocess() {
    let b = backend_of(&["inprocess:", "inprocess:"]).await.unwrap();
    assert_eq!(b.backend_type(), BackendType::Multi);
    run(Options::default(), |_| {
        backend_of(&["inprocess:", "inprocess:"])
    })
    .await;
}

fn inprocess_transport(registry: &Arc<Registry>) -> InProcess {
    InProcess::new(&url::Url::parse("inprocess:").unwrap(), registry.clone()).unwrap()
}

/// Options of the subscribe race on in-process media.
fn race_options() -> Options {
    Options {
        timeout: Duration::from_secs(10),
        settle: Duration::from_millis(100),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inprocess_subscribe_race() {
    let registry = Registry::new();
    let (transport, gate) = gated(inprocess_transport(&registry));
    let backend = Arc::new(SignalingBackend::new(Box::new(transport), registry));
    let publisher = backend_of(&["inprocess:"]).await.unwrap();
    subscribe_race(backend, gate, publisher, &race_options()).await;
}

/// One medium answers at once, the other is still listening: what the first
/// brings meanwhile is delivered (and what both bring, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_subscribe_race() {
    let registry = Registry::new();
    let fast = Box::new(inprocess_transport(&registry));
    let (slow, gate) = gated(inprocess_transport(&registry));
    let backend = Arc::new(SignalingBackend::new(
        Box::new(Multi::new(vec![fast, Box::new(slow)])),
        registry,
    ));
    let publisher = backend_of(&["inprocess:"]).await.unwrap();
    subscribe_race(backend, gate, publisher, &race_options()).await;
}
