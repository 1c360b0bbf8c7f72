"""Encoder bundles: how an image (and its caption or prompt) becomes one vector.

A bundle is a directory with `encoder.json` and safetensors weights:

- `image_tower`: an open_clip model (its image tower), a timm model or a transformers
  CLIP vision model, with the preprocessing it was trained with (size, mean, std);
- `text_tower` (optional): an open_clip model (its text tower) or a transformers CLIP
  text model; `auditor/bundle.py` builds both from pretrained model names;
- `head` (optional): the distilled MLP of FastGDA (docs/methods.md §2);
- `strengths` (optional): a learned influence strength per training image, keyed by
  the image's sha256 (distill.py);
- `temperature`: the softmax temperature that turns scores into shares.

The feature of an image is [image embedding ⊕ text embedding], each L2-normalised,
passed through the head when there is one, then L2-normalised, so cosine
similarity is a dot product. A missing text contributes zeros (the image alone
decides); callers record that it was missing.

Strengths: the teacher's influence is a loss change, first order an inner product of the
query's and the candidate's gradients, so how strongly a training image responds to any
update multiplies its score. A training image's index vector is its feature times its
strength (1 for an image the bundle has none for), queries stay unit vectors, and the
search ranks by inner product (`metric` 'dot' instead of 'cosine').
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .errors import AuditError, BundleError

FORMAT = "auditor.encoder/1"
CONFIG_NAME = "encoder.json"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AuditError("--device cuda: torch sees no CUDA device here; use --device cpu or --device auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise AuditError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


class ProjectionHead(torch.nn.Module):
    """FastGDA's shared MLP: [LayerNorm] → (Linear → ReLU → Dropout)* → Linear, plus a learned score scale and bias.

    residual: the output adds a learned linear map of the L2-normalised input, initialised to the identity (zero-padded;
    a random orthonormal projection when out_dim < in_dim), and the MLP's last layer starts at zero, so an untrained head
    ranks like the untuned image ⊕ text feature and training moves away from it only as far as validation rewards.

    query_map: queries (generated images) also pass through out + W·out, W starting at zero. A shared head scores q
    against t as it scores t against q, but the teacher does not: on the example world a generated 'five' pulls
    training 'sevens' into its top-10 far more often than a generated 'seven' pulls in 'fives' (experiments/distill/EVAL.md)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims: list[int],
        out_dim: int,
        layernorm: bool = True,
        dropout: float = 0.1,
        residual: bool = False,
        query_map: bool = False,
    ):
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.LayerNorm(in_dim)] if layernorm else []
        width = in_dim
        for hidden in hidden_dims:
            layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
            width = hidden
        layers.append(torch.nn.Linear(width, out_dim))
        self.mlp = torch.nn.Sequential(*layers)
        self.skip = None
        if residual:
            self.skip = torch.nn.Linear(in_dim, out_dim, bias=False)
            with torch.no_grad():
                if out_dim >= in_dim:
                    self.skip.weight.copy_(torch.eye(out_dim, in_dim))
                else:  # a random projection with orthonormal rows: cosines kept approximately
                    torch.nn.init.orthogonal_(self.skip.weight)
                layers[-1].weight.zero_()
                layers[-1].bias.zero_()
        self.query_map = None
        if query_map:
            self.query_map = torch.nn.Linear(out_dim, out_dim, bias=False)
            torch.nn.init.zeros_(self.query_map.weight)
        # Score = scale * cosine + bias: logits for the teacher-rank BCE.
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.bias = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, query: bool = False) -> torch.Tensor:
        """The unit vector of a training image, or of a query (a generated image) when `query`."""
        out = self.mlp(x)
        if self.skip is not None:
            out = out + self.skip(torch.nn.functional.normalize(x, dim=-1))
        out = torch.nn.functional.normalize(out, dim=-1)
        if query and self.query_map is not None:
            out = torch.nn.functional.normalize(out + self.query_map(out), dim=-1)
        return out

    @staticmethod
    def from_config(cfg: dict) -> ProjectionHead:
        return ProjectionHead(
            cfg["in_dim"],
            list(cfg["hidden_dims"]),
            cfg["out_dim"],
            cfg.get("layernorm", True),
            cfg.get("dropout", 0.1),
            cfg.get("residual", False),
            cfg.get("query_map", False),
        )


def _hash_bundle(directory: Path, config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tokenizer = (config.get("text_tower") or {}).get("tokenizer")
    files = sorted(_weight_files(config))
    if tokenizer:
        files += sorted(str(f.relative_to(directory)) for f in (directory / tokenizer).rglob("*") if f.is_file())
    for name in files:
        with open(directory / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _weight_files(config: dict) -> set[str]:
    parts = [config.get("image_tower"), config.get("text_tower"), config.get("head"), config.get("strengths")]
    return {part["weights"] for part in parts if part and part.get("weights")}


def _load_weights(directory: Path, part: dict) -> dict[str, torch.Tensor]:
    return load_file(str(directory / part["weights"]))


def _build_open_clip(part: dict):
    import open_clip

    cfg = dict(part["model_config"])
    # SigLIP-style configs (custom_text) build as CustomTextCLIP, as open_clip's factory does.
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    try:
        model = (open_clip.model.CustomTextCLIP if custom else open_clip.model.CLIP)(**cfg)
    except (TypeError, KeyError) as exc:
        raise BundleError(f"open_clip model_config of {part.get('model_name', '?')} is invalid: {exc}") from None
    return open_clip_tower(model, part.get("tower"))


def open_clip_tower(model: torch.nn.Module, tower: str | None) -> torch.nn.Module:
    """The open_clip model with only the tower a bundle part uses ('image' or 'text'; None keeps both), so a DINO ⊕ CLIP
    bundle stores and loads the CLIP text weights alone. The logit scale and bias stay (two scalars)."""
    if tower == "text":
        model.visual = None
    elif tower == "image":
        for name in [n for n in model._modules if n != "visual"]:
            setattr(model, name, None)
        for name in [n for n in model._parameters if n not in ("logit_scale", "logit_bias")]:
            setattr(model, name, None)
    elif tower is not None:
        raise BundleError(f"open_clip tower must be 'image' or 'text', not {tower!r}")
    return model


def _build_transformers(part: dict):
    import transformers

    names = {"CLIPVisionModelWithProjection": "CLIPVisionConfig", "CLIPTextModelWithProjection": "CLIPTextConfig"}
    cls = part.get("model_class")
    if cls not in names:
        raise BundleError(f"transformers model_class must be one of {sorted(names)}, not {cls!r}")
    config = getattr(transformers, names[cls]).from_dict(part["model_config"])
    return getattr(transformers, cls)(config)


def _load_state(module: torch.nn.Module, state: dict, directory: Path, part: dict, role: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise BundleError(
            f"encoder bundle {directory}: {part['weights']} does not match the {role} config ({first})"
        ) from None


@dataclass
class Preprocess:
    """Resize the short side, centre-crop, normalise: what the image tower was trained with."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @property
    def min_decode_size(self) -> int:
        """The shorter side a decoder may reduce an image to (JPEG DCT scaling, ingest.decode): this transform
        resizes the shorter side to `image_size` and centre-crops, so any decode whose shorter side is at least that
        gives the same crop, up to resampling differences."""
        return self.image_size

    def __call__(self, image: Image.Image) -> np.ndarray:
        size = self.image_size
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[self.interpolation]
        w, h = image.size
        scale = size / min(w, h)
        if (w, h) != (size, size):
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
            w, h = image.size
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder:
    """A loaded encoder bundle on one device.

    `precision` ('fp32', 'bf16', 'fp16'): the towers run under torch autocast at that dtype (matrix products and
    convolutions in half precision, normalisations and reductions in fp32); their embeddings, the head and
    everything after stay fp32. The encoder id does not change with it: it trades speed for rounding, the
    attributions stay the same (tests/test_speed.py)."""

    def __init__(self, directory: Path, config: dict, device: torch.device, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise AuditError(f"unknown encoder precision {precision!r}; use {', '.join(PRECISIONS)}")
        self.directory = directory
        self.config = config
        self.device = device
        self.precision = precision
        self.id = _hash_bundle(directory, config)
        self.name = config.get("name", directory.name)
        self.temperature = float(config.get("temperature", 0.05))

        image_cfg = config["image_tower"]
        self.preprocess = Preprocess(
            int(image_cfg["image_size"]),
            tuple(image_cfg["mean"]),
            tuple(image_cfg["std"]),
            image_cfg.get("interpolation", "bicubic"),
        )
        cache: dict[str, torch.nn.Module] = {}
        self._image_model = self._tower(image_cfg, "image_tower", cache)
        text_cfg = config.get("text_tower")
        self._text_model = self._tower(text_cfg, "text_tower", cache) if text_cfg else None
        if text_cfg:
            from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

            length = int(text_cfg.get("context_length", 77))
            if text_cfg.get("tokenizer"):  # a Hugging Face tokenizer saved in the bundle (SigLIP-style towers)
                kwargs = text_cfg.get("tokenizer_kwargs", {})
                self._tokenizer = HFTokenizer(str(directory / text_cfg["tokenizer"]), context_length=length, **kwargs)
            else:  # OpenAI's CLIP BPE, shared by open_clip and transformers CLIP
                self._tokenizer = SimpleTokenizer(context_length=length)
        # Prompts repeat across generations; embedding each distinct text once saves the text tower's time.
        self._text_cache: dict[str, torch.Tensor] = {}
        self.image_dim = self._probe_image_dim()
        self.text_dim = self._probe_text_dim() if self._text_model is not None else 0
        self.head = None
        if config.get("head"):
            head_cfg = config["head"]
            if head_cfg["in_dim"] != self.image_dim + self.text_dim:
                raise BundleError(
                    f"encoder bundle {directory}: head.in_dim {head_cfg['in_dim']} != image+text dims {self.image_dim + self.text_dim}"
                )
            self.head = ProjectionHead.from_config(head_cfg)
            _load_state(self.head, _load_weights(directory, head_cfg), directory, head_cfg, "head")
            self.head.to(device).eval()
        self.dim = config["head"]["out_dim"] if self.head is not None else self.image_dim + self.text_dim
        self.strengths = read_strengths(directory, config["strengths"]) if config.get("strengths") else {}
        self.metric = "dot" if config.get("strengths") else "cosine"

    def _tower(self, part: dict, role: str, cache: dict) -> torch.nn.Module:
        key = json.dumps([part.get("model_config") or part.get("model_name"), part.get("tower")], sort_keys=True)
        key += part["weights"]
        if key in cache:
            return cache[key]
        library = part.get("library")
        if library == "open_clip":
            model = _build_open_clip(part)
        elif library == "timm":
            import timm

            try:
                model = timm.create_model(part["model_name"], pretrained=False, num_classes=0, **part.get("kwargs", {}))
            except RuntimeError as exc:
                raise BundleError(f"timm model {part['model_name']!r}: {exc}") from None
        elif library == "transformers":
            model = _build_transformers(part)
        else:
            raise BundleError(
                f"encoder bundle {self.directory}: {role}.library must be 'open_clip', 'timm' or 'transformers', "
                f"not {library!r}"
            )
        _load_state(model, _load_weights(self.directory, part), self.directory, part, role)
        model.to(self.device).eval()
        cache[key] = model
        return model

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        library = self.config["image_tower"]["library"]
        with self._autocast():
            if library == "open_clip":
                return self._image_model.encode_image(pixels).float()
            if library == "transformers":
                return self._image_model(pixel_values=pixels).image_embeds.float()
            return self._image_model(pixels).float()

    def _text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config["text_tower"]["library"] == "transformers":
            return self._text_model(input_ids=tokens).text_embeds
        return self._text_model.encode_text(tokens)

    def _probe_image_dim(self) -> int:
        size = self.preprocess.image_size
        with torch.inference_mode():
            return int(self._image_forward(torch.zeros(1, 3, size, size, device=self.device)).shape[-1])

    def _probe_text_dim(self) -> int:
        with torch.inference_mode():
            return int(self._text_forward(self._tokenizer([""]).to(self.device)).shape[-1])

    @torch.inference_mode()
    def embed_images(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed pixels (N, 3, S, S)."""
        pixels = torch.as_tensor(pixels)
        if self.device.type == "cuda" and not pixels.is_cuda:
            # Page-locked host memory: the copy runs by DMA, asynchronously with the host (the stream orders it
            # before the forward); pageable memory would be staged through a pinned buffer and block.
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        return torch.nn.functional.normalize(self._image_forward(pixels), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str | None]) -> torch.Tensor:
        """L2-normalised text embeddings; a None text is a zero vector (and no tower at all means width 0)."""
        out = torch.zeros(len(texts), self.text_dim, device=self.device)
        if self._text_model is None:
            return out
        new = sorted({text for text in texts if text and text not in self._text_cache})
        if new:
            if len(self._text_cache) + len(new) > 50_000:
                self._text_cache.clear()
            tokens = self._tokenizer(new).to(self.device)
            with self._autocast():
                embedded = self._text_forward(tokens).float()
            embedded = torch.nn.functional.normalize(embedded, dim=-1)
            self._text_cache.update(zip(new, embedded))
        for i, text in enumerate(texts):
            if text:
                out[i] = self._text_cache[text]
        return out

    @torch.inference_mode()
    def combine(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, head: bool = True, query: bool = True
    ) -> torch.Tensor:
        """The searchable feature from the two embeddings (the head applied when the bundle has one and head=True), as a
        query's (`query`) or a training image's: a head with a query map places the two differently."""
        joint = torch.cat([image_emb, text_emb], dim=-1)
        if head and self.head is not None:
            return self.head(joint, query=query)
        return torch.nn.functional.normalize(joint, dim=-1)

    def features(self, pixels, texts: list[str | None], head: bool = True, query: bool = True) -> np.ndarray:
        """The vectors of generated images (queries), or of training images without their strengths when not `query`."""
        return (
            self.combine(self.embed_images(pixels), self.embed_texts(texts), head, query)
            .cpu()
            .numpy()
            .astype(np.float32)
        )

    def strength(self, sha256s: list[str]) -> np.ndarray:
        """Each training image's influence strength: learned, or 1 when the bundle has none for it."""
        return np.array([self.strengths.get(sha, 1.0) for sha in sha256s], np.float32)

    def index_features(self, pixels, texts: list[str | None], sha256s: list[str]) -> np.ndarray:
        """The vectors of training images, as the index stores them: their features times their strengths."""
        return self.features(pixels, texts, query=False) * self.strength(sha256s)[:, None]


def read_config(directory: str | Path) -> tuple[Path, dict]:
    directory = Path(directory).expanduser()
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise BundleError(f"encoder bundle {directory} does not exist; pass the directory that holds {CONFIG_NAME}")
    if not config_path.is_file():
        raise BundleError(f"encoder bundle {directory}: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"encoder bundle {directory}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise BundleError(
            f"encoder bundle {directory}: {CONFIG_NAME} format is {config.get('format')!r}, expected {FORMAT!r}"
        )
    if "image_tower" not in config:
        raise BundleError(f"encoder bundle {directory}: {CONFIG_NAME} has no image_tower")
    for role in ("image_tower", "text_tower", "head", "strengths"):
        part = config.get(role)
        if part and not (directory / part.get("weights", "")).is_file():
            raise BundleError(f"encoder bundle {directory}: {role} weights file {part.get('weights')} is missing")
    return directory.resolve(), config


def load(directory: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> Encoder:
    """Load a bundle from local files only; `precision` is the towers' ([encoder] precision)."""
    directory, config = read_config(directory)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    return Encoder(directory, config, device, precision)


def save(directory: str | Path, config: dict, weights: dict[str, dict[str, torch.Tensor]]) -> str:
    """Write a bundle (config + {file name: state dict}) and return its encoder id."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **config}
    for name, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / name))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return _hash_bundle(directory, config)


def open_clip_bundle_config(
    name: str, model_config: dict, *, image_size: int, mean, std, temperature: float = 0.05
) -> dict:
    """The config of a bundle whose both towers come from one open_clip model saved as backbone.safetensors."""
    tower = {
        "library": "open_clip",
        "model_name": name,
        "model_config": model_config,
        "weights": "backbone.safetensors",
    }
    return {
        "name": name,
        "image_tower": {
            **tower,
            "image_size": image_size,
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bicubic",
        },
        "text_tower": {**tower, "context_length": model_config.get("text_cfg", {}).get("context_length", 77)},
        "head": None,
        "temperature": temperature,
    }


def strengths_state(strengths: dict[str, float]) -> dict[str, torch.Tensor]:
    """{sha256 hex: strength} as safetensors tensors: the digests as bytes, the strengths as their logs."""
    shas = sorted(strengths)
    return {
        "sha256": torch.tensor(
            np.frombuffer(b"".join(bytes.fromhex(sha) for sha in shas), np.uint8).reshape(len(shas), 32).copy()
        ),
        "log_strength": torch.tensor(np.log([strengths[sha] for sha in shas]), dtype=torch.float32),
    }


def read_strengths(directory: Path, part: dict) -> dict[str, float]:
    state = _load_weights(directory, part)
    try:
        digests, logs = state["sha256"].numpy(), state["log_strength"].double().numpy()
    except KeyError as exc:
        raise BundleError(f"encoder bundle {directory}: {part['weights']} lacks the {exc} tensor") from None
    if digests.ndim != 2 or digests.shape[1] != 32 or len(digests) != len(logs):
        raise BundleError(
            f"encoder bundle {directory}: {part['weights']} must hold (N, 32) sha256 digests and N log strengths"
        )
    return {bytes(row).hex(): float(np.exp(value)) for row, value in zip(digests, logs)}


def softmax_shares(scores: np.ndarray, temperature: float) -> np.ndarray:
    """p_i ∝ exp((s_i − s_max)/τ) along the last axis (AbC's soft attribution)."""
    z = (scores - scores.max(axis=-1, keepdims=True)) / max(temperature, 1e-12)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


__all__ = [
    "Encoder",
    "ProjectionHead",
    "Preprocess",
    "load",
    "save",
    "read_config",
    "open_clip_bundle_config",
    "open_clip_tower",
    "resolve_device",
    "softmax_shares",
    "strengths_state",
]
