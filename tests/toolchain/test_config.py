"""Strict typed config: one clear line naming the field and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecore.errors import ConfigError
from toolchain.cli import main
from toolchain.config import Config, from_dict, load_config, to_toml
from toolchain.passes.prune import PruneTarget
from toolchain.passes.qat import QdqWeightBits

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def test_defaults_file_matches_dataclass_defaults():
    """toolchain.toml at the repo root documents every key with its default."""
    cfg = load_config(REPO / "toolchain.toml")
    assert cfg == Config()
    text = (REPO / "toolchain.toml").read_text()
    import tomllib

    raw = tomllib.loads(text)
    import dataclasses

    for section in dataclasses.fields(Config):
        if section.name in ("source_file", "explicit"):
            continue
        keys = {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
        assert set(raw[section.name]) == keys, section.name


def test_unknown_key_names_field_and_file(tmp_path):
    p = write(tmp_path, "[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match=r"t\.toml: unknown key train\.epochz"):
        load_config(p)


def test_wrong_type(tmp_path):
    p = write(tmp_path, '[train]\nepochs = "many"\n')
    with pytest.raises(ConfigError, match=r"t\.toml: train\.epochs: expected an integer"):
        load_config(p)
    with pytest.raises(ConfigError, match="train.augment: expected a boolean"):
        load_config(write(tmp_path, "[train]\naugment = 1\n"))
    with pytest.raises(ConfigError, match=r"prune\.target: expected one of \['macs', 'params', 'latency'\]"):
        load_config(write(tmp_path, '[prune]\ntarget = "flops"\n'))
    with pytest.raises(ConfigError, match=r"prune\.round_to: must be an integer in \[1, 256\], got 0"):
        load_config(write(tmp_path, "[prune]\nround_to = 0\n"))
    assert load_config(write(tmp_path, "[prune]\nround_to = 8\n")).prune.round_to == 8


def test_refresh_balance_takes_a_mode_and_reads_an_older_boolean(tmp_path):
    from toolchain.config import Balance

    assert load_config(None).refresh.balance is Balance.OVERSAMPLE
    assert load_config(write(tmp_path, '[refresh]\nbalance = "weight"\n')).refresh.balance is Balance.WEIGHT
    assert load_config(write(tmp_path, '[refresh]\nbalance = "none"\n')).refresh.balance is Balance.NONE
    # runs written before the modes stored a boolean: true meant oversampling
    assert load_config(write(tmp_path, "[refresh]\nbalance = true\n")).refresh.balance is Balance.OVERSAMPLE
    assert load_config(write(tmp_path, "[refresh]\nbalance = false\n")).refresh.balance is Balance.NONE
    with pytest.raises(ConfigError, match=r"refresh\.balance: expected one of \['oversample', 'weight', 'none'\]"):
        load_config(write(tmp_path, '[refresh]\nbalance = "sometimes"\n'))
    assert load_config(None).refresh.candidates == 3
    with pytest.raises(ConfigError, match=r"refresh\.candidates: must be 1\.\.16"):
        load_config(write(tmp_path, "[refresh]\ncandidates = 0\n"))
    from toolchain.config import RefreshStrategy

    assert load_config(None).refresh.strategy is RefreshStrategy.EXPERT
    cont = load_config(write(tmp_path, '[refresh]\nstrategy = "continue"\n'))
    assert cont.refresh.strategy is RefreshStrategy.CONTINUE
    with pytest.raises(ConfigError, match=r"refresh\.strategy: expected one of \['expert', 'continue'\]"):
        load_config(write(tmp_path, '[refresh]\nstrategy = "replace"\n'))


def test_missing_path(tmp_path):
    p = write(tmp_path, f'[data]\nsource = "imagefolder:{tmp_path}/nope"\n')
    with pytest.raises(ConfigError, match=r"data\.source: image folder .*nope.* does not exist"):
        load_config(p)


def test_unknown_section_and_family(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[studnet\]"):
        load_config(write(tmp_path, "[studnet]\nx = 1\n"))
    with pytest.raises(ConfigError, match="teacher.family: unknown model family 'vgg'"):
        load_config(write(tmp_path, '[teacher]\nfamily = "vgg"\n'))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, overrides=["train.epochs=3", "qat.weight_bits=7", "prune.target=params",
                                       "teacher.hidden=[16, 8]", "run.dir=/tmp/x"])
    assert cfg.train.epochs == 3 and cfg.qat.weight_bits is QdqWeightBits.SEVEN
    assert cfg.prune.target is PruneTarget.PARAMS and cfg.teacher.hidden == (16, 8)
    assert cfg.run.dir == Path("/tmp/x")
    import tomllib

    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_config(None, overrides=["epochs=3"])


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    p = write(tmp_path, "[train]\nepochz = 3\n")
    rc = main(["train", "--config", str(p)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "unknown key train.epochz" in err[0] and "t.toml" in err[0]
    assert "Traceback" not in "\n".join(err)


def test_compress_passes_and_student_family_are_checked(tmp_path):
    cfg = load_config(write(tmp_path, '[compress]\npasses = ["prune", "ptq"]\n[student]\nfamily = "mobilenet"\n'))
    assert cfg.compress.passes == ("prune", "ptq") and cfg.student.family == "mobilenet"
    assert load_config(write(tmp_path, '[compress]\npasses = ["distill"]\n')).compress.passes == ("distill",)
    for passes, why in (
        ('["prune", "quantize"]', r"compress\.passes: unknown pass 'quantize' \(known: prune, distill, qat, ptq\)"),
        ('["qat", "distill"]', "'qat' must be the last pass"),
        ('["distill", "qat", "ptq"]', "at most one quantizing pass"),
        ('["distill", "distill"]', "'distill' listed twice"),
        ('"prune"', "compress.passes: expected a list"),
    ):
        with pytest.raises(ConfigError, match=rf"t\.toml: {why}" if why.startswith("compress") else why):
            load_config(write(tmp_path, f"[compress]\npasses = {passes}\n"))
    with pytest.raises(ConfigError, match=r"t\.toml: student\.family: unknown model family 'vgg'"):
        load_config(write(tmp_path, '[student]\nfamily = "vgg"\n'))
    with pytest.raises(ConfigError, match="teacher.family: unknown model family 'teacher'"):
        load_config(write(tmp_path, '[teacher]\nfamily = "teacher"\n'))
    with pytest.raises(ConfigError, match=r"qat\.max_steps: must be >= 0"):
        load_config(write(tmp_path, "[qat]\nmax_steps = -1\n"))


def test_accuracy_budget_is_bounded(tmp_path):
    """An artifact may lose (0, 10] points: 100 would pass every artifact, 0 or less none."""
    assert load_config(write(tmp_path, "[build]\naccuracy_budget_pt = 10\n")).build.accuracy_budget_pt == 10.0
    assert load_config(write(tmp_path, "[build]\naccuracy_budget_pt = 0.25\n")).build.accuracy_budget_pt == 0.25
    for bad in ("100", "10.5", "0", "-1"):
        with pytest.raises(ConfigError, match=r"t\.toml: build\.accuracy_budget_pt: must be in \(0, 10\].*, got "):
            load_config(write(tmp_path, f"[build]\naccuracy_budget_pt = {bad}\n"))
    with pytest.raises(ConfigError, match=r"--set: build\.accuracy_budget_pt: must be in \(0, 10\]"):
        load_config(None, overrides=["build.accuracy_budget_pt=100"])


@pytest.mark.parametrize("budget", ["100", "0", "-1", "lots"])
def test_verify_budget_flag_has_the_same_bound(tmp_path, capsys, budget):
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tmp_path), "--budget", budget])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--budget" in err
    assert ("must be in (0, 10]" if budget != "lots" else "expected a number of points") in err


def _value(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("key, high", [
    ("train.epochs", 10_000), ("train.warmup_epochs", 10_000), ("distill.epochs", 10_000), ("qat.epochs", 10_000),
    ("qat.freeze_observer_epoch", 10_000), ("refresh.epochs", 10_000), ("prune.finetune_epochs", 10_000),
    ("prune.steps", 1_000), ("prune.latency_max_candidates", 1_000), ("prune.latency_extra_steps", 1_000),
    ("data.batch_size", 65_536),
])
def test_epochs_and_other_counts_are_bounded(key, high):
    """``train.epochs = 10^23`` is a typo, not a plan: refused before any training starts, naming the key."""
    assert _value(load_config(None, overrides=[f"{key}={high}"]), key) == high
    for bad in (high + 1, 10**23):
        with pytest.raises(ConfigError, match=rf"--set: {key}: must be at most {high:,}, got {bad}"):
            load_config(None, overrides=[f"{key}={bad}"])


def test_counts_keep_their_lower_bounds():
    for key, low in (("train.epochs", 1), ("distill.epochs", 0), ("prune.finetune_epochs", 0),
                     ("train.warmup_epochs", 0), ("data.batch_size", 1)):
        with pytest.raises(ConfigError, match=rf"--set: {key}: must be >= {low}, got {low - 1}"):
            load_config(None, overrides=[f"{key}={low - 1}"])
