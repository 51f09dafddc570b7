"""Static checks of docker-compose.yml, the Dockerfiles in docker/ and .dockerignore.

No Docker engine is needed: the compose file is parsed with PyYAML, the
Dockerfiles line by line (continuations joined, comments dropped), and the
expectations on what each image installs come from pyproject.toml, so a
dependency moved between groups there is checked here without edits.
``docker compose config -q`` (or the older ``docker-compose``) runs too when
one is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from likeness.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

# What makes an image a torch image: none of these may reach the API image.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "facenet-pytorch", "triton"}
# CUDA wheels of torch come from the PyTorch wheel index, one folder per CUDA version.
CUDA_WHEEL_INDEX = re.compile(r"^https://download\.pytorch\.org/whl/cu\d+/?$")
# Defaults the compose file changes on purpose, with the reason.
INTENDED_OVERRIDES = {
    # A GPU host must fail loudly when the GPU is not visible, not fall back to the CPU.
    "LIKENESS_DEVICE": "cuda",
}
# Names that hold secrets end like this (LIKENESS_API_KEYS does; LIKENESS_REDIS_KEY_PREFIX not).
SECRET_NAME = re.compile(r"(KEYS?|SECRETS?|TOKENS?|PASSWORD|PASSWD|PASS|CREDENTIALS?)$", re.I)
URL_CREDENTIALS = re.compile(r"://[^/\s@:]*:[^/\s@]+@")
PIP_OPTIONS_WITH_VALUE = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "--target",
    "-t",
    "--prefix",
    "--root",
    "--platform",
    "--python-version",
}


# -- parsing ------------------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str  # upper case: FROM, RUN, COPY, ...
    flags: list[str]  # leading --name=value flags (COPY, ADD, HEALTHCHECK, RUN ...)
    rest: str  # everything after the flags

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of the exec form (CMD, ENTRYPOINT, RUN), or None."""
        text = self.rest.strip()
        if not text.startswith("["):
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [str(part) for part in parsed]

    @property
    def words(self) -> list[str]:
        return self.exec_form or shlex.split(self.rest)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue  # parser directives and comments, also inside a continuation
        if not pending:
            start = number
        if text.endswith("\\"):
            pending.append(text[:-1].strip())
            continue
        pending.append(text)
        keyword, _, rest = " ".join(pending).partition(" ")
        pending = []
        flags: list[str] = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        instructions.append(Instruction(start, keyword.upper(), flags, rest))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    """Expand $NAME, ${NAME} and ${NAME:-default} as a Dockerfile or compose file would."""

    def expand(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        default = m.group("default")
        value = variables.get(name, "")
        return value if value or default is None else default

    pattern = r"\$(?:\{(?P<braced>\w+)(?::?-(?P<default>[^}]*))?\}|(?P<bare>\w+))"
    return re.sub(pattern, expand, text)


def interpolate(value: Any) -> str:
    """A compose value with every ${VAR:-default} at its default (the shell is ignored)."""
    return substitute(str(value), {})


@dataclass
class PipInstall:
    line: int
    options: dict[str, str] = field(default_factory=dict)
    editable: bool = False
    project_extras: set[str] | None = None  # None: the project itself is not installed
    requirements: list[Requirement] = field(default_factory=list)


def pip_installs(instructions: list[Instruction]) -> list[PipInstall]:
    """Every `pip install` of every RUN, with ARG and ENV defaults substituted."""
    variables: dict[str, str] = {}
    found = []
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.rest.partition("=")
            variables[name.strip()] = default.strip()
        elif ins.keyword == "ENV":
            for word in shlex.split(ins.rest):
                name, sep, value = word.partition("=")
                if sep:
                    variables[name] = value
        if ins.keyword != "RUN":
            continue
        command = substitute(ins.rest, variables)
        for segment in re.split(r"&&|\|\||;|\|", command):
            words = shlex.split(segment)
            if words[:2] == ["python", "-m"] or words[:2] == ["python3", "-m"]:
                words = words[2:]
            if words[:2] not in (["pip", "install"], ["pip3", "install"]):
                continue
            found.append(parse_pip_args(ins.line, words[2:]))
    return found


def parse_pip_args(line: int, args: list[str]) -> PipInstall:
    install = PipInstall(line)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-e", "--editable"):
            install.editable = True
        elif arg in PIP_OPTIONS_WITH_VALUE:
            install.options[arg] = args[i + 1]
            i += 1
        elif arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            install.options[name] = value
        elif arg.startswith("-"):
            install.options[arg] = ""
        elif arg == "." or arg.startswith(".["):
            extras = arg[2:-1] if arg.startswith(".[") else ""
            install.project_extras = {e.strip() for e in extras.split(",") if e.strip()}
        else:
            install.requirements.append(Requirement(arg))
        i += 1
    return install


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"docker-compose.yml has no service {name!r}"
    return services()[name]


def long_running() -> dict[str, dict[str, Any]]:
    """Services that `docker compose up` starts (those in a profile are one-off tools)."""
    return {name: svc for name, svc in services().items() if not svc.get("profiles")}


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.partition("=") for item in env]
        return {k: (v if sep else None) for k, sep, v in pairs}
    return {k: None if v is None else str(v) for k, v in env.items()}


def dockerfile_of(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def build_context(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    return ROOT / (build if isinstance(build, str) else build.get("context", "."))


def image_instructions(name: str) -> list[Instruction]:
    return parse_dockerfile(dockerfile_of(service(name)))


def last(instructions: list[Instruction], keyword: str) -> Instruction | None:
    matching = [i for i in instructions if i.keyword == keyword]
    return matching[-1] if matching else None


def command_of(name: str) -> list[str]:
    """The command a service's container runs: compose's `command`, else the image's CMD."""
    svc = service(name)
    if "command" in svc:
        cmd = svc["command"]
        return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    cmd_ins = last(image_instructions(name), "CMD")
    assert cmd_ins is not None, f"{dockerfile_of(svc)} has no CMD"
    return cmd_ins.words


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def project_requirements(extras: set[str]) -> list[Requirement]:
    """The core dependencies plus those of ``extras``, self-references followed."""
    project = pyproject()["project"]
    optional = project.get("optional-dependencies", {})
    name = canonicalize_name(project["name"])
    found = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra [{extra}]"
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


def pinned(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        return specs[0].version
    return None


def parse_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of .dockerignore, in Docker's matching semantics."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        negated = text.startswith("!")
        text = text.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(text):
            if text.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif text.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif text[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif text[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(text[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in dockerignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


# -- the parsers themselves ---------------------------------------------------------------


def test_dockerfile_parser_joins_continuations_and_drops_comments(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim\n"
        "ARG INDEX=https://example.org/whl\n"
        "RUN pip install --index-url ${INDEX} torch==1.0 \\\n"
        "    # a comment inside the continuation\n"
        "    && pip install -e '.[worker,extra]'\n"
        "COPY --chown=a:a src/ dst/\n"
        'CMD ["likeness", "worker"]\n'
    )
    ins = parse_dockerfile(path)
    assert [i.keyword for i in ins] == ["FROM", "ARG", "RUN", "COPY", "CMD"]
    assert ins[2].line == 4 and "&& pip install -e" in ins[2].rest
    assert ins[3].flags == ["--chown=a:a"] and ins[3].words == ["src/", "dst/"]
    assert ins[4].exec_form == ["likeness", "worker"]
    first, second = pip_installs(ins)
    assert first.options["--index-url"] == "https://example.org/whl"
    assert [(r.name, pinned(r)) for r in first.requirements] == [("torch", "1.0")]
    assert first.project_extras is None
    assert second.editable and second.project_extras == {"worker", "extra"}


def test_dockerignore_matching_follows_docker() -> None:
    assert dockerignored(".git") and dockerignored(".git/HEAD")
    assert dockerignored("runs") and dockerignored("runs/smoke/log.jsonl")
    assert dockerignored("cli/__pycache__/main.cpython-311.pyc")
    assert not dockerignored("cli/main.py")
    assert not dockerignored("weights/manifest.json")


# -- docker-compose.yml -------------------------------------------------------------------


def test_compose_has_redis_api_and_worker() -> None:
    assert {"redis", "api", "worker"} <= set(services())
    assert {"redis", "api", "worker"} <= set(long_running())


def test_worker_and_trainer_reserve_an_nvidia_gpu() -> None:
    worker_dockerfile = dockerfile_of(service("worker"))
    gpu_services = ["worker"] + [
        name
        for name, svc in services().items()
        if svc.get("profiles") and "build" in svc and dockerfile_of(svc) == worker_dockerfile
    ]
    for name in gpu_services:
        reservations = service(name).get("deploy", {}).get("resources", {}).get("reservations", {})
        gpus = [
            d
            for d in reservations.get("devices", [])
            if d.get("driver") == "nvidia"
            and "gpu" in d.get("capabilities", [])
            and ("count" in d or "device_ids" in d)
        ]
        assert gpus, f"{name}: no deploy.resources.reservations.devices with driver nvidia, gpu"


def test_api_does_not_reserve_a_gpu() -> None:
    assert "deploy" not in service("api") or "devices" not in json.dumps(service("api")["deploy"])


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy() -> None:
    for name, svc in long_running().items():
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test form"
        for key in ("interval", "timeout"):
            assert parse_duration(check[key]) > 0, f"{name}: healthcheck {key}"
        restart = svc.get("restart") or svc.get("deploy", {}).get("restart_policy", {}).get(
            "condition"
        )
        assert restart in ("always", "unless-stopped", "on-failure", "any"), (
            f"{name}: restart policy {restart!r}"
        )


def test_one_off_services_are_not_started_by_up_and_do_not_restart() -> None:
    for name, svc in services().items():
        if svc.get("profiles"):
            assert str(svc.get("restart", "no")) == "no", name
            assert (svc.get("healthcheck") or {}).get("disable"), (
                f"{name}: a one-off tool reports no worker health"
            )


def test_worker_can_be_scaled() -> None:
    worker = service("worker")
    assert "container_name" not in worker, "container_name blocks --scale worker=N"
    assert "hostname" not in worker, "replicas sharing a hostname share one health check"
    for port in worker.get("ports", []):
        fixed = "published" in port if isinstance(port, dict) else ":" in interpolate(port)
        assert not fixed, f"worker publishes a host port ({port}): a second replica cannot bind it"
    assert "replicas" not in worker.get("deploy", {}), "replicas fights --scale"


def test_redis_persists_to_a_named_volume() -> None:
    redis = service("redis")
    cmd = redis.get("command")
    words = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd or []]
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "yes"
    mounts = [str(v).split(":") for v in redis.get("volumes", [])]
    data = [m for m in mounts if len(m) >= 2 and m[1] == "/data"]
    assert data, "redis has no volume at /data (where it writes the append-only file)"
    assert data[0][0] in (compose().get("volumes") or {}), "redis /data is not a named volume"
    assert "ports" not in redis, "the job store has no password: keep it off the host's ports"


def test_the_api_and_workers_share_the_redis_store_and_job_rules() -> None:
    api, worker = environment(service("api")), environment(service("worker"))
    assert api["LIKENESS_STORE"] and api["LIKENESS_STORE"].startswith("redis://redis:")
    for name in (
        "LIKENESS_STORE",
        "LIKENESS_DATA_DIR",
        "LIKENESS_REDIS_KEY_PREFIX",
        "LIKENESS_RESULT_TTL_SECONDS",
        "LIKENESS_LEASE_SECONDS",
        "LIKENESS_MAX_ATTEMPTS",
        "LIKENESS_WORKER_HEARTBEAT_TIMEOUT_SECONDS",
    ):
        assert name in api and api.get(name) == worker.get(name), f"{name} differs"
    for name in ("api", "worker"):
        for dep in ("redis",):
            depends = service(name).get("depends_on", {})
            assert dep in depends, f"{name} does not wait for {dep}"
            if isinstance(depends, dict):
                assert depends[dep].get("condition") == "service_healthy"


def test_environment_names_are_settings_and_defaults_match_settings() -> None:
    fields = {f"LIKENESS_{name.upper()}": name for name in Settings.model_fields}
    for svc_name, svc in services().items():
        for key, value in environment(svc).items():
            if not key.startswith("LIKENESS_"):
                continue
            assert key in fields, f"{svc_name}: {key} is not a setting of likeness/settings.py"
            if value is None:
                continue
            name = fields[key]
            effective = interpolate(value)
            parsed = getattr(Settings.model_validate({name: effective}), name)
            if key in INTENDED_OVERRIDES:
                assert effective == INTENDED_OVERRIDES[key], f"{svc_name}: {key}"
            elif "${" in value:  # a pass-through: its fallback must be the documented default
                default = Settings.model_fields[name].get_default(call_default_factory=True)
                assert parsed == default, f"{svc_name}: {key} falls back to {effective!r}"


def test_no_secrets_in_compose_or_dockerfiles() -> None:
    for svc_name, svc in services().items():
        for key, value in environment(svc).items():
            if value is None:
                continue
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{" + key + r"(:?-)?\}", value), (
                    f"{svc_name}: {key} must only pass the variable through, got {value!r}"
                )
            assert not URL_CREDENTIALS.search(value), f"{svc_name}: {key} holds a credential"
    for path in sorted((ROOT / "docker").glob("*Dockerfile*")):
        for ins in parse_dockerfile(path):
            if ins.keyword in ("ENV", "ARG"):
                for word in shlex.split(ins.rest):
                    name, sep, value = word.partition("=")
                    assert not (SECRET_NAME.search(name) and value), f"{path.name}: {name}"
            assert not URL_CREDENTIALS.search(ins.rest), f"{path.name}:{ins.line} credential"
    text = COMPOSE_FILE.read_text()
    assert not URL_CREDENTIALS.search(text)


def test_nothing_refers_to_the_shared_folder() -> None:
    docker_files = sorted(p for p in (ROOT / "docker").rglob("*") if p.is_file())
    for path in [COMPOSE_FILE, ROOT / "docker-compose.cpu.yml", DOCKERIGNORE, *docker_files]:
        assert "../shared" not in path.read_text(), path


def test_weights_and_data_volumes() -> None:
    declared = compose().get("volumes") or {}
    for name in ("api", "worker"):
        targets = {}
        for volume in service(name).get("volumes", []):
            source, target, *_ = interpolate(volume).split(":")
            targets[target] = source
        # Where the image keeps weights/: beside the package, under the WORKDIR.
        ins = image_instructions(name)
        workdir = last(ins, "WORKDIR")
        assert workdir is not None
        weights_target = f"{workdir.rest.rstrip('/')}/weights"
        assert weights_target in targets, f"{name}: no volume for the weights at {weights_target}"
        data_dir = environment(service(name))["LIKENESS_DATA_DIR"]
        assert data_dir in targets and targets[data_dir] in declared, (
            f"{name}: LIKENESS_DATA_DIR is not on a named volume"
        )
    assert "LIKENESS_GENERATOR" in environment(service("worker"))


def test_worker_stop_grace_period_covers_a_batch() -> None:
    grace = parse_duration(service("worker").get("stop_grace_period", "10s"))
    assert grace >= 60, "SIGTERM lets a worker finish its batch; 10 s (the default) cuts it off"


# -- the images ---------------------------------------------------------------------------


def test_services_build_the_dockerfiles_in_docker() -> None:
    assert dockerfile_of(service("api")) == ROOT / "docker" / "api.Dockerfile"
    assert dockerfile_of(service("worker")) == ROOT / "docker" / "worker.Dockerfile"
    for name, svc in services().items():
        if "build" in svc:
            assert dockerfile_of(svc).is_file(), name
            assert build_context(svc) == ROOT, f"{name}: the context must be the repository"
    # Training runs from the worker image.
    for name, svc in services().items():
        if svc.get("profiles") and "build" in svc:
            assert dockerfile_of(svc) == dockerfile_of(service("worker")), name
            assert svc.get("image") == service("worker").get("image"), name


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    for path in sorted((ROOT / "docker").glob("*Dockerfile*")):
        copies = [i for i in parse_dockerfile(path) if i.keyword in ("COPY", "ADD")]
        assert copies, path
        for ins in copies:
            if any(f.startswith("--from=") for f in ins.flags):
                continue  # from another stage or image, not from the context
            *sources, _dest = ins.words
            assert sources, f"{path.name}:{ins.line}: COPY without a source"
            for source in sources:
                matches = list(ROOT.glob(source.rstrip("/"))) if "*" in source else []
                exists = (ROOT / source).exists() or bool(matches)
                assert exists, f"{path.name}:{ins.line}: {source} is not in the repository"
                assert not dockerignored(source), (
                    f"{path.name}:{ins.line}: {source} is excluded by .dockerignore"
                )


def test_dockerignore_keeps_runs_git_and_caches_out() -> None:
    for path in (".git/config", "runs/generator/last.pt", ".venv/bin/python", ".env"):
        assert dockerignored(path), path
    assert dockerignored(".pytest_cache/v") and dockerignored("worker/engine/__pycache__")
    assert dockerignored("likeness.egg-info/PKG-INFO")


def test_images_run_as_a_non_root_user() -> None:
    for path in sorted((ROOT / "docker").glob("*Dockerfile*")):
        ins = parse_dockerfile(path)
        user = last(ins, "USER")
        assert user is not None, f"{path.name}: no USER (runs as root)"
        name = user.rest.split(":")[0]
        assert name not in ("root", "0"), path.name
        assert ins.index(user) > max(i for i, x in enumerate(ins) if x.keyword == "RUN"), (
            f"{path.name}: a RUN after USER; the runtime user should be set last"
        )
    for name, svc in services().items():
        if "user" in svc:
            assert interpolate(svc["user"]).split(":")[0] not in ("root", "0"), name


def _project_install(name: str) -> PipInstall:
    """The install of the project that brings its dependencies (not a --no-deps one)."""
    installs = [
        p
        for p in pip_installs(image_instructions(name))
        if p.project_extras is not None and "--no-deps" not in p.options
    ]
    assert len(installs) == 1, f"{name}: expected one `pip install .[...]` of the project"
    return installs[0]


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    # Layer caching: a change to the source must not reinstall the dependencies.
    for name in ("api", "worker"):
        ins = image_instructions(name)
        deps = _project_install(name)
        copies = [i for i in ins if i.keyword == "COPY" and not i.flags]
        source = [c for c in copies if c.words[0] == "."]
        assert source, f"{name}: the context is not copied (`COPY . .`)"
        assert deps.line < source[0].line, f"{name}: dependencies installed after the source"
        before = [c for c in copies if c.line < deps.line]
        assert all(c.words[:-1] == ["pyproject.toml"] for c in before), (
            f"{name}: only pyproject.toml may reach the dependency layer"
        )
        final = [
            p
            for p in pip_installs(ins)
            if p.project_extras is not None and "--no-deps" in p.options
        ]
        assert len(final) == 1 and final[0].editable, f"{name}: one `pip install --no-deps -e .`"
        assert final[0].line > source[0].line


def test_base_images_default_to_the_registry_s_and_can_be_replaced() -> None:
    official = "python:3.11-slim-bookworm"
    for name in ("api", "worker"):
        ins = image_instructions(name)
        assert ins[0].keyword == "ARG" and ins[0].rest == f"PYTHON_IMAGE={official}", name
        assert ins[1].keyword == "FROM" and ins[1].rest == "${PYTHON_IMAGE}", name
        args = service(name)["build"]["args"]
        assert interpolate(args["PYTHON_IMAGE"]) == official, name
        assert "${LIKENESS_PYTHON_IMAGE" in args["PYTHON_IMAGE"], name
    image = service("redis")["image"]
    assert "${LIKENESS_REDIS_IMAGE" in image and interpolate(image) == "redis:7.4-alpine"


def test_worker_image_runs_onnxruntime_gpu_and_the_api_image_onnxruntime() -> None:
    def swaps(name: str) -> tuple[bool, bool]:
        """(onnxruntime uninstalled, onnxruntime-gpu installed), the first before the second."""
        ins = image_instructions(name)
        uninstall_lines = [
            i.line
            for i in ins
            if i.keyword == "RUN"
            for segment in re.split(r"&&|;", i.rest)
            if shlex.split(segment)[:2] == ["pip", "uninstall"]
            and "onnxruntime" in shlex.split(segment)
        ]
        gpu_lines = [
            pip.line
            for pip in pip_installs(ins)
            if any(canonicalize_name(r.name) == "onnxruntime-gpu" for r in pip.requirements)
        ]
        if uninstall_lines and gpu_lines:
            assert uninstall_lines[0] <= gpu_lines[0]
        return bool(uninstall_lines), bool(gpu_lines)

    assert "onnxruntime" in {canonicalize_name(r.name) for r in project_requirements(set())}, (
        "the core dependencies no longer name onnxruntime"
    )
    assert swaps("worker") == (True, True)
    assert swaps("api") == (False, False)


def test_api_image_installs_the_core_dependencies_without_torch() -> None:
    optional = pyproject()["project"].get("optional-dependencies", {})
    expected_extras = {"api"} if "api" in optional else set()
    install = _project_install("api")
    assert install.project_extras == expected_extras, (
        f"the API image installs extras {install.project_extras}, pyproject says "
        f"{expected_extras or 'none'}"
    )
    resolved = {canonicalize_name(r.name) for r in project_requirements(expected_extras)}
    assert not resolved & TORCH_FAMILY, f"the API's dependencies pull in {resolved & TORCH_FAMILY}"
    for pip in pip_installs(image_instructions("api")):
        names = {canonicalize_name(r.name) for r in pip.requirements}
        assert not names & TORCH_FAMILY, f"api.Dockerfile:{pip.line} installs torch"
        assert not any("pytorch.org" in v for v in pip.options.values())
    base = last(image_instructions("api"), "FROM")
    assert base is not None and "cuda" not in base.rest and "pytorch" not in base.rest


def test_worker_image_installs_cuda_torch_pinned_as_in_pyproject() -> None:
    install = _project_install("worker")
    assert "worker" in install.project_extras
    wanted = {
        canonicalize_name(r.name): pinned(r)
        for r in project_requirements(install.project_extras)
        if canonicalize_name(r.name) in {"torch", "torchvision"}
    }
    assert wanted.keys() == {"torch", "torchvision"} and all(wanted.values()), (
        f"pyproject's [worker] extra should pin torch and torchvision exactly: {wanted}"
    )
    all_pins = {
        canonicalize_name(r.name): pinned(r)
        for extra in (None, *pyproject()["project"].get("optional-dependencies", {}))
        for r in project_requirements(set() if extra is None else {extra})
    }
    installs = pip_installs(image_instructions("worker"))
    torch_lines = []
    for pip in installs:
        for req in pip.requirements:
            req_name = canonicalize_name(req.name)
            if all_pins.get(req_name):  # pinned in pyproject: the image must agree
                assert pinned(req) == all_pins[req_name], (
                    f"worker.Dockerfile:{pip.line} installs {req}, pyproject pins "
                    f"{req_name}=={all_pins[req_name]}"
                )
            if req_name in wanted:
                torch_lines.append(pip)
    installed = {
        canonicalize_name(r.name): pinned(r) for pip in torch_lines for r in pip.requirements
    }
    assert {k: installed.get(k) for k in wanted} == wanted, "torch/torchvision not installed"
    for pip in torch_lines:
        index = pip.options.get("--index-url") or pip.options.get("-i", "")
        assert CUDA_WHEEL_INDEX.match(index), (
            f"worker.Dockerfile:{pip.line}: torch must come from a CUDA wheel index, got {index!r}"
        )
        assert pip.line < install.line, "install CUDA torch before the project (or pip picks one)"


# -- what the containers run --------------------------------------------------------------


def _container_port(name: str) -> str:
    [port] = service(name)["ports"]
    return interpolate(port).split(":")[-1].split("/")[0]


def test_api_runs_uvicorn_and_its_healthcheck_asks_healthz() -> None:
    cmd = command_of("api")
    assert cmd[:2] == ["uvicorn", "app.main:app"], cmd
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0", "uvicorn must listen beyond localhost"
    assert _container_port("api") == port
    health = " ".join(service("api")["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in health
    routes = (ROOT / "app" / "api" / "routes" / "health.py").read_text()
    assert re.search(r'@router\.get\(\s*"/healthz"', routes)
    image_check = last(image_instructions("api"), "HEALTHCHECK")
    assert image_check is not None and f"127.0.0.1:{port}/healthz" in image_check.rest
    expose = last(image_instructions("api"), "EXPOSE")
    assert expose is not None and expose.rest.split("/")[0] == port


def test_worker_runs_likeness_worker_and_checks_its_own_heartbeat() -> None:
    import typer.main

    from cli.main import app

    assert command_of("worker") == ["likeness", "worker"]
    test = service("worker")["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == ["likeness", "worker", "--check"]
    click_app = typer.main.get_command(app)
    worker_cmd = click_app.commands["worker"]  # type: ignore[attr-defined]
    options = {opt for param in worker_cmd.params for opt in param.opts}
    assert "--check" in options


def test_start_periods_allow_for_start_up() -> None:
    assert parse_duration(service("worker")["healthcheck"]["start_period"]) >= 60  # model load
    for name in ("redis", "api"):
        assert parse_duration(service(name)["healthcheck"].get("start_period", "0s")) >= 5


# -- the real tool, where it exists -------------------------------------------------------


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*cli, "--file", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- the CPU profile ----------------------------------------------------------------------

CPU_COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"


def _without_gpu(svc: dict[str, Any]) -> dict[str, Any]:
    stripped = {k: v for k, v in svc.items() if k != "deploy"}
    deploy = {k: v for k, v in svc.get("deploy", {}).items() if k != "resources"}
    if deploy:
        stripped["deploy"] = deploy
    return stripped


def test_cpu_profile_is_the_gpu_stack_without_gpus() -> None:
    cpu = yaml.safe_load(CPU_COMPOSE_FILE.read_text())

    def top(data: dict[str, Any]) -> set[str]:
        return {k for k in data if not k.startswith("x-")}  # x-: the files' YAML anchors

    assert top(cpu) == top(compose())
    assert cpu["volumes"] == compose()["volumes"]
    assert cpu["services"].keys() == services().keys()
    for name, svc in cpu["services"].items():
        assert "devices" not in json.dumps(svc.get("deploy", {})), f"{name} reserves a device"
        gpu = _without_gpu(service(name))
        if "environment" in gpu and "LIKENESS_DEVICE" in gpu["environment"]:
            assert interpolate(svc["environment"]["LIKENESS_DEVICE"]) == "cpu", name
            svc = {**svc, "environment": {**svc["environment"]}}
            svc["environment"]["LIKENESS_DEVICE"] = gpu["environment"]["LIKENESS_DEVICE"]
        assert svc == gpu, f"{name} differs between the GPU and the CPU compose files"


def test_docker_compose_config_accepts_the_cpu_profile() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*cli, "--file", str(CPU_COMPOSE_FILE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
