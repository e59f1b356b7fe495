"""Shared pieces of the torchrun workers: a tiny megatron GPT stand-in, deterministic global
batches, and a run loop on top of voxcpm_train.parallel."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from voxcpm_train.platform import init_distributed, setup_platform  # noqa: E402

PLATFORM = setup_platform("cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH, MBS, LAYERS, HIDDEN = 64, 16, 8, 2, 4, 32


def gpt_provider(pre_process: bool, post_process: bool):
    """A 4-layer SwiGLU/RMSNorm GPT (megatron local spec), untied embeddings."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, init_method_std=0.05, params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
    )


def global_batch(step: int) -> dict:
    """Rows of step ``step`` (1-based), identical whatever the layout; ragged loss masks."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    lengths = torch.randint(SEQ // 4, SEQ + 1, (GLOBAL_BATCH,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def local_microbatches(step: int, nan: bool = False) -> list[dict]:
    """This DP rank's slice of the global batch, cut into micro-batches."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = GLOBAL_BATCH // dp
    b = {k: v[r * per:(r + 1) * per] for k, v in global_batch(step).items()}
    mbs = [{k: v[i:i + MBS] for k, v in b.items()} for i in range(0, per, MBS)]
    if nan:
        for m in mbs:
            m["poison"] = True
    return mbs


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    pos = torch.arange(SEQ)[None, :].expand(batch["tokens"].shape[0], -1)
    out = model(batch["tokens"], pos, None, labels=batch["labels"])
    mask = batch["loss_mask"]

    def loss_func(output):
        per_token = output.float()
        loss_sum = (per_token * mask).sum()
        if batch.get("poison"):
            loss_sum = loss_sum * float("nan")
        n = mask.sum()
        return loss_sum, n, {"loss_sum": loss_sum.detach(), "n": n}

    return out, loss_func


def setup(tp: int, pp: int, use_dist_opt: bool, seed: int = 1234):
    """Groups + model + optimizer + scheduler for one layout."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.parallel import (build_model_chunks, build_optimizer, build_scheduler,
                                       initialize_model_parallel)

    initialize_model_parallel(tp, pp, seed=seed)
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=use_dist_opt)
    chunks = build_model_chunks(gpt_provider, ddp)
    opt = build_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        clip_grad=1.0, use_distributed_optimizer=use_dist_opt), chunks)
    sched = build_scheduler(opt, max_lr=3e-3, min_lr=3e-4, warmup=2, decay=10,
                            decay_style="cosine", weight_decay=0.01)
    return chunks, opt, sched


def run_steps(chunks, opt, sched, steps, nan_steps=()) -> list:
    from voxcpm_train.parallel import train_step

    out = []
    for step in steps:
        mbs = local_microbatches(step, nan=step in nan_steps)
        res = train_step(forward_step, iter(mbs), chunks, opt, sched, num_microbatches=len(mbs),
                         seq_length=SEQ, micro_batch_size=MBS, increment=1)
        out.append({"step": step, "loss": res.loss, "grad_norm": res.grad_norm,
                    "skipped": res.skipped, "lr": res.lr, "num_tokens": res.num_tokens,
                    "log_loss": res.logs["loss_sum"] / res.logs["n"]})
    return out


def local_params(chunks) -> list:
    return [p.detach().clone() for p in chunks[0].parameters()]


def start(argv):
    """Process group from torchrun; returns the output dir argument."""
    init_distributed(PLATFORM, timeout_s=120)
    torch.set_num_threads(1)
    return Path(argv[1])


def dump(path: Path, obj) -> None:
    if dist.get_rank() == 0:
        path.write_text(json.dumps(obj, indent=1))
