"""Reasoning blocks removed from a generated answer before it is scored, as lmms-eval 0.7.3
does by default (`--reasoning_tags`, lmms_eval/api/reasoning.py, applied to every response in
evaluator._process_document_results before the task's process_results)."""

from __future__ import annotations

import json

# lmms-eval 0.7.3's default for --reasoning_tags (lmms_eval/__main__.py).
DEFAULT_REASONING_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def strip_reasoning_tags(text: str, tag_pairs) -> str:
    """Mirrors lmms-eval 0.7.3 `strip_reasoning_tags`: each [start, end] block is cut out
    (case-sensitive; an opening tag without a closing one stays); when only a closing tag is
    left (the template prefilled the opening one), the text after the last closing tag is kept;
    the result is stripped of surrounding whitespace."""
    result = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in result and end_tag in result:
            start = result.find(start_tag)
            end = result.find(end_tag, start)
            if start != -1 and end != -1:
                result = result[:start] + result[end + len(end_tag):]
            else:
                break
        if end_tag in result and start_tag not in result:
            result = result.rsplit(end_tag, 1)[-1]
    return result.strip()


def parse_reasoning_tags(value: str | None) -> tuple[tuple[str, str], ...] | None:
    """`--reasoning-tags`: a JSON list of [start, end] pairs, or "none" (no stripping);
    None gives lmms-eval's default."""
    if value is None:
        return DEFAULT_REASONING_TAGS
    if value.strip().lower() == "none":
        return None
    try:
        pairs = json.loads(value)
        pairs = tuple((str(a), str(b)) for a, b in pairs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--reasoning-tags {value!r}: expected a JSON list of [start, end] pairs or 'none' ({e})") from None
    return pairs
