"""The streaming meter and request scanner: picks the compiled twin, else the Python one.

Conventions (the same columns mean the same thing for every vendor):

- ``input_tokens`` is uncached input only (Anthropic's meaning). OpenAI counts
  cached tokens inside its input, so there ``input_tokens = input - cached``
  (never below 0) and ``cache_read = cached``; OpenAI cache writes stay in
  ``input_tokens`` and ``cache_write_*`` are 0.
- ``output_tokens`` includes reasoning/thinking tokens (both vendors do);
  ``reasoning_tokens`` repeats that share for reporting.
- A stream cut before the vendor's final usage was billed for what the
  vendor generated, but the usage seen so far holds a placeholder (Anthropic
  ``message_start``'s 1) or nothing. Its ``output_tokens`` is therefore
  ``max(reported, ceil(delta_chars / 4))``, and ``output_estimated`` says
  that the estimate won. Four characters per token (``CHARS_PER_TOKEN``,
  ``estimated_tokens``) is the vendors' own rule of thumb for English and
  code. The final usage is Anthropic's ``message_delta`` with
  ``output_tokens`` (or ``message_stop``), Responses' ``response.completed``
  or ``response.incomplete`` or a terminal event with usage, and Chat's usage
  chunk (so a Chat stream without ``stream_options.include_usage`` keeps its
  estimate after ``[DONE]``); once it is in, the vendor's number stands alone.
- ``delta_chars`` counts the characters (decoded: an escape or a UTF-8
  sequence is one) of generated text in the deltas: Anthropic
  ``content_block_delta`` ``delta.text`` / ``thinking`` / ``partial_json``
  (not signatures); the ``delta`` of every Responses ``response.<...>.delta``
  but ``response.audio.delta``; Chat ``choices[].delta`` ``content`` /
  ``reasoning_content`` / ``refusal`` and ``tool_calls[].function.arguments``.
- Anthropic ``message_delta`` usage is cumulative: each field it carries
  (non-null) overwrites the value from ``message_start``; nothing is added.
  Cache writes are split 5m/1h from ``usage.cache_creation``; without it, all
  of ``cache_creation_input_tokens`` counts as 5m. A later total that differs
  from the split moves the difference into 5m, or into 1h when every write so
  far was 1h; neither side goes below 0.
- ``model`` is the model that served the response: Anthropic
  ``message_start.message.model``, relabelled by a ``fallback`` content block;
  Responses ``response.model``; Chat the chunk ``model``.
- ``stop_reason``: Anthropic ``stop_reason``; Responses the terminal status or
  ``incomplete_details.reason``; Chat ``finish_reason``.
- ``completed``: ``message_stop``, ``response.completed`` or
  ``response.incomplete`` (final usage, like Anthropic's max_tokens stop),
  ``data: [DONE]``; without SSE, a JSON body with ``usage`` and no error.
- ``error_type``: the first in-stream error (Anthropic ``error.type``, OpenAI
  ``code`` then ``type``); ``"error"`` when the error names none.
- ``events`` counts dispatched SSE events; ``malformed`` counts events (or a
  body) that needed decoding but were not JSON (text deltas included, since
  their text is counted), and lines or bodies over the size caps. Malformed
  input never raises: one odd event must not stop the metering of the rest.
  ``MeterError`` is raised only for misuse.
- A body that ends without a final blank line still has its last event
  counted (the SDKs drop it, but its numbers are real).

``HUBCORE_NO_EXTENSIONS`` (any non-empty value) or a non-CPython interpreter
selects the pure-Python twin; type checkers see that twin.
"""

from typing import TYPE_CHECKING

from hubcore import load_twin
from hubcore._meter_errors import MeterError
from hubcore.accounting._meter_interpret import CHARS_PER_TOKEN, estimated_tokens
from hubcore.accounting._meter_py import session_from_user_id

__all__ = [
    "CHARS_PER_TOKEN", "COMPILED", "FMT_ANTHROPIC", "FMT_OPENAI_CHAT", "FMT_OPENAI_RESPONSES", "MAX_BODY_SIZE",
    "MAX_EVENT_SIZE", "Meter", "MeterError", "estimated_tokens", "scan_request", "session_from_user_id",
]

if TYPE_CHECKING:
    from hubcore.accounting._meter_py import (
        FMT_ANTHROPIC, FMT_OPENAI_CHAT, FMT_OPENAI_RESPONSES, MAX_BODY_SIZE, MAX_EVENT_SIZE, Meter, scan_request,
    )

    COMPILED = False
else:
    _twin, COMPILED = load_twin("hubcore.accounting._meter", "hubcore.accounting._meter_py")
    FMT_ANTHROPIC, FMT_OPENAI_CHAT, FMT_OPENAI_RESPONSES = _twin.FMT_ANTHROPIC, _twin.FMT_OPENAI_CHAT, _twin.FMT_OPENAI_RESPONSES
    MAX_BODY_SIZE, MAX_EVENT_SIZE, Meter, scan_request = _twin.MAX_BODY_SIZE, _twin.MAX_EVENT_SIZE, _twin.Meter, _twin.scan_request
