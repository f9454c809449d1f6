"""The canonical expression label space and mapping of dataset class names onto it.

Datasets order their classes differently (RAF-DB: surprise first; AffectNet: neutral first;
FER2013: angry first). dnfer always maps by *name*, never by index, onto one canonical order,
and every run records the class names it trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

from dnfer.errors import ConfigError, choices_text

#: Canonical order: RAF-DB's 7 basic classes (1-based labels 1..7 in its files), then contempt.
CANONICAL_CLASSES: tuple[str, ...] = (
    "surprise",
    "fear",
    "disgust",
    "happiness",
    "sadness",
    "anger",
    "neutral",
    "contempt",
)
#: The 7 basic expressions in RAF-DB order (the default label space).
BASIC7: tuple[str, ...] = CANONICAL_CLASSES[:7]
#: RAF-DB file order (label k in a RAF list file means RAF_ORDER[k - 1]).
RAF_ORDER: tuple[str, ...] = BASIC7
#: AffectNet expression ids 0..7.
AFFECTNET_ORDER: tuple[str, ...] = (
    "neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt",
)
#: FER2013 ``emotion`` ids 0..6.
FER2013_ORDER: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
#: FERPlus vote columns (the emotion columns of fer2013new.csv, in file order).
FERPLUS_ORDER: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
)

_ALIASES: dict[str, str] = {
    "surprised": "surprise",
    "surprise": "surprise",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "disgust": "disgust",
    "disgusted": "disgust",
    "happiness": "happiness",
    "happy": "happiness",
    "joy": "happiness",
    "sadness": "sadness",
    "sad": "sadness",
    "anger": "anger",
    "angry": "anger",
    "neutral": "neutral",
    "contempt": "contempt",
}


def canonical_name(name: str) -> str:
    """Map a dataset's class name (any case, common synonyms) onto the canonical name.

    Raises ConfigError for a name that is not an expression dnfer knows.
    """
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise ConfigError(
            f"unknown class name {name!r}; known expression names: {choices_text(list(CANONICAL_CLASSES))}"
            " (synonyms such as 'happy', 'angry', 'sad' are accepted)"
        )
    return _ALIASES[key]


def index_map(source_order: Sequence[str], target_classes: Sequence[str]) -> dict[int, int]:
    """Map indices of ``source_order`` onto indices of ``target_classes`` by class name.

    Source classes absent from the target are left out of the map (the caller decides whether
    dropping them is allowed).
    """
    target = {canonical_name(c): i for i, c in enumerate(target_classes)}
    out: dict[int, int] = {}
    for i, name in enumerate(source_order):
        cname = canonical_name(name)
        if cname in target:
            out[i] = target[cname]
    return out


def parse_class_selection(text: str | None, available: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Parse ``--classes`` into the training class list and a merge map.

    ``text`` is a comma-separated list of canonical names, each optionally ``name=a+b`` to merge
    several source classes into one (``neutral=neutral+contempt``). ``None`` keeps ``available``.

    Returns ``(class_names, source_to_target)`` where ``source_to_target`` maps every kept
    source class name to its training class name; sources not in it are dropped.
    """
    avail = [canonical_name(c) for c in available]
    if text is None or not text.strip():
        return list(avail), {c: c for c in avail}
    classes: list[str] = []
    mapping: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            target, sources = item.split("=", 1)
            target = target.strip().lower()
            source_names = [canonical_name(s) for s in sources.split("+") if s.strip()]
        else:
            target = canonical_name(item)
            source_names = [target]
        for s in source_names:
            if s not in avail:
                raise ConfigError(
                    f"--classes: class {s!r} is not in this dataset; its classes are {', '.join(avail)}"
                )
            if s in mapping:
                raise ConfigError(f"--classes: class {s!r} is used twice")
            mapping[s] = target
        if target in classes:
            raise ConfigError(f"--classes: target class {target!r} is named twice")
        classes.append(target)
    if len(classes) < 2:
        raise ConfigError("--classes must keep at least two classes")
    return classes, mapping
