"""The trainer+engines weight-update process group, formed the way SGLang forms it.

SGLang's ``/init_weights_update_group`` joins a standalone group (not its default one): a
``tcp://MASTER:PORT`` rendezvous (a TCP store that rank 0, the trainer's source, hosts), wrapped in
``PrefixStore(group_name, ...)``, then torch's own group factory. The trainer, the reference server
and the vLLM engine all join through :func:`join_update_group`, so the store keys of the first
gloo/NCCL handshake match SGLang's exactly and a real SGLang server can join our trainer's group.
Tensors move with the group object's own ``broadcast`` (no default process group is needed).
"""

from __future__ import annotations

import datetime
import inspect

import torch


def join_update_group(*, backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                      group_name: str, timeout_s: float):
    """This process's membership of the group (rank 0 hosts the TCP store and must join too)."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = datetime.timedelta(seconds=timeout_s)
    # What SGLang's tcp:// rendezvous builds, made explicitly: under torchrun, rendezvous() would make
    # rank 0 a client of torchrun's agent store instead of hosting the group's own store.
    store = torch.distributed.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                       timeout=timeout, wait_for_workers=False)
    store = PrefixStore(group_name, store)
    # torch renamed pg_options to backend_options; pass whichever this version takes.
    options = "backend_options" if "backend_options" in inspect.signature(_new_process_group_helper).parameters \
        else "pg_options"
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                         timeout=timeout, **{options: None})
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def broadcast_from_source(group, tensor: torch.Tensor) -> torch.Tensor:
    """Broadcast ``tensor`` (in place on receivers) from rank 0 of ``group``; returns it."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()
    return tensor
