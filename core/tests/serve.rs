//! `unsee serve` on an ephemeral loopback port: the AUTOMATIC1111-compatible API round trip on the shapes model
//! (the image is the engine's own, and the oracle sees the guard hold), progress, interrupt, the bounded queue,
//! named field errors, the body limit, the remote-spec rule, the before/after view, and an unchanged AUTOMATIC1111
//! client script.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use common::http::{get, post, request};
use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::erase::spec::Spec;
use unsee::pipeline::{Control, GenerateRequest, Target};
use unsee::scheduler::SchedulerKind;
use unsee::serve::{Running, ServeOptions, start};
use unsee::shapes::{Shape, analyse};

fn engine(erasures: Vec<PathBuf>) -> Engine {
    Engine::open(&EngineOptions { device: DeviceChoice::Cpu, erasures, ..Default::default() }).unwrap()
}

fn serve(engine: Engine, base: Option<Engine>, opts: ServeOptions) -> Running {
    start(engine, base, "127.0.0.1:0".parse().unwrap(), &opts).unwrap()
}

fn png_rgba(b64: &Value) -> (Vec<u8>, u32, u32) {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgba8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w, h)
}

fn shapes(rgba: &[u8], w: u32, h: u32) -> Vec<Shape> {
    analyse(rgba, w as usize, h as usize, 4).iter().map(|d| d.shape).collect()
}

fn circle_erasure(dir: &str) -> PathBuf {
    let dir = common::tmp_dir("serve", dir);
    let file = dir.join("no-circles.safetensors");
    let spec = Spec::from_file(&common::repo().join("models/specs/shapes-circle.toml")).unwrap();
    engine(vec![]).erase(&spec, Some(&file)).unwrap();
    file
}

/// The API's image is the engine's image for the same request, the erasure holds on it (the oracle sees no
/// circle where the base model draws one), the concept panel's endpoint lists the erasure, and the read-only
/// endpoints answer in AUTOMATIC1111's shapes.
#[test]
fn txt2img_is_the_engines_image_and_the_guard_holds() {
    let file = circle_erasure("round-trip");
    let guarded = engine(vec![file.clone()]);
    let prompt = "an image of a red circle";
    let req = GenerateRequest { prompt: prompt.into(), steps: 20, guidance: 4.0, seed: 5, ..Default::default() };
    let direct = guarded.generate(&req, Default::default(), &mut |_| Control::Continue, Target::Rgba).unwrap();
    let server = serve(guarded, Some(engine(vec![])), ServeOptions::default());
    let addr = server.addr;

    let r = post(addr, "/sdapi/v1/txt2img", &json!({
        "prompt": prompt, "steps": 20, "cfg_scale": 4, "seed": 5, "sampler_name": "DDIM", "batch_size": 2,
        "restore_faces": false, "override_settings": {}}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let (rgba, w, h) = png_rgba(&images[0]);
    assert_eq!((w as usize, h as usize), (direct.width, direct.height));
    assert_eq!(rgba, direct.rgba, "the API's image differs from the engine's");
    for img in images {
        let (rgba, w, h) = png_rgba(img);
        let found = shapes(&rgba, w, h);
        assert!(!found.is_empty() && !found.contains(&Shape::Circle), "the guarded model drew {found:?}");
    }
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([5, 6]));
    assert_eq!(info["sampler_name"], "DDIM");
    assert_eq!(info["width"], json!(w));
    assert_eq!(info["unsee"]["ignored_fields"], json!(["override_settings", "restore_faces"]));
    assert!(info["unsee"]["note"].as_str().unwrap().contains("restore_faces"));
    assert!(info["infotexts"][1].as_str().unwrap().contains("Seed: 6"));
    assert_eq!(v["parameters"]["seed"], 5);

    // seed -1 draws one and reports it
    let r = post(addr, "/sdapi/v1/txt2img", &json!({"prompt": prompt, "steps": 2, "seed": -1, "send_images": false}));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["images"], json!([]));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert!(info["seed"].as_u64().is_some());

    // before/after: the base model draws the circle the guarded one does not
    let r = post(addr, "/v1/compare", &json!({"prompt": prompt, "steps": 20, "cfg_scale": 4, "seed": 5}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let (g, w, h) = png_rgba(&v["guarded"]);
    assert_eq!(g, direct.rgba);
    let (b, w2, h2) = png_rgba(&v["base"]);
    assert!(shapes(&b, w2, h2).contains(&Shape::Circle), "the base model drew {:?}", shapes(&b, w2, h2));
    assert!(!shapes(&g, w, h).contains(&Shape::Circle));

    let e = get(addr, "/v1/erasures").json();
    assert_eq!(e["model"], "shapes-sd");
    assert_eq!(e["compare"], true);
    assert_eq!(e["erasures"][0]["method"], "uce");
    assert_eq!(e["erasures"][0]["concepts"][0], "red circle");
    assert_eq!(e["erasures"][0]["replacements"][0], "red square");
    assert!(e["erasures"][0]["source"].as_str().unwrap().ends_with("no-circles.safetensors"));

    let samplers = get(addr, "/sdapi/v1/samplers").json();
    let names: Vec<&str> = samplers.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["DDIM", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM"]);
    assert_eq!(get(addr, "/sdapi/v1/sd-models").json()[0]["model_name"], "shapes-sd");
    assert_eq!(get(addr, "/sdapi/v1/options").json()["sd_model_checkpoint"], "shapes-sd");
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("Concept filter"));
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'self'"));
    assert_eq!(get(addr, "/app.js").status, 200);
    assert_eq!(get(addr, "/nowhere").status, 404);
    server.stop().unwrap();
}

/// A signed bundle served by a guarded engine: the page's endpoint says it is guarded and lists the baked erasure,
/// txt2img draws no circle, and an unguarded base model beside it is refused.
#[test]
fn a_guarded_bundle_is_served() {
    let file = circle_erasure("bundle");
    let dir = common::tmp_dir("serve", "bundle-out");
    let (key, public) = unsee::bundle::keygen(&dir.join("k"), None).unwrap();
    let bundle = dir.join("bundle");
    let opts = unsee::bundle::BuildOptions { quant: unsee::quant::Quant::Int8, sign: Some((key, None)),
                                             creator: "serve test".into() };
    engine(vec![file]).build_bundle(&opts, &bundle, &mut |_, _, _| {}).unwrap();
    let open = || Engine::open(&EngineOptions {
        model: bundle.clone(), device: DeviceChoice::Cpu,
        guard: Some(unsee::engine::Guard { trusted_keys: vec![std::fs::read_to_string(&public).unwrap()],
                                           required_concepts: vec!["red circle".into()] }),
        ..Default::default()
    }).unwrap();
    match start(open(), Some(engine(vec![])), "127.0.0.1:0".parse().unwrap(), &ServeOptions::default()) {
        Err(unsee::Error::GuardViolation(_)) => {}
        other => panic!("expected a guard violation, got {:?}", other.map(|_| ())),
    }
    let server = serve(open(), None, ServeOptions::default());
    let e = get(server.addr, "/v1/erasures").json();
    assert_eq!(e["guarded"], true);
    assert!(e["signer"].as_str().is_some());
    assert_eq!(e["erasures"][0]["baked"], true);
    assert_eq!(e["erasures"][0]["concepts"][0], "red circle");
    let r = post(server.addr, "/sdapi/v1/txt2img", &json!({"prompt": "an image of a red circle", "steps": 20,
                                                           "cfg_scale": 4, "seed": 5, "sampler_name": "DDIM"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (rgba, w, h) = png_rgba(&r.json()["images"][0]);
    let found = shapes(&rgba, w, h);
    assert!(!found.is_empty() && !found.contains(&Shape::Circle), "the guarded bundle drew {found:?}");
    server.stop().unwrap();
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A long job reports progress (polled and as server-sent events), a second request waits in the queue (length
/// 1), a third is answered 503, interrupt stops the long job inside its run, and the queued one then runs.
#[test]
fn progress_interrupt_and_a_bounded_queue() {
    let server = serve(engine(vec![]), None, ServeOptions { queue: 1, ..Default::default() });
    let addr = server.addr;
    let long = std::thread::spawn(move || {
        post(addr, "/sdapi/v1/txt2img", &json!({"prompt": "a red star", "steps": 500, "sampler_name": "DDIM"}))
    });
    wait_for("progress", || get(addr, "/sdapi/v1/progress").json()["state"]["sampling_step"].as_u64() >= Some(2));
    let p = get(addr, "/sdapi/v1/progress").json();
    assert_eq!(p["state"]["sampling_steps"], 500);
    assert!(p["progress"].as_f64().unwrap() > 0.0 && p["progress"].as_f64().unwrap() < 1.0);
    assert_eq!(p["state"]["job_count"], 1);

    // server-sent events: a progress event of the running job
    let mut events = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{BufRead, Write};
    events.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
    events.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut lines = std::io::BufReader::new(events).lines();
    let mut saw = false;
    for _ in 0..200 {
        let line = lines.next().unwrap().unwrap();
        if line.starts_with("data:") && line.contains("\"busy\":true") && line.contains("\"steps\":500") {
            saw = true;
            break;
        }
    }
    assert!(saw, "no progress event");
    // (left open on purpose: stopping the server must end the stream, not wait for it)

    let queued = std::thread::spawn(move || {
        post(addr, "/sdapi/v1/txt2img", &json!({"prompt": "a blue ring", "steps": 2}))
    });
    wait_for("the queue to fill", || get(addr, "/sdapi/v1/progress").json()["unsee"]["queued"] == 1);
    let full = post(addr, "/sdapi/v1/txt2img", &json!({"prompt": "a green cross", "steps": 2}));
    assert_eq!(full.status, 503, "{}", String::from_utf8_lossy(&full.body));
    assert_eq!(full.json()["detail"][0]["loc"][1], "queue");

    let t = Instant::now();
    assert_eq!(post(addr, "/sdapi/v1/interrupt", &json!({})).status, 200);
    let r = long.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "interrupt took {:?}", t.elapsed());
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["images"], json!([]));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["unsee"]["interrupted"], true);

    let r = queued.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["images"].as_array().unwrap().len(), 1, "the queued job did not run after the interrupt");
    let p = get(addr, "/sdapi/v1/progress").json();
    assert_eq!((p["progress"].as_f64(), p["state"]["job_count"].as_u64()), (Some(0.0), Some(0)));
    server.stop().unwrap();
    // the event stream ended when the server stopped
    assert!(lines.all(|l| l.is_ok()), "the event stream did not end cleanly");
}

/// Every bad field is a 422 naming it; bad JSON 422; an oversized body 413; a spec sent for audit cannot name a
/// file; a comparison without a base model is 404; an inline audit runs.
#[test]
fn bad_requests_are_named_errors() {
    let server = serve(engine(vec![]), None, ServeOptions { queue: 2, max_body_bytes: 4096 });
    let addr = server.addr;
    for (body, field) in [
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "steps": "many"}), "steps"),
        (json!({"prompt": "x", "cfg_scale": 1e300}), "cfg_scale"),
        (json!({"prompt": "x", "width": 30}), "width"),
        (json!({"prompt": "x", "sampler_name": "Heun"}), "sampler_name"),
        (json!({"prompt": "x", "batch_size": 100}), "batch_size"),
        (json!({"prompt": ["x"]}), "prompt"),
        (json!([1, 2]), "body"),
    ] {
        let r = post(addr, "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 422, "{body}");
        assert_eq!(r.json()["detail"][0]["loc"][1], field, "{body}");
    }
    // over the work budget: the engine's own check, as a 422
    let r = post(addr, "/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 4096, "height": 4096, "steps": 50}));
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let r = request(addr, "POST", "/sdapi/v1/txt2img", Some(b"{\"prompt\": "));
    assert_eq!((r.status, r.json()["detail"][0]["loc"][1].as_str()), (422, Some("body")));
    let big = json!({"prompt": "a".repeat(5000)});
    assert_eq!(post(addr, "/sdapi/v1/txt2img", &big).status, 413);

    let spec = "method = \"uce\"\npreserve_file = \"/etc/passwd\"\n[[erase]]\nconcept = \"red circle\"\n";
    let r = post(addr, "/v1/audit", &json!({"spec": spec}));
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().contains("cannot name files"), "{}", r.json());
    let r = post(addr, "/v1/compare", &json!({"prompt": "x"}));
    assert_eq!(r.status, 404);

    let spec = "method = \"uce\"\ntemplates = \"none\"\npreserve = [\"blue star\"]\n\
                [[erase]]\nconcept = \"red circle\"\nreplace_with = \"red square\"\n";
    let r = request(addr, "POST", "/v1/audit", Some(spec.as_bytes()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["report"]["concepts"][0]["concept"], "red circle");
    assert!(v["table"].as_str().unwrap().contains("red circle"));
    server.stop().unwrap();
}

/// A script written for AUTOMATIC1111 (`requests`, the wiki's fields) works unchanged.
#[test]
fn an_automatic1111_client_script_works_unchanged() {
    let server = serve(engine(vec![]), None, ServeOptions::default());
    let out = common::tmp_dir("serve", "client").join("out.png");
    let script = common::repo().join("tests/tools/a1111_client.py");
    let url = format!("http://{}", server.addr);
    let o = std::process::Command::new("python3").arg(&script).arg(&url).arg(&out).output()
        .expect("python3 (with requests: tests/setup.sh installs it)");
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap().to_rgba8();
    let found = shapes(img.as_raw(), img.width(), img.height());
    assert!(found.contains(&Shape::Star), "the script's image shows {found:?}");
    // the same request through the engine gives the same picture
    let direct = engine(vec![]).generate(&GenerateRequest {
        prompt: "an image of a blue star".into(), steps: 20, guidance: 4.0, seed: 3,
        scheduler: SchedulerKind::EulerAncestral, ..Default::default()
    }, Default::default(), &mut |_| Control::Continue, Target::Rgba).unwrap();
    assert_eq!(img.as_raw(), &direct.rgba);
    let _: SocketAddr = server.addr;
    server.stop().unwrap();
}
