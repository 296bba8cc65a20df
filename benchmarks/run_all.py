"""`make bench`: run every benchmarks/bench_*.py on the present device, each in its own process."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
failed = []
for script in sorted(here.glob("bench_*.py")):
    print(f"=== {script.name}", flush=True)
    if subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0:
        failed.append(script.name)
if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
raise SystemExit(1 if failed else 0)
