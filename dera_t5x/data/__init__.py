"""Data of dera-t5x: seqio tasks, bundled data, vocabularies, numpy pipelines.

Importing this package registers the tasks of ``tasks`` with seqio.
"""

from dera_t5x.data import tasks  # noqa: F401  (registers the seqio tasks)
