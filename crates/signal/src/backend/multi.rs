//! Several media at once: publish to all, listen on all.

use async_trait::async_trait;
use futures::future::join_all;

use super::{BackendError, Published, Transport};
use crate::{
    Key,
    proto::signaling::{BackendType, Envelope},
};

/// A transport over several transports that share one registry. An operation
/// succeeds if it succeeds on at least one of them; the failures of the others
/// are logged with the backend's name. If all fail, the error lists each.
pub struct Multi {
    transports: Vec<Box<dyn Transport>>,
    name: String,
}

impl Multi {
    /// Combines `transports`.
    pub fn new(transports: Vec<Box<dyn Transport>>) -> Self {
        let name = transports
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",");
        Multi { transports, name }
    }

    /// Collects the results of one publish on every transport: the recipients
    /// the media could count, added up, when any media reached someone or
    /// all could count; else nobody can tell.
    fn combine_published(
        &self,
        results: Vec<Result<Published, BackendError>>,
    ) -> Result<Published, BackendError> {
        let mut counts = Vec::with_capacity(results.len());
        let results = results
            .into_iter()
            .map(|r| {
                r.map(|published| {
                    counts.push(published.recipients);
                })
            })
            .collect();
        self.combine("publish", results)?;
        let sum = counts
            .iter()
            .flatten()
            .fold(0u32, |a, n| a.saturating_add(*n));
        Ok(if sum > 0 || counts.iter().all(Option::is_some) {
            Published::to(sum)
        } else {
            Published::unknown()
        })
    }

    /// Collects the results of one operation on every transport.
    fn combine(
        &self,
        what: &str,
        results: Vec<Result<(), BackendError>>,
    ) -> Result<(), BackendError> {
        let mut errors = Vec::new();
        for (transport, result) in self.transports.iter().zip(results) {
            if let Err(e) = result {
                tracing::warn!(backend = transport.name(), "{what} failed: {e}");
                errors.push(e);
            }
        }
        if !errors.is_empty() && errors.len() == self.transports.len() {
            Err(BackendError::AllFailed(errors))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Transport for Multi {
    async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError> {
        let results = join_all(self.transports.iter().map(|t| t.send(envelope))).await;
        self.combine_published(results)
    }

    async fn send_as(
        &self,
        envelope: &Envelope,
        ours: &crate::PrivateKey,
    ) -> Result<Published, BackendError> {
        let results = join_all(self.transports.iter().map(|t| t.send_as(envelope, ours))).await;
        self.combine_published(results)
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        let results = join_all(self.transports.iter().map(|t| t.listen(key))).await;
        self.combine("subscribe", results)
    }

    async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
        let results = join_all(self.transports.iter().map(|t| t.unlisten(key))).await;
        self.combine("unsubscribe", results)
    }

    fn backend_type(&self) -> BackendType {
        BackendType::Multi
    }

    async fn close(&self) -> Result<(), BackendError> {
        let results = join_all(self.transports.iter().map(|t| t.close())).await;
        // Every medium was asked to close; report a failure (the first, the
        // others logged) without calling it a failure of all.
        let mut errors = results.into_iter().filter_map(Result::err);
        let first = errors.next();
        for other in errors {
            tracing::warn!(backend = %self.name, "closing: {other}");
        }
        first.map_or(Ok(()), Err)
    }

    fn name(&self) -> &str {
        &self.name
    }
}
