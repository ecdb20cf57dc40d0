"""parallel/placement.py: which trainer / rollout GPU layouts each weight-sync mode can serve."""

from __future__ import annotations

import pytest

from megatron_lcr.parallel.placement import check_rollout_placement


def test_distributed_mode_needs_disjoint_gpus_and_names_the_overlap():
    check_rollout_placement(trainer_gpus=range(4), rollout_gpus=[4, 5, 6, 7], sync_mode="distributed")
    with pytest.raises(ValueError) as err:
        check_rollout_placement(trainer_gpus=range(8), rollout_gpus=[2, 3, 4, 9], sync_mode="distributed")
    message = str(err.value)
    assert message.startswith("rollout GPUs 2-4 are also trainer GPUs (node 0's trainer ranks use GPUs 0-7)")
    assert "NCCL" in message and "\n" not in message


def test_tensor_mode_only_on_rank_0s_own_gpu():
    check_rollout_placement(trainer_gpus=range(1), rollout_gpus=[0], sync_mode="tensor")
    with pytest.raises(ValueError, match=r"engines on GPUs 0-1 cannot open"):
        check_rollout_placement(trainer_gpus=range(2), rollout_gpus=[0, 1], sync_mode="tensor")
    with pytest.raises(ValueError, match=r"trainer rank 0 on GPU 0, which engines on GPUs 3 cannot open"):
        check_rollout_placement(trainer_gpus=range(2), rollout_gpus=[3], sync_mode="tensor")


@pytest.mark.parametrize("mode", ["distributed", "tensor", "disk"])
def test_servers_off_node_0s_gpus_always_fit(mode):
    check_rollout_placement(trainer_gpus=range(8), rollout_gpus=[], sync_mode=mode)


def test_disk_mode_takes_any_placement():
    check_rollout_placement(trainer_gpus=range(8), rollout_gpus=range(8), sync_mode="disk")


def test_teacher_servers_need_gpus_of_their_own_and_the_error_names_them():
    from megatron_lcr.parallel.placement import check_teacher_placement

    check_teacher_placement(trainer_gpus=range(4), rollout_gpus=[4, 5], teacher_gpus=[6, 7])
    check_teacher_placement(trainer_gpus=range(8), rollout_gpus=[], teacher_gpus=[])  # on CPU or by URL
    with pytest.raises(ValueError, match=r"^teacher server GPUs 2-3 are also trainer GPUs: ") as err:
        check_teacher_placement(trainer_gpus=range(4), rollout_gpus=[], teacher_gpus=[2, 3, 4])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^teacher server GPUs 5 are also rollout server GPUs: "):
        check_teacher_placement(trainer_gpus=range(4), rollout_gpus=[4, 5], teacher_gpus=[5, 6])
