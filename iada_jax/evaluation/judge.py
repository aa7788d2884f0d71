"""The GPT answer extractor lmms-eval 0.7.3 uses for MathVista, through any OpenAI-compatible
chat-completions endpoint (the standard library only, no `openai` package).

Configured as lmms-eval's `llm_judge` OpenAI provider and `MathVistaEvaluator` are, from the
environment: OPENAI_API_KEY (required), OPENAI_API_URL (default https://api.openai.com/v1),
MODEL_VERSION (default gpt-4o-2024-11-20, mathvista_evals.py's). Requests as lmms-eval's:
one user message, temperature 0, at most 256 tokens; up to 5 tries; an empty answer when
every try fails (lmms-eval's `get_chat_response`), counted in `failures`.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

DEFAULT_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-2024-11-20"


class OpenAIExtractor:
    """Callable: prompt -> the model's stripped answer ("" after `tries` failures)."""

    def __init__(self, url: str | None = None, key: str | None = None, model: str | None = None,
                 max_tokens: int = 256, tries: int = 5, timeout_s: float = 60.0, wait_s: float = 1.0):
        self.url = (url or os.environ.get("OPENAI_API_URL") or DEFAULT_URL).rstrip("/") + "/chat/completions"
        self.key = key if key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.model = model or os.environ.get("MODEL_VERSION") or DEFAULT_MODEL
        if not self.key:
            raise ValueError("the GPT extractor needs OPENAI_API_KEY in the environment (and OPENAI_API_URL for an "
                             "endpoint other than OpenAI's); or use the offline extractor")
        self.max_tokens, self.tries, self.timeout_s, self.wait_s = max_tokens, tries, timeout_s, wait_s
        self.calls = self.failures = 0
        self.last_error = ""

    def describe(self) -> dict:
        return {"extractor": "gpt", "url": self.url, "model": self.model, "calls": self.calls, "failures": self.failures}

    def __call__(self, prompt: str) -> str:
        self.calls += 1
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        for attempt in range(self.tries):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    content = json.load(reply)["choices"][0]["message"]["content"]
                if content and content.strip():
                    return content.strip()
                self.last_error = "empty answer"
            except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError, ValueError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
            if attempt + 1 < self.tries:
                time.sleep(self.wait_s)
        self.failures += 1
        return ""
