"""The GPT answer extractor for MathVista (lmms-eval 0.7.3's), against a local stand-in for an
OpenAI-compatible endpoint: what it sends, what it scores, and what a failing endpoint gives."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from iada_jax.evaluation.benchmark import Sample
from iada_jax.evaluation.benchmarks import mathvista
from iada_jax.evaluation.judge import OpenAIExtractor


@pytest.fixture
def endpoint():
    """(url, requests received, replies to give: a string answer or an HTTP status)."""
    received, replies = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
            reply = replies.pop(0) if replies else 500
            if isinstance(reply, int):
                self.send_response(reply)
                self.end_headers()
                return
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", received, replies
    server.shutdown()


def _sample():
    meta = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3/11", "8/11", "6/11", "3/5"],
            "precision": None, "query": "Hint: ...\nQuestion: What fraction is blue?\nChoices:\n(A) 3/11\n(B) 8/11"}
    return Sample(id="1", prompt="", images=[], target="8/11", meta=meta)


def test_gpt_extraction_sends_lmms_evals_prompt_and_scores_its_answer(endpoint, monkeypatch):
    url, received, replies = endpoint
    monkeypatch.setenv("OPENAI_API_KEY", "k123")
    monkeypatch.setenv("OPENAI_API_URL", url)
    monkeypatch.delenv("MODEL_VERSION", raising=False)
    extractor = OpenAIExtractor(wait_s=0)
    replies.append(" B ")
    response = "Looking at the shaded parts, eight of the eleven are blue."  # the offline rules miss it
    result = mathvista.score([_sample()], [response], extractor=extractor)
    assert result["correct"] == 1 and mathvista.score([_sample()], [response])["correct"] == 0
    (request,) = received
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k123"
    body = request["body"]
    assert body["model"] == "gpt-4o-2024-11-20" and body["temperature"] == 0.0 and body["max_tokens"] == 256
    prompt = body["messages"][0]["content"]
    assert body["messages"] == [{"role": "user", "content": prompt}]
    assert prompt.startswith("Please read the following example.") and prompt.endswith(
        f"{_sample().meta['query']}\n\n{response}\n\nExtracted answer: ")
    # the quick checks come first: a verbatim choice never reaches the endpoint
    assert mathvista.score([_sample()], ["8/11"], extractor=extractor)["correct"] == 1 and len(received) == 1


def test_a_failing_endpoint_gives_an_empty_extraction_after_its_tries(endpoint, monkeypatch):
    url, received, replies = endpoint
    extractor = OpenAIExtractor(url=url, key="k", model="m", tries=3, wait_s=0)
    replies.extend([500, 503, ""])  # two errors, then an empty answer
    assert extractor("prompt") == "" and len(received) == 3
    assert extractor.describe()["failures"] == 1 and extractor.calls == 1
    replies.extend([500, "C"])
    assert extractor("prompt") == "C" and extractor.failures == 1


def test_no_key_is_refused(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIExtractor()
