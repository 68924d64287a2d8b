"""The kru job system: settings, job store, Celery app, the training task and the reaper.

The HTTP app calls the plain functions of :mod:`worker.service`; worker processes are started by
:func:`worker.runner.run_worker` (``kru worker``) and :func:`worker.runner.run_serve`
(``kru serve``).
"""
