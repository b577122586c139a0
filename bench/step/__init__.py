"""The end-to-end MeZO step benchmark behind bench/bench_step.py.

    workloads.py     the batch shapes (sst2, rte, multichoice, lm) as seeded random token ids
    measure.py       building both sides, timing baseline / flashzo / floor, FLOPs, memory per process
    report.py        the markdown table, the plot, the CSV fields, merging cells into the device's JSON

What it reads from flashzo's batch type is in bench/engine_batch.py.
"""
