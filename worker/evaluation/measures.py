"""What F0, F and the judges see in photos and outputs.

Photos and outputs are all in the generator's FFHQ frame (see samples.py), so
both are aligned with the frame's fixed landmarks: the way the search aligns
its candidates and train-extractor aligns CelebA-HQ. A photo and an output of
the same face are then cropped alike, and no MTCNN miss can skew a table.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from worker.engine.face.alignment import fallback_landmarks
from worker.engine.face.extractor import FaceExtractor, angle
from worker.training.judges import JudgeNet, aligned_crops, attribute_decisions, predict

BATCH = 64


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def embed(extractor: FaceExtractor, images: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] → unit embeddings (N, D) on the CPU, no flip: what the
    identity objective compares."""
    device = _device(extractor)
    if not len(images):
        return torch.zeros(0, extractor.embedding_dim)
    out = []
    for chunk in images.split(BATCH):
        n, _, h, w = chunk.shape
        out.append(extractor.embed(chunk.to(device), fallback_landmarks(n, h, w, device)).cpu())
    return torch.cat(out)


def angles_deg(a: Tensor, b: Tensor) -> np.ndarray:
    """Row-wise angles in degrees between two (N, D) sets of embeddings."""
    return angle(a, b, degrees=True).double().numpy()


@torch.no_grad()
def judge_crops(judge: JudgeNet, images: Tensor) -> Tensor:
    """What a judge sees of FFHQ-framed images: 64-px ArcFace-aligned crops on its
    device, rounded to 8 bits as in its training."""
    device = _device(judge)
    return torch.cat(
        [
            aligned_crops(chunk.to(device), None).mul(255).round().clamp(0, 255).byte()
            for chunk in images.split(BATCH)
        ]
    )


@torch.no_grad()
def judge_logits(judge: JudgeNet, images: Tensor) -> Tensor:
    """The judge's logits (N, labels) on the CPU, through its own path (judge_crops)."""
    if not len(images):
        return torch.zeros(0, len(judge.labels))
    return predict(judge, judge_crops(judge, images)).cpu()


@torch.no_grad()
def judge_features(judge: JudgeNet, images: Tensor) -> Tensor:
    """The judge's pooled features (N, C) on the CPU, of the crops judge_logits reads:
    an embedding that neither F nor F0 had a hand in.

    Taken as its head's input, so forward's own normalisation and pooling apply
    (no second copy of them to drift).
    """
    pooled: list[Tensor] = []
    hook = judge.head.register_forward_pre_hook(lambda _m, args: pooled.append(args[0].cpu()))
    try:
        predict(judge, judge_crops(judge, images))
    finally:
        hook.remove()
    return torch.cat(pooled)


def race_predictions(judge: JudgeNet, images: Tensor) -> np.ndarray:
    """The race index (UTKFace's order) the judge sees in each image: (N,)."""
    return judge_logits(judge, images).argmax(1).numpy()


def attribute_predictions(judge: JudgeNet, images: Tensor, names: tuple[str, ...]) -> np.ndarray:
    """0/1 per image and attribute of ``names``, as judged on a balanced set: (N, len(names))."""
    said = attribute_decisions(judge, judge_logits(judge, images))
    columns = [judge.labels.index(n) for n in names]
    return said[:, columns].long().numpy()
