"""Copy the tables that the benchmark scripts write to bench/results/<name>.md into BENCHMARKS.md.

Each table sits in BENCHMARKS.md between `<!-- <name>:begin -->` and `<!-- <name>:end -->`; the text around the
markers (the reading of each table) is written by hand. Run after any benchmark script:

    .venv/bin/python bench/tables.py
"""

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TABLES = ("data_fmnist", "infobatch", "data_text", "data_throughput", "training", "training.overhead", "startup")


def read_rows(path: Path) -> list[dict]:
    """The rows of a benchmark's JSON-lines file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def table_rows(path: Path) -> list[dict]:
    """The rows a table is built from; a one-line error (exit 2) when the benchmark has not written any yet."""
    rows = read_rows(path)
    if not rows:
        name = Path(sys.argv[0]).name
        print(f"{name}: no rows in {path} yet: run the benchmark without --table first", file=sys.stderr)
        sys.exit(2)
    return rows


def median_cell(values: list[float], fmt: Callable[[float], str]) -> str:
    """The median of repeated measurements (seeds), followed by their range when there is more than one."""
    values = sorted(values)
    cell = fmt(statistics.median(values))
    return cell + (f" ({fmt(values[0])}–{fmt(values[-1])})" if len(values) > 1 else "")


def append_row(path: Path, row: dict) -> None:
    """Add one finished row to a benchmark's JSON-lines file, so that a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def place(name: str, text: str, heading: str) -> None:
    """Put `text` between the markers of `name` in BENCHMARKS.md; if the file has none yet, add them at the end of
    the section under `heading` (a `## ` Markdown heading line, itself added at the end of the file if missing)."""
    path = ROOT / "BENCHMARKS.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = path.read_text(encoding="utf-8")
    if begin in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end):]
    elif heading in current:
        start = current.index(heading) + len(heading)
        following = current.find("\n## ", start)
        cut = len(current) if following < 0 else following
        current = current[:cut].rstrip() + "\n\n" + block + "\n" + current[cut:]
    else:
        current = current.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    path.write_text(current, encoding="utf-8")


def publish(name: str, text: str, heading: str, figure: str | None = None) -> None:
    """Print a benchmark's table, write it to bench/results/<name>.md and place it in BENCHMARKS.md under `heading`
    (see `place`), followed by the plot bench/results/<name>.png when `figure` gives its alt text."""
    print(text)
    (RESULTS / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    place(name, text + (f"\n\n![{figure}](bench/results/{name}.png)" if figure else ""), heading)


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every resumable benchmark starts from: its docstring as help, --threads and --table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the JSON lines")
    return parser


def run_bench(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
              write: Callable[[argparse.Namespace], None]) -> None:
    """Parse the command line, measure what is missing (unless --table), then write the table."""
    args = parser.parse_args()
    if not args.table:
        run(args)
    write(args)


def main() -> int:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    for name in TABLES:
        pattern = re.compile(rf"(<!-- {re.escape(name)}:begin -->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
        if not pattern.search(text):
            print(f"tables: BENCHMARKS.md has no markers for '{name}'", file=sys.stderr)
            return 2
        table = (RESULTS / f"{name}.md").read_text(encoding="utf-8").strip() + "\n"
        text = pattern.sub(lambda m, table=table: m.group(1) + table + m.group(2), text)
    path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
