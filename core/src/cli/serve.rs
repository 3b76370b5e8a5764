//! `unsee serve`: the local web page and the AUTOMATIC1111-compatible API on one engine.

use std::net::SocketAddr;

use super::ModelArgs;
use unsee::error::Result;
use unsee::serve::{ServeOptions, start};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Serve this bundle (`unsee bundle build`); with --trust KEY.pub the engine is guarded (same as --model).
    #[arg(long, conflicts_with = "model")]
    bundle: Option<std::path::PathBuf>,
    /// Address to listen on. Loopback by default; any other address exposes the model to the network.
    #[arg(long, default_value = "127.0.0.1:7860")]
    addr: SocketAddr,
    /// Requests that may wait behind the running one (one more is answered 503).
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// Largest request body in bytes (a larger one is answered 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Also load the model without the erasures and without --text-encoder, for the page's before/after view
    /// (`POST /v1/compare`). This serves the unguarded model too: a demo option.
    #[arg(long)]
    compare_base: bool,
}

pub fn run(a: Args) -> Result<()> {
    if !a.addr.ip().is_loopback() {
        tracing::warn!("listening on {} (not loopback): anyone who can reach this address can use the model", a.addr);
    }
    let mut model = a.model.clone();
    if let Some(b) = &a.bundle {
        model.model = Some(b.clone());
    }
    let a = Args { model, ..a };
    let engine = a.model.open()?;
    let base = if a.compare_base { Some(a.model.base().open()?) } else { None };
    let opts = ServeOptions { queue: a.queue, max_body_bytes: a.max_body_bytes };
    let running = start(engine, base, a.addr, &opts)?;
    eprintln!("unsee is serving on http://{} (Ctrl-C stops it)", running.addr);
    running.wait()
}
