//! Loading the client configuration: a kubeconfig file, the usual search, or
//! the pod's service account.

use kube::{
    Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{K8sError, KubeconfigSource};

/// The client configuration from `source`.
pub(super) async fn load_config(source: &KubeconfigSource) -> Result<Config, K8sError> {
    match source {
        KubeconfigSource::Infer => Config::infer().await.map_err(|e| K8sError::Config {
            what: "kubeconfig search ($KUBECONFIG, ~/.kube/config, in-cluster)".into(),
            source: Box::new(e),
        }),
        KubeconfigSource::InCluster => Config::incluster().map_err(|e| K8sError::Config {
            what: "in-cluster configuration (KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT \
                   and /var/run/secrets/kubernetes.io/serviceaccount, as in a pod)"
                .into(),
            source: Box::new(e),
        }),
        KubeconfigSource::File(path) => {
            let what = || format!("kubeconfig {}", path.display());
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| K8sError::Config {
                what: what(),
                source: Box::new(e),
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| K8sError::Config {
                    what: what(),
                    source: Box::new(e),
                })
        }
    }
}
