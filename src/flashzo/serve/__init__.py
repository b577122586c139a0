"""`flashzo serve`: MeZO fine-tuning as a service behind OpenAI's fine-tuning, files, models and
completions API (docs/design.md, "The service").

    cli.py            the `serve` subcommand's flags and start-up (uvicorn)
    app.py            the FastAPI application: state, routers, body limit, OpenAI-shaped errors
    deps.py           settings, the API key check, lookups shared by the routes
    requests.py       the request bodies as typed pydantic models
    routes_files.py   /v1/files (uploads streamed to disk: upload.py)
    routes_jobs.py    /v1/fine_tuning/jobs
    routes_models.py  /v1/models, /v1/completions
    routes_ops.py     /health, /metrics, /admin/admission
    jobs.py           create requests -> flashzo's run options; OpenAI's job, event, file objects
    scheduler.py      the one thread that owns the models: shared training steps, completions between them
    loader.py         reading and checking jobs' files (its own thread; one parsed copy per file)
    results.py        a finished job's result files
    completions.py    /v1/completions: checks and tokenization, the forwards, the response
    served.py         a served base model: engine model, tokenizer, decode pool, adapter cache
    store.py          SQLite (WAL) and the file tree under --data-dir; every SQL statement
    metrics.py        the Prometheus metrics
    errors.py         ServeError, the finite JSON response
"""
