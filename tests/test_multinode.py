"""Several machines: two `accelerate launch --num_machines 2` processes on loopback (one per "machine", gloo) train
together and write one adapter, the one a single machine with two processes and the same global batch writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from safetensors.torch import load_file
from train_helpers import ROOT, launch_two, train_cmd

FLAGS = ("--adapter", "lora", "--max_train_steps", 4, "--checkpointing_steps", 2, "--learning_rate", 1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(rank: int, port: int, model_dir, out) -> list[str]:
    """What a user types on machine `rank` of two, each running one process (`--num_processes` is the total)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            *train_cmd(model_dir, out, *FLAGS)[1:]]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def test_two_machines_on_loopback_train_what_one_machine_with_two_processes_trains(tiny_model_dir, tmp_path):
    """The two "machines" share `output_dir` (as the README requires of real nodes): the global main process (rank 0
    of machine 0) writes the checkpoints' renames, run.json and the adapter. Tolerance 1e-6 absolute on every LoRA
    tensor after 4 steps at lr 1e-3, where B moves ~1e-2 from 0: the two runs deal the same samples to the same global
    ranks, draw the same per-sample noise and average the same gradients over gloo, so only float32 reduction order
    can differ."""
    nodes_out, one_out = tmp_path / "nodes", tmp_path / "one_machine"
    port = free_port()
    nodes = [subprocess.Popen(node_cmd(rank, port, tiny_model_dir, nodes_out), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"machine {rank}:\n{err[-3000:]}"
    run = json.loads((nodes_out / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 4 and run["finished"]
    assert sorted(p.name for p in nodes_out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(nodes_out.glob(".checkpoint-*.tmp"))  # every rename done, once

    one = subprocess.run([*launch_two(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          *train_cmd(tiny_model_dir, one_out, *FLAGS)[1:]],
                         capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((one_out / "run.json").read_text())["world_size"] == 2

    a, b = (load_file(d / "unet_adapter.safetensors") for d in (nodes_out, one_out))
    assert a.keys() == b.keys()
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # B starts at 0
    print(f"two machines vs one machine: max |difference| {difference:.1e}, largest B entry {moved:.1e}")
    assert moved > 1e-3 and difference <= 1e-6


def test_sharded_backends_refuse_what_they_cannot_do_with_what_to_do_instead():
    """accelerate's DeepSpeed prepares one model per plugin: a UNet plus text-encoder run is refused, a UNet run is
    not; FSDP is refused whole (the adapters' tensors would need gathering to be written). Plain DDP passes."""
    import pytest

    from dreamlora.errors import ArgError
    from pipelines.trainer.launch import check_distributed

    check_distributed("DEEPSPEED", ["unet"])
    check_distributed("MULTI_GPU", ["unet", "text_encoder"])
    with pytest.raises(ArgError, match="drop --train_text_encoder"):
        check_distributed("DEEPSPEED", ["unet", "text_encoder"])
    with pytest.raises(ArgError, match="DeepSpeed ZeRO-2"):
        check_distributed("FSDP", ["unet"])
    shipped = ROOT / "pipelines" / "trainer" / "accelerate_configs" / "deepspeed_zero2.yaml"
    import yaml

    config = yaml.safe_load(shipped.read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == 2
