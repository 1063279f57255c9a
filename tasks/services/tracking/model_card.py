"""The model card logged with every registered version: what the model is, how well it did, where it stops.

``model_card.md`` (markdown) goes to the version's run, beside the probe's test confusion matrix
(``confusion.png``), so whoever picks a version in the registry reads both there. The card is built
as named sections (``card_sections``) and rendered by ``render_card``: a new section is one more
entry of that dict.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping

CARD_FILE = "model_card.md"
CONFUSION_FILE = "confusion.png"
CHANNEL_WORDS = {1: "grayscale", 3: "RGB"}


def percent(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.2f}%"


def read_json(path: Path) -> dict:
    """A metrics file, or {} when that stage wrote none (its section then says so)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def data_section(manifest: Mapping) -> str:
    splits = manifest["splits"]
    return "\n".join([
        f"- dataset: `{manifest['dataset']}` from `{manifest.get('source') or '(built in)'}`"
        + (f", layout: {manifest['layout']}" if manifest.get("layout") else ""),
        f"- checksum (sha256 of the prepared splits): `{manifest['checksum']}`",
        f"- images: {', '.join(f'{name} {count}' for name, count in splits.items())}",
        f"- classes ({len(manifest['class_names'])}): {', '.join(manifest['class_names'])}",
    ])


def network_section(network_meta: Mapping, network_hash: str) -> str:
    unet = network_meta.get("unet") or {}
    shape = (f", base width {unet['base_channels']}, levels {unet['channel_mults']}" if "base_channels" in unet else "")
    init = network_meta.get("init")
    source = (f"imported (`pretrain.init`: mode `{init.get('mode')}`, source `{init.get('source')}`, "
              f"{init.get('form', 'form not recorded')}, weights checksum `{init.get('checksum')}`)"
              if init else "trained from scratch by the pretrain stage on the data above")
    diffusion = network_meta.get("diffusion", {}).get("framework", "unknown")
    return "\n".join([f"- kind: `{network_meta.get('kind', 'unet')}` ({diffusion} diffusion{shape})",
                      f"- source: {source}", f"- network hash: `{network_hash}`"])


def readout_section(selection) -> str:
    readout = selection.readout
    level = "t" if selection.level_kind == "t" else "sigma"
    head = ("the novelty model of the normal classes (no linear probe: anomaly mode)" if selection.kind == "anomaly"
            else f"a linear {selection.kind} head")
    lines = [f"- `{readout.label}`: taps {', '.join(readout.taps)} at {level} = {readout.level:g}, "
             f"pooled to {readout.pool}x{readout.pool}, then {head}"]
    if selection.l2 is not None:
        lines.append(f"- L2 strength {selection.l2:g}, chosen on validation (accuracy {percent(selection.val_acc)})")
    return "\n".join(lines)


def accuracy_section(probe_metrics: Mapping, registered_acc: float | None, test_images: int) -> str:
    lines = [f"- test accuracy: {percent(probe_metrics.get('test_acc'))} "
             f"(balanced accuracy, the mean recall over classes: {percent(probe_metrics.get('test_balanced_acc'))})"]
    if registered_acc is not None:
        lines.append(f"- this registered model, scored from image bytes on the same {test_images} test images: "
                     f"{percent(registered_acc)}")
    return "\n".join(lines)


def anomaly_section(probe_metrics: Mapping, registered_auroc: float | None, test_images: int) -> str:
    anomaly = probe_metrics.get("anomaly") or {}
    pixels = anomaly.get("raw_pixels")
    lines = [f"- normal classes: {', '.join(anomaly.get('normal_classes', []))}; every other class is an anomaly",
             f"- test AUROC: {probe_metrics.get('test_auroc', float('nan')):.4f}"
             + (f" (raw pixels, same scoring: {pixels['test_auroc']:.4f})" if isinstance(pixels, Mapping) else ""),
             f"- false alarms at {percent(anomaly.get('recall'))} recall of anomalies: "
             f"{percent(anomaly.get('false_alarm_at_recall'))} of normal test images"]
    if registered_auroc is not None:
        lines.append(f"- this registered model, scored from image bytes on the same {test_images} test images: "
                     f"AUROC {registered_auroc:.4f}")
    return "\n".join(lines)


def efficiency_section(evaluate_metrics: Mapping) -> str:
    table = evaluate_metrics.get("label_efficiency") or {}
    if not table:
        return "Not measured (metrics/evaluate.json holds no label efficiency)."
    shares = list(dict.fromkeys(share for row in table.values() for share in row))
    labels = evaluate_metrics.get("labels", {})
    head = "| method | " + " | ".join(f"{s} ({labels[s]} labels)" if s in labels else s for s in shares) + " |"
    rows = [f"| {method} | " + " | ".join(percent(row.get(s)) for s in shares) + " |" for method, row in table.items()]
    return "\n".join(["Test accuracy with a share of the train labels:", "", head,
                      "|---" * (len(shares) + 1) + "|", *rows])


def review_section(selective: Mapping | None) -> str:
    if not selective:
        return "Not measured for this model."
    target = selective.get("target_accuracy")
    threshold = selective.get("suggested_threshold")
    if threshold is None:
        return (f"No confidence threshold reaches {percent(target)} accuracy on validation: review every "
                "prediction, or lower `predict.target_accuracy`.")
    return (f"Send predictions with confidence below **{threshold:.3f}** to review (chosen on {selective.get('chosen_on')} "
            f"to reach {percent(target)} accuracy with the most coverage). On test it accepts "
            f"{percent(selective.get('test_coverage'))} of the images, with {percent(selective.get('test_accuracy'))} "
            "accuracy on those. `ddae predict` flags below `predict.review_threshold` (params.yaml).")


def novelty_section(novelty: Mapping | None) -> str:
    if not novelty:
        return "No novelty model: every image gets one of the known classes, however unlike them it is."
    space = ("the readout's feature space" if novelty.get("cells", 1) == 1 else
             f"the readout's channel means (each over its {novelty['cells']} grid cells: {novelty.get('dim')} values)")
    return (f"`novelty` is the {novelty.get('method', 'novelty')} score in {space}; above "
            f"**{novelty['threshold']:.4g}** (calibrated on {novelty.get('val_rows', '?')} validation images of "
            f"known classes for a {percent(novelty.get('false_alarm'))} false-alarm rate: "
            f"{percent(novelty.get('val_false_alarm'))} there, {percent(novelty.get('test_false_alarm'))} on test) "
            "a prediction goes to review as `novel`. An image of a kind never seen in training should score "
            "above it; a small validation split makes the rate coarse.")


def limits_section(manifest: Mapping) -> str:
    spec = manifest["preprocess"]
    size, channels = spec["image_size"], spec["channels"]
    fit = "padded" if spec.get("fit") == "pad" else "resized"
    lines = [
        f"- It knows {len(manifest['class_names'])} classes only ({', '.join(manifest['class_names'])}): an image "
        "of anything else still gets one of them.",
        f"- Every image is converted to {CHANNEL_WORDS.get(channels, f'{channels} channels')} and {fit} to "
        f"{size}x{size} pixels: finer detail is not seen.",
        f"- Tested only on the held-out test split of this data ({manifest['splits'].get('test', 0)} images, the "
        "same source as training); not tested on images from other sources, cameras or conditions, on "
        "corrupted or edited images, or for fairness across groups the labels do not record.",
    ]
    lines += [f"- Data warning: {warning}" for warning in manifest.get("warnings", [])]
    if manifest.get("skipped"):
        lines.append(f"- {len(manifest['skipped'])} unreadable source file(s) were skipped when the data was prepared.")
    return "\n".join(lines)


def card_sections(*, manifest: Mapping, selection, network_meta: Mapping, network_hash: str,
                  probe_metrics: Mapping, evaluate_metrics: Mapping, registered_acc: float | None,
                  selective: Mapping | None) -> dict[str, str]:
    """The card's sections, by heading, in order (each body is markdown)."""
    test_images = int(manifest["splits"].get("test", 0))
    scores = ({"Anomaly detection": anomaly_section(probe_metrics, registered_acc, test_images)}
              if selection.kind == "anomaly" else
              {"Test accuracy": accuracy_section(probe_metrics, registered_acc, test_images)})
    return {
        "Data": data_section(manifest),
        "Network": network_section(network_meta, network_hash),
        "Readout": readout_section(selection),
        **scores,
        "Label efficiency": efficiency_section(evaluate_metrics),
        "Review threshold": review_section(selective),
        "Novelty threshold": novelty_section(probe_metrics.get("novelty")),
        "Known limits": limits_section(manifest),
    }


def render_card(title: str, sections: Mapping[str, str], facts: Mapping[str, str] | None = None) -> str:
    """The card's markdown: ``# title``, one line of ``facts`` (version, commit, ...), then each section.
    """
    parts = [f"# {title}", ""]
    if facts:
        parts += [" · ".join(f"{key}: `{value}`" for key, value in facts.items()), ""]
    for heading, body in sections.items():
        parts += [f"## {heading}", "", body.strip(), ""]
    return "\n".join(parts)


def log_card(client, run_id: str, markdown: str, confusion: Path | None) -> list[str]:
    """Log the card (and the confusion PNG when given and present) to ``run_id``; returns the artifact names."""
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / CARD_FILE
        card.write_text(markdown, encoding="utf-8")
        client.log_artifact(run_id, str(card))
        logged.append(CARD_FILE)
    if confusion is not None and confusion.is_file():
        client.log_artifact(run_id, str(confusion))
        logged.append(confusion.name)
    return logged
