"""End-to-end test of the generated Python bindings (uniffi, library mode) on the embedded model.

Run by `cargo test -p unsee-ffi --test foreign`, which builds the library, generates the bindings into a temporary
folder, puts it on PYTHONPATH and sets:
  UNSEE_REPO   the repository root (models/tiny-sd, tests/fixtures/small-sd)
  UNSEE_TMP    a scratch folder
Standard library only.
"""

import os
import shutil
import subprocess
import sys
import threading
import time
import unittest

from unsee_ffi import (
    CancelToken,
    DeviceKind,
    Engine,
    EngineConfig,
    GenerateRequest,
    Lora,
    Precision,
    ProgressListener,
    Scheduler,
    UnseeError,
)

REPO = os.environ["UNSEE_REPO"]
TMP = os.environ["UNSEE_TMP"]
TINY = os.path.join(REPO, "models", "tiny-sd")
SMALL = os.path.join(REPO, "tests", "fixtures", "small-sd")

SPEC = """
method = "uce"
preserve = ["a blue square", "a green star"]

[[erase]]
concept = "red circle"
replace_with = "yellow ring"
"""


def config(model=TINY, **kw):
    return EngineConfig(model_path=model, device=DeviceKind.CPU, precision=Precision.F32, **kw)


def request(prompt="a red circle", steps=4, seed=7, **kw):
    return GenerateRequest(prompt=prompt, steps=steps, seed=seed, scheduler=Scheduler.DDIM, **kw)


class Recorder(ProgressListener):
    def __init__(self, cancel_at=None, token=None, raise_at=None):
        self.steps = []
        self.cancel_at, self.token, self.raise_at = cancel_at, token, raise_at

    def on_step(self, step, total):
        self.steps.append((step, total))
        if self.cancel_at is not None and step == self.cancel_at:
            self.token.cancel()
        if self.raise_at is not None and step == self.raise_at:
            raise RuntimeError("listener bug")


class EngineTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.engine = Engine(config())

    def test_generate_with_progress(self):
        rec = Recorder()
        img = self.engine.generate(request(), rec, None)
        self.assertEqual((img.width, img.height), (64, 64))
        self.assertEqual(len(img.rgba), 64 * 64 * 4)
        self.assertTrue(all(a == 255 for a in img.rgba[3::4]))
        self.assertGreater(len(set(img.rgba[0::4])), 8, "image is not flat")
        self.assertEqual(rec.steps, [(1, 4), (2, 4), (3, 4), (4, 4)])
        # Same request, same pixels; another seed, other pixels.
        self.assertEqual(self.engine.generate(request(), None, None).rgba, img.rgba)
        self.assertNotEqual(self.engine.generate(request(seed=8), None, None).rgba, img.rgba)
        # Size, scheduler and negative prompt reach the runtime.
        other = self.engine.generate(
            GenerateRequest(prompt="a red circle", negative_prompt="blurry", steps=3, seed=7, width=32, height=48,
                            scheduler=Scheduler.EULER_ANCESTRAL), None, None)
        self.assertEqual((other.width, other.height, len(other.rgba)), (32, 48, 32 * 48 * 4))

    def test_cancel_mid_run(self):
        token = CancelToken()
        rec = Recorder(cancel_at=2, token=token)
        t = time.monotonic()
        with self.assertRaises(UnseeError.Cancelled):
            self.engine.generate(request(steps=50), rec, token)
        # Stopped right after the step that cancelled: promptly, not at the end of 50 steps.
        self.assertEqual(rec.steps, [(1, 50), (2, 50)])
        self.assertTrue(token.is_cancelled())
        # A token cancelled before the call stops it before the first step.
        rec = Recorder()
        with self.assertRaises(UnseeError.Cancelled):
            self.engine.generate(request(steps=50), rec, token)
        self.assertEqual(rec.steps, [])
        self.assertLess(time.monotonic() - t, 60)

    def test_cancel_from_another_thread(self):
        token = CancelToken()
        started = threading.Event()

        class Signal(ProgressListener):
            def on_step(self, step, total):
                started.set()

        threading.Thread(target=lambda: (started.wait(60), token.cancel())).start()
        with self.assertRaises(UnseeError.Cancelled):
            self.engine.generate(request(steps=500), Signal(), token)

    def test_lora_and_lcm(self):
        lora = os.path.join(REPO, "tests", "fixtures", "tiny", "lora_kohya.safetensors")
        engine = Engine(config(loras=[Lora(path=lora, scale=0.7)]))
        lcm = GenerateRequest(prompt="a red circle", steps=4, guidance=1.5, seed=7, scheduler=Scheduler.LCM)
        rec = Recorder()
        merged = engine.generate(lcm, rec, None).rgba
        self.assertEqual(rec.steps, [(i, 4) for i in range(1, 5)])
        self.assertNotEqual(self.engine.generate(lcm, None, None).rgba, merged, "the LoRA changed nothing")
        with self.assertRaises(UnseeError.InvalidModel):
            Engine(config(loras=[Lora(path=os.path.join(REPO, "models", "tiny-sd", "model_index.json"), scale=1.0)]))
        with self.assertRaises(UnseeError.InvalidRequest):
            Engine(config(loras=[Lora(path=lora, scale=float("nan"))]))

    def test_erase_then_generate(self):
        engine = Engine(config())
        before = engine.generate(request(), None, None).rgba
        path = os.path.join(TMP, "red-circle.safetensors")
        summary = engine.erase(SPEC, path)
        self.assertEqual(summary.method, "uce")
        self.assertEqual(summary.concepts, ["red circle"])
        self.assertEqual(summary.replacements, ["yellow ring"])
        self.assertGreater(summary.matrices, 0)
        self.assertEqual(summary.saved_to, path)
        self.assertTrue(os.path.getsize(path) > 0)
        info = engine.info()
        self.assertEqual([(e.method, e.concepts, e.source) for e in info.erasures],
                         [("uce", ["red circle"], path)])
        self.assertFalse(info.is_gpu)
        self.assertEqual(sorted(c.name for c in info.components), ["text_encoder", "unet", "vae"])
        self.assertTrue(all(c.parameters > 0 for c in info.components))
        after = engine.generate(request(), None, None).rgba
        self.assertNotEqual(after, before, "the erasure changed nothing")
        # The saved file, applied at load, gives the same model.
        reloaded = Engine(config(erasure_paths=[path]))
        self.assertEqual(reloaded.generate(request(), None, None).rgba, after)
        self.assertEqual(reloaded.info().erasures[0].concepts, ["red circle"])
        # The audit compares the erasure in effect with the base weights and leaves the model alone.
        report = engine.audit(SPEC)
        self.assertEqual([c.concept for c in report.concepts], ["red circle"])
        self.assertLess(report.overall_key_leakage.mean, 1.0)
        # UCE edits the UNet, so the embedding attack applies.
        self.assertIsNotNone(report.overall_attack_noise_leakage)
        self.assertIsNotNone(report.concepts[0].attack_noise_leakage)
        self.assertIn("red circle", report.table)
        self.assertIn('"concepts"', report.json)
        self.assertEqual(engine.generate(request(), None, None).rgba, after)
        # A failed erase applies nothing.
        with self.assertRaises(UnseeError.InvalidRequest):
            engine.erase('method = "uce"\n[[erase]]\nconcept = ""\n', None)
        self.assertEqual(len(engine.info().erasures), 1)

    def test_text_encoder_path(self):
        same = Engine(config(text_encoder_path=os.path.join(TINY, "text_encoder")))
        self.assertEqual(same.generate(request(), None, None).rgba, self.engine.generate(request(), None, None).rgba)
        with self.assertRaises(UnseeError.InvalidModel) as cm:
            Engine(config(text_encoder_path=os.path.join(SMALL, "text_encoder")))
        self.assertIn("cross-attention", str(cm.exception))

    def test_concurrent_calls_are_serialised(self):
        want = self.engine.generate(request(seed=3), None, None).rgba
        results, errors = [], []

        def run():
            try:
                results.append(self.engine.generate(request(seed=3), None, None).rgba)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(results, [want] * 3)


class GuardTest(unittest.TestCase):
    """A signed int8 bundle (built by the Rust side of the test) in guarded mode."""

    BUNDLE = os.environ["UNSEE_BUNDLE"]

    @staticmethod
    def key(var="UNSEE_BUNDLE_KEY"):
        with open(os.environ[var]) as f:
            return f.read()

    def guarded(self, **kw):
        return config(model=self.BUNDLE, trusted_keys=[self.key()], **kw)

    def test_guarded_bundle_loads_and_generates(self):
        engine = Engine(self.guarded(required_concepts=["Red Circle"]))
        img = engine.generate(request(), None, None)
        self.assertEqual(len(img.rgba), img.width * img.height * 4)

    def test_untrusted_key_is_refused(self):
        with self.assertRaises(UnseeError.BundleRefused) as cm:
            Engine(config(model=self.BUNDLE, trusted_keys=[self.key("UNSEE_OTHER_KEY")]))
        self.assertIn("minisig", str(cm.exception))

    def test_guard_violations(self):
        with self.assertRaises(UnseeError.GuardViolation):
            Engine(self.guarded(required_concepts=["dog"]))
        with self.assertRaises(UnseeError.GuardViolation):
            Engine(self.guarded(text_encoder_path=TINY))
        with self.assertRaises(UnseeError.GuardViolation):
            Engine(config(model=TINY, trusted_keys=[self.key()]))
        engine = Engine(self.guarded())
        with self.assertRaises(UnseeError.GuardViolation):
            engine.erase(SPEC, None)

    def test_low_memory_engine_draws_the_same_picture(self):
        want = Engine(self.guarded()).generate(request(), None, None)
        low = Engine(self.guarded(low_memory=True))
        got = low.generate(request(), None, None)
        self.assertEqual(bytes(got.rgba), bytes(want.rgba))
        self.assertTrue(low.info().low_memory)
        self.assertFalse(Engine(self.guarded()).info().low_memory)
        unguarded = Engine(config(low_memory=True))
        with self.assertRaises(UnseeError.InvalidRequest) as cm:
            unguarded.erase(SPEC, None)
        self.assertIn("low-memory", str(cm.exception))

    def test_tampered_bundle_is_refused_naming_the_file(self):
        copy = os.path.join(TMP, "tampered-bundle")
        shutil.copytree(self.BUNDLE, copy)
        path = os.path.join(copy, "vae", "config.json")
        with open(path, "a") as f:
            f.write(" ")
        with self.assertRaises(UnseeError.BundleRefused) as cm:
            Engine(config(model=copy, trusted_keys=[self.key()]))
        self.assertIn("vae/config.json", str(cm.exception))


class ErrorTest(unittest.TestCase):
    def test_model_not_found(self):
        with self.assertRaises(UnseeError.ModelNotFound) as cm:
            Engine(config(model=os.path.join(TMP, "no-such-model")))
        self.assertIn("no-such-model", str(cm.exception))

    def test_invalid_model(self):
        broken = os.path.join(TMP, "truncated-model")
        shutil.copytree(TINY, broken, dirs_exist_ok=True)
        unet = os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors")
        with open(unet, "r+b") as f:
            f.truncate(os.path.getsize(unet) // 2)
        with self.assertRaises(UnseeError.InvalidModel) as cm:
            Engine(config(model=broken))
        self.assertIn("diffusion_pytorch_model", str(cm.exception))

    def test_erasure_mismatch(self):
        path = os.path.join(TMP, "small.safetensors")
        Engine(config(model=SMALL)).erase(SPEC, path)
        with self.assertRaises(UnseeError.ErasureMismatch) as cm:
            Engine(config(erasure_paths=[path]))
        self.assertIn("erasure mismatch", str(cm.exception))

    def test_device_unavailable(self):
        # No Vulkan driver visible: asking for the GPU must fail cleanly (in a child, as the driver list is read once).
        code = (
            "from unsee_ffi import *\n"
            "try:\n"
            "    Engine(EngineConfig(model_path=%r, device=DeviceKind.GPU, precision=Precision.F32))\n"
            "except UnseeError.DeviceUnavailable as e:\n"
            "    print('DeviceUnavailable:', e)\n" % TINY
        )
        env = dict(os.environ, VK_ICD_FILENAMES="/nonexistent.json", VK_DRIVER_FILES="/nonexistent.json",
                   WGPU_BACKEND="vulkan")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        self.assertIn("DeviceUnavailable:", out.stdout, out.stderr)

    def test_invalid_requests(self):
        engine = Engine(config())
        for bad in [request(steps=0), request(steps=-1), request(width=12), request(height=-8),
                    request(guidance=float("nan"))]:
            with self.subTest(bad=bad), self.assertRaises(UnseeError.InvalidRequest):
                engine.generate(bad, None, None)
        with self.assertRaises(UnseeError.InvalidRequest) as cm:
            engine.erase('method = "uce"\nlambda = -1\n[[erase]]\nconcept = "x"\n', None)
        self.assertIn("<spec>:2:", str(cm.exception))  # names the line
        with self.assertRaises(UnseeError.InvalidRequest):
            engine.audit("not toml at all [")

    def test_io_error(self):
        engine = Engine(config())
        with self.assertRaises(UnseeError.Io):
            engine.erase(SPEC, os.path.join(TMP, "no-such-dir", "x.safetensors"))
        self.assertEqual(engine.info().erasures, [], "a failed save applies nothing")

    def test_panic_becomes_internal(self):
        # A listener that raises makes uniffi panic inside the Rust call; the boundary turns it into Internal and
        # the engine stays usable.
        engine = Engine(config())
        with self.assertRaises(UnseeError.Internal) as cm:
            engine.generate(request(), Recorder(raise_at=2), None)
        self.assertIn("panic", str(cm.exception))
        self.assertEqual(len(engine.generate(request(), None, None).rgba), 64 * 64 * 4)


if __name__ == "__main__":
    unittest.main(verbosity=2)
