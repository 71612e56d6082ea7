"""The placement service process (``python -m placement_service``).

Owns the worker registry (ranks, health), the versioned expert map and its persistence,
and pushes maps to workers over the Placement gRPC service; PlacementAdmin answers
operators. Files: ``config`` (flags → PlacementConfig), ``registry`` (workers, ranks,
health), ``state`` (map versions, load), ``state_db`` (SQLite), ``broadcast`` (watch
queues), ``controller`` (the logic, no gRPC), ``service`` (thin servicers), ``server``
(build / stop), ``eplb/`` (placement algorithms).
"""
