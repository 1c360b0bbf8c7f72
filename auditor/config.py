"""`.audit/audit.toml`: one typed dataclass per section, read strictly.

Every setting is a field with its default and a `help` text; docs/config.md is generated from them
(`python -m auditor.config`, kept true by a test). Loading refuses, in one line, a section or key the
product does not know and a value of the wrong type or outside its choices: a typo such as
`[distill] epoch = 3` must not silently do nothing. A key missing from an older file falls back to
its default, so adding a setting never breaks a workspace.

API keywords and CLI options override a section with `section.override(**values)` (None means "not
given"); an unknown name is refused the same way.
"""

import dataclasses
import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Self

from .errors import AuditError


def setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def settings_hash(values: dict, *parts: str) -> str:
    """16 hex digits naming a result by what it depends on: the settings that change it, then the other inputs
    (model hash, encoder id, ...). Runs, collections and caches are keyed by it, so a setting that only trades
    memory or speed must be left out of (or fixed in) `values`, or changing it would start the work over."""
    return hashlib.sha256((json.dumps(values, sort_keys=True) + "|".join(parts)).encode()).hexdigest()[:16]


def _type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {_type_name(typing.get_args(kind)[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


def _checked(section: str, name: str, kind, value, choices: tuple[str, ...]):
    """The value as the field's type, or an AuditError naming the key."""
    where = f"[{section}] {name}"
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list | tuple):
            raise AuditError(f"{where} must be {_type_name(kind)}, not {value!r}")
        return tuple(_checked(section, name, item, v, choices) for v in value)
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, int | float) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    )
    if not ok:
        raise AuditError(f"{where} must be {_type_name(kind)}, not {value!r}")
    if choices and value not in choices:
        raise AuditError(f"{where} is {value!r}; use {', '.join(choices)}")
    return float(value) if kind is float else value


class Section:
    """A settings dataclass read from its audit.toml section."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""

    @classmethod
    def from_toml(cls, values: dict) -> Self:
        if not isinstance(values, dict):
            raise AuditError(f"[{cls.name}] must be a table of settings")
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                raise AuditError(f"[{cls.name}] has no setting {key!r}; {_known(cls)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _checked(cls.name, k, hints[k], v, known[k].metadata["choices"]) for k, v in values.items()})

    def override(self, **values) -> Self:
        """A copy with the given settings changed; None means "not given" and keeps the current value."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise AuditError(f"{', '.join(unknown)}: no [{self.name}] setting; {_known(type(self))}")
        hints = typing.get_type_hints(type(self))
        given = {
            k: _checked(self.name, k, hints[k], v, known[k].metadata["choices"])
            for k, v in values.items()
            if v is not None
        }
        return replace(self, **given)

    def to_toml(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _known(cls) -> str:
    return f"the settings of [{cls.name}] are {', '.join(f.name for f in fields(cls))} (docs/config.md)"


@dataclass
class PathsSettings(Section):
    name: ClassVar[str] = "paths"
    lancedb: str = setting("lancedb", "Any LanceDB URI (s3://..., gs://...); a relative path is inside .audit/.")
    model: str = setting(
        "",
        "The diffusion model the teachers load (`audit confirm`, `audit distill`, `audit eval`): a diffusers folder of "
        "Stable Diffusion 1.x/2.x or SDXL, or one .safetensors/.ckpt checkpoint of them (with model_config).",
    )
    model_config: str = setting(
        "",
        "For a single-file model: a local diffusers folder of the same family whose configs, tokenizers and scheduler "
        "it is read with (weights not needed; nothing is downloaded).",
    )
    model_variant: str = setting(
        "",
        "Weights variant of a diffusers folder (e.g. fp16: *.fp16.safetensors); empty: the plain weights, or the one "
        "variant there is. Weights are upcast to fp32 either way.",
    )


@dataclass
class StorageSettings(Section):
    name: ClassVar[str] = "storage"
    doc: ClassVar[str] = (
        "Object storage for an `s3://` [paths] lancedb and `s3://` training shards or Parquet files (AWS S3 or an "
        "S3-compatible server), given to LanceDB, lance-ray, every Ray worker (so workers need no settings of their "
        "own) and the shard reader. Secrets stay out of this file: "
        "the keys come from the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN of the `audit` "
        "process, else from `profile` in the AWS credentials file, else from what each process finds itself "
        "(instance role, its own environment)."
    )
    endpoint: str = setting("", "Endpoint URL of an S3-compatible server (http://host:9000); empty: AWS S3.")
    region: str = setting("", "Bucket region; empty: the environment's (AWS_REGION) or the store's default.")
    allow_http: bool = setting(False, "Allow a plain-HTTP endpoint (a local or test server).")
    profile: str = setting(
        "",
        "Profile of the AWS credentials file (~/.aws/credentials, or AWS_SHARED_CREDENTIALS_FILE) whose keys are "
        "used when the environment has none.",
    )


@dataclass
class ModelSettings(Section):
    name: ClassVar[str] = "model"
    doc: ClassVar[str] = (
        "Which model the audited outputs must come from (`audit model`; matching: auditor/model_identity.py). A "
        "generation declaring another model is refused by `audit confirm` and left out of `audit report` by default."
    )
    checkpoints: tuple[str, ...] = setting(
        (),
        "Checkpoint files (.safetensors, .ckpt) the model was served from: their hashes as AUTOMATIC1111 computes "
        "them and their file names identify its outputs. [paths] model counts too when it is one such file.",
    )
    hashes: tuple[str, ...] = setting(
        (), "Hashes the generators write for this model (AutoV1, AutoV2, AutoV3, full SHA-256, or e.g. blake3:...)."
    )
    names: tuple[str, ...] = setting((), "Model names the generators write for it (A1111 Model:, ComfyUI ckpt_name).")


@dataclass
class EncoderSettings(Section):
    name: ClassVar[str] = "encoder"
    path: str = setting("", "Encoder bundle directory (docs/encoders.md).")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N; also --device.")
    batch_size: int = setting(64, "Images per encoder forward pass.")
    precision: str = setting(
        "fp32",
        "The towers' arithmetic in `audit index` and `audit scan`: fp32, or bf16/fp16 autocast (faster on a GPU; the "
        "head and the search stay fp32; top-k overlap with fp32 tested >= 0.99 with bf16, docs/benchmarks.md).",
        ("fp32", "bf16", "fp16"),
    )


@dataclass
class ScanSettings(Section):
    name: ClassVar[str] = "scan"
    doc: ClassVar[str] = "The image and text limits apply wherever the product reads an image, not only in scans."
    top_k: int = setting(50, "Training images attributed per generation (also --top-k).")
    max_pixels: int = setting(50_000_000, "Larger images are refused (decompression bombs).")
    max_file_bytes: int = setting(256 * 1024 * 1024, "Larger files are refused.")
    max_text_chars: int = setting(
        65536, "Longer prompts and captions are cut to this; the cut is noted (generations.metadata_warnings)."
    )
    loader_threads: int = setting(4, "Decoding threads feeding the encoder.")


@dataclass
class IndexSettings(Section):
    name: ClassVar[str] = "index"
    ann_threshold: int = setting(100_000, "From this many training vectors on, an IVF_PQ index is built and used.")
    num_partitions: int = setting(0, "IVF partitions; 0: sqrt(rows), capped at rows / 256.")
    num_sub_vectors: int = setting(0, "PQ sub-vectors; 0: dim / 4 rounded to a divisor of dim (docs/benchmarks.md).")
    nprobes: int = setting(20, "Partitions searched per query.")
    refine_factor: int = setting(10, "Candidates re-ranked by exact distance, as a multiple of k.")
    rebuild_fraction: float = setting(
        0.2, "Appended rows are searched exactly until they exceed this fraction of the indexed rows; then rebuild."
    )


@dataclass
class SourcesSettings(Section):
    name: ClassVar[str] = "sources"
    doc: ClassVar[str] = (
        "Where `audit index` finds each thing in WebDataset shards (the per-sample `.json`) and Parquet manifests "
        "(columns); also its --image-field, --caption-field, --contributor-field and --license-field options. A field "
        "a sample or file lacks is left empty (the image column must exist)."
    )
    image: str = setting(
        "image",
        "Parquet column holding the image: its bytes, its path (relative to the Parquet file), or a {bytes, path} "
        "struct as Hugging Face datasets write it. Shards keep the image in the sample's .jpg/.png/.webp member.",
    )
    caption: str = setting(
        "caption", "Parquet column, or JSON field of a shard sample without a .txt, with the caption."
    )
    contributor: str = setting(
        "contributor_id", "Parquet column, or JSON field of a shard sample, with the contributor id."
    )
    license: str = setting("license", "Parquet column, or JSON field of a shard sample, with the licence.")

    def fields(self):
        from .sources import Fields

        return Fields(self.image, self.caption, self.contributor, self.license)


@dataclass
class ConfirmSettings(Section):
    """`audit confirm`: the candidates every teacher scores, how they are judged, and the AbU teacher's knobs."""

    name: ClassVar[str] = "confirm"
    doc: ClassVar[str] = "`audit confirm`; the AbU settings are also the teacher of `audit distill collect`."
    # Bumped when AbU scores differently under the same settings, so that runs and collections made before are not
    # taken for current ones (2: scoring noise drawn per query, not per candidate).
    scheme: ClassVar[int] = 2

    method: str = setting(
        "abu", "The teacher: abu (unlearning) or dtrak (projected gradients; [dtrak]).", ("abu", "dtrak")
    )
    flip: str = setting(
        "auto",
        "Score each image and its mirror image (training used random flips): on, off, or auto (the model folder's "
        "auditor_training.json says; without one, on, as Stable Diffusion trains).",
        ("auto", "on", "off"),
    )
    steps: int = setting(1, "AbU's natural-gradient unlearning steps on the generation.")
    step_size: float = setting(0.01, "Unlearning step size (eta).")
    draws: int = setting(256, "(timestep, noise) draws of the unlearning gradient; one backward each.")
    timesteps: int = setting(20, "Evenly spaced timesteps of every scored loss.")
    candidates: int = setting(300, "Fast-path top-K the teacher scores per generation.")
    controls: int = setting(50, "Random training images outside the top-K scored beside them.")
    fisher_samples: int = setting(1000, "Training images in the diagonal Fisher (computed once per model).")
    damping: float = setting(0.1, "Fisher damping, a fraction of each layer's mean.")
    bias_correction: bool = setting(True, "Remove the generic-influence direction (docs/methods.md §1).")
    reference_samples: int = setting(64, "Random training images unlearned for the generic-influence reference.")
    k: int = setting(10, "Top-k that decides agreement (mAP@k).")
    confirm_threshold: float = setting(
        0.3,
        "Retired (the verdict_* settings decide since migration 009); still accepted so that audit.toml files "
        "written before load.",
    )
    verdict_alpha: float = setting(
        0.01,
        "Confirm only when the rank test of the fast top-k against the controls gives p at or below this (a "
        "nonsense fast top-k passes it at most this often; docs/methods.md §1).",
    )
    verdict_min_self_agreement: float = setting(
        0.6,
        "Below this mAP@k of the teacher against itself (two simulated runs under its measured noise floor) "
        "the verdict is inconclusive: the teacher is too noisy at these settings.",
    )
    verdict_confirm_ratio: float = setting(
        0.2,
        "Confirm only when the fast ranking's agreement with the teacher, as a fraction of the teacher's agreement "
        "with itself above chance, is at least this.",
    )
    verdict_dispute_ratio: float = setting(
        0.1,
        "Dispute when that fraction is at or below this (the teacher clearly prefers other images), or when the "
        "teacher ranks the fast top-k no higher than the controls.",
    )
    batch_size: int = setting(
        0,
        "UNet rows (image × timestep) per AbU pass; 0: sized from the memory available ([memory]). Memory only: "
        "lowering it after running out of memory resumes the same run.",
    )
    seed: int = setting(0, "Seed of the teacher's noise and samples.")

    SELECTION: ClassVar[tuple[str, ...]] = (
        "candidates",
        "controls",
        "k",
        "verdict_alpha",
        "verdict_min_self_agreement",
        "verdict_confirm_ratio",
        "verdict_dispute_ratio",
    )

    def _teacher_values(self, selection: bool) -> dict:
        verdict = [k for k in self.SELECTION if k.startswith("verdict_")]
        values = {k: v for k, v in asdict(self).items() if k not in ("method", "flip", *verdict)}
        # Memory only: a smaller batch resumes the same run. Fixed at the default it had before sizing (256), so runs
        # and collections made then keep their hashes.
        values["batch_size"] = 256
        values["confirm_threshold"] = None  # retired: judges nothing
        if selection:
            values.update({k: getattr(self, k) for k in verdict})
        else:
            # Without the verdict's keys, so that collections keyed by scoring_hash before they existed still match.
            values.update(dict.fromkeys(k for k in self.SELECTION if k not in verdict))
        return values

    def hash(self, *parts: str) -> str:
        """Names an AbU run: its settings (all but the batch size) and `parts`."""
        return settings_hash(self._teacher_values(True), f"abu-scheme-{self.scheme}", *parts)

    def scoring_hash(self, *parts: str) -> str:
        """As hash(), without what picks and judges the candidates: a collection stays resumable when those change."""
        return settings_hash(self._teacher_values(False), f"abu-scheme-{self.scheme}", *parts)

    def reference_key(self, model_hash: str) -> str:
        """The generic-influence reference update depends on these alone."""
        values = (self.steps, self.step_size, self.draws, self.timesteps, self.fisher_samples, self.damping)
        values += (self.reference_samples, self.seed)
        return hashlib.sha256(f"{model_hash}|{values}".encode()).hexdigest()[:16]

    def thresholds(self):
        """The verdict's thresholds (auditor/verdict.py)."""
        from .verdict import Thresholds

        return Thresholds(  # measured on the example world: docs/research/verdicts.md
            self.verdict_alpha, self.verdict_min_self_agreement, self.verdict_confirm_ratio, self.verdict_dispute_ratio
        )

    def selection(self) -> dict:
        """The settings that pick and judge the candidates, shared by every teacher so their verdicts compare."""
        return {k: getattr(self, k) for k in (*self.SELECTION, "seed")}


@dataclass
class MemorySettings(Section):
    name: ClassVar[str] = "memory"
    doc: ClassVar[str] = (
        "Batch sizes of every stage that runs the diffusion model (`audit confirm`, `audit distill collect`, "
        "`audit eval planted` / `counterfactual`); 0 sizes a batch from the memory available (free CUDA memory or "
        "available RAM) and the model's resolution and widths (auditor/memory.py). Memory only: changing them resumes "
        "the same run."
    )
    budget: float = setting(0.5, "Fraction of the memory available that an automatically sized batch may fill.")
    vae_batch_size: int = setting(0, "Images per VAE encoding pass; 0: sized from the memory available.")
    text_batch_size: int = setting(0, "Prompts per text-encoder pass; 0: sized from the memory available.")
    unet_batch_size: int = setting(
        0,
        "UNet rows (image × timestep) per pass where the stage has no batch setting of its own ([confirm] batch_size, "
        "[dtrak] batch_size); 0: sized from the memory available.",
    )
    gradient_checkpointing: str = setting(
        "auto",
        "Recompute UNet activations in the backward pass instead of keeping them (less memory, about a third more "
        "time where gradients flow: Fisher, unlearning, D-TRAK, fine-tuning): on, off, or auto (on when fewer than "
        "16 gradient rows would fit in the budget without it).",
        ("auto", "on", "off"),
    )


@dataclass
class DtrakSettings(Section):
    name: ClassVar[str] = "dtrak"
    doc: ClassVar[str] = "`audit confirm --method dtrak` (docs/methods.md §3)."
    timesteps: int = setting(10, "Evenly spaced timesteps of the output function.")
    params: str = setting("kv", "Gradient parameters: kv (cross-attention keys/values, as AbU) or all.", ("kv", "all"))
    dim: int = setting(4096, "k of the random projection.")
    damping: float = setting(0.1, "λ = damping × trace(ΦᵀΦ)/k.")
    batch_size: int = setting(
        0,
        "UNet rows (timestep × view of one sample) per backward pass of its per-sample gradient; 0: sized from the "
        "memory available ([memory]). Memory only.",
    )
    seed: int = setting(0, "Noise and projection seed.")

    def feature_key(self) -> str:
        """What the training features Φ depend on besides the model (not λ: the kernel is rebuilt from Φ)."""
        return hashlib.sha256(f"{self.timesteps}|{self.params}|{self.dim}|{self.seed}".encode()).hexdigest()[:12]

    def hash(self, *parts: str) -> str:
        # Memory only, fixed at its default before batches were sized (16) so earlier runs keep their hashes.
        return settings_hash({**asdict(self), "batch_size": 16}, *parts)


@dataclass
class DistillSettings(Section):
    name: ClassVar[str] = "distill"
    doc: ClassVar[str] = "`audit distill collect` and `audit distill train` (FastGDA, docs/methods.md §2)."
    queries: int = setting(300, "Query images `distill collect` generates; a larger count extends a collection.")
    test_fraction: float = setting(0.2, "Fraction of prompts held out for `audit eval teacher`.")
    candidates: int = setting(200, "Nearest training images (untuned backbone) the teacher ranks per query.")
    sample_steps: int = setting(25, "Sampling steps of the generated query images.")
    guidance: float = setting(4.0, "Classifier-free guidance of the query images.")
    hidden_dims: tuple[int, ...] = setting((768, 768, 768), "The head's hidden layers.")
    out_dim: int = setting(768, "The head's output width.")
    layernorm: bool = setting(True, "LayerNorm on the head's input.")
    dropout: float = setting(0.1, "Dropout in the head.")
    residual: bool = setting(True, "The head starts as the untuned feature (identity skip, zero last layer).")
    query_map: bool = setting(True, "Queries pass through a learned linear map training images do not (asymmetry).")
    strengths: bool = setting(True, "Learn an influence strength per training image.")
    strength_decay: float = setting(1e-4, "L2 on the log strengths, per batch.")
    epochs: int = setting(40, "Maximum epochs (early stopping on validation mAP@k).")
    batch_size: int = setting(4096, "(query, candidate) pairs per step.")
    lr: float = setting(1e-3, "AdamW learning rate.")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    negatives: float = setting(0.1, "Fraction of pairs replaced by out-of-candidate negatives (target: the last rank).")
    val_fraction: float = setting(0.2, "Fraction of training prompts used for validation.")
    patience: int = setting(6, "Epochs without a better validation mAP before stopping.")
    refit: bool = setting(True, "After early stopping, train again on fit + validation queries for the chosen epochs.")
    ema: float = setting(0.95, "Per-step decay of the weight average that validation scores and the bundle keeps.")
    k: int = setting(10, "mAP@k of early stopping.")
    calibration_k: int = setting(10, "Teacher top-k the share temperature is fitted to.")
    seed: int = setting(0, "Seed of the query images and of training.")


@dataclass
class PlantedSettings(Section):
    name: ClassVar[str] = "planted"
    doc: ClassVar[str] = "`audit eval planted` (AbC, docs/methods.md §4)."
    customisations: int = setting(4, "Customised models.")
    exemplars: int = setting(4, "Exemplars per customisation.")
    style: str = setting(
        "palette",
        "How exemplars get a style the model has not seen: palette (recoloured), stroke (mirrored, upside down, bold, "
        "thin), as-is (one subfolder of --exemplars per customisation).",
        ("palette", "stroke", "as-is"),
    )
    prompt: str = setting(
        "a handwritten digit in {word} style", "Exemplar caption and generation prompt; {word} is new."
    )
    generations: int = setting(4, "Images generated with each customised model.")
    tune: str = setting("kv", "Weights fine-tuned: kv (Custom Diffusion) or all (DreamBooth).", ("kv", "all"))
    steps: int = setting(300, "Fine-tuning steps per customisation.")
    lr: float = setting(3e-4, "Fine-tuning learning rate.")
    batch_size: int = setting(8, "Fine-tuning batch: half exemplars, half prior-preservation images.")
    prior_samples: int = setting(128, "Training images that keep the rest of the model as it was.")
    candidates: int = setting(100, "Fast top-K of the augmented index the teachers rank (plus the exemplars).")
    kernel_samples: int = setting(256, "Training images in D-TRAK's kernel per customised model.")
    sample_steps: int = setting(25, "Sampling steps of the generations.")
    guidance: float = setting(4.0, "Classifier-free guidance of the generations.")
    seed: int = setting(0, "Seed of exemplars, words, tuning and generations.")

    def hash(self, *parts: str) -> str:
        return settings_hash(asdict(self), *parts)


@dataclass
class CounterfactualSettings(Section):
    name: ClassVar[str] = "counterfactual"
    doc: ClassVar[str] = "`audit eval counterfactual` (leave-K-out, docs/methods.md §1)."
    generations: int = setting(4, "AbU-scored generations checked, distinct prompts first.")
    k: int = setting(10, "Images left out per generation and method (also --remove).")
    methods: tuple[str, ...] = setting(("fast", "abu", "dtrak"), "Methods whose top-K are left out.")
    retrain_steps: int = setting(0, "Steps of every retraining; 0: the recipe's own (also --retrain-steps).")
    loss_timesteps: int = setting(50, "Evenly spaced timesteps of the generation's loss.")
    loss_draws: int = setting(4, "Noise draws per timestep.")
    sample_steps: int = setting(30, "Sampling steps of the regenerations.")
    guidance: float = setting(4.0, "Classifier-free guidance of the regenerations.")
    seed: int = setting(0, "Seed of the loss noise, the random control and the regenerations.")


@dataclass
class LdsSettings(Section):
    name: ClassVar[str] = "lds"
    doc: ClassVar[str] = (
        "`audit eval lds` (linear datamodeling score, docs/methods.md §1); the generation's loss is measured as "
        "[counterfactual] measures it."
    )
    subsets: int = setting(32, "Models retrained on random subsets of the training set (also --subsets).")
    fraction: float = setting(0.5, "Share of the training set each subset keeps.")
    generations: int = setting(8, "Teacher-scored generations checked, distinct prompts first.")
    retrain_steps: int = setting(0, "Steps of every retraining; 0: the recipe's own (also --retrain-steps).")
    seed: int = setting(0, "Seed of the subsets.")


@dataclass
class ReportSettings(Section):
    name: ClassVar[str] = "report"
    doc: ClassVar[str] = "Defaults of `audit report`'s options."
    currency: str = setting("EUR", "ISO 4217 code; amounts are exact to its minor unit.")
    policy: str = setting(
        "per-output",
        "per-output (by attributed credit), training-set (by images indexed) or teacher (per output, on the "
        "teacher's scores where its verdict decided: confirmed or disputed).",
        ("per-output", "training-set", "teacher"),
    )
    confirmed_weight: float = setting(2.0, "Weight of a teacher-confirmed attribution within its generation.")
    model: str = setting(
        "not-other",
        "Generations paid for, by the model they declare ([model]): same (only those declaring this model), "
        "not-other (all but those declaring another model: outputs without metadata are paid), or any.",
        ("same", "not-other", "any"),
    )
    min_payout: str = setting("0", "Smaller amounts are paid 0 and shared among the others (a decimal string).")


@dataclass
class StoreSettings(Section):
    name: ClassVar[str] = "store"
    doc: ClassVar[str] = (
        "The DuckDB audit store. A scan lets readers (`audit sql`, `audit report`, ...) in between its batches: "
        "a reader waits at most for the batch in flight, the scan for the reads under way (docs/benchmarks.md)."
    )
    busy_timeout: float = setting(
        30.0, "Seconds a reader waits for a writer to let go of the store before 'workspace is busy'; 0: no wait."
    )
    writer_timeout: float = setting(
        3600.0,
        "Seconds a writer (a scan's next batch) waits for the reads under way to finish before it stops with "
        "'workspace is busy' (logged every 30 s; new reads queue behind it); a rerun resumes the scan.",
    )


SECTIONS: tuple[type[Section], ...] = (
    PathsSettings,
    StorageSettings,
    ModelSettings,
    EncoderSettings,
    ScanSettings,
    IndexSettings,
    SourcesSettings,
    ConfirmSettings,
    DtrakSettings,
    MemorySettings,
    DistillSettings,
    PlantedSettings,
    CounterfactualSettings,
    LdsSettings,
    ReportSettings,
    StoreSettings,
)

# Keys earlier versions wrote that mean nothing now: dropped on load (and from the file at its next save).
RETIRED = {("index", "index_type")}


@dataclass
class Config:
    """The whole audit.toml."""

    paths: PathsSettings = field(default_factory=PathsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    sources: SourcesSettings = field(default_factory=SourcesSettings)
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    dtrak: DtrakSettings = field(default_factory=DtrakSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    planted: PlantedSettings = field(default_factory=PlantedSettings)
    counterfactual: CounterfactualSettings = field(default_factory=CounterfactualSettings)
    lds: LdsSettings = field(default_factory=LdsSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    store: StoreSettings = field(default_factory=StoreSettings)

    @classmethod
    def from_toml(cls, raw: dict) -> "Config":
        by_name = {s.name: s for s in SECTIONS}
        for name in raw:
            if name not in by_name:
                raise AuditError(f"there is no section [{name}]; the sections are {', '.join(by_name)}")
        return cls(
            **{
                s.name: s.from_toml({k: v for k, v in raw.get(s.name, {}).items() if (s.name, k) not in RETIRED})
                for s in SECTIONS
            }
        )

    def to_toml(self) -> dict:
        return {s.name: getattr(self, s.name).to_toml() for s in SECTIONS}


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def reference() -> str:
    """docs/config.md, from the sections' fields."""
    lines = [
        "# `audit.toml` reference",
        "",
        "Generated by `make docs` from auditor/config.py; `tests/test_config.py` fails when it is stale. "
        "An unknown section or key, or a value of the wrong type, is refused with a one-line error.",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## [{section.name}]", ""]
        if section.doc:
            lines += [section.doc, ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(section):
            meaning = f.metadata["help"]
            if f.metadata["choices"]:
                meaning += f" One of: {', '.join(f.metadata['choices'])}."
            lines.append(f"| `{f.name}` | `{_default_text(f.default)}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
