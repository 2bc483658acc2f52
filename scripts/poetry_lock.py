"""Run `poetry lock` against a package index that serves only HTML simple pages.

Poetry asks PyPI for PEP 691 JSON simple pages; some mirrors answer with the PEP 503 HTML page
instead (and no per-version JSON API), and `poetry lock` dies with a JSONDecodeError. This wrapper converts
the HTML page to the JSON shape poetry expects and then runs poetry unchanged, so the lock file is the one `poetry lock`
writes. Usage: python scripts/poetry_lock.py [extra poetry lock flags]
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from urllib.parse import urldefrag

import requests
from poetry.console.application import main
from poetry.repositories import pypi_repository
from poetry.repositories.exceptions import PackageNotFoundError
from poetry.repositories.legacy_repository import LegacyRepository


class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.files: list[dict] = []
        self._attrs: dict | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._attrs, self._text = dict(attrs), ""

    def handle_data(self, data):
        if self._attrs is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag != "a" or self._attrs is None:
            return
        a, self._attrs = self._attrs, None
        url, frag = urldefrag(a.get("href", ""))
        hashes = dict([frag.split("=", 1)]) if "=" in frag else {}
        entry = {"filename": self._text.strip(), "url": url, "hashes": hashes}
        if a.get("data-requires-python"):
            entry["requires-python"] = a["data-requires-python"]
        if "data-yanked" in a:
            entry["yanked"] = a["data-yanked"] or True
        meta = a.get("data-core-metadata") or a.get("data-dist-info-metadata")
        if meta:
            entry["core-metadata"] = dict([meta.split("=", 1)]) if "=" in meta else True
        self.files.append(entry)


def _get_package_info(self, name):
    response = requests.get(self._base_url + f"simple/{name}/", timeout=60, headers={"Accept": "text/html"})
    if response.status_code == 404:
        raise PackageNotFoundError(f"Package [{name}] not found.")
    response.raise_for_status()
    if response.headers.get("content-type", "").startswith("application/vnd.pypi.simple.v1+json"):
        return response.json()
    parser = _Anchors()
    parser.feed(response.text)
    return {"name": name, "files": parser.files, "meta": {"api-version": "1.0"}}


pypi_repository.PyPiRepository._get_package_info = _get_package_info
# Such mirrors also lack the per-version JSON API: read release files and metadata from the
# simple page's links (PEP 658 metadata or the wheel itself), exactly as for a legacy source.
pypi_repository.PyPiRepository._get_release_info = LegacyRepository._get_release_info

if __name__ == "__main__":
    sys.argv = ["poetry", "lock", *sys.argv[1:]]
    sys.exit(main())
