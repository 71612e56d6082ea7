"""The torch.distributed rendezvous store the placement service hosts for the data plane.

Every worker joins one process group of world_size ranks; they meet at this TCPStore
(``dist_init_addr`` in RegisterResponse / DataPlaneInfo) as clients (``is_master=False``).
The store holds no state placement needs, so a restarted service simply hosts a new one
(on the same port when it can).
"""

from __future__ import annotations

import torch.distributed as dist


def start_rendezvous_store(host: str, port: int) -> tuple[dist.TCPStore, int]:
    """A TCPStore server on host:port (port 0 = pick). Returns (store, bound port).

    Dropping the last reference to the store stops the server.
    TODO: use epserve.dataplane's start_rendezvous_store once it lands (same signature).
    """
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    return store, store.port
