from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker.engine import search
from worker.engine.downscale import downscale
from worker.engine.generator import Generator, GeneratorConfig
from worker.engine.mapping_fit import MappingFit, fit_mapping, undo_activation
from worker.engine.search import (
    ExtraTerms,
    SearchConfig,
    SearchStopped,
    _choose,
    geocross,
    latent_search,
    lr_factor,
    project_to_sphere,
    run_search,
    synthesis_fn,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[Generator, MappingFit]:
    torch.manual_seed(0)
    g = (
        Generator(GeneratorConfig.slim(32, channel_max=32, channel_base=512, style_dim=32, n_mlp=2))
        .eval()
        .requires_grad_(False)
    )
    return g, fit_mapping(g, samples=20_000, batch=5_000)


def test_projection_keeps_initial_norms() -> None:
    v = torch.randn(3, 4, 512)
    radius = (v.pow(2).sum(-1, keepdim=True) + 1e-9).sqrt()
    v2 = v * torch.rand(3, 4, 1) * 5
    project_to_sphere(v2, radius)
    torch.testing.assert_close(v2.norm(dim=-1, keepdim=True), radius)
    noise = torch.randn(2, 1, 8, 8)
    r = (noise.pow(2).sum((2, 3), keepdim=True) + 1e-9).sqrt()
    noise2 = noise * 3
    project_to_sphere(noise2, r)
    torch.testing.assert_close(noise2, noise)


def test_geocross_is_zero_for_identical_rows_and_grows_with_spread() -> None:
    row = torch.randn(1, 1, 512)
    same = row.expand(2, 18, 512)
    assert geocross(same).abs().max() < 1e-6
    spread = torch.randn(2, 18, 512)
    assert (geocross(spread) > geocross(same) + 1).all()
    # orthogonal pair: angle pi/2 on the two off-diagonal entries of 4
    ortho = torch.zeros(1, 2, 512)
    ortho[0, 0, 0] = ortho[0, 1, 1] = 1
    expected = (torch.pi / 2) ** 2 * 2 / 4 * 512 / 8
    torch.testing.assert_close(geocross(ortho), torch.tensor([expected]))


def test_lr_schedule_is_pulses_linear_1cycle_then_drop() -> None:
    assert lr_factor(0, 100, "linear1cycledrop") == pytest.approx(0.1)
    assert lr_factor(45, 100, "linear1cycledrop") == pytest.approx(1.0)
    assert lr_factor(90, 100, "linear1cycledrop") == pytest.approx(0.1)
    assert lr_factor(99, 100, "linear1cycledrop") == pytest.approx(0.1 + 0.9 * (0.001 - 0.1))
    assert lr_factor(37, 100, "fixed") == 1.0


def test_eps_rule_and_choice_per_thumbnail() -> None:
    # 2 thumbnails x 3 restarts: the first has accepted restarts 1 and 2 (2 has the lower
    # loss), the second none (restart 0 has the lowest MSE, though not the lowest loss).
    mse = torch.tensor([0.010, 0.0019, 0.002, 0.004, 0.009, 0.005])
    loss = torch.tensor([1.0, 0.9, 0.5, 3.0, 0.1, 2.0])
    img = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    r = _choose(img, mse, loss, torch.zeros(6, 1, 1), {}, 2, 3, SearchConfig(), 0)
    assert r.accepted.tolist() == [True, False]
    assert r.restart.tolist() == [2, 0]
    assert r.candidate_accepted.tolist() == [[False, True, True], [False, False, False]]
    torch.testing.assert_close(r.mse, torch.tensor([0.002, 0.004]))
    assert r.images[1].max() == 1.0  # image 3 clamped to [0, 1]


def test_mapping_fit_undoes_the_last_activation_exactly(tiny) -> None:
    g, fit = tiny
    w = g.mapping(torch.randn(64, 32))
    torch.testing.assert_close(fit.to_w(fit.from_w(w)), w, atol=1e-5, rtol=1e-5)
    pre = undo_activation(g.mapping(torch.randn(20_000, 32)))
    torch.testing.assert_close(fit.mean, pre.mean(0), atol=0.05, rtol=0.05)
    torch.testing.assert_close(fit.std, pre.std(0), atol=0.05, rtol=0.05)


def _target(g: Generator, seed: int, size: int = 8) -> torch.Tensor:
    """A thumbnail of a face the generator can make (so a good search can match it)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        img = (
            g(torch.randn(2, 32), noise=[torch.zeros(1, 1, h, w) for h, w in g.noise_shapes()]) + 1
        ) / 2
    return downscale(img.clamp(0, 1), size)


def test_search_lowers_the_error_and_is_reproducible(tiny) -> None:
    g, fit = tiny
    thumbs = _target(g, 1)
    config = SearchConfig(steps=40, restarts=2, seed=7)
    history = []
    result = run_search(g, fit, thumbs, config, on_step=lambda s: history.append(s.best_mse))
    assert len(history) == 40
    assert (history[-1] < 0.5 * history[0]).all()
    assert result.images.shape == (2, 3, 32, 32)
    assert result.candidates.shape == (2, 2, 3, 32, 32)
    assert (result.mse == result.candidate_mse.gather(1, result.restart[:, None])[:, 0]).all()
    assert result.accepted.tolist() == (result.mse <= config.eps).tolist()
    again = run_search(g, fit, thumbs, config)
    assert torch.equal(result.images, again.images)
    other = run_search(g, fit, thumbs, config.model_copy(update={"seed": 8}))
    assert not torch.equal(result.images, other.images)


def test_elements_do_not_influence_each_other(tiny) -> None:
    g, fit = tiny
    a, b = _target(g, 2), _target(g, 3)
    config = SearchConfig(steps=5, restarts=1, seed=0)
    r1 = run_search(g, fit, torch.stack([a[0], b[0]]), config)
    r2 = run_search(g, fit, torch.stack([a[0], b[1]]), config)
    torch.testing.assert_close(r1.images[0], r2.images[0], atol=1e-6, rtol=0)
    assert not torch.allclose(r1.images[1], r2.images[1])


def test_accepts_when_within_eps(tiny) -> None:
    g, fit = tiny
    thumbs = _target(g, 4)
    loose = run_search(g, fit, thumbs, SearchConfig(steps=3, restarts=1, seed=0, eps=1.0))
    assert loose.accepted.all()
    strict = run_search(g, fit, thumbs, SearchConfig(steps=3, restarts=1, seed=0, eps=1e-9))
    assert not strict.accepted.any()


def test_fit_eps_pulls_below_the_acceptance_eps(tiny) -> None:
    """With eps loose enough to accept anything, the downscale loss is flat and only
    fit_eps keeps the search fitting the thumbnail; acceptance still follows eps."""
    g, fit = tiny
    thumbs = _target(g, 4)
    flat = SearchConfig(steps=30, restarts=2, seed=0, eps=1.0)
    loose = run_search(g, fit, thumbs, flat)
    pulled = run_search(g, fit, thumbs, flat.model_copy(update={"fit_eps": 1e-6}))
    assert loose.accepted.all() and pulled.accepted.all()
    assert (pulled.mse < 0.5 * loose.mse).all()
    assert search.pull_eps(SearchConfig(eps=1e-3, fit_eps=5e-3)) == 1e-3
    assert search.pull_eps(SearchConfig(eps=1e-3, fit_eps=5e-4)) == 5e-4
    assert search.pull_eps(SearchConfig(eps=1e-3)) == 1e-3


def test_an_unset_fit_eps_leaves_the_stored_keys_as_they_were() -> None:
    before = SearchConfig().model_dump(mode="json")
    del before["fit_eps"]
    assert search.config_key(SearchConfig()) == before
    assert search.config_key(SearchConfig(fit_eps=1e-4))["fit_eps"] == 1e-4


def test_can_be_stopped_between_steps(tiny) -> None:
    g, fit = tiny
    seen = []
    with pytest.raises(SearchStopped):
        run_search(
            g,
            fit,
            _target(g, 5),
            SearchConfig(steps=50, restarts=1, seed=0),
            on_step=lambda s: seen.append(s.step) or s.step < 3,
        )
    assert seen == [1, 2, 3]


def test_extra_loss_terms_enter_the_objective(tiny) -> None:
    g, fit = tiny
    thumbs = _target(g, 6)
    brightness = lambda img: {"dark": 10.0 * img.mean((1, 2, 3))}  # noqa: E731
    config = SearchConfig(steps=20, restarts=1, seed=0)
    plain = run_search(g, fit, thumbs, config)
    steered = run_search(g, fit, thumbs, config, extra_loss=brightness)
    assert "dark" in steered.terms and "dark" not in plain.terms
    assert steered.images.mean() < plain.images.mean()


def test_constraints_reject_candidates_per_element(tiny) -> None:
    """A candidate over a constraint's limit is rejected even within eps (race/attribute rule)."""
    g, fit = tiny
    thumbs = _target(g, 11)  # two thumbnails
    k = 3
    # Thumbnail 0's restart 1 and all of thumbnail 1's restarts break the constraint.
    broken = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.5, 0.5])

    def constrained(img: torch.Tensor) -> ExtraTerms:
        return ExtraTerms(
            {"steer": 0.0 * img.mean((1, 2, 3))}, {"race": broken + 0 * img.sum()}, {"race": 0.1}
        )

    config = SearchConfig(steps=3, restarts=k, seed=0, eps=10.0)  # every MSE within eps
    result = run_search(g, fit, thumbs, config, extra_loss=constrained)
    assert result.candidate_accepted.tolist() == [[True, False, True], [False, False, False]]
    assert result.accepted.tolist() == [True, False]
    assert int(result.restart[0]) in (0, 2)
    assert result.constraints["race"].tolist() == broken.view(2, k).tolist()
    assert result.limits == {"race": 0.1}


def test_a_step_that_meets_the_rules_beats_a_lower_loss_that_does_not(tiny) -> None:
    """The total loss falls every step, but only step 1 meets the constraint: ranking by
    loss alone would keep the last step and reject the restart."""
    g, fit = tiny
    calls = []

    def falling(img: torch.Tensor) -> ExtraTerms:
        calls.append(None)
        n = img.shape[0]
        step = float(len(calls))
        return ExtraTerms(
            {"falling": torch.full((n,), 100.0 - 10 * step) + 0 * img.mean()},
            {"race": torch.full((n,), 0.0 if step == 1 else 1.0)},
            {"race": 0.1},
        )

    config = SearchConfig(steps=5, restarts=2, seed=0, eps=10.0)  # every MSE within eps
    result = run_search(g, fit, _target(g, 12), config, extra_loss=falling)
    assert result.accepted.all()
    assert (result.terms["falling"] == 90.0).all()
    assert (result.constraints["race"] == 0).all()


def test_first_noise_maps_trainable_and_finest_zero(tiny) -> None:
    g, fit = tiny
    gen = latent_search(g, fit, _target(g, 7), SearchConfig(steps=1, restarts=1, seed=0))
    frame = gen.gi_frame
    next(gen)
    noise = frame.f_locals["noise"]
    trainable = frame.f_locals["trainable"]
    assert len(trainable) == 5 and all(t.requires_grad for t in trainable)
    assert all(t is noise[i] for i, t in enumerate(trainable))
    assert not noise[-1].any() and not noise[-1].requires_grad
    assert not noise[5].requires_grad and noise[5].any()


def test_a_job_batched_with_others_gets_the_image_it_gets_alone(tiny) -> None:
    """Per-thumbnail seeds: a batch of jobs equals each job searched alone with its seed."""
    g, fit = tiny
    thumbs = torch.cat([_target(g, 8)[:1], _target(g, 9)[:1], _target(g, 10)[:1]])
    seeds = [11, 22, 33]
    config = SearchConfig(steps=3, restarts=2)
    batched = run_search(g, fit, thumbs, config, seeds=seeds)
    assert batched.seeds == seeds
    for i, seed in enumerate(seeds):
        alone = run_search(g, fit, thumbs[i : i + 1], config.model_copy(update={"seed": seed}))
        torch.testing.assert_close(batched.candidates[i], alone.candidates[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.candidate_mse[i], alone.candidate_mse[0])
        assert int(batched.restart[i]) == int(alone.restart[0])
    # Without per-job seeds the shared seed gives the thumbnails different starts than alone.
    shared = run_search(g, fit, thumbs, config.model_copy(update={"seed": 22}))
    assert not torch.allclose(shared.candidates[1], batched.candidates[1], atol=1e-3)


def test_pipeline_reports_each_jobs_own_seed(tiny, tmp_path) -> None:
    from worker.engine.checkpoints import LoadedGenerator
    from worker.pipeline import to_pixels, upscale

    g, fit = tiny
    model = LoadedGenerator(g, None, fit, tmp_path / "tiny.pt", "0" * 64)
    pixels = to_pixels(torch.cat([_target(g, 11)[:1], _target(g, 12)[:1]]))
    out = upscale(model, pixels, SearchConfig(steps=2, restarts=1), seeds=[5, 6])
    assert [o.report["seed"] for o in out] == [5, 6]
    with pytest.raises(ValueError, match="2 thumbnails"):
        upscale(model, pixels, SearchConfig(steps=2, restarts=1), seeds=[5])


def _face_net(seen: list[torch.dtype]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """A stand-in for F: one convolution, which autocast would run in bf16."""
    kernel = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1

    def extra(img: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = F.conv2d(img, kernel)
        seen.append(feats.dtype)
        return {"feat": 0.01 * feats.pow(2).mean((1, 2, 3))}

    return extra


def test_bf16_search_keeps_float32_results_and_follows_fp32(tiny) -> None:
    g, fit = tiny
    thumbs = _target(g, 1)
    runs = {}
    for precision in ("fp32", "bf16"):
        seen: list[torch.dtype] = []
        history: list[torch.Tensor] = []
        config = SearchConfig(steps=20, restarts=2, seed=7, precision=precision)
        result = run_search(
            g,
            fit,
            thumbs,
            config,
            extra_loss=_face_net(seen),
            on_step=lambda s, h=history: h.append(s.best_mse),
        )
        runs[precision] = result, history, seen
    (fp32, fp32_history, fp32_seen), (bf16, history, seen) = runs["fp32"], runs["bf16"]
    # G ran in bf16 (the images differ from fp32's) while F stayed float32 ...
    assert set(seen) == {torch.float32} and set(fp32_seen) == {torch.float32}
    assert not torch.equal(bf16.images, fp32.images)
    # ... but everything the search returns is float32, finite, and shaped as in fp32.
    for name in (
        "images",
        "candidates",
        "mse",
        "loss",
        "candidate_mse",
        "candidate_loss",
        "w_plus",
    ):
        got, want = getattr(bf16, name), getattr(fp32, name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
    assert {n: t.dtype for n, t in bf16.terms.items()} == dict.fromkeys(
        ("downscale", "geocross", "feat"), torch.float32
    )
    # The search still works, and its error follows fp32's: on this generator the final
    # best MSEs (about 0.005 to 0.1) differ by under 7% (measured over 6 targets and seeds).
    assert (history[-1] < 0.5 * history[0]).all()
    torch.testing.assert_close(history[-1], fp32_history[-1], rtol=0.2, atol=1e-4)
    torch.testing.assert_close(bf16.mse, fp32.mse, rtol=0.2, atol=1e-4)


# Tensor methods that make the host wait for a GPU (a read back, or a copy off the device).
SYNCING = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
)


@contextlib.contextmanager
def host_syncs_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While active, a syncing Tensor method, or ``.to`` a device, raises AssertionError.

    torch.optim is exempt: Adam keeps its step counters on the host (unless capturable
    or fused), so its ``.item()`` there waits for nothing, on a GPU too.
    """

    def exempt() -> bool:
        return sys._getframe(2).f_globals.get("__name__", "").startswith("torch.optim")

    def forbid(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not exempt():
                raise AssertionError(f"Tensor.{name} in the step loop: a host sync on a GPU")
            return original(self, *args, **kwargs)

        return guarded

    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        moves = "device" in kwargs or any(
            isinstance(a, str | torch.device | torch.Tensor) for a in args
        )
        if moves and not exempt():
            raise AssertionError("Tensor.to(device) in the step loop: a host copy on a GPU")
        return original_to(self, *args, **kwargs)

    with monkeypatch.context() as m:
        for name in SYNCING:
            m.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
        m.setattr(torch.Tensor, "to", to)
        yield


def _search_guarded(monkeypatch, g, fit, thumbs, config, extra_loss=None):
    """Run a search with host syncs forbidden from its second step to its result. The first
    step is left free: it also runs the setup, which copies the start to the device."""
    gen = latent_search(g, fit, thumbs, config, extra_loss)
    first = next(gen)
    with host_syncs_forbidden(monkeypatch):
        steps = [first, *(next(gen) for _ in range(config.steps - 1))]
        with pytest.raises(StopIteration) as done:
            next(gen)
    return steps, done.value.value


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_step_loop_never_waits_for_the_device(tiny, monkeypatch, precision) -> None:
    g, fit = tiny
    config = SearchConfig(steps=3, restarts=2, seed=0, precision=precision)
    steps, result = _search_guarded(
        monkeypatch, g, fit, _target(g, 13), config, extra_loss=_face_net([])
    )
    assert [s.step for s in steps] == [1, 2, 3]
    assert result.images.shape == (2, 3, 32, 32)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize(
    "sneaky",
    [
        lambda img: {"x": img.mean((1, 2, 3)) * img.mean().item()},
        lambda img: {"x": img.mean((1, 2, 3)) * (2 if img.mean() > 0.5 else 1)},
        lambda img: {"x": img.mean((1, 2, 3)) * float(img.amax())},
        lambda img: {"x": img.mean((1, 2, 3)) * torch.ones(1).to(img.device)},
    ],
)
def test_the_sync_guard_catches_a_sync_in_the_loop(tiny, monkeypatch, sneaky) -> None:
    g, fit = tiny
    with pytest.raises(AssertionError, match="in the step loop"):
        _search_guarded(
            monkeypatch,
            g,
            fit,
            _target(g, 14),
            SearchConfig(steps=2, restarts=1, seed=0),
            extra_loss=sneaky,
        )


def test_on_cpu_the_options_shape_the_synthesis(tiny) -> None:
    """Wiring only: compile and layout reach the call on a CPU as well; reduce-overhead
    (CUDA graphs) falls back to the default mode there."""
    g, _ = tiny
    cpu = torch.device("cpu")
    fn = synthesis_fn(g, SearchConfig(channels_last=True, compile="reduce-overhead"), cpu)
    assert fn.args == (g,) and fn.keywords == {"memory_format": torch.channels_last}
    assert fn.func._torchdynamo_orig_callable is type(g).synthesis
    assert synthesis_fn(g, SearchConfig(compile="default"), cpu).func is fn.func


def test_on_cuda_the_options_shape_the_synthesis(tiny) -> None:
    """Wiring only (nothing runs, so no GPU is needed): layout and compile reach the call."""
    g, _ = tiny
    cuda = torch.device("cuda")
    fn = synthesis_fn(g, SearchConfig(channels_last=True, compile="reduce-overhead"), cuda)
    assert fn.args == (g,) and fn.keywords == {"memory_format": torch.channels_last}
    compiled = fn.func  # torch.compile of the unbound synthesis, called with g first
    assert compiled._torchdynamo_orig_callable is type(g).synthesis
    again = synthesis_fn(g, SearchConfig(compile="reduce-overhead"), cuda)
    assert again.func is compiled  # compiled once per generator and mode
    plain = synthesis_fn(g, SearchConfig(), cuda)
    assert plain == g.synthesis


def test_a_channels_last_synthesis_searches_like_the_default(tiny, monkeypatch) -> None:
    """The search copes with NHWC images (what channels_last gives on a GPU), here on CPU."""
    g, fit = tiny
    thumbs = _target(g, 16)
    config = SearchConfig(steps=3, restarts=2, seed=0)
    plain = run_search(g, fit, thumbs, config)
    monkeypatch.setattr(
        search,
        "synthesis_fn",
        lambda gen, *_: functools.partial(gen.synthesis, memory_format=torch.channels_last),
    )
    nhwc = run_search(g, fit, thumbs, config)
    torch.testing.assert_close(nhwc.candidates, plain.candidates, atol=1e-5, rtol=0)
    torch.testing.assert_close(nhwc.candidate_mse, plain.candidate_mse, atol=1e-7, rtol=1e-4)


def test_without_a_seed_it_picks_one_it_reports_and_leaves_torchs_generator_alone(tiny) -> None:
    g, fit = tiny
    thumbs = _target(g, 21)
    config = SearchConfig(steps=2, restarts=1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = run_search(g, fit, thumbs, config)
    assert torch.equal(torch.rand(3), expected)
    again = run_search(g, fit, thumbs, config.model_copy(update={"seed": result.seed}))
    assert torch.equal(result.images, again.images)
