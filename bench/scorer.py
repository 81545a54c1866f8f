"""Scorer benchmark: windows/s against batch size, the per-window loop side by side, and
candidate speed-ups, each checked for its AUROC cost on the evaluation protocol.

Two architectures: the monitor's default (`ModelConfig()`) and the seed tutorial's reference
(embedding 128, hidden 256). Throughput does not depend on the weights, so both use seeded,
untrained weights; the AUROC check uses a trained artefact (see `bench.__main__`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench.timing import compare, rate
from monitor.core.artefact import Artefact
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer, resolve_device

MODELS = {
    "default": ModelConfig(),
    "reference": ModelConfig(embedding_dim=128, hidden_dim=256),
}

#: An optimisation is kept when it is at least this much faster on the default model...
MIN_SPEEDUP = 1.10
#: ...and moves the test-set AUROC by no more than this.
MAX_AUROC_DELTA = 0.002


@dataclass(frozen=True)
class Sizes:
    """How long to measure. `quick` only exercises the code paths."""

    batch_sizes: tuple[int, ...]
    loop_windows: int      # windows per timed call of the per-window loop
    min_seconds: float     # each rate is measured for at least this long
    turns: int             # alternating turns per comparison (the median ratio is reported)
    opt_batch: int         # batch size the optimisations are compared at

    @classmethod
    def for_run(cls, quick: bool, device: torch.device) -> Sizes:
        if quick:
            return cls((1, 16), 4, 0.0, 2, 16)
        if device.type == "cuda":
            return cls((1, 16, 64, 256, 1024, 4096, 16384), 64, 1.0, 4, 4096)
        # 512 is the daemon's default MONITOR_MAX_BATCH.
        return cls((1, 4, 16, 64, 256, 1024), 32, 1.0, 4, 512)


def untrained_artefact(config: ModelConfig, seed: int = 0) -> Artefact:
    torch.manual_seed(seed)
    return Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=1.0,
                    normalisation={"kind": "zscore"}, reduction="mean_abs",
                    model_version=f"bench-untrained-e{config.embedding_dim}-h{config.hidden_dim}")


def random_windows(n: int, length: int, seed: int = 0) -> np.ndarray:
    """Throughput inputs; an LSTM's cost does not depend on the values."""
    return np.random.default_rng(seed).normal(size=(n, length)).astype(np.float32)


def per_window_loop(scorer: Scorer, windows: np.ndarray) -> np.ndarray:
    """The seed tutorial's way: one window at a time, batch 1, no_grad, a loss and `.item()`
    per window. Same model, same normalisation and reduction as `scorer`, so the numbers match."""
    model = scorer.model
    criterion = nn.L1Loss(reduction="mean" if scorer.artefact.reduction == "mean_abs" else "sum")
    losses = []
    with torch.no_grad():
        for window in windows:
            seq = torch.from_numpy(scorer.prepare(window[None])).to(scorer.device)
            losses.append(criterion(model(seq), seq).item())
    return np.asarray(losses)


class TunedScorer(Scorer):
    """The monitor's Scorer with one candidate optimisation switched on."""

    def __init__(self, artefact: Artefact, device: str, max_batch: int, *, no_grad: bool = False,
                 threads: int | None = None, autocast: torch.dtype | None = None,
                 compile: bool = False, int8: bool = False) -> None:
        super().__init__(artefact, device=device, max_batch=max_batch)
        self.no_grad = no_grad
        self.threads = threads
        self.autocast = autocast
        if int8:
            if self.device.type != "cpu":
                raise RuntimeError("dynamic int8 quantization has CPU kernels only")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = torch.ao.quantization.quantize_dynamic(
                    self.model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
        if compile:
            self.model = torch.compile(self.model, dynamic=False)  # type: ignore[assignment]

    def _forward(self, x: np.ndarray):
        grad = torch.no_grad() if self.no_grad else torch.inference_mode()
        amp = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with grad, amp:
            for start in range(0, len(x), self.max_batch):
                rows = slice(start, start + self.max_batch)
                batch = torch.from_numpy(x[rows]).to(self.device, non_blocking=True)
                yield rows, batch, self.model(batch)

    def score(self, windows: np.ndarray) -> np.ndarray:
        if self.threads is None:
            return super().score(windows)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return super().score(windows)
        finally:
            torch.set_num_threads(previous)


def optimisations(device: torch.device, quick: bool = False) -> dict[str, tuple[dict, dict]]:
    """name -> (options off, options on) for TunedScorer. Each is compared with its own 'off'.
    Quick runs try one thread count only (more threads than free cores can take minutes)."""
    default_threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    candidates: dict[str, tuple[dict, dict]] = {
        "inference_mode (vs no_grad)": ({"no_grad": True}, {}),
    }
    for n in [1] if quick else sorted({1, 2, 4, cores // 2, cores}):
        if 1 <= n <= cores and (n != default_threads or quick):
            candidates[f"threads={n} (vs {default_threads})"] = ({}, {"threads": n})
    if device.type == "cuda":
        candidates["autocast fp16"] = ({}, {"autocast": torch.float16})
        candidates["autocast bf16"] = ({}, {"autocast": torch.bfloat16})
    else:
        # CPU autocast is bf16 only; oneDNN's LSTM needs AVX-512 BF16 / AMX for it.
        candidates["autocast bf16"] = ({}, {"autocast": torch.bfloat16})
    candidates["torch.compile"] = ({}, {"compile": True})
    candidates["dynamic int8 (LSTM+Linear)"] = ({}, {"int8": True})
    return candidates


def _timer(scorer: Scorer, windows: np.ndarray, sizes: Sizes):
    def measure() -> float:
        return rate(lambda: scorer.score(windows), len(windows), sizes.min_seconds)
    return measure


def sweep(name: str, config: ModelConfig, device: str, sizes: Sizes) -> dict:
    """Per-window loop and batched scorer at each batch size, in alternating turns."""
    artefact = untrained_artefact(config)
    loop_scorer = Scorer(artefact, device=device, max_batch=1)
    loop_windows = random_windows(sizes.loop_windows, config.window_length, seed=1)
    scorers = {b: Scorer(artefact, device=device, max_batch=b) for b in sizes.batch_sizes}
    inputs = {b: random_windows(max(b, sizes.loop_windows), config.window_length, seed=2)
              for b in sizes.batch_sizes}

    same = np.allclose(per_window_loop(loop_scorer, loop_windows),
                       scorers[sizes.batch_sizes[-1]].score(loop_windows), rtol=1e-4, atol=1e-6)
    for b, scorer in scorers.items():  # warm-up: first calls allocate and pick kernels
        scorer.score(inputs[b])

    loop_rates: list[float] = []
    batch_rates: dict[int, list[float]] = {b: [] for b in sizes.batch_sizes}
    for _ in range(sizes.turns):
        loop_rates.append(rate(lambda: per_window_loop(loop_scorer, loop_windows),
                               len(loop_windows), sizes.min_seconds))
        for b, scorer in scorers.items():
            batch_rates[b].append(rate(functools.partial(scorer.score, inputs[b]), len(inputs[b]), sizes.min_seconds))

    rows = []
    for b in sizes.batch_sizes:
        ratios = [r / loop for r, loop in zip(batch_rates[b], loop_rates, strict=True)]
        rows.append({"batch": b, "windows_per_s": float(np.median(batch_rates[b])),
                     "ratio_to_loop": float(np.median(ratios))})
    best = max(rows, key=lambda row: row["windows_per_s"])
    return {
        "model": name,
        "config": config.to_dict(),
        "parameters": int(sum(p.numel() for p in loop_scorer.model.parameters())),
        "loop_windows_per_s": float(np.median(loop_rates)),
        "loop_matches_batched": bool(same),
        "batched": rows,
        "best_batch": best["batch"],
        "best_windows_per_s": best["windows_per_s"],
        "best_ratio_to_loop": best["ratio_to_loop"],
    }


@dataclass
class Evaluation:
    """The trained model and the evaluation protocol's test set (label 1 = anomalous)."""

    artefact: Artefact
    windows: np.ndarray
    labels: np.ndarray
    source: str


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, anomalous (label 1) scoring higher being good."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def compare_optimisations(device: str, sizes: Sizes, evaluation: Evaluation | None, quick: bool = False) -> list[dict]:
    """Each candidate against its own 'off' setting, on both models, at sizes.opt_batch.
    With an evaluation set, also the AUROC of the trained model with the candidate on."""
    results = []
    base_auroc = None
    if evaluation is not None:
        base_auroc = auroc(Scorer(evaluation.artefact, device=device, max_batch=sizes.opt_batch)
                           .score(evaluation.windows), evaluation.labels)
    for opt_name, (off, on) in optimisations(torch.device(device), quick).items():
        row: dict = {"optimisation": opt_name, "models": {}}
        try:
            for model_name, config in MODELS.items():
                artefact = untrained_artefact(config)
                windows = random_windows(sizes.opt_batch, config.window_length, seed=3)
                plain = TunedScorer(artefact, device, sizes.opt_batch, **off)
                tuned = TunedScorer(artefact, device, sizes.opt_batch, **on)
                plain.score(windows)
                started = time.perf_counter()
                tuned.score(windows)  # warm-up; for torch.compile this is the compilation
                warmup_s = time.perf_counter() - started
                measured = compare(_timer(plain, windows, sizes), _timer(tuned, windows, sizes), sizes.turns)
                measured["first_call_s"] = round(warmup_s, 3)
                row["models"][model_name] = measured
            if evaluation is not None:
                tuned = TunedScorer(evaluation.artefact, device, sizes.opt_batch, **on)
                plain = TunedScorer(evaluation.artefact, device, sizes.opt_batch, **off)
                row["auroc_off"] = auroc(plain.score(evaluation.windows), evaluation.labels)
                row["auroc_on"] = auroc(tuned.score(evaluation.windows), evaluation.labels)
                row["auroc_delta"] = row["auroc_on"] - row["auroc_off"]
        except Exception as exc:  # an optimisation this device cannot run is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row["speedup_default_model"] = row["models"].get("default", {}).get("ratio")
        row["kept"] = _keep(row)
        results.append(row)
    if base_auroc is not None:
        for row in results:
            row["auroc_plain_scorer"] = base_auroc
    return results


def _keep(row: dict) -> bool | None:
    """Kept only if it helps the default model and keeps AUROC; None when AUROC was not checked."""
    if "error" in row:
        return False
    speedup = row.get("speedup_default_model") or 0.0
    if speedup < MIN_SPEEDUP:
        return False
    if "auroc_delta" not in row:
        return None
    return abs(row["auroc_delta"]) <= MAX_AUROC_DELTA




def run(device: str, quick: bool, evaluation: Evaluation | None) -> dict:
    resolved = resolve_device(device)
    sizes = Sizes.for_run(quick, resolved)
    sweeps = [sweep(name, config, str(resolved), sizes) for name, config in MODELS.items()]
    return {
        "device": str(resolved),
        "torch_threads": torch.get_num_threads(),
        "sizes": sizes.__dict__,
        "sweeps": sweeps,
        "optimisations": compare_optimisations(str(resolved), sizes, evaluation, quick),
        "evaluation": None if evaluation is None else {
            "source": evaluation.source, "windows": int(len(evaluation.windows)),
            "anomalous": int(evaluation.labels.sum()),
            "model_version": evaluation.artefact.model_version},
        "rule": {"min_speedup": MIN_SPEEDUP, "max_auroc_delta": MAX_AUROC_DELTA},
    }
