"""The MLflow model registry of encoders: register, alias, load by alias, log evaluations.

Each encoder version is an MLflow 3 *logged model* (linked to the run that produced it: a
training run, or a registration run for untrained/parameter-free encoders) holding three files:
`MLmodel` (a `bioembed` flavor and the signature: crops (B, C, H, W) in, float32 (B, D) out),
`spec.json` (the EncoderSpec, enough to rebuild the architecture) and `weights.safetensors`
(absent for parameter-free encoders). `load` reads only those two data files: nothing is pickled
and loading executes no code from the artifact store, whatever else lies there.

Aliases: `champion` (what the asset graph embeds with), `challenger` (a candidate under
evaluation), `previous` (the champion before the last promotion, for rollback).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError

from bioembed_assets.mlflow_store import prepare_embedded_store
from bioembed_assets.schema import BioembedInputError
from bioembed_assets.store.locks import file_lock

if TYPE_CHECKING:  # torch: imported when an encoder is registered or loaded, not with the registry
    from bioembed_assets.encoders.base import Encoder, EncoderSpec

EXPERIMENT = "bioembed-encoders"
EVALUATION_EXPERIMENT = "bioembed-evaluation"
TRAINING_EXPERIMENT = "bioembed-training"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
MODEL_TYPE = "bioembed-encoder"
SPEC_FILE, WEIGHTS_FILE = "spec.json", "weights.safetensors"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML_KIND = "custom_model_development"  # MLflow 3 UI: open as a classic ML experiment, not GenAI


@dataclass(frozen=True)
class EncoderVersion:
    """A registered encoder version: model name, version number, its run and logged model, tags."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    model_id: str | None = None
    source: str = ""

    @property
    def trained(self) -> bool:
        return self.tags.get("trained", "false") == "true"

    def describe(self) -> str:
        """'name vN: trained weights' / 'untrained weights (random init)' / 'no learned weights'."""
        if self.tags.get("has_weights") == "false":
            state = "no learned weights"
        else:
            state = "trained weights" if self.trained else "untrained weights (random init)"
        return f"{self.name} v{self.version}: {state}"


def crop_signature(spec: EncoderSpec, num_channels: int | None, dtype: str = "uint16"):
    """The MLflow signature of an encoder: crops (-1, C, S, S) of `dtype` -> float32 (-1, D)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    c = len(spec.channels) if spec.channels is not None else (num_channels or -1)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(dtype), (-1, c, spec.input_size, spec.input_size), "crops")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.embedding_dim), "embeddings")]))


class EncoderRegistry:
    """Encoders in an MLflow registry (e.g. sqlite backend + a local artifact folder)."""

    def __init__(self, tracking_uri: str, artifact_root: str | Path) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        prepare_embedded_store(tracking_uri, artifact_root)  # sqlite: created in, or moved with, the home
        # The registry store resolves `models:/<id>` sources through the global tracking URI.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        """The id of experiment `name`, created (as a classic ML experiment) if needed."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        with file_lock(self.artifact_root / ".lock-experiments", "another process creating an experiment"):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            return self.client.create_experiment(name, artifact_location=(self.artifact_root / name).as_uri(),
                                                 tags={EXPERIMENT_KIND_TAG: CLASSIC_ML_KIND})

    def register(self, name: str, encoder: Encoder, *, trained: bool, description: str = "",
                 alias: str | None = None, run_id: str | None = None, num_channels: int | None = None,
                 input_dtype: str = "uint16", tags: dict[str, str] | None = None) -> EncoderVersion:
        """Log `encoder` as a logged model and a new version of registered model `name`.

        `run_id` links it to the run that produced it (default: a new registration run). The
        alias, if any, is set last: a failure before it leaves no alias pointing anywhere new.
        """
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model
        from safetensors.torch import save_file

        spec = encoder.spec
        if run_id is None:
            run = self.client.create_run(self.experiment_id(), run_name=f"register-{name}")
            run_id = run.info.run_id
            self.client.log_param(run_id, "family", spec.family)
            self.client.set_terminated(run_id)
        weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        version_tags = {"family": spec.family, "trained": str(trained).lower(),
                        "has_weights": str(bool(weights)).lower(), **(tags or {})}
        logged = self.client.create_logged_model(
            self.run_experiment(run_id), name=name, source_run_id=run_id, model_type=MODEL_TYPE,
            params={"family": spec.family, "embedding_dim": str(spec.embedding_dim),
                    "input_size": str(spec.input_size)}, tags=version_tags)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
            if weights:
                save_file(weights, str(folder / WEIGHTS_FILE))
            mlmodel = Model(artifact_path="", run_id=run_id, model_id=logged.model_id,
                            signature=crop_signature(spec, num_channels or spec.config.get("num_channels"),
                                                     input_dtype))
            mlmodel.add_flavor("bioembed", spec=SPEC_FILE, weights=WEIGHTS_FILE if weights else None,
                               family=spec.family, loader="bioembed_assets.registry.EncoderRegistry.load")
            mlmodel.save(str(folder / "MLmodel"))
            self.client.log_model_artifacts(logged.model_id, str(folder))
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as err:
            if "already exists" not in str(err).lower():
                raise
        mv = self.client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id,
                                              tags=version_tags, description=description, model_id=logged.model_id)
        if alias:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return EncoderVersion(name, str(mv.version), run_id, version_tags, logged.model_id, mv.source)

    def run_experiment(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.experiment_id

    def _version(self, mv) -> EncoderVersion:
        model_id = getattr(mv, "model_id", None) or (mv.source.split("/", 1)[1] if mv.source.startswith("models:/")
                                                     else None)
        return EncoderVersion(mv.name, str(mv.version), mv.run_id, dict(mv.tags), model_id, mv.source)

    def get(self, name: str, alias: str = CHAMPION) -> EncoderVersion | None:
        """The version of `name` carrying `alias`, or None if there is none."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return self._version(mv)

    def version(self, name: str, version: str) -> EncoderVersion:
        """Version `version` of `name` (LookupError if there is none)."""
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self.client.get_model_version(name, str(version)))
        except MlflowException as e:
            raise LookupError(f"registered model {name!r} has no version {version}") from e

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version number of registered model `name` ({} if it is not registered)."""
        from mlflow.exceptions import MlflowException

        try:
            return {a: str(v) for a, v in self.client.get_registered_model(name).aliases.items()}
        except MlflowException:
            return {}

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def ensure(self, name: str, make_encoder, *, description: str = "") -> EncoderVersion:
        """The champion of `name`; registers `make_encoder()` (untrained) as champion if none."""
        with file_lock(self.artifact_root / f".lock-register-{name}", f"the registration of {name}"):
            found = self.get(name)  # under the lock: processes starting at once register one v1
            if found is not None:
                return found
            return self.register(name, make_encoder(), trained=False, description=description, alias=CHAMPION)

    def load(self, name: str, alias: str = CHAMPION) -> tuple[Encoder, EncoderVersion]:
        """Rebuild the encoder version that `alias` points at, with its weights."""
        version = self.get(name, alias)
        if version is None:
            raise LookupError(f"registered model {name!r} has no version with alias {alias!r} "
                              f"in {self.tracking_uri}")
        return self.load_version(version), version

    def load_version(self, version: EncoderVersion) -> Encoder:
        """Rebuild `version` from its `spec.json` and `weights.safetensors` (no other file is read)."""
        import mlflow.artifacts
        from safetensors.torch import load_file

        from bioembed_assets.encoders.base import EncoderSpec, build_from_spec

        base = (self.client.get_logged_model(version.model_id).artifact_location if version.model_id
                else version.source)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                spec_text = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{base}/{SPEC_FILE}", dst_path=tmp,
                    tracking_uri=self.tracking_uri)).read_text()
            except Exception as e:  # noqa: BLE001 - re-raised naming the version
                raise LookupError(f"{version.name} v{version.version}: no {SPEC_FILE} in {base}") from e
            spec = EncoderSpec.from_dict(json.loads(spec_text))
            state = None
            if version.tags.get("has_weights", "true") != "false":
                path = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{base}/{WEIGHTS_FILE}", dst_path=tmp, tracking_uri=self.tracking_uri))
                try:
                    state = load_file(str(path))
                except (SafetensorError, OSError, ValueError) as e:
                    raise BioembedInputError(f"{version.name} v{version.version}: weights are not a valid "
                                             f"safetensors file ({e}); refusing to load anything else",
                                             path=path) from e
        return build_from_spec(spec, state)

    def log_metrics(self, version: EncoderVersion, metrics: dict[str, float]) -> None:
        """Log evaluation metrics to the run that produced `version`."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        self.client.log_batch(version.run_id, metrics=batch)
