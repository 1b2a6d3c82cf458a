"""Offline batch jobs: JSONL files of requests run through the service and the pool directly, never HTTP.

- ``lines``: the input, checked line by line (``BatchLine`` to run, ``LineFault`` to answer).
- ``endpoints``: one line answered as its HTTP route answers it (``Endpoints``).
- ``runner``: lines grouped by engine in load order (``plan``), run concurrently (``run_lines``).
- ``results``: the output, exactly once per line across crashes (``ResultLog``).
- ``job``: one run of a file (``run_job``); ``progress``: what it shows while it runs.
- ``command``: ``v4serve batch``; ``manager``, ``store``, ``priority``, ``objects``: the
  ``/v1/files`` and ``/v1/batches`` API's jobs on a running server.

See docs/batch.md.
"""
