"""`make bench`: run every benchmarks/bench_*.py and collect their sections into RESULTS.md.

Each script prints a markdown section starting with '## '; sections are replaced in RESULTS.md by
heading, so results of benchmarks that were not run are kept.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def merge(results: Path, section: str) -> None:
    text = (
        results.read_text()
        if results.exists()
        else "# Benchmark results\n\nWritten by `make bench` (benchmarks/run.py).\n\n"
    )
    heading = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(section.rstrip() + "\n\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section.rstrip() + "\n"
    )
    results.write_text(text)


def main() -> int:
    only = sys.argv[1:]
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        if only and not any(o in script.name for o in only):
            continue
        print(f"== {script.name}", flush=True)
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        sys.stdout.write(res.stdout[-4000:])
        if res.returncode != 0:
            failed += 1
            sys.stderr.write(res.stderr[-4000:])
            continue
        out = res.stdout
        start = out.find("## ")
        if start >= 0:
            merge(HERE / "RESULTS.md", out[start:])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
