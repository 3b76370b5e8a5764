//! `unsee serve` overhead: the same txt2img request on the shapes model timed through the HTTP API and directly on
//! the engine in one run (ratio = HTTP round trip / engine call), and the process's resident memory with the engine
//! alone against the same process once the server has started and answered requests.
//!
//! ```text
//! cargo bench --bench serve
//! ```

#[path = "../tests/common/http.rs"]
#[allow(dead_code)]
mod http;

use std::time::Instant;

use serde_json::json;
use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::pipeline::{Control, GenerateRequest, Target};
use unsee::serve::{ServeOptions, start};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok()).map(|kb| kb / 1024.0).unwrap_or(f64::NAN)
}

fn main() {
    const N: usize = 10;
    let open = || Engine::open(&EngineOptions { device: DeviceChoice::Cpu, ..Default::default() }).unwrap();
    let engine = open();
    let req = GenerateRequest { prompt: "an image of a red circle".into(), steps: 20, guidance: 4.0, seed: 0,
                                ..Default::default() };
    let mut direct = |seed: u64| {
        let r = GenerateRequest { seed, ..req.clone() };
        engine.generate(&r, Default::default(), &mut |_| Control::Continue, Target::Rgba).unwrap()
    };
    direct(100); // warm-up
    let rss_engine = rss_mib();
    let t = Instant::now();
    for i in 0..N {
        direct(i as u64);
    }
    let engine_s = t.elapsed().as_secs_f64() / N as f64;

    let server = start(engine, None, "127.0.0.1:0".parse().unwrap(), &ServeOptions::default()).unwrap();
    let body = |seed: usize| json!({"prompt": req.prompt, "steps": 20, "cfg_scale": 4, "seed": seed,
                                    "sampler_name": "DDIM"});
    assert_eq!(http::post(server.addr, "/sdapi/v1/txt2img", &body(100)).status, 200); // warm-up
    let t = Instant::now();
    for i in 0..N {
        let r = http::post(server.addr, "/sdapi/v1/txt2img", &body(i));
        assert_eq!(r.status, 200);
    }
    let http_s = t.elapsed().as_secs_f64() / N as f64;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let rss_server = rss_mib();

    println!("| shapes model, 32×32, 20 DDIM steps, CFG | mean of {N} |");
    println!("|---|---|");
    println!("| engine.generate | {:.3} s |", engine_s);
    println!("| POST /sdapi/v1/txt2img (loopback, PNG + base64 + JSON) | {:.3} s |", http_s);
    println!("| ratio HTTP / engine | {:.3} |", http_s / engine_s);
    println!("| RSS, engine only (after a generation) | {:.1} MiB |", rss_engine);
    println!("| RSS, engine + server, idle after {} requests | {:.1} MiB |", N + 1, rss_server);
    println!("| server's extra RSS | {:+.1} MiB |", rss_server - rss_engine);
    server.stop().unwrap();
}
