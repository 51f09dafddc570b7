"""The CLI end to end on a tiny generator written by the test: in this process (a
subprocess per command would spend most of the suite's time importing torch), and once
through the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from cli.main import app
from worker.engine.checkpoints import save_generator
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.speed import fastest_precision


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def likeness(*args: object) -> Ran:
    """One command, as `likeness ARGS` would run it; an uncaught exception fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
    save_generator(d / "tiny.pt", g)
    Image.fromarray(data.astronaut()).resize((16, 16), Image.Resampling.BICUBIC).save(
        d / "thumb.png"
    )
    return d


def test_inspect_prints_the_config_through_the_entry_point(workdir: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cli", "weights", "inspect", str(workdir / "tiny.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["resolution"] == 32 and info["n_latent"] == 8


def test_upscale_needs_a_mapping_fit_then_works(workdir: Path) -> None:
    out = workdir / "out.png"
    r = likeness("upscale", workdir / "thumb.png", "-o", out, "--weights", workdir / "tiny.pt")
    assert r.returncode == 2 and "fit-mapping" in r.stderr

    r = likeness("weights", "fit-mapping", workdir / "tiny.pt", "--samples", "5000")
    assert r.returncode == 0, r.stderr
    assert (workdir / "tiny.pt.fit.pt").is_file()

    args = [
        "upscale",
        workdir / "thumb.png",
        "-o",
        out,
        "--weights",
        workdir / "tiny.pt",
        "--steps",
        "4",
        "--restarts",
        "2",
        "--seed",
        "5",
        "--device",
        "cpu",
    ]
    r = likeness(*args, "--eps", "1.0")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (32, 32)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["accepted"] is True
    assert report["steps"] == 4 and report["restarts"] == 2 and report["seed"] == 5
    # --precision auto: bf16 where this CPU has bf16 units, fp32 elsewhere; no compile
    assert report["precision"] == fastest_precision("auto", torch.device("cpu"))
    assert report["compiled"] is False and report["geocross_weight"] == 0.05  # PULSE's
    assert report["device"] == "cpu" and len(report["weights"]["sha256"]) == 64
    assert report["downscale_mse"] <= 1.0 and report["seconds"] > 0
    first = out.read_bytes()
    assert likeness(*args, "--eps", "1.0").returncode == 0
    assert out.read_bytes() == first  # same seed, same image
    assert likeness(*args, "--eps", "1.0", "--geocross-weight", "0.2").returncode == 0
    assert json.loads(out.with_suffix(".json").read_text())["geocross_weight"] == 0.2

    r = likeness(*args, "--eps", "1e-9")  # nothing can be that close: rejected
    assert r.returncode == 3
    last = r.stderr.strip().splitlines()[-1]  # above it: the progress bar
    assert last.startswith("error: no face downscales") and "best attempt written" in last
    assert json.loads(out.with_suffix(".json").read_text())["accepted"] is False


def test_bad_inputs_fail_cleanly(workdir: Path) -> None:
    junk = workdir / "junk.png"
    junk.write_bytes(b"not an image")
    r = likeness("upscale", junk, "--weights", workdir / "tiny.pt")
    assert r.returncode == 2 and "not an image" in r.stderr and "Traceback" not in r.stderr
    r = likeness("upscale", workdir / "thumb.png", "--weights", workdir / "nope.pt")
    assert r.returncode == 2 and "neither a file" in r.stderr
    r = likeness("upscale", workdir / "missing.png", "--weights", workdir / "tiny.pt")
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = likeness(
        "upscale", workdir / "thumb.png", "--weights", workdir / "tiny.pt", "--precision", "fp16"
    )
    assert r.returncode == 2 and "fp32 or bf16" in r.stderr and "Traceback" not in r.stderr


def test_a_generators_search_settings_reach_upscale_and_explicit_options_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """`weights set-search eps=…` is what the worker uses; the CLI must not override it."""
    from likeness.manifest import WeightsEntry, register, sha256_file
    from likeness.settings import get_settings
    from worker.engine.mapping_fit import fit_mapping

    folder = tmp_path / "weights"
    folder.mkdir()
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
    save_generator(folder / "mine.pt", g, mapping_fit=fit_mapping(g, 5000))
    register(
        WeightsEntry(
            name="mine",
            kind="generator",
            file="mine.pt",
            sha256=sha256_file(folder / "mine.pt"),
            default=True,
        ),
        folder / "manifest.json",
    )
    r = likeness("weights", "set-search", "mine", "eps=0.5", "--into", folder)
    assert r.returncode == 0, r.stderr
    Image.fromarray(data.astronaut()).resize((16, 16), Image.Resampling.BICUBIC).save(
        tmp_path / "thumb.png"
    )
    monkeypatch.setenv("LIKENESS_WEIGHTS_DIR", str(folder))
    get_settings.cache_clear()  # the variable is read when the settings are first built
    request.addfinalizer(get_settings.cache_clear)  # and later tests must not see this folder

    def upscale(*extra: str) -> dict[str, object]:
        out = tmp_path / "out.png"
        args = ["upscale", tmp_path / "thumb.png", "-o", out, "--steps", "2", "--restarts", "1"]
        r = likeness(*args, "--device", "cpu", *extra)
        assert r.returncode in (0, 3), r.stderr
        return json.loads(out.with_suffix(".json").read_text())

    report = upscale()
    assert report["weights"] == {"name": "mine", "sha256": sha256_file(folder / "mine.pt")}
    assert report["eps"] == 0.5 and "notes" in report and "input_notes" not in report
    assert report["fit_eps"] == 0.5  # nothing tighter set: the search pulled to eps
    assert upscale("--eps", "0.25")["eps"] == 0.25
