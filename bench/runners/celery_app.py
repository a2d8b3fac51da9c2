"""The Celery app of the celery runners; broker and result backend from $BENCH_REDIS_URL."""
from __future__ import annotations

import os

from celery import Celery

from bench.runners.common import process_files

app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=4, broker_connection_retry_on_startup=True, result_expires=600)


@app.task(name="bench.process_files")
def process_files_task(paths, task, params, out_path):
    return process_files(paths, task, params, out_path)
