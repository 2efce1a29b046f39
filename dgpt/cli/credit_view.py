"""How `dgpt donor credit` prints a donor's credit (rich tables, or JSON)."""

from __future__ import annotations

import json
import time

from rich.table import Table

from dgpt.cli.context import console
from dgpt.sdk.models import DonorCredit


def print_credit(c: DonorCredit, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(c.model_dump(mode="json"), indent=2))
        return
    console.print(f"donor [bold]{c.donor_id}[/]: [green]{c.total_credit:.3f}[/] credit, recent average "
                  f"{c.recent_average_credit:.3f}/day" + (f", {c.voided_credit:.3f} voided" if c.voided_credit else ""))
    console.print(f"metered: {c.cpu_s:.1f} CPU-s, {c.gpu_s:.1f} GPU-s, {c.memory_byte_s / 2**30:.1f} GiB-s"
                  + (f"; earns {c.weights.cpu * 3600:.4f}/CPU-hour, {c.weights.gpu * 3600:.4f}/GPU-hour"
                     if c.weights else ""))
    if c.sessions:
        table = Table("session", "CPU-s", "GPU-s", "credit", "voided", "rows", title="per session")
        for s in c.sessions:
            table.add_row(str(s.session_id), f"{s.cpu_s:.1f}", f"{s.gpu_s:.1f}", f"{s.credit:.4f}",
                          f"{s.voided_credit:.4f}", str(s.entries))
        console.print(table)
    if c.entries:
        table = Table("row", "kind", "session", "from", "to", "CPU-s", "credit", "", title="latest ledger rows")
        for e in c.entries:
            table.add_row(str(e.seq), e.kind, str(e.session_id or "-"), _t(e.start_at), _t(e.end_at), f"{e.cpu_s:.1f}",
                          f"{e.credit:.4f}", "voided" if e.voided else (e.reason or ""))
        console.print(table)
    # Kept, the tip proves later that the ledger was not rewritten (GET /api/v1/credit/verify?anchor_seq=&anchor_hash=).
    console.print(f"ledger tip: row {c.tip.seq} {c.tip.hash}")


def _t(at: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(at))
