"""The running interpreter's standard-library Python source as a code corpus, split into train and held-out files.

Owns: where the standard library lives (`stdlib_root`), which files belong to the corpus (`parse_quietly` parses
one without warnings), and the fixed held-out modules (`HELD_OUT_MODULES`) kept for evaluation only. A corpus file is a
`.py` file under the root that
- is not inside `site-packages` / `dist-packages` (third-party code), `__pycache__` or the build's `config-*` folder,
- is not the generated, platform-specific `_sysconfigdata_*.py`,
- decodes as UTF-8 and parses with `ast.parse`.
The held-out split is the files of the held-out modules (top-level module = first path component, `.py` dropped)
outside any test suite. The train split is every other corpus file, test suites included (files under a folder named
`test`, `tests` or `idle_test`: `test/`, `idlelib/idle_test`, `unittest/test`, ...), except the tests of a held-out
module: a test-suite file with a path component that, less a leading `test_`, begins with a held-out module's name
(`test/test_csv.py`, `test/test_json/`, `test/test_htmlparser.py`) is in neither split. The library split is the
train split without its test suites.
Listings are sorted by path relative to the root, so they are deterministic for a given interpreter; the scan runs
once per process. Held-out and train never share a file.
Must not: tokenize, batch or know about models.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import warnings
from pathlib import Path

# Ordinary, varied pure-Python modules present in CPython 3.10 to 3.13 (none deprecated or removed in that range):
# text processing, numbers, data formats, algorithms, file and date utilities. Two are packages (html, json).
HELD_OUT_MODULES: tuple[str, ...] = (
    "base64", "bisect", "calendar", "colorsys", "csv", "difflib", "filecmp", "fnmatch", "fractions", "gettext",
    "glob", "graphlib", "heapq", "html", "ipaddress", "json", "netrc", "pprint", "sched", "shlex", "statistics",
    "textwrap",
)

SPLITS = ("train", "heldout", "library")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """The standard library's source folder of the running interpreter (sysconfig's 'stdlib' path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def in_test_suite(path: Path, root: Path | None = None) -> bool:
    """True for a file under a folder named test, tests or idle_test."""
    return bool(TEST_DIRS & set(Path(path).relative_to(root or stdlib_root()).parts[:-1]))


def split_of(path: Path, root: Path | None = None) -> str | None:
    """"train" or "heldout" for a corpus file, None for the tests of a held-out module (in neither split)."""
    parts = Path(path).relative_to(root or stdlib_root()).parts
    if not in_test_suite(path, root):
        return "heldout" if parts[0].removesuffix(".py") in HELD_OUT_MODULES else "train"
    names = (part.removesuffix(".py").removeprefix("test_") for part in parts)
    return None if any(name.startswith(HELD_OUT_MODULES) for name in names) else "train"


def parse_quietly(source: str) -> ast.Module:
    """`ast.parse` without its syntax warnings: library files hold old escapes such as "\\(" that Python 3.11 warns
    about (3.12 as a SyntaxWarning printed by default), which says nothing about whether the code parses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)


def _is_python(path: Path) -> bool:
    """True when the file decodes as UTF-8 and parses (syntax warnings such as bad escapes are ignored)."""
    try:
        parse_quietly(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def _corpus(root: str) -> tuple[Path, ...]:
    """Every corpus file under `root`, sorted by relative path."""
    base = Path(root)
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(Path(folder, name))
    found.sort(key=lambda p: p.relative_to(base).as_posix())
    return tuple(p for p in found if _is_python(p))


def stdlib_files(split: str) -> list[Path]:
    """The sorted corpus files of one split: "train" (everything else), "heldout" (HELD_OUT_MODULES only) or
    "library" (the train files outside the test suites)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = stdlib_root()
    if not root.is_dir():
        raise OSError(f"the standard library source folder {root} does not exist")
    if split == "library":
        return [p for p in stdlib_files("train") if not in_test_suite(p, root)]
    return [p for p in _corpus(str(root)) if split_of(p, root) == split]
