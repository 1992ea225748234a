//! `cunicu.signaling.Signaling`, served by the connection task itself:
//! Subscribe, Publish and GetBuildInfo. Each call is a future the
//! connection polls ([`Call`]); it reads its one request message within the
//! request deadlines ([`crate::deadlines`]), charging its bytes to its
//! client as they arrive, and ends with what the connection does next
//! ([`Done`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::Poll,
};

use bytes::Bytes;
use cunicu_signal::{
    Key,
    backend::grpc::RECIPIENTS_METADATA,
    proto::{
        BuildInfo, Empty, Timestamp, method,
        signaling::{Envelope, SubscribeParams},
    },
};
use h2::{RecvStream, server::SendResponse};
use http::Request;
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    bounds::MAX_SMALL_REQUEST,
    client::{Charged, ClientState, Exhausted, Origin, SlotGuard},
    deadlines::{Late, RequestDeadline},
    hub::{Mailbox, Publisher, Subscription},
    refusal::{CallEnded, Refusal, key_field},
    shared::Shared,
    wire::{self, EMPTY_MESSAGE, Frame, ReadError},
};

/// What a call in progress ends with.
pub(crate) enum Done {
    /// Answered.
    Finished,
    /// A subscription is in the hub: its stream opens.
    Subscribed {
        slot: usize,
        respond: SendResponse<Bytes>,
        subscription: Subscription,
    },
    /// A subscription was refused (answered); its slot goes.
    NotSubscribed { slot: usize },
}

pub(crate) type Call = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The version, commit and build date of this server.
pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        date: Some(Timestamp {
            seconds: env!("CUNICU_SIGNAL_BUILD_DATE").parse().unwrap_or(0),
            nanos: 0,
        }),
        commit: env!("CUNICU_SIGNAL_GIT_COMMIT").to_string(),
        tag: env!("CUNICU_SIGNAL_GIT_TAG").to_string(),
        branch: env!("CUNICU_SIGNAL_GIT_BRANCH").to_string(),
        built_by: "cargo".to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        dirty: env!("CUNICU_SIGNAL_GIT_DIRTY") == "true",
    }
}

/// [`build_info`] as a message frame, encoded once.
static BUILD_INFO: LazyLock<Frame> = LazyLock::new(|| Frame::encode(&build_info()));

/// `GetBuildInfo`: the request (`Empty`) is read like any other, then the
/// server's build information answers it. A client calls it before it
/// knows the server's key, so without a proof.
pub(crate) async fn get_build_info(
    shared: Arc<Shared>,
    client: Arc<ClientState>,
    call: SlotGuard,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Done {
    let _timer = shared.metrics.time("GetBuildInfo");
    let result = async {
        wire::check_request(&request)?;
        let (_, mut recv) = request.into_parts();
        let charged = Charged::new(&client, shared.hub.budget());
        let frame = read_request(
            &shared,
            &mut recv,
            "request",
            MAX_SMALL_REQUEST,
            &charged,
            call.ended(),
            |_| Ok(()),
        )
        .await?;
        Empty::decode(frame.message())
            .map_err(|e| shared.refuse(malformed("Empty", e), &client.client))?;
        Ok(Answer {
            message: BUILD_INFO.clone(),
            recipients: None,
        })
    }
    .await;
    drop(call);
    answer(&shared, respond, result);
    Done::Finished
}

/// What a unary call answers: its message frame, and for a Publish that
/// asked, its recipient count.
struct Answer {
    message: Frame,
    recipients: Option<usize>,
}

/// Sends a unary call's answer, or its error.
fn answer(shared: &Shared, mut respond: SendResponse<Bytes>, result: Result<Answer, Status>) {
    let headers = &shared.response_headers;
    match result {
        Ok(Answer {
            message,
            recipients,
        }) => {
            let mut response = wire::ok_headers(headers);
            if let Some(n) = recipients {
                response
                    .headers_mut()
                    .insert(RECIPIENTS_METADATA, http::HeaderValue::from(n));
            }
            if let Ok(mut send) = respond.send_response(response, false) {
                let _ = send.send_data(message.into_bytes(), false);
                let _ = send.send_trailers(wire::ok_trailers());
            }
        }
        Err(status) => {
            let _ = respond.send_response(wire::error_response(&status, headers), true);
        }
    }
}

/// The refusal of a request message that does not decode.
fn malformed(what: &'static str, e: prost::DecodeError) -> Refusal {
    Refusal::Malformed {
        what,
        error: e.to_string(),
    }
}

/// Reads the one request message of a call: its first bytes within the
/// first-bytes timeout, the whole within the request timeout; each piece
/// charged to the client and the server as it arrives (in `charged`).
/// Ends early when `ended` is cancelled (the call's slot was taken back).
/// Counts what it refuses.
async fn read_request(
    shared: &Shared,
    recv: &mut RecvStream,
    what: &'static str,
    limit: usize,
    charged: &Charged,
    ended: &CancellationToken,
    admit: impl FnMut(usize) -> Result<(), Status>,
) -> Result<Frame, Status> {
    let who = charged.client().client;
    let timeouts = shared.timeouts;
    let deadline = RequestDeadline::new(Instant::now(), timeouts.first_bytes, timeouts.request);
    let charge = |n| {
        charged
            .add(n)
            .or_else(|full| match full {
                // The server's budget is full: a client below its fair share
                // of it gets room, as its subscribers' envelopes do.
                Exhausted::Server if shared.hub.make_room_for(charged.client(), n) => {
                    charged.add(n)
                }
                full => Err(full),
            })
            .map_err(|full| shared.refuse(full, &who))
    };
    let mut read = std::pin::pin!(wire::read_message(recv, limit, admit, charge));
    // Usually the message came with its headers: no timer for those.
    let read = match futures::poll!(read.as_mut()) {
        Poll::Ready(read) => Ok(read),
        Poll::Pending => loop {
            let due = deadline.due(charged.bytes() > 0);
            tokio::select! {
                biased;
                read = read.as_mut() => break Ok(read),
                _ = ended.cancelled() => return Err(shared.end_call(CallEnded::FairShare)),
                _ = tokio::time::sleep_until(due) => {
                    if let Some(late) = deadline.late(Instant::now(), charged.bytes() > 0) {
                        break Err(late);
                    }
                }
            }
        },
    };
    match read {
        Ok(Ok(read)) => Ok(read),
        // Refused and counted by `admit`.
        Ok(Err(ReadError::Admit(status))) => Err(status),
        Ok(Err(ReadError::Oversize { len, limit })) => {
            Err(shared.refuse(Refusal::Oversize { what, len, limit }, &who))
        }
        Ok(Err(e)) => Err(shared.refuse(Refusal::Framing(e.into_status()), &who)),
        Err(Late::FirstBytes) => Err(shared.end_call(CallEnded::FirstBytesTimeout)),
        Err(Late::Whole) => Err(shared.refuse(Refusal::RequestTimeout(timeouts.request), &who)),
    }
}

pub(crate) async fn subscribe(
    shared: Arc<Shared>,
    (client, origin): (Arc<ClientState>, Origin),
    call: SlotGuard,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    mailbox: Arc<Mailbox>,
    slot: usize,
) -> Done {
    let timer = shared.metrics.time("Subscribe");
    let result = async {
        wire::check_request(&request)?;
        let (parts, mut recv) = request.into_parts();
        let charged = Charged::new(&client, shared.hub.budget());
        let frame = read_request(
            &shared,
            &mut recv,
            "request",
            MAX_SMALL_REQUEST,
            &charged,
            call.ended(),
            |_| Ok(()),
        )
        .await?;
        let who = client.client;
        let params = SubscribeParams::decode(frame.message())
            .map_err(|e| shared.refuse(malformed("SubscribeParams", e), &who))?;
        let key = key_field("subscription", &params.key).map_err(|r| shared.refuse(r, &who))?;
        shared.auth.check(
            &parts.headers,
            method::SUBSCRIBE,
            &Key::from(key),
            origin.client(),
        )?;
        let guard = shared
            .clients
            .subscribe(who, origin)
            .map_err(|refused| shared.refuse(refused, &who))?;
        let (subscription, _first) = shared
            .hub
            .subscribe(key, client.clone(), guard, mailbox, slot)
            .map_err(|full| shared.refuse(full, &who))?;
        // The sync envelope goes once the other replicas can reach us.
        if let Some(cluster) = &shared.cluster {
            cluster.ready(&key).await;
        }
        Ok::<_, Status>(subscription)
    }
    .await;
    drop(call);
    drop(timer);
    match result {
        Ok(subscription) => Done::Subscribed {
            slot,
            respond,
            subscription,
        },
        Err(status) => {
            let _ = respond.send_response(
                wire::error_response(&status, &shared.response_headers),
                true,
            );
            Done::NotSubscribed { slot }
        }
    }
}

pub(crate) async fn publish(
    shared: Arc<Shared>,
    (client, origin): (Arc<ClientState>, Origin),
    call: SlotGuard,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Done {
    let _call = call;
    let _timer = shared.metrics.time("Publish");
    let metrics = &shared.metrics;
    let who = client.client;
    let result = async {
        wire::check_request(&request)?;
        let (parts, mut recv) = request.into_parts();
        let charged = Charged::new(&client, shared.hub.budget());
        let frame = read_request(
            &shared,
            &mut recv,
            "envelope",
            shared.max_envelope_size,
            &charged,
            _call.ended(),
            |n| {
                shared
                    .clients
                    .check_publish(who, origin, n)
                    .map_err(|refused| shared.refuse(refused, &who))
            },
        )
        .await?;
        let refuse = |refusal| shared.refuse(refusal, &who);
        let envelope =
            Envelope::decode(frame.message()).map_err(|e| refuse(malformed("Envelope", e)))?;
        let sender = key_field("sender", &envelope.sender).map_err(refuse)?;
        let recipient = key_field("recipient", &envelope.recipient).map_err(refuse)?;
        shared.auth.check(
            &parts.headers,
            method::PUBLISH,
            &Key::from(sender),
            origin.client(),
        )?;
        metrics.published.inc();
        let ask = shared.recipients.answers(&parts.headers);
        // The frame as received: the envelope unchanged, unknown fields kept.
        let local = shared
            .hub
            .publish_from(&recipient, &frame, Publisher::Client(client.client));
        let recipients = match &shared.cluster {
            Some(cluster) if ask => {
                let others = cluster.publish_counted(
                    recipient,
                    frame.message_bytes(),
                    shared.recipients.wait,
                );
                // The envelope is in the queues now: the request's bytes are
                // not held while the other replicas count.
                drop((frame, charged));
                Some(local.queued + others.await)
            }
            Some(cluster) => {
                cluster.publish(recipient, frame.message_bytes());
                None
            }
            None => {
                if local.subscriptions == 0 {
                    metrics.no_subscriber.inc();
                }
                ask.then_some(local.queued)
            }
        };
        Ok::<_, Status>(recipients)
    }
    .await;
    answer(
        &shared,
        respond,
        result.map(|recipients| Answer {
            message: EMPTY_MESSAGE.clone(),
            recipients,
        }),
    );
    Done::Finished
}
