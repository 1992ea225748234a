//! `inprocess:`: every backend of one process shares one in-memory exchange.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, LazyLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{BackendError, Published, Transport, check_params};
use crate::{
    Key, Registry,
    proto::signaling::{BackendType, Envelope},
};

/// Registries listening on each key, by transport instance.
type Listeners = HashMap<Key, Vec<(u64, Weak<Registry>)>>;

static EXCHANGE: LazyLock<Mutex<Listeners>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The in-process transport. Envelopes are handed to the listening registries
/// on the publisher's task, before `send` returns; each registry's worker opens
/// and delivers them.
pub struct InProcess {
    id: u64,
    registry: Arc<Registry>,
    keys: Mutex<HashSet<Key>>,
}

impl InProcess {
    /// A transport on the process's exchange; the URL is `inprocess:`.
    pub fn new(url: &url::Url, registry: Arc<Registry>) -> Result<Self, BackendError> {
        check_params(url, &[])?;
        Ok(InProcess {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            keys: Mutex::new(HashSet::new()),
        })
    }

    fn remove(&self, key: &Key) {
        let mut exchange = EXCHANGE.lock();
        if let Some(list) = exchange.get_mut(key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                exchange.remove(key);
            }
        }
    }

    /// Leaves the exchange for every key.
    fn remove_all(&self) {
        let keys: Vec<Key> = self.keys.lock().drain().collect();
        for key in keys {
            self.remove(&key);
        }
    }
}

#[async_trait]
impl Transport for InProcess {
    async fn send(&self, envelope: &Envelope) -> Result<Published, BackendError> {
        let recipient = envelope.recipient_key()?;
        let registries: Vec<Arc<Registry>> = EXCHANGE
            .lock()
            .get(&recipient)
            .map(|list| list.iter().filter_map(|(_, r)| r.upgrade()).collect())
            .unwrap_or_default();
        if registries.is_empty() {
            tracing::debug!(%recipient, "no in-process subscriber: envelope discarded");
        }
        let reached = u32::try_from(registries.len()).unwrap_or(u32::MAX);
        for registry in registries {
            registry.deliver(envelope);
        }
        Ok(Published::to(reached))
    }

    async fn listen(&self, key: Key) -> Result<(), BackendError> {
        if self.keys.lock().insert(key) {
            EXCHANGE
                .lock()
                .entry(key)
                .or_default()
                .push((self.id, Arc::downgrade(&self.registry)));
        }
        Ok(())
    }

    async fn unlisten(&self, key: Key) -> Result<(), BackendError> {
        if self.keys.lock().remove(&key) {
            self.remove(&key);
        }
        Ok(())
    }

    fn backend_type(&self) -> BackendType {
        BackendType::Inprocess
    }

    async fn close(&self) -> Result<(), BackendError> {
        self.remove_all();
        Ok(())
    }

    fn name(&self) -> &str {
        "inprocess:"
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.remove_all();
    }
}
