//! The `k8s:` URL and the settings that URLs do not carry.

use std::{path::PathBuf, time::Duration};

use crate::backend::{BackendError, check_params};

/// How long an envelope object lives when the URL gives no `ttl` (docs/PROTOCOL.md §6).
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// The namespace used when the URL gives none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Settings of the Kubernetes backend that URLs do not carry.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct K8sOptions {
    /// Deadline of creating one envelope object.
    pub send_timeout: Duration,
    /// How long `listen` waits for the watch's first list; when it is up,
    /// `listen` fails and the watch goes on trying until `unlisten`.
    pub listen_timeout: Duration,
    /// First delay before a failed watch is retried.
    pub backoff_min: Duration,
    /// Longest delay between watch attempts.
    pub backoff_max: Duration,
    /// How often expired objects are looked for; `None`: half the ttl, between
    /// one second and one minute.
    pub expiry_interval: Option<Duration>,
}

impl Default for K8sOptions {
    fn default() -> Self {
        K8sOptions {
            send_timeout: Duration::from_secs(10),
            listen_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            expiry_interval: None,
        }
    }
}

impl K8sOptions {
    /// These options with other watch backoff bounds (`min` ≤ `max`).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// These options with another expiry interval.
    pub fn with_expiry_interval(mut self, interval: Duration) -> Self {
        self.expiry_interval = Some(interval);
        self
    }
}

/// Where the client configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigSource {
    /// The usual search: `$KUBECONFIG`, `~/.kube/config`, then in-cluster.
    Infer,
    /// This kubeconfig file.
    File(PathBuf),
    /// The pod's service account.
    InCluster,
}

/// A parsed `k8s:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sTarget {
    /// Where the client configuration comes from.
    pub source: KubeconfigSource,
    /// The namespace of the envelope objects.
    pub namespace: String,
    /// How long an envelope object lives.
    pub ttl: Duration,
}

impl K8sTarget {
    /// Parses `k8s:///PATH?namespace=NS&ttl=D`, `k8s:incluster`, `k8s://`.
    pub fn parse(url: &url::Url) -> Result<Self, BackendError> {
        check_params(url, &["namespace", "ttl"])?;
        if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
            return Err(BackendError::url(
                url,
                "a k8s URL has no user or port (expected k8s:///PATH/TO/KUBECONFIG)",
            ));
        }
        let path = url.path();
        let source = match url.host_str() {
            Some("incluster") if matches!(path, "" | "/") => KubeconfigSource::InCluster,
            Some(host) if !host.is_empty() => {
                return Err(BackendError::url(
                    url,
                    format!(
                        "unexpected host {host:?}: the kubeconfig is a path (k8s:///PATH/TO/KUBECONFIG, three slashes)"
                    ),
                ));
            }
            _ => match path {
                "" | "/" => KubeconfigSource::Infer,
                "incluster" | "/incluster" => KubeconfigSource::InCluster,
                path => {
                    let decoded = percent_decode(path).map_err(|e| BackendError::url(url, e))?;
                    KubeconfigSource::File(PathBuf::from(decoded))
                }
            },
        };
        let namespace = match url.query_pairs().find(|(k, _)| k == "namespace") {
            None => DEFAULT_NAMESPACE.to_string(),
            Some((_, ns)) if is_dns_label(&ns) => ns.into_owned(),
            Some((_, ns)) => {
                return Err(BackendError::url(
                    url,
                    format!(
                        "namespace {ns:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
                    ),
                ));
            }
        };
        let ttl = match url.query_pairs().find(|(k, _)| k == "ttl") {
            None => DEFAULT_TTL,
            Some((_, text)) => {
                let ttl = humantime::parse_duration(&text).map_err(|e| {
                    BackendError::url(url, format!("ttl={text:?} is not a duration: {e}"))
                })?;
                if ttl < Duration::from_secs(1) {
                    return Err(BackendError::url(
                        url,
                        format!("ttl={text:?} is shorter than one second"),
                    ));
                }
                ttl
            }
        };
        Ok(K8sTarget {
            source,
            namespace,
            ttl,
        })
    }
}

fn percent_decode(path: &str) -> Result<String, String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in path {path:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("path {path:?} is not UTF-8"))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<K8sTarget, BackendError> {
        let url = url::Url::parse(s).map_err(|e| BackendError::url(s, e))?;
        K8sTarget::parse(&url)
    }

    #[test]
    fn urls() {
        let t = parse("k8s:///etc/kube/config?namespace=signal&ttl=30s").unwrap();
        assert_eq!(t.source, KubeconfigSource::File("/etc/kube/config".into()));
        assert_eq!(t.namespace, "signal");
        assert_eq!(t.ttl, Duration::from_secs(30));
        let t = parse("k8s://").unwrap();
        assert_eq!(
            (t.source, t.namespace.as_str(), t.ttl),
            (KubeconfigSource::Infer, "default", DEFAULT_TTL)
        );
        assert_eq!(parse("k8s:///").unwrap().source, KubeconfigSource::Infer);
        for incluster in ["k8s:incluster", "k8s://incluster", "k8s:///incluster"] {
            assert_eq!(
                parse(incluster).unwrap().source,
                KubeconfigSource::InCluster,
                "{incluster}"
            );
        }
        assert_eq!(
            parse("k8s:///tmp/my%20config").unwrap().source,
            KubeconfigSource::File("/tmp/my config".into())
        );
        assert_eq!(
            parse("k8s:rel/config").unwrap().source,
            KubeconfigSource::File("rel/config".into())
        );
        assert_eq!(
            parse("k8s:///x?ttl=2m").unwrap().ttl,
            Duration::from_secs(120)
        );
        for bad in [
            "k8s://host/path",
            "k8s:///x?namespace=Not_A_Label",
            "k8s:///x?ttl=soon",
            "k8s:///x?ttl=10ms",
            "k8s:///x?context=foo",
            "k8s://user@/x",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
        let err = parse("k8s:///x?context=foo").unwrap_err().to_string();
        assert!(err.contains("unknown parameter \"context\""), "{err}");
    }
}
