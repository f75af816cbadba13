"""Start-up time of the command line: `prunekit --help`, a verb's help, and an argument error.

Each command runs in a fresh process, `--repeats` times, interleaved; the table gives the median and the range of
wall times, and what the import of `prunekit.cli` pulls in (`python -X importtime`). Writes
bench/results/startup.{json,md}; copy the table into BENCHMARKS.md with bench/tables.py.

    .venv/bin/python bench/startup.py --repeats 11
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PRUNEKIT = [sys.executable, "-m", "prunekit.cli"]
COMMANDS = {
    "prunekit --help": ["--help"],
    "prunekit prune --help": ["prune", "--help"],
    "prunekit data --help": ["data", "--help"],
    "argument error (--batch-size many)": ["prune", "--model", "m", "--out", "o", "--batch-size", "many"],
    "python -c 'import torch' (reference)": None,
}


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    return time.perf_counter() - start


def _heavy_imports() -> dict[str, bool]:
    code = "import sys, prunekit.cli as c; c.build_parser(); print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    return {name: name in loaded for name in ("torch", "transformers", "numpy", "pyarrow")}


def _import_total_ms() -> float:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import prunekit.cli"], capture_output=True,
                         text=True, check=True).stderr
    cumulative = [int(m.group(1)) for m in re.finditer(r"\|\s*(\d+) \| prunekit\.cli$", err, re.M)]
    return cumulative[-1] / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            command = [sys.executable, "-c", "import torch"] if argv is None else [*PRUNEKIT, *argv]
            times[name].append(_time(command))
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": args.repeats,
        "seconds": times,
        "import_prunekit_cli_ms": _import_total_ms(),
        "modules_loaded_by_build_parser": _heavy_imports(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| command (fresh process) | median s | min–max s |", "|---|---:|---:|"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    loaded = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in record["modules_loaded_by_build_parser"].items())
    lines.append("")
    lines.append(f"`import prunekit.cli`: {record['import_prunekit_cli_ms']:.0f} ms (`python -X importtime`); "
                 f"loaded by building the parser: {loaded}. {record['machine']}, {args.repeats} interleaved repeats.")
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
