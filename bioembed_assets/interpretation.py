"""Grad-CAMO of a plate under an encoder version, stored in the lake (`gradcamo_cells`, `gradcamo_summary`).

The explained classifier is the encoder's own treatment head when it has one (a trained supervised_cnn or
timm encoder); otherwise (an untrained v1) a linear probe fitted on the plate's stored embeddings of that
version to each cell's treatment (`interpret.probe`), so the map shows where the frozen encoder carries the
treatment signal. The probe's training accuracy is reported beside the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from bioembed_assets import schema as s
from bioembed_assets.config import Home
from bioembed_assets.encoder_setups import INTERPRETABLE_FAMILIES  # noqa: F401  re-exported
from bioembed_assets.interpret.adapters import classifier_for
from bioembed_assets.interpret.gradcam import CamClassifier
from bioembed_assets.interpret.plate import PlateGradCAMO, gradcamo_plate
from bioembed_assets.interpret.probe import train_linear_probe
from bioembed_assets.registry import EncoderVersion
from bioembed_assets.store.lake import Lake, features_to_numpy


@dataclass
class PlateInterpretation:
    result: PlateGradCAMO
    classifier: str
    """"head" (the encoder's own) or "treatment probe (train accuracy …)"."""


def _treatment_probe(home: Home, plate: str, encoder: object, version: EncoderVersion) -> tuple[CamClassifier, str]:
    lake = Lake(home.lake)
    emb = lake.read("embeddings", encoder=version.name, version=version.version, plate=plate)
    if emb.height == 0:
        raise s.BioembedInputError(f"no embeddings of {version.name} v{version.version} to fit a treatment probe "
                                   "on; materialize its embeddings first", plate=plate)
    labelled = emb.join(lake.read("platemap", plate=plate).select(s.PLATE, s.WELL, s.PERTURBATION),
                        on=[s.PLATE, s.WELL], how="inner")
    if labelled[s.PERTURBATION].n_unique() < 2:
        raise s.BioembedInputError("a treatment probe needs cells of at least two perturbations", plate=plate)
    probe = train_linear_probe(features_to_numpy(labelled), labelled[s.PERTURBATION].to_numpy())
    head = probe.head.to(getattr(encoder, "device", "cpu"))
    return classifier_for(encoder, head=head, classes=probe.classes), \
        f"treatment probe (train accuracy {probe.train_accuracy:.2f}, {len(probe.classes)} classes)"


def interpret_plate(home: Home, plate: str, encoder: object, version: EncoderVersion,
                    layer: str | None = None, progress=None) -> PlateInterpretation:
    """Grad-CAMO of every cell of `plate` under `version`, written to the lake (one partition per
    encoder, version and plate, replaced whole)."""
    has_head = getattr(getattr(encoder, "module", None), "head", None) is not None
    classifier, source = (None, "head") if has_head else _treatment_probe(home, plate, encoder, version)
    result = gradcamo_plate(home, plate, encoder, encoder_name=version.name, encoder_version=version.version,
                            classifier=classifier, layer=layer, progress=progress)
    lake = Lake(home.lake)
    keys = dict(encoder=version.name, version=version.version, plate=plate)
    lake.write("gradcamo_cells", result.cells, **keys)
    lake.write("gradcamo_summary", result.summary, **keys)
    return PlateInterpretation(result, source)

