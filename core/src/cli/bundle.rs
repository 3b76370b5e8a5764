//! `unsee keygen` and `unsee bundle build|verify|info`: quantized, signed model bundles ([`unsee::bundle`]).

use std::path::PathBuf;

use super::{ModelArgs, print_json, show_stage, stage_bar};
use unsee::bundle::{BuildOptions, TrustedKey};
use unsee::error::{Error, Result};
use unsee::quant::Quant;

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Writes NAME.key (secret, owner-only permissions) and NAME.pub; neither may exist.
    #[arg(long)]
    out: PathBuf,
    /// Encrypt the secret key with the password in this environment variable (minisign's scrypt encryption).
    #[arg(long)]
    password_env: Option<String>,
}

pub fn keygen(a: KeygenArgs) -> Result<()> {
    let password = password(&a.password_env)?;
    let (sk, pk) = unsee::bundle::keygen(&a.out, password)?;
    eprintln!("wrote {} (secret: keep it private) and {}", sk.display(), pk.display());
    Ok(())
}

fn password(var: &Option<String>) -> Result<Option<String>> {
    match var {
        Some(v) => std::env::var(v).map(Some)
            .map_err(|_| Error::InvalidRequest(format!("environment variable {v} is not set"))),
        None => Ok(None),
    }
}

#[derive(clap::Subcommand)]
pub enum BundleCommand {
    /// Quantize the model in use (with --erasure files baked in and the --text-encoder in use) into a bundle.
    Build(BuildArgs),
    /// Check every file of a bundle against its manifest, and its signature against --key.
    Verify(VerifyArgs),
    /// Show what a bundle's manifest claims (without checking file contents).
    Info(InfoArgs),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// int8 or int4 (blocks of 32 input channels) or f16.
    #[arg(long, default_value = "int8")]
    quant: Quant,
    /// Sign the manifest with this minisign secret key (`unsee keygen`).
    #[arg(long)]
    sign: Option<PathBuf>,
    /// The secret key's password is in this environment variable.
    #[arg(long)]
    password_env: Option<String>,
    /// Recorded in the manifest.
    #[arg(long, default_value = "")]
    creator: String,
    /// The bundle folder to write (new or empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    bundle: PathBuf,
    /// A trusted public key (`.pub` file); repeatable. Without one only the files are checked.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct InfoArgs {
    bundle: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(c: BundleCommand) -> Result<()> {
    match c {
        BundleCommand::Build(a) => build(a),
        BundleCommand::Verify(a) => verify(a),
        BundleCommand::Info(a) => info(a),
    }
}

/// Reads trusted public keys from `.pub` files.
pub fn read_keys(paths: &[PathBuf]) -> Result<Vec<String>> {
    paths.iter().map(|p| {
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if !meta.is_file() || meta.len() > 4096 {
            return Err(Error::InvalidRequest(format!("{}: not a minisign public key file", p.display())));
        }
        std::fs::read_to_string(p).map_err(|e| Error::io(p, e))
    }).collect()
}

fn build(a: BuildArgs) -> Result<()> {
    let password = password(&a.password_env)?;
    let opts = BuildOptions { quant: a.quant, sign: a.sign.clone().map(|k| (k, password)), creator: a.creator };
    let engine = a.model.open()?;
    let bar = stage_bar(a.json);
    let manifest = engine.build_bundle(&opts, &a.out, &mut |s, d, t| show_stage(&bar, s, d, t))?;
    bar.finish_and_clear();
    if a.json {
        return print_json(&manifest);
    }
    let bytes: u64 = manifest.resources.iter().map(|r| r.size).sum();
    eprintln!("wrote {} ({}, {:.1} MB, {} files{})", a.out.display(), a.quant.name(), bytes as f64 / 1e6,
              manifest.resources.len(), if a.sign.is_some() { ", signed" } else { ", unsigned" });
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let keys: Vec<TrustedKey> = read_keys(&a.keys)?.iter().map(|k| unsee::bundle::parse_public_key(k))
        .collect::<Result<_>>()?;
    let v = unsee::bundle::open(&a.bundle, &keys, true)?;
    let report = serde_json::json!({
        "bundle": v.dir, "files": v.manifest.resources.len(), "root_digest": v.manifest.root_digest,
        "signed": v.signed, "signature_checked": v.signer.is_some(), "signer": v.signer,
    });
    if a.json {
        return print_json(&report);
    }
    match &v.signer {
        Some(id) => eprintln!("ok: {} files match the manifest, signed by key {id}", v.manifest.resources.len()),
        None => eprintln!("ok: {} files match the manifest; signature {}", v.manifest.resources.len(),
                          if v.signed { "present but not checked (give --key)" } else { "absent" }),
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let v = unsee::bundle::open(&a.bundle, &[], false)?;
    if a.json {
        let mut j = serde_json::to_value(&v.manifest).map_err(|e| Error::Internal(e.to_string()))?;
        j["signed"] = v.signed.into();
        return print_json(&j);
    }
    let m = &v.manifest;
    let bytes: u64 = m.resources.iter().map(|r| r.size).sum();
    println!("bundle      {} ({} files, {:.1} MB, {})", v.dir.display(), m.resources.len(), bytes as f64 / 1e6,
             if v.signed { "signed" } else { "unsigned" });
    println!("root digest {}", m.root_digest);
    println!("base model  {}", m.base_model.get("name").cloned().unwrap_or_default());
    for (c, r) in &m.components {
        println!("{c:<12}{} ({} quantized, {} exact, {} f16 values{})", r.quant.name(), r.values.quantized,
                 r.values.exact, r.values.f16, if r.decoder_only { "; decoder only" } else { "" });
    }
    println!("text enc.   {}", m.text_encoder.get("source").cloned().unwrap_or_default());
    for e in &m.erasures {
        println!("erasure     {}: {:?} → {:?}", e.method, e.concepts, e.replacements);
    }
    println!("creator     {:?}, unsee {}", m.creator, m.unsee_version);
    Ok(())
}
