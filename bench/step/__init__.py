"""The end-to-end MeZO step benchmark behind bench/bench_step.py.

    workloads.py     the batch shapes (sst2, rte, multichoice, lm) as seeded random token ids
    engine_batch.py  everything that reads flashzo's batch type: inference forward, row and FLOP counts
    measure.py       building both sides, timing baseline / flashzo / floor, FLOPs, memory per process
    report.py        the markdown table, the plot, the CSV fields, merging cells into the device's JSON
"""
