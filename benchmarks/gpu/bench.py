"""The recorder (results JSON rewritten after every measurement, time budget), timing and environment capture."""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


class Bench:
    """Holds the device, the results dict and the time budget; writes JSON after every record."""

    def __init__(self, args, preset: str, t_start: float):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t_start = t_start
        self.results: dict = {}
        out = Path(args.out)  # one JSON per preset: <out stem>_<preset>.json
        self.out = out.with_name(f"{out.stem}_{preset}{out.suffix or '.json'}")
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> bool:
        return self.args.time_budget_s and self.elapsed() > self.args.time_budget_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clean(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def record(self, section: str, key: str, value):
        self.results.setdefault(section, {})[key] = value
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        tmp.replace(self.out)
        print(f"[{self.elapsed():7.1f}s] {section}/{key}: {_short(value)}", flush=True)

    def run(self, section: str, key: str, fn):
        """Call fn() -> dict, record it (or the error), never raise."""
        if self.over_budget():
            self.record(section, key, {"skipped": f"time budget {self.args.time_budget_s}s exceeded"})
            return None
        self.clean()
        try:
            value = fn()
        except torch.cuda.OutOfMemoryError:
            value = {"error": "OOM", "peak_gib": self.peak_gib()}
        except Exception as e:  # keep going: one failing measurement must not lose the others
            value = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        self.clean()
        self.record(section, key, value)
        return value

    def timed_call(self, fn):
        """(fn(), wall seconds of that one call), device-synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - t0

    def rate(self, tokens: int, wall: float, **between) -> dict:
        """``wall_s``, ``tokens_per_s``, the fields ``between``, then ``peak_gib``."""
        return {"wall_s": wall, "tokens_per_s": tokens / wall, **between, "peak_gib": self.peak_gib()}

    def profiled(self, fn, row_limit: int) -> tuple[str, float]:
        """Kernel table (by device time on CUDA, else CPU time) and wall time of one call of fn under the profiler."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with tprofile(activities=acts) as prof:
            _, wall = self.timed_call(fn)
        sort = "cuda_time_total" if self.cuda else "cpu_time_total"
        return prof.key_averages().table(sort_by=sort, row_limit=row_limit), wall

    def append_profile(self, text: str) -> Path:
        """Append profiler text to --profile-out."""
        path = Path(self.args.profile_out)
        with path.open("a") as f:
            f.write(text)
        return path


@dataclass
class PresetRun:
    """What the sections of one preset share: the dense model, its sample sets, what later sections reuse."""

    bench: Bench
    name: str
    model: torch.nn.Module | None
    geometry: object  # gqaprune.models.adapters.Geometry
    counts: object  # gqaprune.config.choices.ParamCounts
    shapes: dict[str, tuple[int, int]]  # "short" / "long" -> (samples, sequence length)
    samples: dict[str, torch.Tensor]  # random token ids of those shapes
    sections: set[str]
    baseline: dict | None = None  # {"importance": module, "similarity": module} from --baseline-dir
    kept: dict = field(default_factory=dict)  # first short-set table of "taylor" and "similarity"
    plans: dict = field(default_factory=dict)  # (ratio, mlp_align) -> Plan

    @property
    def args(self):
        return self.bench.args


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


def _short(v) -> str:
    if isinstance(v, dict):
        keep = {
            k: (round(x, 3) if isinstance(x, float) else x)
            for k, x in v.items()
            if k not in ("trace", "per_layer", "table") and not isinstance(x, (list, dict))
        }
        return json.dumps(keep, default=_json_default)[:400]
    return str(v)[:400]


def timed(bench: Bench, fn, iters: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``iters`` calls of fn after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    bench.sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        bench.sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def random_ids(bench: Bench, n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g).to(bench.device)


def parse_settings(text: str) -> list[tuple[int, bool]]:
    """'4,16,32c' -> [(4, False), (16, False), (32, True)]; 'c' = gradient checkpointing."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        out.append((int(item.rstrip("c")), item.endswith("c")))
    return out


def parse_shape(text: str) -> tuple[int, int]:
    n, s = text.lower().split("x")
    return int(n), int(s)


def environment(bench: Bench) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "device": str(bench.device),
        "argv": sys.argv,
    }
    if bench.cuda:
        p = torch.cuda.get_device_properties(bench.device)
        env.update(gpu=p.name, gpu_mem_gib=p.total_memory / GIB, sms=p.multi_processor_count)
    env["files_sha256"] = {
        name: hashlib.sha256((ROOT / "src/gqaprune" / name).read_bytes()).hexdigest()[:16]
        for name in ("importance.py", "similarity.py", "evaluation.py", "plan.py", "surgery.py")
        if (ROOT / "src/gqaprune" / name).exists()
    }
    return env
