"""Which onnxruntime providers the ONNX face detector asks for."""

from __future__ import annotations

from pathlib import Path

from likeness.face_detect import session_providers

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
WITH_CUDA = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _gpus(tmp_path: Path, n: int) -> Path:
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    for i in range(n):
        (gpus / f"0000:0{i}:00.0").mkdir()
    return gpus


def test_cuda_first_with_onnxruntime_gpu_and_a_visible_gpu(tmp_path: Path) -> None:
    assert session_providers(WITH_CUDA, _gpus(tmp_path, 1)) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_cpu_where_no_gpu_is_visible(tmp_path: Path) -> None:
    assert session_providers(WITH_CUDA, _gpus(tmp_path, 0)) == ["CPUExecutionProvider"]
    assert session_providers(WITH_CUDA, tmp_path / "absent") == ["CPUExecutionProvider"]


def test_cpu_with_plain_onnxruntime(tmp_path: Path) -> None:
    assert session_providers(CPU_ONLY, _gpus(tmp_path, 1)) == ["CPUExecutionProvider"]
