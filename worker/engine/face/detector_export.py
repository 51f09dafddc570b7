"""Export facenet-pytorch's MTCNN networks to ONNX for the torch-free API.

The weights are the ones facenet-pytorch ships inside its wheel (no
download). The cascade logic is not exported: ``likeness.face_detect``
re-implements it in numpy around the three exported networks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

# Fixed example sizes for tracing; every spatial axis of PNet and the batch axis
# of all three are dynamic in the exported graphs.
_EXAMPLES = {"pnet": (1, 3, 24, 24), "rnet": (2, 3, 24, 24), "onet": (2, 3, 48, 48)}
_OUTPUTS = {"pnet": ["reg", "prob"], "rnet": ["reg", "prob"], "onet": ["reg", "landmarks", "prob"]}
OPSET = 17


def mtcnn_networks() -> dict[str, nn.Module]:
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    for net in nets.values():
        net.eval()
    return nets


def export_mtcnn(into: Path) -> dict[str, Path]:
    """Write ``mtcnn_<stage>.onnx`` for each stage into ``into``; returns the paths."""
    into.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for stage, net in mtcnn_networks().items():
        dynamic = {0: "batch", 2: "height", 3: "width"} if stage == "pnet" else {0: "batch"}
        axes = {"image": dynamic} | {name: {0: "batch"} for name in _OUTPUTS[stage]}
        path = into / f"mtcnn_{stage}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated but needs no onnxscript, and
            # these three small CNNs trace exactly.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                net,
                (torch.zeros(_EXAMPLES[stage]),),
                str(path),
                dynamo=False,
                input_names=["image"],
                output_names=_OUTPUTS[stage],
                dynamic_axes=axes,
                opset_version=OPSET,
            )
        paths[stage] = path
    return paths
