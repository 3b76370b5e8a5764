//! The preservation Gram G = Σ k kᵀ over a spec's preserve prompts, and its disk cache (encoding a large preserve
//! set dominates an edit's time, and the same set is reused across edits).
//!
//! The cache is never trusted: it lives in a private per-user folder (created 0700, refused if another user owns it
//! or others can write it), entries are written atomically through exclusively created files, and an entry is used
//! only if its magic, key (text-encoder hash, token mode and prompt list), width, count, SHA-256 checksum and
//! finiteness all check out; anything else is recomputed (and rewritten).

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::keys::Keys;
use super::linalg::{M, from_columns, zeros};
use super::spec::{Spec, TokenMode};
use crate::error::Result;

const MAGIC: &[u8; 16] = b"unsee-gram-v2\0\0\0";

/// Preservation Gram G = Σ k kᵀ over the preserve prompts (× templates) at the method's positions; for the
/// 2023-style `tail` mode the unconditional prompt "" is always included, as in UCE's original script.
/// Returns G and the number of keys summed. Cached (see the module docs) in [`cache_dir`].
pub fn preservation_gram(keys: &mut Keys, spec: &Spec, te_hash: &str, d: usize) -> Result<(M, usize)> {
    let mut prompts: Vec<String> = spec
        .preserve
        .iter()
        .flat_map(|p| spec.templates.iter().map(move |t| Spec::fill(t, p)))
        .collect();
    if spec.token_mode == TokenMode::Tail {
        prompts.push(String::new());
    }
    if prompts.is_empty() {
        return Ok((zeros(d, d), 0));
    }
    let key: [u8; 32] = {
        let mut h = Sha256::new();
        h.update(te_hash.as_bytes());
        h.update([0u8]);
        h.update(format!("{:?}", spec.token_mode).as_bytes());
        for p in &prompts {
            h.update([0u8]);
            h.update(p.as_bytes());
        }
        h.finalize().into()
    };
    let path = cache_dir().map(|dir| dir.join(format!("gram-{}.bin", hex(&key))));
    if let Some(path) = &path {
        match read_entry(path, &key, d) {
            Some(hit) => {
                tracing::info!("preservation Gram of {} prompts loaded from cache", prompts.len());
                return Ok(hit);
            }
            None if path.exists() => tracing::warn!("ignoring an invalid Gram cache entry {}", path.display()),
            None => {}
        }
    }
    let mut g = zeros(d, d);
    let mut count = 0;
    for p in &prompts {
        let cols = keys.columns(p, if spec.token_mode == TokenMode::All { TokenMode::Last } else { spec.token_mode })?;
        let k = from_columns(d, &cols);
        g += &k * k.transpose();
        count += cols.len();
    }
    if let Some(path) = &path
        && let Err(e) = crate::weights::write_atomic(path, &entry(&key, d, count, &g))
    {
        tracing::warn!("could not cache the preservation Gram: {e}");
    }
    Ok((g, count))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// magic ‖ key ‖ d ‖ count ‖ G (row-major f64) ‖ SHA-256 of everything before it.
fn entry(key: &[u8; 32], d: usize, count: usize, g: &M) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + 32 + 16 + d * d * 8 + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&(d as u64).to_le_bytes());
    bytes.extend_from_slice(&(count as u64).to_le_bytes());
    for i in 0..d {
        for j in 0..d {
            bytes.extend_from_slice(&g[(i, j)].to_le_bytes());
        }
    }
    let sum: [u8; 32] = Sha256::digest(&bytes).into();
    bytes.extend_from_slice(&sum);
    bytes
}

/// The entry at `path`, if it is a regular file of exactly the expected size that checks out.
fn read_entry(path: &std::path::Path, key: &[u8; 32], d: usize) -> Option<(M, usize)> {
    let header = MAGIC.len() + 32 + 16;
    let size = header + d * d * 8 + 32;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() != size as u64 {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() != size || &bytes[..MAGIC.len()] != MAGIC || &bytes[MAGIC.len()..MAGIC.len() + 32] != key {
        return None;
    }
    let (body, sum) = bytes.split_at(size - 32);
    if Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    if u64_at(MAGIC.len() + 32) != d as u64 {
        return None;
    }
    let count = usize::try_from(u64_at(MAGIC.len() + 40)).ok()?;
    let v: Vec<f64> = body[header..].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some((M::from_fn(d, d, |i, j| v[i * d + j]), count))
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
        crate::weights::write_atomic(&path, &entry(&key, 3, 5, &g)).unwrap();
        let (back, count) = read_entry(&path, &key, 3).unwrap();
        assert_eq!((back, count), (g.clone(), 5));
        // Another key, another width: not used.
        assert!(read_entry(&path, &[8u8; 32], 3).is_none());
        assert!(read_entry(&path, &key, 4).is_none());
        // A right-sized forgery (zeros), a flipped byte, a NaN with a matching checksum: all refused.
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, vec![0u8; good.len()]).unwrap();
        assert!(read_entry(&path, &key, 3).is_none());
        let mut flipped = good.clone();
        flipped[MAGIC.len() + 48] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(read_entry(&path, &key, 3).is_none());
        let nan = M::from_fn(3, 3, |_, _| f64::NAN);
        std::fs::write(&path, entry(&key, 3, 5, &nan)).unwrap();
        assert!(read_entry(&path, &key, 3).is_none());
        // A symlink is not followed.
        #[cfg(unix)]
        {
            let real = dir.join("real.bin");
            std::fs::write(&real, &good).unwrap();
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(&real, &path).unwrap();
            assert!(read_entry(&path, &key, 3).is_none());
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
