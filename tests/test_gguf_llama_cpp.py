"""cdq's GGUF files checked by llama.cpp itself: ``make test-gguf`` builds llama-cpp-python from its
source distribution (its own venv, CPU build) and runs this module with

* ``CDQ_LLAMA_PYTHON``: that venv's Python (llama_cpp, numpy);
* ``CDQ_LLAMA_BIN``: the build's bin folder (libggml-base.so, llama-quantize, llama-imatrix);
* ``CDQ_LLAMA_SRC``: llama.cpp's sources from the sdist (convert_hf_to_gguf.py, gguf-py).

Without them every test here is skipped (the build takes about 35 minutes on 2 shared cores, too
long for ``make test``). What is checked:

* ggml's own quantizer (``ggml_quantize_chunk`` through ctypes) chooses exactly the stored scales
  cdq's reimplementation chooses, every type, reference and importance paths, random and real
  weights; for the 256-block types the codes too (llama.cpp re-rounds on the stored grid);
* llama.cpp runs cdq's files: its logits give the perplexity transformers gives on the same
  windows (within llama.cpp's own activation quantization), the same greedy tokens, and it
  tokenizes text as transformers does (the tokenizer metadata works);
* llama-quantize gives every tensor of stories260K the type cdq's file has for Q4_K_M, Q3_K_M,
  Q2_K and Q4_0, and the metadata llama.cpp's converter writes equals cdq's (tokenizer included);
* the same for tiny MoE files: llama.cpp runs cdq's Qwen3-MoE, Mixtral and Qwen2-MoE files like
  transformers runs cdq's folder, and llama-quantize gives a tiny Mixtral (8 experts: its Mixtral
  rules) and Qwen2-MoE (shared expert) the types cdq's file has, with the converter's metadata;
* the benchmark's importance matrix (scripts/_llama_imatrix.py) equals llama-imatrix's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_runner import cli as run_cli
from test_gguf_export import save_tiny_mixtral, save_tiny_qwen2_moe, save_tiny_qwen3_moe
from test_gguf_grids import awkward_weights

from cdq_cli.solvers import GridSpec
from cdq_cli.solvers import gguf as G
from cdq_cli.solvers.gguf_types import BLOCK_TYPES
from cdq_cli.solvers.llama_fit import fit_parts
from cdq_cli.store.gguf_blocks import unpack
from cdq_cli.store.reopen import load_quantized

REPO = Path(__file__).resolve().parents[1]
PYTHON, BIN, SRC = (os.environ.get(k) for k in ("CDQ_LLAMA_PYTHON", "CDQ_LLAMA_BIN", "CDQ_LLAMA_SRC"))
pytestmark = pytest.mark.skipif(
    not (PYTHON and BIN and SRC), reason="llama.cpp is not built: run make test-gguf (CDQ_LLAMA_* unset)"
)
FAST = ["--nsamples", "8", "--seqlen", "64", "--quiet"]


def cli(capsys: pytest.CaptureFixture, *args: object) -> None:
    """``cdq ARGS...`` in-process (tests/cli_runner.py), which must succeed."""
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err


def ggml_quantize(name: str, weight: torch.Tensor, importance: torch.Tensor | None) -> np.ndarray:
    lib = ctypes.CDLL(str(Path(BIN) / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    kind = BLOCK_TYPES[name]
    x = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    rows, columns = x.shape
    out = np.zeros(kind.bytes_for(rows, columns), dtype=np.uint8)
    imat = None if importance is None else np.ascontiguousarray(importance.numpy(), dtype=np.float32)
    pointer = None if imat is None else imat.ctypes.data
    lib.ggml_quantize_chunk(kind.ggml_id, x.ctypes.data, out.ctypes.data, 0, rows, columns, pointer)
    return out


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_ggml_chooses_the_scales_cdq_reimplements(name: str, stories_layers) -> None:
    real = torch.cat([layer.weight.reshape(-1) for layer in stories_layers]).float()
    for weight in (awkward_weights(), real[: 128 * 512].reshape(128, 512)):
        for importance in (None, torch.rand(512, generator=torch.Generator().manual_seed(3)) + 0.01):
            raw = ggml_quantize(name, weight, importance)
            codes, theirs = unpack(name, raw, *weight.shape)
            ours = fit_parts(weight, name, importance)
            for key, value in ours.items():
                assert torch.equal(value, theirs[key].to(value.dtype)), (name, key, importance is not None)
            if BLOCK_TYPES[name].k_quant:  # re-rounded on the stored grid: the codes are nearest ones
                grid = G.grid_of(GridSpec.of_type(name), ours)
                live = (grid.scale != 0).repeat_interleave(grid.spec.group_size, dim=1)
                assert torch.equal(G.codes_of(weight, grid)[live], codes[live])


def llama_cpp(path: Path, request: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    (tmp_path / "request.json").write_text(json.dumps(request))
    out = tmp_path / "probe.npz"
    probe = REPO / "tests" / "llama_cpp_probe.py"
    proc = subprocess.run(
        [PYTHON, str(probe), str(path), str(tmp_path / "request.json"), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(np.load(out))


def nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean next-token NLL over the windows."""
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1), reduction="mean"
    )
    return float(loss)


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q4_0", "Q8_0"])
def test_llama_cpp_runs_cdq_files_like_transformers(
    kind: str, data_dir, calib, wikitext, tmp_path, capsys
) -> None:
    """stories260K quantized by cdq: llama.cpp's perplexity on 4 WikiText-2 windows of 128 tokens
    is transformers' (on the same GGUF file) within 2%, its greedy continuation of a prompt is the
    same 24 tokens, and it tokenizes text exactly as the model's own tokenizer does."""
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    source = data_dir / "models" / "stories260K"
    out = tmp_path / "q"
    cli(
        capsys,
        "quantize",
        source,
        "--method",
        "cdq",
        *FAST,
        "--calib",
        calib,
        "--format",
        "gguf",
        "--type",
        kind,
        "--output",
        out,
    )
    path = tmp_path / "q-gguf" / f"model-{kind}.gguf"
    tokenizer = LlamaTokenizer.from_pretrained(source)
    text = Path(wikitext).read_text(encoding="utf-8")[:20000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    windows = ids[: 4 * 128].reshape(4, 128)
    prompt = tokenizer("Once upon a time, there was a little girl").input_ids
    sentence = "Lily and Ben went to the park. They saw a big dog!"
    got = llama_cpp(
        path, {"windows": windows.tolist(), "prompt": prompt, "greedy": 24, "text": sentence}, tmp_path
    )
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(windows).logits
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
    ppl_llama, ppl_hf = np.exp(nll(torch.from_numpy(got["logits"]), windows)), np.exp(nll(reference, windows))
    print(
        f"\n{kind}: perplexity llama.cpp {ppl_llama:.4f}, transformers {ppl_hf:.4f}; greedy {greedy.tolist()}"
    )
    assert abs(ppl_llama / ppl_hf - 1) < 0.02, (ppl_llama, ppl_hf)
    assert got["greedy"].tolist() == greedy.tolist()
    assert got["tokens"].tolist() == tokenizer(sentence).input_ids


def converted_f32(source: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(Path(SRC) / "gguf-py")}
    cmd = [
        sys.executable,
        str(Path(SRC) / "convert_hf_to_gguf.py"),
        str(source),
        "--outtype",
        "f32",
        "--outfile",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def fields(path: Path) -> dict[str, object]:
    return {
        key: field.contents()
        for key, field in gguf.GGUFReader(path).fields.items()
        if not key.startswith("GGUF.")
    }


def test_llama_quantize_picks_the_same_types_and_metadata(
    data_dir, calib, wikitext, tmp_path, capsys
) -> None:
    """llama.cpp's converter and llama-quantize on stories260K give every tensor the type cdq's
    file gives it, for four mixes (Q4_0 with an importance matrix, whose rule differs); the
    converter's metadata (hyperparameters and the whole tokenizer) equals cdq's file's."""
    source = data_dir / "models" / "stories260K"
    f32 = converted_f32(source, tmp_path / "f32.gguf")
    imatrix = tmp_path / "imatrix.gguf"
    (tmp_path / "text.txt").write_text(Path(wikitext).read_text(encoding="utf-8")[:30000], encoding="utf-8")
    cmd = [
        str(Path(BIN) / "llama-imatrix"),
        "-m",
        str(f32),
        "-f",
        str(tmp_path / "text.txt"),
        "-c",
        "128",
        "--chunks",
        "8",
        "-o",
        str(imatrix),
    ]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for kind in ("Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0"):
        theirs = tmp_path / f"llama-{kind}.gguf"
        extra = ["--imatrix", str(imatrix)] if kind == "Q4_0" else []
        proc = subprocess.run(
            [str(Path(BIN) / "llama-quantize"), *extra, str(f32), str(theirs), kind], capture_output=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = tmp_path / f"cdq-{kind}"
        cli(
            capsys,
            "quantize",
            source,
            "--method",
            "rtn",
            *FAST,
            "--calib",
            calib,
            "--format",
            "gguf",
            "--type",
            kind,
            "--output",
            out,
        )
        ours = Path(f"{out}-gguf") / f"model-{kind}.gguf"
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
        assert types == {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}, kind
    converter, cdq = fields(f32), fields(ours)
    skip = {
        "general.name",
        "general.file_type",
        "general.quantization_version",
        "general.size_label",
        "general.basename",
        "general.finetune",
    }
    for key, value in converter.items():
        if key not in skip:
            assert cdq.get(key) == value, key


def test_imatrix_reimplementation_equals_llama_imatrix(data_dir, wikitext, tmp_path) -> None:
    """The benchmark's importance matrix (the mean squared input of every matrix, computed by
    hooks in transformers) equals llama-imatrix's on the same tokens: to 1e-5 where nothing has
    passed through attention yet (block 0's q/k/v inputs), to 5e-3 after it (llama.cpp keeps its
    KV cache in float16, which moves the attention outputs by ~2^-11)."""
    spec = importlib.util.spec_from_file_location("_llama_imatrix", REPO / "scripts" / "_llama_imatrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    source = data_dir / "models" / "stories260K"
    f32 = converted_f32(source, tmp_path / "f32.gguf")
    text = Path(wikitext).read_text(encoding="utf-8")[:30000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    theirs = tmp_path / "llama-imatrix.gguf"
    cmd = [
        str(Path(BIN) / "llama-imatrix"),
        "-m",
        str(f32),
        "-f",
        str(tmp_path / "text.txt"),
        "-c",
        "128",
        "--chunks",
        "6",
        "-o",
        str(theirs),
    ]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    tokenizer = LlamaTokenizer.from_pretrained(source)
    ids = torch.tensor(tokenizer(text).input_ids)  # BOS first, as llama.cpp tokenizes the file
    windows = ids[: 6 * 128].reshape(6, 128).clone()
    windows[:, 0] = tokenizer.bos_token_id  # llama-imatrix puts BOS at the start of every chunk
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    sums, counts = module.imatrix_sums(model, windows)
    ours = module.read_imatrix(
        module.write_imatrix(tmp_path / "ours.gguf", sums, counts, chunks=6, chunk_size=128)
    )
    reference = module.read_imatrix(theirs)
    assert set(ours) <= set(reference) and len(ours) == 7 * 5
    for name, value in ours.items():
        exact = name.startswith("blk.0.attn_") and name != "blk.0.attn_output.weight"
        rtol = 1e-5 if exact else 5e-3
        assert torch.allclose(value, reference[name], rtol=rtol, atol=1e-6 * float(reference[name].max())), (
            name
        )


def test_llama_cpp_runs_a_qwen3_moe_file_like_transformers(
    smollm2_tokenizer, calib, tmp_path, capsys
) -> None:
    """A tiny Qwen3-MoE quantized by cdq (experts on Q4_K/Q6_K): llama.cpp's qwen3moe loads it and
    its NLL on random token windows is transformers' (on the same file) within 1% and its centred
    logits point the same way (median cosine > 0.999, above 0.99 at 95% of the positions: where
    a token's router scores nearly tie, llama.cpp's float noise can pick another expert)."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_qwen3_moe(tmp_path / "moe", smollm2_tokenizer)
    out = tmp_path / "q"
    cli(
        capsys, "quantize", folder, "--method", "gptq", *FAST, "--calib", calib, "--format", "gguf",
        "--type", "Q8_0", "--layer", r"experts\.gate_up_proj=Q4_K", "--layer", r"experts\.down_proj=Q6_K",
        "--output", out,
    )  # fmt: skip
    path = tmp_path / "q-gguf" / "model-Q8_0.gguf"
    windows = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    got = llama_cpp(
        path, {"windows": windows.tolist(), "prompt": [1, 2], "greedy": 2, "text": "Hello"}, tmp_path
    )
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(windows).logits
    theirs = torch.from_numpy(got["logits"])
    assert abs(nll(theirs, windows) / nll(reference, windows) - 1) < 0.01
    a, b = theirs - theirs.mean(-1, keepdim=True), reference - reference.mean(-1, keepdim=True)
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1).flatten()
    close = float((cosines > 0.99).float().mean())
    ours_nll, hf_nll = nll(theirs, windows), nll(reference, windows)
    print(f"\nqwen3moe: NLL llama.cpp {ours_nll:.5f}, transformers {hf_nll:.5f}; median cosine of centred "
          f"logits {float(cosines.median()):.5f}, {close:.3f} of the positions above 0.99")  # fmt: skip
    assert float(cosines.median()) > 0.999 and close >= 0.95


def moe_source(kind: str, folder: Path, tokenizers: dict) -> Path:
    """A tiny MoE checkpoint of ``kind`` (tests/test_gguf_export.py's)."""
    if kind == "mixtral":
        return save_tiny_mixtral(folder, tokenizers["stories"])
    return save_tiny_qwen2_moe(folder, tokenizers["smollm2"])


@pytest.fixture
def tokenizers(data_dir, smollm2_tokenizer) -> dict:
    from transformers import LlamaTokenizer

    return {
        "stories": LlamaTokenizer.from_pretrained(data_dir / "models" / "stories260K"),
        "smollm2": smollm2_tokenizer,
    }


MOE_LAYERS = ["--layer", r"experts\.gate_up_proj=Q4_K", "--layer", r"experts\.down_proj=Q6_K"]


@pytest.mark.parametrize(("kind", "mix"), [("mixtral", "Q8_0"), ("qwen2_moe", "Q4_K_M")])
def test_llama_cpp_runs_mixtral_and_qwen2_moe_files_like_transformers_runs_cdqs_folder(
    kind: str, mix: str, tokenizers, calib, tmp_path, capsys
) -> None:
    """A tiny Mixtral (8 experts, llama.cpp's arch llama) and a tiny Qwen2-MoE (shared expert and
    its gate, q/k/v biases) quantized by cdq (experts on Q4_K/Q6_K; the rest Q8_0, or Q4_K_M's
    rules): llama.cpp loads the file and its NLL on random token windows is that of transformers
    running cdq's own output folder within 1%, its centred logits point the same way (median
    cosine > 0.999, above 0.99 at 95% of the positions: near-tied router scores may pick another
    expert under llama.cpp's float noise). Mixtral's attention on Q4_K_M's k-quants, whose dot
    products llama.cpp takes against 8-bit-quantized activations, falls under the second bound
    (0.94 of the positions, while the converter's F32 file of the same model matches transformers
    to a cosine of 0.999997): hence Q8_0 there."""
    folder = moe_source(kind, tmp_path / "moe", tokenizers)
    out = tmp_path / "q"
    cli(
        capsys, "quantize", folder, "--method", "gptq", *FAST, "--calib", calib, "--format", "gguf",
        "--type", mix, *MOE_LAYERS, "--output", out,
    )  # fmt: skip
    path = tmp_path / "q-gguf" / f"model-{mix}.gguf"
    vocab = 512 if kind == "mixtral" else 49152
    windows = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    got = llama_cpp(
        path, {"windows": windows.tolist(), "prompt": [1, 2], "greedy": 2, "text": "Hello"}, tmp_path
    )
    native, _ = load_quantized(out)
    with torch.no_grad():
        reference = native.float()(windows).logits
    theirs = torch.from_numpy(got["logits"])
    a, b = theirs - theirs.mean(-1, keepdim=True), reference - reference.mean(-1, keepdim=True)
    cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1).flatten()
    close = float((cosines > 0.99).float().mean())
    ours_nll, hf_nll = nll(theirs, windows), nll(reference, windows)
    print(f"\n{kind}: NLL llama.cpp {ours_nll:.5f}, transformers on cdq's folder {hf_nll:.5f}; "
          f"median cosine of centred logits {float(cosines.median()):.5f}, "
          f"{close:.3f} of the positions above 0.99")  # fmt: skip
    assert abs(ours_nll / hf_nll - 1) < 0.01
    assert float(cosines.median()) > 0.999 and close >= 0.95


@pytest.mark.parametrize(
    ("kind", "types"), [("mixtral", ("Q4_K_M", "Q3_K_M", "Q2_K")), ("qwen2_moe", ("Q4_K_M",))]
)
def test_llama_quantize_picks_the_same_types_for_moe_files(
    kind, types, tokenizers, calib, tmp_path, capsys
) -> None:
    """llama.cpp's converter and llama-quantize on a tiny Mixtral (8 experts: llama.cpp's Mixtral
    rules) and a tiny Qwen2-MoE (shared expert, its gate kept F32 and 1-D) give every tensor the
    name, shape and type cdq's file gives it, and the converter's metadata equals cdq's."""
    source = moe_source(kind, tmp_path / "moe", tokenizers)
    f32 = converted_f32(source, tmp_path / "f32.gguf")
    for mix in types:
        theirs = tmp_path / f"llama-{mix}.gguf"
        proc = subprocess.run(
            [str(Path(BIN) / "llama-quantize"), str(f32), str(theirs), mix], capture_output=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = tmp_path / f"cdq-{mix}"
        cli(
            capsys, "quantize", source, "--method", "rtn", *FAST, "--calib", calib, "--format", "gguf",
            "--type", mix, "--output", out,
        )  # fmt: skip
        ours = Path(f"{out}-gguf") / f"model-{mix}.gguf"

        def tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
            return {
                t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in gguf.GGUFReader(path).tensors
            }

        assert tensors(ours) == tensors(theirs), mix
    skip = {"general.name", "general.file_type", "general.quantization_version", "general.size_label"}
    skip |= {"general.basename", "general.finetune"}
    converter, cdq = fields(f32), fields(ours)
    for key, value in converter.items():
        if key not in skip:
            assert cdq.get(key) == value, key
