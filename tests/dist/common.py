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
MODEL = os.environ.get("VOXCPM_TEST_MODEL", "voxcpm")  # voxcpm | gpt (megatron GPT stand-in)
T_VOX = 24  # positions per VoxCPM row; the schedule's seq_length is 2T


def voxcpm_provider(pre_process: bool, post_process: bool):
    from voxcpm_train.config.model import load_model_preset
    from voxcpm_train.model import VoxCPMModel

    return VoxCPMModel(load_model_preset("tiny"), pre_process=pre_process,
                       post_process=post_process)


def _voxcpm_sample(gen, P, D):
    """[text..., 101, audio x A, 102] or [103, ref x R, 104, text..., 101, audio x A, 102]."""
    text = lambda n: [5 + int(x) for x in torch.randint(0, 200, (n,), generator=gen)]
    a = int(torch.randint(2, 6, (), generator=gen))
    if int(torch.randint(0, 2, (), generator=gen)):
        parts = [("t", text(3) + [101]), ("target", a), ("t", [102])]
    else:
        parts = [("t", [103]), ("ref", 2), ("t", [104] + text(2) + [101]), ("target", a), ("t", [102])]
    f = {k: [] for k in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels")}
    feats = []
    for what, spec in parts:
        n = len(spec) if what == "t" else spec
        f["text_tokens"] += spec if what == "t" else [0] * n
        f["text_mask"] += [float(what == "t")] * n
        f["audio_mask"] += [float(what != "t")] * n
        f["loss_mask"] += [float(what == "target")] * n
        f["labels"] += [0] * (n - 1) + [int(what == "target")]
        feats.append(torch.zeros(n, P, D) if what == "t" else torch.randn(n, P, D, generator=gen))
    return f, torch.cat(feats)


def voxcpm_global_batch(step: int) -> dict:
    """GLOBAL_BATCH packed rows of T_VOX positions (micro-batch format of docs/architecture.md)."""
    P, D = 4, 64
    g = torch.Generator().manual_seed(2000 + step)
    rows = []
    for r in range(GLOBAL_BATCH):
        cols = {k: [] for k in ("text_tokens", "text_mask", "audio_mask", "loss_mask", "labels",
                                "position_ids", "segment_ids")}
        feats, seg = [], 0
        while True:
            f, x = _voxcpm_sample(g, P, D)
            n = len(f["text_tokens"])
            if len(cols["text_tokens"]) + n > T_VOX:
                break
            seg += 1
            for k in f:
                cols[k] += f[k]
            cols["position_ids"] += list(range(n))
            cols["segment_ids"] += [seg] * n
            feats.append(x)
        pad = T_VOX - len(cols["text_tokens"])
        for k in cols:
            cols[k] += [0] * pad
        feats.append(torch.zeros(pad, P, D))
        row = {k: torch.tensor(v, dtype=torch.float32 if "mask" in k else torch.long)
               for k, v in cols.items()}
        row["audio_feats"] = torch.cat(feats)
        rows.append(row)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["row_seeds"] = 10_000 * step + torch.arange(GLOBAL_BATCH)
    return batch


def voxcpm_forward_step(data_iterator, model):
    batch = next(data_iterator)
    poison = batch.pop("poison", False)
    out = model(batch)

    def loss_func(o):
        diff, stop = o["diff_sum"].float(), o["stop_sum"].float()
        loss_sum = diff + stop
        if poison:
            loss_sum = loss_sum * float("nan")
        n = o["num_loss_positions"]
        return loss_sum, n, {"loss_sum": loss_sum.detach(), "n": n, "diff_sum": diff.detach()}

    return out, loss_func


def gpt_provider(pre_process: bool, post_process: bool, dtype=torch.float32):
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
        use_cpu_initialization=True, init_method_std=0.05, params_dtype=dtype,
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
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
    full = voxcpm_global_batch(step) if MODEL == "voxcpm" else global_batch(step)
    b = {k: v[r * per:(r + 1) * per] for k, v in full.items()}
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


def setup(tp: int, pp: int, use_dist_opt: bool, seed: int = 1234, bf16: bool = False):
    """Groups + model + optimizer + scheduler for one layout (bf16: GPT with fp32 main params)."""
    import functools

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from voxcpm_train.parallel import (build_model_chunks, build_optimizer, build_scheduler,
                                       initialize_model_parallel)

    initialize_model_parallel(tp, pp, seed=seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=use_dist_opt,
                                        grad_reduce_in_fp32=bf16)
    provider = (voxcpm_provider if MODEL == "voxcpm"
                else functools.partial(gpt_provider, dtype=dtype))
    chunks = build_model_chunks(provider, ddp, param_dtype=dtype)
    opt = build_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        clip_grad=1.0, use_distributed_optimizer=use_dist_opt, bf16=bf16, params_dtype=dtype),
        chunks)
    sched = build_scheduler(opt, max_lr=3e-3, min_lr=3e-4, init_lr=1e-3, warmup=2, decay=10,
                            decay_style="cosine", weight_decay=0.01)
    return chunks, opt, sched


def run_steps(chunks, opt, sched, steps, nan_steps=()) -> list:
    from voxcpm_train.parallel import train_step

    out = []
    for step in steps:
        mbs = local_microbatches(step, nan=step in nan_steps)
        fwd, seq = ((voxcpm_forward_step, 2 * T_VOX) if MODEL == "voxcpm"
                    else (forward_step, SEQ))
        res = train_step(fwd, iter(mbs), chunks, opt, sched, num_microbatches=len(mbs),
                         seq_length=seq, micro_batch_size=MBS, increment=1)
        out.append({"step": step, "loss": res.loss, "grad_norm": res.grad_norm,
                    "skipped": res.skipped, "lr": res.lr, "num_tokens": res.num_tokens,
                    "log_loss": res.logs["loss_sum"] / res.logs["n"]})
    return out


def adam_state(chunks, opt) -> dict:
    """{param name: {param (fp32 main), exp_avg, exp_avg_sq, step}} flattened, for the local
    (fp32 or mixed-precision) and the distributed optimizer at DP=1 (a shard is the whole param)."""
    from itertools import chain

    from voxcpm_train.parallel import inner_optimizers, unwrap_model

    names = {p: n for n, p in unwrap_model(chunks[0]).named_parameters()}
    out = {}
    for o in inner_optimizers(opt):
        if hasattr(o, "model_param_group_index_map"):  # distributed optimizer
            pairs = [(p, o._get_main_param_and_optimizer_states(p)) for p in names
                     if p in o.model_param_group_index_map]
        else:
            if hasattr(o, "float16_groups"):
                mains = zip(chain(*o.float16_groups), chain(*o.fp32_from_float16_groups))
            else:
                mains = ((p, p) for g in o.optimizer.param_groups for p in g["params"])
            pairs = [(p, {"param": m, **o.optimizer.state[m]}) for p, m in mains]
        for p, st in pairs:
            out[names[p]] = {k: torch.as_tensor(v).detach().float().flatten().clone()
                             for k, v in st.items()}
    return out


def max_state_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    diffs = [0.0]
    for n in a:
        assert a[n].keys() == b[n].keys(), (n, a[n].keys(), b[n].keys())
        diffs += [float((a[n][k] - b[n][k]).abs().max()) for k in a[n]]
    return max(diffs)


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
