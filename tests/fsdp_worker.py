"""Run under torchrun by tests/test_fsdp.py: one FSDP2 training step of HMT (+ LoRA) vs one process on the same
global batch, then the adapter gathered and saved on rank 0. Prints one JSON line on rank 0."""

from __future__ import annotations

import copy
import json
import sys

import peft
import torch
import torch.distributed as dist

from hmt_adapter import HMTConfig
from hmt_adapter.integrations.fsdp import save_adapter, shard_model
from hmt_adapter.testing import tiny_causal_lm


def step(model, ids, checkpointing: bool):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def main(out_dir: str, checkpointing: bool, lora: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = HMTConfig(segment_length=8, num_sensory=2, recall_dim=8, **(dict(lora_r=2, lora_alpha=4) if lora else {}))
    model = peft.get_peft_model(tiny_causal_lm("llama"), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hmt_" in name:
                p.add_(0.05 * torch.randn_like(p))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(4, 128, (4, 29), generator=torch.Generator().manual_seed(1))  # 4 rows, 4 segments each

    reference = copy.deepcopy(model)  # one process, the whole global batch
    ref_loss = step(reference, ids, checkpointing)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
    ref_opt.step()

    shard_model(model)
    local = ids.chunk(world)[rank]
    loss = step(model, local, checkpointing).detach()
    dist.all_reduce(loss)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    save_adapter(model, out_dir)
    if rank == 0:
        reloaded = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), out_dir)
        ref_params = dict(reference.named_parameters())
        saved_diff = max((p - ref_params[n]).abs().max().item() for n, p in reloaded.named_parameters() if ".hmt_" in n)
        print(json.dumps({
            "ref_loss": ref_loss.item(), "fsdp_loss": loss.item() / world,
            "grad_names": sorted(ref_grads), "fsdp_grad_names": sorted(grads),
            "max_grad_diff": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()),
            "max_grad": max(g.abs().max().item() for g in ref_grads.values()),
            "saved_vs_reference_after_step": saved_diff,
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1")
