"""Curvature of causal LMs (docs/method.md §4): the three data shapes, exact in float64 against
a per-sample loop of loss.backward(); the projected metric against its definition; the command
line end to end into `epimer merge`, whose output loads with from_pretrained and generates; and
the random-head refusal."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from epimer.cli import main  # noqa: E402
from epimer.curvature.causal_lm import IGNORE, batches, causal_lm_loss, encode_sample  # noqa: E402
from epimer.curvature.fisher import fisher_sums  # noqa: E402
from epimer.errors import InputError  # noqa: E402
from epimer.io.fisher import PROJECTED, load_fisher  # noqa: E402
from tests.curvature.test_projected_estimation import _basis, _explicit, _rel  # noqa: E402

# sdpa has no vmap batching rule on CPU: torch warns and loops (the float64 tests use it anyway)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "user", "assistant", "system", "yes", "no", "a", "b"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    if chat:
        tok.chat_template = TEMPLATE
    return tok


def tiny_llama(seed: int = 0, tied: bool = False, attn: str = "eager"):
    """A random 2-layer Llama. The float64 comparisons use attn="sdpa": eager attention takes
    its softmax in float32, so sequences of other lengths (padded or not) round differently
    at the 1e-8 level."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


ROWS = [
    {"text": "hello world the cat sat on the mat"},
    {"prompt": "user hello", "completion": "yes the cat"},
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "yes a b"},
                  {"role": "user", "content": "the cat"}, {"role": "assistant", "content": "no"}]},
    {"text": "a b a b"},
    {"prompt": "the mat", "completion": "sat"},
    {"messages": [{"role": "system", "content": "yes"}, {"role": "user", "content": "cat"},
                  {"role": "assistant", "content": "mat on the"}]},
]


def _loop_fisher(model, samples) -> dict[str, torch.Tensor]:
    """Reference: one unpadded sequence at a time, loss = mean CE over its target tokens."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in samples:
        ids, labels = torch.tensor(s.input_ids), torch.tensor(s.labels)
        logits = model(input_ids=ids[None]).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            acc[n] += g.square()
    return {n: a / len(samples) for n, a in acc.items()}


def test_targets_of_each_data_shape() -> None:
    tok = tiny_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    text = encode_sample(ROWS[0], tok, 64, "x:1")
    assert list(text.input_ids) == [1, *ids(ROWS[0]["text"])] and text.labels[0] == IGNORE
    assert list(text.labels[1:]) == list(text.input_ids[1:])
    pc = encode_sample(ROWS[1], tok, 64, "x:2")
    prompt = [1, *ids("user hello")]
    assert list(pc.input_ids) == prompt + ids("yes the cat") + [2]
    assert list(pc.labels) == [IGNORE] * len(prompt) + ids("yes the cat") + [2]
    chat = encode_sample(ROWS[2], tok, 64, "x:3")
    targets = [t for t in chat.labels if t != IGNORE]
    # the two assistant turns' content and their closing marker, nothing of the user turns
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert targets == ids("yes a b") + [end] + ids("no") + [end]
    # truncation that leaves no target is refused, naming the line
    with pytest.raises(InputError, match=r"x:2: no target token within the first 3"):
        encode_sample(ROWS[1], tok, 3, "x:2")


@pytest.mark.parametrize("tied", [False, True])
def test_fisher_equals_a_per_sample_loop_for_every_shape(tied: bool) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(seed=3, tied=tied, attn="sdpa").double()
    samples = [encode_sample(r, tok, 64, f"x:{i}") for i, r in enumerate(ROWS)]
    want = _loop_fisher(model, samples)
    got = fisher_sums(model, batches(samples, 4, 0), causal_lm_loss, dtype=torch.float64, chunk_size=3).mean()
    assert set(got) == set(want)
    for n in want:
        nonzero = want[n] != 0
        assert torch.equal(got[n][~nonzero] == 0, torch.ones_like(got[n][~nonzero], dtype=torch.bool)) or \
            float(got[n][~nonzero].abs().max()) < 1e-30, n
        rel = float(((got[n] - want[n])[nonzero]).norm() / want[n][nonzero].norm()) if nonzero.any() else 0.0
        assert rel < 1e-9, (n, rel)


def test_projected_metric_equals_its_definition() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(seed=4, attn="sdpa").double()
    samples = [encode_sample(r, tok, 64, f"x:{i}") for i, r in enumerate(ROWS)]
    params = dict(model.named_parameters())
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight",
             "lm_head.weight"]
    bases = {n: _basis(tuple(params[n].shape), 3, i) for i, n in enumerate(names)}
    sums = fisher_sums(model, batches(samples, 4, 0), causal_lm_loss, dtype=torch.float64, chunk_size=2, bases=bases)
    assert set(names) <= set(sums.probed)

    def loss_of(m, s):
        ids, labels = torch.tensor(s.input_ids), torch.tensor(s.labels)
        return torch.nn.functional.cross_entropy(m(input_ids=ids[None]).logits[0, :-1], labels[1:],
                                                 ignore_index=IGNORE)

    want = _explicit(model, samples, loss_of, bases)
    for n in names:
        assert _rel(sums.projected_mean()[n], want[n]) < 1e-9, n


def test_padding_changes_nothing() -> None:
    """A sample alone and the same sample padded beside a longer one give the same Fisher."""
    tok = tiny_tokenizer()
    model = tiny_llama(seed=5, attn="sdpa").double()
    short, long = encode_sample(ROWS[4], tok, 64, "x"), encode_sample(ROWS[0], tok, 64, "y")
    alone = fisher_sums(model, batches([short], 1, 0), causal_lm_loss, dtype=torch.float64).sums
    both = fisher_sums(model, batches([short, long], 2, 0), causal_lm_loss, dtype=torch.float64).sums
    other = fisher_sums(model, batches([long], 1, 0), causal_lm_loss, dtype=torch.float64).sums
    for n in alone:
        assert torch.allclose(both[n], alone[n] + other[n], rtol=1e-10, atol=1e-25), n


def test_true_estimator_draws_only_target_tokens() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(seed=6)
    samples = [encode_sample(r, tok, 64, f"x:{i}") for i, r in enumerate(ROWS)]
    batch = next(batches(samples, 6, 0))
    drawn = causal_lm_loss.sample_targets(model, batch, seed=1, first_index=0)
    keep = batch["labels"] == IGNORE
    assert torch.equal(drawn["labels"][keep], batch["labels"][keep])
    assert torch.equal(drawn["input_ids"], batch["input_ids"])
    again = causal_lm_loss.sample_targets(model, {k: v[3:] for k, v in batch.items()}, seed=1, first_index=3)
    assert torch.equal(again["labels"], drawn["labels"][3:])  # draws depend on (seed, index) only


# ------------------------------------------------------------------ command line, into a merge

def cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], prog_name="epimer")
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("causal_lm")
    tok = tiny_tokenizer()
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for t in range(2):
        m = tiny_llama(seed=0)
        g = torch.Generator().manual_seed(10 + t)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"task_{t}")
        tok.save_pretrained(root / f"task_{t}")
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return {"root": root}


@pytest.mark.parametrize("method, parameters", [
    ("epimer", {"rank_fraction": 0.5}),
    ("epimer", {"rank_fraction": 0.5, "metric": "projected"}),
    ("fisher_average", {}),
])
def test_causal_lm_curvature_feeds_a_merge_that_loads_and_generates(lm_world, tmp_path, method, parameters) -> None:
    root = lm_world["root"]
    cfg = {"base_model": str(root / "base"), "method": method, "parameters": parameters,
           "models": [{"model": str(root / f"task_{t}"), "data": str(root / "data.jsonl")} for t in range(2)],
           "curvature": {"task": "causal-lm", "batch_size": 4, "max_length": 32}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", path, "-o", tmp_path / "out", "-q", "--curvature-dir", tmp_path / "curv")
    assert code == 0, out
    fisher = load_fisher(tmp_path / "curv" / "01-task_0.fisher.safetensors")
    assert "lm_head.weight" in fisher and torch.isfinite(fisher["lm_head.weight"]).all()
    if parameters.get("metric") == "projected":
        from safetensors import safe_open

        with safe_open(tmp_path / "curv" / "01-task_0.fisher.safetensors", "pt") as f:
            assert "lm_head.weight" + PROJECTED in f.keys()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    gen = merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, ids.shape[1] + 4)
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)


def test_fisher_command_equals_the_python_pass(lm_world, tmp_path) -> None:
    root = lm_world["root"]
    code, out = cli("fisher", "--task", "causal-lm", "--model", root / "task_0", "--data", root / "data.jsonl",
                    "--out", tmp_path / "f.safetensors", "-q", "--batch-size", "4", "--device", "cpu")
    assert code == 0, out
    got = load_fisher(tmp_path / "f.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "task_0", attn_implementation="eager")
    tok = tiny_tokenizer()
    samples = [encode_sample(r, tok, 128, "x") for r in ROWS]
    want = _loop_fisher(model.double(), samples)
    for n, w in want.items():
        assert torch.allclose(got[n].double(), w, rtol=1e-4, atol=1e-9 * float(w.abs().max())), n


def test_a_causal_lm_as_a_sequence_classifier_is_refused(lm_world, tmp_path) -> None:
    """The random-head case: a Llama checkpoint loaded as a classifier would get a random
    `score` head; refused, pointing at --task causal-lm."""
    root = lm_world["root"]
    (tmp_path / "cls.jsonl").write_text('{"text": "hello", "label": 1}\n')
    code, out = cli("fisher", "--model", root / "task_0", "--data", tmp_path / "cls.jsonl", "--out",
                    tmp_path / "f.safetensors", "-q", "--params", r"^model\.")
    assert code == 2, out
    assert "score.weight" in out and "initialised at random" in out and "--task causal-lm" in out, out
    assert not (tmp_path / "f.safetensors").exists()
