"""A client written for AUTOMATIC1111's web UI API, as its wiki shows it (plain `requests`, documented fields):
run unchanged against `unsee serve` by core/tests/serve.rs.

    python3 a1111_client.py http://127.0.0.1:7860 out.png
"""
import base64
import sys

import requests

url = sys.argv[1]
payload = {
    "prompt": "an image of a blue star",
    "negative_prompt": "",
    "steps": 20,
    "cfg_scale": 4,
    "seed": 3,
    "sampler_name": "Euler a",
    "batch_size": 1,
    "n_iter": 1,
    "restore_faces": False,
    "tiling": False,
    "send_images": True,
    "save_images": False,
}

models = requests.get(url=f"{url}/sdapi/v1/sd-models").json()
print("model:", models[0]["title"])
samplers = [s["name"] for s in requests.get(url=f"{url}/sdapi/v1/samplers").json()]
assert payload["sampler_name"] in samplers, samplers

response = requests.post(url=f"{url}/sdapi/v1/txt2img", json=payload)
response.raise_for_status()
r = response.json()
with open(sys.argv[2], "wb") as f:
    f.write(base64.b64decode(r["images"][0]))
print("info:", r["info"])
