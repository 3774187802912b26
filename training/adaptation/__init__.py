"""Unsupervised adaptation to a user's cameras: ``python -m training adapt``.

Owns: reading unlabeled crops (a folder, the service's SQLite store, the cluster's PostgreSQL: ``crops``),
the source model's pooled maps of each crop and its mirror (``views``), pseudo-labels (``clustering``: DBSCAN
on the k-reciprocal Jaccard distance, or cross-camera mutual neighbours), the contrastive memories
(``memory``: Cluster Contrast's centroids, CAP's camera-aware proxies), what trains: the per-cell linear head on
a contract file (``head``) or a training checkpoint's whole network (``trunk``), the loop (``loop``) and this
module's ``adapt``: to an adapted contract file, checked for parity, with its card.

May import torch, onnx, ONNX Runtime and ``model_zoo``; never imports ``service`` (the stores are read with
plain SQL)."""

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from model_zoo.architectures.common import ReIDOutput
from model_zoo.contract import (
    ADAPTATION_KEY,
    INPUT_IMAGES,
    METADATA_PREFIX,
    OUTPUT_FEATURE_MAPS,
    ModelContract,
    VERIFICATION_KEY,
    open_cpu_session,
    precision_of,
)
from model_zoo.files import sha256_of
from model_zoo.onnx_export import check_parity
from training.adaptation.crops import Crops, read_crops
from training.adaptation.head import BranchLinearHead, append_head
from training.adaptation.loop import (
    CAMERA_FREE,
    OAP_NEEDS_MAPS,
    ONE_CAMERA_DEFAULTS,
    AdaptationSettings,
    EpochRecord,
    adapt_features,
    adapt_head,
)
from training.adaptation.trunk import ANCHOR_REFUSED, TrunkAdaptee, decoded_crops
from training.data.transforms import TrainAugmentation
from training.losses import OverlappedActivationPenalty
from training.adaptation.views import VIEWS, CropViews, crop_views

log = logging.getLogger(__name__)
HEAD = "a per-branch linear head on its feature maps"
NETWORK = "its whole network (a checkpoint's, or an IR's rebuild), exported as a training run's"
NETWORK_SUFFIXES = (".pt", ".xml")  # a training checkpoint, an OpenVINO IR: what adapts whole
ADAPTED_CHECKPOINT = "adapted.pt"  # in the run folder: the adapted network as a training checkpoint
EVALUATION_KEY = METADATA_PREFIX + "evaluation"

__all__ = ["AdaptationSettings", "adapt", "add_evaluation", "overlap_penalty"]


class HeadOnSource(nn.Module):
    """The adapted model in torch terms for the parity check: the source file (ONNX Runtime) then the head."""

    def __init__(self, session, head: BranchLinearHead):
        super().__init__()
        self.session, self.head = session, head

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        (maps,) = self.session.run([OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: images.numpy()})
        return ReIDOutput(feature_maps=self.head.maps(torch.from_numpy(maps)))


def _views(
    session, contract: ModelContract, crops: Crops, model_sha256: str, run_dir: Optional[Path], progress: bool
) -> CropViews:
    """The crops' pooled views, kept in the run folder so a resumed run does not embed them again."""
    key = f"{model_sha256}:{crops.fingerprint()}"
    cache = run_dir / "views.npz" if run_dir else None
    if cache and cache.exists():
        stored = np.load(cache)
        if str(stored["key"]) == key:
            return CropViews(stored["views"], stored["cameras"].tolist(), int(stored["skipped"]))
    views = crop_views(session, crops, contract.input_height, contract.input_width, progress)
    if cache:
        np.savez(cache, views=views.views, cameras=np.array(views.cameras), skipped=views.skipped, key=key)
    return views


def _settings_for(cameras: Sequence[str], settings: AdaptationSettings) -> AdaptationSettings:
    """Camera-aware choices need two cameras or more: with one, ``CAMERA_FREE``, and ``ONE_CAMERA_DEFAULTS`` in
    place of the settings among them left at their defaults."""
    if len(set(cameras)) > 1:
        return settings
    defaults = asdict(AdaptationSettings())
    values = asdict(settings)
    values.update({key: value for key, value in ONE_CAMERA_DEFAULTS.items() if values[key] == defaults[key]})
    values.update(CAMERA_FREE)
    changed = ", ".join(f"{key}={value}" for key, value in values.items() if value != getattr(settings, key))
    if changed:
        log.warning(f"the crops come from one camera: adapting with {changed}")
    return AdaptationSettings(**values)


def _adapted_metadata(source: Dict[str, str], record: Dict) -> Dict[str, str]:
    """The source's metadata with what no longer holds cleared (its figures, its same-person threshold) and
    ``reid.adaptation`` added: the adapted file must be evaluated and calibrated again."""
    return {**source, EVALUATION_KEY: "{}", VERIFICATION_KEY: "{}", ADAPTATION_KEY: json.dumps(record)}


def _write(model: onnx.ModelProto, metadata: Dict[str, str], output: Path) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(output))


def adapt(
    model: Path,
    crops_source: str,
    output: Path,
    run_dir: Optional[Path] = None,
    settings: AdaptationSettings = AdaptationSettings(),
    progress: bool = True,
    limit: Optional[int] = None,
) -> Dict:
    """Adapt ``model`` to the crops of ``crops_source`` and write the adapted contract file to ``output`` (with its
    card beside it, ``output`` with ``.md``): a contract file (``.onnx``) gains a per-branch head on its frozen
    network; a training checkpoint (``.pt``) or an OpenVINO IR (``.xml``: the shipped default's source ships
    beside it) has its whole network adapted (``trunk``), then exported. ``run_dir``
    keeps the state of each epoch: an interrupted run given the same folder resumes. Returns the summary the
    card is written from."""
    model, output = Path(model), Path(output)
    if model.suffix in NETWORK_SUFFIXES:
        return _adapt_network(model, crops_source, output, run_dir, settings, progress, limit)
    if settings.oap_weight:  # refused before the crops are embedded, not at the first step
        raise ValueError(OAP_NEEDS_MAPS)
    started = time.perf_counter()
    source = onnx.load(str(model))
    source_metadata = {entry.key: entry.value for entry in source.metadata_props}
    if precision_of(source_metadata) != "fp32":
        raise ValueError(f"{model.name} is not an fp32 file: adapt the fp32 file, then quantize the result")
    session, contract = open_cpu_session(model)
    crops = read_crops(crops_source, limit)
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    model_sha256 = sha256_of(model)
    views = _views(session, contract, crops, model_sha256, Path(run_dir) if run_dir else None, progress)
    settings = _settings_for(views.cameras, settings)
    embedded = time.perf_counter()
    head, history = adapt_head(
        views.views, views.camera_indices, settings, Path(run_dir) / "head.pt" if run_dir else None, progress
    )
    crop_counts = (len(views.views), views.skipped, views.cameras)
    record = _record(model, model_sha256, crops.description, crop_counts, settings, history, embedded - started)
    record.update(trained=HEAD, first_pass="embedding the crops and their mirror images")
    record["source_evaluation"] = json.loads(source_metadata.get(EVALUATION_KEY, "{}"))
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    _write(append_head(source, head), _adapted_metadata(source_metadata, record), output)
    sample = crops.pixels(contract.input_height, contract.input_width, 7)
    parity_sets = {"crops": sample, "random": np.random.default_rng(0).integers(0, 256, sample.shape, np.uint8)}
    return _checked(record, output, HeadOnSource(session, head), parity_sets)


def _checked(record: Dict, output: Path, model: nn.Module, parity_sets: Dict[str, np.ndarray]) -> Dict:
    """The written file held to ``model`` (parity; a file that fails is removed), then its card."""
    try:
        record["parity"] = check_parity(model, output, parity_sets)
    except Exception:
        output.unlink(missing_ok=True)
        raise
    record["output"] = output.name
    output.with_suffix(".md").write_text(card(record))
    return record


def _adapt_network(
    checkpoint: Path,
    crops_source: str,
    output: Path,
    run_dir: Optional[Path],
    settings: AdaptationSettings,
    progress: bool,
    limit: Optional[int],
) -> Dict:
    """``adapt`` from a training checkpoint or an IR: its whole network trains on the crops, then exports as a run's
    does."""
    from training.checkpoints import checkpoint_state, load_trained_model
    from training.export import export_onnx, export_pair_head

    if settings.anchor_weight:  # refused before the crops are decoded, not at the first step
        raise ValueError(ANCHOR_REFUSED)
    if run_dir is None:  # the checkpoints it writes on the way go to a folder removed at the end
        with tempfile.TemporaryDirectory(prefix="adapt-") as scratch:
            return _adapt_network(checkpoint, crops_source, output, Path(scratch), settings, progress, limit)
    started = time.perf_counter()
    network, cfg = load_trained_model(checkpoint)
    oap = overlap_penalty(cfg, settings)
    crops = read_crops(crops_source, limit)
    pixels, cameras, skipped = decoded_crops(crops, cfg.data.height, cfg.data.width, progress)
    settings = _settings_for(cameras, settings)
    decoded = time.perf_counter()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    augmentation = TrainAugmentation(flip_prob=0.5, padding=cfg.data.padding, erasing_prob=cfg.data.erasing_prob)
    adaptee = TrunkAdaptee(network, pixels, augmentation, settings.seed, oap)
    camera_indices = np.unique(np.array(cameras), return_inverse=True)[1]
    network, history = adapt_features(adaptee, camera_indices, settings, run / "network.pt", progress)
    state = checkpoint_state(checkpoint)
    state["model"] = network.state_dict()
    torch.save(state, run / ADAPTED_CHECKPOINT)
    crop_counts = (len(pixels), skipped, cameras)
    record = _record(
        checkpoint, sha256_of(checkpoint), crops.description, crop_counts, settings, history, decoded - started
    )
    record.update(trained=NETWORK, first_pass="decoding the crops")
    if checkpoint.suffix == ".xml":  # the graph's hash alone would not name the weights
        record["source_weights_sha256"] = sha256_of(checkpoint.with_suffix(".bin"))
    export_onnx(run / ADAPTED_CHECKPOINT, output)
    exported = onnx.load(str(output))
    record["seconds_total"] = round(time.perf_counter() - started, 1)
    _write(exported, _adapted_metadata({e.key: e.value for e in exported.metadata_props}, record), output)
    export_pair_head(network.eval(), cfg, output)  # bound to the file's sha256, which the metadata changed
    return _checked(record, output, network, {"crops": pixels[:7]})


def overlap_penalty(cfg, settings: AdaptationSettings) -> Optional[OverlappedActivationPenalty]:
    """The OAP ``oap_weight`` asks for, as the checkpoint trained with it (its k and form); None without."""
    if not settings.oap_weight:
        return None
    if cfg.model.num_branches < 2:
        raise ValueError(f"oap_weight needs two branches or more; this network has {cfg.model.num_branches}")
    return OverlappedActivationPenalty(cfg.loss.k, cfg.loss.oap_mode)


def add_evaluation(record: Dict, model: Path, output: Path, roots: Sequence[Path], progress: bool = True) -> Dict:
    """Evaluate the source (a contract file through ONNX Runtime, a checkpoint in PyTorch) and the adapted file
    side by side on labelled Market-layout ``roots``; the adapted
    file's figures go into its ``reid.evaluation`` and both into its card. Returns the record with them."""
    from training.evaluation import evaluate_checkpoint

    figures = {
        name: evaluate_checkpoint(path, roots, progress=progress)
        for name, path in (("source", model), ("adapted", output))
    }
    adapted = onnx.load(str(output))
    metadata = {entry.key: entry.value for entry in adapted.metadata_props}
    metadata[EVALUATION_KEY] = json.dumps(figures["adapted"])
    _write(adapted, metadata, output)
    record = {**record, "evaluation": figures}
    output.with_suffix(".md").write_text(card(record))
    return record


def _record(
    model: Path, model_sha256: str, description: str, crop_counts: tuple, settings, history, embed_seconds: float
) -> Dict:
    """``crop_counts``: (crops adapted on, crops not decodable, each crop's camera)."""
    crops, skipped, cameras = crop_counts
    last: EpochRecord = history[-1]
    return {
        "source_model": model.name,
        "source_sha256": model_sha256,
        "crops": crops,
        "crops_skipped": skipped,
        "crops_source": description,
        "cameras": len(set(cameras)),
        "views": list(VIEWS),
        "settings": asdict(settings),
        "epochs": [asdict(record) for record in history],
        "clusters": last.clusters,
        "outliers": last.outliers,
        "seconds_embedding": round(embed_seconds, 1),
        "seconds_adapting": round(sum(record.seconds for record in history), 1),
    }


def card(record: Dict) -> str:
    """The adapted model's card: what it started from, what it adapted on, how, and what is left to do."""
    rows = "\n".join(
        f"| {e['epoch']} | {e['clusters']} | {e['outliers']} | {e['loss_start']:.3f} -> {e['loss_end']:.3f} "
        f"| {e['seconds']:.1f} |"
        for e in record["epochs"]
    )
    settings = ", ".join(f"{k}={v}" for k, v in record["settings"].items())
    evaluation = ""
    if record.get("evaluation"):
        lines = ["| set | source R1 / mAP | adapted R1 / mAP |", "|---|---|---|"]
        for name, adapted in record["evaluation"]["adapted"].items():
            source = record["evaluation"]["source"][name]
            cells = [f"{100 * f['all']['rank1']:.1f} / {100 * f['all']['mAP']:.1f}" for f in (source, adapted)]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        evaluation = "\nEvaluated where labels exist (single-query Market protocol, %):\n\n" + "\n".join(lines) + "\n"
    return f"""# {record["output"]}

Adapted without labels by `python -m training adapt` from `{record["source_model"]}`
(sha256 `{record["source_sha256"]}`): {record["trained"]}, trained on pseudo-labels.

- Crops: {record["crops"]} from {record["crops_source"]} ({record["crops_skipped"]} not decodable), \
{record["cameras"]} camera(s).
- Time: {record["seconds_embedding"]} s {record["first_pass"]}, \
{record["seconds_adapting"]} s adapting ({record["seconds_total"]} s in all).
- Last epoch: {record["clusters"]} clusters, {record["outliers"]} crops in none.
- Settings: {settings}.

| epoch | clusters | outliers | loss (first -> last fifth of the steps) | s |
|---|---|---|---|---|
{rows}
{evaluation}
The source's evaluation figures and same-person threshold do not hold for this file and are cleared
(`reid.verification`; `reid.evaluation` holds only figures measured on this file, with `--evaluate`); calibrate
it with `python -m training calibrate`. Its licence and data terms are the source model's.
"""
