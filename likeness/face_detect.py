"""MTCNN face detection on onnxruntime, without torch (for the API process).

The three networks are facenet-pytorch's, exported to ONNX by
``likeness weights export-detector``; the cascade around them (image pyramid,
box generation, non-maximum suppression, box regression, square-up, crops)
follows facenet-pytorch's ``detect_face`` step for step, so boxes agree with
the worker's torch detector (tests/face/test_onnx_detector.py measures it).
One image at a time: the API checks one reference photo per request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from likeness.errors import LikenessError
from likeness.manifest import default_manifest, entry_path, load_manifest

STAGES = ("pnet", "rnet", "onet")
# facenet-pytorch's defaults, so both detectors see the same faces.
MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
# Larger photos are shrunk to this side first: detection cost grows with the
# pixel count, and a face under MIN_FACE_SIZE px at this size is too small to
# serve as an identity reference (F sees 112-px crops) anyway.
DETECT_MAX_SIDE = 1024
# facenet-pytorch's landmarks are offset by +1 px from pixel-centre coordinates (a
# 1-based legacy of the MATLAB original); this cascade reproduces them, offset and all.
# Measured on CelebA-HQ: x + x_mirrored = W + 1 rather than W - 1.
MTCNN_OFFSET = 1.0


@dataclass(frozen=True)
class Detections:
    """Faces in one image, largest first (facenet-pytorch's ``select_largest``)."""

    boxes: np.ndarray  # (N, 4) x1, y1, x2, y2 in pixels
    probs: np.ndarray  # (N,)
    landmarks: np.ndarray  # (N, 5, 2) x, y: eyes, nose, mouth corners

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def _area_bounds(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's ``interpolate(mode="area")`` is adaptive average pooling: output
    cell i averages input cells [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out))."""
    i = np.arange(n_out)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def _area_pool(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    # Window sums as differences of a float64 running sum: linear in the
    # image size, and exact enough that float32 results match torch's.
    start, end = _area_bounds(x.shape[axis], n_out)
    csum = np.cumsum(x, axis=axis, dtype=np.float64)
    csum = np.concatenate([np.zeros_like(np.take(csum, [0], axis=axis)), csum], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = n_out
    sums = np.take(csum, end, axis=axis) - np.take(csum, start, axis=axis)
    pooled: np.ndarray = sums / (end - start).reshape(shape)
    return pooled


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 → (C, height, width), as torch's area interpolation."""
    return _area_pool(_area_pool(image, height, 1), width, 2).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return ((x - np.float32(127.5)) * np.float32(0.0078125)).astype(np.float32)


def nms_iou(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision's ``nms``: continuous-coordinate IoU, highest score first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """MTCNN's last-stage NMS: pixel-inclusive areas, overlap over the smaller box."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[(w * h) / np.minimum(area[i], area[rest]) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square about its centre (MTCNN's ``rerec``)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-resized crops of the (clipped) boxes, and which boxes had a non-empty crop."""
    height, width = image.shape[1:]
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], width), np.minimum(b[:, 3], height)
    ok = (ey > y - 1) & (ex > x - 1)
    crops = [
        area_resize(image[:, y[k] - 1 : ey[k], x[k] - 1 : ex[k]], size, size)
        for k in np.flatnonzero(ok)
    ]
    stacked = np.stack(crops) if crops else np.zeros((0, 3, size, size), np.float32)
    return _normalise(stacked), ok


# Where the NVIDIA driver lists the GPUs it sees (in a container too, through the
# NVIDIA Container Toolkit): cheaper than asking CUDA, and torch-free.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def session_providers(available: list[str], gpus: Path = NVIDIA_GPUS) -> list[str]:
    """CUDA first where onnxruntime-gpu is installed and a GPU is visible, else the CPU.

    onnxruntime-gpu also offers CUDA on a host without a GPU, and then prints an error
    for every session before it falls back: ask for CUDA only where it can work.
    """
    has_gpu = gpus.is_dir() and any(gpus.iterdir())
    if "CUDAExecutionProvider" in available and has_gpu:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxMTCNN:
    """The MTCNN cascade on three onnxruntime sessions; thread-safe for ``detect``."""

    def __init__(self, paths: dict[str, Path], *, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a core dependency
            raise LikenessError(
                "detector_unavailable", "onnxruntime is not installed", status=503
            ) from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No arena: the buffers of a large photo go back to the system after each run.
        options.enable_cpu_mem_arena = False
        self._sessions: dict[str, Any] = {}
        providers = session_providers(ort.get_available_providers())
        for stage in STAGES:
            path = paths[stage]
            if not Path(path).is_file():
                raise LikenessError(
                    "detector_missing",
                    f"{stage} detector file {path} is missing; "
                    "run `likeness weights export-detector`",
                    status=503,
                )
            self._sessions[stage] = ort.InferenceSession(str(path), options, providers=providers)
        self._lock = threading.Lock()

    @staticmethod
    def listed_in(manifest_path: Path) -> bool:
        names = {e.name for e in load_manifest(manifest_path).models if e.kind == "detector"}
        return all(f"mtcnn-{s}" in names for s in STAGES)

    @classmethod
    def from_manifest(cls, manifest_path: Path | None = None, *, threads: int = 1) -> OnnxMTCNN:
        """The detector files named ``mtcnn-<stage>`` in a weights manifest."""
        manifest_path = default_manifest(manifest_path)
        entries = {e.name: e for e in load_manifest(manifest_path).models if e.kind == "detector"}
        missing = [s for s in STAGES if f"mtcnn-{s}" not in entries]
        if missing:
            raise LikenessError(
                "detector_missing",
                f"{manifest_path} lists no {', '.join('mtcnn-' + s for s in missing)}; "
                "run `likeness weights export-detector`",
                status=503,
            )
        paths = {s: entry_path(entries[f"mtcnn-{s}"], manifest_path) for s in STAGES}
        return cls(paths, threads=threads)

    def _run(self, stage: str, x: np.ndarray) -> list[np.ndarray]:
        # The cascade's batches are a few hundred crops at most; one run per stage.
        out: list[np.ndarray] = self._sessions[stage].run(None, {"image": x})
        return out

    def detect(self, pixels: np.ndarray, max_side: int | None = DETECT_MAX_SIDE) -> Detections:
        """Faces in an (H, W, 3) uint8 RGB image, in its pixel coordinates."""
        image = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
        height, width = image.shape[1:]
        shrink = 1.0
        if max_side is not None and max(height, width) > max_side:
            shrink = max_side / max(height, width)
            image = area_resize(image, round(height * shrink), round(width * shrink))
        with self._lock:
            found = self._detect(image)
        if shrink == 1.0:
            return found
        return Detections(found.boxes / shrink, found.probs, found.landmarks / shrink)

    def _detect(self, image: np.ndarray) -> Detections:
        height, width = image.shape[1:]
        none = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))

        # Stage 1: PNet over a pyramid whose smallest level still fits a 12-px cell.
        m = 12.0 / MIN_FACE_SIZE
        minl = min(height, width) * m
        scales: list[float] = []
        scale = m
        while minl >= 12:
            scales.append(scale)
            scale *= PYRAMID_FACTOR
            minl *= PYRAMID_FACTOR
        per_scale = []
        for scale in scales:
            level = area_resize(image, int(height * scale + 1), int(width * scale + 1))
            reg, prob = self._run("pnet", _normalise(level[None]))
            boxes = _cells_to_boxes(reg[0], prob[0, 1], scale, THRESHOLDS[0])
            per_scale.append(boxes[nms_iou(boxes[:, :4], boxes[:, 4], 0.5)])
        boxes = np.concatenate(per_scale) if per_scale else np.zeros((0, 9), np.float32)
        if not len(boxes):
            return none
        boxes = boxes[nms_iou(boxes[:, :4], boxes[:, 4], 0.7)]
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        refined = np.stack(
            [
                boxes[:, 0] + boxes[:, 5] * w,
                boxes[:, 1] + boxes[:, 6] * h,
                boxes[:, 2] + boxes[:, 7] * w,
                boxes[:, 3] + boxes[:, 8] * h,
                boxes[:, 4],
            ],
            axis=1,
        )
        boxes = _square(refined)

        # Stage 2: RNet on 24-px crops.
        crops, ok = _crops(image, boxes, 24)
        boxes = boxes[ok]
        if not len(boxes):
            return none
        reg, prob = self._run("rnet", crops)
        keep = prob[:, 1] > THRESHOLDS[1]
        boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], axis=1)
        reg = reg[keep]
        pick = nms_iou(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        if not len(boxes):
            return none

        # Stage 3: ONet on 48-px crops: final boxes and landmarks.
        crops, ok = _crops(image, boxes, 48)
        boxes = boxes[ok]
        if not len(boxes):
            return none
        reg, points, prob = self._run("onet", crops)
        keep = prob[:, 1] > THRESHOLDS[2]
        boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], axis=1)
        reg, points = reg[keep], points[keep]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        landmarks = np.stack(
            [bw * points[:, :5] + boxes[:, :1] - 1, bh * points[:, 5:] + boxes[:, 1:2] - 1],
            axis=2,
        )
        boxes = _regress(boxes, reg)
        pick = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, landmarks = boxes[pick], landmarks[pick]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-area, kind="stable")
        return Detections(
            boxes[order, :4].astype(np.float64),
            boxes[order, 4].astype(np.float64),
            landmarks[order].astype(np.float64),
        )


class SharedDetector:
    """One ``OnnxMTCNN`` for a process, loaded on first use from the first of
    ``manifests`` that lists the detector (the last one's error otherwise)."""

    def __init__(self, manifests: tuple[Path, ...]) -> None:
        self.manifests = manifests
        self._detector: OnnxMTCNN | None = None
        self._lock = threading.Lock()

    def get(self) -> OnnxMTCNN:
        with self._lock:
            if self._detector is None:
                usable = [m for m in self.manifests if OnnxMTCNN.listed_in(m)]
                self._detector = OnnxMTCNN.from_manifest(
                    usable[0] if usable else self.manifests[-1]
                )
            return self._detector

    def detect(self, pixels: np.ndarray, max_side: int | None) -> Detections:
        """Every face in an (H, W, 3) uint8 photo, largest first: boxes, scores, landmarks."""
        return self.get().detect(pixels, max_side=max_side)


def _cells_to_boxes(
    reg: np.ndarray, prob: np.ndarray, scale: float, threshold: float
) -> np.ndarray:
    """PNet's score map → candidate boxes [x1, y1, x2, y2, score, reg×4] in image pixels.

    Each map cell sees a 12-px window with stride 2 at this pyramid level.
    """
    ys, xs = np.nonzero(prob >= threshold)
    cells = np.stack([xs, ys], axis=1).astype(np.float32)
    s = np.float32(scale)
    q1 = np.floor((2 * cells + 1) / s)
    q2 = np.floor((2 * cells + 12) / s)
    return np.concatenate([q1, q2, prob[ys, xs][:, None], reg[:, ys, xs].T], axis=1).astype(
        np.float32
    )
