"""What every benchmark shares: the device and commit it records, the hardware's peaks, timing with
quantiles, peak memory, and the one result format it writes.

Results are `{"meta": {...}, "rows": [...]}`:

  meta   run_meta(): schema, bench, device (the GPU's name, or "cpu (<model>, <n> threads)"),
         device_type, cpu, threads, cores, peak_bf16_tflops, peak_hbm_tbps (None off the table),
         torch/triton/transformers/peft/python versions, commit, date, load_average, plus what the
         script adds (model, dtype, shapes ...) and load_average_end when it finishes.
  rows   one flat dict per measured cell: its shape fields, then the figures; a timing is
         `<prefix>p20_ms`, `<prefix>p50_ms`, `<prefix>p80_ms` (prefix "" or a side such as
         "flashzo_"). Values are numbers, strings, None or lists of those.

write_results() writes `stem`.json, .csv, .md and .png from it; read_results() reads and checks it.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
SCHEMA = 1
QUANTILES = (0.2, 0.5, 0.8)


# --------------------------------------------------------------------------------------------------
# Device, commit, versions
# --------------------------------------------------------------------------------------------------

def git_commit() -> str:
    """Short hash of HEAD, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": a device name as part of a file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak, no sparsity
    hbm_tbps: float  # memory bandwidth, TB/s (10**12 bytes/s)


# The vendor's datasheet figures. A100 80 GB PCIe has the SXM part's FLOPs and 1.935 TB/s.
PEAKS = {
    "H100 SXM": Peak("H100 SXM", 989.0, 3.35),
    "H100 PCIe": Peak("H100 PCIe", 756.0, 2.0),
    "H200": Peak("H200", 989.0, 4.8),
    "A100 80GB SXM": Peak("A100 80GB SXM", 312.0, 2.0),
    "A100 80GB PCIe": Peak("A100 80GB PCIe", 312.0, 1.935),
    "A100 40GB": Peak("A100 40GB", 312.0, 1.555),
    "L40S": Peak("L40S", 362.0, 0.864),
}


def peak_for(device_name: str) -> Peak | None:
    """The PEAKS entry of a CUDA device name, or None for a device the table does not know.

    Names are split into words, so "GH200" is not an H200; NVL parts (other clocks and memory) and
    unknown H100/H200 variants are None rather than a guess. An H100 that does not say PCIe is the SXM
    part ("NVIDIA H100 80GB HBM3")."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    if "nvl" in words:
        return None
    if "h200" in words:
        return PEAKS["H200"]
    if "h100" in words:
        return PEAKS["H100 PCIe" if "pcie" in words else "H100 SXM"]
    if "a100" in words:
        if "40gb" in words:
            return PEAKS["A100 40GB"]
        return PEAKS["A100 80GB PCIe" if "pcie" in words else "A100 80GB SXM"]
    if "l40s" in words:
        return PEAKS["L40S"]
    return None


def device_info(device=None) -> dict:
    """What a result says about the machine. `device`: a torch device (default: cuda when available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu, threads = cpu_name(), torch.get_num_threads()
    info = {"device": f"cpu ({cpu}, {threads} threads)", "device_type": device.type, "cpu": cpu,
            "threads": threads, "cores": os.cpu_count(), "peak_bf16_tflops": None, "peak_hbm_tbps": None}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        peak = peak_for(info["device"])
        if peak is not None:
            info.update(peak_bf16_tflops=peak.bf16_tflops, peak_hbm_tbps=peak.hbm_tbps)
    return info


def device_tag(info: dict) -> str:
    """"cpu", or "gpu-" + the GPU's slug: the device part of a result's file name."""
    return "cpu" if info["device_type"] == "cpu" else "gpu-" + slug(info["device"])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def versions() -> dict:
    return {"torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
            "peft": _version("peft"), "python": platform.python_version()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_meta(bench: str, device=None, **fields) -> dict:
    """The meta block of a result: device, versions, commit, date, load average, then `fields`."""
    return {"schema": SCHEMA, "bench": bench, **device_info(device), **versions(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load_average(), **fields}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def quantile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, and triton.testing's)."""
    if not samples or not 0 <= q <= 1:
        raise ValueError(f"quantile {q} of {len(samples)} samples")
    s = sorted(samples)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def timing_keys(prefix: str = "") -> list[str]:
    return [f"{prefix}p{round(100 * q)}_ms" for q in QUANTILES]


def timing_fields(samples_ms: Sequence[float], prefix: str = "") -> dict:
    """{prefix}p20_ms, {prefix}p50_ms, {prefix}p80_ms of per-call times in ms."""
    return {k: quantile(samples_ms, q) for k, q in zip(timing_keys(prefix), QUANTILES)}


def time_ms(fn: Callable[[], object], device, *, warmup: int, reps: int,
            timer: Callable[[], float] = time.perf_counter) -> dict:
    """p20/p50/p80 ms of one call of fn.

    CUDA: triton.testing.do_bench (CUDA events, the L2 cache flushed before every call), its time
    budgets set to `warmup` and `reps` times one call's time, so it runs about that many calls.
    Otherwise: `warmup` untimed calls, then `reps` calls each timed with `timer` (seconds)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        stop.record()
        stop.synchronize()
        one = start.elapsed_time(stop) / 3
        p = triton.testing.do_bench(fn, warmup=max(warmup, 1) * one, rep=max(reps, 1) * one,
                                    quantiles=list(QUANTILES))
        return dict(zip(timing_keys(), p))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = timer()
        fn()
        samples.append(1e3 * (timer() - t0))
    return timing_fields(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, reps: int,
                     sync: Callable[[], None] = lambda: None,
                     timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Wall-clock ms of every call of each fn, over `reps` rounds after `warmup` untimed ones.

    Each round calls every fn once, the order rotating by one per round (no fn always runs first,
    after the same neighbour); `sync` runs before the clock starts and before it stops."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(warmup + reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = timer()
            fns[name]()
            sync()
            ms = 1e3 * (timer() - t0)
            if rep >= warmup:
                times[name].append(ms)
    return times


# --------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------

def _status_mib(field: str) -> float:
    """VmRSS or VmHWM of this process from /proc/self/status, in MiB (nan where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Free what can be freed, then VmHWM := VmRSS (`echo 5 > /proc/self/clear_refs`); False where
    the kernel does not allow it (the peak then includes everything since the process started)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device, *, steps: int = 1) -> dict:
    """Run fn `steps` times; the peak memory against what was in use before.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: peak RSS, VmHWM after
    reset_peak_rss() (a process that frees buffers back to the OS - MALLOC_MMAP_THRESHOLD_ - makes RSS
    follow live memory). Returns peak_mib (absolute), loaded_mib (before the first call), step_mib
    (the difference), method, and ms_all (each call's wall time)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
        method = "torch.cuda.max_memory_allocated"
    else:
        # NOTE: VmHWM, not getrusage's ru_maxrss: ru_maxrss also keeps the high-water mark recorded
        # when any thread exits (a loader's worker threads), which clear_refs does not reset; it
        # reported the model-loading peak instead of the step's.
        reset = reset_peak_rss()
        loaded = rss_mib()
        method = "VmHWM after clear_refs" if reset else "ru_maxrss (no reset: includes loading)"
    ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ms.append(1e3 * (time.perf_counter() - t0))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "loaded_mib": loaded, "step_mib": peak - loaded, "method": method, "ms_all": ms}


# --------------------------------------------------------------------------------------------------
# The result format
# --------------------------------------------------------------------------------------------------

META_REQUIRED = ("schema", "bench", "device", "device_type", "commit", "date", "torch")
_SCALARS = (str, int, float, bool, type(None))


def check_results(results: dict) -> dict:
    """`results` if it is in the format above, else ValueError naming what is wrong."""
    if not isinstance(results, dict) or set(results) != {"meta", "rows"}:
        got = sorted(results) if isinstance(results, dict) else type(results).__name__
        raise ValueError(f"results must have exactly 'meta' and 'rows', got {got}")
    meta, rows = results["meta"], results["rows"]
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {missing}")
    if meta["schema"] != SCHEMA:
        raise ValueError(f"schema {meta['schema']!r}, this code reads {SCHEMA}")
    if not isinstance(rows, list):
        raise ValueError("rows must be a list")
    for i, row in enumerate(rows):
        for k, v in row.items():
            if not (isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v))):
                raise ValueError(f"row {i}: {k} is a {type(v).__name__}; rows hold scalars and lists")
            if k.endswith("p50_ms"):
                prefix = k[:-len("p50_ms")]
                q = [row.get(key, "missing") for key in timing_keys(prefix)]
                if "missing" in q:
                    raise ValueError(f"row {i}: {k} without {prefix}p20_ms and {prefix}p80_ms")
                if None not in q and not q[0] <= q[1] <= q[2]:
                    raise ValueError(f"row {i}: {prefix}p20/p50/p80 {q} out of order")
    return results


def read_results(path: str) -> dict:
    with open(path) as f:
        return check_results(json.load(f))


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def csv_text(results: dict, fields: Iterable[str] | None = None) -> str:
    """One line per row; `fields` (default: every key, in first-seen order), then the meta's device,
    dtype and commit where the meta has them and the rows do not carry their own."""
    import csv
    import io

    rows = results["rows"]
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for r in rows for k in r))
    extra = [k for k in ("device", "dtype", "commit") if k not in fields and k in results["meta"]]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(fields + extra)
    for r in rows:
        w.writerow([_cell(r.get(k)) for k in fields] + [_cell(results["meta"][k]) for k in extra])
    return out.getvalue()


def write_results(stem: str, results: dict, *, markdown: Callable[[dict], str],
                  plot: Callable[[dict, str], None], csv_fields: Iterable[str] | None = None,
                  echo: bool = False) -> list[str]:
    """Write `stem`.json, .csv, .md (markdown(results)) and .png (plot(results, path)); return the paths."""
    check_results(results)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = [stem + ext for ext in (".json", ".csv", ".md", ".png")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(paths[1], "w", newline="") as f:
        f.write(csv_text(results, csv_fields))
    md = markdown(results)
    with open(paths[2], "w") as f:
        f.write(md)
    os.environ.setdefault("MPLBACKEND", "Agg")
    plot(results, paths[3])
    if echo:
        print(md)
    print("wrote " + ", ".join(paths))
    return paths
