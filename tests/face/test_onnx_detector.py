"""The API's torch-free MTCNN (ONNX networks + numpy cascade) against facenet-pytorch's."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from likeness.face_detect import OnnxMTCNN, area_resize
from likeness.manifest import BUNDLED_MANIFEST_PATH, entry_path, load_manifest, sha256_file
from tests.conftest import SHARED
from worker.engine.face.alignment import get_mtcnn
from worker.engine.face.detector_export import export_mtcnn, mtcnn_networks

BOX_TOL_PX = 3.0


@pytest.fixture(scope="module")
def onnx_detector() -> OnnxMTCNN:
    return OnnxMTCNN.from_manifest()


def torch_detect(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes, probs, points = get_mtcnn("cpu").detect(Image.fromarray(pixels), landmarks=True)
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    as_float = [np.asarray(a, dtype=np.float64) for a in (boxes, probs, points)]
    return as_float[0], as_float[1], as_float[2]


def assert_same_faces(ours, pixels: np.ndarray) -> None:
    boxes, probs, points = torch_detect(pixels)
    assert len(ours) == len(boxes)
    np.testing.assert_allclose(ours.boxes, boxes, atol=BOX_TOL_PX)
    np.testing.assert_allclose(ours.probs, probs, atol=1e-3)
    np.testing.assert_allclose(ours.landmarks, points, atol=BOX_TOL_PX)


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat((image * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def scenes() -> dict[str, np.ndarray]:
    astronaut = data.astronaut()
    small = np.asarray(Image.fromarray(astronaut).resize((160, 160), Image.BICUBIC))
    lfw = data.lfw_subset()
    return {
        "astronaut": astronaut,
        "mirrored": np.ascontiguousarray(astronaut[:, ::-1]),
        "padded off-centre": np.pad(astronaut, ((100, 0), (0, 300), (0, 0))),
        "small": small,
        # lfw_subset's 25-px faces sit right at MTCNN's smallest scale.
        **{f"lfw_subset {i}": gray_to_rgb(lfw[i]) for i in (0, 1, 2, 7)},
    }


@pytest.mark.parametrize("name", list(scenes()))
def test_same_faces_as_the_torch_detector(onnx_detector: OnnxMTCNN, name: str) -> None:
    pixels = scenes()[name]
    found = onnx_detector.detect(pixels)
    assert len(found) >= 1, "every scene holds a face"
    assert_same_faces(found, pixels)


@pytest.mark.parametrize("name", ["coffee", "chelsea", "noise"])
def test_no_face_where_the_torch_detector_finds_none(onnx_detector: OnnxMTCNN, name: str) -> None:
    pixels = (
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        if name == "noise"
        else getattr(data, name)()
    )
    assert len(onnx_detector.detect(pixels)) == 0
    assert len(torch_detect(pixels)[0]) == 0


def test_large_photos_are_shrunk_first_and_boxes_scaled_back(onnx_detector: OnnxMTCNN) -> None:
    astronaut = data.astronaut()
    big = np.asarray(Image.fromarray(astronaut).resize((2048, 2048), Image.BICUBIC))
    found = onnx_detector.detect(big, max_side=512)
    reference = onnx_detector.detect(astronaut)
    assert len(found) == 1
    np.testing.assert_allclose(found.boxes, reference.boxes * 4, atol=4 * BOX_TOL_PX)


@pytest.mark.parametrize(("h", "w"), [(308, 308), (13, 19), (24, 24), (700, 600), (48, 48)])
def test_area_resize_is_torch_area_interpolation(h: int, w: int) -> None:
    image = np.random.default_rng(1).uniform(0, 255, (3, 57, 41)).astype(np.float32)
    theirs = F.interpolate(torch.from_numpy(image)[None], size=(h, w), mode="area")[0].numpy()
    np.testing.assert_allclose(area_resize(image, h, w), theirs, atol=1e-3)


def test_export_matches_the_torch_networks(tmp_path) -> None:
    import onnxruntime as ort

    paths = export_mtcnn(tmp_path)
    rng = np.random.default_rng(2)
    sizes = {"pnet": (2, 3, 37, 53), "rnet": (5, 3, 24, 24), "onet": (3, 3, 48, 48)}
    for stage, net in mtcnn_networks().items():
        x = rng.uniform(-1, 1, sizes[stage]).astype(np.float32)
        session = ort.InferenceSession(str(paths[stage]), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x})
        with torch.no_grad():
            want = net(torch.from_numpy(x))
        for g, t in zip(got, want, strict=True):
            np.testing.assert_allclose(g, t.numpy(), atol=1e-5)


def test_bundled_detector_files_match_the_manifest() -> None:
    entries = [e for e in load_manifest().models if e.kind == "detector"]
    assert {e.name for e in entries} == {"mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet"}
    for e in entries:
        assert sha256_file(entry_path(e, BUNDLED_MANIFEST_PATH)) == e.sha256, e.name


@pytest.mark.data
def test_agrees_with_torch_on_lfw(onnx_detector: OnnxMTCNN) -> None:
    with zipfile.ZipFile(SHARED / "data" / "lfw" / "images.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".webp"))[::100][:60]
        images = [np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names]
    agree = 0
    for pixels in images:
        ours = onnx_detector.detect(pixels)
        boxes, _, _ = torch_detect(pixels)
        if len(ours) == len(boxes) and (
            len(boxes) == 0 or np.abs(ours.boxes - boxes).max() <= BOX_TOL_PX
        ):
            agree += 1
    assert agree / len(images) >= 0.95, f"{agree}/{len(images)} images agree"
