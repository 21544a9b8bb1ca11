"""The YOLO-folder walkthrough in README.md and docs/toolchain.md: its config loads on a YOLO folder, and every
command is one the tools' parsers accept, with paths that agree with each other and with the config.

Cheap (no training); what the commands do end to end is tests/detection/test_new_user_yolo.py (slow).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "toolchain.md"]


def _block(text: str, name: str, lang: str) -> str:
    m = re.search(rf"<!-- {name}:start -->\s*```{lang}\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert m, f"lost its {name} block"
    return m.group(1)


def _commands(block: str) -> list[list[str]]:
    """Each command line of a bash block (continuations joined, comments dropped) as argv."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_documented_yolo_walkthrough_is_accepted_as_written(doc: Path, tmp_path: Path, monkeypatch) -> None:
    from device_agent.cli import build_parser as agent_parser
    from tests.detection.test_new_user_yolo import user_yolo_folder
    from toolchain.cli import build_parser as toolchain_parser
    from toolchain.config import load_config
    from toolchain.data import load_source

    text = doc.read_text()
    config, commands = _block(text, "yolo-config", "toml"), _commands(_block(text, "yolo-commands", "bash"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lot.toml").write_text(config)
    source = tomllib.loads(config)["data"]["source"]
    assert source.startswith("yolo:")
    folder = source.split(":", 1)[1]
    user_yolo_folder(tmp_path / folder, n=8)  # the folder the config names, as a labelling tool leaves it
    cfg = load_config("lot.toml")
    assert cfg.task.name == "detect"
    raw = load_source(cfg.data)
    assert raw.labels == ("car", "person") and raw.X.shape[1:] == (3, cfg.data.image_size, cfg.data.image_size)

    # every command parses, in the order of the pipeline, and the paths agree with the config and each other
    steps = []
    for argv in commands:
        parser = {"toolchain": toolchain_parser, "device-agent": agent_parser}[argv[0]]()
        args = parser.parse_args(argv[1:])  # an unknown flag or a missing argument exits: the test fails
        steps.append((argv[0], argv[1], argv, args))
        if "--config" in argv:
            assert _arg(argv, "--config") == "lot.toml"
    assert [s[1] for s in steps[:3]] == ["train", "compress", "export"]
    keys = next(argv for prog, cmd, argv, _ in steps if cmd == "keys")[3]
    builds = [argv for prog, cmd, argv, _ in steps if cmd == "build"]
    assert builds and all(_arg(b, "--sign") == keys + ".key" for b in builds)
    built = {f"{cfg.run.dir}/bundles/{_arg(b, '--target')}-{_arg(b, '--precision')}" for b in builds}
    verify = next(argv for prog, cmd, argv, _ in steps if cmd == "verify")
    assert verify[2] in built
    agent = next(argv for prog, cmd, argv, _ in steps if prog == "device-agent")
    assert agent[1] == "run" and _arg(agent, "--bundle") in built
    assert _arg(agent, "--source") == f"{folder}/images" and _arg(agent, "--trust-key") == keys + ".pub"
