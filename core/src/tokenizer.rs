//! CLIP tokenization through the `tokenizers` crate, loaded from a model's `tokenizer/` folder.
//!
//! `tokenizer.json` is used when present. Otherwise the pipeline of transformers' `CLIPTokenizer` (NFC, whitespace
//! clean-up, lower-casing, CLIP's split pattern, byte-level BPE with `</w>`) is assembled around `vocab.json` and
//! `merges.txt`. Prompts are truncated to 75 content tokens plus `<|startoftext|>`/`<|endoftext|>` and padded to
//! 77 with the pad token named by `tokenizer_config.json` (SD-1.x: `<|endoftext|>`).

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

pub const MAX_LENGTH: usize = 77;

/// Cheap to clone (the vocabulary and merges are shared): the model is cloned whenever an edit is staged.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: std::sync::Arc<Tokenizer>,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub max_length: usize,
}

/// The result of tokenizing one prompt.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// `max_length` ids: BOS, content, EOS, padding.
    pub ids: Vec<u32>,
    /// Position of the EOS token (= number of content tokens + 1).
    pub eos_position: usize,
    /// Content tokens dropped by truncation.
    pub dropped: usize,
}

/// Runs `f`, which hands files we do not control to the `tokenizers` crate: a panic there (it `expect`s on some
/// malformed `tokenizer.json` documents, e.g. a decoder that is not an object, found by fuzzing) becomes an error.
fn untrusted<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::Tokenizer(format!("{what}: malformed tokenizer (the tokenizers crate panicked on it)")))
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// A special token in `tokenizer_config.json`/`special_tokens_map.json` is a string or `{"content": ...}`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Tokenizer(format!("tokenizer folder {} not found", dir.display())));
        }
        // A tokenizer file that is there but not a regular file (a folder, a FIFO) is an error, not "absent".
        for name in ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.exists() && !p.is_file() {
                return Err(Error::Tokenizer(format!("{} is not a regular file", p.display())));
            }
        }
        let tokenizer_json = dir.join("tokenizer.json");
        let inner = untrusted(&dir.display().to_string(), || Ok(if tokenizer_json.is_file() {
            Tokenizer::from_file(&tokenizer_json).map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?
        } else {
            let vocab = read_json(&dir.join("vocab.json"))?;
            let merges_path = dir.join("merges.txt");
            let merges_text = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
            let merges: Vec<&str> =
                merges_text.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).collect();
            let spec = clip_tokenizer_json(vocab, &merges);
            let bytes = serde_json::to_vec(&spec).map_err(|e| Error::Tokenizer(e.to_string()))?;
            Tokenizer::from_bytes(bytes)
                .map_err(|e| Error::Tokenizer(format!("vocab.json/merges.txt in {}: {e}", dir.display())))?
        }))?;

        let mut config = serde_json::Map::new();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.is_file()
                && let Value::Object(o) = read_json(&p)?
            {
                config.extend(o);
            }
        }
        let special = |key: &str, default: &str| -> Result<u32> {
            let s = config.get(key).and_then(token_string).unwrap_or_else(|| default.to_string());
            inner.token_to_id(&s).ok_or_else(|| Error::Tokenizer(format!("{key} {s:?} is not in the vocabulary")))
        };
        let bos = special("bos_token", "<|startoftext|>")?;
        let eos = special("eos_token", "<|endoftext|>")?;
        let pad = special("pad_token", "<|endoftext|>")?;
        // transformers writes int(1e30) when a tokenizer has no length of its own ("no limit"): CLIP's 77 then.
        // Anything else outside 3..=1024 (room for BOS, EOS and one token) is an error, not a silent default.
        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => MAX_LENGTH,
            Some(v) if v.as_f64().is_some_and(|n| n >= 1e18) => MAX_LENGTH,
            Some(v) => match v.as_u64() {
                Some(n @ 3..=1024) => n as usize,
                _ => return Err(Error::Tokenizer(format!("model_max_length {v} is outside 3..=1024"))),
            },
        };
        Ok(Self { inner: std::sync::Arc::new(inner), bos, eos, pad, max_length })
    }

    /// Content tokens of `text`, without BOS/EOS.
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        untrusted("encoding a prompt", || {
            let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
            Ok(enc.get_ids().to_vec())
        })
    }

    /// Tokenizes like `tokenizer(text, padding="max_length", max_length=77, truncation=True)`.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let mut content = self.content_ids(text)?;
        let room = self.max_length - 2;
        let dropped = content.len().saturating_sub(room);
        content.truncate(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&content);
        ids.push(self.eos);
        let eos_position = ids.len() - 1;
        ids.resize(self.max_length, self.pad);
        Ok(Tokens { ids, eos_position, dropped })
    }

    /// [`encode`](Self::encode), warning through `tracing` when the prompt was truncated.
    pub fn encode_prompt(&self, text: &str) -> Result<Tokens> {
        let t = self.encode(text)?;
        if t.dropped > 0 {
            tracing::warn!(
                "prompt is longer than {} tokens: the last {} token(s) were dropped",
                self.max_length,
                t.dropped
            );
        }
        Ok(t)
    }

    /// The text of content tokens `ids` as transformers' `CLIPTokenizer.decode` gives it: tokens joined, `</w>` as
    /// a space, byte-level characters back to UTF-8 (invalid sequences replaced). Unknown ids are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let table = byte_decoder();
        let mut bytes = vec![];
        for &id in ids {
            let tok = self.inner.id_to_token(id).ok_or_else(|| Error::Tokenizer(format!("no token has id {id}")))?;
            let tok = tok.replace("</w>", " ");
            for ch in tok.chars() {
                match table.get(&ch) {
                    Some(&b) => bytes.push(b),
                    None => bytes.extend(ch.to_string().as_bytes()),
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest token id the tokenizer can produce (special tokens included).
    pub fn max_id(&self) -> u32 {
        self.inner.get_vocab(true).into_values().max().unwrap_or(0)
    }
}

/// GPT-2's byte-level alphabet reversed: the character each byte is written as → the byte.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256u32;
    (0..=255u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).expect("code points below 512 are chars"), b as u8)
        })
        .collect()
}

/// transformers' `CLIPTokenizer` pipeline as a `tokenizer.json` document around the given vocabulary and merges.
fn clip_tokenizer_json(vocab: Value, merges: &[&str]) -> Value {
    let added = |id: u64, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let id_of = |t: &str| vocab.get(t).and_then(|v| v.as_u64());
    let mut added_tokens = vec![];
    for t in ["<|startoftext|>", "<|endoftext|>"] {
        if let Some(id) = id_of(t) {
            added_tokens.push(added(id, t));
        }
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}
