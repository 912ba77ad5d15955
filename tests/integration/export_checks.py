"""Checks of ``umim export`` / ``umim predict`` on a finished run directory (used by
test_quickstart.py on the quickstart's run, so no run of its own is added)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from engine.cli import main as cli
from engine.config import ExperimentConfig, from_dict
from engine.fl.client import Client, ClientSpec, read_split, shard_builder
from engine.nn.metrics import auc_acc, scores_from_logits
from engine.records.history import History
from engine.run.export import ExportedModel
from engine.run.session import resolve_paths


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(list(argv))
    return code, out.getvalue(), err.getvalue()


def check_export(run_dir: Path, tmp: Path, data_root: Path, cache: Path,
                 client_domains: Sequence[str]) -> None:
    """Export the run's global model in both formats and check that it scores every
    domain's test images as the run did (its history's final test AUC and accuracy), as the
    run's own client does (probabilities, ``client_domains``), and that ``umim predict``
    gives the same probabilities for image files."""
    cfg = from_dict(ExperimentConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    paths = ["--data-root", str(data_root), "--cache-dir", str(cache)]
    models = {}
    for fmt, name in (("safetensors", "model.safetensors"), ("torchscript", "model.pt")):
        code, out, err = _cli("export", str(run_dir), "--format", fmt, "--out",
                              str(tmp / name), *paths)
        assert code == 0, err
        assert out.strip() == str(tmp / name)
        models[fmt] = ExportedModel(tmp / name)
    meta = models["safetensors"].metadata
    assert json.loads((tmp / "model.safetensors.json").read_text()) == meta
    assert models["torchscript"].metadata["torchscript"] in ("script", "trace")
    assert list(meta["domains"]) == list(cfg.data.domains)
    assert meta["input_shape"] == [3, 28, 28] and meta["config"]["name"] == cfg.name
    assert from_dict(ExperimentConfig, meta["config"]) == cfg  # the config that made it

    history = History.from_parquet_bytes((run_dir / "history.parquet").read_bytes())
    run_auc, run_acc = history.latest("test", "auc"), history.latest("test", "acc")
    builder = shard_builder(resolve_paths(cfg, str(data_root), str(cache)).data)  # the run's
    cap = cfg.data.max_eval_samples
    for domain in cfg.data.domains:
        info = meta["domains"][domain]
        assert len(info["label_names"]) >= 2 and len(info["mean"]) == 3
        shard_paths = {s: str(p) for s, p in builder.domain(domain).items()}
        test = read_split(shard_paths["test"], "test", cap, cfg.seed)  # the run's subsample
        assert test.labels is not None
        probs = {fmt: m.probabilities(m.normalise(test.images, domain), domain)
                 for fmt, m in models.items()}
        torch.testing.assert_close(probs["torchscript"], probs["safetensors"], atol=1e-5,
                                   rtol=1e-4)
        scores = auc_acc(probs["safetensors"], torch.from_numpy(test.labels), info["task"])
        # the run's own final test evaluation of its global model, on the same images
        assert abs(scores["auc"] - run_auc[(domain, domain)]) < 1e-6, domain
        assert abs(scores["acc"] - run_acc[(domain, domain)]) < 1e-6, domain
        if domain in client_domains:  # the run's client, scoring with the run's weights
            client = Client(ClientSpec(domain, {domain: shard_paths}), cfg.model, cfg.train,
                            seed=cfg.seed, max_train_samples=8, max_eval_samples=cap,
                            device="cpu")
            net = models["safetensors"].net
            client._load({k: v for k, v in net.state_dict().items()
                          if k.startswith("encoder.") or k.startswith(f"heads.{domain}.")},
                         (), 0)
            own = scores_from_logits(client.logits(domain, "test"), info["task"])
            torch.testing.assert_close(probs["safetensors"], own, atol=1e-5, rtol=1e-4)
            _check_predict(tmp / domain, tmp / "model.pt", domain, test.images[:3],
                           probs["safetensors"][:3], info)


def _check_predict(folder: Path, model: Path, domain: str, images: np.ndarray,
                   expected: torch.Tensor, info: dict) -> None:
    """``umim predict`` on PNG and .npy files of unified test images."""
    folder.mkdir(parents=True)
    files = []
    for i, image in enumerate(images):  # (3, 28, 28) uint8, grey images repeat a channel
        raw = image[0] if info["in_channels"] == 1 else image.transpose(1, 2, 0)
        if i == 2:
            files.append(folder / f"{i}.npy")
            np.save(files[-1], raw)
        else:
            files.append(folder / f"{i}.png")
            Image.fromarray(raw).save(files[-1])
    code, out, err = _cli("predict", str(model), *map(str, files), "--domain", domain,
                          "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    got = torch.tensor([[r["probabilities"][n] for n in info["label_names"]] for r in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert [r["label"] for r in rows] == [info["label_names"][int(i)]
                                          for i in expected.argmax(1)]
    code, out, _ = _cli("predict", str(model), str(files[0]), "--domain", domain)
    assert code == 0 and out.startswith(f"{files[0]}\t{rows[0]['label']}\t")
    code, _, err = _cli("predict", str(model), str(files[0]), "--domain", "nowhere")
    assert code == 2 and "unknown domain 'nowhere'" in err


def check_refused(run_dir: Path, tmp: Path, data_root: Path, cache: Path) -> None:
    """A run whose clients keep models of their own (``local``) has no global model: the
    export is refused with a one-line error and exit 2, and writes nothing."""
    target = tmp / "refused.safetensors"
    code, _, err = _cli("export", str(run_dir), "--out", str(target), "--data-root",
                        str(data_root), "--cache-dir", str(cache))
    assert code == 2 and "no single global model" in err and err.count("\n") == 1, err
    assert not target.exists()
