"""The prompt filter: refuse a prompt before anything is generated for it (DALL-E 2 shipped one).

A blocklist file holds one entry per line: a word or phrase or, after `re:`, a Python regular
expression (searched, any case; the whole line is the expression); elsewhere `#` starts a comment.
Words and phrases are matched on the prompt normalized as a person would read it, so the usual
evasions do not pass: case, Unicode look-alikes and full-width forms, accents, digits and symbols
for letters (`nud3`, `n@ked`), punctuation or spaces inside a word (`n.u.d.e`, `n u d e`), and
inflections (`nudes`, `naked`-ness is its own entry). Expressions are searched in the prompt as
written and in its normalized words. Classifiers plug in as callables `prompt -> reason or None` (a
moderation model, a service call), in Python or on the command line as `module:function`.

    f = PromptFilter.from_file("blocklist.txt", classifiers=[my_classifier])
    allowed, refused = f.split(["a red circle", ...])     # refused: [(prompt, reason), ...]
"""

from __future__ import annotations

import importlib
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
Classifier = Callable[[str], "str | None"]


@dataclass
class PromptFilter:
    patterns: list[tuple[str, re.Pattern | None, list | None]] = field(default_factory=list)  # parse_blocklist
    classifiers: list[Classifier] = field(default_factory=list)
    source: str = "none"  # where the entries came from, for messages and provenance

    @classmethod
    def from_file(cls, path: str | os.PathLike = DEFAULT_BLOCKLIST, classifiers: Sequence[Classifier] = ()):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt blocklist {path} does not exist")
        return cls(parse_blocklist(path.read_text().splitlines(), str(path)), list(classifiers), str(path))

    @classmethod
    def default(cls) -> PromptFilter:
        return cls.from_file(DEFAULT_BLOCKLIST)

    def check(self, prompt: str) -> str | None:
        """None if the prompt may be generated, else the reason it may not."""
        words = normalized_words(prompt)
        joined = " ".join(words)
        runs = letter_runs(prompt)
        for entry, pattern, phrase in self.patterns:
            if phrase is None:
                hit = pattern.search(prompt) or pattern.search(joined)
            else:
                hit = _contains(words, phrase) or any(len(phrase) == 1 and phrase[0] in run for run in runs)
            if hit:
                return f"blocklist ({self.source}): {entry}"
        for classify in self.classifiers:
            reason = classify(prompt)
            if reason:
                name = getattr(classify, "__name__", type(classify).__name__)
                return f"classifier {name}: {reason}"
        return None

    def split(self, prompts: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """(allowed prompts, [(refused prompt, reason)]), in the order given."""
        allowed, refused = [], []
        for prompt in prompts:
            reason = self.check(prompt)
            if reason is None:
                allowed.append(prompt)
            else:
                refused.append((prompt, reason))
        return allowed, refused


def parse_blocklist(
    lines: Iterable[str], source: str = "blocklist"
) -> list[tuple[str, re.Pattern | None, list | None]]:
    """[(entry as written, compiled expression or None, normalized words or None)]."""
    patterns = []
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("re:") else raw.strip()
        if not line:
            continue
        if line.startswith("re:"):
            try:
                patterns.append((line, re.compile(line[3:].strip(), re.IGNORECASE), None))
            except re.error as e:
                raise ValueError(f"{source}, line {n}: bad regular expression {line[3:].strip()!r}: {e}") from e
        else:
            words = normalized_words(line)
            if words:
                patterns.append((line, None, words))
    return patterns


# --- normalization: the prompt as a person reads it ---------------------------------------------------
# Letters that look like Latin ones (Cyrillic and Greek), and digits and symbols written for letters.
LOOKALIKES = str.maketrans(
    "абвгдезиклмнорстухцчшщъыьэюяіјѕԁԛԝαβεηικνορτυχωγ",
    "abvgdeziklmhopctyxcchhbbbeuaijsdqwabenikvoptuxwy",
)
LEET = str.maketrans("013457@$!|8", "oieastasilb")
SUFFIXES = ("s", "es", "d", "ed", "ing", "er", "ers", "ness", "y", "al", "ity")


def normalized_words(text: str) -> list[str]:
    """The words of `text`: Unicode-normalized (NFKC: full-width forms), accents dropped, look-alike
    letters mapped to Latin, case-folded, digits and symbols inside a word read as the letters they
    imitate, and anything else inside a word dropped (`n.u.d.e` -> `nude`)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    words = []
    for token in text.translate(LOOKALIKES).split():
        if any(c.isalpha() for c in token):
            token = token.translate(LEET)
        word = "".join(c for c in token if c.isalnum())
        if word:
            words.append(word)
    return words


def letter_runs(text: str) -> list[str]:
    """Runs of single letters written apart (`n u d e`, `n-u-d-e`), joined: a word spelled out."""
    words = normalized_words(re.sub(r"[^\w\s]", " ", text))
    runs, current = [], ""
    for w in words + [""]:
        if len(w) == 1:
            current += w
        else:
            if len(current) > 2:
                runs.append(current)
            current = ""
    return runs


def _same_word(word: str, blocked: str) -> bool:
    """`word` is `blocked` or an inflection of it (nudes, nuded, undressing, ...)."""
    if word == blocked:
        return True
    stems = {blocked, blocked[:-1]} if blocked.endswith("e") else {blocked}
    return any(word == stem + suffix for stem in stems for suffix in SUFFIXES)


def _contains(words: list[str], phrase: list[str]) -> bool:
    """The phrase in the words, each word or an inflection of it; a one-word entry also as two to four
    words written apart (`self harm` for `self-harm`, `nu de`)."""
    n = len(phrase)
    if any(all(_same_word(w, b) for w, b in zip(words[i : i + n], phrase)) for i in range(len(words) - n + 1)):
        return True
    if n == 1:
        return any(
            _same_word("".join(words[i : i + k]), phrase[0]) for k in (2, 3, 4) for i in range(len(words) - k + 1)
        )
    return False


def load_classifier(spec: str) -> Classifier:
    """'package.module:function' -> the callable."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"a prompt classifier is given as module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load prompt classifier {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"prompt classifier {spec!r} is not callable")
    return fn
