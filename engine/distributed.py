"""MeZO across processes and GPUs with torch.distributed (docs/design.md, "Where it runs").

Every rank holds the whole model and the whole adapter and can regenerate every z from its seed, so
a step only exchanges scalars. `MeZOConfig.parallel` says how a step is split over W ranks:

    "perturbations"  rank k evaluates perturbations [k*q//W, (k+1)*q//W) under both signs on the
                     whole batch; the 2q losses are gathered.
    "batch"          rank k evaluates all 2q copies on examples k, k+W, k+2W, ... of the global batch;
                     every copy's (loss_sum, loss_count) is gathered and summed over ranks in fp64, so
                     the loss is the global-batch loss (mean over examples for classification,
                     token-weighted for LM). In the batch-invariant mode (engine/invariant.py) a loss
                     sum travels exactly, as LIMBS float64 limbs of its exact integer value, and the
                     ranks' sums are added exactly and rounded once: the loss has the bits of the
                     single-process one, whatever W.

Either way every rank ends the step with the same 2q losses, computes the same g and applies the same
zo_update_: the adapters never drift apart and the trajectory is the single-process one. A step is one
all_gather of a float64 vector per rank, and every rank combines the gathered rows in the same way,
so no reduction order of the backend can make two ranks disagree:

    [failed, step, batch fingerprint, adapter checksum, rows computed, payload...]
    payload: "perturbations": 2*ceil(q/W) losses;  "batch": 2q loss sums, then 2q loss counts
             ("batch", batch-invariant: 2q exact loss sums of LIMBS limbs each, then 2q loss counts)

That is 8 * (5 + 2*ceil(q/W)), 8 * (5 + 4q) or 8 * (5 + 2q * (LIMBS + 1)) bytes sent per rank per
step, and W - 1 times that received: O(q) scalars (Exchange.traffic counts them).

Faults. A rank whose share of a step raises still joins the gather with failed=1, then re-raises; the
others raise DistributedError naming it and its error. A rank that hangs, dies, or stops outside a
step leaves the others waiting in the gather until the process group's timeout (`init_distributed(
timeout_s=...)`), then they raise DistributedError. The header also catches ranks that were handed
different batches or hold different adapters. Checkpoints are written by rank 0 only; the others wait
until it has finished (and raise if it failed).
"""

from __future__ import annotations

import datetime
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from flashzo.kernels.errors import InputError

from . import invariant
from .invariant import LIMBS, add_exact, exact_float, from_limbs, to_limbs
from .loss import PairLoss, pair_losses

PARALLEL = ("perturbations", "batch")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; `flashzo train --dist-timeout` sets it
_HEADER = 5  # failed, step, batch fingerprint, adapter checksum, rows computed
_CHECKSUM_RTOL = 1e-6  # adapters are bit-identical on one kind of device; allow last-bit noise across kinds

_timeout_s: float | None = None  # the timeout init_distributed gave the process group


class DistributedError(RuntimeError):
    """Another rank failed, hung, or disagrees with this one; every rank stops."""


# Process group -------------------------------------------------------------------------------------
def init_distributed(*, device: str | torch.device | None = None, backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, init_method: str | None = None) -> torch.device:
    """Join the process group the environment describes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and return this rank's device: cuda:LOCAL_RANK with NCCL when CUDA is
    available (or `device` says cuda), else the CPU with gloo. A no-op if the group already exists."""
    global _timeout_s
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        raise InputError(f"{e.args[0]} is not set: start the processes with torchrun "
                         "(torchrun --nproc-per-node N ...), which sets RANK, WORLD_SIZE and LOCAL_RANK") from None
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not timeout_s > 0:
        raise InputError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if dev.index is None:
            if local >= torch.cuda.device_count():
                raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: start at "
                                 "most one process per GPU, or pass --device cpu")
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                init_method=init_method or "env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _timeout_s = float(timeout_s)
    return dev


def active() -> bool:
    """True when a process group of more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Who computes what ---------------------------------------------------------------------------------
def perturbation_block(q: int, rank: int, world: int) -> range:
    """The perturbation indices rank `rank` evaluates: a contiguous block, sizes differing by <= 1."""
    return range(rank * q // world, (rank + 1) * q // world)


def shard(examples: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s share of a global batch: examples rank, rank + world, ... (possibly none)."""
    return list(examples[rank::world])


def batch_fingerprint(examples: Sequence) -> int:
    """A CRC32 of a batch's token ids and labels: ranks must all step on the same global batch."""
    crc = 0
    for ex in examples:
        if hasattr(ex, "reference"):  # a reward run's RewardExample
            parts, tail = [ex.prompt], f"#{ex.reference!r}"
        else:
            parts = [ex.prompt] + list(ex.candidates if ex.candidates is not None else [ex.target])
            tail = f"#{ex.label}"
        for p in parts:
            crc = zlib.crc32(b"|" + ",".join(str(int(t)) for t in p).encode(), crc)
        crc = zlib.crc32(tail.encode(), crc)
    return crc


# The scalar exchange -------------------------------------------------------------------------------
@dataclass
class Traffic:
    """Payload bytes this rank sent to and received from the others, per kind of exchange."""

    collectives: dict = field(default_factory=dict)
    bytes_sent: dict = field(default_factory=dict)
    bytes_received: dict = field(default_factory=dict)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.collectives[kind] = self.collectives.get(kind, 0) + 1
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + sent
        self.bytes_received[kind] = self.bytes_received.get(kind, 0) + received

    def per_step(self) -> dict:
        n = self.collectives.get("step", 0)
        return {"steps": n,
                "bytes_sent_per_step": self.bytes_sent.get("step", 0) / n if n else 0.0,
                "bytes_received_per_step": self.bytes_received.get("step", 0) / n if n else 0.0}


class Exchange:
    """all_gather of small float64 vectors over the default process group, with a byte counter and the
    process group's timeout, turning a backend failure into a DistributedError."""

    def __init__(self, timeout_s: float | None = None):
        if not active():
            raise InputError("no process group of more than one rank: call init_distributed() first")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s = timeout_s if timeout_s is not None else _timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        self.traffic = Traffic()

    def gather(self, values: Sequence[float], *, kind: str, what: str) -> torch.Tensor:
        """[world, len(values)] float64 on the CPU: row r is rank r's `values`."""
        x = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        out = [torch.empty_like(x) for _ in range(self.world)]
        try:
            work = dist.all_gather(out, x, async_op=True)
            if self.timeout_s is not None:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            else:
                work.wait()
            rows = torch.stack(out).cpu()
        except RuntimeError as e:
            limit = f"{self.timeout_s:g} s" if self.timeout_s is not None else "the process group's timeout"
            raise DistributedError(
                f"{what}: rank {self.rank} of {self.world} got no answer from the other ranks (timeout {limit}): "
                f"a rank hung, crashed, or stopped outside a collective step. Backend said: {e}") from e
        nbytes = x.numel() * x.element_size()
        self.traffic.add(kind, sent=nbytes, received=(self.world - 1) * nbytes)
        return rows

    def raise_if_failed(self, rows: torch.Tensor, error: BaseException | None, *, what: str) -> None:
        """Column 0 of `rows` flags the ranks that failed; every rank raises if any did."""
        failed = [r for r in range(self.world) if rows[r, 0] != 0]
        if not failed:
            return
        msgs = [None] * self.world  # the failed ranks' messages, for everyone's error
        try:
            dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
        except RuntimeError:
            msgs = [None] * self.world
        self.traffic.add("error", sent=0, received=0)
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {msgs[r] or 'failed'}" for r in failed)
        raise DistributedError(f"{what}: {len(failed)} other rank(s) failed, so every rank stops ({detail})")

    def on_main(self, fn: Callable[[], object], *, what: str) -> None:
        """Rank 0 runs fn (a checkpoint write); the others wait for it and raise if it failed."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
                error = e
        rows = self.gather([error is not None], kind="checkpoint", what=what)
        self.raise_if_failed(rows, error, what=what)


# A distributed step and a distributed evaluation ----------------------------------------------------
ScoresFn = Callable[[Sequence, Sequence[int]], tuple[list[float], list[float], int]]


def step_losses(ex: Exchange, parallel: str, scores_fn: ScoresFn, examples: Sequence, *, q: int, step: int,
                checksum: float) -> tuple[list[PairLoss], int]:
    """The q pair losses of one step on the global batch, identical on every rank, and the rows all
    ranks computed.

    scores_fn(examples, perturbation_indices) -> (loss_sum, loss_count, rows, loss_exact) for the
    copies of those perturbations, + then - for each, as engine.loss.copy_losses gives them.
    """
    if parallel not in PARALLEL:
        raise InputError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    rank, world = ex.rank, ex.world
    exact = invariant.is_batch_invariant()
    if parallel == "perturbations":
        mine, idx, width = examples, perturbation_block(q, rank, world), 2 * math.ceil(q / world)
    else:
        mine, idx, width = shard(examples, rank, world), range(q), 2 * q * (LIMBS + 1 if exact else 2)
    header = [0.0, step, batch_fingerprint(examples), checksum, 0.0]
    payload = [0.0] * width
    error = None
    try:
        if len(idx) and len(mine):  # a rank with no perturbation or no example only contributes zeros
            sums, counts, rows, exact_sums = scores_fn(mine, list(idx))
            header[4] = rows
            if parallel == "perturbations":
                payload[:2 * len(idx)] = [s / c if c else float("nan") for s, c in zip(sums, counts)]
            elif exact:
                payload[:2 * q * LIMBS] = [v for e in exact_sums for v in to_limbs(e)]
                payload[2 * q * LIMBS:] = counts
            else:
                payload[:2 * q], payload[2 * q:] = sums, counts
    except Exception as e:  # noqa: BLE001 - re-raised by raise_if_failed once the others know
        header[0], error = 1.0, e
    what = f"step {step}"
    got = ex.gather(header + payload, kind="step", what=what)
    ex.raise_if_failed(got, error, what=what)
    _check_agreement(got, what=what)
    tokens = int(got[:, 4].sum())
    if parallel == "perturbations":
        losses = []
        for r in range(world):
            losses += got[r, _HEADER:_HEADER + 2 * len(perturbation_block(q, r, world))].tolist()
        return pair_losses(losses), tokens
    if exact:
        sums = []
        for c in range(2 * q):
            total = 0
            for r in range(world):
                total = add_exact(total, from_limbs(got[r, _HEADER + c * LIMBS:_HEADER + (c + 1) * LIMBS].tolist()))
            sums.append(exact_float(total))
        counted = _HEADER + 2 * q * LIMBS
    else:
        sums = [math.fsum(got[:, _HEADER + c].tolist()) for c in range(2 * q)]  # exactly rounded, order-free
        counted = _HEADER + 2 * q
    counts = [math.fsum(got[:, counted + c].tolist()) for c in range(2 * q)]
    return pair_losses([s / c if c else float("nan") for s, c in zip(sums, counts)]), tokens


RewardsFn = Callable[[Sequence, Sequence[int], Sequence[int]], tuple[list, list, dict]]


def step_rewards(ex: Exchange, parallel: str, rewards_fn: RewardsFn, examples: Sequence, *, q: int, step: int,
                 checksum: float) -> tuple[list[list[float | None]], list, tuple[int, int]]:
    """A reward run's step on the global batch: (`R[c][p]` of all 2q copies and P examples, identical on every
    rank, None where a reward call failed on any rank; this rank's RewardProblems; (rows, generated tokens)
    of all ranks).

    rewards_fn(examples, example_ids, perturbation_indices) -> (R of those perturbations' copies (+, - each) on
    those examples, problems, {"rows", "generated"}). "perturbations": rank k decodes its block of pairs on
    every example; "batch": every copy on examples k, k + W, ... Each rank sends its own entries of R
    (NaN for a failed call) after a header of 6 (the loss steps' 5 and the tokens generated): 8 * (6 + 2 ceil(q/W) P)
    or 8 * (6 + 2q ceil(P/W)) bytes per rank, and every rank
    assembles the same R, so every rank computes the same update (engine/estimators.py)."""
    if parallel not in PARALLEL:
        raise InputError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    rank, world, P = ex.rank, ex.world, len(examples)

    def owned(r: int) -> tuple[list[int], list[int]]:  # (copies, examples) rank r decodes
        if parallel == "perturbations":
            return [2 * i + s for i in perturbation_block(q, r, world) for s in (0, 1)], list(range(P))
        return list(range(2 * q)), list(range(r, P, world))

    width = 2 * math.ceil(q / world) * P if parallel == "perturbations" else 2 * q * math.ceil(P / world)
    header = [0.0, step, batch_fingerprint(examples), checksum, 0.0, 0.0]
    payload = [0.0] * width
    error, problems = None, []
    copies, ids = owned(rank)
    try:
        if copies and ids:
            rewards, problems, stats = rewards_fn([examples[e] for e in ids], ids, sorted({c // 2 for c in copies}))
            header[4], header[5] = stats["rows"], stats["generated"]
            flat = [math.nan if v is None else v for row in rewards for v in row]
            payload[:len(flat)] = flat
    except Exception as e:  # noqa: BLE001 - re-raised by raise_if_failed once the others know
        header[0], error = 1.0, e
    what = f"step {step}"
    got = ex.gather(header + payload, kind="step", what=what)
    ex.raise_if_failed(got, error, what=what)
    _check_agreement(got, what=what)
    R: list[list[float | None]] = [[None] * P for _ in range(2 * q)]
    for r in range(world):
        copies, ids = owned(r)
        values = got[r, _HEADER + 1:].tolist()  # after the header and the tokens generated
        for k, c in enumerate(copies):
            for j, e in enumerate(ids):
                v = values[k * len(ids) + j]
                R[c][e] = None if math.isnan(v) else v
    return R, problems, (int(got[:, 4].sum()), int(got[:, 5].sum()))


def gather_records(ex: Exchange, records_fn: Callable[[Sequence[int]], list], n: int) -> list:
    """records_fn(indices) of indices 0..n-1, each rank computing its shard (rank, rank + W, ...): every
    record of every rank, in index order, on every rank (a reward run's evaluation: its generations)."""
    mine = list(range(ex.rank, n, ex.world))
    records, error = [], None
    try:
        records = records_fn(mine) if mine else []
    except Exception as e:  # noqa: BLE001
        error = e
    got = ex.gather([error is not None], kind="eval", what="evaluate")
    ex.raise_if_failed(got, error, what="evaluate")
    parts: list = [None] * ex.world
    dist.all_gather_object(parts, records)
    ex.traffic.add("eval_records", sent=0, received=0)
    out: list = [None] * n
    for r in range(ex.world):
        for k, rec in enumerate(parts[r]):
            out[r + k * ex.world] = rec
    return out


def eval_sums(ex: Exchange, sums_fn: Callable[[Sequence], tuple[int | float, float, int]],
              examples: Sequence) -> tuple[float, float, int]:
    """(loss_sum, loss_count, correct) over the whole eval set, each rank scoring its shard.

    sums_fn(shard) -> (exact loss sum, count, correct); the exact sums travel as limbs and are added
    exactly, so the loss sum is the single-process one, whatever the number of ranks."""
    mine = shard(examples, ex.rank, ex.world)
    values, error = [0.0] * (3 + LIMBS), None
    try:
        if mine:
            loss_exact, count, correct = sums_fn(mine)
            values[1:] = [count, correct] + to_limbs(loss_exact)
    except Exception as e:  # noqa: BLE001
        values[0], error = 1.0, e
    got = ex.gather(values, kind="eval", what="evaluate")
    ex.raise_if_failed(got, error, what="evaluate")
    total = 0
    for r in range(ex.world):
        total = add_exact(total, from_limbs(got[r, 3:].tolist()))
    return exact_float(total), math.fsum(got[:, 1].tolist()), int(got[:, 2].sum())


def _check_agreement(rows: torch.Tensor, *, what: str) -> None:
    steps, prints, sums = rows[:, 1].tolist(), rows[:, 2].tolist(), rows[:, 3].tolist()
    if len(set(steps)) > 1:
        raise DistributedError(f"{what}: the ranks are at different steps {[int(s) for s in steps]}")
    if len(set(prints)) > 1:
        raise DistributedError(f"{what}: the ranks were given different global batches (fingerprints "
                               f"{[int(p) for p in prints]}); every rank must step on the same batch")
    if any(not math.isclose(s, sums[0], rel_tol=_CHECKSUM_RTOL, abs_tol=1e-12) for s in sums):
        raise DistributedError(f"{what}: the ranks hold different adapters (checksums {sums}); start every rank "
                               "from the same LoRA seed or checkpoint")
