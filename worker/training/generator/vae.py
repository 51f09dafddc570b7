"""The generator as the decoder of a variational autoencoder: train-generator's CPU path.

A GAN needs millions of images seen before its samples look like faces; a
2-core CPU shows it tens per second. Reconstruction gives the generator a
direct signal for every pixel of every image, so a few epochs of CelebA-HQ
already make faces (blurry ones). The encoder maps a real face to a Gaussian
over z; z goes through the mapping network and the synthesis exactly as a
sampled z does, and the KL term pulls the codes toward N(0, I) so that
z ~ N(0, I) decodes to faces too. The losses weigh what the search needs: the
16- and 32-px downscales (the search's own operator), the identity seen by
MobileFaceNet and, optionally, the race that F's race head reads in the photo,
besides the pixels: a reconstruction loss alone lets the decoder drop the
small differences of eye, nose and lip shape that tell races apart, because
they cost few pixels. ``objective="vae-gan"`` adds StyleGAN2's
adversarial terms to sharpen the result.

The KL term alone does not make z ~ N(0, I) decode to faces here: the mapping
starts with PixelNorm, so only z's direction reaches the synthesis, and the
encoder is free to crowd every face into one cone of directions (its KL cost is
the same as spreading them). So the exported generator's prior is fitted after
the fact (ex-post density estimation, as in Ghosh et al. 2020, "From
Variational to Deterministic Autoencoders"): the training loop keeps running
moments of the encoded faces' w (before the mapping's last activation), and
``set_mapping_to_gaussian`` rewrites the mapping network, in closed form, so
that z ~ N(0, I) maps onto that Gaussian. Samples, the latent average and the
search's mapping fit then all live where the encoded faces do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from worker.engine.downscale import downscale
from worker.engine.face.alignment import fallback_landmarks
from worker.engine.face.extractor import FaceExtractor
from worker.engine.generator import ACT_GAIN, EqualLinear, Generator, GeneratorConfig
from worker.engine.mapping_fit import undo_activation
from worker.training.generator.discriminator import Discriminator
from worker.training.generator.measurement import measured_mean
from worker.training.generator.perceptual import perceptual_distance

# Downscaled sizes whose MSE the reconstruction loss includes: the thumbnails
# the product upscales.
LOWRES_SIZES = (16, 32)
# log-variance bounds: keep exp() finite in the first steps of a fresh encoder
LOGVAR_RANGE = (-12.0, 6.0)


def build_encoder(config: GeneratorConfig) -> Discriminator:
    """Image → (mean, log-variance) of z: D's residual trunk with 2·style_dim outputs."""
    return Discriminator(config, stddev_group=0, out_dim=2 * config.style_dim)


def encode(encoder: Discriminator, images: Tensor) -> tuple[Tensor, Tensor]:
    mu, logvar = encoder(images).chunk(2, dim=1)
    return mu, logvar.clamp(*LOGVAR_RANGE)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, I)) in nats per image: (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def decode(G: Generator, z: Tensor) -> tuple[Tensor, Tensor]:
    """z → (image, w), the same w at every layer (as a sample from the prior is made)."""
    w = G.mapping(z)
    return G.synthesis(w.unsqueeze(1).expand(-1, G.n_latent, -1)), w


class CodeMoments:
    """Exponential moving mean and second moment of the encoded faces' w, taken
    before the mapping's last activation (where it is roughly Gaussian).

    ``decay`` per batch: 0.999 averages over the last ~1,000 batches, long
    enough for a full covariance, short enough to follow the training."""

    def __init__(self, dim: int, decay: float = 0.999) -> None:
        self.decay = decay
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.second = torch.zeros(dim, dim, dtype=torch.float64)
        self.weight = 0.0  # the EMA's total weight, for bias correction early on

    @torch.no_grad()
    def update(self, w: Tensor) -> None:
        x = undo_activation(w.detach()).double().cpu()
        a = 1.0 - self.decay
        self.mean.mul_(self.decay).add_(x.mean(0), alpha=a)
        self.second.mul_(self.decay).add_(x.T @ x / len(x), alpha=a)
        self.weight = self.decay * self.weight + a

    def gaussian(self) -> tuple[Tensor, Tensor]:
        """(mean, covariance) of the codes seen so far."""
        if self.weight <= 0:
            raise ValueError("no codes seen yet")
        mean = self.mean / self.weight
        cov = self.second / self.weight - torch.outer(mean, mean)
        return mean, (cov + cov.T) / 2

    @classmethod
    def exact(cls, codes: Tensor) -> CodeMoments:
        """Moments of these codes (N, dim), each weighing the same: no decay."""
        x = codes.double()
        moments = cls(x.shape[1])
        moments.mean, moments.second, moments.weight = x.mean(0), x.T @ x / len(x), 1.0
        return moments

    def state_dict(self) -> dict[str, object]:
        return {
            "mean": self.mean,
            "second": self.second,
            "weight": self.weight,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.second = state["mean"].double(), state["second"].double()
        self.weight, self.decay = float(state["weight"]), float(state["decay"])


@torch.no_grad()
def encoded_codes(E: Discriminator, G: Generator, images: Iterable[Tensor], seed: int) -> Tensor:
    """The w (before the mapping's last activation) that the encoder gives these
    faces, one posterior draw each as in training, from its own seeded generator so
    that a training run's random streams stay untouched: (N, style_dim) on the CPU."""
    rng = torch.Generator().manual_seed(seed)
    device = next(E.parameters()).device
    out = []
    for real in images:
        mu, logvar = encode(E, real.to(device))
        noise = torch.randn(mu.shape, generator=rng).to(device)
        out.append(undo_activation(G.mapping(mu + noise * (0.5 * logvar).exp())).cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(E: Discriminator, G: Generator, images: Tensor, batch: int = 16) -> Tensor:
    """The autoencoder's reconstructions (in [0, 1]) of faces in [0, 1], from the encoder's
    mean code (no posterior draw): what the decoder can render of a face when the code is
    given, so no search stands between the measure and the generator. The generator's
    stored noise maps, not fresh draws: the same faces give the same pictures."""
    device = next(G.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        mu, _ = encode(E, images[i : i + batch].to(device) * 2 - 1)
        w = G.mapping(mu).unsqueeze(1).expand(-1, G.n_latent, -1)
        out.append(((G.synthesis(w, noise=G.stored_noise()) + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def set_mapping_to_gaussian(G: Generator, mean: Tensor, cov: Tensor) -> None:
    """Make ``G.mapping(z)``, z ~ N(0, I), equal ``gain·leaky_relu(x)`` with
    x ~ N(mean, cov): the layout and the layers stay, only their values change.

    PixelNorm puts z on the sphere of radius sqrt(d), whose covariance is also
    I, so x = A·ẑ + mean with A the Cholesky factor of ``cov``. The first layer
    computes A·ẑ plus a shift that keeps every pre-activation positive (|A_i·ẑ|
    ≤ |A_i|·sqrt(d)), where the leaky ReLU is linear; the middle layers pass
    that on unchanged; the last removes the shift, adds the mean and applies
    the one activation that is meant to act.
    """
    layers = [m for m in G.style if isinstance(m, EqualLinear)]
    if len(layers) < 2:
        raise ValueError("the mapping needs at least two layers to hold a Gaussian")
    d = mean.numel()
    cov = cov.double()
    jitter = 1e-5 * float(cov.diagonal().mean()) + 1e-8
    a = torch.linalg.cholesky(cov + jitter * torch.eye(d, dtype=torch.float64))
    shift = a.norm(dim=1) * d**0.5 + 1.0
    eye = torch.eye(d, dtype=torch.float64) / ACT_GAIN
    values = [(a, shift)] + [(eye, torch.zeros(d, dtype=torch.float64))] * (len(layers) - 2)
    values.append((eye, mean.double() - shift))
    for layer, (weight, bias) in zip(layers, values, strict=True):
        layer.weight.copy_((weight / layer.scale).to(layer.weight.dtype))
        layer.bias.copy_((bias / layer.lr_mul).to(layer.bias.dtype))


def load_face_model(path: Path, device: torch.device) -> FaceExtractor:
    """The frozen MobileFaceNet behind the identity term."""
    face = FaceExtractor.mobilefacenet(path).to(device).eval()
    return face.requires_grad_(False)


def face_embedding(face: FaceExtractor, images: Tensor) -> Tensor:
    """Embeddings of FFHQ-framed faces in [-1, 1], aligned at the frame's fixed
    landmarks: no detector in the loop, and a differentiable warp."""
    b, _, h, w = images.shape
    landmarks = fallback_landmarks(b, h, w, images.device)
    return face.embed((images + 1) / 2, landmarks)


def reconstruction_terms(
    fake: Tensor,
    real: Tensor,
    mask: Tensor,
    face: FaceExtractor | None,
    perceptual: bool = False,
    race: FaceExtractor | None = None,
) -> dict[str, Tensor]:
    """Unweighted per-batch terms over the pixels ``mask`` marks as measured: pixel L1
    (in [-1, 1]), MSE of the downscales (in [0, 1], as the search measures, weighted by
    the downscaled mask), 1 - cos of the face embeddings, with ``perceptual`` the
    distance of the face network's feature maps and, with ``race`` (an F with a race
    head), ``race_divergence``."""
    # The fake pasted into the real where the real was measured: elsewhere both images
    # are the real's own pixels, so no term (and no gradient) reaches the fake there,
    # at any resolution, and the feature maps need no mask of their own.
    seen = mask * fake + (1 - mask) * real
    terms = {"l1": measured_mean((seen - real).abs(), mask)}
    seen01, real01 = (seen + 1) / 2, (real + 1) / 2
    # (a smoke run smaller than a thumbnail has no downscale term: zero)
    terms["lowres"] = sum(
        measured_mean(
            (downscale(seen01, (s, s)) - downscale(real01, (s, s))).pow(2),
            downscale(mask, (s, s)),
        )
        for s in LOWRES_SIZES
        if s < real.shape[-1]
    ) + real.new_zeros(())
    if face is not None:
        with torch.no_grad():
            target = face_embedding(face, real)
        terms["identity"] = 1.0 - (face_embedding(face, seen) * target).sum(1).mean()
        if perceptual:
            terms["perceptual"] = perceptual_distance(face, seen, real).mean()
    if race is not None:
        terms["race"] = race_divergence(race, seen, real).mean()
    return terms


def race_logits(extractor: FaceExtractor, images: Tensor) -> Tensor:
    """F's race logits of FFHQ-framed faces in [-1, 1], aligned at the frame's fixed
    landmarks (differentiable, as ``face_embedding``)."""
    b, _, h, w = images.shape
    logits = extractor((images + 1) / 2, fallback_landmarks(b, h, w, images.device)).race_logits
    if logits is None:
        raise ValueError("the race term needs an extractor with a race head")
    return logits.float()


def race_divergence(extractor: FaceExtractor, fake: Tensor, real: Tensor) -> Tensor:
    """KL(p_real ‖ p_fake) of F's race readings, per image (B,): distillation toward what
    F reads in the photo, not toward a label, so it needs none, asks no more certainty
    than the photo gives, and applies to every face in the data."""
    with torch.no_grad():
        target = race_logits(extractor, real).log_softmax(1)
    log_p = race_logits(extractor, fake).log_softmax(1)
    return (target.exp() * (target - log_p)).sum(1)
