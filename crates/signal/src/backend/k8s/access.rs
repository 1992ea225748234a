//! Asking the API server, before the first watch, whether RBAC lets us watch
//! envelope objects: a missing right then fails at once with a clear error
//! instead of a watch that retries without end.

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::{Api, Client, api::PostParams};

use super::{
    K8sError,
    crd::{GROUP, RESOURCE},
    error::Place,
};

/// Whether access was checked, under a lock that serializes the access
/// reviews of concurrent listens.
#[derive(Debug, Default)]
pub(super) struct Access {
    checked: tokio::sync::Mutex<bool>,
}

impl Access {
    /// Checks that we may `verbs` envelope objects in the namespace, until the
    /// API server has answered once: if the review itself fails or times out
    /// (`timeout`), the next call asks again.
    pub(super) async fn check(
        &self,
        client: &Client,
        place: &Place,
        name: &str,
        verbs: &[&str],
        timeout: Duration,
    ) -> Result<(), K8sError> {
        let mut checked = self.checked.lock().await;
        if !*checked {
            *checked = check_access(client, place, name, verbs, timeout).await?;
        }
        Ok(())
    }
}

/// Asks the API server whether we may `verbs` envelope objects in our
/// namespace, so that a missing right fails at once instead of making the
/// watch retry forever. Returns whether the API server answered: if the
/// review itself fails or times out (`timeout`), the check is skipped
/// and the requests that follow report what is wrong.
async fn check_access(
    client: &Client,
    place: &Place,
    name: &str,
    verbs: &[&str],
    timeout: Duration,
) -> Result<bool, K8sError> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let ask = |verb: &str| {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(RESOURCE.into()),
                    namespace: Some(place.namespace.clone()),
                    verb: Some((*verb).into()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let reviews = reviews.clone();
        async move {
            tokio::time::timeout(timeout, reviews.create(&PostParams::default(), &review)).await
        }
    };
    // All verbs at once: the whole check takes one `timeout` at most.
    let answers = futures::future::join_all(verbs.iter().map(|verb| ask(verb))).await;
    let mut denied = Vec::new();
    let mut reason = String::new();
    for (verb, answer) in verbs.iter().zip(answers) {
        match answer {
            Ok(Ok(review)) => {
                if let Some(status) = review.status
                    && !status.allowed
                {
                    denied.push(*verb);
                    if reason.is_empty() {
                        reason = status.reason.unwrap_or_default();
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = name, "access review failed, not checked: {e}");
                return Ok(false);
            }
            Err(_) => {
                tracing::debug!(
                    backend = name,
                    "access review: no answer within {timeout:?}, not checked"
                );
                return Ok(false);
            }
        }
    }
    if denied.is_empty() {
        return Ok(true);
    }
    Err(K8sError::Forbidden {
        verbs: denied.join(", "),
        namespace: place.namespace.clone(),
        message: if reason.is_empty() {
            "denied by the API server's authorization".into()
        } else {
            reason
        },
    })
}
