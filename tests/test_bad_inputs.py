"""The bad-input and fault battery: every case through the real command line.

Each case corrupts a copy of a small, valid merge set-up (base, three task models, their
Fisher files, a config) or asks for something that cannot be done, runs an `epimer` command,
and asserts what a user is promised:

- exit code 2 (never 1, the internal-error code);
- exactly one message line, ``error: ...``, the last thing printed, naming the file or tensor;
- no traceback;
- nothing left beside OUT (no output, no hidden partial folder);
- every input byte-for-byte unchanged (sha256 before and after).

The race and signal cases run real processes and are marked slow (`.ci/run` runs them).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from epimer.cli import main
from epimer.io.fisher import save_fisher
from epimer.fingerprint import combine, tensor_blocks, tensor_fingerprints
from tests.conftest import random_models, write_folder

SHAPES = {
    "embed.weight": (40, 16),
    "layer.0.attn.weight": (16, 16),
    "layer.0.attn.bias": (16,),
    "layer.0.mlp.weight": (24, 16),
    "big.weight": (64, 64),  # more than 1024 values: the fingerprint must see past them
    "head.weight": (2, 16),
}


@dataclass
class World:
    """A valid merge set-up in ``root/work`` and an output path in ``root/dest``."""

    root: Path
    work: Path
    base: Path
    tasks: list[Path]
    fishers: list[Path]
    base_sd: dict[str, torch.Tensor]
    task_sds: list[dict[str, torch.Tensor]]
    out: Path

    def config(self, method: str = "task_arithmetic", parameters: dict | None = None, *, name: str = "c.yaml",
               fisher: bool = False, models: list | None = None, **extra: object) -> Path:
        data: dict = {
            "base_model": "base",
            "models": models if models is not None else [
                {"model": t.name, **({"fisher": f.name} if fisher else {})} for t, f in zip(self.tasks, self.fishers)
            ],
            "method": method,
            "parameters": parameters or {},
        }
        data.update(extra)
        path = self.work / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def raw_config(self, text: str | bytes, name: str = "c.yaml") -> Path:
        path = self.work / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def fisher_file(self, t: int, fisher: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor] | None = None,
                    name: str | None = None) -> Path:
        path = self.work / (name or f"task_{t}.fisher.safetensors")
        sd = model_sd if model_sd is not None else self.task_sds[t]
        per = tensor_fingerprints(fisher, lambda n: tuple(sd[n].shape), tensor_blocks(sd))
        save_fisher(path, fisher, num_samples=8, estimator="empirical", seed=0, fraction=1.0,
                    model_fingerprint=combine(per), tensor_fingerprints=per)
        return path


def make_world(tmp_path: Path) -> World:
    base, tasks = random_models(3, shapes=SHAPES)
    work = tmp_path / "work"
    bp = write_folder(work / "base", base)
    tps = [write_folder(work / f"task_{i}", t) for i, t in enumerate(tasks)]
    (work / "base" / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float32"}\n')
    w = World(tmp_path, work, bp, tps, [], base, tasks, tmp_path / "dest" / "out")
    g = torch.Generator().manual_seed(1)
    for t, sd in enumerate(tasks):
        fisher = {n: torch.rand(v.shape, generator=g) + 0.1 for n, v in sd.items() if v.is_floating_point()}
        w.fishers.append(w.fisher_file(t, fisher))
    return w


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def digest_tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under root (skipping ``skip``), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(*args: object) -> tuple[int, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(main, [str(a) for a in args], prog_name="epimer")
    shown = [str(w.message) for w in caught if "epimer" in str(w.filename) or "torch" in str(w.filename)]
    return res.exit_code, res.output + "".join(f"\nWARNING {m}" for m in shown)


def assert_one_error(code: int, output: str, needles: tuple[str, ...], want_code: int = 2) -> str:
    assert code == want_code, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert "WARNING" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def nothing_beside(out: Path, existed: bool) -> None:
    if not existed:
        assert not out.exists(), out
    if out.parent.is_dir():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name[:100]}.")]
        assert left == [], left


# ---------------------------------------------------------------------------- the cases

Setup = Callable[[World, pytest.MonkeyPatch], list[object]]


@dataclass
class Case:
    id: str
    setup: Setup
    needles: tuple[str, ...]


def merge_args(w: World, cfg: Path, *extra: object) -> list[object]:
    return ["merge", cfg, "-o", w.out, "-q", *extra]


def _save(path: Path, sd: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _edit_task(w: World, t: int, change: Callable[[dict], dict]) -> None:
    write_folder(w.tasks[t], change(dict(w.task_sds[t])))


def _header_patch(path: Path, patch: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    patch(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _overlap(h: dict) -> None:
    names = [k for k in h if k != "__metadata__"]
    a, b = names[0], names[1]
    # b's data starts inside a's, same length as before
    start = h[a]["data_offsets"][0] + 4
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [start, start + size]


def _negative_dim(h: dict) -> None:
    name = "layer.0.attn.bias"
    h[name]["shape"] = [-16]


def _sharded_index_lies(w: World) -> None:
    sd = w.task_sds[0]
    folder = w.tasks[0]
    (folder / "model.safetensors").unlink()
    names = list(sd)
    half = len(names) // 2
    _save(folder / "model-00001-of-00002.safetensors", {n: sd[n] for n in names[:half]})
    _save(folder / "model-00002-of-00002.safetensors", {n: sd[n] for n in names[half:]})
    wm = {n: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
          for i, n in enumerate(names)}
    wm["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


class Payload:
    """Anything a weights-only unpickler must refuse."""


def _evil_pickle(w: World) -> None:
    (w.tasks[1] / "model.safetensors").unlink()
    torch.save({**w.task_sds[1], "x": Payload()}, w.tasks[1] / "pytorch_model.bin")


def _fisher_v1(w: World) -> Path:
    from safetensors import safe_open

    path = w.work / "old.fisher.safetensors"
    with safe_open(str(w.fishers[0]), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["version"] = "1"
    save_file(tensors, str(path), metadata=meta)
    return path


def _config_with(w: World, models: list[dict], method: str = "epimer", **kw: object) -> Path:
    return w.config(method, models=models, **kw)


def _fisher_models(w: World, replace: dict[int, Path]) -> list[dict]:
    return [{"model": t.name, "fisher": str(replace.get(i, f).relative_to(w.work) if replace.get(i, f).is_relative_to(
        w.work) else replace.get(i, f))} for i, (t, f) in enumerate(zip(w.tasks, w.fishers))]


def _fisher_values(w: World, t: int, edit: Callable[[dict], None]) -> Path:
    fisher = {n: torch.rand(v.shape) + 0.1 for n, v in w.task_sds[t].items() if v.is_floating_point()}
    edit(fisher)
    return w.fisher_file(t, fisher, name=f"edited_{t}.fisher.safetensors")


def _set(d: dict, name: str, index: tuple[int, ...], value: float) -> None:
    v = d[name].clone()
    v[index] = value
    d[name] = v


def _changed_after_1024(w: World) -> Path:
    """A task model equal to task 0 in the first 1024 values of every tensor, different after;
    the Fisher file of task 0 must be refused for it."""
    sd = dict(w.task_sds[0])
    v = sd["big.weight"].clone()
    v[40, 7] += 0.5  # flat index 2567
    sd["big.weight"] = v
    other = w.work / "task_0_changed"
    write_folder(other, sd)
    return other


def _no_space(w: World, mp: pytest.MonkeyPatch) -> None:
    from epimer.io import writer

    real = writer.CheckpointWriter.write

    def write(self, name, tensor):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "model.safetensors"))

    mp.setattr(writer.CheckpointWriter, "write", write)
    assert real is not None


def _read_only(mp: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system")

    mp.setattr(tempfile, "TemporaryFile", refuse)


def _fisher_cmd(w: World, *extra: object, data: bytes | None = None) -> list[object]:
    """`epimer fisher` on a classifier folder (a config.json is all these cases reach)."""
    transformers = pytest.importorskip("transformers")
    model = w.work / "clf"
    transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8, num_labels=2).save_pretrained(model)
    f = w.work / "train.jsonl"
    f.write_bytes(data if data is not None else b'{"text": "good", "label": 1}\n')
    w.out = w.root / "dest" / "clf.fisher.safetensors"
    return ["fisher", "--model", model, "--data", f, "--out", w.out, "-q", *extra]


def _basis_for(w: World) -> None:
    """A valid basis file of the world's models, b.safetensors beside the config."""
    cfg = w.config("epimer", {"metric": "projected"}, fisher=True, basis="b.safetensors", name="for_basis.yaml")
    code, out = run_cli("basis", cfg, "-q")
    assert code == 0, out


def _data_config(w: World, *, data: str = "train.jsonl", raw: bytes | None = None, fisher: bool = False,
                 method: str = "epimer", **extra: object) -> Path:
    """A config whose models name their training data (the merge estimates their curvature);
    the task folders get a sequence classifier's config.json (all the data checks read)."""
    transformers = pytest.importorskip("transformers")
    for t in w.tasks:
        transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, num_labels=2).save_pretrained(t)
    (w.work / "train.jsonl").write_bytes(raw if raw is not None else b'{"text": "good", "label": 1}\n')
    models = [{"model": t.name, "data": data, **({"fisher": f.name} if fisher else {})}
              for t, f in zip(w.tasks, w.fishers)]
    return w.config(method, models=models, **extra)


def _lm_cmd(w: World, rows: list, *extra: object, chat: bool = True, suffix: str = ".jsonl") -> list[object]:
    """`epimer fisher --task causal-lm` on a tiny Llama folder and a data file of ``rows``."""
    pytest.importorskip("transformers")
    from tests.curvature.test_causal_lm import tiny_llama, tiny_tokenizer

    model = w.work / "lm"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer(chat=chat).save_pretrained(model)
    f = w.work / f"lm_data{suffix}"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    w.out = w.root / "dest" / "lm.fisher.safetensors"
    return ["fisher", "--task", "causal-lm", "--model", model, "--data", f, "--out", w.out, "-q", *extra]


def _import_cmd(w: World, edit: Callable[[dict], None] | None = None, *extra: object) -> list[object]:
    """`epimer import-fisher` of task 0 with a values file made by "another tool"."""
    values = {n: torch.rand(v.shape) for n, v in w.task_sds[0].items() if v.is_floating_point()}
    if edit is not None:
        edit(values)
    path = w.work / "other_tool.safetensors"
    save_file({k: v.contiguous() for k, v in values.items()}, str(path))
    w.out = w.root / "dest" / "imported.fisher.safetensors"
    return ["import-fisher", "--model", w.tasks[0], "--values", path, "--out", w.out, "--num-samples", "10", "-q",
            *extra]


def _head_cmd(w: World, tensors: dict | None, *extra: object, metadata: dict | None = None) -> list[object]:
    """`epimer fisher --task encoder-head` with a head file of ``tensors`` (None: no file)."""
    head = w.work / "head.safetensors"
    if tensors is not None:
        save_file(tensors, str(head), metadata=metadata)
    return [*_fisher_cmd(w), "--task", "encoder-head", "--head", head, *extra]


def _image_cmd(w: World, task: str, layout: str, *extra: object) -> list[object]:
    """`epimer fisher` on an image model's config (all the data checks read) and image data
    laid out as ``layout``: "folder", "one-class", "empty-class", "jsonl-missing", "jsonl-garbage"."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    model = w.work / "vision_model"
    if task == "clip-zero-shot":
        transformers.CLIPConfig().save_pretrained(model)
    else:
        transformers.ViTConfig(num_labels=2, label2id={"a": 0, "b": 1}, id2label={0: "a", 1: "b"}).save_pretrained(model)
    data = w.work / "images"
    classes = {"folder": ["a", "b"], "one-class": ["a"], "empty-class": ["a", "b"]}.get(layout, [])
    for c in classes:
        (data / c).mkdir(parents=True, exist_ok=True)
        if not (layout == "empty-class" and c == "b"):
            Image.new("RGB", (4, 4)).save(data / c / "0.png")
    if layout.startswith("jsonl"):
        data = w.work / "images.jsonl"
        (w.work / "garbage.png").write_bytes(b"not an image")
        image = "garbage.png" if layout == "jsonl-garbage" else "nowhere.png"
        data.write_text(json.dumps({"image": image, "label": "a"}) + "\n")
    w.out = w.root / "dest" / "img.fisher.safetensors"
    return ["fisher", "--task", task, "--model", model, "--data", data, "--out", w.out, "-q", *extra]


def _gguf_file(w: World, arch: str, tensor: str) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(w.work / "x.gguf"), arch)
    writer.add_head_count(2)
    writer.add_tensor(tensor, np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w.work / "x.gguf"


def _lines(w: World, name: str, text: str) -> Path:
    (w.work / name).write_text(text)
    return w.work / name


def _adapter(w: World, config: dict | None = None, tensors: dict | None = None, raw: str | None = None) -> list:
    """A merge whose first model is a hand-written PEFT LoRA adapter folder on the world's base."""
    folder = w.work / "adapter"
    folder.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["attn"], **(config or {})}
    (folder / "adapter_config.json").write_text(raw if raw is not None else json.dumps(cfg))
    if tensors is None:
        tensors = {"base_model.model.layer.0.attn.lora_A.weight": torch.ones(2, 16),
                   "base_model.model.layer.0.attn.lora_B.weight": torch.ones(16, 2)}
    if tensors:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return merge_args(w, w.config(models=[{"model": "adapter"}, {"model": "task_1"}]))


def _missing_transformers(mp: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    mp.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "transformers" else real(name, *a, **k))


CASES: list[Case] = [
    # -------------------------------------------------------------- config file
    Case("config-missing", lambda w, mp: merge_args(w, w.work / "nope.yaml"), ("nope.yaml", "not found")),
    Case("config-not-utf8", lambda w, mp: merge_args(w, w.raw_config(b"base_model: \xff\xfe\n")),
         ("c.yaml", "UTF-8")),
    Case("config-yaml-syntax", lambda w, mp: merge_args(w, w.raw_config("base_model: a\nmodels: [\n  - model: b\n")),
         ("c.yaml", "line", "YAML")),
    Case("config-duplicate-key", lambda w, mp: merge_args(w, w.raw_config(
        "base_model: base\nmodels: [task_0]\nmethod: ties\nmethod: task_arithmetic\n")), ("c.yaml", "'method'", "twice")),
    Case("config-top-level-typo", lambda w, mp: merge_args(w, w.raw_config(
        "base_model: base\nmodels: [task_0]\nmethods: ties\n")), ("c.yaml", "methods", "did you mean 'method'")),
    Case("config-not-a-mapping", lambda w, mp: merge_args(w, w.raw_config("- a\n- b\n")), ("c.yaml", "mapping")),
    Case("config-models-not-a-list", lambda w, mp: merge_args(w, w.raw_config(
        "base_model: base\nmodels: 5\nmethod: ties\n")), ("c.yaml", "models")),
    Case("config-model-entry-number", lambda w, mp: merge_args(w, w.raw_config(
        "base_model: base\nmodels: [3]\nmethod: ties\n")), ("c.yaml", "models.0", "a path or a mapping")),
    Case("config-unknown-method", lambda w, mp: merge_args(w, w.config("tie")), ("c.yaml", "'tie'", "ties")),
    Case("config-unknown-parameter", lambda w, mp: merge_args(w, w.config("ties", {"densty": 0.3})),
         ("c.yaml", "densty", "density")),
    Case("config-density-out-of-range", lambda w, mp: merge_args(w, w.config("ties", {"density": 1.5})),
         ("c.yaml", "density", "1.5")),
    Case("config-scale-nan", lambda w, mp: merge_args(w, w.config("task_arithmetic", {"scale": float("nan")})),
         ("c.yaml", "scale", "finite")),
    Case("config-scale-inf", lambda w, mp: merge_args(w, w.config("ties", {"scale": float("inf")})),
         ("c.yaml", "scale", "finite")),
    Case("config-weight-inf", lambda w, mp: merge_args(w, w.config(models=[
        {"model": "task_0", "weight": float("inf")}, {"model": "task_1"}])), ("c.yaml", "weight", "finite")),
    Case("config-eps-inf", lambda w, mp: merge_args(w, w.config("fisher_average", {"eps": float("inf")}, fisher=True)),
         ("c.yaml", "eps", "finite")),
    Case("config-scale-word", lambda w, mp: merge_args(w, w.config("ties", {"scale": "big"})),
         ("c.yaml", "'scale' = 'big'", "number", "'auto'")),
    Case("config-fisher-rank-zero", lambda w, mp: merge_args(w, w.config("epimer", {"fisher_rank": 0}, fisher=True)),
         ("c.yaml", "fisher_rank", "'exact'", "greater than or equal to 1")),
    Case("config-metric-dtype-exact", lambda w, mp: merge_args(w, w.config(
        "epimer", {"metric_dtype": "bfloat16", "fisher_rank": "exact"}, fisher=True)),
         ("c.yaml", "metric_dtype", "factored metric only")),
    Case("config-metric-dtype-float16", lambda w, mp: merge_args(w, w.config(
        "epimer", {"metric_dtype": "float16"}, fisher=True)), ("c.yaml", "metric_dtype", "'bfloat16'")),
    Case("config-svd-unknown", lambda w, mp: merge_args(w, w.config("tsv_m", {"svd": "lanczos"})),
         ("c.yaml", "svd", "'randomized'")),
    Case("config-svd-iterations-without-randomized", lambda w, mp: merge_args(w, w.config(
        "tsv_m", {"svd_iterations": 4})), ("c.yaml", "svd_iterations", "svd: randomized only")),
    Case("config-iso-cts-svd-oversample-without-randomized", lambda w, mp: merge_args(w, w.config(
        "iso_cts", {"svd_oversample": 4})), ("c.yaml", "svd_oversample", "svd: randomized only")),
    Case("config-svd-oversample-zero", lambda w, mp: merge_args(w, w.config(
        "tsv_m", {"svd": "randomized", "svd_oversample": 0})), ("c.yaml", "svd_oversample", "greater than or equal to 1")),
    Case("config-negative-weight", lambda w, mp: merge_args(w, w.config(models=[
        {"model": "task_0", "weight": -1}, {"model": "task_1"}])), ("c.yaml", "weight", "greater than 0")),
    Case("config-bad-regex", lambda w, mp: merge_args(w, w.config(exclude=["(unclosed"])), ("c.yaml", "exclude")),
    # -------------------------------------------------------------- checkpoint files
    Case("base-missing", lambda w, mp: (shutil.rmtree(w.base), merge_args(w, w.config()))[1], ("base", "no such")),
    Case("model-symlink-loop", lambda w, mp: (os.symlink("loop", w.work / "loop"), merge_args(w, w.config(models=[
        {"model": "loop"}, {"model": "task_1"}])))[1], ("loop", "symlink")),
    Case("safetensors-truncated", lambda w, mp: (
        (w.tasks[1] / "model.safetensors").write_bytes((w.tasks[1] / "model.safetensors").read_bytes()[:-100]),
        merge_args(w, w.config()))[1], ("task_1", "truncated")),
    Case("safetensors-header-garbage", lambda w, mp: (
        (w.tasks[2] / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{not}" + b"\0" * 64),
        merge_args(w, w.config()))[1], ("task_2", "model.safetensors")),
    Case("safetensors-overlapping-offsets", lambda w, mp: (
        _header_patch(w.tasks[0] / "model.safetensors", _overlap), merge_args(w, w.config()))[1],
        ("task_0", "overlap")),
    Case("safetensors-negative-dimension", lambda w, mp: (
        _header_patch(w.tasks[0] / "model.safetensors", _negative_dim), merge_args(w, w.config()))[1],
        ("task_0", "layer.0.attn.bias")),
    Case("shard-index-lists-ghost-tensor", lambda w, mp: (_sharded_index_lies(w), merge_args(w, w.config()))[1],
         ("model.safetensors.index.json", "ghost.weight")),
    Case("shard-missing", lambda w, mp: (_sharded_index_lies(w),
                                         (w.tasks[0] / "model-00002-of-00002.safetensors").unlink(),
                                         merge_args(w, w.config()))[2], ("index.json", "model-00002-of-00002")),
    Case("pickle-not-weights-only", lambda w, mp: (_evil_pickle(w), merge_args(w, w.config()))[1],
         ("pytorch_model.bin", "refused", "Payload")),
    Case("unknown-checkpoint-format", lambda w, mp: ((w.work / "x.ggml").write_bytes(b"GGML"), merge_args(
        w, w.config(models=[{"model": "x.ggml"}, {"model": "task_1"}])))[1], ("x.ggml", "format")),
    Case("gguf-garbage", lambda w, mp: ((w.work / "x.gguf").write_bytes(b"GGUF" + bytes(20)), merge_args(
        w, w.config(models=[{"model": "x.gguf"}, {"model": "task_1"}])))[1], ("x.gguf", "not a readable GGUF")),
    Case("gguf-architecture-unsupported", lambda w, mp: (_gguf_file(w, "gpt2", "token_embd.weight"), merge_args(
        w, w.config(models=[{"model": "x.gguf"}, {"model": "task_1"}])))[1], ("x.gguf", "'gpt2' is not supported")),
    Case("gguf-tensor-unnamed", lambda w, mp: (_gguf_file(w, "llama", "blk.0.attn_qkv.weight"), merge_args(
        w, w.config(models=[{"model": "x.gguf"}, {"model": "task_1"}])))[1], ("x.gguf", "'blk.0.attn_qkv.weight'")),
    Case("gguf-without-the-package", lambda w, mp: ((w.work / "x.gguf").write_bytes(b"GGUF"),
                                                    mp.setitem(sys.modules, "gguf", None), merge_args(
        w, w.config(models=[{"model": "x.gguf"}, {"model": "task_1"}])))[2], ("gguf", "pip install 'epimer[gguf]'")),
    # -------------------------------------------------------------- tensors
    Case("tensor-missing-from-task", lambda w, mp: (_edit_task(w, 0, lambda sd: {
        k: v for k, v in sd.items() if k != "layer.0.mlp.weight"}), merge_args(w, w.config()))[1],
        ("task_0", "'layer.0.mlp.weight'", "missing")),
    Case("task-names-carry-prefix", lambda w, mp: (_edit_task(w, 1, lambda sd: {
        ("bert." + k if k != "position_ids" else k): v for k, v in sd.items()}), merge_args(w, w.config()))[1],
        ("task_1", "extra prefix 'bert.'")),
    Case("tensor-shape-mismatch", lambda w, mp: (_edit_task(w, 1, lambda sd: {
        **sd, "layer.0.attn.weight": torch.zeros(16, 15)}), merge_args(w, w.config()))[1],
        ("task_1", "layer.0.attn.weight", "[16, 15]")),
    Case("tensor-integer-dtype", lambda w, mp: (_edit_task(w, 0, lambda sd: {
        **sd, "layer.0.attn.bias": torch.zeros(16, dtype=torch.int32)}), merge_args(w, w.config()))[1],
        ("task_0", "layer.0.attn.bias", "int32")),
    Case("tensor-nan", lambda w, mp: (_edit_task(w, 2, lambda sd: (_set(sd, "big.weight", (3, 4), float("nan")), sd)[1]),
                                      merge_args(w, w.config()))[1], ("task_2", "big.weight", "NaN/Inf")),
    Case("extra-tensor-strict", lambda w, mp: (_edit_task(w, 2, lambda sd: {**sd, "extra.weight": torch.zeros(3)}),
                                               merge_args(w, w.config(), "--strict"))[1],
         ("task_2", "extra.weight", "--strict")),
    Case("float16-overflow", lambda w, mp: merge_args(w, w.config("task_arithmetic", {"scale": 1e6}, dtype="float16")),
         ("tensor", "float16", "NaN/Inf")),
    Case("scale-overflows-float32", lambda w, mp: merge_args(w, w.config("ties", {"scale": 1e39})),
         ("tensor", "NaN/Inf", "--allow-nonfinite")),
    # -------------------------------------------------------------- Fisher files
    Case("fisher-missing-for-epimer", lambda w, mp: merge_args(w, w.config("epimer")), ("task_0", "Fisher file")),
    Case("fisher-negative", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {1: _fisher_values(
        w, 1, lambda f: _set(f, "layer.0.mlp.weight", (2, 2), -1.0))}))), ("edited_1", "layer.0.mlp.weight", "negative")),
    Case("fisher-negative-fisher-average", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {
        1: _fisher_values(w, 1, lambda f: _set(f, "big.weight", (2, 2), -1.0))}), "fisher_average")),
        ("edited_1", "big.weight", "negative")),
    Case("fisher-nan", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {2: _fisher_values(
        w, 2, lambda f: _set(f, "embed.weight", (0, 0), float("nan")))}))), ("edited_2", "embed.weight", "NaN")),
    Case("fisher-huge-values", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {0: _fisher_values(
        w, 0, lambda f: f.update({k: v * 1e38 for k, v in f.items()}))}))), ("edited_0", "Fisher", "values up to")),
    Case("fisher-of-model-equal-in-first-1024-values", lambda w, mp: merge_args(w, _config_with(w, [
        {"model": "task_0_changed", "fisher": w.fishers[0].name}] + _fisher_models(w, {})[1:]) if _changed_after_1024(w)
        else None), ("task_0.fisher.safetensors", "differ", "'big.weight'")),
    Case("fisher-missing-tensors-all-listed", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {
        0: _fisher_values(w, 0, lambda f: [f.pop(k) for k in ("big.weight", "head.weight")])}))),
        ("edited_0", "2 tensor(s)", "'big.weight'", "'head.weight'")),
    Case("fisher-plain-safetensors", lambda w, mp: (_save(w.work / "plain.safetensors", w.task_sds[0]), merge_args(
        w, _config_with(w, _fisher_models(w, {0: w.work / "plain.safetensors"}))))[1], ("plain.safetensors", "not an epimer Fisher")),
    Case("fisher-format-version-1", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {0: _fisher_v1(w)}))),
         ("old.fisher.safetensors", "version", "1024")),
    Case("fisher-of-other-task", lambda w, mp: merge_args(w, _config_with(w, _fisher_models(w, {0: w.fishers[1]}))),
         ("task_1.fisher.safetensors", "differ")),
    # -------------------------------------------------------------- output location
    Case("out-is-config-folder-overwrite", lambda w, mp: (os.chdir(w.work), ["merge", "c.yaml", "-o", ".", "--overwrite", "-q"]
                                                          if w.config() else [])[1], ("current directory",)),
    Case("out-is-base-overwrite", lambda w, mp: ["merge", w.config(), "-o", w.base, "--overwrite", "-q"],
         ("is the base model", "base")),
    Case("out-holds-the-models-overwrite", lambda w, mp: ["merge", w.config(), "-o", w.work, "--overwrite", "-q"],
         ("contains the base model",)),
    Case("out-inside-base", lambda w, mp: ["merge", w.config(), "-o", w.base / "merged", "-q"],
         ("lies inside the base model",)),
    Case("out-is-fisher-file", lambda w, mp: ["merge", w.config("epimer", fisher=True), "-o", w.fishers[2],
                                              "--overwrite", "-q"], ("is the Fisher file of model 3",)),
    Case("out-is-ancestor-of-cwd", lambda w, mp: (os.chdir(w.tasks[0]), ["merge", w.config(), "-o", w.root,
                                                                         "--overwrite", "-q"])[1], ("current directory",)),
    Case("out-exists", lambda w, mp: (w.out.mkdir(parents=True), (w.out / "keep.txt").write_text("precious"),
                                      merge_args(w, w.config()))[2], ("out", "--overwrite")),
    Case("out-under-a-file", lambda w, mp: ((w.root / "afile").write_text("x"),
                                            ["merge", w.config(), "-o", w.root / "afile" / "out", "-q"])[1],
         ("afile", "file")),
    Case("out-read-only", lambda w, mp: (_read_only(mp), merge_args(w, w.config()))[1], ("dest", "Read-only")),
    Case("out-disk-full", lambda w, mp: (_no_space(w, mp), merge_args(w, w.config()))[1],
         ("model.safetensors", "No space left")),
    # -------------------------------------------------------------- epimer fisher
    Case("fisher-data-not-utf8", lambda w, mp: _fisher_cmd(w, data=b'{"text": "caf\xe9", "label": 1}\n'),
         ("train.jsonl:1", "UTF-8")),
    Case("fisher-out-exists", lambda w, mp: (lambda args: (w.out.parent.mkdir(parents=True), w.out.write_text("keep"),
                                                          args)[2])(_fisher_cmd(w)), ("clf.fisher.safetensors", "--overwrite")),
    Case("fisher-out-under-a-file", lambda w, mp: (lambda args: ((w.root / "afile").write_text("x"),
                                                                args[:-2] + [w.root / "afile" / "f.safetensors", "-q"])[1])(
        _fisher_cmd(w)), ("afile", "is a file")),
    Case("fisher-out-is-the-data", lambda w, mp: (lambda args: args[:-2] + [w.work / "train.jsonl", "-q", "--overwrite"])(
        _fisher_cmd(w)), ("train.jsonl",)),
    Case("fisher-needs-transformers", lambda w, mp: (_missing_transformers(mp), _fisher_cmd(w))[1],
         ("transformers", "pip install 'epimer[hf]'")),
    Case("fisher-threads-zero", lambda w, mp: _fisher_cmd(w, "--threads", "0"), ("--threads", "epimer fisher --help")),
    Case("merge-shard-size-word", lambda w, mp: merge_args(w, w.config(), "--shard-size", "lots"), ("lots", "2GB")),
    # -------------------------------------------------------------- metric: projected and basis files
    Case("config-basis-without-projected", lambda w, mp: merge_args(w, w.config("ties", basis="b.safetensors")),
         ("c.yaml", "basis", "remove it")),
    Case("config-projected-without-basis", lambda w, mp: merge_args(w, w.config("epimer", {"metric": "projected"},
                                                                               fisher=True)),
         ("c.yaml", "metric: projected needs `basis: PATH`")),
    Case("basis-file-not-a-basis", lambda w, mp: merge_args(w, w.config("epimer", {"metric": "projected"}, fisher=True,
                                                                       basis="task_0/model.safetensors")),
         ("task_0/model.safetensors", "not an epimer basis file")),
    Case("projected-metrics-missing", lambda w, mp: (_basis_for(w), merge_args(w, w.config(
        "epimer", {"metric": "projected"}, fisher=True, basis="b.safetensors")))[1],
        ("task_0.fisher.safetensors", "holds no projected metrics", "epimer fisher --basis")),
    Case("config-damping-zero", lambda w, mp: merge_args(w, w.config("epimer", {"metric": "projected", "damping": 0},
                                                                    fisher=True, basis="b.safetensors")),
         ("c.yaml", "damping", "greater than 0")),
    Case("config-metric-unknown", lambda w, mp: merge_args(w, w.config("epimer", {"metric": "full"}, fisher=True)),
         ("c.yaml", "metric", "'diagonal'", "'projected'")),
    Case("basis-out-exists", lambda w, mp: ["basis", w.config("tsv_m"), "-o", w.fishers[0], "-q"],
         ("task_0.fisher.safetensors", "already exists")),
    Case("basis-out-is-an-input", lambda w, mp: ["basis", w.config("tsv_m"), "-o", w.base / "b.safetensors", "-q"],
         ("lies inside the base model",)),
    Case("fisher-basis-not-a-basis", lambda w, mp: _fisher_cmd(w, "--basis", w.fishers[0]),
         ("task_0.fisher.safetensors", "not an epimer basis file")),
    # -------------------------------------------------------------- `data:`: the merge estimates curvature
    Case("merge-data-missing", lambda w, mp: merge_args(w, _data_config(w, data="nope.jsonl")), ("nope.jsonl",)),
    Case("merge-data-not-utf8", lambda w, mp: merge_args(w, _data_config(w, raw=b"\xff\xfe{")),
         ("train.jsonl",)),
    Case("merge-data-and-fisher", lambda w, mp: merge_args(w, _data_config(w, fisher=True)),
         ("c.yaml", "task_0", "not both")),
    Case("merge-data-for-a-flat-method", lambda w, mp: merge_args(w, _data_config(w, method="task_arithmetic")),
         ("c.yaml", "`data:` is read only", "remove it")),
    Case("merge-curvature-typo", lambda w, mp: merge_args(w, _data_config(w, curvature={"fracton": 0.5})),
         ("c.yaml", "curvature.fracton", "did you mean 'fraction'")),
    Case("merge-curvature-fraction-zero", lambda w, mp: merge_args(w, _data_config(w, curvature={"fraction": 0})),
         ("c.yaml", "curvature.fraction")),
    Case("merge-curvature-without-data", lambda w, mp: merge_args(w, w.config("epimer", fisher=True,
                                                                             curvature={"fraction": 0.5})),
         ("c.yaml", "no model has `data:`")),
    Case("merge-data-model-not-a-classifier", lambda w, mp: (cfg := _data_config(w), (w.tasks[1] / "config.json")
                                                             .write_text('{"model_type": "toy"}'), merge_args(w, cfg))[2],
         ("task_1",)),
    Case("merge-data-weights-not-the-classifier", lambda w, mp: merge_args(w, _data_config(w)),
         ("task_0", "would be initialised at random")),
    Case("merge-data-needs-transformers", lambda w, mp: (_missing_transformers(mp), merge_args(w, _data_config(w)))[1],
         ("transformers", "pip install 'epimer[hf]'")),
    Case("merge-curvature-dir-is-a-file", lambda w, mp: merge_args(w, _data_config(w), "--curvature-dir", w.fishers[0]),
         ("task_0.fisher.safetensors", "is a file")),
    Case("merge-curvature-dir-in-the-base", lambda w, mp: merge_args(w, _data_config(w), "--curvature-dir",
                                                                     w.base / "curv"), ("--curvature-dir", "base")),
    Case("merge-curvature-dir-without-data", lambda w, mp: merge_args(w, w.config("epimer", fisher=True),
                                                                      "--curvature-dir", w.root / "curv"),
         ("c.yaml", "--curvature-dir", "no model has it")),
    # -------------------------------------------------------------- epimer fisher --task causal-lm
    Case("lm-sample-of-no-shape", lambda w, mp: _lm_cmd(w, [{"text": "hello"}, {"body": "hello"}]),
         ("lm_data.jsonl:2", "exactly one of `text`, `prompt` + `completion` or `messages`")),
    Case("lm-sample-of-two-shapes", lambda w, mp: _lm_cmd(w, [{"text": "hello", "prompt": "a", "completion": "b"}]),
         ("lm_data.jsonl:1", "more than one")),
    Case("lm-messages-without-assistant", lambda w, mp: _lm_cmd(w, [{"messages": [{"role": "user", "content": "a"}]}]),
         ("lm_data.jsonl:1", "no assistant turn")),
    Case("lm-messages-not-a-list", lambda w, mp: _lm_cmd(w, [{"messages": "hello"}]),
         ("lm_data.jsonl:1", "`messages` must be")),
    Case("lm-messages-without-chat-template", lambda w, mp: _lm_cmd(
        w, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], chat=False),
        ("lm_data.jsonl:1", "no chat template")),
    Case("lm-completion-not-text", lambda w, mp: _lm_cmd(w, [{"prompt": "a", "completion": 3}]),
         ("lm_data.jsonl:1", "'completion'", "expected text")),
    Case("lm-no-target-within-max-length", lambda w, mp: _lm_cmd(
        w, [{"prompt": "hello world the cat", "completion": "sat"}], "--max-length", "3"),
        ("lm_data.jsonl:1", "no target token within the first 3")),
    Case("lm-data-as-csv", lambda w, mp: _lm_cmd(w, ["text", "hello"], suffix=".csv"),
         ("lm_data.csv", ".jsonl")),
    Case("lm-as-a-classifier", lambda w, mp: [a if a != "causal-lm" else "sequence-classification"
                                              for a in _lm_cmd(w, [{"text": "hello", "label": 1}])],
         ("lm", "initialised at random", "--task causal-lm")),
    Case("fisher-device-cuda-without-cuda", lambda w, mp: (mp.setattr(torch.cuda, "is_available", lambda: False),
                                                           _lm_cmd(w, [{"text": "hello"}], "--device", "cuda"))[1],
         ("--device cuda", "not available")),
    # -------------------------------------------------------------- epimer fisher --task encoder-head
    Case("head-missing", lambda w, mp: _head_cmd(w, None), ("head.safetensors", "not found")),
    Case("head-without-weight", lambda w, mp: _head_cmd(w, {"w": torch.ones(2, 8)}),
         ("head.safetensors", "`weight`", "['w']")),
    Case("head-width-differs", lambda w, mp: _head_cmd(w, {"weight": torch.ones(2, 5)}),
         ("head.safetensors", "5 columns", "hidden size is 8")),
    Case("head-bias-shape", lambda w, mp: _head_cmd(w, {"weight": torch.ones(2, 8), "bias": torch.ones(3)}),
         ("head.safetensors", "'bias'", "[2]")),
    Case("head-nan", lambda w, mp: _head_cmd(w, {"weight": torch.full((2, 8), float("nan"))}),
         ("head.safetensors", "NaN")),
    Case("head-one-class", lambda w, mp: _head_cmd(w, {"weight": torch.ones(1, 8)}),
         ("head.safetensors", "classes >= 2")),
    Case("head-labels-metadata-wrong", lambda w, mp: _head_cmd(w, {"weight": torch.ones(2, 8)},
                                                               metadata={"labels": '["a"]'}),
         ("head.safetensors", "`labels`", "2 class names")),
    Case("head-label-out-of-range", lambda w, mp: _head_cmd(w, {"weight": torch.ones(2, 8)}) and [
        *_fisher_cmd(w, data=b'{"text": "good", "label": 5}\n'), "--task", "encoder-head", "--head",
        w.work / "head.safetensors"], ("train.jsonl:1", "out of range")),
    Case("head-for-a-classifier", lambda w, mp: [*_fisher_cmd(w), "--head", w.work / "x.safetensors"],
         ("--head is read by --task encoder-head only",)),
    Case("encoder-head-without-head", lambda w, mp: [*_fisher_cmd(w), "--task", "encoder-head"],
         ("--task encoder-head needs --head FILE",)),
    Case("config-head-without-encoder-head", lambda w, mp: (_data_config(w), merge_args(w, w.config(
        "epimer", models=[{"model": "task_0", "data": "train.jsonl", "head": "h.safetensors"}])))[1],
        ("c.yaml", "`head:` is read only")),
    Case("config-encoder-head-without-head", lambda w, mp: merge_args(w, _data_config(
        w, curvature={"task": "encoder-head"})), ("c.yaml", "needs `head: FILE`")),
    # -------------------------------------------------------------- epimer fisher, image tasks
    Case("images-one-class", lambda w, mp: _image_cmd(w, "image-classification", "one-class"),
         ("images", "at least 2")),
    Case("images-empty-class", lambda w, mp: _image_cmd(w, "image-classification", "empty-class"),
         ("images/b", "no image files")),
    Case("images-jsonl-image-missing", lambda w, mp: _image_cmd(w, "image-classification", "jsonl-missing"),
         ("images.jsonl:1", "nowhere.png", "not found")),
    Case("images-label-unknown", lambda w, mp: _image_cmd(w, "clip-zero-shot", "folder", "--classes",
                                                          _lines(w, "classes.txt", "x\ny\n")),
         ("images", "unknown label 'a'")),
    Case("clip-jsonl-without-classes", lambda w, mp: _image_cmd(w, "clip-zero-shot", "jsonl-missing"),
         ("images.jsonl", "--classes FILE")),
    Case("clip-template-without-slot", lambda w, mp: _image_cmd(w, "clip-zero-shot", "folder", "--templates",
                                                                _lines(w, "t.txt", "a photo\n")),
         ("t.txt", "exactly one {}")),
    Case("clip-classes-file-missing", lambda w, mp: _image_cmd(w, "clip-zero-shot", "folder", "--classes",
                                                               w.work / "nope.txt"), ("nope.txt", "not found")),
    Case("clip-options-for-another-task", lambda w, mp: _image_cmd(w, "image-classification", "folder", "--templates",
                                                                   _lines(w, "t.txt", "{}\n")),
         ("--templates", "clip-zero-shot only")),
    Case("clip-text-model-not-clip", lambda w, mp: _image_cmd(w, "clip-zero-shot", "folder", "--text-model",
                                                              _fisher_cmd(w)[2]),
         ("clf", "full CLIP checkpoint")),
    # -------------------------------------------------------------- epimer convert-gguf
    Case("convert-gguf-not-gguf", lambda w, mp: ["convert-gguf", w.fishers[0], "-o", w.out, "-q"],
         ("task_0.fisher.safetensors", "not a .gguf file")),
    Case("convert-gguf-without-metadata", lambda w, mp: ["convert-gguf", _gguf_file(w, "llama", "token_embd.weight"),
                                                          "-o", w.out, "-q"], ("x.gguf",)),
    Case("convert-gguf-out-exists", lambda w, mp: ["convert-gguf", _gguf_file(w, "llama", "token_embd.weight"),
                                                    "-o", w.base, "-q"], ("base", "already exists")),
    Case("convert-gguf-out-over-input", lambda w, mp: ["convert-gguf", _gguf_file(w, "llama", "token_embd.weight"),
                                                        "-o", w.work, "-q", "--overwrite"], ("output folder",)),
    # -------------------------------------------------------------- PEFT LoRA adapters as task models
    Case("adapter-dora", lambda w, mp: _adapter(w, {"use_dora": True}), ("adapter_config.json", "use_dora", "DoRA")),
    Case("adapter-not-lora", lambda w, mp: _adapter(w, {"peft_type": "IA3"}), ("adapter_config.json", "'IA3'")),
    Case("adapter-config-not-json", lambda w, mp: _adapter(w, raw="{not json"), ("adapter_config.json",)),
    Case("adapter-weights-as-bin", lambda w, mp: ((w.work / "adapter").mkdir(), (w.work / "adapter" /
                                                   "adapter_model.bin").write_bytes(b"x"), _adapter(w, tensors={}))[2],
         ("adapter", "adapter_model.safetensors", "adapter_model.bin")),
    Case("adapter-rank-differs-from-config", lambda w, mp: _adapter(w, {"rank_pattern": {"attn": 3}}),
         ("adapter", "'layer.0.attn'", "rank 2", "rank_pattern")),
    Case("adapter-factors-mismatch-base", lambda w, mp: _adapter(w, tensors={
        "base_model.model.layer.0.attn.lora_A.weight": torch.ones(2, 7),
        "base_model.model.layer.0.attn.lora_B.weight": torch.ones(16, 2)}), ("adapter", "[16, 7]", "[16, 16]")),
    Case("adapter-module-not-in-base", lambda w, mp: _adapter(w, tensors={
        "base_model.model.layer.9.attn.lora_A.weight": torch.ones(2, 16),
        "base_model.model.layer.9.attn.lora_B.weight": torch.ones(16, 2)}), ("adapter", "'layer.9.attn.weight'")),
    Case("adapter-lacks-lora-b", lambda w, mp: _adapter(w, tensors={
        "base_model.model.layer.0.attn.lora_A.weight": torch.ones(2, 16)}), ("adapter", "lacks its lora_B")),
    Case("adapter-embedding-lora", lambda w, mp: _adapter(w, tensors={
        "base_model.model.embed.lora_embedding_A": torch.ones(2, 40),
        "base_model.model.embed.lora_embedding_B": torch.ones(16, 2)}), ("adapter", "lora_embedding_A", "not supported")),
    Case("adapter-nan", lambda w, mp: _adapter(w, tensors={
        "base_model.model.layer.0.attn.lora_A.weight": torch.full((2, 16), float("nan")),
        "base_model.model.layer.0.attn.lora_B.weight": torch.ones(16, 2)}), ("adapter", "'layer.0.attn.weight'", "NaN")),
    Case("adapter-given-to-fisher", lambda w, mp: (_adapter(w), ["import-fisher", "--model", w.work / "adapter",
                                                                 "--values", w.fishers[0], "--out", w.out,
                                                                 "--num-samples", "1"])[1],
         ("adapter", "PEFT adapter folder is read on its base")),
    Case("adapter-output-from-full-models", lambda w, mp: merge_args(w, w.config(), "--adapter-rank", "4"),
         ("--adapter-rank", "needs every model to be a PEFT LoRA adapter")),
    Case("adapter-output-with-shards", lambda w, mp: [*_adapter(w), "--adapter-rank", "4", "--shard-size", "1MB"],
         ("--shard-size", "--adapter-rank")),
    Case("adapter-output-rank-zero", lambda w, mp: [*_adapter(w), "--adapter-rank", "0"], ("--adapter-rank",)),
    # -------------------------------------------------------------- epimer import-fisher
    Case("import-values-missing", lambda w, mp: ["import-fisher", "--model", w.tasks[0], "--values", w.work / "no.st",
                                                  "--out", w.root / "dest" / "f.safetensors", "--num-samples", "1"],
         ("no.st", "not found")),
    Case("import-name-not-in-model", lambda w, mp: _import_cmd(w, lambda v: v.update({"bert.a": torch.ones(2)})),
         ("other_tool.safetensors", "'bert.a'", "not tensors of")),
    Case("import-shape-differs", lambda w, mp: _import_cmd(w, lambda v: v.update({"head.weight": torch.ones(16, 2)})),
         ("other_tool.safetensors", "'head.weight'", "[16, 2]")),
    Case("import-negative", lambda w, mp: _import_cmd(w, lambda v: _set(v, "big.weight", (3, 3), -1.0)),
         ("other_tool.safetensors", "'big.weight'", "negative")),
    Case("import-nan", lambda w, mp: _import_cmd(w, lambda v: _set(v, "big.weight", (60, 3), float("nan"))),
         ("other_tool.safetensors", "'big.weight'", "NaN")),
    Case("import-integer-values", lambda w, mp: _import_cmd(w, lambda v: v.update(
        {"head.weight": torch.ones(2, 16, dtype=torch.int32)})), ("other_tool.safetensors", "'head.weight'", "int32")),
    Case("import-an-epimer-fisher", lambda w, mp: ["import-fisher", "--model", w.tasks[0], "--values", w.fishers[0],
                                                    "--out", w.root / "dest" / "f.safetensors", "--num-samples", "1"],
         ("task_0.fisher.safetensors", "already an epimer Fisher file")),
    Case("import-out-exists", lambda w, mp: _import_cmd(w, None)[:5] + ["--out", w.fishers[1], "--num-samples", "1"],
         ("task_1.fisher.safetensors", "already exists")),
    Case("import-out-in-the-model", lambda w, mp: _import_cmd(w, None)[:5] + [
        "--out", w.tasks[0] / "f.safetensors", "--num-samples", "1"], ("--out file", "model")),
    Case("import-zero-samples", lambda w, mp: _import_cmd(w, None, "--num-samples", "0"), ("--num-samples",)),
    # -------------------------------------------------------------- diagnose
    Case("diagnose-unknown-method", lambda w, mp: ["diagnose", w.config("tiess", fisher=True), "-q"], ("c.yaml", "tiess")),
    Case("diagnose-bad-parameter", lambda w, mp: ["diagnose", w.config("epimer", {"rank_fraction": 7}, fisher=True), "-q"],
         ("c.yaml", "rank_fraction")),
    Case("diagnose-ties-config-without-fisher", lambda w, mp: ["diagnose", w.config("ties"), "-q"],
         ("`epimer diagnose` measures curvature", "Fisher file")),
    Case("diagnose-json-under-a-file", lambda w, mp: ((w.root / "afile").write_text("x"), [
        "diagnose", w.config("epimer", fisher=True), "--json", w.root / "afile" / "d.json", "-q"])[1], ("afile",)),
    Case("diagnose-json-read-only", lambda w, mp: (_read_only(mp), [
        "diagnose", w.config("epimer", fisher=True), "--json", w.root / "dest" / "d.json", "-q"])[1],
        ("dest", "Read-only")),
    Case("diagnose-json-over-config", lambda w, mp: [
        "diagnose", w.config("epimer", fisher=True), "--json", w.work / "c.yaml", "-q"], ("is the config file",)),
    # -------------------------------------------------------------- epimer bench llm --model
    Case("bench-llm-model-gguf-file", lambda w, mp: (
        (w.root / "m.gguf").write_bytes(b"GGUF"), ["bench", "llm", "--out", w.out, "--model", w.root / "m.gguf"])[1],
        ("m.gguf", "epimer convert-gguf")),
    Case("bench-llm-model-not-hf-folder", lambda w, mp: ["bench", "llm", "--out", w.out, "--model", w.work],
         ("work", "no config.json")),
    # -------------------------------------------------------------- --device
    Case("merge-device-cuda-without-gpu", lambda w, mp: (mp.setattr(torch.cuda, "is_available", lambda: False), [
        *merge_args(w, w.config("tsv_m")), "--device", "cuda"])[1], ("--device cuda", "no CUDA device")),
    Case("merge-device-unknown", lambda w, mp: [*merge_args(w, w.config("tsv_m")), "--device", "tpu"],
         ("--device tpu",)),
    # -------------------------------------------------------------- --threads
    Case("merge-threads-zero", lambda w, mp: [*merge_args(w, w.config("tsv_m")), "--threads", "0"],
         ("--threads", "less than 1")),
    Case("merge-threads-word", lambda w, mp: [*merge_args(w, w.config("tsv_m")), "--threads", "many"],
         ("--threads", "'many' is neither a whole number nor auto")),
    Case("merge-device-mps", lambda w, mp: [*merge_args(w, w.config("tsv_m")), "--device", "mps"],
         ("--device mps", "cpu or cuda")),
    Case("diagnose-device-cuda-without-gpu", lambda w, mp: (mp.setattr(torch.cuda, "is_available", lambda: False), [
        "diagnose", w.config("epimer", fisher=True), "--device", "cuda:1", "-q"])[1], ("--device cuda:1",)),
]


def test_battery_is_large_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world.root)
    args = case.setup(world, monkeypatch)
    before = digest_tree(world.root, skip=world.out)
    out_existed = world.out.exists()
    code, output = run_cli(*args)
    assert_one_error(code, output, case.needles)
    assert digest_tree(world.root, skip=world.out) == before  # no input changed, nothing written
    nothing_beside(world.out, out_existed)
    if out_existed and world.out.is_dir():
        assert (world.out / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------------------- what must work


def _merge_ok(w: World, cfg: Path, *extra: object) -> str:
    code, output = run_cli("merge", cfg, "-o", w.out, *extra)
    assert code == 0, output
    return output


def test_old_base_with_int_buffer_and_exclude(world: World) -> None:
    """A base saved by an older transformers holds int64 `position_ids`; the fine-tunes do not."""
    for t in world.tasks:
        write_folder(t, {k: v for k, v in world.task_sds[world.tasks.index(t)].items() if k != "position_ids"})
    out = _merge_ok(world, world.config())
    assert "copied from the base" in out
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(world.out / "model.safetensors"))["position_ids"], world.base_sd["position_ids"])
    # exclude applies before the presence check: an excluded tensor need not be in the tasks
    for i, t in enumerate(world.tasks):
        write_folder(t, {k: v for k, v in world.task_sds[i].items() if k not in ("position_ids", "head.weight")})
    shutil.rmtree(world.out)
    _merge_ok(world, world.config(exclude=["^head\\."]))
    assert torch.equal(load_file(str(world.out / "model.safetensors"))["head.weight"], world.base_sd["head.weight"])


def test_differing_integer_buffer_warns(world: World) -> None:
    sd = dict(world.task_sds[1], position_ids=torch.arange(8) + 1)
    write_folder(world.tasks[1], sd)
    out = _merge_ok(world, world.config())
    assert "warning" in out and "position_ids" in out and "task_1" in out


def test_weights_whose_sum_overflows_normalise(world: World) -> None:
    from safetensors.torch import load_file

    cfg = world.config(models=[{"model": t.name, "weight": 1e308} for t in world.tasks])
    _merge_ok(world, cfg, "-q")
    got = load_file(str(world.out / "model.safetensors"))
    shutil.rmtree(world.out)
    _merge_ok(world, world.config(), "-q")  # equal weights
    want = load_file(str(world.out / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["big.weight"], world.base_sd["big.weight"])


def test_models_as_plain_paths(world: World) -> None:
    cfg = world.raw_config("base_model: base\nmodels: [task_0, task_1, task_2]\nmethod: task_arithmetic\n")
    _merge_ok(world, cfg, "-q")


def test_long_output_name(world: World) -> None:
    """A 240-character name is valid; the hidden build name must stay under 255 bytes."""
    world.out = world.root / "dest" / ("m" * 240)
    _merge_ok(world, world.config(), "-q")
    assert (world.out / "model.safetensors").is_file()
    assert [p.name for p in world.out.parent.iterdir()] == ["m" * 240]


def test_output_files_portable_and_readable(world: World) -> None:
    """merge_config.yaml and the card hold paths relative to OUT (it reproduces the merge from
    there); files get the umask's modes; sentence-transformers modules travel."""
    (world.base / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (world.base / "1_Pooling").mkdir()
    (world.base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (world.base / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')
    old = os.umask(0o022)
    try:
        _merge_ok(world, world.config("epimer", {"scale": "auto"}, fisher=True), "-q")
    finally:
        os.umask(old)
    out = world.out
    for f in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "config.json"):
        assert (out / f).is_file(), f
    text = (out / "merge_config.yaml").read_text() + (out / "README.md").read_text()
    assert str(world.work) not in text and "../../work/task_0" in text
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    again = world.root / "dest" / "again"
    code, output = run_cli("merge", out / "merge_config.yaml", "-o", again, "-q")
    assert code == 0, output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_fisher_files_deterministic_and_umask(world: World, tmp_path: Path) -> None:
    fisher = {n: torch.rand(v.shape) for n, v in world.task_sds[0].items() if v.is_floating_point()}
    old = os.umask(0o022)
    try:
        a = world.fisher_file(0, fisher, name="a.safetensors")
        b = world.fisher_file(0, fisher, name="b.safetensors")
    finally:
        os.umask(old)
    assert a.read_bytes() == b.read_bytes()
    assert oct(a.stat().st_mode & 0o777) == oct(0o644)


def test_methods_listing_reads_well() -> None:
    code, output = run_cli("methods")
    assert code == 0
    assert "Annotated" not in output and "FieldInfo" not in output
    assert "'exact' | int >= 1" in output


def test_no_file_cites_an_outside_spec() -> None:
    root = Path(__file__).resolve().parents[1]
    hits = []
    for p in [root / "README.md", *root.glob("src/**/*.py"), *root.glob("docs/*.md"), *root.glob("benchmarks/*.py"),
              *root.glob("examples/*")]:
        if p.is_file() and "SPEC" in p.read_text(errors="ignore").replace("SPECIAL", ""):
            hits.append(str(p.relative_to(root)))
    assert hits == []
    assert (root / "docs" / "method.md").is_file()


def test_exchange_and_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two ways OUT is put in place, with renameat2 and with the fallback."""
    from epimer.errors import InputError
    from epimer.io import outdir

    for native in (True, False):
        if not native:
            monkeypatch.setattr(outdir, "_renameat2", lambda *a: False)
        d = tmp_path / f"n{native}"
        d.mkdir()
        new, out = d / "new", d / "out"
        new.mkdir()
        (new / "f").write_text("new")
        outdir.rename_noreplace(new, out)
        assert (out / "f").read_text() == "new" and not new.exists()
        other = d / "other"
        other.mkdir()
        (other / "f").write_text("other")
        with pytest.raises(InputError, match="appeared while"):
            outdir.rename_noreplace(other, out)
        assert (out / "f").read_text() == "new" and (other / "f").read_text() == "other"
        outdir.exchange(other, out)
        assert (out / "f").read_text() == "other" and (other / "f").read_text() == "new"
        assert sorted(p.name for p in d.iterdir()) == ["other", "out"]


# ---------------------------------------------------------------------------- processes


def _big_world(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(640, 640, generator=g) for i in range(24)}
    root = tmp_path / "m"
    bp = write_folder(root / "base", base)
    tasks = [write_folder(root / f"t{k}", {n: v + 0.01 * (k + 1) for n, v in base.items()}) for k in range(3)]
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(bp), "models": [{"model": str(t)} for t in tasks],
                                   "method": "ties", "parameters": {"scope": "global"}}))
    return cfg, tmp_path / "dest" / "merged"


def _epimer(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "epimer.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_partial(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.parent.exists():
            partial = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]
            if partial and any(partial[0].iterdir()):
                return
        time.sleep(0.005)
    raise AssertionError("the merge finished before it could be interrupted; make the fixture larger")


@pytest.mark.slow
def test_two_merges_into_one_out(tmp_path: Path) -> None:
    """Started together, both pass the first check; exactly one may put OUT in place."""
    cfg, out = _big_world(tmp_path)
    a, b = _epimer("merge", cfg, "-o", out, "-q"), _epimer("merge", cfg, "-o", out, "-q")
    outs = [p.communicate(timeout=300)[0] for p in (a, b)]
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], outs
    loser = outs[[a.returncode, b.returncode].index(2)]
    assert "already exists" in loser or "appeared while" in loser
    assert "Traceback" not in loser
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["merged"]


@pytest.mark.slow
def test_sigterm_exits_143_and_kill_leftovers_are_cleared(tmp_path: Path) -> None:
    cfg, out = _big_world(tmp_path)
    proc = _epimer("merge", cfg, "-o", out, "-q")
    _wait_for_partial(proc, out)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143
    assert [p.name for p in out.parent.iterdir()] == []
    proc = _epimer("merge", cfg, "-o", out, "-q")
    _wait_for_partial(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = [p.name for p in out.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".merged.partial-")
    # the next run removes what the killed one left, and says so
    proc = _epimer("merge", cfg, "-o", out, "-q")
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text
    assert "removed" in text and left[0] in text
    assert [p.name for p in out.parent.iterdir()] == ["merged"]


@pytest.mark.slow
def test_overwrite_interrupted_keeps_old_or_new(tmp_path: Path) -> None:
    """SIGTERM at any moment of an --overwrite merge leaves OUT whole: the old model or the new."""
    cfg, out = _big_world(tmp_path)
    assert _epimer("merge", cfg, "-o", out, "-q").wait(timeout=300) == 0
    old = (out / "model.safetensors").read_bytes()
    (out / "marker").write_text("old")
    for delay in (0.5, 2.0, 4.0):
        proc = _epimer("merge", cfg, "-o", out, "-q", "--overwrite")
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        # 143: the merge cleaned up; -15: the signal came while Python was still starting,
        # before epimer installed its handler (nothing had been touched yet)
        assert proc.returncode in (0, 143, -signal.SIGTERM)
        assert (out / "model.safetensors").is_file()
        if (out / "marker").exists():
            assert (out / "model.safetensors").read_bytes() == old
        assert [p.name for p in out.parent.iterdir()] == ["merged"]
