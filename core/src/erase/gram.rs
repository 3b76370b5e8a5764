//! The preservation Gram G = Σ k kᵀ over a spec's preserve prompts, and its disk cache (encoding a large preserve
//! set dominates an edit's time, and the same set is reused across edits).

use super::keys::Keys;
use super::linalg::{M, from_columns, zeros};
use super::spec::{Spec, TokenMode};
use crate::error::Result;

/// Preservation Gram G = Σ k kᵀ over the preserve prompts (× templates) at the method's positions; for the
/// 2023-style `tail` mode the unconditional prompt "" is always included, as in UCE's original script.
/// Cached per text encoder, token mode and prompt list in `$UNSEE_CACHE_DIR` (default: the system temp dir).
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
    let key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(te_hash.as_bytes());
        h.update(format!("{:?}", spec.token_mode).as_bytes());
        for p in &prompts {
            h.update(p.as_bytes());
            h.update([0u8]);
        }
        format!("{:x}", h.finalize())
    };
    let dir = std::env::var_os("UNSEE_CACHE_DIR").map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("unsee-cache"));
    let path = dir.join(format!("gram-{key}.bin"));
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == 8 + d * d * 8
    {
        let count = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let v: Vec<f64> = bytes[8..].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
        tracing::info!("preservation Gram of {} prompts loaded from cache", prompts.len());
        return Ok((M::from_fn(d, d, |i, j| v[i * d + j]), count));
    }
    let mut g = zeros(d, d);
    let mut count = 0;
    for p in &prompts {
        let cols = keys.columns(p, if spec.token_mode == TokenMode::All { TokenMode::Last } else { spec.token_mode })?;
        let k = from_columns(d, &cols);
        g += &k * k.transpose();
        count += cols.len();
    }
    let _ = std::fs::create_dir_all(&dir);
    let mut bytes = (count as u64).to_le_bytes().to_vec();
    for i in 0..d {
        for j in 0..d {
            bytes.extend_from_slice(&g[(i, j)].to_le_bytes());
        }
    }
    // Write then rename, so a concurrent reader never sees a partial file.
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = dir.join(format!("gram-{key}.{}-{n}.partial", std::process::id()));
    if std::fs::write(&partial, bytes).and_then(|_| std::fs::rename(&partial, &path)).is_err() {
        tracing::warn!("could not cache the preservation Gram in {}", dir.display());
    }
    Ok((g, count))
}
