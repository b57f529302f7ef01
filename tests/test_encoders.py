"""The CLIP pieces: openai-clip's tokenizer (the one part of openai-clip still used, loaded from its file without the
package __init__) and this project's CLIP text tower, which must stay equal to the openai-clip classes it replaced:
same parameter names (OpenAI's weights load strictly: test_parity, test_checkpoints), same numbers, and the same
seeded random init (a policy trained on the random encoders, like the demo's, must see the same text features)."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_config
from models.build import build_encoders
from models.encoders import CLIPTextEncoder, clip_version, tokenize

SENTENCES = ["push the red block to the left", "Open the drawer!"]
# Recorded with openai-clip 1.0.1 (clip.tokenize gives the same ids).
TOKEN_IDS = [[49406, 6831, 518, 736, 4593, 531, 518, 1823, 49407], [49406, 1488, 518, 23219, 256, 49407]]
# CLIPTextEncoder(16, 16, 1, 2) after torch.manual_seed(0), on SENTENCES: recorded with the implementation built from
# openai-clip 1.0.1's own model.Transformer and model.LayerNorm (the classes this project's replaced).
RANDOM_TOWER_PARAMETER_SUM = 41.82572787440208
RANDOM_TOWER_EMBEDDINGS = [
    [0.24386103, 0.97508073, 1.32517529, -0.52564323, 1.00685978, -0.20057437, 1.97656894, 1.35996604, 0.45359164,
     1.22707903, -1.30715513, -0.21435830, -1.00777173, -0.23896143, -0.30182630, 1.94696736],
    [-0.49550241, -0.23053312, 1.21771836, -0.03861923, 1.33752787, -0.76860923, 1.24999869, 0.05488648, -0.21753271,
     0.14554355, -0.86163539, -0.74302709, -1.05067670, -0.68721819, -0.01408660, 0.59075290]]


def test_the_tokenizer_gives_clips_token_ids():
    tokens = tokenize(SENTENCES)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int32
    got = [row[row > 0].tolist() for row in tokens]
    assert got == TOKEN_IDS, f"openai-clip {clip_version()}'s tokenizer gives other token ids than 1.0.1: {got}"


def test_seeded_random_text_tower_is_the_one_openai_clips_classes_gave():
    torch.manual_seed(0)
    tower = CLIPTextEncoder(16, 16, 1, 2).eval()
    assert sum(v.double().sum().item() for v in tower.state_dict().values()) == pytest.approx(
        RANDOM_TOWER_PARAMETER_SUM, rel=1e-12)
    with torch.no_grad():
        embeddings = tower(tokenize(SENTENCES).long())
    torch.testing.assert_close(embeddings, torch.tensor(RANDOM_TOWER_EMBEDDINGS), rtol=0, atol=1e-6)


def test_the_text_tower_keeps_clips_parameter_names_and_saves_no_mask():
    names = set(CLIPTextEncoder(16, 16, 2, 2).state_dict())
    block = {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
             "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
             "ln_2.bias"}
    expected = {f"transformer.resblocks.{i}.{name}" for i in range(2) for name in block} | {
        "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection"}
    assert names == expected


def test_fp16_text_tower_is_cast_as_clip_load_casts_it():
    """clip_precision=fp16 (the default on CUDA): openai-clip's convert_weights casts only the linear and attention
    weights and the text projection; the LayerNorms and embeddings stay fp32. A tower cast whole (LayerNorm weights
    in fp16) cannot even run its fp32 LayerNorm."""
    torch.manual_seed(0)
    tower = CLIPTextEncoder(16, 16, 1, 2).eval()
    reference = copy.deepcopy(tower)
    tower.half_as_clip()
    dtypes = {name: t.dtype for name, t in tower.state_dict().items()}
    half = {n for n, d in dtypes.items() if d == torch.float16}
    assert half == {n for n in dtypes if ".attn." in n or ".mlp." in n} | {"text_projection"}, dtypes
    encoders = build_encoders(tiny_config().replace(clip_precision="fp16"), "cpu")
    assert encoders.clip_text.text_projection.dtype == torch.float16
    assert encoders.clip_text.ln_final.weight.dtype == torch.float32
    with torch.no_grad():
        tokens = tokenize(SENTENCES).long()
        got, expected = tower(tokens), reference(tokens)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2)
        assert torch.isfinite(encoders.encode_text(tokenize(SENTENCES))).all()
