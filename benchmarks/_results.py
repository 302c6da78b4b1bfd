"""Shared helper for the benchmarks: one result format, the machine noted, and the ``make benchmarks`` runner.

Format of every result (the last line a benchmark prints, and ``benchmarks/results/NAME.json``)::

    {"benchmark": NAME, ...the script's own keys..., "mode": "quick" | "full", "machine": {...}}

``machine`` records ``os.cpu_count()``, the CPU model, load average at the end of the run, Python and
platform, and ``OPENBLAS_CORETYPE`` / ``OMP_NUM_THREADS`` as set in the environment.

In a benchmark script::

    from _results import emit, full_mode     # benchmarks/ is on sys.path when a script runs
    ...
    emit("kmeans", {"ratio": ..., ...})      # prints the JSON line last and writes the file

Modes: ``BENCH_FULL=1`` selects each script's full-size defaults and writes ``benchmarks/results/NAME.json``
(the committed figures the README copies); otherwise the script's quick defaults and
``benchmarks/results/quick/NAME.json`` (not committed), so a quick run never overwrites the figures.

Scale benchmarks (:data:`SCALE_BENCHMARKS`: ``search_scale``, ``assign_scale``) commit figures at 10^7 rows,
which take tens of minutes on 2 cores: they run at 10^7 and write ``benchmarks/results/NAME.json`` only with
``BENCH_SCALE=1`` (``make benchmarks SCALE=1``); otherwise at their quick (10^5) or full (10^6) size into
``benchmarks/results/quick/``, so neither a quick nor a ``BENCH_FULL=1`` run replaces the 10^7 figures.

Runner (what ``make benchmarks`` calls)::

    python benchmarks/_results.py [NAME ...]        # quick; BENCH_FULL=1 for the full sizes

runs every ``benchmarks/*.py`` not starting with ``_`` (or the NAMEs given) in its own process, streams its
output, takes its last JSON line, adds ``benchmark``/``mode``/``machine`` when the script did not, and writes
the result file. Exits non-zero if any script failed or printed no JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


SCALE_BENCHMARKS = ("search_scale", "assign_scale")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def full_mode() -> bool:
    """True when ``BENCH_FULL`` is set to something other than ``0``/empty."""
    return _flag("BENCH_FULL")


def scale_mode() -> bool:
    """True when ``BENCH_SCALE`` is set (``make benchmarks SCALE=1``): the 10^7-row runs of the scale benchmarks."""
    return _flag("BENCH_SCALE")


def scale_rows(scale: int = 10**7, full: int = 10**6, quick: int = 10**5) -> int:
    """Rows a scale benchmark runs at: ``scale`` with BENCH_SCALE, ``full`` with BENCH_FULL, else ``quick``."""
    return scale if scale_mode() else full if full_mode() else quick


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_avg_1_5_15": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def result_path(name: str, full: bool | None = None) -> Path:
    if name in SCALE_BENCHMARKS:  # only the 10^7 runs replace the committed scale figures
        full = scale_mode() if full is None else full
    full = full_mode() if full is None else full
    return (RESULTS if full else RESULTS / "quick") / f"{name}.json"


def finish(name: str, result: dict, *, full: bool | None = None) -> dict:
    """``result`` with ``benchmark``, ``mode`` and ``machine`` filled in (kept when already there)."""
    full = full_mode() if full is None else full
    out = {"benchmark": name, **result}
    if name in SCALE_BENCHMARKS and scale_mode():
        out.setdefault("mode", "scale")
    out.setdefault("mode", "full" if full else "quick")
    out.setdefault("machine", machine())
    return out


def write(name: str, result: dict, *, full: bool | None = None) -> Path:
    path = result_path(name, full)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def emit(name: str, result: dict, *, write_file: bool = True) -> dict:
    """Fill in the common keys, write the result file (unless ``write_file`` is False) and print the JSON line last."""
    out = finish(name, result)
    if write_file:
        write(name, out)
    print(json.dumps(out), flush=True)
    return out


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_all(names: list[str] | None = None) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_"))
    if names:
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    for script in scripts:
        mode = "scale" if script.stem in SCALE_BENCHMARKS and scale_mode() else "full" if full_mode() else "quick"
        print(f"== {script.relative_to(HERE.parent)} ({mode})", flush=True)
        proc = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=root
        )
        lines = []
        for line in proc.stdout:  # stream the script's output through
            sys.stdout.write(line)
            lines.append(line)
        rc = proc.wait()
        res = last_json_line("".join(lines))
        if rc != 0 or res is None:
            failed.append(script.stem)
            print(f"!! {script.name}: exit {rc}, {'no JSON line' if res is None else 'JSON line kept'}", flush=True)
            continue
        path = write(script.stem, finish(res.get("benchmark", script.stem), res))
        print(f"-> {path.relative_to(HERE.parent)}", flush=True)
    if failed:
        print(f"failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_all(sys.argv[1:]))
