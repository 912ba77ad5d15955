"""Take the model home: export a run's global model with its metadata, and run it on images.

:func:`run_model` rebuilds the main run's model as the run itself scored it: the strategy
of the saved config, loaded with the newest checkpoint (or, with
``evaluation.select_round=best_val``, the best-on-val round the run reports), asked for
each client's model the way the round loop asks (``Strategy.client_state``). One shared
encoder and one head per domain make the global model; a run whose clients of a domain hold
different models (``local`` training) has none, and is refused.

:func:`export_model` writes it as

* ``safetensors``: the ``MultiHeadNet`` state (``encoder.*``, ``heads.<domain>.*``) with
  the metadata as JSON in the header (``__metadata__["umim"]``) and in ``<file>.json``
  beside; loading it rebuilds the network with umim's encoder registry;
* ``torchscript``: one :func:`torch.jit.script` module whose ``forward(images, domain)``
  returns the domain head's logits (MONAI 1.6's ViT scripts; an encoder that cannot be
  scripted is traced instead, with a warning, and the metadata's ``torchscript`` says
  which), the metadata in the archive's ``extra/umim.json``; loading it needs only torch.

The metadata holds the domains with their task, label names, input layout (channels and
spatial dimensions of the raw images) and normalisation (the per-channel mean and std of
the client's train shard, on the ``[0, 1]`` scale: ``(x / 255 - mean) / std``), the input
shape ``3 x 28 x 28`` and the resolved config that made the model.

:class:`ExportedModel` loads either file and applies the data plane's preprocessing
(:mod:`engine.data.unify`: grey or RGB as the domain's raw images, centre crop, area
resize to 28, normalisation) to image files (PNG / JPEG through PIL, ``.npy`` arrays).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from engine.config import ExperimentConfig, from_dict, to_dict
from engine.data.catalog import domain_catalog
from engine.data.shards import read_shard
from engine.data.unify import UNIFIED_SHAPE, to_float_tensor, unify_image_list
from engine.fl.client import shard_builder
from engine.fl.simulation import make_strategy
from engine.nn.metrics import scores_from_logits
from engine.nn.models import MultiHeadNet, build_model
from engine.records.checkpoint import latest_checkpoint
from engine.records.storage import Storage
from engine.run.names import replicate_step
from engine.run.session import client_specs, replicate_seeds, resolve_paths
from strategies.state import encoder_of, head_of
from strategies.types import ClientInfo, State

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("safetensors", "torchscript")
Format = Literal["safetensors", "torchscript"]
EXPORT_VERSION = 1
_META_KEY = "umim"
_EXTRA_FILE = "umim.json"
_SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt"}


class ExportError(ValueError):
    """A run that cannot be exported, or a model / image that cannot be used."""


@dataclass
class RunModel:
    """The global model of a run (on the CPU, in eval mode) and its metadata."""

    model: MultiHeadNet
    metadata: dict[str, Any]


def _config(storage: Storage) -> ExperimentConfig:
    for name in ("progress/config.yaml", "config.yaml"):  # the config that made the state
        if storage.exists(name):
            return from_dict(ExperimentConfig, yaml.safe_load(storage.read_text(name)))
    raise ExportError(f"{storage.uri} holds no config.yaml: not a umim run directory")


def _input_layout(spec: Any, images: np.ndarray) -> dict[str, int]:
    """A domain's raw image layout: MedMNIST's own for its datasets, else grey when the
    unified train images repeat one channel (as :func:`unify_images` makes grey ones)."""
    if spec.source == "medmnist" and spec.dataset:
        from engine.data.medmnist import medmnist_spec

        raw = medmnist_spec(spec.dataset, spec.size)
        return {"in_channels": raw.in_channels, "spatial_dims": raw.spatial_dims}
    grey = bool((images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all())
    return {"in_channels": 1 if grey else 3, "spatial_dims": 2}


def run_model(run_dir: str | os.PathLike[str], *, data_root: str | None = None,
              cache_dir: str | None = None) -> RunModel:
    """The main run's global model as the run scored it, with its metadata.

    Parameters
    ----------
    run_dir
        A finished run directory (with several replicates: replicate 0's), or a
        baseline's folder in one (``<run>/baselines/<name>-seed<s>``).
    data_root, cache_dir
        This machine's folders, as for :func:`engine.run.study.run`: the clients' train
        shards give each domain's normalisation and label names.

    Raises
    ------
    ExportError
        When the main run has not finished, or has no single global model.
    """
    storage = Storage(run_dir)
    saved = _config(storage)
    count = len(replicate_seeds(saved))
    rep = storage if count == 1 else Storage(f"{storage.uri}/replicates/0")
    checkpoint = latest_checkpoint(rep)
    if storage.exists("progress"):  # a run directory: its main step must be done
        done = storage.exists(f"progress/{replicate_step('main', 0, count)}.done")
    else:  # a baseline's folder inside a run: its last checkpoint must be the last round
        done = checkpoint is not None and checkpoint.round >= saved.planned_rounds()
    if not done or checkpoint is None:
        raise ExportError(f"{storage.uri}: the main run has not finished; run or resume it "
                          "first")
    cfg = resolve_paths(saved, data_root, cache_dir)
    state = checkpoint.strategy
    best = checkpoint.extra.get("best")
    selected = checkpoint.round
    if cfg.evaluation.select_round == "best_val" and best is not None:
        state, selected = best["state"], int(best["round"])
    builder = shard_builder(cfg.data)
    catalog = domain_catalog(dict(cfg.data.extra_domains))
    infos, domains = [], {}
    for spec in client_specs(cfg, pooled=False, build=False):
        recipe = spec.recipes[0]
        train = read_shard(recipe.resolve(builder)["train"])
        meta = train.meta
        infos.append(ClientInfo(cid=spec.cid, domains=(recipe.domain,),
                                tasks={recipe.domain: meta.task},
                                num_classes={recipe.domain: meta.num_classes},
                                num_train=len(train)))
        if recipe.domain not in domains:
            norm = meta
            if cfg.data.clients_per_domain > 1:  # the clients' own statistics differ
                norm = read_shard(builder.domain(recipe.domain)["train"]).meta
            domains[recipe.domain] = {
                "task": meta.task, "label_names": list(meta.label_names),
                "mean": list(norm.mean), "std": list(norm.std),
                **_input_layout(catalog[recipe.domain], train.images)}
    strategy = make_strategy(cfg)
    strategy.initialize(infos, {})
    strategy.load_state_dict(state)
    model_state = _global_state(strategy, infos)
    net = build_model(cfg.model, {d: len(m["label_names"]) for d, m in domains.items()})
    net.load_state_dict(model_state)
    net.eval()
    metadata = {
        "format_version": EXPORT_VERSION, "run": storage.uri, "strategy": cfg.strategy.name,
        "round": selected, "input_shape": list(UNIFIED_SHAPE), "domains": domains,
        "normalisation": ("per client train shard" if cfg.data.clients_per_domain == 1
                          else "per domain train split (the clients normalised their own "
                               "parts with their own statistics)"),
        "config": to_dict(saved)}
    return RunModel(net, metadata)


def _global_state(strategy: Any, infos: Sequence[ClientInfo]) -> State:
    """One encoder and one head per domain from the models the strategy gives its clients;
    refused when two clients' encoders, or two heads of one domain, differ."""
    encoder: State | None = None
    heads: dict[str, State] = {}
    for info in infos:
        state = strategy.client_state(info.cid)
        domain = info.domains[0]
        enc, head = encoder_of(state), head_of(state, domain)
        if not head:
            raise ExportError(f"the run's model of client {info.cid} has no head for "
                              f"{domain}: no global model to export")
        if encoder is None:
            encoder = enc
        elif not _same(encoder, enc):
            raise ExportError(f"strategy {strategy.name!r}: the clients hold different "
                              "encoders (e.g. local training), so the run has no single "
                              "global model to export")
        if domain in heads and not _same(heads[domain], head):
            raise ExportError(f"strategy {strategy.name!r}: the clients of domain {domain} "
                              "hold different heads, so the run has no single global model")
        heads[domain] = head
    assert encoder is not None
    return {**encoder, **{k: v for h in heads.values() for k, v in h.items()}}


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- writing -----------------------------------------------------------------------------
class _Scripted(torch.nn.Module):
    """``forward(images, domain)``: a traced encoder and one linear head per domain."""

    def __init__(self, encoder: torch.nn.Module, heads: torch.nn.ModuleDict) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(self, images: torch.Tensor, domain: str) -> torch.Tensor:
        features = self.encoder(images)
        for name, head in self.heads.items():
            if name == domain:
                return head(features)
        raise ValueError("unknown domain " + domain)


def _script(net: MultiHeadNet) -> tuple[torch.jit.ScriptModule, str]:
    """The network as one TorchScript module, and how its encoder was compiled: scripted
    (MONAI's ViT scripts in MONAI 1.6), else traced on a ``3 x 28 x 28`` batch (an encoder
    whose Python TorchScript cannot compile; its control flow is then frozen as traced)."""
    try:
        encoder = torch.jit.script(net.encoder)
        how = "script"
    except Exception as err:  # TorchScript raises many error types
        logger.warning("torch.jit.script of the encoder failed (%s: %s); tracing it instead",
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        with torch.no_grad():
            encoder = torch.jit.trace(net.encoder, torch.zeros(2, *UNIFIED_SHAPE))
        how = "trace"
    return torch.jit.script(_Scripted(encoder, net.heads)), how


def export_model(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 *, fmt: Format = "safetensors", data_root: str | None = None,
                 cache_dir: str | None = None) -> Path:
    """Write the run's global model (:func:`run_model`) as ``fmt``; returns the file.

    Parameters
    ----------
    run_dir
        A finished run directory (a local path).
    out
        The file to write (default: ``<run_dir>/export/model.safetensors`` or
        ``model.pt``).
    fmt
        ``safetensors`` or ``torchscript`` (see the module docstring).
    data_root, cache_dir
        As for :func:`run_model`.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    found = run_model(run_dir, data_root=data_root, cache_dir=cache_dir)
    path = Path(out) if out is not None else Path(run_dir) / "export" / f"model{_SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**found.metadata, "format": fmt}
    text = json.dumps(meta, indent=1, default=float)
    net = found.model
    if fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(path), metadata={_META_KEY: text})
        Path(f"{path}.json").write_text(text)
    else:
        scripted, how = _script(net)
        meta["torchscript"] = how
        text = json.dumps(meta, indent=1, default=float)
        torch.jit.save(scripted, str(path), _extra_files={_EXTRA_FILE: text})
    logger.info("exported the global model of %s (round %s) to %s", run_dir, meta["round"],
                path)
    return path


# -- reading and predicting ----------------------------------------------------------------
class ExportedModel:
    """A model written by :func:`export_model` (either format), ready to score images.

    Parameters
    ----------
    path
        The exported file (``.safetensors`` or a TorchScript archive).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: no such model file")
        with path.open("rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if is_zip:
            extra = {_EXTRA_FILE: ""}
            self.net: Any = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            self.metadata: dict[str, Any] = json.loads(extra[_EXTRA_FILE])
        else:
            from safetensors import safe_open
            from safetensors.torch import load_file

            try:
                with safe_open(str(path), framework="pt") as fh:
                    header = fh.metadata() or {}
            except Exception as err:  # safetensors raises its own error types
                raise ExportError(f"{path} is neither a safetensors file nor a TorchScript "
                                  f"archive ({err})") from err
            if _META_KEY not in header:
                raise ExportError(f"{path} carries no umim metadata: not made by umim export")
            self.metadata = json.loads(header[_META_KEY])
            cfg = from_dict(ExperimentConfig, self.metadata["config"])
            net = build_model(cfg.model, {d: len(m["label_names"])
                                          for d, m in self.metadata["domains"].items()})
            net.load_state_dict(load_file(str(path)))
            self.net = net.eval()
        self.domains: dict[str, dict[str, Any]] = self.metadata["domains"]

    def _domain(self, domain: str) -> dict[str, Any]:
        if domain not in self.domains:
            raise ExportError(f"unknown domain {domain!r}; the model knows "
                              f"{sorted(self.domains)}")
        return self.domains[domain]

    def normalise(self, images: np.ndarray, domain: str) -> torch.Tensor:
        """Unified uint8 ``(N, 3, 28, 28)`` images -> the normalised float tensor."""
        d = self._domain(domain)
        return to_float_tensor(images, tuple(d["mean"]), tuple(d["std"]))

    def unify(self, pixels: Sequence[np.ndarray], domain: str) -> np.ndarray:
        """Raw uint8 images (``(S, S)`` grey, ``(S, S, 3)`` RGB, ``(S, S, S)`` volumes) ->
        unified ``(N, 3, 28, 28)`` uint8, as the data plane unifies the domain's images."""
        d = self._domain(domain)
        ready = []
        for p in pixels:
            p = np.asarray(p)
            if p.dtype != np.uint8:
                raise ExportError(f"images must be uint8, got {p.dtype}")
            if d["spatial_dims"] == 3:
                if p.ndim != 3 or len(set(p.shape)) != 1:
                    raise ExportError(f"domain {domain} takes cubic 3D volumes (S, S, S) as "
                                      f".npy, got an image of shape {p.shape}")
            elif d["in_channels"] == 1 and p.ndim == 3:
                p = _grey(p)
            elif d["in_channels"] == 3 and p.ndim == 2:
                p = np.repeat(p[..., None], 3, axis=-1)
            ready.append(p)
        try:
            return unify_image_list(ready, spatial_dims=d["spatial_dims"],
                                    in_channels=d["in_channels"])
        except ValueError as err:
            raise ExportError(f"domain {domain}: {err}") from err

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        """Class probabilities (softmax; sigmoid per label for multi-label) of normalised
        images ``x``."""
        d = self._domain(domain)
        logits = self.net(x, domain)
        return scores_from_logits(logits, d["task"])

    def predict_files(self, files: Sequence[str | os.PathLike[str]], domain: str
                      ) -> torch.Tensor:
        """Probabilities of image files (PNG / JPEG / ``.npy``), one row per file."""
        pixels = [read_input(f) for f in files]
        return self.probabilities(self.normalise(self.unify(pixels, domain), domain), domain)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """RGB ``(S, S, 3)`` uint8 -> grey ``(S, S)`` as PIL's ``convert("L")`` makes it."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))


def read_input(path: str | os.PathLike[str]) -> np.ndarray:
    """One image file as uint8 pixels: ``.npy`` as stored, PNG / JPEG through
    :func:`engine.data.images.read_image` (grey or RGB, centre-cropped to a square)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such image file")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    from engine.data.images import IMAGE_SUFFIXES, read_image

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ExportError(f"{path}: expected a .png, .jpg, .jpeg or .npy file")
    return read_image(path)


def prediction_rows(model: ExportedModel, files: Sequence[str | os.PathLike[str]],
                    domain: str) -> list[dict[str, Any]]:
    """One row per file: its path, the top label and every label's probability."""
    probs = model.predict_files(files, domain)
    names = model.domains[domain]["label_names"]
    rows = []
    for f, p in zip(files, probs.tolist(), strict=True):
        top = int(np.argmax(p))
        rows.append({"file": str(f), "domain": domain, "label": names[top],
                     "probabilities": dict(zip(names, p, strict=True))})
    return rows


__all__ = ["FORMATS", "ExportError", "ExportedModel", "RunModel", "export_model",
           "prediction_rows", "read_input", "run_model"]
