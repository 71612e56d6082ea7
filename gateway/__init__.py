"""The epserve gateway: the public ``epserve.v1.Generation`` gRPC API in front of the attention workers.

``python -m gateway --help`` lists the flags. A request flows through these pieces:

    servicer.py          proto <-> dataclasses, error -> status code (thin)
    request_manager.py   tokenize (tokenizer.py), validate (validation.py), register the request id,
                         pick a worker (router.py, least outstanding tokens), stream its token ids,
                         turn them into text (output_processor.py: detokenizer.py + stop_strings.py),
                         abort / cancel / retry on another worker when one is lost
    worker_pool.py       the attention workers known (static list and/or placement discovery),
                         which of them answer (GetLoad probes), one gRPC client each (worker_client.py)
    server.py            builds the objects above from a GatewayConfig (config.py), serves, shuts down

Context length: a prompt must be shorter than the model's context (max_position_embeddings);
``max_new_tokens`` may ask for more than fits, in which case the gateway lowers it to
``context - prompt_tokens`` before sending the request to a worker and the stream ends with
finish_reason LENGTH when the context is full.
"""
