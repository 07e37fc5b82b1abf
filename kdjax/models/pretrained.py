"""Import torchvision and timm weights into kdjax's own Flax models.

    module, variables = kdjax.models.pretrained.load("resnet50.safetensors")       # arch from the keys
    module, variables = kdjax.models.pretrained.load("deit_s.pth", "timm/deit_small_patch16_224")
    logits = module.apply(variables, images, train=False)   # images: ARCHS[arch].preprocess(...)

Files: ``.safetensors`` (the ``safetensors`` package, ``kdjax[pretrained]``), or ``.pth`` / ``.pt`` /
``.bin`` as ``torch.save`` writes them (a zip holding a pickle), read WITHOUT torch by a weights-only
unpickler (`read_pth`): like ``torch.load(weights_only=True)`` it rebuilds tensors, dicts, lists
and numbers and refuses every other object, so no pickled code runs. A checkpoint that wraps the
state dict (``{'model': ...}``, ``{'state_dict': ...}``) or prefixes it (``module.``) is unwrapped.

Mapping: one declarative pattern table per family (`_resnet_table`, `_mobilenet_v2_table`,
`_vit_table`; as jax-ml/bonsai's ``models/resnet/params.py``): a regex over the torch key -> the
Flax path(s) it fills and the transform that converts it. Conv kernels OIHW -> HWIO (depthwise
(C, 1, kh, kw) -> (kh, kw, 1, C), the same transpose); Linear kernels transposed; BatchNorm weight /
bias -> params scale / bias, running_mean / running_var -> batch_stats mean / var,
``num_batches_tracked`` dropped (kdjax's BatchNorm has torch's eps 1e-5 and momentum); timm's
fused ``qkv`` is split into query / key / value with a head axis ((D, heads, D / heads)) and the
attention's ``proj`` reshaped to (heads, D / heads, D). Every torch key must match exactly one
pattern, every Flax variable must be filled exactly once and with its shape, or `load` stops with
one line naming the key (a ValueError; nothing partial is returned).

Preprocessing is part of the weights: `ARCHS[arch].preprocess` (a `Preprocess`) holds the mean, std,
input size, resize and crop, interpolation and input range that the weights were trained with (from
torchvision's ``Weights.DEFAULT.transforms()`` and timm's ``pretrained_cfg``, as torchvision 0.29.1
and timm 1.0.31 give them).
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import zipfile
from typing import Any, Callable

import numpy as np

from kdjax.data.sources import NORMALIZATIONS

from .mobilenetv2 import CFG as MOBILENET_V2_CFG
from .vit import SIZES as VIT_SIZES



@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How images are prepared for a set of weights (the eval transform).

    Pixels are scaled to ``input_range`` (torchvision and timm: [0, 1]), the shorter side is resized
    to ``resize`` with ``interpolation``, the centre ``input_size`` x ``input_size`` is cropped, then
    ``(x - mean) / std`` per channel, with the statistics ``kdjax.data.NORMALIZATIONS[normalize]``
    (what a run's ``config.dataset.normalize`` resolves to when a role starts from these weights).
    ``source``: where these values come from."""
    input_size: int
    resize: int
    interpolation: str
    normalize: str
    source: str
    input_range: tuple[float, float] = (0.0, 1.0)

    @property
    def mean(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalize][0]

    @property
    def std(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalize][1]

    def __call__(self, images) -> Any:
        """uint8 images (H, W, 3) or (B, H, W, 3), values 0..255 -> float32 (B, input_size,
        input_size, 3), normalised. Resizes with ``jax.image.resize`` ('linear' for bilinear, 'cubic'
        for bicubic, antialiased): close to, not bit-exact with, the PIL resize torchvision and timm
        use."""
        import jax
        import jax.numpy as jnp
        x = jnp.asarray(images, jnp.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected (H, W, 3) or (B, H, W, 3) images, got shape {tuple(x.shape)}")
        lo, hi = self.input_range
        x = lo + x / 255.0 * (hi - lo)
        b, h, w, _ = x.shape
        s = self.resize / min(h, w)
        nh, nw = max(self.input_size, round(h * s)), max(self.input_size, round(w * s))
        x = jax.image.resize(x, (b, nh, nw, 3), method={"bilinear": "linear", "bicubic": "cubic"}[self.interpolation],
                             antialias=True)
        top, left = (nh - self.input_size) // 2, (nw - self.input_size) // 2
        x = x[:, top:top + self.input_size, left:left + self.input_size]
        return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)

    def describe(self) -> str:
        return (f"resize shorter side to {self.resize} ({self.interpolation}), centre crop {self.input_size}, "
                f"range {list(self.input_range)}, {self.normalize} mean {list(self.mean)}, std {list(self.std)} "
                f"({self.source})")


def _tv(resize: int, weights: str) -> Preprocess:
    return Preprocess(224, resize, "bilinear", "imagenet", f"torchvision {weights}.transforms()")


def _timm(crop_pct: float, normalize: str, tag: str) -> Preprocess:
    # timm's eval transform: resize to floor(input_size / crop_pct), then centre crop input_size
    return Preprocess(224, int(224 / crop_pct), "bicubic", normalize, f"timm pretrained_cfg {tag} (crop_pct {crop_pct})")


@dataclasses.dataclass(frozen=True)
class Arch:
    """A torchvision / timm architecture: the kdjax model (`kdjax.models.MODELS` name) its weights go
    into, the pattern-table family, and the weights' preprocessing."""
    name: str
    model: str
    family: str
    preprocess: Preprocess


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("torchvision/resnet18", "resnet18_imagenet", "resnet", _tv(256, "ResNet18_Weights.IMAGENET1K_V1")),
    Arch("torchvision/resnet34", "resnet34_imagenet", "resnet", _tv(256, "ResNet34_Weights.IMAGENET1K_V1")),
    Arch("torchvision/resnet50", "resnet50_imagenet", "resnet", _tv(232, "ResNet50_Weights.IMAGENET1K_V2")),
    Arch("torchvision/mobilenet_v2", "mobilenetv2_imagenet", "mobilenet_v2",
         _tv(232, "MobileNet_V2_Weights.IMAGENET1K_V2")),
    # timm's resnet50 has torchvision's keys and layout; its weights (a1_in1k) were trained with
    # other preprocessing (timm evaluates them at 288 too: test_input_size, crop_pct 1.0)
    Arch("timm/resnet50", "resnet50_imagenet", "resnet",
         _timm(0.95, "imagenet", "resnet50.a1_in1k")),
    *(Arch(f"timm/vit_{s}_patch16_224", f"vit_{s}_patch16", "vit",
           _timm(0.9, "inception", f"vit_{s}_patch16_224.{tag}"))
      for s, tag in (("tiny", "augreg_in21k_ft_in1k"), ("small", "augreg_in21k_ft_in1k"),
                     ("base", "augreg2_in21k_ft_in1k"))),
    # DeiT without distillation has the keys of a ViT: name it to get DeiT's preprocessing
    *(Arch(f"timm/deit_{s}_patch16_224", f"vit_{s}_patch16", "vit",
           _timm(0.9, "imagenet", f"deit_{s}_patch16_224.fb_in1k")) for s in ("tiny", "small", "base")),
    *(Arch(f"timm/deit_{s}_distilled_patch16_224", f"deit_{s}_distilled_patch16", "vit",
           _timm(0.9, "imagenet", f"deit_{s}_distilled_patch16_224.fb_in1k")) for s in ("tiny", "small")),
)}
# Bare names: 'resnet50' is torchvision's (timm's has the same keys: name 'timm/resnet50' for its preprocessing).
ALIASES = {n.split("/", 1)[1]: n for n in ARCHS if n.startswith("torchvision/")}
ALIASES.update({n.split("/", 1)[1]: n for n in ARCHS if n.startswith("timm/") and n != "timm/resnet50"})


# ------------------------------------------------------------------------------------------------
# Transforms (torch array -> tuple of Flax arrays, one per target) and the pattern tables

def _conv(w, m):  # OIHW -> HWIO; a depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)
    return (w.transpose(2, 3, 1, 0),)


def _linear(w, m):
    return (w.T,)


def _same(w, m):
    return (w,)


def _qkv_kernel(w, m):  # (3D, D), rows [q | k | v], each head-major -> 3 x (D, heads, D / heads)
    d = w.shape[1]
    h = m.num_heads
    w = w.reshape(3, h, d // h, d)
    return tuple(w[i].transpose(2, 0, 1) for i in range(3))


def _qkv_bias(b, m):  # (3D,) -> 3 x (heads, D / heads)
    h = m.num_heads
    b = b.reshape(3, h, -1)
    return tuple(b[i] for i in range(3))


def _proj_kernel(w, m):  # (D_out, D_in) with D_in = heads x head_dim -> (heads, head_dim, D_out)
    return (w.T.reshape(m.num_heads, -1, w.shape[0]),)


DROP = "drop"  # a torch key with no Flax counterpart (BatchNorm's num_batches_tracked)

# A table: (regex over the torch key, target Flax path template(s) with the regex's groups as \1.., transform)
Table = list[tuple[str, tuple[str, ...] | str, Callable | None]]


def _bn(torch_re: str, flax: str) -> Table:
    return [(rf"^{torch_re}\.weight$", f"params/{flax}/scale", _same),
            (rf"^{torch_re}\.bias$", f"params/{flax}/bias", _same),
            (rf"^{torch_re}\.running_mean$", f"batch_stats/{flax}/mean", _same),
            (rf"^{torch_re}\.running_var$", f"batch_stats/{flax}/var", _same),
            (rf"^{torch_re}\.num_batches_tracked$", DROP, None)]


def _ln(torch_re: str, flax: str) -> Table:
    return [(rf"^{torch_re}\.weight$", f"params/{flax}/scale", _same),
            (rf"^{torch_re}\.bias$", f"params/{flax}/bias", _same)]


def _dense(torch_re: str, flax: str) -> Table:
    return [(rf"^{torch_re}\.weight$", f"params/{flax}/kernel", _linear),
            (rf"^{torch_re}\.bias$", f"params/{flax}/bias", _same)]


def _resnet_table() -> Table:
    """torchvision / timm ResNet: conv1, bn1, layer{s}.{b}.conv{i} / bn{i} / downsample.{0,1}, fc."""
    blk = r"layer([1-4])\.(\d+)"
    return [
        (r"^conv1\.weight$", "params/conv1/kernel", _conv), *_bn("bn1", "bn1"),
        (rf"^{blk}\.conv([1-3])\.weight$", r"params/layer\1_\2/conv\3/kernel", _conv),
        *_bn(rf"{blk}\.bn([1-3])", r"layer\1_\2/bn\3"),
        (rf"^{blk}\.downsample\.0\.weight$", r"params/layer\1_\2/shortcut_conv/kernel", _conv),
        *_bn(rf"{blk}\.downsample\.1", r"layer\1_\2/shortcut_bn"),
        *_dense("fc", "fc"),
    ]


def _mobilenet_v2_table() -> Table:
    """torchvision mobilenet_v2: features.0 (stem conv + BN), features.1..17 (the inverted residuals
    of `kdjax.models.mobilenetv2.CFG`, in order; the t = 1 block has no expand conv), features.18
    (1x1 conv + BN to 1280), classifier.1 (the Linear after dropout)."""
    table: Table = [(r"^features\.0\.0\.weight$", "params/conv1/kernel", _conv), *_bn(r"features\.0\.1", "bn1")]
    i = 1
    for g, (t, _, n, _) in enumerate(MOBILENET_V2_CFG):
        for k in range(n):
            f, b = rf"features\.{i}\.conv", f"block{g}_{k}"
            # torch's Sequential: [Conv-BN-ReLU6 expand], Conv-BN-ReLU6 depthwise, Conv project, BN
            pairs = ((("0.0", "conv2"), ("0.1", "bn2"), ("1", "conv3"), ("2", "bn3")) if t == 1 else
                     (("0.0", "conv1"), ("0.1", "bn1"), ("1.0", "conv2"), ("1.1", "bn2"), ("2", "conv3"), ("3", "bn3")))
            for tn, name in pairs:
                if name.startswith("conv"):
                    table.append((rf"^{f}\.{re.escape(tn)}\.weight$", f"params/{b}/{name}/kernel", _conv))
                else:
                    table += _bn(rf"{f}\.{re.escape(tn)}", f"{b}/{name}")
            i += 1
    table += [(rf"^features\.{i}\.0\.weight$", "params/conv2/kernel", _conv), *_bn(rf"features\.{i}\.1", "bn2"),
              *_dense(r"classifier\.1", "fc")]
    return table


def _vit_table() -> Table:
    """timm VisionTransformer (and VisionTransformerDistilled): cls_token, dist_token, pos_embed,
    patch_embed.proj, blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm, head,
    head_dist."""
    blk = r"blocks\.(\d+)"
    return [
        (r"^cls_token$", "params/cls_token", _same), (r"^dist_token$", "params/dist_token", _same),
        (r"^pos_embed$", "params/pos_embed", _same),
        (r"^patch_embed\.proj\.weight$", "params/patch_embed/kernel", _conv),
        (r"^patch_embed\.proj\.bias$", "params/patch_embed/bias", _same),
        *_ln(rf"{blk}\.norm1", r"blocks_\1/norm1"), *_ln(rf"{blk}\.norm2", r"blocks_\1/norm2"),
        (rf"^{blk}\.attn\.qkv\.weight$", tuple(rf"params/blocks_\1/attn/{n}/kernel" for n in ("query", "key", "value")),
         _qkv_kernel),
        (rf"^{blk}\.attn\.qkv\.bias$", tuple(rf"params/blocks_\1/attn/{n}/bias" for n in ("query", "key", "value")),
         _qkv_bias),
        (rf"^{blk}\.attn\.proj\.weight$", r"params/blocks_\1/attn/out/kernel", _proj_kernel),
        (rf"^{blk}\.attn\.proj\.bias$", r"params/blocks_\1/attn/out/bias", _same),
        *_dense(rf"{blk}\.mlp\.fc1", r"blocks_\1/fc1"), *_dense(rf"{blk}\.mlp\.fc2", r"blocks_\1/fc2"),
        *_ln("norm", "norm"), *_dense("head", "head"), *_dense("head_dist", "head_dist"),
    ]


TABLES: dict[str, Callable[[], Table]] = {"resnet": _resnet_table, "mobilenet_v2": _mobilenet_v2_table,
                                          "vit": _vit_table}
HEADS = {"resnet": "fc.weight", "mobilenet_v2": "classifier.1.weight", "vit": "head.weight"}
# The kdjax variables of the classifiers above (and DeiT's second head), by path below params/batch_stats
HEADS_REGEX = r"^(fc|head|head_dist)/"


# ------------------------------------------------------------------------------------------------
# Reading files

class _Storage:
    """A torch storage class named in the pickle (torch.FloatStorage, ...): its numpy dtype."""
    DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
              "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
              "ByteStorage": np.uint8, "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16"}

    def __init__(self, name):
        self.name = name
        dt = self.DTYPES[name]
        if dt == "bfloat16":
            import ml_dtypes
            dt = ml_dtypes.bfloat16
        self.dtype = np.dtype(dt)


def _rebuild_tensor(storage, offset, size, stride, *_):
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if (offset < 0 or len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride)
            or (0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage))):
        raise ValueError(f"a tensor of size {size}, stride {stride} at offset {offset} outside its storage")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if not size:
        return np.array(storage[offset])
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *_):
    return data


class _Refused(pickle.UnpicklingError):
    """A pickle names an object that is not a tensor, a dict, a list or a number."""


class _StateDict(dict):
    """collections.OrderedDict as torch pickles a state dict (with a ``_metadata`` attribute)."""


class _WeightsOnlyUnpickler(pickle.Unpickler):
    """Rebuilds tensors (as numpy arrays), dicts, lists, tuples, strings and numbers; any other
    class or function the pickle names is refused (`_Refused`), so no pickled code runs."""
    ALLOWED = {("collections", "OrderedDict"): _StateDict, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix, self.storages = zf, prefix, {}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in _Storage.DTYPES:
            return _Storage(name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _Storage):
            raise _Refused(f"persistent id {kind!r}")
        if key not in self.storages:
            raw = self.zf.read(f"{self.prefix}data/{key}")
            self.storages[key] = np.frombuffer(raw, storage_type.dtype, count=numel)
        return self.storages[key]


def read_pth(path: str) -> dict[str, np.ndarray]:
    """A ``torch.save`` zip file (torch >= 1.6) -> {key: numpy array}, without torch and without
    running pickled code (see `_WeightsOnlyUnpickler`)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch.save zip file (truncated or corrupt, or torch's "
                         f"legacy pre-1.6 format: {e})") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: a zip file without data.pkl, not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            if zf.read(f"{prefix}byteorder").decode().strip() != "little":
                raise ValueError(f"{path}: a big-endian torch file; re-save it on a little-endian machine")
        except KeyError:
            pass
        try:
            obj = _WeightsOnlyUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
        except _Refused as e:
            raise ValueError(f"{path}: needs pickle to load (it holds the Python object {e}, not only tensors); kdjax "
                             "reads .pth files weights-only: save model.state_dict() or a .safetensors file") from None
        except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile pickle raises: one line
            raise ValueError(f"{path}: truncated or corrupt torch file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return obj


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ValueError("reading .safetensors needs the safetensors package: pip install 'kdjax[pretrained]'") from None
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises SafetensorError (and others) on a bad header or length
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{torch key: numpy array} from a ``.safetensors`` or ``.pth`` / ``.pt`` file; a checkpoint that
    wraps its state dict in ``{'model': ...}`` / ``{'state_dict': ...}`` / ``{'module': ...}`` is
    unwrapped and a ``module.`` prefix (DataParallel) removed."""
    if not os.path.isfile(path):
        raise ValueError(f"no weights file {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        sd = read_safetensors(path)
    elif ext in (".pth", ".pt", ".bin"):
        sd = read_pth(path)
    else:
        raise ValueError(f"{path}: unknown weights file type {ext!r}; use .safetensors, .pth, .pt or .bin "
                         "(a torch.save file)")
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, np.ndarray) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------------
# Architecture from the keys

def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def infer_arch(sd: dict[str, np.ndarray], where: str = "the state dict") -> str:
    """The `ARCHS` name the keys (and a few shapes) of a state dict belong to; a ValueError naming
    what it saw when they fit none."""
    keys = set(sd)
    choose = f"name it: load(path, arch=...) with one of {', '.join(sorted(ARCHS))}"
    if "layer1.0.conv1.weight" in keys and "fc.weight" in keys:
        blocks = tuple(_count(keys, rf"^layer{s}\.(\d+)\.conv1\.weight$") for s in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        name = {((2, 2, 2, 2), False): "torchvision/resnet18", ((3, 4, 6, 3), False): "torchvision/resnet34",
                ((3, 4, 6, 3), True): "torchvision/resnet50"}.get((blocks, bottleneck))
        if name is None:
            raise ValueError(f"{where}: a ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {blocks}, "
                             "not ResNet-18/34/50")
        return name
    if "features.0.0.weight" in keys and "classifier.1.weight" in keys:
        return "torchvision/mobilenet_v2"
    if "blocks.0.attn.qkv.weight" in keys and "cls_token" in keys:
        d, depth = sd["cls_token"].shape[-1], _count(keys, r"^blocks\.(\d+)\.")
        patch = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in keys else None
        size = {v[0]: s for s, v in VIT_SIZES.items()}.get(d)
        distilled = "dist_token" in keys
        name = f"timm/deit_{size}_distilled_patch16_224" if distilled else f"timm/vit_{size}_patch16_224"
        if size is None or depth != 12 or patch != 16 or name not in ARCHS:
            raise ValueError(f"{where}: a ViT with width {d}, depth {depth}, patch {patch}"
                             f"{', distilled' if distilled else ''}: not one of the supported ViT / DeiT")
        return name
    raise ValueError(f"{where}: cannot tell the architecture from its keys ({', '.join(sorted(keys)[:3])}, ...); "
                     f"{choose}")


def _resolve(arch: str) -> Arch:
    name = ALIASES.get(arch, arch)
    if name not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(sorted(ARCHS))} "
                         f"(or {', '.join(sorted(ALIASES))})")
    return ARCHS[name]


def model_for(arch: str | Arch, sd: dict[str, np.ndarray], where: str = "the state dict", **kwargs):
    """The kdjax module that `arch`'s weights in `sd` go into: num_classes from the head's rows, a
    ViT's image_size from its position embedding's grid. kwargs (dtype, ...) go to the module."""
    from . import get_model
    spec = arch if isinstance(arch, Arch) else _resolve(arch)
    head = HEADS[spec.family]
    if head not in sd:
        raise ValueError(f"{where}: no {head!r} key, so not a {spec.name} state dict")
    if spec.family == "vit" and "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        prefix = 2 if "dist_token" in sd else 1
        grid = int(round((sd["pos_embed"].shape[1] - prefix) ** 0.5))
        kwargs.setdefault("image_size", grid * sd["patch_embed.proj.weight"].shape[-1])
    return get_model(spec.model, num_classes=int(sd[head].shape[0]), **kwargs)


def convert(sd: dict[str, np.ndarray], arch: str | Arch, module, where: str = "the state dict") -> dict:
    """A torch state dict -> the Flax variables ({'params', ['batch_stats']}, float32 jax arrays) of
    `module` (a `model_for` module), through `arch`'s pattern table. One-line ValueErrors: a key no
    pattern maps (or more than one does), a Flax variable filled twice or not at all, a shape that
    does not match."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from . import param_shapes
    spec = arch if isinstance(arch, Arch) else _resolve(arch)
    size = getattr(module, "image_size", None) or spec.preprocess.input_size
    abstract = traverse_util.flatten_dict(jax.tree.map(lambda a: a, dict(param_shapes(module, (size, size, 3)))), sep="/")
    table = [(re.compile(p), t, f) for p, t, f in TABLES[spec.family]()]
    out, source = {}, {}
    for key in sorted(sd):
        hits = [(pat, t, f) for pat, t, f in table if pat.match(key)]
        if not hits:
            raise ValueError(f"{where}: key {key!r} has no place in a {spec.name} (a state dict of another "
                             f"architecture, or of a variant kdjax does not have?)")
        if len(hits) > 1:
            raise ValueError(f"{where}: key {key!r} matches {len(hits)} patterns of the {spec.family} table")
        pat, targets, fn = hits[0]
        if targets == DROP:
            continue
        targets = (targets,) if isinstance(targets, str) else targets
        arrays = fn(np.asarray(sd[key]), module)
        for template, value in zip(targets, arrays):
            path = pat.sub(template, key)
            if path not in abstract:
                raise ValueError(f"{where}: key {key!r} maps to {path}, which a {spec.name} does not have "
                                 f"(a state dict of another architecture?)")
            if path in source:
                raise ValueError(f"{where}: keys {source[path]!r} and {key!r} both map to {path}")
            want = tuple(abstract[path].shape)
            if tuple(value.shape) != want:
                raise ValueError(f"{where}: key {key!r} has shape {tuple(sd[key].shape)}, which gives {tuple(value.shape)} "
                                 f"for {path}; a {spec.name} needs {want}")
            source[path] = key
            out[path] = jnp.asarray(value, jnp.float32)
    missing = [p for p in abstract if p not in out]
    if missing:
        raise ValueError(f"{where}: no weights for {len(missing)} of {spec.name}'s variables ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): a truncated or partial state dict?")
    return traverse_util.unflatten_dict(out, sep="/")


def load(path: str, arch: str | None = None, **kwargs):
    """(module, variables) from the torchvision / timm weights in `path` (.safetensors, .pth, .pt).

    ``arch``: an `ARCHS` name ('torchvision/resnet50', 'timm/vit_small_patch16_224', ...; the bare
    names of `ALIASES` too) or None to infer it from the keys (`infer_arch`; timm's resnet50 and
    the non-distilled DeiTs share keys with torchvision's resnet50 and the ViTs, so name them for
    their preprocessing). kwargs (dtype, bn_axis_name, ...) go to the module. The module's
    `ARCHS[arch].preprocess` says how to prepare its inputs; `arch_of` returns the name used."""
    sd = read_state_dict(path)
    spec = _resolve(arch) if arch else _resolve(infer_arch(sd, path))
    if arch:
        try:
            seen = infer_arch(sd, path)
        except ValueError:
            seen = None
        if seen and ARCHS[seen].model != spec.model:
            raise ValueError(f"{path}: the keys are those of a {seen} state dict, not a {spec.name}; "
                             f"load it with arch={seen!r} (or arch=None)")
    module = model_for(spec, sd, path, **kwargs)
    return module, convert(sd, spec, module, path)


def arch_of(path: str, arch: str | None = None) -> Arch:
    """The `Arch` `load(path, arch)` uses."""
    return _resolve(arch) if arch else _resolve(infer_arch(read_state_dict(path), path))
