"""Label vocabularies shared by the API (torch-free) and the face heads, and the one
reader of race and attribute targets."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from likeness.errors import LikenessError

UTKFACE_RACES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")

FAIRFACE_RACES: tuple[str, ...] = (
    "White",
    "Black",
    "Latino_Hispanic",
    "East Asian",
    "Southeast Asian",
    "Indian",
    "Middle Eastern",
)

# CelebA's order, which is also the column order of celebahq/labels.csv.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)


def canonical_label(name: str, known: Sequence[str]) -> str | None:
    """``name`` as ``known`` spells it, matched case-insensitively ('smiling' → 'Smiling');
    None when it is not there. The API, the CLI and the worker all check labels here."""
    wanted = name.strip().casefold()
    return next((k for k in known if k.casefold() == wanted), None)


def canonical_race(race: str | None, known: Sequence[str]) -> str | None:
    """A race target as ``known`` spells it; None or blank means no target."""
    if race is None or not race.strip():
        return None
    match = canonical_label(race, known)
    if match is None:
        raise LikenessError(
            "unknown_race", f"Unknown race {race.strip()!r}; known: {', '.join(known)}.", status=422
        )
    return match


def canonical_attributes(
    wanted: Mapping[str, int], known: Sequence[str]
) -> dict[str, Literal[0, 1]]:
    """Attribute targets with their names as ``known`` spells them."""
    canonical: dict[str, Literal[0, 1]] = {}
    for name, value in wanted.items():
        match = canonical_label(name, known)
        if match is None:
            raise LikenessError(
                "unknown_attribute",
                f"Unknown attribute {name.strip()!r}; known: {', '.join(known)}.",
                status=422,
            )
        if match in canonical:
            raise LikenessError(
                "invalid_attribute", f"attribute {match} is given twice.", status=422
            )
        canonical[match] = 1 if value else 0
    return canonical


def parse_attribute_pairs(values: Iterable[str]) -> dict[str, Literal[0, 1]]:
    """``["Smiling=1", "Male=0"]`` → ``{"Smiling": 1, "Male": 0}``; a value may also list
    several pairs separated by commas. ``Name:1`` is read too, the spelling earlier API
    clients send; ``Name=1`` is the one written back."""
    wanted: dict[str, Literal[0, 1]] = {}
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    for item in items:
        cut = max(item.rfind("="), item.rfind(":"))
        name, raw = item[:cut].strip(), item[cut + 1 :].strip()
        if cut < 0 or not name or raw not in ("0", "1"):
            raise LikenessError(
                "invalid_attribute",
                f"attribute {item!r} must look like Name=0 or Name=1.",
                status=422,
            )
        if name.casefold() in {n.casefold() for n in wanted}:
            raise LikenessError(
                "invalid_attribute", f"attribute {name} is given twice.", status=422
            )
        wanted[name] = 1 if raw == "1" else 0
    return wanted


def format_attribute_pairs(wanted: Mapping[str, int]) -> list[str]:
    """The one printed form of attribute targets: ``["Smiling=1", "Male=0"]``."""
    return [f"{name}={value}" for name, value in wanted.items()]
