"""Rows of the demo benchmark (4 MiniLM tasks, seed 0, cached fine-tunes and Fishers) for
chosen methods and parameters, scale chosen on validation: a quick study of EpiMer's
metric: projected and its damping without rerunning the whole benchmark.

    epimer demo --out demo-report        # fills the cache
    python benchmarks/projected_probe.py 1.0 '[["tsv_m", "tsv_m", {}], ["proj", "epimer", {"metric": "projected"}]]'

Arguments: rank_fraction, then a JSON list of [label, method, parameters]. Prints one JSON line
per row (validation and test accuracy averaged over tasks, the worst task, the chosen scale).
"""
import sys, time, json
from dataclasses import replace
import torch
torch.set_num_threads(2)
import epimer.bench.pipeline as P
from epimer.bench import artifacts
from epimer.bench.data import load_task
from epimer.cli_bench import _progress

rf = float(sys.argv[1])
variants = json.loads(sys.argv[2])
config = replace(P.DEMO, rank_fraction=rf)
progress = _progress(True)
model_path = artifacts.model_dir(); cache_root = artifacts.cache_dir()
data = {n: load_task(n) for n in config.tasks}
ctx, _ = P._prepare_seed(config, 0, model_path, data, cache_root, progress)
ft_test = {}
for m in ctx.models:
    ctx.evaluator.load(m.encoder)
    ft_test[m.task] = ctx.evaluator.accuracy(None, m.head, ctx.test[m.task])
unchanged = P.unchanged_tensors(ctx.base, [m.encoder for m in ctx.models])
for label, method, params in variants:
    t = time.time()
    spec = P.MethodSpec(label, method, {"rank_fraction": rf, **params}, True, method == "epimer")
    row = P._run_method(spec, ctx, config, unchanged, ft_test, progress)
    print(json.dumps({"label": label, "params": params, "scale": row["scale"], "val": round(row["val_avg"], 4),
                      "avg": round(row["avg"], 4), "worst": round(row["worst"], 4), "s": round(time.time() - t, 1)}), flush=True)
