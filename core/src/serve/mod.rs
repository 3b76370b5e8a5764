//! `unsee serve`: one [`Engine`] behind a local web page and an AUTOMATIC1111-compatible HTTP API.
//!
//! The engine lives on one worker thread; requests reach it through a bounded queue (a full queue answers 503),
//! so the web page, API clients and audits take turns on the one model. Progress is published after every
//! denoising step to `GET /sdapi/v1/progress` (polled, AUTOMATIC1111's shape) and to `GET /v1/events`
//! (server-sent events, what the page listens to); `POST /sdapi/v1/interrupt` stops the running job inside its
//! current step. Nothing here decides what may be generated: the engine does, as for every other front end.

pub mod a1111;
mod page;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::{AppliedErasure, Engine};
use crate::erase::audit::AuditReport;
use crate::erase::spec::Spec;
use crate::error::{Error, Result};
use crate::pipeline::{Control, GenerateRequest, Inputs, Target, encode_png};
use a1111::{FieldError, Txt2Img};

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Requests that may wait behind the running one; one more answers 503.
    pub queue: usize,
    /// Largest request body in bytes; a larger one answers 413.
    pub max_body_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { queue: 8, max_body_bytes: 1 << 20 }
    }
}

/// What the page and `/v1/erasures` show about the guard.
#[derive(Debug, Clone, serde::Serialize)]
struct Guard {
    model: String,
    model_path: String,
    /// The replacement text encoder's weight file, when one is loaded.
    text_encoder: Option<PathBuf>,
    erasures: Vec<AppliedErasure>,
    native_size: (usize, usize),
    /// A base model (no erasures, its own text encoder) is loaded alongside for before/after views.
    compare: bool,
    /// The engine is guarded: a signed bundle, checked against the trusted key (its key id in `signer`).
    guarded: bool,
    signer: Option<String>,
}

/// The job the worker runs now.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Progress {
    /// Job id (0: none has run).
    job: u64,
    busy: bool,
    kind: &'static str,
    /// Image being made (0-based) and how many the job makes.
    image: usize,
    images: usize,
    step: usize,
    steps: usize,
    interrupted: bool,
    #[serde(skip)]
    started: Option<Instant>,
    /// When the job started, in UTC, formatted as AUTOMATIC1111's `job_timestamp` (YYYYmmddHHMMSS).
    job_timestamp: String,
}

impl Progress {
    /// Fraction done over all images of the job.
    fn fraction(&self) -> f64 {
        if !self.busy || self.images == 0 || self.steps == 0 {
            return 0.0;
        }
        (self.image as f64 + self.step as f64 / self.steps as f64) / self.images as f64
    }
}

enum Work {
    Txt2Img { req: Txt2Img, seed: u64 },
    Compare { req: GenerateRequest },
    Audit(Box<Spec>),
}

enum Outcome {
    Images { pngs: Vec<Vec<u8>>, size: (usize, usize), interrupted: bool, seconds: f64 },
    Compare { guarded: Vec<u8>, base: Vec<u8>, size: (usize, usize) },
    Audit(Box<AuditReport>),
}

struct Job {
    id: u64,
    work: Work,
    reply: oneshot::Sender<Result<Outcome>>,
}

struct Shared {
    jobs: mpsc::Sender<Job>,
    next_id: AtomicU64,
    progress: Mutex<Progress>,
    events: broadcast::Sender<String>,
    interrupt: Arc<AtomicBool>,
    guard: Guard,
    max_body_bytes: usize,
}

type App = Arc<Shared>;

/// Sent on the event channel when the server stops: every `/v1/events` stream ends on it.
const CLOSING: &str = "closing";

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Blocks until the server stops (it runs until the process ends or [`Running::stop`]).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Stops accepting connections, lets the open ones finish, and waits.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => Err(Error::Internal(format!("server: {e}"))),
            Some(Err(_)) => Err(Error::Internal("the server thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// Binds `addr` (port 0: any free port, see [`Running::addr`]) and serves `engine` — and `base`, the same model
/// without erasures, for the page's before/after view — on background threads.
pub fn start(engine: Engine, base: Option<Engine>, addr: SocketAddr, opts: &ServeOptions) -> Result<Running> {
    if opts.queue == 0 || opts.max_body_bytes == 0 {
        return Err(Error::InvalidRequest("the queue length and the body limit must be at least 1".into()));
    }
    let listener = std::net::TcpListener::bind(addr).map_err(|e| Error::io(addr.to_string(), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io(addr.to_string(), e))?;
    listener.set_nonblocking(true).map_err(|e| Error::io(addr.to_string(), e))?;

    let info = engine.info()?;
    let sd = engine.model();
    let req = GenerateRequest::default();
    let guard = Guard {
        model: model_name(&sd.location),
        model_path: location_path(&sd.location).display().to_string(),
        // a text encoder from outside the model's own files was loaded in place of the model's
        text_encoder: info.files.get("text_encoder").map(|f| f.file.clone())
            .filter(|f| !f.starts_with(location_path(&sd.location))),
        erasures: info.erasures,
        native_size: sd.image_size(&req)?,
        compare: base.is_some(),
        guarded: info.guarded,
        signer: info.signer.clone(),
    };
    if info.guarded && base.is_some() {
        return Err(Error::GuardViolation("a guarded engine is not served beside an unguarded base model".into()));
    }

    let (jobs, queue) = mpsc::channel(opts.queue);
    let (events, _) = broadcast::channel(256);
    let app: App = Arc::new(Shared {
        jobs,
        next_id: AtomicU64::new(1),
        progress: Mutex::new(Progress::default()),
        events,
        interrupt: Arc::new(AtomicBool::new(false)),
        guard,
        max_body_bytes: opts.max_body_bytes,
    });
    let worker_app = app.clone();
    std::thread::Builder::new()
        .name("unsee-engine".into())
        .spawn(move || worker(engine, base, queue, worker_app))
        .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;

    let (shutdown, stopped) = oneshot::channel::<()>();
    let events = app.events.clone();
    let router = router(app);
    let thread = std::thread::Builder::new()
        .name("unsee-http".into())
        .spawn(move || -> std::io::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                        // end the open event streams, which graceful shutdown would otherwise wait for forever
                        let _ = events.send(CLOSING.to_string());
                    })
                    .await
            })
        })
        .map_err(|e| Error::Internal(format!("cannot start the server thread: {e}")))?;
    Ok(Running { addr, shutdown: Some(shutdown), thread: Some(thread) })
}

fn location_path(loc: &crate::model::ModelLocation) -> &std::path::Path {
    match loc {
        crate::model::ModelLocation::Folder(p) => p,
        crate::model::ModelLocation::SingleFile { file, .. } => file,
    }
}

fn model_name(loc: &crate::model::ModelLocation) -> String {
    let p = location_path(loc);
    let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

fn router(app: App) -> Router {
    let limit = app.max_body_bytes;
    Router::new()
        .route("/", get(|| async { page::asset("index.html") }))
        .route("/app.js", get(|| async { page::asset("app.js") }))
        .route("/style.css", get(|| async { page::asset("style.css") }))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(|| async { axum::Json(a1111::samplers()) }))
        .route("/sdapi/v1/schedulers", get(|| async { axum::Json(a1111::schedulers()) }))
        .route("/sdapi/v1/options", get(options))
        .route("/v1/erasures", get(erasures))
        .route("/v1/events", get(events))
        .route("/v1/compare", post(compare))
        .route("/v1/audit", post(audit))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "path", "no such endpoint") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// An error answer: `{"error": …, "detail": [{"loc": ["body", field], "msg": …}]}` (FastAPI's 422 shape, which
/// AUTOMATIC1111 clients know).
fn error(status: StatusCode, field: &str, message: impl std::fmt::Display) -> Response {
    let message = message.to_string();
    (status, axum::Json(json!({
        "error": format!("{field}: {message}"),
        "detail": [{"loc": ["body", field], "msg": message, "type": "value_error"}],
    }))).into_response()
}

fn field_error(e: FieldError) -> Response {
    error(StatusCode::UNPROCESSABLE_ENTITY, &e.field, e.message)
}

fn engine_error(e: Error) -> Response {
    match e {
        Error::InvalidRequest(m) => error(StatusCode::UNPROCESSABLE_ENTITY, "request", m),
        Error::InvalidSpec(m) => error(StatusCode::UNPROCESSABLE_ENTITY, "spec", m),
        Error::Tokenizer(m) => error(StatusCode::UNPROCESSABLE_ENTITY, "prompt", m),
        Error::Cancelled => error(StatusCode::CONFLICT, "job", "interrupted"),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, "engine", other),
    }
}

impl Shared {
    /// Queues `work`; 503 when the queue is full, and the answer once the worker has run it.
    async fn run(&self, work: Work) -> std::result::Result<Outcome, Response> {
        let (reply, answer) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(Job { id, work, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, "queue", "the queue is full: try again later"));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, "engine", "the engine has stopped"));
            }
        }
        match answer.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(engine_error(e)),
            Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "engine", "the engine stopped during the job")),
        }
    }

    fn progress(&self) -> Progress {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn set_progress(&self, f: impl FnOnce(&mut Progress)) {
        let snapshot = match self.progress.lock() {
            Ok(mut p) => {
                f(&mut p);
                p.clone()
            }
            Err(_) => return,
        };
        // No subscriber is fine: the page may not be open.
        let _ = self.events.send(serde_json::to_string(&snapshot).unwrap_or_default());
    }
}

fn b64(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}

async fn txt2img(State(app): State<App>, body: Bytes) -> Response {
    let obj = match parse_object(&body) {
        Ok(o) => o,
        Err(e) => return field_error(e),
    };
    let req = match Txt2Img::from_object(&obj) {
        Ok(r) => r,
        Err(e) => return field_error(e),
    };
    let seed = req.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let outcome = app.run(Work::Txt2Img { req: req.clone(), seed }).await;
    let (pngs, size, interrupted, seconds) = match outcome {
        Ok(Outcome::Images { pngs, size, interrupted, seconds }) => (pngs, size, interrupted, seconds),
        Ok(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "engine", "unexpected answer"),
        Err(r) => return r,
    };
    let g = &app.guard;
    let seeds: Vec<u64> = (0..pngs.len()).map(|i| seed.wrapping_add(i as u64)).collect();
    let infotexts: Vec<String> = seeds.iter().map(|&s| a1111::infotext(&req, s, size, &g.model)).collect();
    let info = json!({
        "prompt": req.prompt,
        "all_prompts": vec![&req.prompt; pngs.len()],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": vec![&req.negative_prompt; pngs.len()],
        "seed": seed,
        "all_seeds": seeds,
        "subseed": seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": size.0,
        "height": size.1,
        "sampler_name": req.scheduler.a1111_name(),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": false,
        "sd_model_name": g.model,
        "sd_model_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": 0,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": app.progress().job_timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": concat!("unsee ", env!("CARGO_PKG_VERSION")),
        "unsee": {
            "scheduler": req.scheduler.name(),
            "interrupted": interrupted,
            "images_requested": req.count(),
            "seconds": seconds,
            "erasures": g.erasures,
            "ignored_fields": req.ignored,
            "note": if req.ignored.is_empty() { String::new() } else {
                format!("ignored (not used by unsee): {}", req.ignored.join(", "))
            },
        },
    });
    let images: Vec<String> = if req.send_images { pngs.iter().map(|p| b64(p)).collect() } else { vec![] };
    axum::Json(json!({
        "images": images,
        "parameters": req.parameters(&obj, seed, size),
        "info": info.to_string(),
    }))
    .into_response()
}

fn parse_object(body: &[u8]) -> std::result::Result<serde_json::Map<String, Value>, FieldError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(FieldError { field: "body".into(), message: "must be a JSON object".into() }),
        Err(e) => Err(FieldError { field: "body".into(), message: format!("not valid JSON: {e}") }),
    }
}

async fn compare(State(app): State<App>, body: Bytes) -> Response {
    if !app.guard.compare {
        return error(StatusCode::NOT_FOUND, "compare",
                     "no base model is loaded alongside (start the server with --compare-base)");
    }
    let req = match parse_object(&body).and_then(|o| Txt2Img::from_object(&o)) {
        Ok(r) => r,
        Err(e) => return field_error(e),
    };
    if req.count() != 1 {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "batch_size", "a comparison makes one image per model");
    }
    let seed = req.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    match app.run(Work::Compare { req: req.request(seed, 0) }).await {
        Ok(Outcome::Compare { guarded, base, size }) => axum::Json(json!({
            "guarded": b64(&guarded),
            "base": b64(&base),
            "seed": seed,
            "width": size.0,
            "height": size.1,
        }))
        .into_response(),
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "engine", "unexpected answer"),
        Err(r) => r,
    }
}

/// `POST /v1/audit`: the body is a spec in TOML, or `{"spec": "<TOML>"}`. Specs from requests cannot name files.
async fn audit(State(app): State<App>, body: Bytes) -> Response {
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => return error(StatusCode::UNPROCESSABLE_ENTITY, "spec", "the body is not UTF-8"),
    };
    let toml_text = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => match o.get("spec") {
            Some(Value::String(s)) => s.clone(),
            _ => return error(StatusCode::UNPROCESSABLE_ENTITY, "spec", "a JSON body needs \"spec\": a TOML string"),
        },
        _ => text.to_string(),
    };
    let spec = match Spec::parse_remote(&toml_text) {
        Ok(s) => s,
        Err(e) => return engine_error(e),
    };
    match app.run(Work::Audit(Box::new(spec))).await {
        Ok(Outcome::Audit(report)) => {
            let table = report.table();
            axum::Json(json!({"report": report, "table": table})).into_response()
        }
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "engine", "unexpected answer"),
        Err(r) => r,
    }
}

async fn progress(State(app): State<App>) -> Response {
    let p = app.progress();
    let fraction = p.fraction();
    let elapsed = p.started.filter(|_| p.busy).map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
    let eta = if fraction > 0.0 { elapsed / fraction - elapsed } else { 0.0 };
    axum::Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": p.interrupted,
            "job": if p.busy { format!("job {}", p.job) } else { String::new() },
            "job_count": usize::from(p.busy),
            "job_timestamp": p.job_timestamp,
            "job_no": p.image,
            "sampling_step": p.step,
            "sampling_steps": p.steps,
        },
        "current_image": null,
        "textinfo": null,
        "unsee": {"queued": app.jobs.max_capacity() - app.jobs.capacity(), "kind": p.kind},
    }))
    .into_response()
}

async fn interrupt(State(app): State<App>) -> Response {
    if app.progress().busy {
        app.interrupt.store(true, Ordering::SeqCst);
    }
    axum::Json(json!({})).into_response()
}

async fn sd_models(State(app): State<App>) -> Response {
    let g = &app.guard;
    axum::Json(json!([{
        "title": g.model,
        "model_name": g.model,
        "hash": null,
        "sha256": null,
        "filename": g.model_path,
        "config": null,
    }]))
    .into_response()
}

async fn options(State(app): State<App>) -> Response {
    axum::Json(json!({"sd_model_checkpoint": app.guard.model, "samples_format": "png"})).into_response()
}

async fn erasures(State(app): State<App>) -> Response {
    axum::Json(&app.guard).into_response()
}

/// Server-sent events: one `progress` event (the [`Progress`] JSON) per step and per change of job.
async fn events(State(app): State<App>) -> impl IntoResponse {
    let first = serde_json::to_string(&app.progress()).unwrap_or_default();
    let rx = app.events.subscribe();
    let stream = futures_util::stream::unfold((Some(first), rx), |(first, mut rx)| async move {
        if let Some(f) = first {
            return Some((Ok::<_, std::convert::Infallible>(Event::default().event("progress").data(f)), (None, rx)));
        }
        loop {
            match rx.recv().await {
                Ok(s) if s == CLOSING => return None,
                Ok(s) => return Some((Ok(Event::default().event("progress").data(s)), (None, rx))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    ([(header::CACHE_CONTROL, "no-store")], Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The engine thread: runs one job at a time. A panic inside a job answers that job with an internal error and
/// the server goes on.
fn worker(engine: Engine, base: Option<Engine>, mut queue: mpsc::Receiver<Job>, app: App) {
    while let Some(job) = queue.blocking_recv() {
        app.interrupt.store(false, Ordering::SeqCst);
        let kind = match &job.work {
            Work::Txt2Img { .. } => "txt2img",
            Work::Compare { .. } => "compare",
            Work::Audit(_) => "audit",
        };
        let images = match &job.work {
            Work::Txt2Img { req, .. } => req.count(),
            Work::Compare { .. } => 2,
            Work::Audit(_) => 0,
        };
        app.set_progress(|p| {
            *p = Progress {
                job: job.id,
                busy: true,
                kind,
                images,
                started: Some(Instant::now()),
                job_timestamp: timestamp(),
                ..Default::default()
            }
        });
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(&engine, base.as_ref(), job.work, &app)))
            .unwrap_or_else(|_| Err(Error::Internal("the job panicked".into())));
        let interrupted = matches!(result, Ok(Outcome::Images { interrupted: true, .. }) | Err(Error::Cancelled));
        app.set_progress(|p| {
            p.busy = false;
            p.interrupted = interrupted;
        });
        // The client may have gone away; its answer is then dropped.
        let _ = job.reply.send(result);
    }
}

fn run_job(engine: &Engine, base: Option<&Engine>, work: Work, app: &Shared) -> Result<Outcome> {
    let cancelled = || app.interrupt.load(Ordering::SeqCst);
    let make = |engine: &Engine, req: &GenerateRequest, image: usize| -> Result<(Vec<u8>, (usize, usize))> {
        app.set_progress(|p| {
            p.image = image;
            p.step = 0;
            p.steps = req.steps;
        });
        let inputs = Inputs { cancelled: Some(&cancelled), ..Default::default() };
        let out = engine.generate(req, inputs, &mut |ev| {
            app.set_progress(|p| {
                p.step = ev.step;
                p.steps = ev.total;
            });
            if cancelled() { Control::Cancel } else { Control::Continue }
        }, Target::Rgba)?;
        Ok((encode_png(out.width, out.height, &out.rgba)?, (out.width, out.height)))
    };
    match work {
        Work::Txt2Img { req, seed } => {
            let started = Instant::now();
            let mut pngs = vec![];
            let mut size = app.guard.native_size;
            let mut interrupted = false;
            for i in 0..req.count() {
                match make(engine, &req.request(seed, i), i) {
                    Ok((p, s)) => {
                        pngs.push(p);
                        size = s;
                    }
                    Err(Error::Cancelled) => {
                        interrupted = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Outcome::Images { pngs, size, interrupted, seconds: started.elapsed().as_secs_f64() })
        }
        Work::Compare { req } => {
            let base = base.ok_or_else(|| Error::Internal("no base model".into()))?;
            let (guarded, size) = make(engine, &req, 0)?;
            let (base, _) = make(base, &req, 1)?;
            Ok(Outcome::Compare { guarded, base, size })
        }
        Work::Audit(spec) => Ok(Outcome::Audit(Box::new(engine.audit(&spec)?))),
    }
}

/// UTC `YYYYmmddHHMMSS`, AUTOMATIC1111's `job_timestamp` format.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_format() {
        let t = super::timestamp();
        assert_eq!(t.len(), 14);
        assert!(t.starts_with("20"));
    }
}
