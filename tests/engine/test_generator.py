from __future__ import annotations

import pytest
import torch

from tests.engine import reference_stylegan2 as ref
from worker.engine.checkpoints import infer_config, load_generator, save_generator
from worker.engine.generator import Generator, GeneratorConfig, StyledConv


def randomized(config: GeneratorConfig, seed: int = 0) -> Generator:
    """A generator whose every parameter is random: zero-initialised biases and
    noise strengths would hide layout mistakes."""
    torch.manual_seed(seed)
    g = Generator(config)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith(("bias", "noise.weight")):
                p.normal_(0, 0.3)
            if name.endswith("modulation.bias"):
                p.add_(1.0)
    return g.eval()


@pytest.mark.parametrize("resolution", [8, 32, 64, 128, 256, 512, 1024])
def test_output_shapes_and_layout(resolution: int) -> None:
    config = GeneratorConfig.slim(
        resolution, channel_max=16, channel_base=4096, style_dim=16, n_mlp=2
    )
    g = Generator(config)
    assert g.n_latent == 2 * config.log_size - 2
    assert len(g.noise_shapes()) == config.num_noise
    assert g.noise_shapes()[-1] == (resolution, resolution)
    w = torch.randn(2, g.n_latent, 16)
    with torch.no_grad():
        img = g.synthesis(w, [torch.zeros(1, 1, h, w_) for h, w_ in g.noise_shapes()])
    assert img.shape == (2, 3, resolution, resolution)
    assert torch.isfinite(img).all()


def test_ffhq_config_matches_the_port_shapes() -> None:
    config = GeneratorConfig.stylegan2(1024, channel_multiplier=2)
    assert config.channels == [512, 512, 512, 512, 512, 256, 128, 64, 32]
    g = Generator(config)
    sd = g.state_dict()
    assert sd["input.input"].shape == (1, 512, 4, 4)
    assert sd["convs.0.conv.weight"].shape == (1, 512, 512, 3, 3)
    assert sd["convs.15.conv.weight"].shape == (1, 32, 32, 3, 3)
    assert sd["to_rgbs.7.conv.weight"].shape == (1, 3, 32, 1, 1)
    assert sd["noises.noise_16"].shape == (1, 1, 1024, 1024)
    assert sd["style.8.weight"].shape == (512, 512)
    assert g.n_latent == 18
    # The well-known size of the FFHQ g_ema: 30.37 M parameters.
    assert sum(p.numel() for p in g.parameters()) == 30_370_060


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ValueError):
        GeneratorConfig(resolution=100, channels=[8] * 6)
    with pytest.raises(ValueError):
        GeneratorConfig(resolution=64, channels=[8] * 3)
    with pytest.raises(ValueError):
        GeneratorConfig.slim(1024, channel_base=256)


@pytest.mark.parametrize(
    "config",
    [
        GeneratorConfig.stylegan2(32, channel_multiplier=1, style_dim=64, n_mlp=3),
        GeneratorConfig.slim(128, channel_max=32, channel_base=1024, style_dim=32, n_mlp=2),
    ],
)
def test_matches_the_ports_fused_formulation(config: GeneratorConfig) -> None:
    g = randomized(config)
    sd = g.state_dict()
    torch.manual_seed(1)
    z = torch.randn(3, config.style_dim)
    noise = [torch.randn(3, 1, h, w) for h, w in g.noise_shapes()]
    with torch.no_grad():
        w_ref = ref.mapping(sd, z, config.lr_mlp)
        torch.testing.assert_close(g.mapping(z), w_ref, atol=1e-5, rtol=1e-5)
        # W+ with distinct rows, so a row-order mistake would show.
        w_plus = w_ref.unsqueeze(1) + 0.3 * torch.randn(3, g.n_latent, config.style_dim)
        ours = g.synthesis(w_plus, noise)
        theirs = ref.synthesis(sd, w_plus, noise)
    assert ours.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_port_layout_checkpoint_round_trip(tmp_path) -> None:
    """A checkpoint with only the port's keys loads strictly, config inferred."""
    config = GeneratorConfig.stylegan2(64, channel_multiplier=1, style_dim=32, n_mlp=4)
    g = randomized(config, seed=3)
    path = tmp_path / "port.pt"
    torch.save({"g_ema": g.state_dict(), "latent_avg": torch.randn(32)}, path)

    inferred = infer_config(torch.load(path, weights_only=True)["g_ema"])
    assert inferred == config
    loaded = load_generator(path)
    assert loaded.mapping_fit is None and loaded.latent_avg is not None
    w = torch.randn(2, g.n_latent, 32)
    noise = [torch.randn(2, 1, h, w_) for h, w_ in g.noise_shapes()]
    with torch.no_grad():
        assert torch.equal(loaded.generator.synthesis(w, noise), g.synthesis(w, noise))


def test_our_checkpoint_keeps_config_and_fp16(tmp_path) -> None:
    config = GeneratorConfig.slim(32, channel_max=16, channel_base=256, style_dim=16, n_mlp=2)
    config = config.model_copy(update={"lr_mlp": 0.1})  # not inferable from shapes
    g = randomized(config)
    save_generator(tmp_path / "g.pt", g, half=True)
    loaded = load_generator(tmp_path / "g.pt")
    assert loaded.generator.config == config
    for (k, a), b in zip(
        g.state_dict().items(), loaded.generator.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a.half().float(), b, msg=k)


def test_truncation_needs_latent_avg() -> None:
    g = Generator(GeneratorConfig.slim(8, channel_max=8, style_dim=8, n_mlp=1))
    with pytest.raises(ValueError):
        g(torch.randn(1, 8), truncation=0.5)


def test_channels_last_gives_the_same_images_in_that_layout() -> None:
    g = randomized(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32))
    w = torch.randn(3, g.n_latent, 32)
    noise = [torch.randn(3, 1, h, w_) for h, w_ in g.noise_shapes()]
    layouts: list[bool] = []
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out: layouts.append(
                out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            )
        )
        for m in g.modules()
        if isinstance(m, StyledConv)
    ]
    with torch.no_grad():
        nhwc = g.synthesis(w, noise, memory_format=torch.channels_last)
        for h in hooks:
            h.remove()
        nchw = g.synthesis(w, noise)
    assert len(layouts) == 7 and all(layouts)  # every conv layer ran channels-last
    torch.testing.assert_close(nhwc, nchw, atol=1e-5, rtol=0)


def test_bf16_autocast_keeps_activations_bf16_and_close_to_fp32() -> None:
    """Biases and noise follow the activations' dtype, so bf16 stays bf16 between convs."""
    g = randomized(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32))
    w = torch.randn(2, g.n_latent, 32)
    noise = [torch.randn(2, 1, h, w_) for h, w_ in g.noise_shapes()]
    dtypes: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        for m in g.modules()
        if isinstance(m, StyledConv)
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = g.synthesis(w, noise)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        full = g.synthesis(w, noise)
    assert set(dtypes) == {torch.bfloat16}
    # bf16 keeps 8 significant bits: a few per cent of the image's range, no more.
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()
