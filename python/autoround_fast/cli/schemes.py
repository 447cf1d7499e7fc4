"""Which schemes each backend tunes, and the weight group a scheme gets on a given model.

The scheme names are llm-compressor's (compressed-tensors' presets). The autoround_fast
backends (torch, cuda) tune the presets its engine supports (scheme_spec.spec_from_scheme);
backend auto_round tunes every preset that the stock AutoRoundModifier maps to an auto-round
scheme (MXFP4, MXFP8, FP8, ...).

A grouped scheme needs its group size to divide the in_features of every layer it quantizes
(compressed-tensors can neither run nor store a partial group). A preset whose group does not
divide (W4A16's 128 on SmolLM2's 576) gets the largest common group size below it that does;
an explicit --group-size that does not divide is an error listing the sizes that do, unless
--skip-indivisible leaves those layers unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from .checks import CliError

TARGETS = ["Linear"]
IGNORE = ["lm_head"]
# Presets the stock path takes but cannot quantize (measured end to end: README, Schemes).
STOCK_PATH_FAILS = {
    "NVFP4A16": "stops: auto-round has no 4-bit 'fp' function for it",
    "MXFP4A16": "stops: auto-round has no 4-bit 'fp' function for it",
    "MXFP8A16": "tunes it as plain FP8 and saves weights 34% off the tuned ones",
    "FP8_BLOCK": "stops: llm-compressor's AutoRoundModifier rejects block strategies",
}
# The group sizes offered when a preset's does not divide, and listed in errors. Any size
# that divides may be given with --group-size.
COMMON_GROUP_SIZES = (32, 64, 128, 256)


def preset(name: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(name, list(TARGETS))


@lru_cache(maxsize=None)
def scheme_names(backend: str) -> tuple[str, ...]:
    """The presets the backend tunes, in compressed-tensors' order."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return tuple(n for n in PRESET_SCHEMES if n != "UNQUANTIZED" and _tunes(n, backend))


def _tunes(name: str, backend: str) -> bool:
    if backend == "auto_round" and name in STOCK_PATH_FAILS:
        return False
    if backend == "auto_round":
        from llmcompressor.modifiers.autoround import AutoRoundModifier as Stock

        try:  # what the stock modifier does with the scheme before it calls auto-round
            stock = Stock(scheme=name, targets=TARGETS)
            stock._quant_scheme_to_autoround_config(stock._get_default_quant_scheme())
            stock._mapping_config_to_autoround()
        except Exception:
            return False
        return True
    from ..scheme_spec import spec_from_scheme

    try:
        spec_from_scheme(preset(name), None, "-", backend)
    except ValueError:
        return False
    return True


def check_scheme_name(name: str, backend: str) -> str:
    """The preset name, upper case, if the backend tunes it; else a CliError saying which do."""
    upper = name.upper()
    if upper in scheme_names(backend):
        return upper
    if backend == "auto_round" and upper in STOCK_PATH_FAILS:
        raise CliError(f"--scheme {upper}: the stock path (backend auto_round) {STOCK_PATH_FAILS[upper]}; "
                       "use --backend cuda or torch")
    if backend != "auto_round" and upper in scheme_names("auto_round"):
        raise CliError(f"--scheme {upper}: backend {backend} tunes {', '.join(scheme_names(backend))}; "
                       f"pass --backend auto_round for {upper} (auto-round's own tuning)")
    raise CliError(f"--scheme {name!r} is not a scheme backend {backend} tunes; choose one of "
                   f"{', '.join(scheme_names(backend))}")


@dataclass
class SchemeChoice:
    """A scheme as the modifiers take it: the preset name when its group is kept, else one
    config group with the group size changed."""

    name: str
    group_size: Optional[int]  # the weights' group; -1: per output channel; None: no group (per tensor)
    modifier_kwargs: dict
    ignore: list[str]
    is_int: bool
    notes: list[str] = field(default_factory=list)  # one line each, printed before loading

    @property
    def label(self) -> str:
        """The name, with the group of an INT scheme (the float formats fix theirs)."""
        if self.group_size is None or not self.is_int:
            return self.name
        return f"{self.name}, {'per-channel' if self.group_size == -1 else f'group {self.group_size}'}"


def weight_group(scheme) -> Optional[int]:
    """The group a scheme's weights are quantized in: its group size (a block's width), -1 per
    channel, None else."""
    from compressed_tensors.quantization import QuantizationStrategy

    w = scheme.weights
    if w.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return w.group_size
    if w.strategy == QuantizationStrategy.BLOCK:
        return w.block_structure[-1]
    return -1 if w.strategy == QuantizationStrategy.CHANNEL else None


def dividing_sizes(in_features: dict[str, int], below: Optional[int] = None) -> list[int]:
    """The common group sizes (at most `below`) that divide every layer's in_features."""
    return [g for g in COMMON_GROUP_SIZES if (below is None or g <= below)
            and all(n % g == 0 for n in in_features.values())]


def describe_layers(names: list[str]) -> str:
    """Layer names with the block index folded: model.layers.*.mlp.down_proj (30 layers)."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.\d+\.", ".*.", n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k if c == 1 else f"{k} ({c} layers)" for k, c in counts.items())


def choose_scheme(name: str, group_size: Optional[int], in_features: dict[str, int],
                  skip_indivisible: bool = False) -> SchemeChoice:
    """The scheme `name` with its weight group on a model whose quantized layers have these
    in_features (name -> in_features).

    group_size None keeps the preset's group if it divides every layer, else takes the largest
    common size below it that does (said in a note). An explicit group_size (or -1: one scale
    per output channel) applies to the INT schemes; the float formats fix theirs (NVFP4 16,
    MXFP 32). A group that does not divide a layer is an error naming the layer and the sizes
    that divide, or, with skip_indivisible, leaves those layers unquantized (said in a note).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    base = preset(name)
    preset_group = weight_group(base)
    is_int = getattr(base.weights.type, "value", base.weights.type) == "int"
    notes: list[str] = []
    group = preset_group
    if group_size is not None and group_size != preset_group:
        if not is_int:
            raise CliError(f"--group-size {group_size}: {name} "
                           + (f"fixes its group at {preset_group} (the format's)" if preset_group and preset_group > 0
                              else "has no weight groups")
                           + "; --group-size applies to the INT schemes (W4A16, W8A16, ...)")
        if group_size == 0 or group_size < -1:
            raise CliError(f"--group-size must be positive, or -1 for one scale per output channel; got {group_size}")
        group = group_size

    ignore = list(IGNORE)
    if group is not None and group > 0:
        bad = {n: f for n, f in in_features.items() if f % group}
        if bad and group_size is None and is_int and not skip_indivisible:
            fits = dividing_sizes(in_features, below=preset_group)
            if not fits:
                raise CliError(f"{name}'s group {preset_group} does not divide the in_features of "
                               f"{describe_layers(list(bad))} ({', '.join(sorted({str(f) for f in bad.values()}))}), "
                               "and no common group size below it does; pass --group-size (-1: per channel) "
                               "or --skip-indivisible")
            notes.append(f"{name}'s group {preset_group} does not divide in_features "
                         f"{', '.join(sorted({str(f) for f in bad.values()}))} of {describe_layers(list(bad))}; "
                         f"using group {fits[-1]}, the largest that divides every layer "
                         "(--group-size to choose another, --skip-indivisible to keep "
                         f"{preset_group} and leave those layers unquantized)")
            group, bad = fits[-1], {}
        if bad:
            sizes = sorted({str(f) for f in bad.values()})
            if not skip_indivisible and not is_int:  # the format fixes its group
                raise CliError(f"--scheme {name}: its group {group} does not divide in_features {', '.join(sizes)} "
                               f"of {describe_layers(list(bad))}; pass --skip-indivisible to leave those layers "
                               "unquantized, or choose another scheme")
            if not skip_indivisible:
                fits = dividing_sizes(in_features)
                which = (f"sizes that divide every layer: {', '.join(map(str, fits))}" if fits
                         else "no common group size divides every layer")
                option = "--group-size" if group_size is not None else "--scheme"
                raise CliError(f"{option} {group_size if group_size is not None else name}: group {group} does "
                               f"not divide in_features {', '.join(sizes)} of {describe_layers(list(bad))}; "
                               f"{which} (or -1: per channel)"
                               + "; or pass --skip-indivisible to leave those layers unquantized")
            notes.append(f"warning: group {group} does not divide in_features {', '.join(sizes)}; leaving "
                         f"{len(bad)} of {len(in_features)} layers unquantized (--skip-indivisible): "
                         f"{describe_layers(list(bad))}")
            ignore += list(bad)
            if len(bad) == len(in_features):
                raise CliError(f"group {group} divides none of the layers to quantize; choose a --group-size "
                               f"that does: {', '.join(map(str, dividing_sizes(in_features))) or '-1'}")

    if group == preset_group:
        kwargs = dict(scheme=name, targets=list(TARGETS))
    else:
        w = base.weights.model_dump()
        w.update(strategy="channel", group_size=None) if group == -1 else w.update(strategy="group", group_size=group)
        scheme = QuantizationScheme(targets=list(TARGETS), weights=QuantizationArgs.model_validate(w),
                                    input_activations=base.input_activations,
                                    output_activations=base.output_activations, format=base.format)
        kwargs = dict(config_groups={"group_0": scheme})
    return SchemeChoice(name=name, group_size=group, modifier_kwargs=kwargs, ignore=ignore, is_int=is_int,
                        notes=notes)
