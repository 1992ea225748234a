//! Helpers shared by the integration tests of more than one crate of this
//! workspace, so that each is written once (a dev-dependency only; not
//! published):
//!
//! - [`netns`]: network namespaces and veth pairs made with `ip` (root), and
//!   re-running a test binary inside one: the multicast and ICE tests of
//!   `cunicu-signal` and of the `cunicu-signal` binary; `ip` also routes the
//!   prefixes from which the server's tests connect.
//! - [`kube_env`]: a real etcd and kube-apiserver from `scripts/kube-test-env`,
//!   clients, namespaces and the objects of `deploy/`: the `k8s://` tests.
//!
//! Helpers of one crate's tests stay in that crate's `tests/common/`.

#![deny(missing_docs)]

pub mod kube_env;
pub mod netns;
