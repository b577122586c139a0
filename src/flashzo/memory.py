"""The memory a base model's weights take in each mode: the table in `flashzo train --help` and docs/models.md.

The bytes per parameter are measured, not derived: bench/bench_quant_model.py builds llama-3.2-1b's
shapes in every mode and divides the bytes its weights hold (norms in fp32, quantized weights with
their scales and mins) by its parameters (bench/results/quant_model_cpu.md). A model of another
size takes about that many bytes per parameter; a training step adds its activations, the KV cache
of one layer, the logits of the scored tokens and, for a quantized model, one dequantized matrix
(the largest linear's, or the LM head's block of 2**20 elements): the "step" columns of the results.
"""

from __future__ import annotations

# mode -> bytes per parameter of llama-3.2-1b's weights (bench/results/quant_model_cpu.md, "bytes/param")
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0010, "int4": 0.6252}
MODES = {"fp32": "--dtype float32", "bf16": "--dtype bfloat16", "int8": "--quantize int8",
         "int4": "--quantize int4"}
SIZES = (("135M", 135e6), ("360M", 360e6), ("1B", 1.0e9), ("1.3B", 1.3e9), ("3B", 3.0e9), ("7B", 7.0e9),
         ("8B", 8.0e9), ("13B", 13e9), ("30B", 30e9), ("70B", 70e9))


def memory_table() -> str:
    """A fixed-width table: model size x mode -> GiB of weights (bf16 and int8/int4 with --dtype bfloat16 keep
    the same weight bytes; the compute dtype only sets the activations')."""
    head = f"{'parameters':>10}  " + "  ".join(f"{m:>8}" for m in MODES)
    rows = [head, f"{'':>10}  " + "  ".join(f"{f'{BYTES_PER_PARAM[m]:.3g} B':>8}" for m in MODES)]
    for name, n in SIZES:
        rows.append(f"{name:>10}  " + "  ".join(f"{_gib(n * BYTES_PER_PARAM[m]):>8}" for m in MODES))
    rows.append("GiB of weights; " + ", ".join(f"{m}: {flag}" for m, flag in MODES.items()))
    return "\n".join(rows)


def _gib(nbytes: float) -> str:
    g = nbytes / 2**30
    return f"{g:.2f}" if g < 10 else f"{g:.1f}" if g < 100 else f"{g:.0f}"
