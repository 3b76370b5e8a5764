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
    pub const ALL: [Method; 6] =
        [Method::Uce, Method::Time, Method::Speed, Method::Rece, Method::Erasepro, Method::EraseproText];

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

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            format!("unknown method {s:?} ({})", names.join(", "))
        })
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
    /// `[harden]`: the parameters of `unsee harden` (AdvUnlearn), `None` = its defaults.
    pub harden: Option<super::harden::HardenParams>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EraseItem {
    pub concept: String,
    /// What the concept becomes ("" = nothing in particular).
    pub replace_with: String,
}

impl EraseItem {
    pub fn new(concept: impl Into<String>, replace_with: impl Into<String>) -> Self {
        Self { concept: concept.into().trim().to_string(), replace_with: replace_with.into().trim().to_string() }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidSpec(msg.into())
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
    harden: Option<super::harden::HardenParams>,
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

/// Valid ranges of the real-valued parameters: (name, min, max, min inclusive).
const RANGES: [(&str, f64, f64, bool); 6] = [
    ("lambda", 0.0, 1e6, true),
    ("erase_scale", 0.0, 1e6, false),
    ("preserve_scale", 0.0, 1e6, true),
    ("lambda_reg", 0.0, 1e6, false),
    ("retain_scale", 0.0, 1e6, false),
    ("null_threshold", 0.0, 1e6, false),
];
const MAX_ROUNDS: usize = 20;
const MAX_AUGMENT: usize = 100;
/// Size limit of a spec and of the files it names.
pub const MAX_SPEC_FILE_BYTES: u64 = 1 << 20;
/// Key columns an edit may solve for: (concepts × templates) × positions per prompt (1 for `last`, up to 77 for
/// `tail` and `all`), so the key matrices stay well under 1 GB on SD-1.x (768 wide, f64).
pub const MAX_EDIT_KEYS: usize = 20_000;
/// Preserve prompts × templates (each is encoded once).
pub const MAX_PRESERVE_PROMPTS: usize = 100_000;

/// Reads a text file of at most `limit` bytes; only regular files (a FIFO or a device would hang or never end).
pub fn read_text_file(path: &Path, limit: u64) -> std::result::Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    Ok(text)
}

/// `file` (as written in a spec) resolved inside `base_dir`: relative, no `..`, and not leading out through a
/// symlink — a spec cannot make unsee read files outside its own folder.
/// What a spec's `templates`/`preserve_file` may name.
#[derive(Clone, Copy)]
enum FileRefs<'a> {
    /// Files inside this folder (a spec file's own folder).
    Inside(&'a Path),
    /// Any regular file (an app's own spec).
    Any,
    /// None (a spec from the network).
    Refused,
}

fn inside(base_dir: &Path, file: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(file);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
        return Err(format!("{file:?} must be a relative path inside the spec's folder"));
    }
    let base = std::fs::canonicalize(if base_dir.as_os_str().is_empty() { Path::new(".") } else { base_dir })
        .map_err(|e| format!("{}: {e}", base_dir.display()))?;
    let p = std::fs::canonicalize(base.join(rel)).map_err(|e| format!("{file}: {e}"))?;
    if !p.starts_with(&base) {
        return Err(format!("{file:?} leads outside the spec's folder"));
    }
    Ok(p)
}

impl Method {
    /// The matrices a method may edit.
    pub fn allowed_targets(self) -> &'static [&'static str] {
        if self == Method::EraseproText { &["fc2"] } else { &["to_k", "to_v"] }
    }
}

/// `none`, `art` or `object`: (templates, name); `None` for anything else (a file).
fn named_templates(name: &str) -> Option<(Vec<String>, String)> {
    let t: &[&str] = match name {
        "none" => &["{}"],
        "art" => &ART_TEMPLATES,
        "object" => &OBJECT_TEMPLATES,
        _ => return None,
    };
    Some((t.iter().map(|s| s.to_string()).collect(), name.to_string()))
}

// The checks, each written once: the TOML front end adds the line, `Spec::validate` reports them as they are.

fn check_param(name: &str, x: f64) -> std::result::Result<(), String> {
    let Some(&(_, min, max, min_inclusive)) = RANGES.iter().find(|r| r.0 == name) else {
        return Err(format!("unknown parameter {name}"));
    };
    if x.is_finite() && (if min_inclusive { x >= min } else { x > min }) && x <= max {
        return Ok(());
    }
    let lo = if min_inclusive { "≥" } else { ">" };
    Err(format!("{name} = {x} is out of range ({lo} {min}, ≤ {max})"))
}

fn check_count(name: &str, n: i64, max: usize) -> std::result::Result<usize, String> {
    usize::try_from(n).ok().filter(|&n| n <= max).ok_or_else(|| format!("{name} must be between 0 and {max}"))
}

fn check_targets(method: Method, targets: &[String]) -> std::result::Result<(), String> {
    let allowed = method.allowed_targets();
    if targets.is_empty() {
        return Err("targets is empty".into());
    }
    match targets.iter().find(|x| !allowed.contains(&x.as_str())) {
        Some(x) => Err(format!("target {x:?} is not one of {allowed:?} for {}", method.name())),
        None => Ok(()),
    }
}

fn check_item(e: &EraseItem) -> std::result::Result<(), String> {
    if e.concept.trim().is_empty() {
        return Err("empty concept".into());
    }
    if e.replace_with.trim().eq_ignore_ascii_case(e.concept.trim()) {
        return Err(format!("{:?} is replaced with itself", e.concept));
    }
    Ok(())
}

fn check_templates(templates: &[String]) -> std::result::Result<(), String> {
    if templates.is_empty() || templates.iter().any(|l| !l.contains("{}")) {
        return Err("every template must contain {}".into());
    }
    Ok(())
}

fn check_preserve(method: Method, p: &str, erase: &[EraseItem]) -> std::result::Result<(), String> {
    if p.trim().is_empty() {
        return Err("empty preserve prompt".into());
    }
    if let Some(e) = erase.iter().find(|e| e.concept.eq_ignore_ascii_case(p.trim())) {
        return Err(format!("{:?} is both erased and preserved", e.concept));
    }
    if method == Method::Time {
        return Err("time has no preservation term (use uce or speed)".into());
    }
    Ok(())
}

fn check_token_mode(method: Method, mode: TokenMode) -> std::result::Result<(), String> {
    match (method, mode) {
        (Method::Time, TokenMode::All) => Ok(()),
        (Method::Time, _) => Err("time always uses all 77 tokens".into()),
        (_, TokenMode::All) => Err("token_mode all is time's (last or tail)".into()),
        _ => Ok(()),
    }
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
        Err(invalid(format!("{}:{}: {msg}", self.file.display(), self.line(span))))
    }
    /// `check`'s error, at `span`'s line.
    fn at<T>(&self, span: std::ops::Range<usize>, check: std::result::Result<T, String>) -> Result<T> {
        check.or_else(|m| self.err(span, m))
    }
    /// A real-valued parameter, checked; `None` when absent.
    fn param(&self, v: &Option<Spanned<f64>>, name: &str) -> Result<Option<f64>> {
        let Some(v) = v else { return Ok(None) };
        self.at(v.span(), check_param(name, *v.get_ref()))?;
        Ok(Some(*v.get_ref()))
    }
}

impl Spec {
    pub fn from_file(path: &Path) -> Result<Self> {
        std::fs::metadata(path).and_then(|_| std::fs::File::open(path)).map_err(|e| Error::io(path, e))?;
        let text = read_text_file(path, MAX_SPEC_FILE_BYTES).map_err(invalid)?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` names the file in errors and anchors relative `preserve_file`/`templates` paths.
    /// A front end to [`Spec::new`]: every value is checked where it is written, so errors name its line.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Self::parse_from(text, path, FileRefs::Inside(&base_dir))
    }

    /// Parses a spec given as text by an app (the bindings' `erase`/`audit`): errors name `<spec>` and its line;
    /// `templates`/`preserve_file` paths are the app's own (absolute, or relative to the working directory), still
    /// regular files of at most [`MAX_SPEC_FILE_BYTES`].
    pub fn parse_inline(text: &str) -> Result<Self> {
        Self::parse_from(text, Path::new("<spec>"), FileRefs::Any)
    }

    /// Parses a spec that came over the network (`unsee serve`'s `/v1/audit`): like [`Spec::parse_inline`], but a
    /// `templates` or `preserve_file` that names a file is an error — a request never reads the server's files.
    pub fn parse_remote(text: &str) -> Result<Self> {
        Self::parse_from(text, Path::new("<spec>"), FileRefs::Refused)
    }

    fn parse_from(text: &str, path: &Path, files: FileRefs) -> Result<Self> {
        let src = Src { text, file: path };
        let raw: RawSpec = toml::from_str(text)
            .map_err(|e| invalid(format!("{}: {}", path.display(), e.to_string().trim())))?;
        let resolve = |file: &str| match files {
            FileRefs::Inside(base_dir) => inside(base_dir, file),
            FileRefs::Any => Ok(PathBuf::from(file)),
            FileRefs::Refused => Err(format!("{file:?}: a spec sent in a request cannot name files")),
        };

        let method: Method = src.at(raw.method.span(), raw.method.get_ref().parse())?;
        if raw.erase.is_empty() {
            return src.err(raw.method.span(), "no [[erase]] entries: name at least one concept");
        }
        let mut erase = Vec::new();
        for e in &raw.erase {
            let item = EraseItem::new(e.concept.get_ref(), e.replace_with.as_ref().map(|r| r.get_ref().as_str()).unwrap_or(""));
            src.at(e.concept.span(), check_item(&item))?;
            erase.push(item);
        }
        let mut spec = Spec::new(method, erase)?;

        if let Some(t) = &raw.targets {
            src.at(t.span(), check_targets(method, t.get_ref()))?;
            spec.targets = t.get_ref().clone();
        }
        if let Some(t) = &raw.token_mode {
            let mode = match t.get_ref().as_str() {
                "last" => TokenMode::Last,
                "tail" => TokenMode::Tail,
                other if method != Method::Time => return src.err(t.span(), format!("token_mode {other:?} (last or tail)")),
                _ => TokenMode::Last,
            };
            src.at(t.span(), check_token_mode(method, mode))?;
            spec.token_mode = mode;
        }
        for (field, value) in [
            (&mut spec.lambda, (&raw.lambda, "lambda")),
            (&mut spec.erase_scale, (&raw.erase_scale, "erase_scale")),
            (&mut spec.preserve_scale, (&raw.preserve_scale, "preserve_scale")),
            (&mut spec.lambda_reg, (&raw.lambda_reg, "lambda_reg")),
            (&mut spec.retain_scale, (&raw.retain_scale, "retain_scale")),
            (&mut spec.null_threshold, (&raw.null_threshold, "null_threshold")),
        ] {
            if let Some(x) = src.param(value.0, value.1)? {
                *field = x;
            }
        }
        if let Some(r) = &raw.rounds {
            spec.rounds = src.at(r.span(), check_count("rounds", *r.get_ref(), MAX_ROUNDS))?;
        }
        if let Some(r) = &raw.augment {
            spec.augment = src.at(r.span(), check_count("augment", *r.get_ref(), MAX_AUGMENT))?;
        }
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
        if let Some(p) = raw.pin_unconditional {
            spec.pin_unconditional = p;
        }
        if let Some(f) = raw.filter {
            spec.filter = f;
        }
        spec.harden = raw.harden;

        if let Some(t) = &raw.templates {
            (spec.templates, spec.templates_name) = match named_templates(t.get_ref()) {
                Some(named) => named,
                None => {
                    let file = t.get_ref().as_str();
                    let p = src.at(t.span(), resolve(file))?;
                    let text = src.at(t.span(), read_text_file(&p, MAX_SPEC_FILE_BYTES)
                        .map_err(|e| format!("templates file cannot be read: {e}")))?;
                    let lines: Vec<String> =
                        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
                    src.at(t.span(), check_templates(&lines).map_err(|m| format!("{}: {m}", p.display())))?;
                    (lines, file.to_string())
                }
            };
        }

        for p in raw.preserve.iter().flatten() {
            let prompt = p.get_ref().trim().to_string();
            src.at(p.span(), check_preserve(method, &prompt, &spec.erase))?;
            spec.preserve.push(prompt);
        }
        if let Some(f) = &raw.preserve_file {
            let p = src.at(f.span(), resolve(f.get_ref()))?;
            let text = src.at(f.span(), read_text_file(&p, MAX_SPEC_FILE_BYTES)
                .map_err(|e| format!("preserve_file cannot be read: {e}")))?;
            for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                src.at(f.span(), check_preserve(method, l, &spec.erase))?;
                spec.preserve.push(l.to_string());
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// This spec's concepts, replacements, templates, preserve prompts and `[harden]` table with `method` and its
    /// published defaults for everything else.
    pub fn with_method(&self, method: Method) -> Spec {
        Spec { templates: self.templates.clone(), templates_name: self.templates_name.clone(),
               preserve: self.preserve.clone(), erase: self.erase.clone(), harden: self.harden.clone(),
               ..Spec::defaults(method) }
    }

    /// `method`'s published defaults (see `../shared/reference/erasure-methods.md` and README), with no concepts.
    fn defaults(method: Method) -> Spec {
        let (targets, lambda, token_mode, pin_unconditional): (&[&str], f64, TokenMode, bool) = match method {
            Method::Uce => (&["to_k", "to_v"], 0.5, TokenMode::Last, false),
            Method::Time => (&["to_k", "to_v"], 0.1, TokenMode::All, false),
            Method::Speed => (&["to_v"], 0.0, TokenMode::Last, true),
            Method::Rece => (&["to_k", "to_v"], 0.5, TokenMode::Tail, false),
            Method::Erasepro => (&["to_k", "to_v"], 0.0, TokenMode::Last, true),
            Method::EraseproText => (&["fc2"], 0.0, TokenMode::Tail, true),
        };
        Spec {
            method,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            lambda,
            erase_scale: 1.0,
            preserve_scale: if method == Method::Rece { 0.1 } else { 1.0 },
            token_mode,
            pin_unconditional,
            templates: vec!["{}".to_string()],
            templates_name: "none".to_string(),
            preserve: vec![],
            erase: vec![],
            rounds: 2,
            lambda_reg: 0.1,
            retain_scale: 1.0,
            null_threshold: 0.1,
            augment: 10,
            filter: true,
            harden: None,
        }
    }

    /// A spec erasing `erase` with `method` and its published defaults (no templates, no preserve set). Change the
    /// public fields to adjust it ([`with_templates`](Self::with_templates), `preserve`, …); [`super::erase`]
    /// checks the whole spec again with [`validate`](Self::validate).
    pub fn new(method: Method, erase: Vec<EraseItem>) -> Result<Spec> {
        let spec = Spec { erase, ..Spec::defaults(method) };
        spec.validate()?;
        Ok(spec)
    }

    /// The same spec with these templates (each containing `{}`), named `name` (the name selects the held-out
    /// templates `unsee audit` uses: `art`, `object`, anything else = generic).
    pub fn with_templates(mut self, templates: Vec<String>, name: &str) -> Result<Spec> {
        self.templates = templates;
        self.templates_name = name.to_string();
        self.validate()?;
        Ok(self)
    }

    /// Checks a whole spec (as the TOML front end checks each value), for specs built or changed in code.
    pub fn validate(&self) -> Result<()> {
        let check = |r: std::result::Result<(), String>| r.map_err(invalid);
        if self.erase.is_empty() {
            return Err(invalid("no concepts to erase: name at least one"));
        }
        for e in &self.erase {
            check(check_item(e))?;
        }
        check(check_targets(self.method, &self.targets))?;
        check(check_token_mode(self.method, self.token_mode))?;
        for (name, x) in [("lambda", self.lambda), ("erase_scale", self.erase_scale),
                          ("preserve_scale", self.preserve_scale), ("lambda_reg", self.lambda_reg),
                          ("retain_scale", self.retain_scale), ("null_threshold", self.null_threshold)] {
            check(check_param(name, x))?;
        }
        check(check_count("rounds", self.rounds as i64, MAX_ROUNDS).map(|_| ()))?;
        check(check_count("augment", self.augment as i64, MAX_AUGMENT).map(|_| ()))?;
        check(check_templates(&self.templates))?;
        let per_prompt = if self.token_mode == TokenMode::Last { 1 } else { crate::tokenizer::MAX_LENGTH };
        let keys = self.erase.len().saturating_mul(self.templates.len()).saturating_mul(per_prompt);
        if keys > MAX_EDIT_KEYS {
            return Err(invalid(format!(
                "{} concepts × {} templates × {per_prompt} positions = {keys} keys: more than {MAX_EDIT_KEYS}",
                self.erase.len(), self.templates.len()
            )));
        }
        if self.preserve.len().saturating_mul(self.templates.len()) > MAX_PRESERVE_PROMPTS {
            return Err(invalid(format!("more than {MAX_PRESERVE_PROMPTS} preserve prompts × templates")));
        }
        for p in &self.preserve {
            check(check_preserve(self.method, p, &self.erase))?;
        }
        Ok(())
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
