//! Prints the CustomResourceDefinition of the k8s:// backend's envelope objects
//! (`signalingenvelopes.cunicu.li`) as YAML, generated from the Rust type:
//!
//! ```sh
//! cargo run -p cunicu-signal --example crd > deploy/crd.yaml
//! ```
//!
//! A test (`tests/k8s.rs`) checks that `deploy/crd.yaml` is what this prints.

fn main() {
    match serde_saphyr::to_string(&cunicu_signal::backend::k8s::crd()) {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crd: cannot write YAML: {e}");
            std::process::exit(1);
        }
    }
}
