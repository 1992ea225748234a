//! The errors of the Kubernetes medium, and how the API server's answers map to them.

use std::time::Duration;

use kube::runtime::watcher;

use super::crd::CRD_NAME;
use crate::backend::BoxError;

/// Why the Kubernetes medium failed: the source of a
/// [`BackendError::Transport`](crate::BackendError::Transport) from this backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// The API server does not serve `signalingenvelopes.cunicu.li`.
    #[error(
        "CRD {CRD_NAME} is not installed in the API server {server}: kubectl apply -f deploy/crd.yaml"
    )]
    CrdMissing {
        /// The API server's URL.
        server: String,
    },
    /// The namespace does not exist.
    #[error("namespace {namespace:?} does not exist in the API server {server}")]
    NamespaceMissing {
        /// The namespace of the URL.
        namespace: String,
        /// The API server's URL.
        server: String,
    },
    /// RBAC denies what the backend needs.
    #[error(
        "not allowed to {verbs} {CRD_NAME} in namespace {namespace:?}: {message} (deploy/rbac.yaml grants create, list, watch and delete)"
    )]
    Forbidden {
        /// The verbs denied, comma-separated.
        verbs: String,
        /// The namespace of the URL.
        namespace: String,
        /// The API server's explanation.
        message: String,
    },
    /// The namespace holds as many envelope objects as its ResourceQuota
    /// allows (`deploy/resourcequota.yaml`).
    #[error(
        "namespace {namespace:?} holds as many envelope objects as its ResourceQuota allows: {message}"
    )]
    QuotaExceeded {
        /// The namespace of the URL.
        namespace: String,
        /// The API server's explanation.
        message: String,
    },
    /// No client configuration could be loaded.
    #[error("{what}: {source}")]
    Config {
        /// Which configuration (a kubeconfig path, the search, in-cluster).
        what: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// The request.
        what: &'static str,
        /// The error of the client.
        #[source]
        source: Box<kube::Error>,
    },
    /// The watch failed before it had listed the objects once.
    #[error("watch: {0}")]
    Watch(#[source] Box<watcher::Error>),
    /// An error that several listens got at once, as text (the first got
    /// the error itself).
    #[error("{0}")]
    Message(String),
    /// The API server did not answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

impl K8sError {
    /// This error again, for another listen that waited for the same list:
    /// the same variant where its fields can be copied, else its text.
    pub(super) fn duplicate(&self) -> K8sError {
        match self {
            K8sError::CrdMissing { server } => K8sError::CrdMissing {
                server: server.clone(),
            },
            K8sError::NamespaceMissing { namespace, server } => K8sError::NamespaceMissing {
                namespace: namespace.clone(),
                server: server.clone(),
            },
            K8sError::Forbidden {
                verbs,
                namespace,
                message,
            } => K8sError::Forbidden {
                verbs: verbs.clone(),
                namespace: namespace.clone(),
                message: message.clone(),
            },
            K8sError::QuotaExceeded { namespace, message } => K8sError::QuotaExceeded {
                namespace: namespace.clone(),
                message: message.clone(),
            },
            K8sError::Timeout { what, timeout } => K8sError::Timeout {
                what,
                timeout: *timeout,
            },
            other => K8sError::Message(other.to_string()),
        }
    }

    /// True if the same request may succeed later: the API server is away
    /// or slow, the namespace's quota is full for now. False for a missing
    /// CRD, namespace or right ([`K8sError::is_definitive`]) and a client
    /// configuration that cannot be loaded.
    pub fn is_transient(&self) -> bool {
        !self.is_definitive() && !matches!(self, K8sError::Config { .. })
    }

    /// True for the errors that retrying does not cure: the CRD or the
    /// namespace is missing (404), or RBAC denies (403). `listen` forgets its
    /// key on these; on every other error it keeps the key and the watch
    /// retries.
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            K8sError::CrdMissing { .. }
                | K8sError::NamespaceMissing { .. }
                | K8sError::Forbidden { .. }
        )
    }
}

/// Where requests go: the parts of an error that name the place.
#[derive(Debug, Clone)]
pub(super) struct Place {
    /// The API server's URL.
    pub server: String,
    /// The namespace of the envelope objects.
    pub namespace: String,
}

impl Place {
    /// The error for a failed request `what` (RBAC verb `verb`): 404 is a
    /// missing namespace or CRD, 403 a full ResourceQuota or a missing
    /// right, the rest as it came.
    pub(super) fn api_error(&self, what: &'static str, verb: &str, e: kube::Error) -> K8sError {
        match &e {
            kube::Error::Api(status) if status.code == 404 => {
                let about_namespace = status
                    .details
                    .as_ref()
                    .is_some_and(|d| d.kind == "namespaces");
                if about_namespace {
                    K8sError::NamespaceMissing {
                        namespace: self.namespace.clone(),
                        server: self.server.clone(),
                    }
                } else {
                    K8sError::CrdMissing {
                        server: self.server.clone(),
                    }
                }
            }
            // The ResourceQuota admission says so in its message only.
            kube::Error::Api(status)
                if status.code == 403 && status.message.contains("exceeded quota") =>
            {
                K8sError::QuotaExceeded {
                    namespace: self.namespace.clone(),
                    message: status.message.clone(),
                }
            }
            kube::Error::Api(status) if status.code == 403 => K8sError::Forbidden {
                verbs: verb.to_string(),
                namespace: self.namespace.clone(),
                message: status.message.clone(),
            },
            _ => K8sError::Api {
                what,
                source: Box::new(e),
            },
        }
    }

    /// The error for a failed watch.
    pub(super) fn watch_error(&self, e: watcher::Error) -> K8sError {
        match e {
            watcher::Error::InitialListFailed(e) => self.api_error("list", "list", e),
            watcher::Error::WatchStartFailed(e) => self.api_error("watch", "watch", e),
            e => K8sError::Watch(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_403_and_404_are_definitive() {
        let server = String::from("https://x");
        assert!(K8sError::CrdMissing { server }.is_definitive());
        assert!(
            K8sError::Forbidden {
                verbs: "list".into(),
                namespace: "n".into(),
                message: String::new(),
            }
            .is_definitive()
        );
        assert!(
            !K8sError::Timeout {
                what: "list",
                timeout: Duration::from_secs(1),
            }
            .is_definitive()
        );
    }

    #[test]
    fn api_answers_map_to_errors_that_name_the_cause() {
        let place = Place {
            server: "https://x".into(),
            namespace: "ns".into(),
        };
        let answer = |code: u16, message: &str, details: serde_json::Value| {
            let status = serde_json::json!({"code": code, "message": message, "details": details});
            kube::Error::Api(Box::new(serde_json::from_value(status).unwrap()))
        };
        let none = serde_json::Value::Null;
        let full = answer(
            403,
            "signalingenvelopes.cunicu.li \"env-x\" is forbidden: exceeded quota: cunicu-signal",
            none.clone(),
        );
        let err = place.api_error("create", "create", full);
        assert!(
            matches!(&err, K8sError::QuotaExceeded { namespace, .. } if namespace == "ns"),
            "{err:?}"
        );
        assert!(!err.is_definitive());
        assert!(err.to_string().contains("exceeded quota"), "{err}");
        let denied = place.api_error("list", "list", answer(403, "no", none.clone()));
        assert!(
            matches!(&denied, K8sError::Forbidden { verbs, .. } if verbs == "list"),
            "{denied:?}"
        );
        let no_ns = answer(404, "gone", serde_json::json!({"kind": "namespaces"}));
        assert!(matches!(
            place.api_error("list", "list", no_ns),
            K8sError::NamespaceMissing { .. }
        ));
        let no_crd = answer(404, "not found", none.clone());
        assert!(matches!(
            place.api_error("list", "list", no_crd),
            K8sError::CrdMissing { .. }
        ));
        let other = place.api_error("create", "create", answer(500, "etcd", none));
        assert!(matches!(other, K8sError::Api { what: "create", .. }));
        assert!(!other.is_definitive());
    }
}
