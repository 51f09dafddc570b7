"""`likeness weights import` end to end, in process, on small synthetic checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from likeness.manifest import load_manifest, sha256_file
from tests.engine.fake_nvidia import fake_generator, write_network_pickle
from worker.engine.checkpoints import load_generator

runner = CliRunner()


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nvidia") / "network-snapshot-000100.pkl"
    write_network_pickle(path, fake_generator())
    return path


def test_import_records_the_file_in_the_manifest(tmp_path: Path, network: Path) -> None:
    manifest = tmp_path / "manifest.json"
    args = [
        "weights",
        "import",
        str(network),
        "--into",
        str(tmp_path / "imported"),
        "--manifest",
        str(manifest),
        "--name",
        "tiny-ffhq",
        "--fit-samples",
        "1000",
        "--device",
        "cpu",
        "--default",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    entry = json.loads(r.stdout[r.stdout.index("{") :])
    dest = tmp_path / "imported" / "tiny-ffhq.pt"
    assert entry["name"] == "tiny-ffhq" and entry["kind"] == "generator" and entry["default"]
    assert entry["sha256"] == sha256_file(dest)
    prov = entry["provenance"]
    assert prov["source_file"] == network.name and prov["source_format"] == "nvidia-pkl"
    assert prov["source_sha256"] == sha256_file(network)
    assert "NVIDIA Source Code License-NC" in prov["licence"]
    assert prov["mapping_fit_samples"] == 1000 and prov["latent_avg"] is True
    assert load_manifest(manifest).models[0].name == "tiny-ffhq"
    loaded = load_generator(dest)
    assert loaded.mapping_fit is not None and loaded.latent_avg is not None

    # The same name again: refused unless --force.
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "already has 'tiny-ffhq'" in r.output
    r = runner.invoke(app, [*args, "--force", "--no-fit-mapping", "--licence", "mine"])
    assert r.exit_code == 0, r.output
    [only] = load_manifest(manifest).models
    assert only.provenance["licence"] == "mine" and only.provenance["mapping_fit_samples"] is None


def test_import_errors_are_one_line_and_exit_2(tmp_path: Path, network: Path) -> None:
    common = ["--into", str(tmp_path / "out"), "--manifest", str(tmp_path / "manifest.json")]
    r = runner.invoke(app, ["weights", "import", str(tmp_path / "absent.pkl"), *common])
    assert r.exit_code == 2 and "no such file" in r.output

    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(100))
    r = runner.invoke(app, ["weights", "import", str(junk), *common])
    assert r.exit_code == 2 and "not a torch checkpoint" in r.output

    r = runner.invoke(app, ["weights", "import", str(network), "--kind", "extractor", *common])
    assert r.exit_code == 2 and "not an extractor" in r.output
    r = runner.invoke(app, ["weights", "import", str(network), "--format", "onnx", *common])
    assert r.exit_code == 2 and "unknown format 'onnx'" in r.output
    assert not (tmp_path / "manifest.json").exists()


def test_set_search_records_settings_and_refuses_bad_ones(tmp_path: Path) -> None:
    from likeness.manifest import WeightsEntry, register

    manifest = tmp_path / "manifest.json"
    register(WeightsEntry(name="g", kind="generator", file="g.pt", sha256="0" * 64), manifest)
    ok = runner.invoke(
        app, ["weights", "set-search", "g", "geocross-weight=0.02", "--into", str(tmp_path)]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == {"geocross_weight": 0.02}
    assert load_manifest(manifest).models[0].search == {"geocross_weight": 0.02}
    for bad, message in (
        (["lr"], "expected FIELD=VALUE"),
        (["lr=fast"], "lr"),
        (["speed=2"], "not search settings: speed"),
    ):
        out = runner.invoke(app, ["weights", "set-search", "g", *bad, "--into", str(tmp_path)])
        assert out.exit_code == 2 and message in out.output, out.output
    assert load_manifest(manifest).models[0].search == {"geocross_weight": 0.02}
