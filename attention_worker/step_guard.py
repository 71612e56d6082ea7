"""One request must never end the engine: run a step, and when it raises, find the request(s) to blame.

``run_guarded(runner, chunks, expert_map)`` runs the step runner over the scheduled chunks. When the
step raises:

- a data-plane error (an expert worker lost, late or failing: ``DataPlaneTimeout``, ``PeerLost``,
  ``StaleMapVersion``, ``RemoteExpertError``) is nobody's request: every chunk of the step fails
  with it (re-running would only wait for the same peer again);
- anything else (a sampler error, a kernel error on one sequence's values) is looked for one
  chunk at a time: each chunk runs again alone; the ones that raise again fail, the others get
  their token as if nothing happened.

Re-running a chunk is safe: a step changes nothing the next step reads before it returns
(``num_cached`` advances in the engine after ``run``), and the KV cache rows a chunk writes
are the same rows whether it runs alone or with others. What is repeated: the expert load of
those tokens is recorded twice (the load windows are statistics) and a sampled sequence draws
from its generator again.

The result keeps the runner's contract (one token per completing chunk, in chunk order) for
the chunks that did not fail, plus an error message for each chunk that did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from epserve.attention_worker.scheduler import ScheduledChunk
from epserve.expert_map import ExpertMap

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300


@dataclass
class GuardedStep:
    tokens: dict[int, int] = field(default_factory=dict)    # chunk index → sampled token (completing chunks)
    logprobs: dict[int, object] = field(default_factory=dict)  # chunk index → its token's logprobs, when asked
    errors: dict[int, str] = field(default_factory=dict)    # chunk index → why that chunk's request failed


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, cut to MAX_ERROR_CHARS (a message never grows with input)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


def is_data_plane_error(exc: BaseException) -> bool:
    from epserve.dataplane.base import DataPlaneTimeout, PeerLost, RemoteExpertError, StaleMapVersion

    return isinstance(exc, (DataPlaneTimeout, PeerLost, RemoteExpertError, StaleMapVersion))


def run_guarded(runner, chunks: list[ScheduledChunk], expert_map: ExpertMap) -> GuardedStep:
    """Never raises ``Exception``: a chunk either has its result or an error."""
    try:
        return collect(chunks, runner.run(chunks, expert_map))
    except AssertionError:      # an engine invariant broke: that is a bug, not a request's fault
        raise
    except Exception as exc:  # noqa: BLE001 - sorted out below, chunk by chunk
        step_error = exc
    ids = [c.seq.request_id for c in chunks]
    if len(chunks) == 1 or is_data_plane_error(step_error):
        logger.error("step of %d sequence(s) failed; failing %s: %s", len(chunks), _ids(ids), describe(step_error),
                     exc_info=step_error)
        return GuardedStep(errors={i: describe(step_error) for i in range(len(chunks))})
    logger.warning("step of %d sequences failed (%s); running each alone to find the request that fails",
                   len(chunks), describe(step_error))
    result = GuardedStep()
    for i, chunk in enumerate(chunks):
        try:
            alone = _by_index([chunk], [0], runner.run([chunk], expert_map))
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - this chunk's request fails, the engine goes on
            logger.error("request %s fails: %s", chunk.seq.request_id, describe(exc), exc_info=exc)
            result.errors[i] = describe(exc)
            continue
        if 0 in alone.tokens:
            result.tokens[i] = alone.tokens[0]
            if 0 in alone.logprobs:
                result.logprobs[i] = alone.logprobs[0]
    return result


def collect(chunks: list[ScheduledChunk], sampled) -> GuardedStep:
    """What a runner returned for all of ``chunks``, as the guard's result (no errors)."""
    return _by_index(chunks, range(len(chunks)), sampled)


def _by_index(chunks: list[ScheduledChunk], indices, sampled) -> GuardedStep:
    """``sampled``: what the runner returned: the tokens of the completing chunks, as a list or as an
    object with ``token_ids`` (and ``logprobs``: one per token, or None when no request asked)."""
    tokens = list(getattr(sampled, "token_ids", sampled))
    logprobs = getattr(sampled, "logprobs", None)
    completing = [i for i in indices if chunks[i].completes]
    assert len(tokens) == len(completing), f"runner returned {len(tokens)} tokens for {len(completing)} chunks"
    step = GuardedStep(tokens=dict(zip(completing, tokens)))
    if logprobs is not None:
        step.logprobs = {i: lp for i, lp in zip(completing, logprobs) if lp is not None}
    return step


def _ids(ids: list[str]) -> str:
    return ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
