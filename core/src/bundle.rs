//! Model bundles: one folder that a device loads as it is — the three networks (quantized, [`crate::quant`]), the
//! tokenizer, the scheduler config, the erasures already baked into the weights (their files kept as records),
//! the text encoder in use (a robust one if the model had one) — and `manifest.json`, optionally signed.
//!
//! # Manifest
//! Shaped like the OpenSSF model-signing manifest: every file with its SHA-256 and size (`resources`), and a root
//! digest over them, plus what the bundle claims: the base model's identity (its weight files' SHA-256), the
//! quantization of each component, the erasures with their concepts and replacements, the text encoder's identity,
//! the creator and the unsee version. A bundle holds exactly the files its manifest lists: a missing, extra or
//! altered file is refused, by name.
//!
//! # Signature
//! `manifest.json.minisig`: minisign's format (Ed25519 over the BLAKE2b-512 prehash of `manifest.json`), made with
//! the `minisign` crate and checked with `minisign-verify`; the trusted comment repeats the root digest. Keys are
//! minisign keys (`unsee keygen`): `minisign -Vm manifest.json -p KEY.pub` verifies a bundle without unsee.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Error, Result};
use crate::quant::{Counts, Quant};

pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.json.minisig";
pub const FORMAT: &str = "unsee-bundle";
pub const VERSION: u32 = 1;
/// A manifest or signature larger than this is refused before it is read.
const MAX_MANIFEST: u64 = 4 * 1024 * 1024;
/// Files a bundle may hold.
const MAX_FILES: usize = 4096;

/// One file of the bundle (`name` is its path relative to the bundle, `/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resource {
    pub name: String,
    pub algorithm: String,
    pub digest: String,
    pub size: u64,
}

/// An erasure baked into the bundle's weights.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErasureRecord {
    pub method: String,
    pub concepts: Vec<String>,
    pub replacements: Vec<String>,
    /// Its erasure file inside the bundle, when it came from one.
    pub file: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ComponentRecord {
    pub quant: Quant,
    /// Values per storage kind.
    pub values: Counts,
    /// The VAE without its encoder (generation never encodes an image): what `bundle build` writes. Absent
    /// (false) in bundles written before it.
    #[serde(default)]
    pub decoder_only: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub resources: Vec<Resource>,
    /// SHA-256 over the sorted `name NUL digest NUL size LF` lines of `resources`.
    pub root_digest: String,
    /// The model the bundle was built from: its name and the SHA-256 of each weight file.
    pub base_model: BTreeMap<String, String>,
    pub components: BTreeMap<String, ComponentRecord>,
    pub erasures: Vec<ErasureRecord>,
    /// `source` (the model's own, replaced by a file, or hardened in the session) and `hash` (unsee's text-encoder
    /// hash, the one erasure files record).
    pub text_encoder: BTreeMap<String, String>,
    pub creator: String,
    pub unsee_version: String,
}

impl Manifest {
    /// Every concept the bundle's erasures remove.
    pub fn erased_concepts(&self) -> Vec<String> {
        self.erasures.iter().flat_map(|e| e.concepts.iter().cloned()).collect()
    }
}

/// The root digest of `resources` (order-independent).
pub fn root_digest(resources: &[Resource]) -> String {
    let mut lines: Vec<String> = resources.iter().map(|r| format!("{}\0{}\0{}\n", r.name, r.digest, r.size)).collect();
    lines.sort();
    let mut h = sha2::Sha256::new();
    for l in lines {
        h.update(l.as_bytes());
    }
    format!("{:x}", h.finalize())
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("{:x}", h.finalize()), n))
}

/// Whether `dir` is a bundle (has a manifest).
pub fn is_bundle(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// Every regular file under `dir`, relative, `/`-separated, sorted; links, devices and FIFOs are refused.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
        let here = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
        let entries = std::fs::read_dir(&here).map_err(|e| Error::io(&here, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&here, e))?;
            let name = entry.file_name().to_str().map(str::to_string).ok_or_else(|| Error::Bundle {
                file: entry.path(), message: "a file name that is not UTF-8".into() })?;
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                out.push(path);
            } else {
                return Err(Error::Bundle { file: entry.path(), message: "not a regular file (links are refused)".into() });
            }
            if out.len() > MAX_FILES {
                return Err(Error::Bundle { file: root.to_path_buf(), message: format!("more than {MAX_FILES} files") });
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

fn read_small(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_MANIFEST {
        return Err(Error::Bundle { file: path.to_path_buf(),
                                   message: format!("not a regular file of at most {MAX_MANIFEST} bytes") });
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// What [`open`] established about a bundle.
#[derive(Debug, Clone)]
pub struct Verified {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The manifest's signer, when a signature was checked against a trusted key (minisign key id, hex).
    pub signer: Option<String>,
    /// Whether the bundle carries a signature at all.
    pub signed: bool,
}

impl Verified {
    /// The manifest's entry for `path` (a file inside the bundle), as what the loader must find there.
    pub fn expected(&self, path: &Path) -> Result<crate::quant::Expected> {
        let path = &std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let rel = path.strip_prefix(&self.dir).ok().and_then(|p| p.to_str()).map(|p| p.replace('\\', "/"))
            .ok_or_else(|| Error::Bundle { file: path.to_path_buf(), message: "outside the bundle".into() })?;
        let r = self.manifest.resources.iter().find(|r| r.name == rel).ok_or_else(|| Error::Bundle {
            file: path.to_path_buf(), message: "not listed in the manifest".into() })?;
        Ok(crate::quant::Expected { sha256: r.digest.clone(), size: r.size })
    }

    /// Hashes the listed file `rel` now and compares it (for the small files: configs, tokenizer, erasure records).
    pub fn check_file(&self, rel: &str) -> Result<()> {
        let path = self.dir.join(rel);
        let e = self.expected(&path)?;
        let (digest, size) = sha256_file(&path)?;
        if size != e.size || digest != e.sha256 {
            return Err(Error::Bundle { file: path, message: "does not match the manifest (altered or swapped)".into() });
        }
        Ok(())
    }
}

/// A trusted public key (minisign's format) and its key id.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// minisign's key id, hex, as `minisign` prints it.
    pub id: String,
    key: minisign_verify::PublicKey,
}

/// Parses a trusted public key: the contents of a minisign `.pub` file, or its base64 line.
pub fn parse_public_key(text: &str) -> Result<TrustedKey> {
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or_default();
    let bad = |m: String| Error::InvalidRequest(format!("not a minisign public key: {m}"));
    let key = minisign_verify::PublicKey::from_base64(line).map_err(|e| bad(e.to_string()))?;
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(line).map_err(|e| bad(e.to_string()))?;
    let id = raw.get(2..10).ok_or_else(|| bad("too short".into()))?.iter().rev().map(|b| format!("{b:02X}")).collect();
    Ok(TrustedKey { id, key })
}

/// Reads and checks a bundle's manifest: format, root digest, every listed file present with the listed size, no
/// file it does not list, and — when `keys` is not empty — a signature by one of them. File contents are hashed
/// later, as they are loaded (`deep` hashes them all now, for `unsee bundle verify`).
pub fn open(dir: &Path, keys: &[TrustedKey], deep: bool) -> Result<Verified> {
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    let manifest_path = dir.join(MANIFEST);
    let bytes = read_small(&manifest_path)?;
    let sig_path = dir.join(SIGNATURE);
    let signed = std::fs::symlink_metadata(&sig_path).is_ok();
    let mut signer = None;
    if !keys.is_empty() {
        if !signed {
            return Err(Error::Bundle { file: sig_path, message: "missing: the bundle is not signed".into() });
        }
        let text = String::from_utf8(read_small(&sig_path)?).map_err(|_| Error::Bundle {
            file: sig_path.clone(), message: "not a minisign signature".into() })?;
        let sig = minisign_verify::Signature::decode(&text).map_err(|e| Error::Bundle {
            file: sig_path.clone(), message: format!("not a minisign signature: {e}") })?;
        let mut last = None;
        for key in keys {
            match key.key.verify(&bytes, &sig, false) {
                Ok(()) => {
                    signer = Some(key.id.clone());
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        match (signer.is_none(), last) {
            (false, _) => {}
            (true, Some(minisign_verify::Error::InvalidSignature)) => {
                return Err(Error::Bundle { file: manifest_path, message: "the signature does not verify: the manifest \
                    was altered after signing (or the signature was)".into() });
            }
            (true, Some(minisign_verify::Error::UnexpectedKeyId)) => {
                return Err(Error::Bundle { file: sig_path, message: "signed by a key that is not trusted".into() });
            }
            (true, e) => {
                return Err(Error::Bundle { file: sig_path, message: format!("the signature does not verify ({e:?})") });
            }
        }
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Bundle {
        file: manifest_path.clone(), message: format!("not a valid manifest: {e}") })?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(Error::Bundle { file: manifest_path, message: format!("not a version-{VERSION} {FORMAT} manifest") });
    }
    if root_digest(&manifest.resources) != manifest.root_digest {
        return Err(Error::Bundle { file: manifest_path, message: "root digest does not match the listed files".into() });
    }
    let mut listed = BTreeMap::new();
    for r in &manifest.resources {
        let ok = !r.name.is_empty() && !r.name.starts_with('/') && !r.name.contains('\\')
            && r.name.split('/').all(|c| !c.is_empty() && c != "." && c != "..") && r.algorithm == "sha256"
            && r.name != MANIFEST && r.name != SIGNATURE;
        if !ok || listed.insert(r.name.clone(), r).is_some() {
            return Err(Error::Bundle { file: manifest_path, message: format!("bad or repeated entry {:?}", r.name) });
        }
    }
    let present = list_files(&dir)?;
    for name in &present {
        if name != MANIFEST && name != SIGNATURE && !listed.contains_key(name) {
            return Err(Error::Bundle { file: dir.join(name), message: "extra file: the manifest does not list it".into() });
        }
    }
    for r in listed.values() {
        let path = dir.join(&r.name);
        if !present.contains(&r.name) {
            return Err(Error::Bundle { file: path, message: "missing: listed in the manifest".into() });
        }
        let size = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if size != r.size {
            return Err(Error::Bundle { file: path, message: format!("is {size} bytes, the manifest says {}", r.size) });
        }
    }
    let verified = Verified { dir, manifest, signer, signed };
    if deep {
        for r in &verified.manifest.resources {
            verified.check_file(&r.name)?;
        }
    }
    Ok(verified)
}

/// What [`build`] needs from the engine.
pub struct Source<'a> {
    pub sd: &'a crate::load::StableDiffusion,
    /// The folder holding the configs, tokenizer and scheduler (the model folder, or the single-file config folder).
    pub root: PathBuf,
    /// The text encoder's `config.json`.
    pub text_encoder_config: PathBuf,
    pub text_encoder_source: String,
    pub erasures: Vec<(Option<PathBuf>, ErasureRecord)>,
}

/// Options of `unsee bundle build`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub quant: Quant,
    /// A minisign secret key file, and its password if it is encrypted.
    pub sign: Option<(PathBuf, Option<String>)>,
    pub creator: String,
}

/// Writes the bundle into `out` (a new or empty folder): built in a sibling staging folder, renamed at the end.
pub fn build(src: &Source, opts: &BuildOptions, out: &Path, progress: &mut dyn FnMut(&str, usize, usize))
    -> Result<Manifest> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::InvalidRequest(format!("{} exists and is not empty", out.display())));
    }
    // Read the key first: a wrong key or password fails before minutes of work.
    let secret = match &opts.sign {
        Some((path, password)) => Some(read_secret_key(path, password.clone())?),
        None => None,
    };
    let name = out.file_name().ok_or_else(|| Error::InvalidRequest(format!("{} names no folder", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(".{}.bundling-{}", name.to_string_lossy(), std::process::id()));
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let built = write_into(src, opts, &staging, secret.as_ref(), progress).and_then(|m| {
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
        Ok(m)
    });
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    built
}

fn read_secret_key(path: &Path, password: Option<String>) -> Result<minisign::SecretKey> {
    let text = String::from_utf8(read_small(path)?)
        .map_err(|_| Error::InvalidRequest(format!("{}: not a minisign secret key", path.display())))?;
    let sk_box = minisign::SecretKeyBox::from_string(&text)
        .map_err(|e| Error::InvalidRequest(format!("{}: not a minisign secret key: {e}", path.display())))?;
    let sk = match password {
        Some(p) => sk_box.into_secret_key(Some(p)),
        None => sk_box.into_unencrypted_secret_key(),
    };
    sk.map_err(|e| Error::InvalidRequest(format!("{}: cannot open the secret key: {e}", path.display())))
}

fn copy_small(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| Error::io(from, e))?;
    if !meta.is_file() || meta.len() > 64 * 1024 * 1024 {
        return Err(Error::InvalidRequest(format!("{}: not a regular file of at most 64 MiB", from.display())));
    }
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    crate::weights::write_atomic(to, &bytes)
}

fn write_into(src: &Source, opts: &BuildOptions, dir: &Path, secret: Option<&minisign::SecretKey>,
              progress: &mut dyn FnMut(&str, usize, usize)) -> Result<Manifest> {
    let sd = src.sd;
    let mut components = BTreeMap::new();
    let steps = 4;
    for (k, component) in ["text_encoder", "unet", "vae"].into_iter().enumerate() {
        progress("quantizing", k, steps);
        let (tensors, counts) = match component {
            "text_encoder" => crate::quant::quantize_module(&*sd.text_encoder, opts.quant)?,
            "unet" => crate::quant::quantize_module(&*sd.unet, opts.quant)?,
            // The decoder only: unsee never encodes an image when it generates (SD-1.5: 34 M values fewer).
            _ => {
                let mut vae = (*sd.vae).clone();
                (vae.encoder, vae.quant_conv) = (None, None);
                crate::quant::quantize_module(&vae, opts.quant)?
            }
        };
        let stem = if component == "text_encoder" { "model" } else { "diffusion_pytorch_model" };
        let folder = dir.join(component);
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        crate::weights::write_safetensors(&folder.join(format!("{stem}.safetensors")), &tensors,
                                          Some(crate::quant::metadata(opts.quant)))?;
        drop(tensors);
        let config = if component == "text_encoder" {
            src.text_encoder_config.clone()
        } else {
            src.root.join(component).join("config.json")
        };
        copy_small(&config, &folder.join("config.json"))?;
        components.insert(component.to_string(), ComponentRecord { quant: opts.quant, values: counts,
                                                                   decoder_only: component == "vae" });
    }
    progress("copying configs", 3, steps);
    copy_small(&src.root.join("scheduler").join("scheduler_config.json"), &dir.join("scheduler/scheduler_config.json"))?;
    let tok = src.root.join("tokenizer");
    let tok = if tok.is_dir() { tok } else { crate::model::default_model_dir().join("tokenizer") };
    for f in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        if tok.join(f).is_file() {
            copy_small(&tok.join(f), &dir.join("tokenizer").join(f))?;
        }
    }
    if src.root.join("model_index.json").is_file() {
        copy_small(&src.root.join("model_index.json"), &dir.join("model_index.json"))?;
    }
    let mut erasures = vec![];
    for (k, (file, record)) in src.erasures.iter().enumerate() {
        let mut record = record.clone();
        if let Some(f) = file {
            let name = format!("erasures/{k:02}-{}", f.file_name().map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "erasure.safetensors".into()));
            copy_small(f, &dir.join(&name))?;
            record.file = Some(name);
        }
        erasures.push(record);
    }
    let mut base_model = BTreeMap::new();
    base_model.insert("name".to_string(), format!("{}", src.root.file_name().map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()));
    for (component, file) in &sd.files {
        base_model.insert(component.clone(), sha256_file(file)?.0);
    }
    // LoRAs merged into the weights: `lora.<i>` = file name, sha256 and scale.
    for (i, l) in sd.loras.iter().enumerate() {
        base_model.insert(format!("lora.{i}"), format!("{} sha256={} scale={}",
            l.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), l.sha256, l.scale));
    }
    let text_encoder = BTreeMap::from([
        ("source".to_string(), src.text_encoder_source.clone()),
        ("hash".to_string(), crate::erase::matrices::text_encoder_hash_of(&sd.text_encoder)),
    ]);
    let mut resources = vec![];
    for name in list_files(dir)? {
        let (digest, size) = sha256_file(&dir.join(&name))?;
        resources.push(Resource { name, algorithm: "sha256".into(), digest, size });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        root_digest: root_digest(&resources),
        resources,
        base_model,
        components,
        erasures,
        text_encoder,
        creator: opts.creator.clone(),
        unsee_version: env!("CARGO_PKG_VERSION").into(),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    crate::weights::write_atomic(&dir.join(MANIFEST), &bytes)?;
    if let Some(sk) = secret {
        let trusted = format!("unsee bundle root_digest:{}", manifest.root_digest);
        let sig = minisign::sign(None, sk, std::io::Cursor::new(&bytes), Some(&trusted), Some("unsee bundle manifest"))
            .map_err(|e| Error::Internal(format!("signing: {e}")))?;
        crate::weights::write_atomic(&dir.join(SIGNATURE), sig.to_string().as_bytes())?;
    }
    progress("done", steps, steps);
    Ok(manifest)
}

/// Writes a new minisign key pair: `NAME.key` (secret, owner-only permissions, encrypted when `password` is given)
/// and `NAME.pub`. Refuses to overwrite either.
pub fn keygen(name: &Path, password: Option<String>) -> Result<(PathBuf, PathBuf)> {
    let sk_path = PathBuf::from(format!("{}.key", name.display()));
    let pk_path = PathBuf::from(format!("{}.pub", name.display()));
    for p in [&sk_path, &pk_path] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(Error::InvalidRequest(format!("{} exists: not overwritten", p.display())));
        }
    }
    let kp = match password {
        Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| Error::Internal(format!("generating a key: {e}")))?;
    let sk_text = kp.sk.to_box(Some("unsee bundle signing key")).map_err(|e| Error::Internal(e.to_string()))?
        .into_string();
    let pk_text = kp.pk.to_box().map_err(|e| Error::Internal(e.to_string()))?.into_string();
    write_private(&sk_path, sk_text.as_bytes())?;
    crate::weights::write_atomic(&pk_path, pk_text.as_bytes())?;
    Ok((sk_path, pk_path))
}

/// Creates `path` exclusively with mode 0600 (owner-only) and writes `bytes`.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| {
        let _ = std::fs::remove_file(path);
        Error::io(path, e)
    })
}
