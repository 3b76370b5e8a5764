//! `unsee info`: the model, its files and configs, the device, the erasures in effect and the devices available.

use super::{ModelArgs, print_json};
use unsee::error::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: Args) -> Result<()> {
    let info = a.model.open()?.info()?;
    let mut v = serde_json::to_value(&info).map_err(|e| unsee::Error::Internal(e.to_string()))?;
    v["devices_available"] = serde_json::json!({"cpu": "burn flex", "wgpu_adapters": unsee::device::list_adapters()});
    print_json(&v)
}
