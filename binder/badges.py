"""Point every Binder and Colab badge, and the notebooks' Colab install cell, at one repository address.

The address (GitHub ``owner/name`` and a branch or tag) lives in one place,
``binder/repo.mk``; ``make badges REPO=myorg/nnlab REF=v0.1.0`` runs this
script, which writes the new address there and rewrites, in README.md, every
notebook and pyproject.toml:

* the Binder badge and links: ``https://mybinder.org/v2/gh/OWNER/NAME/REF?...``;
* the Colab badges: ``https://colab.research.google.com/github/OWNER/NAME/blob/REF/notebooks/...``;
* the Colab install cell: ``git clone ... --branch REF https://github.com/OWNER/NAME ...``;
* the project's home page: ``https://github.com/OWNER/NAME``.

``--check`` rewrites nothing and lists every link that disagrees with
``binder/repo.mk`` (exit status 1 if any).  Only the standard library is used.

    python binder/badges.py --repo myorg/nnlab --ref main
    python binder/badges.py --check
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path("binder") / "repo.mk"

_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_REF = re.compile(r"^[A-Za-z0-9_.-]+$")
_NAME = r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"
_REFPAT = r"[A-Za-z0-9_.-]+"

#: (what, pattern with groups repo and ref, replacement template)
LINKS = [
    ("Binder link", re.compile(rf"(https://mybinder\.org/v2/gh/)(?P<repo>{_NAME})/(?P<ref>{_REFPAT})(?=\?)"),
     r"\g<1>{repo}/{ref}"),
    ("Colab badge", re.compile(rf"(https://colab\.research\.google\.com/github/)(?P<repo>{_NAME})/blob/"
                               rf"(?P<ref>{_REFPAT})(?=/notebooks/)"), r"\g<1>{repo}/blob/{ref}"),
    ("Colab install cell", re.compile(rf"(git clone [^\n\"]*?--branch )(?P<ref>{_REFPAT})( https://github\.com/)"
                                      rf"(?P<repo>{_NAME})(?= )"), r"\g<1>{ref}\g<3>{repo}"),
    ("home page", re.compile(rf"(Homepage = \"https://github\.com/)(?P<repo>{_NAME})(?=\")"), r"\g<1>{repo}"),
]


def read_config(root: Path = ROOT) -> tuple[str, str]:
    """The configured ``(repo, ref)`` from ``binder/repo.mk``."""
    text = (root / CONFIG).read_text()
    values = dict(re.findall(r"^(REPO|REF)\s*\??=\s*(\S+)\s*$", text, re.M))
    missing = {"REPO", "REF"} - set(values)
    if missing:
        raise ValueError(f"{root / CONFIG} must set {' and '.join(sorted(missing))} (e.g. REPO = nnlab/nnlab)")
    return values["REPO"], values["REF"]


def files(root: Path = ROOT) -> list[Path]:
    """Every file that holds a badge or link: README, the notebooks and pyproject.toml."""
    found = [root / "README.md", root / "pyproject.toml", *sorted((root / "notebooks").glob("*.ipynb"))]
    return [f for f in found if f.exists()]


def links(text: str):
    """Yield ``(what, repo, ref)`` for every badge or link in ``text`` (ref None where the link has none)."""
    for what, pattern, _ in LINKS:
        for m in pattern.finditer(text):
            yield what, m.group("repo"), m.groupdict().get("ref")


def check(root: Path = ROOT) -> list[str]:
    """Every link that disagrees with ``binder/repo.mk``, as ``"file: what points to repo@ref"``."""
    repo, ref = read_config(root)
    wrong = []
    for path in files(root):
        for what, r, f in links(path.read_text(encoding="utf-8")):
            if r != repo or (f is not None and f != ref):
                wrong.append(f"{path.relative_to(root)}: {what} points to {r}@{f}, configured {repo}@{ref}")
    return wrong


def _write(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rewrite(repo: str, ref: str, root: Path = ROOT) -> dict:
    """Point every badge and link at ``repo`` and ``ref``, and record them in ``binder/repo.mk``.

    Args:
        repo: GitHub ``owner/name``.
        ref: branch or tag (letters, digits, ``.``, ``_``, ``-``).
        root: the repository's root.

    Returns:
        ``{file: number of links rewritten}``.

    Raises:
        ValueError: ``repo`` or ``ref`` is not of that form.
    """
    if not _REPO.match(repo):
        raise ValueError(f"REPO must be a GitHub owner/name such as nnlab/nnlab, got {repo!r}")
    if not _REF.match(ref):
        raise ValueError(f"REF must be a branch or tag of letters, digits, '.', '_' and '-', got {ref!r}")
    counts = {}
    for path in files(root):
        text = path.read_text(encoding="utf-8")
        new, n = text, 0
        for _, pattern, template in LINKS:
            new, k = pattern.subn(template.format(repo=repo, ref=ref), new)
            n += k
        if new != text:
            _write(path, new)
        counts[str(path.relative_to(root))] = n
    config = root / CONFIG
    text = config.read_text()
    text = re.sub(r"^REPO\s*\??=.*$", f"REPO = {repo}", text, flags=re.M)
    text = re.sub(r"^REF\s*\??=.*$", f"REF = {ref}", text, flags=re.M)
    _write(config, text)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", help="GitHub owner/name, e.g. myorg/nnlab (default: binder/repo.mk)")
    parser.add_argument("--ref", help="branch or tag, e.g. main or v0.1.0 (default: binder/repo.mk)")
    parser.add_argument("--check", action="store_true", help="only list the links that disagree with binder/repo.mk")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        wrong = check(args.root)
        for line in wrong:
            print(line)
        if not wrong:
            repo, ref = read_config(args.root)
            print(f"every badge and link points to {repo}@{ref}")
        return 1 if wrong else 0
    repo, ref = read_config(args.root)
    try:
        counts = rewrite(args.repo or repo, args.ref or ref, args.root)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"badges and links now point to {args.repo or repo}@{args.ref or ref}: "
          f"{sum(counts.values())} links in {sum(1 for n in counts.values() if n)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
