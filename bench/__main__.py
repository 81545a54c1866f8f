"""`python -m bench` (or `make bench`): the scorer, the daemon end to end, the reliability suite.

    python -m bench                      # everything, on CUDA when available, else CPU
    python -m bench --quick              # tiny sizes: checks the code paths, numbers mean nothing
    python -m bench --only scorer,e2e --model models/ecg-lstm-ae.pt

Writes bench/results/<device>.json, .md and .png (quick runs: quick-<device>.*). Every comparison is
a ratio against a baseline measured in the same run, so a busy machine skews both sides alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("scorer", "e2e", "reliability")


def default_data_dir() -> Path:
    for candidate in (os.environ.get("ECG5000_DIR"), REPO.parent / "shared" / "data" / "ECG5000",
                      REPO / "data" / "ECG5000"):
        if candidate and Path(candidate, "ECG5000_TRAIN.txt").is_file():
            return Path(candidate)
    raise SystemExit("ECG5000 not found: pass --data DIR or set ECG5000_DIR")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model", type=Path, help="trained artefact for the AUROC check and the daemon; "
                                                   "default: train one with the trainer (cached in models/)")
    parser.add_argument("--data", type=Path, help="ECG5000 directory (default: $ECG5000_DIR or ../shared/data/ECG5000)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for the scorer and the daemon "
                                                    "(MONITOR_TORCH_THREADS); default: torch's default")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def trained_model(data_dir: Path, quick: bool, work: Path) -> Path:
    """A model trained by the trainer's own pipeline with its default settings; cached in models/."""
    from trainer.pipeline import fit_model

    if quick:
        return fit_model(data=data_dir, out=work / "quick-model.pt", epochs=1, limit=400, progress=False).path
    path = REPO / "models" / "bench-default.pt"
    if not path.is_file():
        print(f"training a model with the trainer's defaults -> {path} (cached for later runs)", flush=True)
        fit_model(data=data_dir, out=path, progress=False)
    return path


def evaluation_set(model: Path, data_dir: Path, quick: bool):
    """The evaluation protocol's test set, split with the model's own seed and fractions
    (quick runs: every 20th window, only to exercise the code)."""
    from bench.scorer import Evaluation
    from monitor.core.artefact import Artefact
    from trainer.pipeline import load_split
    from trainer.split import recorded_split

    artefact = Artefact.load(model)
    data_meta = artefact.metadata.get("data", {})
    overrides = recorded_split(artefact.metadata)
    normal = data_meta.get("normal_label", "1")
    test = load_split(data=data_dir, normal_label=normal, **overrides).test
    rows = slice(None, None, 20 if quick else 1)
    return Evaluation(artefact, test.windows[rows], (test.labels[rows] != normal).astype(int),
                      source=f"the protocol's test split (seed {overrides.get('seed', 42)}"
                             f"{', every 20th window' if quick else ''})")


def run_reliability(quick: bool, work: Path) -> dict:
    """The reliability suite under pytest, with the tally of records tried, faults and windows lost."""
    from bench import tally

    tally_path = work / "reliability-tally.jsonl"
    tally_path.unlink(missing_ok=True)
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_reliability*.py"))
    marker = "reliability and not slow" if quick else "reliability"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, *tests]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, tally.ENV: str(tally_path)},
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"command": " ".join(["python"] + command[1:]), "exit_code": done.returncode,
            "summary": lines[-1].strip("= ") if lines else "", "seconds": round(time.monotonic() - started, 1),
            **tally.summarise(tally_path)}


def meta(args: argparse.Namespace, device: str) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    if device.startswith("cuda"):
        cpu = f"{torch.cuda.get_device_name(0)}; CPU {cpu}"
    return {"device": device, "quick": args.quick, "when": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "loadavg": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version(),
            "command": "python -m bench " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import e2e, report, scorer
    from monitor.core.scoring import resolve_device

    device = str(resolve_device(args.device))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data_dir = args.data or default_data_dir()
    work = Path(tempfile.mkdtemp(prefix="ecg-bench-"))
    results: dict = {"meta": meta(args, device)}
    model = args.model
    if model is None and ({"scorer", "e2e"} & set(args.parts)):
        model = trained_model(data_dir, args.quick, work)
    if "scorer" in args.parts:
        print("scorer benchmark ...", flush=True)
        results["scorer"] = scorer.run(device, args.quick, evaluation_set(model, data_dir, args.quick))
    if "e2e" in args.parts:
        print("end-to-end benchmark ...", flush=True)
        results["e2e"] = e2e.run(args.quick, device, model, data_dir, work / "e2e", threads=args.threads)
    if "reliability" in args.parts:
        print("reliability suite ...", flush=True)
        results["reliability"] = run_reliability(args.quick, work)

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{'quick-' if args.quick else ''}{device.split(':')[0]}"
    json_path = args.out / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    text, plotted = report.write(results, json_path)
    print(text)
    print(f"wrote {args.out / name}.json, .md{' and .png' if plotted else ''}")
    failed = "reliability" in results and results["reliability"]["exit_code"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
