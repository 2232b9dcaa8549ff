"""CVSI's two LLM prompts: wording, per-dataset template files, message layout and answer parsing.

The two prompts (paper §III-C): ``p_m`` rewrites a reference caption ``C^B`` with the modification
text ``T`` into a modified caption ``C^M``; ``p_a`` names the objects most likely added (``F_add``).
A message is the template followed by the query::

    {template}
    Image Content: {C^B}
    Instruction: {T}
    {marker}

which is how the CVSI release builds it, so its templates reproduce its prompts exactly. The built-in
wording (:data:`MODIFY_PROMPT`, :data:`OBJECTS_PROMPT`) is this project's. Other templates come from
files given as ``[DATASET=]PATH[:NAME]`` (see :func:`select_template`): a text file is the template; a
Python file of string constants — such as the release's ``utils/prompt_templates.py`` — is read with
:mod:`ast` (never executed) and ``NAME`` picks a constant, by default the one the release uses for the
dataset (:data:`RELEASE_TEMPLATE_NAMES`).

Answers are read either *parsed* (this project: the first line after the marker, cleaned of markdown
and quotes) or *raw* (the release: the whole answer, stripped).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cvsi.llm import MalformedAnswer
from data_utils import DataError

__all__ = [
    "MODIFY_PROMPT", "OBJECTS_PROMPT", "MODIFY_MARKER", "OBJECTS_MARKER", "ROLES", "RELEASE_TEMPLATE_NAMES",
    "ANSWER_MODES", "build_messages", "parse_edited_description", "parse_added_objects", "parse_raw_answer",
    "answer_parsers", "read_template", "select_template",
]

MODIFY_MARKER = "Edited Description:"
OBJECTS_MARKER = "Objects most likely added:"
ROLES = ("modify", "objects")
ANSWER_MODES = ("parsed", "raw")

MODIFY_PROMPT = f"""You rewrite image descriptions. After "Image Content:" you get a description of an image, \
after "Instruction:" a request to change that image. Write one short description of the image as it \
looks after the change. Describe only the changed image, not the original one and not the change \
itself, and do not invent details that neither the description nor the request implies. Answer with a \
single line starting with "{MODIFY_MARKER}".

Image Content: a brown dog lying on a sofa
Instruction: replace the dog with two cats and make the sofa red
{MODIFY_MARKER} two cats lying on a red sofa

Image Content: a plate with rice, beans and a fried egg
Instruction: take away the egg and show it from above
{MODIFY_MARKER} a plate of rice and beans seen from above
"""

OBJECTS_PROMPT = f"""After "Image Content:" you get a description of an image, after "Instruction:" a \
request to change that image. Name the objects that the change most likely adds to the image, as a \
short comma-separated list of noun phrases keeping the details the request gives (colour, number, \
material). Answer with a single line starting with "{OBJECTS_MARKER}".

Image Content: a man holding a fish on a pier
Instruction: show a crowd watching him from behind a fence
{OBJECTS_MARKER} a crowd of people, a fence

Image Content: a white cup on a desk
Instruction: make it a pair of red mugs
{OBJECTS_MARKER} two red mugs
"""

# The constants of the release's utils/prompt_templates.py that its run scripts use per dataset
# (CIReVL's structural prompt for CIRCO, its contextual one for CIRR, a fashion variant for FashionIQ).
RELEASE_TEMPLATE_NAMES = {
    "modify": {"circo": "structural_modifier_prompt", "cirr": "contextual_modifier_prompt",
               "fashioniq": "structural_modifier_prompt_fashion"},
    "objects": {"circo": "re_and_add_prompt", "cirr": "re_and_add_prompt", "fashioniq": "re_and_add_prompt"},
}
_DATASET_PREFIX = re.compile(r"^(\w+)=(.+)$")


# ------------------------------------------------------------------------------------------ messages
def build_messages(template: str, caption: str, instruction: str, marker: str) -> list[dict[str, str]]:
    """One user message: the template verbatim, then ``Image Content: …``, ``Instruction: …`` and the marker."""
    text = f"{template}\nImage Content: {caption.strip()}\nInstruction: {instruction.strip()}\n{marker}"
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ answers
def _after_marker(text: str, marker: str) -> str:
    """The first non-empty line after the last ``marker`` (or of the whole text), cleaned of markdown
    emphasis, quotes and brackets."""
    lowered, key = text.lower(), marker.lower().rstrip(":")
    position = lowered.rfind(key)
    if position >= 0:
        text = text[position + len(key):].lstrip("*: \t")
    for line in text.splitlines():
        line = line.strip().strip("*_`\"'[]").strip()
        if line:
            return line
    return ""


def _parse_after(text: str, marker: str, what: str) -> str:
    answer = _after_marker(text, marker)
    if not answer or answer.lower().startswith(("image content", "instruction")):
        raise MalformedAnswer(f"no {what} in {text[:120]!r}")
    return answer


def parse_edited_description(text: str) -> str:
    """The modified caption ``C^M`` from an answer to a ``p_m`` prompt."""
    return _parse_after(text, MODIFY_MARKER, "edited description")


def parse_added_objects(text: str) -> str:
    """The objects most likely added, ``F_add``, from an answer to a ``p_a`` prompt."""
    return _parse_after(text, OBJECTS_MARKER, "objects")


def parse_raw_answer(text: str) -> str:
    """The whole answer, stripped (the release). An empty answer is malformed (the release would use it)."""
    answer = text.strip()
    if not answer:
        raise MalformedAnswer("empty answer")
    return answer


def answer_parsers(mode: str) -> dict[str, Callable[[str], str]]:
    """Role ('modify' / 'objects') -> parser, for ``mode`` 'parsed' (this project) or 'raw' (the release)."""
    if mode == "raw":
        return {"modify": parse_raw_answer, "objects": parse_raw_answer}
    if mode == "parsed":
        return {"modify": parse_edited_description, "objects": parse_added_objects}
    raise ValueError(f"unknown answer mode {mode!r}; expected one of {ANSWER_MODES}")


# ------------------------------------------------------------------------------------------ template files
def _string_constants(path: Path) -> dict[str, str]:
    """Module-level ``NAME = "..."`` string constants of a Python file, read without executing it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read prompt templates ({exc})") from exc
    constants = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
            constants[target.id] = value.value
    return constants


def read_template(spec: str, dataset: str, role: str) -> str:
    """The template ``PATH`` or ``PATH.py:NAME`` names; ``PATH.py`` alone takes the release's constant
    for ``dataset`` and ``role``.

    Raises:
        DataError: unreadable or empty file, or no such constant (the message lists those found).
    """
    path_text, name = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py"):
        path_text, name = head, tail
    path = Path(path_text)
    if path.suffix == ".py":
        constants = _string_constants(path)
        name = name or RELEASE_TEMPLATE_NAMES[role].get(dataset)
        if name is None:
            raise DataError(f"{path}: no release prompt is known for dataset {dataset!r}; name one as {path}:NAME")
        if name not in constants:
            raise DataError(f"{path}: no string constant {name!r} (found: {', '.join(sorted(constants)) or 'none'})")
        template = constants[name]
    else:
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read prompt template ({exc})") from exc
    if not template.strip():
        raise DataError(f"{spec}: the prompt template is empty")
    return template


def select_template(specs: Sequence[str], dataset: str, role: str, default: str, known: Iterable[str]) -> str:
    """The template for ``dataset`` among ``[DATASET=]PATH[:NAME]`` entries (one flag's values).

    An entry prefixed with the dataset wins over an unprefixed one, which applies to every dataset;
    entries for other datasets are ignored; with no entry, ``default`` (this project's wording).

    Raises:
        DataError: an unknown dataset prefix, two entries for one dataset, or a bad file.
    """
    if role not in ROLES:
        raise ValueError(f"unknown prompt role {role!r}; expected one of {ROLES}")
    known = set(known)
    chosen: dict[str | None, tuple[str, str]] = {}  # dataset or None (all) -> (entry, path part)
    for spec in specs:
        match = _DATASET_PREFIX.match(spec)
        target, path = (match.group(1), match.group(2)) if match and not Path(spec).is_file() else (None, spec)
        if target is not None and target not in known:
            raise DataError(f"prompt entry {spec!r}: unknown dataset {target!r} (expected one of {sorted(known)})")
        if target in chosen:
            raise DataError(f"prompt entries {chosen[target][0]!r} and {spec!r} both apply to "
                            f"{target or 'every dataset'}; give one")
        chosen[target] = (spec, path)
    entry = chosen.get(dataset, chosen.get(None))
    return default if entry is None else read_template(entry[1], dataset, role)
