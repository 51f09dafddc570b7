"""Importing official checkpoints: synthetic files in each layout (random weights, the real
key names and shapes), a strict load, and renderings / embeddings that must agree."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from likeness.errors import LikenessError
from likeness.manifest import load_manifest, resolve_weights, sha256_file
from tests.engine import reference_nvidia_stylegan2 as nv
from tests.engine.fake_nvidia import fake_generator, nvidia_modules, write_network_pickle
from worker.engine.checkpoints import load_generator
from worker.engine.face import iresnet
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.import_checkpoints import read_checkpoint_file, read_nvidia_pkl
from worker.engine.nvidia_pickle import _rebuild_tensor
from worker.weights_import import import_weights

# ------------------------------------------------------------------ NVIDIA .pkl


@pytest.mark.parametrize(("conv_clamp", "protocol"), [(None, 4), (0.5, 2)])
def test_nvidia_pickle_renders_like_nvidia(
    tmp_path: Path, conv_clamp: float | None, protocol: int
) -> None:
    g_ema = fake_generator(conv_clamp=conv_clamp)
    marker = tmp_path / "source-ran"
    path = tmp_path / "network-snapshot.pkl"
    write_network_pickle(path, g_ema, protocol=protocol, marker=marker)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules

    imported = read_checkpoint_file(path)  # format detected from the bytes
    assert imported.format == "nvidia-pkl"
    g = imported.generator
    assert g.config.resolution == 32 and g.config.channels == [32, 24, 16, 8]
    assert g.config.n_mlp == 3 and g.config.style_dim == 32 and g.config.lr_mlp == 0.01
    assert g.config.conv_clamp == conv_clamp
    assert not marker.exists(), "the pickled source code was executed"

    sd = g_ema.state_dict()
    torch.manual_seed(1)
    z = torch.randn(4, 32)
    ws = torch.randn(4, g.n_latent, 32)  # a different w per layer checks the W+ order too
    with torch.no_grad():
        assert (g.mapping(z) - nv.mapping(sd, z)).abs().max() <= 1e-5
        ours = g.synthesis(ws, g.stored_noise())
        theirs = nv.synthesis(sd, ws, conv_clamp)
        assert (ours - theirs).abs().max() <= 1e-4
        if conv_clamp is not None:  # the clamp is really at work in this case
            assert (nv.synthesis(sd, ws, None) - theirs).abs().max() > 0.1
        # z → image with truncation towards w_avg, NVIDIA's G(z, c, truncation_psi=0.7)
        w = sd["mapping.w_avg"].lerp(nv.mapping(sd, z), 0.7)
        theirs = nv.synthesis(sd, w.unsqueeze(1).repeat(1, g.n_latent, 1), conv_clamp)
        ours = g(z, g.stored_noise(), truncation=0.7, latent_avg=imported.latent_avg)
        assert (ours - theirs).abs().max() <= 1e-4
    assert torch.equal(imported.latent_avg, sd["mapping.w_avg"])


def test_no_code_in_a_pickle_ever_runs(tmp_path: Path) -> None:
    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    # Inside an otherwise good network pickle it is inert ...
    path = tmp_path / "with-payload.pkl"
    write_network_pickle(path, fake_generator(), extra={"payload": Payload()})
    assert read_nvidia_pkl(path).generator.config.resolution == 32
    # ... and as the whole pickle it is refused.
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LikenessError, match="not an NVIDIA network pickle"):
        read_checkpoint_file(path)
    assert not marker.exists()


def test_a_tensor_past_its_storage_is_refused() -> None:
    storage = torch.zeros(4).storage()
    assert _rebuild_tensor(storage, 1, (3,), (1,)).shape == (3,)
    with pytest.raises(pickle.UnpicklingError, match="past the end"):
        _rebuild_tensor(storage, 2, (3,), (1,))
    with pytest.raises(pickle.UnpicklingError, match="typed tensor storage"):
        _rebuild_tensor(b"\x00" * 16, 0, (4,), (1,))


def test_unsupported_nvidia_networks_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "net.pkl"
    write_network_pickle(path, fake_generator(c_dim=4))
    with pytest.raises(LikenessError, match="class-conditional"):
        read_nvidia_pkl(path)
    write_network_pickle(path, fake_generator(architecture="resnet"))
    with pytest.raises(LikenessError, match="'resnet' architecture"):
        read_nvidia_pkl(path)

    with nvidia_modules():
        path.write_bytes(pickle.dumps({"G": fake_generator(), "D": None}))
    with pytest.raises(LikenessError, match="no 'G_ema'"):
        read_nvidia_pkl(path)

    # TensorFlow-era pickles hold dnnlib.tflib.network.Network objects: say how to convert.
    tf = types.ModuleType("dnnlib.tflib.network")

    class Network:
        pass

    Network.__module__, Network.__qualname__ = tf.__name__, "Network"
    tf.Network = Network
    for name in ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network"):
        monkeypatch.setitem(
            sys.modules, name, tf if name.endswith("network") else types.ModuleType(name)
        )
    path.write_bytes(pickle.dumps((Network(), Network(), Network()), protocol=2))
    with pytest.raises(LikenessError, match="legacy.py"):
        read_checkpoint_file(path)


# ------------------------------------------------------------------ the port's .pt


def random_port_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(GeneratorConfig(resolution=32, style_dim=32, n_mlp=2, channels=[32, 24, 16, 8]))
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith(("bias", "noise.weight")):
                p.normal_(0, 0.3)
            if name.endswith("modulation.bias"):
                p.add_(1.0)
    return g.eval()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_port_checkpoint_imports_into_the_manifest(tmp_path: Path, zip_format: bool) -> None:
    g = random_port_generator()
    latent_avg = torch.randn(32)
    source = tmp_path / "stylegan2-tiny-config-f.pt"
    # A training checkpoint of the port: g, d, optimisers and its argparse options too.
    torch.save(
        {
            "g_ema": g.state_dict(),
            "latent_avg": latent_avg,
            "g": g.state_dict(),
            "d": {"convs.0.0.weight": torch.randn(8, 3, 1, 1)},
            "g_optim": {},
            "d_optim": {},
            "args": argparse.Namespace(size=32, latent=32, n_mlp=2),
        },
        source,
        _use_new_zipfile_serialization=zip_format,  # torch < 1.6 wrote the legacy format
    )
    manifest = tmp_path / "weights" / "manifest.json"
    result = import_weights(
        source, into=tmp_path / "weights", manifest_path=manifest, fit_samples=2000, default=True
    )

    entry = result.entry
    assert result.path == tmp_path / "weights" / "stylegan2-tiny-config-f.pt"
    assert entry.file == "stylegan2-tiny-config-f.pt"  # relative: it sits beside the manifest
    assert entry.kind == "generator" and entry.default
    assert entry.sha256 == sha256_file(result.path)
    assert entry.provenance["source_sha256"] == sha256_file(source)
    assert entry.provenance["source_format"] == "port"
    assert "args" in " ".join(entry.provenance["notes"])
    assert entry.provenance["checks"]["reload_render_max_abs_diff"] == 0.0
    assert GeneratorConfig(**entry.config) == g.config
    assert load_manifest(manifest).models == [entry]

    path, found = resolve_weights(entry.name, "generator", manifest)
    loaded = load_generator(path)
    assert found == entry and loaded.sha256 == entry.sha256
    assert loaded.mapping_fit is not None and loaded.mapping_fit.samples == 2000
    assert torch.equal(loaded.latent_avg, latent_avg)
    w = torch.randn(2, g.n_latent, 32)
    with torch.no_grad():
        assert torch.equal(
            loaded.generator.synthesis(w, g.stored_noise()), g.synthesis(w, g.stored_noise())
        )

    with pytest.raises(LikenessError, match="already has"):
        import_weights(source, into=tmp_path / "weights", manifest_path=manifest, fit=False)


def test_port_checkpoint_errors_name_the_tensors(tmp_path: Path) -> None:
    g = random_port_generator()
    state = g.state_dict()
    del state["convs.3.conv.modulation.bias"]
    state["convs.1.activate.bias"] = torch.zeros(5)
    source = tmp_path / "broken.pt"
    torch.save({"g_ema": state, "config": g.config.model_dump()}, source)
    with pytest.raises(LikenessError) as e:
        read_checkpoint_file(source, "port")
    assert "missing 1 tensor(s): convs.3.conv.modulation.bias" in e.value.message
    assert "convs.1.activate.bias (5,) (expected (24,))" in e.value.message

    # Random bytes, but not starting with 0x80: that byte opens a pickle, which is read as
    # one (and fails with a pickle error instead), so os.urandom alone failed 1 run in 256.
    source.write_bytes(b"\x00" + os.urandom(255))
    with pytest.raises(LikenessError, match="not a torch checkpoint"):
        read_checkpoint_file(source)
    with pytest.raises(LikenessError, match="no such file"):
        read_checkpoint_file(tmp_path / "absent.pt")


# ------------------------------------------------------------------ arcface_torch .pth


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100"])
def test_iresnet_depth_is_read_from_the_keys(name: str) -> None:
    state = {}
    for stage, blocks in enumerate(iresnet.LAYERS[name], start=1):
        for b in range(blocks):
            for key in ("bn1.weight", "conv1.weight", "prelu.weight", "conv2.weight"):
                state[f"layer{stage}.{b}.{key}"] = torch.zeros(1)
        state[f"layer{stage}.0.downsample.0.weight"] = torch.zeros(1)
    state |= {"conv1.weight": torch.zeros(1), "bn1.weight": torch.zeros(1)}
    assert iresnet.layers_of(state) == iresnet.LAYERS[name]
    assert iresnet.name_of(iresnet.layers_of(state)) == name
    del state["layer3.0.conv1.weight"]
    with pytest.raises(ValueError, match="layer3"):
        iresnet.layers_of(state)


def test_arcface_backbone_imports_and_embeds_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = iresnet.IResNet((2, 2, 2, 2), num_features=128).eval()  # r18, a narrower embedding
    with torch.no_grad():  # random BN statistics and PReLU slopes, not the init values
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("conv1.weight"):
                t.copy_(
                    torch.rand_like(t) + 0.5
                    if "running_var" in name
                    else torch.randn_like(t) * 0.1 + (1 if name.endswith("weight") else 0)
                )
    source = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, source)  # DataParallel

    manifest = tmp_path / "weights" / "manifest.json"
    result = import_weights(
        source,
        kind="extractor",
        name="arcface-r18",
        into=tmp_path / "imported",
        manifest_path=manifest,
    )
    entry = result.entry
    assert entry.kind == "extractor" and entry.config["name"] == "r18"
    assert entry.config["layers"] == [2, 2, 2, 2] and entry.config["embedding_dim"] == 128
    # Outside the manifest's folder, so recorded by its absolute path.
    assert entry.file == str((tmp_path / "imported" / "arcface-r18.pt").resolve())
    assert entry.sha256 == sha256_file(result.path)
    assert "non-commercial" in entry.provenance["licence"]

    reloaded = iresnet.load_iresnet(result.path)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_arcface_errors_name_the_tensors(tmp_path: Path) -> None:
    state = iresnet.IResNet((2, 2, 2, 2), num_features=64).state_dict()
    del state["layer2.0.bn1.weight"]
    state["fc.bias"] = torch.zeros(3)
    source = tmp_path / "backbone.pth"
    torch.save(state, source)
    with pytest.raises(LikenessError) as e:
        read_checkpoint_file(source)
    assert "missing 1 tensor(s): layer2.0.bn1.weight" in e.value.message
    assert "fc.bias (3,) (expected (64,))" in e.value.message
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, source)
    with pytest.raises(LikenessError, match="neither a StyleGAN2 port checkpoint"):
        read_checkpoint_file(source)
