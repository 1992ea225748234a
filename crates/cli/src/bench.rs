//! The load generator (filled in below).
use anyhow::Result;
use clap::Args;

/// Options of the load generator.
#[derive(Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
