//! The request and response shapes of AUTOMATIC1111's web UI API (`stable-diffusion-webui`,
//! `modules/api/models.py` and `modules/api/api.py`), as far as they map onto unsee: `POST /sdapi/v1/txt2img` and
//! the small read-only endpoints clients call first. Every field is checked by hand so that an error names it;
//! fields unsee does not use are listed back to the client in `info`, never silently dropped.

use serde_json::{Map, Value, json};

use crate::limits::MAX_WIDTH;
use crate::pipeline::{GenerateRequest, MAX_GUIDANCE};
use crate::scheduler::SchedulerKind;

/// Most images one request may ask for (`batch_size` × `n_iter`).
pub const MAX_IMAGES_PER_REQUEST: usize = 16;
/// Most denoising steps a request may ask for (the model's schedule may allow fewer).
pub const MAX_STEPS: i64 = 1000;
/// Longest prompt, in bytes (CLIP reads 77 tokens; this only bounds the tokenizer's work).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
/// AUTOMATIC1111's default `cfg_scale`.
pub const DEFAULT_CFG_SCALE: f64 = 7.0;
/// AUTOMATIC1111's default step count in its UI.
pub const DEFAULT_STEPS: usize = 20;

/// A field that cannot be used: answered with 422 and the field's name.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_string(), message: message.into() }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A checked `txt2img` request.
#[derive(Debug, Clone)]
pub struct Txt2Img {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    /// `None`: `seed` was -1 (or absent), a random one is drawn per request as AUTOMATIC1111 does.
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: SchedulerKind,
    pub batch_size: usize,
    pub n_iter: usize,
    /// `send_images: false` answers without the images (AUTOMATIC1111's meaning).
    pub send_images: bool,
    /// Fields given but not used, in the order given.
    pub ignored: Vec<String>,
}

/// The fields unsee reads from a `txt2img` body.
const USED: [&str; 12] = ["prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height",
    "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter"];

impl Txt2Img {
    /// Parses and checks a JSON body.
    pub fn parse(body: &[u8]) -> Result<Self, FieldError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| FieldError::new("body", format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(FieldError::new("body", "must be a JSON object"));
        };
        Self::from_object(&obj)
    }

    pub fn from_object(obj: &Map<String, Value>) -> Result<Self, FieldError> {
        let prompt = string(obj, "prompt")?.unwrap_or_default();
        let negative_prompt = string(obj, "negative_prompt")?.unwrap_or_default();
        let steps = integer(obj, "steps", 1, MAX_STEPS)?.map(|s| s as usize).unwrap_or(DEFAULT_STEPS);
        let cfg_scale = match obj.get("cfg_scale") {
            None | Some(Value::Null) => DEFAULT_CFG_SCALE,
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| FieldError::new("cfg_scale", "must be a number"))?;
                if !(0.0..=MAX_GUIDANCE).contains(&x) {
                    return Err(FieldError::new("cfg_scale", format!("must be between 0 and {MAX_GUIDANCE} (got {x})")));
                }
                x
            }
        };
        let seed = match integer(obj, "seed", -1, i64::MAX)? {
            None | Some(-1) => None,
            Some(s) => Some(s.max(0) as u64), // `integer` bounds it to -1..
        };
        let size = |name: &str| -> Result<Option<usize>, FieldError> {
            let Some(v) = integer(obj, name, 8, MAX_WIDTH as i64)? else { return Ok(None) };
            if v % 8 != 0 {
                return Err(FieldError::new(name, format!("must be a multiple of 8 (got {v})")));
            }
            Ok(Some(v as usize))
        };
        let (width, height) = (size("width")?, size("height")?);
        let scheduler = sampler(obj)?;
        let max = MAX_IMAGES_PER_REQUEST as i64;
        let batch_size = integer(obj, "batch_size", 1, max)?.unwrap_or(1) as usize;
        let n_iter = integer(obj, "n_iter", 1, max)?.unwrap_or(1) as usize;
        if batch_size * n_iter > MAX_IMAGES_PER_REQUEST {
            return Err(FieldError::new("n_iter", format!(
                "batch_size × n_iter = {} is more than {MAX_IMAGES_PER_REQUEST} images", batch_size * n_iter)));
        }
        let send_images = match obj.get("send_images") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(FieldError::new("send_images", "must be true or false")),
        };
        let ignored = obj.keys().filter(|k| !USED.contains(&k.as_str()) && *k != "send_images").cloned().collect();
        Ok(Self { prompt, negative_prompt, steps, cfg_scale, seed, width, height, scheduler, batch_size, n_iter,
                  send_images, ignored })
    }

    /// Number of images.
    pub fn count(&self) -> usize {
        self.batch_size * self.n_iter
    }

    /// The request for image `index` (seed + index, as AUTOMATIC1111 numbers a batch's seeds).
    pub fn request(&self, seed: u64, index: usize) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.cfg_scale,
            seed: seed.wrapping_add(index as u64),
            width: self.width,
            height: self.height,
            scheduler: self.scheduler,
        }
    }

    /// The request as AUTOMATIC1111 echoes it in `parameters`: what was sent, with the values used filled in.
    pub fn parameters(&self, sent: &Map<String, Value>, seed: u64, size: (usize, usize)) -> Value {
        let mut p = sent.clone();
        for (k, v) in [
            ("prompt", json!(self.prompt)),
            ("negative_prompt", json!(self.negative_prompt)),
            ("steps", json!(self.steps)),
            ("cfg_scale", json!(self.cfg_scale)),
            ("seed", json!(seed)),
            ("width", json!(size.0)),
            ("height", json!(size.1)),
            ("sampler_name", json!(self.scheduler.a1111_name())),
            ("batch_size", json!(self.batch_size)),
            ("n_iter", json!(self.n_iter)),
        ] {
            p.insert(k.to_string(), v);
        }
        Value::Object(p)
    }
}

fn string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, FieldError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() > MAX_PROMPT_BYTES => {
            Err(FieldError::new(name, format!("is longer than {MAX_PROMPT_BYTES} bytes")))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FieldError::new(name, "must be a string")),
    }
}

/// An integer in `min..=max`; a number with no fractional part (`20.0`) counts, as pydantic coerces it.
fn integer(obj: &Map<String, Value>, name: &str, min: i64, max: i64) -> Result<Option<i64>, FieldError> {
    let v = match obj.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let n = match (v.as_i64(), v.as_f64()) {
        (Some(n), _) => n,
        (None, Some(x)) if x.fract() == 0.0 && x.abs() < 9.0e15 => x as i64,
        _ => return Err(FieldError::new(name, format!("must be an integer (got {v})"))),
    };
    if n < min || n > max {
        return Err(FieldError::new(name, format!("must be between {min} and {max} (got {n})")));
    }
    Ok(Some(n))
}

/// `sampler_name` (or the older `sampler_index`) plus the separate `scheduler` of AUTOMATIC1111 ≥ 1.9
/// ("Automatic" or "Karras"). Names are matched without regard to case; unsee's own names work too.
fn sampler(obj: &Map<String, Value>) -> Result<SchedulerKind, FieldError> {
    let (field, name) = match (string(obj, "sampler_name")?, string(obj, "sampler_index")?) {
        (Some(n), _) => ("sampler_name", n),
        (None, Some(n)) => ("sampler_index", n),
        (None, None) => ("sampler_name", SchedulerKind::Ddim.a1111_name().to_string()),
    };
    let available = || SchedulerKind::ALL.iter().map(|k| k.a1111_name()).collect::<Vec<_>>().join(", ");
    let kind = SchedulerKind::ALL
        .into_iter()
        .find(|k| k.a1111_name().eq_ignore_ascii_case(name.trim()) || k.name() == name.trim())
        .ok_or_else(|| FieldError::new(field, format!("{name:?} is not available here (available: {})", available())))?;
    match string(obj, "scheduler")?.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("automatic") | Some("") => Ok(kind),
        Some("karras") => match kind {
            SchedulerKind::DpmSolverPP2M { .. } => Ok(SchedulerKind::DpmSolverPP2M { karras: true }),
            _ => Err(FieldError::new("scheduler", format!("Karras sigmas are only available with DPM++ 2M (not {name:?})"))),
        },
        Some(other) => Err(FieldError::new("scheduler", format!("{other:?} is not available here (Automatic or Karras)"))),
    }
}

/// `GET /sdapi/v1/samplers`.
pub fn samplers() -> Value {
    Value::Array(
        SchedulerKind::ALL
            .iter()
            .map(|k| json!({"name": k.a1111_name(), "aliases": [k.name()], "options": {}}))
            .collect(),
    )
}

/// `GET /sdapi/v1/schedulers`.
pub fn schedulers() -> Value {
    json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false},
    ])
}

/// AUTOMATIC1111's one-line summary of a generation (its "infotext"), for `info.infotexts`.
pub fn infotext(t: &Txt2Img, seed: u64, size: (usize, usize), model: &str) -> String {
    let mut s = t.prompt.clone();
    if !t.negative_prompt.is_empty() {
        s.push_str(&format!("\nNegative prompt: {}", t.negative_prompt));
    }
    s.push_str(&format!("\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
                        t.steps, t.scheduler.a1111_name(), t.cfg_scale, size.0, size.1));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Txt2Img, FieldError> {
        Txt2Img::parse(s.as_bytes())
    }

    #[test]
    fn defaults_and_fields() {
        let t = parse(r#"{"prompt": "a red circle"}"#).unwrap();
        assert_eq!((t.steps, t.cfg_scale, t.seed, t.count()), (DEFAULT_STEPS, DEFAULT_CFG_SCALE, None, 1));
        assert_eq!(t.scheduler, SchedulerKind::Ddim);
        let t = parse(r#"{"prompt": "x", "steps": 30.0, "seed": 7, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                          "batch_size": 2, "n_iter": 3, "width": 64, "height": 32, "restore_faces": false, "foo": 1}"#)
            .unwrap();
        assert_eq!((t.steps, t.seed, t.count(), t.width, t.height), (30, Some(7), 6, Some(64), Some(32)));
        assert_eq!(t.scheduler, SchedulerKind::DpmSolverPP2M { karras: true });
        assert_eq!(t.ignored, vec!["foo".to_string(), "restore_faces".to_string()]);
        assert_eq!(t.request(7, 2).seed, 9);
        assert_eq!(parse(r#"{"sampler_index": "euler a"}"#).unwrap().scheduler, SchedulerKind::EulerAncestral);
        assert_eq!(parse(r#"{"sampler_name": "dpmpp-2m-karras"}"#).unwrap().scheduler,
                   SchedulerKind::DpmSolverPP2M { karras: true });
    }

    #[test]
    fn each_bad_field_is_named() {
        for (body, field) in [
            (r#"[1]"#, "body"),
            (r#"{"prompt": 3}"#, "prompt"),
            (r#"{"steps": 0}"#, "steps"),
            (r#"{"steps": 2.5}"#, "steps"),
            (r#"{"steps": "20"}"#, "steps"),
            (r#"{"cfg_scale": 1e300}"#, "cfg_scale"),
            (r#"{"cfg_scale": -1}"#, "cfg_scale"),
            (r#"{"seed": -2}"#, "seed"),
            (r#"{"width": 100}"#, "width"),
            (r#"{"height": 1000000}"#, "height"),
            (r#"{"sampler_name": "Euler"}"#, "sampler_name"),
            (r#"{"sampler_name": "DDIM", "scheduler": "Karras"}"#, "scheduler"),
            (r#"{"scheduler": "Exponential"}"#, "scheduler"),
            (r#"{"batch_size": 17}"#, "batch_size"),
            (r#"{"batch_size": 4, "n_iter": 5}"#, "n_iter"),
            (r#"{"send_images": "yes"}"#, "send_images"),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let long = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(MAX_PROMPT_BYTES + 1));
        assert_eq!(parse(&long).unwrap_err().field, "prompt");
    }
}
