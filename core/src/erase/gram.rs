//! The preservation Gram G = Σ k kᵀ over a spec's preserve prompts, the preserve prompts' last-token keys, and
//! their disk cache (encoding a large preserve set dominates an edit's time, and the same set is reused across
//! edits).
//!
//! The cache is never trusted: it lives in a private per-user folder (created 0700, refused if another user owns it
//! or others can write it), entries are written atomically through exclusively created files, and an entry is used
//! only if its magic, key (text-encoder hash, positions and prompt list), shape, count, SHA-256 checksum and
//! finiteness all check out; anything else is recomputed (and rewritten).
//!
//! Methods that use the last subject token (UCE, SPEED, ErasePro) cache the keys K (d × n, 8 bytes per value:
//! 6 MB for 1,000 prompts at d = 768) and form G = KKᵀ from them, so SPEED's per-layer retain filtering finds the
//! keys themselves there; methods that use every position after the subject (RECE, `tail`) cache only G, since
//! their keys would be ~70 columns per prompt.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::keys::Keys;
use super::linalg::{M, zeros};
use super::spec::{Spec, TokenMode};
use crate::error::Result;

/// Entry kinds: a Gram (d × d) or a key matrix (d × n).
const GRAM: &[u8; 16] = b"unsee-gram-v3\0\0\0";
const KEYS: &[u8; 16] = b"unsee-keys-v1\0\0\0";

/// Key columns summed into the Gram per matrix product (bounds the host copy to d × 512 values).
const GRAM_CHUNK: usize = 512;

/// The preserve prompts of `spec` (each preserve prompt × each template, in that order); for the 2023-style `tail`
/// mode the unconditional prompt "" is appended, as in UCE's original script.
pub fn preserve_prompts(spec: &Spec) -> Vec<String> {
    let mut prompts: Vec<String> = spec
        .preserve
        .iter()
        .flat_map(|p| spec.templates.iter().map(move |t| Spec::fill(t, p)))
        .collect();
    if spec.token_mode == TokenMode::Tail {
        prompts.push(String::new());
    }
    prompts
}

/// The cache key of a prompt list at some positions under one text encoder.
fn cache_key(te_hash: &str, positions: &str, prompts: &[String]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(te_hash.as_bytes());
    h.update([0u8]);
    h.update(positions.as_bytes());
    for p in prompts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// A cached matrix of `magic`'s kind and the given shape, or `compute` (whose result is then cached).
fn cached(magic: &[u8; 16], key: &[u8; 32], shape: (usize, usize), what: &str,
          compute: impl FnOnce() -> Result<(M, usize)>) -> Result<(M, usize)> {
    let kind = if magic == GRAM { "gram" } else { "keys" };
    let path = cache_dir().map(|dir| dir.join(format!("{kind}-{}.bin", hex(key))));
    if let Some(path) = &path {
        match read_entry(path, magic, key, shape) {
            Some(hit) => {
                tracing::info!("{what} loaded from cache");
                return Ok(hit);
            }
            None if path.exists() => tracing::warn!("ignoring an invalid cache entry {}", path.display()),
            None => {}
        }
    }
    let (m, count) = compute()?;
    if let Some(path) = &path
        && let Err(e) = crate::weights::write_atomic(path, &entry(magic, key, count, &m))
    {
        tracing::warn!("could not cache the {what}: {e}");
    }
    Ok((m, count))
}

/// Last-subject-token keys (d × n, one column per prompt, in order) of `prompts`, batch-encoded on a cache miss.
/// Cached (see the module docs).
pub fn last_token_keys(keys: &mut Keys, prompts: &[String], te_hash: &str, d: usize) -> Result<M> {
    if prompts.is_empty() {
        return Ok(zeros(d, 0));
    }
    let key = cache_key(te_hash, "last-token keys", prompts);
    let what = format!("last-token keys of {} prompts", prompts.len());
    let (k, _) = cached(KEYS, &key, (d, prompts.len()), &what, || {
        keys.prefetch(prompts, TokenMode::Last)?;
        let mut k = zeros(d, prompts.len());
        for (j, p) in prompts.iter().enumerate() {
            let col = keys.last_token(p)?;
            for (i, v) in col.into_iter().enumerate() {
                k[(i, j)] = v;
            }
        }
        Ok((k, prompts.len()))
    })?;
    Ok(k)
}

/// G += Σ k kᵀ over the columns of `k`, in chunks.
fn add_gram(g: &mut M, k: faer::MatRef<'_, f64>) {
    let mut j = 0;
    while j < k.ncols() {
        let n = GRAM_CHUNK.min(k.ncols() - j);
        let c = k.subcols(j, n);
        *g += c * c.transpose();
        j += n;
    }
}

/// Preservation Gram G = Σ k kᵀ over [`preserve_prompts`] at the method's positions. Returns G and the number of
/// keys summed. Cached (see the module docs) in [`cache_dir`].
pub fn preservation_gram(keys: &mut Keys, spec: &Spec, te_hash: &str, d: usize) -> Result<(M, usize)> {
    let prompts = preserve_prompts(spec);
    if prompts.is_empty() {
        return Ok((zeros(d, d), 0));
    }
    if spec.token_mode != TokenMode::Tail {
        // Last-token positions (`all` is TIME's, whose preserve keys are also the last tokens).
        let k = last_token_keys(keys, &prompts, te_hash, d)?;
        let mut g = zeros(d, d);
        add_gram(&mut g, k.as_ref());
        return Ok((g, k.ncols()));
    }
    let key = cache_key(te_hash, &format!("{:?}", spec.token_mode), &prompts);
    let what = format!("preservation Gram of {} prompts", prompts.len());
    cached(GRAM, &key, (d, d), &what, || {
        // Summed prompt by prompt: all their keys at once would be ~70 columns per prompt.
        keys.prefetch(&prompts, TokenMode::Tail)?;
        let (mut g, mut count) = (zeros(d, d), 0);
        for p in &prompts {
            let cols = keys.columns(p, TokenMode::Tail)?;
            add_gram(&mut g, super::linalg::from_columns(d, &cols).as_ref());
            count += cols.len();
        }
        Ok((g, count))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// magic ‖ key ‖ rows ‖ cols ‖ count ‖ the matrix (row-major f64) ‖ SHA-256 of everything before it.
fn entry(magic: &[u8; 16], key: &[u8; 32], count: usize, m: &M) -> Vec<u8> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut bytes = Vec::with_capacity(magic.len() + 32 + 24 + r * c * 8 + 32);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(key);
    for n in [r, c, count] {
        bytes.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for i in 0..r {
        for j in 0..c {
            bytes.extend_from_slice(&m[(i, j)].to_le_bytes());
        }
    }
    let sum: [u8; 32] = Sha256::digest(&bytes).into();
    bytes.extend_from_slice(&sum);
    bytes
}

/// The entry at `path`, if it is a regular file of exactly the expected kind, key and shape that checks out.
fn read_entry(path: &std::path::Path, magic: &[u8; 16], key: &[u8; 32], (r, c): (usize, usize)) -> Option<(M, usize)> {
    let header = magic.len() + 32 + 24;
    let size = header.checked_add(r.checked_mul(c)?.checked_mul(8)?)?.checked_add(32)?;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() != size as u64 {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != size || &bytes[..magic.len()] != magic || &bytes[magic.len()..magic.len() + 32] != key {
        return None;
    }
    let (body, sum) = bytes.split_at(size - 32);
    if Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    let at = magic.len() + 32;
    if u64_at(at) != r as u64 || u64_at(at + 8) != c as u64 {
        return None;
    }
    let count = usize::try_from(u64_at(at + 16)).ok()?;
    let v: Vec<f64> = body[header..].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some((M::from_fn(r, c, |i, j| v[i * c + j]), count))
}

/// The private per-user cache folder: `$UNSEE_CACHE_DIR`, else `$XDG_CACHE_HOME/unsee`, else `~/.cache/unsee`,
/// else `unsee-cache-<uid>` in the temp dir. Created with mode 0700; `None` (no caching, with a warning) when it
/// cannot be created or is not private: a symlink, owned by another user, or writable by others.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = env("UNSEE_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("unsee")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("unsee")))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("unsee-cache-{}", user_id())));
    match private_dir(&dir) {
        Ok(()) => Some(dir),
        Err(why) => {
            tracing::warn!("not caching in {}: {why}", dir.display());
            None
        }
    }
}

#[cfg(unix)]
fn user_id() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(not(unix))]
fn user_id() -> u32 {
    0
}

#[cfg(unix)]
fn private_dir(dir: &std::path::Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| e.to_string())?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if !meta.file_type().is_dir() {
        return Err("not a folder (or a symlink)".into());
    }
    if meta.uid() != user_id() {
        return Err(format!("owned by uid {}, not by this user", meta.uid()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(format!("writable by others (mode {:o})", meta.permissions().mode() & 0o777));
    }
    Ok(())
}

#[cfg(not(unix))]
fn private_dir(dir: &std::path::Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_tampering_is_rejected() {
        let dir = std::env::temp_dir().join(format!("unsee-gram-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gram.bin");
        let key = [7u8; 32];
        let g = M::from_fn(3, 3, |i, j| (i * 3 + j) as f64 + 0.5);
        crate::weights::write_atomic(&path, &entry(GRAM, &key, 5, &g)).unwrap();
        let (back, count) = read_entry(&path, GRAM, &key, (3, 3)).unwrap();
        assert_eq!((back, count), (g.clone(), 5));
        // Another key, another shape, another kind: not used.
        assert!(read_entry(&path, GRAM, &[8u8; 32], (3, 3)).is_none());
        assert!(read_entry(&path, GRAM, &key, (4, 4)).is_none());
        assert!(read_entry(&path, KEYS, &key, (3, 3)).is_none());
        // A key matrix that is not square round-trips too, and its transposed shape is refused.
        let k = M::from_fn(3, 2, |i, j| (i * 2 + j) as f64 - 1.25);
        let kpath = dir.join("keys.bin");
        crate::weights::write_atomic(&kpath, &entry(KEYS, &key, 2, &k)).unwrap();
        assert_eq!(read_entry(&kpath, KEYS, &key, (3, 2)).unwrap(), (k, 2));
        assert!(read_entry(&kpath, KEYS, &key, (2, 3)).is_none());
        // A right-sized forgery (zeros), a flipped byte, a NaN with a matching checksum: all refused.
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, vec![0u8; good.len()]).unwrap();
        assert!(read_entry(&path, GRAM, &key, (3, 3)).is_none());
        let mut flipped = good.clone();
        flipped[GRAM.len() + 56] ^= 1; // the first value
        std::fs::write(&path, &flipped).unwrap();
        assert!(read_entry(&path, GRAM, &key, (3, 3)).is_none());
        let nan = M::from_fn(3, 3, |_, _| f64::NAN);
        std::fs::write(&path, entry(GRAM, &key, 5, &nan)).unwrap();
        assert!(read_entry(&path, GRAM, &key, (3, 3)).is_none());
        // A symlink is not followed.
        #[cfg(unix)]
        {
            let real = dir.join("real.bin");
            std::fs::write(&real, &good).unwrap();
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(&real, &path).unwrap();
            assert!(read_entry(&path, GRAM, &key, (3, 3)).is_none());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_folder_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("unsee-gram-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&dir).unwrap_err().contains("writable by others"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(private_dir(&dir).is_ok());
        let fresh = dir.join("a/b");
        assert!(private_dir(&fresh).is_ok());
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
