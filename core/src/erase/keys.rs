//! Prompt keys: text-encoder hidden states as f64 columns (cached per prompt and prefix), the token alignment of
//! a concept prompt with its replacement, and the (concept, guide) key pairs every cross-attention edit solves for.

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::{Int, Tensor, TensorData};

use super::linalg::{self, M};
use super::spec::{Spec, TokenMode};
use crate::error::{Error, Result};
use crate::load::StableDiffusion;
use crate::tokenizer::Tokens;

/// Most positions (prompts × padded prefix length) per text-encoder call in [`Keys::prefetch`]: large enough for
/// the projections to be efficient matrix products, small enough for the activations to stay a few tens of MB.
const BATCH_TOKENS: usize = 2048;

/// Host copies of text-encoder hidden states, by prompt and prefix length.
pub struct Keys<'a> {
    sd: &'a StableDiffusion,
    cache: BTreeMap<(String, usize), (M, Tokens)>,
}

impl<'a> Keys<'a> {
    pub fn new(sd: &'a StableDiffusion) -> Self {
        Self { sd, cache: BTreeMap::new() }
    }

    /// Hidden states (d × len) of the first `len` positions of `prompt` (all 77 when `None`). CLIP is causal, so a
    /// prefix is encoded alone.
    pub fn hidden(&mut self, prompt: &str, len: Option<usize>) -> Result<(M, Tokens)> {
        let tokens = self.sd.tokenizer.encode(prompt)?;
        let len = prefix_len(len, &tokens);
        if let Some(v) = self.cache.get(&(prompt.to_string(), len)) {
            return Ok(v.clone());
        }
        let h = self.sd.text_encoder.forward(crate::tensor::token_ids(&tokens.ids[..len], self.sd.dev()));
        let m = linalg::from_hidden(h)?;
        self.cache.insert((prompt.to_string(), len), (m.clone(), tokens.clone()));
        Ok((m, tokens))
    }

    /// Encodes, many prompts per text-encoder call, every prompt of `prompts` not yet cached at the positions
    /// `mode` uses (through the last subject token for [`TokenMode::Last`], all positions otherwise), so that the
    /// [`hidden`](Self::hidden), [`last_token`](Self::last_token) and [`columns`](Self::columns) calls that follow
    /// are cache hits. Requests are sorted by prefix length and batched; a batch is padded to its longest prefix
    /// with each prompt's own next tokens, which CLIP's causal mask keeps from changing the earlier positions.
    pub fn prefetch(&mut self, prompts: &[String], mode: TokenMode) -> Result<()> {
        let mut todo: Vec<(String, usize, Tokens)> = vec![];
        let mut seen = BTreeSet::new();
        for prompt in prompts {
            let tokens = self.sd.tokenizer.encode(prompt)?;
            let len = prefix_len((mode == TokenMode::Last).then_some(tokens.eos_position), &tokens);
            let key = (prompt.clone(), len);
            if self.cache.contains_key(&key) || !seen.insert(key) {
                continue;
            }
            todo.push((prompt.clone(), len, tokens));
        }
        todo.sort_by_key(|t| t.1);
        let d = self.sd.text_encoder.hidden_size();
        // A GPU compiles kernels for every new shape: there the padded length is rounded up to a multiple of 8 and
        // the batch to a power of two (filled with copies of its last row), so a few shapes serve every prompt set.
        let bucket = self.sd.device.is_gpu;
        let mut start = 0;
        while start < todo.len() {
            // Ascending lengths: the batch's padded length is its last prompt's.
            let mut end = start + 1;
            while end < todo.len() && (end + 1 - start) * todo[end].1 <= BATCH_TOKENS {
                end += 1;
            }
            let batch = &todo[start..end];
            let full = batch[0].2.ids.len();
            let (l, rows) = match bucket {
                true => (batch[batch.len() - 1].1.next_multiple_of(8).min(full), batch.len().next_power_of_two()),
                false => (batch[batch.len() - 1].1, batch.len()),
            };
            let mut ids = Vec::with_capacity(rows * l);
            for r in 0..rows {
                let t = &batch[r.min(batch.len() - 1)].2;
                let row = t.ids.get(..l).ok_or_else(|| Error::Internal("prompts of unequal padded length".into()))?;
                ids.extend(row.iter().map(|&i| i as i64));
            }
            let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [rows * l]), self.sd.dev()).reshape([rows, l]);
            let h = crate::tensor::to_f32_vec(self.sd.text_encoder.forward(ids))?;
            for (b, (prompt, len, tokens)) in batch.iter().enumerate() {
                let m = M::from_fn(d, *len, |i, j| h[(b * l + j) * d + i] as f64);
                self.cache.insert((prompt.clone(), *len), (m, tokens.clone()));
            }
            start = end;
        }
        Ok(())
    }

    /// How many (prompt, prefix) encodings are cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The last subject token (the one before EOS) of `prompt`.
    pub fn last_token(&mut self, prompt: &str) -> Result<Vec<f64>> {
        let eos = self.sd.tokenizer.encode(prompt)?.eos_position;
        let (h, _) = self.hidden(prompt, Some(eos))?;
        Ok(h.col(eos - 1).iter().copied().collect())
    }

    /// Keys of `prompt` at the positions `mode` uses, each a column.
    pub fn columns(&mut self, prompt: &str, mode: TokenMode) -> Result<Vec<Vec<f64>>> {
        match mode {
            TokenMode::Last => Ok(vec![self.last_token(prompt)?]),
            TokenMode::Tail | TokenMode::All => {
                let (h, t) = self.hidden(prompt, None)?;
                let start = if mode == TokenMode::Tail { t.eos_position - 1 } else { 0 };
                Ok((start..h.ncols()).map(|j| h.col(j).iter().copied().collect()).collect())
            }
        }
    }

    /// Orthonormal basis of the null-text ("") keys at all 77 positions: the unconditional branch of CFG.
    pub fn null_text_basis(&mut self) -> Result<M> {
        let (h, _) = self.hidden("", None)?;
        linalg::orth_basis(&h, 1e-7, "null-text keys")
    }
}

/// The number of positions to encode: `len` (all when `None`), within the padded prompt, at least one.
fn prefix_len(len: Option<usize>, tokens: &Tokens) -> usize {
    len.unwrap_or(tokens.ids.len()).min(tokens.ids.len()).max(1)
}

/// Pairs (concept position → replacement position) for aligning two prompts token by token: the common prefix
/// maps to itself, the differing spans map proportionally, and the tail after EOS maps by offset from EOS
/// (clamped to the last position). Used by TIME and `erasepro-text`.
pub fn align(src: &Tokens, dst: &Tokens) -> Vec<(usize, usize)> {
    let n = src.ids.len();
    let prefix = src.ids.iter().zip(&dst.ids).take_while(|(a, b)| a == b).count().min(src.eos_position).min(dst.eos_position);
    let (ls, ld) = (src.eos_position - prefix, dst.eos_position - prefix);
    (0..n)
        .map(|p| {
            let q = if p < prefix {
                p
            } else if p < src.eos_position {
                prefix + if ld == 0 { 0 } else { ((p - prefix) * ld) / ls.max(1) }.min(ld.saturating_sub(1))
            } else {
                (dst.eos_position + (p - src.eos_position)).min(n - 1)
            };
            (p, q)
        })
        .collect()
}

/// The erase pairs (concept key, guide key) for every concept, replacement and template, as d × n matrices.
pub fn erase_pairs(keys: &mut Keys, spec: &Spec, d: usize) -> Result<(M, M)> {
    let prompts: Vec<String> = spec
        .erase
        .iter()
        .flat_map(|item| spec.templates.iter().flat_map(move |t| {
            [Spec::fill(t, &item.concept), Spec::fill(t, &item.replace_with).trim().to_string()]
        }))
        .collect();
    keys.prefetch(&prompts, spec.token_mode)?;
    let (mut ke, mut kg) = (vec![], vec![]);
    for item in &spec.erase {
        for t in &spec.templates {
            let c = Spec::fill(t, &item.concept);
            let g = Spec::fill(t, &item.replace_with).trim().to_string();
            match spec.token_mode {
                TokenMode::Last => {
                    ke.push(keys.last_token(&c)?);
                    kg.push(keys.last_token(&g)?);
                }
                TokenMode::Tail => {
                    let a = keys.columns(&c, TokenMode::Tail)?;
                    let b = keys.columns(&g, TokenMode::Tail)?;
                    let n = a.len().min(b.len());
                    ke.extend(a.into_iter().take(n));
                    kg.extend(b.into_iter().take(n));
                }
                TokenMode::All => {
                    let (hc, tc) = keys.hidden(&c, None)?;
                    let (hg, tg) = keys.hidden(&g, None)?;
                    for (p, q) in align(&tc, &tg) {
                        ke.push(hc.col(p).iter().copied().collect());
                        kg.push(hg.col(q).iter().copied().collect());
                    }
                }
            }
        }
    }
    Ok((linalg::from_columns(d, &ke), linalg::from_columns(d, &kg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(content: &[u32]) -> Tokens {
        let mut ids = vec![0];
        ids.extend_from_slice(content);
        let eos_position = ids.len();
        ids.resize(10, 9);
        Tokens { ids, eos_position, dropped: 0 }
    }

    #[test]
    fn align_maps_prefix_span_and_tail() {
        // "a b X Y" → "a b Z": common prefix (BOS, a, b), the two-token span onto one token, the tail by offset.
        let src = tokens(&[1, 2, 5, 6]);
        let dst = tokens(&[1, 2, 7]);
        let map = align(&src, &dst);
        assert_eq!(map.len(), 10);
        assert_eq!(&map[..3], &[(0, 0), (1, 1), (2, 2)]);
        assert_eq!(&map[3..5], &[(3, 3), (4, 3)]);
        // EOS maps to EOS, the padding after it by offset, clamped to the last position.
        assert_eq!(map[5], (5, 4));
        assert_eq!(map[9], (9, 8));
        // A one-token span onto a longer one: every position stays inside the destination span.
        let back = align(&dst, &src);
        assert_eq!(back[3], (3, 3));
        assert!(back.iter().all(|&(_, q)| q < 10));
        // Identical prompts map every position to itself.
        assert!(align(&src, &src).iter().all(|&(p, q)| p == q));
    }
}
