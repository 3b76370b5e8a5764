//! The web page of `unsee serve` in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `tests/setup.sh`), driven over the DevTools protocol. It loads the page, types a prompt, presses Enter, waits
//! for the image, reads the PNG the page shows with the shapes oracle, and checks the concept panel lists the
//! erasure. `UNSEE_SCREENSHOT=docs/serve.png` also saves a screenshot of the page.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::erase::spec::Spec;
use unsee::serve::{ServeOptions, start};
use unsee::shapes::{Shape, analyse};

fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("CHROME") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in ["/usr/bin", "/usr/local/bin"] {
            let p = PathBuf::from(dir).join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("no Chromium found: tests/setup.sh installs Debian's `chromium` (or set CHROME)");
}

struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
    _profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch() -> Self {
        let profile = common::tmp_dir("browser", "profile");
        let mut child = Command::new(chromium())
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                   "--disable-background-networking", "--remote-debugging-port=0", "--window-size=1280,900"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start Chromium");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(i) = line.find("ws://") {
                    let _ = tx.send(line[i..].trim().to_string());
                }
            }
        });
        let browser_ws = rx.recv_timeout(Duration::from_secs(60)).expect("Chromium did not open DevTools");
        let port: u16 = browser_ws["ws://127.0.0.1:".len()..].split('/').next().unwrap().parse().unwrap();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let page_ws = loop {
            let list = common::http::get(addr, "/json/list").json();
            if let Some(p) = list.as_array().unwrap().iter().find(|t| t["type"] == "page") {
                break p["webSocketDebuggerUrl"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no page target");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (ws, _) = tungstenite::connect(page_ws.as_str()).expect("DevTools websocket");
        Self { child, ws, next: 1, _profile: profile }
    }

    /// Sends a DevTools command and waits for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        self.ws.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).unwrap();
        loop {
            let msg = self.ws.read().expect("DevTools connection closed");
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    fn wait_for(&mut self, expr: &str, timeout: Duration) -> Value {
        let t = Instant::now();
        loop {
            let v = self.eval(expr);
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(t.elapsed() < timeout, "timed out waiting for {expr}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn key(&mut self, key: &str, code: &str, vk: u32) {
        for kind in ["rawKeyDown", "keyUp"] {
            self.call("Input.dispatchKeyEvent", json!({"type": kind, "key": key, "code": code,
                "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}));
        }
        // Enter's character, as a real keyboard sends it
        if key == "Enter" {
            self.call("Input.dispatchKeyEvent", json!({"type": "char", "key": "Enter", "text": "\r"}));
        }
    }
}

#[test]
fn the_page_generates_through_the_guard_in_a_real_browser() {
    let dir = common::tmp_dir("browser", "erasure");
    let file = dir.join("no-circles.safetensors");
    let open = |erasures: Vec<PathBuf>| {
        Engine::open(&EngineOptions { device: DeviceChoice::Cpu, erasures, ..Default::default() }).unwrap()
    };
    let spec = Spec::from_file(&common::repo().join("models/specs/shapes-circle.toml")).unwrap();
    open(vec![]).erase(&spec, Some(&file)).unwrap();
    let server = start(open(vec![file]), Some(open(vec![])), "127.0.0.1:0".parse().unwrap(),
                       &ServeOptions::default()).unwrap();

    let t0 = Instant::now();
    let mut b = Browser::launch();
    eprintln!("[{:.1}s] browser up", t0.elapsed().as_secs_f64());
    b.call("Page.enable", json!({}));
    b.call("Page.navigate", json!({"url": format!("http://{}/", server.addr)}));
    b.wait_for("document.body && document.body.dataset.ready === 'true'", Duration::from_secs(60));

    eprintln!("[{:.1}s] page ready", t0.elapsed().as_secs_f64());
    let panel = b.eval("document.getElementById('filter').innerText");
    let panel = panel.as_str().unwrap();
    assert!(panel.contains("red circle → red square") && panel.contains("uce, no-circles.safetensors"), "{panel}");
    assert_eq!(b.eval("document.getElementById('compare-row').hidden"), json!(false));
    let samplers = b.eval("[...document.getElementById('sampler').options].map(o => o.value).join('|')");
    assert_eq!(samplers, "DDIM|Euler a|DPM++ 2M|DPM++ 2M Karras|LCM");

    // the settings a user would pick, then the prompt typed into the focused field and Enter pressed
    b.eval("document.getElementById('seed').value = '5'; document.getElementById('cfg').value = '4'; true");
    b.eval("document.getElementById('prompt').focus(); true");
    b.call("Input.insertText", json!({"text": "an image of a red circle"}));
    assert_eq!(b.eval("document.activeElement.id"), "prompt");
    b.key("Enter", "Enter", 13);
    let ms = b.wait_for("document.body.dataset.lastMs", Duration::from_secs(120));
    let ms: f64 = ms.as_str().unwrap().parse().unwrap();
    eprintln!("first image {ms:.0} ms after pressing Enter (page's own clock)");

    eprintln!("[{:.1}s] image shown", t0.elapsed().as_secs_f64());
    let src = b.eval("document.getElementById('image').src");
    let b64 = src.as_str().unwrap().strip_prefix("data:image/png;base64,").expect("a PNG data URL");
    let png = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgba8();
    let found: Vec<Shape> = analyse(img.as_raw(), img.width() as usize, img.height() as usize, 4)
        .iter().map(|d| d.shape).collect();
    assert!(!found.is_empty() && !found.contains(&Shape::Circle), "the page shows {found:?}");
    assert!(b.eval("document.getElementById('caption').innerText").as_str().unwrap().contains("seed 5"));
    assert_eq!(b.eval("document.querySelectorAll('#history li').length"), json!(1));
    assert_eq!(b.eval("document.getElementById('error').innerText"), "");

    // before/after: the same prompt and seed with the unguarded base model, side by side
    b.eval("document.getElementById('compare').click(); true");
    b.eval("delete document.body.dataset.lastMs; document.getElementById('generate').click(); true");
    b.wait_for("document.body.dataset.lastMs", Duration::from_secs(120));
    assert_eq!(b.eval("document.getElementById('fig-base').hidden"), json!(false));
    let base = b.eval("document.getElementById('base-image').src");
    let png = base64::engine::general_purpose::STANDARD
        .decode(base.as_str().unwrap().strip_prefix("data:image/png;base64,").unwrap()).unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgba8();
    let base_found: Vec<Shape> = analyse(img.as_raw(), img.width() as usize, img.height() as usize, 4)
        .iter().map(|d| d.shape).collect();
    assert!(base_found.contains(&Shape::Circle), "the base model's image shows {base_found:?}");
    assert_eq!(b.eval("document.querySelectorAll('#history li').length"), json!(2));

    if let Ok(path) = std::env::var("UNSEE_SCREENSHOT") {
        let shot = b.call("Page.captureScreenshot", json!({"format": "png"}));
        let bytes = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        eprintln!("screenshot: {path}");
    }
    drop(b);
    server.stop().unwrap();
}
