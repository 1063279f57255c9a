"""The pretrain stage: train the diffusion model on the prepared train split with Accelerate.

Runs as ``python -m tasks.pretrain`` or ``accelerate launch -m tasks.pretrain``. Checkpoints live in
``outputs/checkpoints/<fingerprint>`` (kept between runs, so a rerun resumes); the stage output is
the final EMA network plus the loss curve (``loss.csv`` for ``dvc plots``, ``loss.png``) and a sample grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time

import numpy as np
import torch

from ddae_core.atomic import write_json_atomic
from ddae_core.checkpoint import save_network
from ddae_core.config import ConfigError, PipelineConfig, as_dict
from ddae_core.data import load_prepared, normal_classes, save_image_grid, to_uint8_images
from ddae_core.devices import stage_device
from ddae_core.diffusion import build_denoiser, build_loss, feature_levels, grid_sampler
from ddae_core.nn import build_unet, count_parameters
from ddae_core.precision import emulated_bf16, resolve_feature_precision, resolve_mixed_precision
from ddae_core.pretrained.importer import ImportedNetwork, import_network
from ddae_core.readout import resolve_taps
from ddae_core.sampling import capped_subset
from ddae_core.training.loop import Monitor, TrainingInterrupted, TrainResult, train
from ddae_core.training.monitor import LabelledImages, ProbeMonitor
from ddae_core.training.schedules import monitor_steps, planned_steps
from ddae_core.validation import validate_readouts
from tasks.services.outputs.paths import Paths
from tasks.services.outputs.plots import (
    MONITOR_TITLE,
    save_loss_curve,
    save_loss_table,
    save_monitor_curve,
    save_monitor_table,
    save_not_drawn,
)
from tasks.services.runner.stage_main import StageError, log, stage_main
from tasks.services.tracking.imports import init_folder
from tasks.services.tracking.runs import stage_run


def precision_words(precision: str, requested: str, device: torch.device) -> str:
    """How pretraining computes, for its log line; says why when ``auto`` fell back to fp32 on a CPU, and
    what to do when bf16 was asked of a CPU that only emulates it."""
    if emulated_bf16(precision, device):
        return ("bf16 autocast, emulated: this CPU has no native bf16 (AVX512-BF16 or AMX), so each step takes "
                "many times longer than in fp32 (pretrain.train.mixed_precision: auto trains in fp32 here)")
    if precision != "no":
        return f"{precision} autocast"
    if requested == "auto" and device.type == "cpu":
        return ("fp32: this CPU has no native bf16 (AVX512-BF16 or AMX), so training takes several times longer "
                "than on one that has (README: how long the default run takes)")
    return "fp32"


def run_fingerprint(config: PipelineConfig, data_checksum: str, init_checksum: str = "") -> str:
    """Checkpoints are only resumed by a run with the same data, starting weights, network, framework and loop."""
    key = {"data": data_checksum, "pretrain": as_dict(config.pretrain)}
    for section in ("samples", "monitor"):  # the sample grid and the monitor's scoring do not change training
        key["pretrain"].pop(section)
    if init_checksum:
        key["init_weights"] = init_checksum
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Train (or resume; from scratch or from imported weights), or import as it is; then save the EMA
    network, loss curve, sample grid and metrics.

    Returns:
        A summary dict: steps, final loss, images/s, parameter count, wall time (and the import's source).
    """
    from accelerate import Accelerator

    if not (paths.prepared / "manifest.json").is_file():
        raise StageError(f"{paths.prepared}/manifest.json not found: run the prepare stage first")
    manifest, splits = load_prepared(paths.prepared)
    init = config.pretrain.init
    imported = import_init(config, paths, manifest) if init.mode != "scratch" else None
    if imported is None:
        denoiser = build_denoiser(config.pretrain.diffusion, build_network(config, manifest))
    else:
        denoiser = imported.denoiser
    # taps named for another size or network fail now, not after training
    validate_readouts(config, denoiser.unet.tap_names(), denoiser.unet.tap_selectors())
    images = pretraining_images(config, splits)
    steps = planned_steps(config.pretrain.train, len(images))
    cfg = dataclasses.replace(config.pretrain, train=dataclasses.replace(config.pretrain.train, steps=steps))
    loss_fn = build_loss(cfg.diffusion)
    device = stage_device("pretrain", log)
    precision = resolve_mixed_precision(cfg.train.mixed_precision, device)
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    if init.mode == "import":  # nothing to train: the main process writes the outputs, the others are done
        return publish_import(imported, config, manifest, paths) if accelerator.is_main_process else {}
    report = log.warning if emulated_bf16(precision, device) else log.info
    report("pretrain: %d steps, %s", steps, precision_words(precision, cfg.train.mixed_precision, device))

    # independent of the process count
    fingerprint = run_fingerprint(config, manifest["checksum"], imported.checksum if imported else "")
    run_dir = paths.checkpoints / fingerprint
    if accelerator.is_main_process:
        remove_other_checkpoints(paths, fingerprint)
    accelerator.wait_for_everyone()
    monitor = build_monitor(config, manifest, splits, denoiser, steps, accelerator.device)
    if not accelerator.is_main_process:  # other ranks train; only the main process logs, scores and saves
        train(denoiser, loss_fn, images, cfg.train, out_dir=run_dir, accelerator=accelerator, monitor=monitor,
              progress=False)
        return {"process": accelerator.process_index}

    import mlflow

    parameters = count_parameters(denoiser.unet)
    with stage_run(paths.root, "pretrain", {"ddae.data_checksum": manifest["checksum"]}):
        mlflow.log_params({
            "network": cfg.network.name if imported is None else imported.form, "parameters": parameters,
            **{f"diffusion.{k}": v for k, v in as_dict(cfg.diffusion).items()},
            **{f"train.{k}": v for k, v in as_dict(cfg.train).items()},
            **init_params(config, imported),
            "processes": accelerator.num_processes, "fingerprint": fingerprint,
        })

        def log_to_mlflow(step: int, metrics: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

        try:
            result = train(denoiser, loss_fn, images, cfg.train, out_dir=run_dir, accelerator=accelerator,
                           callbacks=(log_to_mlflow,), monitor=monitor, progress=True)
        except TrainingInterrupted as err:
            raise KeyboardInterrupt(str(err)) from err

        summary = publish(result, config, manifest, paths, parameters=parameters, imported=imported, monitor=monitor)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        for artifact in ("loss.png", "samples.png", "monitor.png", "monitor.csv"):
            if (paths.pretrain / artifact).is_file():
                mlflow.log_artifact(str(paths.pretrain / artifact))
    return summary


def monitor_off_reason(config: PipelineConfig, manifest: dict) -> str:
    """Why the probe monitor scored no point in this run, in the words of its settings."""
    if normal_classes(manifest):
        return "anomaly mode (data.normal_classes): the monitor is off and the last step goes forward"
    if not (config.pretrain.monitor.points or config.pretrain.monitor.every):
        return "pretrain.monitor.points and pretrain.monitor.every are 0"
    if not manifest["splits"].get("val"):
        return "the validation split is empty (too few train images to carve one)"
    return "no monitor step fell within this run's training steps"


def build_monitor(config: PipelineConfig, manifest: dict, splits: dict, denoiser: torch.nn.Module,
                  steps: int, device: torch.device | str = "cpu") -> Monitor | None:
    """The probe monitor of ``pretrain.monitor``: every extract tap at the first extract level, pooled
    globally, on seeded class-balanced train and val subsets; None when it is off or val is empty, and
    in anomaly mode (``data.normal_classes``): telling normal classes apart says nothing of anomalies, and
    no anomaly may be looked at, so the last step's network goes forward. It reads the network in
    ``extract.precision`` as resolved on ``device``, where training runs."""
    cfg = config.pretrain.monitor
    when = monitor_steps(steps, points=cfg.points, every=cfg.every)
    if when and normal_classes(manifest):
        log.info("pretrain: anomaly mode (data.normal_classes): the probe monitor is off; the last step goes forward")
        return None
    if not when or len(splits["val"]) == 0:
        return None
    taps = resolve_taps(config.extract.taps, denoiser.unet.tap_names(), denoiser.unet.tap_selectors(),
                        "extract.taps")
    level = feature_levels(config.pretrain.diffusion, config.extract.levels, config.extract.sigma_indices)[0]
    precision = resolve_feature_precision(config.extract.precision, device)

    def subset(name: str, cap: int) -> LabelledImages:
        split = splits[name]
        rows = capped_subset(split.labels, cap, config.data.split_seed)
        return LabelledImages(images=np.asarray(split.images[rows]), labels=np.asarray(split.labels[rows]),
                              sample_ids=np.asarray(split.sample_ids[rows]))

    probe = ProbeMonitor(train=subset("train", cfg.train_images), val=subset("val", cfg.val_images),
                         taps=tuple(taps), level=level, num_classes=len(manifest["class_names"]),
                         l2_grid=config.probe.l2_grid, max_iter=min(config.probe.max_iter, 100),
                         knn_k=config.diagnostics.knn_k, knn_temperature=config.diagnostics.knn_temperature,
                         seed=config.extract.seed, batch_size=cfg.batch_size, precision=precision)
    scoring = {k: v for k, v in as_dict(cfg).items() if k != "select"}  # choosing needs no rescoring
    key = json.dumps({"monitor": scoring, "taps": list(taps), "level": level, "l2_grid": list(config.probe.l2_grid),
                      "seed": config.extract.seed, "precision": precision}, sort_keys=True)
    return Monitor(evaluate=probe, steps=when, select=cfg.select, key=hashlib.sha256(key.encode()).hexdigest()[:16])


def pretraining_images(config: PipelineConfig, splits: dict) -> np.ndarray:
    """The uint8 images pretraining sees: ``pretrain.train.splits`` (train, or train + val: no labels are
    read, and the probe still fits on train and selects on val); one split is its memmap, not a copy. In
    anomaly mode prepare left only the normal classes' images in train and val."""
    chosen = [splits[name].images for name in config.pretrain.train.splits]
    return chosen[0] if len(chosen) == 1 else np.concatenate(chosen)


def pretraining_count(config: PipelineConfig, manifest: dict) -> int:
    """How many images ``pretraining_images`` holds, from the manifest's split sizes."""
    return sum(manifest["splits"][name] for name in config.pretrain.train.splits)


def import_init(config: PipelineConfig, paths: Paths, manifest: dict) -> ImportedNetwork:
    """Read ``pretrain.init.source`` and check it fits the prepared images and ``pretrain.diffusion``."""
    init = config.pretrain.init
    with init_folder(paths.root, init.source) as folder:
        imported = import_network(folder, convert=init.convert)
    preprocess = manifest["preprocess"]
    shape = (preprocess["channels"], preprocess["image_size"])
    if tuple(imported.denoiser.input_shape) != shape:
        c, s = imported.denoiser.input_shape
        raise ConfigError(f"data.image_size / data.channels: the imported model reads {c}x{s}x{s} images, the "
                          f"prepared ones are {shape[0]}x{shape[1]}x{shape[1]}; leave both auto (or set them to it)")
    ours, theirs = config.pretrain.diffusion, imported.diffusion
    for key in ("framework", "timesteps"):
        if getattr(ours, key) != getattr(theirs, key):
            raise ConfigError(f"pretrain.diffusion.{key}: {getattr(ours, key)!r}, but the imported model was trained "
                              f"with {getattr(theirs, key)!r}; set it (extract.levels are read in its units)")
    if init.mode == "adapt" and imported.denoiser.spec()["kind"] == "latent-dit":
        raise ConfigError("pretrain.init.mode: adapt trains pixel-space networks; a latent DiT is imported as it "
                          "is (mode: import)")
    log.info("pretrain starts from %s (%s, weights %s)", init.source, imported.form, imported.checksum[:12])
    return imported


def init_params(config: PipelineConfig, imported: ImportedNetwork | None) -> dict:
    """What MLflow records of where the network started."""
    init = config.pretrain.init
    if imported is None:
        return {"init.mode": init.mode}
    return {"init.mode": init.mode, "init.source": init.source[:500], "init.form": imported.form,
            "init.checksum": imported.checksum}


def publish_import(imported: ImportedNetwork, config: PipelineConfig, manifest: dict, paths: Paths) -> dict:
    """``init.mode: import``: the imported network as this stage's output (no training), with its sample grid."""
    import mlflow

    with stage_run(paths.root, "pretrain", {"ddae.data_checksum": manifest["checksum"]}):
        parameters = count_parameters(imported.denoiser.unet)
        mlflow.log_params({"network": imported.form, "parameters": parameters, **init_params(config, imported)})
        save_network(paths.network, imported.denoiser, network_meta(config, manifest, imported))
        for stale in ("loss.png", "loss.csv", "samples.png", "monitor.png", "monitor.csv"):
            (paths.pretrain / stale).unlink(missing_ok=True)
        save_loss_table([], paths.pretrain / "loss.csv")  # declared to DVC: an empty curve, no training ran
        save_monitor_table([], 0, (), paths.pretrain / "monitor.csv")
        save_not_drawn(paths.pretrain / "loss.png", "Pretraining loss", "pretrain.init.mode is import: no training ran")
        save_not_drawn(paths.pretrain / "monitor.png", MONITOR_TITLE, "pretrain.init.mode is import: no training ran")
        sample_s = draw_sample_grid(imported.denoiser, config, paths.pretrain / "samples.png")
        summary = {"steps": 0, "epochs": 0.0, "final_loss": None, "images_per_s": None, "parameters": parameters,
                   "train_wall_s": 0.0, "sample_wall_s": sample_s}
        write_json_atomic(paths.metrics / "pretrain.json", summary)
        if (paths.pretrain / "samples.png").is_file():
            mlflow.log_artifact(str(paths.pretrain / "samples.png"))
    return summary


def network_meta(config: PipelineConfig, manifest: dict, imported: ImportedNetwork | None) -> dict:
    """``network.json``'s entries beside the network's own spec: its schedule, data and (if imported) source."""
    meta = {"diffusion": config.pretrain.diffusion if imported is None else imported.diffusion,
            "data": {"checksum": manifest["checksum"], "preprocess": manifest["preprocess"]}}
    if imported is not None:
        meta["init"] = {"mode": config.pretrain.init.mode, "source": config.pretrain.init.source,
                        "form": imported.form, "checksum": imported.checksum}
    return meta


def build_network(config: PipelineConfig, manifest: dict) -> torch.nn.Module:
    """The configured UNet for the prepared images' channels and size (dropout overridden if set), its
    initial weights drawn from ``pretrain.train.seed``: the same params start from the same weights."""
    network = config.pretrain.network
    preprocess = manifest["preprocess"]
    torch.manual_seed(config.pretrain.train.seed)
    overrides = {} if network.dropout is None else {"dropout": network.dropout}
    try:
        return build_unet(network.name, in_channels=preprocess["channels"], resolution=preprocess["image_size"],
                          **overrides)
    except ValueError as err:
        raise StageError(f"pretrain.network.name: {network.name!r} does not fit the prepared "
                         f"{preprocess['channels']}x{preprocess['image_size']}x{preprocess['image_size']} images "
                         f"({err}); set data.image_size to a size it takes") from None


def remove_other_checkpoints(paths: Paths, fingerprint: str) -> None:
    """Delete checkpoint folders of other configurations: no run with this config can resume them."""
    if paths.checkpoints.is_dir():
        for stale in paths.checkpoints.iterdir():
            if stale.name != fingerprint:
                shutil.rmtree(stale, ignore_errors=True)


def publish(result: TrainResult, config: PipelineConfig, manifest: dict, paths: Paths, *, parameters: int,
            imported: ImportedNetwork | None = None, monitor: Monitor | None = None) -> dict:
    """Write the stage's outputs (EMA network, loss curve as PNG and CSV, sample grid, metrics); the summary."""
    ema = result.ema_denoiser.eval()
    save_network(paths.network, ema, network_meta(config, manifest, imported))
    paths.pretrain.mkdir(parents=True, exist_ok=True)
    save_loss_curve(result.history, paths.pretrain / "loss.png")
    save_loss_table(result.history, paths.pretrain / "loss.csv")  # the same curve as data, for `dvc plots diff`
    sample_s = draw_sample_grid(ema, config, paths.pretrain / "samples.png")
    for stale in ("monitor.png", "monitor.csv"):
        (paths.pretrain / stale).unlink(missing_ok=True)
    taps = monitor.evaluate.taps if monitor is not None else ()
    save_monitor_table(result.monitor, result.chosen_step, taps, paths.pretrain / "monitor.csv")
    if result.monitor:
        save_monitor_curve(result.monitor, result.chosen_step, paths.pretrain / "monitor.png")
    else:
        save_not_drawn(paths.pretrain / "monitor.png", MONITOR_TITLE, monitor_off_reason(config, manifest))
    speeds = [h["images_per_s"] for h in result.history if "images_per_s" in h]
    seen = pretraining_count(config, manifest)
    summary = {
        "steps": result.step,
        "chosen_step": result.chosen_step,  # the step whose EMA network is the output (the monitor's best)
        "monitor_points": len(result.monitor),
        "monitor_wall_s": sum(p.get("wall_s", 0.0) for p in result.monitor),  # scoring, within train_wall_s
        "chosen_linear_val_acc": next((p["linear_val_acc"] for p in result.monitor
                                       if p["step"] == result.chosen_step), None),
        "epochs": round(result.step * config.pretrain.train.batch_size / max(1, seen), 2),
        "pretraining_images": seen,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "images_per_s": sum(speeds) / len(speeds) if speeds else None,
        "parameters": parameters,
        "train_wall_s": result.wall_s,
        "sample_wall_s": sample_s,
    }
    write_json_atomic(paths.metrics / "pretrain.json", summary)
    return summary


def draw_sample_grid(denoiser: torch.nn.Module, config: PipelineConfig, path) -> float:
    """Draw ``samples.count`` images with ``samples.sampler`` (auto: the framework's paper sampler) into a PNG grid."""
    samples = config.pretrain.samples
    if samples.count == 0:
        save_not_drawn(path, "Samples", "pretrain.samples.count is 0")
        return 0.0
    if denoiser.spec()["kind"] == "latent-dit":  # its samples would need the VAE's decoder: features only
        log.info("no sample grid for a latent model")
        save_not_drawn(path, "Samples", "a latent model's samples need its VAE decoder; this pipeline reads its features only")
        return 0.0
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(samples.seed)
    channels, size = denoiser.input_shape
    shape = (samples.count, channels, size, size)
    device = next(denoiser.parameters()).device  # the CPU generator draws; the network samples where it lives
    latents = torch.randn(shape, generator=generator).to(device)
    sampler, options = grid_sampler(config.pretrain.diffusion.framework, samples)
    with torch.inference_mode():
        images = sampler(denoiser, latents, generator=generator, progress=True, **options)
    save_image_grid(to_uint8_images(images), path, nrow=int(samples.count ** 0.5) or 1)
    return time.perf_counter() - start


if __name__ == "__main__":
    stage_main("pretrain", run)
