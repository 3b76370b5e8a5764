//! What the full-size benches share: a random full-size SD-1.5 folder, environment knobs, peak RSS.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use unsee::device::{DeviceChoice, select};
use unsee::weights::Precision;

pub fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status").ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0).unwrap_or(f64::NAN)
}

pub fn cpu() -> unsee::device::SelectedDevice {
    select(DeviceChoice::Cpu, Precision::F32).unwrap()
}

/// Writes a random full-size SD-1.5 diffusers folder (burn's initialisers, seeded by burn's RNG).
pub fn write_random_sd15(dir: &Path) {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cfg = repo.join("models/sd15-config");
    let d = cpu();
    let dev = &d.device;
    for (c, f) in [("text_encoder", "config.json"), ("unet", "config.json"), ("vae", "config.json"),
                   ("scheduler", "scheduler_config.json")] {
        std::fs::create_dir_all(dir.join(c)).unwrap();
        std::fs::copy(cfg.join(c).join(f), dir.join(c).join(f)).unwrap();
    }
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    for e in std::fs::read_dir(repo.join("models/shapes-sd/tokenizer")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join("tokenizer").join(e.file_name())).unwrap();
    }
    fn save<M: ModuleSnapshot>(m: &M, path: &Path) {
        let mut store = SafetensorsStore::from_file(path).with_to_adapter(BurnToPyTorchAdapter).metadata("format", "pt")
            .skip_enum_variants(true);
        m.save_into(&mut store).unwrap();
    }
    let tcfg = unsee::model::read_config(&cfg, "text_encoder", "config.json").unwrap();
    save(&unsee::clip::CLIPTextModel::new(&tcfg, dev).unwrap(), &dir.join("text_encoder/model.safetensors"));
    let ucfg = unsee::model::read_config(&cfg, "unet", "config.json").unwrap();
    save(&unsee::unet::UNet2DConditionModel::new(&ucfg, dev).unwrap(),
         &dir.join("unet/diffusion_pytorch_model.safetensors"));
    let vcfg = unsee::model::read_config(&cfg, "vae", "config.json").unwrap();
    save(&unsee::vae::AutoencoderKL::new(&vcfg, dev).unwrap(), &dir.join("vae/diffusion_pytorch_model.safetensors"));
}


/// How a bench binary was started: `List` for cargo's `--list` probe, `Child(args)` for `--child args…` (one
/// configuration measured in its own process, so peak RSS is per configuration), else `Parent`.
pub enum Role {
    List,
    Child(Vec<String>),
    Parent,
}

pub fn role() -> Role {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return Role::List;
    }
    match args.iter().position(|a| a == "--child") {
        Some(k) => Role::Child(args[k + 1..].to_vec()),
        None => Role::Parent,
    }
}

/// Runs this bench binary again as `--child args…` (stderr passes through) and returns the last JSON line it
/// printed, or its exit status when it printed none.
pub fn run_child(args: &[&str]) -> Result<serde_json::Value, std::process::ExitStatus> {
    let out = std::process::Command::new(std::env::current_exe().unwrap()).arg("--child").args(args)
        .stderr(std::process::Stdio::inherit()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok())
        .ok_or(out.status)
}
