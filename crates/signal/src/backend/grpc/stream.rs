//! One key's Subscribe stream: opened, waited on for its sync envelope, reopened with backoff.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::oneshot;
use tonic::{Request, Streaming, transport::Channel};

use super::{
    auth::ServerAuth,
    error::{GrpcError, status_text},
    metadata::pushback,
    target::GrpcOptions,
};

use crate::{
    Key, PrivateKey, Registry, StreamEvent,
    proto::{
        method::SUBSCRIBE,
        signaling::{Envelope, SubscribeParams, signaling_client::SignalingClient},
    },
};

/// Opens a Subscribe stream and waits for the sync envelope. Returns the
/// stream and a first real envelope, if a server sent one instead of a sync.
pub(super) async fn open_stream(
    mut client: SignalingClient<Channel>,
    auth: &ServerAuth,
    key: Key,
    private: Option<PrivateKey>,
    timeout: Duration,
) -> Result<(Streaming<Envelope>, Option<Envelope>), GrpcError> {
    let attempt = async {
        let mut request = Request::new(SubscribeParams {
            key: key.as_bytes().to_vec(),
        });
        if let Some(private) = private {
            auth.add_proof(&client, &mut request, &private, SUBSCRIBE)
                .await?;
        }
        let mut stream = client
            .subscribe(request)
            .await
            .map_err(|status| {
                auth.refused(&status);
                GrpcError::Status {
                    what: "subscribe",
                    status,
                }
            })?
            .into_inner();
        match stream.message().await {
            Ok(Some(first)) if first == Envelope::default() => Ok((stream, None)),
            Ok(Some(first)) => Ok((stream, Some(first))),
            Ok(None) => Err(GrpcError::NoSync),
            Err(status) => Err(GrpcError::Status {
                what: "subscribe",
                status,
            }),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(GrpcError::Timeout {
            what: "subscribe",
            timeout,
        }))
}

/// A stream open this long counts as healthy: the reconnect backoff restarts.
pub(super) const STABLE_STREAM: Duration = Duration::from_secs(10);

/// Keeps one key's subscription stream open until aborted.
pub(super) async fn run_subscription(
    name: Arc<str>,
    client: SignalingClient<Channel>,
    auth: ServerAuth,
    registry: Arc<Registry>,
    key: Key,
    options: GrpcOptions,
    ready: oneshot::Sender<Result<(), GrpcError>>,
) {
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(options.backoff_min)
            .with_max_delay(options.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    let mut ready = Some(ready);
    // What was last reported since the stream was last open: (refused, reason).
    let mut reported: Option<(bool, String)> = None;
    // How long the server's last refusal asked us to wait, if it did.
    let mut pushed_back: Option<Duration> = None;
    loop {
        // Our private key proves the subscription (docs/PROTOCOL.md §11); the handler that
        // asked for it is in the registry before the medium listens.
        let private = registry.private_key(&key);
        match open_stream(
            client.clone(),
            &auth,
            key,
            private,
            options.subscribe_timeout,
        )
        .await
        {
            Ok((mut stream, first)) => {
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    None => {
                        tracing::info!(backend = %name, %key, "subscription re-established");
                        registry.report_stream(StreamEvent::Back {
                            backend: name.to_string(),
                            key,
                        });
                    }
                }
                reported = None;
                let opened = tokio::time::Instant::now();
                if let Some(envelope) = first {
                    registry.deliver(&envelope);
                }
                let reason = loop {
                    match stream.message().await {
                        Ok(Some(envelope)) if envelope == Envelope::default() => {}
                        Ok(Some(envelope)) => {
                            registry.deliver(&envelope);
                        }
                        Ok(None) => break (false, "the server ended the stream".to_string()),
                        Err(status) => {
                            pushed_back = pushback(&status);
                            break (refusal(status.code()), status_text(&status));
                        }
                    }
                };
                // A stream that lived a while was healthy: start the backoff
                // afresh. One that a server ends at once keeps backing off.
                if opened.elapsed() >= STABLE_STREAM {
                    delays = backoff();
                }
                // Logged once per loss; failed attempts until it is back are debug.
                let (refused, reason) = reason;
                tracing::warn!(backend = %name, %key, "subscription stream lost ({reason}); reconnecting");
                report(&registry, &name, key, refused, reason, &mut reported);
            }
            Err(e) => {
                pushed_back = e.pushback();
                tracing::debug!(backend = %name, %key, "subscription attempt failed: {e}");
                // The first failure goes to `listen`; the task keeps trying until
                // unlistened (in a multi backend the others may carry on meanwhile).
                // A refusal while reconnecting is reported: retries do not cure it.
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e));
                    }
                    None if !e.is_transient() => {
                        report(&registry, &name, key, true, e.to_string(), &mut reported);
                    }
                    None => {}
                }
            }
        }
        // Never sooner than the server asked (a refusal by a rate says when).
        let delay = delays.next().unwrap_or(options.backoff_max);
        tokio::time::sleep(delay.max(pushed_back.take().unwrap_or_default())).await;
    }
}

/// Whether a gRPC status refuses our key or its proof, which retrying does not cure.
pub(super) fn refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// Reports a lost or refused stream to the registry, unless the same was
/// reported last since the stream was open.
pub(super) fn report(
    registry: &Registry,
    name: &str,
    key: Key,
    refused: bool,
    reason: String,
    reported: &mut Option<(bool, String)>,
) {
    let now = (refused, reason);
    if reported.as_ref() == Some(&now) {
        return;
    }
    let (refused, reason) = now.clone();
    *reported = Some(now);
    let backend = name.to_string();
    registry.report_stream(if refused {
        StreamEvent::Refused {
            backend,
            key,
            reason,
        }
    } else {
        StreamEvent::Lost {
            backend,
            key,
            reason,
        }
    });
}
