"""Credit for donors: metering what their raylets ran, weighting it by speed, the chained ledger.

- ``dgpt.credit.unit``: BOINC's credit unit and a donor's weights (credits per resource-second);
- ``dgpt.credit.meter``: resource-seconds integrated from samples of Ray's per-node accounting;
- ``dgpt.credit.rac``: recent average credit, decaying with a one-week half-life;
- ``dgpt.credit.chain``: the ledger's hash chain and the check that finds the first edited row;
- ``dgpt.credit.book``: the ledger over its storage (the registry's SQLite file), read and voided.

Everything but ``book`` is pure; none of it imports Ray or the head.
"""
