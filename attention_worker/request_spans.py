"""A traced request's phases at the attention worker, recorded as spans when it leaves the engine.

The engine thread stamps ``Sequence.submit_ns`` / ``scheduled_ns`` / ``first_token_ns`` (wall
clock, only for requests with a trace context); when the request finishes or is aborted, three
spans are recorded after the fact, children of the request's ``AttentionWorker/Generate``
SERVER span:

- ``queue``: added → first scheduled (the whole life if it never ran)
- ``prefill``: first scheduled → first token sampled (chunked prefill and preemption included)
- ``decode``: first token → finished
"""

from __future__ import annotations

from epserve.attention_worker.sequence import Sequence
from epserve.telemetry import Tracing


def record_request_spans(tracing: Tracing, seq: Sequence, end_ns: int) -> None:
    context = seq.trace_context
    base = {"epserve.request_id": seq.request_id}
    scheduled = seq.scheduled_ns or end_ns
    tracing.record_span("queue", context, seq.submit_ns or scheduled, scheduled, attributes=base)
    if not seq.scheduled_ns:
        return
    first_token = seq.first_token_ns or end_ns
    tracing.record_span("prefill", context, scheduled, first_token, attributes={
        **base, "epserve.prompt_tokens": seq.num_prompt_tokens, "epserve.preemptions": seq.num_preemptions})
    if seq.first_token_ns:
        tracing.record_span("decode", context, first_token, end_ns, attributes={
            **base, "epserve.completion_tokens": seq.num_generated,
            "epserve.finish_reason": seq.finish_reason.label if seq.finish_reason is not None else ""})
