"""A new user's YOLO folder through every step, with no code of theirs: only the command lines and a config.

The folder is made here the way a user's labelling tool would leave it (not by the built-in generator):
photos of different sizes and aspect ratios with two classes of objects drawn by PIL, ``labels/*.txt`` in
YOLO's normalised ``class cx cy w h``, a ``data.yaml`` naming the classes, one image with no label file (no
objects). Then ``toolchain train / compress / export / build`` (signed), ``device-agent run`` on the image
folder (edge only, then through a real broker to a ``cloud-gateway serve`` that answers with the teacher's
detections and collects the frames), and ``toolchain refresh`` from the gateway's database.

Slow (about three minutes on two cores): ``pytest -m slow tests/detection/test_new_user_yolo.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker]

CONFIG = """
task = "detect"
[run]
name = "parking-lot"
[data]
source = "yolo:{folder}"
image_size = 48
batch_size = 16
[teacher]
family = "resnet"
width = 8
depth = 1
head_convs = 1
[train]
epochs = 8
lr = 0.01
warmup_epochs = 0
progress = false
[compress]
control = "none"
[prune]
ratio = 2.0
steps = 1
finetune_epochs = 1
[distill]
epochs = 2
[qat]
epochs = 1
freeze_observer_epoch = 1
[export]
min_agreement = 0.8
[build]
accuracy_budget_pt = 5.0
calibration_samples = 32
[refresh]
epochs = 1
candidates = 1
strategy = "continue"
min_samples = 10
max_regression_pt = 100.0
"""


def user_yolo_folder(root: Path, n: int = 160, seed: int = 11) -> Path:
    """What a labelling tool leaves: images/ and labels/ side by side, data.yaml with the class names."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names:\n  0: car\n  1: person\n")
    for i in range(n):
        w, h = [(80, 60), (60, 80), (64, 64), (96, 48)][i % 4]
        bg = rng.integers(40, 200, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(bg)
        draw = ImageDraw.Draw(im)
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(0, 2))
            bw, bh = (int(rng.integers(14, 26)), int(rng.integers(8, 14))) if cls == 0 else \
                (int(rng.integers(6, 10)), int(rng.integers(14, 24)))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.rectangle if cls == 0 else draw.ellipse)([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=colour)
            lines.append(f"{cls} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        im.save(root / "images" / f"frame_{i:04d}.jpg", quality=92)
        if i != 5:  # one frame the tool left without a label file: no objects in it
            (root / "labels" / f"frame_{i:04d}.txt").write_text("\n".join(lines) + "\n")
    return root


def _run(*argv: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def test_a_new_users_yolo_folder_goes_through_every_step(mosquitto, tmp_path):
    folder = user_yolo_folder(tmp_path / "lot")
    cfg = tmp_path / "toolchain.toml"
    cfg.write_text(CONFIG.format(folder=folder))
    run = tmp_path / "run"
    common = ["--config", str(cfg), "--run-dir", str(run)]
    _run("toolchain.cli", "keys", "new", str(tmp_path / "release"))
    r = _run("toolchain.cli", "train", *common, "--json")
    assert "has no label file" in r.stderr or "no label file" in r.stderr  # said once, not an error
    train = json.loads(r.stdout.strip().splitlines()[-1])
    assert train["test_accuracy"] > 0.0
    _run("toolchain.cli", "compress", *common)
    _run("toolchain.cli", "export", *common)
    r = _run("toolchain.cli", "build", *common, "--target", "onnx", "--precision", "int8",
             "--sign", str(tmp_path / "release.key"), "--json")
    build = json.loads(r.stdout.strip().splitlines()[-1])
    bundle = Path(build["bundle"])
    assert build["verify"]["status"] == "passed"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"]["name"] == "detect" and manifest["output"]["labels"] == ["car", "person"]
    assert manifest["input"]["preprocess"]["resize"] == "letterbox"

    # the device, edge only, on the user's own image files (of every size)
    trust = ["--trust-key", str(tmp_path / "release.pub")]
    out = tmp_path / "answers.jsonl"
    _run("device_agent.cli", "run", "--bundle", str(bundle), "--source", str(folder / "images"), "--device-id",
         "cam-1", "--threshold", "0", "--output", str(out), *trust)
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(answers) == 160 and all(a["route"] == "edge" for a in answers)
    assert sum(len(a["prediction"]) for a in answers) > 0
    assert all(set(d) == {"box", "score", "class", "label"} and d["label"] in ("car", "person")
               for a in answers for d in a["prediction"])

    # through a real broker: every frame to the gateway, which answers with the teacher's detections and
    # collects the frames; then a refresh from its database
    user, pw = mosquitto.gateway_credentials
    db = tmp_path / "gateway.sqlite"
    gw = subprocess.Popen([sys.executable, "-m", "cloud_gateway.cli", "serve", "--broker", mosquitto.url,
                           "--username", user, "--password", pw, "--teacher", str(run), "--db", str(db),
                           "--bundles-dir", str(tmp_path / "bundles"), "--http-port", "0", "--token", "t",
                           "--trust-key", str(tmp_path / "release.pub"), "--threads", "1", "--collect", "all",
                           "--collect-rate", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in (gw.stdout.readline() if gw.stdout else "")
        du, dp = mosquitto.credentials("cam-1")
        out2 = tmp_path / "cloud.jsonl"
        _run("device_agent.cli", "run", "--bundle", str(bundle), "--source", str(folder / "images"), "--device-id",
             "cam-1", "--broker", mosquitto.url, "--username", du, "--password", dp, "--threshold", "1.01",
             "--deadline", "10", "--state-dir", str(tmp_path / "state"), "--output", str(out2), *trust)
        cloud = [json.loads(x) for x in out2.read_text().splitlines()]
        assert [a["route"] for a in cloud] == ["cloud"] * 160, {a["route"] for a in cloud}
        time.sleep(1.0)  # the collector's writer
    finally:
        gw.terminate()
        gw.wait(20)
    r = _run("toolchain.cli", "refresh", "--from", str(db), "--run", str(run), "--out", str(tmp_path / "run2"),
             "--targets", "onnx-int8", "--sign", str(tmp_path / "release.key"), "--force", "--json")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["samples"]["pulled"] == 160 and rep["samples"]["min_box_score"] == 0.5
    assert (tmp_path / "run2" / "bundles" / "onnx-int8" / "manifest.json").is_file()
