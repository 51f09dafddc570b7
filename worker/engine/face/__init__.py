"""Face analysis for the engine: detection, alignment, embedders and heads (F)."""

from .alignment import (
    ARCFACE_112,
    AlignedFaces,
    SPHEREFACE_112x96,
    Template,
    align_faces,
    detect_landmarks,
)
from .extractor import ARCHITECTURES, Architecture, FaceExtractor, FaceOutput, angle
from .heads import CELEBA_ATTRIBUTES, FAIRFACE_RACES, UTKFACE_RACES, AttributeHead, RaceHead
from .iresnet import IResNet, get_backbone
from .mobilefacenet import MobileFaceNet, load_mobilefacenet
from .verification import best_angle_threshold, threshold_accuracy

__all__ = [
    "ARCFACE_112",
    "ARCHITECTURES",
    "CELEBA_ATTRIBUTES",
    "FAIRFACE_RACES",
    "SPHEREFACE_112x96",
    "UTKFACE_RACES",
    "AlignedFaces",
    "Architecture",
    "AttributeHead",
    "FaceExtractor",
    "FaceOutput",
    "IResNet",
    "MobileFaceNet",
    "RaceHead",
    "Template",
    "align_faces",
    "angle",
    "best_angle_threshold",
    "detect_landmarks",
    "get_backbone",
    "load_mobilefacenet",
    "threshold_accuracy",
]
