"""Feeding a device the data a user has: folders, .npz, CSV, a run's split; paced; answers counted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.agent.tiny import release_pub_path, wait_for


def _cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "device_agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _summary(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _run_edge(run, tmp_path, *source_args):
    return _cli("run", "--bundle", str(run.bundle_dir), "--device-id", "d1", "--trust-key", str(release_pub_path()),
                "--output", str(tmp_path / "answers.jsonl"), "--json", *source_args)


def test_a_local_agent_reads_csv_rows_paced_with_their_labels(tiny_cascade, tmp_path):
    run = tiny_cascade
    x, y = run.x_test[:20], run.y_test[:20]
    csv = tmp_path / "rows.csv"
    header = ",".join([f"f{i}" for i in range(64)] + ["label"])
    csv.write_text(header + "\n" + "\n".join(",".join([*map(str, s.ravel()), str(int(t))]) for s, t in zip(x, y)))
    t0 = time.monotonic()
    s = _summary(_run_edge(run, tmp_path, "--source", str(csv), "--rate", "40"))
    took = time.monotonic() - t0
    assert s["inputs"] == 20 and s["accuracy"] > 0.8
    answers = [json.loads(ln) for ln in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["true_label"] for a in answers] == [int(t) for t in y] and answers[0]["id"] == "rows.csv:2"
    assert took >= 19 / 40  # paced: 20 inputs at 40/s take at least 19 intervals
    # a row of the wrong size, and no header for a label column: one line each, naming the line
    csv.write_text("1,2,3\n")
    r = _run_edge(run, tmp_path, "--source", str(csv))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {csv}:1: 3 features, the bundle takes 64 ([1, 8, 8]); a label column needs a header row"]
    r = _run_edge(run, tmp_path, "--source", str(tmp_path / "nope.txt"))
    assert r.returncode == 2 and "give a folder (images or .npy), a .npz or a .csv" in r.stderr


def test_a_local_agent_reads_a_runs_test_split_through_the_toolchain_without_importing_torch(tiny_cascade, tmp_path):
    """``--run RUN --split test``: the toolchain reloads the split in its own process; the agent stays torch-free."""
    from toolchain.config import DataConfig
    from toolchain.data import data_record, load_splits

    cfg = DataConfig(source="digits")
    splits = load_splits(cfg, seed=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("")
    (run_dir / "data.json").write_text(json.dumps(data_record(splits, cfg, seed=3)))
    code = ("import sys; from device_agent.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'the agent imported torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "run", "--bundle", str(tiny_cascade.bundle_dir), "--device-id",
                        "d1", "--trust-key", str(release_pub_path()), "--run", str(run_dir), "--split", "test",
                        "--limit", "60", "--output", str(tmp_path / "a.jsonl"), "--json"],
                       capture_output=True, text=True, timeout=300)
    s = _summary(r)
    assert s["inputs"] == 60 and s["accuracy"] > 0.8
    ids = [json.loads(ln)["id"] for ln in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert ids[:2] == ["test[0]", "test[1]"]
    # the same split, written for a device without the toolchain
    out = tmp_path / "test.npz"
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "split", "--run", str(run_dir), "--split", "test",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert z["x"].shape == (len(splits.test[1]), 1, 8, 8) and (z["y"] == splits.test[1]).all()
        assert list(z["labels"]) == list(splits.labels)
    # a run that is not one: one line from the toolchain's own error
    r = _run_edge(tiny_cascade, tmp_path, "--run", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: --run {tmp_path / 'nope'}: not a run directory (no data.json)"


def _png_folder(run, folder, n):
    from PIL import Image

    folder.mkdir()
    for i in range(n):  # 16x16 8-bit images of 0..16 digits: the feeder resizes them to the bundle's 8x8
        a = np.kron(run.x_test[i, 0], np.ones((2, 2))).astype(np.uint8)
        Image.fromarray(a, mode="L").save(folder / f"{i:03d}.png")


@pytest.mark.broker
def test_feed_sends_a_running_agent_npz_and_images_paced_and_counts_its_answers(mosquitto, tiny_cascade, tmp_path):
    run = tiny_cascade
    user, pw = mosquitto.credentials("dev-b")
    creds = tmp_path / "dev-b.json"
    creds.write_text(json.dumps({"username": user, "password": pw}))
    np.savez(tmp_path / "in.npz", x=run.x_test[:30], y=run.y_test[:30])
    _png_folder(run, tmp_path / "images", 12)
    feed = ["feed", "--device-id", "dev-b", "--broker", mosquitto.url, "--credentials", str(creds), "--json"]
    # nobody is listening yet: the feeder says so instead of sending into the void
    r = _cli(*feed, "--source", str(tmp_path / "in.npz"), "--online-timeout", "1")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: device dev-b is not online on"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    agent = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(run.tarball),
                              "--source", "mqtt:", "--device-id", "dev-b", "--broker", mosquitto.url, "--credentials",
                              str(creds), "--state-dir", str(tmp_path / "s"), "--output", str(tmp_path / "a.jsonl"),
                              "--trust-key", str(release_pub_path()), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        s = _summary(_cli(*feed, "--source", str(tmp_path / "in.npz"), "--rate", "50"))
        assert time.monotonic() - t0 >= 29 / 50
        assert s["sent"] == 30 and s["answered"] == 30 and s["unanswered"] == 0 and s["accuracy"] > 0.8
        assert sum(s["routes"].values()) == 30 and s["rate"] <= 52
        # a folder of images needs the bundle's input spec, and with it is resized and sent
        r = _cli(*feed, "--source", str(tmp_path / "images"))
        assert r.returncode == 2 and "reading a folder needs the bundle's input spec: give --bundle" in r.stderr
        s = _summary(_cli(*feed, "--source", str(tmp_path / "images"), "--bundle", str(run.tarball)))
        assert s["sent"] == 12 and s["answered"] == 12 and s["accuracy"] is None  # no labels in a folder
        wait_for(lambda: len((tmp_path / "a.jsonl").read_text().splitlines()) >= 42, 30, "42 answers on file")
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    answers = [json.loads(ln) for ln in (tmp_path / "a.jsonl").read_text().splitlines()]
    labelled = [a for a in answers if a["true_label"] is not None]  # the feeder's labels reached the agent
    assert len(labelled) == 30 and json.loads(out.strip().splitlines()[-1])["inputs"] == 42
