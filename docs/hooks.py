"""MkDocs hook: the plots under benchmarks/results, shown in the docs without copies.

The result pages link their plots by their path in the repository
(`../../benchmarks/results/leakage/query_efficiency_reach.png`), so that they also show on a
forge's file view. MkDocs only publishes files under `docs/`, so this hook adds each plot that
a page links to the site as `results/img/<path under benchmarks/results>` and points the
page's link there. A link to a plot that does not exist is left as it is, and
`mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = "benchmarks/results"
SITE_FOLDER = "results/img"
# Markdown links and images whose target lies under benchmarks/results (a relative path).
LINK = re.compile(r"(\]\()([^)\s]+\.(?:png|svg))(\))")


def _repository(config: Any) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _target(page_uri: str, link: str) -> str | None:
    """The link's path relative to the repository root, if it points under RESULTS."""
    if "://" in link or link.startswith("/"):
        return None
    # The page's folder, as seen from the repository root.
    folder = posixpath.join("docs", posixpath.dirname(page_uri))
    path = posixpath.normpath(posixpath.join(folder, link))
    return path if path.startswith(RESULTS + "/") else None


def _site_uri(path: str) -> str:
    return posixpath.join(SITE_FOLDER, path[len(RESULTS) + 1 :])


def on_files(files: Files, config: Any) -> Files:
    """Add every plot that a page links to under benchmarks/results to the site."""
    root = _repository(config)
    wanted: set[str] = set()
    for file in files.documentation_pages():
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        for match in LINK.finditer(text):
            path = _target(file.src_uri, match.group(2))
            if path is not None and (root / path).is_file():
                wanted.add(path)
    for path in sorted(wanted):
        files.append(File.generated(config, _site_uri(path), abs_src_path=str(root / path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links to plots under benchmarks/results at their copies in the site."""

    def rewrite(match: re.Match[str]) -> str:
        path = _target(page.file.src_uri, match.group(2))
        if path is None or files.get_file_from_path(_site_uri(path)) is None:
            return match.group(0)
        here = posixpath.dirname(page.file.src_uri) or "."
        return match.group(1) + posixpath.relpath(_site_uri(path), here) + match.group(3)

    return LINK.sub(rewrite, markdown)
