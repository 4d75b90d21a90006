"""The prompt filter: refuse a prompt before anything is generated for it (DALL-E 2 shipped one).

A blocklist file holds one entry per line: a word or phrase (matched whole-word, any case) or, after
`re:`, a Python regular expression (searched, any case; the whole line is the expression); elsewhere
`#` starts a comment. Classifiers plug in as
callables `prompt -> reason or None` (a moderation model, a service call), in Python or on the
command line as `module:function`.

    f = PromptFilter.from_file("blocklist.txt", classifiers=[my_classifier])
    allowed, refused = f.split(["a red circle", ...])     # refused: [(prompt, reason), ...]
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
Classifier = Callable[[str], "str | None"]


@dataclass
class PromptFilter:
    patterns: list[tuple[str, re.Pattern]] = field(default_factory=list)  # (entry as written, compiled)
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
        for entry, pattern in self.patterns:
            if pattern.search(prompt):
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


def parse_blocklist(lines: Iterable[str], source: str = "blocklist") -> list[tuple[str, re.Pattern]]:
    patterns = []
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("re:") else raw.strip()
        if not line:
            continue
        if line.startswith("re:"):
            try:
                patterns.append((line, re.compile(line[3:].strip(), re.IGNORECASE)))
            except re.error as e:
                raise ValueError(f"{source}, line {n}: bad regular expression {line[3:].strip()!r}: {e}") from e
        else:
            words = r"\s+".join(re.escape(w) for w in line.split())
            patterns.append((line, re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)))
    return patterns


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
