"""Writes tiny PyTorch checkpoints in the two layouts AdvUnlearn publishes its robust text encoders in, plus
hostile ones, for `core/tests/pickle.rs`. Standard library only (CI has no PyTorch): the files are written in
`torch.save`'s zip format (PyTorch >= 1.6, pickle protocol 2, one `data/<key>` entry per storage, persistent ids
`('storage', torch.FloatStorage, key, 'cpu', numel)`, tensors rebuilt by `torch._utils._rebuild_tensor_v2`) by a
pickler that references the same names `torch.save` does. Two real `torch.save` files from burn's reader tests
(`tests/fixtures/pickle/`) check that the reference check accepts what PyTorch itself writes.

    python3 tests/reference/make_torch_checkpoints.py SOURCE_TEXT_ENCODER_DIR OUT_DIR

Writes, from SOURCE's `model.safetensors` (f32) with `text_model.final_layer_norm.bias` shifted by +0.25 (so a
silent fall-back to the model's own encoder shows):
- `hf/config.json`, `hf/pytorch_model.bin`: transformers' `CLIPTextModel` state dict (`text_model.*`, with the
  int64 `text_model.embeddings.position_ids` buffer older transformers save);
- `TextEncoder-advunlearn-epoch_0.pt`: the training script's `CustomTextEncoder` state dict: `text_encoder.text_model.*`
  plus the same storages again under `embedding.*`, `encoder.*`, `final_layer_norm.*`;
- `expected/text_encoder/{config.json,model.safetensors}`: the same weights as safetensors;
- `evil-system.pt` (a REDUCE of `os.system` inside the state dict), `evil-stack-global.pt` (protocol 4),
  `not-a-zip.pt`.
"""
import collections
import json
import os
import pickle
import struct
import sys
import types
import zipfile

# --- the names torch.save's pickles reference, as importable stand-ins --------------------------------------------
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


def _storage(name):
    cls = type(name, (), {})
    cls.__module__ = "torch"
    cls.__qualname__ = name
    setattr(torch, name, cls)
    return cls


FloatStorage = _storage("FloatStorage")
LongStorage = _storage("LongStorage")


def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
    raise RuntimeError


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key, kind, data):
        self.key, self.kind, self.data = key, kind, data  # data: little-endian bytes


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, list(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            numel = len(obj.data) // (4 if obj.kind is FloatStorage else 8)
            return ("storage", obj.kind, obj.key, "cpu", numel)
        return None


def save(state, path, protocol=2):
    """torch.save's zip layout: archive/data.pkl, archive/data/<key>, archive/version, archive/byteorder."""
    import io
    buf = io.BytesIO()
    TorchPickler(buf, protocol=protocol).dump(state)
    storages = {}

    def collect(v):
        if isinstance(v, Tensor):
            storages[v.storage.key] = v.storage.data
    for v in state.values():
        collect(v)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def read_safetensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "F32", name
        s, e = info["data_offsets"]
        out[name] = (info["shape"], bytearray(b[8 + n + s:8 + n + e]))
    return out


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        shape, data = tensors[name]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(bytes(data))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main(src, out):
    weights = read_safetensors(os.path.join(src, "model.safetensors"))
    weights = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}
    shape, bias = weights["text_model.final_layer_norm.bias"]
    weights["text_model.final_layer_norm.bias"] = (
        shape, bytearray(struct.pack(f"<{len(bias) // 4}f", *[x + 0.25 for x in struct.unpack(f"<{len(bias) // 4}f", bias)])))
    config = open(os.path.join(src, "config.json")).read()
    for d in ["hf", "expected/text_encoder"]:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    write_safetensors(os.path.join(out, "expected/text_encoder/model.safetensors"), weights)
    open(os.path.join(out, "expected/text_encoder/config.json"), "w").write(config)

    storages = {name: Storage(str(i), FloatStorage, data) for i, (name, (_, data)) in enumerate(sorted(weights.items()))}
    tensors = {name: Tensor(storages[name], weights[name][0]) for name in storages}

    hf = collections.OrderedDict(tensors)
    positions = json.loads(config)["max_position_embeddings"]
    hf["text_model.embeddings.position_ids"] = Tensor(
        Storage("pos", LongStorage, struct.pack(f"<{positions}q", *range(positions))), [1, positions])
    save(hf, os.path.join(out, "hf/pytorch_model.bin"))
    open(os.path.join(out, "hf/config.json"), "w").write(config)

    train = collections.OrderedDict(("text_encoder." + k, v) for k, v in tensors.items())
    for k, v in tensors.items():
        rest = k[len("text_model."):]
        if rest.startswith("embeddings."):
            train["embedding." + rest[len("embeddings."):]] = v
        else:
            train[rest] = v  # encoder.* and final_layer_norm.*, the same storages
    save(train, os.path.join(out, "TextEncoder-advunlearn-epoch_0.pt"))

    evil = collections.OrderedDict(hf)
    evil["text_model.payload"] = Evil()
    save(evil, os.path.join(out, "evil-system.pt"))
    save(hf, os.path.join(out, "evil-stack-global.pt"), protocol=4)
    open(os.path.join(out, "not-a-zip.pt"), "wb").write(b"\x80\x02}q\x00.")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
