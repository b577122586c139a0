"""`flashzo serve`: MeZO fine-tuning as a service behind OpenAI's fine-tuning, files, models and
completions API (docs/design.md, "The service").

    cli.py          the `serve` subcommand's flags and start-up (uvicorn)
    app.py          the FastAPI routes and OpenAI-shaped errors
    jobs.py         create requests -> flashzo's run options; OpenAI's job, event, file objects
    scheduler.py    the one thread that owns the models: shared training steps, completions between them
    completions.py  /v1/completions: prompt log-probs and generation
    served.py       a served base model: engine model, tokenizer, decode pool, adapter cache
    store.py        SQLite (WAL) and the file tree under --data-dir
    metrics.py      the Prometheus metrics
    errors.py       ServeError: an InputError with an HTTP status and OpenAI's fields
"""
