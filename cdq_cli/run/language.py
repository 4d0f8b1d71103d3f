"""Causal language models as a :class:`~cdq_cli.run.kinds.ModelKind`: text calibration windows,
perplexity computed block by block, the tokenizer saved beside the weights, and reopening a model
from an output folder.

Models open lazily (:func:`cdq_cli.models.lazy.open_causal_lm`): the skeleton on the meta device,
weights read from their shards one block at a time, so quantizing and evaluating a model needs
memory for about one block, whatever its depth. GGUF files open resident (dequantized whole).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .kinds import Calibration, Loaded, Score, override_sections, skipped_layers
from .plan import EvalRequest, Plan, UsageError, compute_dtype, model_dtype

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
    transforms = True

    def read_data(self, plan: Plan) -> Texts:
        from ..calib import load_texts

        request = plan.request
        refuse_image_data(request.target, "--calib", request.calib)
        if request.eval_data is not None:
            refuse_image_data(request.target, "--eval", request.eval_data)
        held_out = evaluation_texts(request.eval_data) if request.eval_data is not None else None
        return Texts(load_texts(request.calib), held_out)

    def load(self, plan: Plan, note: Any) -> Loaded:
        note(f"loading {plan.request.target}")
        loaded = open_model(plan.request.target, plan.request.dtype, device=plan.device)
        if plan.settings.transform != "none":
            try:
                apply_transform(loaded, plan.settings.transform, plan.request.seed, note)
            except BaseException:
                loaded.close()
                raise
        return loaded

    def preflight(self, plan: Plan, loaded: Loaded, layers: dict[str, nn.Module | torch.Tensor]) -> None:
        """What the export (--format) cannot hold is refused now, before any work."""
        if plan.export_dest is None:
            return
        from ..models import quantizable_layers
        from ..store.exports import preflight

        settings = plan.settings
        planned = {
            name: (tuple(layer.shape if isinstance(layer, torch.Tensor) else layer.weight.shape), spec)
            for name, layer in layers.items()
            if (spec := settings.grid_for(name)) is not None
        }
        skipped = [rule.pattern for rule in settings.overrides if rule.spec is None]
        kept = [name for name in quantizable_layers(loaded.adapter, loaded.model) if name not in planned]
        preflight(
            plan.request.export_format,
            planned,
            skipped=skipped,
            method=settings.method,
            model_type=getattr(getattr(loaded.model, "config", None), "model_type", None),
            kept=kept,
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
        stats: dict[str, Any] = {}
        windows = calibration_windows(
            data.calibration,
            loaded.tokenizer,
            nsamples=request.nsamples,
            seqlen=length,
            seed=request.seed,
            stats=stats,
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
        warnings = []
        needed, held = request.nsamples * length, stats.get("source_tokens")
        if held is not None and 2 * held <= needed:  # each token in about needed / held windows
            warnings.append(
                f"the calibration text {request.calib} holds {held} tokens, far fewer than --nsamples "
                f"{request.nsamples} x --seqlen {length} = {needed}: its windows repeat each token about "
                f"{needed / held:.0f} times; give more text or fewer samples"
            )
        return Calibration(list(windows.split(request.batch_size)), describe, windows, warnings)

    def score(
        self,
        loaded: Loaded,
        data: Texts,
        plan: Plan,
        reference: Any = None,
        written: Path | None = None,
        ranks: Any = None,
    ) -> Score:
        from ..evaluate.perplexity import default_seqlen

        assert data.evaluation is not None
        request = plan.request
        model = open_output(written, compute=loaded.compute_dtype) if written is not None else loaded
        try:
            metrics = perplexity_of(
                model,
                data.evaluation,
                seqlen=request.eval_seqlen or default_seqlen(loaded.model),
                device=plan.device,
                max_windows=request.eval_max_windows,
                batch_size=request.batch_size,
                policy=request.offload_activations,
                source=request.eval_data,
                ranks=ranks,
            )
        finally:
            if written is not None:
                model.close()
        return Score(metrics)

    def evaluation(self, plan: Plan, quantized: Score, full_precision: Score) -> dict[str, Any]:
        return {
            "data": plan.request.eval_data,
            **quantized.metrics,
            "fp_ppl": full_precision.metrics["ppl"],
            "fp": full_precision.metrics,
        }

    def report_sections(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        return override_sections(loaded, plan)

    def table_info(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        from .gguf import table_info

        skipped = skipped_layers(loaded, plan)
        transform = loaded.extra.get("transform")
        return {
            **({"skipped": skipped} if skipped else {}),
            **({"transform": transform} if transform else {}),
            **table_info(plan.settings),
        }

    def evaluate_target(self, request: EvalRequest, device: torch.device) -> dict[str, Any]:
        from ..evaluate.perplexity import default_seqlen
        from ..store.folder import is_quantized_folder
        from ..store.reopen import is_quantized_checkpoint

        if request.tasks is not None:
            return zero_shot(request, device)
        assert request.data is not None
        refuse_image_data(request.target, "--data", request.data)
        texts = evaluation_texts(request.data)
        if is_quantized_folder(request.target) or is_quantized_checkpoint(request.target):
            opener = open_output if is_quantized_folder(request.target) else open_exported
            loaded = opener(Path(request.target), choice=request.dtype, device=device)
            if loaded.tokenizer is None:
                loaded.close()
                raise UsageError(f"{request.target} holds no tokenizer")
        else:
            loaded = open_model(request.target, request.dtype, device=device)
        try:
            result = perplexity_of(
                loaded,
                texts,
                seqlen=request.seqlen or default_seqlen(loaded.model),
                device=device,
                max_windows=request.max_windows,
                batch_size=request.batch_size,
                policy=request.offload_activations,
                source=request.data,
            )
        finally:
            loaded.close()
        dtypes = {"dtype": _name(loaded.dtype), "compute_dtype": _name(loaded.compute_dtype)}
        return {"target": request.target, "data": request.data, **result, **dtypes}


def apply_transform(loaded: Loaded, transform: str, seed: int, note: Any) -> None:
    """``--transform`` on an opened model, before any work (a family that cannot take it is refused
    in one line): ``hadamard`` rotates the weights as they are read (or in place when resident);
    ``awq`` is searched block by block by the driver, so here its layout is only checked. The
    description goes to ``loaded.extra["transform"]`` (report.json, quantization.json)."""
    from ..transforms.awq import N_GRID, SEARCH_TOKENS
    from ..transforms.rotation import TransformError, rotate_model, stream_of

    family = getattr(loaded.adapter, "family", None)
    if family is None:
        raise TransformError(f"--transform {transform} is for causal LMs with a known layout")
    stream_of(family, loaded.model.config, transform)
    if transform == "hadamard":
        blocks = [loaded.adapter.block_name(i) for i in range(len(loaded.adapter.blocks(loaded.model)))]
        weights, described = rotate_model(loaded.model, family, blocks, loaded.weights, seed)
        if weights is not None:
            loaded.weights = weights
        note(f"--transform hadamard: R1 {described['r1']['kind']}, R2 {described['r2']['kind']}")
    else:
        described = {
            "name": "awq",
            "grid": N_GRID,
            "search_tokens": SEARCH_TOKENS,
            "criterion": "squared error of the inspected module's output, readers rounded to the run's grid",
            "runtime_ops": "none: folded into the weights",
        }
    loaded.extra["transform"] = described


def zero_shot(request: EvalRequest, device: torch.device) -> dict[str, Any]:
    """``cdq eval --tasks``: lm-eval's zero-shot accuracy of a model or an output folder. The tasks
    are built (their data read) first; then the model is loaded WHOLE (lm-eval's wrapper runs a
    whole model: an output folder through :func:`load_quantized`, a plain model resident)."""
    from ..evaluate.zeroshot import build_tasks, evaluate_tasks, parse_tasks
    from ..models import load_causal_lm
    from ..offline import hub_offline
    from ..store.folder import is_quantized_folder, read_table, table_dtype
    from ..store.reopen import is_quantized_checkpoint, load_quantized, load_whole

    if request.seqlen is not None or request.max_windows is not None:
        raise UsageError("--seqlen and --max-windows are perplexity options; --tasks scores whole items")
    trust = request.trust_task_code
    tasks = parse_tasks(request.tasks or "", offline=hub_offline, trust_code=trust)
    built = build_tasks(tasks, trust_code=trust)
    if is_quantized_folder(request.target):
        stored = table_dtype(read_table(request.target))
        model, tokenizer = load_quantized(request.target, compute_dtype(request.dtype, device, stored))
        held = "the quantized layers dequantized from the output folder, held whole in memory"
    elif is_quantized_checkpoint(request.target):
        exported = open_exported(Path(request.target), choice=request.dtype, device=device)
        model, tokenizer = load_whole(exported, exported.compute_dtype)
        held = "the quantized layers decoded from the checkpoint, held whole in memory"
    else:
        refuse_orphaned_output(request.target)
        dtype = model_dtype(request.dtype)
        model, tokenizer = load_causal_lm(request.target, dtype=torch.float32 if dtype == "auto" else dtype)
        held = "held whole in memory"
    if tokenizer is None:
        raise UsageError(f"{request.target} holds no tokenizer")
    result = evaluate_tasks(
        model,
        tokenizer,
        built,
        device=device,
        batch_size=request.batch_size,
        limit=request.limit,
        trust_code=trust,
    )
    return {"target": request.target, "task_sources": tasks.shown, **result, "model": held}


def open_model(
    target: str, dtype: str, scratch: Path | None = None, device: torch.device = torch.device("cpu")
) -> Loaded:
    """A causal LM opened lazily when it can (see the module doc), with its adapter: kept in its
    checkpoint's dtype, computed in the ``--dtype`` choice's dtype for ``device``
    (:func:`~cdq_cli.run.plan.compute_dtype`). A model held whole (GGUF, pickled checkpoints) is
    loaded in the compute dtype (auto: float32)."""
    from ..models import adapter_for
    from ..models.lazy import LazyModel, open_causal_lm
    from ..store.checkpoint import CheckpointWeights

    refuse_orphaned_output(target)
    opened = open_causal_lm(target, dtype=model_dtype(dtype), scratch=scratch)
    if not isinstance(opened, LazyModel):
        model, tokenizer = opened
        return Loaded(model, adapter_for(model), tokenizer)
    weights = CheckpointWeights(opened.index, opened.loader, opened.offload)
    try:
        stored = next(opened.model.parameters()).dtype
        compute = compute_dtype(dtype, device, stored)
        return Loaded(opened.model, adapter_for(opened.model), opened.tokenizer, weights, compute=compute)
    except BaseException:
        weights.close()
        raise


def open_output(
    folder: Path | str,
    *,
    compute: torch.dtype | None = None,
    choice: str = "auto",
    device: torch.device = torch.device("cpu"),
) -> Loaded:
    """A cdq output folder opened lazily (:func:`cdq_cli.store.reopen.open_output`), with its
    adapter, computed in ``compute`` (default: the ``--dtype`` ``choice``'s dtype for ``device``)."""
    from ..store.reopen import open_output as reopen

    return _with_adapter(reopen(folder), compute=compute, choice=choice, device=device)


def open_exported(
    folder: Path | str,
    *,
    compute: torch.dtype | None = None,
    choice: str = "auto",
    device: torch.device = torch.device("cpu"),
) -> Loaded:
    """A GPTQ or compressed-tensors checkpoint opened lazily, decoded by cdq block by block
    (:func:`cdq_cli.store.reopen.open_exported`); any other quantized checkpoint, which cdq cannot
    decode, loaded whole through transformers."""
    from ..models import adapter_for, load_causal_lm
    from ..store.reopen import open_exported as reopen

    opened = reopen(folder)
    if opened is None:
        model, tokenizer = load_causal_lm(str(folder), dtype=torch.float32)
        return Loaded(model, adapter_for(model), tokenizer)
    return _with_adapter(opened, compute=compute, choice=choice, device=device)


def _with_adapter(
    opened: Any,
    *,
    compute: torch.dtype | None = None,
    choice: str = "auto",
    device: torch.device = torch.device("cpu"),
) -> Loaded:
    from ..models import adapter_for

    if compute is None:
        compute = compute_dtype(choice, device, opened.weights.dtype)
    return Loaded(opened.model, adapter_for(opened.model), opened.tokenizer, opened.weights, compute=compute)


def perplexity_of(
    loaded: Loaded,
    texts: list[str],
    *,
    seqlen: int,
    device: torch.device,
    max_windows: int | None = None,
    batch_size: int = 8,
    policy: str = "auto",
    source: str | None = None,
    ranks: Any = None,
) -> dict[str, Any]:
    """Perplexity (:func:`cdq_cli.evaluate.perplexity.perplexity_on`) of an opened model, its
    logits computed block by block (peak memory: one block plus the activations)."""
    from ..evaluate.perplexity import perplexity_on
    from ..pipeline import forward_blocks
    from ..placement import Placement

    placement = Placement(loaded.model, device, loaded.weights, dtype=loaded.compute)

    def forward(batches: list[torch.Tensor]) -> Any:
        return forward_blocks(loaded.model, loaded.adapter, placement, batches, policy)

    return perplexity_on(
        texts,
        loaded.tokenizer,
        forward,
        seqlen=seqlen,
        max_windows=max_windows,
        batch_size=batch_size,
        source=source,
        ranks=ranks,
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refuse_orphaned_output(target: str) -> None:
    """A cdq output folder that lost its quantization.json is not a plain model: say so."""
    from ..store.folder import CheckpointError, orphaned_output
    from ..store.names import MARKER

    if orphaned_output(target):
        raise CheckpointError(f"{target} is a cdq output folder without its {MARKER}: it cannot be loaded")


def refuse_image_data(target: str, flag: str, source: str) -> None:
    """An image source given for a model that is not an image classifier cdq knows: the model is
    what is unknown (a misspelt timm name, say), so say that rather than blame the data."""
    from ..calib.images import HF_PREFIX, SAMPLE_SET
    from ..models.causal_lm import _looks_like_hub_id

    if source.lower() == SAMPLE_SET or source.startswith(HF_PREFIX):
        if not Path(target).expanduser().exists() and not _looks_like_hub_id(target):
            raise UsageError(f"no such file or folder: {target}")
        raise UsageError(
            f"{flag} {source} is image data, but {target} is not an image classifier cdq knows "
            "(timm/NAME, a timm architecture name, or any model with --checkpoint FILE)"
        )


def evaluation_texts(data: str) -> list[str]:
    """Texts of an evaluation source (named sources read their evaluation split)."""
    from ..calib import eval_split, load_texts

    return load_texts(data, split=eval_split(data))
