"""Big-data processing on donated disks: a Ray Data pipeline over ``dgpt://``, checked against local files.

    eval "$(dgpt env)"                                   # a fabric: `dgpt up --donors 4`
    python examples/storage_pipeline.py --mb 300          # as a driver
    ray job submit --entrypoint-num-cpus 0 -- python examples/storage_pipeline.py --mb 300

What it does (``dgpt.storage.pipeline`` holds the steps, so `dgpt demo` runs the same code):

1. generates a Parquet dataset of ``--mb`` MB (seeded random readings: id, key, x, y) and
   writes it to ``dgpt://pipeline/input`` - each file cut into encrypted, erasure-coded
   pieces on the donors' disks - and to a local folder;
2. ``ray.data.read_parquet("dgpt://pipeline/input", filesystem=DonorFileSystem())``: read
   tasks on the donors fetch and verify pieces straight from other donors;
3. a per-batch transform and a ``groupby(...).aggregate(Count, Sum)`` across the donors;
4. ``write_parquet`` of the result back to ``dgpt://pipeline/output``, read back;
5. the same pipeline on the local folder; the results must match.

``DonorFileSystem()`` needs no arguments: inside Ray it finds the head's metadata service
through the control-plane actor. It prints one ``DGPT_PIPELINE {json}`` line: rows, bytes,
both run times and their ratio, rows processed per donor, whether the results matched.
"""

from __future__ import annotations

import sys

from dgpt.storage.pipeline import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
