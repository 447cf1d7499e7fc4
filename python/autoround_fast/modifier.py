"""A drop-in for llm-compressor's AutoRoundModifier with a ``backend`` field.

``backend="auto_round"`` (default) is llm-compressor's stock path through intel's auto-round;
``"torch"`` runs autoround_fast's engine on the plain-PyTorch oracles (any device);
``"cuda"`` runs it on the fused CUDA kernels. Importing autoround_fast registers this class
with llm-compressor's ModifierFactory under the same name, so YAML recipes reach it.

Beyond speed, the autoround_fast backends fix the stock path's defects (docs/numerics.md#stock-path-defects): the
asymmetric zero point reaches the checkpoint; INT scales are used in their stored dtype while
tuning and the stored weight is the checkpoint format's own dequantization of the tuned codes,
so a reloaded checkpoint equals the tuned model exactly; the NVFP4 input global scale comes
from an fp32 activation maximum; the padding mask of right-padded samples reaches the loss.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Literal, Optional

import torch
from pydantic import Field, PrivateAttr
from torch.utils._pytree import tree_map
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.distributed import is_source_process
from compressed_tensors.offload import disable_offloading, update_offload_parameter
from compressed_tensors.utils import align_module_device, match_named_modules
from loguru import logger
from llmcompressor.modifiers.autoround import AutoRoundModifier as _StockAutoRoundModifier
from llmcompressor.modifiers.factory import ModifierFactory

from .calibration_pass import GroupedCalibrationPass
from .causal_mask import causal_attention_config, restore_causal_mask
from .moe_checkpoint import keep_per_expert_layout
from .progress import ModelProgress
from .resume import BlockStore
from .engine import BlockResult, QuantSpec, make_backend, pack_samples, same_value, tune_block
from .engine.placement import process_group
from .engine.precision import convert_block, cpu_tune_dtype
from .scheme_spec import spec_from_scheme

__all__ = ["AutoRoundModifier"]

# Modifier fields that change neither the tuned weights nor the checkpoint (docs/numerics.md
# #execution-invariance), or are the run's lifecycle state.
_NOT_RESULT_FIELDS = {"index", "group", "start", "end", "update", "initialized_", "finalized_", "started_",
                      "ended_", "progress", "cache_on_cpu", "cuda_graph", "step_in_backward", "device_ids",
                      "enable_torch_compile", "remake_weights"}


class AutoRoundModifier(_StockAutoRoundModifier):
    """llm-compressor's AutoRoundModifier, plus ``backend`` ("auto_round", "torch", "cuda")
    and ``seed``: the order llm-compressor's calibration sampler draws the samples in (it
    draws from torch's global generator, which the modifier seeds when it initialises, before
    the pipeline iterates the sampler) and the batch order of the autoround_fast backends."""

    backend: Literal["auto_round", "torch", "cuda"] = "auto_round"
    seed: int = 42
    progress: bool = False  # one progress bar over the model's blocks and iterations, with the time left
    # INT and FP8: the dtype their scales (FP8's input scale too) are rounded to while tuning.
    # Default (None): the dtype the checkpoint stores them in, so the reload is exact;
    # "float16" (INT) and "float32" (FP8) reproduce auto-round.
    scale_dtype: Optional[Literal["float16", "bfloat16", "float32"]] = None
    # Keep each block's cached inputs, reference outputs and quantized outputs in pinned host
    # memory instead of on the GPU (cards short of memory; each iteration copies its batch).
    cache_on_cpu: bool = False
    # backend "cuda": capture one tuning iteration in a CUDA graph and replay it.
    cuda_graph: bool = True
    # backend "cuda": run the block's RMSNorms, SiLU(gate) * up and rotary embeddings
    # compiled (torch.compile) while tuning. None: on where Triton is there.
    fuse_elementwise: Optional[bool] = None
    # backend "cuda": take the sign step inside each Linear's weight backward (tune_block's
    # step_in_backward). None: wherever it applies.
    step_in_backward: Optional[bool] = None
    # MoE blocks: run the routed experts as one grouped matmul per projection (tune_block's
    # grouped_experts). None: on a GPU.
    grouped_experts: Optional[bool] = None
    # Make each fake-quantized weight again in its backward instead of holding it from the
    # forward (tune_block's remake_weights: less memory, the same bits). None: for MoE blocks.
    remake_weights: Optional[bool] = None
    # A directory that keeps each tuned block (autoround_fast.resume): a run started again
    # after a crash reloads the blocks it finished instead of tuning them. None: no resume.
    resume_dir: Optional[str] = Field(default=None, exclude=True)  # not in the saved recipe: a local path

    _block_stats: list = PrivateAttr(default_factory=list)
    _store: Optional[BlockStore] = PrivateAttr(default=None)
    _progress: Optional[ModelProgress] = PrivateAttr(default=None)
    _devices: Optional[list] = PrivateAttr(default=None)
    _grouped_pass: Optional[GroupedCalibrationPass] = PrivateAttr(default=None)

    def _block_devices(self) -> Optional[list[torch.device]]:
        """The cards one block's Linears spread over (None: one device), from device_ids
        ("0,1", "cuda:0,cuda:1" or "auto": every visible GPU) or, under torchrun, from
        LLMCOMPRESSOR_GPUS_PER_GROUP (rank r takes GPUs r*g .. r*g+g-1), as llm-compressor
        reads them for auto-round. The first device runs the rest of the block."""
        groups = os.environ.get("LLMCOMPRESSOR_GPUS_PER_GROUP", "1")
        if self.device_ids is None and groups == "1":
            return None
        what = f"device_ids={self.device_ids!r}" if self.device_ids is not None \
            else f"LLMCOMPRESSOR_GPUS_PER_GROUP={groups}"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.device_ids is not None:
            text = self.device_ids.strip()
            if text == "auto":
                ids = list(range(count))
            else:
                ids = []
                for part in text.split(","):
                    part = part.strip()
                    num = part[5:] if part.startswith("cuda:") else part
                    if not num.isdigit():
                        raise ValueError(f"AutoRoundModifier: {what}: {part!r} is not a GPU index "
                                         "(write '0,1', 'cuda:0,cuda:1' or 'auto')")
                    ids.append(int(num))
        else:
            if not groups.isdigit() or int(groups) < 1:
                raise ValueError(f"AutoRoundModifier: {what} must be a whole number >= 1")
            start = int(os.environ.get("LOCAL_RANK", "0")) * int(groups)
            ids = list(range(start, start + int(groups)))
        if not count:
            raise ValueError(f"AutoRoundModifier: {what} spreads a block over GPUs, and no GPU is "
                             "visible; leave device_ids unset to tune on this device")
        if not ids or len(set(ids)) != len(ids) or any(i >= count for i in ids):
            raise ValueError(f"AutoRoundModifier: {what} names GPUs {ids}, but {count} are visible "
                             "(each index once, each below the count)")
        return [torch.device("cuda", i) for i in ids]

    @property
    def block_stats(self) -> list[dict]:
        """One row per tuned block: block, init_loss, best_loss, best_iter, seconds, losses
        (the loss of every iteration), phases, loop_ms, placement, fused, grouped_experts,
        eager_reason and memory_note (see BlockResult)."""
        return list(self._block_stats)

    def on_initialize(self, state, **kwargs) -> bool:
        for option in ("fuse_elementwise", "step_in_backward"):  # not silently ignored
            if getattr(self, option) and self.backend != "cuda":
                raise ValueError(f"AutoRoundModifier: {option}=True needs backend='cuda', got "
                                 f"backend={self.backend!r}")
        if self.grouped_experts and self.backend == "auto_round":
            raise ValueError("AutoRoundModifier: grouped_experts=True needs backend 'cuda' or 'torch', got "
                             "backend='auto_round'")
        if self.backend == "cuda":
            make_backend("cuda")  # no kernels or no GPU: a clear error before any calibration work
        if self.resume_dir is not None:
            if self.backend == "auto_round":
                raise ValueError("AutoRoundModifier: resume_dir needs backend 'torch' or 'cuda'")
            if process_group() is not None:  # each rank tunes on its own samples
                raise ValueError("AutoRoundModifier: resume_dir does not resume data-parallel runs "
                                 "(a process group of more than one rank)")
            self._store = BlockStore(self.resume_dir, self._result_settings())
        if self.backend != "auto_round":
            self._devices = self._block_devices()  # a bad device_ids fails before calibration
        torch.manual_seed(self.seed)  # the calibration sampler's order: same seed, same bits
        ok = super().on_initialize(state, **kwargs)
        keep_per_expert_layout(state.model)  # oneshot linearized the experts; save them as vLLM names them
        if self.backend != "auto_round":
            # Fail before calibration, naming the layer, if a scheme is out of reach.
            for name, module in match_named_modules(state.model, self.resolved_targets, self.ignore):
                if getattr(module, "quantization_scheme", None) is not None:
                    spec = self._spec(module, name)
                    in_f = getattr(module, "in_features", None)
                    if spec.group_size > 0 and in_f is not None and in_f % spec.group_size:
                        # Reached only with bypass_divisibility_checks=True: the engine pads such a
                        # layer as auto-round does, but compressed-tensors (0.19) can neither
                        # fake-quantize nor save it (llm-compressor's own RTN fails there too).
                        raise ValueError(
                            f"layer {name!r}: in_features {in_f} is not a multiple of the group size "
                            f"{spec.group_size}, and compressed-tensors cannot store or run such a "
                            "layer; add it to `ignore` or pick a group size that divides it")
        return ok

    def on_calibration_start(self, state, event, **kwargs):
        if self.backend != "auto_round" and self.grouped_experts is not False:
            self._grouped_pass = GroupedCalibrationPass(self.grouped_experts)
        # before the stock capture hooks, so that the captured inputs hold the mask too
        for _, module in state.model.named_modules():
            if not self._is_decoding_layer(module):
                continue
            config = causal_attention_config(module)
            if config is not None:
                self.register_hook(module, functools.partial(restore_causal_mask, config=config), "forward_pre",
                                   with_kwargs=True)
            if self._grouped_pass is not None:
                self.register_hook(module, self._grouped_pass.pre_hook, "forward_pre", with_kwargs=True)
        super().on_calibration_start(state, event, **kwargs)
        if self.progress and self.iters > 0 and self.backend != "auto_round":
            self._progress = ModelProgress(len(self._capture_hooks), self.iters)

    def on_calibration_end(self, state, event, **kwargs):
        if self._grouped_pass is not None:
            self._grouped_pass.close()
            self._grouped_pass = None
        super().on_calibration_end(state, event, **kwargs)
        if self._progress is not None:
            self._progress.close()
        if self._store is not None:
            self._store.wait()  # the last block's files are on disk before the model is saved

    def _result_settings(self) -> dict:
        """The fields that decide the tuned weights (not how fast or where they are computed)."""
        return self.model_dump(mode="json", exclude=_NOT_RESULT_FIELDS)

    def _spec(self, module, name: str) -> QuantSpec:
        """The engine's spec for a target Linear; INT and FP8 scales in the dtype
        compressed-tensors stores them in, or in scale_dtype if given."""
        stored = getattr(getattr(module, "weight_scale", None), "dtype", None)
        input_stored = getattr(getattr(module, "input_scale", None), "dtype", None)
        spec = spec_from_scheme(module.quantization_scheme, stored, name, self.backend, input_stored)
        given = getattr(torch, self.scale_dtype) if self.scale_dtype else None
        if given is not None and spec.kind == "int":
            spec = dataclasses.replace(spec, scale_dtype=given)
        if given is not None and spec.kind == "fp8":
            spec = dataclasses.replace(spec, scale_dtype=given, act_scale_dtype=given)
        return spec

    def input_capture_hook(self, module, args, kwargs):
        """Keep each sample's block inputs where the pipeline computed them (the GPU), instead
        of the stock hook's copy to the host that tune_block would copy back (on the 8B block
        2 GB each way, ~0.4 s per block per direction). A keyword argument equal to the first
        sample's (the causal mask, the rotary tables) is held once. With cache_on_cpu, or the
        stock backend, the stock hook runs (inputs on the host)."""
        if self.backend == "auto_round" or self.cache_on_cpu:
            return super().input_capture_hook(module, args, kwargs)
        samples = self._all_module_input.setdefault(module._tmp_name, [])
        first = samples[0][1] if samples else {}

        def keep_tensor(t):  # a copy off the host: the block might write into its own inputs
            t = t.detach()
            return t if t.device.type == "cpu" else t.clone()

        def keep(value):
            return tree_map(lambda x: keep_tensor(x) if isinstance(x, torch.Tensor) else x, value)

        kept = {}
        for key, value in kwargs.items():
            same = key in first and same_value(first[key], value)
            kept[key] = first[key] if same else keep(value)
        samples.append((keep(args), kept))

    def apply_autoround(self, state, modules):
        """One decoder layer, at the end of the pipeline's pass through it: its captured inputs,
        its target Linears, tune_block (or the block restored from resume_dir), its row of
        block_stats, and its quantized outputs kept as the next layer's q_inputs."""
        if self.backend == "auto_round":
            return self._apply_stock(state, modules)
        decoding_layers = [m for m in (modules or []) if self._is_decoding_layer(m)]
        if not decoding_layers:
            return
        if len(decoding_layers) != 1:
            raise ValueError(f"Only one decoding layer is expected per step, found {len(decoding_layers)}.")
        layer = decoding_layers[0]
        layer_name = layer._tmp_name
        inputs, token_mask = self._block_inputs(layer, layer_name)
        targets = self._targets(layer, layer_name)
        if not targets or (self._store is not None and self._restore_block(layer, layer_name, targets, inputs)):
            if self._progress:
                self._progress.skip()
            return
        samples = len(inputs)
        result = self._tune(layer, layer_name, targets, inputs, token_mask)  # empties inputs
        self._record(layer_name, samples, result)
        self._q_input = result.q_outputs
        if self._store is not None:
            self._keep_block(layer, layer_name, targets)
        _log_block(layer_name, result)
        layer.eval()

    def _apply_stock(self, state, modules):
        """backend "auto_round": llm-compressor's own AutoRound, timed for block_stats."""
        t0 = time.perf_counter()
        out = super().apply_autoround(state, modules)
        names = [m._tmp_name for m in (modules or []) if self._is_decoding_layer(m)]
        if names:
            self._block_stats.append(dict(block=names[0], init_loss=float("nan"), best_loss=float("nan"),
                                          best_iter=-1, seconds=time.perf_counter() - t0, losses=[]))
        return out

    def _block_inputs(self, layer, layer_name: str) -> tuple[list, Optional[torch.Tensor]]:
        """The layer's captured calibration inputs packed as tune_block's cache, and the loss
        mask of right-padded samples (None without padding); the capture ends here."""
        if self._grouped_pass is not None:
            self._grouped_pass.release(layer)  # the pipeline's pass is over; the engine groups its own
        if layer_name in self._capture_hooks:
            self.remove_hooks({self._capture_hooks.pop(layer_name)})
        inputs = self._all_module_input.pop(layer_name, None)
        if not inputs:
            raise RuntimeError(f"No calibration inputs captured for layer {layer_name}.")
        inputs, padded_masks = self._pad_captured_inputs(inputs)
        inputs = pack_samples(inputs)  # one tensor of hidden states on the GPU: tune_block's cache
        # Right-padded samples: the padding stays out of the loss (the stock path drops this
        # mask before it reaches auto-round's loss, docs/numerics.md#fix-padding-mask).
        token_mask = torch.cat(padded_masks, 0) if padded_masks is not None else None
        return inputs, token_mask

    def _targets(self, layer, layer_name: str) -> dict:
        """The layer's Linears that the recipe quantizes: name -> (module, QuantSpec)."""
        targets = {}
        for name, module in match_named_modules(layer, self.resolved_targets, self.ignore):
            if getattr(module, "quantization_scheme", None) is None or not isinstance(module, torch.nn.Linear):
                continue
            targets[name] = (module, self._spec(module, f"{layer_name}.{name}"))
        return targets

    def _tune(self, layer, layer_name: str, targets: dict, inputs, token_mask) -> BlockResult:
        """tune_block on the layer with this modifier's settings, each Linear's qparams written
        by its finalize; the layer back on its own device after. tune_block empties ``inputs``
        (release_inputs): their hidden states are freed once the reference outputs are made."""
        home = next(layer.parameters()).device
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "cuda" else home
        if self._devices:  # device_ids: the block runs on the first, its Linears spread over all
            device = self._devices[0]
        logger.info(f"AutoRound ({self.backend}) on {layer_name}: {len(targets)} Linear layers, "
                    f"{len(inputs)} samples, {self.iters} iterations")

        def finalize(name, linear, qp):
            return self._write_qparams(targets[name][0], targets[name][1], qp)

        bar = self._progress
        try:
            # disable_offloading: each offloaded weight is onloaded once and kept for the whole
            # block, instead of copied from the host at every access (every iteration)
            with torch.enable_grad(), align_module_device(layer), disable_offloading():
                result: BlockResult = tune_block(
                    layer, inputs, {n: s for n, (_, s) in targets.items()},
                    q_inputs=self._q_input, iters=self.iters, batch_size=self.batch_size, lr=self.lr,
                    seed=self.seed, token_mask=token_mask, backend=self.backend, device=device,
                    finalize=finalize, progress=bar.start(layer_name) if bar else None,
                    cache_device="cpu" if self.cache_on_cpu else None,
                    cuda_graph=self.cuda_graph and self.backend == "cuda",
                    fuse_elementwise=self.fuse_elementwise,  # True needs backend cuda (on_initialize)
                    step_in_backward=self.step_in_backward, grouped_experts=self.grouped_experts,
                    remake_weights=self.remake_weights, release_inputs=True,
                    linear_devices=self._devices if self._devices and len(self._devices) > 1 else None)
                layer.to(home)
        except BaseException:
            if bar:
                bar.close()
            raise
        if bar:
            bar.finish_block()
        return result

    def _record(self, layer_name: str, samples: int, result: BlockResult) -> None:
        """The block's row of block_stats."""
        self._block_stats.append(dict(block=layer_name, samples=samples, init_loss=result.init_loss,
                                      best_loss=result.best_loss, best_iter=result.best_iter,
                                      seconds=result.seconds, losses=result.losses, phases=result.phases,
                                      loop_ms=result.loop_ms, placement=result.placement,
                                      fused=result.fused, grouped_experts=result.grouped_experts,
                                      eager_reason=result.eager_reason, memory_note=result.memory_note))

    def _keep_block(self, layer, layer_name: str, targets: dict) -> None:
        """resume_dir: the tuned block's Linears, its output and its stats row, to disk."""
        with align_module_device(layer):
            params = {f"{n}.{p}": t for n, (m, _) in targets.items() for p, t in m.named_parameters(recurse=False)}
            self._store.save(layer_name, params, self._q_input, self._block_stats[-1])

    def _restore_block(self, layer, layer_name: str, targets: dict, inputs: list) -> bool:
        """Put back a block that an earlier run of the same command finished (resume_dir):
        its Linears' parameters, its statistics and, for the last block that run finished,
        the quantized chain's output. False if that run did not finish this block."""
        self._store.check([args[0] for args, _ in inputs])
        saved = self._store.load(layer_name)
        if saved is None:
            return False
        params, q_outputs, stats = saved
        if self.backend == "torch" and next(layer.parameters()).device.type == "cpu":
            convert_block(layer, cpu_tune_dtype())  # as tune_block leaves a block it tuned on a CPU
        for key, value in params.items():
            name, _, param_name = key.rpartition(".")
            _put_param(targets[name][0], param_name, value)
        if q_outputs is not None:  # else a later block was kept too, and is put back next
            self._q_input = q_outputs.to(inputs[0][0][0].device)
        self._block_stats.append(stats)
        logger.info(f"{layer_name}: finished by an earlier run, reloaded from {self._store.directory}")
        layer.eval()
        return True

    @staticmethod
    def _write_qparams(module, spec: QuantSpec, qp: dict) -> torch.Tensor:
        """Fill the qparams compressed-tensors registered on ``module`` (allocated uninitialised)
        and return the weight as the checkpoint format dequantizes it."""

        def put(param_name, value):
            _put_param(module, param_name, value)

        args = module.quantization_scheme.weights
        if spec.kind == "nvfp4":
            put("weight_scale", qp["scale"])
            put("weight_global_scale", qp["global_scale"])
            if spec.act:
                put("input_global_scale", qp["input_global_scale"])
        elif spec.kind == "mx":  # the power of two itself; compressed-tensors stores its exponent
            put("weight_scale", torch.exp2(qp["scale"]))
        elif spec.kind == "fp8":
            put("weight_scale", qp["scale"])
            if spec.act:
                put("input_scale", qp["input_scale"])
        else:
            put("weight_scale", qp["scale"])
        zp_param = getattr(module, "weight_zero_point", None)
        if zp_param is not None:
            if spec.kind == "int" and not spec.sym:
                # auto-round's levels are 0..2^b-1 with zp in that range; compressed-tensors'
                # are signed, -2^(b-1)..2^(b-1)-1: shift both by 2^(b-1).
                put("weight_zero_point", qp["zero_point"] - 2 ** (spec.bits - 1))
            else:
                put("weight_zero_point", torch.zeros_like(zp_param))
        stored = fake_quantize(qp["weight"].to(module.weight.dtype), module.weight_scale,
                               getattr(module, "weight_zero_point", None), args,
                               global_scale=getattr(module, "weight_global_scale", None))
        put("weight", stored)
        return stored


def _log_block(layer_name: str, result: BlockResult) -> None:
    """A tuned block's log lines: why it ran eagerly, what it gave up to fit, its losses."""
    if result.eager_reason:
        logger.info(f"{layer_name}: {result.eager_reason}")
    if result.memory_note:
        logger.warning(f"{layer_name}: {result.memory_note}")
    if result.losses:
        logger.info(f"{layer_name}: loss {result.init_loss:.6g} -> {result.best_loss:.6g} "
                    f"(iter {result.best_iter}), {result.seconds:.1f} s")
    else:  # iters=0: the imatrix-weighted scale search, no loss is computed
        logger.info(f"{layer_name}: RTN with the scale search (iters=0), {result.seconds:.1f} s")


def _put_param(module, param_name: str, value: torch.Tensor) -> None:
    """Write ``value`` into the module's parameter (skipped where it has none)."""
    param = getattr(module, param_name, None)
    if param is None:
        return
    value = value.to(param.device, param.dtype).reshape(param.shape)
    if is_source_process():
        # through compressed-tensors, so an offloaded module keeps the value
        update_offload_parameter(module, param_name, value)
    else:
        # Under a process group the ranks may share the offloaded storage, and one rank
        # writes it (compressed-tensors' contract, as llm-compressor's own modifiers do);
        # the others, which computed the same values, update their onloaded copy only.
        param.data = value


ModifierFactory.register("AutoRoundModifier", AutoRoundModifier)
