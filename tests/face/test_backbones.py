import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine.face.extractor import FaceExtractor, angle
from worker.engine.face.iresnet import get_backbone
from worker.engine.face.mobilefacenet import MobileFaceNet, fold_batch_norms, load_mobilefacenet

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CKPT = SHARED / "weights" / "mobilefacenet_casia_068.ckpt"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


def insightface_iresnet_layout(layers: tuple[int, ...], features: int = 512) -> dict[str, tuple]:
    """Key → shape of arcface_torch's IResNet state_dict, written out from its layout
    (stem conv1/bn1/prelu; layerN of IBasicBlocks bn1, conv1, bn2, prelu, conv2, bn3
    and, on each first block, downsample.0 conv 1×1 + downsample.1 BN; bn2; fc; features)."""
    keys: dict[str, tuple] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    keys["prelu.weight"] = (64,)
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            bn(f"{p}.bn1", inplanes)
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.prelu.weight"] = (planes,)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
            inplanes = planes
    bn("bn2", 512)
    keys["fc.weight"] = (features, 512 * 7 * 7)
    keys["fc.bias"] = (features,)
    bn("features", features)
    return keys


@pytest.mark.parametrize(
    "name,layers", [("r18", (2, 2, 2, 2)), ("r34", (3, 4, 6, 3)), ("r50", (3, 4, 14, 3))]
)
def test_iresnet_state_dict_layout_matches_insightface(name: str, layers: tuple) -> None:
    model = get_backbone(name)
    expected = insightface_iresnet_layout(layers)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected


def test_iresnet_strict_load_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (torch.tensor(7) if shape == () else torch.randn(shape, generator=gen))
        for k, shape in insightface_iresnet_layout((2, 2, 2, 2)).items()
    }
    model = get_backbone("iresnet18")
    model.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(RuntimeError):
        model.load_state_dict({**state, "extra.weight": torch.zeros(1)}, strict=True)


def test_iresnet_forward_shape_and_unknown_name() -> None:
    model = get_backbone("r18").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    with pytest.raises(ValueError, match="unknown IResNet"):
        get_backbone("r7")


def test_mobilefacenet_shape_and_size() -> None:
    model = MobileFaceNet().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 96))
    assert out.shape == (2, 128)
    # The published checkpoint's trainable parameter count.
    assert sum(p.numel() for p in model.parameters()) == 999_552
    assert len(model.state_dict()) == 333


def test_angle() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    deg = angle(a, b, degrees=True)
    assert torch.allclose(deg, torch.tensor([90.0, 180.0, 0.0]), atol=0.2)
    assert torch.allclose(angle(a, b)[0], torch.tensor(math.pi / 2))
    deg.sum().backward()
    assert torch.isfinite(b.grad).all()


@pytest.mark.data
@needs_shared
def test_mobilefacenet_checkpoint_loads_strict() -> None:
    raw = torch.load(CKPT, map_location="cpu", weights_only=True)["net_state_dict"]
    model = load_mobilefacenet(CKPT)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k


@pytest.mark.data
@needs_shared
def test_pretrained_mobilefacenet_separates_lfw_identities() -> None:
    names = [
        "George_W_Bush_0001.webp",
        "George_W_Bush_0002.webp",
        "Colin_Powell_0001.webp",
        "Colin_Powell_0002.webp",
    ]
    with zipfile.ZipFile(SHARED / "data" / "lfw" / "images.zip") as zf:
        from PIL import Image

        arrays = [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
    model = FaceExtractor.mobilefacenet(CKPT).eval()
    with torch.no_grad():
        emb = model.embed(images, flip=True)
    same = angle(emb[[0, 2]], emb[[1, 3]], degrees=True)
    diff = angle(emb[[0, 1]], emb[[2, 3]], degrees=True)
    # About 72° is the LFW threshold for this model (bench/lfw_verification.py).
    assert same.max() < 65 < 75 < diff.min(), (same, diff)


def test_folded_batch_norms_give_the_same_embedding_and_input_gradient() -> None:
    torch.manual_seed(0)
    model = MobileFaceNet()
    for m in model.modules():  # statistics far from the identity, so a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(3, 3, 112, 96, requires_grad=True)
    want = model(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    got = folded(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-4)


def test_batch_norms_are_not_folded_in_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(MobileFaceNet().train())
