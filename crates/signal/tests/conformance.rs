//! The conformance suite on the in-process backend, alone and doubled in a multi backend.

use std::sync::Arc;

use cunicu_signal::{
    Backend, BackendError,
    backend::connect,
    conformance::{Options, run},
    proto::signaling::BackendType,
};

async fn backend(urls: &[&str]) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(connect(urls).await?))
}

#[tokio::test]
async fn inprocess() {
    run(Options::default(), |_| backend(&["inprocess:"])).await;
}

#[tokio::test]
async fn multi_of_two_inprocess() {
    let b = backend(&["inprocess:", "inprocess:"]).await.unwrap();
    assert_eq!(b.backend_type(), BackendType::Multi);
    run(Options::default(), |_| {
        backend(&["inprocess:", "inprocess:"])
    })
    .await;
}
