"""Ray callers' door to the control plane: an actor that holds nothing and forwards calls.

The control plane (``dgpt.head.control_plane``) runs in a process of the head's own user,
outside Ray's workers, so Ray work on the head (a donor's task pinned there, a job's driver)
can neither read its files nor its memory (``dgpt.head.isolation``). Ray callers still say
``ray.get_actor(REGISTRY_ACTOR).node_states.remote()``: that actor is :class:`ControlPlaneDoor`,
which runs with Ray's work and forwards each call over a Unix socket.

The wire: a 4-byte big-endian length, then the payload.

- A request is JSON, ``{"method": ..., "args": {...}}``: the control plane never unpickles what
  Ray work sends it, and checks each argument against the method's annotations.
- An answer is ``b"o"`` and a pickle of the value, or ``b"e"`` and a pickle of the exception:
  Ray work unpickling the control plane's answers is what every Ray call did before. The
  door hands the large answers (fleet views, node states) on still pickled
  (:class:`Pickled`), so only the caller unpickles them, not the door and the caller both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError, validate_call

from dgpt.exceptions import DgptError, FabricError, InvalidRequest
from dgpt.head.paths import ray_temp_dir

log = logging.getLogger("dgpt.control_link")

#: The calls Ray work may make; nothing else on the control plane is reachable through the door.
METHODS = ("ping", "node_states", "placement_view", "void_credit", "trust_records", "record_trust",
           "record_verification", "report_durability_margin", "training_fleet", "checkpoint_tier",
           "storage_call", "autoscaler_status", "autoscaler_ticks", "fleet_timings")
#: How long a call waits for a control plane that is (re)starting, as Ray waited for a restarting actor.
CONNECT_WAIT_S = 120.0
#: Requests above this size are refused unread (the largest real one is a storage write's metadata).
MAX_REQUEST_BYTES = 16 << 20
_LEN = struct.Struct(">I")
_OK, _ERROR = b"o", b"e"


def link_path(home: Path) -> Path:
    """The control plane's socket: in the head's Ray temp folder, which Ray work on the head sees."""
    return ray_temp_dir(home) / "control.sock"


def _read_frame(sock: socket.socket, limit: int | None = None) -> bytes | None:
    head = _read_exact(sock, _LEN.size)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    if limit is not None and size > limit:
        raise InvalidRequest(f"control-plane request of {size} bytes is over the {limit}-byte limit", 413)
    return _read_exact(sock, size)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


# ------------------------------------------------------------------ the control plane's side


def _decoders(plane: Any) -> dict[str, Callable[..., Any]]:
    """Each allowed method of ``plane``, its arguments checked against its annotations."""
    return {name: validate_call(getattr(plane, name)) for name in METHODS}


def answer(plane_calls: dict[str, Callable[..., Any]], request: bytes) -> tuple[str, Any]:
    """Run one JSON request against the control plane: ``("ok", value)`` or ``("error", exc)``."""
    try:
        msg = json.loads(request)
    except ValueError as exc:
        return "error", InvalidRequest(f"control-plane request is not JSON: {exc}", 400)
    if not isinstance(msg, dict) or not isinstance(msg.get("args", {}), dict):
        return "error", InvalidRequest("control-plane request must be {\"method\": ..., \"args\": {...}}", 400)
    method = msg.get("method")
    call = plane_calls.get(method) if isinstance(method, str) else None
    if call is None:
        return "error", InvalidRequest(f"{method!r} is not a control-plane call", 404,
                                       hint=f"use one of: {', '.join(METHODS)}")
    try:
        return "ok", call(**msg.get("args", {}))
    except ValidationError as exc:
        return "error", InvalidRequest(f"{method}: {exc}", 422, hint="fix the named argument(s)")
    except DgptError as exc:
        return "error", exc
    except Exception as exc:  # the caller gets it as Ray would have handed it over
        log.exception("control-plane call %s failed", method)
        return "error", FabricError(f"{method} failed on the control plane: {type(exc).__name__}: {exc}",
                                    hint="see the head's logs/control-plane.log")


class _Handler(socketserver.BaseRequestHandler):
    server: LinkServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            try:
                request = _read_frame(sock, MAX_REQUEST_BYTES)
            except InvalidRequest as exc:
                _send_frame(sock, _ERROR + pickle.dumps(exc))
                return
            except OSError:
                return
            if request is None:
                return
            status, value = answer(self.server.calls, request)
            try:
                payload = (_OK if status == "ok" else _ERROR) + pickle.dumps(value)
            except Exception as exc:
                payload = _ERROR + pickle.dumps(FabricError(f"the answer could not be sent: {exc}"))
            try:
                _send_frame(sock, payload)
            except OSError:
                return


class LinkServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The control plane's end: serves ``plane``'s allowed methods on ``path``, which only
    ``owner`` (uid, gid) may connect to besides this process's user."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, plane: Any, path: Path, owner: tuple[int, int] | None = None) -> None:
        self.calls = _decoders(plane)
        path.unlink(missing_ok=True)
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)
        if owner is not None:
            os.chown(path, *owner)
        self._thread = threading.Thread(target=self.serve_forever, name="control-link", daemon=True)

    def start(self) -> LinkServer:
        self._thread.start()
        return self


# ------------------------------------------------------------------ Ray work's side


class Pickled:
    """An answer still pickled, as the control plane sent it: pickling it hands the bytes on,
    and unpickling it (in the Ray caller) gives the value."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (self.data,)


def call_link(path: Path, method: str, args: dict[str, Any], wait_s: float = CONNECT_WAIT_S,
              raw: bool = False) -> Any:
    """One call through the socket at ``path``; waits up to ``wait_s`` for a control plane that
    is starting. Raises what the control plane answered; ``raw``: the value as :class:`Pickled`.

    Raises:
        FabricError: no control plane answered on ``path`` within ``wait_s``, or it went away mid-call.
    """
    payload = json.dumps({"method": method, "args": args}).encode()
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise FabricError(f"no control plane answers on {path}: {exc}",
                                  hint="is the head running? see its logs/control-plane.log") from None
            time.sleep(0.2)
    try:
        _send_frame(sock, payload)
        reply = _read_frame(sock)
    finally:
        sock.close()
    if reply is None:
        raise FabricError(f"the control plane went away during {method}",
                          hint="it restarts by itself; retry the call")
    if reply[:1] == _ERROR:
        raise pickle.loads(reply[1:])
    return Pickled(reply[1:]) if raw else pickle.loads(reply[1:])


def _outcome_json(outcome: Any) -> dict[str, Any]:
    from dgpt.verify.trust import DonorOutcome

    if not isinstance(outcome, DonorOutcome):
        raise InvalidRequest("record_trust takes dgpt.verify.trust.DonorOutcome values", 422)
    return {**dataclasses.asdict(outcome), "outcome": outcome.outcome.value}


class ControlPlaneDoor:
    """The Ray actor named ``REGISTRY_ACTOR`` (see the module docstring). Each method is the
    control plane's own (``dgpt.head.control_plane.ControlPlane``), forwarded."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def _call(self, name: str, /, **args: Any) -> Any:
        return call_link(self._path, name, args)

    def _handed_on(self, name: str, /, **args: Any) -> Any:
        return call_link(self._path, name, args, raw=True)

    def ping(self) -> str:
        return str(self._call("ping"))

    def node_states(self) -> Any:
        return self._handed_on("node_states")

    def placement_view(self) -> Any:
        return self._handed_on("placement_view")

    def void_credit(self, donor_id: str, start_at: float, end_at: float, reason: str) -> Any:
        return self._call("void_credit", donor_id=donor_id, start_at=start_at, end_at=end_at, reason=reason)

    def trust_records(self, donor_ids: list[str]) -> Any:
        return self._call("trust_records", donor_ids=list(donor_ids))

    def record_trust(self, outcomes: list[Any]) -> Any:
        return self._call("record_trust", outcomes=[_outcome_json(o) for o in outcomes])

    def record_verification(self, outcome: str) -> None:
        self._call("record_verification", outcome=outcome)

    def report_durability_margin(self, margin: float) -> None:
        self._call("report_durability_margin", margin=margin)

    def training_fleet(self) -> Any:
        return self._handed_on("training_fleet")

    def checkpoint_tier(self) -> Any:
        return self._call("checkpoint_tier")

    def storage_call(self, method: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
        """Errors are values here (``dgpt.storage.rpc``), including arguments that do not fit."""
        from dgpt.storage import rpc

        try:
            args = json.loads(rpc.args_model(method)(**kwargs).model_dump_json())
        except DgptError as exc:
            return "error", exc
        except ValueError as exc:
            return "error", InvalidRequest(f"{method}: {exc}", 422, hint="fix the named argument(s)")
        return tuple(self._call("storage_call", method=method, kwargs=args))  # type: ignore[return-value]

    def autoscaler_status(self) -> Any:
        return self._call("autoscaler_status")

    def autoscaler_ticks(self, start: float, end: float) -> Any:
        return self._call("autoscaler_ticks", start=start, end=end)

    def fleet_timings(self, n: int = 20) -> Any:
        return self._call("fleet_timings", n=n)
