"""The explorer's API reference at ``/docs``, rendered from its OpenAPI schema with no network.

FastAPI's own ``/docs`` (Swagger UI) and ``/redoc`` pages load their scripts from a CDN, so on
an offline machine, where the explorer is meant to run, they stay blank. This page is plain
HTML written on the server from the same schema as ``/openapi.json``: every operation with its
summary, parameters (name, where, type, default, required), request body and responses.
"""

from __future__ import annotations

from html import escape

__all__ = ["api_docs_page"]

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .3rem; font-family: ui-monospace, monospace; }
.method { display: inline-block; min-width: 3.6rem; padding: 0 .35rem; border-radius: 3px; color: #fff; text-align: center; }
.get { background: #2b6cb0; } .post { background: #2f855a; } .put, .patch { background: #b7791f; } .delete { background: #c53030; }
table { border-collapse: collapse; margin: .3rem 0; } td, th { border: 1px solid #ccc; padding: .15rem .5rem; text-align: left; }
code { font-family: ui-monospace, monospace; } .muted { color: #666; }
"""


def _type_of(schema: dict) -> str:
    """A short type name for a JSON schema: ``integer``, ``file`` (an upload), a model name..."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type_of(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type_of(schema.get('items', {}))}"
    if schema.get("format") == "binary" or "contentMediaType" in schema:
        return "file"  # an upload (OpenAPI 3.0 spells it format: binary, 3.1 contentMediaType)
    name = schema.get("type", "any")
    return f"{name} ({schema['format']})" if "format" in schema else name


def _parameters(op: dict) -> str:
    params = op.get("parameters", [])
    if not params:
        return ""
    rows = []
    for p in params:
        schema = p.get("schema", {})
        default = f"<code>{escape(repr(schema['default']))}</code>" if "default" in schema else ""
        limits = ", ".join(f"{k} {schema[k]}" for k in ("minimum", "maximum") if k in schema)
        rows.append(
            f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
            f"<td>{escape(_type_of(schema))}{' (' + escape(limits) + ')' if limits else ''}</td>"
            f"<td>{default}</td><td>{'yes' if p.get('required') else 'no'}</td>"
            f"<td>{escape(p.get('description', schema.get('description', '')))}</td></tr>"
        )
    return (
        "<table><tr><th>parameter</th><th>in</th><th>type</th><th>default</th><th>required</th>"
        "<th>description</th></tr>" + "".join(rows) + "</table>"
    )


def _field(name: str, schema: dict, required: bool) -> str:
    """``name: type`` of a form field, with ``(optional, default ...)`` when not required."""
    text = f"<code>{escape(name)}</code>: {escape(_type_of(schema))}"
    if not required:
        default = f", default <code>{escape(repr(schema['default']))}</code>" if "default" in schema else ""
        text += f" (optional{default})"
    return text


def _body(op: dict, components: dict) -> str:
    body = op.get("requestBody")
    if not body:
        return ""
    parts = []
    for media, content in body.get("content", {}).items():
        schema = content.get("schema", {})
        if "$ref" in schema:  # a form: list its fields
            schema = components.get(schema["$ref"].rsplit("/", 1)[-1], schema)
        fields = schema.get("properties", {})
        required = set(schema.get("required", []))
        listed = ", ".join(_field(n, f, n in required) for n, f in fields.items())
        parts.append(f"<p>body <code>{escape(media)}</code>{': ' + listed if listed else ''}</p>")
    return "".join(parts)


def _responses(op: dict) -> str:
    codes = ", ".join(
        f"<code>{escape(code)}</code> {escape(r.get('description', ''))}" for code, r in op.get("responses", {}).items()
    )
    return f"<p class='muted'>responses: {codes}</p>" if codes else ""


def api_docs_page(schema: dict) -> str:
    """The HTML reference of an OpenAPI ``schema`` (``app.openapi()``): self-contained, no
    scripts, no external resources."""
    info = schema.get("info", {})
    components = schema.get("components", {}).get("schemas", {})
    sections = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            sections.append(
                f"<h2><span class='method {escape(method)}'>{escape(method.upper())}</span> {escape(path)}</h2>"
                f"<p>{escape(op.get('summary', ''))}</p>{_parameters(op)}{_body(op, components)}"
                f"{_responses(op)}"
            )
    title = escape(info.get("title", "API"))
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}: API</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title}: API</h1>"
        f"<p>{escape(info.get('description', ''))}</p>"
        "<p class='muted'>The machine-readable schema is <a href='/openapi.json'>/openapi.json</a>; "
        "the explorer itself is at <a href='/'>/</a>.</p>" + "".join(sections) + "</body></html>"
    )
