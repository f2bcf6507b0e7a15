"""Run every chapter under other seeds, thread counts and floating-point kernels.

A chapter's checks on trained results and timings must hold on any reader's machine, not only
on the one that wrote them (book/running.md, "Two kinds of check"). ``make robust`` runs each
chapter alone, in a fresh kernel in an empty folder, under a matrix of configurations, and
prints a table of chapter x configuration: the seconds a chapter took, or the cell that
failed. It exits non-zero when any run fails. It is not part of ``make test``: the whole
matrix takes about 50 minutes on two cores.

    python tools/robust.py                      # every chapter, every configuration
    python tools/robust.py --chapters senet --configs seed-1 generic-kernels
    python tools/robust.py --chapters senet --keep runs/  # the executed notebooks too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from save import toc_chapters  # noqa: E402

# CPU kernels other than the ones PyTorch picks for this processor: the portable ATen kernels
# instead of AVX2/AVX-512, MKL's reproducible code path, and oneDNN limited to AVX2. Each
# makes the convolutions and sums add in another order, as another reader's CPU would.
GENERIC_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def configurations() -> dict[str, dict[str, str]]:
    """Name -> environment of each configuration; a GPU configuration if one is present."""
    configs = {f"seed-{seed}": {"CNNBOOK_SEED": str(seed)} for seed in range(5)}
    configs["1-thread"] = {"OMP_NUM_THREADS": "1"}
    if os.cpu_count() != 2:  # on two cores the seeds above already run on two threads
        configs["2-threads"] = {"OMP_NUM_THREADS": "2"}
    configs["generic-kernels"] = dict(GENERIC_KERNELS)
    configs["generic-kernels-seed-3"] = dict(GENERIC_KERNELS, CNNBOOK_SEED="3")
    # The chapters choose CUDA by themselves when it is there; on a CPU-only machine the
    # configuration would repeat seed-0, so it is left out.
    probe = "import torch; print(torch.cuda.is_available())"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    if result.stdout.strip() == "True":
        configs["cuda"] = {}
    else:
        # Without CUDA the chapters run on the CPU; hide any GPU from them all the same.
        for env in configs.values():
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return configs


def run_one(notebook: Path, timeout: int, keep: Path | None) -> dict[str, object]:
    """Execute ``notebook`` in a fresh kernel in an empty folder; report the outcome,
    and write the executed notebook to ``keep`` if given."""
    import jupytext
    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(notebook)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": folder}},
        )
        try:
            client.execute()
            outcome: dict[str, object] = {"ok": True}
        except CellExecutionError as error:
            failing = next(
                (
                    index
                    for index, cell in enumerate(nb.cells)
                    if cell.cell_type == "code"
                    and any(o.get("output_type") == "error" for o in cell.outputs)
                ),
                None,
            )
            line = str(error).strip().splitlines()[-1][:160]
            outcome = {"ok": False, "cell": failing, "error": line}
        except Exception as error:  # a timeout or a dead kernel: report, do not crash
            outcome = {"ok": False, "cell": None, "error": repr(error)[:160]}
    if keep is not None:
        nbformat.write(nb, keep)
    outcome["seconds"] = round(time.perf_counter() - start, 1)
    return outcome


def main() -> int:
    chapters = {path.stem: path for path in toc_chapters()}
    configs = configurations()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters", nargs="+", choices=sorted(chapters))
    parser.add_argument("--configs", nargs="+", choices=sorted(configs))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--report", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--keep",
        type=Path,
        help="write each executed notebook to this folder, as CHAPTER-CONFIG.ipynb, "
        "to read the values behind a spread",
    )
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--keep-as", type=Path, help=argparse.SUPPRESS)  # with --run
    args = parser.parse_args()
    if args.run is not None:
        print(json.dumps(run_one(args.run, args.timeout, args.keep_as)))
        return 0
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)

    names = args.chapters or list(chapters)
    config_names = args.configs or list(configs)
    table: dict[str, dict[str, str]] = {name: {} for name in names}
    failures = 0
    for config in config_names:
        # As `make` does: OpenMP threads that spin while they wait stall a busy machine.
        env = dict(os.environ, **configs[config])
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for name in names:
            command = [sys.executable, __file__, "--run", str(chapters[name])]
            command += ["--timeout", str(args.timeout)]
            if args.keep is not None:
                kept = args.keep.resolve() / f"{name}-{config}.ipynb"
                command += ["--keep-as", str(kept)]
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, check=False
            )
            try:
                outcome = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                outcome = {"ok": False, "cell": None, "error": done.stderr[-160:]}
            if outcome["ok"]:
                table[name][config] = f"{outcome['seconds']:.0f} s"
            else:
                failures += 1
                table[name][config] = f"FAIL cell {outcome['cell']}"
                print(f"{name} / {config}: {outcome['error']}", flush=True)
            print(f"{name:12s} {config:24s} {table[name][config]}", flush=True)

    width = max(len(c) for c in config_names) + 2
    lines = [f"{'chapter':12s}" + "".join(f"{c:>{width}s}" for c in config_names)]
    for name in names:
        cells = "".join(f"{table[name][c]:>{width}s}" for c in config_names)
        lines.append(f"{name:12s}{cells}")
    lines.append(f"{len(names) * len(config_names) - failures} passed, {failures} failed")
    report = "\n".join(lines)
    print(report)
    if args.report is not None:
        args.report.write_text(report + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
