"""The self-contained report page: tables and figures (PNG as data URIs) in one HTML file."""

from __future__ import annotations

import base64
import html

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table.ablation,table{border-collapse:collapse;font-size:14px}td,th{padding:4px 10px;border-bottom:1px solid #ddd;
text-align:right}th{background:#f4f4f4}img{max-width:100%;margin:1em 0}.note{color:#555}"""


def page(title: str, sections: list[tuple[str, str]], figures: list[tuple[str, bytes]], note: str) -> str:
    """`sections`: (heading, table HTML); `figures`: (caption, PNG bytes)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(note)}</p>"]  # fmt: skip
    for heading, table in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{table}")
    for caption, png in figures:
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)
