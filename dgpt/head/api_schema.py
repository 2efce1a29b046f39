"""The REST API's committed contract: the released OpenAPI schema, and what would break it.

``openapi-v1.json`` next to this module is the schema clients were promised. It is
regenerated with ``python -m dgpt.head.api_schema`` (after a deliberate change) and checked
with ``python -m dgpt.head.api_schema --check``; a unit test runs the check on every build.

A change breaks the contract when a client written against the old schema can fail with the
new one. Requests and responses differ: a client *sends* requests, so the server may accept
more but not less; it *reads* responses, so the server may say more but not less.

- removed: a path, an operation, a response status, a response header, a link, a parameter,
  a field (requests reject unknown fields, so a removed request field breaks its senders too),
  an enum value;
- newly required in a request: a parameter, a body, a field (new, or optional before);
- no longer always present in a response: a field that was required;
- a type that changed: a request type that no longer accepts what it did, a response type
  that can now be something it could not (``integer`` counts as a ``number``);
- a request constraint that tightened (a lower maximum, a higher minimum, a new pattern);
- a security requirement an old client's credential does not meet.

Everything else is an addition and passes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

#: The committed contract of API major version 1.
COMMITTED_SCHEMA = Path(__file__).with_name("openapi-v1.json")

Direction = Literal["request", "response"]
JsonSchema = dict[str, Any]

# Request constraints: a larger value of the first kind, or a smaller of the second, refuses more.
_LOWER_BOUNDS = ("minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties")
_UPPER_BOUNDS = ("maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties")
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def live_schema() -> dict[str, Any]:
    """The OpenAPI schema this code serves (built over a throwaway registry; no Ray)."""
    from dgpt.config import load_settings
    from dgpt.head.api import build_app
    from dgpt.head.registry import Registry
    from dgpt.head.store import RegistryStore

    with tempfile.TemporaryDirectory(prefix="dgpt-schema-") as home:
        store = RegistryStore(Path(home) / "registry.sqlite")
        try:
            registry = Registry(load_settings({"home": home}, env={}), store, None, "")
            return build_app(registry, _NoServices()).openapi()
        finally:
            store.close()


class _NoServices:
    """Head services are only called per request; the schema needs none."""

    ray_address = ""
    dashboard_url = ""
    tls_fingerprint: str | None = None

    def autoscaler_status(self) -> dict[str, Any]:
        return {}

    def cluster_resources(self) -> tuple[dict[str, float], dict[str, float]]:
        return {}, {}

    def jobs(self) -> Any:
        raise RuntimeError("no Ray Jobs while generating the schema")


def committed_schema(path: Path = COMMITTED_SCHEMA) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in ``new`` breaks a client of ``old``, one line each (empty: compatible)."""
    return _Diff(old, new).run()


def _inline(node: Any, root: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """``node`` with every local ``$ref`` replaced by what it names (a cycle ends in ``{}``)."""
    if isinstance(node, list):
        return [_inline(item, root, stack) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/") or ref in stack:
            return {}
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**target, **siblings} if isinstance(target, dict) else {}, root, (*stack, ref))
    return {key: _inline(value, root, stack) for key, value in node.items()}


class _Diff:
    def __init__(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.old, self.new = _inline(old, old), _inline(new, new)
        self.problems: list[str] = []

    def run(self) -> list[str]:
        old_paths, new_paths = self.old.get("paths", {}), self.new.get("paths", {})
        for path, old_item in old_paths.items():
            if path not in new_paths:
                self.problems.append(f"{path}: path removed")
                continue
            for method in _METHODS:
                if method not in old_item:
                    continue
                where = f"{method.upper()} {path}"
                if method not in new_paths[path]:
                    self.problems.append(f"{where}: operation removed")
                    continue
                self._operation(where, old_item[method], new_paths[path][method],
                                old_item.get("parameters", []), new_paths[path].get("parameters", []))
        return self.problems

    # ------------------------------------------------------------ operations

    def _operation(self, where: str, old: dict[str, Any], new: dict[str, Any],
                   old_shared: list[Any], new_shared: list[Any]) -> None:
        self._security(where, old.get("security"), new.get("security"))
        self._parameters(where, [*old_shared, *old.get("parameters", [])], [*new_shared, *new.get("parameters", [])])
        self._request_body(where, old.get("requestBody"), new.get("requestBody"))
        old_responses, new_responses = old.get("responses", {}), new.get("responses", {})
        for status, old_resp in old_responses.items():
            if status not in new_responses:
                self.problems.append(f"{where}: response {status} removed")
                continue
            self._response(f"{where} -> {status}", old_resp, new_responses[status])

    def _security(self, where: str, old: list[dict[str, Any]] | None, new: list[dict[str, Any]] | None) -> None:
        # None: the operation does not say (no global security here: none needed); []: none needed.
        old_reqs = [frozenset(r) for r in (old or [])] or [frozenset()]
        new_reqs = [frozenset(r) for r in (new or [])] or [frozenset()]
        # An old client meets one old requirement; the new schema must still accept that one.
        for req in old_reqs:
            if not any(other <= req for other in new_reqs):
                names = " + ".join(sorted(req)) or "no credentials"
                wanted = " or ".join(" + ".join(sorted(r)) or "none" for r in new_reqs)
                self.problems.append(f"{where}: security changed: {names} no longer accepted (now {wanted})")

    def _parameters(self, where: str, old: list[Any], new: list[Any]) -> None:
        old_by = {(p["in"], p["name"]): p for p in old}
        new_by = {(p["in"], p["name"]): p for p in new}
        for key, p in old_by.items():
            name = f"{where}: {key[0]} parameter {key[1]!r}"
            if key not in new_by:
                self.problems.append(f"{name} removed")
                continue
            if new_by[key].get("required") and not p.get("required"):
                self.problems.append(f"{name} made required")
            self._schema(name, p.get("schema", {}), new_by[key].get("schema", {}), "request")
        for key, p in new_by.items():
            if key not in old_by and p.get("required"):
                self.problems.append(f"{where}: required {key[0]} parameter {key[1]!r} added")

    def _request_body(self, where: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if old is None:
            if new is not None and new.get("required"):
                self.problems.append(f"{where}: required request body added")
            return
        if new is None:
            self.problems.append(f"{where}: request body removed")
            return
        if new.get("required") and not old.get("required"):
            self.problems.append(f"{where}: request body made required")
        for media, content in old.get("content", {}).items():
            if media not in new.get("content", {}):
                self.problems.append(f"{where}: request body {media} no longer accepted")
                continue
            self._schema(f"{where}: body", content.get("schema", {}), new["content"][media].get("schema", {}),
                         "request")

    def _response(self, where: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        for media, content in old.get("content", {}).items():
            if media not in new.get("content", {}):
                self.problems.append(f"{where}: {media} answer removed")
                continue
            self._schema(f"{where}: body", content.get("schema", {}), new["content"][media].get("schema", {}),
                         "response")
        for header in old.get("headers", {}):
            if header not in new.get("headers", {}):
                self.problems.append(f"{where}: header {header} removed")
        for link in old.get("links", {}):
            if link not in new.get("links", {}):
                self.problems.append(f"{where}: link {link!r} removed")

    # ------------------------------------------------------------ schemas

    def _schema(self, where: str, old: JsonSchema, new: JsonSchema, direction: Direction, depth: int = 0) -> None:
        if depth > 32 or not isinstance(old, dict) or not isinstance(new, dict):
            return
        old_types, new_types = self._types(old), self._types(new)
        if old_types is not None and new_types is not None:
            lost = _not_covered(old_types, new_types) if direction == "request" else _not_covered(new_types, old_types)
            if lost:
                self.problems.append(f"{where}: type changed from {_fmt(old_types)} to {_fmt(new_types)}")
                return
        old_enum, new_enum = self._enum(old), self._enum(new)
        if old_enum is not None and new_enum is not None:
            removed = [v for v in old_enum if v not in new_enum]
            if removed:
                self.problems.append(f"{where}: enum value(s) {', '.join(map(repr, removed))} removed")
        if direction == "request":
            self._constraints(where, old, new)
        old_obj, new_obj = self._single(old), self._single(new)
        self._object(where, old_obj, new_obj, direction, depth)
        if "items" in old_obj and "items" in new_obj:
            self._schema(f"{where}[]", old_obj["items"], new_obj["items"], direction, depth + 1)
        old_extra, new_extra = old_obj.get("additionalProperties"), new_obj.get("additionalProperties")
        if isinstance(old_extra, dict) and isinstance(new_extra, dict):
            self._schema(f"{where}.*", old_extra, new_extra, direction, depth + 1)

    def _object(self, where: str, old: JsonSchema, new: JsonSchema, direction: Direction, depth: int) -> None:
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        old_req, new_req = set(old.get("required", [])), set(new.get("required", []))
        for name, old_prop in old_props.items():
            field = f"{where}.{name}"
            if name not in new_props:
                self.problems.append(f"{field}: field removed")
                continue
            if direction == "request" and name in new_req and name not in old_req:
                self.problems.append(f"{field}: field made required")
            if direction == "response" and name in old_req and name not in new_req:
                self.problems.append(f"{field}: field no longer always present")
            self._schema(field, old_prop, new_props[name], direction, depth + 1)
        if direction == "request":
            for name in sorted(new_req - set(old_props)):
                self.problems.append(f"{where}.{name}: required field added")

    def _constraints(self, where: str, old: JsonSchema, new: JsonSchema) -> None:
        old, new = self._single(old), self._single(new)
        for key in _LOWER_BOUNDS:
            if key in new and (key not in old or new[key] > old[key]):
                self.problems.append(f"{where}: {key} raised to {new[key]}")
        for key in _UPPER_BOUNDS:
            if key in new and (key not in old or new[key] < old[key]):
                self.problems.append(f"{where}: {key} lowered to {new[key]}")
        if new.get("pattern") not in (None, old.get("pattern")):
            self.problems.append(f"{where}: pattern changed to {new['pattern']!r}")

    @staticmethod
    def _single(schema: JsonSchema) -> JsonSchema:
        """The schema without its ``null`` alternative (``X | None`` is ``anyOf: [X, null]``)."""
        for key in ("anyOf", "oneOf"):
            options = [o for o in schema.get(key, []) if isinstance(o, dict) and o.get("type") != "null"]
            if key in schema and len(options) == 1:
                return options[0]
        return schema

    def _types(self, schema: JsonSchema) -> set[str] | None:
        """The JSON types the schema admits; None: any."""
        if "const" in schema:
            return {_json_type(schema["const"])}
        if "enum" in schema:
            return {_json_type(v) for v in schema["enum"]}
        kind = schema.get("type")
        if isinstance(kind, str):
            return {kind}
        if isinstance(kind, list):
            return set(kind)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                out: set[str] = set()
                for option in schema[key]:
                    sub = self._types(option) if isinstance(option, dict) else None
                    if sub is None:
                        return None
                    out |= sub
                return out
        if "properties" in schema:
            return {"object"}
        return None

    def _enum(self, schema: JsonSchema) -> list[Any] | None:
        if "enum" in schema:
            return list(schema["enum"])
        if "const" in schema:
            return [schema["const"]]
        single = self._single(schema)
        if single is not schema:
            return self._enum(single)
        return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _not_covered(needed: set[str], offered: set[str]) -> set[str]:
    """The types in ``needed`` that ``offered`` does not admit (an integer is a number)."""
    return {t for t in needed if t not in offered and not (t == "integer" and "number" in offered)}


def _fmt(types: set[str]) -> str:
    return " | ".join(sorted(types))


def main(argv: list[str] | None = None) -> int:
    """``python -m dgpt.head.api_schema [--check]``: write the committed schema, or check against it."""
    args = sys.argv[1:] if argv is None else argv
    live = live_schema()
    if "--check" in args:
        problems = breaking_changes(committed_schema(), live)
        for line in problems:
            print(line)
        print(f"{len(problems)} breaking change(s) against {COMMITTED_SCHEMA.name}" if problems
              else f"compatible with {COMMITTED_SCHEMA.name}")
        return 1 if problems else 0
    COMMITTED_SCHEMA.write_text(json.dumps(live, indent=2, sort_keys=True) + "\n")
    print(f"wrote {COMMITTED_SCHEMA} (API {live['info']['version']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
