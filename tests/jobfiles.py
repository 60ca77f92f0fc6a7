"""The job file the job tests run: a tiny model, small chunks, in process."""

from __future__ import annotations

import textwrap


def tiny_job_text(store, out, model_dir) -> str:
    """TOML of a job over `store` writing to `out` (paths or URIs) with the model at `model_dir`."""
    return textwrap.dedent(f"""
        [input]
        path = "{store}"
        [output]
        path = "{out}"
        [model]
        name = "{model_dir}"
        dtype = "float32"
        [chunking]
        chunk_tokens = 128
        overlap = 16
        [strategy]
        max_summary_tokens = 6
        [resources]
        use_ray = false
        max_inflight_docs = 2
    """)
