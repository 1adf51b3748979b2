"""``ExplanationLogger``: CAM overlays and feature maps of fixed probe images, logged while a model trains."""

from __future__ import annotations

import atexit
import logging
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from lumos.api import explain, feature_maps
from lumos.capture import model_guard
from lumos.engine import blank_maps, quiet_blank_maps
from lumos.errors import LumosError, NonFiniteError, each_alone_on_nonfinite
from lumos.explainer import MethodSpec, check_method_settings
from lumos.methods.base import method_class
from lumos.render import draw_map
from lumos.shortfall import gather_shortfalls
from lumos.targets import OutputSpec, probabilities, select_output
from lumos.track._guard import preserve_grads, preserve_rng
from lumos.track.probe import (
    KerasAdapter,
    channel_tiles,
    display_array,
    hstack,
    is_keras_model,
    keras_auto_layer,
    to_nchw,
    upscale,
    with_caption,
)
from lumos.track.sinks import Sink, make_sink

log = logging.getLogger(__name__)

TargetMode = Literal["true", "pred", "both"]
FEATURES = "features"
METRICS = ("pointing", "deletion")


class ExplanationLogger:
    """Log explanations of fixed probe images to one or more sinks, every N epochs or steps.

    Args:
        images: probe images, (B, C, H, W) or (B, H, W, C) (Keras), in the model's input space. A 3-D
            grayscale batch (B, H, W) is read as B images when ``labels`` (or ``masks``) give B; without them it
            is refused in one line (it looks like one image with B channels): add the channel axis yourself.
        labels: their true classes (B,), optional; needed for ``target="true"``/``"both"``.
        methods: lumos method names (``"gradcam"``, ``"cam"``, ``"gradcam++"``, ...) and/or
            ``"features"`` (a grid of the top channels of ``feature_layer``).
        layer: the CAM layer (dotted module name, Keras layer name, a module or ``"auto"``).
        feature_layer: the layer whose feature maps ``"features"`` shows (default: ``layer``).
        target: explain the true label, the predicted class, or ``"both"`` side by side.
        class_names: names for captions (default: indices; ``negative``/``positive`` for a binary head).
        sinks: ``Sink`` objects or names (``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"memory"``).
        every_n_epochs / every_n_steps: logging frequency used by the callbacks (``None`` = never).
        display_images: what to draw the overlays on (default: ``images``, min/max scaled if outside [0, 1]).
        masks: object masks (B, H, W) for the ``"pointing"`` metric.
        metrics: scalars per CAM method: ``"pointing"`` (pointing game hit rate) and/or ``"deletion"`` (AUC).
        prefix: the first part of every tag: ``<prefix>/<method>/<image index>``.
        display_size: overlays are drawn with this longer side (pixels).
        settings: method settings, ``{method: {key: value}}`` (e.g. ``{"integrated_gradients": {"steps": 16}}``),
            checked when the logger is made, like the method names.
        output: for a model returning a tuple/list or dict, the index or key of its (batch, classes) logits (or a
            callable on the model output), as ``output=`` of :func:`lumos.explain`; used for the maps, the
            predicted class, the captions and the deletion score. Checked at the first :meth:`log`.

    A single-logit head is binary: the logit explains "positive", its negation "negative", and the
    probability is its sigmoid. Logging never disturbs training: model modes, BatchNorm statistics,
    ``.grad`` and the Python/NumPy/torch RNG streams are as before the call.
    """

    def __init__(
        self,
        images: Any,
        labels: Sequence[int] | torch.Tensor | None = None,
        *,
        methods: Sequence[str] = ("gradcam",),
        layer: Any = "auto",
        feature_layer: Any = None,
        n_features: int = 16,
        target: TargetMode = "both",
        class_names: Sequence[str] | None = None,
        sinks: Sequence[Sink | str] | Sink | str = ("tensorboard",),
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        display_images: Any = None,
        masks: torch.Tensor | None = None,
        metrics: Sequence[str] = (),
        prefix: str = "lumos",
        display_size: int = 128,
        colormap: str = "jet",
        alpha: float = 0.5,
        deletion_steps: int = 20,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        output: OutputSpec = None,
    ) -> None:
        if output is not None and (isinstance(output, bool) or not (isinstance(output, int | str) or callable(output))):
            raise LumosError(f"output= must be an index, a key or a callable on the model output, not {output!r}.")
        self.output = output
        self.labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1).cpu()
        mask_t = None if masks is None else torch.as_tensor(masks)
        batch = (len(self.labels) if self.labels is not None
                 else mask_t.shape[0] if mask_t is not None and mask_t.ndim == 3 else None)
        self.images, self.channels_last = to_nchw(images, batch)  # 3-D: grayscale (B, H, W) only when labels say so
        b = self.images.shape[0]
        if self.labels is not None and len(self.labels) != b:
            raise LumosError(f"Got {len(self.labels)} labels for {b} probe images; give one per image.")
        if target not in ("true", "pred", "both"):
            raise LumosError(f"target must be 'true', 'pred' or 'both', not {target!r}.")
        if target != "pred" and self.labels is None:
            warnings.warn("No labels given: explaining the predicted class only.", stacklevel=2)
            target = "pred"
        self.target: TargetMode = target
        self.methods = [str(m).lower() for m in methods]
        if not self.methods:
            raise LumosError("Give at least one method to log, e.g. methods=['gradcam'].")
        self.settings = _method_settings(self.methods, settings)  # a typo fails here, not at every logging step
        self.layer = layer
        self.feature_layer = feature_layer if feature_layer is not None else layer
        self.n_features = n_features
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        sink_specs = [sinks] if isinstance(sinks, Sink | str) else list(sinks)
        self.sinks = [make_sink(s) for s in sink_specs]
        self.every_n_epochs = _every("every_n_epochs", every_n_epochs)
        self.every_n_steps = _every("every_n_steps", every_n_steps)
        shown = self.images if display_images is None else to_nchw(display_images, b, "display_images")[0]
        if shown.shape[0] != b:
            raise LumosError(f"display_images has {shown.shape[0]} images; the probe has {b}.")
        self.display = [display_array(im) for im in shown]
        self.masks = None if mask_t is None else mask_t.bool().cpu()
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise LumosError(f"Unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}.")
        if "pointing" in metrics and self.masks is None:
            raise LumosError("The 'pointing' metric needs masks= (the objects' pixels, B x H x W).")
        self.metrics = list(metrics)
        self.prefix = prefix
        self._reported: set[tuple] = set()  # (method, reason) of steps skipped, shortfalls: warned once
        self.display_size = display_size
        self.colormap = colormap
        self.alpha = alpha
        if "deletion" in metrics:  # a bad value here would drop every method at every step, with one warning
            if isinstance(deletion_steps, bool) or not isinstance(deletion_steps, int) or deletion_steps < 1:
                raise LumosError(f"deletion_steps must be a positive integer, got {deletion_steps!r}.")
            pixels = self.images.shape[-2] * self.images.shape[-1]
            if deletion_steps > pixels:
                raise LumosError(f"deletion_steps={deletion_steps} exceeds the {pixels} pixels of each probe image; "
                                 f"use {pixels} or fewer.")
        self.deletion_steps = deletion_steps
        self._adapters: dict[int, KerasAdapter] = {}
        self._close_at_exit = False
        self._other_rank_said = False

    # -- when ----------------------------------------------------------------------------------------
    def due_epoch(self, epoch: int) -> bool:
        """Whether to log at the end of (0-based) ``epoch``."""
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0

    def due_step(self, step: int) -> bool:
        """Whether to log after (global) ``step``."""
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    # -- model ---------------------------------------------------------------------------------------
    def _adapt(self, model: Any) -> tuple[nn.Module, Any, Any]:
        """(torch module, CAM layer spec, feature layer spec); Keras models get a channels-first adapter."""
        if not is_keras_model(model):
            if not isinstance(model, nn.Module):
                raise LumosError(f"model must be a torch.nn.Module or a Keras 3 model, not {type(model).__name__}.")
            return unwrap(model), _inner_name(self.layer), _inner_name(self.feature_layer)
        names = [keras_auto_layer(model) if spec == "auto" else str(spec) for spec in (self.layer, self.feature_layer)]
        adapter = self._adapters.get(id(model))
        if adapter is None or adapter.keras_model is not model:
            adapter = KerasAdapter(model, sorted(set(names)))
            self._adapters[id(model)] = adapter
        return adapter, adapter.tap_name(names[0]), adapter.tap_name(names[1])

    def _name(self, c: int, binary: bool) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return ("negative", "positive")[c] if binary else str(c)

    # -- logging -------------------------------------------------------------------------------------
    def log(self, model: Any, step: int) -> list[str]:
        """Explain the probe images with ``model`` now and send the pictures to every sink at ``step``.

        Returns the image tags written. The model, its gradients and the RNG streams are left as found. A method
        that cannot explain the model at this step (e.g. ``layer="auto"`` on a torchvision ViT whose head is still
        all zeros) is left out of this step with one warning per reason; it never stops the training.

        Under ``torch.distributed`` (a process group initialised, e.g. a plain DDP loop) only global rank 0 logs: on
        the other ranks this is a no-op returning ``[]`` (no forward pass, nothing sent to the sinks).
        """
        rank = _global_rank()
        if rank != 0:
            if not self._other_rank_said:
                self._other_rank_said = True
                log.debug("lumos.track: rank %d of a torch.distributed run: only rank 0 logs", rank)
            return []
        net, layer, flayer = self._adapt(model)
        with preserve_rng(), preserve_grads(net):
            items, scalars = self._collect(net, layer, flayer)
        for sink in self.sinks:
            sink.log_images(items, step)
            for tag, value in scalars.items():
                sink.log_scalar(tag, value, step)
            sink.flush()
        return [tag for tag, _, _ in items]

    def _collect(self, net: nn.Module, layer: Any, flayer: Any) -> tuple[list[tuple[str, Image.Image, str]], dict]:
        param = next(iter(net.parameters()), None)
        device = torch.device("cpu") if param is None else param.device
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = self.images.to(device, dtype)  # a half/bfloat16/float64 model gets probes of its own dtype
        try:
            with model_guard(net), torch.no_grad():
                out = net(x)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LumosError(f"The model fails on the probe images {tuple(x.shape)} ({dtype}, {device}): {first}") \
                from err
        out = self._logits(out).detach().float().cpu()
        n_classes = max(out.shape[1], 2)
        if self.labels is not None and not bool(((self.labels >= 0) & (self.labels < n_classes)).all()):
            bad = next(int(v) for v in self.labels if not 0 <= int(v) < n_classes)
            raise LumosError(f"Probe label {bad} is not a class of this model (its head has {n_classes} classes: "
                             f"0..{n_classes - 1}).")
        finite = out.isfinite().all(1)
        binary = out.shape[1] == 1
        dist = probabilities(out)  # the library's one probability decision
        if binary:
            p_pos = dist[:, 0]
            preds = (p_pos > 0.5).long()
            probs = torch.stack([1 - p_pos, p_pos], 1)
        else:
            probs = dist
            preds = probs.argmax(1)
        modes = {"true": ["true"], "pred": ["pred"], "both": ["true", "pred"]}[self.target]
        items: list[tuple[str, Image.Image, str]] = []
        scalars: dict[str, float] = {}
        b = x.shape[0]
        captions = []
        for i in range(b):
            pred = int(preds[i])
            cap = f"#{i} pred: {self._name(pred, binary)} ({float(probs[i, pred]):.2f})"
            if not finite[i]:  # argmax of NaN logits is no prediction
                cap = f"#{i} pred: none (the output is not finite)"
            if self.labels is not None:
                lab = int(self.labels[i])
                cap = f"#{i} label: {self._name(lab, binary)}, " + cap[len(f"#{i} "):]
                cap += f", p(label)={float(probs[i, lab]):.2f}"
            captions.append(cap)
        scoreless = {i for i in range(b) if not bool(out[i].isfinite().any())}  # no class has a finite score
        for method in self.methods:
            try:
                self._collect_method(method, net, x, layer, flayer, captions, modes, preds, probs, binary, items,
                                     scalars, scoreless)
            except LumosError as err:  # e.g. an untrained ViT's zero head: say it, never stop the training
                self._skipped(method, err)
        return items, scalars

    def _logits(self, out: Any) -> torch.Tensor:
        """The (batch, classes) logits picked by ``output=`` from the model output (one-line errors otherwise)."""
        sel = self.output
        if sel is not None and not callable(sel):
            if isinstance(out, torch.Tensor):
                raise LumosError(f"output={sel!r} was given, but the model returns one tensor {tuple(out.shape)}; "
                                 "leave output= out.")
            if isinstance(out, Mapping) and sel not in out:
                keys = ", ".join(repr(k) for k in out)
                raise LumosError(f"output={sel!r} is not a key of the model output; its keys: {keys}.")
            if isinstance(out, tuple | list) and not (isinstance(sel, int) and -len(out) <= sel < len(out)):
                raise LumosError(f"output={sel!r} is not an index of the model output, a {type(out).__name__} of "
                                 f"{len(out)}; give an index 0..{len(out) - 1}.")
        try:
            logits = select_output(out, sel)
        except LumosError as err:
            if sel is not None:
                raise LumosError(f"output={sel!r} does not select a tensor from the model output: {err}") from err
            if isinstance(out, Mapping):
                keys = ", ".join(repr(k) for k in out)
                raise LumosError(f"The model returns a dict ({keys}); give ExplanationLogger(..., output=<key>) to "
                                 "choose its (batch, classes) logits.") from err
            if isinstance(out, tuple | list):
                raise LumosError(f"The model returns a {type(out).__name__} of {len(out)}; give ExplanationLogger(..., "
                                 "output=<index>) to choose its (batch, classes) logits.") from err
            raise LumosError(f"ExplanationLogger needs a classifier returning (batch, classes) logits; the model "
                             f"returns a {type(out).__name__}.") from err
        if logits.ndim != 2:
            what = "the model returns" if sel is None else f"output={sel!r} selects"
            raise LumosError(f"ExplanationLogger needs (batch, classes) logits; {what} a tensor of shape "
                             f"{tuple(logits.shape)}.")
        return logits

    def _skipped(self, method: str, err: LumosError) -> None:
        """One warning per method and reason (later steps with the same reason log at debug level)."""
        self._once((method, str(err)), f"lumos.track: {method} not logged at this step: {err}")

    def _once(self, key: tuple, text: str) -> None:
        level = logging.DEBUG if key in self._reported else logging.WARNING
        self._reported.add(key)
        log.log(level, "%s", text)

    def _left_out(self, method: str, bad: Sequence[int], what: str, of: str = "",
                  rest: str = "the other probe images are logged") -> None:
        """One warning per method and set of probe images left out of a step, or of one of its scalars (``of``),
        naming them (debug level at later steps)."""
        which = ", ".join(map(str, bad))
        self._once((method, "not finite", of, tuple(bad)),
                   f"lumos.track: {method}: probe image{'s' if len(bad) > 1 else ''} {which} left out"
                   f"{f' of {of}' if of else ''} at this step: {what} not finite (NaN or inf); {rest} (said once; "
                   "later steps log it at debug level)")

    def _collect_method(self, method: str, net: nn.Module, x: torch.Tensor, layer: Any, flayer: Any,
                        captions: list[str], modes: list[str], preds: torch.Tensor, probs: torch.Tensor, binary: bool,
                        items: list[tuple[str, Image.Image, str]], scalars: dict[str, float],
                        scoreless: Collection[int] = ()) -> None:
        """Add one method's pictures (and its scalars) for the probe images to ``items`` (``scalars``).

        A probe image whose score (or, for ``"features"``, activation) is not finite is left out of this
        step with one warning naming it; the other probe images are logged. When none is left, the method
        is left out (a ``LumosError``).
        """
        b, device = x.shape[0], x.device
        found: list[tuple[str, Image.Image, str]] = []
        if method == FEATURES:
            fm = feature_maps(net, x, layer=flayer, n=self.n_features)
            ok = fm.activations.flatten(1).isfinite().all(1).tolist()  # NaN tiles would be drawn flat, "quiet"
            if not any(ok):
                raise LumosError("the feature maps are not finite (NaN or inf): check the model's weights.")
            if not all(ok):
                self._left_out(method, [i for i in range(b) if not ok[i]], "its feature maps are")
            for i in (i for i in range(b) if ok[i]):
                grid = channel_tiles(fm.activations[i], fm.top_channels[i])
                found.append((f"{self.prefix}/{FEATURES}/{i:02d}", with_caption(grid, captions[i]), captions[i]))
            items += found
            return
        bad = set(scoreless)  # probe images whose explained score is not finite
        if len(bad) == b:
            raise LumosError("the model's scores are not finite (NaN or inf) for every probe image: check the "
                             "model's weights.")
        signs = None
        per_mode: list[tuple[str, torch.Tensor, dict[int, torch.Tensor]]] = []
        kind = None
        for mode in modes:
            classes = self.labels if mode == "true" else preds
            if binary:  # explain the logit for "positive", its negation for "negative"
                signs = classes.to(device).float() * 2 - 1

            def run(idx: list[int], classes: torch.Tensor = classes, signs: torch.Tensor | None = signs,
                    ) -> list[tuple[int, torch.Tensor]]:
                nonlocal kind
                sel = torch.tensor(idx, dtype=torch.long)
                target: Any = _BinaryTarget(signs[sel.to(device)]) if signs is not None else classes[sel].tolist()
                ex = explain(net, x[sel.to(device)], method=method, target=target, layer=layer, output=self.output,
                             **self.settings.get(method_class(method).name, {}))
                kind = ex.kind
                maps = ex.maps.detach().float().cpu()
                return [(i, maps[k]) for k, i in enumerate(idx)]

            def fail(i: int, err: NonFiniteError) -> list[tuple[int, torch.Tensor]]:
                bad.add(i)
                return []

            alive = [i for i in range(b) if i not in bad]
            if not alive:
                break
            # blank maps are said on the panel, a cap reached above tolerance once per run, not at every step;
            # a NaN or inf score on some probe images: each image alone, so the others are kept
            with quiet_blank_maps(), gather_shortfalls(say=False) as short:
                got = dict(each_alone_on_nonfinite(run, alive, fail))
            for cut in short:
                self._once(cut.key(), f"lumos.track: {cut.line()} (said once; later steps log it at debug level)")
            per_mode.append((mode, classes, got))
        keep = [i for i in range(b) if i not in bad]
        if not keep:
            raise LumosError("the model's scores are not finite (NaN or inf) for every probe image: check the "
                             "model's weights.")
        if bad:
            self._left_out(method, sorted(bad), "the explained score is")
        panels: list[list[Image.Image]] = [[] for _ in range(b)]
        for mode, classes, got in per_mode:
            maps = torch.stack([got[i] for i in keep])
            blank = blank_maps(maps)
            for k, i in enumerate(keep):
                c = int(classes[i])
                head = panel_header(mode, self._name(c, binary), float(probs[i, c]), bool(blank[k]))
                img = upscale(self.display[i], self.display_size)
                panels[i].append(with_caption(draw_map(img, maps[k].numpy(), kind, self.colormap, self.alpha), head))
        for i in keep:
            found.append((f"{self.prefix}/{method}/{i:02d}", with_caption(hstack(panels[i]), captions[i]),
                          captions[i]))
        _, first_classes, first = per_mode[0]
        sel = torch.tensor(keep, dtype=torch.long)
        metrics = self._metrics(net, x[sel.to(device)], method, torch.stack([first[i] for i in keep]),
                                first_classes[sel], binary, keep)
        items += found  # only once the method is complete: a failure adds nothing
        scalars.update(metrics)

    def _metrics(self, net: nn.Module, x: torch.Tensor, method: str, maps: torch.Tensor | None,
                 classes: torch.Tensor | None, binary: bool, keep: Sequence[int] | None = None) -> dict[str, float]:
        """The method's scalars over the probe images ``keep`` (default: all), whose ``x``, maps and classes
        are given. A probe image whose masked copies give a non-finite score is left out of the deletion mean
        (one warning naming it); when no probe image is left, the deletion scalar is not logged."""
        if not self.metrics or maps is None:
            return {}
        from lumos.evaluate import Deletion, PointingGame

        out: dict[str, float] = {}
        if "pointing" in self.metrics:
            masks = self.masks if keep is None else self.masks[torch.tensor(list(keep), dtype=torch.long)]
            hits = PointingGame()(maps=maps, masks=masks)
            out[f"{self.prefix}/{method}/pointing_game"] = float(hits.nanmean())
        if "deletion" in self.metrics:
            deletion = Deletion(steps=self.deletion_steps, output=self.output)
            names = list(range(len(maps))) if keep is None else list(keep)  # probe image numbers, for the warning

            def run(idx: list[int]) -> list[float]:
                sel = torch.tensor(idx, dtype=torch.long, device=x.device)
                targets = None if binary else classes.to(x.device)[sel]
                return deletion(net, x[sel], maps.to(x.device)[sel], targets).auc.tolist()

            bad: list[int] = []

            def fail(k: int, err: NonFiniteError) -> list[float]:  # NaN on its masked copies: that image only
                bad.append(names[k])
                return []

            aucs = each_alone_on_nonfinite(run, list(range(len(maps))), fail)
            if bad:
                tag = f"{self.prefix}/{method}/deletion_auc"
                self._left_out(method, bad, f"the model's score on {'their' if len(bad) > 1 else 'its'} masked "
                               "copies is", "deletion_auc",
                               f"{tag} is the mean over the other probe images" if aucs else f"{tag} is not logged")
            if aucs:  # constant maps: NaN, left out of the mean
                out[f"{self.prefix}/{method}/deletion_auc"] = float(torch.tensor(aucs).nanmean())
        return out

    def remove_hooks(self) -> None:
        """Remove the hooks lumos put on Keras layers (put back by the next :meth:`log`); the sinks stay open."""
        for adapter in self._adapters.values():
            adapter.remove()
        self._adapters.clear()

    def flush(self) -> None:
        """Write what every sink holds, leaving them open."""
        for sink in self.sinks:
            sink.flush()

    def close_at_exit(self) -> None:
        """Close the sinks when the interpreter exits, unless :meth:`close` is called before (the Keras and Lightning
        callbacks' way: another ``fit`` keeps logging into the same runs)."""
        if not self._close_at_exit:
            self._close_at_exit = True
            atexit.register(self.close)

    def close(self) -> None:
        """Flush and close every sink (and remove hooks put on Keras layers)."""
        if self._close_at_exit:
            self._close_at_exit = False
            atexit.unregister(self.close)
        self.remove_hooks()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> ExplanationLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _global_rank() -> int:
    """This process's global rank in an initialised ``torch.distributed`` process group; 0 without one."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _every(name: str, value: int | None) -> int | None:
    """A logging period: ``None``/``0`` (never) or a positive int; anything else is a one-line error now."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LumosError(f"{name} must be a positive int or None (never), not {value!r}.")
    return value or None


def _method_settings(methods: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None,
                     ) -> dict[str, dict[str, Any]]:
    """``settings`` by registered method name, after checking every method name and setting (one-line errors)."""
    names = {method_class(m).name for m in methods if m != FEATURES}
    checked: dict[str, dict[str, Any]] = {}
    for key, kwargs in (settings or {}).items():
        name = method_class(key).name
        if name not in names:
            raise LumosError(f"settings given for {name}, which is not among the methods ({', '.join(methods)}).")
        checked[name] = dict(kwargs)
        check_method_settings(MethodSpec(name, tuple(sorted(checked[name].items()))))
    return checked


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel`` wrappers.

    Explaining the wrapper itself would run DDP's gradient-sync machinery outside a training step (the next
    training step then fails) and need ``module.``/``_orig_mod.`` layer names; the inner network has the
    same parameters, so the maps are the same.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _inner_name(spec: Any) -> Any:
    """A layer name without the wrappers' ``module.``/``_orig_mod.`` prefixes (other specs unchanged)."""
    while isinstance(spec, str) and spec.startswith(WRAPPER_PREFIXES):
        spec = spec.split(".", 1)[1]
    return spec


class _BinaryTarget:
    """Score of a single-logit head: ``+logit`` for images explained as positive, ``-logit`` for negative."""

    def __init__(self, signs: torch.Tensor) -> None:
        self.signs = signs

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, 0] * self.signs.to(output.device, output.dtype)


def panel_header(mode: str, name: str, prob: float, blank: bool = False) -> str:
    """``true: square (0.87)`` over a panel; `` - zero map`` when the map is zero everywhere (drawn as nothing)."""
    return f"{mode}: {name} ({prob:.2f})" + (" - zero map" if blank else "")
