"""Curvature of image models (docs/method.md §4): an image classifier and CLIP zero-shot
classification (the paper's setting), exact in float64 against per-sample loops (diagonal and
projected), through the command line from an image folder, and a CLIP merged the paper's way
(image towers only) that loads with CLIPModel.from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
# sdpa has no vmap batching rule on CPU: torch warns and loops (the float64 tests use it anyway)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

from epimer.cli import main  # noqa: E402
from epimer.curvature.fisher import cross_entropy_loss, fisher_sums, sequence_classification_loss  # noqa: E402
from epimer.curvature.vision import CLIPZeroShot, zero_shot_head  # noqa: E402
from epimer.io.fisher import load_fisher  # noqa: E402
from epimer.io.reader import open_checkpoint  # noqa: E402
from tests.curvature.test_projected_estimation import _basis, _explicit, _rel  # noqa: E402

CLASSES = ["cat", "dog", "bird"]
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "photo", "of", "the", "cat", "dog", "bird", "good", "close-up", "."]


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, num_labels=3, label2id={c: i for i, c in enumerate(CLASSES)},
                                 id2label=dict(enumerate(CLASSES)), attn_implementation="eager")
    return transformers.ViTForImageClassification(cfg).eval()


def tiny_clip(seed: int = 0, attn: str = "eager"):
    """A random tiny CLIP. The float64 comparisons use attn="sdpa": eager attention takes its
    softmax in float32, which rounds differently inside and outside vmap at the 1e-8 level."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = attn
    return transformers.CLIPModel(cfg).eval()


def clip_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loop(model, batch, loss_of):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    n = len(batch["labels"])
    for i in range(n):
        grads = torch.autograd.grad(loss_of(model, {k: v[i] for k, v in batch.items()}), list(params.values()),
                                    allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                acc[name] += g.square() / n
    return acc


def _assert_close(got, want) -> None:
    for n, w in want.items():
        if float(w.norm()) > 1e-20:  # (a true value of 0 is rounding noise in both)
            assert float((got[n] - w).norm() / w.norm()) < 1e-9, n


def test_image_classifier_fisher_and_projected_metric_are_exact() -> None:
    model = tiny_vit(1).double()
    batch = {"pixel_values": _pixels(5, 2), "labels": torch.tensor([0, 2, 1, 1, 0])}
    params = dict(model.named_parameters())
    names = ["vit.embeddings.patch_embeddings.projection.weight", "vit.layers.0.attention.q_proj.weight",
             "classifier.weight"]
    bases = {n: _basis(tuple(params[n].reshape(params[n].shape[0], -1).shape), 2, i) for i, n in enumerate(names[1:])}
    sums = fisher_sums(model, [batch], sequence_classification_loss, dtype=torch.float64, chunk_size=2, bases=bases)

    def loss_of(m, s):
        return torch.nn.functional.cross_entropy(m(pixel_values=s["pixel_values"][None]).logits, s["labels"][None])

    _assert_close(sums.mean(), _loop(model, batch, loss_of))
    samples = [{k: v[i] for k, v in batch.items()} for i in range(5)]
    want = _explicit(model, samples, loss_of, bases)
    for n in bases:
        assert _rel(sums.projected_mean()[n], want[n]) < 1e-9, n


def test_clip_zero_shot_fisher_and_projected_metric_are_exact() -> None:
    clip = tiny_clip(2, attn="sdpa").double()
    head = zero_shot_head(clip, clip_tokenizer(), CLASSES, ["a photo of a {}.", "a good photo of the {}."])
    assert torch.allclose(head.norm(dim=1), torch.ones(3, dtype=torch.float64))
    model = CLIPZeroShot(clip.vision_model, clip.visual_projection, head, float(clip.logit_scale.detach())).eval()
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in clip.named_parameters()
                                                        if n.startswith(("vision_model.", "visual_projection."))}
    batch = {"pixel_values": _pixels(4, 3), "labels": torch.tensor([2, 0, 1, 2])}
    names = ["visual_projection.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"]
    params = dict(model.named_parameters())
    bases = {n: _basis(tuple(params[n].shape), 3, i) for i, n in enumerate(names)}
    sums = fisher_sums(model, [batch], cross_entropy_loss, dtype=torch.float64, chunk_size=3, bases=bases)

    def loss_of(m, s):
        image = clip.get_image_features(pixel_values=s["pixel_values"][None])
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        logits = clip.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ head.T
        return torch.nn.functional.cross_entropy(logits, s["labels"][None])

    _assert_close(sums.mean(), _loop(model, batch, loss_of))
    samples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    want = _explicit(model, samples, loss_of, bases)
    for n in bases:
        assert _rel(sums.projected_mean()[n], want[n]) < 1e-9, n


# ------------------------------------------------------------------ command line

def _image_folder(root, n_per_class: int = 3) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            arr[..., c] = 200
            Image.fromarray(arr).save(root / name / f"{i}.png")


def cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], prog_name="epimer")
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip")
    _image_folder(root / "images")
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    base = tiny_clip(0)
    for name in ("base", "task_0", "task_1"):
        m = tiny_clip(0)
        if name != "base":  # fine-tuned image towers; the text tower stays the base's
            g = torch.Generator().manual_seed(len(name) + int(name[-1]))
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n.startswith(("vision_model.", "visual_projection.")):
                        p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / name)
        proc.save_pretrained(root / name)
        clip_tokenizer().save_pretrained(root / name)
    vit = tiny_vit(0)
    vit.save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    del base
    return {"root": root}


def test_cli_image_classifier_from_a_folder(clip_world, tmp_path) -> None:
    root = clip_world["root"]
    code, out = cli("fisher", "--task", "image-classification", "--model", root / "vit", "--data", root / "images",
                    "--out", tmp_path / "f.safetensors", "-q", "--batch-size", "4")
    assert code == 0, out
    fisher = load_fisher(tmp_path / "f.safetensors")
    assert set(fisher) == set(open_checkpoint(root / "vit").names())
    assert float(fisher["classifier.weight"].sum()) > 0


def test_clip_merged_the_papers_way_loads(clip_world, tmp_path) -> None:
    """Image towers merged with EpiMer (projected metric) from zero-shot curvature estimated
    in the merge; the text tower kept; the result loads with CLIPModel.from_pretrained."""
    root = clip_world["root"]
    (tmp_path / "templates.txt").write_text("a photo of a {}.\nthe {}.\n")
    cfg = {"base_model": str(root / "base"), "method": "epimer", "parameters": {"metric": "projected"},
           "exclude": [r"^text_model\.", r"^text_projection\.", "^logit_scale$"],
           "models": [{"model": str(root / f"task_{t}"), "data": str(root / "images")} for t in range(2)],
           "curvature": {"task": "clip-zero-shot", "batch_size": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = cli("merge", tmp_path / "c.yaml", "-o", tmp_path / "out", "-q", "--curvature-dir", tmp_path / "curv")
    assert code == 0, out
    fisher = load_fisher(tmp_path / "curv" / "01-task_0.fisher.safetensors")
    assert fisher and all(n.startswith(("vision_model.", "visual_projection.")) for n in fisher)
    merged = transformers.CLIPModel.from_pretrained(tmp_path / "out")
    base = transformers.CLIPModel.from_pretrained(root / "base")
    assert torch.equal(merged.text_projection.weight, base.text_projection.weight)
    assert not torch.equal(merged.visual_projection.weight, base.visual_projection.weight)
    out_img = merged.get_image_features(pixel_values=torch.randn(1, 3, 16, 16))
    out_img = out_img.pooler_output if hasattr(out_img, "pooler_output") else out_img
    assert torch.isfinite(out_img).all()


def test_vision_only_checkpoint_needs_the_text_model(clip_world, tmp_path) -> None:
    root = clip_world["root"]
    vision = transformers.CLIPVisionModelWithProjection.from_pretrained(root / "task_0", projection_dim=8)
    vision.save_pretrained(tmp_path / "vision")
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}) \
        .save_pretrained(tmp_path / "vision")
    args = ["fisher", "--task", "clip-zero-shot", "--model", tmp_path / "vision", "--data", root / "images", "-q"]
    code, out = cli(*args, "--out", tmp_path / "f.safetensors")
    assert code == 2 and "--text-model" in out, out
    code, out = cli(*args, "--out", tmp_path / "f.safetensors", "--text-model", root / "base")
    assert code == 0, out
    fisher = load_fisher(tmp_path / "f.safetensors")
    assert set(fisher) == set(open_checkpoint(tmp_path / "vision").names())
    json.dumps(sorted(fisher))  # names are plain strings
