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
        note(f"loading {plan.request.target}")
        return open_model(plan.request.target, plan.request.dtype)

    def preflight(self, plan: Plan, layers: dict[str, nn.Module | torch.Tensor]) -> None:
        """What the export (--format) cannot hold is refused now, before any work."""
        if plan.export_dest is None:
            return
        from ..store.exports import preflight

        settings = plan.settings
        planned = {
            name: (tuple(layer.shape if isinstance(layer, torch.Tensor) else layer.weight.shape), spec)
            for name, layer in layers.items()
            if (spec := settings.grid_for(name)) is not None
        }
        skipped = [rule.pattern for rule in settings.overrides if rule.spec is None]
        preflight(plan.request.export_format, planned, skipped=skipped, method=settings.method)

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
        model = open_output(written) if written is not None else loaded
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
        skipped = skipped_layers(loaded, plan)
        return {"skipped": skipped} if skipped else {}

    def evaluate_target(self, request: EvalRequest, device: torch.device) -> dict[str, Any]:
        from ..evaluate.perplexity import default_seqlen
        from ..store.folder import is_quantized_folder

        if request.tasks is not None:
            return zero_shot(request, device)
        assert request.data is not None
        texts = evaluation_texts(request.data)
        if is_quantized_folder(request.target) or is_quantized_checkpoint(request.target):
            opener = open_output if is_quantized_folder(request.target) else open_exported
            loaded = opener(Path(request.target))
            if loaded.tokenizer is None:
                loaded.close()
                raise UsageError(f"{request.target} holds no tokenizer")
        else:
            loaded = open_model(request.target, request.dtype)
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
        return {"target": request.target, "data": request.data, **result}


def zero_shot(request: EvalRequest, device: torch.device) -> dict[str, Any]:
    """``cdq eval --tasks``: lm-eval's zero-shot accuracy of a model or an output folder. The tasks
    are built (their data read) first; then the model is loaded WHOLE (lm-eval's wrapper runs a
    whole model: an output folder through :func:`load_quantized`, a plain model resident)."""
    from ..evaluate.zeroshot import build_tasks, evaluate_tasks, parse_tasks
    from ..models import load_causal_lm
    from ..offline import hub_offline
    from ..store.folder import is_quantized_folder

    if request.seqlen is not None or request.max_windows is not None:
        raise UsageError("--seqlen and --max-windows are perplexity options; --tasks scores whole items")
    trust = request.trust_task_code
    tasks = parse_tasks(request.tasks or "", offline=hub_offline, trust_code=trust)
    built = build_tasks(tasks, trust_code=trust)
    if is_quantized_folder(request.target):
        model, tokenizer = load_quantized(request.target)
        held = "the quantized layers dequantized from the output folder, held whole in memory"
    elif is_quantized_checkpoint(request.target):
        model, tokenizer = load_whole(open_exported(Path(request.target)))
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


def open_model(target: str, dtype: str, scratch: Path | None = None) -> Loaded:
    """A causal LM opened lazily when it can (see the module doc), with its adapter."""
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
        return Loaded(opened.model, adapter_for(opened.model), opened.tokenizer, weights)
    except BaseException:
        weights.close()
        raise


def open_output(folder: Path) -> Loaded:
    """A cdq output folder opened lazily: the model's skeleton from its config on the meta device,
    each block dequantized from the shards when its turn comes (the tables checked first)."""
    from ..models.causal_lm import refuse_remote_code
    from ..store.folder import CheckpointError, OutputWeights

    folder = Path(folder)
    weights = OutputWeights(folder)
    if weights.table.get("kind") != KIND:
        raise CheckpointError(
            f"{folder} holds a {weights.table.get('kind')!r} model; only causal LMs load here"
        )
    refuse_remote_code(folder)
    model = _skeleton(folder, weights.dtype)
    return _lazy(folder, model, weights, ties={})


def open_exported(folder: Path) -> Loaded:
    """A quantized checkpoint folder (config.json has a quantization_config). A GPTQ or
    compressed-tensors one (cdq's exports, or another tool's) opens like a cdq output folder: the
    plain model's skeleton from config.json (its quantization_config set aside) on the meta device,
    each block's layers decoded by cdq when its turn comes (:mod:`cdq_cli.store.exported`), so
    scoring it needs memory for about one block. Any other (activation quantization, sparsity,
    other methods) cannot be decoded that way: it is loaded whole through transformers, which runs
    it as its quantizer defines."""
    from ..models import adapter_for, load_causal_lm
    from ..models.causal_lm import refuse_remote_code
    from ..store.exported import ExportedWeights, quantization_block, undecodable
    from ..store.folder import CheckpointError, tied_names

    folder = Path(folder)
    block = quantization_block(folder)
    if block is None:
        raise CheckpointError(f"{folder / 'config.json'} has no quantization_config")
    refuse_remote_code(folder)
    if undecodable(block) is not None:
        model, tokenizer = load_causal_lm(str(folder), dtype=torch.float32)
        return Loaded(model, adapter_for(model), tokenizer)
    model = _skeleton(folder, None)
    model.tie_weights()  # a tied head is not stored (transformers re-ties it from the config)
    classes = {name: [c.__name__ for c in type(m).__mro__] for name, m in model.named_modules()}
    dtype = next(model.parameters()).dtype
    weights = ExportedWeights(folder, block, dtype, classes)
    return _lazy(folder, model, weights, ties=tied_names(model))


def is_quantized_checkpoint(target: str | Path) -> bool:
    """A model folder whose config.json carries a quantization_config (a GPTQ or compressed-tensors
    export, or another quantized checkpoint): opened by :func:`open_exported`, never lazily through
    transformers' disk offload, which leaves quantized weights on the meta device."""
    from ..store.exported import quantization_block

    return quantization_block(Path(target)) is not None


def _skeleton(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model of ``folder``'s config.json on the meta device (computed buffers real), without
    any quantization the config describes (the weights source decodes it); ``dtype`` None: the
    config's own."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..store.folder import DTYPES, CheckpointError

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if dtype is None:  # the config's dtype, from the allow-list (never getattr(torch, <file text>))
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
            name = str(stored).removeprefix("torch.")
            if name not in DTYPES:
                raise ValueError(f"dtype {stored!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[name]
        with init_empty_weights(include_buffers=False):  # parameters on meta; computed buffers real
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"cannot build the model from {folder / 'config.json'}: {exc}") from None


def _lazy(folder: Path, model: nn.Module, weights: Any, *, ties: dict[str, str]) -> Loaded:
    """``model`` (a meta skeleton) with ``weights`` as its source, after checking that the source
    holds exactly the model's tensors (a name ``ties`` maps to a stored one may be missing:
    transformers ties it), its persistent buffers read, and the folder's tokenizer."""
    from transformers import AutoTokenizer

    from ..models import adapter_for
    from ..store.folder import CheckpointError

    expected = set(model.state_dict())
    stored = set(weights.names())
    missing = sorted(name for name in expected - stored if ties.get(name) not in stored)
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        from ..store.names import WEIGHTS

        raise CheckpointError(
            f"{folder / WEIGHTS} does not match config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, buffer in list(model.named_buffers()):  # persistent buffers come from the folder
        if buffer.device.type != "meta" and name in stored:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, weights.tensor(name))
    tokenizer = None
    if any(
        (folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer saved in {folder}: {exc}") from None
    return Loaded(model.eval(), adapter_for(model), tokenizer, weights)


def load_quantized(folder: Path | str) -> tuple[nn.Module, Any]:
    """Rebuild a causal LM from a cdq output folder, whole, on the CPU: (model, tokenizer or None)."""
    return load_whole(open_output(Path(folder)))


def load_whole(loaded: Loaded) -> tuple[nn.Module, Any]:
    """A lazily opened model with every tensor read from its source (ties re-made), on the CPU:
    (model, tokenizer or None); a resident one as it is."""
    from ..store.folder import tied_names

    if loaded.weights is None:
        return loaded.model.eval(), loaded.tokenizer
    stored = set(loaded.weights.names())
    state = {name: loaded.weights.tensor(name) for name in loaded.model.state_dict() if name in stored}
    ties = {name: target for name, target in tied_names(loaded.model).items() if name not in stored}
    loaded.model.load_state_dict(state, assign=True, strict=False)
    loaded.model.tie_weights()
    for name, target in ties.items():  # what the source leaves to the tie: check that it holds
        if loaded.model.get_parameter(name) is not loaded.model.get_parameter(target):
            from ..store.folder import CheckpointError

            raise CheckpointError(f"{name} is not stored and transformers did not tie it to {target}")
    loaded.close()
    return loaded.model.eval(), loaded.tokenizer


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
    """Perplexity (GPTQ protocol) of an opened model on ``texts``, computed block by block (peak
    memory: one block plus the activations), as a JSON-ready dict. ``source`` is where the texts
    came from: the named source ``c4`` is scored on GPTQ's 256 random validation windows, every
    other text on the non-overlapping windows of its joined token stream. With several ``ranks``
    each scores its range of the windows and the losses are summed."""
    from ..calib import C4_EVAL_WINDOWS, c4_validation_windows, evaluation_ids
    from ..evaluate.perplexity import C4_PROTOCOL, PPL_PROTOCOL, result_of, window_nll, windows_of
    from ..pipeline import forward_blocks
    from ..placement import Placement

    if source is not None and source.lower() == "c4":
        count = min(C4_EVAL_WINDOWS, max_windows or C4_EVAL_WINDOWS)
        chunks = c4_validation_windows(texts, loaded.tokenizer, seqlen=seqlen, count=count)
        stream, protocol = chunks.numel(), C4_PROTOCOL
    else:
        ids = evaluation_ids(texts, loaded.tokenizer)
        chunks, stream, protocol = windows_of(ids, seqlen, max_windows), ids.shape[1], PPL_PROTOCOL
    batches = list(chunks.split(batch_size))
    if ranks is not None and ranks.active:
        batches = [batches[b] for b in ranks.batches(len(batches))]
    placement = Placement(loaded.model, device, loaded.weights)
    nll_sum = 0.0
    for batch, logits in zip(
        batches, forward_blocks(loaded.model, loaded.adapter, placement, batches, policy), strict=True
    ):
        nll_sum += window_nll(logits, batch.to(logits.device)).sum().item()
    if ranks is not None and ranks.active:
        nll_sum = ranks.sum_value(nll_sum)
    return result_of(nll_sum, chunks, stream, protocol).to_dict()


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
