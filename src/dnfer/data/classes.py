"""The canonical expression label space, and class lists that are not expressions.

Datasets order their classes differently (RAF-DB: surprise first; AffectNet: neutral first;
FER2013: angry first). dnfer always maps expression classes by *name*, never by index, onto one
canonical order, and every run records the class names it trained with.

Any other label set (RAF-DB's compound classes, pain levels, ``cat``/``dog``...) is an
*open taxonomy*: its names are kept as written and ordered as torchvision's ``ImageFolder``
orders folders (:func:`order_class_names`). A class list is an expression list when every name
is an expression name or a known synonym; only then are names canonicalised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dnfer.errors import ConfigError, DataError, choices_text

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


def expression_name(name: str) -> str | None:
    """The canonical expression name of ``name``, or None when it is not an expression name."""
    return _ALIASES.get(name.strip().lower().replace("-", "").replace("_", ""))


def is_expression_list(names: Iterable[str]) -> bool:
    """True when every name is an expression name (any case or known synonym); False when empty."""
    names = list(names)
    return bool(names) and all(expression_name(n) is not None for n in names)


def class_key(name: str, expressions: bool) -> str:
    """How a class name is compared: canonical for an expression list, as written (stripped) otherwise."""
    return canonical_name(name) if expressions else name.strip()


TAXONOMIES = ("auto", "expressions")


def order_class_names(
    names: Iterable[str], *, taxonomy: str = "auto", where: str = "class names", numeric: bool = False,
    hint: str = " (or drop --data-option taxonomy=expressions to accept any class names)",
) -> tuple[list[str], dict[str, str]]:
    """The class list of a dataset whose labels are the names ``names`` (repeats allowed).

    - every name an expression name (or synonym): canonical names in canonical order, synonyms
      merged (``happy`` and ``Happiness`` are one class), exactly as for the named datasets;
    - otherwise (``taxonomy="auto"``): the names as written (stripped), sorted as torchvision's
      ``ImageFolder`` sorts its folders: by Python string order, so ``'10' < '2'``. With
      ``numeric=True`` (integer CSV labels) names that are all integers sort by value instead.
    ``taxonomy="expressions"`` refuses any name that is not an expression name (DataError
    naming ``where``, e.g. ``"PATH: folder(s)"``, the offending names and ``hint``).

    Returns ``(class_names, name -> class name)`` covering every distinct input name.
    """
    raw = list(dict.fromkeys(n.strip() for n in names))
    empty = [n for n in raw if not n]
    if empty:
        raise DataError(f"{where}: an empty class name")
    canon = {n: expression_name(n) for n in raw}
    if raw and all(c is not None for c in canon.values()):
        present = set(canon.values())
        return [c for c in CANONICAL_CLASSES if c in present], {n: str(c) for n, c in canon.items()}
    if taxonomy == "expressions":
        bad = [n for n, c in canon.items() if c is None]
        raise DataError(
            f"{where} {', '.join(repr(b) for b in bad)} are not expression names; expected "
            "surprise, fear, disgust, happiness (happy), sadness (sad), anger (angry), neutral, contempt" + hint
        )
    if taxonomy != "auto":
        raise ConfigError(f"--data-option taxonomy={taxonomy!r}: valid values are {', '.join(TAXONOMIES)}")
    if numeric and all(_is_int(n) for n in raw):
        by_value = {n: str(int(n)) for n in raw}  # "07" and "7" are one class
        return sorted(set(by_value.values()), key=int), by_value
    return sorted(raw), {n: n for n in raw}


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


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

    ``text`` is a comma-separated list of class names, each optionally ``name=a+b`` to merge
    several source classes into one (``neutral=neutral+contempt``). ``None`` keeps ``available``.
    For an expression list names are canonicalised (``happy`` = ``happiness``); for any other
    list they must be written as the dataset names them.

    Returns ``(class_names, source_to_target)`` where ``source_to_target`` maps every kept
    source class name to its training class name; sources not in it are dropped.
    """
    expressions = is_expression_list(available)
    avail = [class_key(c, expressions) for c in available]
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
            target = target.strip().lower() if expressions else target.strip()
            source_names = [class_key(s, expressions) for s in sources.split("+") if s.strip()]
        else:
            target = class_key(item, expressions)
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


def select_classes(wanted: Sequence[str], available: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Keep the classes ``wanted`` (e.g. a checkpoint's class list) out of ``available``, by name.

    Like :func:`parse_class_selection` without parsing text, so class names may hold any
    character (commas, ``+``, ``=``). Returns ``(class_names, source_to_target)``.
    """
    expressions = is_expression_list(available) and is_expression_list(wanted)
    avail = [class_key(c, expressions) for c in available]
    classes = [class_key(c, expressions) for c in wanted]
    missing = [c for c in classes if c not in avail]
    if missing:
        raise ConfigError(
            f"classes {', '.join(repr(m) for m in missing)} are not in this dataset; its classes are {', '.join(avail)}"
        )
    return classes, {c: c for c in classes}
