"""The ``likeness`` command: every capability reachable from the shell.

Torch-heavy modules load inside the commands, so ``likeness --help`` and the
torch-free commands (serve, worker --check, weights list) start fast.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from cli.evaluate import evaluate_command
from cli.output import EXIT_ERROR, err
from cli.service import serve_command, worker_command
from cli.train_extractor import train_extractor
from cli.train_generator import prepare_generator_data, train_generator
from cli.train_judges import train_judges
from cli.train_race_reader import train_race_reader
from cli.upscale import upscale
from cli.weights import weights_app
from likeness.errors import LikenessError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Identity- and attribute-preserving face thumbnail upscaling.",
)
app.add_typer(weights_app, name="weights")
app.command("upscale")(upscale)
app.command(
    "train-generator", help="Train a StyleGAN2 face generator on a zip of images (resumable)."
)(train_generator)
app.command(
    "prepare-generator-data",
    help="Build a generator training set: CelebA-HQ plus UTKFace re-framed, race-balanced.",
)(prepare_generator_data)
app.command(
    "train-extractor", help="Train the face extractor F with ArcFace, race and attribute heads."
)(train_extractor)
app.command("train-judges")(train_judges)
app.command("train-race-reader")(train_race_reader)
app.command("evaluate")(evaluate_command)
app.command("worker")(worker_command)
app.command("serve")(serve_command)


def plain_help(command: Any) -> Any:
    """One help style for every command: no type labels (``<int>``, ``<list[str]>``) and
    defaults only as the help text states them, "(default: X)"; a literal default the
    text does not state is added in that style."""
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
    make_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:  # --help is made per call, outside ``params``
        option = make_help_option(ctx)
        if option is not None:
            option.display_type_rich = lambda ctx: None
        return option

    command.get_help_option = help_option
    for param in getattr(command, "params", []):
        param.metavar = "" if param.param_type_name == "option" else param.name.upper()
        # Arguments show their type whatever the metavar; the help says what they are.
        param.display_type_rich = lambda ctx: None
        words = param.help or ""
        literal = param.default not in (None, False, ()) and not callable(param.default)
        if literal and "default" not in words and param.show_default is not False:
            shown = (
                ", ".join(map(str, param.default))
                if isinstance(param.default, list | tuple)
                else str(param.default)
            )
            param.help = f"{words} (default: {shown})".strip()
        param.show_default = False
    return command


def build_command() -> Any:
    """The ``likeness`` command as the shell runs it."""
    return plain_help(typer.main.get_command(app))


def main() -> None:
    try:
        build_command()(prog_name="likeness")
    except LikenessError as e:  # anything a command forgot to catch still reads well
        err.print(f"[bold red]error:[/] {e.message}", highlight=False)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
