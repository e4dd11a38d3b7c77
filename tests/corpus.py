"""The reference corpus: paragraphs of the docstrings of the running CPython's standard library.

Deterministic (files in sorted order, nodes in ast.walk order, first occurrence kept), real English
nobody here wrote, on every machine, with no download. Rule: the top-level modules of the stdlib
folder; module, class and function docstrings (inspect-cleaned); split at blank lines; whitespace
collapsed; duplicates dropped; paragraphs of at least 20 characters holding a word of 3+ lowercase
letters and not starting with a doctest prompt. On CPython 3.11: 6,825 paragraphs, median 67
characters, 90th percentile 240, longest 1,698.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
from pathlib import Path


@functools.lru_cache(maxsize=1)
def stdlib_paragraphs() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    paragraphs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node, clean=True) or ""):
                paragraph = " ".join(paragraph.split())
                if (len(paragraph) >= 20 and not paragraph.startswith(">>>")
                        and re.search("[a-z]{3}", paragraph) and paragraph not in seen):
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return tuple(paragraphs)


if __name__ == "__main__":
    import statistics

    texts = stdlib_paragraphs()
    sizes = sorted(len(t) for t in texts)
    print(f"{len(texts)} paragraphs, median {statistics.median(sizes)} characters, "
          f"90th percentile {sizes[int(0.9 * len(sizes))]}, longest {sizes[-1]}")
