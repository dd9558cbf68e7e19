"""MLflow Models and the Model Registry: each trial's final model as an MLflow Model, the sweep's selected one
registered as `<trainable>-<dataset>` with alias `selected`, and a SAFE way back from a `models:/` URI.

    info = log_model(tracking_uri, run_id, "…/model.pt", input_example=x)       # driver side (contract C4)
    version = register_selected(tracking_uri, info.model_uri, run_id, "glean", "cmnist", tags={...})
    loaded = resolve_model_uri("models:/glean-cmnist@selected", tracking_uri)   # or models:/glean-cmnist/3
    Smooth(loaded.net, loaded.trainable.info.num_classes, loaded.sigma)          # or loaded.trainable.certifier()

The flavour (choice, stated): not `mlflow.pytorch.log_model`. Its default format pickles the whole module
(cloudpickle) and `mlflow.pytorch.load_model` unpickles it, which runs arbitrary code from whoever can write to
the tracking server; a GLEAN model also certifies with its own latent smoother and Lipschitz constant, which a
bare `nn.Module` does not carry. So the model directory holds the project's self-describing checkpoint
(`trainables.checkpoint`: trainable name, hyperparameters, data description, tensors) read back with
`torch.load(weights_only=True)` -- tensors and plain containers only, no code -- and the network is rebuilt from
this installed project's registry. The MLmodel file has two flavours:
- `smoothing_orchestrator`: the checkpoint path, trainable, dataset, sigma and (GLEAN) the Lipschitz constant;
- `python_function` with `loader_module: orchestrator.models`, the way MLflow's built-in flavours load (an
  installed module, not a pickle): `mlflow.pyfunc.load_model(uri).predict(images)` returns the smoothed
  classifier's PREDICT (Cohen et al.; -1 = abstain) with PYFUNC_N noise samples, seeded per call.
Signature: input float32 [-1, *input_shape] in [0, 1]; output int64 [-1]. Model metadata: sigma, lipschitz
(GLEAN), trainable, dataset, epochs, data source.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from trainables.device import HOST

FLAVOR = "smoothing_orchestrator"
DATA_FILE = "data/model.pt"
LOGGED_MODEL_NAME = "model"
ALIAS = "selected"
#: PREDICT settings of the pyfunc flavour (serving, not certification: certification is orchestrator.certify)
PYFUNC_N, PYFUNC_ALPHA, PYFUNC_SEED = 1000, 0.001, 0
#: model-version tag names of the final certification's settings; `certify --model` defaults to them
CERT_TAGS = ("split", "n0", "n", "alpha", "batch", "seed", "selection", "final_examples")
CERT_PREFIX = "final_cert_"


class ModelUriError(ValueError):
    """A models:/ URI that names no model version, or a version that is not one of this project's models."""


def registered_name(trainable: str, dataset: str) -> str:
    """The registry name of a sweep's selected model: `<trainable>-<dataset>` (e.g. glean-cmnist)."""
    return f"{trainable}-{dataset}"


@contextlib.contextmanager
def _tracking(uri: str, experiment_id: str | None) -> Iterator[None]:
    """MLflow's fluent model logging reads the global tracking URI and active experiment (a LoggedModel belongs to
    an experiment, not only to its run): set both for the block, then restore them."""
    import mlflow
    from mlflow.tracking import fluent

    old = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.tracking._tracking_service.utils.is_tracking_uri_set() else None
    previous_exp = fluent._active_experiment_id
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = experiment_id
    try:
        yield
    finally:
        fluent._active_experiment_id = previous_exp
        if previous is not None:
            mlflow.set_tracking_uri(previous)
        else:
            mlflow.tracking._tracking_service.utils._tracking_uri = None
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
        else:   # set_tracking_uri also exports the variable
            os.environ.pop("MLFLOW_TRACKING_URI", None)


# --- safe reading ---------------------------------------------------------------------------------------------
def read_checkpoint_safely(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, read with `weights_only=True` (tensors and plain containers, never code)."""
    from trainables.checkpoint import FORMAT

    try:
        blob = torch.load(Path(path), map_location=HOST, weights_only=True)
    except Exception as exc:   # a pickle that needs code, a damaged file
        raise ModelUriError(f"{path} is not a safely loadable {FORMAT} checkpoint "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelUriError(f"{path} is not a {FORMAT} checkpoint")
    return blob


def trainable_from_blob(blob: Mapping[str, Any], device: "str | torch.device" = HOST):
    """Rebuild the trainable a checkpoint dict describes, from this project's registry, weights loaded."""
    from trainables.data import DataInfo
    from trainables.registry import get_trainable

    info = blob["info"]
    info = DataInfo(**{**info, **{k: tuple(v) for k, v in info.items() if isinstance(v, list)}})
    trainable = get_trainable(blob["trainable"])(blob["hparams"], info, epochs=blob.get("epochs", 1),
                                                 device=device)
    trainable.load_state_dict(blob["state"])
    return trainable


def model_metadata(trainable, blob: Mapping[str, Any]) -> dict[str, Any]:
    """What a reader of the model needs besides weights: sigma and, for GLEAN, the encoder's Lipschitz constant."""
    meta = {"trainable": trainable.NAME, "dataset": trainable.info.name, "sigma": float(trainable.sigma),
            "num_classes": int(trainable.info.num_classes), "input_shape": list(trainable.info.input_shape),
            "epochs": int(blob.get("epoch", 0)), "data_source": str(trainable.info.source)}
    lipschitz = getattr(trainable.net, "lipschitz", None)
    if callable(lipschitz):
        meta["lipschitz"] = float(lipschitz())
    return meta


# --- the flavour (MLflow calls save_model from Model.log, and _load_pyfunc from mlflow.pyfunc.load_model) -----
def save_model(path: str | os.PathLike, mlflow_model=None, *, checkpoint: str | os.PathLike,
               input_example: np.ndarray | None = None, metadata: Mapping[str, Any] | None = None) -> None:
    """Write an MLflow Model directory at `path` for the checkpoint file `checkpoint`."""
    from mlflow.models import Model, ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.pyfunc import add_to_model
    from mlflow.types import Schema, TensorSpec

    blob = read_checkpoint_safely(checkpoint)          # refuse now what could not be loaded safely later
    trainable = trainable_from_blob(blob)
    path = Path(path)
    (path / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    # optimiser state is left out: the registry holds models to certify, not runs to resume
    torch.save({**blob, "state": {"net": blob["state"]["net"]}}, path / DATA_FILE)
    mlflow_model = mlflow_model or Model()
    meta = {**model_metadata(trainable, blob), **(metadata or {})}
    mlflow_model.metadata = {**(mlflow_model.metadata or {}), **meta}
    shape = tuple(trainable.info.input_shape)
    mlflow_model.signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
                                            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))
    if input_example is not None:
        _save_example(mlflow_model, np.asarray(input_example, dtype=np.float32).reshape(-1, *shape), str(path))
    add_to_model(mlflow_model, loader_module=__name__, data=DATA_FILE)
    mlflow_model.add_flavor(FLAVOR, checkpoint=DATA_FILE, format=blob["format"],
                            **{k: meta[k] for k in ("trainable", "dataset", "sigma") if k in meta},
                            **({"lipschitz": meta["lipschitz"]} if "lipschitz" in meta else {}))
    (path / "requirements.txt").write_text("smoothing-orchestrator\n")
    mlflow_model.save(str(path / "MLmodel"))


class _PyFuncModel:
    """`mlflow.pyfunc` wrapper: predict(images) -> the smoothed classifier's class per image (-1 = abstain)."""

    def __init__(self, trainable):
        self.trainable = trainable

    def predict(self, model_input, params: Mapping[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        shape = tuple(self.trainable.info.input_shape)
        x = x.reshape(-1, *shape)
        smooth = self.trainable.certifier()
        g = torch.Generator(device=smooth.device).manual_seed(PYFUNC_SEED)
        return np.asarray([smooth.predict(xi, n=PYFUNC_N, alpha=PYFUNC_ALPHA, generator=g) for xi in x],
                          dtype=np.int64)

    def get_raw_model(self):
        return self.trainable


def _load_pyfunc(data_path: str) -> _PyFuncModel:
    return _PyFuncModel(trainable_from_blob(read_checkpoint_safely(data_path)))


# --- logging and registering (the driver: contract C4) ---------------------------------------------------------
def log_model(tracking_uri: str, run_id: str, checkpoint: str | os.PathLike, *,
              input_example: np.ndarray | None = None, metadata: Mapping[str, Any] | None = None):
    """Log the checkpoint as an MLflow Model (a LoggedModel linked to the run `run_id`); returns ModelInfo."""
    import logging

    from mlflow.models import Model

    logging.getLogger("mlflow.models.model").setLevel(logging.ERROR)   # no "install uv" advice per trial
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    cl = MlflowClient(tracking_uri)
    with _tracking(tracking_uri, cl.get_run(run_id).info.experiment_id):
        info = Model.log(None, sys.modules[__name__], name=LOGGED_MODEL_NAME, run_id=run_id,
                         checkpoint=str(checkpoint), input_example=input_example, metadata=dict(metadata or {}))
    if cl.get_logged_model(info.model_id).status != LoggedModelStatus.READY:   # Model.log leaves it PENDING
        cl.finalize_logged_model(info.model_id, LoggedModelStatus.READY)
    return info


def register_selected(tracking_uri: str, model_uri: str, run_id: str, trainable: str, dataset: str,
                      tags: Mapping[str, Any], alias: str = ALIAS):
    """Register `model_uri` (a logged model's URI) as a new version of `<trainable>-<dataset>`, tag it (the
    sweep's validation/test metrics and final certification settings) and point `alias` at it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    cl = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = registered_name(trainable, dataset)
    try:
        cl.create_registered_model(name, description=f"{trainable} on {dataset}: models selected by sweeps "
                                                     f"(orchestrator.sweep); alias @{alias} is the latest")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with _tracking(tracking_uri, None):   # the registry resolves models:/m-<id> through the global tracking URI
        version = cl.create_model_version(name, source=model_uri, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()},
                                          model_id=model_uri.split("/")[-1] if model_uri.startswith("models:/m-")
                                          else None)
    cl.set_registered_model_alias(name, alias, version.version)
    return cl.get_model_version(name, version.version)


def publish_sweep(tracking_uri: str, trial_models: list[tuple[str, str]], selected_run_id: str, trainable: str,
                  dataset: str, tags: Mapping[str, Any], input_example: np.ndarray | None = None):
    """The sweep's hook: log every usable trial's final model (`trial_models`: (run id, checkpoint file)) as an
    MLflow Model, and register the selected run's as `<trainable>-<dataset>`@selected with `tags`.
    Returns the registered ModelVersion."""
    selected_uri = None
    for run_id, checkpoint in trial_models:
        info = log_model(tracking_uri, run_id, checkpoint, input_example=input_example)
        if run_id == selected_run_id:
            selected_uri = info.model_uri
    if selected_uri is None:
        raise ValueError(f"the selected run {selected_run_id} is not among the logged trial models")
    return register_selected(tracking_uri, selected_uri, selected_run_id, trainable, dataset, tags)


# --- back from a URI ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedModel:
    trainable: Any            # has .certifier() (GLEAN: its latent smoother), .net, .info
    checkpoint: Path          # the downloaded checkpoint file (trainables.checkpoint format)
    version: Any              # mlflow ModelVersion (None for a models:/m-<id> logged-model URI)
    metadata: dict[str, Any]

    @property
    def net(self) -> torch.nn.Module:
        """The base classifier, as `trainables.smoothing.Smooth(net, num_classes, sigma)` takes it."""
        return self.trainable.net

    @property
    def sigma(self) -> float:
        return float(self.trainable.sigma)


def model_version(uri: str, tracking_uri: str):
    """The ModelVersion a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names; ModelUriError otherwise."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise ModelUriError(f"--model expects models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    rest = uri[len("models:/"):].strip("/")
    cl = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return cl.get_model_version_by_alias(name, alias)
        name, _, ver = rest.rpartition("/")
        if not name or not ver.isdigit():
            raise ModelUriError(f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return cl.get_model_version(name, ver)
    except MlflowException as exc:
        raise ModelUriError(f"no model version {uri} in the registry at {tracking_uri} "
                            f"({' '.join(str(exc.message).split())[:200]})") from None


def resolve_model_uri(uri: str, tracking_uri: str, dst: str | os.PathLike | None = None,
                      device: "str | torch.device" = HOST) -> LoadedModel:
    """Download the model a `models:/` URI names and rebuild it safely (weights_only; see the module doc)."""
    import mlflow
    import yaml
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    version = model_version(uri, tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="model-"))
    # the version's own artifact location (models:/ URIs resolve through the *global* registry URI, not ours)
    source = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
        version.name, version.version)
    with _tracking(tracking_uri, None):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                         tracking_uri=tracking_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = (mlmodel.get("flavors") or {}).get(FLAVOR)
    if flavor is None:
        raise ModelUriError(f"{uri} is not a {FLAVOR} model (flavours: {', '.join(mlmodel.get('flavors', {}))})")
    checkpoint = local / flavor["checkpoint"]
    trainable = trainable_from_blob(read_checkpoint_safely(checkpoint), device=device)
    return LoadedModel(trainable, checkpoint, version, dict(mlmodel.get("metadata") or {}))


def final_indices(selection: str, n_test: int, final_examples: int | None, info) -> list[int]:
    """The test indices a sweep's final certification used (cli_common.make_selection, the one source);
    `info`: the dataset's DataInfo (whether it has a held-out test domain decides the reported examples)."""
    from types import SimpleNamespace

    from orchestrator.cli_common import make_selection

    fake = SimpleNamespace(test=range(n_test), val=range(1), info=info)   # only lengths and info are read
    return make_selection(fake, selection, None, final_examples).test_indices


def certify_args_from_model(args) -> Any:
    """`orchestrator.certify --model URI`: resolve the version, download and SAFELY re-save its checkpoint as
    `args.checkpoint` (a local file rebuilt from tensors and plain data), fill every setting the user left
    unset from the version's final-certification tags, and return `indices(n_test)` giving the sweep's test
    examples (or None when the version records none). CertifyInputError for a bad URI."""
    import atexit

    from orchestrator import mlflow_utils
    from orchestrator.pool import CertifyInputError

    tracking_uri = mlflow_utils.resolve_tracking_uri(args.tracking_uri)
    tmp = tempfile.mkdtemp(prefix="certify-model-")
    atexit.register(shutil.rmtree, tmp, True)
    try:
        loaded = resolve_model_uri(args.model, tracking_uri, Path(tmp) / "download")
    except ModelUriError as exc:
        raise CertifyInputError(str(exc)) from None
    local = Path(tmp) / "model.pt"
    torch.save(read_checkpoint_safely(loaded.checkpoint), local)
    args.checkpoint = str(local)
    settings = certify_settings(loaded.version)
    for key in ("split", "n0", "n", "alpha", "batch", "seed"):
        if getattr(args, key, None) is None and key in settings:
            setattr(args, key, settings[key])
    from mlflow import MlflowClient
    args.model_run_params = dict(MlflowClient(tracking_uri).get_run(loaded.version.run_id).data.params) \
        if loaded.version.run_id else {}
    if "selection" not in settings:
        return None
    info = loaded.trainable.info
    return lambda n_test: final_indices(settings["selection"], n_test, settings.get("final_examples"), info)


def certify_settings(version) -> dict[str, Any]:
    """The final certification settings recorded on a model version (CERT_TAGS), typed."""
    out: dict[str, Any] = {}
    for key in CERT_TAGS:
        raw = version.tags.get(CERT_PREFIX + key)
        if raw is None or raw == "None":
            continue
        out[key] = raw if key in ("split", "selection") else (float(raw) if key == "alpha" else int(raw))
    return out


__all__ = ["ALIAS", "FLAVOR", "LoadedModel", "ModelUriError", "certify_settings", "final_indices", "log_model",
           "certify_args_from_model", "publish_sweep",
           "model_version", "read_checkpoint_safely", "register_selected", "registered_name",
           "resolve_model_uri", "save_model", "trainable_from_blob"]
