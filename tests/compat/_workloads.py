"""Small real megatron-core workloads for the compat tests, run in fresh processes.

    python tests/compat/_workloads.py [--exclude NAME,...] [--nproc N] [--import-first] PROBE...

Applies ``apply_cpu_compat(exclude=...)`` (before importing megatron-core, or after it with
``--import-first``), runs each probe on every rank of an N-process gloo group, and prints one line
``RESULT {"rank": r, "probe": p, "ok": bool, "value" | "error": ...}`` per probe and rank (the
first, probe "applied", lists the patches applied). The exit status is 1 if any probe failed or did
not run on any rank. Probes never raise out, so one failure does not hide another.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V, S, B = 128, 16, 2  # vocab, sequence length, micro batch size


_EXCLUDE: list = []


def _apply(exclude):
    sys.path.insert(0, ROOT)
    from megatron_tst.compat import apply_cpu_compat

    _EXCLUDE[:] = exclude
    return apply_cpu_compat(exclude=exclude)


def _init_parallel(tp=1, pp=1, ep=1, seed=1234):
    from megatron.core import parallel_state as ps, tensor_parallel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the training RNG tracker


class _SPLayerNorm(torch.nn.LayerNorm):
    """LayerNorm whose params carry ``sequence_parallel`` (megatron's WrappedTorchNorm refuses SP),
    so ``finalize_model_grads`` all-reduces their grads over TP."""

    def __init__(self, config, hidden_size, eps=1e-5):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def _gpt(num_experts=None, dispatcher="alltoall", sequence_parallel=False):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    # add_bias_linear=False: with biased experts 0.16.1 modifies a TP=1 pass-through view in place.
    moe = dict(num_moe_experts=num_experts, moe_router_topk=2, moe_token_dispatcher_type=dispatcher,
               add_bias_linear=False)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        sequence_parallel=sequence_parallel,
        **(moe if num_experts else {}),
    )
    spec = get_gpt_layer_local_spec(num_experts=num_experts)
    if sequence_parallel:
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = _SPLayerNorm
        spec = TransformerBlockSubmodules(layer_specs=[spec] * cfg.num_layers, layer_norm=_SPLayerNorm)
    model = GPTModel(
        cfg,
        spec,
        vocab_size=V,
        max_sequence_length=S,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",  # RoPE inv_freq is allocated on CUDA
    )
    return cfg, model


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        t = torch.randint(0, V, (B, S + 1), generator=g)
        yield dict(tokens=t[:, :-1], labels=t[:, 1:], position_ids=torch.arange(S).expand(B, S))


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _train(cfg, model, steps=2, distributed_optimizer=True):
    """megatron DDP + get_megatron_optimizer + get_forward_backward_func -> model, opt, losses."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    cfg.finalize_model_grads_func = finalize_model_grads  # DP grad all-reduce / reduce-scatter
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer
    )
    opt = get_megatron_optimizer(opt_cfg, [model])
    fwd_bwd, data, losses = get_forward_backward_func(), _batches(), []
    for _ in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        out = fwd_bwd(
            forward_step_func=_forward_step,
            data_iterator=data,
            model=[model],
            num_microbatches=2,
            seq_length=S,
            micro_batch_size=B,
        )
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0, (ok, grad_norm)
        losses.append([float(o["loss"]) for o in out])
    return model, opt, losses


# --- probes: each returns something JSON-able and raises on failure --------------------------


def probe_train_step():
    """DDP + distributed optimizer + forward_backward_no_pipelining, world size = nproc (DP)."""
    _init_parallel()
    return _train(*_gpt())[2]


def probe_tp2_train_step():
    _init_parallel(tp=2)
    return _train(*_gpt(), distributed_optimizer=False)[2]


def probe_tp2_sp_train_step():
    """TP=2 with sequence parallelism (reduce-scatter / all-gather in forward and backward)."""
    _init_parallel(tp=2)
    return _train(*_gpt(sequence_parallel=True))[2]


def probe_pp2_train_step():
    """PP=2: forward_backward_pipelining_without_interleaving (1F1B), p2p over gloo."""
    _init_parallel(pp=2)
    return _train(*_gpt())[2]


def probe_moe_train_step():
    """MoE GPT (4 experts, alltoall dispatcher, sequential experts); EP = nproc."""
    _init_parallel(ep=dist.get_world_size())
    return _train(*_gpt(num_experts=4), steps=1)[2]


def probe_moe_allgather_train_step():
    _init_parallel(ep=dist.get_world_size())
    return _train(*_gpt(num_experts=4, dispatcher="allgather"), steps=1)[2]


def probe_idempotent():
    """A second apply_cpu_compat() changes nothing: same names, one mode, one backward wrapper."""
    from torch.autograd.function import BackwardCFunction

    from megatron_tst.compat import apply_cpu_compat, cpu_compat_active

    stack, wrapper = torch._C._len_torch_function_stack(), BackwardCFunction.apply
    first = apply_cpu_compat(exclude=_EXCLUDE)
    assert apply_cpu_compat(exclude=_EXCLUDE) == first and cpu_compat_active()
    assert torch._C._len_torch_function_stack() == stack == 1
    assert BackwardCFunction.apply is wrapper
    return first


def probe_rng_tracker():
    """model_parallel_cuda_manual_seed + fork(): per-TP-rank streams, default stream untouched."""
    from megatron.core import tensor_parallel

    _init_parallel()
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draw(tp_rank):
        tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=tp_rank, force_reset_rng=True)
        before = torch.rand(3)
        with tracker.fork():
            inside = torch.rand(3)
        torch.manual_seed(0)
        with tracker.fork():  # the forked stream continues where it left off
            again = torch.rand(3)
        return before, inside, again

    b0, i0, a0 = draw(0)
    b1, i1, _ = draw(1)
    assert torch.equal(b0, b1), "the default stream must not depend on the TP rank"
    assert not torch.equal(i0, i1), "fork() must give a per-TP-rank stream"
    assert not torch.equal(i0, a0), "fork() must keep its own state between uses"
    return [float(i0[0]), float(i1[0])]


def probe_dist_checkpoint():
    """dist_checkpointing save + load of a GPT model and its distributed optimizer."""
    from megatron.core import dist_checkpointing

    _init_parallel()
    cfg, gpt = _gpt()
    model, opt, _ = _train(cfg, gpt, steps=1)  # torch AdamW has no state to save before a step
    md = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
          "chained_optim_avoid_prefix": True}

    def state(is_loading):
        sd = {"model": gpt.sharded_state_dict(metadata=md)}  # the unwrapped model, not DDP's
        sd["optimizer"] = opt.sharded_state_dict(sd["model"], is_loading=is_loading, metadata=md)
        return sd

    path = os.environ["COMPAT_CKPT_DIR"]
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(state(False), path)
    expected = gpt.embedding.word_embeddings.weight.detach().clone()
    with torch.no_grad():  # loading copies into leaf params in place
        gpt.embedding.word_embeddings.weight.zero_()
        loaded = dist_checkpointing.load(state(True), path)
        gpt.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
    assert torch.equal(gpt.embedding.word_embeddings.weight, expected)
    return sorted(os.listdir(path))[:3]


def _async_save(persistent: bool):
    """dist_checkpointing's asynchronous save of a GPT model through megatron's AsyncCallsQueue
    (a forked writer, or the persistent writer process): the weights change after the save is
    scheduled; the checkpoint holds them as they were at the save. The persistent writer saves
    twice through one ``SharedStaging`` (the project's use): the second save reuses the buffer
    of the first."""
    import inspect

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    _init_parallel()
    cfg, gpt = _gpt()
    kwargs = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"  # 0.19: megatron's own machinery, not NVRx
    queue = AsyncCallsQueue(persistent=persistent)
    try:
        return _save_twice(queue, gpt, persistent, kwargs)
    except BaseException:
        queue.close(abort=True)  # else the persistent writer (deaf to SIGTERM) outlives the probe
        raise


def _save_twice(queue, gpt, persistent: bool, kwargs: dict):
    import contextlib

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    from megatron_tst.compat.megatron_patches import SharedStaging

    weight = gpt.embedding.word_embeddings.weight
    staging = SharedStaging() if persistent else None
    for call in range(2 if persistent else 1):
        path = os.environ["COMPAT_CKPT_DIR"] + f"-async-{int(persistent)}-{call}"
        os.makedirs(path, exist_ok=True)
        with staging.active() if staging else contextlib.nullcontext():
            request = dist_checkpointing.save(gpt.sharded_state_dict(), path,
                                              get_default_save_sharded_strategy(), **kwargs)
        if persistent:  # the writer starts 2 s late: training has changed the weights by then
            request = request._replace(async_fn=functools.partial(_late, request.async_fn))
        queue.schedule_async_request(request)
        expected = weight.detach().clone()
        with torch.no_grad():
            weight.add_(1.0)  # training goes on while the writer writes
        assert queue.maybe_finalize_async_calls(blocking=True) == [call]
        with torch.no_grad():
            gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), path))
        assert torch.equal(weight, expected), (
            f"save {call + 1}: the checkpoint holds the weights of after the save")
        with torch.no_grad():
            weight.mul_(0.5)  # the next save's weights differ from this one's
    queue.close()
    return sorted(os.listdir(path))[:3]


def _late(write, *args, **kwargs):
    time.sleep(2)
    return write(*args, **kwargs)


def probe_async_dist_checkpoint():
    return _async_save(persistent=False)


def probe_persistent_async_dist_checkpoint():
    """The same through megatron's persistent writer process. Its loop is first run alone in a
    spawned process and told to stop: a loop that dies at start would leave the save waiting
    forever."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    ctx = mp.get_context("spawn")
    queues = (ctx.JoinableQueue(), ctx.JoinableQueue(), ctx.Queue())
    loop = ctx.Process(target=PersistentAsyncCaller.async_loop, args=(0, *queues))
    loop.start()
    queues[0].put("DONE")
    loop.join(timeout=300)
    if loop.exitcode != 0:
        loop.kill()
        raise RuntimeError(f"the persistent checkpoint writer process exited with "
                           f"{loop.exitcode}: it cannot start here")
    return _async_save(persistent=True)


PROBES = {k[len("probe_"):]: v for k, v in dict(globals()).items() if k.startswith("probe_")}


def _worker(rank, args, port, tmp):
    os.environ["COMPAT_CKPT_DIR"] = os.path.join(tmp, "ckpt")
    if args.import_first:
        import megatron.core.models.gpt  # noqa: F401  (megatron before the layer)
    applied = _apply([x for x in args.exclude.split(",") if x])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.nproc)
    results = [{"rank": rank, "probe": "applied", "ok": True, "value": applied}]
    with open(os.path.join(tmp, f"results.{rank}.json"), "w") as f:
        json.dump(results, f)  # recorded even if a probe then takes the process down
    for name in args.probes:
        try:
            result = {"ok": True, "value": PROBES[name]()}
        except BaseException as e:  # torch's CheckpointException derives from BaseException
            err = f"{type(e).__name__}: {e}"[:2000]
            frames = [f"{f.filename}:{f.name}" for f in traceback.extract_tb(e.__traceback__)]
            result = {"ok": False, "error": err, "frames": frames,
                      "traceback": traceback.format_exc()[-4000:]}
        results.append({"rank": rank, "probe": name, **result})
        with open(os.path.join(tmp, f"results.{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--exclude", default="")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--import-first", action="store_true")
    p.add_argument("probes", nargs="+", choices=sorted(PROBES))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.nproc == 1:
                _worker(0, args, _free_port(), tmp)
            else:
                import torch.multiprocessing as mp

                mp.spawn(_worker, args=(args, _free_port(), tmp), nprocs=args.nproc)
        finally:
            results = []
            for rank in range(args.nproc):
                path = os.path.join(tmp, f"results.{rank}.json")
                results += json.load(open(path)) if os.path.exists(path) else []
            for r in results:
                print("RESULT", json.dumps(r), flush=True)
    ran = {(r["rank"], r["probe"]) for r in results}
    complete = len(ran) == args.nproc * (len(args.probes) + 1)
    sys.exit(0 if complete and all(r["ok"] for r in results) else 1)


if __name__ == "__main__":  # required: dist_checkpointing spawns writer processes
    main()
