//! CLIP token ids equal transformers' `CLIPTokenizer` on ≥ 200 prompts (punctuation, unicode, numbers, special
//! tokens, over-long prompts) — exactly, for both ways of loading the tokenizer.

mod common;

use common::*;
use unsee::tokenizer::ClipTokenizer;

fn cases() -> Vec<(String, Vec<u32>, usize)> {
    let text = std::fs::read_to_string(fixtures().join("tokens.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["prompt"].as_str().unwrap().to_string(),
                c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
                c["untruncated_len"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn check(tok: &ClipTokenizer, how: &str) {
    let cases = cases();
    assert!(cases.len() >= 200, "need at least 200 cases, have {}", cases.len());
    let mut failures = vec![];
    for (prompt, want, full_len) in &cases {
        let got = tok.encode(prompt).unwrap();
        if &got.ids != want {
            failures.push(format!("{prompt:?}\n  got  {:?}\n  want {:?}", got.ids, want));
        }
        // untruncated_len counts BOS and EOS.
        assert_eq!(got.dropped, full_len.saturating_sub(77), "{how}: dropped-token count for {prompt:?}");
    }
    assert!(failures.is_empty(), "{how}: {} of {} prompts differ:\n{}", failures.len(), cases.len(),
            failures.join("\n"));
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&model_dir("tiny").join("tokenizer")).unwrap();
    assert_eq!((tok.bos, tok.eos, tok.pad, tok.max_length), (49406, 49407, 49407, 77));
    check(&tok, "tokenizer.json");
}

#[test]
fn vocab_and_merges_match_transformers() {
    let dir = common::tmp_dir("tok", "vocab");
    let src = model_dir("tiny").join("tokenizer");
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    check(&tok, "vocab.json + merges.txt");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_tokenizer_folder_is_a_clear_error() {
    let err = ClipTokenizer::from_dir(std::path::Path::new("/nonexistent/tokenizer")).err().unwrap();
    assert!(err.to_string().contains("not found"), "{err}");
}
