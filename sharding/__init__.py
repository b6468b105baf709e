"""Sharding on named meshes: TP, EP, TP+EP, attention-DP + EP, PP and DP.

    config.py    ParallelConfig (dp, pp, tp, ep, attention_dp, MoE comm/payload) + validation + Mesh
    rules.py     the one logical-axis -> mesh-axis rule table; param / cache / activation specs
    moe.py       expert parallelism with shard_map: all-to-all vs AG/RS, message-size model,
                 FP8 / NVFP4 dispatch payloads
    pipeline.py  DP + PP + attention-DP Llama forward (stages over "pp", microbatches moved with
                 ppermute, chunked pipeline prefill; the GPipe schedule shared with DeepSeek)
    model.py     shard_model(LoadedModel, ParallelConfig) -> ShardedModel (Llama)
    deepseek.py  DeepSeek-V3 forward under TP / EP / TP+EP / ADP+EP, and PP (with TP / EP / DP)

Typical use (one host)::

    from sharding.config import ParallelConfig
    from sharding.model import shard_model
    model = shard_model(load_model(path), ParallelConfig(tp=4))
    cache = model.create_cache(num_pages, page_size)          # placed on the mesh
    logits, cache = model.forward(model.params, tokens, cache, batch)

Multi-host: start every process with the same program and call, before anything touches a device,
``jax.distributed.initialize()`` (auto-detected under SLURM, Open MPI, Kubernetes/GKE, Cloud TPU), or
explicitly ``jax.distributed.initialize(coordinator_address="host0:8476", num_processes=N,
process_id=i)``. ``jax.devices()`` then lists every host's devices ordered by process, and
``ParallelConfig.make_mesh()`` lays them out as (dp, pp, ep, tp) with tp innermost, so keep
tp (and ep where possible) within one host's NVLink domain and put pp / dp across hosts
(e.g. 2 hosts x 8 GPUs: ``ParallelConfig(pp=2, tp=8)``). Every process passes the same host arrays to
``shard_model`` / ``jax.device_put`` (each keeps only its addressable shards), feeds identical step
inputs, and can read replicated outputs (logits) locally. Only one host is tested here.
"""
