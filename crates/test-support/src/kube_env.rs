//! A real Kubernetes API server for tests, from `scripts/kube-test-env`.
//!
//! [`shared`] is the environment of the whole test binary: the one named by
//! [`ENV_VAR`] (its directory) or [`KUBECONFIG_VAR`] (its `kubeconfig`) if one
//! is set (CI starts one for all test binaries), else one the binary starts
//! into a temporary directory on first use. [`KubeEnv::private`]
//! starts one of a test's own (to restart its API server, or to run without the
//! CRD), stopped on drop. Environments started here are also stopped by the
//! script's watchdog when the test process exits, however it exits.
//!
//! The first start builds etcd and kube-apiserver from the Go module proxy
//! (minutes on a cold cache; cached afterwards). Nothing here skips a test:
//! if the environment cannot start, the test fails and says why.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{self, Scope},
};

/// Names the directory of a running environment (`scripts/kube-test-env start DIR`).
pub const ENV_VAR: &str = "CUNICU_KUBE_TEST_ENV";
/// Names the `kubeconfig` of a running environment (`DIR/kubeconfig`): the same
/// as [`ENV_VAR`] with its directory.
pub const KUBECONFIG_VAR: &str = "CUNICU_TEST_KUBECONFIG";

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn script() -> PathBuf {
    repo_root().join("scripts/kube-test-env")
}

/// A running etcd and kube-apiserver.
#[derive(Debug)]
pub struct KubeEnv {
    /// The environment's directory.
    pub dir: PathBuf,
    /// Stop it on drop (a private environment).
    owned: bool,
}

static SHARED: OnceLock<KubeEnv> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The environment of this test binary (see the module's docs).
pub fn shared() -> &'static KubeEnv {
    SHARED.get_or_init(|| {
        let given = std::env::var_os(ENV_VAR)
            .map(|dir| (ENV_VAR, PathBuf::from(dir)))
            .or_else(|| {
                std::env::var_os(KUBECONFIG_VAR).map(|file| {
                    let file = PathBuf::from(file);
                    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
                    (KUBECONFIG_VAR, dir)
                })
            });
        match given {
            Some((var, dir)) => {
                if !dir.join("env").is_file() || !dir.join("kubeconfig").is_file() {
                    panic!(
                        "{var} names no running kube-test-env (no env and kubeconfig in {}): \
                         run scripts/kube-test-env start DIR, or unset {var}",
                        dir.display()
                    );
                }
                KubeEnv { dir, owned: false }
            }
            None => KubeEnv::start("shared").unwrap_or_else(|e| panic!("{e:#}")),
        }
    })
}

impl KubeEnv {
    fn start(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "cunicu-kube-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let pid = std::process::id().to_string();
        let output = Command::new(script())
            .arg("start")
            .arg(&dir)
            .args(["--exit-with", &pid])
            .output()
            .with_context(|| format!("running {}", script().display()))?;
        if !output.status.success() {
            bail!(
                "scripts/kube-test-env start {} failed ({}):\n{}",
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(KubeEnv { dir, owned: true })
    }

    /// An environment of the caller's own, stopped and removed on drop.
    pub fn private(tag: &str) -> Self {
        Self::start(tag).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn script(&self, command: &str) -> anyhow::Result<()> {
        let output = Command::new(script())
            .arg(command)
            .arg(&self.dir)
            .output()
            .with_context(|| format!("running {}", script().display()))?;
        if !output.status.success() {
            bail!(
                "scripts/kube-test-env {command} {} failed ({}):\n{}",
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Stops kube-apiserver (etcd keeps running).
    pub fn stop_apiserver(&self) {
        assert!(self.owned, "only a private environment may be restarted");
        self.script("stop-apiserver")
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Starts kube-apiserver again, on the same port; returns once it is ready.
    pub fn start_apiserver(&self) {
        self.script("start-apiserver")
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The CA that signed the API server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        let env = std::fs::read_to_string(self.dir.join("env")).unwrap_or_default();
        env.lines()
            .find_map(|l| l.strip_prefix("KUBE_APISERVER_URL="))
            .unwrap_or_else(|| panic!("no KUBE_APISERVER_URL in {}/env", self.dir.display()))
            .to_string()
    }

    /// A `k8s://` URL with the admin kubeconfig.
    pub fn url(&self, namespace: &str, ttl: &str) -> String {
        url_for(&self.kubeconfig(), namespace, ttl)
    }

    /// A client with admin rights.
    pub async fn admin(&self) -> Client {
        client_for(&self.kubeconfig()).await
    }

    /// Writes a kubeconfig that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, dir: &Path, token: &str) -> PathBuf {
        let path = dir.join(format!(
            "kubeconfig-{}",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: token\ncurrent-context: test\n",
            self.server(),
            self.ca().display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new(script())
                .arg("stop")
                .arg(&self.dir)
                .arg("--remove")
                .output();
        }
    }
}

/// `k8s:///KUBECONFIG?namespace=NS&ttl=TTL`.
pub fn url_for(kubeconfig: &Path, namespace: &str, ttl: &str) -> String {
    format!(
        "k8s://{}?namespace={namespace}&ttl={ttl}",
        kubeconfig.display()
    )
}

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A token of the ServiceAccount of deploy/rbac.yaml in `ns`, from the
/// TokenRequest API.
pub async fn service_account_token(client: &Client, ns: &str) -> String {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request("cunicu-signal", &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for cunicu-signal in {ns}: {e}"));
    answer
        .status
        .and_then(|s| s.token)
        .expect("a token in the answer")
}

/// A fresh namespace with a name unique to this process.
pub async fn namespace(client: &Client, tag: &str) -> String {
    let name = format!(
        "{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name
}

/// The documents of a YAML file under `deploy/`.
pub fn deploy_documents(file: &str) -> Vec<serde_json::Value> {
    let path = repo_root().join("deploy").join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Applies (server-side) every object of `deploy/FILE`; with `namespace`, the
/// namespaced objects and the RoleBinding's subjects go to that namespace
/// instead of the one the file names, as `kustomize`'s `namespace:` would.
pub async fn apply_deploy(client: &Client, file: &str, namespace: Option<&str>) {
    for mut doc in deploy_documents(file) {
        if let Some(ns) = namespace
            && let Some(subjects) = doc.get_mut("subjects").and_then(|s| s.as_array_mut())
        {
            for subject in subjects {
                if subject.get("namespace").is_some() {
                    subject["namespace"] = ns.into();
                }
            }
        }
        let object: DynamicObject = serde_json::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("{file}: not an object: {e}: {doc}"));
        let types = object
            .types
            .clone()
            .unwrap_or_else(|| panic!("{file}: object without apiVersion/kind"));
        let gvk = GroupVersionKind::try_from(&types).unwrap();
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{file}: discovery of {gvk:?}: {e}"));
        let name = object.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => {
                let ns = namespace
                    .map(str::to_string)
                    .or_else(|| object.metadata.namespace.clone())
                    .unwrap_or_else(|| "default".into());
                doc["metadata"]["namespace"] = ns.clone().into();
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
        };
        api.patch(
            &name,
            &PatchParams::apply("cunicu-signal-tests").force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap_or_else(|e| panic!("{file}: applying {} {name}: {e}", gvk.kind));
    }
}

/// Installs the CRD of `deploy/crd.yaml` and waits until it is served.
pub async fn install_crd(client: &Client) {
    apply_deploy(client, "crd.yaml", None).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let crd = crds
            .get("signalingenvelopes.cunicu.li")
            .await
            .unwrap_or_else(|e| panic!("reading the CRD back: {e}"));
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CRD is not Established after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
