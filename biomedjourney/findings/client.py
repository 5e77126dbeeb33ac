"""The package's one OpenAI client: its configuration (`LLMConfig`), how it is built (`make_client`:
the openai SDK's own retries and timeout) and one chat-completions call whose failure becomes a plain
message (`complete`). Both LLM users go through here: the progression describer
(`findings.describe_llm.OpenAIDescriber`) and the structured-findings extractor (`findings.llm`).

Retries are the SDK's: it retries connection errors, timeouts and HTTP 408/409/429/5xx up to
``max_retries`` times with exponential backoff and jitter, honouring the server's Retry-After.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["LLMConfig", "make_client", "complete", "failure_message", "ENV_HELP", "NOT_CONFIGURED"]

ENV_HELP = "OPENAI_API_KEY, OPENAI_BASE_URL (optional, any OpenAI-compatible server), BIOMEDJOURNEY_LLM_MODEL"
NOT_CONFIGURED = f"OpenAI backend is not configured: set {ENV_HELP}, or use backend='rules'"


@dataclass
class LLMConfig:
    model: str = "gpt-4"                    # BIOMEDJOURNEY_LLM_MODEL
    base_url: str | None = None             # OPENAI_BASE_URL (any OpenAI-compatible server)
    api_key: str | None = None              # OPENAI_API_KEY
    timeout: float = 30.0                   # seconds per request (the SDK's timeout)
    max_retries: int = 4                    # the SDK's retries on 408/409/429/5xx, timeouts, connection errors
    temperature: float = 0.0
    cache_path: str | None = "~/.cache/biomedjourney/progression.jsonl"  # BIOMEDJOURNEY_LLM_CACHE; None disables

    @classmethod
    def from_env(cls) -> "LLMConfig":
        """Defaults overridden by the environment ('', 'none' or 'off' in BIOMEDJOURNEY_LLM_CACHE: no cache)."""
        cache = os.environ.get("BIOMEDJOURNEY_LLM_CACHE")
        return cls(model=os.environ.get("BIOMEDJOURNEY_LLM_MODEL") or cls.model,
                   base_url=os.environ.get("OPENAI_BASE_URL") or None,
                   api_key=os.environ.get("OPENAI_API_KEY") or None,
                   cache_path=cls.cache_path if cache is None else
                   (None if cache.strip().lower() in ("", "none", "off") else cache))

    def configured(self) -> bool:
        return bool(self.api_key or self.base_url)


def make_client(config: LLMConfig, http_client=None):
    """An `openai.OpenAI` client with ``config``'s base URL, key, timeout and retries (the SDK's own).
    ``http_client``: an httpx client for the SDK (a proxy, or a mock transport in tests)."""
    import openai  # lazy: the rules path never pays for this import
    return openai.OpenAI(api_key=config.api_key or "not-needed", base_url=config.base_url,
                         max_retries=config.max_retries, timeout=config.timeout, http_client=http_client)


def complete(client, config: LLMConfig, error: type[Exception], messages: list[dict], **extra):
    """One chat completion with ``config``'s model and temperature, the SDK retrying as configured:
    (the response, how many retries the SDK took). Any API failure raises ``error`` with
    `failure_message` (the SDK's exception chained as its cause)."""
    import openai
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=config.model, temperature=config.temperature, messages=messages, **extra)
        return raw.parse(), raw.retries_taken
    except openai.APIError as e:
        raise error(failure_message(e, config)) from e


def redact(text: str) -> str:
    """``text`` with the configured OpenAI API key (OPENAI_API_KEY) replaced by '[redacted]'."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    return text.replace(key, "[redacted]") if len(key) >= 8 else text


def failure_message(e: Exception, config: LLMConfig) -> str:
    """What went wrong with a request once the SDK stopped retrying, and what to do about it (key redacted:
    a server may echo it)."""
    return redact(_failure_message(e, config))


def _failure_message(e: Exception, config: LLMConfig) -> str:
    import openai
    where = config.base_url or "api.openai.com"
    attempts = f"{config.max_retries + 1} attempt(s)"
    if isinstance(e, openai.APITimeoutError):
        return (f"OpenAI request to {where} timed out after {config.timeout:g} s ({attempts}); try again "
                f"later or raise LLMConfig.timeout (now {config.timeout:g}) / max_retries (now {config.max_retries})")
    if isinstance(e, openai.APIConnectionError):
        return f"could not connect to {where} ({attempts}); check OPENAI_BASE_URL and the network"
    if isinstance(e, openai.APIStatusError):
        return (f"OpenAI request to {where} failed with HTTP {e.status_code}: {e.message}; "
                f"{_status_hint(e.status_code, config)}")
    return f"OpenAI request to {where} failed ({type(e).__name__}: {e}); check OPENAI_BASE_URL and the model name"


def _status_hint(status: int, config: LLMConfig) -> str:
    if status in (401, 403):
        return "check OPENAI_API_KEY (and OPENAI_BASE_URL: is it the server the key is for?)"
    if status == 404:
        return f"check the model name '{config.model}' (BIOMEDJOURNEY_LLM_MODEL) and OPENAI_BASE_URL"
    if status in (408, 409, 429) or status >= 500:
        return (f"the server is busy or failing (retried up to {config.max_retries} times); try again later "
                f"or raise LLMConfig.max_retries (now {config.max_retries})")
    return f"check the model name '{config.model}' and OPENAI_API_KEY"
