"""--stage export: a nanor1 checkpoint written as HuggingFace's DeepseekV3ForCausalLM loads it.

The second code path is transformers itself: its from_pretrained reads out_dir/hf/ (the per-expert
names of the published DeepSeek-V3 checkpoints, which it stacks on load) and its forward pass must
give nanor1's logits at every position, with a low-rank query or a plain one, with group-limited
routing, and with router biases that change which experts are chosen. nanor1 itself never imports
transformers; the export needs neither it nor safetensors (then it writes pytorch_model.bin).
"""
import ast
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import nanor1
import plumbing
from marks import needs
from moe import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

BASE = dict(vocab_size=nanor1.enc.n_vocab, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3,
            n_dense_layers=1, n_heads=2, n_routed_experts=4, n_shared_experts=2,
            n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=12, route_scale=2.5, rope_theta=500.0, max_seq_len=64)
CASES = {   # each differs from the defaults where a wrong mapping would show
    "plain_q": dict(q_lora_rank=0),
    "low_rank_q": dict(q_lora_rank=12),
    "group_limited": dict(q_lora_rank=12, n_routed_experts=8, n_expert_groups=4,
                          n_limited_groups=2, n_activated_experts=3),
    "no_shared_experts": dict(n_shared_experts=0),
}


@pytest.fixture(scope="module")
def transformers():
    """transformers, or a skip where it is not installed (never in CI: requirements-dev.txt)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("transformers is in requirements-dev.txt: CI must run the export tests")
        pytest.skip("transformers is not installed (pip install -r requirements-dev.txt)")


@torch.no_grad()
def random_model(seed=0, **kw) -> Transformer:
    """Weights big enough that attention is far from uniform and logits are O(1), so 1e-4 is a
    real tolerance; norms away from 1; router biases that move experts in and out of the top-k."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(ModelConfig(**{**BASE, **kw}))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    for gate in model.gates():
        gate.bias.copy_(0.3 * torch.randn(gate.bias.shape, generator=g))
    return model.eval()


def export(model, tmp_path, extra=()) -> str:
    """model -> a checkpoint -> `nanor1.py --stage export`, as a user runs it -> out_dir/hf."""
    ckpt = str(tmp_path / "model.pt")
    plumbing.save_checkpoint(ckpt, model, nanor1.Config())
    nanor1.main(["--stage", "export", "--init_from", ckpt, "--out_dir", str(tmp_path),
                 "--threads", "1", *extra])
    return str(tmp_path / "hf")


def tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = nanor1.prompt_tokens("(47+85)*3-29") + nanor1.encode("<think>47+85:7+5=12")
    rand = torch.randint(0, nanor1.enc.n_vocab, (1, len(prompt)), generator=g)
    return torch.cat([torch.tensor([prompt]), rand])                           # (2, T)


def published_names(c: ModelConfig) -> set:
    """The tensor names of a DeepSeek-V3 checkpoint as published (without its MTP layer), from
    the model's config alone."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    mlp = ("gate_proj", "up_proj", "down_proj")
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        q = ("q_proj",) if c.q_lora_rank == 0 else ("q_a_proj", "q_a_layernorm", "q_b_proj")
        attn = q + ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{n}.weight" for n in attn}
        if i < c.n_dense_layers:
            names |= {f"{p}mlp.{n}.weight" for n in mlp}
            continue
        names |= {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}
        names |= {f"{p}mlp.experts.{e}.{n}.weight" for e in range(c.n_routed_experts) for n in mlp}
        names |= {f"{p}mlp.shared_experts.{n}.weight" for n in mlp}
    return names


def hf_logits(transformers, path, x):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers did not load every tensor: {problems}"
    with torch.no_grad():
        return hf.eval(), hf(x).logits


@pytest.mark.parametrize("case", list(CASES))
@needs("rmsnorm_rope", "gate")   # forward passes in eval mode
def test_transformers_loads_the_export_and_gives_nanor1s_logits(transformers, tmp_path, case):
    model = random_model(**CASES[case])
    path = export(model, tmp_path)
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["model_type"] == "deepseek_v3"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_nextn_predict_layers"] == 0 and config["rope_interleave"] is True
    from safetensors.torch import load_file
    written = load_file(os.path.join(path, "model.safetensors"))
    assert set(written) == published_names(model.cfg)
    x = tokens()
    with torch.no_grad():
        ours = model(x)[0]
    assert ours.std() > 0.5, "logits too flat for 1e-4 to mean anything"
    hf, theirs = hf_logits(transformers, path, x)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM" and hf.dtype == torch.float32
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"{case}: HF logits differ from nanor1's by {diff:.2e}"
    # the router biases survived the trip, and they matter: without them other experts are chosen
    for i, gate in enumerate(model.gates(), start=model.cfg.n_dense_layers):
        theirs_bias = hf.model.layers[i].mlp.gate.e_score_correction_bias
        assert gate.bias.abs().min() > 0 and torch.equal(theirs_bias, gate.bias)
    with torch.no_grad():
        for gate in model.gates():
            gate.bias.zero_()
        assert (model(x)[0] - theirs).abs().max() > 1e-2, "the biases choose no other expert"
    if case == "group_limited":   # the limit matters too: all groups allowed, other experts win
        free = random_model(**{**CASES[case], "n_limited_groups": 4})
        with torch.no_grad():
            assert (free(x)[0] - theirs).abs().max() > 1e-2


@needs("rmsnorm_rope", "gate", "mla_absorb")   # forward passes in eval mode, nanor1.generate
def test_without_safetensors_or_transformers_the_export_is_a_pytorch_model_bin(transformers,
                                                                               tmp_path):
    model = random_model(seed=3, q_lora_rank=12)
    path = export(model, tmp_path)   # first with safetensors: model.safetensors
    ckpt = tmp_path / "model.pt"
    # the same export where neither package can be imported (None in sys.modules: ImportError)
    code = ("import sys; sys.modules['safetensors'] = sys.modules['transformers'] = None; "
            "import nanor1; nanor1.main(sys.argv[1:]); "
            "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None")
    r = subprocess.run([sys.executable, "-c", code, "--stage", "export", "--init_from", str(ckpt),
                        "--out_dir", str(tmp_path), "--threads", "1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pytorch_model.bin" in r.stdout
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json",
                                        "pytorch_model.bin"], "the older model.safetensors stays"
    written = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    assert set(written) == published_names(model.cfg)
    x = tokens(seed=4)
    with torch.no_grad():
        ours = model(x)[0]
    hf, theirs = hf_logits(transformers, path, x)
    assert (ours - theirs).abs().max() <= 1e-4
    # and transformers' generate, as the README shows it, decodes what nanor1 decodes
    prompt = nanor1.prompt_tokens("(47+85)*3-29=")
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    ours = nanor1.generate(model, [prompt], 16, greedy=True)[0][0]
    assert nanor1.completion_text(out[0, len(prompt):]) == nanor1.completion_text(ours)


# -----------------------------------------------------------------------------
# What cannot be exported: one line on stderr, a non-zero exit code, nothing written

def run_export(out_dir, *flags):
    r = subprocess.run([sys.executable, "nanor1.py", "--stage", "export", "--threads", "1",
                        "--out_dir", str(out_dir), *flags],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


def test_a_missing_or_broken_checkpoint_is_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for init_from, says in ((tmp_path / "none.pt", "not found"), (tmp_path / "junk.pt",
                                                                  "cannot load checkpoint")):
        code, err = run_export(tmp_path / "out", "--init_from", str(init_from))
        assert code != 0 and err.count("\n") == 1 and err.startswith("error: "), err
        assert says in err and "Traceback" not in err
    assert not (tmp_path / "out" / "hf").exists()


@needs("rmsnorm_rope")   # a model is built (its rope table), none runs
def test_an_unwritable_target_or_a_softmax_router_is_one_line(tmp_path):
    ckpt = str(tmp_path / "model.pt")
    plumbing.save_checkpoint(ckpt, random_model(), nanor1.Config())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "hf").write_text("a file where the export's folder would go")
    code, err = run_export(tmp_path / "out", "--init_from", ckpt)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: cannot export to ") and "writable directory" in err, err
    softmax = str(tmp_path / "softmax.pt")
    plumbing.save_checkpoint(softmax, random_model(score_func="softmax"), nanor1.Config())
    code, err = run_export(tmp_path / "o2", "--init_from", softmax)
    assert code == 2 and err.count("\n") == 1 and "sigmoid" in err, err
    assert not (tmp_path / "o2" / "hf").exists()


def test_nanor1_never_imports_transformers_and_requires_neither_package():
    sources = ["nanor1.py", "moe.py", "plumbing.py", "report.py", "data/arith.py"]
    for name in sources:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module}
        assert "transformers" not in imported, name
    requirements = open(os.path.join(ROOT, "requirements.txt")).read()
    assert "transformers" not in requirements and "safetensors" not in requirements
    dev = {re.split(r"[=<>~!\[; ]", line.strip())[0] for line in
           open(os.path.join(ROOT, "requirements-dev.txt")) if line.strip()[:1].isalpha()}
    assert {"transformers", "safetensors"} <= dev, dev
