"""Several processes through torch.distributed, as Transformers runs them, with the moefuse experts:
- expert parallelism: each rank holds half the experts; Transformers' router marks the other half's slots as
  placeholder ids (>= the local expert count, which contribute nothing) and an all-reduce sums the ranks' outputs;
- FSDP2: every parameter sharded over the ranks and gathered for the forward, either by Transformers at load time or
  by torch's fully_shard applied to the decoder layers after PEFT (the order training libraries use).
Two processes must give the single process's loss, logits and every gradient, with the model trained whole or
through PEFT LoRA (attention and both expert projections, the experts' adapters run by moefuse). Both ranks see the
whole batch, except under fully_shard, which is tested as data parallelism: each rank takes its half of the batch,
and FSDP's averaged gradients must equal one process's on the whole. gloo on the CPU here; NCCL where two GPUs are
present."""
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moefuse
from conftest import batch, tiny_model

WORLD = 2
# Transformers' DistributedConfig at load time, or None: torch's fully_shard after PEFT.
CONFIGS = {"expert_parallel": dict(tp_size=WORLD, tp_plan="auto", enable_expert_parallel=True),
           "fsdp": dict(fsdp_size=WORLD), "fully_shard": None}  # fmt: skip


def _prepare(model, lora):
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)  # the same adapters in every process; B random too, so every factor gets a gradient
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    return moefuse.use_moefuse_lora(get_peft_model(model, cfg))


def _run(model, inputs):
    out = model(**inputs)
    out.loss.backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor -> the whole tensor
    grads = {n: full(p.grad).detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return dict(loss=out.loss.detach().cpu(), logits=out.logits.detach().cpu(), grads=grads)


def _distributed_result(rank, path, device, config, lora, inputs):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kw = {} if CONFIGS[config] is None else dict(distributed_config=DistributedConfig(**CONFIGS[config]))
    model = _prepare(AutoModelForCausalLM.from_pretrained(path, experts_implementation="moefuse", **kw), lora)
    if CONFIGS[config] is None:  # fully_shard after PEFT, as data parallelism: this rank's half of the batch
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for layer in [m for m in model.modules() if type(m).__name__ == "Qwen3MoeDecoderLayer"]:
            fully_shard(layer)
        fully_shard(model)
        inputs = {k: v.chunk(WORLD)[rank] for k, v in inputs.items()}
    return _run(model, {k: v.to(device) for k, v in inputs.items()})


def _worker(rank, port, path, device, config, lora, inputs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))  # fmt: skip
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=WORLD)
    try:
        # The model (and the sharding state that holds the process group) is gone before the group is destroyed.
        result = _distributed_result(rank, path, device, config, lora, inputs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        gc.collect()
        dist.barrier()  # no rank tears its connections down while another still finishes a collective
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < WORLD,
                                                                   reason=f"needs {WORLD} GPUs"))]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lora", [False, True], ids=["trained", "lora"])
@pytest.mark.parametrize("config", CONFIGS)
def test_two_processes_match_one(tmp_path, monkeypatch, config, lora, device):
    if device == "cpu":  # else Transformers would put each rank on a GPU, where a machine has any
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = str(tmp_path / "model")
    tiny_model().save_pretrained(path)
    inputs = batch()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moefuse").to(device)
    ref = _run(_prepare(model, lora), {k: v.to(device) for k, v in inputs.items()})
    mp.spawn(_worker, args=(_free_port(), path, device, config, lora, inputs, str(tmp_path)), nprocs=WORLD)
    tol = dict(rtol=1e-4, atol=1e-5)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    if CONFIGS[config] is None:  # the halves' mean loss (equal token counts) and their logits together
        loss, logits = torch.stack([g["loss"] for g in ranks]).mean(), torch.cat([g["logits"] for g in ranks])
        for got in ranks:
            got["loss"], got["logits"] = loss, logits
    for got in ranks:
        torch.testing.assert_close(got["loss"], ref["loss"], **tol)
        torch.testing.assert_close(got["logits"], ref["logits"], **tol)
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, **tol, msg=lambda m: f"{name}: {m}")


def test_expert_parallel_example_runs(tmp_path):
    """examples/finetune_lora_ep.py under torchrun: the loss goes down, and its adapter on one process gives the
    expert-parallel model's logits."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "finetune_lora_ep.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={_free_port()}",
           str(script), "--steps", "6", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU run, on a machine with GPUs too
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    diff = re.search(r"logits differ by at most ([^, ]+)", r.stdout)
    assert diff and float(diff.group(1)) < 1e-4, r.stdout[-2000:]


def test_experts_sharded_over_a_2d_mesh_raise():
    """Only a 1-D expert-parallel mesh tells which adapter rows a rank runs; anything else is refused clearly."""
    from types import SimpleNamespace

    from moefuse.convert import StackedLora
    from moefuse.lora import _expert_parallel_rows

    lora = StackedLora(torch.zeros(4, 2, 3), torch.zeros(4, 5, 2))
    assert _expert_parallel_rows(torch.zeros(4, 5, 3), lora) is lora  # not sharded: every row
    param = SimpleNamespace(device_mesh=SimpleNamespace(ndim=2), placements=(SimpleNamespace(dim=0), object()))
    with pytest.raises(moefuse.MoefuseError, match="2-D device mesh is not supported"):
        _expert_parallel_rows(param, lora)
