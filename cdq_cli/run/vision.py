"""timm image classifiers as a :class:`~cdq_cli.run.kinds.ModelKind`: image calibration, top-1 /
top-5 with agreement against the full-precision model, and rebuilding a model from an output
folder (docs/vision.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..placement import home_of, visiting
from .kinds import Calibration, Loaded, Score, override_sections
from .plan import EvalRequest, Plan, UsageError

VISION_NOTES = {
    "batchnorm": "kept, not folded",
    "grouped_convs": (
        "grouped/depthwise convs: one problem per group with that group's own Σ "
        "((C_in/G)·kh·kw square; kh·kw for depthwise), solved by the chosen method; "
        "--per-layer means one scale per group there"
    ),
}
EVAL_BATCH = 32


@dataclass
class Images:
    """The image sources of a run."""

    calibration: Any  # calib.images.ImageSet
    evaluation: Any | None


class VisionModels:
    name = "timm-classifier"
    resumable = False
    exports = False
    transforms = False

    def read_data(self, plan: Plan) -> Images:
        from ..calib import NAMED_SOURCES
        from ..calib.images import open_images
        from ..models.timm_models import check_spec

        request = plan.request
        check_spec(timm_spec(request.target, request.checkpoint, request.model_args))
        if request.calib.lower() in NAMED_SOURCES:
            raise UsageError(
                f"vision models calibrate on images, not {request.calib!r}: pass --calib IMAGE_FOLDER, "
                "imagenet-sample or hf:NAME[:split]"
            )
        images = open_images(request.calib, split="train")
        held_out = open_images(request.eval_data) if request.eval_data is not None else None
        if held_out is not None and held_out.labels is None:
            raise UsageError(
                f"--eval {request.eval_data}: cannot tell the images' classes (use class subfolders)"
            )
        return Images(images, held_out)

    def load(self, plan: Plan, note: Any) -> Loaded:
        from ..models.timm_models import data_config, load_timm
        from ..models.vision import vision_adapter_for

        request = plan.request
        spec = timm_spec(request.target, request.checkpoint, request.model_args)
        note(f"loading timm model {spec.name}" + (f" from {spec.checkpoint}" if spec.checkpoint else ""))
        model = load_timm(spec)
        adapter = vision_adapter_for(
            model, quantize_embed=request.quantize_embed, quantize_head=request.quantize_head
        )
        return Loaded(model, adapter, extra={"spec": spec, "data_config": data_config(model)})

    def preflight(self, plan: Plan, loaded: Loaded, layers: dict[str, nn.Module]) -> None:
        return None

    def calibrate(self, loaded: Loaded, data: Images, plan: Plan, note: Any) -> Calibration:
        from ..calib.images import calibration_images

        request = plan.request
        images = data.calibration
        used = min(request.nsamples, len(images)) if not request.augment else request.nsamples
        note(
            f"calibration: {used} images from {request.calib} (seed {request.seed}"
            + (", augmented" if request.augment else "")
            + ")"
            + (f"; only {len(images)} available" if used < request.nsamples else "")
        )
        config = loaded.extra["data_config"]
        calib, indices = calibration_images(
            images, config, nsamples=request.nsamples, seed=request.seed, augment=request.augment
        )
        describe = {
            "source": request.calib,
            "layout": images.layout,
            "sha256": images.fingerprint(),
            "images_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
            "nsamples": request.nsamples,
            "images": len(indices),
            "seed": request.seed,
            "augment": request.augment,
            "transform": config,
        }
        return Calibration(list(calib.split(request.batch_size)), describe, calib)

    def score(
        self,
        loaded: Loaded,
        data: Images,
        plan: Plan,
        reference: Any = None,
        written: Path | None = None,
        ranks: Any = None,
    ) -> Score:
        """Top-1 of the model in memory (a classifier is small; after quantizing it holds exactly
        the weights written, which tests check on reload)."""
        result, predictions = top1_of(
            loaded.model, data.evaluation, loaded.extra["data_config"], plan.device, EVAL_BATCH, reference
        )
        return Score(result.to_dict(), predictions)

    def evaluation(self, plan: Plan, quantized: Score, full_precision: Score) -> dict[str, Any]:
        return {"data": plan.request.eval_data, **quantized.metrics, "fp": full_precision.metrics}

    def report_sections(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        import timm

        adapter, spec = loaded.adapter, loaded.extra["spec"]
        return {
            **override_sections(loaded, plan),
            "vision": {
                "timm": timm.__version__,
                "architecture": spec.name,
                "checkpoint": spec.checkpoint,
                "embed": "quantized" if adapter.quantize_embed else "full precision",
                "embed_layers": adapter.layers("embed"),
                "head": "quantized" if adapter.quantize_head else "full precision",
                "head_layers": adapter.layers("head"),
                **VISION_NOTES,
            },
        }

    def table_info(self, loaded: Loaded, plan: Plan) -> dict[str, Any]:
        return {
            "timm": {**loaded.extra["spec"].to_dict(), "data_config": loaded.extra["data_config"]},
            "quantize_embed": plan.request.quantize_embed,
            "quantize_head": plan.request.quantize_head,
        }

    def evaluate_target(self, request: EvalRequest, device: torch.device) -> dict[str, Any]:
        """Top-1/top-5 of a timm model or a cdq output folder; agreement with the FP source model
        when the folder's source can be rebuilt (its checkpoint file still exists)."""
        from ..calib.images import open_images
        from ..models.timm_models import TimmSpec, data_config, load_timm
        from ..store.folder import is_quantized_folder

        if request.tasks is not None or request.data is None:
            raise UsageError(
                "--tasks (lm-eval zero-shot accuracy) is for causal LMs; score images with --data"
            )
        images = open_images(request.data)
        if images.labels is None:
            raise UsageError(
                f"{request.data}: cannot tell the images' classes (use class subfolders or n<wnid>_ names)"
            )
        reference, note = None, None
        if is_quantized_folder(request.target):
            if request.checkpoint is not None or request.model_args:
                raise UsageError(
                    "--checkpoint/--model-arg describe a plain model; a cdq folder knows its own"
                )
            model, table = load_vision_quantized(request.target)
            config = table["timm"]["data_config"]
            source = TimmSpec.from_dict(table["timm"])
            if source.checkpoint is None:
                note = "no agreement: the source model had no checkpoint (random init)"
            elif not Path(source.checkpoint).is_file():
                note = f"no agreement: the source checkpoint {source.checkpoint} is gone"
            else:
                reference = load_timm(source)
        else:
            model = load_timm(timm_spec(request.target, request.checkpoint, request.model_args))
            config = data_config(model)
        reference_predictions = None
        if reference is not None:
            _, reference_predictions = top1_of(reference, images, config, device, request.batch_size)
            del reference
        result, _ = top1_of(model, images, config, device, request.batch_size, reference_predictions)
        shown = {"target": request.target, "data": request.data, **result.to_dict()}
        if note:
            shown["note"] = note
        return shown


def top1_of(
    model: nn.Module,
    images: Any,
    config: dict[str, Any],
    device: torch.device,
    batch_size: int,
    reference: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor]:
    """Top-1/top-5 (and agreement with ``reference`` predictions) of ``model`` on labelled images;
    the model visits ``device`` for the evaluation."""
    from ..calib.images import labelled_batches
    from ..evaluate.classification import top1

    with visiting([model], device, home_of(model)):
        return top1(
            model, labelled_batches(images, config, batch_size=batch_size), reference=reference, device=device
        )


def timm_spec(model: str, checkpoint: str | None, model_args: list[str]) -> Any:
    """The TimmSpec of a command line: architecture, ``--model-arg`` kwargs, absolute checkpoint."""
    from ..models.timm_models import TimmSpec, parse_model_args, timm_name

    path = str(Path(checkpoint).expanduser().absolute()) if checkpoint is not None else None
    return TimmSpec(timm_name(model), parse_model_args(model_args), path)


def load_vision_quantized(folder: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the timm model stored in a cdq output folder: (model in eval mode, marker table)."""
    from ..models.timm_models import KIND, TimmSpec, load_timm
    from ..store.folder import CheckpointError, quantized_state_dict, read_table, table_dtype

    folder = Path(folder)
    table = read_table(folder)
    if table.get("kind") != KIND or "timm" not in table:
        raise CheckpointError(f"{folder} holds a {table.get('kind')!r} model, not a timm classifier")
    spec = TimmSpec.from_dict(table["timm"])
    model = load_timm(TimmSpec(spec.name, spec.kwargs))
    state = quantized_state_dict(folder)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: weights do not match timm model {spec.name!r}: {first}") from None
    return model.to(table_dtype(table)).eval(), table
