"""The language of a Shapes world: questions of six families, each unambiguous for its scene (with its answer and
target objects), the ten noisy human answers, and five captions per image. Which families and templates:
data/README.md."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .shapes_scene import COLORS, RELATIONS, SHAPES, SIZES, relation

__all__ = [
    "BALANCE_GROUP",
    "FAMILIES",
    "FAMILY_TEMPLATES",
    "caption_check",
    "caption_foil",
    "caption_holds",
    "caption_kind",
    "captions",
    "human_answers",
    "question_candidates",
    "question_family",
    "question_templates",
    "tokens",
]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FAMILIES = ("color", "shape", "exist", "count", "rel_yn", "rel_what")
# each family's template, as reports name it: "what color is the" (a VQA question type) holds both the colour and
# the relational-attribute family
FAMILY_TEMPLATES = {
    "color": "what color is the <shape/size>?",
    "shape": "what shape is the <colour/size>?",
    "exist": "is there a <object>?",
    "count": "how many <objects>?",
    "rel_yn": "is the <object> <relation> the <object>?",
    "rel_what": "what <attr> is the object <relation> the <object>?",
}
# families whose answers are balanced together (relation "what" questions then favour colours,
# which the colour family spreads over 7 answers, over the 3 shapes)
BALANCE_GROUP = {"color": "other", "shape": "other", "rel_what": "other"}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _desc_phrase(desc: tuple, plural: bool = False) -> str:
    size, color, shape = desc
    noun = (shape or "object") + ("s" if plural else "")
    return " ".join(w for w in (size, color, noun) if w)


def _matches(obj: dict, desc: tuple) -> bool:
    size, color, shape = desc
    return (
        (size is None or obj["size"] == size)
        and (color is None or obj["color"] == color)
        and (shape is None or obj["shape"] == shape)
    )


# attribute subsets used to refer to one object: (size?, color?, shape?)
_REF_SUBSETS = ((0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0))


def _unique_descs(objects: list[dict], obj: dict, exclude: str | None = None) -> list[tuple]:
    out = []
    for use_size, use_color, use_shape in _REF_SUBSETS:
        if (exclude == "color" and use_color) or (exclude == "shape" and use_shape):
            continue
        desc = (
            obj["size"] if use_size else None,
            obj["color"] if use_color else None,
            obj["shape"] if use_shape else None,
        )
        if sum(_matches(o, desc) for o in objects) == 1:
            out.append(desc)
    return out


def question_candidates(objects: list[dict], family: str, margin: float, rng: np.random.Generator) -> list[dict]:
    """All questions of ``family`` that are unambiguous for this scene, with answers, targets (the objects the
    question is about) and ``named`` (those of them its words describe: all but the answer object of "what <attr> is
    the object <relation> the <object>?", which the question finds only through the relation)."""
    out: list[dict] = []

    def add(question, answer, targets, qtype, atype, named=None):
        named = list(targets if named is None else named)
        out.append(dict(question=question, answer=answer, targets=list(targets), named=named, qtype=qtype, atype=atype))

    if family == "color":
        for o in objects:
            for d in _unique_descs(objects, o, exclude="color"):
                add(f"what color is the {_desc_phrase(d)}?", o["color"], [o["index"]], "what color is the", "other")
    elif family == "shape":
        for o in objects:
            for d in _unique_descs(objects, o, exclude="shape"):
                add(f"what shape is the {_desc_phrase(d)}?", o["shape"], [o["index"]], "what shape is the", "other")
    elif family == "exist":
        descs = [(None, None, s) for s in SHAPES] + [(None, c, None) for c in COLORS]
        descs += [(None, c, s) for c in COLORS for s in SHAPES]
        descs += [(z, c, s) for z in SIZES for c in COLORS for s in SHAPES]
        for d in descs:
            targets = [o["index"] for o in objects if _matches(o, d)]
            add(f"is there {_article(_desc_phrase(d))}?", "yes" if targets else "no", targets, "is there a", "yes/no")
    elif family == "count":
        descs = [(None, None, None)] + [(None, None, s) for s in SHAPES] + [(None, c, None) for c in COLORS]
        descs += [(z, None, None) for z in SIZES] + [(None, c, s) for c in COLORS for s in SHAPES]
        descs += [(z, None, s) for z in SIZES for s in SHAPES]
        for d in descs:
            targets = [o["index"] for o in objects if _matches(o, d)]
            add(f"how many {_desc_phrase(d, plural=True)} are there?", str(len(targets)), targets, "how many", "number")
    elif family in ("rel_yn", "rel_what"):
        # one referring expression per object (random among its unambiguous ones)
        refs = {}
        for o in objects:
            descs = _unique_descs(objects, o)
            if descs:
                refs[o["index"]] = descs[int(rng.integers(len(descs)))]
        for b in objects:
            if b["index"] not in refs:
                continue
            ref_b = _desc_phrase(refs[b["index"]])
            for rel in RELATIONS:
                others = [o for o in objects if o is not b]
                if family == "rel_yn":
                    for a in others:
                        ans = relation(a, b, rel, margin)
                        if a["index"] in refs and ans is not None:
                            q = f"is the {_desc_phrase(refs[a['index']])} {rel} the {ref_b}?"
                            add(q, "yes" if ans else "no", [a["index"], b["index"]], "is the", "yes/no")
                else:
                    verdicts = [relation(a, b, rel, margin) for a in others]
                    if verdicts.count(True) == 1 and None not in verdicts:
                        a = others[verdicts.index(True)]
                        targets = [a["index"], b["index"]]
                        for attr in ("color", "shape"):
                            q = f"what {attr} is the object {rel} the {ref_b}?"
                            add(q, a[attr], targets, f"what {attr} is the", "other", named=[b["index"]])
    else:
        raise ValueError(family)
    return out


_REL_WHAT = re.compile(rf"^what (color|shape) is the object ({'|'.join(RELATIONS)}) the ")
_FAMILY_PREFIXES = (
    ("is there ", "exist"),
    ("is the ", "rel_yn"),
    ("how many ", "count"),
    ("what color is the ", "color"),
    ("what shape is the ", "shape"),
)


def question_family(question: str) -> str | None:
    """The family (:data:`FAMILIES`) of a question written by :func:`question_candidates`; None for other text."""
    if _REL_WHAT.match(question):
        return "rel_what"
    return next((family for prefix, family in _FAMILY_PREFIXES if question.startswith(prefix)), None)


def question_templates(questions: Iterable[tuple[Any, str]]) -> dict[Any, str]:
    """``{question_id: the template of its family}`` (:data:`FAMILY_TEMPLATES`) for ``(question_id, text)`` pairs,
    leaving out the texts no Shapes template wrote: the groups of ``metrics.vqa.accuracy_by_group``."""
    return {qid: FAMILY_TEMPLATES[family] for qid, text in questions if (family := question_family(text)) is not None}


def _wrong_answer(answer: str, rng: np.random.Generator) -> str:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer.isdigit():
        n = int(answer)
        return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)
    pool = [c for c in COLORS if c != answer] if answer in COLORS else [s for s in SHAPES if s != answer]
    return pool[int(rng.integers(len(pool)))]


def human_answers(answer: str, noise: float, rng: np.random.Generator) -> list[dict]:
    answers = [answer] * 10
    k = min(3, int(rng.binomial(10, noise))) if noise > 0 else 0
    for i in sorted(int(i) for i in rng.choice(10, size=k, replace=False)):
        answers[i] = _wrong_answer(answer, rng)
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def _object_phrase(o: dict, with_size: bool = True) -> str:
    return _article(" ".join(([o["size"]] if with_size else []) + [o["color"], o["shape"]]))


def _count_phrase(n: int, noun: str) -> str:
    return _article(noun) if n == 1 else f"{NUMBER_WORDS[n]} {noun}s"


def captions(objects: list[dict], bg_kind: str, margin: float, rng: np.random.Generator) -> list[str]:
    """Five different captions describing the objects."""
    lr = sorted(objects, key=lambda o: (o["center"][0], o["index"]))
    tb = sorted(objects, key=lambda o: (o["center"][1], o["index"]))
    shape_counts = Counter(o["shape"] for o in objects)
    color_counts = Counter(o["color"] for o in objects)
    shapes_cap = _join([_count_phrase(shape_counts[s], s) for s in SHAPES if shape_counts[s]])
    colors_cap = _join([_count_phrase(color_counts[c], f"{c} shape") for c in COLORS if color_counts[c]])

    def rel_caption(rels: tuple[str, ...]) -> str | None:
        pairs = [
            (a, b, rel) for rel in rels for a in objects for b in objects if a is not b and relation(a, b, rel, margin)
        ]
        if not pairs:
            return None
        a, b, rel = pairs[int(rng.integers(len(pairs)))]
        return f"{_object_phrase(a)} {rel} {_object_phrase(b)}"

    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    first = [
        "from left to right: " + _join([_object_phrase(o) for o in lr])
        if rng.random() < 0.5
        else "from top to bottom: " + _join([_object_phrase(o) for o in tb]),
        shapes_cap,
        colors_cap,
        rel_caption(("left of", "right of") if rng.random() < 0.5 else ("above", "below")),
        f"{NUMBER_WORDS[len(objects)]} shapes: " + _join([_object_phrase(o, with_size=False) for o in order]),
    ]
    extra = [
        rel_caption(RELATIONS),
        "from left to right: " + _join([_object_phrase(o) for o in lr]),
        "from top to bottom: " + _join([_object_phrase(o) for o in tb]),
        f"{_join([_object_phrase(o) for o in order])} on a {bg_kind} background",
    ]
    out: list[str] = []
    for cap in first + extra:
        if cap and cap + "." not in out and len(out) < 5:
            out.append(cap + ".")
    return out


_ORDERS = {"from left to right: ": 0, "from top to bottom: ": 1}


def _mentions(text: str) -> list[tuple[int, tuple]] | None:
    """The objects a list of phrases names ("a large red circle, two blue shapes and a square"): (count,
    (size, color, shape)) each, ``shape`` None for "shape"/"object"; None if a phrase is not one of the world's."""
    out = []
    for phrase in re.split(r", | and ", text):
        words = phrase.split()
        if len(words) < 2 or (words[0] not in ("a", "an") and words[0] not in NUMBER_WORDS):
            return None
        count = 1 if words[0] in ("a", "an") else NUMBER_WORDS.index(words[0])
        *attributes, noun = words[1:]
        noun = noun[:-1] if count > 1 and noun.endswith("s") else noun
        size = next((w for w in attributes if w in SIZES), None)
        color = next((w for w in attributes if w in COLORS), None)
        if noun not in (*SHAPES, "shape", "object") or len(attributes) != (size is not None) + (color is not None):
            return None
        out.append((count, (size, color, noun if noun in SHAPES else None)))
    return out


def _present(objects: list[dict], mentions: list[tuple[int, tuple]]) -> bool:
    """Every mentioned description is matched by at least as many objects as the mentions of it count."""
    wanted = Counter()
    for count, desc in mentions:
        wanted[desc] += count
    return all(sum(_matches(o, desc) for o in objects) >= n for desc, n in wanted.items())


def _in_order(objects: list[dict], descs: list[tuple], axis: int) -> bool:
    """Distinct objects match ``descs`` one each and lie in that order along ``axis`` (0: x, 1: y; ties allowed)."""

    def place(i: int, used: frozenset, last: float) -> bool:
        if i == len(descs):
            return True
        return any(
            place(i + 1, used | {j}, o["center"][axis])
            for j, o in enumerate(objects)
            if j not in used and _matches(o, descs[i]) and o["center"][axis] >= last
        )

    return place(0, frozenset(), float("-inf"))


Check = Callable[[list[dict], float], tuple[bool, bool | None]]


def caption_check(caption: str) -> Check | None:
    """The caption of the world's language (``captions``) parsed once, as a check of any scene: ``check(objects,
    margin)`` says (every named object present, its relation right — the pair relation of "A left of B", the order
    of "from left to right: A, B, C" — or None for a caption that names no relation). None for a text the world's
    captions never take."""
    text = caption.strip().lower().rstrip(".")
    text = re.sub(r" on an? \w+ background$", "", text)
    text = re.sub(r"^\w+ shapes: ", "", text)  # "three shapes: ..." lists them
    order = next(((prefix, axis) for prefix, axis in _ORDERS.items() if text.startswith(prefix)), None)
    if order is not None:
        prefix, axis = order
        mentions = _mentions(text[len(prefix) :])
        if mentions is None:
            return None
        descs = [desc for count, desc in mentions for _ in range(count)]

        def ordered(objects: list[dict], margin: float) -> tuple[bool, bool | None]:
            present = _present(objects, mentions)
            return present, present and _in_order(objects, descs, axis)

        return ordered
    rel = next((rel for rel in RELATIONS if f" {rel} " in text), None)
    if rel is not None:
        left, right = (_mentions(part) for part in text.split(f" {rel} ", 1))
        if not left or not right or len(left) != 1 or len(right) != 1:
            return None
        (_, a), (_, b) = left[0], right[0]

        def related(objects: list[dict], margin: float) -> tuple[bool, bool | None]:
            pairs = [(x, y) for x in objects for y in objects if x is not y and _matches(x, a) and _matches(y, b)]
            return bool(pairs), any(relation(x, y, rel, margin) for x, y in pairs)

        return related
    mentions = _mentions(text)
    return None if mentions is None else lambda objects, margin: (_present(objects, mentions), None)


def caption_holds(caption: str, objects: list[dict], margin: float) -> tuple[bool, bool | None] | None:
    """``caption_check(caption)`` applied to one scene; None for a text outside the world's language."""
    check = caption_check(caption)
    return None if check is None else check(objects, margin)


CAPTION_KINDS = ("order", "relation", "shape counts", "colour counts", "object list")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_ATTRIBUTE_WORDS = (COLORS, SHAPES, SIZES)


def caption_kind(caption: str) -> str | None:
    """Which of the five caption forms (:data:`CAPTION_KINDS`) ``captions`` wrote ``caption`` in: "from left to
    right: ..." (order), "A left of B" (relation), "two circles and a square" (shape counts), "a red shape and two
    blue shapes" (colour counts), "three shapes: ..." / "... on a plain background" (object list); None for other
    text."""
    text = caption.strip().lower().rstrip(".")
    if caption_check(caption) is None:
        return None
    if text.startswith(tuple(_ORDERS)):
        return "order"
    if any(f" {rel} " in text for rel in RELATIONS):
        return "relation"
    if re.match(r"^\w+ shapes: ", text) or text.endswith(" background"):
        return "object list"
    return "colour counts" if " shape" in text else "shape counts"


def caption_foil(caption: str, objects: list[dict], margin: float, rng: np.random.Generator) -> str | None:
    """A hard negative of ``caption`` for its scene ``objects``: the caption with one thing changed — the colour, shape
    or size of one object it names, or its relation (the opposite relation; two neighbours of an order swapped) —
    that no longer holds for the scene (``caption_check``); None when no change makes it false.

    An ITM head trained on these must read every attribute and the relation: a negative drawn from other images
    mostly differs in several objects at once.
    """
    text = caption.strip().rstrip(".")
    words = text.split(" ")
    # a count caption names each shape (colour) once: a foil repeating one would be told by its form alone
    taken = set(tokens(text)) if caption_kind(text) in ("shape counts", "colour counts") else set()
    edits: list[str] = []
    for i, word in enumerate(words):
        core = word.rstrip(",:")
        punct = word[len(core) :]
        for pool in _ATTRIBUTE_WORDS:
            plural = core not in pool and core.endswith("s") and core[:-1] in pool
            stem = core[:-1] if plural else core
            if stem not in pool:
                continue
            for other in pool:
                if other != stem and other not in taken and other + "s" not in taken:
                    changed = [*words[:i], other + ("s" if plural else "") + punct, *words[i + 1 :]]
                    if i > 0 and changed[i - 1] in ("a", "an"):  # the article the new word takes
                        changed[i - 1] = _article(other).split(" ")[0]
                    edits.append(" ".join(changed))
    for rel, opposite in _OPPOSITE.items():
        if f" {rel} " in text:
            edits.append(text.replace(f" {rel} ", f" {opposite} ", 1))
    prefix = next((p for p in _ORDERS if text.startswith(p)), None)
    if prefix is not None:
        items = re.split(r", | and ", text[len(prefix) :])
        for i in range(len(items) - 1):
            swapped = [*items[:i], items[i + 1], items[i], *items[i + 2 :]]
            edits.append(prefix + _join(swapped))
    for j in rng.permutation(len(edits)):
        check = caption_check(edits[j])
        if check is not None and not all(v is not False for v in check(objects, margin)):
            return edits[j] + "."
    return None


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())
