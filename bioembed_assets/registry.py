"""The MLflow model registry of encoders: register, alias, load by alias, log evaluation.

An encoder version is stored as two run artifacts under `encoder/`: `spec.json` (the
EncoderSpec, enough to rebuild the architecture) and `weights.safetensors` (its state dict,
absent for parameter-free encoders). Nothing is pickled; loading executes no stored code.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from bioembed_assets.encoders.base import Encoder, EncoderSpec, build_from_spec

EXPERIMENT = "bioembed-encoders"
CHAMPION = "champion"
_ARTIFACT_DIR = "encoder"


@dataclass(frozen=True)
class EncoderVersion:
    """A registered encoder version: model name, version number, its run, and tags."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]

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


class EncoderRegistry:
    """Encoders in an MLflow registry (e.g. sqlite backend + a local artifact folder)."""

    def __init__(self, tracking_uri: str, artifact_root: str | Path) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(EXPERIMENT, artifact_location=self.artifact_root.as_uri())

    def register(self, name: str, encoder: Encoder, *, trained: bool, description: str = "",
                 alias: str | None = None) -> EncoderVersion:
        """Log `encoder` as a new version of registered model `name` (optionally aliased)."""
        from mlflow.exceptions import MlflowException

        run = self.client.create_run(self._experiment_id(), run_name=f"register-{name}")
        run_id = run.info.run_id
        spec = encoder.spec
        self.client.log_param(run_id, "family", spec.family)
        self.client.log_param(run_id, "embedding_dim", spec.embedding_dim)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / _ARTIFACT_DIR
            folder.mkdir()
            (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
            weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
            if weights:
                save_file(weights, str(folder / "weights.safetensors"))
            self.client.log_artifacts(run_id, str(folder), _ARTIFACT_DIR)
        self.client.set_terminated(run_id)
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as err:
            if "already exists" not in str(err).lower():
                raise
        tags = {"family": spec.family, "trained": str(trained).lower(), "has_weights": str(bool(weights)).lower()}
        mv = self.client.create_model_version(
            name, source=f"runs:/{run_id}/{_ARTIFACT_DIR}", run_id=run_id, tags=tags,
            description=description,
        )
        if alias:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return EncoderVersion(name, str(mv.version), run_id, tags)

    def get(self, name: str, alias: str = CHAMPION) -> EncoderVersion | None:
        """The version of `name` carrying `alias`, or None if there is none."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return EncoderVersion(name, str(mv.version), mv.run_id, dict(mv.tags))

    def ensure(self, name: str, make_encoder, *, description: str = "") -> EncoderVersion:
        """The champion of `name`; registers `make_encoder()` (untrained) as champion if none."""
        found = self.get(name)
        if found is not None:
            return found
        return self.register(name, make_encoder(), trained=False, description=description,
                             alias=CHAMPION)

    def load(self, name: str, alias: str = CHAMPION) -> tuple[Encoder, EncoderVersion]:
        """Rebuild the encoder version that `alias` points at, with its weights."""
        import mlflow.artifacts

        version = self.get(name, alias)
        if version is None:
            raise LookupError(f"registered model {name!r} has no version with alias {alias!r} "
                              f"in {self.tracking_uri}")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=_ARTIFACT_DIR, dst_path=tmp,
                tracking_uri=self.tracking_uri))
            spec = EncoderSpec.from_dict(json.loads((local / "spec.json").read_text()))
            weights_file = local / "weights.safetensors"
            state = load_file(str(weights_file)) if weights_file.exists() else None
        return build_from_spec(spec, state), version

    def log_metrics(self, version: EncoderVersion, metrics: dict[str, float]) -> None:
        """Log evaluation metrics to the run that produced `version`."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        self.client.log_batch(version.run_id, metrics=batch)
