"""GGUF checkpoints (llama.cpp's format) read as the equivalent Hugging Face checkpoint.

A ``.gguf`` file is read tensor by tensor (the file is memory-mapped by the ``gguf`` package;
only the tensor being read is decoded), each tensor dequantized to float32 with ``gguf``'s
own dequantization (every type it knows: F32, F16, BF16, Q4_0, Q4_1, Q5_*, Q8_0, K-quants,
...) and named and shaped as in the Hugging Face checkpoint of the same model. So a GGUF file
is a base or task model like any other: ``base_model: model.gguf``.

Architectures: ``llama`` (Llama, SmolLM, Mistral-style models that llama.cpp writes as
``llama``). llama.cpp permutes the rows of the query and key projections (its rotary
embedding pairs neighbouring rows, Hugging Face's pairs the two halves of each head); they
are un-permuted here with the head counts of the file, exactly. Another architecture, or a
tensor the table does not name, is refused: no name is guessed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from epimer.errors import InputError
from epimer.io.reader import Checkpoint, TensorMeta

#: GGUF tensor name -> Hugging Face name, per architecture ({i}: the block index).
NAMES: dict[str, dict[str, str]] = {
    "llama": {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InputError("reading .gguf checkpoints needs the package 'gguf': pip install 'epimer[gguf]'") from None
    return gguf


def hf_name(arch: str, name: str, path: Path) -> str:
    """The Hugging Face name of GGUF tensor ``name``; refuses one the table lacks."""
    table = NAMES[arch]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    key, block = (f"blk.{{i}}.{m.group(2)}", m.group(1)) if m else (name, None)
    if key not in table:
        raise InputError(f"{path}: GGUF tensor {name!r} has no Hugging Face name this reader knows (architecture "
                         f"{arch!r}); convert the model with a tool that knows it")
    return table[key].format(i=block) if block is not None else table[key]


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of a query or key projection's rows (per head, the
    interleaved rotary pairs back to two halves)."""
    rows = w.shape[0]
    if heads < 1 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of rotary pairs")
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file as a checkpoint of float32 tensors with Hugging Face names."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError, IndexError) as e:
            raise InputError(f"{path}: not a readable GGUF file ({e})") from None
        arch = self._field("general.architecture")
        if arch not in NAMES:
            raise InputError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(NAMES)})")
        self.arch = arch
        self.heads = int(self._field(f"{arch}.attention.head_count"))
        self.kv_heads = int(self._field(f"{arch}.attention.head_count_kv", self.heads))
        self._tensors: dict[str, Any] = {}
        for t in self._reader.tensors:
            name = hf_name(arch, t.name, path)
            if name in self._tensors:
                raise InputError(f"{path}: two GGUF tensors map to {name!r}")
            shape = tuple(int(s) for s in reversed(list(t.shape)))  # GGUF lists the fastest dimension first
            self._tensors[name] = t
            self._metas[name] = TensorMeta(name, shape, torch.float32, path)

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            if default is None:
                raise InputError(f"{self.path}: GGUF metadata {key!r} is missing")
            return default
        value = field.contents()
        return value

    def get(self, name: str) -> torch.Tensor:
        meta = self.meta(name)
        t = self._tensors[name]
        gguf = _gguf()
        try:
            values = gguf.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise InputError(f"{self.path}: tensor {t.name!r} of type {t.tensor_type!r} cannot be dequantized "
                             f"({e})") from None
        x = torch.from_numpy(values.astype("float32", copy=True)).reshape(meta.shape)
        if name.endswith("self_attn.q_proj.weight"):
            x = unpermute_rows(x, self.heads)
        elif name.endswith("self_attn.k_proj.weight"):
            x = unpermute_rows(x, self.kv_heads)
        return x

    def close(self) -> None:
        self._tensors = {}
        self._reader = None


def hf_config(path: Path, ckpt: GGUFCheckpoint) -> Any:
    """The Hugging Face config of a GGUF file (transformers' GGUF reader), checked against
    the tensors' shapes and the embedding tying the file shows."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: transformers cannot build a config from this GGUF file's metadata ({e})") from None
    vocab, hidden = ckpt.meta("model.embed_tokens.weight").shape
    blocks = 1 + max((int(n.split(".")[2]) for n in ckpt.names() if n.startswith("model.layers.")), default=-1)
    want = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": blocks,
            "num_attention_heads": ckpt.heads, "num_key_value_heads": ckpt.kv_heads}
    if "model.layers.0.mlp.gate_proj.weight" in ckpt:
        want["intermediate_size"] = ckpt.meta("model.layers.0.mlp.gate_proj.weight").shape[0]
    wrong = {k: (getattr(config, k, None), v) for k, v in want.items() if getattr(config, k, None) != v}
    if wrong:
        k, (got, need) = next(iter(wrong.items()))
        raise InputError(f"{path}: the GGUF metadata gives {k} = {got}, its tensors {need}; the file is inconsistent")
    config.tie_word_embeddings = "lm_head.weight" not in ckpt
    config.dtype = torch.float32
    return config


def convert_to_folder(path: Path, out: Path, *, overwrite: bool = False, progress: Any = None) -> int:
    """Write a GGUF file as a Hugging Face folder (``config.json``, tokenizer files,
    ``model.safetensors`` in float32) that ``AutoModelForCausalLM.from_pretrained`` loads; the
    folder appears whole or not at all. Returns the number of tensors written."""
    import tempfile

    from transformers import AutoTokenizer

    from epimer.io.outdir import (
        check_not_over_inputs,
        discard_folder,
        ensure_writable_folder,
        os_error_message,
        partial_name,
        publish_folder,
    )
    from epimer.io.writer import CheckpointWriter, PlannedTensor

    out = Path(out).absolute()
    check_not_over_inputs(out, [("GGUF file", path)], "output folder")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    with GGUFCheckpoint(path) as ckpt:
        config = hf_config(path, ckpt)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
            raise InputError(f"{path}: transformers cannot build a tokenizer from this GGUF file ({e})") from None
        ensure_writable_folder(out.parent, "output folder")
        tmp = Path(tempfile.mkdtemp(prefix=partial_name(out), dir=out.parent))
        writer = None
        try:
            names = ckpt.names()
            writer = CheckpointWriter(tmp, [PlannedTensor(n, ckpt.meta(n).shape, torch.float32) for n in names],
                                      metadata={"converted_by": "epimer", "source": path.name})
            for n in names:
                writer.write(n, ckpt.get(n))
                if progress is not None:
                    progress(1)
            writer.close()
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            publish_folder(tmp, out, overwrite)
        except OSError as err:
            discard_folder(tmp, writer)
            raise InputError(os_error_message(err, tmp, "converted model") + f" ({out} not written)") from None
        except BaseException:
            discard_folder(tmp, writer)
            raise
    return len(names)
