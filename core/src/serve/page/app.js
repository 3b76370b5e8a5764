// unsee's local page: talks to the same server's AUTOMATIC1111-compatible API and its /v1 endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { guard: null, busy: false, history: [] };

function setError(msg) { $("error").textContent = msg || ""; }
function setStatus(msg) { $("status").textContent = msg; }

async function getJSON(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = body && (body.error || (body.detail && body.detail[0] && body.detail[0].msg));
    throw new Error(msg || `${r.status} ${r.statusText}`);
  }
  return body;
}

function showGuard(g) {
  state.guard = g;
  $("model").textContent = g.guarded ? `${g.model} (signed bundle, guarded: key ${g.signer})` : g.model;
  const list = $("filter");
  list.replaceChildren();
  for (const e of g.erasures) {
    e.concepts.forEach((c, i) => {
      const li = document.createElement("li");
      const r = e.replacements[i];
      li.textContent = `${c} → ${r ? r : "(nothing)"}`;
      const m = document.createElement("span");
      m.className = "method";
      const file = e.source ? e.source.split(/[\\/]/).pop() : "computed in this session";
      m.textContent = `${e.method}, ${file}${e.baked ? ", baked into the bundle" : ""}`;
      li.appendChild(m);
      list.appendChild(li);
    });
  }
  $("filter-empty").hidden = g.erasures.length > 0;
  if (g.text_encoder) {
    $("text-encoder").hidden = false;
    $("text-encoder").textContent = `Text encoder: ${g.text_encoder}`;
  }
  $("width").placeholder = g.native_size[0];
  $("height").placeholder = g.native_size[1];
  $("compare-row").hidden = !g.compare;
}

function showSamplers(list) {
  const sel = $("sampler");
  for (const s of list) {
    const o = document.createElement("option");
    o.value = s.name;
    o.textContent = s.name;
    sel.appendChild(o);
  }
}

function onProgress(p) {
  if (!p.busy) return;
  const total = Math.max(1, p.images) * Math.max(1, p.steps);
  const done = p.image * Math.max(1, p.steps) + p.step;
  $("progress").max = total;
  $("progress").value = done;
  const img = p.images > 1 ? ` (image ${p.image + 1} of ${p.images})` : "";
  setStatus(`Step ${p.step} of ${p.steps}${img}…`);
}

function request() {
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); };
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: num("steps"),
    cfg_scale: num("cfg"),
    seed: num("seed"),
    sampler_name: $("sampler").value || undefined,
    width: num("width"),
    height: num("height"),
  };
}

function show(entry) {
  $("image").src = entry.guarded;
  $("image").alt = `Generated image for “${entry.prompt}”, seed ${entry.seed}`;
  $("caption").textContent = `Guarded model — seed ${entry.seed}, ${entry.seconds.toFixed(2)} s`;
  $("fig-base").hidden = !entry.base;
  if (entry.base) {
    $("base-image").src = entry.base;
    $("base-image").alt = `Base model image for “${entry.prompt}”, seed ${entry.seed}`;
  }
  for (const b of $("history").querySelectorAll("button")) {
    b.setAttribute("aria-current", String(b.dataset.index === String(entry.index)));
  }
}

function remember(entry) {
  entry.index = state.history.length;
  state.history.push(entry);
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.dataset.index = entry.index;
  b.title = `${entry.prompt} (seed ${entry.seed})`;
  const img = document.createElement("img");
  img.src = entry.guarded;
  img.alt = `${entry.prompt}, seed ${entry.seed}`;
  b.appendChild(img);
  b.addEventListener("click", () => show(entry));
  li.appendChild(b);
  $("history").prepend(li);
  show(entry);
}

async function generate(ev) {
  ev.preventDefault();
  if (state.busy) return;
  setError("");
  state.busy = true;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  setStatus("Queued…");
  const started = performance.now();
  const req = request();
  try {
    let entry;
    if ($("compare").checked && state.guard && state.guard.compare) {
      const r = await getJSON("/v1/compare", { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify(req) });
      entry = { guarded: "data:image/png;base64," + r.guarded, base: "data:image/png;base64," + r.base,
                seed: r.seed, prompt: req.prompt };
    } else {
      const r = await getJSON("/sdapi/v1/txt2img", { method: "POST", headers: { "Content-Type": "application/json" },
                                                     body: JSON.stringify(req) });
      const info = JSON.parse(r.info);
      if (r.images.length === 0) {
        setStatus(info.unsee.interrupted ? "Cancelled." : "No image.");
        return;
      }
      entry = { guarded: "data:image/png;base64," + r.images[0], seed: info.seed, prompt: req.prompt };
    }
    entry.seconds = (performance.now() - started) / 1000;
    remember(entry);
    await $("image").decode().catch(() => {});
    const ms = performance.now() - started;
    document.body.dataset.lastMs = ms.toFixed(0);
    setStatus(`Done in ${(ms / 1000).toFixed(2)} s.`);
  } catch (e) {
    setError(e.message);
    setStatus(e.message === "job: interrupted" ? "Cancelled." : "Failed.");
  } finally {
    state.busy = false;
    $("generate").disabled = false;
    $("cancel").disabled = true;
    $("progress").value = $("progress").max;
  }
}

async function cancel() {
  setStatus("Cancelling…");
  try { await fetch("/sdapi/v1/interrupt", { method: "POST" }); } catch (e) { setError(e.message); }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
  });
  try {
    const [g, samplers] = await Promise.all([getJSON("/v1/erasures"), getJSON("/sdapi/v1/samplers")]);
    showSamplers(samplers);
    showGuard(g);
    document.body.dataset.ready = "true";
  } catch (e) {
    setError(`Cannot reach the server: ${e.message}`);
  }
  const es = new EventSource("/v1/events");
  es.addEventListener("progress", (m) => { try { onProgress(JSON.parse(m.data)); } catch (_) { /* ignore */ } });
}

init();
