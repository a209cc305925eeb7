//! The Server Events API sandbox: this project's implementation of the contract.
//!
//! PLACEHOLDER: the sandbox issue builds it.

use clap::Args;

/// `datapulse-bridge sandbox` options.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// An accepted API key (repeatable).
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
}

pub async fn run(_args: SandboxArgs) -> anyhow::Result<()> {
    anyhow::bail!("the sandbox is not built yet")
}
