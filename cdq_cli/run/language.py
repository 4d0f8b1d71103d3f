"""Causal language models as a :class:`~cdq_cli.run.kinds.ModelKind`: text calibration windows,
perplexity, the tokenizer saved beside the weights, and rebuilding a model from an output folder."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..placement import home_of, visiting
from .kinds import Calibration, Loaded, Score
from .plan import EvalRequest, Plan, UsageError, model_dtype

KIND = "causal-lm"


@dataclass
class Texts:
    """The text sources of a run: calibration documents and the held-out evaluation text."""

    calibration: list[str]
    evaluation: list[str] | None


class LanguageModels:
    name = KIND
    resumable = True
    exports = True

    def read_data(self, plan: Plan) -> Texts:
        from ..calib import load_texts

        request = plan.request
        held_out = evaluation_texts(request.eval_data) if request.eval_data is not None else None
        return Texts(load_texts(request.calib), held_out)

    def load(self, plan: Plan, note: Any) -> Loaded:
        from ..models import adapter_for, load_causal_lm

        note(f"loading {plan.request.target}")
        refuse_orphaned_output(plan.request.target)
        model, tokenizer = load_causal_lm(
            plan.request.target, dtype=model_dtype(plan.request.dtype, plan.device), device="cpu"
        )
        return Loaded(model, adapter_for(model), tokenizer)

    def preflight(self, plan: Plan, layers: dict[str, nn.Module]) -> None:
        if plan.export_dest is None:
            return
        from ..store.gptq import preflight

        settings = plan.settings
        shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
        preflight(
            shapes,
            bits=settings.bits,
            group_size=settings.group_size,
            sym=settings.sym,
            per_layer=settings.per_layer,
            method=settings.method,
        )

    def calibrate(self, loaded: Loaded, data: Texts, plan: Plan, note: Any) -> Calibration:
        from ..calib import calibration_windows, text_fingerprint
        from ..evaluate.perplexity import default_seqlen

        request = plan.request
        length = request.seqlen or default_seqlen(loaded.model)
        context = default_seqlen(loaded.model, cap=sys.maxsize)
        if length > context:
            raise UsageError(f"--seqlen {length} exceeds the model's context of {context} tokens")
        note(f"calibration: {request.nsamples} x {length} tokens from {request.calib} (seed {request.seed})")
        windows = calibration_windows(
            data.calibration, loaded.tokenizer, nsamples=request.nsamples, seqlen=length, seed=request.seed
        )
        describe = {
            "source": request.calib,
            "sha256": text_fingerprint(data.calibration),
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "nsamples": request.nsamples,
            "seqlen": length,
            "seed": request.seed,
            "tokens": windows.numel(),
        }
        return Calibration(list(windows.split(request.batch_size)), describe, windows)

    def score(self, loaded: Loaded, data: Texts, plan: Plan, reference: Any = None) -> Score:
        from ..evaluate.perplexity import default_seqlen

        assert data.evaluation is not None
        request = plan.request
        metrics = perplexity_of(
            loaded.model,
            loaded.tokenizer,
            data.evaluation,
            seqlen=request.eval_seqlen or default_seqlen(loaded.model),
            device=plan.device,
            max_windows=request.eval_max_windows,
        )
        return Score(metrics)

    def evaluation(self, plan: Plan, quantized: Score, full_precision: Score) -> dict[str, Any]:
        return {
            "data": plan.request.eval_data,
            **quantized.metrics,
            "fp_ppl": full_precision.metrics["ppl"],
            "fp": full_precision.metrics,
        }

    def report_sections(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        return {}

    def table_info(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        return {}

    def evaluate_target(self, request: EvalRequest, device: torch.device) -> dict[str, Any]:
        from ..evaluate.perplexity import default_seqlen
        from ..models import load_causal_lm
        from ..store.folder import is_quantized_folder

        texts = evaluation_texts(request.data)
        if is_quantized_folder(request.target):
            model, tokenizer = load_quantized(request.target)
            if tokenizer is None:
                raise UsageError(f"{request.target} holds no tokenizer")
        else:
            refuse_orphaned_output(request.target)
            model, tokenizer = load_causal_lm(request.target, dtype=model_dtype(request.dtype, device))
        result = perplexity_of(
            model,
            tokenizer,
            texts,
            seqlen=request.seqlen or default_seqlen(model),
            device=device,
            max_windows=request.max_windows,
            batch_size=request.batch_size,
        )
        return {"target": request.target, "data": request.data, **result}


def refuse_orphaned_output(target: str) -> None:
    """A cdq output folder that lost its quantization.json is not a plain model: say so."""
    from ..store.folder import CheckpointError, orphaned_output
    from ..store.names import MARKER

    if orphaned_output(target):
        raise CheckpointError(f"{target} is a cdq output folder without its {MARKER}: it cannot be loaded")


def evaluation_texts(data: str) -> list[str]:
    """Texts of an evaluation source (named sources read their evaluation split)."""
    from ..calib import EVAL_SPLITS, load_texts

    return load_texts(data, split=EVAL_SPLITS.get(data.lower()))


def perplexity_of(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    seqlen: int,
    device: torch.device,
    max_windows: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity (GPTQ protocol) of ``model`` on ``texts``, as a JSON-ready dict; the model
    visits ``device`` for the evaluation."""
    from ..calib import evaluation_ids
    from ..evaluate.perplexity import perplexity

    ids = evaluation_ids(texts, tokenizer)
    with visiting([model], device, home_of(model)):
        result = perplexity(
            model, ids, seqlen=seqlen, max_windows=max_windows, device=device, batch_size=batch_size
        )
    return result.to_dict()


def load_quantized(folder: Path | str) -> tuple[nn.Module, Any]:
    """Rebuild a causal LM from a cdq output folder, on the CPU: (model, tokenizer or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.causal_lm import refuse_remote_code
    from ..store.folder import CheckpointError, quantized_state_dict, read_table, table_dtype
    from ..store.names import WEIGHTS

    folder = Path(folder)
    table = read_table(folder)
    if table.get("kind") != KIND:
        raise CheckpointError(f"{folder} holds a {table.get('kind')!r} model; only causal LMs load here")
    refuse_remote_code(folder)
    state = quantized_state_dict(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot build the model from {folder / 'config.json'}: {exc}") from None
    model = model.to(table_dtype(table))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not match config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    tokenizer = None
    if any(
        (folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer saved in {folder}: {exc}") from None
    return model.eval(), tokenizer
