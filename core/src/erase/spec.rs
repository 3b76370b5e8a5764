//! The edit spec (TOML): which concepts to erase, what each becomes, what to preserve, and the method's
//! parameters, with each method's published defaults. Every error names its line.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Uce,
    Time,
    Speed,
    Rece,
    Erasepro,
    EraseproText,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Uce => "uce",
            Method::Time => "time",
            Method::Speed => "speed",
            Method::Rece => "rece",
            Method::Erasepro => "erasepro",
            Method::EraseproText => "erasepro-text",
        }
    }
}

/// Which token positions of a prompt carry the concept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenMode {
    /// The last subject token (the one before EOS): UCE's current script, SPEED, ErasePro.
    Last,
    /// The last subject token through position 76 (EOS and padding): UCE's 2023 script, RECE's base edit.
    Tail,
    /// All 77 positions, source aligned to destination: TIME.
    All,
}

/// A fully resolved spec (defaults filled in, validated).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Spec {
    pub method: Method,
    /// `to_k`/`to_v` for cross-attention methods; `fc2` for `erasepro-text`.
    pub targets: Vec<String>,
    pub lambda: f64,
    pub erase_scale: f64,
    pub preserve_scale: f64,
    pub token_mode: TokenMode,
    pub pin_unconditional: bool,
    /// Templates with `{}`; `["{}"]` for none.
    pub templates: Vec<String>,
    pub templates_name: String,
    pub preserve: Vec<String>,
    pub erase: Vec<EraseItem>,
    /// RECE: rounds and the embedding regulariser.
    pub rounds: usize,
    pub lambda_reg: f64,
    /// SPEED: α (retain scale), null-space threshold τ, augmentations per key, IPF filtering.
    pub retain_scale: f64,
    pub null_threshold: f64,
    pub augment: usize,
    pub filter: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EraseItem {
    pub concept: String,
    pub replace_with: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawErase {
    concept: Spanned<String>,
    replace_with: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    method: Spanned<String>,
    targets: Option<Spanned<Vec<String>>>,
    lambda: Option<Spanned<f64>>,
    erase_scale: Option<Spanned<f64>>,
    preserve_scale: Option<Spanned<f64>>,
    token_mode: Option<Spanned<String>>,
    pin_unconditional: Option<bool>,
    templates: Option<Spanned<String>>,
    preserve: Option<Vec<Spanned<String>>>,
    preserve_file: Option<Spanned<String>>,
    rounds: Option<Spanned<i64>>,
    lambda_reg: Option<Spanned<f64>>,
    retain_scale: Option<Spanned<f64>>,
    null_threshold: Option<Spanned<f64>>,
    augment: Option<Spanned<i64>>,
    filter: Option<bool>,
    #[serde(default)]
    erase: Vec<RawErase>,
}

pub const ART_TEMPLATES: [&str; 6] = ["{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"];
pub const OBJECT_TEMPLATES: [&str; 6] =
    ["{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"];

/// Templates the edit never uses, for `unsee audit`.
pub fn held_out_templates(templates_name: &str) -> Vec<String> {
    let t: &[&str] = match templates_name {
        "art" => &["a painting in the style of {}", "{} style artwork, detailed", "an illustration by {}"],
        "object" => &["a close-up photo of a {}", "a drawing of a {}", "a {} in a field"],
        _ => &["a photo of {}", "an image showing {}", "{}, high quality"],
    };
    t.iter().map(|s| s.to_string()).collect()
}

struct Src<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Src<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())].matches('\n').count() + 1
    }
    fn err<T>(&self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) -> Result<T> {
        Err(Error::InvalidRequest(format!("{}:{}: {msg}", self.file.display(), self.line(span))))
    }
}

fn check_range(src: &Src, v: &Option<Spanned<f64>>, name: &str, min: f64, max: f64, min_inclusive: bool)
    -> Result<Option<f64>> {
    let Some(v) = v else { return Ok(None) };
    let x = *v.get_ref();
    let ok = x.is_finite() && (if min_inclusive { x >= min } else { x > min }) && x <= max;
    if !ok {
        let lo = if min_inclusive { "≥" } else { ">" };
        return src.err(v.span(), format!("{name} = {x} is out of range ({lo} {min}, ≤ {max})"));
    }
    Ok(Some(x))
}

impl Spec {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` names the file in errors and anchors relative `preserve_file`/`templates` paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let src = Src { text, file: path };
        let raw: RawSpec = toml::from_str(text)
            .map_err(|e| Error::InvalidRequest(format!("{}: {}", path.display(), e.to_string().trim())))?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));

        let method = match raw.method.get_ref().as_str() {
            "uce" => Method::Uce,
            "time" => Method::Time,
            "speed" => Method::Speed,
            "rece" => Method::Rece,
            "erasepro" => Method::Erasepro,
            "erasepro-text" => Method::EraseproText,
            other => {
                return src.err(raw.method.span(), format!(
                    "unknown method {other:?} (uce, time, speed, rece, erasepro, erasepro-text)"
                ));
            }
        };

        // Published defaults (see ../shared/reference/erasure-methods.md and README).
        let (targets, lambda, token_mode, pin) = match method {
            Method::Uce => (vec!["to_k", "to_v"], 0.5, TokenMode::Last, false),
            Method::Time => (vec!["to_k", "to_v"], 0.1, TokenMode::All, false),
            Method::Speed => (vec!["to_v"], 0.0, TokenMode::Last, true),
            Method::Rece => (vec!["to_k", "to_v"], 0.5, TokenMode::Tail, false),
            Method::Erasepro => (vec!["to_k", "to_v"], 0.0, TokenMode::Last, true),
            Method::EraseproText => (vec!["fc2"], 0.0, TokenMode::Tail, true),
        };

        let targets: Vec<String> = match &raw.targets {
            Some(t) => {
                let allowed: &[&str] = if method == Method::EraseproText { &["fc2"] } else { &["to_k", "to_v"] };
                if t.get_ref().is_empty() {
                    return src.err(t.span(), "targets is empty");
                }
                for x in t.get_ref() {
                    if !allowed.contains(&x.as_str()) {
                        return src.err(t.span(), format!("target {x:?} is not one of {allowed:?} for {}", method.name()));
                    }
                }
                t.get_ref().clone()
            }
            None => targets.into_iter().map(str::to_string).collect(),
        };

        let token_mode = match &raw.token_mode {
            None => token_mode,
            Some(t) => match (method, t.get_ref().as_str()) {
                (Method::Time, _) => return src.err(t.span(), "time always uses all 77 tokens"),
                (_, "last") => TokenMode::Last,
                (_, "tail") => TokenMode::Tail,
                (_, other) => return src.err(t.span(), format!("token_mode {other:?} (last or tail)")),
            },
        };

        let lambda = check_range(&src, &raw.lambda, "lambda", 0.0, 1e6, true)?.unwrap_or(lambda);
        let erase_scale = check_range(&src, &raw.erase_scale, "erase_scale", 0.0, 1e6, false)?.unwrap_or(1.0);
        let preserve_scale = check_range(&src, &raw.preserve_scale, "preserve_scale", 0.0, 1e6, true)?
            .unwrap_or(if method == Method::Rece { 0.1 } else { 1.0 });
        let lambda_reg = check_range(&src, &raw.lambda_reg, "lambda_reg", 0.0, 1e6, false)?.unwrap_or(0.1);
        let retain_scale = check_range(&src, &raw.retain_scale, "retain_scale", 0.0, 1e6, false)?.unwrap_or(1.0);
        let null_threshold = check_range(&src, &raw.null_threshold, "null_threshold", 0.0, 1e6, false)?.unwrap_or(0.1);
        let rounds = match &raw.rounds {
            Some(r) if !(0..=20).contains(r.get_ref()) => return src.err(r.span(), "rounds must be between 0 and 20"),
            Some(r) => *r.get_ref() as usize,
            None => 2,
        };
        let augment = match &raw.augment {
            Some(r) if !(0..=100).contains(r.get_ref()) => return src.err(r.span(), "augment must be between 0 and 100"),
            Some(r) => *r.get_ref() as usize,
            None => 10,
        };
        for (name, given, only) in [
            ("rounds", raw.rounds.as_ref().map(|s| s.span()), Method::Rece),
            ("lambda_reg", raw.lambda_reg.as_ref().map(|s| s.span()), Method::Rece),
            ("retain_scale", raw.retain_scale.as_ref().map(|s| s.span()), Method::Speed),
            ("null_threshold", raw.null_threshold.as_ref().map(|s| s.span()), Method::Speed),
            ("augment", raw.augment.as_ref().map(|s| s.span()), Method::Speed),
        ] {
            if let Some(span) = given
                && method != only
            {
                return src.err(span, format!("{name} only applies to method = \"{}\"", only.name()));
            }
        }

        let (templates, templates_name) = match &raw.templates {
            None => (vec!["{}".to_string()], "none".to_string()),
            Some(t) => match t.get_ref().as_str() {
                "none" => (vec!["{}".to_string()], "none".into()),
                "art" => (ART_TEMPLATES.iter().map(|s| s.to_string()).collect(), "art".into()),
                "object" => (OBJECT_TEMPLATES.iter().map(|s| s.to_string()).collect(), "object".into()),
                file => {
                    let p = base_dir.join(file);
                    let text = std::fs::read_to_string(&p)
                        .or_else(|_| src.err(t.span(), format!("templates file {} cannot be read", p.display())))?;
                    let lines: Vec<String> =
                        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
                    if lines.is_empty() || lines.iter().any(|l| !l.contains("{}")) {
                        return src.err(t.span(), format!("every line of {} must contain {{}}", p.display()));
                    }
                    (lines, file.to_string())
                }
            },
        };

        let mut erase = Vec::new();
        if raw.erase.is_empty() {
            return src.err(raw.method.span(), "no [[erase]] entries: name at least one concept");
        }
        for e in &raw.erase {
            let concept = e.concept.get_ref().trim().to_string();
            if concept.is_empty() {
                return src.err(e.concept.span(), "empty concept");
            }
            let replace_with = e.replace_with.as_ref().map(|r| r.get_ref().trim().to_string()).unwrap_or_default();
            if replace_with.eq_ignore_ascii_case(&concept) {
                return src.err(e.concept.span(), format!("{concept:?} is replaced with itself"));
            }
            erase.push(EraseItem { concept, replace_with });
        }

        let mut preserve: Vec<String> = Vec::new();
        let mut preserve_spans = Vec::new();
        for p in raw.preserve.iter().flatten() {
            preserve.push(p.get_ref().trim().to_string());
            preserve_spans.push(p.span());
        }
        if let Some(f) = &raw.preserve_file {
            let p = base_dir.join(f.get_ref());
            let text = std::fs::read_to_string(&p)
                .or_else(|_| src.err(f.span(), format!("preserve_file {} cannot be read", p.display())))?;
            for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                preserve.push(l.to_string());
                preserve_spans.push(f.span());
            }
        }
        for (p, span) in preserve.iter().zip(&preserve_spans) {
            if p.is_empty() {
                return src.err(span.clone(), "empty preserve prompt");
            }
            if let Some(e) = erase.iter().find(|e| e.concept.eq_ignore_ascii_case(p)) {
                return src.err(span.clone(), format!("{:?} is both erased and preserved", e.concept));
            }
        }
        if method == Method::Time && !preserve.is_empty() {
            return src.err(preserve_spans[0].clone(), "time has no preservation term (use uce or speed)");
        }

        Ok(Spec {
            method,
            targets,
            lambda,
            erase_scale,
            preserve_scale,
            token_mode,
            pin_unconditional: raw.pin_unconditional.unwrap_or(pin),
            templates,
            templates_name,
            preserve,
            erase,
            rounds,
            lambda_reg,
            retain_scale,
            null_threshold,
            augment,
            filter: raw.filter.unwrap_or(true),
        })
    }

    /// `template` with `{}` replaced by `concept`.
    pub fn fill(template: &str, concept: &str) -> String {
        template.replace("{}", concept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Spec> {
        Spec::parse(s, Path::new("spec.toml"))
    }

    #[test]
    fn defaults_follow_the_method() {
        let s = parse("method = \"speed\"\n[[erase]]\nconcept = \"Van Gogh\"\n").unwrap();
        assert_eq!(s.targets, vec!["to_v"]);
        assert!(s.pin_unconditional);
        let s = parse("method = \"uce\"\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n").unwrap();
        assert_eq!((s.lambda, s.token_mode, s.pin_unconditional), (0.5, TokenMode::Last, false));
        assert_eq!(s.erase[0].replace_with, "art");
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("method = \"uce\"\nlambda = -1\n[[erase]]\nconcept = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("spec.toml:2") && e.contains("lambda"), "{e}");
        let e = parse("method = \"uce\"\n[[erase]]\nconcept = \"  \"\n").unwrap_err().to_string();
        assert!(e.contains("spec.toml:3") && e.contains("empty concept"), "{e}");
        let e = parse("method = \"uce\"\npreserve = [\"Monet\",\n  \"Van Gogh\"]\n[[erase]]\nconcept = \"Van Gogh\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.toml:3") && e.contains("both erased and preserved"), "{e}");
        let e = parse("method = \"uce\"\nfoo = 1\n[[erase]]\nconcept = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("foo"), "{e}");
        let e = parse("method = \"magic\"\n[[erase]]\nconcept = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("spec.toml:1") && e.contains("unknown method"), "{e}");
        let e = parse("method = \"uce\"\nrounds = 3\n[[erase]]\nconcept = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("spec.toml:2") && e.contains("rece"), "{e}");
    }
}
